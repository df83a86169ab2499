"""The pruning recipe every method shares: fine-tune with the method's terms -> score -> select -> remove -> recover.

    1. hooks = method.training_hooks(model, ...)       the method's training terms, parameters, schedules
       fit(model, ..., hooks)                          (+ distillation from a teacher, for any method)
    2. method.before_removal(model, hooks)             take the method's additions off (SN, gates, masks)
    3. structured methods: scores = method.scores(...)  -> select_for_target / select_below_threshold
       (or method.select(...) where selection is not one sort), then physical removal (removal.py);
       unstructured methods: the zeros are already in the weights
    4. recovery fine-tuning of the pruned model (zeros kept in place for unstructured methods)

A method is a plain module (`minisnip.snip.method`, `minisnip.methods.*`) holding

    STRUCTURED, USES_DISTILLATION, SCHEDULED (its masks follow a schedule: keep the last epoch, not the best; a
    Config whose switch makes it so says `scheduled`),
    DESCRIPTION, a `Config` dataclass (its own settings, validated), training_hooks(), before_removal(),
    scores() (structured methods), and optionally select() (selection that is not one sort), scores_at_load()
    (scores that mean something before fine-tuning: lets a threshold be checked up front) and NEEDS_TARGET.

The command line maps names to modules in one literal dict (`minisnip.__main__.METHODS`). `run_prune` writes result.json, pruning.json, pruned/ and plots
through `minisnip.rundir.RunDir`: nothing on disk changes until every input is checked.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Sequence

from torch import nn

from .. import distributed
from ..checks import is_int, is_number
from ..checkpoint import default_model_path, save_pretrained, write_json
from ..config import BertConfig
from ..data import Encoded, iterate, length_bucketed_batches
from ..finetune import TaskData, environment, load_task_data, new_classifier, not_learnt_note, short_name
from ..glue import get_task
from ..metrics import learnt
from ..rundir import RunDir, recorded
from ..surgery import PruningError
from ..tokenizer import Tokenizer, load_tokenizer
from ..train import StepContext, TrainConfig, TrainHook, amp_dtype, evaluate, fit, resolve_device, set_seed
from .branches import DEFAULT_KINDS, check_kinds, default_group_size, list_branches
from .compression import (COMPRESSION_DEFINITION, compression, compression_with_zeros,
                          dense_encoder_linear_params, encoder_linears, sparsity)
from .distill import DistillConfig, DistillHook
from .removal import RemovalPlan, apply_pruning
from .select import removed_by, select_below_threshold, select_for_target


@dataclass
class PruneConfig:
    """The recipe's choices, shared by every method (the method's own are in its `Config`).

    No target and no threshold: fine-tune with the method's terms and prune nothing (the dense reference).
    """

    target: float | None = 0.5  # compression to reach: share of encoder linear-layer weights removed
    threshold: float | None = None  # alternatively (structured methods): remove every branch with score < threshold
    kinds: tuple[str, ...] = DEFAULT_KINDS  # the branches a structured method scores and removes
    neuron_group_size: int | None = None  # FFN neurons per branch; None: 2 * head_dim
    per_param: bool = False  # rank branches by score / params instead of score
    calibration_examples: int = 512  # training examples on which scores are measured
    recovery_epochs: int = 1  # fine-tuning epochs after removal
    allow_empty: bool = False  # allow a selection that removes every attention and feed-forward block
    distill: DistillConfig | None = None  # distil from a fine-tuned dense teacher while fine-tuning (any method)

    def __post_init__(self) -> None:
        if self.target is not None and self.threshold is not None:
            raise ValueError("give at most one of target (a compression in (0, 1)) and threshold (τ ≥ 0)")
        if self.target is not None and not (is_number(self.target) and 0 < self.target < 1):
            raise ValueError(f"target compression must lie in (0, 1), got {self.target!r}")
        if self.threshold is not None and not (is_number(self.threshold) and self.threshold >= 0):
            raise ValueError(f"threshold must be a finite number ≥ 0, got {self.threshold!r}")
        self.kinds = check_kinds(self.kinds, 1 if "neurons" in self.kinds else None)
        if self.neuron_group_size is not None:
            if not (is_int(self.neuron_group_size) and self.neuron_group_size >= 1):
                raise ValueError(f"neuron_group_size must be an integer ≥ 1, got {self.neuron_group_size!r}")
            if "neurons" not in self.kinds:
                raise ValueError(f"neuron_group_size={self.neuron_group_size} is set but 'neurons' is not among "
                                 f"kinds {self.kinds}")
        for name in ("calibration_examples", "recovery_epochs"):
            value = getattr(self, name)
            if not is_int(value) or value < (1 if name == "calibration_examples" else 0):
                raise ValueError(f"{name} must be an integer ≥ {1 if name == 'calibration_examples' else 0}, got {value!r}")

    @property
    def prunes(self) -> bool:
        return self.target is not None or self.threshold is not None


def check_method(method: ModuleType, cfg: PruneConfig) -> None:
    """Refuse a combination the method cannot do, before any training (a method whose training aims at the
    target sets NEEDS_TARGET = True)."""
    if cfg.target is None and getattr(method, "NEEDS_TARGET", False):
        raise ValueError(f"{method.__name__}: this method trains toward a target compression; give --target "
                         "(a threshold or --dense gives it nothing to aim at)")
    if not method.STRUCTURED and cfg.threshold is not None:
        raise ValueError(f"{method.__name__}: an unstructured method reaches a target sparsity; --threshold is for "
                         "structured methods (it thresholds branch scores)")
    if not method.STRUCTURED and cfg.kinds != PruneConfig.kinds:
        raise ValueError(f"{method.__name__}: branch kinds apply to structured methods only")


def check_method_on_model(model: nn.Module, method: ModuleType, method_cfg, cfg: PruneConfig) -> None:
    """Refuse what a method can tell only from the model (e.g. a budget it cannot keep, kinds its gates or its
    proximal step cannot take), before any training or writing: the method's optional `check`."""
    if hasattr(method, "check"):
        method.check(model, method_cfg, cfg.target, cfg.kinds, group_size_of(model, cfg))


