"""SNIP's thresholding operator applied gradually while fine-tuning (minisnip's option, not the paper's).

The paper thresholds once, after fine-tuning with the identity prior (Lin et al. 2020, Sec. 3): the branches
whose function norm is smallest go, and the pruned model is fine-tuned again. At a high target that one cut
costs much before recovery (docs/snip.md), while the baselines that train toward their target (L0 gates,
structured movement) lose little to theirs. `GradualThreshold` gives SNIP the same schedule, with SNIP's own
score:

    s_t = the cubic schedule of gradual pruning (`pruning.schedule.cubic_sparsity`), from 0 after the prior's
          warm-up to the target at the start of the cool-down (the last COOLDOWN of the steps);
    every EVERY steps:  the running norms ||f_m|| (`norms.NormEMA`, decay DECAY, from the step's own traces)
          -> M_t = `select_for_target`(branches, running norms, s_t): the thresholding operator at s_t;
    from the next step on:  g_m = 0 for m in M_t, 1 otherwise, through the model's gates (`pruning.gates.GateLayout`).

A masked branch outputs 0: the identity of its residual sum, as if removed (the task gradient no longer
reaches its weights, and the prior, whose norm is 0 there, pushes it no further). Its running norm decays
toward 0, so it stays masked unless a kept branch falls below it. At the end the mask is at the target and
`scores` returns the running norms it was chosen from, so the recipe's cut at the target removes exactly the
masked branches: the model before recovery is the one fine-tuning ended with.

The price: one fine-tune per target (the study's `per_target`), and the last epoch is kept, not the best one
(`Config.scheduled`). What it measured: docs/snip.md, "A gradual cut".
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from ..pruning.branches import list_branches, resolve_kinds
from ..pruning.gates import GateLayout, clear_gates
from ..pruning.schedule import cubic_sparsity, schedule_steps
from ..pruning.select import removed_by, select_for_target
from ..train import StepContext, TrainHook
from .norms import NormEMA


class GradualThreshold(TrainHook):
    """Masks the branches with the smallest running function norms on the cubic schedule (see the module doc)."""

    needs_traces = True
    packed_traces = True  # NormEMA sums over real tokens
    cls_traces = True
    EVERY = 10  # steps between two updates of the running norms and two choices of the mask
    DECAY = 0.8  # memory of the running norms, in samples (one every EVERY steps), as the targeted prior's
    COOLDOWN = 0.2  # share of the steps at the target before fine-tuning ends

    def __init__(self, model: nn.Module, target: float, total_steps: int, kinds: Iterable[str],
                 neuron_group_size: int | None, start: float = 0.5):
        if not (isinstance(target, (int, float)) and not isinstance(target, bool) and 0 < target < 1):
            raise ValueError(f"target must be a compression in (0, 1), got {target!r}")
        if not (isinstance(start, (int, float)) and 0 <= start <= 1 - self.COOLDOWN):
            raise ValueError(f"start must be a share of the steps in [0, {1 - self.COOLDOWN}] (the last "
                             f"{self.COOLDOWN} are the cool-down), got {start!r}")
        self.model, self.target, self.total_steps = model, float(target), total_steps
        self.kinds, self.neuron_group_size = resolve_kinds(model, kinds, neuron_group_size)
        self.branches = list_branches(model, self.kinds, self.neuron_group_size)
        self.layout = GateLayout(model, self.branches)
        self.warmup_steps, self.cooldown_steps = schedule_steps(total_steps, start, self.COOLDOWN)
        self._norms = NormEMA(self.kinds, self.DECAY, self.neuron_group_size)
        self.chosen_from: dict[str, float] = {}  # the running norms the current mask was chosen from
        device = next(model.parameters()).device
        self.keep = torch.ones(len(self.branches), dtype=torch.bool, device=device)
        self.current = 0.0  # the compression the mask was chosen for

    def scheduled(self, step: int) -> float:
        return cubic_sparsity(step, self.total_steps, self.target, 0.0, self.warmup_steps, self.cooldown_steps)

    @torch.no_grad()
    def mask_for(self, share: float, scores: dict[str, float]) -> Tensor:
        """Keep mask (one bool per branch): the thresholding operator at compression `share` on `scores`."""
        gone = select_for_target(self.branches, scores, share, model=self.model) if share > 0 else []
        return ~torch.tensor(removed_by(self.branches, gone), dtype=torch.bool, device=self.keep.device)

    def loss(self, ctx: StepContext) -> Tensor | None:
        """Reads this step's traces (adds nothing to the loss): every EVERY steps, and when the schedule first
        reaches the target, fold them into the running norms and choose the mask for the next step."""
        share = self.scheduled(ctx.step + 1)
        if ctx.step % self.EVERY and not (share == self.target and self.current != self.target):
            return None
        self._norms.update(ctx.traces, ctx.mask, ctx.model)
        if share > 0:
            self.chosen_from = self._norms.norms()
            self.keep, self.current = self.mask_for(share, self.chosen_from), share
            # from the next forward on (this step's graph holds the gate values its forward used)
            self.layout.apply(self.model, self.keep.to(next(self.model.parameters()).dtype))
        return None

    def epoch_log(self) -> dict:
        return {"branches_masked": int((~self.keep).sum()), "scheduled_compression": self.current}

    def scores(self) -> dict[str, float]:
        """The running norms the final mask was chosen from: thresholding them at the target gives the mask."""
        if self.current != self.target:
            raise ValueError(f"the gradual cut ended at compression {self.current}, not at its target "
                             f"{self.target}: fine-tuning stopped before its schedule did")
        return dict(self.chosen_from)

    def clear(self) -> None:
        """Gates back to None: the model computes unmasked until the recipe removes the masked branches."""
        clear_gates(self.model)


__all__ = ["GradualThreshold"]
