"""Branches of a BERT encoder: names, parameter and FLOP counts, function norms (Gram trick, padding)."""

from __future__ import annotations

import math

import pytest
import torch

import minisnip
from minisnip.config import BertConfig
from minisnip.model import BertModel
from minisnip.pruning import Branch, encoder_linear_params, list_branches, parse_name
from minisnip.snip import NormEMA, branch_sq_norms, function_norms
from minisnip.surgery import prune_ffn_neurons, prune_heads, remove_blocks

H, HEADS, D, F, L = 64, 4, 16, 128, 3


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0, layers: int = L) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=H, num_hidden_layers=layers, num_attention_heads=HEADS,
                        intermediate_size=F, max_position_embeddings=32)
    model = BertModel(config).eval()
    with torch.no_grad():  # larger than BERT's 0.02 init so norms are O(1) and differ between branches
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
            elif p is not None:
                p.normal_(0, 0.1)
    return model


def batch(seed: int = 1, b: int = 3, s: int = 10) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, 6:] = 0
    if b > 2:
        mask[2, 3:] = 0
    ids = ids * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def traced(model, bt):
    trace = []
    with torch.no_grad():
        model(bt["input_ids"], bt["attention_mask"], bt["token_type_ids"], trace=trace)
    return trace


def pruned_model() -> BertModel:
    m = tiny_model()
    prune_heads(m, {0: [1], 2: [0, 3]})
    prune_ffn_neurons(m, {1: list(range(0, 128, 3))})
    remove_blocks(m, attention=[1])
    return m


# --- names, params, flops -----------------------------------------------------------------------------------

def test_names_use_original_head_indices_and_parse_back():
    m = pruned_model()
    names = [b.name for b in list_branches(m, ("head", "attention", "ffn", "neurons"), neuron_group_size=32)]
    assert names[:5] == ["layer0.head0", "layer0.head2", "layer0.head3", "layer0.attention", "layer0.neurons0"]
    assert "layer1.attention" not in names and "layer1.head0" not in names
    assert [n for n in names if n.startswith("layer2.head")] == ["layer2.head1", "layer2.head2"]
    # layer 1 keeps 128 - 43 = 85 neurons -> groups of 32, 32, 21
    groups = [b for b in list_branches(m, ("neurons",), neuron_group_size=32) if b.layer == 1]
    assert [len(b.neurons) for b in groups] == [32, 32, 21] and groups[2].neurons == tuple(range(64, 85))
    for n in names:
        layer, kind, index = parse_name(n)
        assert n.startswith(f"layer{layer}.{kind}")
    with pytest.raises(ValueError):
        parse_name("layer1.head")


def _true_params(model) -> dict[str, int]:
    """Parameter counts read off the weight shapes, independent of the formulas in pruning/branches.py."""
    out = {}
    for i, layer in enumerate(model.layers):
        a = layer.attention
        if a is not None:
            n = a.num_heads
            qkv = a.qkv.weight.numel() + a.qkv.bias.numel()
            out_w = a.out.weight.numel()
            for h in a.heads:
                out[f"layer{i}.head{h}"] = qkv // n + out_w // n
            out[f"layer{i}.attention"] = qkv + out_w + a.out.bias.numel()
        f = layer.ffn
        if f is not None:
            out[f"layer{i}.ffn"] = sum(p.numel() for p in f.parameters())
    return out


@pytest.mark.parametrize("make", [tiny_model, pruned_model])
def test_param_counts_match_weights_and_sum_to_encoder_params(make):
    m = make()
    total = encoder_linear_params(m)
    truth = _true_params(m)
    blocks = list_branches(m, ("attention", "ffn"))
    assert sum(b.params for b in blocks) == total
    for b in list_branches(m, ("head", "attention", "ffn")):
        assert b.params == truth[b.name], b.name
    # parts + the block biases that no part owns = everything
    parts = list_branches(m, ("head", "neurons"), neuron_group_size=5)
    biases = sum(l.attention.out.bias.numel() for l in m.layers if l.attention is not None) + \
        sum(l.ffn.down.bias.numel() for l in m.layers if l.ffn is not None)
    assert sum(b.params for b in parts) + biases == total


def test_flops_by_hand():
    m = tiny_model()
    bs = {b.name: b for b in list_branches(m, ("head", "attention", "ffn", "neurons"), neuron_group_size=32,
                                           seq_len=128)}
    # head: Q,K,V 3*64*16, scores 128*16, weighted values 128*16, output 16*64 multiply-adds; x2
    head = 2 * (3 * 64 * 16 + 128 * 16 + 128 * 16 + 16 * 64)
    assert head == 16384 and bs["layer0.head0"].flops == head
    assert bs["layer0.attention"].flops == 4 * head
    assert bs["layer0.ffn"].flops == 2 * (64 * 128 + 128 * 64)
    assert bs["layer0.neurons1"].flops == 2 * 2 * 64 * 32
    assert list_branches(m, ("head",), seq_len=8)[0].flops == 2 * (4 * 64 * 16 + 2 * 8 * 16)


