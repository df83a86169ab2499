"""L0 gates (Louizos et al. 2018) with CoFi's Lagrangian: the distribution's formulas, the expected compression,
the ascent on the multipliers, a short fit toward the target, and the contract through removal."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import minisnip
from minisnip.finetune import load_classifier, load_task_data
from minisnip.methods import l0
from minisnip.pruning import apply_pruning, compression, list_branches, select_for_target
from minisnip.pruning.gates import clear_gates
from minisnip.train import StepContext, TrainConfig, fit

pytestmark = pytest.mark.usefixtures("one_thread")

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0
    return ids, mask


def test_sample_and_test_time_gate_follow_their_formulas():
    log_alpha = torch.tensor([-3.0, -0.5, 0.0, 0.7, 4.0], requires_grad=True)
    u = torch.tensor([0.1, 0.5, 0.9, 0.3, 0.02])
    z = l0.sample_gates(log_alpha, u=u)
    s = 1 / (1 + torch.exp(-(torch.log(u) - torch.log(1 - u) + log_alpha.detach()) / BETA))
    assert torch.allclose(z, torch.clamp(s * (ZETA - GAMMA) + GAMMA, 0, 1), atol=1e-6)
    z.sum().backward()  # differentiable in log α where the gate is not clamped
    assert log_alpha.grad is not None and log_alpha.grad[1] > 0
    sig = torch.sigmoid(log_alpha.detach())
    assert torch.allclose(l0.deterministic_gates(log_alpha.detach()), torch.clamp(sig * 1.2 - 0.1, 0, 1))
    expect = 1 / (1 + torch.exp(-(log_alpha.detach() - BETA * math.log(0.1 / 1.1))))
    assert torch.allclose(l0.prob_open(log_alpha.detach()), expect)
    # random samples lie in [0, 1] with mass at both ends
    many = l0.sample_gates(torch.zeros(10_000))
    assert many.min() == 0 and many.max() == 1 and (many == 0).any() and (many == 1).any()


def test_monte_carlo_probability_of_an_open_gate_matches_the_closed_form():
    """P(z != 0) estimated from 100,000 samples per log α lies within 0.005 of sigma(log α - β log(-γ/ζ))
    (the binomial standard error is at most 0.5/sqrt(1e5) = 0.0016, so 0.005 is over 3 sigma)."""
    torch.manual_seed(0)
    log_alpha = torch.tensor([-3.0, -1.5, 0.0, 1.0, 2.5])
    z = l0.sample_gates(log_alpha.expand(100_000, -1).contiguous())
    assert torch.allclose((z > 0).float().mean(0), l0.prob_open(log_alpha), atol=0.005)


def test_expected_compression_is_the_compression_of_the_expected_removal(tiny_model):
    """With P(z != 0) in {0, 1}, ŝ equals the compression measured after physically removing the closed
    branches (no block emptied, so no block bias goes); with P = 1/2 it is half the branches' share."""
    model = tiny_model(minisnip.BertForSequenceClassification)
    branches = list_branches(model, ("head", "neurons"), 32)
    params = torch.tensor([float(b.params) for b in branches], dtype=torch.float64)
    present = minisnip.pruning.encoder_linear_params(model)
    dense = minisnip.pruning.dense_encoder_linear_params(model.config)
    closed = {"layer0.head1", "layer1.head3", "layer0.neurons2", "layer1.neurons0"}
    p = torch.tensor([0.0 if b.name in closed else 1.0 for b in branches], dtype=torch.float64)
    s_hat = float(l0.expected_compression(p, params, present, dense))
    pruned = copy.deepcopy(model)
    apply_pruning(pruned, [b for b in branches if b.name in closed])
    assert s_hat == pytest.approx(compression(pruned), abs=1e-12)
    half = float(l0.expected_compression(torch.full_like(p, 0.5), params, present, dense))
    assert half == pytest.approx(0.5 * sum(b.params for b in branches) / dense)


def test_lagrangian_is_zero_at_the_target_and_its_ascent_pulls_compression_toward_it(tiny_model):
    assert float(l0.lagrangian(torch.tensor(0.3), 0.3, torch.tensor(2.0), torch.tensor(5.0))) == 0.0
    model = tiny_model(minisnip.BertForSequenceClassification)
    # gates half open (log α = 0), where a plain gradient step on log α moves ŝ visibly; from the default open
    # start (log α ≈ 4.6) σ' is 0.002 and one step of 0.1 x gradient is below float32's resolution of ŝ
    [hook] = l0.training_hooks(model, l0.Config(target_warmup=0.0, init_drop=0.5), 0.6, 10, ("head", "neurons"), 32)
    opt = torch.optim.AdamW(hook.param_groups())
    ids, mask = _inputs()
    ctx = StepContext(step=1, total_steps=10, epoch=1, model=model, batch={"attention_mask": mask})
    for _ in range(3):  # ŝ ≈ 0.17 < t = 0.6 throughout
        opt.zero_grad()
        hook.before_forward(ctx)
        term = hook.loss(ctx)
        term.backward()
        hook.after_backward(ctx)
        opt.step()
    assert hook.expected_compression().item() < 0.6
    assert hook.lambda1.item() < 0  # ascent on λ1 (ŝ - t): λ1 falls while ŝ < t
    assert hook.lambda2.item() > 0  # ascent on λ2 (ŝ - t)^2: λ2 only grows
    # now the term's gradient raises ŝ: descent on log α moves it toward t
    s_hat = hook.expected_compression()
    gap = s_hat - 0.6
    d_term_d_s = hook.lambda1 + 2 * hook.lambda2 * gap
    assert d_term_d_s.item() < 0
    before = s_hat.item()
    opt.zero_grad()
    hook.loss(ctx).backward()
    with torch.no_grad():
        hook.log_alpha -= 0.1 * hook.log_alpha.grad
    assert hook.expected_compression().item() > before
    clear_gates(model)


