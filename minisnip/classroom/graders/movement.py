"""Checks of the part "movement": the straight-through scores of movement pruning (Sanh et al. 2020) in
`minisnip.methods.movement`: `top_v_masks`, `StraightThroughMask`, `MaskedWeight`."""

from __future__ import annotations

import torch
from torch import nn

from ._common import check_equal, check_tensor, seeded

SHAPES = ((6, 5), (3, 8), (4, 4))          # 30, 24 and 16 scores: no sparsity below lands on a .5 when rounded
SPARSITIES = (0.0, 0.3, 0.6, 0.9, 1.0)
SCOPES = ("per-matrix", "global")


def _masks(out, n: int, what: str) -> list[torch.Tensor]:
    if not isinstance(out, (list, tuple)) or len(out) != n:
        raise AssertionError(f"{what} must return a list of {n} masks, one per score matrix, got "
                             f"{type(out).__name__}" + (f" of length {len(out)}" if isinstance(out, (list, tuple))
                                                        else ""))
    for i, m in enumerate(out):
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise AssertionError(f"{what}: mask {i} must be a bool tensor (True = kept), got "
                                 f"{m.dtype if isinstance(m, torch.Tensor) else type(m).__name__}")
    return list(out)


def _scores(seed: int, dtype=torch.float32) -> list[torch.Tensor]:
    g = seeded(seed)
    return [torch.randn(*shape, generator=g, dtype=dtype) for shape in SHAPES]


def _masked_inputs(seed: int, dtype=torch.float64):
    """W, S, a mask M with pruned entries, and the gradient G = dL/dW' of L = sum(W' ⊙ G)."""
    g = seeded(seed)
    W = torch.randn(5, 6, generator=g, dtype=dtype)
    S = torch.randn(5, 6, generator=g, dtype=torch.float32)
    keep = torch.rand(5, 6, generator=g) > 0.4
    G = torch.randn(5, 6, generator=g, dtype=dtype)
    return W, S, keep, G


def _through_masked_weight(W, S, keep, G):
    """W' = MaskedWeight(W) and the gradients of L = sum(W' ⊙ G) w.r.t. S and W."""
    from minisnip.methods.movement import MaskedWeight, MaskState
    W = W.clone().requires_grad_(True)
    state = MaskState(nn.Parameter(S.clone()), keep.clone())
    out = MaskedWeight(state)(W)
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        raise AssertionError("MaskedWeight.forward must return a tensor that carries the gradient (W ⊙ M, "
                             "with M from StraightThroughMask)")
    (out * G).sum().backward()
    return out.detach(), state.scores.grad, W.grad


def _linear(seed: int):
    g = seeded(seed)
    lin = nn.Linear(6, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(4, 6, generator=g))
        lin.bias.copy_(torch.randn(4, generator=g))
    x, R = torch.randn(3, 6, generator=g), torch.randn(3, 4, generator=g)
    S = torch.randn(4, 6, generator=g)
    return lin, x, R, S


def _linear_case(seed: int, keep: torch.Tensor | None = None):
    """A Linear with scores attached, S set, M = keep (Top_v of S at 0.5 when None); L = sum(lin(x) ⊙ R)."""
    from minisnip.methods.movement import attach_scores, top_v_masks
    lin, x, R, S = _linear(seed)
    state = attach_scores(lin)
    with torch.no_grad():
        state.scores.copy_(S)
    state.keep = keep if keep is not None else top_v_masks([state.scores], 0.5)[0]
    out = lin(x)
    (out * R).sum().backward()
    return {"x": x, "R": R, "S": S, "W": lin.parametrizations.weight.original.detach().clone(), "b": lin.bias.detach(),
            "keep": state.keep.clone(), "out": out.detach(), "grad_S": state.scores.grad.clone(),
            "grad_W": lin.parametrizations.weight.original.grad.clone()}