def test_kind_validation():
    m = tiny_model(layers=1)
    with pytest.raises(ValueError, match="unknown"):
        list_branches(m, ("heads",))
    # neuron groups without a size: 2 * head_dim, as everywhere
    assert list_branches(m, ("neurons",)) == list_branches(m, ("neurons",), neuron_group_size=2 * m.config.head_dim)
    with pytest.raises(ValueError, match="neuron_group_size"):
        list_branches(m, ("neurons",), neuron_group_size=0)
    with pytest.raises(ValueError, match="neuron_group_size"):
        list_branches(m, ("ffn",), neuron_group_size=4)


# --- function norms -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [tiny_model, pruned_model])
def test_gram_head_norms_equal_head_outputs(make):
    m = make()
    bt = batch()
    trace = traced(m, bt)
    mask = bt["attention_mask"].bool()
    for i, (t, layer) in enumerate(zip(trace, m.layers)):
        names, sq = branch_sq_norms(t, layer, bt["attention_mask"], ("head",), layer_index=i)
        if layer.attention is None:
            assert names == [] and sq.shape[-1] == 0
            continue
        ref = layer.attention.head_outputs(t.context).pow(2).sum(-1).transpose(1, 2)  # (B, S, heads)
        ref = ref * mask[..., None]
        assert names == [f"layer{i}.head{h}" for h in layer.attention.heads]
        torch.testing.assert_close(sq, ref, rtol=1e-5, atol=1e-5)


def test_gram_neuron_group_norms_equal_brute_force():
    m = pruned_model()
    bt = batch()
    trace = traced(m, bt)
    for size in (1, 7, 32):
        for i, (t, layer) in enumerate(zip(trace, m.layers)):
            names, sq = branch_sq_norms(t, layer, None, ("neurons",), layer_index=i, neuron_group_size=size)
            w, z = layer.ffn.down.weight, t.ffn_act
            ref = torch.stack([(z[..., s:s + size] @ w[:, s:s + size].T).pow(2).sum(-1)
                               for s in range(0, layer.ffn.ffn_dim, size)], -1)
            assert len(names) == math.ceil(layer.ffn.ffn_dim / size)
            torch.testing.assert_close(sq, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [tiny_model, pruned_model])
