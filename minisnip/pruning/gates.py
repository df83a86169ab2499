"""Masks on branches through the model's gates: one value per branch, written into the gate buffers.

Every structured method that learns or probes a mask (movement scores on heads and neuron groups, L0 gates,
head importance, differentiable subset pruning) multiplies each branch's output by a value g_m:

    head h:          ctx_h <- g_m ctx_h          (`Attention.head_gate`, one entry per present head)
    neuron group:    z_i   <- g_m z_i  for every neuron i of the group   (`FeedForward.neuron_gate`)
    attention / ffn: Attn(x) <- g_m Attn(x),  FFN(h) <- g_m FFN(h)       (`Attention.gate`, `FeedForward.gate`)

`GateLayout` maps a vector of branch values (in the order of `list_branches`) onto those buffers with one
gather per layer, so a differentiable vector (scores, gate samples) carries its gradient into the forward
pass without a Python loop over heads. g = 1 everywhere is the unmasked model; g_m = 0 is the model with
branch m removed (tested against physical removal).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..surgery import encoder_of
from .branches import Branch


class GateLayout:
    """Where each of `branches` (heads, neuron groups, blocks of one model) sits in the gate buffers."""

    def __init__(self, model: nn.Module, branches: Sequence[Branch]):
        enc = encoder_of(model)
        self.branches = list(branches)
        self.names = [b.name for b in self.branches]
        n_layers = len(enc.layers)
        self.heads: list[list[int]] = [[] for _ in range(n_layers)]      # per layer: vector index of each head
        self.neurons: list[list[int]] = [[] for _ in range(n_layers)]    # per layer: vector index of each neuron
        self.attention: list[int | None] = [None] * n_layers
        self.ffn: list[int | None] = [None] * n_layers
        for j, b in enumerate(self.branches):
            layer = enc.layers[b.layer]
            if b.kind == "head":
                self.heads[b.layer].append(j)
            elif b.kind == "neurons":
                self.neurons[b.layer] += [j] * len(b.neurons or ())
            elif b.kind == "attention":
                self.attention[b.layer] = j
            else:
                self.ffn[b.layer] = j
        for i, layer in enumerate(enc.layers):  # a partial set of heads or neurons cannot be laid out
            if self.heads[i] and len(self.heads[i]) != layer.attention.num_heads:
                raise ValueError(f"layer {i}: gates need every present head listed, got {len(self.heads[i])} "
                                 f"of {layer.attention.num_heads}")
            if self.neurons[i] and len(self.neurons[i]) != layer.ffn.ffn_dim:
                raise ValueError(f"layer {i}: gates need every neuron covered by a group, got "
                                 f"{len(self.neurons[i])} of {layer.ffn.ffn_dim}")
        device = next(model.parameters()).device  # the index vectors live where the gate values will
        self._heads = [torch.tensor(v, dtype=torch.long, device=device) if v else None for v in self.heads]
        self._neurons = [torch.tensor(v, dtype=torch.long, device=device) if v else None for v in self.neurons]

    def __len__(self) -> int:
        return len(self.branches)

    def apply(self, model: nn.Module, values: Tensor) -> None:
        """Write values (len(self),) into the gates of `model` (differentiable: no copy, no detach)."""
        if values.shape != (len(self),):
            raise ValueError(f"expected {len(self)} gate values (one per branch), got shape {tuple(values.shape)}")
        enc = encoder_of(model)
        for i, layer in enumerate(enc.layers):
            if self._heads[i] is not None:
                layer.attention.head_gate = values.index_select(0, self._heads[i].to(values.device))
            if self._neurons[i] is not None:
                layer.ffn.neuron_gate = values.index_select(0, self._neurons[i].to(values.device))
            if self.attention[i] is not None:
                layer.attention.gate = values[self.attention[i]]
            if self.ffn[i] is not None:
                layer.ffn.gate = values[self.ffn[i]]


def clear_gates(model: nn.Module) -> None:
    """Every gate back to None: the model computes as if it had never been gated."""
    for layer in encoder_of(model).layers:
        for block in (layer.attention, layer.ffn):
            if block is not None:
                block.gate = None
        if layer.attention is not None:
            layer.attention.head_gate = None
        if layer.ffn is not None:
            layer.ffn.neuron_gate = None


__all__ = ["GateLayout", "clear_gates"]
