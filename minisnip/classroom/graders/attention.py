"""Checks of the part "attention": `minisnip.model.attention_head` and `minisnip.model.project_heads`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import check_tensor, random_state, seeded, small_config


def _block():
    from minisnip.model import Attention
    return Attention(small_config(), heads=[0, 1, 2, 3]).eval()


def make_cases() -> dict:
    """Inputs and the reference library's outputs."""
    from minisnip.model import attention_head, project_heads
    g = seeded(0)
    heads = []
    q = 2 * torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    k = 2 * torch.randn(2, 3, 7, 4, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, 7, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 1, 5, 7, generator=g) > 0.4
    mask[..., 0] = True
    heads.append({"q": q, "k": k, "v": v, "mask": mask, "ctx": attention_head(q, k, v, mask)})
    q, k, v = (torch.randn(4, n, d, generator=g) for n, d in ((6, 16), (9, 16), (9, 8)))
    heads.append({"q": q, "k": k, "v": v, "mask": None, "ctx": attention_head(q, k, v)})

    ctx = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    weight = torch.randn(8, 12, generator=g, dtype=torch.float64)
    bias = torch.randn(8, generator=g, dtype=torch.float64)
    projection = {"ctx": ctx, "weight": weight, "bias": bias, "out": project_heads(ctx, weight, bias),
                  "out_without_bias": project_heads(ctx, weight)}

    block = _block()
    state = random_state(block, seed=1)
    x = torch.randn(2, 6, 16, generator=g)
    key_mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    key_mask[1, ..., 4:] = False
    return {"heads": heads, "projection": projection, "block": {"state": state, "x": x, "mask": key_mask}}


def test_attention_head_matches_reference(data):
    from minisnip.model import attention_head
    for i, c in enumerate(data["heads"]):
        got = attention_head(c["q"], c["k"], c["v"], c["mask"])
        check_tensor(f"attention_head, case {i} ({c['q'].dtype}, mask {'given' if c['mask'] is not None else 'None'})",
                     got, c["ctx"], rtol=1e-5, atol=1e-6)


def test_attention_head_matches_fused_attention(data):
    from minisnip.model import attention_head
    for i, c in enumerate(data["heads"]):
        fused = F.scaled_dot_product_attention(c["q"], c["k"], c["v"], attn_mask=c["mask"])
        check_tensor(f"attention_head vs scaled_dot_product_attention, case {i}",
                     attention_head(c["q"], c["k"], c["v"], c["mask"]), fused, rtol=1e-5, atol=1e-5)


def test_attention_rows_sum_to_one(data):
    """Attention weights of each query sum to 1: constant values come back unchanged."""
    from minisnip.model import attention_head
    c = data["heads"][0]
    ones = torch.ones(*c["v"].shape[:-1], 3, dtype=c["v"].dtype)
    check_tensor("attention_head with all values 1", attention_head(c["q"], c["k"], ones, c["mask"]),
                 torch.ones(*c["q"].shape[:-1], 3, dtype=c["v"].dtype))
    const = torch.tensor([3.0, -1.5, 0.25], dtype=c["v"].dtype).expand(*c["v"].shape[:-1], 3)
    check_tensor("attention_head with the same value vector at every key",
                 attention_head(c["q"], c["k"], const, None),
                 torch.tensor([3.0, -1.5, 0.25], dtype=c["v"].dtype).expand(*c["q"].shape[:-1], 3))


def test_masked_keys_have_no_influence(data):
    from minisnip.model import attention_head
    g = seeded(5)
    c = data["heads"][0]
    q, k, v = c["q"], c["k"], c["v"]
    keys = torch.tensor([True, False, True, True, False, False, True]).view(1, 1, 1, 7)
    before = attention_head(q, k, v, keys)
    k2, v2 = k.clone(), v.clone()
    k2[..., ~keys.view(7), :] = 100 * torch.randn(k2[..., ~keys.view(7), :].shape, generator=g, dtype=k.dtype)
    v2[..., ~keys.view(7), :] = 100 * torch.randn(v2[..., ~keys.view(7), :].shape, generator=g, dtype=v.dtype)
    check_tensor("attention_head after changing the masked keys and values", attention_head(q, k2, v2, keys), before)
    only = torch.zeros(1, 1, 1, 7, dtype=torch.bool)
    only[..., 2] = True
    check_tensor("attention_head when each query may see key 2 only", attention_head(q, k, v, only),
                 v[..., 2:3, :].expand(*q.shape[:-1], v.shape[-1]))


def test_attention_head_gradients_reach_q_k_v(data):
    from minisnip.model import attention_head
    c = data["heads"][0]
    q, k, v = (c[n].clone().requires_grad_(True) for n in "qkv")
    out = attention_head(q, k, v, c["mask"])
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        raise AssertionError("attention_head's result carries no gradient (keep it a differentiable torch computation)")
    (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.grad is None or not torch.isfinite(t.grad).all() or t.grad.abs().sum() == 0:
            raise AssertionError(f"attention_head: no (finite, non-zero) gradient reaches {name}")


def test_project_heads_matches_reference(data):
    from minisnip.model import project_heads
    p = data["projection"]
    check_tensor("project_heads with b_O", project_heads(p["ctx"], p["weight"], p["bias"]), p["out"])
    check_tensor("project_heads with bias=None", project_heads(p["ctx"], p["weight"], None), p["out_without_bias"])


def test_project_heads_equals_attention_project(data):
    from minisnip.model import project_heads
    block = _block()
    block.load_state_dict(data["block"]["state"])
    ctx = torch.randn(3, 4, 5, 4, generator=seeded(7))
    with torch.no_grad():
        check_tensor("project_heads vs Attention.project", project_heads(ctx, block.out.weight, block.out.bias),
                     block.project(ctx), rtol=1e-5, atol=1e-5)


def test_heads_compose_into_the_attention_block(data):
    """Q, K, V of each head from its rows of W_QKV, attention_head per head, project_heads: = Attention.forward."""
    from minisnip.model import attention_head, project_heads
    block = _block()
    block.load_state_dict(data["block"]["state"])
    x, mask = data["block"]["x"], data["block"]["mask"]
    w, b = block.qkv.weight, block.qkv.bias
    with torch.no_grad():
        per_head = []
        for h in range(block.num_heads):
            q, k, v = (F.linear(x, w[rows], b[rows]) for rows in block.head_rows(h))
            per_head.append(attention_head(q, k, v, mask[:, 0]))
        got = project_heads(torch.stack(per_head, dim=1), block.out.weight, block.out.bias)
        check_tensor("project_heads(attention_head per head) vs Attention.forward", got, block(x, mask),
                     rtol=1e-5, atol=1e-5)
