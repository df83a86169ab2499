"""What SNIP's fine-tuning costs: `snip` against plain fine-tuning of the same model (`snip-no-prior`).

SNIP fine-tunes with the identity prior λ Σ_m w_m ||f_m||, computed every step from the layer traces, under
spectral normalization (SN) of every branch matrix (one power iteration per step). `snip-no-prior` is the
same recipe with both switched off: plain fine-tuning. Both run through the recipe's own code path,
`minisnip.pruning.recipe.finetune_with` with the method and overrides of `minisnip.__main__.METHODS`, on the
same data, seed and batches (the same model at the start, the same batch order, the same dropout stream).

Timing. `--rounds` rounds; in each, every method fine-tunes a fresh copy of the model once, the order
alternating (A B, B A, ...) so slow drifts of a shared machine hit both. A `TrainHook` stamps each step's
phases with `time.perf_counter`: forward (model forward + task loss), prior (the method's loss terms), backward
(backward, incl. zero_grad and the finite check), optimizer (clipping, AdamW, schedule). Steps are paired
(step i of both methods sees the same batch in the same round): the reported ratio is the median over rounds
of (sum of SNIP's step times) / (sum of plain steps), next to fit's own `train_seconds` ratio (the whole
training loop, tokenization of each batch included) and the process-CPU-time ratio. Evaluation is not timed
(a `--max-dev` subset keeps it short).

Breakdown. Before the timed rounds (they double as warm-up), a few steps of each method run under
`torch.profiler`: forward ops are attributed to the phase they ran in (forward, prior) or to SN when they ran
inside a `SpectralNorm` call (wherever it was called from: the model's forward or the prior's Gram matrices);
backward ops are attributed to the phase of the forward op that recorded them (autograd sequence numbers),
so "backward / prior" is the backward through the prior's graph, "backward / SN" through the
parametrization. Profiled times are self CPU time per step, inflated by the profiler's per-op overhead: read
them as shares.

Decomposition. `--methods snip snip-no-prior plain-traced snip-no-sn` times, side by side, plain fine-tuning, the
same with the traced forward the prior needs (`plain-traced`: a hook asks for the traces and reads none), with the
prior on those traces (snip-no-sn) and with SN too (snip): the differences are what each part costs.

Numbers. Every run records its step losses (and SNIP's prior values): rounds of one method must agree
exactly (`deterministic`), and two versions of minisnip can be compared on them.

On a machine shared with other processes, use --threads 1 (see bench/bench_finetune.py).

    python bench/bench_snip_overhead.py --quick --task sst2                      # a few dozen steps, minutes
    python bench/bench_snip_overhead.py --task sst2 mrpc --max-train 4000 --epochs 1 --threads 1
    python bench/bench_snip_overhead.py --task mrpc --steps 40 --threads 1       # a fixed number of steps
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(HERE.parent))

import minisnip  # noqa: E402
from bench.machine import loadavg, machine_info, table_text, write_result  # noqa: E402
from minisnip.__main__ import METHODS  # noqa: E402
from minisnip.data import Encoded  # noqa: E402
from minisnip.finetune import TaskData, load_task_data, new_classifier  # noqa: E402
from minisnip.glue import GLUE_DIR_ENV  # noqa: E402
from minisnip.pruning.recipe import PruneConfig, finetune_with  # noqa: E402
from minisnip.snip.spectral import SpectralNorm  # noqa: E402
from minisnip.tokenizer import load_tokenizer  # noqa: E402
from minisnip.train import StepContext, TrainConfig, TrainHook  # noqa: E402

SNIP, PLAIN = "snip", "snip-no-prior"
TRACED = "plain-traced"  # plain fine-tuning that records the prior's traces and uses none of them (TraceOnly)
PHASES = ("forward", "prior", "backward", "optimizer")
CPU_PHASES = tuple(f"{p}_cpu" for p in PHASES)
PROFILE_KEYS = ("forward", "forward / SN", "prior", "prior / SN", "backward", "backward / SN", "backward / prior",
                "optimizer")
PHASE_OF = {"forward": "forward", "forward / SN": "forward", "prior": "prior", "prior / SN": "prior",
            "backward": "backward", "backward / SN": "backward", "backward / prior": "backward", "optimizer": "optimizer"}


# --- settings ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="BERT folder (default: minisnip.default_model_path())")
    p.add_argument("--glue-dir", default=None, help=f"GLUE TSV folder (default: ${GLUE_DIR_ENV})")
    p.add_argument("--task", nargs="+", default=["sst2"], help="GLUE task(s), one result file each (sst2)")
    p.add_argument("--methods", nargs="+", default=[SNIP, PLAIN], choices=[*METHODS, TRACED],
                   help="methods to time; each is compared with the second (snip snip-no-prior; add "
                        f"{TRACED} for the traced forward's share, snip-no-sn for the prior's, and so SN's)")
    p.add_argument("--max-train", type=int, default=None,
                   help="train examples, a random sample drawn with the seed (default 4000; --quick 320)")
    p.add_argument("--steps", type=int, default=None,
                   help="instead of --max-train: a fixed number of steps (max-train = steps x batch size, 1 epoch)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="fine-tunings per method, order alternating (2)")
    p.add_argument("--profile-steps", type=int, default=None,
                   help="steps per method profiled for the breakdown, after one unprofiled step (default 6; "
                        "--quick 3; 0: no profile)")
    p.add_argument("--max-dev", type=int, default=64, help="dev examples evaluated after each epoch (not timed)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: number of CPUs this process may use)")
    p.add_argument("--quick", action="store_true", help="320 examples (10 steps of 32), 3 profiled steps")
    p.add_argument("--out", default=None,
                   help="output folder (snip_overhead_<task>.json/.md inside, _quick with --quick; default "
                        "bench/results)")
    args = p.parse_args(argv)
    if args.steps is not None and args.max_train is not None:
        p.error("give --steps or --max-train, not both")
    if args.steps is not None:
        if args.steps < 1:
            p.error("--steps must be >= 1")
        args.max_train, args.epochs = args.steps * args.batch_size, 1
    if args.max_train is None:
        args.max_train = 320 if args.quick else 4000
    if args.profile_steps is None:
        args.profile_steps = 3 if args.quick else 6
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if args.glue_dir is None:
        args.glue_dir = os.environ.get(GLUE_DIR_ENV)
    if not args.glue_dir:
        p.error(f"pass --glue-dir (or set ${GLUE_DIR_ENV}): the folder holding the GLUE TSVs")
    if len(args.methods) < 2 or len(set(args.methods)) != len(args.methods):
        p.error("--methods needs at least two distinct methods")
    if min(args.max_train, args.epochs, args.rounds, args.batch_size, args.max_length, args.threads, args.max_dev) < 1:
        p.error("max-train, epochs, rounds, batch-size, max-length, max-dev and threads must be >= 1")
    if args.profile_steps < 0:
        p.error("--profile-steps must be >= 0")
    return args


def train_config(args: argparse.Namespace, epochs: int | None = None) -> TrainConfig:
    return TrainConfig(epochs=epochs or args.epochs, lr=args.lr, batch_size=args.batch_size,
                       max_length=args.max_length, seed=args.seed, device="cpu", amp="off", progress=False)


def method_config(name: str):
    """The method module and its Config as `prune --method NAME` builds them (defaults + METHODS overrides);
    TRACED: snip-no-prior's."""
    module, overrides = METHODS[PLAIN if name == TRACED else name]
    return module, module.Config(**overrides)


