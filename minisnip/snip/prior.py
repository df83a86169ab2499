"""The identity prior: a penalty that pushes residual branches toward the identity mapping.

Paper (Lin et al. 2020, Sec. 3), in words: instead of pushing single weights to zero, push a whole residual
module toward the identity mapping, then drop the modules whose function norm falls under a threshold.
For a residual sum x + f_m(x), "f_m is the identity of the sum" means f_m(x) = 0 for all x; under BERT's
post-LN this leaves LN(x), which is exactly what a removed branch computes (see `minisnip.model`).

Reconstruction used here (the paper publishes no formula): the prior is a group lasso on functions,

    R = sum_m w_m ||f_m||,      ||f_m|| = sqrt( mean over the batch's real tokens of ||f_m(x_t)||^2 ),

with the function norm of `minisnip.snip.norms`. The training loss is L_task + lambda * R; the caller
multiplies by lambda.

Why the norm and not its square: the squared norm is smooth at 0 and its gradient 2 f_m vanishes as f_m
shrinks, so an L2-type prior (like weight decay) makes branches small but never zero. The plain norm has a
gradient of constant size f_m / ||f_m|| however small f_m is, and a kink at 0; like the group lasso (Yuan &
Lin 2006) it sets whole groups exactly to zero output, which is what lets a thresholding operator remove
them with (almost) no change to the network. At exactly zero, sqrt has no derivative: the norm is taken as
sqrt(max(mean, 1e-20)), whose gradient is 0 there (the minimum-norm subgradient), so a gated or dead branch
yields a finite (zero) gradient instead of NaN.

Weights w_m:
    None      every branch weighs 1;
    "params"  w_m proportional to the parameters the branch owns, normalised to mean 1 over the penalised
              branches (so lambda keeps its scale): a branch is pushed in proportion to what removing it saves,
              e.g. an FFN block of BERT-base (4.7 M) harder than an attention block (2.4 M);
    dict      {name: weight} for every penalised branch (extra names, e.g. of pruned branches, are ignored).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..model import LayerTrace
from ..train import StepContext, TrainHook
from ..pruning.branches import DEFAULT_KINDS, branch_params, resolve_kinds
from .norms import batch_sq_norms

_EPS = 1e-20


def identity_prior(model: nn.Module, traces: Sequence[LayerTrace], attention_mask: Tensor | None,
                   kinds: Iterable[str] = DEFAULT_KINDS, weights: None | str | Mapping[str, float] = None,
                   neuron_group_size: int | None = None) -> Tensor:
    """R = sum_m w_m ||f_m|| over this batch (a scalar tensor, differentiable; multiply by lambda yourself).

    traces: the list filled by model(..., trace=[]) on this batch; attention_mask: its (batch, seq) mask
    (padding tokens are excluded from the token mean). kinds: which branches are penalised.
    """
    kinds, neuron_group_size = resolve_kinds(model, kinds, neuron_group_size)
    names, sums, count = batch_sq_norms(model, traces, attention_mask, kinds, neuron_group_size)
    if not names:
        return sums.new_zeros(())
    w = _weights(model, names, kinds, weights, neuron_group_size)
    # BEGIN SOLUTION
    norms = (sums / count.clamp_min(1).to(sums.dtype)).clamp_min(_EPS).sqrt()
    if w is None:
        return norms.sum()
    return (norms * w.to(device=norms.device, dtype=norms.dtype)).sum()
    # END SOLUTION


def _weights(model: nn.Module, names: list[str], kinds: tuple[str, ...], weights, neuron_group_size) -> Tensor | None:
    if weights is None:
        return None
    if isinstance(weights, str):
        if weights != "params":
            raise ValueError(f"weights must be None, 'params' or a dict of name -> weight, got {weights!r}")
        params = branch_params(model, kinds, neuron_group_size)
        p = torch.tensor([float(params[n]) for n in names], dtype=torch.float64)
        return p / p.mean()
    if isinstance(weights, Mapping):
        missing = [n for n in names if n not in weights]
        if missing:
            raise ValueError(f"weights has no entry for {len(missing)} penalised branches, e.g. {missing[:5]}")
        w = torch.tensor([float(weights[n]) for n in names], dtype=torch.float64)
        if not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError("prior weights must be finite and >= 0")
        return w
    raise ValueError(f"weights must be None, 'params' or a dict of name -> weight, got {type(weights).__name__}")


class PriorPenalty(TrainHook):
    """The identity prior as a training term: λ_t Σ_m w_m ||f_m|| on each batch (`identity_prior`).

    λ_t ramps linearly from 0 to λ over the first `warmup_steps` steps (then stays at λ): at step 0 the
    classifier head is random, the task gradient reaching the encoder is weak, and a full-strength prior
    would shrink every branch before the task has said which ones it needs (measured: λ = 1e-3 from step 0
    leaves MiniLM at chance on SST-2; docs/snip.md). `step` counts the calls so far; it is the only state.
    """

    needs_traces = True

    def __init__(self, lam: float, kinds: Iterable[str], neuron_group_size: int | None,
                 weights: None | str | Mapping[str, float] = "params", warmup_steps: int = 0) -> None:
        self.lam, self.kinds, self.neuron_group_size, self.weights = lam, tuple(kinds), neuron_group_size, weights
        self.warmup_steps, self.step = max(0, warmup_steps), 0

    def strength(self) -> float:
        """λ_t for the current step."""
        if self.step >= self.warmup_steps:
            return self.lam
        return self.lam * (self.step + 1) / (self.warmup_steps + 1)

    def __call__(self, model: nn.Module, traces: Sequence[LayerTrace], mask: Tensor | None) -> Tensor:
        """λ_t R on one batch's traces; advances the step."""
        lam = self.strength()
        self.step += 1
        return lam * identity_prior(model, traces, mask, self.kinds, self.weights, self.neuron_group_size)

    def loss(self, ctx: StepContext) -> Tensor:
        return self(ctx.model, ctx.traces, ctx.mask)


__all__ = ["PriorPenalty", "identity_prior"]