def check_reachable(model: nn.Module, cfg: PruneConfig) -> None:
    """Refuse a structured target that removing every candidate branch of `cfg.kinds` still cannot reach."""
    if cfg.target is None:
        return
    plan = RemovalPlan(model, group_size_of(model, cfg))
    for b in list_branches(model, kinds=cfg.kinds, neuron_group_size=group_size_of(model, cfg)):
        plan.add(b)
    reachable = compression(model) + sum(plan.removed_params(i) for i in range(len(plan.layers))) / \
        dense_encoder_linear_params(model.config)
    if reachable < cfg.target:
        raise ValueError(f"--target {cfg.target} cannot be reached by removing branches of kinds {cfg.kinds}: all of "
                         f"them together are {reachable:.3f} of the encoder ({COMPRESSION_DEFINITION}); add kinds "
                         "or lower the target")


def calibration_batches(data: Encoded, tokenizer: Tokenizer, n: int, batch_size: int, seed: int) -> list[dict]:
    """Up to n training examples, batched, for measuring branch scores."""
    batches = length_bucketed_batches(data.lengths, batch_size, seed)
    out, taken = [], 0
    for _, batch in iterate(data, batches, tokenizer):
        if taken >= n:
            break
        out.append(batch)
        taken += batch["input_ids"].shape[0]
    return out


def dev_scores(model: nn.Module, tokenizer: Tokenizer, data: TaskData, batch_size: int = 128,
               train_cfg: TrainConfig | None = None) -> dict:
    """The task's metrics on every dev split of `data`; with `train_cfg`, evaluated as fit evaluates (its eval
    batch size, device and autocast), so that a score before recovery compares with fit's scores."""
    device = dtype = None
    if train_cfg is not None:
        batch_size, device = train_cfg.eval_batch_size, resolve_device(train_cfg.device)
        dtype = amp_dtype(device, train_cfg.amp)
    return {k: evaluate(model, d, data.task, tokenizer, batch_size, device, dtype) for k, d in data.dev.items()}


class KeepZeros(TrainHook):
    """Recovery of an unstructured result: the weights that are zero at the start stay zero after every step."""

    def __init__(self, model: nn.Module):
        self.linears = [lin for _, lin in encoder_linears(model)]
        self.masks = [(m.weight != 0) for m in self.linears]

    def after_step(self, ctx: StepContext) -> None:
        for m, keep in zip(self.linears, self.masks):
            m.weight.mul_(keep.to(m.weight.device))


