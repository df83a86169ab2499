"""Gradual magnitude pruning of single weights during fine-tuning (command-line name `magnitude-unstructured`).

Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of pruning for model compression" (arXiv
1710.01878, ICLR workshop 2018), Sec. 3, paraphrased: every pruned layer gets a binary mask of
its weight's shape that decides which weights take part in the forward pass; the layer's weights are sorted
by absolute value and the smallest are masked to zero until the desired sparsity s is reached; the
gradients flow through the masks, so masked weights are not updated. The sparsity follows their eq. (1),
the cubic schedule (`minisnip.pruning.schedule.cubic_sparsity`), and the masks are updated every Δt steps.

Which weights: those of the encoder's linear layers W_QKV, W_O, W_1, W_2 (`pruning.compression.encoder_linears`),
biases excluded; the target is the share of those weights that are zero at the end (`compression.sparsity`).

    importance:   |W_ij|
    mask at an update step t:  M = 0 for the round(s_t n) smallest |W_ij|, 1 elsewhere    (`smallest_masks`)
        scope "per-matrix": n = the matrix's own size, each matrix pruned to s_t (Zhu & Gupta's per layer);
                            the total is then within half a weight per matrix of s_t · N
        scope "global":     one ranking over all N weights, exactly round(s_t N) zeros
    training:     after every optimiser step W <- W ⊙ M; before clipping, dL/dW <- dL/dW ⊙ M

Reconstructed where the paper leaves a choice, or for fine-tuning rather than training from scratch:

* masking is done on the weights in place, not through a parametrization: zeroing W after every step is
  exact (the forward pass sees W ⊙ M), and costs nothing in the forward pass. AdamW's moments would keep
  moving a pruned weight (and weight decay act on it), which is why it is re-zeroed after *every* step, not
  only at mask updates; its gradient is masked too, so it takes no part in gradient clipping.
* Δt (`update_every`) = 10 steps (the paper's 100-1000 are for training from scratch; a GLUE fine-tuning
  run has a few hundred to a few thousand steps). The mask is also updated at the first step of the
  cool-down, so the final sparsity is reached whatever Δt is.
* warm-up 10% and cool-down 20% of the steps (Sanh et al.'s framing of the schedule), s_i = 0.
* `before_removal` makes sure the final masks prune exactly the target (recomputing them by |W| if the
  schedule did not get there, e.g. when fit ran fewer steps than `total_steps`) and writes the zeros.

SparseBERT (`sparsebert.py`) reuses these hooks with distillation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from ..checks import check_field, is_int
from ..pruning.compression import encoder_linears, sparsity
from ..pruning.gates import clear_gates
from ..pruning.schedule import cubic_sparsity, schedule_steps
from ..train import StepContext, TrainHook

STRUCTURED = False
USES_DISTILLATION = False
SCHEDULED = True  # its masks follow a schedule over fine-tuning: the last epoch is the one at the target
DESCRIPTION = ("unstructured magnitude (Zhu & Gupta 2017): the smallest |W| of the encoder's linear layers go "
               "to zero gradually during fine-tuning, on a cubic schedule")

SCOPES = ("per-matrix", "global")


# --- the weights, their sparsity, and masks by importance --------------------------------------------------

def keep_largest(importance: Tensor, n_pruned: int) -> Tensor:
    """Boolean mask of importance's shape: False at the `n_pruned` smallest entries, True elsewhere."""
    keep = torch.ones(importance.numel(), dtype=torch.bool, device=importance.device)
    if n_pruned > 0:
        keep[torch.topk(importance.detach().flatten(), n_pruned, largest=False, sorted=False).indices] = False
    return keep.view(importance.shape)


