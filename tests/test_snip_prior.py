"""The identity prior: value, weights, gradients, and what minimising it does."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from minisnip.config import BertConfig
from minisnip.model import BertModel
from minisnip.pruning import list_branches
from minisnip.snip import function_norms, identity_prior


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(hidden=64, heads=4, ffn=128, layers=2, seed=0, scale=0.2) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=ffn, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    model = BertModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, scale)
    return model


def make_batch(b=3, s=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, 5:] = 0
    if b > 2:
        mask[2, 2:] = 0
    return ids * mask, mask


def prior_of(model, ids, mask, **kw):
    """The prior of one batch; these tests penalise heads and FFN blocks unless told otherwise."""
    kw.setdefault("kinds", ("head", "ffn"))
    trace = []
    model(ids, mask, trace=trace)
    return identity_prior(model, trace, mask, **kw)


def test_value_is_sum_of_function_norms():
    m = make_model()
    ids, mask = make_batch()
    with torch.no_grad():
        r = prior_of(m, ids, mask)
    norms = function_norms(m, [{"input_ids": ids, "attention_mask": mask}], kinds=("head", "ffn"))
    assert r.dim() == 0
    assert r.item() == pytest.approx(sum(norms.values()), rel=1e-5)
    with torch.no_grad():
        r_all = prior_of(m, ids, mask, kinds=("head", "attention", "ffn", "neurons"), neuron_group_size=10)
    norms = function_norms(m, [{"input_ids": ids, "attention_mask": mask}],
                           kinds=("head", "attention", "ffn", "neurons"), neuron_group_size=10)
    assert r_all.item() == pytest.approx(sum(norms.values()), rel=1e-5)


def test_default_kinds_are_the_recipes():
    """One default everywhere: heads and FFN neuron groups of 2 * head_dim (pruning.branches.DEFAULT_KINDS)."""
    from minisnip.pruning.branches import DEFAULT_KINDS
    m = make_model()
    ids, mask = make_batch()
    trace = []
    with torch.no_grad():
        m(ids, mask, trace=trace)
        default = identity_prior(m, trace, mask)
        explicit = identity_prior(m, trace, mask, kinds=DEFAULT_KINDS, neuron_group_size=2 * m.config.head_dim)
    assert DEFAULT_KINDS == ("head", "neurons") and default.item() == explicit.item()


def test_weights():
    m = make_model()
    ids, mask = make_batch()
    batches = [{"input_ids": ids, "attention_mask": mask}]
    norms = function_norms(m, batches, kinds=("head", "ffn"))
    params = {b.name: b.params for b in list_branches(m, ("head", "ffn"))}
    mean_p = sum(params.values()) / len(params)
    with torch.no_grad():
        r = prior_of(m, ids, mask, weights="params")
        assert r.item() == pytest.approx(sum(norms[k] * params[k] / mean_p for k in norms), rel=1e-5)
        w = {k: (2.0 if k.endswith("ffn") else 0.0) for k in norms}
        w["layer9.ffn"] = 5.0  # extra names (pruned branches) are ignored
        r = prior_of(m, ids, mask, weights=w)
        assert r.item() == pytest.approx(2 * (norms["layer0.ffn"] + norms["layer1.ffn"]), rel=1e-5)
        with pytest.raises(ValueError, match="no entry"):
            prior_of(m, ids, mask, weights={"layer0.ffn": 1.0})
        with pytest.raises(ValueError, match="weights"):
            prior_of(m, ids, mask, weights="flops")


def test_padding_excluded():
    m = make_model()
    ids, mask = make_batch()
    with torch.no_grad():
        a = prior_of(m, ids, mask)
        b = prior_of(m, torch.where(mask.bool(), ids, torch.full_like(ids, 33)), mask)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


class PriorOf(torch.nn.Module):
    """The prior of a batch as a module, so functional_call swaps the weights for the forward AND the Gram
    matrices identity_prior reads from the layers."""

    def __init__(self, model, **kw):
        super().__init__()
        self.m, self.kw = model, kw

    def forward(self, ids, mask):
        return prior_of(self.m, ids, mask, **self.kw)


def test_gradcheck_double():
    m = make_model(hidden=8, heads=2, ffn=8, layers=1, scale=0.5).double()
    wrapper = PriorOf(m, kinds=("head", "attention", "ffn", "neurons"), weights="params", neuron_group_size=3)
    ids, mask = make_batch(b=2, s=5)
    names = ["m.layers.0.attention.qkv.weight", "m.layers.0.attention.out.weight", "m.layers.0.ffn.up.weight",
             "m.layers.0.ffn.down.weight", "m.layers.0.ffn.down.bias", "m.embeddings.norm.weight"]
    base = dict(wrapper.named_parameters())
    inputs = tuple(base[n].detach().clone().requires_grad_(True) for n in names)

    def f(*tensors):
        return functional_call(wrapper, dict(zip(names, tensors)), (ids, mask))

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gated_branch_gives_finite_gradient():
    m = make_model()
    m.layers[0].attention.head_gate = torch.tensor([1.0, 0.0, 1.0, 1.0])
    ids, mask = make_batch()
    r = prior_of(m, ids, mask)
    r.backward()
    assert torch.isfinite(r)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_minimising_the_prior_drives_branches_to_identity():
    """Only the prior: the penalised branches' norms collapse; the post-LN layers keep outputs finite."""
    m = make_model(hidden=32, heads=4, ffn=64, layers=2, scale=0.2)
    ids, mask = make_batch(b=4, s=8)
    data = [{"input_ids": ids, "attention_mask": mask}]
    before = function_norms(m, data, kinds=("head", "ffn"))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(300):
        opt.zero_grad()
        prior_of(m, ids, mask).backward()
        opt.step()
    after = function_norms(m, data, kinds=("head", "ffn"))
    assert max(after[k] / before[k] for k in before) < 0.05, after
    with torch.no_grad():
        trace = []
        y = m(ids, mask, trace=trace)
    assert torch.isfinite(y).all()
    real = y[mask.bool()]
    # each token is LayerNorm'd: zero mean and (LN weight-scaled) unit spread, not collapsed, not exploding
    assert real.mean(-1).abs().max() < 1e-2 + m.layers[-1].ffn_norm.bias.abs().max()
    assert math.isfinite(real.std().item()) and real.std().item() > 0.1


