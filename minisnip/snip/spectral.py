"""Spectral normalization of the branch weights, step by step (SNIP, Lin et al. 2020, Sec. 3).

SNIP adds spectral normalization (SN) "to stabilise the distribution of post-activation values", so that a
branch's function norm says how much the branch does, and thresholding it prunes well. The paper gives no
formula for its SN; minisnip follows the SN of the authors' companion paper SNGP (Liu, Lin et al., NeurIPS
2020; google/edward2 `SpectralNormalization`), itself the SN of Miyato et al. (ICLR 2018):

    W_SN = W / max(1, σ̂(W) / c)  =  W · min(1, c / σ̂(W))                                       (SNGP, Eq. 11)

σ̂(W) is the largest singular value of W, estimated by power iteration (Miyato et al. 2018, Alg. 1) with one
step per training-mode computation of the weight; the vectors u, v persist between steps, so the estimate
sharpens as W drifts slowly. `minisnip.train.fit` computes each normalised weight once per step
(`parametrize.cached`), so every matrix gets one power step per training step, and the identity prior's Gram
matrices (which read W_O and W_2 again) see the very weight the forward used. Outside such a cache, every
training-mode read runs one more power step.
Unlike Miyato's SN (W / σ̂, every matrix scaled to norm exactly 1), this SN only *caps* the norm at c: a
matrix whose σ is below c is left as it is.

The bound c (a reconstruction choice, nothing in the paper fixes it):
- `bound="init"` (minisnip's default): c = σ(W) of each matrix when SN is attached, computed exactly. The
  pretrained function is unchanged at step 0 and SN only stops each matrix from growing during fine-tuning.
  (The power-iteration estimate u^T W v = ||W v|| can only be ≤ σ(W) = c, so the scale is 1 at step 0; c is
  also raised to the estimate itself, against rounding, so eval outputs are bit-for-bit unchanged.)
- a float c (SNGP: 0.95; Miyato: 1.0): one global constant. Pretrained BERT matrices have σ far above 1, so a
  constant bound rescales every matrix, and the pretrained function is lost at step 0, while bound="init"
  leaves it bit-for-bit equal (σ per matrix of all-MiniLM-L6-v2 and what c = 1 does to its embeddings:
  docs/snip.md, "Why the spectral-norm bound is per matrix by default").

How tight is the cap? σ̂ comes from one power step per training step from the previous u, so it lags when
W moves fast: tight at fine-tuning learning rates, loose when weights move by percents per step, where more
power iterations (`n_power_iterations`) tighten it (measured: docs/snip.md, same section).

The fused QKV weight is normalised as three matrices (`blocks=3`): in BERT, W_Q, W_K and W_V are three
separate linear maps that minisnip only stacks for speed. Normalising the stack would cap
σ([W_Q; W_K; W_V]) ≥ max(σ_Q, σ_K, σ_V) and let the largest one (usually W_K or W_Q) decide the scale of all
three; per-block SN gives each its own u, v and c, exactly as on an unfused BERT.

Use: `apply_spectral_norm(model)` before fine-tuning; `spectral_norms(model)` to plot σ over training;
`remove_spectral_norm(model)` before saving or physically pruning (`minisnip.surgery` rebuilds Linear
layers from their current weights and would silently drop the parametrization).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..surgery import encoder_of

BRANCH_MATRICES = ("qkv", "out", "up", "down")


def spectral_norm_exact(W: Tensor) -> Tensor:
    """σ(W), the largest singular value (from the SVD): the reference, and the bound c at attach time."""
    W = W.detach()
    return torch.linalg.matrix_norm(W.to(torch.promote_types(W.dtype, torch.float32)), ord=2).to(W.dtype)


def power_iteration(W: Tensor, u: Tensor, n_iter: int = 1, eps: float = 1e-12) -> tuple[Tensor, Tensor, Tensor]:
    """n_iter steps of Miyato et al. (2018), Alg. 1, from the left vector u; returns (σ̂, u, v).

        v ← W^T u / ||W^T u||,   u ← W v / ||W v||,   σ̂ = u^T W v

    u and v are computed without gradient (they are treated as constants, as in torch's `spectral_norm`);
    σ̂ is differentiable w.r.t. W. σ̂ = ||W v|| ≤ σ(W): power iteration approaches σ from below.
    """
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1, got {n_iter}")
    # BEGIN SOLUTION
    with torch.no_grad():
        v = u.new_zeros(W.shape[1])
        for _ in range(n_iter):
            v = F.normalize(W.t().mv(u), dim=0, eps=eps)
            u = F.normalize(W.mv(v), dim=0, eps=eps)
    return torch.dot(u, W.mv(v)), u, v
    # END SOLUTION


def spectral_rescale(mats: Tensor, sigma: Tensor, bound: Tensor, eps: float = 1e-12) -> Tensor:
    """W_b · min(1, c_b / σ̂_b) for every block b: mats (blocks, rows, in), sigma = σ̂ and bound = c (blocks,).

    A block whose σ̂ is at most its bound comes back unchanged; an all-zero block (σ̂ = 0) must not divide by 0
    (σ̂ is floored at eps). Differentiable w.r.t. mats and sigma: `SpectralNorm.forward`'s rescaling.
    """
    # BEGIN SOLUTION
    # min(1, c / σ̂) = 1 / max(1, σ̂ / c); the clamp keeps an all-zero matrix (σ̂ = 0) from dividing by 0
    scale = torch.clamp(bound / sigma.clamp_min(eps), max=1.0)
    return mats * scale[:, None, None]
    # END SOLUTION


class SpectralNorm(nn.Module):
    """Parametrization W -> W · min(1, c / σ̂(W)), per block, for `parametrize.register_parametrization`.

    weight: the (out, in) weight it will normalise (to size u, v and to set c). blocks: the number of
    stacked matrices along dim 0 (3 for the fused QKV), each normalised on its own. bound: "init" (c = σ of
    each block now, times init_scale) or a float. n_power_iterations: steps per forward in training mode; in eval mode the
    stored u, v are used as they are, so eval forwards have no side effect. init_iterations: steps run
    now so that u, v start close to the singular vectors.
    """

    u: Tensor
    v: Tensor
    bound: Tensor

    def __init__(self, weight: Tensor, blocks: int = 1, bound: str | float = "init",
                 n_power_iterations: int = 1, init_iterations: int = 100, eps: float = 1e-12,
                 seed: int = 0, init_scale: float = 1.0):
        super().__init__()
        if weight.dim() != 2 or weight.shape[0] % blocks:
            raise ValueError(f"expected a 2-d weight whose rows split into {blocks} blocks, got {tuple(weight.shape)}")
        if n_power_iterations < 1 or init_iterations < 1:
            raise ValueError(f"n_power_iterations and init_iterations must be >= 1, "
                             f"got {n_power_iterations}, {init_iterations}")
        self.blocks, self.n_power_iterations, self.eps = blocks, n_power_iterations, eps
        mats = self._blocks(weight.detach())
        # a private generator: attaching SN does not shift the global random stream (dropout, data order)
        g = torch.Generator().manual_seed(seed)
        u = torch.randn(blocks, mats.shape[1], generator=g).to(weight)
        self.register_buffer("u", F.normalize(u, dim=1, eps=eps))
        self.register_buffer("v", weight.new_zeros(blocks, mats.shape[2]))
        self._power_method(mats, init_iterations)
        if not (isinstance(init_scale, (int, float)) and not isinstance(init_scale, bool) and 0 < init_scale <= 1):
            raise ValueError(f"init_scale must be a number in (0, 1], got {init_scale!r}")
        if bound == "init":
            # c = σ(W) exactly; max with the estimate σ̂ (≤ σ up to rounding) makes the step-0 scale exactly 1;
            # init_scale < 1 puts every matrix's cap that share below its σ (a shared scale, applied at step 0)
            c = torch.maximum(torch.stack([spectral_norm_exact(m) for m in mats]), self.sigma(weight.detach()))
            c = c * init_scale if init_scale != 1 else c
        elif isinstance(bound, (int, float)) and not isinstance(bound, bool) and bound > 0:
            c = weight.new_full((blocks,), float(bound))
        else:
            raise ValueError(f'bound must be "init" or a positive number, got {bound!r}')
        self.register_buffer("bound", c.to(weight))

    def _blocks(self, W: Tensor) -> Tensor:
        """(blocks * rows, in) -> (blocks, rows, in): a view, so gradients flow to W."""
        return W.view(self.blocks, W.shape[0] // self.blocks, W.shape[1])

    @torch.no_grad()
    def _power_method(self, mats: Tensor, n_iter: int) -> None:
        """Advance the stored u, v of every block by n_iter steps (in place: buffers keep their identity)."""
        for b in range(self.blocks):
            _, u, v = power_iteration(mats[b], self.u[b], n_iter, self.eps)
            self.u[b].copy_(u)
            self.v[b].copy_(v)

    def sigma(self, W: Tensor) -> Tensor:
        """σ̂ per block, u_b^T W_b v_b with the stored u, v (no iteration): shape (blocks,)."""
        # clones: a second forward's in-place update of the buffers must not corrupt the first's graph
        u, v = self.u.clone(), self.v.clone()
        return torch.einsum("br,brc,bc->b", u, self._blocks(W), v)

    def forward(self, W: Tensor) -> Tensor:
        mats = self._blocks(W)
        if self.training:
            self._power_method(mats.detach(), self.n_power_iterations)
        # = spectral_rescale(mats, self.sigma(W), self.bound, self.eps), with a backward written out (_Rescale)
        return _Rescale.apply(mats, self.u.clone(), self.v.clone(), self.bound, self.eps).view_as(W)

    def extra_repr(self) -> str:
        c = ", ".join(f"{x:.3g}" for x in self.bound.tolist())
        return f"blocks={self.blocks}, bound=[{c}], n_power_iterations={self.n_power_iterations}"


def _uncapped_on_cpu(sigma: Tensor, bound: Tensor, eps: float) -> bool:
    """Whether the cap acts on no block (c_b / σ̂_b > 1 for every b), asked on the CPU only: there reading σ̂
    back costs nothing, while on a GPU the host would wait for the device (there the full rescaling runs)."""
    return sigma.device.type == "cpu" and bool((bound / sigma.clamp_min(eps) > 1).all())


class _Rescale(torch.autograd.Function):
    """spectral_rescale(W, σ̂, c) with σ̂_b = u_b^T W_b v_b (u, v constants, as `SpectralNorm.sigma`): the same
    values (it calls both), and by hand the gradient autograd takes through them, without its four weight-sized
    temporaries (G * s, G * W, the outer product u v^T, their sum). With G = dL/dW_SN, s_b = min(1, c_b / σ̂_b):

        dL/dW_b = s_b G_b + a_b <G_b, W_b> u_b v_b^T,   a_b = -c_b / σ̂_b^2 where c_b / σ̂_b <= 1 (the cap acts;
                                                           clamp's gradient passes at equality), else 0

    (σ̂_b floored at eps as in spectral_rescale; a = 0 where σ̂_b < eps). Tested equal to autograd in float64.

    Where the cap acts on no block (c_b / σ̂_b > 1 for every b: s_b = 1, a_b = 0), W_SN = W and dL/dW = G exactly,
    so W itself is returned and G passed on, without the copy of W and the three passes over G. With the default
    bound most matrices are below their cap at any step (docs/snip.md). Asked on the CPU only: on a GPU the
    question would wait for the device, and its memory makes the copies cheap."""

    @staticmethod
    def forward(ctx, mats: Tensor, u: Tensor, v: Tensor, bound: Tensor, eps: float) -> Tensor:
        sigma = torch.einsum("br,brc,bc->b", u, mats, v)
        ctx.eps = eps
        ctx.uncapped = _uncapped_on_cpu(sigma, bound, eps)
        if ctx.uncapped:
            return mats  # W · min(1, c/σ̂) = W · 1, bit for bit
        ctx.save_for_backward(mats, u, v, bound, sigma)
        return spectral_rescale(mats, sigma, bound, eps)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.uncapped:
            return (grad, None, None, None, None)  # W_SN = W: the gradient passes unchanged
        mats, u, v, bound, sigma = ctx.saved_tensors
        s = sigma.clamp_min(ctx.eps)
        ratio = bound / s
        a = torch.where((ratio <= 1) & (sigma >= ctx.eps), -bound / (s * s), torch.zeros_like(s))
        b = mats.shape[0]
        gw = torch.bmm(grad.reshape(b, 1, -1), mats.reshape(b, -1, 1)).view(b)        # <G_b, W_b>
        dmats = grad * ratio.clamp(max=1.0).view(b, 1, 1)
        dmats.baddbmm_(u.unsqueeze(2), ((a * gw).view(b, 1) * v).unsqueeze(1))     # + a_b <G_b, W_b> u_b v_b^T
        return dmats, None, None, None, None


def _branch_linears(model: nn.Module, which: Sequence[str] = BRANCH_MATRICES) -> Iterator[tuple[str, nn.Linear]]:
    """(name, Linear) for the chosen matrices of every present branch: "layers.3.attention.qkv", "layers.3.ffn.up"."""
    unknown = set(which) - set(BRANCH_MATRICES)
    if unknown:
        raise ValueError(f"unknown matrices {sorted(unknown)}; choose from {BRANCH_MATRICES}")
    for i, layer in enumerate(encoder_of(model).layers):
        for branch_name, branch, names in (("attention", layer.attention, ("qkv", "out")),
                                           ("ffn", layer.ffn, ("up", "down"))):
            if branch is None:
                continue
            for n in names:
                if n in which:
                    yield f"layers.{i}.{branch_name}.{n}", getattr(branch, n)


def _spectral_norms_of(linear: nn.Module) -> list[SpectralNorm]:
    if not parametrize.is_parametrized(linear, "weight"):
        return []
    return [p for p in linear.parametrizations.weight if isinstance(p, SpectralNorm)]


def register_spectral_norm(linear: nn.Linear, blocks: int = 1, bound: str | float = "init",
                           n_power_iterations: int = 1, init_iterations: int = 100,
                           init_scale: float = 1.0) -> SpectralNorm:
    """Attach a `SpectralNorm` to one Linear's weight; returns it (its buffers: .u, .v, .bound)."""
    sn = SpectralNorm(linear.weight, blocks=blocks, bound=bound, n_power_iterations=n_power_iterations,
                      init_iterations=init_iterations, init_scale=init_scale)
    # registration sets the parametrization to the host's mode and calls it once as a check: in eval mode
    # that call runs no power-iteration step, so attaching leaves u, v as initialised
    mode = linear.training
    linear.train(False)
    parametrize.register_parametrization(linear, "weight", sn)
    linear.train(mode)
    return sn


def apply_spectral_norm(model: nn.Module, which: Sequence[str] = BRANCH_MATRICES, bound: str | float = "init",
                        n_power_iterations: int = 1, init_iterations: int = 100, init_scale: float = 1.0) -> list[str]:
    """Register `SpectralNorm` on the chosen weights of every present branch; returns the Linear names.

    The fused `qkv` gets blocks=3 (W_Q, W_K, W_V each on its own). Works on a `BertModel` or a
    `BertForSequenceClassification`; the classifier, pooler and embeddings are left alone (SNIP normalises
    the residual branches, whose function norms it thresholds).
    """
    targets = list(_branch_linears(model, which))
    for name, linear in targets:
        if _spectral_norms_of(linear):
            raise ValueError(f"{name} already has spectral normalization; call remove_spectral_norm first")
    for name, linear in targets:
        register_spectral_norm(linear, blocks=3 if name.endswith(".qkv") else 1, bound=bound,
                               n_power_iterations=n_power_iterations, init_iterations=init_iterations,
                               init_scale=init_scale)
    return [name for name, _ in targets]


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Put every SpectralNorm in eval mode for a while, so reading `.weight` runs no power iteration."""
    sns = [m for m in model.modules() if isinstance(m, SpectralNorm)]
    modes = [m.training for m in sns]
    try:
        for m in sns:
            m.train(False)
        yield
    finally:
        for m, mode in zip(sns, modes):
            m.train(mode)


def remove_spectral_norm(model: nn.Module) -> list[str]:
    """Bake W · min(1, c/σ̂) into plain weights (as eval mode computes it); returns the Linear names.

    Afterwards the model has ordinary `nn.Linear` weights (same Parameter objects, so an optimizer still
    holds them): it saves and loads with `save_pretrained` and can be pruned by `minisnip.surgery`.
    """
    removed = []
    with _frozen(model):
        for name, linear in _branch_linears(model):
            if not _spectral_norms_of(linear):
                continue
            if len(linear.parametrizations.weight) != len(_spectral_norms_of(linear)):
                raise ValueError(f"{name}.weight has other parametrizations besides SpectralNorm; remove them first")
            parametrize.remove_parametrizations(linear, "weight", leave_parametrized=True)
            removed.append(name)
    return removed


@torch.no_grad()
def spectral_norms(model: nn.Module, which: Sequence[str] = BRANCH_MATRICES) -> dict[str, float]:
    """Exact σ of every branch matrix as the model uses it (normalised, when SN is on), for plots.

    Names: "layers.3.attention.qkv.q" / ".k" / ".v", "layers.3.attention.out", "layers.3.ffn.up",
    "layers.3.ffn.down". Reading the weights runs no power iteration, so this does not disturb training.
    """
    result: dict[str, float] = {}
    with _frozen(model):
        for name, linear in _branch_linears(model, which):
            W = linear.weight
            if name.endswith(".qkv"):
                for t, block in zip("qkv", W.chunk(3, dim=0)):
                    result[f"{name}.{t}"] = float(spectral_norm_exact(block))
            else:
                result[name] = float(spectral_norm_exact(W))
    return result


def spectral_bounds(model: nn.Module) -> dict[str, float]:
    """The bound c of every normalised matrix, named as in `spectral_norms` (for plots of σ / c)."""
    result: dict[str, float] = {}
    for name, linear in _branch_linears(model):
        for sn in _spectral_norms_of(linear):
            c = sn.bound.tolist()
            keys = [f"{name}.{t}" for t in "qkv"] if sn.blocks == 3 and name.endswith(".qkv") else [name]
            if len(keys) != len(c):
                keys = [f"{name}.{b}" for b in range(len(c))]
            result.update(zip(keys, c))
    return result


__all__ = ["BRANCH_MATRICES", "SpectralNorm", "apply_spectral_norm", "power_iteration", "register_spectral_norm",
           "remove_spectral_norm", "spectral_bounds", "spectral_norm_exact", "spectral_norms", "spectral_rescale"]
