"""Knowledge distillation from a fine-tuned teacher during pruning (Hinton, Vinyals & Dean 2015).

Hinton et al., "Distilling the Knowledge in a Neural Network" (arXiv 1503.02531): the student matches the
teacher's class probabilities softened by a temperature T,

    p_i = exp(z_i / T) / sum_j exp(z_j / T)

and "since the magnitudes of the gradients produced by the soft targets scale as 1/T^2 it is important to
multiply them by T^2", so that changing T leaves the relative weight of hard and soft targets alone:

    L_KD = T^2 * KL( softmax(z_teacher / T) || softmax(z_student / T) ),  averaged over the batch
                                                                            (`distillation_loss`)

For a regression task (STS-B, one output) there is no distribution to soften: L_KD is the mean squared error
to the teacher's prediction. Optionally the student's layer outputs also match the teacher's,

    L_hidden = mean over layers l of  mean over real tokens t and features k of (y_l,t,k^S - y_l,t,k^T)^2
                                                                            (`hidden_distillation_loss`)

(the intermediate-layer matching of TinyBERT-style distillation; off by default). A layer of a pruned student
may lack its attention or FFN block, but it always has an output y (`LayerTrace.y`), so layers are compared
by their outputs.

How the terms are combined. Hinton et al. and Sanh et al. (Movement Pruning, NeurIPS 2020) take a weighted
average (1 - α) L_task + α L_KD. `fit` adds every hook's term to the task loss, so here

    L = L_task + α (L_KD + β L_hidden)          α = `DistillConfig.alpha`, β = `DistillConfig.hidden_weight`

which is the weighted average scaled by 1 / (1 - α) with α' = α / (1 - α): Sanh et al.'s α = 0.9 is alpha = 9
here with a 10x smaller learning rate. The default alpha = 1 weighs task and soft targets equally
(reconstructed; no paper fixes it for our setting).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..train import StepContext, TrainHook


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
                      regression: bool = False) -> Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch; MSE(s, t) when `regression`.

    Logits are (batch, classes); the teacher's carry no gradient (detached here). Computed in float32."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    # BEGIN SOLUTION
    s, t = student_logits.float(), teacher_logits.detach().float()
    if regression:
        return F.mse_loss(s, t)
    T = float(temperature)
    kl = F.kl_div(F.log_softmax(s / T, dim=-1), F.log_softmax(t / T, dim=-1), log_target=True,
                  reduction="batchmean")
    return T * T * kl
    # END SOLUTION


def hidden_distillation_loss(student_hidden: Sequence[Tensor] | Tensor, teacher_hidden: Sequence[Tensor] | Tensor,
                             mask: Tensor) -> Tensor:
    """Mean squared difference of layer outputs over the real tokens, averaged over layers.

    student_hidden / teacher_hidden: one (batch, seq, hidden) tensor per layer (or a single tensor);
    mask: (batch, seq), 1 for real tokens (padded positions are ignored)."""
    if isinstance(student_hidden, Tensor):
        student_hidden, teacher_hidden = [student_hidden], [teacher_hidden]
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise ValueError(f"need as many student as teacher layers (at least one), got {len(student_hidden)} "
                         f"and {len(teacher_hidden)}")
    real = mask.bool()
    terms = []
    for s, t in zip(student_hidden, teacher_hidden):
        diff = s.float()[real] - t.detach().float()[real]  # (real tokens, hidden)
        terms.append(diff.pow(2).mean())
    return torch.stack(terms).mean()


@dataclass
class DistillConfig:
    """temperature T (Hinton et al.'s softening; 2.0), alpha (weight of the distillation term added to the
    task loss), hidden_weight (β, weight of the layer-output term inside it; 0 = off)."""

    temperature: float = 2.0
    alpha: float = 1.0
    hidden_weight: float = 0.0

    def __post_init__(self) -> None:
        for name, low_open in (("temperature", True), ("alpha", False), ("hidden_weight", False)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or (v <= 0 if low_open else v < 0):
                raise ValueError(f"{name} must be a finite number {'> 0' if low_open else '>= 0'}, "
                                 f"got {name}={v!r}")


class DistillHook(TrainHook):
    """Adds α (L_KD + β L_hidden) against `teacher` (a fine-tuned BertForSequenceClassification) to every step.

    The teacher runs in eval mode under no_grad on the batch of the step, on the student's device (moved
    there on first use), inside the same autocast as the student. With hidden_weight > 0 the hook asks fit
    for the student's layer traces and runs the teacher with its own trace."""

    def __init__(self, teacher: nn.Module, cfg: DistillConfig | None = None):
        self.teacher = teacher
        self.cfg = cfg if cfg is not None else DistillConfig()
        self.needs_traces = self.cfg.hidden_weight > 0
        self.regression = bool(getattr(teacher, "is_regression", False))
        for p in teacher.parameters():
            p.requires_grad_(False)
        self._kd_sum, self._n = 0.0, 0

    def loss(self, ctx: StepContext) -> Tensor:
        b = ctx.batch
        device = b["input_ids"].device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        self.teacher.eval()
        trace = [] if self.needs_traces else None
        with torch.no_grad():
            t_logits = self.teacher(b["input_ids"], b["attention_mask"], b["token_type_ids"], trace,
                                    checked=ctx.checked)  # the student's host checks: the same batch
        kd = distillation_loss(ctx.logits, t_logits, self.cfg.temperature, self.regression)
        self._kd_sum, self._n = self._kd_sum + kd.detach().float(), self._n + 1  # on the device: read per epoch
        if self.needs_traces:
            if ctx.traces is None or len(ctx.traces) != len(trace):
                raise RuntimeError("hidden distillation needs one student LayerTrace per teacher layer "
                                   f"(got {None if ctx.traces is None else len(ctx.traces)}, teacher {len(trace)})")
            kd = kd + self.cfg.hidden_weight * hidden_distillation_loss(
                [tr.y for tr in ctx.traces], [tr.y for tr in trace], b["attention_mask"])
        # a mean over this batch's examples: distributed, scaled by the rank's share of the global batch
        return self.cfg.alpha * kd if ctx.share == 1 else self.cfg.alpha * kd * ctx.share

    def epoch_log(self) -> dict:
        out = {"distill_kd": float(self._kd_sum) / self._n} if self._n else {}
        self._kd_sum, self._n = 0.0, 0
        return out


__all__ = ["DistillConfig", "DistillHook", "distillation_loss", "hidden_distillation_loss"]
