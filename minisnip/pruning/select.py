"""Choosing branches by a score: the thresholding operator, and the same operator run to a target compression.

SNIP (Lin et al. 2020): after training with the identity prior, "find and drop unimportant non-linear
mappings [...] by a thresholding operator on the function norm": every branch m with ||f_m|| < tau is
removed. The other structured methods use the same two selections with their own scores (lower = less
important = removed first):

* `select_below_threshold(scores, tau)`: the operator itself;
* `select_for_target(branches, scores, target, model=...)`: the same operator with tau chosen so that a given
  share of the dense encoder is removed (how results at "50% compression" are reported). Taking branches
  in ascending order of score until the target is met is exactly thresholding at a tau just above the last
  branch taken.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

from torch import nn

from ..surgery import PruningError, encoder_of
from .branches import Branch
from .compression import COMPRESSION_DEFINITION, dense_encoder_linear_params, encoder_linear_params
from .removal import RemovalPlan


def _check_score(name: str, value: float) -> float:
    v = float(value)
    if math.isnan(v):
        raise ValueError(f"the score of {name} is NaN")
    return v


def select_below_threshold(scores: Mapping[str, float], tau: float) -> list[str]:
    """The thresholding operator: names of all branches with score (SNIP: ||f_m||) < tau, in the order of `scores`.

    tau must be a finite number >= 0 (tau = 0 selects nothing).
    """
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau < 0:
        raise ValueError(f"threshold tau must be a finite number >= 0, got tau={tau!r}")
    # BEGIN SOLUTION
    return [n for n, v in scores.items() if _check_score(n, v) < tau]
    # END SOLUTION


def select_for_target(branches: Sequence[Branch], scores: Mapping[str, float], target: float,
                      per_param: bool = False, *, model: nn.Module, allow_empty: bool = False) -> list[str]:
    """Branches to remove so that compression >= target, smallest score (SNIP: function norm) first.

    Compression is the share of encoder linear-layer weights removed (embeddings and classifier excluded),
    relative to the dense model of `model`'s config; weights an earlier pruning removed already count.
    Candidates are `branches` (from `list_branches(model, ...)`, any kinds), sorted by score ascending
    (per_param=True: by score / params_m). They are taken one by one until the target is met, so the
    overshoot is smaller than the parameters of the last branch taken; a candidate already covered (a head
    whose block was taken) adds nothing and is skipped. Returns canonical names (`canonical_names`): all heads
    of a layer become its attention block, all neuron groups its FFN block. [] if the model is already
    compressed that far.

    target must lie in (0, 1); target 1 (remove everything) only with allow_empty=True. ValueError when the
    candidates cannot reach the target; PruningError when reaching it would leave no block at all (unless
    allow_empty).
    """
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target):
        raise ValueError(f"target must be a number in (0, 1), got target={target!r}")
    if not (0 < target < 1 or (target == 1 and allow_empty)):
        raise ValueError(f"target must lie in (0, 1) (a share of the dense encoder's linear-layer weights), got "
                         f"target={target}" + ("; target=1 removes everything: pass allow_empty=True"
                                               if target == 1 else ""))
    enc = encoder_of(model)
    dense = dense_encoder_linear_params(enc.config)
    missing = [b.name for b in branches if b.name not in scores]
    if missing:
        raise ValueError(f"no score for {len(missing)} branches, e.g. {missing[:5]}")
    score = {b.name: _check_score(b.name, scores[b.name]) / (b.params if per_param else 1) for b in branches}
    removed = dense - encoder_linear_params(enc)
    need = target * dense
    if removed >= need - 1e-9:
        return []
    plan = RemovalPlan(enc)
    # BEGIN SOLUTION
    order = sorted(branches, key=lambda b: score[b.name])
    per_layer = [0] * len(enc.layers)
    for b in order:
        layer = plan.add(b)
        now = plan.removed_params(layer)
        removed += now - per_layer[layer]
        per_layer[layer] = now
        if removed >= need - 1e-9:
            if not allow_empty and not plan.leaves_something():
                raise PruningError(f"reaching target {target} removes every attention and feed-forward block; "
                                   "pass allow_empty=True if that is really meant")
            return plan.names()
    # END SOLUTION
    raise ValueError(f"target {target} cannot be reached with these {len(branches)} candidates: removing all of "
                     f"them gives compression {removed / dense:.4f} ({COMPRESSION_DEFINITION})")


def removed_by(branches: Sequence[Branch], names: Iterable[str]) -> list[bool]:
    """Per branch of `branches`, whether removing `names` removes it: its own name is among them, or its block's
    (a selection's canonical names stand for all of a block's heads or neuron groups)."""
    gone = set(names)
    return [b.name in gone or b.parent in gone for b in branches]


__all__ = ["removed_by", "select_below_threshold", "select_for_target"]
