"""Encoder speed: minisnip's BertModel against `transformers.BertModel` (SDPA attention) on the same weights.

Both models are loaded from one BERT folder (default: all-MiniLM-L6-v2 from `minisnip.default_model_path()`),
get the same random token ids and attention mask, and are timed side by side in one process:

* forward           eval(), torch.inference_mode()
* forward_backward  eval() (no dropout) with gradients: loss = hidden.float().pow(2).mean(); loss.backward()
* forward_padded    forward on a batch with padding (only when --pad-fraction is 0 and --padded-case > 0)
* pruned            (--pruned) minisnip dense vs minisnip with 50% of heads and FFN neurons removed in every layer

Each case warms both models up, then runs rounds that alternate the two models (A B, B A, A B, ...), each
sample being the mean of --iters iterations. The reported time is the median sample; ratio is the throughput
of the first model over the second (minisnip / reference, or pruned / dense): above 1 the first is faster.
Only ratios measured in one run mean anything; do not compare absolute numbers across runs or machines.

    python bench/bench_encoder.py                  # CPU (+ CUDA when available), results in bench/results/
    python bench/bench_encoder.py --pruned --threads 2
    python bench/bench_encoder.py --quick --out /tmp/b   # smoke test, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(HERE.parent))

import minisnip  # noqa: E402
from bench.machine import load_note, write_result, loadavg, machine_info  # noqa: E402
from minisnip.model import BertModel  # noqa: E402
from minisnip.surgery import prune_ffn_neurons, prune_heads  # noqa: E402

REF = "transformers"
MS = "minisnip"


# --- settings ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="BERT folder (default: minisnip.default_model_path())")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto = cpu, plus cuda when available (one result file per device)")
    p.add_argument("--batch", type=int, default=None, help="examples per batch (default 32; --quick 4)")
    p.add_argument("--seq", type=int, default=None, help="tokens per example (default 128; --quick 32)")
    p.add_argument("--pad-fraction", type=float, default=0.0,
                   help="mean fraction of padding per example in the main cases (default 0: no padding)")
    p.add_argument("--padded-case", type=float, default=0.25,
                   help="when --pad-fraction is 0, also time one forward case with this padding fraction (0: skip)")
    p.add_argument("--pruned", action="store_true",
                   help="also time minisnip dense vs minisnip with the first half of heads and FFN neurons removed")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: number of CPUs this process may use)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations per model and case (default 3)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per model and case (default 11)")
    p.add_argument("--iters", type=int, default=None, help="iterations per timed sample (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="batch 4 x 32 tokens, 2 warm-ups, 3 rounds of 1: a smoke test")
    p.add_argument("--out", default=str(HERE / "results"),
                   help="output folder (encoder_<device>.json/.md inside), or a .json file path")
    args = p.parse_args(argv)
    quick = args.quick
    for name, full, small in (("batch", 32, 4), ("seq", 128, 32), ("warmup", 3, 2), ("rounds", 11, 3), ("iters", 1, 1)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not 0.0 <= args.pad_fraction < 1.0 or not 0.0 <= args.padded_case < 1.0:
        p.error("padding fractions must lie in [0, 1)")
    if min(args.batch, args.rounds, args.iters, args.threads) < 1 or args.seq < 2 or args.warmup < 0:
        p.error("batch, rounds, iters and threads must be >= 1, seq >= 2 ([CLS] ... [SEP]), warmup >= 0")
    return args


# --- models and inputs ---------------------------------------------------------------------------------
def load_models(folder: Path, device: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """minisnip and Hugging Face encoders (no pooler: both return the last hidden states), eval mode."""
    import transformers
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    ms = BertModel.from_pretrained(folder).to(device).eval()
    ref = transformers.BertModel.from_pretrained(folder, attn_implementation="sdpa", add_pooling_layer=False,
                                                 dtype=torch.float32).to(device).eval()
    return ms, ref


def make_inputs(batch: int, seq: int, vocab: int, pad_fraction: float, seed: int, device: str
                ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Random ids ([CLS] ... [SEP] then [PAD]s) and the attention mask; the padding fraction actually made.

    Padding is spread the way a batch padded to its longest example looks: one example is full length,
    the others lose up to 2 x pad_fraction x seq tokens (capped so each keeps >= 2 tokens), linearly spread
    so that the mean padding is about pad_fraction, and shuffled across the batch.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (batch, seq), generator=g)
    ids[:, 0] = 101  # [CLS] in BERT vocabularies
    spread = torch.linspace(0, 2 * pad_fraction * seq, batch) if batch > 1 else torch.zeros(1)
    pads = spread.round().long().clamp(0, seq - 2)[torch.randperm(batch, generator=g)]
    lengths = seq - pads
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids[torch.arange(batch), lengths - 1] = 102  # [SEP]
    ids = ids.masked_fill(mask == 0, 0)  # [PAD]
    return ids.to(device), mask.to(device), float(pads.sum()) / (batch * seq)


def autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()


def hidden(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if isinstance(model, BertModel):
        return model(ids, attention_mask=mask)
    return model(input_ids=ids, attention_mask=mask).last_hidden_state


def step(model: torch.nn.Module, mode: str, ids: torch.Tensor, mask: torch.Tensor, device: str) -> Callable[[], None]:
    """One benchmark iteration as a closure."""
    if mode == "forward":
        def run() -> None:
            with torch.inference_mode(), autocast(device):
                hidden(model, ids, mask)
    elif mode == "forward_backward":
        def run() -> None:
            model.zero_grad(set_to_none=True)
            with autocast(device):
                loss = hidden(model, ids, mask).float().pow(2).mean()
            loss.backward()
    else:
        raise ValueError(mode)
    return run


@torch.inference_mode()
def max_abs_diff(a: torch.nn.Module, b: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, device: str) -> float:
    """Largest difference between the two models' hidden states at real (non-padding) tokens."""
    with autocast(device):
        ha, hb = hidden(a, ids, mask).float(), hidden(b, ids, mask).float()
    keep = mask.bool()
    return float((ha - hb).abs()[keep].max())