# --- the proximal step ----------------------------------------------------------------------------------------
def test_group_prox_is_block_soft_thresholding():
    """Against the closed form on hand-made groups: shrink by t / ||W_g||, exactly zero at or below t."""
    from minisnip.snip.prior import group_prox_
    w = torch.tensor([[[3.0, 0.0], [0.3, 0.4], [1.0, 1.0]],
                      [[4.0, 0.0], [0.0, 0.0], [1.0, -1.0]]])  # (rows 2, groups 3, cols 2)
    norms = torch.tensor([5.0, 0.5, 2.0])
    t = torch.tensor([1.0, 0.5, 3.0])
    expected = w * (1 - t / norms).clamp_min(0).view(1, -1, 1)
    group_prox_([w], [t])
    assert torch.allclose(w, expected)
    assert torch.equal(w[:, 1], torch.zeros(2, 2)) and torch.equal(w[:, 2], torch.zeros(2, 2))  # at and below t
    assert torch.allclose(w[:, 0].norm(), torch.tensor(4.0))  # 5 shrunk by 1


def test_proximal_prior_zeroes_small_branches_exactly_and_they_leave_the_function():
    """A prox step with t above some heads' output-weight norms: those heads' W_O columns are exactly zero, so
    their function norm is exactly 0 and removing them changes nothing."""
    from minisnip.pruning import apply_pruning
    from minisnip.snip.prior import ProximalPrior, output_weight_groups
    from minisnip.train import StepContext
    m = make_model()
    heads = output_weight_groups(m, ("head",), None)[0]  # layer 0's W_O as (hidden, heads, d)
    with torch.no_grad():
        heads[:, :2] *= 0.01  # two small heads
    norms = heads.detach().pow(2).sum(dim=(0, 2)).sqrt()
    hook = ProximalPrior(1.0, ("head",), None, weights=None)
    lr = float((norms[:2].max() + norms[2:].min()) / 2)  # t = lr * λ between the small and the large norms
    hook.after_step(StepContext(step=1, total_steps=1, epoch=1, model=m, batch={}, lr=lr))
    after = output_weight_groups(m, ("head",), None)[0].pow(2).sum(dim=(0, 2)).sqrt()
    assert torch.equal(after[:2], torch.zeros(2)) and (after[2:] > 0).all()
    assert torch.allclose(after[2:], norms[2:] - lr, atol=1e-6)
    ids, mask = make_batch()
    fn = function_norms(m, [{"input_ids": ids, "attention_mask": mask}], kinds=("head",))
    assert fn["layer0.head0"] == 0.0 and fn["layer0.head1"] == 0.0
    import copy
    pruned = copy.deepcopy(m)
    apply_pruning(pruned, ["layer0.head0", "layer0.head1"])
    with torch.no_grad():
        assert torch.allclose(m(ids, mask), pruned(ids, mask), atol=1e-6)


