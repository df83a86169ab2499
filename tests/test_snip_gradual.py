"""SNIP's gradual cut (snip.gradual, minisnip's option): the thresholding operator on the cubic schedule, through
the gates, and a recipe whose cut at the target removes exactly the branches fine-tuning had masked."""

from __future__ import annotations

import pytest
import torch

import minisnip
from minisnip.pruning import list_branches, select_for_target
from minisnip.pruning.recipe import PruneConfig, run_prune, scheduled
from minisnip.snip import method as snip_method
from minisnip.snip.gradual import GradualThreshold
from minisnip.snip.norms import function_norms
from minisnip.train import StepContext, TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ("head", "neurons")


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 1000, (3, 6), generator=g)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[2, 4:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def _step(model, hook, step, total, batch):
    trace = []
    with torch.no_grad():
        model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], trace=trace)
    ctx = StepContext(step=step, total_steps=total, epoch=1, model=model, batch=batch, traces=trace)
    assert hook.loss(ctx) is None  # it reads the traces and adds nothing to the loss


def test_the_cut_follows_the_schedule_and_masks_the_smallest_running_norms(tiny_model):
    model = tiny_model(minisnip.BertForSequenceClassification)
    total, b = 100, _batch()
    hook = GradualThreshold(model, 0.5, total, KINDS, 16, start=0.5)
    assert hook.scheduled(50) == 0.0 and 0 < hook.scheduled(65) < 0.5 and hook.scheduled(80) == 0.5
    norms = function_norms(model, [b], kinds=KINDS, neuron_group_size=16)
    _step(model, hook, 10, total, b)  # in the warm-up: nothing masked, no gate set
    assert hook.keep.all() and model.bert.layers[0].attention.head_gate is None
    _step(model, hook, 60, total, b)  # on the ramp: the operator at s_61, on the running norms (one sample here)
    share = hook.scheduled(61)
    branches = list_branches(model, KINDS, 16)
    gone = set(select_for_target(branches, norms, share, model=model))
    assert gone and {n: pytest.approx(v, rel=1e-5) for n, v in norms.items()} == hook.chosen_from
    assert {br.name for br, k in zip(branches, hook.keep) if not k} == gone
    # the mask is in the gates, so the masked branches now output nothing
    gated = function_norms(model, [b], kinds=KINDS, neuron_group_size=16)
    assert all(gated[n] == 0.0 for n in gone) and all(gated[n] > 0 for n in norms if n not in gone)
    # steps between two choices change nothing; the first step whose next share is the target chooses at once
    _step(model, hook, 61, total, b)
    assert hook.current == share
    _step(model, hook, 79, total, b)
    assert hook.current == 0.5
    final = set(select_for_target(branches, hook.scores(), 0.5, model=model))
    assert final == {br.name for br, k in zip(branches, hook.keep) if not k} and gone <= final  # masked stay masked
    hook.clear()
    assert model.bert.layers[0].attention.head_gate is None and model.bert.layers[0].ffn.neuron_gate is None


def test_scores_refuse_a_cut_that_did_not_reach_its_target(tiny_model):
    model = tiny_model(minisnip.BertForSequenceClassification)
    hook = GradualThreshold(model, 0.5, 100, KINDS, 16)
    with pytest.raises(ValueError, match="not at its target"):
        hook.scores()
    with pytest.raises(ValueError, match="start must be a share"):
        GradualThreshold(model, 0.5, 100, KINDS, 16, start=0.9)
    with pytest.raises(ValueError, match="target must be a compression"):
        GradualThreshold(model, 1.0, 100, KINDS, 16)


def test_the_switch_needs_a_target_and_keeps_the_last_epoch(tiny_model):
    model = tiny_model(minisnip.BertForSequenceClassification)
    cfg = snip_method.Config(gradual=True)
    with pytest.raises(ValueError, match="gradual needs a target"):
        snip_method.training_hooks(model, cfg, None, 10, KINDS, 16)
    assert not hasattr(model.bert.layers[0].attention.out, "parametrizations")  # refused before SN went on
    prior, cut = snip_method.training_hooks(model, cfg, 0.5, 10, KINDS, 16)
    assert prior.target is None and isinstance(cut, GradualThreshold) and cut.target == 0.5
    assert scheduled(snip_method, cfg) and not scheduled(snip_method, snip_method.Config())


def test_through_the_recipe_the_cut_removes_what_fine_tuning_masked(tiny_folder, glue_fixtures_dir, tmp_path):
    """The pruned model before recovery computes what the last epoch's masked model did: the same dev score."""
    cfg = TrainConfig(epochs=3, batch_size=4, lr=1e-3, max_length=32, progress=False)
    result = run_prune("rte", tmp_path / "gradual", "snip", snip_method, snip_method.Config(gradual=True),
                       PruneConfig(target=0.5, recovery_epochs=0), tiny_folder, glue_fixtures_dir, cfg)
    scores = result["scores"]
    epochs = scores["finetune_history"]["epochs"]
    assert result["status"] == "completed" and scores["finetuned_epoch"] == 3  # the last epoch, not the best
    assert epochs[-1]["scheduled_compression"] == 0.5 and epochs[-1]["branches_masked"] > 0
    assert epochs[0]["scheduled_compression"] < 0.5
    assert result["compression"] >= 0.5
    before, tuned = scores["pruned_before_recovery"]["dev"], scores["finetuned"]["dev"]
    assert before.keys() == tuned.keys() and before == pytest.approx(tuned, rel=1e-5)
