"""BertConfig: the sizes of a BERT encoder, dense or pruned.

A dense BERT has the same shape in every layer. A pruned one does not: each layer keeps its own set of
attention heads and its own feed-forward width, and may have lost its attention block or its feed-forward
block entirely. `LayerShape` records that per layer, so a config alone says what a checkpoint holds.

The field names of the sizes are those of a Hugging Face `config.json`, so such a file is read as it is.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


class ConfigError(ValueError):
    """A config value is missing, of the wrong type, or contradicts another one."""


@dataclass
class LayerShape:
    """What one encoder layer keeps after pruning.

    heads:   the original indices (0 .. num_attention_heads-1) of the attention heads still present, in order.
             An empty list means the whole attention block is gone: the layer computes h = LN(x).
    ffn_dim: the number of feed-forward neurons still present. 0 means the whole feed-forward block is gone:
             the layer computes y = LN(h).
    """

    heads: list[int]
    ffn_dim: int

    @property
    def has_attention(self) -> bool:
        return len(self.heads) > 0

    @property
    def has_ffn(self) -> bool:
        return self.ffn_dim > 0


@dataclass
class BertConfig:
    """Sizes of a BERT encoder (Devlin et al. 2019), plus the per-layer shapes of a pruned one.

    `layers` is filled in by `__post_init__` with the dense shape when it is not given; after pruning,
    `minisnip.surgery` rewrites it. `num_labels` / `problem_type` describe the classification head.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02
    classifier_dropout: float | None = None
    num_labels: int = 2
    problem_type: str | None = None  # "regression" or "single_label_classification"
    layers: list[LayerShape] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.layers = [l if isinstance(l, LayerShape) else LayerShape(heads=list(l["heads"]), ffn_dim=int(l["ffn_dim"]))
                       for l in self.layers]
        if not self.layers:
            self.layers = [LayerShape(list(range(self.num_attention_heads)), self.intermediate_size)
                           for _ in range(self.num_hidden_layers)]
        self.validate()

    # --- derived sizes ---------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def is_pruned(self) -> bool:
        dense = LayerShape(list(range(self.num_attention_heads)), self.intermediate_size)
        return any(l != dense for l in self.layers)

    def validate(self) -> None:
        """Raise ConfigError naming the field and value when the sizes cannot describe a BERT."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size", "num_labels"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {v!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                f"({self.num_attention_heads}): heads must split the hidden vector evenly")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported; use one of {SUPPORTED_ACTIVATIONS}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"config field {name!r} must be in [0, 1), got {v!r}")
        if not (self.layer_norm_eps > 0 and math.isfinite(self.layer_norm_eps)):
            raise ConfigError(f"layer_norm_eps must be a positive number, got {self.layer_norm_eps!r}")
        if self.problem_type not in (None, "regression", "single_label_classification"):
            raise ConfigError(f"problem_type {self.problem_type!r} is not supported "
                              "(use 'regression' or 'single_label_classification')")
        if len(self.layers) != self.num_hidden_layers:
            raise ConfigError(f"'layers' lists {len(self.layers)} layer shapes but num_hidden_layers is "
                              f"{self.num_hidden_layers}")
        for i, l in enumerate(self.layers):
            if sorted(set(l.heads)) != list(l.heads) or any(not 0 <= h < self.num_attention_heads for h in l.heads):
                raise ConfigError(f"layers[{i}].heads must be increasing head indices in "
                                  f"[0, {self.num_attention_heads}), got {l.heads}")
            if not 0 <= l.ffn_dim <= self.intermediate_size:
                raise ConfigError(f"layers[{i}].ffn_dim must be in [0, {self.intermediate_size}], got {l.ffn_dim}")

    # --- reading and writing -----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> BertConfig:
        """Build from a Hugging Face style dict; keys minisnip does not use are ignored.

        `id2label` (Hugging Face) sets `num_labels` when `num_labels` itself is absent.
        """
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if "num_labels" not in kwargs and isinstance(d.get("id2label"), dict):
            kwargs["num_labels"] = len(d["id2label"])
        if d.get("model_type", "bert") not in ("bert",):
            raise ConfigError(f"{source}: model_type {d.get('model_type')!r} is not a BERT encoder")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ConfigError(f"{source}: position_embedding_type {d['position_embedding_type']!r} is not supported "
                              "(only 'absolute')")
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except (TypeError, KeyError) as e:
            raise ConfigError(f"{source}: malformed field ({e})") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> BertConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model_type"] = "bert"
        return d

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"