@dataclass
class PruneOutcome:
    """What `prune` did: the scores, which branches went, and the dev scores along the way."""

    scores: dict[str, float]
    removed: list[str]
    branches: list[dict]  # every candidate branch: name, kind, layer, params, score, removed
    report: dict
    tau: float | None
    dev: dict = field(default_factory=dict)


def group_size_of(model: nn.Module, cfg: PruneConfig) -> int | None:
    """FFN neurons per branch: the configured size, else 2 * head_dim; None when neurons are not branches."""
    if "neurons" not in cfg.kinds:
        return None
    return cfg.neuron_group_size or default_group_size(model)


def select_and_remove(model: nn.Module, method: ModuleType, hooks: list[TrainHook], calib: list[dict],
                      cfg: PruneConfig) -> PruneOutcome:
    """Steps 3 of a structured method: score the branches, select by target or threshold, remove physically."""
    group = group_size_of(model, cfg)
    branches = list_branches(model, kinds=cfg.kinds, neuron_group_size=group)
    scores: dict[str, float] = method.scores(model, hooks, calib, cfg.kinds, group) if hasattr(method, "scores") else {}
    if hasattr(method, "select"):
        names = method.select(model, hooks, calib, cfg.kinds, group, cfg.target)
    elif cfg.target is not None:
        names = select_for_target(branches, scores, cfg.target, per_param=cfg.per_param, model=model,
                                  allow_empty=cfg.allow_empty)
    else:
        names = select_below_threshold(scores, cfg.threshold)
    scores, names = distributed.broadcast_object((scores, names))  # distributed: rank 0's decision, on every rank
    table = [{"name": b.name, "kind": b.kind, "layer": b.layer, "params": b.params, "score": scores.get(b.name),
              "removed": gone} for b, gone in zip(branches, removed_by(branches, names))]
    removed_scores = [b["score"] for b in table if b["removed"] and b["score"] is not None]
    tau = max(removed_scores) if removed_scores else cfg.threshold  # the largest score that went
    try:
        report = apply_pruning(model, names, allow_empty=cfg.allow_empty, neuron_group_size=group)
    except PruningError as e:
        raise PruningError(f"{e} (on the command line: --allow-empty)") from None
    return PruneOutcome(scores=scores, removed=report["removed"], branches=table, report=report, tau=tau)


def scheduled(method: ModuleType, method_cfg) -> bool:
    """Whether the method's fine-tuning follows a schedule to the target (then its last epoch is kept): the
    method's SCHEDULED, or its Config's `scheduled` where a switch makes it so (SNIP's gradual cut)."""
    return bool(method.SCHEDULED or getattr(method_cfg, "scheduled", False))


def distill_config(method: ModuleType, cfg: PruneConfig) -> DistillConfig | None:
    """The distillation this run uses: the one asked for, or the default one for a method that always distils."""
    return cfg.distill if cfg.distill is not None else (DistillConfig() if method.USES_DISTILLATION else None)


def finetune_with(model: nn.Module, tokenizer: Tokenizer, data: TaskData, method: ModuleType, method_cfg,
                  cfg: PruneConfig, train_cfg: TrainConfig, extra_hooks: Sequence[TrainHook] = (),
                  teacher: nn.Module | None = None, restore_best: bool | None = None):
    """Steps 1-2: fine-tune with the method's terms (+ distillation from `teacher`, + `extra_hooks` such as
    observers), then take the method's additions off. Returns (History, the method's hooks).

    restore_best (default: unless the method follows a schedule, whose last epoch is the one at the target)
    keeps the best epoch's weights."""
    distill = distill_config(method, cfg)
    if distill is not None and teacher is None:
        raise ValueError(f"{method.__name__}: distillation needs a teacher (a model fine-tuned on {data.task.display})")
    total_steps = train_cfg.steps_per_epoch(len(data.train)) * train_cfg.epochs
    # on the training device first: what the method creates (masks, scores, gates) is made beside the weights
    model.to(resolve_device(train_cfg.device))
    # what a method draws when it starts (L0's log α noise, DSP's logits) depends on the seed alone, not on what
    # ran before in this process (a teacher fine-tuned first, another cell)
    set_seed(train_cfg.seed)
    hooks = method.training_hooks(model, method_cfg, cfg.target, total_steps, cfg.kinds, group_size_of(model, cfg))
    terms = [DistillHook(teacher, distill)] if distill is not None else []
    history = fit(model, tokenizer, data.task, data.train, data.dev, train_cfg, hooks=[*hooks, *terms, *extra_hooks],
                  restore_best=not scheduled(method, method_cfg) if restore_best is None else restore_best)
    method.before_removal(model, hooks)
    return history, hooks


