"""The limit of the encoder's speed: the whole minisnip forward against its matrix products alone.

For each batch x length of --shapes, three things are timed in interleaved rounds (median sample):

* forward       minisnip BertModel, eval(), torch.inference_mode(), no padding
* gemms         the same forward's matrix products alone, back to back, on preallocated inputs and outputs
                with the model's own weights: per layer the QKV, output, FFN up and down projections
                (`torch.addmm`, bias included, as `F.linear` calls it) and the attention products
                Q K^T and P V (`torch.bmm` over batch x heads)
* gemms_linear  the linear-layer products alone (so gemms - gemms_linear is the attention products)

ratio = forward / gemms: how much slower the whole forward is than its GEMMs (1.0 would be a forward that
is nothing but GEMMs). A profile of --profile-iters forwards (torch.profiler, self CPU time per op, grouped
into GEMM, SDPA, LayerNorm, GELU, ...) says where the rest goes. Note that the fused SDPA kernel computes its
two attention products internally: in the profile they count under "sdpa", not "gemm".

    python bench/bench_limit.py --threads 1 --quick       # a few minutes on a 2-core CPU
    python bench/bench_limit.py --shapes 1x8 --quick --out /tmp/b   # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(HERE.parent))

from bench.bench_encoder import autocast, encoder_flops, interleaved, make_inputs, summarize  # noqa: E402
from bench.machine import (add_timing_args, benchmark_parser, loadavg, resolve_timing_args, save_result,  # noqa: E402
                           start_run, table_text)
from minisnip.model import BertModel  # noqa: E402

# profiler op name -> group; ops not listed fall into "other"
OP_GROUPS = {
    "aten::addmm": "gemm", "aten::mm": "gemm", "aten::bmm": "gemm", "aten::baddbmm": "gemm",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "sdpa", "aten::_scaled_dot_product_flash_attention": "sdpa",
    "aten::_efficient_attention_forward": "sdpa", "aten::_flash_attention_forward": "sdpa",
    "aten::_softmax": "sdpa", "aten::softmax": "sdpa",
    "aten::native_layer_norm": "layernorm", "aten::layer_norm": "layernorm",
    "aten::gelu": "gelu",
    "aten::add": "residual add", "aten::add_": "residual add",
    "aten::embedding": "embeddings", "aten::index_select": "embeddings / packing",
    "aten::index_copy": "packing", "aten::nonzero": "packing",
    "aten::copy_": "copies", "aten::clone": "copies", "aten::contiguous": "copies",  # copy_: mostly addmm's bias
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = benchmark_parser(__doc__, batch_seq=False, shapes=True)
    add_timing_args(p, "limit", rounds=9)
    p.add_argument("--profile-iters", type=int, default=2, help="forwards under torch.profiler (0: no profile)")
    args = p.parse_args(argv)
    resolve_timing_args(args)
    return args


def gemm_plan(model: BertModel, batch: int, seq: int, device: str, dtype: torch.dtype,
              attention: bool = True, pool: dict | None = None) -> Callable[[], None]:
    """A closure that runs every matrix product of one forward, back to back, into preallocated outputs.

    Inputs are random (the values do not change the speed of a dense GEMM), weights are the model's own.
    Buffers of one shape are shared by all layers, and by all plans given the same `pool` (the products run
    one after another, so sharing changes nothing but the memory held).
    """
    t = batch * seq
    pool = {} if pool is None else pool
    g = torch.Generator(device="cpu").manual_seed(0)

    def buf(kind: str, *shape: int) -> torch.Tensor:
        key = (kind, shape, device, dtype)
        if key not in pool:
            x = torch.randn(*shape, generator=g)
            pool[key] = (torch.softmax(x, dim=-1) if kind == "probs" else x).to(device=device, dtype=dtype)
        return pool[key]

    def linear(lin: torch.nn.Linear) -> Callable[[], object]:
        w, b = lin.weight.detach().to(dtype), lin.bias.detach().to(dtype)
        x, out = buf("in", t, w.shape[1]), buf("out", t, w.shape[0])
        return lambda: torch.addmm(b, x, w.t(), out=out)

    ops: list[Callable[[], object]] = []
    for layer in model.layers:
        if layer.attention is not None:
            a = layer.attention
            n, d = a.num_heads, a.head_dim
            ops += [linear(a.qkv), linear(a.out)]
            if attention:
                q, kt, v = buf("in", batch * n, seq, d), buf("in", batch * n, d, seq), buf("in2", batch * n, seq, d)
                p, s_out, c_out = buf("probs", batch * n, seq, seq), buf("out", batch * n, seq, seq), \
                    buf("out", batch * n, seq, d)
                ops.append(lambda q=q, kt=kt, s_out=s_out: torch.bmm(q, kt, out=s_out))
                ops.append(lambda p=p, v=v, c_out=c_out: torch.bmm(p, v, out=c_out))
        if layer.ffn is not None:
            ops += [linear(layer.ffn.up), linear(layer.ffn.down)]

    def run() -> None:
        with torch.inference_mode():
            for op in ops:
                op()
    return run


def profile_groups(fn: Callable[[], None], iters: int) -> tuple[dict[str, float], list[tuple[str, str, float]]]:
    """Self CPU time (seconds per iteration) of each op group over `iters` calls of fn, under torch.profiler,
    and the 12 costliest ops as (name, group, seconds per iteration)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            fn()
    groups: dict[str, float] = {}
    ops = []
    for ev in prof.key_averages():
        group, seconds = OP_GROUPS.get(ev.key, "other"), ev.self_cpu_time_total * 1e-6 / iters
        groups[group] = groups.get(group, 0.0) + seconds
        ops.append((ev.key, group, seconds))
    top = sorted(ops, key=lambda op: -op[2])[:12]
    return dict(sorted(groups.items(), key=lambda kv: -kv[1])), top