# --- timing hooks ------------------------------------------------------------------------------------------
class PhaseClock:
    """Wall time of each phase of each step (perf_counter); with `profiling`, each phase is also a
    `record_function` range, so profiler events can be attributed to it."""

    def __init__(self, profiling: bool = False):
        self.profiling = profiling
        self.steps: list[dict[str, float]] = []
        self.current: str | None = None
        self._t = 0.0
        self._range = None
        self.on_step_start = None  # profiling: called before each step's forward (to start the profiler)

    def begin_step(self) -> None:
        if self.on_step_start is not None:
            self.on_step_start(len(self.steps))
        self.steps.append({**dict.fromkeys(PHASES, 0.0), **dict.fromkeys(CPU_PHASES, 0.0)})
        self._start, self._cpu_start = time.perf_counter(), time.process_time()

    def switch(self, name: str | None) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        if self.current is not None:
            self.steps[-1][self.current] += now - self._t
            self.steps[-1][f"{self.current}_cpu"] += cpu - self._c
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None
        self.current, self._t, self._c = name, now, cpu
        if name is not None and self.profiling:
            self._range = torch.autograd.profiler.record_function(f"phase:{name}")
            self._range.__enter__()

    def end_step(self) -> None:
        self.switch(None)
        self.steps[-1]["total"] = time.perf_counter() - self._start
        self.steps[-1]["cpu"] = time.process_time() - self._cpu_start


