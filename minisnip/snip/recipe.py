"""The SNIP recipe, end to end (Lin et al. 2020, Sec. 3-4, as reconstructed here):

1. fine-tune with the identity prior   L = L_task + λ_t Σ_m w_m ||f_m||   (prior.py), λ_t ramping up from 0
   over the first `prior_warmup` of the steps (`PriorPenalty`), under spectral normalization
   W ← W · min(1, c/σ(W)) of every branch matrix                            (spectral.py);
2. measure every branch's function norm ||f_m|| on a calibration set          (branches.py);
3. threshold: remove the branches with the smallest norms until the target compression is met, or those
   under a given τ                                                            (threshold.py), physically;
4. recovery fine-tune of the pruned model (no prior).

The ablations are the same recipe with a part switched off: `snip-no-sn` (prior, no SN), `snip-no-prior`
(thresholding the norms of a plainly fine-tuned model, no SN either), and `dense` (step 1 without prior or
SN, no pruning: the reference score). Branch granularity: heads and groups of FFN neurons, by default groups
of 2·head_dim neurons, which own as many weights as one head (4·H·d vs 2·H·2d + 2d), so heads and groups are
equal units on the scale of compression; a layer that loses all of them loses its block.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from torch import Tensor, nn

from ..checkpoint import default_model_path, save_pretrained, write_json
from ..config import BertConfig
from ..data import Encoded, iterate, length_bucketed_batches
from ..finetune import environment, load_classifier, load_task_data, prepare_run_dir, short_name
from ..model import LayerTrace
from ..pruning import (COMPRESSION_DEFINITION, apply_pruning, compression, list_branches, select_below_threshold,
                       select_for_target)
from ..tokenizer import Tokenizer, load_tokenizer
from ..train import StepContext, TrainConfig, TrainHook, evaluate, fit, set_seed
from .norms import function_norms
from .prior import identity_prior
from .spectral import apply_spectral_norm, remove_spectral_norm

METHODS = ("snip", "snip-no-sn", "snip-no-prior", "dense")


@dataclass
class SnipConfig:
    """The choices of the recipe; each one a switch a student can flip."""

    method: str = "snip"
    target: float | None = 0.5  # compression to reach (share of encoder linear-layer weights removed)
    threshold: float | None = None  # alternatively: remove every branch with ||f_m|| < threshold
    prior_lambda: float = 3e-4
    prior_warmup: float = 0.5  # share of fine-tuning steps over which λ ramps linearly from 0 to prior_lambda
    kinds: tuple[str, ...] = ("head", "neurons")  # penalised and thresholded branches
    neuron_group_size: int | None = None  # None: 2 * head_dim
    prior_weights: str | None = "params"  # w_m ∝ parameters of branch m (mean 1), or None for w_m = 1
    sn_bound: str | float = "init"  # "init": c = σ(W) at load time; or a constant such as 0.95
    per_param: bool = False  # sort by ||f_m|| / params_m instead of ||f_m||
    calibration_examples: int = 512
    recovery_epochs: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not one of {METHODS}")
        if self.method != "dense" and (self.target is None) == (self.threshold is None):
            raise ValueError("give exactly one of target (a compression in (0, 1)) or threshold (τ ≥ 0)")
        if self.target is not None and not 0 < self.target < 1:
            raise ValueError(f"target compression must lie in (0, 1), got {self.target}")
        if self.prior_lambda < 0:
            raise ValueError(f"prior_lambda must be ≥ 0, got {self.prior_lambda}")
        if not 0 <= self.prior_warmup <= 1:
            raise ValueError(f"prior_warmup must be a share of the fine-tuning steps in [0, 1], got {self.prior_warmup}")
        if self.recovery_epochs < 0:
            raise ValueError(f"recovery_epochs must be ≥ 0, got {self.recovery_epochs}")

    @property
    def uses_prior(self) -> bool:
        return self.method in ("snip", "snip-no-sn") and self.prior_lambda > 0

    @property
    def uses_sn(self) -> bool:
        return self.method == "snip"


class PriorPenalty(TrainHook):
    """The training-loop hook: λ_t Σ_m w_m ||f_m|| on the batch (see prior.py), called once per training step.

    λ_t ramps linearly from 0 to λ over the first `warmup_steps` calls (then stays at λ): at step 0 the
    classifier head is random, the task gradient reaching the encoder is weak, and a full-strength prior
    would shrink every branch before the task has said which ones it needs (measured: λ = 1e-3 from step 0
    leaves MiniLM at chance on SST-2). `step` counts the calls so far; it is the only state.
    """

    needs_traces = True

    def __init__(self, cfg: SnipConfig, group: int, warmup_steps: int = 0) -> None:
        self.cfg, self.group, self.warmup_steps, self.step = cfg, group, max(0, warmup_steps), 0

    def strength(self) -> float:
        """λ_t for the current step."""
        if self.step >= self.warmup_steps:
            return self.cfg.prior_lambda
        return self.cfg.prior_lambda * (self.step + 1) / (self.warmup_steps + 1)

    def __call__(self, model: nn.Module, traces: list[LayerTrace], mask: Tensor | None) -> Tensor:
        """λ_t R on one batch's traces; advances the step."""
        lam = self.strength()
        self.step += 1
        return lam * identity_prior(model, traces, mask, self.cfg.kinds, self.cfg.prior_weights, self.group)

    def loss(self, ctx: StepContext) -> Tensor:
        return self(ctx.model, ctx.traces, ctx.mask)


