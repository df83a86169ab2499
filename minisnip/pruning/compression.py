"""Compression: the one definition, and its accounting.

Compression, everywhere in minisnip, is the share of encoder linear-layer weights removed (embeddings and
classifier excluded): 1 - P(model) / P(dense), with P counting the weights and biases of W_QKV, W_O, W_1, W_2
of every layer. The dense count comes from the config's sizes (num_attention_heads, intermediate_size), so it
does not change as a model is pruned. Unstructured methods keep the matrices and zero entries; for them the
same definition counts the zero weights of those matrices as removed (`sparsity`).
"""

from __future__ import annotations

from typing import Iterator

from torch import nn

from ..config import BertConfig
from ..surgery import encoder_of

COMPRESSION_DEFINITION = ("share of encoder linear-layer weights removed (embeddings and classifier excluded)")


# --- counting ----------------------------------------------------------------------------------------------

def encoder_linears(model: nn.Module) -> Iterator[nn.Linear]:
    """QKV, attention output, FFN up and down of every present branch of the encoder: what compression counts."""
    for layer in encoder_of(model).layers:
        if layer.attention is not None:
            yield from (layer.attention.qkv, layer.attention.out)
        if layer.ffn is not None:
            yield from (layer.ffn.up, layer.ffn.down)


def encoder_linear_params(model: nn.Module) -> int:
    """Weights + biases of `encoder_linears`; embeddings, LayerNorms, pooler and classifier are excluded."""
    return sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for m in encoder_linears(model))


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



def nonzero_encoder_linear_params(model: nn.Module) -> int:
    """`encoder_linear_params` counting only the entries that are not exactly zero."""
    return sum(int(m.weight.count_nonzero()) + (int(m.bias.count_nonzero()) if m.bias is not None else 0)
               for m in encoder_linears(model))


def sparsity(model: nn.Module, dense_config: BertConfig | None = None) -> float:
    """Compression of an unstructured result: the same definition, with zero entries counted as removed,
    = 1 - nonzero_encoder_linear_params(model) / dense_encoder_linear_params(dense_config)."""
    config = dense_config if dense_config is not None else encoder_of(model).config
    return 1.0 - nonzero_encoder_linear_params(model) / dense_encoder_linear_params(config)


__all__ = ["COMPRESSION_DEFINITION", "compression", "dense_encoder_linear_params", "encoder_linear_params", "encoder_linears",
           "nonzero_encoder_linear_params", "sparsity"]