class StepClock(TrainHook):
    """The last hook of the run: opens the forward phase, then backward (after every loss term), optimizer
    (after backward), and closes the step; records each step's task loss."""

    def __init__(self, clock: PhaseClock, stop_after: int | None = None):
        self.clock, self.stop_after = clock, stop_after
        self.losses: list[float] = []

    def before_forward(self, ctx: StepContext) -> None:
        self.clock.begin_step()
        self.clock.switch("forward")

    def loss(self, ctx: StepContext):
        self.clock.switch("backward")
        return None

    def after_backward(self, ctx: StepContext) -> None:
        self.clock.switch("optimizer")

    def after_step(self, ctx: StepContext) -> None:
        self.clock.end_step()
        self.losses.append(float(ctx.loss.detach()))
        if self.stop_after is not None and len(self.losses) >= self.stop_after:
            raise _Enough


class TraceOnly(TrainHook):
    """Asks `fit` for the layer traces SNIP's prior reads (packed, the last layer's FFN output at [CLS] only) and
    adds no loss term: the cost of the traced forward alone. What the prior adds on top of it (its sums, and the
    backward through the last layer's other tokens, which only the prior's graph reaches) is snip-no-sn minus this."""

    needs_traces = packed_traces = cls_traces = True


class PhaseTimed(TrainHook):
    """A method's hook, unchanged, whose loss term is timed as the "prior" phase (its values recorded)."""

    def __init__(self, inner: TrainHook, clock: PhaseClock):
        self.inner, self.clock = inner, clock
        self.needs_traces, self.packed_traces, self.cls_traces = inner.needs_traces, inner.packed_traces, inner.cls_traces
        self.values: list[float] = []

    def param_groups(self):
        return self.inner.param_groups()

    def before_forward(self, ctx):
        return self.inner.before_forward(ctx)

    def loss(self, ctx):
        self.clock.switch("prior")
        term = self.inner.loss(ctx)
        if term is not None:
            self.values.append(float(term.detach()))
        return term

    def after_backward(self, ctx):
        return self.inner.after_backward(ctx)

    def after_step(self, ctx):
        return self.inner.after_step(ctx)

    def epoch_log(self):
        return self.inner.epoch_log()


def timed_method(module: types.ModuleType, clock: PhaseClock, record: dict,
                 trace_only: bool = False) -> types.SimpleNamespace:
    """The method module as the recipe sees it, with its training hooks wrapped by `PhaseTimed` (and a
    `TraceOnly` hook added with trace_only); when the clock profiles, every SpectralNorm call becomes a
    `record_function("sn")` range."""
    proxy = types.SimpleNamespace(**{k: getattr(module, k) for k in dir(module) if not k.startswith("__")})
    proxy.__name__ = module.__name__

    def training_hooks(model: nn.Module, *a, **k):
        inner = list(module.training_hooks(model, *a, **k)) + ([TraceOnly()] if trace_only else [])
        hooks = [PhaseTimed(h, clock) for h in inner]
        record["hooks"] = hooks
        if clock.profiling:
            for m in model.modules():
                if isinstance(m, SpectralNorm):
                    m.register_forward_pre_hook(_sn_enter)
                    m.register_forward_hook(_sn_exit)
        return hooks

    proxy.training_hooks = training_hooks
    return proxy


