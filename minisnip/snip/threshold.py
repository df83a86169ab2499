"""The thresholding operator and compression accounting.

Paper (Lin et al. 2020): after training with the identity prior, "find and drop unimportant non-linear
mappings [...] by a thresholding operator on the function norm": every branch m with ||f_m|| < tau is
removed. Two ways to pick what goes:

* `select_below_threshold(norms, tau)`: the operator itself;
* `select_for_target(branches, norms, target, model=...)`: the same operator with tau chosen so that a given
  share of the dense encoder is removed (how results at "50% compression" are reported). Taking branches
  in ascending order of norm until the target is met is exactly thresholding at a tau just above the last
  branch taken.

Compression, everywhere in minisnip.snip, is the share of encoder linear-layer weights removed (embeddings
and classifier excluded): 1 - P(model) / P(dense), with P counting the weights and biases of W_QKV, W_O,
W_1, W_2 of every layer. The dense count comes from the config's sizes (num_attention_heads,
intermediate_size), so it does not change as a model is pruned.

Hierarchy (the same rules as `minisnip.surgery`): a layer whose heads are all selected loses its attention
block, b_O included; a layer whose neurons are all selected loses its FFN block, b_2 included. A head and its
block (or a neuron group and its block) are never counted twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from torch import nn

from ..config import BertConfig
from ..surgery import PruningError, encoder_of, prune_ffn_neurons, prune_heads, remove_blocks
from .branches import Branch, head_params, neuron_params, parse_name

COMPRESSION_DEFINITION = ("share of encoder linear-layer weights removed (embeddings and classifier excluded)")


# --- counting ----------------------------------------------------------------------------------------------

def encoder_linear_params(model: nn.Module) -> int:
    """Weights + biases of QKV, attention output, FFN up and down of every present branch of the encoder.

    Embeddings, LayerNorms, pooler and classifier are excluded.
    """
    enc = encoder_of(model)
    total = 0
    for layer in enc.layers:
        for mod in ((layer.attention.qkv, layer.attention.out) if layer.attention is not None else ()) + \
                   ((layer.ffn.up, layer.ffn.down) if layer.ffn is not None else ()):
            total += mod.weight.numel() + (mod.bias.numel() if mod.bias is not None else 0)
    return total


def dense_encoder_linear_params(config: BertConfig) -> int:
    """`encoder_linear_params` of the dense model with these sizes (per-layer shapes ignored):
    L * [(4 H^2 + 4 H)  +  (2 H F + F + H)]."""
    h, f = config.hidden_size, config.intermediate_size
    return config.num_hidden_layers * ((4 * h * h + 4 * h) + (2 * h * f + f + h))


def compression(model: nn.Module, dense_config: BertConfig | None = None) -> float:
    """Compression = share of encoder linear-layer weights removed (embeddings and classifier excluded).

    = 1 - encoder_linear_params(model) / dense_encoder_linear_params(dense_config); dense_config defaults to
    the model's own config (its sizes describe the dense model it was pruned from).
    """
    config = dense_config if dense_config is not None else encoder_of(model).config
    return 1.0 - encoder_linear_params(model) / dense_encoder_linear_params(config)


# --- a set of branches to remove, resolved against a model -------------------------------------------------

@dataclass
class _LayerPlan:
    attention: bool = False                      # whole block named
    heads: set[int] = field(default_factory=set)  # original head ids
    ffn: bool = False
    neurons: set[int] = field(default_factory=set)  # current neuron indices
    groups: dict[int, str] = field(default_factory=dict)  # group index -> name


class _Plan:
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
    plan = _Plan(model, neuron_group_size)
    for n in names:
        plan.add(n)
    return plan.names()


# --- selection -----------------------------------------------------------------------------------------------

def _check_norm(name: str, value: float) -> float:
    v = float(value)
    if math.isnan(v):
        raise ValueError(f"the function norm of {name} is NaN")
    return v


def select_below_threshold(norms: Mapping[str, float], tau: float) -> list[str]:
    """The thresholding operator: names of all branches with ||f_m|| < tau (in the order of `norms`).

    tau must be a finite number >= 0 (tau = 0 selects nothing).
    """
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau < 0:
        raise ValueError(f"threshold tau must be a finite number >= 0, got tau={tau!r}")
    return [n for n, v in norms.items() if _check_norm(n, v) < tau]


def select_for_target(branches: Sequence[Branch], norms: Mapping[str, float], target: float,
                      per_param: bool = False, *, model: nn.Module, allow_empty: bool = False) -> list[str]:
    """Branches to remove so that compression >= target, smallest function norm first.

    Compression is the share of encoder linear-layer weights removed (embeddings and classifier excluded),
    relative to the dense model of `model`'s config; weights an earlier pruning removed already count.
    Candidates are `branches` (from `list_branches(model, ...)`, any kinds), sorted by ||f_m|| ascending
    (per_param=True: by ||f_m|| / params_m). They are taken one by one until the target is met, so the
    overshoot is smaller than the parameters of the last branch taken; a candidate already covered (a head
    whose block was taken) adds nothing and is skipped. Returns canonical names (`canonical_names`): all heads
    of a layer become its attention block, all neuron groups its FFN block. [] if the model is already
    compressed that far.

    target must lie in (0, 1); target 1 (remove everything) only with allow_empty=True. ValueError when the
    candidates cannot reach the target; PruningError when reaching it would leave no block at all (unless
    allow_empty).
    """
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target):
        raise ValueError(f"target must be a number in (0, 1), got target={target!r}")
    if not (0 < target < 1 or (target == 1 and allow_empty)):
        raise ValueError(f"target must lie in (0, 1) (a share of the dense encoder's linear-layer weights), got "
                         f"target={target}" + ("; target=1 removes everything: pass allow_empty=True"
                                               if target == 1 else ""))
    enc = encoder_of(model)
    dense = dense_encoder_linear_params(enc.config)
    missing = [b.name for b in branches if b.name not in norms]
    if missing:
        raise ValueError(f"no function norm for {len(missing)} branches, e.g. {missing[:5]}")
    score = {b.name: _check_norm(b.name, norms[b.name]) / (b.params if per_param else 1) for b in branches}
    order = sorted(branches, key=lambda b: score[b.name])
    removed = dense - encoder_linear_params(enc)
    need = target * dense
    if removed >= need - 1e-9:
        return []
    plan = _Plan(enc)
    per_layer = [0] * len(enc.layers)
    for b in order:
        layer = plan.add(b)
        now = plan.removed_params(layer)
        removed += now - per_layer[layer]
        per_layer[layer] = now
        if removed >= need - 1e-9:
            if not allow_empty and not plan.leaves_something():
                raise PruningError(f"reaching target {target} removes every attention and feed-forward block; "
                                   "pass allow_empty=True if that is really meant")
            return plan.names()
    raise ValueError(f"target {target} cannot be reached with these {len(branches)} candidates: removing all of "
                     f"them gives compression {removed / dense:.4f} ({COMPRESSION_DEFINITION})")


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
    plan = _Plan(enc, neuron_group_size)
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


__all__ = ["COMPRESSION_DEFINITION", "apply_pruning", "canonical_names", "compression",
           "dense_encoder_linear_params", "encoder_linear_params", "select_below_threshold", "select_for_target"]