# --- timing ------------------------------------------------------------------------------------------------
def timed(fn: Callable[[], None], iters: int, sync: Callable[[], None]) -> tuple[float, float]:
    """Wall-clock and process CPU seconds per iteration (CPU time sums all threads of this process)."""
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) / iters, (time.process_time() - c0) / iters


def interleaved(fns: dict[str, Callable[[], None]], warmup: int, rounds: int, iters: int,
                sync: Callable[[], None]) -> dict[str, list[tuple[float, float]]]:
    """(wall, CPU) seconds per iteration, one sample per round and model; the order alternates (A B, B A, ...)."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    sync()
    samples: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                samples[name].append(timed(fns[name], iters, sync))
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def summarize(samples: list[tuple[float, float]], batch: int, seq: int) -> dict:
    wall, cpu = [w for w, _ in samples], [c for _, c in samples]
    med = statistics.median(wall)
    return {"median_s": med, "examples_per_s": batch / med, "tokens_per_s": batch * seq / med,
            "min_s": min(wall), "max_s": max(wall), "samples_s": wall,
            "cpu_median_s": statistics.median(cpu), "cpu_samples_s": cpu}


def run_case(name: str, mode: str, models: dict[str, torch.nn.Module], ids: torch.Tensor, mask: torch.Tensor,
             pad_fraction: float, args: argparse.Namespace, device: str, extra: dict | None = None) -> dict:
    """Time two models on one input; ratio = throughput(first) / throughput(second)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fns = {n: step(m, mode, ids, mask, device) for n, m in models.items()}
    samples = interleaved(fns, args.warmup, args.rounds, args.iters, sync)
    a, b = list(models)
    batch, seq = ids.shape
    res = {n: summarize(s, batch, seq) for n, s in samples.items()}
    case = {"case": name, "mode": mode, "batch": batch, "seq": seq, "pad_fraction": pad_fraction,
            "compare": [a, b], "results": res,
            "ratio": res[b]["median_s"] / res[a]["median_s"],
            "ratio_paired_median": statistics.median(sb[0] / sa[0] for sa, sb in zip(samples[a], samples[b])),
            "ratio_min": res[b]["min_s"] / res[a]["min_s"],
            "ratio_cpu": res[b]["cpu_median_s"] / res[a]["cpu_median_s"]}
    case.update(extra or {})
    for model in models.values():
        model.zero_grad(set_to_none=True)
    print(f"  {name:<16} {a} {res[a]['median_s'] * 1e3:8.1f} ms   {b} {res[b]['median_s'] * 1e3:8.1f} ms   "
          f"ratio {case['ratio']:.3f} (CPU time {case['ratio_cpu']:.3f})", flush=True)
    return case


