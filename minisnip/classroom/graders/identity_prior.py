"""Checks of the part "identity_prior": `minisnip.snip.prior.identity_prior` on one batch."""

from __future__ import annotations

import math

import torch

from ._common import check_tensor, random_state, small_batch, small_model

GRADS = ("layers.0.attention.out.weight", "layers.1.attention.qkv.weight", "layers.1.ffn.down.weight")


def _weights_dict() -> dict[str, float]:
    heads = {f"layer{i}.head{h}": 0.5 + 0.25 * h + i for i in range(2) for h in range(4)}
    return {**heads, **{f"layer{i}.ffn": 2.0 - i for i in range(2)}}


CASES = ({}, {"weights": "params"}, {"weights": "dict", "kinds": ("head", "ffn")}, {"kinds": ("attention", "ffn")})


def _kwargs(case: dict) -> dict:
    kw = dict(case)
    if kw.get("weights") == "dict":
        kw["weights"] = _weights_dict()
    return kw


def _prior(model, batch, **kw):
    from minisnip.snip.prior import identity_prior
    trace: list = []
    model(batch["input_ids"], batch["attention_mask"], trace=trace)
    return identity_prior(model, trace, batch["attention_mask"], **kw)


def _value_and_grads(model, batch, **kw):
    model.zero_grad()
    r = _prior(model, batch, **kw)
    if not isinstance(r, torch.Tensor) or r.dim() != 0:
        shape = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
        raise AssertionError(f"identity_prior must return a 0-dim tensor, got {shape}")
    if not r.requires_grad:
        raise AssertionError("identity_prior's result carries no gradient (keep it differentiable)")
    r.backward()
    params = dict(model.named_parameters())
    return r.detach(), {n: params[n].grad.clone() if params[n].grad is not None else torch.zeros_like(params[n])
                        for n in GRADS}


def make_cases() -> dict:
    state = random_state(small_model(seed=7), seed=7)
    batch = small_batch(seed=8, b=3, s=7, pad={1: 4, 2: 2})
    expected = []
    for case in CASES:
        value, grads = _value_and_grads(small_model(state), batch, **_kwargs(case))
        expected.append({"value": value, "grads": grads})
    return {"state": state, "batch": batch, "expected": expected}


def test_value_matches_reference(data):
    for case, want in zip(CASES, data["expected"]):
        value, _ = _value_and_grads(small_model(data["state"]), data["batch"], **_kwargs(case))
        check_tensor(f"identity_prior({case or 'defaults'})", value, want["value"], rtol=1e-5, atol=1e-7)


def test_gradients_match_reference(data):
    for case, want in zip(CASES, data["expected"]):
        _, grads = _value_and_grads(small_model(data["state"]), data["batch"], **_kwargs(case))
        for name, g in grads.items():
            check_tensor(f"identity_prior({case or 'defaults'}): gradient of {name}", g, want["grads"][name],
                         rtol=1e-4, atol=1e-6)


def test_zero_branches_give_zero_and_finite_gradients(data):
    model = small_model(data["state"])
    for layer in model.layers:
        layer.attention.head_gate = torch.zeros(4)
        layer.ffn.gate = torch.zeros(())
    model.zero_grad()
    r = _prior(model, data["batch"])
    if not isinstance(r, torch.Tensor) or r.dim() != 0 or not abs(float(r.detach())) < 1e-8:
        raise AssertionError(f"identity_prior must be 0 (up to the floor) when every penalised branch outputs 0, "
                             f"got {r}")
    r.backward()
    for name, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            raise AssertionError(f"identity_prior: the gradient of {name} is not finite when the branches output 0 "
                                 "(the norm needs the floor 1e-20 under the square root)")


def test_positive_homogeneity(data):
    """Scaling every branch output in the trace by a > 0 scales R by a."""
    from dataclasses import replace

    from minisnip.snip.prior import identity_prior
    a = 2.5
    model = small_model(data["state"])
    batch = data["batch"]
    trace: list = []
    with torch.no_grad():
        model(batch["input_ids"], batch["attention_mask"], trace=trace)
        scaled = [replace(t, context=a * t.context, attention_out=a * t.attention_out, ffn_act=a * t.ffn_act,
                          ffn_out=a * t.ffn_out) for t in trace]
        for kw in ({}, {"kinds": ("attention", "ffn"), "weights": "params"}):
            before = float(identity_prior(model, trace, batch["attention_mask"], **kw))
            after = float(identity_prior(model, scaled, batch["attention_mask"], **kw))
            if not math.isclose(after, a * before, rel_tol=1e-5):
                raise AssertionError(f"identity_prior({kw or 'defaults'}): scaling the branch outputs by {a} gave R "
                                     f"{before:.6g} -> {after:.6g}, expected {a * before:.6g}")


def test_padding_does_not_count(data):
    model = small_model(data["state"])
    padded = {k: torch.nn.functional.pad(t, (0, 4)) for k, t in data["batch"].items()}
    with torch.no_grad():
        check_tensor("identity_prior with four more padding positions", _prior(model, padded),
                     _prior(model, data["batch"]), rtol=1e-5, atol=1e-7)
