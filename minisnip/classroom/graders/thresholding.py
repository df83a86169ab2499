"""Checks of the part "thresholding": `select_below_threshold` and `select_for_target` in minisnip.pruning.select."""

from __future__ import annotations

import copy

import torch

from ._common import check_equal, seeded, small_model

TARGETS = (0.1, 0.3, 0.55)
KINDS = (("head", "ffn"), ("head", "attention", "neurons", "ffn"))
GROUP = 8


def _scores(branches, seed: int) -> dict[str, float]:
    g = seeded(seed)
    return {b.name: float(torch.rand((), generator=g)) for b in branches}


def _below_cases() -> list[dict]:
    scores = {"layer0.head0": 0.4, "layer0.head3": 0.1, "layer1.ffn": 0.3, "layer0.ffn": 0.25, "layer1.head2": 0.7}
    return [{"scores": scores, "tau": tau} for tau in (0.0, 0.1, 0.26, 0.3, 0.5, 1.0)]


def _target_cases() -> list[dict]:
    from minisnip.pruning import list_branches
    model = small_model(seed=0)
    cases = []
    for i, kinds in enumerate(KINDS):
        size = GROUP if "neurons" in kinds else None
        branches = list_branches(model, kinds, neuron_group_size=size)
        scores = _scores(branches, seed=20 + i)
        for target in TARGETS:
            for per_param in (False, True):
                cases.append({"kinds": kinds, "size": size, "scores": scores, "target": target, "per_param": per_param})
    return cases


def _select(case: dict) -> list[str]:
    from minisnip.pruning import list_branches, select_for_target
    model = small_model(seed=0)
    branches = list_branches(model, case["kinds"], neuron_group_size=case["size"])
    return select_for_target(branches, case["scores"], case["target"], per_param=case["per_param"], model=model)


def make_cases() -> dict:
    from minisnip.pruning import select_below_threshold
    below = [{**c, "expected": select_below_threshold(c["scores"], c["tau"])} for c in _below_cases()]
    target = [{**c, "expected": _select(c)} for c in _target_cases()]
    return {"below": below, "target": target}


def test_below_threshold_matches_reference(data):
    from minisnip.pruning import select_below_threshold
    for c in data["below"]:
        check_equal(f"select_below_threshold(tau={c['tau']})", select_below_threshold(c["scores"], c["tau"]),
                    c["expected"])


def test_below_threshold_is_strict_and_keeps_order(data):
    from minisnip.pruning import select_below_threshold
    scores = {"layer2.ffn": 0.2, "layer0.head1": 0.5, "layer1.head0": 0.2, "layer0.attention": 0.1}
    check_equal("select_below_threshold(tau=0.2), strictly below", select_below_threshold(scores, 0.2),
                ["layer0.attention"])
    check_equal("select_below_threshold(tau=0.3), in the order of scores", select_below_threshold(scores, 0.3),
                ["layer2.ffn", "layer1.head0", "layer0.attention"])
    check_equal("select_below_threshold(tau=0)", select_below_threshold(scores, 0), [])


def test_for_target_matches_reference(data):
    for c in data["target"]:
        what = f"select_for_target(kinds={c['kinds']}, target={c['target']}, per_param={c['per_param']})"
        check_equal(what, _select(c), c["expected"])


def test_smallest_prefix_that_reaches_the_target(data):
    """With blocks only, the selection is the k lowest-scored blocks, k the smallest count that reaches the target."""
    from minisnip.pruning import apply_pruning, compression, list_branches, select_for_target
    model = small_model(seed=0, num_hidden_layers=4)
    branches = list_branches(model, ("attention", "ffn"))
    scores = _scores(branches, seed=30)
    order = sorted(scores, key=scores.get)
    for target in (0.2, 0.45, 0.7):
        chosen = select_for_target(branches, scores, target, model=model)
        reached = []
        for k in range(1, len(order) + 1):
            pruned = copy.deepcopy(model)
            apply_pruning(pruned, order[:k])
            if compression(pruned) >= target - 1e-12:
                reached = order[:k]
                break
        check_equal(f"select_for_target(blocks only, target={target}) as a set", sorted(chosen), sorted(reached))


def test_unreachable_and_empty_targets_are_refused(data):
    from minisnip.pruning import list_branches, select_for_target
    from minisnip.surgery import PruningError
    model = small_model(seed=0)
    heads = list_branches(model, ("head",))
    try:
        select_for_target(heads, {b.name: 1.0 for b in heads}, 0.6, model=model)
    except ValueError as e:
        if isinstance(e, PruningError) or "cannot be reached" not in str(e):
            raise AssertionError(f"select_for_target: an unreachable target should raise the ValueError "
                                 f"'cannot be reached', got {type(e).__name__}: {e}") from None
    else:
        raise AssertionError("select_for_target: heads alone cannot remove 60% of the encoder; expected ValueError")
    both = list_branches(model, ("attention", "ffn"))
    try:
        select_for_target(both, {b.name: 1.0 for b in both}, 0.999, model=model)
    except PruningError:
        pass
    else:
        raise AssertionError("select_for_target(target=0.999) removes every block: expected PruningError")
    everything = select_for_target(both, {b.name: 1.0 for b in both}, 1, model=model, allow_empty=True)
    check_equal("select_for_target(target=1, allow_empty=True) as a set", sorted(everything),
                sorted(b.name for b in both))
