"""Knowledge-aware sparse pruning, "SparseBERT" (command-line name `sparsebert`).

Xu, Yen, Zhao & Xiao, "Rethinking Network Pruning -- under the Pre-train and Fine-tune Paradigm", NAACL 2021
(arXiv 2104.08682). The paper studies how knowledge is transferred and lost through pre-training,
fine-tuning and pruning. Its knowledge-aware sparse pruning prunes the *pre-trained* encoder while it is
fine-tuned on the task and distils from a fine-tuned dense BERT throughout ("pruning is performed in
parallel with distillation", Fig. 3): the fine-tuned model is the teacher, the pruned pre-trained model the
student. The weights pruned are those of the linear transformations of the self-attention and feed-forward
layers. Headline setting: 5% of those weights kept (target = 0.95), "20-times weight/FLOPs compression and
neglectable loss in prediction accuracy" (BERT-base: QNLI 90.6, MRPC 88.5, RTE 69.1, CoLA 52.1 vs dense
91.8, 88.6, 69.3, 56.3).

Here, with the shared parts:

    pruning:        gradual magnitude pruning of W_QKV, W_O, W_1, W_2 during fine-tuning, on the cubic schedule
                    (Zhu & Gupta 2017, which the paper cites): `magnitude_unstructured.GradualMagnitudeHook`,
                    imported, not copied
    distillation:   L = L_task + α T² KL(softmax(z_T/T) || softmax(z_S/T))  (+ α β L_hidden if β > 0)
                    against the fine-tuned dense teacher (`pruning.distill.DistillHook`); USES_DISTILLATION =
                    True, so the recipe always adds that hook, built from its `PruneConfig.distill`

Reconstructed (the stored descriptions of the paper we could check do not fix them): the magnitude
criterion with per-matrix ranking, the schedule's warm-up 10% / cool-down 20% and Δt = 10 (the defaults of
`magnitude_unstructured.Config`); distillation on the logits only by default (T = 2, α = 1; layer outputs
with `DistillConfig.hidden_weight` > 0), combined with the task loss as a sum (see `pruning.distill`).
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from ..train import TrainHook
from . import magnitude_unstructured

STRUCTURED = False
USES_DISTILLATION = True
SCHEDULED = True  # its masks follow a schedule over fine-tuning: the last epoch is the one at the target
DESCRIPTION = ("knowledge-aware sparse pruning (SparseBERT, Xu et al. 2021): gradual magnitude pruning of single "
               "weights during fine-tuning with distillation from the fine-tuned dense teacher; the paper's "
               "headline keeps 5% of the weights (target 0.95)")

PAPER_TARGET = 0.95
"""The paper's headline sparsity: 5% of the encoder's linear-layer weights kept."""


Config = magnitude_unstructured.Config
"""The pruning schedule's fields (scope, update_every, warmup, cooldown, initial_sparsity); the distillation's
(temperature, alpha, hidden_weight) are the recipe's `PruneConfig.distill`, which this method always uses."""


def training_hooks(model: nn.Module, cfg: Config, target: float | None, total_steps: int,
                   kinds: tuple[str, ...] = (), neuron_group_size: int | None = None) -> list[TrainHook]:
    """Gradual magnitude pruning's hook (the recipe adds the distillation hook)."""
    return magnitude_unstructured.training_hooks(model, cfg, target, total_steps, kinds, neuron_group_size)


def before_removal(model: nn.Module, hooks: Sequence[TrainHook]) -> None:
    """Exactly the target's share of the weights zero, written into the weights (magnitude_unstructured's)."""
    magnitude_unstructured.before_removal(model, hooks)


__all__ = ["Config", "DESCRIPTION", "SCHEDULED", "PAPER_TARGET", "STRUCTURED", "USES_DISTILLATION", "before_removal",
           "training_hooks"]
