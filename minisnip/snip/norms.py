"""Function norms: how large each residual branch's function is, exactly on a data set or as a running estimate.

The paper speaks of the "function norm" of a module f_m and prunes by "a thresholding operator on the function
norm"; it gives no formula. minisnip's reconstruction is the root mean square of the branch's own output over
the real (non-padding) tokens of a data set:

    ||f_m|| = sqrt( mean_{tokens t, not padding} ||f_m(x_t)||_2^2 )

where f_m(x) is the branch output before dropout and before the residual sum:

    head h:          W_O[:, cols_h] ctx_h                (no bias: b_O belongs to the block)
    attention block: Attn(x) = W_O ctx + b_O             (`LayerTrace.attention_out`)
    FFN block:       FFN(h)  = W_2 z + b_2               (`LayerTrace.ffn_output`)
    neuron group g:  W_2[:, g] z_g                       (no bias: b_2 belongs to the block)

Branch names and kinds are those of `minisnip.pruning.branches`.

A block gate (`Attention.gate`, `FeedForward.gate`) multiplies everything its block outputs, so the norms
of its heads / neuron groups include it; head and neuron gates are already inside ctx and z.

Heads and neuron groups are measured without materialising one hidden-size vector per head and token
(`Attention.head_outputs` is (batch, heads, seq, hidden)); with W_h = W_O[:, cols_h] (hidden x d):

    ||W_h c||^2 = c^T (W_h^T W_h) c

so one (heads, d, d) Gram matrix per layer turns the per-token cost from O(hidden * d) into O(d^2) per
head, and memory from (batch, heads, seq, hidden) into (batch, heads, seq, d). Same for neuron groups with
the columns of W_2.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .. import distributed
from ..model import Layer, LayerTrace
from ..pruning.branches import DEFAULT_KINDS, branch_name, branch_params, check_kinds, resolve_kinds
from ..surgery import encoder_of


# --- per-token squared norms ---------------------------------------------------------------------------------

def head_gram(attention) -> Tensor:
    """G[h] = W_h^T W_h with W_h = W_O[:, cols_h]: (heads, d, d)."""
    w = attention.out.weight.view(attention.out.out_features, attention.num_heads, attention.head_dim)
    return torch.einsum("ond,one->nde", w, w)


def neuron_gram(ffn, size: int) -> Tensor:
    """G[g] = W_g^T W_g with W_g = W_2[:, group g] (zero-padded to `size` columns): (groups, size, size)."""
    w = ffn.down.weight
    pad = (-ffn.ffn_dim) % size
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    w = w.view(w.shape[0], -1, size)
    return torch.einsum("ogi,ogj->gij", w, w)


def _block_gate_sq(module, dtype) -> Tensor | None:
    return None if module.gate is None else module.gate.to(dtype).pow(2)


def branch_sq_norms(trace_layer: LayerTrace, layer_module: Layer, mask: Tensor | None,
                    kinds: Iterable[str] = ("head", "attention", "ffn"), *, layer_index: int,
                    neuron_group_size: int | None = None) -> tuple[list[str], Tensor]:
    """Per-token squared function norms ||f_m(x_t)||^2 of one layer's branches.

    Returns (names, sq) with sq of shape (batch, seq, len(names)); column j belongs to names[j], in the
    canonical order of `list_branches`. Padding tokens (mask == 0; mask is the (batch, seq) attention mask,
    None = all real) are set to exactly 0, so a sum over tokens divided by mask.sum() is the mean over real
    tokens. Differentiable (autograd flows into the trace and the layer's weights).

    Heads and neuron groups use the Gram identity ||W_h c||^2 = c^T (W_h^T W_h) c (see module doc).
    """
    if trace_layer.packing is not None:
        raise ValueError(f"layer {layer_index}: per-token norms need a trace on the (batch, seq) layout; this one is "
                         "packed (recorded with pack_trace=True): use branch_sq_sums, or trace without pack_trace")
    kinds = check_kinds(kinds, neuron_group_size)
    names: list[str] = []
    cols: list[Tensor] = []
    attn, ffn = layer_module.attention, layer_module.ffn
    if attn is not None and trace_layer.context is None:
        raise ValueError(f"layer {layer_index}: the trace has no attention context but the layer has an "
                         "attention block; was the trace recorded before pruning?")
    if attn is not None:
        if "head" in kinds:
            ctx = trace_layer.context                                        # (B, n, S, d)
            g = head_gram(attn).to(ctx.dtype)                                # (n, d, d)
            sq = (torch.matmul(ctx, g) * ctx).sum(-1)                        # (B, n, S)
            gate = _block_gate_sq(attn, sq.dtype)
            if gate is not None:
                sq = sq * gate
            cols.append(sq.transpose(1, 2))                                  # (B, S, n)
            names += [branch_name(layer_index, "head", h) for h in attn.heads]
        if "attention" in kinds:
            cols.append(trace_layer.attention_out.pow(2).sum(-1, keepdim=True))
            names.append(branch_name(layer_index, "attention"))
    if ffn is not None:
        if trace_layer.ffn_act is None:
            raise ValueError(f"layer {layer_index}: the trace has no FFN activations but the layer has an FFN")
        if "neurons" in kinds:
            z = trace_layer.ffn_act                                          # (B, S, F)
            size = neuron_group_size
            pad = (-ffn.ffn_dim) % size
            if pad:
                z = torch.nn.functional.pad(z, (0, pad))
            z = z.view(z.shape[0], z.shape[1], -1, size)                     # (B, S, G, g)
            if size == 1:
                sq = z.squeeze(-1).pow(2) * ffn.down.weight.pow(2).sum(0).to(z.dtype)
            else:
                g = neuron_gram(ffn, size).to(z.dtype)                       # (G, g, g)
                sq = (torch.einsum("bsgi,gij->bsgj", z, g) * z).sum(-1)      # (B, S, G)
            gate = _block_gate_sq(ffn, sq.dtype)
            if gate is not None:
                sq = sq * gate
            cols.append(sq)
            names += [branch_name(layer_index, "neurons", i) for i in range(sq.shape[-1])]
        if "ffn" in kinds:
            cols.append(trace_layer.ffn_output(layer_module).pow(2).sum(-1, keepdim=True))
            names.append(branch_name(layer_index, "ffn"))
    b, s = trace_layer.x.shape[:2]
    if not cols:
        return names, trace_layer.x.new_zeros(b, s, 0)
    sq = torch.cat(cols, dim=-1)
    if mask is not None:
        sq = torch.where(mask.to(torch.bool).view(b, s, 1), sq, sq.new_zeros(()))
    return names, sq


def token_mask(attention_mask: Tensor | None, traces: Sequence[LayerTrace]) -> Tensor:
    """The (batch, seq) boolean mask of real tokens (all True when attention_mask is None)."""
    if attention_mask is not None:
        return attention_mask.to(torch.bool)
    x = traces[0].x
    return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)


# --- the same, summed over a batch's real tokens: what the prior and the estimates need ------------------------

class _GramSums(torch.autograd.Function):
    """s_k = sum_t keep_kt ||W_k x_kt||^2 for groups k: x (K, T, m), keep (K, T, 1) of 0/1 or None, w (rows, K, m)
    (W_k = w[:, k, :]; any strides) -> s (K,). The Gram identity of `branch_sq_norms`, summed over tokens without a
    per-token intermediate:

        s_k = < G_k, M_k >,   G_k = W_k^T W_k,   M_k = sum_t keep_kt x_kt x_kt^T      (two batched matmuls, (K, m, m))

    and a backward of two more: ds_k/dx_kt = keep_kt (G_k + G_k^T) x_kt, ds_k/dW_k = W_k (M_k + M_k^T). (Autograd
    through the per-token formula (x G) . x with G from an einsum runs five: x G and a gradient for each of its
    operands, and one for each operand of W^T W.)

    Under autocast (bf16 traces on a GPU) both passes run in float32 (at least) with autocast off: a sum over
    every token of a batch wants the wider accumulator, and each gradient comes back in its input's dtype. In
    float32 or float64 the casts are no-ops."""

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor | None, w: Tensor) -> Tensor:
        ctx.dtypes = (x.dtype, w.dtype)
        wide = torch.promote_types(torch.promote_types(x.dtype, w.dtype), torch.float32)  # float64 stays
        with torch.autocast(x.device.type, enabled=False):
            x, wk = x.to(wide), w.to(wide).transpose(0, 1)  # to() keeps a view's strides; wk (K, rows, m)
            xm = x if keep is None else x * keep.to(wide)
            g = torch.bmm(wk.transpose(1, 2), wk)
            m = torch.bmm(xm.transpose(1, 2), x)
            ctx.save_for_backward(xm, wk, g, m)
            return (m * g).sum(dim=(1, 2))

    @staticmethod
    def backward(ctx, ds: Tensor):
        xm, wk, g, m = ctx.saved_tensors
        ds = ds.to(m.dtype).view(-1, 1, 1)
        dx = dw = None
        with torch.autocast(xm.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                dx = torch.bmm(xm, (g + g.transpose(1, 2)) * ds).to(ctx.dtypes[0])
            if ctx.needs_input_grad[2]:
                dw = torch.bmm(wk, (m + m.transpose(1, 2)) * ds).transpose(0, 1).to(ctx.dtypes[1])
        return dx, None, dw


def branch_sq_sums(trace_layer: LayerTrace, layer_module: Layer, mask: Tensor | None,
                   kinds: Iterable[str] = ("head", "attention", "ffn"), *, layer_index: int,
                   neuron_group_size: int | None = None) -> tuple[list[str], Tensor]:
    """Per-branch sums over the real tokens of ||f_m(x_t)||^2 for one layer: (names, sums (len(names),)).

    Equal to `branch_sq_norms(...)[1].sum(dim=(0, 1))` (tested, values and gradients) in the same order, but
    computed without the (batch, seq, branches) intermediate: heads and neuron groups through token Gram
    matrices (`_GramSums`), blocks as masked sums of squares. mask: (batch, seq) bool, None = all real.
    A packed trace (`LayerTrace.packing`) holds the real tokens only: its FFN activations and block outputs
    need no mask (and no work is spent on padding); the attention context keeps the batch layout, and its real
    tokens are gathered as the output projection gathers them.
    """
    kinds = check_kinds(kinds, neuron_group_size)
    names: list[str] = []
    sums: list[Tensor] = []
    attn, ffn = layer_module.attention, layer_module.ffn
    packing = trace_layer.packing
    b, s = (packing.batch, packing.seq) if packing is not None else trace_layer.x.shape[:2]
    keep = None if mask is None else mask.to(trace_layer.x.dtype)                 # (B, S) of 0 / 1
    token_keep = None if packing is not None else keep  # for the fields laid out per token (packed: all real)
    if attn is not None and trace_layer.context is None:
        raise ValueError(f"layer {layer_index}: the trace has no attention context but the layer has an "
                         "attention block; was the trace recorded before pruning?")
    if attn is not None:
        if "head" in kinds:
            ctx = trace_layer.context                                                # (B, n, S, d)
            n, d = ctx.shape[1], ctx.shape[3]
            w = attn.out.weight.view(attn.out.out_features, n, d)                    # W_h = w[:, h, :]
            merged = ctx.transpose(1, 2).reshape(b, s, n * d)  # (B, S, n d): a view of the kernels' output layout
            if packing is not None:  # the real tokens, as the projection reads them: no mask, no work on padding
                x, k = packing.pack(merged), None
            else:
                x, k = merged.view(b * s, n * d), None if keep is None else keep.view(1, b * s, 1)
            sq = _GramSums.apply(x.view(-1, n, d).transpose(0, 1), k, w)            # (n, tokens, d) -> (n,)
            gate = _block_gate_sq(attn, sq.dtype)
            sums.append(sq if gate is None else sq * gate)
            names += [branch_name(layer_index, "head", h) for h in attn.heads]
        if "attention" in kinds:
            sums.append(_masked_sq_sum(trace_layer.attention_out, token_keep))
            names.append(branch_name(layer_index, "attention"))
    if ffn is not None:
        if trace_layer.ffn_act is None:
            raise ValueError(f"layer {layer_index}: the trace has no FFN activations but the layer has an FFN")
        if "neurons" in kinds:
            z = trace_layer.ffn_act                                    # (B, S, F), or packed (tokens, F)
            size = neuron_group_size
            pad = (-ffn.ffn_dim) % size
            if pad:
                z = torch.nn.functional.pad(z, (0, pad))
            groups = z.shape[-1] // size
            z = z.reshape(-1, z.shape[-1])                                           # (tokens, F), a view
            k = None if token_keep is None else token_keep.view(-1, 1)               # (tokens, 1)
            if size == 1:
                zz = z.pow(2) if k is None else z.pow(2) * k
                sq = zz.sum(0) * ffn.down.weight.pow(2).sum(0).to(z.dtype)
            else:
                w = ffn.down.weight
                w = torch.nn.functional.pad(w, (0, pad)) if pad else w
                x = z.view(-1, groups, size).transpose(0, 1)                         # (G, tokens, g), a view
                sq = _GramSums.apply(x, None if k is None else k.view(1, -1, 1),
                                     w.view(w.shape[0], groups, size))               # (G,)
            gate = _block_gate_sq(ffn, sq.dtype)
            sums.append(sq if gate is None else sq * gate)
            names += [branch_name(layer_index, "neurons", i) for i in range(groups)]
        if "ffn" in kinds:
            sums.append(_masked_sq_sum(trace_layer.ffn_output(layer_module), token_keep))
            names.append(branch_name(layer_index, "ffn"))
    if not sums:
        return names, trace_layer.x.new_zeros(0)
    return names, torch.cat(sums)


def _masked_sq_sum(out: Tensor, keep: Tensor | None) -> Tensor:
    """sum over real tokens of ||out_t||^2, shape (1,): out (B, S, hidden) or packed (tokens, hidden), keep
    (B, S) of 0 / 1 or None (packed: None, every row is a real token)."""
    sq = out.pow(2).sum(-1)
    return (sq if keep is None else sq * keep.to(sq.dtype)).sum().view(1)


def batch_sq_norms(model: nn.Module, traces: Sequence[LayerTrace], attention_mask: Tensor | None,
                   kinds: Iterable[str] = DEFAULT_KINDS, neuron_group_size: int | None = None
                   ) -> tuple[list[str], Tensor, Tensor]:
    """(names, summed squared norms over the batch's real tokens (n_branches,), number of real tokens).

    Sums per layer with `branch_sq_sums` (the per-token `branch_sq_norms`, summed, without materialising it).
    """
    kinds, neuron_group_size = resolve_kinds(model, kinds, neuron_group_size)
    enc = encoder_of(model)
    if len(traces) != len(enc.layers):
        raise ValueError(f"got {len(traces)} layer traces for a model with {len(enc.layers)} layers; "
                         "pass a fresh list as trace= to each forward")
    mask = token_mask(attention_mask, traces)
    count = mask.sum()
    # masked even without padding: asking whether there is any would read a number back from the device in every
    # training step, and multiplying by ones changes no value
    real = None if attention_mask is None else mask
    names: list[str] = []
    sums: list[Tensor] = []
    for i, (t, layer) in enumerate(zip(traces, enc.layers)):
        n, sq = branch_sq_sums(t, layer, real, kinds, layer_index=i, neuron_group_size=neuron_group_size)
        names += n
        sums.append(sq)
    total = torch.cat(sums) if sums else traces[0].x.new_zeros(0)
    return names, total, count


# --- estimates over a data set and during training ---------------------------------------------------------

def _encoder_inputs(batch: Mapping, device: torch.device) -> tuple[Tensor, Tensor | None, Tensor | None]:
    if "input_ids" not in batch:
        raise ValueError(f"a calibration batch needs 'input_ids'; got keys {sorted(batch)}")
    get = lambda k: None if batch.get(k) is None else torch.as_tensor(batch[k]).to(device)  # noqa: E731
    return get("input_ids"), get("attention_mask"), get("token_type_ids")


def function_norms(model: nn.Module, batches: Iterable[Mapping[str, Tensor]],
                   kinds: Iterable[str] = DEFAULT_KINDS, neuron_group_size: int | None = None,
                   param_weighted: bool = False) -> dict[str, float]:
    """||f_m|| for every branch, estimated exactly over a calibration set.

    ||f_m|| = sqrt( sum over all batches' real tokens of ||f_m(x_t)||^2 / number of real tokens ) -- a mean
    over tokens of the whole set (not a mean of per-batch means). Runs in eval mode (no dropout; the
    model's mode is restored afterwards) under no_grad. `batches`: dicts with input_ids and optionally
    attention_mask / token_type_ids (other keys, e.g. labels, are ignored).

    param_weighted=True returns ||f_m|| / params_m (norm per parameter): it ranks a branch by how much output
    it buys per weight, so a large FFN block is no longer protected by its size alone when comparing
    branches of different kinds.
    """
    kinds, neuron_group_size = resolve_kinds(model, kinds, neuron_group_size)
    enc = encoder_of(model)
    device = next(enc.parameters()).device
    was_training = model.training
    model.eval()
    names: list[str] | None = None
    total: Tensor | None = None
    count = 0
    try:
        with torch.no_grad():
            for batch in batches:
                ids, am, tt = _encoder_inputs(batch, device)
                trace: list[LayerTrace] = []
                enc(ids, am, tt, trace=trace)
                # BEGIN SOLUTION
                n, s, c = batch_sq_norms(enc, trace, am, kinds, neuron_group_size)
                if names is None:
                    names, total = n, s.double()
                else:
                    total += s.double()
                count += int(c)
                # END SOLUTION
    finally:
        model.train(was_training)
    if names is None:
        raise ValueError("function_norms got no calibration batches")
    if count == 0:
        raise ValueError("the calibration batches hold no real (non-padding) token")
    # BEGIN SOLUTION
    norms = (total / count).clamp_min(0).sqrt().tolist()
    # END SOLUTION
    out = dict(zip(names, norms))
    if param_weighted:
        params = branch_params(enc, kinds, neuron_group_size)
        out = {k: v / params[k] for k, v in out.items()}
    return out


class NormEMA:
    """Running estimate of the function norms during training, from the traces the training step has anyway.

    Per branch it keeps an exponential moving average of the batch's mean squared norm over real tokens,
    m <- decay * m + (1 - decay) * batch_mean (the first batch sets m), and reports sqrt(m). Averaging the
    squares (not the norms) keeps the estimate consistent with `function_norms`. The traces are read
    detached: updating never adds to the autograd graph. Branches no longer present in the model (pruned
    since the last update) are dropped; new ones start from their first batch.
    """

    def __init__(self, kinds: Iterable[str] = DEFAULT_KINDS, decay: float = 0.99,
                 neuron_group_size: int | None = None):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        kinds = tuple(kinds) if not isinstance(kinds, str) else (kinds,)
        # validated now; a group size of None is resolved against the model at each update (2 * head_dim)
        self.kinds = check_kinds(kinds, neuron_group_size or (1 if "neurons" in kinds else None))
        self.decay = decay
        self.neuron_group_size = neuron_group_size
        self._sq: dict[str, float] = {}
        self.steps = 0

    @torch.no_grad()
    def update(self, traces: Sequence[LayerTrace], mask: Tensor | None, model: nn.Module) -> None:
        """Fold one batch in. traces: from model(..., trace=[]); mask: that batch's attention_mask. Under torchrun
        the batch is the global one (every rank must call it; one process: as is)."""
        names, sums, count = batch_sq_norms(model, traces, mask, self.kinds, self.neuron_group_size)
        sums, count = distributed.global_sum(sums), distributed.global_sum(count)
        if int(count) == 0:
            return
        means = (sums.detach().double() / int(count)).tolist()
        new = {}
        for name, m in zip(names, means):
            old = self._sq.get(name)
            new[name] = m if old is None else self.decay * old + (1.0 - self.decay) * m
        self._sq = new
        self.steps += 1

    def norms(self) -> dict[str, float]:
        """{name: running ||f_m||}; empty before the first update."""
        return {k: math.sqrt(max(v, 0.0)) for k, v in self._sq.items()}

    def reset(self) -> None:
        self._sq = {}
        self.steps = 0


__all__ = ["NormEMA", "batch_sq_norms", "branch_sq_norms", "branch_sq_sums", "function_norms", "head_gram",
           "neuron_gram", "token_mask"]