def prior_penalty(cfg: SnipConfig, group: int, total_steps: int = 0) -> PriorPenalty:
    """The prior for a fine-tuning run of `total_steps` steps (λ warms up over cfg.prior_warmup of them)."""
    return PriorPenalty(cfg, group, round(cfg.prior_warmup * total_steps))


def calibration_batches(data: Encoded, tokenizer: Tokenizer, n: int, batch_size: int, seed: int) -> list[dict]:
    """Up to n training examples, batched, for measuring function norms."""
    batches = length_bucketed_batches(data.lengths, batch_size, seed)
    out, taken = [], 0
    for _, batch in iterate(data, batches, tokenizer):
        if taken >= n:
            break
        out.append(batch)
        taken += batch["input_ids"].shape[0]
    return out


@dataclass
class PruneOutcome:
    """What `snip_prune` did: which branches went, their norms, and the scores along the way."""

    norms: dict[str, float]
    removed: list[str]
    branches: list[dict]  # every candidate branch: name, kind, layer, params, norm, removed
    report: dict
    tau: float | None
    scores: dict = field(default_factory=dict)


def dev_scores(model: nn.Module, tokenizer: Tokenizer, data, batch_size: int = 128) -> dict:
    """The task's metrics on every dev split of `data` (a `finetune.TaskData`)."""
    return {k: evaluate(model, d, data.task, tokenizer, batch_size) for k, d in data.dev.items()}


def train_with_prior(model: nn.Module, tokenizer: Tokenizer, data, cfg: SnipConfig, train_cfg: TrainConfig):
    """Step 1: fine-tune with the identity prior (when the method has it) under spectral normalization (when
    the method has it). SN is baked into plain weights afterwards. Returns `train.History`."""
    group = cfg.neuron_group_size or 2 * model.config.head_dim
    if cfg.uses_sn:
        apply_spectral_norm(model, bound=cfg.sn_bound)
    total_steps = train_cfg.steps_per_epoch(len(data.train)) * train_cfg.epochs
    penalty = prior_penalty(cfg, group, total_steps) if cfg.uses_prior else None
    history = fit(model, tokenizer, data.task, data.train, data.dev, train_cfg, hooks=[penalty] if penalty else [])
    if cfg.uses_sn:
        remove_spectral_norm(model)
    return history


def threshold_and_remove(model: nn.Module, tokenizer: Tokenizer, data, cfg: SnipConfig,
                         train_cfg: TrainConfig) -> PruneOutcome:
    """Steps 2-3: function norms on a calibration set, the thresholding operator, physical removal."""
    group = cfg.neuron_group_size or 2 * model.config.head_dim
    calib = calibration_batches(data.train, tokenizer, cfg.calibration_examples, train_cfg.eval_batch_size,
                                train_cfg.seed)
    norms = function_norms(model, calib, kinds=cfg.kinds, neuron_group_size=group, param_weighted=False)
    branches = list_branches(model, kinds=cfg.kinds, neuron_group_size=group)
    if cfg.target is not None:
        names = select_for_target(branches, norms, cfg.target, per_param=cfg.per_param, model=model)
    else:
        names = select_below_threshold(norms, cfg.threshold)
    gone = set(names)
    table = [{"name": b.name, "kind": b.kind, "layer": b.layer, "params": b.params, "norm": norms[b.name],
              "removed": b.name in gone or b.parent in gone} for b in branches]
    removed_norms = [b["norm"] for b in table if b["removed"]]
    tau = max(removed_norms) if removed_norms else cfg.threshold  # the largest norm that went
    report = apply_pruning(model, names, neuron_group_size=group)
    return PruneOutcome(norms=norms, removed=names, branches=table, report=report, tau=tau)


def recover(model: nn.Module, tokenizer: Tokenizer, data, cfg: SnipConfig, train_cfg: TrainConfig):
    """Step 4: recovery fine-tuning of the pruned model, without prior or SN (seed + 1)."""
    rec_cfg = replace(train_cfg, epochs=cfg.recovery_epochs, seed=train_cfg.seed + 1)
    return fit(model, tokenizer, data.task, data.train, data.dev, rec_cfg)


