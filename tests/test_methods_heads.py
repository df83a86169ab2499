"""Head importance (Michel, Levy & Neubig 2019): |dL/dξ| against finite differences, the per-layer
normalisation, the iterative masking to the target, and masked-then-removed = gated."""

from __future__ import annotations

import copy

import pytest
import torch

import minisnip
from minisnip.methods import heads
from minisnip.pruning import apply_pruning, list_branches
from minisnip.pruning.gates import GateLayout, clear_gates

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ("head", "neurons")


def _calib(n_batches=2, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(5, 1000, (batch, 10), generator=g)
        mask = torch.ones(batch, 10, dtype=torch.long)
        mask[0, 7:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
                    "labels": torch.randint(0, 2, (batch,), generator=g)})
    return out


def test_importance_is_the_absolute_gate_derivative_by_central_differences(tiny_model):
    model = tiny_model(minisnip.BertForSequenceClassification).double()
    [batch] = _calib(n_batches=1)
    branches = list_branches(model, KINDS, 32)
    layout = GateLayout(model, branches)
    got = heads.gate_importance(model, [batch], layout)

    def loss_at(values):
        layout.apply(model, values)
        with torch.no_grad():
            out = model.loss(model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]),
                             batch["labels"])
        clear_gates(model)
        return float(out)

    h = 1e-2  # the loss is float32 (model.loss): rounding 6e-8 / (2h) stays below 3e-6
    for j in range(len(branches)):
        up, down = torch.ones(len(branches), dtype=torch.float64), torch.ones(len(branches), dtype=torch.float64)
        up[j] += h
        down[j] -= h
        fd = abs(loss_at(up) - loss_at(down)) / (2 * h)
        assert got[j].item() == pytest.approx(fd, rel=1e-3, abs=1e-5), branches[j].name
    assert (got > 1e-4).sum() > len(branches) // 2  # the check is not vacuous
    assert all(layer.attention.head_gate is None for layer in model.bert.layers)  # no gate left behind


def test_importance_is_normalised_per_layer_and_kind(tiny_model):
    model = tiny_model(minisnip.BertForSequenceClassification)
    calib = _calib()
    branches = list_branches(model, KINDS, 32)
    raw = heads.importance(model, calib, branches, heads.Config(normalize=False))
    norm = heads.importance(model, calib, branches, heads.Config())
    for layer in range(2):
        for kind in KINDS:
            names = [b.name for b in branches if b.layer == layer and b.kind == kind]
            r = torch.tensor([raw[n] for n in names])
            v = torch.tensor([norm[n] for n in names])
            assert v.norm().item() == pytest.approx(1.0, rel=1e-5)
            assert torch.allclose(v, r / r.norm(), rtol=1e-5)
    # per example: the mean of the single examples' |dL/dξ|
    per_ex = heads.importance(model, calib, branches, heads.Config(normalize=False, per_example=True))
    singles = [{k: v[i:i + 1] for k, v in b.items()} for b in calib for i in range(3)]
    assert per_ex == pytest.approx(heads.importance(model, singles, branches, heads.Config(normalize=False)),
                                   rel=1e-5)


def test_iterative_masking_reaches_the_target_and_masked_equals_removed(tiny_model):
    model = tiny_model(minisnip.BertForSequenceClassification)
    calib = _calib()
    branches = list_branches(model, KINDS, 32)
    hooks = heads.training_hooks(model, heads.Config(step=0.1), 0.5, 10, KINDS, 32)
    names, records = heads.iterative_selection(model, calib, branches, 0.5, hooks[0].cfg)
    assert names == heads.select(model, hooks, calib, KINDS, 32, 0.5)
    assert [r["target"] for r in records][-1] == 0.5 and len(records) >= 4  # ~10% of the encoder at a time
    assert all(b["compression"] >= b["target"] for b in records)
    assert all(a["masked"] < b["masked"] for a, b in zip(records, records[1:]))
    # recomputed on the masked model: the importance of the branches left changes, not just its scale
    first = set(heads.iterative_selection(model, calib, branches, 0.1, heads.Config())[0])
    dense = heads.importance(model, calib, branches, heads.Config(normalize=False))
    masked = heads.importance(model, calib, branches, heads.Config(normalize=False), first)
    assert set(masked) == {b.name for b in branches} - first
    ratio = torch.tensor([masked[n] / dense[n] for n in masked])
    assert ratio.std() > 0.05
    # masked (gates 0, emptied blocks 0) = removed
    gone = {b.name for b in branches if b.name in set(names) or b.parent in set(names)}
    gated = copy.deepcopy(model)
    heads.apply_mask(gated, GateLayout(gated, branches), gone)
    report = apply_pruning(model, names, neuron_group_size=32)
    biggest = max(b.params for b in branches) + model.config.hidden_size
    assert 0.5 <= report["compression"] < 0.5 + biggest / report["dense_params"]
    assert report["compression"] == pytest.approx(records[-1]["compression"])
    ids = torch.randint(5, 1000, (2, 9))
    assert torch.allclose(gated(ids), model(ids), atol=1e-5)
    heads.before_removal(gated, hooks)
    assert gated.bert.layers[0].attention is None or gated.bert.layers[0].attention.head_gate is None


def test_heads_only_scores_and_config_checks(tiny_model):
    model = tiny_model(minisnip.BertForSequenceClassification)
    hooks = heads.training_hooks(model, heads.Config(), 0.2, 10, ("head",), 32)
    s = heads.scores(model, hooks, _calib(), ("head",), 32)
    assert sorted(s) == sorted(b.name for b in list_branches(model, ("head",)))
    names = heads.select(model, hooks, _calib(), ("head",), 32, 0.2)
    assert names and all(".head" in n or n.endswith(".attention") for n in names)
    for field, bad in [("step", 0.0), ("step", 1.5), ("normalize", 1), ("per_example", "yes")]:
        with pytest.raises(ValueError, match=field):
            heads.Config(**{field: bad})
    with pytest.raises(ValueError, match="calib"):
        heads.scores(model, hooks, [], ("head",), 32)
    with pytest.raises(ValueError, match="target"):
        heads.select(model, hooks, _calib(), ("head",), 32, None)  # threshold mode: no target to run to