def remove(model: nn.Module, tokenizer: Tokenizer, data: TaskData, method: ModuleType, hooks: list[TrainHook],
           cfg: PruneConfig, train_cfg: TrainConfig, dense_config: BertConfig) -> PruneOutcome:
    """Step 3: a structured method's branches scored, selected and removed; an unstructured one's zeros counted."""
    if not method.STRUCTURED:
        return PruneOutcome(scores={}, removed=[], branches=[], tau=None,
                            report={"compression": compression_with_zeros(model, dense_config),
                                    "sparsity": sparsity(model)})
    calib = calibration_batches(data.train, tokenizer, cfg.calibration_examples, train_cfg.eval_batch_size,
                                train_cfg.seed)
    return select_and_remove(model, method, hooks, calib, cfg)


def recover(model: nn.Module, tokenizer: Tokenizer, data: TaskData, cfg: PruneConfig, train_cfg: TrainConfig,
            structured: bool = True):
    """Step 4: recovery fine-tuning of the pruned model (seed + 1); an unstructured result keeps its zeros."""
    rec_cfg = replace(train_cfg, epochs=cfg.recovery_epochs, seed=train_cfg.seed + 1)
    return fit(model, tokenizer, data.task, data.train, data.dev, rec_cfg, hooks=[] if structured else [KeepZeros(model)])


def prune(model: nn.Module, tokenizer: Tokenizer, data: TaskData, method: ModuleType, method_cfg, cfg: PruneConfig,
          train_cfg: TrainConfig, extra_hooks: Sequence[TrainHook] = (), teacher: nn.Module | None = None,
          log=print) -> PruneOutcome:
    """Steps 1-4 on `model` (a BertForSequenceClassification) in place."""
    check_method(method, cfg)
    if method.STRUCTURED:
        check_reachable(model, cfg)
    check_method_on_model(model, method, method_cfg, cfg)
    dense_config = BertConfig.from_dict(model.config.to_dict())
    history, hooks = finetune_with(model, tokenizer, data, method, method_cfg, cfg, train_cfg, extra_hooks, teacher)
    # the model as fine-tuning left it: the best epoch, or for a scheduled method the last (the one at the target)
    dev = {"finetuned": history.kept_metrics, "finetuned_epoch": history.kept_epoch,
           "finetune_history": history.to_dict(),  # which epoch was kept: its `restored_best`
           "constant": data.constant_scores()}  # what a majority vote scores: the floor of "learnt"
    if not cfg.prunes:
        return PruneOutcome(scores={}, removed=[], branches=[], report={"compression": 0.0}, tau=None, dev=dev)
    outcome = remove(model, tokenizer, data, method, hooks, cfg, train_cfg, dense_config)
    log(f"compression {outcome.report['compression']:.3f} ({COMPRESSION_DEFINITION})")
    dev["pruned_before_recovery"] = dev_scores(model, tokenizer, data, train_cfg=train_cfg)
    if cfg.recovery_epochs:
        recovery = recover(model, tokenizer, data, cfg, train_cfg, method.STRUCTURED)
        dev["recovery_history"] = recovery.to_dict()
        dev["pruned"] = recovery.best_metrics
    else:
        dev["pruned"] = dev["pruned_before_recovery"]
    outcome.dev = dev
    return outcome


