"""What a residual branch is, what it owns, and how large its function is.

SNIP (Lin et al., Findings of EMNLP 2020) prunes *residual modules* rather than single weights: "we propose
to find and drop unimportant non-linear mappings [...] by a thresholding operator on the function norm", and
the method "works for any structured module: one attention head, a whole attention block, a feed-forward
block". This file names those modules (`Branch`), counts what each owns (parameters, FLOPs), and measures
their function norms. The paper gives no formula for the norm; the one here is minisnip's reconstruction.

Branches and their names (stable strings, used everywhere in `minisnip.snip`):

    "layer3.head7"       kind "head":      head 7 of layer 3, by its ORIGINAL index (`Attention.heads`)
    "layer3.attention"   kind "attention": the whole attention block of layer 3 (all its heads + b_O)
    "layer3.ffn"         kind "ffn":       the whole feed-forward block of layer 3 (all its neurons + b_2)
    "layer3.neurons5"    kind "neurons":   FFN neuron group 5 of layer 3: the CURRENT neurons
                                           5g .. 5g+g-1 for group size g (the last group may be shorter)

Function norm (reconstruction). The paper speaks of the "function norm" of a module f_m. minisnip uses the
root mean square of the branch's own output over the real (non-padding) tokens of a data set:

    ||f_m|| = sqrt( mean_{tokens t, not padding} ||f_m(x_t)||_2^2 )

where f_m(x) is the branch output before dropout and before the residual sum:

    head h:          W_O[:, cols_h] ctx_h                (no bias: b_O belongs to the block)
    attention block: Attn(x) = W_O ctx + b_O             (`LayerTrace.attention_out`)
    FFN block:       FFN(h)  = W_2 z + b_2               (`LayerTrace.ffn_out`)
    neuron group g:  W_2[:, g] z_g                       (no bias: b_2 belongs to the block)

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
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..model import Layer, LayerTrace
from ..surgery import encoder_of

KINDS = ("head", "attention", "neurons", "ffn")
"""All branch kinds, in the canonical order in which a layer's branches are listed."""

_NAME = re.compile(r"^layer(\d+)\.(?:(head)(\d+)|(attention)|(ffn)|(neurons)(\d+))$")


@dataclass(frozen=True)
class Branch:
    """One residual branch of a (possibly pruned) encoder, as `list_branches` saw it.

    name:    stable string, e.g. "layer3.head7" (original head index), "layer3.neurons5" (see module doc).
    kind:    "head", "attention", "ffn" or "neurons".
    layer:   encoder layer index.
    index:   original head index (head), group index (neurons), None for blocks.
    params:  encoder linear-layer parameters (weights + biases) the branch owns:
               head:      its 3d rows of W_QKV + 3d biases + its d columns of W_O   = 4*d*H + 3*d
               attention: all its heads + b_O                                      = n*(4*d*H + 3*d) + H
               neurons:   per neuron a row + bias of W_1 and a column of W_2         = g*(2*H + 1)
               ffn:       all its neurons + b_2                                     = F*(2*H + 1) + H
             (H = hidden size, d = head size, n = heads present, F = neurons present, g = group size).
    flops:   FLOPs per token at sequence length S (1 multiply-add = 2 FLOPs; biases, softmax, GELU and
             LayerNorm are not counted):
               head:      2*(3*H*d  [Q,K,V]  +  S*d  [q.k_j, j<S]  +  S*d  [sum_j p_j v_j]  +  d*H  [W_O])
                          = 2*(4*H*d + 2*S*d)
               attention: the sum over its heads
               neurons:   2*(2*H) per neuron (its row of W_1 and column of W_2)
               ffn:       2*(2*H*F)
    parent:  the block a head / neuron group belongs to ("layer3.attention" / "layer3.ffn"); None for blocks.
    neurons: for a neuron group, the current neuron indices it covered at listing time; None otherwise.
    """

    name: str
    kind: str
    layer: int
    index: int | None
    params: int
    flops: int
    parent: str | None = None
    neurons: tuple[int, ...] | None = None


