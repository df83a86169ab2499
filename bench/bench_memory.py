"""Peak memory of inference and training, dense and pruned (half the heads and FFN neurons of every layer).

Each case runs in a fresh subprocess, so that no case inherits another's freed-but-kept memory:

* inference  eval(), torch.inference_mode(), --steps forwards
* training   train() (dropout on), --steps of forward, loss = hidden.pow(2).mean(), backward, AdamW step
             (the optimizer's two moment buffers exist from the first step on)

The model is loaded (the pruned one from a folder the parent saved with `save_pretrained`), the inputs are
built, and then the baseline is taken. On CPU, peak = the resident set's high-water mark (VmHWM of
/proc/self/status, reset after the baseline through /proc/self/clear_refs) minus the resident set at the
baseline; where the reset is refused, `ru_maxrss` is used and the method is recorded. On CUDA, peak =
`torch.cuda.max_memory_allocated()` minus the allocated bytes at the baseline (the CPU figure is kept too).

    python bench/bench_memory.py --threads 1 --quick      # about a minute on a 2-core CPU
    python bench/bench_memory.py --batch 1 --seq 8 --quick --out /tmp/b   # smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(HERE.parent))

import minisnip  # noqa: E402
from bench.bench_encoder import make_inputs, width_cell  # noqa: E402
from bench.machine import benchmark_parser, loadavg, machine_info, save_result, table_text  # noqa: E402
from minisnip.model import BertModel  # noqa: E402

CASES = [("inference", "dense"), ("inference", "pruned"), ("training", "dense"), ("training", "pruned")]
MIB = 2 ** 20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = benchmark_parser(__doc__)
    p.add_argument("--pruned-fraction", type=float, default=0.5, help="heads and FFN neurons removed per layer")
    p.add_argument("--steps", type=int, default=None, help="forwards / training steps per case (default 3; --quick 2)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads in each case's process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="2 steps per case")
    p.add_argument("--out", default=str(HERE / "results"),
                   help="output folder (memory_<device>[_quick].json/.md inside), or a .json path")
    p.add_argument("--child", nargs=3, metavar=("MODE", "VARIANT", "FOLDER"), help=argparse.SUPPRESS)
    p.set_defaults(stem="memory")
    args = p.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (2 if args.quick else 3)
    return args


# --- inside one case's process ------------------------------------------------------------------------------
def status_kib(field: str) -> int | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in KiB, or None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset VmHWM to the current resident set (Linux: write 5 to /proc/self/clear_refs); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    hwm, rss = status_kib("VmHWM"), status_kib("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024


def measure_case(mode: str, variant: str, folder: Path, args: argparse.Namespace) -> dict:
    """Load, build inputs, take the baseline, run the steps; the peak growth in bytes."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = args.device
    model = BertModel.from_pretrained(folder).to(device)
    ids, mask, _ = make_inputs(args.batch, args.seq, model.config.vocab_size, 0.0, args.seed, device)
    model.train(mode == "training")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if mode == "training" else None
    gc.collect()
    rss0 = status_kib("VmRSS")
    method = "VmHWM after clear_refs" if reset_peak() else "ru_maxrss (no reset)"
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda0 = torch.cuda.memory_allocated()
    for _ in range(args.steps):
        if opt is None:
            with torch.inference_mode():
                model(ids, attention_mask=mask)
        else:
            opt.zero_grad(set_to_none=True)
            model(ids, attention_mask=mask).float().pow(2).mean().backward()
            opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    hwm = status_kib("VmHWM") if method.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    base = rss0 if method.startswith("VmHWM") else maxrss0
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    out = {"mode": mode, "variant": variant, "method": method, "baseline_rss_bytes": (rss0 or 0) * 1024,
           "peak_rss_bytes": hwm * 1024, "peak_growth_bytes": (hwm - base) * 1024, "param_bytes": params,
           "heads": [layer.attention.num_heads if layer.attention else 0 for layer in model.layers],
           "ffn_dims": [layer.ffn.ffn_dim if layer.ffn else 0 for layer in model.layers]}
    if device == "cuda":
        out["cuda_peak_growth_bytes"] = torch.cuda.max_memory_allocated() - cuda0
        out["cuda_baseline_bytes"] = cuda0
    return out


# --- the parent ---------------------------------------------------------------------------------------------
def run_child(mode: str, variant: str, folder: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, variant, str(folder),
           "--device", args.device, "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
           "--threads", str(args.threads), "--seed", str(args.seed)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"case {mode} {variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    cuda = m["device"] == "cuda"
    lines = [f"Device {m['device']} ({m.get('gpu', m['cpu_model'])}), torch {m['torch']}, {s['threads']} thread(s), "
             f"float32; batch {s['batch']} x {s['seq']} tokens, {s['steps']} steps per case, one fresh process per "
             f"case; pruned = {s['pruned_fraction']:.0%} of the heads and FFN neurons of every layer removed.", "",
             "| case | model | parameters MiB | peak growth MiB (CPU resident set) |"
             + (" peak growth MiB (CUDA allocated) |" if cuda else "") + " pruned / dense |",
             "|---|---|---:|---:|" + ("---:|" if cuda else "") + "---:|"]
    by = {(c["mode"], c["variant"]): c for c in result["cases"]}
    key = "cuda_peak_growth_bytes" if cuda else "peak_growth_bytes"
    for c in result["cases"]:
        dense = by.get((c["mode"], "dense"))
        rel = f"{c[key] / dense[key]:.2f}" if c["variant"] != "dense" and dense and dense[key] > 0 else ""
        line = f"| {c['mode']} | {c['variant']} | {c['param_bytes'] / MIB:.1f} | {c['peak_growth_bytes'] / MIB:.1f} |"
        if cuda:
            line += f" {c['cuda_peak_growth_bytes'] / MIB:.1f} |"
        lines.append(line + f" {rel} |")
    lines += ["", f"peak growth = high-water mark minus the level after loading the model and building the inputs "
              f"({result['cases'][0]['method']}); training holds gradients and AdamW's two moments besides the "
              "activations."]
    return table_text(lines, m, result["wall_s"])


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.child:
        mode, variant, folder = args.child
        print(json.dumps(measure_case(mode, variant, Path(folder), args)), flush=True)
        return None
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    folder = Path(args.model) if args.model else minisnip.default_model_path()
    machine = machine_info(args.device)
    machine["torch_threads"] = args.threads
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="minisnip_memory_") as tmp:
        pruned_folder = Path(tmp) / "pruned"
        width_cell(BertModel.from_pretrained(folder), args.pruned_fraction, args.pruned_fraction) \
            .save_pretrained(pruned_folder)
        cases = []
        for mode, variant in CASES:
            cases.append(run_child(mode, variant, folder if variant == "dense" else pruned_folder, args))
            c = cases[-1]
            print(f"  {mode:<9} {variant:<6} peak growth {c['peak_growth_bytes'] / MIB:8.1f} MiB", flush=True)
    machine["loadavg_1m_end"] = loadavg()
    settings = {"batch": args.batch, "seq": args.seq, "steps": args.steps, "threads": args.threads,
                "pruned_fraction": args.pruned_fraction, "seed": args.seed, "quick": args.quick, "model": str(folder)}
    result = {"machine": machine, "settings": settings, "cases": cases, "wall_s": time.perf_counter() - t0}
    save_result(result, args, args.device, markdown(result))
    return result


if __name__ == "__main__":
    main()
