"""Magnitude pruning: structured (branch weight norms) and unstructured (gradual, cubic schedule)."""

import pytest
import torch

import minisnip
from minisnip.pruning.compression import encoder_linears, sparsity
from minisnip.methods import magnitude, magnitude_unstructured as mu
from minisnip.pruning import apply_pruning, list_branches, select_for_target
from minisnip.train import StepContext, TrainConfig, fit

pytestmark = pytest.mark.usefixtures("one_thread")


# --- structured ------------------------------------------------------------------------------------------

def test_branch_scores_are_the_norms_of_their_weights(tiny_model):
    model = tiny_model(minisnip.BertForSequenceClassification)
    scores = magnitude.scores(model, [], [], ("head", "attention", "neurons", "ffn"), 16)
    attn, ffn = model.bert.layers[1].attention, model.bert.layers[1].ffn
    q, k, v = attn.head_rows(2)
    w = attn.qkv.weight
    parts = [w[q], w[k], w[v], attn.out.weight[:, attn.head_columns(2)]]
    assert scores["layer1.head2"] == pytest.approx(torch.cat([p.flatten() for p in parts]).norm().item(), rel=1e-5)
    group = torch.cat([ffn.up.weight[16:32].flatten(), ffn.down.weight[:, 16:32].flatten()])
    assert scores["layer1.neurons1"] == pytest.approx(group.norm().item(), rel=1e-5)
    block = torch.cat([attn.qkv.weight.flatten(), attn.out.weight.flatten()])
    assert scores["layer1.attention"] == pytest.approx(block.norm().item(), rel=1e-5)
    both = torch.cat([ffn.up.weight.flatten(), ffn.down.weight.flatten()])
    assert scores["layer1.ffn"] == pytest.approx(both.norm().item(), rel=1e-5)
    assert magnitude.STRUCTURED and not magnitude.USES_DISTILLATION
    assert magnitude.training_hooks(model, magnitude.Config(), 0.5, 10, ("head",), None) == []


def test_scores_follow_original_head_names_after_pruning(tiny_model):
    model = tiny_model(minisnip.BertForSequenceClassification)
    before = magnitude.scores(model, [], [], ("head",), None)
    apply_pruning(model, ["layer0.head1"])
    after = magnitude.scores(model, [], [], ("head",), None)
    assert "layer0.head1" not in after
    assert after["layer0.head2"] == pytest.approx(before["layer0.head2"], rel=1e-6)


def test_smallest_branch_goes_first(tiny_model):
    model = tiny_model(minisnip.BertForSequenceClassification)
    ffn = model.bert.layers[0].ffn
    with torch.no_grad():
        ffn.up.weight[32:48] *= 1e-3
        ffn.down.weight[:, 32:48] *= 1e-3
    kinds = ("head", "neurons")
    scores = magnitude.scores(model, [], [], kinds, 16)
    branches = list_branches(model, kinds, 16)
    assert min(scores, key=scores.get) == "layer0.neurons2"
    assert select_for_target(branches, scores, 0.01, model=model) == ["layer0.neurons2"]
    magnitude.before_removal(model, [])
    assert model.bert.layers[0].ffn.neuron_gate is None


# --- unstructured: masks by importance ------------------------------------------------------------------

def test_smallest_masks_prune_exactly_the_smallest():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 5, generator=g).abs(), torch.randn(4, 10, generator=g).abs()
    per = mu.smallest_masks([a, b], 0.3, "per-matrix")
    assert [int((~m).sum()) for m in per] == [9, 12]  # round(0.3 * 30), round(0.3 * 40)
    assert a[~per[0]].max() < a[per[0]].min() and b[~per[1]].max() < b[per[1]].min()
    glob = mu.smallest_masks([a, b], 0.3, "global")
    assert sum(int((~m).sum()) for m in glob) == 21  # round(0.3 * 70)
    pruned = torch.cat([a[~glob[0]], b[~glob[1]]])
    kept = torch.cat([a[glob[0]], b[glob[1]]])
    assert pruned.max() < kept.min()
    with pytest.raises(ValueError, match="scope"):
        mu.smallest_masks([a], 0.3, "layer")


@pytest.mark.parametrize("field, value", [("scope", "rows"), ("update_every", 0), ("warmup", -0.1),
                                          ("cooldown", float("nan")), ("initial_sparsity", 2.0), ("warmup", 0.9)])
def test_config_validates(field, value):
    with pytest.raises(ValueError, match=field):
        mu.Config(**{field: value})


# --- unstructured: the hook along a schedule -------------------------------------------------------------

