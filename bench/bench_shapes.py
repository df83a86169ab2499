"""Encoder speed at several shapes: minisnip's BertModel against `transformers.BertModel` (SDPA), same weights.

The cases of `bench_encoder.py` (forward, forward_backward; no padding) at each batch x length of --shapes
(default 1x128, 32x128, 8x512), timed the same way: warm-up, then interleaved rounds (A B, B A, ...) with
the median sample reported. ratio = throughput of minisnip over transformers: above 1, minisnip is faster.
CPU in float32; CUDA (when present) with bf16 autocast for both models.

    python bench/bench_shapes.py --threads 1 --quick      # 3 rounds per case, a few minutes on a 2-core CPU
    python bench/bench_shapes.py --threads 1              # 7 rounds per case
    python bench/bench_shapes.py --shapes 1x8 --quick --out /tmp/b   # smoke test
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(HERE.parent))

import minisnip  # noqa: E402
from bench.bench_encoder import MS, REF, load_models, make_inputs, max_abs_diff, run_case  # noqa: E402
from bench.machine import (add_timing_args, benchmark_parser, loadavg, machine_info,  # noqa: E402
                           resolve_timing_args, save_result, table_text)

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = benchmark_parser(__doc__, auto_device=True, batch_seq=False, shapes=True)
    p.add_argument("--modes", nargs="+", default=["forward", "forward_backward"],
                   choices=["forward", "forward_backward"])
    add_timing_args(p, "shapes", rounds=7)
    p.add_argument("--iters", type=int, default=1, help="iterations per timed sample")
    args = p.parse_args(argv)
    resolve_timing_args(args)
    return args


def run_device(args: argparse.Namespace, folder: Path, device: str) -> dict:
    """Every shape x mode on one device, minisnip against transformers."""
    torch.manual_seed(args.seed)
    machine = machine_info(device)
    t0 = time.perf_counter()
    ms, ref = load_models(folder, device)
    pair = {MS: ms, REF: ref}
    cases = []
    for batch, seq in args.shapes:
        ids, mask, _ = make_inputs(batch, seq, ms.config.vocab_size, 0.0, args.seed, device)
        print(f"[{device}] {batch} x {seq}", flush=True)
        diff = max_abs_diff(ms, ref, ids, mask, device)
        for mode in args.modes:
            cases.append(run_case(f"{mode} {batch}x{seq}", mode, pair, ids, mask, 0.0, args, device,
                                  {"max_abs_diff": diff}))
    settings = {"shapes": [f"{b}x{s}" for b, s in args.shapes], "modes": args.modes, "threads": args.threads,
                "warmup": args.warmup, "rounds": args.rounds, "iters": args.iters, "seed": args.seed,
                "quick": args.quick, "model": str(folder),
                "dtype": "bf16 autocast" if device == "cuda" else "float32"}
    machine["loadavg_1m_end"] = loadavg()
    return {"machine": machine, "settings": settings, "cases": cases, "wall_s": time.perf_counter() - t0}


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    where = m.get("gpu", m["cpu_model"])
    lines = [f"Device {m['device']} ({where}), torch {m['torch']}, transformers {m['transformers']}, "
             f"{m['torch_threads']} thread(s), {s['dtype']}, no padding; median of {s['rounds']} interleaved "
             f"rounds x {s['iters']} iteration(s).", "",
             "| case | minisnip ms / iter | transformers ms / iter | ratio | ratio (CPU time) | ratio (fastest sample) |",
             "|---|---:|---:|---:|---:|---:|"]
    for c in result["cases"]:
        r = c["results"]
        cpu = f"{c['ratio_cpu']:.2f}" if m["device"] == "cpu" else "n/a"
        lines.append(f"| {c['case']} | {r[MS]['median_s'] * 1e3:.1f} | {r[REF]['median_s'] * 1e3:.1f} | "
                     f"**{c['ratio']:.2f}** | {cpu} | {c['ratio_min']:.2f} |")
    lines += ["", "ratio = throughput of minisnip over transformers from the median wall-clock times (> 1: minisnip "
              "is faster). Outputs agree to "
              f"{max(c['max_abs_diff'] for c in result['cases']):.1e} (max |difference| of the hidden states)."]
    return table_text(lines, m, result["wall_s"])


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = Path(args.model) if args.model else minisnip.default_model_path()
    devices = ["cpu", "cuda"] if args.device == "auto" and torch.cuda.is_available() else \
        (["cpu"] if args.device == "auto" else [args.device])
    if "cuda" in devices and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    results = {}
    for device in devices:
        result = run_device(args, folder, device)
        save_result(result, args, device, markdown(result))
        results[device] = result
    return results


if __name__ == "__main__":
    main()
