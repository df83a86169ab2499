"""Movement pruning of single weights (command-line name `movement`; `Config.variant` "hard" or "soft").

Sanh, Wolf & Rush, "Movement Pruning: Adaptive Sparsity by Fine-Tuning", NeurIPS 2020 (arXiv 2005.07683),
Sec. 3-4. Every weight W_ij of the pruned matrices gets a score S_ij, learned with the model; the forward
pass uses the masked weight

    W' = W ⊙ M(S)                                                              (`MaskedWeight`)

    hard movement:  M = Top_v(S): 1 for the v largest scores, 0 elsewhere, with v = round((1 - s_t) n) and s_t
                    the cubic sparsity schedule with warm-up and cool-down (`pruning.schedule`)
    soft movement:  M = 1(σ(S) > τ), and λ_mvp Σ_ij σ(S_ij) added to the loss   (`soft_mask`, `soft_penalty`)

M is not differentiable; the straight-through estimator (Bengio et al. 2013) passes the gradient of M to S
unchanged (`StraightThroughMask`: forward = the mask, backward = identity), so

    ∂L/∂S_ij = ∂L/∂M_ij = (∂L/∂W'_ij) W_ij

and a gradient step S <- S - α ∂L/∂S accumulates -W ∂L/∂W' over training: a weight's score grows while the
weight moves away from zero. (The soft variant's score gradient adds λ_mvp σ'(S).)

Which weights: those of the encoder's W_QKV, W_O, W_1, W_2 (`pruning.compression.encoder_linears`),
biases excluded; the target is the share of those weights that are zero at the end.

Reconstructed where the paper leaves a choice (or where its released code chose something we do not copy):

* the mask is recomputed once per step, in `before_forward`, from the current scores (not at every access
  of the weight): Top_v is a sort, and the last layer reads its W_QKV twice per forward pass.
* Top_v per matrix (`scope` "per-matrix": each matrix keeps round((1 - s_t) n_i)) by default, or over all
  matrices ("global": exactly round(s_t N) pruned).
* scores start at 0 (`init_score`); during the warm-up (s_t = 0) nothing is masked and the scores accumulate
  movement before the first Top_v.
* scores are optimised by fit's AdamW in a group of their own: lr 1e-2 (`score_lr`; Sanh et al. give the
  scores a much larger learning rate than the weights), no weight decay, the same warm-up / decay schedule.
  Not clipped (fit clips the model's parameters only).
* warm-up 10%, cool-down 20% of the steps; s_i = 0.
* soft movement: τ = 0.1 fixed on σ(S) (`threshold`), λ_mvp = 1e-4 (`penalty`), the penalty a plain sum
  over all scores as written in the paper. (To our knowledge, the authors' code also ramps τ and λ up on the
  cubic schedule and averages σ(S) per matrix; not done here.) Soft movement's sparsity is whatever λ_mvp
  and τ make of it, so it cannot meet a target during training: `before_removal` applies Top_v of the
  learned scores at exactly the target, for both variants (for hard movement after the cool-down this is the
  schedule's own final mask, up to the last step's score update).
* the masks are parametrizations (`torch.nn.utils.parametrize`): the forward pass sees W ⊙ M, W itself is
  kept (a pruned weight can come back when its score rises). `before_removal` removes them and writes
  exact zeros into W where the final mask is 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..pruning.gates import clear_gates
from ..pruning.schedule import cubic_sparsity, schedule_steps
from ..train import StepContext, TrainHook
from ..pruning.compression import encoder_linears
from .magnitude_unstructured import SCOPES, smallest_masks

STRUCTURED = False
USES_DISTILLATION = False
SCHEDULED = True  # its masks follow a schedule over fine-tuning: the last epoch is the one at the target
DESCRIPTION = ("movement pruning (Sanh et al. 2020): learned scores S with W' = W ⊙ M(S); hard: the top-v scores "
               "on a cubic schedule, soft: sigmoid(S) > τ with a penalty; straight-through gradients")

VARIANTS = ("hard", "soft")


# --- the equations -------------------------------------------------------------------------------------------

class StraightThroughMask(torch.autograd.Function):
    """forward(S, M) = M (a fixed 0/1 mask computed from S); backward: ∂L/∂S = ∂L/∂M (the identity)."""

    @staticmethod
    def forward(ctx, scores: Tensor, keep: Tensor) -> Tensor:
        # BEGIN SOLUTION
        return keep.to(scores.dtype)
        # END SOLUTION

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        # BEGIN SOLUTION
        return grad, None
        # END SOLUTION


def top_v_masks(scores: Sequence[Tensor], sparsity: float, scope: str = "per-matrix") -> list[Tensor]:
    """M = Top_v(S): keep the largest scores, prune the round(sparsity · n) smallest (per matrix or overall)."""
    # BEGIN SOLUTION
    return smallest_masks([s.detach() for s in scores], sparsity, scope)
    # END SOLUTION


def soft_mask(scores: Tensor, threshold: float) -> Tensor:
    """M = 1(σ(S) > τ)."""
    return torch.sigmoid(scores.detach()) > threshold


def soft_penalty(scores: Sequence[Tensor], penalty: float) -> Tensor:
    """R(S) = λ_mvp Σ_ij σ(S_ij), summed over all scored matrices."""
    return penalty * torch.stack([torch.sigmoid(s).sum() for s in scores]).sum()


@dataclass
class MaskState:
    """One matrix's scores S (a parameter of the hook, not of the model) and the mask M in force."""

    scores: nn.Parameter
    keep: Tensor  # bool, the weight's shape

    def follow(self, weight: Tensor) -> None:
        """Move S and M to the weight's device (S keeps its identity, so the optimiser still holds it)."""
        if self.scores.device != weight.device:
            self.scores.data = self.scores.data.to(weight.device)
        if self.keep.device != weight.device:
            self.keep = self.keep.to(weight.device)


