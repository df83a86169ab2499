"""Movement pruning (Sanh et al. 2020): straight-through scores, hard Top_v on the schedule, soft threshold and
penalty, the exact target at the end, and the structured variant through the gates."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import minisnip
from minisnip.methods import movement, movement_structured as ms
from minisnip.pruning.compression import encoder_linears, sparsity
from minisnip.pruning import list_branches, select_for_target
from minisnip.train import StepContext, TrainConfig, fit

pytestmark = pytest.mark.usefixtures("one_thread")


def _ctx(model, step=1, total=10, batch=None):
    return StepContext(step=step, total_steps=total, epoch=1, model=model, batch=batch or {})


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 1000, (3, 6), generator=g)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[2, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": torch.tensor([0, 1, 1])}


# --- the equations on a 2x2 masked linear, by hand --------------------------------------------------------

def test_scores_accumulate_minus_w_times_grad_over_two_sgd_steps():
    lin = nn.Linear(2, 2, bias=False)
    W0 = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
    S0 = torch.tensor([[0.3, -0.1], [0.2, 0.5]])
    with torch.no_grad():
        lin.weight.copy_(W0)
    state = movement.attach_scores(lin)
    with torch.no_grad():
        state.scores.copy_(S0)
    x, t, lr = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0]), 0.1
    opt = torch.optim.SGD([lin.parametrizations.weight.original, state.scores], lr=lr)
    W, S = W0.clone(), S0.clone()
    for _ in range(2):
        # by hand: M = Top_3(S); W' = W ⊙ M; L = ½||W'x - t||²; dL/dW' = (W'x - t) xᵀ
        M = torch.ones(2, 2)
        M.view(-1)[S.view(-1).argmin()] = 0.0
        g = torch.outer(W * M @ x - t, x)
        W, S = W - lr * g * M, S - lr * g * W  # dL/dW = dL/dW' ⊙ M;  dL/dS = dL/dW' ⊙ W (straight-through)
        # the module
        (state.keep,) = movement.top_v_masks([state.scores], 0.25)
        assert torch.equal(state.keep.float(), M)
        opt.zero_grad()
        (0.5 * (lin(x) - t).pow(2).sum()).backward()
        opt.step()
        assert torch.allclose(state.scores.detach(), S, atol=1e-6)
        assert torch.allclose(lin.parametrizations.weight.original.detach(), W, atol=1e-6)
    assert not torch.equal(S, S0)


def test_straight_through_gradient_in_the_model(tiny_model):
    """S.grad = dL/dW' ⊙ W and W.grad = dL/dW' ⊙ M, with dL/dW' from a plain model holding W' as its weights."""
    student = tiny_model(minisnip.BertForSequenceClassification)
    plain = copy.deepcopy(student)
    (hook,) = movement.training_hooks(student, movement.Config(), 0.5, 10)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for st in hook.states:
            st.scores.copy_(torch.randn(st.scores.shape, generator=g))
    hook.set_masks(hook.top_v(0.5))
    with torch.no_grad():
        for (_, lin), st in zip(encoder_linears(plain), hook.states):
            lin.weight.mul_(st.keep)
    b = _batch()
    losses = []
    for m in (student, plain):
        logits = m(b["input_ids"], b["attention_mask"], b["token_type_ids"])
        losses.append(m.loss(logits, b["labels"]))
        losses[-1].backward()
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-6)
    for (_, lin), (_, plin), st in zip(encoder_linears(student), encoder_linears(plain), hook.states):
        W = lin.parametrizations.weight.original
        g_prime = plin.weight.grad
        assert torch.allclose(st.scores.grad, g_prime * W.detach(), atol=1e-7)
        assert torch.allclose(W.grad, g_prime * st.keep, atol=1e-7)


# --- hard movement: the schedule ---------------------------------------------------------------------------

@pytest.mark.parametrize("scope", ["per-matrix", "global"])
def test_hard_mask_meets_the_schedule_at_every_step(tiny_model, scope):
    model = tiny_model(minisnip.BertForSequenceClassification)
    (hook,) = movement.training_hooks(model, movement.Config(scope=scope), 0.9, 20)
    g = torch.Generator().manual_seed(0)
    sizes = [st.keep.numel() for st in hook.states]
    for step in range(1, 21):
        with torch.no_grad():  # scores move as training would move them
            for st in hook.states:
                st.scores.add_(torch.randn(st.scores.shape, generator=g))
        hook.before_forward(_ctx(model, step, 20))
        s = hook.scheduled(step)
        pruned = [int((~st.keep).sum()) for st in hook.states]
        if scope == "per-matrix":
            assert pruned == [round(s * n) for n in sizes]  # exactly, matrix by matrix
        else:
            assert sum(pruned) == round(s * sum(sizes))  # exactly, overall
        for st in hook.states:  # the kept scores are the largest
            if 0 < int(st.keep.sum()) < st.keep.numel() and scope == "per-matrix":
                assert st.scores[st.keep].min() >= st.scores[~st.keep].max()
        # the forward pass sees zeros exactly where the mask is 0
        for lin, st in zip(hook.linears, hook.states):
            assert torch.equal(lin.weight == 0, ~st.keep)
    assert hook.scheduled(20) == 0.9 and hook.scheduled(2) == 0.0


# --- soft movement -----------------------------------------------------------------------------------------

def test_soft_threshold_and_penalty_as_written(tiny_model):
    model = tiny_model(minisnip.BertForSequenceClassification)
    cfg = movement.Config(variant="soft", threshold=0.3, penalty=0.01)
    (hook,) = movement.training_hooks(model, cfg, 0.5, 10)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for st in hook.states:
            st.scores.copy_(torch.randn(st.scores.shape, generator=g))
    hook.before_forward(_ctx(model))
    for st in hook.states:
        assert torch.equal(st.keep, torch.sigmoid(st.scores) > 0.3)  # M = 1(σ(S) > τ)
    penalty = hook.loss(_ctx(model))
    expected = 0.01 * sum(torch.sigmoid(st.scores.detach()).sum() for st in hook.states)
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-6)  # λ Σ σ(S)
    penalty.backward()
    for st in hook.states:  # its gradient: λ σ(S)(1 - σ(S))
        sig = torch.sigmoid(st.scores.detach())
        assert torch.allclose(st.scores.grad, 0.01 * sig * (1 - sig), atol=1e-9)
    (hard,) = movement.training_hooks(tiny_model(minisnip.BertForSequenceClassification), movement.Config(), 0.5, 10)
    assert hard.loss(_ctx(model)) is None  # hard movement adds no term


@pytest.mark.parametrize("variant", movement.VARIANTS)
def test_before_removal_bakes_the_exact_target_into_a_plain_model(tiny_model, variant):
    model = tiny_model(minisnip.BertForSequenceClassification)
    (hook,) = movement.training_hooks(model, movement.Config(variant=variant, scope="global"), 0.75, 10)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for st in hook.states:
            st.scores.copy_(torch.randn(st.scores.shape, generator=g))
    hook.before_forward(_ctx(model, 5, 10))
    originals = [lin.parametrizations.weight.original.detach().clone() for lin in hook.linears]
    scores = [st.scores.detach().clone() for st in hook.states]
    movement.before_removal(model, [hook])
    assert not any(parametrize.is_parametrized(lin) for _, lin in encoder_linears(model))
    assert all(isinstance(lin.weight, nn.Parameter) for _, lin in encoder_linears(model))
    n = sum(w.numel() for w in originals)
    assert sparsity(model) == round(0.75 * n) / n  # exact
    threshold = torch.cat([s.flatten() for s in scores]).sort().values[round(0.75 * n)]
    for (_, lin), w, s in zip(encoder_linears(model), originals, scores):
        keep = s >= threshold  # Top_v by the learned scores (continuous scores: no ties)
        assert torch.equal(lin.weight[keep], w[keep]) and bool((lin.weight[~keep] == 0).all())


@pytest.mark.parametrize("field, value", [("variant", "medium"), ("scope", "row"), ("score_lr", 0.0),
                                          ("threshold", 1.0), ("penalty", -1.0), ("init_score", float("inf")),
                                          ("cooldown", 0.95)])
def test_config_validates(field, value):
    with pytest.raises(ValueError, match=field):
        movement.Config(**{field: value})
    if field in ("score_lr", "init_score", "cooldown"):
        with pytest.raises(ValueError, match=field):
            ms.Config(**{field: value})


def test_inside_fit(tiny_folder, glue_fixtures_dir):
    from minisnip.finetune import load_task_data
    tokenizer = minisnip.load_tokenizer(tiny_folder)
    data = load_task_data("rte", tokenizer, glue_fixtures_dir, max_length=32)
    model = minisnip.BertForSequenceClassification.from_pretrained(tiny_folder, num_labels=2)
    cfg = TrainConfig(epochs=6, batch_size=4, lr=1e-3, max_length=32, progress=False)
    total = cfg.steps_per_epoch(len(data.train)) * cfg.epochs
    hooks = movement.training_hooks(model, movement.Config(), 0.6, total)
    history = fit(model, tokenizer, data.task, data.train, data.dev, cfg, hooks=hooks)
    assert history.epochs[-1]["sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert any(bool((st.scores != 0).any()) for st in hooks[0].states)  # the scores were trained
    movement.before_removal(model, hooks)
    linears = [lin for _, lin in encoder_linears(model)]
    assert sparsity(model) == pytest.approx(0.6, abs=0.5 * len(linears) / sum(l.weight.numel() for l in linears))
    assert not any(parametrize.is_parametrized(lin) for lin in linears)


# --- structured movement -----------------------------------------------------------------------------------

def test_structured_mask_keeps_exactly_the_top_branches(tiny_model):
    model = tiny_model(minisnip.BertForSequenceClassification)
    kinds = ("head", "neurons")
    (hook,) = ms.training_hooks(model, ms.Config(), 0.5, 10, kinds, 16)
    with torch.no_grad():
        hook.scores.copy_(torch.randn(len(hook.branches), generator=torch.Generator().manual_seed(0)))
    hook.before_forward(_ctx(model, 10, 10))  # cool-down: the target
    branches = list_branches(model, kinds, 16)
    gone = set(select_for_target(branches, hook.score_dict(), 0.5, model=model))
    masked = {b.name for b, k in zip(branches, hook.keep) if not k}
    assert masked == {b.name for b in branches if b.name in gone or b.parent in gone}
    assert hook.scores[hook.keep].min() > hook.scores[~hook.keep].max()  # the kept are the top-v by score
    # the mask is in the gates: 0 for masked heads / neurons, 1 elsewhere
    attn = model.bert.layers[0].attention
    head_keep = [bool(k) for b, k in zip(branches, hook.keep) if b.layer == 0 and b.kind == "head"]
    assert attn.head_gate.tolist() == [float(k) for k in head_keep]
    assert ms.scores(model, [hook], [], kinds, 16) == hook.score_dict()
    ms.before_removal(model, [hook])
    assert attn.head_gate is None and model.bert.layers[0].ffn.neuron_gate is None


def test_structured_scores_get_the_gate_gradient(tiny_model):
    """Straight-through: dL/dS_m = dL/dg_m, the gradient of the gate value itself (masked branches too)."""
    model = tiny_model(minisnip.BertForSequenceClassification)
    clone = copy.deepcopy(model)  # (a model whose gates carry a graph cannot be deep-copied)
    kinds = ("head", "neurons")
    (hook,) = ms.training_hooks(model, ms.Config(), 0.5, 10, kinds, 16)
    with torch.no_grad():
        hook.scores.copy_(torch.randn(len(hook.branches), generator=torch.Generator().manual_seed(0)))
    hook.before_forward(_ctx(model, 10, 10))
    b = _batch()
    model.loss(model(b["input_ids"], b["attention_mask"], b["token_type_ids"]), b["labels"]).backward()
    # reference: the same gates as a plain leaf vector
    gates = hook.keep.float().requires_grad_(True)
    hook.layout.apply(clone, gates)
    clone.loss(clone(b["input_ids"], b["attention_mask"], b["token_type_ids"]), b["labels"]).backward()
    assert torch.allclose(hook.scores.grad, gates.grad, atol=1e-7)
    assert bool((hook.scores.grad[~hook.keep] != 0).any())  # masked branches still get a gradient


def test_structured_inside_fit(tiny_folder, glue_fixtures_dir):
    from minisnip.finetune import load_task_data
    tokenizer = minisnip.load_tokenizer(tiny_folder)
    data = load_task_data("rte", tokenizer, glue_fixtures_dir, max_length=32)
    model = minisnip.BertForSequenceClassification.from_pretrained(tiny_folder, num_labels=2)
    cfg = TrainConfig(epochs=4, batch_size=4, lr=1e-3, max_length=32, progress=False)
    total = cfg.steps_per_epoch(len(data.train)) * cfg.epochs
    kinds = ("head", "neurons")
    hooks = ms.training_hooks(model, ms.Config(), 0.5, total, kinds, 16)
    history = fit(model, tokenizer, data.task, data.train, data.dev, cfg, hooks=hooks)
    assert history.epochs[-1]["scheduled_compression"] == 0.5 and history.epochs[-1]["branches_masked"] > 0
    ms.before_removal(model, hooks)
    scores = ms.scores(model, hooks, [], kinds, 16)
    assert len(set(scores.values())) > 1
    assert model.bert.layers[1].attention.head_gate is None