# --- pruning and FLOPs ---------------------------------------------------------------------------------------
def encoder_flops(enc: BertModel, batch: int, seq: int) -> dict[str, int]:
    """Multiply-add FLOPs (2 per MAC) of one encoder forward, from the module shapes.

    linear: QKV, output, FFN up and down projections; attention: Q K^T and softmax(.) V. Embeddings,
    LayerNorm, softmax, GELU and the pooler are not counted.
    """
    t, hsz = batch * seq, enc.config.hidden_size
    linear = attention = 0
    for layer in enc.layers:
        if layer.attention is not None:
            inner = layer.attention.num_heads * layer.attention.head_dim
            linear += 2 * t * (hsz * 3 * inner + inner * hsz)
            attention += 2 * 2 * batch * seq * seq * inner
        if layer.ffn is not None:
            linear += 2 * t * 2 * hsz * layer.ffn.ffn_dim
    return {"linear": linear, "attention": attention, "total": linear + attention}


def width_cell(dense: BertModel, heads_frac: float, ffn_frac: float) -> BertModel:
    """A copy with round(frac x width) heads and FFN neurons removed in every layer (one of each stays)."""
    model = copy.deepcopy(dense)
    heads, neurons = {}, {}
    for i, layer in enumerate(model.layers):
        if layer.attention is not None:
            n = min(round(heads_frac * layer.attention.num_heads), layer.attention.num_heads - 1)
            heads[i] = layer.attention.heads[:n]
        if layer.ffn is not None:
            n = min(round(ffn_frac * layer.ffn.ffn_dim), layer.ffn.ffn_dim - 1)
            neurons[i] = range(n)
    prune_heads(model, heads)
    prune_ffn_neurons(model, neurons)
    return model.eval()