class MaskedWeight(nn.Module):
    """Parametrization W -> W ⊙ M(S), with M passed to S straight through."""

    def __init__(self, state: MaskState):
        super().__init__()
        self.state = state  # a plain attribute: S is not registered with the model (the hook's optimiser group)

    def forward(self, weight: Tensor) -> Tensor:
        # BEGIN SOLUTION
        return weight * StraightThroughMask.apply(self.state.scores, self.state.keep)
        # END SOLUTION


def attach_scores(linear: nn.Linear, init_score: float = 0.0) -> MaskState:
    """Give `linear` scores S = init_score and the parametrization weight = W ⊙ M(S) (M = 1 to start)."""
    w = linear.weight
    state = MaskState(nn.Parameter(torch.full_like(w, init_score, dtype=torch.float32, requires_grad=True)),
                      torch.ones_like(w, dtype=torch.bool))
    parametrize.register_parametrization(linear, "weight", MaskedWeight(state))
    return state


@torch.no_grad()
def detach_scores(linear: nn.Linear, keep: Tensor | None) -> None:
    """Remove the parametrization; W gets exact zeros where `keep` is False (None: W as it is)."""
    parametrize.remove_parametrizations(linear, "weight", leave_parametrized=False)
    if keep is not None:
        linear.weight.masked_fill_(~keep.to(linear.weight.device), 0.0)


# --- the method ----------------------------------------------------------------------------------------------