@pytest.mark.parametrize("layout", ["contiguous", "token_major"])
def test_summed_norms_equal_per_token_norms_summed_values_and_gradients(make, layout):
    """branch_sq_sums (token Gram matrices, the prior's and function_norms' path) == branch_sq_norms summed over
    tokens, values and gradients into the trace and the weights, float64; with padding (mask) and without, block
    and head gates, group sizes that do and do not divide the FFN width, both memory layouts of the context."""
    from minisnip.snip.norms import branch_sq_sums
    m = make().double()
    m.layers[0].attention.gate = torch.tensor(0.7, dtype=torch.float64)
    m.layers[0].attention.head_gate = torch.tensor([1.0, 0.5, 0.0, 1.0], dtype=torch.float64)[:m.layers[0].attention.num_heads]
    m.layers[2].ffn.gate = torch.tensor(1.3, dtype=torch.float64)
    bt = batch()
    trace = []
    m(bt["input_ids"], bt["attention_mask"], bt["token_type_ids"], trace=trace)
    for t in trace:
        if t.context is not None:
            # attention kernels return (B, n, S, d) views of (B, S, n, d) memory; the reference layout is contiguous
            t.context = t.context.contiguous() if layout == "contiguous" \
                else t.context.transpose(1, 2).contiguous().transpose(1, 2)
    kinds = ("head", "attention", "ffn", "neurons")
    params = [p for p in m.parameters()]
    g = torch.Generator().manual_seed(0)
    for size in (1, 24, 32):
        for mask in (bt["attention_mask"].bool(), None):
            for i, (t, layer) in enumerate(zip(trace, m.layers)):
                names, per_token = branch_sq_norms(t, layer, mask, kinds, layer_index=i, neuron_group_size=size)
                names2, sums = branch_sq_sums(t, layer, mask, kinds, layer_index=i, neuron_group_size=size)
                ref = per_token.sum(dim=(0, 1))
                assert names2 == names
                torch.testing.assert_close(sums, ref, rtol=1e-12, atol=1e-12)
                w = torch.randn(ref.shape, generator=g, dtype=torch.float64)
                inputs = [x for x in (t.context, t.ffn_act) if x is not None] + params
                ga = torch.autograd.grad((ref * w).sum(), inputs, allow_unused=True, retain_graph=True)
                gb = torch.autograd.grad((sums * w).sum(), inputs, allow_unused=True, retain_graph=True)
                for x, y in zip(ga, gb):
                    assert (x is None) == (y is None)
                    if x is not None:
                        torch.testing.assert_close(y, x, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make", [tiny_model, pruned_model])
def test_packed_trace_gives_the_sums_of_the_padded_trace_values_and_gradients(make):
    """A trace recorded with pack_trace=True (real tokens only; the prior's path in fit) gives the same branch sums
    as the trace of the padded computation, values and gradients into the weights, float64, for every kind and
    for group sizes that do and do not divide the FFN width; the model's output is the same too."""
    from minisnip.snip.norms import batch_sq_norms
    m = make().double()
    m.layers[0].attention.head_gate = torch.tensor([1.0, 0.5, 0.0, 1.0], dtype=torch.float64)[:m.layers[0].attention.num_heads]
    m.layers[2].ffn.gate = torch.tensor(1.3, dtype=torch.float64)
    bt = batch()
    assert (bt["attention_mask"] == 0).any()
    params = [p for p in m.parameters()]
    kinds = ("head", "attention", "ffn", "neurons")
    g = torch.Generator().manual_seed(0)
    for size in (1, 24, 32):
        runs = []
        for pack in (False, True):
            trace = []
            out = m(bt["input_ids"], bt["attention_mask"], bt["token_type_ids"], trace=trace, pack_trace=pack)
            assert all((t.packing is not None) == pack for t in trace)
            names, sums, count = batch_sq_norms(m, trace, bt["attention_mask"], kinds, size)
            runs.append((out, names, sums, count))
        (out0, names0, sums0, count0), (out1, names1, sums1, count1) = runs
        assert names1 == names0 and int(count1) == int(count0)
        torch.testing.assert_close(out1, out0, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sums1, sums0, rtol=1e-12, atol=1e-12)
        w = torch.randn(sums0.shape, generator=g, dtype=torch.float64)
        ga = torch.autograd.grad((sums0 * w).sum(), params, allow_unused=True)
        gb = torch.autograd.grad((sums1 * w).sum(), params, allow_unused=True)
        for x, y in zip(ga, gb):
            assert (x is None) == (y is None)
            if x is not None:
                torch.testing.assert_close(y, x, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="packed"):
        branch_sq_norms(trace[0], m.layers[0], bt["attention_mask"].bool(), kinds, layer_index=0, neuron_group_size=32)


def test_block_norms_equal_brute_force_over_real_tokens():
    m = tiny_model()
    batches = [batch(1), batch(2, b=2, s=7)]
    norms = function_norms(m, batches, kinds=("attention", "ffn"))
    for i in range(L):
        ffn_sq, att_sq = [], []
        for bt in batches:
            t = traced(m, bt)[i]
            keep = bt["attention_mask"].bool()
            ffn_sq.append(t.ffn_out[keep].pow(2).sum(-1))
            att_sq.append(m.layers[i].attention(t.x, keep[:, None, None, :])[keep].pow(2).sum(-1))
        assert norms[f"layer{i}.ffn"] == pytest.approx(torch.cat(ffn_sq).double().mean().sqrt().item(), rel=1e-5)
        assert norms[f"layer{i}.attention"] == pytest.approx(torch.cat(att_sq).double().mean().sqrt().item(),
                                                             rel=1e-5)


def test_padding_tokens_do_not_change_norms():
    m = tiny_model()
    bt = batch()
    kinds = ("head", "attention", "ffn", "neurons")
    a = function_norms(m, [bt], kinds=kinds, neuron_group_size=16)
    other = dict(bt)
    pad = bt["attention_mask"] == 0
    other["input_ids"] = torch.where(pad, torch.full_like(bt["input_ids"], 77), bt["input_ids"])
    other["token_type_ids"] = pad.long()
    b = function_norms(m, [other], kinds=kinds, neuron_group_size=16)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-5), k
    # ... whereas counting the padding would change them
    no_mask = {"input_ids": other["input_ids"], "token_type_ids": other["token_type_ids"]}
    assert function_norms(m, [no_mask], kinds=("ffn",))["layer0.ffn"] != pytest.approx(a["layer0.ffn"], rel=1e-3)


def test_gated_branches_have_norm_zero():
    m = tiny_model()
    m.layers[0].attention.head_gate = torch.tensor([1.0, 1.0, 0.0, 1.0])
    gate = torch.ones(F)
    gate[16:32] = 0
    m.layers[1].ffn.neuron_gate = gate
    m.layers[2].attention.gate = torch.tensor(0.0)
    m.layers[2].ffn.gate = torch.tensor(0.0)
    n = function_norms(m, [batch()], kinds=("head", "attention", "ffn", "neurons"), neuron_group_size=16)
    assert n["layer0.head2"] == 0.0 and n["layer0.head1"] > 0
    assert n["layer1.neurons1"] == 0.0 and n["layer1.neurons0"] > 0
    assert n["layer2.attention"] == 0.0 and all(n[f"layer2.head{h}"] == 0.0 for h in range(HEADS))
    assert n["layer2.ffn"] == 0.0 and n["layer2.neurons3"] == 0.0


