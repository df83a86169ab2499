"""Structured magnitude pruning: remove the branches whose weights are smallest (command-line name `magnitude`).

The zeroth-order baseline of structured pruning (the structured counterpart of Han et al. 2015 and Zhu &
Gupta 2017's magnitude criterion; Sanh et al., NeurIPS 2020, compare movement pruning with it): fine-tune
plainly, then score every branch by the L2 norm of the weights it owns (`scores(..., p=2)`),

    head h:           || [W_Q,h ; W_K,h ; W_V,h]  (its 3d rows of W_QKV),  W_O[:, cols_h]  (its d columns) ||_p
    neuron group G:   || W_1[G, :]  (its rows),  W_2[:, G]  (its columns) ||_p
    attention / ffn:  || all the weights of the block's matrices ||_p

and remove the smallest until the target compression is met (`pruning.select.select_for_target`, in the
recipe). The norm is taken over all those entries together, i.e. (sum |w|^p)^(1/p).

Reconstructed: biases are left out of the norm (they are not "the weights"; a head owns 3d biases of b_QKV,
which the compression still counts); no training terms (plain fine-tuning); the scores are measured after
fine-tuning, on the weights alone (the calibration batches are not needed).

The unstructured variant, which zeroes single weights, is `magnitude_unstructured.py`: a method module's
STRUCTURED is one constant, and the two variants share no code beyond the idea.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from ..pruning.branches import list_branches
from ..pruning.gates import clear_gates
from ..surgery import encoder_of
from ..train import TrainHook

STRUCTURED = True
USES_DISTILLATION = False
SCHEDULED = False  # the best epoch of fine-tuning is kept
DESCRIPTION = "structured magnitude: the heads / FFN neuron groups whose weights have the smallest L2 norm go"


@dataclass
class Config:
    """No hyper-parameters of its own: the recipe's target, kinds and group size decide everything."""


def training_hooks(model: nn.Module, cfg: Config, target: float | None, total_steps: int,
                   kinds: tuple[str, ...], neuron_group_size: int | None) -> list[TrainHook]:
    """None: magnitude pruning fine-tunes plainly."""
    return []


def _powered_sums(model: nn.Module, p: float = 2.0) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """Per layer: sum |w|^p of each local head (heads,) and of each neuron (ffn_dim,); None where no block."""
    heads, neurons = [], []
    for layer in encoder_of(model).layers:
        attn, ffn = layer.attention, layer.ffn
        if attn is None:
            heads.append(None)
        else:
            n, d = attn.num_heads, attn.head_dim
            qkv = attn.qkv.weight.detach().float().abs().pow(p).view(3, n, d, -1).sum(dim=(0, 2, 3))
            out = attn.out.weight.detach().float().abs().pow(p).view(-1, n, d).sum(dim=(0, 2))
            heads.append(qkv + out)
        if ffn is None:
            neurons.append(None)
        else:
            neurons.append(ffn.up.weight.detach().float().abs().pow(p).sum(1)
                           + ffn.down.weight.detach().float().abs().pow(p).sum(0))
    return heads, neurons


@torch.no_grad()
def scores(model: nn.Module, hooks: Sequence[TrainHook], calib: list[dict], kinds: tuple[str, ...],
           neuron_group_size: int | None, p: float = 2.0) -> dict[str, float]:
    """{branch name: L_p norm (default L2) of the weights it owns} for list_branches(model, kinds, neuron_group_size)."""
    heads, neurons = _powered_sums(model, p)
    enc = encoder_of(model)
    out: dict[str, float] = {}
    for b in list_branches(model, kinds, neuron_group_size):
        if b.kind == "head":
            s = heads[b.layer][enc.layers[b.layer].attention.heads.index(b.index)]
        elif b.kind == "attention":
            s = heads[b.layer].sum()
        elif b.kind == "neurons":
            s = neurons[b.layer][list(b.neurons)].sum()
        else:
            s = neurons[b.layer].sum()
        out[b.name] = float(s) ** (1.0 / p)
    return out


def before_removal(model: nn.Module, hooks: Sequence[TrainHook]) -> None:
    """Nothing was added; gates back to None for good measure."""
    clear_gates(model)


__all__ = ["Config", "DESCRIPTION", "SCHEDULED", "STRUCTURED", "USES_DISTILLATION", "before_removal", "scores", "training_hooks"]