@dataclass
class Config:
    """variant: "hard" (Top_v on the cubic schedule) or "soft" (σ(S) > τ and a penalty); scope: Top_v per
    matrix or global; score_lr: learning rate of the scores; init_score: S at the start; warmup / cooldown:
    shares of the steps at sparsity 0 / at the target (hard); threshold: τ on σ(S) (soft); penalty: λ_mvp (soft)."""

    variant: str = "hard"
    scope: str = "per-matrix"
    score_lr: float = 1e-2
    init_score: float = 0.0
    warmup: float = 0.1
    cooldown: float = 0.2
    threshold: float = 0.1
    penalty: float = 1e-4

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.variant not in VARIANTS:
            raise ValueError(f"{name}.variant must be one of {VARIANTS}, got variant={self.variant!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"{name}.scope must be one of {SCOPES}, got scope={self.scope!r}")
        checks = {"score_lr": lambda v: v > 0, "init_score": lambda v: True, "warmup": lambda v: 0 <= v <= 1,
                  "cooldown": lambda v: 0 <= v <= 1, "threshold": lambda v: 0 < v < 1, "penalty": lambda v: v >= 0}
        ranges = {"score_lr": "> 0", "init_score": "finite", "warmup": "in [0, 1]", "cooldown": "in [0, 1]",
                  "threshold": "in (0, 1) (a value of the sigmoid)", "penalty": ">= 0"}
        for field_name, ok in checks.items():
            v = getattr(self, field_name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise ValueError(f"{name}.{field_name} must be a finite number {ranges[field_name]}, "
                                 f"got {field_name}={v!r}")
        if self.warmup + self.cooldown > 1:
            raise ValueError(f"{name}.warmup + cooldown must not exceed 1, got warmup={self.warmup}, "
                             f"cooldown={self.cooldown}")


class MovementHook(TrainHook):
    """Scores on every weight of the encoder's linear layers, masks from them each step (see the module doc)."""

    def __init__(self, model: nn.Module, target: float | None, total_steps: int, cfg: Config):
        self.cfg = cfg
        self.target = float(target) if target is not None else None  # None: the dense reference, nothing zeroed
        self.total_steps = total_steps
        self.warmup_steps, self.cooldown_steps = schedule_steps(total_steps, cfg.warmup, cfg.cooldown)
        self.linears = [lin for _, lin in encoder_linears(model)]
        self.states = [attach_scores(lin, cfg.init_score) for lin in self.linears]
        self.masked = False  # whether masks with zeros are in force (a host flag: the step reads nothing back)

    @property
    def scores(self) -> list[nn.Parameter]:
        return [s.scores for s in self.states]

    def scheduled(self, step: int) -> float:
        """s_t of hard movement (0 throughout when there is no target)."""
        return cubic_sparsity(step, self.total_steps, self.target or 0.0, 0.0, self.warmup_steps, self.cooldown_steps)

    def _follow(self) -> None:
        for lin, st in zip(self.linears, self.states):
            st.follow(lin.parametrizations.weight.original)

    def param_groups(self) -> list[dict]:
        self._follow()  # fit has moved the model to its device by now
        return [{"params": self.scores, "lr": self.cfg.score_lr, "weight_decay": 0.0}]

    @torch.no_grad()
    def set_masks(self, keep: Sequence[Tensor], masked: bool = True) -> None:
        for st, k in zip(self.states, keep):
            st.keep = k
        self.masked = masked

    @property
    def current(self) -> float:
        """The sparsity of the masks in force (read back from the device: for logs, not for every step)."""
        keep = [st.keep for st in self.states if st.keep is not None]
        if not keep:
            return 0.0
        return float(sum((~k).sum() for k in keep)) / sum(k.numel() for k in keep)

    @torch.no_grad()
    def top_v(self, sparsity: float) -> list[Tensor]:
        return top_v_masks(self.scores, sparsity, self.cfg.scope)

    def before_forward(self, ctx: StepContext) -> None:
        self._follow()
        if self.cfg.variant == "hard":
            s = self.scheduled(ctx.step)
            if s > 0 or self.masked:
                self.set_masks(self.top_v(s), masked=s > 0)
        else:
            self.set_masks([soft_mask(st.scores, self.cfg.threshold) for st in self.states])

    def loss(self, ctx: StepContext) -> Tensor | None:
        if self.cfg.variant == "soft" and self.cfg.penalty > 0:
            return soft_penalty(self.scores, self.cfg.penalty)
        return None

    def epoch_log(self) -> dict:
        return {"sparsity": self.current}

    def finalize(self) -> None:
        """Top_v of the learned scores at exactly the target, baked into the weights; parametrizations off."""
        keep = self.top_v(self.target) if self.target else None
        for i, lin in enumerate(self.linears):
            if parametrize.is_parametrized(lin, "weight"):
                detach_scores(lin, keep[i] if keep is not None else None)
        if keep is not None:
            self.set_masks(keep)


def training_hooks(model: nn.Module, cfg: Config, target: float | None, total_steps: int,
                   kinds: tuple[str, ...] = (), neuron_group_size: int | None = None) -> list[TrainHook]:
    """One `MovementHook` (kinds and neuron_group_size do not apply to single weights)."""
    return [MovementHook(model, target, total_steps, cfg)]


def before_removal(model: nn.Module, hooks: Sequence[TrainHook]) -> None:
    """Top_v at exactly the target, as zeros in the weights; no parametrization, no gate left."""
    for h in hooks:
        if isinstance(h, MovementHook):
            h.finalize()
    clear_gates(model)


__all__ = ["Config", "DESCRIPTION", "SCHEDULED", "MaskState", "MaskedWeight", "MovementHook", "STRUCTURED", "StraightThroughMask",
           "USES_DISTILLATION", "VARIANTS", "attach_scores", "before_removal", "detach_scores", "soft_mask",
           "soft_penalty", "top_v_masks", "training_hooks"]