# --- one device --------------------------------------------------------------------------------------------
def run_device(args: argparse.Namespace, folder: Path, device: str) -> dict:
    torch.manual_seed(args.seed)
    load_start = loadavg()
    if load_start is not None and device == "cpu" and load_start > 0.5:
        print(f"[{device}] note: 1-minute load average is {load_start:.1f} before starting; other processes "
              "competing for the CPU make the timings noisy (the ratio, measured interleaved, suffers less)",
              flush=True)
    ms, ref = load_models(folder, device)
    vocab = ms.config.vocab_size
    ids, mask, pad = make_inputs(args.batch, args.seq, vocab, args.pad_fraction, args.seed, device)
    print(f"[{device}] {folder.name}: batch {args.batch} x {args.seq}, threads {torch.get_num_threads()}, "
          f"padding {pad:.2f}", flush=True)
    diff = max_abs_diff(ms, ref, ids, mask, device)
    pair = {MS: ms, REF: ref}
    cases = [run_case("forward", "forward", pair, ids, mask, pad, args, device, {"max_abs_diff": diff}),
             run_case("forward_backward", "forward_backward", pair, ids, mask, pad, args, device)]
    if args.pad_fraction == 0 and args.padded_case > 0:
        pids, pmask, ppad = make_inputs(args.batch, args.seq, vocab, args.padded_case, args.seed + 1, device)
        cases.append(run_case("forward_padded", "forward", pair, pids, pmask, ppad, args, device,
                              {"max_abs_diff": max_abs_diff(ms, ref, pids, pmask, device)}))
    if args.pruned:
        del ref, pair
        gc.collect()
        pruned = width_cell(ms, 0.5, 0.5)  # the first half of the heads and FFN neurons of every layer
        dense_f, pruned_f = encoder_flops(ms, args.batch, args.seq), encoder_flops(pruned, args.batch, args.seq)
        extra = {"flops_dense": dense_f, "flops_pruned": pruned_f,
                 "ideal_ratio_linear": dense_f["linear"] / pruned_f["linear"],
                 "ideal_ratio_total": dense_f["total"] / pruned_f["total"],
                 "params_dense": sum(p.numel() for p in ms.parameters()),
                 "params_pruned": sum(p.numel() for p in pruned.parameters()),
                 "pruned_shapes": [{"heads": l.num_heads if (l := layer.attention) else 0,
                                    "ffn_dim": layer.ffn.ffn_dim if layer.ffn else 0} for layer in pruned.layers]}
        cases.append(run_case("pruned_forward", "forward", {"minisnip_pruned": pruned, "minisnip_dense": ms},
                              ids, mask, pad, args, device, extra))
    settings = {k: getattr(args, k) for k in ("batch", "seq", "pad_fraction", "padded_case", "pruned", "threads",
                                              "warmup", "rounds", "iters", "seed", "quick")}
    settings["dtype"] = "bf16 autocast" if device == "cuda" else "float32"
    settings["model"] = str(folder)
    machine = machine_info(device)
    machine["loadavg_1m_start"], machine["loadavg_1m_end"] = load_start, loadavg()
    return {"machine": machine, "settings": settings, "cases": cases}


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    where = m.get("gpu", m["cpu_model"]) if m["device"] == "cuda" else m["cpu_model"]
    lines = [f"Device {m['device']} ({where}), torch {m['torch']}, transformers {m['transformers']}, "
             f"{_n(m['torch_threads'], 'thread')}, {s['dtype']}; batch {s['batch']} x {s['seq']} tokens, "
             f"median of {_n(s['rounds'], 'interleaved round')} x {_n(s['iters'], 'iteration')}.",
             "",
             "| case | padding | model | ms / iter | examples / s | tokens / s | ratio | ratio (CPU time) |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for c in result["cases"]:
        a, b = c["compare"]
        for i, name in enumerate((a, b)):
            r = c["results"][name]
            cpu = f"{c['ratio_cpu']:.2f}" if m["device"] == "cpu" else "n/a"
            ratio = f"**{c['ratio']:.2f}** | {cpu}" if i == 0 else " |"
            lines.append(f"| {c['case'] if i == 0 else ''} | {c['pad_fraction']:.0%} | {name} | "
                         f"{r['median_s'] * 1e3:.1f} | {r['examples_per_s']:.1f} | {r['tokens_per_s']:.0f} | {ratio} |")
    lines.append("")
    lines.append("ratio = throughput of the first row over the second from the median wall-clock times (> 1: the "
                 "first is faster); ratio (CPU time) uses the median process CPU time per iteration instead, "
                 "which competing processes disturb less (most useful with --threads 1).")
    note = load_note(m)
    if note:
        lines.append(note)
    for c in result["cases"]:
        if "max_abs_diff" in c:
            lines.append(f"{c['case']}: max |minisnip - transformers| over real tokens = {c['max_abs_diff']:.2e}.")
        if "ideal_ratio_linear" in c:
            lines.append(f"{c['case']}: ideal speed-up from FLOPs = {c['ideal_ratio_linear']:.2f} (linear layers), "
                         f"{c['ideal_ratio_total']:.2f} (linear + attention matmuls); measured {c['ratio']:.2f}.")
    return "\n".join(lines) + "\n"


def output_paths(out: str, device: str) -> tuple[Path, Path]:
    p = Path(out)
    if p.suffix == ".json":
        stem = p.with_suffix("")
        json_path = p if device in stem.name else stem.with_name(f"{stem.name}_{device}.json")
        return json_path, json_path.with_suffix(".md")
    return p / f"encoder_{device}.json", p / f"encoder_{device}.md"


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = Path(args.model) if args.model else minisnip.default_model_path()
    if args.device == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device available")
        devices = [args.device]
    results = {}
    for device in devices:
        result = run_device(args, folder, device)
        json_path, md_path = output_paths(args.out, device)
        write_result(result, json_path, md_path, markdown(result))
        results[device] = result
    return results


if __name__ == "__main__":
    main()
