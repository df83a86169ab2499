"""Checks of the part "keep_heads": `minisnip.model.Attention.keep_heads`, physical removal of heads."""

from __future__ import annotations

import torch
from torch import nn

from ._common import check_equal, check_tensor, random_state, seeded, small_batch, small_config, small_model

KEEPS = ([0, 2], [3, 1], [1], [0, 1, 2, 3])
GATE = [0.5, 1.0, 2.0, 0.25]


def _block(state):
    from minisnip.model import Attention
    block = Attention(small_config(), heads=[0, 1, 2, 3]).eval()
    block.load_state_dict(state)
    return block


def _weights(block) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in (("qkv.weight", block.qkv.weight), ("qkv.bias", block.qkv.bias),
                                               ("out.weight", block.out.weight), ("out.bias", block.out.bias))}


def make_cases() -> dict:
    from minisnip.model import Attention
    state = random_state(Attention(small_config(), heads=[0, 1, 2, 3]), seed=2)
    cases = []
    for keep in KEEPS:
        block = _block(state)
        block.keep_heads(list(keep))
        cases.append({"keep": list(keep), "weights": _weights(block), "heads": list(block.heads)})
    gated = _block(state)
    gated.head_gate = torch.tensor(GATE)
    gated.keep_heads([1, 3])
    x = torch.randn(2, 5, 16, generator=seeded(3))
    return {"state": state, "x": x, "cases": cases, "gate_after": gated.head_gate.clone(),
            "model": random_state(small_model(seed=4), seed=4)}


def test_weights_match_reference(data):
    for c in data["cases"]:
        block = _block(data["state"])
        block.keep_heads(list(c["keep"]))
        for name, want in c["weights"].items():
            module, attr = name.split(".")
            check_tensor(f"keep_heads({c['keep']}): {name}", getattr(getattr(block, module), attr), want,
                         rtol=0, atol=0)


def test_heads_and_shapes(data):
    for c in data["cases"]:
        block = _block(data["state"])
        block.keep_heads(list(c["keep"]))
        n, d = len(c["keep"]), block.head_dim
        check_equal(f"keep_heads({c['keep']}): heads", list(block.heads), c["heads"])
        check_equal(f"keep_heads({c['keep']}): qkv (in, out) features", (block.qkv.in_features, block.qkv.out_features),
                    (16, 3 * n * d))
        check_equal(f"keep_heads({c['keep']}): out (in, out) features", (block.out.in_features, block.out.out_features),
                    (n * d, 16))


def test_smaller_block_equals_gated_block(data):
    """Removing heads computes what the whole block computes with the removed heads' gates at 0."""
    x = data["x"]
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    mask[1, ..., 3:] = False
    for keep in KEEPS:
        gated = _block(data["state"])
        gated.head_gate = torch.tensor([1.0 if h in keep else 0.0 for h in range(4)])
        small = _block(data["state"])
        small.keep_heads(list(keep))
        with torch.no_grad():
            check_tensor(f"keep_heads({keep}) output vs the gated block", small(x, mask), gated(x, mask),
                         rtol=1e-5, atol=1e-6)


def test_head_gate_is_carried(data):
    block = _block(data["state"])
    block.head_gate = torch.tensor(GATE)
    block.keep_heads([1, 3])
    if block.head_gate is None:
        raise AssertionError("keep_heads([1, 3]) dropped the head gate")
    check_tensor("keep_heads([1, 3]): head_gate", block.head_gate, data["gate_after"], rtol=0, atol=0)


def test_new_layers_are_trainable_linears(data):
    block = _block(data["state"])
    block.keep_heads([2, 0])
    for name in ("qkv", "out"):
        layer = getattr(block, name)
        if not isinstance(layer, nn.Linear):
            raise AssertionError(f"keep_heads: {name} must stay an nn.Linear, got {type(layer).__name__}")
        if not (layer.weight.requires_grad and layer.bias is not None and layer.bias.requires_grad):
            raise AssertionError(f"keep_heads: {name}'s weight and bias must still require gradients")
    block(data["x"]).sum().backward()
    if block.qkv.weight.grad is None or block.out.weight.grad is None:
        raise AssertionError("keep_heads: no gradient reaches the new qkv / out weights")


def test_prune_heads_on_a_model(data):
    from minisnip.surgery import prune_heads
    batch = small_batch(seed=6, b=3, s=7, pad={1: 4})
    gated = small_model(data["model"])
    gated.layers[0].attention.head_gate = torch.tensor([1.0, 0.0, 1.0, 0.0])
    gated.layers[1].attention.head_gate = torch.tensor([1.0, 1.0, 1.0, 0.0])
    pruned = small_model(data["model"])
    prune_heads(pruned, {0: [1, 3], 1: [3]})
    check_equal("prune_heads: layer heads in the config", [l.heads for l in pruned.config.layers], [[0, 2], [0, 1, 2]])
    with torch.no_grad():
        check_tensor("prune_heads: model output vs the gated model", pruned(**batch), gated(**batch),
                     rtol=1e-5, atol=1e-5)