_SN_RANGES: list = []


def _sn_enter(module, args):
    r = torch.autograd.profiler.record_function("sn")
    r.__enter__()
    _SN_RANGES.append(r)


def _sn_exit(module, args, output):
    _SN_RANGES.pop().__exit__(None, None, None)


# --- one fine-tuning ----------------------------------------------------------------------------------------
class _Enough(Exception):
    """Raised by the clock hook to end a profiled fine-tuning after its steps."""


def run_once(name: str, folder: Path, tokenizer, data: TaskData, args: argparse.Namespace,
             profiler=None, skip: int = 0, stop_after: int | None = None) -> dict:
    """Fine-tune a fresh model with method `name` through `finetune_with`; per-step phase times, losses.

    profiler: started before step `skip` (0-based) and stopped at the end; stop_after: end the fine-tuning
    after that many steps (its batches are the first ones of the full run)."""
    module, cfg = method_config(name)
    clock = PhaseClock(profiling=profiler is not None)
    if profiler is not None:
        clock.on_step_start = lambda i: profiler.start() if i == skip else None
    record: dict = {}
    clock_hook = StepClock(clock, stop_after)
    model = new_classifier(folder, data.task, args.seed)
    pcfg = PruneConfig(target=None)
    load = loadavg()
    try:
        timed = timed_method(module, clock, record, trace_only=name == TRACED)
        history, _ = finetune_with(model, tokenizer, data, timed, cfg, pcfg, train_config(args),
                                   extra_hooks=[clock_hook], restore_best=False)
        h = history.to_dict()
    except _Enough:
        h = {"steps": len(clock.steps), "train_seconds": None, "train_cpu_seconds": None, "train_examples": None,
             "train_tokens": None}
    finally:
        if profiler is not None:
            profiler.stop()
    prior = [v for hook in record.get("hooks", []) for v in hook.values]
    return {"method": name, "steps": h["steps"], "train_seconds": h["train_seconds"],
            "cpu_seconds": h["train_cpu_seconds"], "train_examples": h["train_examples"],
            "train_tokens": h["train_tokens"], "loadavg_1m_start": load, "phases": clock.steps,
            "step_losses": clock_hook.losses, "prior_values": prior}


# --- the profile breakdown ------------------------------------------------------------------------------------
def _innermost(ranges: list[tuple[float, float, str]], start: float, end: float) -> str | None:
    best = None
    for a, b, name in ranges:
        if a <= start and end <= b and (best is None or b - a < best[1] - best[0]):
            best = (a, b, name)
    return best[2] if best else None


def attribute(events, steps: int) -> dict[str, float]:
    """Profiled ms per step of each part (PROFILE_KEYS), from the profiler's events (see module doc): the sum
    of the self times of the ops in it, as the profiler measures them (wall clock)."""
    ranges = []
    for e in events:
        if e.name.startswith("phase:") or e.name == "sn":
            ranges.append((e.time_range.start, e.time_range.end, e.name.removeprefix("phase:")))
    phases = [r for r in ranges if r[2] != "sn"]
    out = dict.fromkeys(PROFILE_KEYS, 0.0)

    def part_of_forward(e, phase: str) -> str:
        in_sn = _innermost(ranges, e.time_range.start, e.time_range.end) == "sn"
        return f"{phase} / SN" if in_sn else phase

    ops = [e for e in events if not (e.name.startswith("phase:") or e.name == "sn")]
    where = [_innermost(phases, e.time_range.start, e.time_range.end) for e in ops]
    fwd_part: dict[int, str] = {}  # which part recorded each autograd node (its sequence number)
    for e, phase in zip(ops, where):
        if phase in ("forward", "prior") and e.sequence_nr >= 0 and not e.name.startswith("autograd::"):
            fwd_part.setdefault(e.sequence_nr, part_of_forward(e, phase))
    for e, phase in zip(ops, where):
        if phase == "backward":
            node = e
            while node is not None and not node.name.startswith("autograd::engine::evaluate_function:"):
                node = node.cpu_parent
            src = fwd_part.get(node.sequence_nr) if node is not None else None
            key = "backward / SN" if src is not None and src.endswith("/ SN") else \
                "backward / prior" if src == "prior" else "backward"
        elif phase in ("forward", "prior"):
            key = part_of_forward(e, phase)
        elif phase == "optimizer":
            key = "optimizer"
        else:
            continue  # between steps: data, bookkeeping
        out[key] += e.self_cpu_time_total / 1000.0
    return {k: v / max(1, steps) for k, v in out.items()}


