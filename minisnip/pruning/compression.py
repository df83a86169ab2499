"""Compression: the one definition, and its accounting.

Compression, everywhere in minisnip, is the share of encoder linear-layer weights removed (embeddings and
classifier excluded): 1 - P(model) / P(dense), with P counting the weights and biases of W_QKV, W_O, W_1, W_2
of every layer. The dense count comes from the config's sizes (num_attention_heads, intermediate_size), so it
does not change as a model is pruned. Unstructured methods keep the matrices and zero entries; for them the
same definition counts the zero weights of those matrices as removed (`sparsity`).
"""

from __future__ import annotations

from torch import nn

from ..config import BertConfig
from ..surgery import encoder_of

COMPRESSION_DEFINITION = ("share of encoder linear-layer weights removed (embeddings and classifier excluded)")


# --- counting ----------------------------------------------------------------------------------------------

def encoder_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """QKV, attention output, FFN up and down of every present block, named ("layer0.qkv", ...), in layer order:
    the matrices compression counts and unstructured methods prune."""
    out: list[tuple[str, nn.Linear]] = []
    for i, layer in enumerate(encoder_of(model).layers):
        if layer.attention is not None:
            out += [(f"layer{i}.qkv", layer.attention.qkv), (f"layer{i}.out", layer.attention.out)]
        if layer.ffn is not None:
            out += [(f"layer{i}.up", layer.ffn.up), (f"layer{i}.down", layer.ffn.down)]
    return out


def encoder_linear_params(model: nn.Module) -> int:
    """Weights + biases of `encoder_linears`; embeddings, LayerNorms, pooler and classifier are excluded."""
    return sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for _, m in encoder_linears(model))


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



def compression_with_zeros(model: nn.Module, dense_config: BertConfig | None = None) -> float:
    """The same definition with zero weights counted as removed (biases, which no method zeroes, as kept):
    1 - (nonzero weights + biases) / dense params. For an unstructured result it is `sparsity` x W / (W + b),
    about 0.2% below it for BERT's shapes."""
    config = dense_config if dense_config is not None else encoder_of(model).config
    kept = sum(int(m.weight.count_nonzero()) + (m.bias.numel() if m.bias is not None else 0)
               for _, m in encoder_linears(model))
    return 1.0 - kept / dense_encoder_linear_params(config)


def sparsity(model: nn.Module) -> float:
    """Share of the weights of the encoder's W_QKV, W_O, W_1, W_2 (biases excluded) that are exactly zero: what
    an unstructured method's target names (they prune weights, never biases)."""
    zeros = total = 0
    for _, lin in encoder_linears(model):
        zeros += lin.weight.numel() - int(lin.weight.count_nonzero())
        total += lin.weight.numel()
    return zeros / total if total else 0.0


__all__ = ["COMPRESSION_DEFINITION", "compression", "compression_with_zeros", "dense_encoder_linear_params",
           "encoder_linear_params", "encoder_linears", "sparsity"]
