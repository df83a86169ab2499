"""Gating a branch to zero and removing it compute the same function (eval mode, all-MiniLM-L6-v2).

A head gated to 0 contributes nothing through W_O, so removing its Q/K/V rows and W_O columns changes
nothing; a block gated to 0 leaves LN(x + 0) = LN(x), which is what a layer without that block computes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import minisnip
from minisnip import surgery
from minisnip.surgery import PruningError

ATOL = 1e-5
SENTENCES = ["The sailors rode the breeze clear of the rocks.",
             "A much longer sentence, which makes the batch need padding for the shorter ones.",
             "Short."]
PAIRS = ["They sailed past the rocks.", "Padding.", "A second segment of moderate length here."]


@pytest.fixture(scope="module")
def base(minilm_path):
    return minisnip.BertModel.from_pretrained(minilm_path).eval()


@pytest.fixture(scope="module")
def batch(minilm_path):
    b = minisnip.load_tokenizer(minilm_path)(SENTENCES, PAIRS)
    assert (b["attention_mask"] == 0).any()
    return b


@pytest.fixture()
def two(base):
    """Two independent copies of MiniLM: one to gate, one to prune."""
    return copy.deepcopy(base), copy.deepcopy(base)


def run(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch)


def assert_same(gated, pruned, base, batch) -> None:
    """Equal within 1e-5 on every real token. Padded positions (outputs nobody reads) are badly conditioned in
    MiniLM: there fp32 rounding alone moves them by a few 1e-5 (float64 agrees to 1e-12, see
    `test_gating_equals_removal_in_float64`), so they get a looser bound."""
    a, b, dense = run(gated, batch), run(pruned, batch), run(base, batch)
    real = batch["attention_mask"].bool()
    assert (a - b)[real].abs().max() <= ATOL
    assert (a - b).abs().max() <= 1e-4
    assert (a - dense)[real].abs().max() > 1e-2  # the pruning did change the function: the check is not vacuous


def head_gate(n: int, off) -> torch.Tensor:
    g = torch.ones(n)
    g[list(off)] = 0.0
    return g


HEAD_PLAN = {0: [0, 3, 5], 2: [1], 4: [h for h in range(12) if h != 7], 5: [11]}


def test_head_gate_equals_prune_heads(two, base, batch):
    gated, pruned = two
    for layer, hs in HEAD_PLAN.items():
        gated.layers[layer].attention.head_gate = head_gate(12, hs)
    surgery.prune_heads(pruned, HEAD_PLAN)
    assert_same(gated, pruned, base, batch)
    kept = [[h for h in range(12) if h not in HEAD_PLAN.get(i, [])] for i in range(6)]
    assert [s.heads for s in pruned.config.layers] == kept
    assert [l.attention.heads for l in pruned.layers] == kept
    assert pruned.layers[4].attention.qkv.weight.shape == (3 * 32, 384)
    assert pruned.layers[4].attention.out.weight.shape == (384, 32)
    assert pruned.layers[0].attention.qkv.bias.shape == (3 * 9 * 32,)
    n_removed = sum(map(len, HEAD_PLAN.values()))
    saved = n_removed * (3 * (384 * 32 + 32) + 384 * 32)  # Q, K, V rows with biases; W_O columns
    assert sum(p.numel() for p in base.parameters()) - sum(p.numel() for p in pruned.parameters()) == saved


def test_gating_equals_removal_in_float64(two, batch):
    """Without fp32 rounding the two are the same function to 1e-12 at every position, padding included."""
    gated, pruned = (m.double() for m in two)
    for layer, hs in HEAD_PLAN.items():
        gated.layers[layer].attention.head_gate = head_gate(12, hs).double()
    gated.layers[1].ffn.gate = torch.tensor(0.0, dtype=torch.float64)
    gated.layers[2].ffn.neuron_gate = head_gate(1536, range(0, 1536, 2)).double()
    surgery.prune_heads(pruned, HEAD_PLAN)
    surgery.remove_blocks(pruned, ffn=[1])
    surgery.prune_ffn_neurons(pruned, {2: range(0, 1536, 2)})
    a, b = run(gated, batch), run(pruned, batch)
    assert a.dtype == torch.float64 and (a - b).abs().max() <= 1e-12


def test_attention_gate_equals_remove_block(two, base, batch):
    gated, pruned = two
    for layer in (1, 4):
        gated.layers[layer].attention.gate = torch.tensor(0.0)
    surgery.remove_blocks(pruned, attention=[1, 4])
    assert_same(gated, pruned, base, batch)
    assert pruned.layers[1].attention is None and pruned.layers[4].attention is None
    assert [s.heads for s in pruned.config.layers][1] == [] and not pruned.config.layers[4].has_attention
    assert pruned.config.layers[1].ffn_dim == 1536


def test_prune_all_heads_removes_the_block(two, base, batch):
    gated, pruned = two
    gated.layers[3].attention.gate = torch.tensor(0.0)
    surgery.prune_heads(pruned, {3: range(12)})
    assert pruned.layers[3].attention is None and pruned.config.layers[3].heads == []
    assert_same(gated, pruned, base, batch)  # the output bias b_O went with the block


def test_ffn_gate_equals_remove_block(two, base, batch):
    gated, pruned = two
    for layer in (0, 5):
        gated.layers[layer].ffn.gate = torch.tensor(0.0)
    surgery.remove_blocks(pruned, ffn=[0, 5])
    assert_same(gated, pruned, base, batch)
    assert pruned.layers[0].ffn is None and pruned.layers[5].ffn is None
    assert [s.ffn_dim for s in pruned.config.layers] == [0, 1536, 1536, 1536, 1536, 0]


def test_neuron_gate_equals_prune_ffn_neurons(two, base, batch):
    gated, pruned = two
    g = torch.Generator().manual_seed(0)
    plan = {0: torch.randperm(1536, generator=g)[:1000], 3: list(range(1, 1536)), 5: [0, 10, 1535]}
    for layer, ns in plan.items():
        gated.layers[layer].ffn.neuron_gate = head_gate(1536, torch.as_tensor(ns).tolist())
    surgery.prune_ffn_neurons(pruned, plan)
    assert_same(gated, pruned, base, batch)
    assert [s.ffn_dim for s in pruned.config.layers] == [536, 1536, 1536, 1, 1536, 1533]
    assert pruned.layers[3].ffn.up.weight.shape == (1, 384) and pruned.layers[3].ffn.down.weight.shape == (384, 1)
    # the neuron left in layer 3 is neuron 0 of the original
    assert torch.equal(pruned.layers[3].ffn.up.weight[0], base.layers[3].ffn.up.weight[0])


def test_prune_all_neurons_removes_the_ffn(two, base, batch):
    gated, pruned = two
    gated.layers[2].ffn.gate = torch.tensor(0.0)
    surgery.prune_ffn_neurons(pruned, {2: torch.arange(1536)})
    assert pruned.layers[2].ffn is None and pruned.config.layers[2].ffn_dim == 0
    assert_same(gated, pruned, base, batch)


def test_gates_are_carried_through_pruning(two, base, batch):
    """Non-zero gates on the branches that stay are sliced along with the weights."""
    gated, pruned = two
    g = torch.Generator().manual_seed(1)
    hg = 0.5 + torch.rand(12, generator=g)
    hg[[2, 9]] = 0.0
    ng = 0.5 + torch.rand(1536, generator=g)
    ng[:700] = 0.0
    for m in (gated, pruned):
        m.layers[1].attention.head_gate = hg.clone()
        m.layers[1].ffn.neuron_gate = ng.clone()
    surgery.prune_heads(pruned, {1: [2, 9]})
    surgery.prune_ffn_neurons(pruned, {1: range(700)})
    assert torch.equal(pruned.layers[1].attention.head_gate, hg[hg > 0])
    assert torch.equal(pruned.layers[1].ffn.neuron_gate, ng[700:])
    assert_same(gated, pruned, base, batch)


def test_everything_at_once_on_a_classifier(minilm_path, batch):
    torch.manual_seed(0)
    base = minisnip.BertForSequenceClassification.from_pretrained(minilm_path, num_labels=3).eval()
    gated, pruned = copy.deepcopy(base), copy.deepcopy(base)
    heads, neurons = {0: [1, 2], 5: [0]}, {1: range(0, 1536, 3), 4: [7]}
    for layer, hs in heads.items():
        gated.bert.layers[layer].attention.head_gate = head_gate(12, hs)
    for layer, ns in neurons.items():
        gated.bert.layers[layer].ffn.neuron_gate = head_gate(1536, ns)
    gated.bert.layers[2].attention.gate = torch.tensor(0.0)
    gated.bert.layers[3].ffn.gate = torch.tensor(0.0)
    surgery.prune_heads(pruned, heads)
    surgery.prune_ffn_neurons(pruned, neurons)
    surgery.remove_blocks(pruned, attention=[2], ffn=[3])
    with torch.no_grad():
        a, b = gated(**batch), pruned(**batch)
    assert a.shape == (3, 3) and (a - b).abs().max() <= ATOL
    assert pruned.config is pruned.bert.config
    assert [(s.heads, s.ffn_dim) for s in pruned.config.layers] == [
        ([0] + list(range(3, 12)), 1536), (list(range(12)), 1024), ([], 1536),
        (list(range(12)), 0), (list(range(12)), 1535), (list(range(1, 12)), 1536)]


# --- what the config records, and refusals --------------------------------------------------------------------
def test_head_indices_stay_original(tiny_model):
    model = tiny_model(num_attention_heads=8)
    surgery.prune_heads(model, {0: [0, 3]})
    surgery.prune_heads(model, {0: [5], 1: [7]})
    assert model.config.layers[0].heads == [1, 2, 4, 6, 7]
    assert model.config.layers[1].heads == [0, 1, 2, 3, 4, 5, 6]
    with pytest.raises(PruningError, match=r"layer 0: heads \[3\] are not present \(present: \[1, 2, 4, 6, 7\]\)"):
        surgery.prune_heads(model, {0: [3, 4]})
    assert model.config.layers[0].heads == [1, 2, 4, 6, 7]  # a refused request changes nothing


def test_nonexistent_branches_are_named(tiny_model):
    model = tiny_model()  # 2 layers, 4 heads, 128 neurons
    with pytest.raises(PruningError, match=r"layer 2 does not exist \(the model has 2 layers\)"):
        surgery.prune_heads(model, {2: [0]})
    with pytest.raises(PruningError, match=r"layer -1 does not exist"):
        surgery.remove_blocks(model, ffn=[-1])
    with pytest.raises(PruningError, match=r"layer 5 does not exist"):
        surgery.prune_ffn_neurons(model, {5: [0]})
    with pytest.raises(PruningError, match=r"layer 0: heads \[4, 9\] are not present \(present: \[0, 1, 2, 3\]\)"):
        surgery.prune_heads(model, {0: [1, 4, 9]})
    with pytest.raises(PruningError, match=r"layer 1: neuron indices must lie in \[0, 128\), got 3\.\.128"):
        surgery.prune_ffn_neurons(model, {1: [3, 128]})
    surgery.remove_blocks(model, attention=[1])
    with pytest.raises(PruningError, match=r"layer 1: heads \[0\] are not present \(present: \[\]\)"):
        surgery.prune_heads(model, {1: [0]})
    with pytest.raises(TypeError, match="expected a minisnip BertModel or BertForSequenceClassification, got Linear"):
        surgery.prune_heads(nn.Linear(2, 2), {0: [0]})
    assert [(s.heads, s.ffn_dim) for s in model.config.layers] == [([0, 1, 2, 3], 128), ([], 128)]


def test_pruning_everything_is_refused_unless_allowed(tiny_model):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningError, match="would remove every attention and feed-forward block; pass allow_empty=True"):
        surgery.remove_blocks(model, attention=[0, 1], ffn=[0, 1])
    assert model.state_dict().keys() == before.keys() and not model.config.is_pruned
    surgery.remove_blocks(model, attention=[0, 1], ffn=[1])
    with pytest.raises(PruningError, match="would remove every"):
        surgery.prune_ffn_neurons(model, {0: range(128)})
    with pytest.raises(PruningError, match="would remove every"):
        surgery.remove_blocks(model, ffn=[0])
    assert model.layers[0].ffn is not None and model.config.layers[0].ffn_dim == 128

    surgery.prune_ffn_neurons(model, {0: range(128)}, allow_empty=True)
    assert [(s.heads, s.ffn_dim) for s in model.config.layers] == [([], 0), ([], 0)]
    # what is left is embeddings and LayerNorms: y = LN_ffn(LN_attn(x)) in every layer
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        x = model.embeddings(ids, torch.zeros_like(ids))
        for layer in model.layers:
            x = layer.ffn_norm(layer.attention_norm(x))
        assert torch.allclose(model(ids), x, atol=ATOL, rtol=0)

    heads_model = tiny_model()
    surgery.remove_blocks(heads_model, ffn=[0, 1])
    with pytest.raises(PruningError, match="would remove every"):
        surgery.prune_heads(heads_model, {0: range(4), 1: range(4)})
    surgery.prune_heads(heads_model, {0: range(4), 1: range(4)}, allow_empty=True)
    assert all(l.attention is None and l.ffn is None for l in heads_model.layers)


def test_empty_requests_change_nothing(tiny_model):
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    surgery.prune_heads(model, {0: [], 1: []})
    surgery.prune_ffn_neurons(model, {0: []})
    surgery.remove_blocks(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and not model.config.is_pruned


def _state(model) -> tuple:
    return {k: v.clone() for k, v in model.state_dict().items()}, copy.deepcopy(model.config)


def _same_state(model, state) -> bool:
    sd, config = state
    now = model.state_dict()
    return now.keys() == sd.keys() and all(torch.equal(now[k], sd[k]) for k in sd) and model.config == config


@pytest.mark.parametrize("call,message", [
    (lambda m: surgery.prune_heads(m, {0: [0, 1], 1: [1.5]}), "layer 1: head index 1.5 is not an integer"),
    (lambda m: surgery.prune_heads(m, {0: ["3"]}), "layer 0: head index '3' is not an integer"),
    (lambda m: surgery.prune_heads(m, {0: [True]}), "layer 0: head index True is not an integer"),
    (lambda m: surgery.prune_heads(m, {0: [torch.tensor(1.0)]}), "layer 0: head index tensor(1.) is not an integer"),
    (lambda m: surgery.prune_heads(m, {0: torch.tensor([0.0, 1.0])}),
     "layer 0: head indices must be integers, got a tensor of dtype torch.float32"),
    (lambda m: surgery.prune_heads(m, {0: "01"}), "layer 0: expected a list of head indices, got '01'"),
    (lambda m: surgery.prune_heads(m, {0: 3}), "layer 0: expected a list of head indices, got 3"),
    (lambda m: surgery.prune_heads(m, {0: [0], "1": [0]}), "layer index '1' is not an integer"),
    (lambda m: surgery.prune_heads(m, {0: [0], 1.0: [0]}), "layer index 1.0 is not an integer"),
    (lambda m: surgery.prune_heads(m, {True: [0]}), "layer index True is not an integer"),
    (lambda m: surgery.prune_heads(m, [0, 1]), "heads must be a mapping {layer: indices}, got list"),
    (lambda m: surgery.prune_ffn_neurons(m, {0: [0, 1], 1: [2, 3.7]}), "layer 1: neuron index 3.7 is not an integer"),
    (lambda m: surgery.prune_ffn_neurons(m, {0: torch.tensor([1.0, 2.0])}),
     "layer 0: neuron indices must be integers, got a tensor of dtype torch.float32"),
    (lambda m: surgery.prune_ffn_neurons(m, {0: torch.ones(128, dtype=torch.bool)}),
     "layer 0: neuron indices must be integers, got a tensor of dtype torch.bool"),
    (lambda m: surgery.prune_ffn_neurons(m, {0: [False, True]}), "layer 0: neuron index False is not an integer"),
    (lambda m: surgery.prune_ffn_neurons(m, {"0": [1]}), "layer index '0' is not an integer"),
    (lambda m: surgery.remove_blocks(m, attention=[0], ffn=[0.5]), "ffn: layer index 0.5 is not an integer"),
    (lambda m: surgery.remove_blocks(m, attention=["1"]), "attention: layer index '1' is not an integer"),
    (lambda m: surgery.remove_blocks(m, attention=1), "attention: expected a list of layer indices, got 1"),
    (lambda m: surgery.remove_blocks(m, ffn=[True]), "ffn: layer index True is not an integer"),
])
def test_non_integer_indices_are_refused_before_anything_changes(tiny_model, call, message):
    model = tiny_model()
    state = _state(model)
    with pytest.raises(PruningError) as e:
        call(model)
    assert str(e.value).startswith(message), str(e.value)
    assert _same_state(model, state)


def test_integral_tensors_and_numpy_integers_are_indices(tiny_model):
    import numpy as np

    model = tiny_model()
    surgery.prune_heads(model, {torch.tensor(0): torch.tensor([1, 3]), np.int64(1): [np.int32(0), torch.tensor(2)]})
    surgery.prune_ffn_neurons(model, {0: torch.arange(0, 10, dtype=torch.int32), 1: np.array([5, 7])})
    surgery.remove_blocks(model, ffn=torch.tensor([1]))
    assert [(s.heads, s.ffn_dim) for s in model.config.layers] == [([0, 2], 118), ([1, 3], 0)]