def scaled_breakdown(profiled: dict[str, float], phase_cpu_ms: dict[str, float]) -> dict[str, float]:
    """CPU ms per step of each part: each phase's CPU time from the timed rounds, split in the profile's
    proportions within that phase (the profiler measures wall time, which other processes inflate)."""
    out = {}
    for key, phase in PHASE_OF.items():
        total = sum(v for k, v in profiled.items() if PHASE_OF[k] == phase)
        out[key] = phase_cpu_ms[phase] * profiled[key] / total if total > 0 else 0.0
    return out


def profile_method(name: str, folder: Path, tokenizer, data: TaskData, args: argparse.Namespace) -> dict:
    """The first `profile_steps` steps after the first one of method `name`'s fine-tuning, under torch.profiler
    (the same batches as the timed runs' first steps)."""
    from torch.profiler import ProfilerActivity, profile
    prof = profile(activities=[ProfilerActivity.CPU])
    run = run_once(name, folder, tokenizer, data, args, profiler=prof, skip=1, stop_after=args.profile_steps + 1)
    steps = run["steps"] - 1
    parts = attribute(prof.events(), steps)
    wall = {k: statistics.fmean(s[k] for s in run["phases"][1:]) * 1000 for k in (*PHASES, "total")} if steps else {}
    return {"method": name, "steps": steps, "self_cpu_ms_per_step": parts,
            "self_cpu_ms_total": sum(parts.values()), "wall_ms_per_step_profiled": wall}


def _subset(data: Encoded, n: int) -> Encoded:
    n = min(n, len(data))
    return Encoded(ids=data.ids[:n], types=data.types[:n], labels=data.labels[:n])


# --- one task -----------------------------------------------------------------------------------------------
def _median(xs):
    return statistics.median(xs) if xs else None


def summarize(runs: list[dict], methods: list[str]) -> dict:
    by: dict[str, list[dict]] = {m: [r for r in runs if r["method"] == m] for m in methods}
    out: dict = {"per_method": {}, "ratios": {}}
    for m, rs in by.items():
        steps = [s for r in rs for s in r["phases"]]
        out["per_method"][m] = {
            "rounds": len(rs), "steps_per_round": rs[0]["steps"],
            "step_ms_median": 1000 * statistics.median(s["total"] for s in steps),
            "step_ms_mean": 1000 * statistics.fmean(s["total"] for s in steps),
            "step_cpu_ms_mean": 1000 * statistics.fmean(s["cpu"] for s in steps),
            "phase_ms_mean": {k: 1000 * statistics.fmean(s[k] for s in steps) for k in PHASES},
            "phase_cpu_ms_mean": {k: 1000 * statistics.fmean(s[f"{k}_cpu"] for s in steps) for k in PHASES},
            "train_seconds": [r["train_seconds"] for r in rs], "cpu_seconds": [r["cpu_seconds"] for r in rs],
            "deterministic": all(r["step_losses"] == rs[0]["step_losses"] and r["prior_values"] == rs[0]["prior_values"]
                                 for r in rs),
            "step_losses": rs[0]["step_losses"], "prior_values": rs[0]["prior_values"]}
    base = methods[1]
    for m in methods:
        if m == base:
            continue
        a, b = by[m], by[base]
        step_sum = [sum(s["total"] for s in x["phases"]) / sum(s["total"] for s in y["phases"]) for x, y in zip(a, b)]
        paired = [s["total"] / t["total"] for x, y in zip(a, b) for s, t in zip(x["phases"], y["phases"])]
        step_cpu = [sum(s["cpu"] for s in x["phases"]) / sum(s["cpu"] for s in y["phases"]) for x, y in zip(a, b)]
        fit = [x["train_seconds"] / y["train_seconds"] for x, y in zip(a, b)]
        cpu = [x["cpu_seconds"] / y["cpu_seconds"] for x, y in zip(a, b)]
        out["ratios"][f"{m} / {base}"] = {
            "step_time": _median(step_sum), "step_time_per_round": step_sum,
            "paired_step_median": _median(paired), "step_cpu_time": _median(step_cpu),
            "step_cpu_time_per_round": step_cpu, "fit_train_seconds": _median(fit),
            "fit_train_seconds_per_round": fit, "cpu_time": _median(cpu), "cpu_time_per_round": cpu}
    return out