def run_shape(model: BertModel, batch: int, seq: int, args: argparse.Namespace, device: str) -> dict:
    """Time the forward against its GEMMs at one shape; profile it."""
    ids, mask, _ = make_inputs(batch, seq, model.config.vocab_size, 0.0, args.seed, device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def forward() -> None:
        with torch.inference_mode(), autocast(device):
            model(ids, attention_mask=mask)

    pool: dict = {}
    fns = {"forward": forward, "gemms": gemm_plan(model, batch, seq, device, dtype, pool=pool),
           "gemms_linear": gemm_plan(model, batch, seq, device, dtype, attention=False, pool=pool)}
    samples = interleaved(fns, args.warmup, args.rounds, 1, sync)
    res = {n: summarize(s, batch, seq) for n, s in samples.items()}
    flops = encoder_flops(model, batch, seq)
    fwd, gemms, lin = (res[n]["median_s"] for n in ("forward", "gemms", "gemms_linear"))
    case = {"batch": batch, "seq": seq, "results": res, "flops": flops,
            "ratio_forward_over_gemms": fwd / gemms,
            "ratio_paired_median": statistics.median(f[0] / g[0] for f, g in zip(samples["forward"], samples["gemms"])),
            "ratio_cpu": res["forward"]["cpu_median_s"] / res["gemms"]["cpu_median_s"],
            "attention_gemms_s": gemms - lin,
            "gflops_forward": flops["total"] / fwd / 1e9, "gflops_gemms": flops["total"] / gemms / 1e9,
            "gflops_gemms_linear": flops["linear"] / lin / 1e9}
    if args.profile_iters > 0 and device == "cpu":
        groups, top = profile_groups(forward, args.profile_iters)
        total = sum(groups.values())
        case["profile_self_cpu_s"], case["profile_top_ops"] = groups, top
        case["profile_shares"] = {k: v / total for k, v in groups.items()}
    print(f"  {batch}x{seq}: forward {fwd * 1e3:.1f} ms, GEMMs {gemms * 1e3:.1f} ms "
          f"(linear {lin * 1e3:.1f} ms), ratio {case['ratio_forward_over_gemms']:.3f}", flush=True)
    return case


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    lines = [f"Device {m['device']} ({m.get('gpu', m['cpu_model'])}), torch {m['torch']}, {m['torch_threads']} "
             f"thread(s), {s['dtype']}, no padding; median of {s['rounds']} interleaved rounds.", "",
             "| shape | forward ms | GEMMs ms | of which linear | forward / GEMMs | (CPU time) | GFLOP/s forward | "
             "GFLOP/s GEMMs |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in result["cases"]:
        r = c["results"]
        lines.append(f"| {c['batch']}x{c['seq']} | {r['forward']['median_s'] * 1e3:.1f} | "
                     f"{r['gemms']['median_s'] * 1e3:.1f} | {r['gemms_linear']['median_s'] * 1e3:.1f} | "
                     f"**{c['ratio_forward_over_gemms']:.2f}** | {c['ratio_cpu']:.2f} | {c['gflops_forward']:.1f} | "
                     f"{c['gflops_gemms']:.1f} |")
    profiled = [c for c in result["cases"] if "profile_shares" in c]
    if profiled:
        groups = sorted({g for c in profiled for g in c["profile_shares"]},
                        key=lambda g: -max(c["profile_shares"].get(g, 0) for c in profiled))
        lines += ["", f"Where the forward's time goes (torch.profiler self CPU time, {s['profile_iters']} forwards; "
                  "the SDPA kernel includes its own two attention products; copies are mostly `addmm` writing the bias into its "
                  "output before the product, one per linear layer, which the GEMMs-only timing includes too):", "",
                  "| shape | " + " | ".join(groups) + " |", "|---|" + "---:|" * len(groups)]
        for c in profiled:
            lines.append(f"| {c['batch']}x{c['seq']} | " +
                         " | ".join(f"{c['profile_shares'].get(g, 0):.1%}" for g in groups) + " |")
    lines += ["", "forward / GEMMs: the whole forward's median time over that of its matrix products alone "
              "(QKV, output, FFN up/down as addmm; Q K^T and P V as bmm), run back to back on preallocated tensors."]
    return table_text(lines, m, result["wall_s"])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    folder, machine, t0 = start_run(args)
    model = BertModel.from_pretrained(folder).to(args.device).eval()
    cases = [run_shape(model, b, s, args, args.device) for b, s in args.shapes]
    machine["loadavg_1m_end"] = loadavg()
    settings = {"shapes": [f"{b}x{s}" for b, s in args.shapes], "threads": args.threads, "warmup": args.warmup,
                "rounds": args.rounds, "profile_iters": args.profile_iters, "seed": args.seed, "quick": args.quick,
                "model": str(folder), "dtype": "bf16" if args.device == "cuda" else "float32"}
    result = {"machine": machine, "settings": settings, "cases": cases, "wall_s": time.perf_counter() - t0}
    save_result(result, args, args.device, markdown(result))
    return result


if __name__ == "__main__":
    main()