def make_cases() -> dict:
    from minisnip.methods.movement import StraightThroughMask, top_v_masks
    scores = _scores(21)
    top_v = [{"sparsity": s, "scope": scope, "masks": top_v_masks(scores, s, scope)}
             for scope in SCOPES for s in SPARSITIES]
    straight = []
    for seed, dtype in ((22, torch.float32), (23, torch.float64)):
        g = seeded(seed)
        S = torch.randn(4, 5, generator=g, dtype=dtype).requires_grad_(True)
        keep, G = torch.rand(4, 5, generator=g) > 0.5, torch.randn(4, 5, generator=g, dtype=dtype)
        out = StraightThroughMask.apply(S, keep)
        (out * G).sum().backward()
        straight.append({"S": S.detach(), "keep": keep, "G": G, "out": out.detach(), "grad_S": S.grad})
    masked = []
    for seed, dtype in ((24, torch.float64), (25, torch.float32)):
        W, S, keep, G = _masked_inputs(seed, dtype)
        out, grad_S, grad_W = _through_masked_weight(W, S, keep, G)
        masked.append({"W": W, "S": S, "keep": keep, "G": G, "out": out, "grad_S": grad_S, "grad_W": grad_W})
    return {"scores": scores, "top_v": top_v, "straight": straight, "masked": masked, "linear": _linear_case(26)}


def test_top_v_matches_reference(data):
    from minisnip.methods.movement import top_v_masks
    for c in data["top_v"]:
        what = f"top_v_masks(sparsity={c['sparsity']}, scope={c['scope']!r})"
        got = _masks(top_v_masks([s.clone() for s in data["scores"]], c["sparsity"], c["scope"]), len(SHAPES), what)
        for i, (m, want) in enumerate(zip(got, c["masks"])):
            if tuple(m.shape) != tuple(want.shape):
                raise AssertionError(f"{what}: mask {i} has shape {tuple(m.shape)}, expected {tuple(want.shape)}")
            if not torch.equal(m, want):
                raise AssertionError(f"{what}: mask {i} {tuple(want.shape)} differs from the expected one in "
                                     f"{int((m != want).sum())} entries (kept {int(m.sum())}, expected "
                                     f"{int(want.sum())})")


def test_top_v_is_binary_with_the_asked_number_of_ones(data):
    """Exactly n - round(sparsity n) ones (per matrix, or over all), the largest scores kept, ties included."""
    from minisnip.methods.movement import top_v_masks
    g = seeded(27)
    score_sets = {"random scores": _scores(28),
                  "all-zero scores (the initial S)": [torch.zeros(*s) for s in SHAPES],
                  "scores with many ties": [torch.randint(-2, 3, s, generator=g).float() for s in SHAPES],
                  "scores that require grad": [nn.Parameter(s) for s in _scores(29)]}
    for label, scores in score_sets.items():
        before = [s.detach().clone() for s in scores]
        for scope in SCOPES:
            for sparsity in SPARSITIES:
                what = f"top_v_masks(sparsity={sparsity}, scope={scope!r}) on {label}"
                masks = _masks(top_v_masks(scores, sparsity, scope), len(scores), what)
                for i, (m, s) in enumerate(zip(masks, scores)):
                    if tuple(m.shape) != tuple(s.shape):
                        raise AssertionError(f"{what}: mask {i} has shape {tuple(m.shape)}, expected "
                                             f"{tuple(s.shape)} (the scores' shape)")
                    if scope == "per-matrix":
                        check_equal(f"{what}: ones in mask {i} (n = {s.numel()})", int(m.sum()),
                                    s.numel() - round(sparsity * s.numel()))
                groups = [(m, s.detach()) for m, s in zip(masks, scores)] if scope == "per-matrix" else \
                    [(torch.cat([m.flatten() for m in masks]), torch.cat([s.detach().flatten() for s in scores]))]
                if scope == "global":
                    n = groups[0][1].numel()
                    check_equal(f"{what}: ones over all masks (N = {n})", int(groups[0][0].sum()),
                                n - round(sparsity * n))
                for m, s in groups:
                    if m.any() and (~m).any() and s[m].min() < s[~m].max():
                        raise AssertionError(f"{what}: a score of {float(s[~m].max()):.4g} is pruned while "
                                             f"{float(s[m].min()):.4g} is kept; Top_v keeps the largest scores")
        if not all(torch.equal(s.detach(), b) for s, b in zip(scores, before)):
            raise AssertionError(f"top_v_masks changed the scores it was given ({label})")


def test_straight_through_mask_forward_is_the_mask(data):
    from minisnip.methods.movement import StraightThroughMask
    for c in data["straight"]:
        S = c["S"].clone().requires_grad_(True)
        out = StraightThroughMask.apply(S, c["keep"])
        what = f"StraightThroughMask.apply(scores {S.dtype}, keep)"
        check_tensor(what, out, c["out"], rtol=0, atol=0)
        if out.dtype != S.dtype:
            raise AssertionError(f"{what}: the mask must come back in the scores' dtype {S.dtype} (a bool or "
                                 f"integer tensor carries no gradient), got {out.dtype}")
        if not out.requires_grad:
            raise AssertionError(f"{what}: the result must be differentiable w.r.t. the scores")