def run_task(args: argparse.Namespace, folder: Path, tokenizer, task_name: str) -> dict:
    data = load_task_data(task_name, tokenizer, args.glue_dir, args.max_train, seed=args.seed,
                          max_length=args.max_length, source="local")
    data = replace(data, dev={k: _subset(v, args.max_dev) for k, v in data.dev.items()})
    lengths = data.train.lengths
    print(f"[{data.task.display}] {len(data.train)} train examples (mean length {statistics.fmean(lengths):.1f} "
          f"tokens), batch {args.batch_size}, {args.rounds} rounds of {', '.join(args.methods)}", flush=True)
    result: dict = {"task": data.task.name, "data": {**data.info, "mean_length": statistics.fmean(lengths)}}
    profiles = []
    if args.profile_steps > 0:  # also the warm-up of the timed rounds
        for name in args.methods:
            profiles.append(profile_method(name, folder, tokenizer, data, args))
            print(f"  profiled {name}: {profiles[-1]['self_cpu_ms_total']:.0f} ms self CPU per step", flush=True)
    runs = []
    for r in range(args.rounds):
        order = args.methods if r % 2 == 0 else args.methods[::-1]
        for name in order:
            run = run_once(name, folder, tokenizer, data, args)
            run["round"] = r
            runs.append(run)
            ms = 1000 * statistics.median(s["total"] for s in run["phases"])
            print(f"  round {r + 1} {name:<14} {run['steps']} steps, fit {run['train_seconds']:.1f} s, "
                  f"median step {ms:.0f} ms", flush=True)
    result["runs"] = runs
    result["profile"] = profiles
    result["summary"] = summarize(runs, args.methods)
    for p in profiles:
        p["cpu_ms_per_step"] = scaled_breakdown(p["self_cpu_ms_per_step"],
                                                result["summary"]["per_method"][p["method"]]["phase_cpu_ms_mean"])
    return result