def early_threshold_check(model: nn.Module, method: ModuleType, method_cfg, calib: list[dict], cfg: PruneConfig) -> None:
    """Refuse a threshold that leaves nothing, as soon as scores can be measured: on the model as loaded, for a
    method whose scores mean something before fine-tuning (it defines `scores_at_load`; SNIP does)."""
    if cfg.threshold is None or cfg.allow_empty or not hasattr(method, "scores_at_load"):
        return
    scores = method.scores_at_load(model, method_cfg, calib, cfg.kinds, group_size_of(model, cfg))
    if scores and cfg.threshold > max(scores.values()):
        raise ValueError(f"--threshold {cfg.threshold} is above every branch's score on the calibration set "
                         f"(largest {max(scores.values()):.4g} before fine-tuning), so every branch would go; "
                         "choose a smaller τ, use --target, or pass --allow-empty if that is really meant")


def run_prune(task: str, out: str | Path, method_name: str, method: ModuleType, method_cfg, cfg: PruneConfig,
              model_path: str | Path | None = None, glue_dir: str | Path | None = None,
              train_cfg: TrainConfig | None = None, max_train: int | None = None, overwrite: bool = False,
              source: str = "auto", plots: bool = True, teacher_path: str | Path | None = None) -> dict:
    """The `prune` command: writes result.json, pruning.json (branches, scores, why), pruned/ and plots.

    With distillation (cfg.distill, or a method that always distils) the teacher is `teacher_path` (a
    checkpoint fine-tuned on the task), or else a dense copy fine-tuned first by this run (saved in teacher/)."""
    train_cfg = train_cfg or TrainConfig()
    check_method(method, cfg)
    distill = distill_config(method, cfg)
    if teacher_path is not None and distill is None:
        raise ValueError(f"--teacher is only used with --distill (or a method that distils); {method_name} does not")
    model_path = Path(model_path) if model_path is not None else default_model_path()
    run = RunDir(out, overwrite, inputs={"--model": model_path, "--glue-dir": glue_dir, "--teacher": teacher_path})
    tokenizer = load_tokenizer(model_path)
    data = load_task_data(task, tokenizer, glue_dir, max_train, seed=train_cfg.seed, max_length=train_cfg.max_length,
                          source=source)
    model = new_classifier(model_path, data.task, train_cfg.seed)
    if method.STRUCTURED:
        check_reachable(model, cfg)
    check_method_on_model(model, method, method_cfg, cfg)
    teacher = load_teacher(teacher_path, data.task, model) if teacher_path is not None else None
    if cfg.threshold is not None:
        calib = calibration_batches(data.train, tokenizer, cfg.calibration_examples, train_cfg.eval_batch_size,
                                    train_cfg.seed)
        early_threshold_check(model, method, method_cfg, calib, cfg)
    dense_config = BertConfig.from_dict(model.config.to_dict())
    main = data.task.main_metric
    split = next(iter(data.dev))
    result = {"task": data.task.name, "method": method_name, "model": str(model_path),
              "data": data.info, "hparams": asdict(train_cfg), "prune": asdict(cfg), "method_config": asdict(method_cfg),
              "seed": train_cfg.seed, "environment": environment(), "main_metric": main,
              "compression_definition": COMPRESSION_DEFINITION,
              "teacher": str(teacher_path) if teacher_path is not None else None}
    with run.writing() as work, recorded(result, work / "result.json"):
        if distill is not None and teacher is None:  # the fine-tuned dense model, fine-tuned here first
            teacher = new_classifier(model_path, data.task, train_cfg.seed)
            history = fit(teacher, tokenizer, data.task, data.train, data.dev, train_cfg)
            save_pretrained(teacher, work / "teacher", tokenizer=tokenizer)
            result["teacher"] = {"fine_tuned_by_this_run": "teacher/", "dev": history.best_metrics}
        outcome = prune(model, tokenizer, data, method, method_cfg, cfg, train_cfg, teacher=teacher,
                        log=print if train_cfg.progress and distributed.is_main() else (lambda *a: None))
        result["compression"] = outcome.report["compression"]
        if "sparsity" in outcome.report:
            result["sparsity"] = outcome.report["sparsity"]
        result["structured"] = method.STRUCTURED
        # the model fine-tuning left: dense for a method that prunes after it, the last (masked or gated)
        # epoch's for a scheduled one (finetune_history's restored_best says which)
        result["finetuned_score"] = outcome.dev["finetuned"][split][main]
        result["score"] = outcome.dev.get("pruned", outcome.dev["finetuned"])[split][main]
        result["constant_score"] = outcome.dev["constant"][split][main]
        result["learnt"] = {"finetuned": learnt(result["finetuned_score"], result["constant_score"]),
                            "pruned": learnt(result["score"], result["constant_score"])}
        result["scores"] = outcome.dev
        write_json(work / "pruning.json", {
            "method": method_name, "target": cfg.target, "threshold": cfg.threshold, "tau_effective": outcome.tau,
            "compression": result["compression"], "compression_definition": COMPRESSION_DEFINITION,
            "why": f"removed: the branches with the smallest scores ({method.DESCRIPTION}) until the target "
                   "was met, or those under the threshold" if method.STRUCTURED else
                   f"zeros inside the encoder's linear layers ({method.DESCRIPTION})",
            "removed": outcome.removed, "scores": outcome.scores, "branches": outcome.branches,
            "report": outcome.report, "layers": [asdict(l) for l in model.config.layers]})
        save_pretrained(model, work / "pruned", tokenizer=tokenizer)
        if plots and outcome.scores and distributed.is_main():
            from ..plots import plot_kept_map, plot_norms_per_layer
            plot_norms_per_layer(outcome.scores, outcome.removed, work / "norms_per_layer.png",
                                 title=f"{data.task.display}: branch scores after fine-tuning ({method_name})")
            plot_kept_map(dense_config, model.config, work / "kept_map.png",
                          title=f"{data.task.display}: kept branches at compression {result['compression']:.2f}")
    return result


