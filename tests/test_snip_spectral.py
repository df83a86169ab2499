"""Spectral normalization (minisnip.snip.spectral): power iteration, the SNGP-style cap, QKV blocks, removal."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from minisnip import BertConfig, BertForSequenceClassification, BertModel
from minisnip.snip.spectral import (SpectralNorm, apply_spectral_norm, power_iteration, register_spectral_norm,
                                    remove_spectral_norm,
                                    spectral_bounds, spectral_norm_exact, spectral_norms)
from minisnip.surgery import prune_heads


# LAPACK's SVD (torch.linalg.matrix_norm(W, 2)) slows down 10-100x when its threads compete with other
# processes for the cores (seen on a shared 2-core runner); these matrices are small, one thread is plenty.
pytestmark = pytest.mark.usefixtures("one_thread")


def small_config(**kw) -> BertConfig:
    base = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertConfig(**{**base, **kw})


def batch(seed: int = 0, b: int = 3, s: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 99, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


@pytest.mark.parametrize("kind", ["gaussian", "low_rank", "wide"])
def test_power_iteration_converges_to_exact_norm(kind):
    g = torch.Generator().manual_seed(1)
    W = {"gaussian": lambda: torch.randn(50, 30, generator=g, dtype=torch.float64),
         "low_rank": lambda: (torch.randn(40, 3, generator=g, dtype=torch.float64)
                              @ torch.randn(3, 60, generator=g, dtype=torch.float64)),
         "wide": lambda: 0.02 * torch.randn(20, 80, generator=g, dtype=torch.float64)}[kind]()
    u0 = torch.nn.functional.normalize(torch.randn(W.shape[0], generator=g, dtype=torch.float64), dim=0)
    exact = torch.linalg.matrix_norm(W, 2)
    sigma, u, v = power_iteration(W, u0, n_iter=500)
    assert abs(sigma - exact) / exact < 1e-4
    assert sigma <= exact * (1 + 1e-12)  # the estimate ||W v|| approaches σ from below
    assert torch.allclose(torch.stack([u.norm(), v.norm()]), torch.ones(2, dtype=torch.float64))
    assert torch.isclose(spectral_norm_exact(W), exact)


def test_power_iteration_sigma_is_differentiable_but_vectors_are_not():
    W = torch.randn(6, 4, requires_grad=True)
    sigma, u, v = power_iteration(W, torch.nn.functional.normalize(torch.randn(6), dim=0), n_iter=3)
    assert sigma.requires_grad and not u.requires_grad and not v.requires_grad
    sigma.backward()
    assert torch.allclose(W.grad, torch.outer(u, v))  # ∂(u^T W v)/∂W = u v^T with u, v held constant


@pytest.mark.parametrize("k", [1, 2, 5])
def test_matches_torch_spectral_norm_with_bound_one(k):
    """With c = 1 and σ > 1, W·min(1, 1/σ̂) = W/σ̂: torch's spectral_norm, step for step.

    torch's power method starts each step from v (u ← Wv, v ← W^T u); Miyato's Alg. 1, ours, from u. On
    torch's dim=1 matrix W^T the two are the same sequence, with torch's _v playing our u and _u our v.
    """
    torch.manual_seed(0)
    ours, ref = nn.Linear(20, 30), nn.Linear(20, 30)
    with torch.no_grad():
        ours.weight.mul_(10.0)
        ref.weight.copy_(ours.weight)
        ref.bias.copy_(ours.bias)
    assert spectral_norm_exact(ours.weight) > 1
    ref = nn.utils.parametrizations.spectral_norm(ref, dim=1)
    sn = register_spectral_norm(ours, bound=1.0)
    torch_sn = ref.parametrizations.weight[0]
    with torch.no_grad():
        sn.u[0].copy_(torch_sn._v)
        sn.v[0].copy_(torch_sn._u)
    assert ours.training and sn.training and ref.training
    for _ in range(k):
        w_ours, w_ref = ours.weight, ref.weight
    assert torch.allclose(w_ours, w_ref, atol=1e-5, rtol=0)
    # gradients through σ̂ agree as well, and reach the original weight
    x = torch.randn(7, 20)
    (ours(x) ** 2).sum().backward()
    (ref(x) ** 2).sum().backward()
    g_ours = ours.parametrizations.weight.original.grad
    g_ref = ref.parametrizations.weight.original.grad
    assert g_ours is not None and g_ours.abs().sum() > 0
    assert torch.allclose(g_ours, g_ref, atol=1e-5, rtol=1e-4)


def test_weight_below_bound_is_unchanged():
    W = torch.randn(16, 8)
    sigma = spectral_norm_exact(W)
    sn = SpectralNorm(W, bound=float(sigma) * 1.5)
    sn.train(True)
    assert torch.equal(sn(W), W)
    sn_low = SpectralNorm(W, bound=float(sigma) / 2)
    assert torch.allclose(spectral_norm_exact(sn_low.eval()(W)), sigma / 2, rtol=1e-4)


def test_qkv_blocks_are_normalised_separately():
    torch.manual_seed(0)
    q, k, v = torch.randn(12, 12) * 2, torch.randn(12, 12) * 0.5, torch.randn(12, 12) * 0.05
    W = torch.cat([q, k, v]).requires_grad_()
    sigmas = [float(spectral_norm_exact(m)) for m in (q, k, v)]
    assert sigmas[0] > 1 and sigmas[1] > 1 and sigmas[2] < 1
    sn = SpectralNorm(W, blocks=3, bound=1.0, init_iterations=1)
    for _ in range(200):  # converge the power iteration, one step per training forward
        out = sn(W)
    for b, block in enumerate(out.detach().chunk(3)):
        assert spectral_norm_exact(block) <= 1.0 + 1e-4
    assert torch.equal(out.detach()[24:], v)  # V (σ < 1) untouched: its own bound, not Q's
    fused = SpectralNorm(W, blocks=1, bound=1.0)(W).detach()
    assert not torch.allclose(fused[24:], v)  # one bound for the stack would have shrunk V with Q
    out.sum().backward()
    assert W.grad is not None and W.grad.abs().sum() > 0


def test_init_bound_keeps_random_model_outputs():
    torch.manual_seed(0)
    model = BertForSequenceClassification(small_config()).eval()
    x = batch()
    before = model(**x)
    names = apply_spectral_norm(model)
    assert names == [f"layers.{i}.{n}" for i in range(2)
                     for n in ("attention.qkv", "attention.out", "ffn.up", "ffn.down")]
    assert torch.allclose(model(**x), before, atol=1e-5, rtol=0)
    model.train()
    assert torch.allclose(model(**x), before, atol=1e-5, rtol=0)  # dropout is 0; one power step changes ~nothing
    bounds, norms = spectral_bounds(model), spectral_norms(model)
    assert bounds.keys() == norms.keys() and len(norms) == 2 * 6
    assert all(abs(norms[n] - bounds[n]) < 1e-4 * bounds[n] for n in norms)
    with pytest.raises(ValueError, match="already"):
        apply_spectral_norm(model)


def test_init_bound_keeps_minilm_outputs():
    import minisnip
    try:
        path = minisnip.default_model_path()
    except ImportError:
        pytest.skip("all-MiniLM-L6-v2 is not installed")
    model = BertModel.from_pretrained(path).eval()
    x = batch(s=12)
    before = model(**x)
    sigma_before = spectral_norms(model)
    apply_spectral_norm(model, init_iterations=50)
    assert torch.allclose(model(**x), before, atol=1e-5, rtol=0)
    assert min(sigma_before.values()) > 2  # pretrained matrices: σ well above 1 (see the module docstring)
    bounds = spectral_bounds(model)
    assert all(abs(bounds[n] - s) < 1e-4 * s for n, s in sigma_before.items())


def test_remove_spectral_norm_bakes_plain_weights():
    torch.manual_seed(0)
    model = BertForSequenceClassification(small_config())
    apply_spectral_norm(model, bound=0.1)  # below the init σ (~0.25): the weights really change
    model.eval()
    x = batch()
    with_sn = model(**x)
    assert remove_spectral_norm(model)
    for layer in model.bert.layers:
        for lin in (layer.attention.qkv, layer.attention.out, layer.ffn.up, layer.ffn.down):
            assert type(lin) is nn.Linear and isinstance(lin.weight, nn.Parameter)
            assert not parametrize.is_parametrized(lin)
    assert torch.equal(model(**x), with_sn)
    assert set(model.state_dict()) == set(BertForSequenceClassification(small_config()).state_dict())
    assert all(s <= 0.1 * (1 + 1e-4) for s in spectral_norms(model).values())
    prune_heads(model, {0: [1, 2]})  # plain weights: physical pruning works
    assert model.bert.layers[0].attention.qkv.out_features == 3 * 2 * 8


@pytest.mark.parametrize("bound", ["init", 0.1])
def test_training_keeps_sigma_under_bound(bound):
    """Adam steps make the unconstrained weights grow past c; the weights the forward uses stay at σ ≤ c.

    One power step per training step tracks W when it moves slowly (lr 1e-4 here; see the module docstring
    for how the estimate lags at larger steps), so the cap holds to the power-iteration tolerance.
    """
    torch.manual_seed(0)
    model = BertForSequenceClassification(small_config(num_labels=2))
    apply_spectral_norm(model, bound=bound)
    c = spectral_bounds(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()
    x, labels = batch(), torch.tensor([0, 1, 1])
    for step in range(10):
        loss = model.loss(model(**x), labels)
        # σ of the weights this forward used (the stored u, v were just advanced one step on the current W)
        norms = spectral_norms(model)
        assert all(norms[n] <= c[n] * (1 + 1e-3) for n in norms), {n: norms[n] / c[n] for n in norms}
        opt.zero_grad()
        loss.backward()
        opt.step()
    originals = {n: float(spectral_norm_exact(m.parametrizations.weight.original))
                 for n, m in model.bert.named_modules() if parametrize.is_parametrized(m, "weight")}
    ups = [n for n in originals if n.endswith("ffn.up")]
    assert any(originals[n] > c[n] * 1.001 for n in ups)  # the cap was active: unconstrained W grew past c
    assert model.bert.layers[0].ffn.up.parametrizations.weight.original.grad is not None


def test_init_scale_puts_every_cap_that_share_below_sigma():
    """init_scale s < 1: c = s σ(W) per matrix (Q, K, V each), so at step 0 each matrix is scaled by c / σ̂ < 1
    (s itself where the power iteration has converged, as it has on QKV here)."""
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=16))
    plain = {n: l.weight.detach().clone() for n, l in (("qkv", model.layers[0].attention.qkv),
                                                          ("up", model.layers[0].ffn.up))}
    apply_spectral_norm(model, which=("qkv", "up"), init_scale=0.8)
    model.eval()
    assert torch.allclose(model.layers[0].attention.qkv.weight, 0.8 * plain["qkv"], atol=1e-6)
    from minisnip.snip.spectral import spectral_norm_exact
    sn = model.layers[0].ffn.up.parametrizations.weight[0]
    assert sn.bound.item() == pytest.approx(0.8 * spectral_norm_exact(plain["up"]).item(), rel=1e-5)
    scale = (sn.bound / sn.sigma(plain["up"])).item()
    assert scale < 1 and torch.allclose(model.layers[0].ffn.up.weight, scale * plain["up"], atol=1e-6)
    assert not parametrize.is_parametrized(model.layers[0].attention.out)  # only the matrices asked for
    with pytest.raises(ValueError, match="init_scale"):
        apply_spectral_norm(BertModel(model.config), init_scale=1.5)


@pytest.mark.parametrize("bound", ["equal", 0.05, 1e3])
def test_hand_written_backward_equals_autograd_through_spectral_rescale(bound):
    """SpectralNorm's backward (_Rescale: s G + a <G, W> u v^T) == autograd through spectral_rescale(W, sigma(W), c),
    float64, QKV blocks and single matrices, with the cap acting (c = 0.05 < σ), not acting (1e3), and c = σ̂
    exactly (where clamp's gradient still passes), and an all-zero block; values bit-for-bit spectral_rescale's,
    and W itself (no copy) where the cap acts on no block."""
    from minisnip.snip.spectral import spectral_rescale
    torch.manual_seed(0)
    model = BertModel(small_config()).double()
    apply_spectral_norm(model, bound="init" if bound == "equal" else bound)
    with torch.no_grad():
        model.layers[1].ffn.down.parametrizations.weight.original.zero_()
    model.train()
    g = torch.Generator().manual_seed(3)
    for linear in (model.layers[0].attention.qkv, model.layers[0].ffn.up, model.layers[1].ffn.down):
        sn = linear.parametrizations.weight[0]
        W = linear.parametrizations.weight.original
        sn.train(False)  # no power step between the two computations: both see the same u, v
        if bound == "equal":
            sn.bound.copy_(sn.sigma(W).detach())
        ratio = sn.bound / sn.sigma(W).detach().clamp_min(sn.eps)
        assert bool((ratio < 1).all()) if bound == 0.05 and linear is not model.layers[1].ffn.down else True
        G = torch.randn(W.shape, generator=g, dtype=torch.float64)
        got = linear.weight
        (dW,) = torch.autograd.grad((got * G).sum(), W)
        mats = sn._blocks(W)
        ref = spectral_rescale(mats, sn.sigma(W), sn.bound, sn.eps).view_as(W)
        (ref_dW,) = torch.autograd.grad((ref * G).sum(), W)
        assert torch.equal(got, ref)
        torch.testing.assert_close(dW, ref_dW, rtol=1e-12, atol=1e-12)
        # where the cap acts on no block (1e3; the all-zero block, unless its bound was set to its σ̂ = 0), W itself
        # comes back: no copy on the CPU
        uncapped = bound == 1e3 or (linear is model.layers[1].ffn.down and bound != "equal")
        assert (got.data_ptr() == W.data_ptr()) == uncapped
        sn.train(True)


def test_fit_computes_each_normalised_weight_once_per_step(tiny_folder, glue_fixtures_dir):
    """Under SNIP's prior the step reads W_O and W_2 twice (the forward, the Gram matrices of the norms); fit caches
    the parametrized weight, so every SpectralNorm runs one power iteration per step and the prior sees the
    weight the forward used."""
    import minisnip
    from minisnip.finetune import load_classifier, load_task_data
    from minisnip.pruning.branches import resolve_kinds
    from minisnip.snip import method as snip_method
    from minisnip.train import TrainConfig, fit

    tokenizer = minisnip.load_tokenizer(tiny_folder)
    data = load_task_data("rte", tokenizer, glue_fixtures_dir, max_length=32)
    model = load_classifier(tiny_folder, data.task)
    kinds, size = resolve_kinds(model, ("head", "neurons"), None)
    cfg = TrainConfig(epochs=1, batch_size=4, lr=1e-3, max_length=32, progress=False)
    steps = -(-len(data.train) // cfg.batch_size)
    hooks = snip_method.training_hooks(model, snip_method.Config(prior_warmup=0.0), 0.5, steps, kinds, size)
    assert hooks  # the prior is on: it reads W_O and W_2 once more each step
    sn = [m for m in model.modules() if isinstance(m, SpectralNorm)]
    calls = {id(m): 0 for m in sn}
    for m in sn:
        m.register_forward_hook(lambda mod, args, out: calls.__setitem__(id(mod), calls[id(mod)] + mod.training))
    history = fit(model, tokenizer, data.task, data.train, {"dev": data.dev["dev"]}, cfg, hooks=hooks)
    assert history.steps == steps and len(sn) == 4 * len(model.bert.layers)
    assert set(calls.values()) == {steps}  # one training-mode computation (one power step) per matrix and step
