"""The comparison study: every pruning method at 30/50/70% compression on GLUE subsets, mean ± std over seeds.

One *cell* is (task, seed, method, target, distill). The costly part is shared where the recipe allows it:

* a method whose fine-tuning does not depend on the target (SCHEDULED = False: snip, snip-no-sn, magnitude,
  heads, and snip-no-prior) is fine-tuned once per task, seed and training, and every target is cut from a copy
  of that model and recovered; snip-no-prior, magnitude and heads all train plainly (no terms of their own), so
  they share one plain fine-tune, which is also the dense reference ("dense", target 0);
* a scheduled method (movement, l0, dsp, magnitude-unstructured, sparsebert, ...) trains toward its target, so
  each of its cells is its own fine-tune; so does each cell of a SNIP variant whose prior aims at the target
  or whose cut is gradual (PER_TARGET);
* distillation's teacher is the plain fine-tune of the same task and seed.

Each finished cell is appended as one JSON line to <out>.jsonl (its removed branches grouped by layer and kind,
`compact_removed`; duplicates from concurrent processes count once),
so an interrupted study resumes where it stopped; `--shard i/n` splits the trainings (and their cells) over n processes (one torch
thread each: two shards share a 2-core machine), and `--claim` lets any number of processes take the plan's units
from one queue instead (bench/study_gpu.sh runs a GPU's worth of them). Before it starts, the runner prints its plan and an estimate of
the total time from a short measurement of training throughput. Records hold the final score, the score before
recovery, the compression reached, and for structured methods the measured inference speedup of the pruned model
over dense (one 32 x 128 batch, 5 interleaved rounds) next to the ratio of linear-layer weights (the FLOP ratio of the
matmuls). `--summarize` writes <out>.json, <out>.md (mean ± std, best per column in bold) and one figure per task;
`--readme README.md` also puts the 50% table and SNIP's lead table into that file, between its
`<!-- study-table ... -->` and `<!-- study-lead-table ... -->` markers (README_BLOCKS).

    python bench/study.py --glue-dir ../shared/data/glue --out bench/results/study            # the full study
    python bench/study.py --glue-dir ../shared/data/glue --quick --out bench/out/study_quick  # minutes
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import socket
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

import minisnip  # noqa: E402
from bench.bench_encoder import interleaved  # noqa: E402
from bench.machine import code_version, machine_info  # noqa: E402
from minisnip.__main__ import METHODS  # noqa: E402
from minisnip.checkpoint import write_json, write_text  # noqa: E402
from minisnip.plots import save_figure  # noqa: E402
from minisnip.finetune import TaskData, load_task_data, new_classifier  # noqa: E402
from minisnip.glue import get_task, load_split  # noqa: E402
from minisnip.metrics import constant_scores, learnt  # noqa: E402
from minisnip.config import BertConfig  # noqa: E402
from minisnip.pruning.branches import parse_name  # noqa: E402
from minisnip.pruning.compression import (COMPRESSION_DEFINITION, dense_encoder_linear_params,  # noqa: E402
                                          encoder_linear_params)
from minisnip.pruning.distill import DistillConfig  # noqa: E402
from minisnip.pruning.recipe import (PruneConfig, calibration_batches, dev_scores, finetune_with,  # noqa: E402
                                    recover, remove)
from minisnip.stats import collect_stats  # noqa: E402
from minisnip.surgery import encoder_of  # noqa: E402
from minisnip.methods import dsp as dsp_method  # noqa: E402
from minisnip.methods import l0 as l0_method  # noqa: E402
from minisnip.snip import method as snip_method  # noqa: E402
from minisnip.train import TrainConfig, fit, resolve_device  # noqa: E402

PLAIN = ("snip-no-prior", "magnitude", "heads")  # methods whose fine-tuning is plain: one shared fine-tune
DEFAULT_METHODS = list(METHODS)
# SNIP's parts, measured one switch at a time (its Config fields; not command-line names): `--methods snip-sn-ffn ...`
VARIANTS: dict[str, tuple] = {
    "snip-sn-const": (snip_method, {"sn_bound": 0.95}),  # SNGP's constant cap c = 0.95
    "snip-sn-scale0.9": (snip_method, {"sn_scale": 0.9}),  # a shared scale below each matrix's σ
    "snip-sn-ffn": (snip_method, {"sn_matrices": "ffn"}),  # SN on the FFN matrices only
    "snip-lambda1e-4": (snip_method, {"prior_lambda": 1e-4}),
    "snip-lambda1e-3": (snip_method, {"prior_lambda": 1e-3}),
    "snip-warmup0": (snip_method, {"prior_warmup": 0.0}),
    "snip-warmup1": (snip_method, {"prior_warmup": 1.0}),  # λ reaches full strength at the last step
    "snip-loss-gate": (snip_method, {"prior_gate": "loss"}),  # λ_t times the share of the first loss explained
    "snip-baseline-gate": (snip_method, {"prior_gate": "baseline"}),  # λ_t gated by the loss below a constant one's
    # the stronger prior, gated so that a task learnt late (MRPC at 1e-3) is learnt first; measured: MRPC is, but
    # SST-2's 70% cut falls to chance before recovery (docs/snip.md, what the study measured of SNIP's parts)
    "snip-lambda1e-3-gate": (snip_method, {"prior_lambda": 1e-3, "prior_gate": "baseline"}),
    # the stronger prior ramped over the whole run instead of half of it, so that a task learnt late (MRPC) meets
    # little of it while it learns
    "snip-lambda1e-3-warmup1": (snip_method, {"prior_lambda": 1e-3, "prior_warmup": 1.0}),
    "snip-unweighted": (snip_method, {"prior_weights": None}),
    "snip-prox-lambda30": (snip_method, {"prior_step": "proximal", "prox_lambda": 30.0}),
    "snip-prox-lambda100": (snip_method, {"prior_step": "proximal", "prox_lambda": 100.0}),
    "snip-prox-lambda1000": (snip_method, {"prior_step": "proximal", "prox_lambda": 1000.0}),
    "snip-blocks": (snip_method, {}),  # the prior and the thresholding on whole blocks (RECIPE below)
    "snip-per-param": (snip_method, {}),  # ranking by norm per parameter (RECIPE below)
    "snip-last": (snip_method, {}),  # prunes the last epoch's model, not the best one (LAST_EPOCH below)
    "snip-prox-last": (snip_method, {"prior_step": "proximal"}),
    # the prior only on the branches the cut at the cell's target would remove now (prior.PriorPenalty, target): a
    # fine-tune per target, like the methods that train toward their target, and like them pruned at its last epoch
    "snip-target": (snip_method, {"prior_target": True}),
    "snip-target-lambda1e-3": (snip_method, {"prior_target": True, "prior_lambda": 1e-3}),
    "snip-target-lambda1e-2": (snip_method, {"prior_target": True, "prior_lambda": 1e-2}),
    # the thresholding operator applied gradually while fine-tuning, on the cubic schedule to the cell's target
    # (snip.gradual; not the paper's): a fine-tune per target, like the methods that train toward their target
    "snip-gradual": (snip_method, {"gradual": True}),
    # not SNIP's: L0's start before 2026-12-07 (log α = 0: every branch halved from the first step, which STS-B
    # does not survive; the default now starts the gates open: docs/methods_structured.md)
    "l0-closed": (l0_method, {"init_drop": 0.5}),
    # not SNIP's: DSP whose budget falls from every branch to k over the first half of the steps, so that its
    # gates start at 1 instead of about k/N (docs/methods_structured.md)
    "dsp-open": (dsp_method, {"budget_warmup": 0.5}),
}
# variants that change the recipe's choices (PruneConfig), not SNIP's Config
RECIPE: dict[str, dict] = {
    "snip-blocks": {"kinds": ("attention", "ffn")},
    "snip-per-param": {"per_param": True},
}
PER_TARGET = {"snip-target", "snip-target-lambda1e-3", "snip-target-lambda1e-2", "snip-gradual"}  # fine-tuning depends on the target
# variants that prune the model of the last fine-tuning epoch instead of the best one on dev: the prior's λ
# reaches full strength only after its warm-up, so the best epoch can be one the prior has not shaped yet
LAST_EPOCH = {"snip-last", "snip-prox-last", *PER_TARGET}
SAME_TRAINING = {"snip-per-param": "snip"}  # only the selection differs: the cells share snip's fine-tune
ALL = {**METHODS, **VARIANTS}
UNSTRUCTURED_EXTRA = (0.9, 0.95)  # unstructured methods' papers claim their strength there


def per_target(method: str) -> bool:
    """Whether a method's fine-tuning depends on the target (a scheduled method, or a PER_TARGET variant): then
    each of its cells is its own fine-tune."""
    return method != "dense" and (ALL[method][0].SCHEDULED or method in PER_TARGET)


@dataclass(frozen=True)
class Cell:
    task: str
    seed: int
    method: str  # a name of minisnip.__main__.METHODS, or "dense"
    target: float  # 0.0 for dense
    distill: bool = False

    @property
    def key(self) -> tuple:
        return (self.task, self.seed, self.method, self.target, self.distill)

    @property
    def training(self) -> tuple:
        """Cells with the same training share one fine-tune."""
        if self.method == "dense" or (self.method in PLAIN and not self.distill):
            return (self.task, self.seed, "plain", False)
        if per_target(self.method):
            return self.key
        return (self.task, self.seed, SAME_TRAINING.get(self.method, self.method), self.distill)

    @property
    def unit(self) -> tuple:
        """What one process claims under `--claim`: the cells of one training family of a task and seed (a
        scheduled method's targets together, so that a teacher it needs is trained once per unit)."""
        shared = self.training != self.key  # a scheduled method's training is the cell itself
        return self.training if shared else (self.task, self.seed, self.method, self.distill)


def plan(args) -> list[Cell]:
    """Every cell, seed by seed and task by task (the runner keeps one task and seed's fine-tunes in memory, so
    all of its cells run while they are there); within a task dense first, then 50% before 30% and 70%, then
    the extra targets."""
    cells = []
    for seed in args.seeds:
        for task in args.tasks:
            cells.append(Cell(task, seed, "dense", 0.0))
            for target in args.targets:
                for method in args.methods:
                    for distill in ([False, True] if args.distill else [False]):
                        module = ALL[method][0]
                        if distill and module.USES_DISTILLATION:
                            continue  # it always distils: the False cell is the distilled one
                        cells.append(Cell(task, seed, method, target, distill))
            for target in args.unstructured_targets:
                cells += [Cell(task, seed, m, target) for m in args.methods if not ALL[m][0].STRUCTURED]
    order: dict[float, int] = {}
    for t in [0.0, 0.5, *args.targets, *args.unstructured_targets]:
        order.setdefault(t, len(order))  # first place wins: 50% before 30% and 70%
    tasks = {t: i for i, t in enumerate(args.tasks)}
    return sorted(cells, key=lambda c: (c.seed, tasks[c.task], order[c.target]))


def shard_of(cell: Cell, cells: list[Cell], n: int) -> int:
    """The shard that runs `cell`: trainings are dealt round-robin in plan order over the whole plan (stable as
    cells finish), so the cells that share a fine-tune run in one process."""
    order = list(dict.fromkeys(c.training for c in cells))
    return order.index(cell.training) % n


def claim(folder: Path, unit: tuple) -> bool:
    """Take `unit` for this process: create its claim file in `folder` (atomic: exactly one process succeeds).
    A claim left by a process of this host that is no longer alive is taken over; one of another host is
    respected (delete <out>.claims/ to release those)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ("_".join(str(x) for x in unit).replace("/", "-") + ".claim")
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                host, pid = path.read_text().split()
            except (OSError, ValueError):
                return False  # being written by its owner, or gone: leave it to them
            if host != socket.gethostname() or _alive(int(pid)):
                return False
            stale = path.with_suffix(f".stale{os.getpid()}")
            try:  # the owner is gone: one process wins the rename, then creates the claim anew
                os.rename(path, stale)
            except OSError:
                return False
            stale.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return True
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def compact_removed(names: list[str]) -> dict[str, list[int] | None]:
    """A record's `removed` as the JSONL stores it: {"layer0.head": [0, 1, 3], "layer3.ffn": None, ...}, the indices
    of each layer's heads and neuron groups under one key (a quarter of the names' size; `expand_removed` undoes it)."""
    out: dict[str, list[int] | None] = {}
    for name in names:
        layer, kind, index = parse_name(name)
        if index is None:
            out[name] = None
        else:
            out.setdefault(f"layer{layer}.{kind}", []).append(index)
    return out


def expand_removed(stored: dict[str, list[int] | None] | list[str]) -> list[str]:
    """The branch names of a stored `removed` (`compact_removed`), grouped by layer and kind as stored."""
    if isinstance(stored, list):  # the plain list of names
        return stored
    return [key if indices is None else f"{key}{i}" for key, indices in stored.items() for i in (indices or [None])]


def read_records(jsonl: Path) -> list[dict]:
    """The records in `jsonl`, the first one per cell (concurrent processes may have written one twice), with
    `removed` as branch names."""
    first: dict = {}
    for line in (jsonl.read_text().splitlines() if jsonl.exists() else []):
        if line.strip():
            r = json.loads(line)
            if r.get("removed") is not None:
                r["removed"] = expand_removed(r["removed"])
            first.setdefault((r["task"], r["seed"], r["method"], r["target"], r.get("distill", False)), r)
    return list(first.values())


def speedup(dense: torch.nn.Module, pruned: torch.nn.Module, rounds: int = 5) -> tuple[float, float]:
    """Inference speedup of `pruned` over `dense`: one forward of a fixed 32 x 128 batch each, interleaved for
    `rounds` rounds (bench_encoder.interleaved: both see the same machine load), ratio of the median times (eval,
    no grad). Returns the ratio of wall times and that of process CPU times (which other processes on a shared CPU
    disturb less)."""
    device = next(dense.parameters()).device
    ids = torch.randint(1000, 2000, (32, 128), generator=torch.Generator().manual_seed(0)).to(device)
    for m in (dense, pruned):
        m.eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        samples = interleaved({"dense": lambda: dense(ids), "pruned": lambda: pruned(ids)}, warmup=1, rounds=rounds,
                              iters=1, sync=sync)
    wall, cpu = ({k: statistics.median(s[j] for s in v) for k, v in samples.items()} for j in (0, 1))
    return wall["dense"] / wall["pruned"], cpu["dense"] / cpu["pruned"]


def activation_spread(model: torch.nn.Module, batches: list[dict]) -> dict[str, list[float]]:
    """What SNIP's SN is meant to stabilise (Lin et al. 2020, Sec. 3: "the distribution of post-activation
    values"), per layer over the real tokens of `batches`: the standard deviation of the post-GELU values and of
    the two branch outputs, and the 99.9% quantile of the post-GELU values (read off a fixed-bin histogram)."""
    stats = collect_stats(model, batches, quantities=("ffn_act", "attention_out", "ffn_out"))
    layers = range(len(encoder_of(model).layers))
    spread = {f"{q}_std": [stats[i, q].std if (i, q) in stats else None for i in layers]
              for q in ("ffn_act", "attention_out", "ffn_out")}
    spread["ffn_act_q999"] = [stats[i, "ffn_act"].quantile(0.999) if (i, "ffn_act") in stats else None for i in layers]
    return spread


@dataclass
class Trained:
    """One fine-tune, shared by the cells of its training: the model (SN baked in), the method's hooks, the dev
    scores of the epoch kept, its seconds, and its post-activation spread."""

    model: torch.nn.Module
    hooks: list
    scores: dict
    seconds: float
    epoch: int | None
    spread: dict


class Study:
    """Runs cells, keeping the shared fine-tunes of one (task, seed) in memory."""

    def __init__(self, args):
        self.args = args
        self.model_path = Path(args.model) if args.model else minisnip.default_model_path()
        self.tokenizer = minisnip.load_tokenizer(self.model_path)
        self.data: dict[str, TaskData] = {}
        self.trained: dict[tuple, Trained] = {}  # training key -> its fine-tune
        self.references: dict[str, torch.nn.Module] = {}  # task -> the dense model pruned ones are timed against

    def task_data(self, task: str) -> TaskData:
        if task not in self.data:
            self.data[task] = load_task_data(task, self.tokenizer, self.args.glue_dir, self.args.max_train, seed=0,
                                             max_length=self.args.max_length)
        return self.data[task]

    def train_cfg(self, seed: int) -> TrainConfig:
        a = self.args
        return TrainConfig(epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, max_length=a.max_length, seed=seed,
                           progress=False, device=a.device, amp=a.amp)

    def timing_reference(self, data: TaskData) -> torch.nn.Module:
        """The dense model a pruned one is timed against: the folder's model with the task's head, not fine-tuned
        (inference time depends on the shapes, not on the weights; so a process that runs a scheduled method's
        cells needs no plain fine-tune for it)."""
        if data.task.name not in self.references:
            device = resolve_device(self.args.device)
            self.references[data.task.name] = new_classifier(self.model_path, data.task, 0).to(device).eval()
        return self.references[data.task.name]

    def prune_cfg(self, cell: Cell) -> PruneConfig:
        return PruneConfig(target=cell.target or None, recovery_epochs=self.args.recovery_epochs,
                           distill=DistillConfig() if cell.distill else None, **RECIPE.get(cell.method, {}))

    def fine_tuned(self, cell: Cell) -> Trained:
        """The fine-tuned model for this cell's training (shared), with the method's hooks and dev scores."""
        key = cell.training
        if key in self.trained:
            return self.trained[key]
        for old in [k for k in self.trained if k[:2] != key[:2]]:  # keep one (task, seed) in memory
            del self.trained[old]
        data, train_cfg = self.task_data(cell.task), self.train_cfg(cell.seed)
        model = new_classifier(self.model_path, data.task, cell.seed)
        t0 = time.perf_counter()
        if key[2] == "plain":
            history = fit(model, self.tokenizer, data.task, data.train, data.dev, train_cfg)
            hooks: list = []
        else:
            module, overrides = ALL[cell.method]
            # the teacher: a copy of the plain fine-tune (distillation freezes its teacher's parameters)
            teacher = copy.deepcopy(self.fine_tuned(Cell(cell.task, cell.seed, "dense", 0.0)).model) \
                if cell.distill or module.USES_DISTILLATION else None
            history, hooks = finetune_with(model, self.tokenizer, data, module, module.Config(**overrides),
                                           self.prune_cfg(cell), train_cfg, teacher=teacher,
                                           restore_best=False if cell.method in LAST_EPOCH else None)
        seconds = time.perf_counter() - t0
        calib = calibration_batches(data.train, self.tokenizer, PruneConfig().calibration_examples,
                                    train_cfg.eval_batch_size, cell.seed)
        # the model as fine-tuning left it: the best epoch, or the last for a scheduled method or a LAST_EPOCH variant
        self.trained[key] = Trained(model, hooks, history.kept_metrics, seconds, history.kept_epoch,
                                    activation_spread(model, calib))
        return self.trained[key]

    def run(self, cell: Cell) -> dict:
        data, train_cfg = self.task_data(cell.task), self.train_cfg(cell.seed)
        split, metric = next(iter(data.dev)), data.task.main_metric
        trained = self.fine_tuned(cell)
        model, hooks, finetuned = trained.model, trained.hooks, trained.scores
        record = {"task": cell.task, "seed": cell.seed, "method": cell.method, "target": cell.target,
                  "distill": cell.distill, "main_metric": metric, "finetuned": finetuned[split][metric],
                  "constant_score": data.constant_scores()[split][metric],  # a majority vote's: the floor
                  "finetune_seconds": trained.seconds, "finetune_epoch": trained.epoch,
                  "activation_spread": trained.spread}
        if cell.method == "dense":
            record.update(compression=0.0, before_recovery=finetuned[split][metric], score=finetuned[split][metric])
            return record
        module = ALL[cell.method][0]
        pruned = copy.deepcopy(model) if not per_target(cell.method) else model
        cfg = self.prune_cfg(cell)
        t0 = time.perf_counter()
        dense_config = BertConfig.from_dict(model.config.to_dict())
        outcome = remove(pruned, self.tokenizer, data, module, hooks, cfg, train_cfg, dense_config)
        before = dev_scores(pruned, self.tokenizer, data, train_cfg=train_cfg)[split][metric]
        after = recover(pruned, self.tokenizer, data, cfg, train_cfg, module.STRUCTURED).best_metrics[split][metric] \
            if cfg.recovery_epochs else before
        record.update(compression=outcome.report["compression"], sparsity=outcome.report.get("sparsity"),
                      before_recovery=before, score=after, prune_seconds=time.perf_counter() - t0,
                      removed=compact_removed(outcome.removed), structured=module.STRUCTURED)
        record["linear_weight_ratio"] = dense_encoder_linear_params(dense_config) / max(1, encoder_linear_params(pruned))
        record["speedup"], record["speedup_cpu"] = speedup(self.timing_reference(data), pruned)
        if per_target(cell.method):
            del self.trained[cell.training]  # used once
        return record


def estimate_seconds(cells: list[Cell], args, examples_per_second: float,
                     prior_examples_per_second: float | None = None) -> float:
    """Training examples the plan will see, over a measured throughput (evaluation and pruning excluded).
    Fine-tunes with SNIP's prior run at `prior_examples_per_second` where it was measured (they are the slower
    ones); every other training, and every recovery epoch, at `examples_per_second`."""
    n = args.max_train or 67349  # 'all': SST-2's size, the largest of the study's tasks
    trainings = {c.training: c for c in cells}
    prior = prior_examples_per_second or examples_per_second
    seconds = sum(args.epochs * n / (prior if _has_prior(c) else examples_per_second) for c in trainings.values())
    recoveries = sum(1 for c in cells if c.method != "dense")
    return seconds + recoveries * args.recovery_epochs * n / examples_per_second


def _has_prior(cell: Cell) -> bool:
    if cell.method == "dense":
        return False
    module, overrides = ALL[cell.method]
    return module is snip_method and module.Config(**overrides).uses_prior


def measure_throughput(study: Study, task: str, method: str | None = None, batches: int = 4) -> float:
    """Training examples per second of fine-tuning on `batches` batches of `task`: plain, or with `method`'s
    terms (a name of ALL). Timed on a second pass, after one over the same batches has warmed the device up."""
    data = study.task_data(task)
    k = batches * study.args.batch_size
    subset = type(data.train)(ids=data.train.ids[:k], types=data.train.types[:k], labels=data.train.labels[:k])
    small = TaskData(task=data.task, train=subset, dev={"train": subset}, info=data.info)
    cfg = TrainConfig(epochs=1, batch_size=study.args.batch_size, max_length=study.args.max_length, progress=False,
                      device=study.args.device, amp=study.args.amp)
    for _ in range(2):  # the first pass: CUDA context, kernels chosen, allocator grown
        model = new_classifier(study.model_path, data.task, 0)
        if method is None:
            history = fit(model, study.tokenizer, data.task, subset, small.dev, cfg)
        else:
            module, overrides = ALL[method]
            history, _ = finetune_with(model, study.tokenizer, small, module, module.Config(**overrides),
                                       PruneConfig(target=0.5), cfg)
    return history.train_examples / history.train_seconds


# --- summary, table, figures ---------------------------------------------------------------------------------------
def summarize(records: list[dict]) -> dict:
    """{task: {row: {target: {mean, std, n, before_recovery, compression, speedup}}}}; row = method (+distill)."""
    out: dict = {}
    for r in records:
        row = r["method"] + (" +distill" if r.get("distill") else "")
        out.setdefault(r["task"], {}).setdefault(row, {}).setdefault(str(r["target"]), []).append(r)
    for task, rows in out.items():
        for row, targets in rows.items():
            for target, rs in targets.items():
                def values(key):
                    return [r[key] for r in rs if r.get(key) is not None]

                def stat(key):
                    vals = values(key)
                    return statistics.fmean(vals) if vals else None
                scores = [r["score"] for r in rs]
                before = values("before_recovery")
                floors = [r for r in rs if r.get("constant_score") is not None]
                targets[target] = {"mean": statistics.fmean(scores), "n": len(scores),
                                   "std": statistics.stdev(scores) if len(scores) > 1 else None,  # one seed: none
                                   "before_recovery": stat("before_recovery"),
                                   "before_std": statistics.stdev(before) if len(before) > 1 else None,
                                   "compression": stat("compression"),
                                   "speedup": stat("speedup"), "speedup_cpu": stat("speedup_cpu"),
                                   "linear_weight_ratio": stat("linear_weight_ratio"),
                                   "metric": rs[0]["main_metric"],
                                   "constant": stat("constant_score"),
                                   # seeds whose score is a constant predictor's at best (minisnip.metrics.learnt)
                                   "at_constant": sum(1 for r in floors if not learnt(r["score"], r["constant_score"]))}
    return out


def _mean_std(v: dict) -> str:
    """'83.7 ± 0.4' over seeds, or '83.7' for a single seed (no spread to show)."""
    return f"{100 * v['mean']:.1f}" + (f" ± {100 * v['std']:.1f}" if v["std"] is not None else "")


def _constant(rows: dict) -> float | None:
    """The constant predictor's score on a task (`summarize`'s rows of it), or None where no record has it."""
    return next((c["constant"] for v in rows.values() for c in v.values() if c.get("constant") is not None), None)


def _n(v: dict) -> str:
    """'(n=3)', or '(n=3, 2 ≤ constant)' when some seeds score no better than the constant predictor."""
    return f"(n={v['n']}, {v['at_constant']} ≤ constant)" if v.get("at_constant") else f"(n={v['n']})"


def _before(v: dict) -> str:
    """' [80.9]': the mean score before recovery, or '' where there is none."""
    return f" [{100 * v['before_recovery']:.1f}]" if v["before_recovery"] is not None else ""


def _cell(v: dict) -> str:
    """One summary cell as the cross-task tables show it: '83.1 ± 1.3 (n=3) [81.1]'."""
    return f"{_mean_std(v)} {_n(v)}{_before(v)}"


def table(summary: dict, targets: list[float]) -> str:
    """Markdown, one block per task: rows = methods, columns = target compressions; mean ± std (n) [before
    recovery] {speedup}; the best mean per column in bold."""
    out = []
    for task, rows in summary.items():
        dense = rows.get("dense", {}).get("0.0")
        metric = (dense or next(iter(next(iter(rows.values())).values())))["metric"]
        cols = [t for t in targets if any(str(t) in v for r, v in rows.items() if r != "dense")]
        best = {t: max((v[str(t)]["mean"] for r, v in rows.items() if str(t) in v and r != "dense"), default=None)
                for t in cols}
        constant = _constant(rows)
        floor = f"; constant predictor {100 * constant:.1f}" if constant is not None else ""
        out += [f"**{task}** ({metric} x100; dense {_mean_std(dense)}, n={dense['n']}{floor})" if dense
                else f"**{task}** ({metric} x100{floor})", ""]
        if not cols:
            out += ["(no pruned cells yet)", ""]
            continue
        out += ["| method | " + " | ".join(f"{t:.0%}" for t in cols) + " |", "|---|" + "---|" * len(cols)]
        for row in sorted(r for r in rows if r != "dense"):
            cells = []
            for t in cols:
                v = rows[row].get(str(t))
                if v is None:
                    cells.append("–")
                    continue
                text = _mean_std(v)
                text = f"**{text}**" if v["mean"] == best[t] else text
                extra = f" {{{v['speedup']:.2f}x}}" if v.get("speedup") is not None else ""
                cells.append(f"{text} {_n(v)}{_before(v)}{extra}")
            out.append(f"| {row} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


BASELINES = tuple(m for m in METHODS if not m.startswith("snip"))  # the methods SNIP is measured against


def lead(a: dict, b: dict, key: str = "mean") -> tuple[float, float | None]:
    """a's mean minus b's (score after recovery, or `key`="before_recovery"), and the standard error of that
    difference over seeds, sqrt(s_a²/n_a + s_b²/n_b) (None where either has one seed)."""
    std = "std" if key == "mean" else "before_std"
    diff = a[key] - b[key]
    if a[std] is None or b[std] is None:
        return diff, None
    return diff, math.sqrt(a[std] ** 2 / a["n"] + b[std] ** 2 / b["n"])


def _diff_text(diff: float, se: float | None) -> str:
    """'+2.0 ± 1.4' x100, or '+2.0' where there is no standard error."""
    return f"{100 * diff:+.1f}" + (f" ± {100 * se:.1f}" if se is not None else "")


def _lead_text(diff: float, se: float | None) -> str:
    """'+2.0 ± 1.4 (ahead by > s.e.)' x100, or '+2.0 (one seed)' where there is no standard error."""
    if se is None:
        return f"{_diff_text(diff, se)} (one seed)"
    verdict = "ahead by > s.e." if diff > se else ("behind by > s.e." if diff < -se else "within the s.e.")
    return f"{_diff_text(diff, se)} ({verdict})"


def paired_lead(records: list[dict], task: str, target: float, a: str, b: str) -> tuple[float, float | None, int]:
    """Rows a and b (a method, with " +distill" for its distilled cells) on the seeds both have at `target`: the mean
    of the per-seed differences of the score after recovery, its standard error stdev(d) / sqrt(n) (None below two
    seeds) and n. A seed fixes the data order, the classifier's initialisation and the dropout stream of every
    method's fine-tuning (and the plain fine-tune that magnitude, head importance and no-prior share), so the
    per-seed difference leaves out what a seed does to both."""
    def scores(row: str) -> dict:
        return {r["seed"]: r["score"] for r in records if r["task"] == task and r["target"] == target
                and r["method"] + (" +distill" if r.get("distill") else "") == row}
    sa, sb = scores(a), scores(b)
    d = [sa[s] - sb[s] for s in sorted(set(sa) & set(sb))]
    if not d:
        return math.nan, None, 0
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else None
    return statistics.fmean(d), se, len(d)


def snip_lead(summary: dict, targets: list[float], records: list[dict] | None = None) -> str:
    """Markdown, the comparison study's goal read off the cells: per task and target, SNIP's lead after recovery
    over each baseline (BASELINES with cells there, with and without distillation), shown for the strongest one
    (the highest mean), with how many baselines it leads by more than one standard error of the difference; and
    its lead before recovery over thresholding without the prior (snip-no-prior). x100; `lead` gives the
    standard error. With the records, two more columns: the same lead over the strongest baseline paired by seed
    (`paired_lead`), and how many baselines SNIP leads by more than that paired standard error."""
    head = ["**SNIP against the baselines** (x100; lead = SNIP's mean minus the other's, after it the standard "
            "error of that difference over seeds, sqrt(s1²/n1 + s2²/n2); strongest baseline = the highest mean after recovery; "
            "ahead = baselines SNIP leads by more than one standard error, of those with cells there (one with a single "
            "seed has no standard error and cannot count)"
            + ("; paired = the mean of the per-seed differences on the seeds both have and its standard error "
               "stdev/sqrt(n), and the baselines led by more than it (a seed fixes the data order, the head's "
               "initialisation and the dropout of every method)" if records is not None else "") + ")", ""]
    cols = ["task", "target", "snip", "strongest baseline", "lead after recovery", "ahead"]
    if records is not None:
        cols += ["paired lead", "ahead, paired"]
    cols.append("before recovery: lead over snip-no-prior")
    out = head + ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    rows = 0
    for task, methods in summary.items():
        for t in targets:
            snip = methods.get("snip", {}).get(str(t))
            if snip is None:
                continue
            leads = {b: lead(snip, v[str(t)]) for b, v in methods.items()
                     if b.removesuffix(" +distill") in BASELINES and str(t) in v}  # distilled ones are baselines too
            if not leads:
                continue
            strongest = min(leads, key=lambda b: leads[b][0])  # the strongest baseline: the smallest lead
            diff, se = leads[strongest]
            ahead = sum(1 for d, e in leads.values() if e is not None and d > e)
            cells = [task, f"{t:.0%}", f"{_mean_std(snip)} (n={snip['n']})",
                     f"{strongest} {_mean_std(methods[strongest][str(t)])} (n={methods[strongest][str(t)]['n']})",
                     _lead_text(diff, se), f"{ahead} of {len(leads)}"]
            if records is not None:
                paired = {b: paired_lead(records, task, t, "snip", b) for b in leads}
                pd, pse, pn = paired[strongest]
                cells.append("–" if pn == 0 else f"{_lead_text(pd, pse)} (n={pn})")
                cells.append(f"{sum(1 for d, e, _ in paired.values() if e is not None and d > e)} of {len(leads)}")
            nop = methods.get("snip-no-prior", {}).get(str(t))
            if nop is not None and snip["before_recovery"] is not None and nop["before_recovery"] is not None:
                cells.append(_lead_text(*lead(snip, nop, "before_recovery")))
            else:
                cells.append("–")
            out.append("| " + " | ".join(cells) + " |")
            rows += 1
    return "\n".join(out) + "\n" if rows else ""


def snip_parts(summary: dict, records: list[dict], target: float) -> str:
    """Markdown: SNIP's variants and ablations (every row named snip-...) against SNIP's default at `target`, one
    column per task: the variant's cell as in `table`, then its score after recovery minus the default's, paired by
    seed (`paired_lead`: mean ± standard error, on the seeds both have). What each part of SNIP buys, read as: a
    switch that is negative here is a part the default needs."""
    tasks = [t for t, rows in summary.items() if str(target) in rows.get("snip", {})
             and any(r.startswith("snip-") and str(target) in v for r, v in rows.items())]
    if not tasks:
        return ""
    variants = sorted({r for t in tasks for r, v in summary[t].items() if r.startswith("snip-") and str(target) in v})
    out = [f"**SNIP's parts at {target:.0%}** (x100, [before recovery]; after `;` the variant's score minus "
           "SNIP's default (`snip`), paired by seed: the mean and its standard error over the seeds both have, `on k` where "
           "those are fewer than the variant's)", "",
           "| variant | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks),
           "| snip (default) | " + " | ".join(_cell(summary[t]["snip"][str(target)]) for t in tasks) + " |"]
    for row in variants:
        cells = []
        for t in tasks:
            v = summary[t].get(row, {}).get(str(target))
            if v is None:
                cells.append("–")
                continue
            d, se, n = paired_lead(records, t, target, row, "snip")
            paired = "" if n == 0 else f"; {_diff_text(d, se)}" + (f" (on {n})" if n != v["n"] else "")
            cells.append(_cell(v) + paired)
        out.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


SHARE_TASKS = ("sst2", "mrpc", "stsb")  # the tasks the share of dense averages over; CoLA and RTE are shown beside


def across_tasks(records: list[dict], summary: dict, target: float) -> str:
    """Markdown: one row per method of minisnip's METHODS at `target` (SNIP's variants are in the per-task tables),
    one column per task (as in `table`), and the share of the dense score it keeps: score / dense of the same
    task and seed, averaged over seeds, then over SHARE_TASKS (those with cells at `target`; only for a method
    that has cells on each of them)."""
    tasks = [t for t in summary if any(str(target) in v for r, v in summary[t].items() if r != "dense")]
    if not tasks:
        return ""
    averaged = [t for t in tasks if t in SHARE_TASKS] or tasks
    dense = {(r["task"], r["seed"]): r["score"] for r in records if r["method"] == "dense"}
    share: dict = {}
    for r in records:
        d = dense.get((r["task"], r["seed"]))
        if r["target"] == target and r["method"] != "dense" and d:
            row = r["method"] + (" +distill" if r.get("distill") else "")
            share.setdefault(row, {}).setdefault(r["task"], []).append(r["score"] / d)
    rows = sorted({r for t in tasks for r, v in summary[t].items()
                   if r.split(" ")[0] in METHODS and str(target) in v})
    out = [f"**{target:.0%} on every task** (x100, [before recovery]; share of dense: score over the dense score of "
           f"the same task and seed, averaged over seeds, then over {', '.join(averaged)})", "",
           "| method | " + " | ".join(tasks) + " | share of dense |", "|---|" + "---|" * (len(tasks) + 1)]
    for row in rows:
        cells = []
        for t in tasks:
            v = summary[t].get(row, {}).get(str(target))
            cells.append("–" if v is None else _cell(v))
        per_task = share.get(row, {})
        kept = (f"{100 * statistics.fmean(statistics.fmean(per_task[t]) for t in averaged):.1f}%"
                if all(t in per_task for t in averaged) else "–")
        out.append(f"| {row} | " + " | ".join(cells) + f" | {kept} |")
    return "\n".join(out) + "\n"


def figures(summary: dict, out: Path) -> list[Path]:
    """One PNG per task: score vs compression, a line per method of minisnip's METHODS (SNIP's variants are
    ablations, in the table only) with std error bars over seeds, dense as a band. One colour per method (a
    distilled row dashed, in its method's colour), SNIP drawn thicker, the constant predictor's score dotted, the
    legend beside the axes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    for task, rows in summary.items():
        fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
        dense = rows.get("dense", {}).get("0.0")
        if dense:
            spread = dense["std"] or 0.0
            ax.axhspan(100 * (dense["mean"] - spread), 100 * (dense["mean"] + spread), color="0.85",
                       label=f"dense {100 * dense['mean']:.1f}")
        constant = _constant(rows)
        if constant is not None:  # what always predicting the majority class (or the mean) scores
            ax.axhline(100 * constant, color="0.4", linestyle=":", label=f"constant predictor {100 * constant:.1f}")
        shown = sorted(r for r in rows if r.split(" ")[0] in METHODS)
        palette = list(plt.cm.tab10.colors) + [plt.cm.tab20(2 * k + 1) for k in range(10)]  # 20, the first 10 apart
        colours = {m: palette[i % 20] for i, m in enumerate(dict.fromkeys(r.split(" ")[0] for r in shown))}
        for row in shown:
            method, distilled = row.split(" ")[0], row.endswith("+distill")
            pts = sorted((float(t), v) for t, v in rows[row].items())
            ax.errorbar([100 * t for t, _ in pts], [100 * v["mean"] for _, v in pts],
                        yerr=[100 * (v["std"] or 0.0) for _, v in pts], marker="s" if distilled else "o", capsize=3,
                        label=row, color=colours[method], linestyle="--" if distilled else "-",
                        linewidth=2.5 if method == "snip" else 1.2, zorder=3 if method == "snip" else 2)
        metric = (dense or next(iter(next(iter(rows.values())).values())))["metric"]
        ax.set(title=f"{task}: dev {metric} after pruning and recovery", xlabel="target compression (%)",
               ylabel=f"{metric} (x100)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        path = out.parent / f"{out.name}_{task}.png"
        save_figure(fig, path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


# README blocks the summary keeps true: marker name -> the heading of the study.md section whose table goes there
README_BLOCKS = {"study-table": "**50% on every task**", "study-lead-table": "**SNIP against the baselines**"}


def _block_span(text: str, name: str, path: Path) -> tuple[int, int]:
    """Where the lines between `<!-- name ... -->` and `<!-- /name -->` start and end in `text`."""
    start = text.find(f"<!-- {name}")
    opened = text.find("-->\n", start) + len("-->\n") if start >= 0 else -1
    end = text.find(f"<!-- /{name} -->", max(opened, 0))
    if start < 0 or opened < len("-->\n") or end < 0:
        raise ValueError(f"{path}: no `<!-- {name} ... -->` ... `<!-- /{name} -->` block to write the study's table into")
    return opened, end


def check_readme(path: Path) -> None:
    """Refuse (before any cell runs) a --readme that lacks one of README_BLOCKS's markers."""
    if not path.is_file():
        raise ValueError(f"--readme {path}: no such file")
    text = path.read_text()
    for name in README_BLOCKS:
        _block_span(text, name, path)


def sync_readme(path: Path, md: str) -> None:
    """Replace each README_BLOCKS block of `path` with the table that follows its heading in `md` (the summary's
    markdown); the file is written whole, atomically, and only after every block is found."""
    text = path.read_text()
    tables = {}
    for name, heading in README_BLOCKS.items():
        lines = md[md.index(heading):].splitlines()[1:] if heading in md else []
        rows = []
        for line in lines:
            if line.startswith("|"):
                rows.append(line)
            elif rows:
                break
        if not rows:
            raise ValueError(f"the study's summary has no table under {heading!r} for {path}'s {name} block")
        tables[name] = "\n".join(rows) + "\n"
    for name, rows in tables.items():
        opened, end = _block_span(text, name, path)
        text = text[:opened] + rows + text[end:]
    write_text(path, text)


def with_constants(records: list[dict], glue_dir, max_train) -> list[dict]:
    """The records, those without a `constant_score` (written before it was recorded) given the one the runner
    records: the majority class (regression: mean) of the task's training sample, scored on its first dev split."""
    constants: dict = {}
    out = []
    for r in records:
        if r.get("constant_score") is None:
            if r["task"] not in constants:
                task = get_task(r["task"])
                train = load_split(task, "train", glue_dir, max_examples=max_train, seed=0)
                dev = load_split(task, task.dev_splits[0], glue_dir)
                constants[r["task"]] = constant_scores(task, train["label"], dev["label"])[task.main_metric]
            r = dict(r, constant_score=constants[r["task"]])
        out.append(r)
    return out


def write_summary(args, jsonl: Path) -> str:
    records = with_constants(read_records(jsonl), args.glue_dir, args.max_train)
    summary = summarize(records)
    targets = sorted({r["target"] for r in records if r["target"]})
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_json(args.out.with_suffix(".json"),
               {"settings": settings, "machine": machine_info(_summarizing_device(args.device)),
                "compression_definition": COMPRESSION_DEFINITION, "records": len(records), "summary": summary})
    md = table(summary, targets)
    for target in [t for t in (0.5, 0.3, 0.7) if t in targets]:
        md += "\n" + across_tasks(records, summary, target)
    md += "\n" + snip_lead(summary, [t for t in (0.3, 0.5, 0.7) if t in targets], records)
    for target in [t for t in (0.5, 0.3, 0.7) if t in targets]:
        parts = snip_parts(summary, records, target)
        md += "\n" + parts if parts else ""
    write_text(args.out.with_suffix(".md"),
        "Dev main metric x100 after recovery fine-tuning, mean ± std over seeds (n; no std for one seed), "
        "[mean before recovery], {measured inference speedup over dense: structured results are smaller matrices, "
        "unstructured ones the same dense matrices with zeros}; best mean per column in bold. Columns: target "
        f"compression ({COMPRESSION_DEFINITION}; unstructured methods: share of the weights set to zero).\n"
        f"Settings: {settings}\n\n{md}\n")
    if records:
        figures(summary, args.out)
    if args.readme is not None:
        sync_readme(args.readme, md)
    return md


def _summarizing_device(name: str) -> str:
    """The device type whose facts the summary records: the cells' own (each record names its device), unless
    they ran on a GPU this machine lacks (a summary written elsewhere): then this machine's CPU."""
    device = resolve_device(name)
    return device.type if device.type != "cuda" or torch.cuda.is_available() else "cpu"


def _max_train(text: str) -> int | None:
    if text == "all":
        return None
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"--max-train takes a number of examples >= 1 or 'all', got {text!r}")
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--glue-dir", type=Path, required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--tasks", nargs="+", default=["sst2", "mrpc", "stsb", "cola", "rte"])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--unstructured-targets", type=float, nargs="*", default=list(UNSTRUCTURED_EXTRA))
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(ALL),
                   help="names of minisnip's METHODS, or SNIP variants of this script's VARIANTS")
    p.add_argument("--distill", action="store_true", help="also run every method with distillation")
    p.add_argument("--max-train", type=_max_train, default=4000,
                   help="training examples per task (a seeded sample), or 'all' for the whole training set")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--recovery-epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                   help="autocast (TrainConfig.amp): auto = bf16 on CUDA, off on CPU; off = float32 everywhere")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (1: two shards share 2 cores)")
    p.add_argument("--shard", default="0/1", help="i/n: run shard i of n (whole trainings dealt round-robin)")
    p.add_argument("--claim", action="store_true",
                   help="instead of a fixed shard, take the next unclaimed unit of the plan (a claim file in "
                        "<out>.claims/): any number of processes balance themselves and follow the plan's order")
    p.add_argument("--deadline", type=float, default=None,
                   help="start no cell after this many seconds (what is unfinished is left to a resumed run)")
    p.add_argument("--estimate", action="store_true",
                   help="measure the training throughput (plain, and with SNIP's prior), print the plan's estimated "
                        "time, and stop")
    p.add_argument("--keep-going", action="store_true",
                   help="on a cell's error: print it, skip the rest of its unit, go on, and exit 1 at the end")
    p.add_argument("--code", default=None,
                   help="the commit to record in each cell where the checkout has no git (a copy on another machine)")
    p.add_argument("--quick", action="store_true", help="a few minutes: SST-2, 1 seed, 200 examples, 1 epoch, 50%%")
    p.add_argument("--summarize", action="store_true", help="only write <out>.json/.md/figures from <out>.jsonl")
    p.add_argument("--out", type=Path, default=Path("bench/results/study"))
    p.add_argument("--readme", type=Path, default=None,
                   help="also write the 50%% table and SNIP's lead table into this file's marked blocks "
                        "(README_BLOCKS), e.g. README.md")
    args = p.parse_args(argv)
    if args.readme is not None:
        if args.claim or args.quick:  # a claiming process does not summarize; --quick's numbers are not the study's
            p.error(f"--readme is for the study's summary: use it with --summarize or a plain run, not with "
                    f"{'--claim' if args.claim else '--quick'}")
        try:
            check_readme(args.readme)
        except ValueError as e:
            p.error(str(e))
    if args.quick:
        args.tasks, args.seeds, args.targets, args.unstructured_targets = ["sst2"], [1], [0.5], []
        args.max_train, args.epochs, args.max_length = 200, 1, 64
    torch.set_num_threads(args.threads)
    jsonl = args.out.with_suffix(".jsonl")
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    if args.summarize:
        print(write_summary(args, jsonl))
        return 0
    start = time.perf_counter()
    i, n = (int(x) for x in args.shard.split("/"))
    done = {tuple(r[k] for k in ("task", "seed", "method", "target")) + (r.get("distill", False),)
            for r in read_records(jsonl)}
    full = plan(args)
    cells = [c for c in full if c.key not in done]
    mine = cells if args.claim else [c for c in cells if shard_of(c, full, n) == i]
    study, code = Study(args), code_version() or args.code
    device = str(resolve_device(args.device))
    if mine:
        speed = measure_throughput(study, mine[0].task, batches=8 if args.estimate else 4)
        prior = measure_throughput(study, mine[0].task, "snip", batches=8) if args.estimate else None
        eta = estimate_seconds(mine, args, speed, prior)
        who = f"pid {os.getpid()} (claiming)" if args.claim else f"shard {i}/{n}"
        print(f"{who}: {len(mine)} of {len(cells)} remaining cells; {speed:.1f} train examples/s measured"
              + (f" ({prior:.1f} with SNIP's prior)" if prior else "")
              + f"; estimated {eta / 3600:.2f} h of training (evaluation and pruning come on top)", flush=True)
    if args.estimate:
        return 0
    claimed: set = set()
    held_elsewhere: set = set()  # units whose claim another process holds: not asked again for each of their cells
    failed: set = set()  # --keep-going: units whose cell raised (their other cells are skipped)
    for cell in mine:
        if args.deadline is not None and time.perf_counter() - start > args.deadline:
            print(f"deadline of {args.deadline:.0f} s reached: the remaining cells are left to a resumed run")
            break
        if cell.unit in failed or cell.unit in held_elsewhere:
            continue
        if args.claim and cell.unit not in claimed:
            if not claim(args.out.parent / f"{args.out.name}.claims", cell.unit):
                held_elsewhere.add(cell.unit)  # another process runs this unit
                continue
            claimed.add(cell.unit)
        t0 = time.perf_counter()
        try:
            record = study.run(cell)
        except Exception:
            if not args.keep_going:
                raise
            print(f"FAILED {cell}:\n{traceback.format_exc()}", flush=True)
            failed.add(cell.unit)
            study.trained.clear()
            continue
        record["cell_seconds"] = time.perf_counter() - t0
        record["code"] = code  # which minisnip computed the cell (numbers move when SNIP's computation changes)
        record["device"], record["amp"] = device, args.amp
        with jsonl.open("a") as sink:  # one line per finished cell, flushed: an interruption loses one cell
            sink.write(json.dumps(record) + "\n")
        print(f"{cell.task} seed {cell.seed} {cell.method}{' +distill' if cell.distill else ''} @ {cell.target:.2f}: "
              f"{record['main_metric']} {100 * record['score']:.2f} (before recovery "
              f"{100 * record['before_recovery']:.2f}), compression {record['compression']:.3f}, "
              f"{record['cell_seconds']:.0f} s", flush=True)
    if args.claim:  # other processes may still be writing cells: summarize once they are done (--summarize)
        print(f"pid {os.getpid()}: no unclaimed cell left; summarize with --summarize when every process is done")
    else:
        print(write_summary(args, jsonl))
    if failed:
        print(f"{len(failed)} unit(s) failed: {sorted(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
