"""The removal plan and physical removal: a set of branch names, resolved against a model, then applied.

Hierarchy (the same rules as `minisnip.surgery`): a layer whose heads are all selected loses its attention
block, b_O included; a layer whose neurons are all selected loses its FFN block, b_2 included. A head and its
block (or a neuron group and its block) are never counted twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from torch import nn

from ..surgery import PruningError, encoder_of, prune_ffn_neurons, prune_heads, remove_blocks
from .branches import Branch, head_params, neuron_params, parse_name
from .compression import COMPRESSION_DEFINITION, dense_encoder_linear_params, encoder_linear_params

# --- a set of branches to remove, resolved against a model -------------------------------------------------

@dataclass
class _LayerPlan:
    attention: bool = False                      # whole block named
    heads: set[int] = field(default_factory=set)  # original head ids
    ffn: bool = False
    neurons: set[int] = field(default_factory=set)  # current neuron indices
    groups: dict[int, str] = field(default_factory=dict)  # group index -> name


class RemovalPlan:
    """Branches to remove from one model, with the hierarchy rules and parameter accounting."""

    def __init__(self, model: nn.Module, neuron_group_size: int | None = None):
        self.enc = encoder_of(model)
        self.hidden = self.enc.config.hidden_size
        self.size = neuron_group_size
        self.layers = [_LayerPlan() for _ in self.enc.layers]

    # what is gone
    def attention_gone(self, i: int) -> bool:
        attn, p = self.enc.layers[i].attention, self.layers[i]
        return attn is not None and (p.attention or set(attn.heads) <= p.heads)

    def ffn_gone(self, i: int) -> bool:
        ffn, p = self.enc.layers[i].ffn, self.layers[i]
        return ffn is not None and (p.ffn or len(p.neurons) >= ffn.ffn_dim)

    def removed_params(self, i: int) -> int:
        layer, p = self.enc.layers[i], self.layers[i]
        n = 0
        if layer.attention is not None:
            hp = head_params(self.hidden, layer.attention.head_dim)
            n += layer.attention.num_heads * hp + self.hidden if self.attention_gone(i) else len(p.heads) * hp
        if layer.ffn is not None:
            npar = neuron_params(self.hidden)
            n += layer.ffn.ffn_dim * npar + self.hidden if self.ffn_gone(i) else len(p.neurons) * npar
        return n

    def leaves_something(self) -> bool:
        return any((l.attention is not None and not self.attention_gone(i)) or
                   (l.ffn is not None and not self.ffn_gone(i)) for i, l in enumerate(self.enc.layers))

    # adding
    def add(self, item: str | Branch) -> int:
        """Add one branch; returns the layer it is in. PruningError if the model has no such branch."""
        name = item.name if isinstance(item, Branch) else item
        try:
            layer, kind, index = parse_name(name)
        except ValueError as e:
            raise PruningError(str(e)) from None
        if not 0 <= layer < len(self.enc.layers):
            raise PruningError(f"{name}: layer {layer} does not exist (the model has {len(self.enc.layers)} layers)")
        mod, p = self.enc.layers[layer], self.layers[layer]
        if kind in ("head", "attention"):
            if mod.attention is None:
                raise PruningError(f"{name}: layer {layer} has no attention block any more")
            if kind == "attention":
                p.attention = True
            elif index not in mod.attention.heads:
                raise PruningError(f"{name}: head {index} is not present in layer {layer} "
                                   f"(present: {mod.attention.heads})")
            else:
                p.heads.add(index)
            return layer
        if mod.ffn is None:
            raise PruningError(f"{name}: layer {layer} has no feed-forward block any more")
        if kind == "ffn":
            p.ffn = True
            return layer
        width = mod.ffn.ffn_dim
        if isinstance(item, Branch) and item.neurons is not None:
            neurons = item.neurons
        else:
            if self.size is None:
                raise ValueError(f"{name} is a neuron group: pass neuron_group_size (the group size used when "
                                 "the branches were listed), or pass the Branch objects themselves")
            neurons = tuple(range(index * self.size, min((index + 1) * self.size, width)))
        if not neurons or max(neurons) >= width:
            raise PruningError(f"{name}: neuron group {index} does not exist in layer {layer} (width {width}); "
                               "was it listed before the layer was pruned?")
        p.neurons.update(neurons)
        p.groups[index] = name
        return layer

    def names(self) -> list[str]:
        """Canonical names: a block instead of all its parts; parts of a removed block dropped."""
        out: list[str] = []
        for i, p in enumerate(self.layers):
            if self.attention_gone(i):
                out.append(f"layer{i}.attention")
            else:
                out += [f"layer{i}.head{h}" for h in sorted(p.heads)]
            if self.ffn_gone(i):
                out.append(f"layer{i}.ffn")
            else:
                out += [p.groups[g] for g in sorted(p.groups)]
        return out


def canonical_names(model: nn.Module, names: Iterable[str | Branch], neuron_group_size: int | None = None
                    ) -> list[str]:
    """What removing `names` really removes, as canonical branch names (see module doc, Hierarchy)."""
    plan = RemovalPlan(model, neuron_group_size)
    for n in names:
        plan.add(n)
    return plan.names()

# --- physical removal ------------------------------------------------------------------------------------------

def apply_pruning(model: nn.Module, names: Iterable[str | Branch], allow_empty: bool = False,
                  neuron_group_size: int | None = None) -> dict:
    """Physically remove the branches named (via `minisnip.surgery`) and report what happened.

    names: branch names or `Branch` objects, all as listed on this model in its current state. Neuron-group
    names need `neuron_group_size` (or pass the Branch objects): a group's indices are those at listing time,
    and all groups of a layer are removed in one step, so earlier removals never shift later indices.
    The whole plan is checked before anything changes: an unknown or absent branch raises PruningError, and
    so does a plan that leaves no attention or feed-forward block at all, unless allow_empty.

    Returns a JSON-serialisable report: removed (canonical names), params_before / params_after (encoder
    linear-layer weights + biases), dense_params, compression_before / compression (share of encoder
    linear-layer weights removed, embeddings and classifier excluded) and compression_definition.
    """
    enc = encoder_of(model)
    plan = RemovalPlan(enc, neuron_group_size)
    for n in names:
        plan.add(n)
    if not allow_empty and not plan.leaves_something():
        raise PruningError("this pruning would remove every attention and feed-forward block; "
                           "pass allow_empty=True if that is really meant")
    dense = dense_encoder_linear_params(enc.config)
    before = encoder_linear_params(enc)
    removed = plan.names()
    attention = [i for i in range(len(enc.layers)) if plan.attention_gone(i)]
    ffn = [i for i in range(len(enc.layers)) if plan.ffn_gone(i)]
    heads = {i: sorted(p.heads) for i, p in enumerate(plan.layers) if p.heads and i not in attention}
    neurons = {i: sorted(p.neurons) for i, p in enumerate(plan.layers) if p.neurons and i not in ffn}
    if attention or ffn:
        remove_blocks(model, attention=attention, ffn=ffn, allow_empty=True)
    if heads:
        prune_heads(model, heads, allow_empty=True)
    if neurons:
        prune_ffn_neurons(model, neurons, allow_empty=True)
    after = encoder_linear_params(enc)
    return {"removed": removed, "params_before": before, "params_after": after, "dense_params": dense,
            "compression_before": 1.0 - before / dense, "compression": 1.0 - after / dense,
            "compression_definition": COMPRESSION_DEFINITION}



__all__ = ["RemovalPlan", "apply_pruning", "canonical_names"]