def branch_name(layer: int, kind: str, index: int | None = None) -> str:
    """The stable name of a branch: branch_name(3, "head", 7) == "layer3.head7"."""
    if kind in ("attention", "ffn"):
        return f"layer{layer}.{kind}"
    if kind in ("head", "neurons"):
        if index is None:
            raise ValueError(f"a {kind!r} branch needs an index")
        return f"layer{layer}.{kind}{index}"
    raise ValueError(f"unknown branch kind {kind!r}; expected one of {KINDS}")


def parse_name(name: str) -> tuple[int, str, int | None]:
    """(layer, kind, index) of a branch name; ValueError for anything else."""
    m = _NAME.match(name) if isinstance(name, str) else None
    if m is None:
        raise ValueError(f"not a branch name: {name!r} (expected e.g. 'layer3.head7', 'layer3.attention', "
                         "'layer3.ffn', 'layer3.neurons5')")
    layer = int(m.group(1))
    if m.group(2):
        return layer, "head", int(m.group(3))
    if m.group(4):
        return layer, "attention", None
    if m.group(5):
        return layer, "ffn", None
    return layer, "neurons", int(m.group(7))


def check_kinds(kinds: Iterable[str], neuron_group_size: int | None) -> tuple[str, ...]:
    """Validate `kinds` / `neuron_group_size`; return kinds in canonical order."""
    kinds = tuple(kinds) if not isinstance(kinds, str) else (kinds,)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown branch kinds {unknown}; expected a subset of {KINDS}")
    if not kinds:
        raise ValueError("kinds is empty: name at least one branch kind")
    if "neurons" in kinds:
        if (not isinstance(neuron_group_size, int) or isinstance(neuron_group_size, bool)
                or neuron_group_size < 1):
            raise ValueError(f"kind 'neurons' needs neuron_group_size >= 1, got {neuron_group_size!r}")
    elif neuron_group_size is not None:
        raise ValueError(f"neuron_group_size={neuron_group_size} is set but 'neurons' is not among kinds {kinds}")
    return tuple(k for k in KINDS if k in kinds)


# --- parameter and FLOP counts -----------------------------------------------------------------------------

def head_params(hidden: int, head_dim: int) -> int:
    return 4 * hidden * head_dim + 3 * head_dim


def neuron_params(hidden: int) -> int:
    return 2 * hidden + 1


def head_flops(hidden: int, head_dim: int, seq_len: int) -> int:
    return 2 * (4 * hidden * head_dim + 2 * seq_len * head_dim)


def neuron_flops(hidden: int) -> int:
    return 2 * 2 * hidden


def _groups(width: int, size: int) -> list[range]:
    return [range(s, min(s + size, width)) for s in range(0, width, size)]


def layer_branches(layer: Layer, layer_index: int, kinds: Sequence[str], neuron_group_size: int | None,
                   hidden: int, seq_len: int) -> list[Branch]:
    """The branches of one layer in canonical order: heads, attention, neuron groups, ffn."""
    out: list[Branch] = []
    attn, ffn = layer.attention, layer.ffn
    if attn is not None:
        d, n = attn.head_dim, attn.num_heads
        block = branch_name(layer_index, "attention")
        if "head" in kinds:
            out += [Branch(branch_name(layer_index, "head", h), "head", layer_index, h, head_params(hidden, d),
                           head_flops(hidden, d, seq_len), parent=block) for h in attn.heads]
        if "attention" in kinds:
            out.append(Branch(block, "attention", layer_index, None, n * head_params(hidden, d) + hidden,
                              n * head_flops(hidden, d, seq_len)))
    if ffn is not None:
        width = ffn.ffn_dim
        block = branch_name(layer_index, "ffn")
        if "neurons" in kinds:
            out += [Branch(branch_name(layer_index, "neurons", g), "neurons", layer_index, g,
                           len(r) * neuron_params(hidden), len(r) * neuron_flops(hidden), parent=block,
                           neurons=tuple(r)) for g, r in enumerate(_groups(width, neuron_group_size))]
        if "ffn" in kinds:
            out.append(Branch(block, "ffn", layer_index, None, width * neuron_params(hidden) + hidden,
                              width * neuron_flops(hidden)))
    return out