def smallest_masks(importances: Sequence[Tensor], share: float, scope: str) -> list[Tensor]:
    """Keep masks pruning `share` of the entries with the smallest importance.

    per-matrix: each tensor loses round(share * its size); global: round(share * all sizes) over one ranking."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if scope == "per-matrix":
        return [keep_largest(t, round(share * t.numel())) for t in importances]
    sizes = [t.numel() for t in importances]
    flat = torch.cat([t.detach().flatten().float() for t in importances])
    keep = keep_largest(flat, round(share * flat.numel()))
    return [m.view(t.shape) for m, t in zip(keep.split(sizes), importances)]


# --- the method's hyper-parameters and hook ------------------------------------------------------------------

@dataclass
class Config:
    """scope: "per-matrix" (each matrix to the scheduled sparsity) or "global" (one ranking of |W|);
    update_every: Δt, steps between mask updates; warmup / cooldown: shares of the fine-tuning steps held at
    s_i / at the target; initial_sparsity: s_i."""

    scope: str = "per-matrix"
    update_every: int = 10
    warmup: float = 0.1
    cooldown: float = 0.2
    initial_sparsity: float = 0.0

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.scope not in SCOPES:
            raise ValueError(f"{name}.scope must be one of {SCOPES}, got scope={self.scope!r}")
        if not is_int(self.update_every) or self.update_every < 1:
            raise ValueError(f"{name}.update_every must be an integer >= 1, got update_every={self.update_every!r}")
        for field_name in ("warmup", "cooldown", "initial_sparsity"):
            check_field(self, field_name, lambda v: 0 <= v <= 1, "a number in [0, 1]")
        if self.warmup + self.cooldown > 1:
            raise ValueError(f"{name}.warmup + cooldown must not exceed 1, got warmup={self.warmup}, "
                             f"cooldown={self.cooldown}")


class GradualMagnitudeHook(TrainHook):
    """Masks the smallest |W| of the encoder's linear layers on the cubic schedule (see the module doc)."""

    def __init__(self, model: nn.Module, target: float | None, total_steps: int, cfg: Config):
        self.model, self.cfg = model, cfg
        self.target = float(target) if target is not None else 0.0  # None: the dense reference, prune nothing
        if cfg.initial_sparsity > self.target:
            raise ValueError(f"initial_sparsity={cfg.initial_sparsity} exceeds the target {self.target}")
        self.total_steps = total_steps
        self.warmup_steps, self.cooldown_steps = schedule_steps(total_steps, cfg.warmup, cfg.cooldown)
        self.final_step = max(1, total_steps - self.cooldown_steps)  # the first step held at the target
        self.linears = [lin for _, lin in encoder_linears(model)]
        self.keep: list[Tensor] | None = None  # one mask per linear, None until the first pruning
        self.current = 0.0  # the sparsity the masks were computed for

    def scheduled(self, step: int) -> float:
        """s_t of the cubic schedule at this (1-based) step."""
        return cubic_sparsity(step, self.total_steps, self.target, self.cfg.initial_sparsity,
                              self.warmup_steps, self.cooldown_steps)

    def update(self, share: float) -> None:
        """New masks at sparsity `share`: the smallest |W| (already-zero weights first) go."""
        self.keep = smallest_masks([lin.weight.detach().abs() for lin in self.linears], share, self.cfg.scope)
        self.current = share

    @torch.no_grad()
    def apply(self) -> None:
        """W <- W ⊙ M (exact zeros)."""
        if self.keep is None:
            return
        for lin, keep in zip(self.linears, self.keep):
            lin.weight.masked_fill_(~keep.to(lin.weight.device), 0.0)

    def after_backward(self, ctx: StepContext) -> None:
        if self.keep is None:
            return
        for lin, keep in zip(self.linears, self.keep):
            if lin.weight.grad is not None:
                lin.weight.grad.masked_fill_(~keep.to(lin.weight.device), 0.0)

    def after_step(self, ctx: StepContext) -> None:
        step = ctx.step
        if step % self.cfg.update_every == 0 or step == self.final_step:
            share = self.scheduled(step)
            if share > 0 or self.keep is not None:
                self.update(share)
        self.apply()

    def finalize(self) -> None:
        """Masks at exactly the target (recomputed by |W| if the schedule did not end there), zeros written."""
        if self.target == 0:
            return
        if self.keep is None or self.current != self.target:
            self.update(self.target)
        self.apply()

    def epoch_log(self) -> dict:
        return {"sparsity": sparsity(self.model), "scheduled_sparsity": self.current}


# --- the method contract -------------------------------------------------------------------------------------

def training_hooks(model: nn.Module, cfg: Config, target: float | None, total_steps: int,
                   kinds: tuple[str, ...] = (), neuron_group_size: int | None = None) -> list[TrainHook]:
    """One `GradualMagnitudeHook` (kinds and neuron_group_size do not apply to single weights)."""
    return [GradualMagnitudeHook(model, target, total_steps, cfg)]


def before_removal(model: nn.Module, hooks: Sequence[TrainHook]) -> None:
    """Exactly the target's share of the weights zero, in the weights themselves; nothing else left on the model."""
    for h in hooks:
        if isinstance(h, GradualMagnitudeHook):
            h.finalize()
    clear_gates(model)


__all__ = ["Config", "DESCRIPTION", "SCHEDULED", "GradualMagnitudeHook", "SCOPES", "STRUCTURED", "USES_DISTILLATION",
           "before_removal", "keep_largest", "smallest_masks", "training_hooks"]
