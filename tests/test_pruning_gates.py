"""GateLayout: one value per branch written into the gate buffers; zero gates equal physical removal."""

from __future__ import annotations

import copy

import pytest
import torch

import minisnip
from minisnip.pruning import apply_pruning, list_branches
from minisnip.pruning.gates import GateLayout, clear_gates

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 9:] = 0
    return ids, mask


def test_zero_gates_equal_removal_of_the_same_branches(tiny_model):
    model = tiny_model(minisnip.BertForSequenceClassification)
    branches = list_branches(model, ("head", "neurons"), neuron_group_size=32)
    layout = GateLayout(model, branches)
    gone = ["layer0.head1", "layer0.head3", "layer1.neurons2", "layer1.head0", "layer0.neurons0"]
    values = torch.tensor([0.0 if b.name in gone else 1.0 for b in branches])
    ids, mask = _inputs()
    layout.apply(model, values)
    gated = model(ids, mask)
    pruned = copy.deepcopy(model)
    clear_gates(pruned)
    apply_pruning(pruned, [b for b in branches if b.name in gone])
    assert torch.allclose(gated, pruned(ids, mask), atol=1e-5)
    clear_gates(model)
    assert not torch.allclose(model(ids, mask), gated, atol=1e-4)


def test_gate_values_carry_their_gradient(tiny_model):
    model = tiny_model(minisnip.BertForSequenceClassification)
    branches = list_branches(model, ("head", "neurons", "attention", "ffn"), neuron_group_size=32)
    layout = GateLayout(model, branches)
    values = torch.ones(len(layout), requires_grad=True)
    layout.apply(model, values)
    ids, mask = _inputs()
    model(ids, mask).sum().backward()
    assert values.grad is not None and (values.grad != 0).sum() > len(layout) // 2
    with pytest.raises(ValueError, match="expected"):
        layout.apply(model, torch.ones(len(layout) + 1))
