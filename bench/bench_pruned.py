"""Speed of physically pruned encoders against the FLOP ideal: heads x FFN neurons removed, and whole blocks.

Every cell is a copy of the dense minisnip BertModel shrunk with `minisnip.surgery`:

* heads H% x FFN F%  `prune_heads` removes round(H% x heads) heads of every layer (at least one stays),
                     `prune_ffn_neurons` round(F% x FFN width) neurons of every layer (the first ones: which
                     ones does not change the speed); levels --levels, on the diagonal and both axes
                     (--grid cross, default) or every pair (--grid full)
* attention blocks k `remove_blocks(attention=first k layers)`; likewise FFN blocks k, and both ("layers k")

All cells and the dense model run in the same interleaved rounds (forward, eval(), inference_mode; the order
reverses every round). speedup = dense median time / cell median time; ideal = dense FLOPs / cell FLOPs
(linear layers + attention matmuls, `bench_encoder.encoder_flops`); efficiency = speedup / ideal. With
--gemms (default on) each cell's matrix products alone (`bench_limit.gemm_plan`) are timed too, which splits
a shortfall into slower small GEMMs and the work that does not shrink (LayerNorm, embeddings, residual sums).

    python bench/bench_pruned.py --threads 1 --quick      # a few minutes on a 2-core CPU
    python bench/bench_pruned.py --threads 1 --grid full
    python bench/bench_pruned.py --batch 1 --seq 8 --levels 0 0.5 --blocks 1 --quick --out /tmp/b   # smoke test
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(HERE.parent))

from bench.bench_encoder import encoder_flops, interleaved, make_inputs, step, width_cell  # noqa: E402
from bench.bench_limit import gemm_plan  # noqa: E402
from bench.machine import (add_timing_args, benchmark_parser, loadavg, resolve_timing_args, save_result,  # noqa: E402
                           start_run, table_text)
from minisnip.model import BertModel  # noqa: E402
from minisnip.surgery import remove_blocks  # noqa: E402

DENSE = "dense"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = benchmark_parser(__doc__)
    p.add_argument("--levels", nargs="+", type=float, default=[0.0, 0.3, 0.5, 0.7, 0.9],
                   help="fractions of heads / FFN neurons removed in every layer")
    p.add_argument("--grid", choices=["cross", "full"], default="cross",
                   help="cross: the diagonal and both axes; full: every heads x FFN pair")
    p.add_argument("--blocks", nargs="*", type=int, default=[2, 4],
                   help="k for the whole-block cells: attention / FFN / both removed in the first k layers")
    p.add_argument("--no-gemms", dest="gemms", action="store_false", help="do not time each cell's GEMMs alone")
    add_timing_args(p, "pruned", rounds=7)
    args = p.parse_args(argv)
    resolve_timing_args(args)
    if any(not 0 <= lv < 1 for lv in args.levels):
        p.error("--levels must lie in [0, 1)")
    return args


def block_cell(dense: BertModel, attention: int, ffn: int) -> BertModel:
    """A copy without the attention blocks of the first `attention` layers and FFN blocks of the first `ffn`."""
    model = copy.deepcopy(dense)
    remove_blocks(model, attention=range(attention), ffn=range(ffn))
    return model.eval()


def cells(dense: BertModel, args: argparse.Namespace) -> dict[str, tuple[dict, BertModel]]:
    """name -> (description, pruned model), the dense model first."""
    out: dict[str, tuple[dict, BertModel]] = {DENSE: ({"kind": "dense", "heads_removed": 0.0, "ffn_removed": 0.0},
                                                      dense)}
    levels = sorted(set(args.levels))
    pairs = [(h, f) for h in levels for f in levels] if args.grid == "full" else \
        sorted({(lv, lv) for lv in levels} | {(lv, 0.0) for lv in levels} | {(0.0, lv) for lv in levels})
    for h, f in pairs:
        if h == 0 and f == 0:
            continue
        out[f"heads {h:.0%} ffn {f:.0%}"] = ({"kind": "width", "heads_removed": h, "ffn_removed": f},
                                             width_cell(dense, h, f))
    n_layers = len(dense.layers)
    for k in args.blocks:
        if not 0 < k <= n_layers:
            continue
        out[f"attention blocks {k}"] = ({"kind": "blocks", "attention_blocks": k, "ffn_blocks": 0},
                                        block_cell(dense, k, 0))
        out[f"ffn blocks {k}"] = ({"kind": "blocks", "attention_blocks": 0, "ffn_blocks": k}, block_cell(dense, 0, k))
        if k < n_layers:  # all blocks gone would leave nothing to run
            out[f"layers {k}"] = ({"kind": "blocks", "attention_blocks": k, "ffn_blocks": k}, block_cell(dense, k, k))
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = args.device
    folder, machine, t0 = start_run(args)
    dense = BertModel.from_pretrained(folder).to(device).eval()
    ids, mask, _ = make_inputs(args.batch, args.seq, dense.config.vocab_size, 0.0, args.seed, device)
    grid = cells(dense, args)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    fns: dict[str, Callable[[], None]] = {}
    pool: dict = {}  # GEMM buffers shared by every cell's plan
    for name, (_, model) in grid.items():
        fns[name] = step(model, "forward", ids, mask, device)
        if args.gemms:
            fns[f"{name} | gemms"] = gemm_plan(model, args.batch, args.seq, device, dtype, pool=pool)
    print(f"[{device}] {len(grid)} models, batch {args.batch} x {args.seq}, threads {torch.get_num_threads()}",
          flush=True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    samples = interleaved(fns, args.warmup, args.rounds, 1, sync)
    wall = {n: [w for w, _ in s] for n, s in samples.items()}
    med = {n: statistics.median(w) for n, w in wall.items()}
    dense_flops = encoder_flops(dense, args.batch, args.seq)
    rows = []
    for name, (desc, model) in grid.items():
        flops = encoder_flops(model, args.batch, args.seq)
        row = {"cell": name, **desc, "median_s": med[name], "samples_s": wall[name], "flops": flops,
               "ideal": dense_flops["total"] / flops["total"],
               "ideal_linear": dense_flops["linear"] / flops["linear"] if flops["linear"] else None,
               "speedup": med[DENSE] / med[name],
               "speedup_paired_median": statistics.median(d / c for d, c in zip(wall[DENSE], wall[name])),
               "params": sum(p.numel() for p in model.parameters()),
               "shapes": [{"heads": layer.attention.num_heads if layer.attention else 0,
                           "ffn_dim": layer.ffn.ffn_dim if layer.ffn else 0} for layer in model.layers]}
        row["efficiency"] = row["speedup"] / row["ideal"]
        if args.gemms:
            g = med[f"{name} | gemms"]
            row.update({"gemms_s": g, "gemm_speedup": med[f"{DENSE} | gemms"] / g,
                        "non_gemm_s": med[name] - g, "gemm_share": g / med[name]})
            row["gemm_efficiency"] = row["gemm_speedup"] / row["ideal"]
        rows.append(row)
        print(f"  {name:<22} {med[name] * 1e3:8.1f} ms  speedup {row['speedup']:.2f}  ideal {row['ideal']:.2f}  "
              f"efficiency {row['efficiency']:.2f}", flush=True)
    machine["loadavg_1m_end"] = loadavg()
    settings = {"batch": args.batch, "seq": args.seq, "levels": args.levels, "grid": args.grid,
                "blocks": args.blocks, "gemms": args.gemms, "threads": args.threads, "warmup": args.warmup,
                "rounds": args.rounds, "seed": args.seed, "quick": args.quick, "model": str(folder),
                "dtype": "bf16 autocast" if device == "cuda" else "float32"}
    result = {"machine": machine, "settings": settings, "cells": rows, "wall_s": time.perf_counter() - t0}
    save_result(result, args, device, markdown(result))
    return result


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    gemms = s["gemms"]
    lines = [f"Device {m['device']} ({m.get('gpu', m['cpu_model'])}), torch {m['torch']}, {m['torch_threads']} "
             f"thread(s), {s['dtype']}; forward, batch {s['batch']} x {s['seq']}, no padding; median of "
             f"{s['rounds']} interleaved rounds of all cells.", "",
             "| cell | heads / FFN per layer | ms | speedup | ideal (FLOPs) | speedup / ideal |"
             + (" GEMMs ms | GEMM speedup / ideal | non-GEMM ms |" if gemms else ""),
             "|---|---|---:|---:|---:|---:|" + ("---:|---:|---:|" if gemms else "")]
    for r in result["cells"]:
        widths = sorted({(sh["heads"], sh["ffn_dim"]) for sh in r["shapes"]})
        shape = ", ".join(f"{h}/{f}" for h, f in widths)
        line = (f"| {r['cell']} | {shape} | {r['median_s'] * 1e3:.1f} | **{r['speedup']:.2f}** | {r['ideal']:.2f} | "
                f"**{r['efficiency']:.2f}** |")
        if gemms:
            line += f" {r['gemms_s'] * 1e3:.1f} | {r['gemm_efficiency']:.2f} | {r['non_gemm_s'] * 1e3:.1f} |"
        lines.append(line)
    lines += ["", "speedup = dense median time / cell median time; ideal = dense / cell FLOPs of the linear layers and "
              "attention matmuls; speedup / ideal = 1 means the cell is as fast as its FLOPs allow. "
              "heads / FFN per layer lists the distinct (heads, FFN width) pairs of the layers (0: block removed)."]
    if gemms:
        lines.append("GEMMs ms: the cell's matrix products alone (preallocated, back to back); non-GEMM ms = forward "
                     "- GEMMs (embeddings, LayerNorm, GELU, softmax, residual sums, copies).")
    return table_text(lines, m, result["wall_s"])


if __name__ == "__main__":
    main()