def list_branches(model: nn.Module, kinds: Iterable[str] = ("head", "attention", "ffn"),
                  neuron_group_size: int | None = None, seq_len: int = 128) -> list[Branch]:
    """All branches of the kinds asked for, layer by layer (heads, attention, neuron groups, ffn).

    Works on a pruned model: only present heads / neurons / blocks are listed. Neuron groups are
    consecutive current neurons in groups of `neuron_group_size` (needed iff "neurons" is in kinds).
    `seq_len` is the sequence length at which head FLOPs are counted (see `Branch.flops`).
    """
    kinds = check_kinds(kinds, neuron_group_size)
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    enc = encoder_of(model)
    hidden = enc.config.hidden_size
    return [b for i, layer in enumerate(enc.layers)
            for b in layer_branches(layer, i, kinds, neuron_group_size, hidden, seq_len)]


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
            cols.append(trace_layer.ffn_out.pow(2).sum(-1, keepdim=True))
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


def batch_sq_norms(model: nn.Module, traces: Sequence[LayerTrace], attention_mask: Tensor | None,
                   kinds: Iterable[str], neuron_group_size: int | None = None
                   ) -> tuple[list[str], Tensor, Tensor]:
    """(names, summed squared norms over the batch's real tokens (n_branches,), number of real tokens)."""
    enc = encoder_of(model)
    if len(traces) != len(enc.layers):
        raise ValueError(f"got {len(traces)} layer traces for a model with {len(enc.layers)} layers; "
                         "pass a fresh list as trace= to each forward")
    mask = token_mask(attention_mask, traces)
    names: list[str] = []
    sums: list[Tensor] = []
    for i, (t, layer) in enumerate(zip(traces, enc.layers)):
        n, sq = branch_sq_norms(t, layer, mask, kinds, layer_index=i, neuron_group_size=neuron_group_size)
        names += n
        sums.append(sq.sum(dim=(0, 1)))
    total = torch.cat(sums) if sums else traces[0].x.new_zeros(0)
    return names, total, mask.sum()


# --- estimates over a data set and during training ---------------------------------------------------------

def branch_params(model: nn.Module, kinds: Iterable[str], neuron_group_size: int | None = None) -> dict[str, int]:
    """{name: params} for the branches of the kinds asked for."""
    return {b.name: b.params for b in list_branches(model, kinds, neuron_group_size)}


def _encoder_inputs(batch: Mapping, device: torch.device) -> tuple[Tensor, Tensor | None, Tensor | None]:
    if "input_ids" not in batch:
        raise ValueError(f"a calibration batch needs 'input_ids'; got keys {sorted(batch)}")
    get = lambda k: None if batch.get(k) is None else torch.as_tensor(batch[k]).to(device)  # noqa: E731
    return get("input_ids"), get("attention_mask"), get("token_type_ids")


def function_norms(model: nn.Module, batches: Iterable[Mapping[str, Tensor]],
                   kinds: Iterable[str] = ("head", "attention", "ffn"), neuron_group_size: int | None = None,
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
    kinds = check_kinds(kinds, neuron_group_size)
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
                n, s, c = batch_sq_norms(enc, trace, am, kinds, neuron_group_size)
                if names is None:
                    names, total = n, s.double()
                else:
                    total += s.double()
                count += int(c)
    finally:
        model.train(was_training)
    if names is None:
        raise ValueError("function_norms got no calibration batches")
    if count == 0:
        raise ValueError("the calibration batches hold no real (non-padding) token")
    norms = (total / count).clamp_min(0).sqrt().tolist()
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

    def __init__(self, kinds: Iterable[str] = ("head", "attention", "ffn"), decay: float = 0.99,
                 neuron_group_size: int | None = None):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.kinds = check_kinds(kinds, neuron_group_size)
        self.decay = decay
        self.neuron_group_size = neuron_group_size
        self._sq: dict[str, float] = {}
        self.steps = 0

    @torch.no_grad()
    def update(self, traces: Sequence[LayerTrace], mask: Tensor | None, model: nn.Module) -> None:
        """Fold one batch in. traces: from model(..., trace=[]); mask: that batch's attention_mask."""
        names, sums, count = batch_sq_norms(model, traces, mask, self.kinds, self.neuron_group_size)
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


__all__ = ["Branch", "KINDS", "NormEMA", "batch_sq_norms", "branch_name", "branch_params", "branch_sq_norms",
           "check_kinds", "function_norms", "head_gram", "list_branches", "neuron_gram", "parse_name"]