def load_teacher(path: str | Path, task, student: nn.Module) -> nn.Module:
    """A teacher for distillation: a checkpoint fine-tuned on `task` (refused otherwise) with the student's vocabulary."""
    from ..finetune import load_trained_classifier
    teacher = load_trained_classifier(path, task, hint=" (a teacher must be fine-tuned on the same task)")
    if teacher.config.vocab_size != student.config.vocab_size:
        raise ValueError(f"--teacher {path}: its vocabulary ({teacher.config.vocab_size} tokens) is not the student's "
                         f"({student.config.vocab_size}); teacher and student must share a tokenizer")
    return teacher


def format_prune_result(result: dict) -> str:
    """One readable block: dense vs pruned score, compression, time."""
    s = result["scores"]
    split = next(iter(s["finetuned"]))
    main = result["main_metric"]
    restored = s.get("finetune_history", {}).get("restored_best", True)  # results written before it: the best epoch
    lines = [f"{result['task']} | {result['method']} | model {short_name(result['model'])} | train examples "
             f"{result['data']['train_examples']} | {result['wall_seconds']:.0f} s",
             f"{'stage':<26} {main + ' (x100)':>14}",
             f"{'fine-tuned (dense)' if restored else 'fine-tuned (last epoch)':<26} "
             f"{100 * s['finetuned'][split][main]:>14.2f}"]
    if "pruned_before_recovery" in s:
        lines.append(f"{'pruned, before recovery':<26} {100 * s['pruned_before_recovery'][split][main]:>14.2f}")
        lines.append(f"{'pruned + recovery':<26} {100 * s['pruned'][split][main]:>14.2f}")
    lines.append(f"compression {result['compression']:.3f} = {result['compression_definition']}"
                 + (f"; sparsity {result['sparsity']:.3f} (share of its weights that are zero)" if "sparsity" in result
                    else ""))
    if "constant" in s:  # results written before the constant predictor was recorded have no floor to check
        task, constant = get_task(result["task"]), s["constant"][split][main]
        note = not_learnt_note(task, main, [s["finetuned"][split][main]], constant, "the fine-tuned model")
        if note is None and "pruned" in s:
            note = not_learnt_note(task, main, [s["pruned"][split][main]], constant, "the pruned model",
                                   "pruning (and recovery) left a model that has lost the task")
        if note:
            lines.append(note)
    return "\n".join(lines)


__all__ = ["KeepZeros", "PruneConfig", "PruneOutcome", "calibration_batches", "check_method_on_model", "dev_scores",
           "finetune_with", "format_prune_result", "prune", "recover", "remove", "run_prune", "select_and_remove"]
