"""Checks of the part "function_norms": `minisnip.snip.norms.function_norms` over a calibration set."""

from __future__ import annotations

import math

import torch

from ._common import check_equal, random_state, small_batch, small_model

CASES = ({"kinds": ("head", "attention", "ffn")},
         {"kinds": ("neurons", "ffn"), "neuron_group_size": 8},
         {"kinds": ("head", "ffn"), "param_weighted": True})


def _batches() -> list[dict]:
    # different numbers of real tokens per batch: a mean of per-batch means would differ from the set's mean
    return [small_batch(seed=1, b=3, s=8, pad={1: 5, 2: 2}), small_batch(seed=2, b=2, s=6, pad={0: 6})]


def _merged(batches: list[dict]) -> dict:
    """The same rows as one batch, padded to the longest."""
    s = max(b["input_ids"].shape[1] for b in batches)
    pad = lambda t: torch.nn.functional.pad(t, (0, s - t.shape[1]))  # noqa: E731
    return {k: torch.cat([pad(b[k]) for b in batches]) for k in ("input_ids", "attention_mask")}


def _check_norms(name: str, got, want: dict[str, float], rtol: float = 1e-6) -> None:
    if not isinstance(got, dict):
        raise AssertionError(f"{name}: expected a dict of branch name -> norm, got {type(got).__name__}")
    check_equal(f"{name}: branch names", list(got), list(want))
    for k, w in want.items():
        g = got[k]
        if not isinstance(g, float):
            raise AssertionError(f"{name}: the norm of {k} should be a Python float, got {type(g).__name__}")
        if not math.isclose(g, w, rel_tol=rtol, abs_tol=1e-9):
            raise AssertionError(f"{name}: norm of {k} is {g:.6g}, expected {w:.6g}")


def make_cases() -> dict:
    from minisnip.snip.norms import function_norms
    state = random_state(small_model(seed=5), seed=5)
    batches = _batches()
    model = small_model(state)
    return {"state": state, "batches": batches,
            "expected": [function_norms(model, batches, **case) for case in CASES]}


def test_matches_reference(data):
    from minisnip.snip.norms import function_norms
    model = small_model(data["state"])
    for case, want in zip(CASES, data["expected"]):
        _check_norms(f"function_norms({case})", function_norms(model, data["batches"], **case), want)


def test_one_mean_over_the_whole_set(data):
    from minisnip.snip.norms import function_norms
    model = small_model(data["state"])
    split = function_norms(model, data["batches"])
    _check_norms("function_norms over the same tokens as one batch", function_norms(model, [_merged(data["batches"])]),
                 split, rtol=1e-5)


def test_padding_does_not_count(data):
    from minisnip.snip.norms import function_norms
    model = small_model(data["state"])
    padded = [{k: torch.nn.functional.pad(t, (0, 5)) for k, t in b.items()} for b in data["batches"]]
    _check_norms("function_norms with five more padding positions", function_norms(model, padded),
                 function_norms(model, data["batches"]), rtol=1e-5)


def test_gated_head_has_norm_zero(data):
    from minisnip.snip.norms import function_norms
    model = small_model(data["state"])
    model.layers[1].attention.head_gate = torch.tensor([1.0, 0.0, 1.0, 1.0])
    norms = function_norms(model, data["batches"], kinds=("head",))
    if norms.get("layer1.head1") != 0.0 or min(v for k, v in norms.items() if k != "layer1.head1") <= 0:
        raise AssertionError(f"function_norms: a head gated to 0 must have norm exactly 0, the others > 0; got {norms}")


def test_scaling_a_branch_scales_its_norm(data):
    from minisnip.snip.norms import function_norms
    model = small_model(data["state"])
    before = function_norms(model, data["batches"], kinds=("attention", "ffn"))
    with torch.no_grad():
        model.layers[0].ffn.down.weight.mul_(-3.0)
        model.layers[0].ffn.down.bias.mul_(-3.0)
    after = function_norms(model, data["batches"], kinds=("attention", "ffn"))
    if not math.isclose(after["layer0.ffn"], 3.0 * before["layer0.ffn"], rel_tol=1e-5):
        raise AssertionError(f"function_norms: multiplying layer 0's FFN output by -3 should multiply its norm by 3: "
                             f"{before['layer0.ffn']:.6g} -> {after['layer0.ffn']:.6g}")


def test_training_mode_gives_eval_norms_and_stays(data):
    from minisnip.snip.norms import function_norms
    model = small_model(data["state"], hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    want = function_norms(model, data["batches"])
    model.train()
    got = function_norms(model, data["batches"])
    if not model.training:
        raise AssertionError("function_norms must put the model back in training mode")
    _check_norms("function_norms of a model in training mode (dropout must be off)", got, want, rtol=1e-6)
