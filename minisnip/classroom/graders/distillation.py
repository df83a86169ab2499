"""Checks of the part "distillation": `minisnip.pruning.distill.distillation_loss` (Hinton et al. 2015),
T^2 KL(softmax(t/T) || softmax(s/T)) averaged over the batch, the mean squared error for one output."""

from __future__ import annotations

import torch

from ._common import check_tensor, seeded

# (batch, classes, temperature, dtype) of the classification cases
CASES = ((4, 5, 1.0, torch.float32), (4, 5, 2.0, torch.float32), (4, 5, 4.0, torch.float32),
         (6, 3, 0.5, torch.float32), (3, 2, 2.5, torch.float64), (5, 3, 2.0, torch.bfloat16))
REGRESSION = ((5, 2.0), (5, 7.0), (1, 1.0))  # (batch, temperature), one output


def _loss(out, what: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise AssertionError(f"{what}: expected a tensor, got {type(out).__name__}")
    if out.dim() != 0:
        raise AssertionError(f"{what}: the loss must be one number (a 0-dim tensor), got shape {tuple(out.shape)}")
    return out


def _logits(g: torch.Generator, b: int, c: int, dtype=torch.float32, scale: float = 2.0) -> torch.Tensor:
    return (scale * torch.randn(b, c, generator=g)).to(dtype)


def _run(s, t, T, regression=False):
    """The loss and the student's gradient, on copies of s and t."""
    from minisnip.pruning.distill import distillation_loss
    s = s.clone().requires_grad_(True)
    loss = _loss(distillation_loss(s, t.clone(), T, regression=regression),
                 f"distillation_loss({'regression, ' if regression else ''}T={T}, {s.dtype})")
    loss.backward()
    return loss.detach(), s.grad


def make_cases() -> dict:
    g = seeded(31)
    cases = []
    for b, c, T, dtype in CASES:
        s, t = _logits(g, b, c, dtype), _logits(g, b, c, dtype)
        loss, grad = _run(s, t, T)
        cases.append({"s": s, "t": t, "T": T, "loss": loss, "grad": grad})
    regression = []
    for b, T in REGRESSION:
        s, t = _logits(g, b, 1), _logits(g, b, 1)
        loss, grad = _run(s, t, T, regression=True)
        regression.append({"s": s, "t": t, "T": T, "loss": loss, "grad": grad})
    return {"cases": cases, "regression": regression}


def test_matches_reference(data):
    for c in data["cases"] + data["regression"]:
        regression = c["s"].shape[-1] == 1
        what = f"distillation_loss({'regression, ' if regression else ''}{tuple(c['s'].shape)} {c['s'].dtype}, " \
               f"T={c['T']})"
        loss, grad = _run(c["s"], c["t"], c["T"], regression=regression)
        check_tensor(f"{what}: the loss", loss, c["loss"], rtol=1e-5, atol=1e-7)
        if grad is None:
            raise AssertionError(f"{what}: no gradient reached the student's logits")
        low = c["s"].dtype in (torch.float16, torch.bfloat16)
        check_tensor(f"{what}: the gradient w.r.t. the student's logits", grad, c["grad"],
                     rtol=2e-2 if low else 1e-5, atol=1e-4 if low else 1e-7)


def test_zero_for_identical_logits(data):
    g = seeded(32)
    for T in (0.5, 1.0, 3.0):
        s = _logits(g, 4, 6)
        loss, grad = _run(s, s, T)
        if abs(float(loss)) > 1e-6:
            raise AssertionError(f"distillation_loss(s, s, T={T}) = {float(loss):.3g}; the KL divergence of a "
                                 "distribution to itself is 0")
        check_tensor(f"distillation_loss(s, s, T={T}): the gradient", grad, torch.zeros_like(s), rtol=0, atol=1e-6)
    s = _logits(g, 4, 1)
    loss, _ = _run(s, s, 2.0, regression=True)
    if float(loss) != 0:
        raise AssertionError(f"distillation_loss(s, s, regression=True) = {float(loss):.3g}, expected 0")


def test_non_negative(data):
    g = seeded(33)
    for T in (0.5, 1.0, 2.0, 8.0):
        for b, c in ((1, 2), (7, 4), (3, 10)):
            loss, _ = _run(_logits(g, b, c, scale=3.0), _logits(g, b, c, scale=3.0), T)
            if float(loss) < -1e-6:
                raise AssertionError(f"distillation_loss(T={T}) on ({b}, {c}) logits = {float(loss):.4g} < 0; "
                                     "a KL divergence is never negative (is it KL(teacher || student)?)")


def test_temperature_squared_scaling(data):
    """softmax(c s / c T) = softmax(s / T), so only the T^2 factor changes: L(c s, c t, c T) = c^2 L(s, t, T)."""
    g = seeded(34)
    s, t = _logits(g, 4, 5), _logits(g, 4, 5)
    base, _ = _run(s, t, 1.5)
    for factor in (2.0, 4.0):
        scaled, _ = _run(factor * s, factor * t, 1.5 * factor)
        ratio = float(scaled) / float(base)
        if abs(ratio - factor ** 2) > 1e-3 * factor ** 2:
            raise AssertionError(f"distillation_loss(c s, c t, c T) / distillation_loss(s, t, T) = {ratio:.4g} for "
                                 f"c = {factor:g}, expected c^2 = {factor ** 2:g}: the KL term must be multiplied "
                                 "by T^2 (Hinton et al.: it keeps the soft targets' gradients on the same scale)")


def test_averaged_over_the_batch(data):
    """The loss of a batch is the mean of its rows' losses (a sum over classes, a mean over the batch)."""
    g = seeded(35)
    s, t = _logits(g, 5, 4), _logits(g, 5, 4)
    whole, _ = _run(s, t, 2.0)
    rows = torch.stack([_run(s[i:i + 1], t[i:i + 1], 2.0)[0] for i in range(5)])
    check_tensor("distillation_loss of a batch vs the mean of its rows' losses", whole, rows.mean(),
                 rtol=1e-5, atol=1e-7)
    p = torch.softmax(t / 2.0, dim=-1)
    by_hand = 4.0 * (p * (p.log() - torch.log_softmax(s / 2.0, dim=-1))).sum(-1).mean()
    check_tensor("distillation_loss(T=2) vs 4 KL(softmax(t/2) || softmax(s/2)) written out", whole, by_hand,
                 rtol=1e-5, atol=1e-6)


def test_gradient_only_to_the_student(data):
    from minisnip.pruning.distill import distillation_loss
    g = seeded(36)
    for regression, c in ((False, 3), (True, 1)):
        s = _logits(g, 4, c).requires_grad_(True)
        t = _logits(g, 4, c).requires_grad_(True)
        what = f"distillation_loss({'regression' if regression else 'classification'})"
        loss = _loss(distillation_loss(s, t, 2.0, regression=regression), what)
        if not loss.requires_grad:
            raise AssertionError(f"{what}: the loss must be differentiable w.r.t. the student's logits")
        loss.backward()
        if t.grad is not None:
            raise AssertionError(f"{what}: the teacher's logits got a gradient; the teacher is a fixed target "
                                 "(detach its logits)")
        if s.grad is None or not torch.isfinite(s.grad).all() or not (s.grad != 0).any():
            raise AssertionError(f"{what}: the student's logits must get a finite, non-zero gradient")


def test_half_precision_logits_give_a_float32_loss(data):
    g = seeded(37)
    for dtype in (torch.float16, torch.bfloat16):
        s, t = _logits(g, 3, 4, dtype), _logits(g, 3, 4, dtype)
        for regression in (False, True):
            a, b = (s[:, :1], t[:, :1]) if regression else (s, t)
            loss, _ = _run(a, b, 2.0, regression=regression)
            if loss.dtype not in (torch.float32, torch.float64):
                raise AssertionError(f"distillation_loss on {dtype} logits{' (regression)' if regression else ''} "
                                     f"returned {loss.dtype}; compute in float32")


def test_regression_is_the_mean_squared_error(data):
    """One output: MSE(s, t), with no temperature (T changes nothing) and gradient 2 (s - t) / batch."""
    g = seeded(38)
    s, t = _logits(g, 6, 1), _logits(g, 6, 1)
    loss, grad = _run(s, t, 1.0, regression=True)
    check_tensor("distillation_loss(regression=True) vs mean((s - t)^2)", loss, ((s - t) ** 2).mean(),
                 rtol=1e-6, atol=1e-7)
    check_tensor("distillation_loss(regression=True): the gradient vs 2 (s - t) / batch", grad, 2 * (s - t) / 6,
                 rtol=1e-5, atol=1e-7)
    for T in (0.5, 4.0):
        other, _ = _run(s, t, T, regression=True)
        check_tensor(f"distillation_loss(regression=True, T={T}) vs T=1 (no temperature for a regression)", other,
                     loss, rtol=1e-6, atol=1e-7)
