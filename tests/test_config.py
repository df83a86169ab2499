"""BertConfig refuses values of the wrong type or range, naming the file, the field, the value and the rule."""

from __future__ import annotations

import json
import re

import pytest

import minisnip
from minisnip.config import FIELD_RULES, ConfigError

TINY_SIZES = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=64)  # as tests/conftest.py's tiny_config

NAN = float("nan")

# field -> values that must be refused (each one alone, on top of the tiny sizes)
BAD_VALUES = {
    "vocab_size": ["abc", 0, -5, True, 1000.0, None],
    "hidden_size": [True, -64, 64.5, "64"],
    "num_hidden_layers": [0, -1, False, [2]],
    "num_attention_heads": ["4", 0, 4.0],
    "intermediate_size": ["abc", -128, 0, NAN],
    "max_position_embeddings": [0, "64", 64.0],
    "type_vocab_size": [0, True, None],
    "num_labels": [0, -1, "2", False],
    "hidden_act": ["swish", None, ["gelu"], 1],
    "hidden_dropout_prob": [1.0, 1.5, -0.1, NAN, "0.1", True],
    "attention_probs_dropout_prob": [1.0, -1, NAN, None],
    "classifier_dropout": [1.5, 1.0, -0.2, NAN, "0.1", True],
    "layer_norm_eps": [0, -1e-12, NAN, float("inf"), "1e-12", None],
    "initializer_range": [-0.02, NAN, float("inf"), "0.02", True],
    "pad_token_id": [1000, 5000, -1, 0.0, True, "0"],
    "problem_type": ["multi_label_classification", 1],
    "finetuning_task": [3, ["sst2"], True],
}


def test_every_field_rule_is_tested():
    assert set(FIELD_RULES) <= set(BAD_VALUES)


@pytest.mark.parametrize("field,value", [(f, v) for f, vs in BAD_VALUES.items() for v in vs],
                         ids=lambda x: repr(x)[:20])
def test_bad_value_in_config_json_names_file_field_and_value(tmp_path, field, value):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TINY_SIZES, field: value}))
    with pytest.raises(ConfigError) as e:
        minisnip.BertConfig.from_json_file(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: field {field!r} must be ") and msg.endswith(f"got {value!r}"), msg
    assert "\n" not in msg
    with pytest.raises(ConfigError, match=re.escape(f"field {field!r} must be ")):  # built directly, no file
        minisnip.BertConfig(**{**TINY_SIZES, field: value})


def test_messages_say_what_is_allowed(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TINY_SIZES, "intermediate_size": "abc"}))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: field 'intermediate_size' must be a positive integer, "
                                                    "got 'abc'")):
        minisnip.BertConfig.from_json_file(path)
    with pytest.raises(ConfigError, match=re.escape("field 'pad_token_id' must be a token id in [0, vocab_size=1000), "
                                                    "got 1000")):
        minisnip.BertConfig(**TINY_SIZES, pad_token_id=1000)
    with pytest.raises(ConfigError, match=re.escape("field 'classifier_dropout' must be null or a number in [0, 1), "
                                                    "got 1.5")):
        minisnip.BertConfig(**TINY_SIZES, classifier_dropout=1.5)
    with pytest.raises(ConfigError, match=re.escape("field 'layer_norm_eps' must be a positive finite number, "
                                                    "got nan")):
        minisnip.BertConfig.from_dict({**TINY_SIZES, "layer_norm_eps": NAN})


@pytest.mark.parametrize("layers,field,value", [
    ([{"heads": [0], "ffn_dim": "abc"}, {"heads": [0], "ffn_dim": 8}], "layers[0].ffn_dim", "abc"),
    ([{"heads": [0], "ffn_dim": 8}, {"heads": [0], "ffn_dim": 8.5}], "layers[1].ffn_dim", 8.5),
    ([{"heads": [0], "ffn_dim": True}, {"heads": [0], "ffn_dim": 8}], "layers[0].ffn_dim", True),
    ([{"heads": [0], "ffn_dim": None}, {"heads": [0], "ffn_dim": 8}], "layers[0].ffn_dim", None),
    ([{"heads": "01", "ffn_dim": 8}, {"heads": [0], "ffn_dim": 8}], "layers[0].heads", "01"),
    ([{"heads": [0], "ffn_dim": 8}, {"heads": [0, 1.5], "ffn_dim": 8}], "layers[1].heads", [0, 1.5]),
    ([{"heads": [True], "ffn_dim": 8}, {"heads": [0], "ffn_dim": 8}], "layers[0].heads", [True]),
    ([{"heads": [0]}, {"heads": [0], "ffn_dim": 8}], "layers[0]", {"heads": [0]}),
    ([[0, 8], {"heads": [0], "ffn_dim": 8}], "layers[0]", [0, 8]),
    ("all", "layers", "all"),
])
def test_bad_layer_shapes_in_config_json(tmp_path, layers, field, value):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TINY_SIZES, "layers": layers}))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: field {field!r} must be ")) as e:
        minisnip.BertConfig.from_json_file(path)
    assert str(e.value).endswith(f"got {value!r}")


def test_config_json_not_an_object(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=f"{path}: expected a JSON object, got list"):
        minisnip.BertConfig.from_json_file(path)
    with pytest.raises(ConfigError, match="x.json: expected a JSON object, got str"):
        minisnip.BertConfig.from_dict("hidden_size", source="x.json")  # type: ignore[arg-type]


def test_good_values_are_accepted():
    c = minisnip.BertConfig(**TINY_SIZES, hidden_dropout_prob=0, attention_probs_dropout_prob=0.0,
                            classifier_dropout=0.5, pad_token_id=999, initializer_range=0, layer_norm_eps=1)
    assert c.pad_token_id == 999 and c.classifier_dropout == 0.5
    assert minisnip.BertConfig(**TINY_SIZES, pad_token_id=None).pad_token_id is None  # no padding row
    dense = minisnip.BertConfig(**TINY_SIZES)
    assert minisnip.BertConfig.from_dict(dense.to_dict()) == dense


def test_minilm_config_is_accepted(minilm_path):
    c = minisnip.BertConfig.from_json_file(minilm_path / "config.json")
    assert (c.hidden_size, c.num_hidden_layers, c.pad_token_id) == (384, 6, 0)


def test_bad_field_in_checkpoint_refused_before_loading(tiny_folder, tmp_path):
    """A bad config.json in a checkpoint folder is named by from_pretrained, file and field."""
    import shutil

    folder = shutil.copytree(tiny_folder, tmp_path / "model")
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "classifier_dropout": 1.5}))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: field 'classifier_dropout' must be null or a number "
                                                    "in [0, 1), got 1.5")):
        minisnip.BertForSequenceClassification.from_pretrained(folder)
