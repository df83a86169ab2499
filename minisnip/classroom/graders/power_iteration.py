"""Checks of the part "power_iteration": `minisnip.snip.spectral.power_iteration`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import check_tensor, seeded

STEPS = (1, 3, 10)


def _result(out) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not isinstance(out, tuple) or len(out) != 3:
        raise AssertionError(f"power_iteration must return a tuple (sigma, u, v), got {type(out).__name__}")
    return out


def make_cases() -> dict:
    from minisnip.snip.spectral import power_iteration
    g = seeded(11)
    matrices = [3 * torch.randn(7, 5, generator=g, dtype=torch.float64),
                torch.randn(6, 2, generator=g) @ torch.randn(2, 9, generator=g),  # rank 2, float32
                0.1 * torch.randn(4, 12, generator=g, dtype=torch.float64)]
    cases = []
    for W in matrices:
        u0 = F.normalize(torch.randn(W.shape[0], generator=g, dtype=W.dtype), dim=0)
        for n in STEPS:
            sigma, u, v = power_iteration(W, u0, n_iter=n)
            cases.append({"W": W, "u0": u0, "n_iter": n, "sigma": sigma.detach(), "u": u, "v": v})
    return {"cases": cases}


def test_matches_reference(data):
    from minisnip.snip.spectral import power_iteration
    for i, c in enumerate(data["cases"]):
        sigma, u, v = _result(power_iteration(c["W"], c["u0"].clone(), n_iter=c["n_iter"]))
        what = f"power_iteration, matrix {tuple(c['W'].shape)} {c['W'].dtype}, n_iter={c['n_iter']}"
        tol = dict(rtol=1e-5, atol=1e-6) if c["W"].dtype == torch.float32 else dict(rtol=1e-9, atol=1e-12)
        check_tensor(f"{what}: sigma", sigma, c["sigma"], **tol)
        check_tensor(f"{what}: u", u, c["u"], **tol)
        check_tensor(f"{what}: v", v, c["v"], **tol)


def test_vectors_are_unit_vectors(data):
    from minisnip.snip.spectral import power_iteration
    for c in data["cases"]:
        _, u, v = _result(power_iteration(c["W"], c["u0"].clone(), n_iter=c["n_iter"]))
        for name, t in (("u", u), ("v", v)):
            norm = float(t.norm())
            if abs(norm - 1.0) > 1e-5:
                raise AssertionError(f"power_iteration(n_iter={c['n_iter']}): ||{name}|| = {norm:.6g}, expected 1")


def test_sigma_is_u_W_v(data):
    from minisnip.snip.spectral import power_iteration
    for c in data["cases"]:
        sigma, u, v = _result(power_iteration(c["W"], c["u0"].clone(), n_iter=c["n_iter"]))
        check_tensor(f"power_iteration(n_iter={c['n_iter']}): sigma vs u^T W v", sigma, u @ c["W"] @ v,
                     rtol=1e-5, atol=1e-7)


def test_many_steps_reach_the_largest_singular_value(data):
    from minisnip.snip.spectral import power_iteration
    g = seeded(12)
    for shape in ((20, 8), (8, 30)):
        W = torch.randn(*shape, generator=g, dtype=torch.float64)
        exact = float(torch.linalg.svdvals(W)[0])
        u0 = F.normalize(torch.randn(shape[0], generator=g, dtype=torch.float64), dim=0)
        sigma = float(_result(power_iteration(W, u0, n_iter=300))[0])
        if abs(sigma - exact) > 1e-6 * exact:
            raise AssertionError(f"power_iteration(n_iter=300) on a {shape} matrix: sigma {sigma:.8g}, "
                                 f"the SVD gives {exact:.8g}")
        if sigma > exact * (1 + 1e-9):
            raise AssertionError(f"power_iteration: sigma {sigma:.10g} exceeds the largest singular value {exact:.10g}")


def test_gradient_of_sigma_is_u_v_transpose(data):
    from minisnip.snip.spectral import power_iteration
    c = data["cases"][1]
    W = c["W"].clone().requires_grad_(True)
    sigma, u, v = _result(power_iteration(W, c["u0"].clone(), n_iter=4))
    if not sigma.requires_grad:
        raise AssertionError("power_iteration: sigma must be differentiable w.r.t. W")
    if u.requires_grad or v.requires_grad:
        raise AssertionError("power_iteration: u and v must carry no gradient (compute them under torch.no_grad)")
    sigma.backward()
    check_tensor("power_iteration: d sigma / dW", W.grad, torch.outer(u, v), rtol=1e-5, atol=1e-6)