def test_param_weighted_and_mode_restored():
    m = tiny_model()
    m.train()
    plain = function_norms(m, [batch()])
    assert m.training
    per = function_norms(m, [batch()], param_weighted=True)
    params = {b.name: b.params for b in list_branches(m)}
    for k in plain:
        assert per[k] == pytest.approx(plain[k] / params[k])
    with pytest.raises(ValueError, match="no calibration"):
        function_norms(m, [])


def test_norm_ema():
    m = tiny_model()
    b1, b2 = batch(1), batch(2)
    ema = NormEMA(kinds=("head", "ffn"), decay=0.5)
    assert ema.norms() == {}
    for bt in (b1, b2):
        ema.update(traced(m, bt), bt["attention_mask"], m)
    n1 = function_norms(m, [b1], kinds=("head", "ffn"))
    n2 = function_norms(m, [b2], kinds=("head", "ffn"))
    for k, v in ema.norms().items():
        assert v == pytest.approx(math.sqrt(0.5 * n1[k] ** 2 + 0.5 * n2[k] ** 2), rel=1e-5)
    # a pruned branch disappears from the estimate
    prune_heads(m, {0: [2]})
    ema.update(traced(m, b1), b1["attention_mask"], m)
    assert "layer0.head2" not in ema.norms() and "layer0.head1" in ema.norms()
    with pytest.raises(ValueError, match="decay"):
        NormEMA(decay=1.0)


# --- the real checkpoint ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    try:
        path = minisnip.default_model_path()
    except ImportError as e:
        pytest.skip(str(e))
    return BertModel.from_pretrained(path).eval()


def test_minilm_branches_and_gram(minilm):
    total = encoder_linear_params(minilm)
    c = minilm.config
    assert total == 6 * (4 * 384 * 384 + 4 * 384 + 2 * 384 * 1536 + 1536 + 384)
    assert sum(b.params for b in list_branches(minilm, ("attention", "ffn"))) == total
    assert len(list_branches(minilm, ("head",))) == c.num_hidden_layers * c.num_attention_heads
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (2, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    trace = []
    with torch.no_grad():
        minilm(ids, mask, trace=trace)
    for i in (0, 5):
        t, layer = trace[i], minilm.layers[i]
        _, sq = branch_sq_norms(t, layer, None, ("head",), layer_index=i)
        ref = layer.attention.head_outputs(t.context).pow(2).sum(-1).transpose(1, 2)
        torch.testing.assert_close(sq, ref, rtol=1e-5, atol=1e-5)
    norms = function_norms(minilm, [{"input_ids": ids, "attention_mask": mask}], kinds=("head", "ffn"))
    assert len(norms) == 6 * 12 + 6 and all(math.isfinite(v) and v > 0 for v in norms.values())


def test_branch_is_frozen():
    b = Branch("layer0.ffn", "ffn", 0, None, 10, 20)
    with pytest.raises(Exception):
        b.params = 3  # type: ignore[misc]


def test_gram_sums_under_bf16_autocast_accumulate_in_float32_and_return_input_dtypes():
    """_GramSums on bf16 inputs inside autocast: the value of the float32 formula on the same (bf16) numbers, and
    gradients in the inputs' dtypes (x bf16, possibly a transposed view; W float32, a strided view), equal to
    float32 autograd of sum_t ||W_k x_t||^2 rounded to bf16."""
    from minisnip.snip.norms import _GramSums
    torch.manual_seed(0)
    x = torch.randn(3, 5, 40).to(torch.bfloat16).transpose(1, 2).requires_grad_()  # (K, T=40, m=5): a view
    keep = (torch.rand(3, 40, 1) > 0.3).float()
    w = torch.randn(7, 15, requires_grad=True)  # (rows, K m), viewed (rows, K, m) as W_O and W_2 are
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = _GramSums.apply(x, keep, w.view(7, 3, 5))
    assert s.dtype == torch.float32
    x32, w32 = x.detach().float().requires_grad_(), w.detach().clone().requires_grad_()
    ref = (torch.einsum("rkm,ktm->ktr", w32.view(7, 3, 5), x32).pow(2) * keep).sum(dim=(1, 2))
    torch.testing.assert_close(s, ref, rtol=1e-5, atol=1e-4)
    c = torch.randn(3)
    (s * c).sum().backward()
    (ref * c).sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, x32.grad.to(torch.bfloat16))
    torch.testing.assert_close(w.grad, w32.grad, rtol=1e-5, atol=1e-4)