def test_proximal_prior_acts_on_the_weight_under_spectral_normalization():
    from minisnip.snip.prior import ProximalPrior
    from minisnip.snip.spectral import apply_spectral_norm
    from minisnip.train import StepContext
    m = make_model()
    apply_spectral_norm(m)
    hook = ProximalPrior(1.0, ("head",), None, weights=None)
    hook.after_step(StepContext(step=1, total_steps=1, epoch=1, model=m, batch={}, lr=1e6))  # t above every norm
    for layer in m.layers:
        assert torch.equal(layer.attention.out.weight, torch.zeros_like(layer.attention.out.weight))


def traced_prior():
    """(model, its trace of one batch, the batch's mask, R on heads and FFN blocks, unweighted): what the gates
    scale."""
    m = make_model()
    ids, mask = make_batch()
    trace = []
    with torch.no_grad():
        m(ids, mask, trace=trace)
        r = identity_prior(m, trace, mask, kinds=("head", "ffn"), weights=None)
    return m, trace, mask, r


def test_loss_gate_scales_the_prior_by_the_share_of_its_first_loss_explained():
    """g_t = clamp(1 - L̄_t / L_1, 0, 1), L̄_t = 0.98 L̄_{t-1} + 0.02 L_t, by hand."""
    from minisnip.snip.prior import PriorPenalty
    m, trace, mask, r = traced_prior()
    plain = PriorPenalty(1e-3, ("head", "ffn"), None, weights=None)
    gated = PriorPenalty(1e-3, ("head", "ffn"), None, weights=None, gate="loss")
    expected = []
    mean = None
    for loss in (1.0, 0.5, 0.5, 2.0):
        mean = loss if mean is None else 0.98 * mean + 0.02 * loss
        expected.append(min(1.0, max(0.0, 1 - mean / 1.0)))
        with torch.no_grad():
            assert plain(m, trace, mask).item() == pytest.approx(1e-3 * r.item(), rel=1e-6)
            got = gated(m, trace, mask, torch.tensor(loss))
        assert got.item() == pytest.approx(1e-3 * r.item() * expected[-1], rel=1e-5, abs=1e-12)
    assert expected[0] == 0.0 and expected[1] == pytest.approx(0.01) and expected[2] == pytest.approx(0.0198)
    assert gated.epoch_log()["prior_loss_gate"] == pytest.approx(expected[-1], abs=1e-6)
    assert plain.epoch_log() == {}
    with pytest.raises(ValueError, match="needs the step's task loss"):
        gated(m, trace, mask)


@pytest.mark.parametrize("regression", [False, True])
def test_baseline_gate_opens_as_the_loss_falls_below_a_constant_predictors(regression):
    """g_t = clamp((1 - L̄_t / B_t) / 0.25, 0, 1), B_t = the entropy of the class frequencies seen (or the variance
    of the targets), L̄_t as for the loss gate; by hand."""
    from minisnip.snip.prior import PriorPenalty
    m, trace, mask, r = traced_prior()
    gated = PriorPenalty(1e-3, ("head", "ffn"), None, weights=None, gate="baseline")
    with pytest.raises(ValueError, match="seen no labels"):
        gated.baseline_loss()
    if regression:
        batches = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])]
        baselines = [0.25, 1.25]  # the variance of 1, 2 and of 1, 2, 3, 4
    else:
        batches = [torch.tensor([0, 0]), torch.tensor([1, 0])]
        p = 0.75
        baselines = [0.0, -(p * math.log(p) + (1 - p) * math.log(1 - p))]  # one class; then 3 of 4 in class 0
    mean = None
    for labels, base, loss in zip(batches, baselines, (0.9, 0.1)):
        gated.observe_labels(labels, regression, 2)
        assert gated.baseline_loss().item() == pytest.approx(base, abs=1e-6)
        mean = loss if mean is None else 0.98 * mean + 0.02 * loss
        expected = min(1.0, max(0.0, (1 - mean / max(base, 1e-12)) / 0.25))
        with torch.no_grad():
            got = gated(m, trace, mask, torch.tensor(loss))
        assert got.item() == pytest.approx(1e-3 * r.item() * expected, rel=1e-5, abs=1e-12)
    assert gated.epoch_log()["prior_gate_baseline_loss"] == pytest.approx(baselines[-1], rel=1e-6)
    with pytest.raises(ValueError, match="gate must be one of"):
        PriorPenalty(1e-3, ("head",), None, gate="grad")


