"""Movement pruning of heads and FFN neuron groups (command-line name `movement-structured`).

Sanh, Wolf & Rush (NeurIPS 2020) learn one score per weight (`movement.py`); here, as in the structured
follow-ups of their method (e.g. Lagunas et al. 2021, block movement pruning), one score S_m per branch m of
`list_branches(model, kinds, neuron_group_size)`: a head, an FFN neuron group (or a whole block). The branch's
output is multiplied by its mask value through the model's gates (`pruning.gates.GateLayout`):

    g_m = M_m(S),  M = the top-v branches by score: the lowest-scored branches are masked until the
                   scheduled compression s_t is met (`pruning.select.select_for_target`, the same operator
                   the recipe uses at the end), s_t the cubic schedule with warm-up and cool-down
    straight-through:  ∂L/∂S_m = ∂L/∂g_m = Σ_tokens <∂L/∂(branch output), f_m(x)>

so a branch's score grows while scaling it up would lower the loss: the movement of the branch, the analogue
of -W ∂L/∂W' for one weight. A masked branch is still computed (times 0), so its score keeps moving and it
can come back.

STRUCTURED = True: `scores` returns the learned S, and the recipe removes the lowest-scored branches
physically; at the end of the schedule those are exactly the branches the mask had switched off (up to the
last step's score update).

Reconstructed: v is counted in compression (encoder linear-layer weights, `pruning.compression`), not in
branches, so heads and neuron groups of unequal size compete fairly; scores start at 0 (ties during the
warm-up are broken by the order of `list_branches`, but nothing is masked then); score lr 1e-2 (fit's
AdamW, a group of its own, no weight decay); warm-up 10%, cool-down 20% of the steps. With no target (the
dense reference) nothing is masked and the scores only accumulate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from ..pruning.branches import list_branches
from ..pruning.gates import GateLayout, clear_gates
from ..pruning.schedule import cubic_sparsity, schedule_steps
from ..pruning.select import removed_by, select_for_target
from ..train import StepContext, TrainHook
from .movement import StraightThroughMask

STRUCTURED = True
USES_DISTILLATION = False
SCHEDULED = True  # its masks follow a schedule over fine-tuning: the last epoch is the one at the target
DESCRIPTION = ("structured movement: one learned score per head / FFN neuron group, a top-v 0/1 gate mask on the "
               "cubic schedule with straight-through gradients; the lowest scores go")


@dataclass
class Config:
    """score_lr: learning rate of the branch scores; init_score: S at the start; warmup / cooldown: shares of
    the steps at compression 0 / at the target."""

    score_lr: float = 1e-2
    init_score: float = 0.0
    warmup: float = 0.1
    cooldown: float = 0.2

    def __post_init__(self) -> None:
        for name, ok, words in (("score_lr", lambda v: v > 0, "> 0"), ("init_score", lambda v: True, "finite"),
                                ("warmup", lambda v: 0 <= v <= 1, "in [0, 1]"),
                                ("cooldown", lambda v: 0 <= v <= 1, "in [0, 1]")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise ValueError(f"Config.{name} must be a finite number {words}, got {name}={v!r}")
        if self.warmup + self.cooldown > 1:
            raise ValueError(f"Config.warmup + cooldown must not exceed 1, got warmup={self.warmup}, "
                             f"cooldown={self.cooldown}")


class BranchMovementHook(TrainHook):
    """One score per branch, a 0/1 top-v mask through the gates each step (see the module doc)."""

    def __init__(self, model: nn.Module, target: float | None, total_steps: int, kinds: Sequence[str],
                 neuron_group_size: int | None, cfg: Config):
        self.model, self.cfg = model, cfg
        self.target = float(target) if target is not None else 0.0
        self.total_steps = total_steps
        self.warmup_steps, self.cooldown_steps = schedule_steps(total_steps, cfg.warmup, cfg.cooldown)
        self.kinds, self.neuron_group_size = tuple(kinds), neuron_group_size
        self.branches = list_branches(model, kinds, neuron_group_size)
        self.names = [b.name for b in self.branches]
        self.layout = GateLayout(model, self.branches)
        device = next(model.parameters()).device
        self.scores = nn.Parameter(torch.full((len(self.branches),), float(cfg.init_score), device=device))
        self.keep = torch.ones(len(self.branches), dtype=torch.bool, device=device)
        self.current = 0.0  # the compression the mask was chosen for

    def scheduled(self, step: int) -> float:
        return cubic_sparsity(step, self.total_steps, self.target, 0.0, self.warmup_steps, self.cooldown_steps)

    def _follow(self) -> None:
        device = next(self.model.parameters()).device
        if self.scores.device != device:
            self.scores.data = self.scores.data.to(device)

    def param_groups(self) -> list[dict]:
        self._follow()
        return [{"params": [self.scores], "lr": self.cfg.score_lr, "weight_decay": 0.0}]

    @torch.no_grad()
    def mask_for(self, share: float) -> Tensor:
        """Keep mask (one bool per branch): the lowest-scored branches off until compression `share` is met."""
        device = self.scores.device
        if share <= 0:
            return torch.ones(len(self.branches), dtype=torch.bool, device=device)
        gone = select_for_target(self.branches, dict(zip(self.names, self.scores.tolist())), share, model=self.model)
        return ~torch.tensor(removed_by(self.branches, gone), dtype=torch.bool, device=device)

    def before_forward(self, ctx: StepContext) -> None:
        self._follow()
        share = self.scheduled(ctx.step)
        if share != self.current or share > 0:
            self.keep, self.current = self.mask_for(share), share
        self.layout.apply(self.model, StraightThroughMask.apply(self.scores, self.keep.to(self.scores.device)))

    def epoch_log(self) -> dict:
        return {"branches_masked": int((~self.keep).sum()), "scheduled_compression": self.current}

    def score_dict(self) -> dict[str, float]:
        return dict(zip(self.names, self.scores.detach().cpu().tolist()))


def training_hooks(model: nn.Module, cfg: Config, target: float | None, total_steps: int,
                   kinds: tuple[str, ...], neuron_group_size: int | None) -> list[TrainHook]:
    """One `BranchMovementHook` over list_branches(model, kinds, neuron_group_size)."""
    return [BranchMovementHook(model, target, total_steps, kinds, neuron_group_size, cfg)]


def scores(model: nn.Module, hooks: Sequence[TrainHook], calib: list[dict], kinds: tuple[str, ...],
           neuron_group_size: int | None) -> dict[str, float]:
    """The learned score of every branch (lower = removed first); calib is not needed."""
    hook = next((h for h in hooks if isinstance(h, BranchMovementHook)), None)
    if hook is None:
        raise ValueError("movement-structured scores come from its training hook; none among the hooks given")
    wanted = [b.name for b in list_branches(model, kinds, neuron_group_size)]
    if wanted != hook.names:
        raise ValueError("the branches asked for differ from those the scores were learned on (kinds "
                         f"{tuple(kinds)} / group size {neuron_group_size} vs {hook.kinds} / {hook.neuron_group_size})")
    return hook.score_dict()


def before_removal(model: nn.Module, hooks: Sequence[TrainHook]) -> None:
    """Gates back to None: the model computes unmasked until the recipe removes the selected branches."""
    clear_gates(model)


__all__ = ["BranchMovementHook", "Config", "DESCRIPTION", "STRUCTURED", "USES_DISTILLATION", "before_removal",
           "scores", "training_hooks"]
