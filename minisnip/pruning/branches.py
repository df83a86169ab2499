"""The branches of a model: what a residual branch is, what it is called, and what it owns.

SNIP (Lin et al., Findings of EMNLP 2020) and every structured method it is compared with prune *residual
modules* rather than single weights: "one attention head, a whole attention block, a feed-forward block".
This file names those modules (`Branch`) and counts what each owns (parameters, FLOPs). It is the one place
that builds and parses a branch name; every method, plot and result file uses these strings.

    "layer3.head7"       kind "head":      head 7 of layer 3, by its ORIGINAL index (`Attention.heads`)
    "layer3.attention"   kind "attention": the whole attention block of layer 3 (all its heads + b_O)
    "layer3.ffn"         kind "ffn":       the whole feed-forward block of layer 3 (all its neurons + b_2)
    "layer3.neurons5"    kind "neurons":   FFN neuron group 5 of layer 3: the CURRENT neurons
                                           5g .. 5g+g-1 for group size g (the last group may be shorter)

The default group size is 2 * head_dim (`default_group_size`): such a group owns as many weights as one
head (4*H*d vs 2*H*2d + 2d), so heads and groups are equal units on the scale of compression.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from torch import nn

from ..model import Layer
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


DEFAULT_KINDS = ("head", "neurons")
"""The branches pruned when nothing else is said: heads and FFN neuron groups (of `default_group_size`)."""


def resolve_kinds(model: nn.Module, kinds: Iterable[str], neuron_group_size: int | None) -> tuple[tuple[str, ...], int | None]:
    """Validated kinds in canonical order and the group size: None with "neurons" means `default_group_size`."""
    kinds = tuple(kinds) if not isinstance(kinds, str) else (kinds,)
    if "neurons" in kinds and neuron_group_size is None:
        neuron_group_size = default_group_size(model)
    return check_kinds(kinds, neuron_group_size), neuron_group_size


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


def list_branches(model: nn.Module, kinds: Iterable[str] = DEFAULT_KINDS,
                  neuron_group_size: int | None = None, seq_len: int = 128) -> list[Branch]:
    """All branches of the kinds asked for, layer by layer (heads, attention, neuron groups, ffn).

    Works on a pruned model: only present heads / neurons / blocks are listed. Neuron groups are
    consecutive current neurons in groups of `neuron_group_size` (default 2 * head_dim).
    `seq_len` is the sequence length at which head FLOPs are counted (see `Branch.flops`).
    """
    kinds, neuron_group_size = resolve_kinds(model, kinds, neuron_group_size)
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    enc = encoder_of(model)
    hidden = enc.config.hidden_size
    return [b for i, layer in enumerate(enc.layers)
            for b in layer_branches(layer, i, kinds, neuron_group_size, hidden, seq_len)]


def branch_params(model: nn.Module, kinds: Iterable[str] = DEFAULT_KINDS,
                  neuron_group_size: int | None = None) -> dict[str, int]:
    """{name: params} for the branches of the kinds asked for."""
    return {b.name: b.params for b in list_branches(model, kinds, neuron_group_size)}


def default_group_size(model: nn.Module) -> int:
    """FFN neurons per branch when none is given: 2 * head_dim (a group then owns as many weights as a head)."""
    return 2 * encoder_of(model).config.head_dim


__all__ = ["Branch", "DEFAULT_KINDS", "KINDS", "branch_name", "branch_params", "check_kinds", "default_group_size", "head_flops",
           "head_params", "layer_branches", "list_branches", "neuron_flops", "neuron_params", "parse_name", "resolve_kinds"]