def test_short_fit_moves_expected_compression_to_the_target(tiny_folder, glue_fixtures_dir):
    tokenizer = minisnip.load_tokenizer(tiny_folder)
    data = load_task_data("sst2", tokenizer, glue_fixtures_dir, max_length=32)
    torch.manual_seed(0)
    model = load_classifier(tiny_folder, data.task)
    cfg = TrainConfig(epochs=100, batch_size=2, lr=1e-3, max_length=32, warmup_ratio=0.0, progress=False)
    steps = cfg.steps_per_epoch(len(data.train)) * cfg.epochs
    hooks = l0.training_hooks(model, l0.Config(), 0.5, steps, ("head", "neurons"), 16)
    start = hooks[0].expected_compression().item()
    history = fit(model, tokenizer, data.task, data.train, {"dev": data.dev["dev"]}, cfg, hooks=hooks,
                  restore_best=False)
    last = history.epochs[-1]
    assert {"expected_compression", "target_now", "lambda1", "lambda2", "gates_closed"} <= set(last)
    assert start < 0.25 and abs(last["expected_compression"] - 0.5) < 0.05
    assert last["target_now"] == 0.5

    # the contract: scores -> select_for_target -> before_removal -> removal
    branches = list_branches(model, ("head", "neurons"), 16)
    scores = l0.scores(model, hooks, [], ("head", "neurons"), 16)
    assert set(scores) == {b.name for b in branches}
    names = select_for_target(branches, scores, 0.5, model=model)
    gone = set(names)
    keep = torch.tensor([0.0 if (b.name in gone or b.parent in gone) else 1.0 for b in branches])
    # fit's last evaluation saw exactly this selection (eval_gates="selection")
    assert torch.equal(model.bert.layers[0].attention.head_gate, keep[:4])
    gated = copy.deepcopy(model)
    hooks[0].layout.apply(gated, keep)
    _zero_emptied_blocks(gated, gone)
    l0.before_removal(model, hooks)
    assert all(layer.attention is None or layer.attention.head_gate is None for layer in model.bert.layers)
    report = apply_pruning(model, names, neuron_group_size=16)
    assert 0.5 <= report["compression"] < 0.5 + 1100 / report["dense_params"]
    ids = torch.randint(5, 1000, (2, 10))
    gated.eval(), model.eval()
    assert torch.allclose(gated(ids), model(ids), atol=1e-5)


def _zero_emptied_blocks(model, gone):
    for i, layer in enumerate(model.bert.layers):  # a removed block takes its bias along
        if f"layer{i}.attention" in gone:
            layer.attention.gate = torch.tensor(0.0)
        if f"layer{i}.ffn" in gone:
            layer.ffn.gate = torch.tensor(0.0)


def test_folding_the_test_time_gates_keeps_the_gated_function(tiny_model):
    model = tiny_model(minisnip.BertForSequenceClassification)
    [hook] = l0.training_hooks(model, l0.Config(fold_gates=True), 0.3, 10, ("head", "neurons"), 32)
    with torch.no_grad():
        hook.log_alpha.copy_(torch.linspace(-3.0, 3.0, len(hook.names)))
    zhat = hook.deterministic()
    assert ((zhat > 0) & (zhat < 1)).sum() >= 4 and (zhat == 0).any() and (zhat == 1).any()
    ids, mask = _inputs()
    hook.layout.apply(model, zhat)
    expected = model(ids, mask)
    l0.before_removal(model, [hook])
    assert model.bert.layers[0].ffn.neuron_gate is None
    assert torch.allclose(model(ids, mask), expected, atol=1e-5)


def test_heads_only_and_config_checks(tiny_model):
    model = tiny_model(minisnip.BertForSequenceClassification)
    [hook] = l0.training_hooks(model, l0.Config(), 0.3, 5, ("head",), 32)
    assert len(hook.names) == 8 and all(".head" in n for n in hook.names)
    assert set(l0.scores(model, [hook], [], ("head",), 32)) == set(hook.names)
    l0.before_removal(model, [hook])
    for field, bad in [("lr", 0.0), ("lambda_lr", float("nan")), ("target_warmup", 1.5), ("init_drop", 1.0),
                       ("gamma", 0.1), ("zeta", 0.9), ("beta", -1.0), ("log_alpha_limit", float("inf")),
                       ("fold_gates", 1), ("eval_gates", "soft")]:
        with pytest.raises(ValueError, match=field):
            l0.Config(**{field: bad})
    for bad in (1.0, None, 0.5):  # 0.5: heads own only a third of the encoder
        with pytest.raises(ValueError, match="target"):
            l0.training_hooks(model, l0.Config(), bad, 5, ("head",), 32)