def test_straight_through_mask_backward_is_the_identity(data):
    """dL/dS = dL/dM everywhere, masked entries included (a pruned weight's score can still rise)."""
    from minisnip.methods.movement import StraightThroughMask
    for c in data["straight"]:
        S = c["S"].clone().requires_grad_(True)
        (StraightThroughMask.apply(S, c["keep"]) * c["G"]).sum().backward()
        what = f"StraightThroughMask backward (scores {S.dtype}): the gradient given to the scores"
        if S.grad is None:
            raise AssertionError(f"{what} is None: backward must return the incoming gradient for scores")
        check_tensor(what, S.grad, c["G"], rtol=0, atol=0)


def test_masked_weight_matches_reference(data):
    for c in data["masked"]:
        out, grad_S, grad_W = _through_masked_weight(c["W"], c["S"], c["keep"], c["G"])
        what = f"MaskedWeight ({c['W'].dtype} weight)"
        check_tensor(f"{what}: W'", out, c["out"], rtol=1e-6, atol=0)
        if grad_S is None:
            raise AssertionError(f"{what}: the scores got no gradient (M must come from StraightThroughMask.apply"
                                 f"(scores, keep))")
        check_tensor(f"{what}: the scores' gradient dL/dS", grad_S, c["grad_S"], rtol=1e-6, atol=0)
        check_tensor(f"{what}: the weight's gradient dL/dW", grad_W, c["grad_W"], rtol=1e-6, atol=0)


def test_scores_get_w_times_the_gradient_of_the_masked_weight(data):
    """W' = W ⊙ M; dL/dS = dL/dW' ⊙ W (masked entries included); dL/dW = dL/dW' ⊙ M; S <- S - lr W ⊙ dL/dW'."""
    from minisnip.methods.movement import MaskedWeight, MaskState
    W, S, keep, G = _masked_inputs(30)
    out, grad_S, grad_W = _through_masked_weight(W, S, keep, G)
    check_tensor("MaskedWeight: W' vs W ⊙ M", out, W * keep, rtol=0, atol=0)
    if grad_S is None:
        raise AssertionError("MaskedWeight: the scores got no gradient")
    check_tensor("MaskedWeight: dL/dS vs dL/dW' ⊙ W", grad_S, (G * W).float(), rtol=1e-6, atol=0)
    check_tensor("MaskedWeight: dL/dW vs dL/dW' ⊙ M", grad_W, G * keep, rtol=0, atol=0)
    if not (grad_S[~keep] != 0).any():
        raise AssertionError("MaskedWeight: the scores of pruned weights (M = 0) must get dL/dW' ⊙ W too, "
                             "not 0 (straight through: the mask does not stop the gradient)")
    lr = 0.1
    state = MaskState(nn.Parameter(S.clone()), keep.clone())
    opt = torch.optim.SGD([state.scores], lr=lr)
    (MaskedWeight(state)(W) * G).sum().backward()
    opt.step()
    check_tensor("one SGD step on the scores: S - lr W ⊙ dL/dW'", state.scores.detach(), S - lr * (W * G).float(),
                 rtol=1e-6, atol=1e-7)


def test_linear_with_scores(data):
    """A Linear with attach_scores: y = x (W ⊙ M)^T + b, dL/dS = W ⊙ dL/dW' with dL/dW' = R^T x."""
    c = data["linear"]
    got = _linear_case(26, keep=c["keep"])
    check_tensor("Linear with scores: output", got["out"], c["out"])
    check_tensor("Linear with scores: dL/dS", got["grad_S"], c["grad_S"])
    check_tensor("Linear with scores: dL/dW", got["grad_W"], c["grad_W"])
    W, keep, x, R = c["W"], c["keep"], c["x"], c["R"]
    check_tensor("Linear with scores: output vs x (W ⊙ M)^T + b", got["out"], x @ (W * keep).t() + c["b"],
                 rtol=1e-5, atol=1e-5)
    check_tensor("Linear with scores: dL/dS vs W ⊙ R^T x", got["grad_S"], W * (R.t() @ x), rtol=1e-5, atol=1e-6)