def test_loss_gate_is_a_switch_of_snips_config():
    from minisnip.snip.method import Config
    assert Config().prior_gate == "none" and Config(prior_gate="loss").prior_gate == "loss"
    assert Config(prior_gate="baseline").prior_gate == "baseline"
    with pytest.raises(ValueError, match="prior_gate must be one of"):
        Config(prior_gate="grad")
    with pytest.raises(ValueError, match="not to the proximal step"):
        Config(prior_gate="loss", prior_step="proximal")


def test_targeted_prior_penalises_exactly_the_branches_the_cut_at_the_target_would_remove():
    """PriorPenalty(target=t): the weights are 1 on the branches `select_for_target` takes from the batch's norms
    (the first choice has no running history) and 0 elsewhere."""
    from minisnip.pruning import select_for_target
    from minisnip.snip.prior import PriorPenalty
    m = make_model(layers=3)
    ids, mask = make_batch()
    kinds = ("head", "neurons")
    hook = PriorPenalty(1e-3, kinds, 32, weights=None, target=0.4)
    trace = []
    m(ids, mask, trace=trace)
    got = hook(m, trace, mask)
    norms = function_norms(m, [{"input_ids": ids, "attention_mask": mask}], kinds=kinds, neuron_group_size=32)
    cut = select_for_target(list_branches(m, kinds, 32), norms, 0.4, model=m)
    assert cut and hook.targeted == set(cut)  # this small model's 40% cut takes heads and groups, no whole block
    assert len(hook.targeted) < len(norms)
    assert got.item() == pytest.approx(1e-3 * sum(norms[n] for n in cut), rel=1e-5)
    # the gradient: that of the targeted norms alone (a kept branch's weight is 0, not left out of the sum)
    got.backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    trace = []
    m(ids, mask, trace=trace)
    weights = {n: float(n in cut) for n in norms}
    (1e-3 * identity_prior(m, trace, mask, kinds, weights, 32)).backward()
    for n, p in m.named_parameters():
        if n in want:
            torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-9)
    # chosen anew every TARGET_EVERY steps, from the running norms
    for _ in range(PriorPenalty.TARGET_EVERY - 1):
        hook(m, trace, mask)
    before = hook.targeted
    hook.targeted = None
    hook(m, trace, mask)
    assert hook.targeted == before  # the same batch again: the same norms, the same choice


def test_targeted_prior_takes_every_head_of_a_block_the_cut_takes_whole():
    from minisnip.snip.prior import PriorPenalty
    m = make_model(layers=2)
    with torch.no_grad():
        m.layers[1].attention.out.weight.mul_(1e-3)  # layer 1's heads are the smallest branches by far
    ids, mask = make_batch()
    hook = PriorPenalty(1e-3, ("head", "neurons"), 32, weights=None, target=0.2)
    trace = []
    m(ids, mask, trace=trace)
    hook(m, trace, mask)
    assert {f"layer1.head{h}" for h in range(4)} <= hook.targeted


def test_targeted_prior_is_a_switch_that_needs_a_target():
    from minisnip.snip import method
    from minisnip.snip.prior import PriorPenalty
    m = make_model()
    cfg = method.Config(prior_target=True)
    with pytest.raises(ValueError, match="needs a target compression"):
        method.training_hooks(m, cfg, None, 10, ("head", "neurons"), 32)
    assert not any(hasattr(lin, "parametrizations") for lin in (m.layers[0].attention.out, m.layers[0].ffn.down))
    (hook,) = method.training_hooks(m, cfg, 0.5, 10, ("head", "neurons"), 32)
    assert hook.target == 0.5
    (plain,) = method.training_hooks(make_model(), method.Config(), 0.5, 10, ("head", "neurons"), 32)
    assert plain.target is None
    with pytest.raises(ValueError, match="not to the proximal step"):
        method.Config(prior_target=True, prior_step="proximal")
    with pytest.raises(ValueError, match="target must be a compression"):
        PriorPenalty(1e-3, ("head",), None, target=1.5)
