"""Checks of the part "spectral_rescale": `minisnip.snip.spectral.spectral_rescale`, W · min(1, c / σ̂)."""

from __future__ import annotations

import torch

from ._common import check_tensor, seeded


def _inputs():
    g = seeded(13)
    mats = torch.randn(4, 6, 5, generator=g, dtype=torch.float64)
    mats[3] = 0.0  # an all-zero block
    sigma = torch.linalg.matrix_norm(mats, ord=2)
    bound = torch.stack([0.5 * sigma[0], 2.0 * sigma[1], sigma[2], torch.tensor(1.0, dtype=torch.float64)])
    return mats, sigma, bound


def make_cases() -> dict:
    from minisnip.snip.spectral import spectral_rescale
    g = seeded(14)
    mats, sigma, bound = _inputs()
    single = torch.randn(1, 3, 8, generator=g)
    single_sigma = torch.linalg.matrix_norm(single, ord=2)
    cases = [{"mats": mats, "sigma": sigma, "bound": bound, "out": spectral_rescale(mats, sigma, bound)},
             {"mats": single, "sigma": single_sigma, "bound": torch.tensor([0.9]),
              "out": spectral_rescale(single, single_sigma, torch.tensor([0.9]))}]
    return {"cases": cases}


def test_matches_reference(data):
    from minisnip.snip.spectral import spectral_rescale
    for i, c in enumerate(data["cases"]):
        check_tensor(f"spectral_rescale, case {i} {tuple(c['mats'].shape)}",
                     spectral_rescale(c["mats"], c["sigma"], c["bound"]), c["out"], rtol=1e-6, atol=1e-7)


def test_blocks_under_the_bound_are_unchanged(data):
    from minisnip.snip.spectral import spectral_rescale
    mats, sigma, bound = _inputs()
    out = spectral_rescale(mats, sigma, bound)
    check_tensor("spectral_rescale", out, mats, rtol=float("inf"), atol=float("inf"))  # shape and finiteness
    for b in (1, 2):
        if not torch.equal(out[b], mats[b]):
            raise AssertionError(f"spectral_rescale: block {b} has sigma {float(sigma[b]):.4g} <= bound "
                                 f"{float(bound[b]):.4g} and must come back unchanged")


def test_blocks_over_the_bound_end_at_the_bound(data):
    from minisnip.snip.spectral import spectral_rescale
    mats, sigma, bound = _inputs()
    out = spectral_rescale(mats, sigma, bound)
    got = float(torch.linalg.matrix_norm(out[0], ord=2))
    if abs(got - float(bound[0])) > 1e-9 * float(bound[0]):
        raise AssertionError(f"spectral_rescale: block 0 (sigma {float(sigma[0]):.4g}, bound {float(bound[0]):.4g}) "
                             f"ends with spectral norm {got:.6g}, expected the bound")


def test_zero_block_gives_zeros(data):
    from minisnip.snip.spectral import spectral_rescale
    mats, sigma, bound = _inputs()
    out = spectral_rescale(mats, sigma, bound)
    if not torch.isfinite(out).all() or out[3].abs().sum() != 0:
        raise AssertionError("spectral_rescale: an all-zero block (sigma 0) must give zeros, not NaN or inf")


def test_differentiable(data):
    from minisnip.snip.spectral import spectral_rescale
    mats, sigma, bound = _inputs()
    mats, sigma = mats.clone().requires_grad_(True), sigma.clone().requires_grad_(True)
    out = spectral_rescale(mats, sigma, bound)
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        raise AssertionError("spectral_rescale's result carries no gradient")
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    if mats.grad is None or sigma.grad is None or not torch.isfinite(sigma.grad).all():
        raise AssertionError("spectral_rescale: gradients must reach both mats and sigma")
    if sigma.grad[0] == 0 or sigma.grad[1] != 0:
        raise AssertionError("spectral_rescale: sigma must matter for a block over its bound (block 0) and not for "
                             "one under it (block 1)")
