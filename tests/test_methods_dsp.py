"""Differentiable subset pruning (Li, Cotterell & Sachan 2021): the Gumbel-soft top-k, its temperature
schedule, the budget k from a compression target, gradients to the logits, and exactly k kept."""

from __future__ import annotations

import math

import pytest
import torch

import minisnip
from minisnip.finetune import load_classifier, load_task_data
from minisnip.methods import dsp
from minisnip.pruning import apply_pruning, compression, list_branches, select_for_target
from minisnip.train import StepContext, TrainConfig, fit

pytestmark = pytest.mark.usefixtures("one_thread")


def test_soft_top_k_sums_to_k_and_tends_to_the_hard_top_k():
    torch.manual_seed(0)
    logits = torch.randn(12)
    noise = dsp.gumbel_noise(logits)
    for k in (1, 4, 11):
        for tau in (1000.0, 1.0, 0.1, 1e-3):
            g = dsp.soft_top_k(logits, k, tau, noise)
            assert g.sum().item() == pytest.approx(k, abs=1e-5)
            assert g.min() >= 0  # (an entry may exceed 1 at moderate τ: the relaxation is no projection)
        hard = dsp.hard_top_k(logits + noise, k)
        errs = [(dsp.soft_top_k(logits, k, tau, noise) - hard).abs().max().item() for tau in (1.0, 1e-4, 1e-8)]
        assert errs[0] > 0.1 and errs[1] < 1e-6 and errs[2] == 0.0  # converges as τ -> 0
    # at a large τ every branch gets about k/N
    assert torch.allclose(dsp.soft_top_k(logits, 3, 1e4), torch.full((12,), 3 / 12), atol=1e-3)
    assert torch.equal(dsp.soft_top_k(logits, 12, 1.0), torch.ones(12))


def test_gradient_reaches_the_logits_for_both_estimators():
    w = torch.tensor([0.3, -1.0, 2.0, 0.1, 0.5], requires_grad=True)
    target = torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0])
    (dsp.soft_top_k(w, 2, 0.5) * target).sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all() and (w.grad != 0).sum() >= 3
    w.grad = None
    st = dsp.hard_top_k_st(w, 2)
    assert torch.equal(st.detach(), torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0]))
    (st * target).sum().backward()
    assert torch.equal(w.grad, target)  # straight through: the identity


def test_the_gradient_outgrows_float32_where_near_ties_chain_so_the_logits_are_float64(tiny_model):
    # hand-made: 160 logits 3τ apart, k = 120, τ = 1e-3. Each softmax chooses an entry only in part, a later one
    # chooses it again, and every such link multiplies the derivative by about 1/τ: the exact gradient is ~1e41
    n, k, tau = 160, 120, 1e-3
    upstream = torch.linspace(-1, 1, n)
    w64 = (-torch.arange(n, dtype=torch.float64) * 3 * tau).requires_grad_()
    dsp.soft_top_k(w64, k, tau).backward(upstream.double())
    assert torch.isfinite(w64.grad).all() and w64.grad.abs().max() > torch.finfo(torch.float32).max
    w32 = w64.detach().float().requires_grad_()
    dsp.soft_top_k(w32, k, tau).backward(upstream)
    assert not torch.isfinite(w32.grad).all()  # what float32 logits got: inf, then NaN after the Adam step
    # so the hook keeps its logits in float64 and writes the gates in the model's dtype
    model = tiny_model(minisnip.BertForSequenceClassification)
    [hook] = dsp.training_hooks(model, dsp.Config(), 0.25, 10, ("head",), 32)
    assert hook.logits.dtype == torch.float64
    hook.before_forward(StepContext(step=1, total_steps=10, epoch=1, model=model, batch={}))
    assert model.bert.layers[0].attention.head_gate.dtype == torch.float32


def test_temperature_anneals_geometrically_then_stays():
    cfg = dsp.Config(init_temperature=100.0, final_temperature=1e-2)
    taus = [dsp.temperature(s, cfg, 4) for s in range(6)]
    assert taus == pytest.approx([100.0, 10.0, 1.0, 0.1, 0.01, 0.01])
    assert dsp.temperature(0, cfg, 0) == 0.01


def test_budget_warm_up_falls_from_every_branch_to_k_and_starts_with_every_gate_open(tiny_model):
    # N = 10, k = 4, warm-up of 4 steps: 10 - round(6 s / 4) for s = 0..3, then 4
    assert [dsp.keep_at(s, 10, 4, 4) for s in range(6)] == [10, 8, 7, 6, 4, 4]
    assert [dsp.keep_at(s, 10, 4, 0) for s in range(3)] == [4, 4, 4]  # off: the paper's fixed budget
    model = tiny_model(minisnip.BertForSequenceClassification)
    [hook] = dsp.training_hooks(model, dsp.Config(budget_warmup=0.5), 0.25, 10, ("head", "neurons"), 32)
    n = len(hook.branches)
    seen = []
    for step in range(1, 11):
        hook.before_forward(StepContext(step=step, total_steps=10, epoch=1, model=model, batch={}))
        seen.append(hook.k_now)
        assert hook.last.sum().item() == pytest.approx(hook.k_now)  # the soft k-hot vector sums to the budget
        if step == 1:
            assert torch.equal(hook.last, torch.ones(n))  # k = N: every gate exactly 1, nothing scaled
            assert torch.equal(model.bert.layers[0].attention.head_gate, torch.ones(4))
    assert seen[0] == n and seen[5:] == [hook.k] * 5 and seen == sorted(seen, reverse=True)
    assert hook.epoch_log()["keep"] == hook.k
    dsp.before_removal(model, [hook])


