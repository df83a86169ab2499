"""Thresholding, target selection, physical pruning and compression accounting."""

from __future__ import annotations

import json

import pytest
import torch

import minisnip
from minisnip.config import BertConfig
from minisnip.model import BertForSequenceClassification, BertModel
from minisnip.pruning import (COMPRESSION_DEFINITION, apply_pruning, canonical_names, compression,
                              dense_encoder_linear_params, encoder_linear_params, list_branches, parse_name,
                              select_below_threshold, select_for_target)
from minisnip.snip import function_norms
from minisnip.surgery import PruningError, prune_ffn_neurons, prune_heads

H, HEADS, D, F, L = 64, 4, 16, 128, 3
ATT = 4 * H * H + 4 * H          # 16640: W_QKV 3*64*64 + 192, W_O 64*64 + 64
FFN = 2 * H * F + F + H          # 16576: W_1 128*64 + 128, W_2 64*128 + 64
HEAD = 4 * H * D + 3 * D         # 4144
NEURON = 2 * H + 1               # 129
DENSE = L * (ATT + FFN)          # 99648


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=H, num_hidden_layers=L, num_attention_heads=HEADS,
                        intermediate_size=F, max_position_embeddings=32)
    model = BertModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() == 2 else 0.1)
    return model


def batches():
    g = torch.Generator().manual_seed(3)
    out = []
    for b, s in ((4, 12), (3, 9)):
        ids = torch.randint(1, 100, (b, s), generator=g)
        mask = torch.ones(b, s, dtype=torch.long)
        mask[1, s // 2:] = 0
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def run(model, data):
    with torch.no_grad():
        return torch.cat([model(d["input_ids"], d["attention_mask"])[d["attention_mask"].bool()] for d in data])


def gate(model, names, neuron_group_size=None):
    """Gate the canonical branches `names` to zero: the 'soft' version of removing them."""
    for name in names:
        layer, kind, index = parse_name(name)
        mod = model.layers[layer]
        if kind == "attention":
            mod.attention.gate = torch.tensor(0.0)
        elif kind == "ffn":
            mod.ffn.gate = torch.tensor(0.0)
        elif kind == "head":
            g = mod.attention.head_gate if mod.attention.head_gate is not None else torch.ones(mod.attention.num_heads)
            g[mod.attention.heads.index(index)] = 0
            mod.attention.head_gate = g
        else:
            g = mod.ffn.neuron_gate if mod.ffn.neuron_gate is not None else torch.ones(mod.ffn.ffn_dim)
            g[index * neuron_group_size:(index + 1) * neuron_group_size] = 0
            mod.ffn.neuron_gate = g


# --- counting ------------------------------------------------------------------------------------------------

def test_encoder_params_and_compression_by_hand():
    m = tiny_model()
    assert encoder_linear_params(m) == DENSE == dense_encoder_linear_params(m.config)
    assert compression(m) == 0.0
    prune_heads(m, {0: [1, 2]})
    prune_ffn_neurons(m, {2: range(10)})
    assert encoder_linear_params(m) == DENSE - 2 * HEAD - 10 * NEURON
    assert compression(m, m.config) == pytest.approx((2 * HEAD + 10 * NEURON) / DENSE)
    prune_heads(m, {1: [0, 1, 2, 3]})  # all heads: the block goes, b_O (64) with it
    assert encoder_linear_params(m) == DENSE - 2 * HEAD - 10 * NEURON - ATT
    # a classifier: embeddings, pooler and classifier are not counted
    clf = BertForSequenceClassification(m.config)
    assert encoder_linear_params(clf) == DENSE - 2 * HEAD - 10 * NEURON - ATT


def test_minilm_compression_by_hand():
    try:
        path = minisnip.default_model_path()
    except ImportError as e:
        pytest.skip(str(e))
    m = BertModel.from_pretrained(path)
    dense = 6 * ((4 * 384 * 384 + 4 * 384) + (2 * 384 * 1536 + 1536 + 384))
    assert dense == 10_637_568 and encoder_linear_params(m) == dense and compression(m) == 0.0
    report = apply_pruning(m, ["layer0.attention", "layer3.ffn", "layer5.head11"])
    removed = (4 * 384 * 384 + 4 * 384) + (2 * 384 * 1536 + 1536 + 384) + (4 * 384 * 32 + 3 * 32)
    assert report["params_after"] == dense - removed
    assert report["compression"] == pytest.approx(removed / dense) == pytest.approx(compression(m))


# --- thresholding ----------------------------------------------------------------------------------------------

def test_select_below_threshold_and_its_errors():
    norms = {"layer0.head0": 0.1, "layer0.head1": 0.5, "layer0.ffn": 0.3}
    assert select_below_threshold(norms, 0.4) == ["layer0.head0", "layer0.ffn"]
    assert select_below_threshold(norms, 0.3) == ["layer0.head0"]  # strictly below
    assert select_below_threshold(norms, 0) == []
    for bad in (-0.1, float("nan"), float("inf"), None, True):
        with pytest.raises(ValueError, match="tau"):
            select_below_threshold(norms, bad)
    with pytest.raises(ValueError, match="NaN"):
        select_below_threshold({"layer0.ffn": float("nan")}, 1.0)


def test_target_errors():
    m = tiny_model()
    bs = list_branches(m, ("head", "ffn"))
    norms = {b.name: 1.0 for b in bs}
    for bad in (0, 0.0, -0.2, 1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="target"):
            select_for_target(bs, norms, bad, model=m)
    with pytest.raises(ValueError, match="no score"):
        select_for_target(bs, {}, 0.5, model=m)
    heads_only = list_branches(m, ("head",))
    with pytest.raises(ValueError, match="cannot be reached"):
        select_for_target(heads_only, norms, 0.6, model=m)  # heads are half the encoder
    with pytest.raises(PruningError, match="every"):
        select_for_target(bs, norms, 0.999, model=m)
    everything = select_for_target(bs, norms, 1, model=m, allow_empty=True)
    assert sorted(everything) == sorted([f"layer{i}.{k}" for i in range(L) for k in ("attention", "ffn")])


@pytest.mark.parametrize("per_param", [False, True])
@pytest.mark.parametrize("target", [0.1, 0.3, 0.55])
def test_target_is_threshold_and_pruning_equals_gating(target, per_param):
    kinds, size = ("head", "neurons", "ffn"), 16
    m = tiny_model()
    data = batches()
    norms = function_norms(m, data, kinds=kinds, neuron_group_size=size)
    bs = list_branches(m, kinds, neuron_group_size=size)
    chosen = select_for_target(bs, norms, target, per_param=per_param, model=m)

    # reached, with overshoot below the last branch taken: `chosen` is a prefix of the candidates in score order
    score = {b.name: norms[b.name] / (b.params if per_param else 1) for b in bs}
    order = sorted(bs, key=lambda b: score[b.name])
    k = next(k for k in range(1, len(order) + 1) if canonical_names(m, order[:k]) == chosen)
    removed = DENSE - encoder_linear_params(_pruned_copy(m, chosen, size))
    removed_before_last = DENSE - encoder_linear_params(_pruned_copy(m, canonical_names(m, order[:k - 1]), size))
    assert removed / DENSE >= target > removed_before_last / DENSE

    # the same set is the threshold operator at a tau between the last taken and the next score
    if not per_param:
        last, nxt = order[k - 1], order[k]
        tau = (norms[last.name] + norms[nxt.name]) / 2
        assert canonical_names(m, select_below_threshold(norms, tau), size) == chosen

    # physical removal == gating those branches to zero
    gated = tiny_model()
    gate(gated, chosen, size)
    pruned = tiny_model()
    report = apply_pruning(pruned, chosen, neuron_group_size=size)
    assert report["removed"] == chosen
    assert report["compression"] == pytest.approx(compression(pruned)) == pytest.approx(removed / DENSE)
    torch.testing.assert_close(run(pruned, data), run(gated, data), rtol=1e-5, atol=1e-5)
    json.dumps(report)


def _pruned_copy(m, names, size):
    import copy
    c = copy.deepcopy(m)
    apply_pruning(c, names, neuron_group_size=size)
    return c


def test_hierarchy_and_no_double_counting():
    m = tiny_model()
    bs = list_branches(m, ("head", "attention", "ffn"))
    # layer 1's heads and block have the smallest norms: all four heads + the block = the block, counted once
    norms = {b.name: 1.0 + b.layer + (0.5 if b.kind == "ffn" else 0) for b in bs}
    for b in bs:
        if b.layer == 1 and b.kind in ("head", "attention"):
            norms[b.name] = 0.01 * (b.index or 0) + (0.05 if b.kind == "attention" else 0)
    chosen = select_for_target(bs, norms, ATT / DENSE - 1e-6, model=m)
    assert chosen == ["layer1.attention"]
    # heads only: taking all of a layer's heads is its attention block (b_O included)
    heads = [b for b in bs if b.kind == "head"]
    chosen = select_for_target(heads, norms, (3 * HEAD + 1) / DENSE, model=m)
    assert chosen == ["layer1.attention"]
    assert canonical_names(m, ["layer1.head0", "layer1.head1"]) == ["layer1.head0", "layer1.head1"]
    assert canonical_names(m, ["layer2.ffn", "layer1.attention", "layer1.head3"]) == \
        ["layer1.attention", "layer2.ffn"]
    report = apply_pruning(m, ["layer1.head0", "layer1.head1", "layer1.head2", "layer1.head3"])
    assert report["removed"] == ["layer1.attention"] and m.layers[1].attention is None
    assert report["params_before"] - report["params_after"] == ATT


def test_already_pruned_model_counts_toward_target():
    m = tiny_model()
    apply_pruning(m, ["layer0.ffn", "layer2.ffn"])
    bs = list_branches(m, ("head", "ffn"))
    norms = {b.name: float(i) for i, b in enumerate(bs)}
    assert select_for_target(bs, norms, 0.2, model=m) == []  # 2 FFN blocks are 33% already
    chosen = select_for_target(bs, norms, 0.35, model=m)
    assert chosen == ["layer0.head0"]  # 33.3% + 4.2%


def test_neuron_groups_use_listing_time_indices():
    m = tiny_model()
    ref = tiny_model()
    size = 10  # 128 neurons -> 12 groups of 10 and one of 8
    names = ["layer0.neurons0", "layer0.neurons5", "layer0.neurons12", "layer2.neurons3"]
    gate(ref, names, size)
    report = apply_pruning(m, names, neuron_group_size=size)
    assert m.layers[0].ffn.ffn_dim == 128 - 28 and m.layers[2].ffn.ffn_dim == 118
    assert report["params_before"] - report["params_after"] == 38 * NEURON
    torch.testing.assert_close(run(m, batches()), run(ref, batches()), rtol=1e-5, atol=1e-5)
    # Branch objects carry their indices; names alone need the group size
    m2 = tiny_model()
    groups = list_branches(m2, ("neurons",), neuron_group_size=size)
    apply_pruning(m2, [g for g in groups if g.name in names])
    assert m2.layers[0].ffn.ffn_dim == 100
    with pytest.raises(ValueError, match="neuron_group_size"):
        apply_pruning(tiny_model(), ["layer0.neurons1"])
    # all groups of a layer = its FFN block, b_2 included
    all_groups = [f"layer1.neurons{g}" for g in range(13)]
    report = apply_pruning(tiny_model(), all_groups, neuron_group_size=size)
    assert report["removed"] == ["layer1.ffn"] and report["params_before"] - report["params_after"] == FFN


def test_apply_pruning_errors_and_report():
    m = tiny_model()
    everything = [f"layer{i}.{k}" for i in range(L) for k in ("attention", "ffn")]
    with pytest.raises(PruningError, match="every"):
        apply_pruning(m, everything)
    assert encoder_linear_params(m) == DENSE  # refused before anything changed
    with pytest.raises(PruningError, match="not present"):
        apply_pruning(m, ["layer0.head9"])
    with pytest.raises(PruningError, match="layer 7"):
        apply_pruning(m, ["layer7.ffn"])
    with pytest.raises(PruningError, match="not a branch name"):
        apply_pruning(m, ["layer0.mlp"])
    report = apply_pruning(m, ["layer0.head1", "layer2.ffn"])
    assert report == {"removed": ["layer0.head1", "layer2.ffn"], "params_before": DENSE,
                      "params_after": DENSE - HEAD - FFN, "dense_params": DENSE, "compression_before": 0.0,
                      "compression": pytest.approx((HEAD + FFN) / DENSE),
                      "compression_definition": COMPRESSION_DEFINITION}
    with pytest.raises(PruningError, match="no feed-forward"):
        apply_pruning(m, ["layer2.ffn"])
    assert m.config.layers[0].heads == [0, 2, 3] and m.config.layers[2].ffn_dim == 0
    report = apply_pruning(m, everything[:4] + ["layer2.attention"], allow_empty=True)
    assert report["params_after"] == 0 and report["compression"] == 1.0
