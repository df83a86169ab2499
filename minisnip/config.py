"""BertConfig: the sizes of a BERT encoder, dense or pruned.

A dense BERT has the same shape in every layer. A pruned one does not: each layer keeps its own set of
attention heads and its own feed-forward width, and may have lost its attention block or its feed-forward
block entirely. `LayerShape` records that per layer, so a config alone says what a checkpoint holds.

The field names of the sizes are those of a Hugging Face `config.json`, so such a file is read as it is.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from .checks import is_int, is_number

SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
PROBLEM_TYPES = (None, "regression", "single_label_classification")


class ConfigError(ValueError):
    """A config value is missing, of the wrong type, or contradicts another one."""


def _is_probability(v: Any) -> bool:
    return is_number(v) and 0.0 <= v < 1.0


# field -> (rule, what the rule allows): one table for every scalar field of BertConfig
FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{name: (lambda v: is_int(v) and v >= 1, "a positive integer")
       for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "max_position_embeddings", "type_vocab_size", "num_labels")},
    "hidden_act": (lambda v: isinstance(v, str) and v in SUPPORTED_ACTIVATIONS, f"one of {SUPPORTED_ACTIVATIONS}"),
    "hidden_dropout_prob": (_is_probability, "a number in [0, 1)"),
    "attention_probs_dropout_prob": (_is_probability, "a number in [0, 1)"),
    "classifier_dropout": (lambda v: v is None or _is_probability(v), "null or a number in [0, 1)"),
    "layer_norm_eps": (lambda v: is_number(v) and v > 0, "a positive finite number"),
    "initializer_range": (lambda v: is_number(v) and v >= 0, "a finite number >= 0"),
    "pad_token_id": (lambda v: v is None or (is_int(v) and v >= 0), "null or a token id in [0, vocab_size)"),
    "problem_type": (lambda v: v in PROBLEM_TYPES, "null, 'regression' or 'single_label_classification'"),
    "finetuning_task": (lambda v: v is None or isinstance(v, str), "null or a task name"),
}


def _layer_shape(i: int, l: Any) -> LayerShape:
    """One entry of `layers` (a LayerShape or a {"heads": [...], "ffn_dim": n} dict), its types checked."""
    if isinstance(l, LayerShape):
        heads, ffn_dim = l.heads, l.ffn_dim
    elif isinstance(l, dict) and "heads" in l and "ffn_dim" in l:
        heads, ffn_dim = l["heads"], l["ffn_dim"]
    else:
        raise ConfigError(f"field 'layers[{i}]' must be an object with 'heads' and 'ffn_dim', got {l!r}")
    if not isinstance(heads, (list, tuple)) or not all(is_int(h) for h in heads):
        raise ConfigError(f"field 'layers[{i}].heads' must be a list of integer head indices, got {heads!r}")
    if not is_int(ffn_dim):
        raise ConfigError(f"field 'layers[{i}].ffn_dim' must be an integer, got {ffn_dim!r}")
    return LayerShape(heads=list(heads), ffn_dim=ffn_dim)


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
    finetuning_task: str | None = None  # the GLUE task the classifier head was fine-tuned on (Hugging Face's field)
    layers: list[LayerShape] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._check_fields()  # before the sizes are used to build the dense layer shapes
        if not isinstance(self.layers, (list, tuple)):
            raise ConfigError(f"field 'layers' must be a list of layer shapes, got {self.layers!r}")
        self.layers = [_layer_shape(i, l) for i, l in enumerate(self.layers)]
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

    def _check_fields(self) -> None:
        """Each scalar field against its rule in FIELD_RULES, then the rules that tie two fields together."""
        for name, (ok, allowed) in FIELD_RULES.items():
            v = getattr(self, name)
            if not ok(v):
                raise ConfigError(f"field {name!r} must be {allowed}, got {v!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                f"({self.num_attention_heads}): heads must split the hidden vector evenly")
        if self.pad_token_id is not None and self.pad_token_id >= self.vocab_size:
            raise ConfigError(f"field 'pad_token_id' must be a token id in [0, vocab_size={self.vocab_size}), "
                              f"got {self.pad_token_id}")

    def validate(self) -> None:
        """Raise ConfigError naming the field, the value and what is allowed when the sizes cannot describe a BERT."""
        self._check_fields()
        if len(self.layers) != self.num_hidden_layers:
            raise ConfigError(f"'layers' lists {len(self.layers)} layer shapes but num_hidden_layers is "
                              f"{self.num_hidden_layers}")
        for i, l in enumerate(self.layers):
            l = _layer_shape(i, l)
            if sorted(set(l.heads)) != list(l.heads) or any(not 0 <= h < self.num_attention_heads for h in l.heads):
                raise ConfigError(f"field 'layers[{i}].heads' must be increasing head indices in "
                                  f"[0, {self.num_attention_heads}), got {l.heads}")
            if not 0 <= l.ffn_dim <= self.intermediate_size:
                raise ConfigError(f"field 'layers[{i}].ffn_dim' must be in [0, {self.intermediate_size}], "
                                  f"got {l.ffn_dim}")

    # --- reading and writing -----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> BertConfig:
        """Build from a Hugging Face style dict; keys minisnip does not use are ignored.

        `id2label` (Hugging Face) sets `num_labels` when `num_labels` itself is absent. `source` (the file the
        dict was read from) starts every error message.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
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