# --- output -------------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    lines = [f"{m['cpu_model']}, torch {m['torch']}, {m['torch_threads']} thread(s), float32; model {s['model_name']}; "
             f"task {result['task']}: {result['data']['train_examples']} train examples (mean length "
             f"{result['data']['mean_length']:.1f} tokens), {s['epochs']} epoch(s), batch {s['batch_size']}, max "
             f"length {s['max_length']}, seed {s['seed']}, {s['rounds']} interleaved rounds"
             + (" (--quick)" if s["quick"] else "") + ".", "",
             "| method | steps / round | step, median (ms) | step, mean | forward | prior | backward | optimizer "
             "| step CPU, mean | forward | prior | backward | optimizer | fit train s per round "
             "| same losses every round |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for name, pm in result["summary"]["per_method"].items():
        ph, pc = pm["phase_ms_mean"], pm["phase_cpu_ms_mean"]
        lines.append(f"| {name} | {pm['steps_per_round']} | {pm['step_ms_median']:.0f} | {pm['step_ms_mean']:.0f} | "
                     + " | ".join(f"{ph[k]:.0f}" for k in PHASES) + f" | {pm['step_cpu_ms_mean']:.0f} | "
                     + " | ".join(f"{pc[k]:.0f}" for k in PHASES)
                     + f" | {' / '.join(f'{x:.1f}' for x in pm['train_seconds'])} | "
                     f"{'yes' if pm['deterministic'] else 'NO'} |")
    lines += ["", "| ratio | step time (median over rounds) | per round | paired steps, median | step CPU time "
                  "| fit train_seconds | fit CPU time |", "|---|---:|---|---:|---:|---:|---:|"]
    for key, r in result["summary"]["ratios"].items():
        lines.append(f"| {key} | **{r['step_time']:.3f}** | {' / '.join(f'{x:.3f}' for x in r['step_time_per_round'])} "
                     f"| {r['paired_step_median']:.3f} | {r['step_cpu_time']:.3f} | {r['fit_train_seconds']:.3f} "
                     f"| {r['cpu_time']:.3f} |")
    if result["profile"]:
        lines += ["", "Where the time goes (CPU ms per step: each phase's CPU time above, split as a torch.profiler "
                      f"run of {result['profile'][0]['steps']} steps per method splits it; '/ SN' = inside the "
                      "spectral-norm parametrization, 'backward / X' = the backward through X's graph):",
                  "", "| method | " + " | ".join(PROFILE_KEYS) + " | total |",
                  "|---|" + "---:|" * (len(PROFILE_KEYS) + 1)]
        for p in result["profile"]:
            c = p["cpu_ms_per_step"]
            lines.append(f"| {p['method']} | " + " | ".join(f"{c[k]:.0f}" for k in PROFILE_KEYS)
                         + f" | {sum(c.values()):.0f} |")
    lines += ["", "Step phases (ms per step, mean over all steps of all rounds; wall clock, then process CPU time) "
                  "stamped by a TrainHook: forward = model forward + task loss (the trace when "
                  "SNIP records one), prior = the method's loss terms, backward = zero_grad + backward, optimizer = "
                  "clipping + AdamW + schedule. Ratios: each method over the second (by default SNIP over plain "
                  f"fine-tuning of the same model, snip-no-prior), same batches; above 1, slower. {TRACED}: plain "
                  "fine-tuning that records the prior's traces and reads none (the traced forward's cost)."]
    return table_text(lines, m, result["wall_seconds"])


def output_paths(out: str | None, task: str, quick: bool) -> tuple[Path, Path]:
    name = f"snip_overhead_{task}{'_quick' if quick else ''}"
    folder = Path(out) if out is not None else HERE / "results"
    return folder / f"{name}.json", folder / f"{name}.md"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import datasets
    datasets.disable_progress_bars()
    logging.getLogger("minisnip").setLevel(logging.ERROR)  # "head newly initialised": expected here
    folder = Path(args.model) if args.model else minisnip.default_model_path()
    tokenizer = load_tokenizer(folder)
    default = minisnip.default_model_path() if args.model is None else None
    settings = {k: getattr(args, k) for k in ("task", "methods", "max_train", "steps", "epochs", "rounds",
                                              "profile_steps", "max_dev", "lr", "batch_size", "max_length", "seed",
                                              "threads", "quick")}
    settings.update(model=str(folder), model_name="all-MiniLM-L6-v2" if default == folder else folder.name,
                    glue_dir=str(args.glue_dir), device="cpu", dtype="float32")
    results = {}
    for task in args.task:
        t0, load_start = time.perf_counter(), loadavg()
        res = run_task(args, folder, tokenizer, task)
        machine = machine_info("cpu")
        machine["loadavg_1m_start"], machine["loadavg_1m_end"] = load_start, loadavg()
        result = {"machine": machine, "settings": settings, "wall_seconds": time.perf_counter() - t0, **res}
        json_path, md_path = output_paths(args.out, res["task"], args.quick)
        write_result(result, json_path, md_path, markdown(result))
        results[res["task"]] = result
    return results


if __name__ == "__main__":
    main()