def snip_prune(model: nn.Module, tokenizer: Tokenizer, data, cfg: SnipConfig, train_cfg: TrainConfig,
               log=print) -> PruneOutcome:
    """Steps 1-4 on `model` (a BertForSequenceClassification) in place; `data` is a `finetune.TaskData`."""
    history = train_with_prior(model, tokenizer, data, cfg, train_cfg)
    scores = {"finetuned": history.best_metrics,  # fit restored the best epoch: these are its dev scores
              "finetune_history": history.to_dict()}
    if cfg.method == "dense":
        return PruneOutcome(norms={}, removed=[], branches=[], report={"compression": 0.0}, tau=None, scores=scores)
    outcome = threshold_and_remove(model, tokenizer, data, cfg, train_cfg)
    log(f"removed {len(outcome.report['removed'])} branches: compression {outcome.report['compression']:.3f} "
        f"({COMPRESSION_DEFINITION})")
    scores["pruned_before_recovery"] = dev_scores(model, tokenizer, data, train_cfg.eval_batch_size)
    if cfg.recovery_epochs:
        recovery = recover(model, tokenizer, data, cfg, train_cfg)
        scores["recovery_history"] = recovery.to_dict()
        scores["pruned"] = recovery.best_metrics
    else:
        scores["pruned"] = scores["pruned_before_recovery"]
    outcome.scores = scores
    return outcome


def run_prune(task: str, out: str | Path, cfg: SnipConfig, model_path: str | Path | None = None,
              glue_dir: str | Path | None = None, train_cfg: TrainConfig | None = None, max_train: int | None = None,
              overwrite: bool = False, source: str = "auto", plots: bool = True) -> dict:
    """The `prune` command: writes result.json, pruning.json (branches, norms, why), pruned/ and plots."""
    train_cfg = train_cfg or TrainConfig()
    out = prepare_run_dir(out, overwrite)
    model_path = Path(model_path) if model_path is not None else default_model_path()
    tokenizer = load_tokenizer(model_path)
    data = load_task_data(task, tokenizer, glue_dir, max_train, seed=train_cfg.seed, max_length=train_cfg.max_length,
                          source=source)
    set_seed(train_cfg.seed)
    model = load_classifier(model_path, data.task)
    dense_config = BertConfig.from_dict(model.config.to_dict())
    t0 = time.perf_counter()
    outcome = snip_prune(model, tokenizer, data, cfg, train_cfg,
                         log=print if train_cfg.progress else (lambda *a: None))
    wall = time.perf_counter() - t0
    main = data.task.main_metric
    result = {"status": "completed", "task": data.task.name, "method": cfg.method, "model": str(model_path),
              "data": data.info, "hparams": asdict(train_cfg), "snip": asdict(cfg), "seed": train_cfg.seed,
              "environment": environment(), "wall_seconds": wall,
              "compression": compression(model, dense_config), "compression_definition": COMPRESSION_DEFINITION,
              "main_metric": main,
              "dense_score": outcome.scores["finetuned"][next(iter(data.dev))][main],
              "score": outcome.scores.get("pruned", outcome.scores["finetuned"])[next(iter(data.dev))][main],
              "scores": outcome.scores}
    write_json(out / "pruning.json", {
        "method": cfg.method, "target": cfg.target, "threshold": cfg.threshold, "tau_effective": outcome.tau,
        "compression": result["compression"], "compression_definition": COMPRESSION_DEFINITION,
        "why": "removed: the branches with the smallest function norms ||f_m|| (sqrt of the mean over real "
               "calibration tokens of ||f_m(x)||^2) until the target was met, or those under the threshold",
        "removed": outcome.removed, "norms": outcome.norms, "branches": outcome.branches, "report": outcome.report,
        "layers": [asdict(l) for l in model.config.layers]})
    save_pretrained(model, out / "pruned", tokenizer=tokenizer)
    if plots and outcome.norms:
        from ..plots import plot_kept_map, plot_norms_per_layer
        plot_norms_per_layer(outcome.norms, outcome.removed, out / "norms_per_layer.png",
                             title=f"{data.task.display}: function norms after fine-tuning ({cfg.method})")
        plot_kept_map(dense_config, model.config, out / "kept_map.png",
                      title=f"{data.task.display}: kept branches at compression {result['compression']:.2f}")
    write_json(out / "result.json", result)
    return result


def format_prune_result(result: dict) -> str:
    """One readable block: dense vs pruned score, compression, time."""
    s = result["scores"]
    split = next(iter(s["finetuned"]))
    main = result["main_metric"]
    lines = [f"{result['task']} | {result['method']} | model {short_name(result['model'])} | train examples "
             f"{result['data']['train_examples']} | {result['wall_seconds']:.0f} s",
             f"{'stage':<26} {main + ' (x100)':>14}",
             f"{'fine-tuned (dense)':<26} {100 * s['finetuned'][split][main]:>14.2f}"]
    if "pruned_before_recovery" in s:
        lines.append(f"{'pruned, before recovery':<26} {100 * s['pruned_before_recovery'][split][main]:>14.2f}")
        lines.append(f"{'pruned + recovery':<26} {100 * s['pruned'][split][main]:>14.2f}")
    lines.append(f"compression {result['compression']:.3f} = {result['compression_definition']}")
    return "\n".join(lines)
