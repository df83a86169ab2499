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
from ..pruning.branches import branch_params, check_kinds
from .norms import batch_sq_norms

_EPS = 1e-20


def identity_prior(model: nn.Module, traces: Sequence[LayerTrace], attention_mask: Tensor | None,
                   kinds: Iterable[str] = ("head", "ffn"), weights: None | str | Mapping[str, float] = None,
                   neuron_group_size: int | None = None) -> Tensor:
    """R = sum_m w_m ||f_m|| over this batch (a scalar tensor, differentiable; multiply by lambda yourself).

    traces: the list filled by model(..., trace=[]) on this batch; attention_mask: its (batch, seq) mask
    (padding tokens are excluded from the token mean). kinds: which branches are penalised.
    """
    kinds = check_kinds(kinds, neuron_group_size)
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


__all__ = ["identity_prior"]
