"""torch.compile on the minisnip encoder: compiled against eager forward, after warm-up; compile time apart.

The dense minisnip BertModel (eval(), torch.inference_mode(), no padding) is wrapped in `torch.compile(model,
mode=--mode)`. The first compiled call (tracing + code generation) and the second are timed on their own
and reported as compile time; then eager and compiled forwards run in interleaved rounds (median sample).
ratio = eager time / compiled time: above 1, the compiled model is faster. When compilation fails (the CPU
inductor backend needs a C++ compiler, for instance), the error is recorded in the result as
"not available here: <reason>" and only eager is timed.

    python bench/bench_compile.py --threads 1 --quick      # a few minutes on a 2-core CPU (mostly compiling)
    python bench/bench_compile.py --batch 1 --seq 8 --quick --out /tmp/b   # smoke test
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(HERE.parent))

from bench.bench_encoder import autocast, interleaved, make_inputs, summarize  # noqa: E402
from bench.machine import (add_timing_args, benchmark_parser, loadavg, resolve_timing_args, save_result,  # noqa: E402
                           start_run, table_text)
from minisnip.model import BertModel  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = benchmark_parser(__doc__)
    p.add_argument("--mode", default="default", help="torch.compile mode (default, reduce-overhead, max-autotune, ...)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (inductor; eager: tracing only, a test)")
    add_timing_args(p, "compile", rounds=9)
    args = p.parse_args(argv)
    resolve_timing_args(args)
    return args


def compilers() -> dict[str, str | None]:
    """Where the C++ compilers are (the CPU inductor backend calls one)."""
    return {name: shutil.which(name) for name in ("g++", "gcc", "cc", "clang++")}


def short_error(e: BaseException) -> str:
    """'not available here: <type>: <first lines of the message>'."""
    text = " ".join(str(e).strip().splitlines()[:4])[:500]
    return f"not available here: {type(e).__name__}: {text}"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = args.device
    folder, machine, t0 = start_run(args)
    machine["compilers"] = compilers()
    model = BertModel.from_pretrained(folder).to(device).eval()
    ids, mask, _ = make_inputs(args.batch, args.seq, model.config.vocab_size, 0.0, args.seed, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def call(m: torch.nn.Module) -> torch.Tensor:
        with torch.inference_mode(), autocast(device):
            return m(ids, attention_mask=mask)

    compile_info: dict = {"mode": args.mode, "backend": args.backend, "status": "ok"}
    fns = {"eager": lambda: call(model)}
    try:
        compiled = torch.compile(model, backend=args.backend,
                                 mode=None if args.backend != "inductor" else args.mode)
        for i in (1, 2):  # first call: trace and generate code; second: any recompilation
            sync()
            start = time.perf_counter()
            out = call(compiled)
            sync()
            compile_info[f"call_{i}_s"] = time.perf_counter() - start
        compile_info["max_abs_diff"] = float((out.float() - call(model).float()).abs().max())
        fns["compiled"] = lambda: call(compiled)
    except Exception as e:  # noqa: BLE001 - any failure of the compiler stack is a result, not a crash
        compile_info["status"] = short_error(e)
        print(f"[{device}] torch.compile: {compile_info['status']}", flush=True)
    samples = interleaved(fns, args.warmup, args.rounds, 1, sync)
    res = {n: summarize(s, args.batch, args.seq) for n, s in samples.items()}
    result_cases = {"results": res}
    if "compiled" in res:
        result_cases.update({
            "ratio": res["eager"]["median_s"] / res["compiled"]["median_s"],
            "ratio_cpu": res["eager"]["cpu_median_s"] / res["compiled"]["cpu_median_s"],
            "ratio_paired_median": statistics.median(e[0] / c[0] for e, c in zip(samples["eager"], samples["compiled"]))})
        print(f"  eager {res['eager']['median_s'] * 1e3:.1f} ms, compiled {res['compiled']['median_s'] * 1e3:.1f} ms, "
              f"ratio {result_cases['ratio']:.3f}; compile (first call) {compile_info['call_1_s']:.1f} s", flush=True)
    machine["loadavg_1m_end"] = loadavg()
    settings = {"batch": args.batch, "seq": args.seq, "mode": args.mode, "backend": args.backend,
                "threads": args.threads,
                "warmup": args.warmup, "rounds": args.rounds, "seed": args.seed, "quick": args.quick,
                "model": str(folder), "dtype": "bf16 autocast" if device == "cuda" else "float32"}
    result = {"machine": machine, "settings": settings, "compile": compile_info, **result_cases,
              "wall_s": time.perf_counter() - t0}
    save_result(result, args, device, markdown(result))
    return result


def markdown(result: dict) -> str:
    m, s, c = result["machine"], result["settings"], result["compile"]
    lines = [f"Device {m['device']} ({m.get('gpu', m['cpu_model'])}), torch {m['torch']}, {m['torch_threads']} "
             f"thread(s), {s['dtype']}; forward, batch {s['batch']} x {s['seq']}, no padding; torch.compile backend "
             f"{s['backend']!r}, mode {s['mode']!r}; median of {s['rounds']} interleaved rounds after warm-up.", ""]
    if c["status"] != "ok":
        lines += [f"torch.compile: {c['status']}", "",
                  f"eager: {result['results']['eager']['median_s'] * 1e3:.1f} ms / iter."]
    else:
        r = result["results"]
        lines += ["| model | ms / iter | ratio eager / compiled | (CPU time) | first call s | second call s |",
                  "|---|---:|---:|---:|---:|---:|",
                  f"| eager | {r['eager']['median_s'] * 1e3:.1f} | | | | |",
                  f"| compiled | {r['compiled']['median_s'] * 1e3:.1f} | **{result['ratio']:.2f}** | "
                  f"{result['ratio_cpu']:.2f} | {c['call_1_s']:.1f} | {c['call_2_s']:.2f} |", "",
                  f"ratio > 1: the compiled forward is faster. max |compiled - eager| = {c['max_abs_diff']:.1e}. "
                  "The first call includes tracing and code generation (compile time)."]
    return table_text(lines, m, result["wall_s"])


if __name__ == "__main__":
    main()
