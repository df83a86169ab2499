"""Physical removal of residual branches: heads, FFN neurons, whole attention / feed-forward blocks.

Removal really shrinks the weight matrices (or drops a block), so the smaller model is faster, and it
keeps `model.config.layers` in step so the pruned model saves and loads with its new shapes. Every
function takes a `BertModel` or a `BertForSequenceClassification` and works in place.

Removing all heads of a layer removes its attention block (with its output bias b_O): the layer then
computes h = LN(x). Removing all neurons of a FFN removes the block: y = LN(h). See `minisnip.model`.
"""

from __future__ import annotations

import operator
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .config import LayerShape
from .model import BertModel


class PruningError(ValueError):
    """A pruning request names a branch that does not exist, or would remove every branch."""


def encoder_of(model: nn.Module) -> BertModel:
    """The BertModel inside a model (itself, or `.bert` of a classifier)."""
    enc = getattr(model, "bert", model)
    if not isinstance(enc, BertModel):
        raise TypeError(f"expected a minisnip BertModel or BertForSequenceClassification, got {type(model).__name__}")
    return enc


def _check_layer(enc: BertModel, layer: Any) -> int:
    """`layer` as an int index of an existing layer; PruningError otherwise."""
    i = _as_index(layer, "layer index")
    if not 0 <= i < len(enc.layers):
        raise PruningError(f"layer {i} does not exist (the model has {len(enc.layers)} layers)")
    return i


def _as_index(value: Any, what: str) -> int:
    """An integral index: an int, a numpy integer or a one-element integer tensor (not a bool, float or str)."""
    if not isinstance(value, bool) and not (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise PruningError(f"{what} {value!r} is not an integer; indices must be ints (or integer tensors)")


def _index_list(values: Any, where: str, kind: str) -> list[int]:
    """A collection of `kind` indices (a list, range, array or integer tensor) as a list of ints.

    `where` starts every error message ("layer 3: "), which then names the offending value.
    """
    if isinstance(values, torch.Tensor):
        if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
            raise PruningError(f"{where}{kind} indices must be integers, got a tensor of dtype {values.dtype}")
        return values.reshape(-1).tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise PruningError(f"{where}expected a list of {kind} indices, got {values!r}")
    return [_as_index(v, f"{where}{kind} index") for v in values]


def _check_mapping(request: Any, name: str) -> None:
    if not isinstance(request, Mapping):
        raise PruningError(f"{name} must be a mapping {{layer: indices}}, got {type(request).__name__}")


def _sync_config(model: nn.Module) -> None:
    """Rewrite the per-layer shapes of the config(s) from the modules themselves."""
    enc = encoder_of(model)
    enc.config.layers = [LayerShape(heads=list(l.attention.heads) if l.attention is not None else [],
                                    ffn_dim=l.ffn.ffn_dim if l.ffn is not None else 0) for l in enc.layers]
    if model is not enc:
        model.config.layers = enc.config.layers  # type: ignore[union-attr]


def _refuse_empty(enc: BertModel, attention_gone: set[int], ffn_gone: set[int], allow_empty: bool) -> None:
    """Raise before anything changes if the plan would leave no attention or feed-forward block at all."""
    survives = any((l.attention is not None and i not in attention_gone) or (l.ffn is not None and i not in ffn_gone)
                   for i, l in enumerate(enc.layers))
    if not survives and not allow_empty:
        raise PruningError("this pruning would remove every attention and feed-forward block; "
                           "pass allow_empty=True if that is really meant")


def prune_heads(model: nn.Module, heads: Mapping[int, Iterable[int]], allow_empty: bool = False) -> None:
    """Remove attention heads given as {layer: original head indices}; a layer losing all heads loses its block."""
    enc = encoder_of(model)
    _check_mapping(heads, "heads")
    plan: dict[int, set[int]] = {}
    for key, hs in heads.items():  # the whole request is checked before anything changes
        layer = _check_layer(enc, key)
        attn = enc.layers[layer].attention
        hs = set(_index_list(hs, f"layer {layer}: ", "head"))
        present = set(attn.heads) if attn is not None else set()
        if not hs <= present:
            raise PruningError(f"layer {layer}: heads {sorted(hs - present)} are not present (present: {sorted(present)})")
        plan[layer] = plan.get(layer, set()) | hs
    _refuse_empty(enc, {l for l, hs in plan.items() if hs and hs == set(enc.layers[l].attention.heads)}, set(),
                  allow_empty)
    _remove_heads(enc, plan)
    _sync_config(model)


def _remove_heads(enc: BertModel, plan: dict[int, set[int]]) -> None:
    for layer, hs in plan.items():
        attn = enc.layers[layer].attention
        if attn is None or not hs:
            continue
        keep = [i for i, h in enumerate(attn.heads) if h not in hs]
        if keep:
            attn.keep_heads(keep)
        else:
            enc.layers[layer].attention = None


def prune_ffn_neurons(model: nn.Module, neurons: Mapping[int, Iterable[int] | torch.Tensor],
                      allow_empty: bool = False) -> None:
    """Remove FFN neurons given as {layer: current neuron indices}; a layer losing all of them loses its FFN."""
    enc = encoder_of(model)
    _check_mapping(neurons, "neurons")
    plan: dict[int, torch.Tensor] = {}
    for key, ns in neurons.items():  # the whole request is checked before anything changes
        layer = _check_layer(enc, key)
        ffn = enc.layers[layer].ffn
        width = ffn.ffn_dim if ffn is not None else 0
        ns = torch.tensor(_index_list(ns, f"layer {layer}: ", "neuron"), dtype=torch.long)
        if layer in plan:
            ns = torch.cat([plan[layer], ns])
        ns = ns.unique()
        if ns.numel() and (int(ns.min()) < 0 or int(ns.max()) >= width):
            raise PruningError(f"layer {layer}: neuron indices must lie in [0, {width}), got {int(ns.min())}..{int(ns.max())}")
        plan[layer] = ns
    _refuse_empty(enc, set(), {l for l, ns in plan.items() if ns.numel() and ns.numel() == enc.layers[l].ffn.ffn_dim},
                  allow_empty)
    _remove_neurons(enc, plan)
    _sync_config(model)


def _remove_neurons(enc: BertModel, plan: dict[int, torch.Tensor]) -> None:
    for layer, ns in plan.items():
        ffn = enc.layers[layer].ffn
        if ffn is None or ns.numel() == 0:
            continue
        keep_mask = torch.ones(ffn.ffn_dim, dtype=torch.bool)
        keep_mask[ns] = False
        if keep_mask.any():
            ffn.keep_neurons(keep_mask.nonzero().squeeze(1))
        else:
            enc.layers[layer].ffn = None


def remove_blocks(model: nn.Module, attention: Iterable[int] = (), ffn: Iterable[int] = (),
                  allow_empty: bool = False) -> None:
    """Remove whole attention blocks and/or feed-forward blocks of the listed layers."""
    enc = encoder_of(model)
    attention = [_check_layer(enc, layer) for layer in _index_list(attention, "attention: ", "layer")]
    ffn = [_check_layer(enc, layer) for layer in _index_list(ffn, "ffn: ", "layer")]

    _refuse_empty(enc, set(attention), set(ffn), allow_empty)
    for layer in attention:
        enc.layers[layer].attention = None
    for layer in ffn:
        enc.layers[layer].ffn = None
    _sync_config(model)