def _fake_training(model, hook, total_steps, seed=0):
    """Steps of a pretend optimiser: every weight gets a gradient and moves (pruned ones too, as AdamW's
    moments would move them); the hook masks gradients and re-zeroes. Yields (step, grads seen)."""
    g = torch.Generator().manual_seed(seed)
    linears = [lin for _, lin in encoder_linears(model)]
    for step in range(1, total_steps + 1):
        ctx = StepContext(step=step, total_steps=total_steps, epoch=1, model=model, batch={})
        for lin in linears:
            lin.weight.grad = torch.randn(lin.weight.shape, generator=g)
        hook.after_backward(ctx)
        grads = [lin.weight.grad.clone() for lin in linears]
        with torch.no_grad():
            for lin in linears:
                lin.weight.add_(0.01 * torch.randn(lin.weight.shape, generator=g))
            hook.after_step(ctx)
        yield step, grads


@pytest.mark.parametrize("scope", mu.SCOPES)
def test_gradual_hook_follows_the_schedule_and_keeps_zeros(tiny_model, scope):
    model = tiny_model(minisnip.BertForSequenceClassification)
    cfg = mu.Config(scope=scope, update_every=3, warmup=0.1, cooldown=0.2)
    (hook,) = mu.training_hooks(model, cfg, 0.8, 20, (), None)
    linears = [lin for _, lin in encoder_linears(model)]
    n = sum(lin.weight.numel() for lin in linears)
    slack = 0.5 * len(linears) if scope == "per-matrix" else 0.5  # rounding: half a weight per matrix / overall
    previous = None
    for step, grads in _fake_training(model, hook, 20):
        zeros = n - sum(int(lin.weight.count_nonzero()) for lin in linears)
        if hook.keep is None:
            assert zeros == 0 and step < 3
            continue
        masked = sum(int((~k).sum()) for k in hook.keep)
        assert zeros == masked  # zero exactly where the masks say
        assert all(bool((lin.weight[~k] == 0).all()) for lin, k in zip(linears, hook.keep))
        if step % 3 == 0 or step == 16:  # an update: the scheduled sparsity, within the rounding
            assert abs(masked - hook.scheduled(step) * n) <= slack
        if previous is not None:  # masked gradients of the masks in force during the step
            assert all(bool((gr[~k] == 0).all()) for gr, k in zip(grads, previous))
        previous = [k.clone() for k in hook.keep]
    assert hook.current == 0.8 and abs(sparsity(model) - 0.8) <= slack / n
    assert hook.epoch_log()["sparsity"] == pytest.approx(sparsity(model))


def test_before_removal_reaches_the_exact_target_when_the_schedule_did_not(tiny_model):
    model = tiny_model(minisnip.BertForSequenceClassification)
    (hook,) = mu.training_hooks(model, mu.Config(scope="global"), 0.7, 100, (), None)
    for _ in _fake_training(model, hook, 30):  # stopped long before the target
        pass
    assert hook.current < 0.7
    mu.before_removal(model, [hook])
    n = sum(lin.weight.numel() for _, lin in encoder_linears(model))
    assert n - sum(int(lin.weight.count_nonzero()) for _, lin in encoder_linears(model)) == round(0.7 * n)
    assert not mu.STRUCTURED and not any(type(m).__name__ == "ParametrizationList" for m in model.modules())


def test_inside_fit(tiny_folder, glue_fixtures_dir):
    from minisnip.finetune import load_task_data
    tokenizer = minisnip.load_tokenizer(tiny_folder)
    data = load_task_data("rte", tokenizer, glue_fixtures_dir, max_length=32)
    model = minisnip.BertForSequenceClassification.from_pretrained(tiny_folder, num_labels=2)
    cfg = TrainConfig(epochs=6, batch_size=4, lr=1e-3, max_length=32, progress=False)
    total = cfg.steps_per_epoch(len(data.train)) * cfg.epochs
    hooks = mu.training_hooks(model, mu.Config(update_every=2), 0.6, total, (), None)
    history = fit(model, tokenizer, data.task, data.train, data.dev, cfg, hooks=hooks, restore_best=False)
    linears = [lin for _, lin in encoder_linears(model)]
    slack = 0.5 * len(linears) / sum(lin.weight.numel() for lin in linears)  # per-matrix rounding
    assert history.epochs[-1]["sparsity"] == pytest.approx(0.6, abs=slack)
    mu.before_removal(model, hooks)
    assert sparsity(model) == pytest.approx(0.6, abs=slack)
