"""SNIP as one method on the shared recipe (Lin et al. 2020, Sec. 3-4, as reconstructed here).

1. fine-tune with the identity prior   L = L_task + λ_t Σ_m w_m ||f_m||   (prior.py), λ_t ramping up from 0
   over the first `prior_warmup` of the steps, under spectral normalization W ← W · min(1, c/σ(W)) of every
   branch matrix (spectral.py);                                                     `training_hooks`
2. bake SN into plain weights;                                                      `before_removal`
3. score every branch by its function norm ||f_m|| on a calibration set (norms.py);  `scores`
4. the recipe thresholds (smallest norms go until the target is met, or those under τ), removes the
   branches physically and fine-tunes the pruned model once more (minisnip.pruning.recipe).

The ablations are this module with a part switched off: `snip-no-sn` (prior, no SN) and `snip-no-prior`
(thresholding the norms of a plainly fine-tuned model, no SN either).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ..train import TrainHook
from .gradual import GradualThreshold
from .norms import function_norms
from .prior import PriorPenalty, ProximalPrior, output_weight_groups
from .spectral import apply_spectral_norm, remove_spectral_norm

STRUCTURED = True
USES_DISTILLATION = False
SCHEDULED = False  # the best epoch of fine-tuning is kept
DESCRIPTION = "SNIP (Lin et al. 2020): identity prior + spectral normalization, threshold the function norms"


PRIOR_STEPS = ("subgradient", "proximal")
PRIOR_GATES = ("none", "loss", "baseline")
SN_MATRICES = {"all": ("qkv", "out", "up", "down"), "ffn": ("up", "down"), "attention": ("qkv", "out")}


@dataclass
class Config:
    """SNIP's own choices; each a switch a student can flip (the recipe's choices are in `PruneConfig`)."""

    prior: bool = True  # the identity prior λ Σ_m w_m ||f_m|| in the fine-tuning loss
    spectral_norm: bool = True  # W ← W · min(1, c/σ(W)) on every branch matrix while fine-tuning
    prior_lambda: float = 3e-4
    prior_warmup: float = 0.5  # share of fine-tuning steps over which λ ramps linearly from 0 to prior_lambda
    prior_weights: str | None = "params"  # w_m ∝ parameters of branch m (mean 1), or None for w_m = 1
    sn_bound: str | float = "init"  # "init": c = σ(W) at load time; or a positive constant such as 0.95
    sn_scale: float = 1.0  # with sn_bound "init": c = sn_scale x σ(W) at load time (< 1: a shared scale below σ)
    sn_matrices: str = "all"  # which branch matrices SN normalises: "all" (QKV, O, W_1, W_2), "ffn", "attention"
    prior_step: str = "subgradient"  # "subgradient": λ Σ w_m ||f_m|| in the loss; "proximal": prox of the group
    #                                  lasso on the branches' output weights after each step (prior.ProximalPrior)
    prior_gate: str = "none"  # "loss": λ_t also scaled by the share of its first loss the task has explained;
    #                           "baseline": by how far its loss is below a constant predictor's (prior.PriorPenalty,
    #                           gate; neither is the paper's); "none": the paper's prior
    prior_target: bool = False  # the prior only on the branches the thresholding at the target would remove now
    #                             (prior.PriorPenalty, target; not the paper's): one fine-tune per target
    gradual: bool = False  # threshold while fine-tuning, on the cubic schedule to the target after the prior's warm-up
    #                        (gradual.GradualThreshold; not the paper's): one fine-tune per target, its last epoch kept
    prox_lambda: float = 300.0  # λ of the proximal step, on the scale of output-weight norms (how 300 was reasoned
    #                             from MiniLM's norms and the study's schedule: docs/snip.md, the proximal step)

    def __post_init__(self) -> None:
        if not (isinstance(self.prior_lambda, (int, float)) and math.isfinite(self.prior_lambda)
                and self.prior_lambda >= 0):
            raise ValueError(f"prior_lambda must be a finite number ≥ 0, got {self.prior_lambda!r}")
        if not (isinstance(self.prior_warmup, (int, float)) and 0 <= self.prior_warmup <= 1):
            raise ValueError(f"prior_warmup must be a share of the fine-tuning steps in [0, 1], got {self.prior_warmup!r}")
        if self.prior_weights not in (None, "params"):
            raise ValueError(f"prior_weights must be None or 'params', got {self.prior_weights!r}")
        if self.sn_matrices not in SN_MATRICES:
            raise ValueError(f"sn_matrices must be one of {tuple(SN_MATRICES)}, got {self.sn_matrices!r}")
        if not (isinstance(self.sn_scale, (int, float)) and not isinstance(self.sn_scale, bool)
                and 0 < self.sn_scale <= 1):
            raise ValueError(f"sn_scale must be a number in (0, 1], got {self.sn_scale!r}")
        if self.prior_gate not in PRIOR_GATES:
            raise ValueError(f"prior_gate must be one of {PRIOR_GATES}, got {self.prior_gate!r}")
        if self.prior_step not in PRIOR_STEPS:
            raise ValueError(f"prior_step must be one of {PRIOR_STEPS}, got {self.prior_step!r}")
        if self.prior_gate != "none" and self.prior_step == "proximal":
            raise ValueError("prior_gate applies to the prior in the loss (prior_step='subgradient'), not to the "
                             "proximal step")
        if self.prior_target and self.prior_step == "proximal":
            raise ValueError("prior_target applies to the prior in the loss (prior_step='subgradient'), not to the "
                             "proximal step")
        if not (isinstance(self.prox_lambda, (int, float)) and math.isfinite(self.prox_lambda) and self.prox_lambda >= 0):
            raise ValueError(f"prox_lambda must be a finite number ≥ 0, got {self.prox_lambda!r}")
        if self.sn_bound != "init" and not (isinstance(self.sn_bound, (int, float)) and not isinstance(self.sn_bound, bool)
                                            and math.isfinite(self.sn_bound) and self.sn_bound > 0):
            raise ValueError(f"sn_bound must be 'init' or a finite number > 0, got {self.sn_bound!r}")

    @property
    def scheduled(self) -> bool:
        """Whether fine-tuning follows a schedule to the target (the recipe then keeps the last epoch)."""
        return self.gradual

    @property
    def uses_prior(self) -> bool:
        return self.prior and (self.prox_lambda if self.prior_step == "proximal" else self.prior_lambda) > 0


def check(model: nn.Module, cfg: Config, target: float | None, kinds: tuple[str, ...],
          neuron_group_size: int | None) -> None:
    """What the proximal step would refuse at its first step (whole blocks as kinds, FFN widths that are not
    multiples of the group size), and a targeted prior without a target, found before any training (the recipe
    calls it)."""
    if cfg.uses_prior and cfg.prior_target and target is None:
        raise ValueError("prior_target needs a target compression (--target): it penalises the branches that "
                         "thresholding at the target would remove")
    if cfg.gradual and target is None:
        raise ValueError("gradual needs a target compression (--target): its schedule ends there")
    if cfg.uses_prior and cfg.prior_step == "proximal":
        output_weight_groups(model, kinds, neuron_group_size)


def training_hooks(model: nn.Module, cfg: Config, target: float | None, total_steps: int, kinds: tuple[str, ...],
                   neuron_group_size: int) -> list[TrainHook]:
    """Put SN on the branch matrices (when on) and return the prior's hook (when on), and the gradual cut's."""
    check(model, cfg, target, kinds, neuron_group_size)
    if cfg.spectral_norm:
        apply_spectral_norm(model, which=SN_MATRICES[cfg.sn_matrices], bound=cfg.sn_bound, init_scale=cfg.sn_scale)
    hooks: list[TrainHook] = []
    if cfg.gradual:  # the cut starts when the prior reaches full strength (and leaves the cool-down its steps)
        start = min(cfg.prior_warmup, 1 - GradualThreshold.COOLDOWN)
        hooks.append(GradualThreshold(model, target, total_steps, kinds, neuron_group_size, start=start))
    if not cfg.uses_prior:
        return hooks
    warmup = round(cfg.prior_warmup * total_steps)
    if cfg.prior_step == "proximal":
        return [ProximalPrior(cfg.prox_lambda, kinds, neuron_group_size, cfg.prior_weights, warmup_steps=warmup),
                *hooks]
    return [PriorPenalty(cfg.prior_lambda, kinds, neuron_group_size, cfg.prior_weights, warmup_steps=warmup,
                         gate=cfg.prior_gate, target=target if cfg.prior_target else None), *hooks]


def before_removal(model: nn.Module, hooks: list[TrainHook]) -> None:
    """Bake W · min(1, c/σ̂) into plain weights (a no-op without SN); a gradual cut's gates off."""
    remove_spectral_norm(model)
    for hook in hooks:
        if isinstance(hook, GradualThreshold):
            hook.clear()


def scores(model: nn.Module, hooks: list[TrainHook], calib: list[dict], kinds: tuple[str, ...],
           neuron_group_size: int) -> dict[str, float]:
    """The function norm ||f_m|| of every branch on the calibration set: the thresholding operator's input.
    After a gradual cut: the running norms its final mask was chosen from (the cut at the target is the mask)."""
    gradual = next((h for h in hooks if isinstance(h, GradualThreshold)), None)
    if gradual is not None:
        return gradual.scores()
    return function_norms(model, calib, kinds=kinds, neuron_group_size=neuron_group_size)


def scores_at_load(model: nn.Module, cfg: Config, calib: list[dict], kinds: tuple[str, ...],
                   neuron_group_size: int) -> dict[str, float]:
    """The function norms before fine-tuning: the identity prior only shrinks them (and plain fine-tuning moves
    them little), so a threshold above all of them removes everything; the recipe checks this up front."""
    return function_norms(model, calib, kinds=kinds, neuron_group_size=neuron_group_size)


__all__ = ["Config", "DESCRIPTION", "SCHEDULED", "STRUCTURED", "USES_DISTILLATION", "before_removal", "scores", "scores_at_load", "training_hooks"]