def test_budget_from_a_compression_target(tiny_model):
    model = tiny_model(minisnip.BertForSequenceClassification)
    heads = list_branches(model, ("head",))
    dense = minisnip.pruning.dense_encoder_linear_params(model.config)
    per_head = heads[0].params
    for target in (0.1, 0.2, 0.3):
        k = dsp.keep_budget(model, heads, target)
        m = len(heads) - k
        assert m * per_head >= target * dense > (m - 1) * per_head
    mixed = list_branches(model, ("head", "neurons"), 32)
    k = dsp.keep_budget(model, mixed, 0.5)
    assert 0.5 * dense <= sum(sorted(b.params for b in mixed)[:len(mixed) - k])
    with pytest.raises(ValueError, match="target"):
        dsp.keep_budget(model, heads, 0.9)  # heads alone own less than 90% of the encoder
    with pytest.raises(ValueError, match="target"):
        dsp.training_hooks(model, dsp.Config(), None, 10, ("head",), 32)  # no target: no budget


def test_gates_reach_the_model_and_carry_the_gradient(tiny_model):
    model = tiny_model(minisnip.BertForSequenceClassification)
    for estimator in dsp.ESTIMATORS:
        [hook] = dsp.training_hooks(model, dsp.Config(estimator=estimator), 0.25, 10, ("head", "neurons"), 32)
        ids = torch.randint(5, 1000, (2, 8))
        ctx = StepContext(step=1, total_steps=10, epoch=1, model=model, batch={})
        hook.before_forward(ctx)
        gates = model.bert.layers[0].attention.head_gate
        assert gates is not None and gates.shape == (4,)
        model(ids).pow(2).sum().backward()
        assert hook.logits.grad is not None and (hook.logits.grad != 0).any(), estimator
        dsp.before_removal(model, [hook])
        assert model.bert.layers[0].attention.head_gate is None


def test_short_fit_then_exactly_k_heads_stay(tiny_folder, glue_fixtures_dir):
    tokenizer = minisnip.load_tokenizer(tiny_folder)
    data = load_task_data("sst2", tokenizer, glue_fixtures_dir, max_length=32)
    torch.manual_seed(0)
    model = load_classifier(tiny_folder, data.task)
    cfg = TrainConfig(epochs=6, batch_size=2, lr=1e-3, max_length=32, warmup_ratio=0.0, progress=False)
    steps = cfg.steps_per_epoch(len(data.train)) * cfg.epochs
    kinds = ("head",)
    hooks = dsp.training_hooks(model, dsp.Config(), 0.3, steps, kinds, 16)
    hook = hooks[0]
    before = hook.logits.detach().clone()
    history = fit(model, tokenizer, data.task, data.train, {"dev": data.dev["dev"]}, cfg, hooks=hooks,
                  restore_best=False)
    assert not torch.equal(before, hook.logits.detach().cpu())  # the logits learned
    first, last = history.epochs[0], history.epochs[-1]
    assert first["temperature"] > 1 and last["temperature"] == 1e-8 and last["keep"] == hook.k
    assert 0 <= first["subset_agreement"] <= 1 and last["subset_agreement"] > 0.5
    dsp.before_removal(model, hooks)
    w = dsp.scores(model, hooks, [], kinds, 16)
    names = dsp.select(model, hooks, [], kinds, 16, 0.3)
    # the same set as select_for_target with these scores (heads are all of one size)
    assert names == select_for_target(list_branches(model, kinds), w, 0.3, model=model)
    report = apply_pruning(model, names)
    assert sum(len(layer.attention.heads) for layer in model.bert.layers if layer.attention is not None) == hook.k
    kept = {f"layer{i}.head{h}" for i, layer in enumerate(model.bert.layers) if layer.attention is not None
            for h in layer.attention.heads}
    assert kept == set(sorted(w, key=w.get)[-hook.k:])
    assert report["compression"] >= 0.3 and compression(model) == pytest.approx(report["compression"])


def test_config_checks():
    for field, bad in [("lr", -1.0), ("init_temperature", 0.0), ("final_temperature", 2000.0),
                       ("cooldown", 1.5), ("init_range", math.nan), ("estimator", "sparsemax"),
                       ("budget_warmup", 1.0)]:
        with pytest.raises(ValueError, match=field):
            dsp.Config(**{field: bad})
