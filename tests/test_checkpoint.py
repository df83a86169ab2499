"""Checkpoints: bit-exact round trips (dense and pruned), atomic saving, and clear errors for bad folders."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import minisnip
from minisnip import surgery
from minisnip.checkpoint import CheckpointError, save_pretrained, write_json
from minisnip.config import ConfigError


def _inputs(seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 1000, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def _prune_unevenly(model) -> None:
    """Layer 0: heads {1, 3} gone and its FFN removed; layer 1: head 0 gone and 50 FFN neurons;
    layer 2: attention block removed and 3 neurons; layer 3 stays dense."""
    surgery.prune_heads(model, {0: [1, 3], 1: [0]})
    surgery.remove_blocks(model, attention=[2], ffn=[0])
    surgery.prune_ffn_neurons(model, {1: range(0, 100, 2), 2: [5, 77, 127]})


PRUNED_LAYERS = [{"heads": [0, 2], "ffn_dim": 0}, {"heads": [1, 2, 3], "ffn_dim": 78},
                 {"heads": [], "ffn_dim": 125}, {"heads": [0, 1, 2, 3], "ffn_dim": 128}]


def _assert_same_model(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert a.config == b.config
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(a.eval()(**x), b.eval()(**x))


# --- round trips --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pruned"])
@pytest.mark.parametrize("cls", [minisnip.BertModel, minisnip.BertForSequenceClassification],
                         ids=["BertModel", "BertForSequenceClassification"])
def test_round_trip_is_bit_exact(tmp_path, tiny_model, cls, pruned):
    model = tiny_model(cls, seed=4, num_hidden_layers=4, num_labels=3)
    if pruned:
        _prune_unevenly(model)
    folder = model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = cls.from_pretrained(folder)
    _assert_same_model(model, loaded)

    raw = json.loads((folder / "config.json").read_text())
    assert raw["minisnip_format"] == 1 and raw["architectures"] == [cls.__name__]
    assert raw["num_labels"] == 3
    expected = PRUNED_LAYERS if pruned else [{"heads": [0, 1, 2, 3], "ffn_dim": 128}] * 4
    assert raw["layers"] == expected
    assert loaded.config.is_pruned == pruned
    enc = surgery.encoder_of(loaded)
    assert [l.attention.heads if l.attention else [] for l in enc.layers] == [s["heads"] for s in expected]
    assert [l.ffn.ffn_dim if l.ffn else 0 for l in enc.layers] == [s["ffn_dim"] for s in expected]


def test_pruned_model_outputs_differ_from_dense(tiny_model):
    """The pruning used by the round trip really changes the model (so the round trip is not of a dense one)."""
    dense = tiny_model(seed=4, num_hidden_layers=4)
    pruned = tiny_model(seed=4, num_hidden_layers=4)
    _prune_unevenly(pruned)
    x = _inputs()
    with torch.no_grad():
        assert (dense(**x) - pruned(**x)).abs().max() > 0.1


def test_round_trip_with_tokenizer(tmp_path, tiny_model, minilm_path):
    tok = minisnip.load_tokenizer(minilm_path)
    model = tiny_model(vocab_size=tok.vocab_size)
    folder = save_pretrained(model, tmp_path / "ckpt", tokenizer=tok)
    assert (folder / "tokenizer.json").is_file()
    again = minisnip.load_tokenizer(folder)
    texts, pairs = ["A first sentence.", "Another, longer one with ünïcödé."], ["Its pair.", "x"]
    assert all(torch.equal(a, b) for a, b in zip(tok(texts, pairs).values(), again(texts, pairs).values()))
    _assert_same_model(model, minisnip.BertModel.from_pretrained(folder))


def test_encoder_loads_from_classifier_checkpoint(tmp_path, tiny_model):
    clf = tiny_model(minisnip.BertForSequenceClassification, seed=5, num_labels=3)
    clf.save_pretrained(tmp_path / "clf")
    enc = minisnip.BertModel.from_pretrained(tmp_path / "clf")
    for k, v in enc.state_dict().items():
        assert torch.equal(v, clf.bert.state_dict()[k]), k


def test_classifier_head_that_does_not_fit(tmp_path, tiny_model, caplog):
    tiny_model(minisnip.BertForSequenceClassification, num_labels=3).save_pretrained(tmp_path / "clf")
    (tmp_path / "clf" / "config.json").write_text(json.dumps(
        {**json.loads((tmp_path / "clf" / "config.json").read_text()), "num_labels": 2}))
    with pytest.raises(CheckpointError, match=r"classifier weights .*'classifier.weight': \(3, 64\).* do not fit "
                                              r"num_labels=2 from config.json; pass num_labels="):
        minisnip.BertForSequenceClassification.from_pretrained(tmp_path / "clf")
    model = minisnip.BertForSequenceClassification.from_pretrained(tmp_path / "clf", num_labels=5)
    assert model.classifier.weight.shape == (5, 64)
    assert "classifier head is newly initialised (num_labels=5)" in caplog.text


# --- atomic saving ------------------------------------------------------------------------------------------------
def _snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_save_over_existing_checkpoint_replaces_it(tmp_path, tiny_model):
    first, second = tiny_model(seed=1), tiny_model(seed=2, num_hidden_layers=3)
    first.save_pretrained(tmp_path / "ckpt")
    second.save_pretrained(tmp_path / "ckpt")
    _assert_same_model(second, minisnip.BertModel.from_pretrained(tmp_path / "ckpt"))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary or old folder left beside it


def test_failed_save_leaves_previous_checkpoint(tmp_path, tiny_model, monkeypatch):
    model = tiny_model(seed=1)
    model.save_pretrained(tmp_path / "ckpt")
    before = _snapshot(tmp_path / "ckpt")

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)  # a partial file, then the crash
        raise OSError("disk full (simulated)")

    monkeypatch.setattr("safetensors.torch.save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        tiny_model(seed=2).save_pretrained(tmp_path / "ckpt")
    assert _snapshot(tmp_path / "ckpt") == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    # a fresh path: nothing at all is left behind
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "new")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    monkeypatch.undo()
    _assert_same_model(model, minisnip.BertModel.from_pretrained(tmp_path / "ckpt"))


def test_failed_final_rename_restores_previous_checkpoint(tmp_path, tiny_model, monkeypatch):
    """Even a crash between moving the old checkpoint aside and moving the new one in loses nothing."""
    import minisnip.checkpoint as ckpt

    model = tiny_model(seed=1)
    model.save_pretrained(tmp_path / "ckpt")
    before = _snapshot(tmp_path / "ckpt")
    real_replace = ckpt.os.replace

    def failing_replace(src, dst):
        if ".tmp-" in str(src):
            raise OSError("rename failed (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        tiny_model(seed=2).save_pretrained(tmp_path / "ckpt")
    monkeypatch.undo()
    assert _snapshot(tmp_path / "ckpt") == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_save_refuses_folder_with_other_files(tmp_path, tiny_model):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match=r"mine exists and is not a minisnip checkpoint folder"):
        tiny_model().save_pretrained(tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["thesis.tex"]
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="afile exists and is not a minisnip checkpoint folder"):
        tiny_model().save_pretrained(tmp_path / "afile")
    assert (tmp_path / "afile").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "mine"]


# --- bad folders --------------------------------------------------------------------------------------------------
@pytest.fixture()
def saved(tmp_path, tiny_model):
    """A valid minisnip checkpoint of a 2-layer model in tmp_path/ckpt."""
    return tiny_model(seed=6).save_pretrained(tmp_path / "ckpt")


@pytest.fixture()
def hf_saved(tmp_path, hf_tiny_model):
    """A valid Hugging Face checkpoint (random 2-layer BertModel) in tmp_path/hf."""
    hf_tiny_model("BertModel").save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def _edit_config(folder, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_wrong_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(FileNotFoundError, match=f"model folder not found: {missing}"):
        minisnip.BertModel.from_pretrained(missing)
    with pytest.raises(FileNotFoundError, match="model folder not found: not-a-model-xyz"):
        minisnip.BertModel.from_pretrained("not-a-model-xyz")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="weights.bin is a file; pass the folder"):
        minisnip.BertModel.from_pretrained(tmp_path / "weights.bin")


def test_folder_without_config(saved):
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"{saved}: no config.json"):
        minisnip.BertModel.from_pretrained(saved)


def test_folder_without_weights(saved):
    (saved / "model.safetensors").unlink()
    (saved / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(CheckpointError, match=r"no weights found \(looked for model.safetensors, "
                                              r"model.safetensors.index.json, pytorch_model.bin\); "
                                              r"files present: \['config.json', 'vocab.txt'\]"):
        minisnip.BertModel.from_pretrained(saved)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors(saved, damage):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:len(data) // 2], "garbage": b"not a safetensors file" * 10,
                      "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=r"model.safetensors: cannot read weights .*corrupt or truncated"):
        minisnip.BertModel.from_pretrained(saved)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not_a_state_dict", "pickled_objects"])
def test_corrupt_pytorch_model_bin(hf_saved, damage):
    sd = load_file(str(hf_saved / "model.safetensors"))
    (hf_saved / "model.safetensors").unlink()
    path = hf_saved / "pytorch_model.bin"
    # a pickled module is refused by weights_only loading (never unpickle arbitrary objects)
    torch.save({"not_a_state_dict": [sd], "pickled_objects": {"model": torch.nn.Linear(2, 2)}}.get(damage, sd), path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x80\x02}q\x00." + b"junk" * 10)
    what = {"not_a_state_dict": "expected a state dict", "pickled_objects": "refused to unpickle"}.get(
        damage, "cannot read weights")
    with pytest.raises(CheckpointError, match=f"pytorch_model.bin: {what}"):
        minisnip.BertModel.from_pretrained(hf_saved)


def test_config_contradicts_weights(hf_saved):
    _edit_config(hf_saved, intermediate_size=256)
    with pytest.raises(CheckpointError, match=r"weights do not fit the config") as e:
        minisnip.BertModel.from_pretrained(hf_saved)
    msg = str(e.value)
    assert "model.safetensors" in msg
    assert "wrong shape: layers.0.ffn.up.weight: checkpoint (128, 64), config expects (256, 64)" in msg
    assert "wrong shape: layers.1.ffn.down.weight: checkpoint (64, 128), config expects (64, 256)" in msg


def test_config_vocab_contradicts_weights(saved):
    _edit_config(saved, vocab_size=999)
    with pytest.raises(CheckpointError, match=r"wrong shape: embeddings.word_embeddings.weight: checkpoint "
                                              r"\(1000, 64\), config expects \(999, 64\)"):
        minisnip.BertModel.from_pretrained(saved)


def test_pruned_config_contradicts_weights(tmp_path, tiny_model):
    model = tiny_model()
    surgery.prune_heads(model, {1: [2]})
    folder = model.save_pretrained(tmp_path / "ckpt")
    _edit_config(folder, layers=[{"heads": [0, 1, 2, 3], "ffn_dim": 128}] * 2)
    with pytest.raises(CheckpointError, match=r"wrong shape: layers.1.attention.qkv.weight: checkpoint \(144, 64\), "
                                              r"config expects \(192, 64\)"):
        minisnip.BertModel.from_pretrained(folder)


def test_config_hidden_not_divisible_by_heads(hf_saved):
    _edit_config(hf_saved, num_attention_heads=5)
    with pytest.raises(ConfigError, match=r"config.json: hidden_size \(64\) is not divisible by "
                                          r"num_attention_heads \(5\)"):
        minisnip.BertModel.from_pretrained(hf_saved)


def test_config_not_json_or_not_bert(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        minisnip.BertModel.from_pretrained(saved)
    (saved / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="config.json: model_type 'gpt2' is not a BERT encoder"):
        minisnip.BertModel.from_pretrained(saved)


def test_unexpected_extra_weight(hf_saved):
    sd = load_file(str(hf_saved / "model.safetensors"))
    sd["encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(3, 3)
    save_file(sd, str(hf_saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected: encoder.layer.0.attention.self.rotary.weight \(3, 3\)"):
        minisnip.BertModel.from_pretrained(hf_saved)


def test_extra_layer_in_weights(hf_saved):
    _edit_config(hf_saved, num_hidden_layers=1)
    with pytest.raises(CheckpointError, match=r"unexpected: encoder.layer.1.attention.output.dense.weight"):
        minisnip.BertModel.from_pretrained(hf_saved)


@pytest.mark.parametrize("key, named", [
    ("encoder.layer.1.output.dense.weight", r"missing: layers.1.ffn.down.weight \(config expects \(64, 128\)\)"),
    ("embeddings.LayerNorm.bias", r"missing: embeddings.norm.bias \(config expects \(64,\)\)"),
    ("encoder.layer.0.attention.self.key.bias", r"missing: layers.0.attention.qkv.bias"),
])
def test_missing_encoder_weight(hf_saved, key, named):
    sd = load_file(str(hf_saved / "model.safetensors"))
    del sd[key]
    save_file(sd, str(hf_saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match=named) as e:
        minisnip.BertModel.from_pretrained(hf_saved)
    if ".self." in key:  # the two parts of the fused matrix that are present are named as they are in the file
        assert "unexpected: encoder.layer.0.attention.self.query.bias" in str(e.value)


def test_missing_pooler_is_initialised(hf_saved, caplog):
    sd = load_file(str(hf_saved / "model.safetensors"))
    sd = {k: v for k, v in sd.items() if not k.startswith("pooler.")}
    save_file(sd, str(hf_saved / "model.safetensors"))
    model = minisnip.BertModel.from_pretrained(hf_saved)
    assert torch.equal(model.embeddings.word_embeddings.weight, sd["embeddings.word_embeddings.weight"])
    assert "pooler.dense.weight" in caplog.text and "newly initialised" in caplog.text


def test_sharded_safetensors(hf_saved):
    """A sharded checkpoint (index + shards) loads like the single file."""
    sd = load_file(str(hf_saved / "model.safetensors"))
    reference = minisnip.BertModel.from_pretrained(hf_saved)
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(hf_saved / name))
    (hf_saved / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}))
    (hf_saved / "model.safetensors").unlink()
    _assert_same_model(reference, minisnip.BertModel.from_pretrained(hf_saved))
    (hf_saved / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: field 'weight_map' names shard file\(s\) "
                                              r"\['model-00002-of-00002.safetensors'\] that do not exist"):
        minisnip.BertModel.from_pretrained(hf_saved)


def test_nothing_written_when_model_is_unsavable(tmp_path, tiny_model):
    """A model whose tensors cannot be saved (shared storage is refused by safetensors) leaves no trace."""
    model = tiny_model()
    model.layers[1].ffn.down.weight = model.layers[0].ffn.down.weight  # tied: safetensors refuses shared tensors
    with pytest.raises(Exception):
        model.save_pretrained(tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_hub_name_goes_through_snapshot_download(tmp_path, monkeypatch, tiny_folder):
    """Online users pass a hub name; offline, the download is stood in for by a local folder (no network)."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)  # "someorg/tiny-bert" must not exist as a local folder
    calls = []

    def fake_download(name, allow_patterns=None, **kwargs):
        calls.append((name, allow_patterns))
        return str(tiny_folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    model = minisnip.BertModel.from_pretrained("someorg/tiny-bert")
    tok = minisnip.load_tokenizer("someorg/tiny-bert")
    assert calls[0][0] == "someorg/tiny-bert" and "*.safetensors" in calls[0][1] and "vocab.txt" in calls[0][1]
    assert model.config.hidden_size == 32 and tok.vocab_size == 30522

    def failing(name, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    with pytest.raises(FileNotFoundError, match="fetching 'someorg/tiny-bert' from the Hugging Face hub failed"):
        minisnip.BertModel.from_pretrained("someorg/tiny-bert")


# --- refusals: bad index, unsafe pickle, non-finite JSON, unwritable paths -------------------------------------------
def _tree(root) -> dict[str, bytes | None]:
    """Every path under root (relative) with its bytes, None for folders: to show that nothing changed."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("index,named", [
    ({"metadata": {}}, "got None"),
    ({"weight_map": ["model-1.safetensors"]}, "got ['model-1.safetensors']"),
    ({"weight_map": {}}, "got {}"),
    ({"weight_map": {"embeddings.word_embeddings.weight": 3}}, "got 'embeddings.word_embeddings.weight': 3"),
    ({"weight_map": {"pooler.dense.bias": "../elsewhere.safetensors"}}, "'../elsewhere.safetensors'"),
    ({"weight_map": {"pooler.dense.bias": "model-9.safetensors"}}, "['model-9.safetensors'] that do not exist"),
    ([1, 2], "got None"),
])
def test_sharded_index_with_bad_weight_map(hf_saved, index, named):
    (hf_saved / "model.safetensors").unlink()
    path = hf_saved / "model.safetensors.index.json"
    path.write_text(json.dumps(index))
    before = _tree(hf_saved)
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: field 'weight_map' must ") + "|"
                       + re.escape(f"{path}: field 'weight_map' names")) as e:
        minisnip.BertModel.from_pretrained(hf_saved)
    assert named in str(e.value) and "\n" not in str(e.value)
    assert _tree(hf_saved) == before


def test_sharded_index_not_json(hf_saved):
    (hf_saved / "model.safetensors").unlink()
    (hf_saved / "model.safetensors.index.json").write_text("{weight_map")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: not valid JSON"):
        minisnip.BertModel.from_pretrained(hf_saved)


class TrustedStateDict(dict):
    """A custom container class, as old training scripts pickled: weights_only loading must refuse it."""


def test_unsafe_pickle_is_refused_with_the_reason_and_a_safe_conversion(hf_saved):
    reference = minisnip.BertModel.from_pretrained(hf_saved)
    sd = load_file(str(hf_saved / "model.safetensors"))
    (hf_saved / "model.safetensors").unlink()
    path = hf_saved / "pytorch_model.bin"
    torch.save(TrustedStateDict(sd), path)
    before = _tree(hf_saved)
    with pytest.raises(CheckpointError) as e:
        minisnip.BertModel.from_pretrained(hf_saved)
    msg = str(e.value)
    assert msg.startswith(f"{path}: refused to unpickle") and "\n" not in msg
    assert f"{TrustedStateDict.__qualname__} was not an allowed global" in msg  # torch's reason, not cut off
    assert "could run arbitrary code" in msg and "Only if you trust its source" in msg
    assert _tree(hf_saved) == before  # nothing written by the refusal
    code = re.search(r'python -c "(.*)"$', msg).group(1)
    assert "weights_only=False" in code and "st.save_file(" in code and str(hf_saved / "model.safetensors") in code
    exec(code, {})  # the advice, followed by someone who trusts the file, gives a loadable checkpoint
    _assert_same_model(reference, minisnip.BertModel.from_pretrained(hf_saved))


def test_write_json_refuses_nan_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "runs" / "x" / "result.json"
    write_json(path, {"scores": {"dev": {"pearson": 0.5}}})
    before = _tree(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: value at scores.dev.pearson is nan; JSON has no NaN")):
        write_json(path, {"task": "stsb", "scores": {"dev": {"accuracy": 1.0, "pearson": float("nan")}}})
    with pytest.raises(ValueError, match=re.escape(f"{path}: value at losses[2] is -inf")):
        write_json(path, {"losses": [1.0, 0.5, float("-inf")]})
    with pytest.raises(ValueError, match=re.escape(f"{path}: value at (top level) is inf")):
        write_json(path, float("inf"))
    with pytest.raises(ValueError, match=re.escape(f"{path}: value at rows[0].f1 is nan")):
        write_json(path, {"rows": [{"f1": np.float64("nan")}]})  # a float subclass, as metrics return
    assert _tree(tmp_path) == before
    assert json.loads(path.read_text()) == {"scores": {"dev": {"pearson": 0.5}}}
    with pytest.raises(ValueError, match="value at a is nan"):  # a fresh path: not even its folders are created
        write_json(tmp_path / "new" / "deeper" / "r.json", {"a": float("nan")})
    assert _tree(tmp_path) == before
    write_json(path, {"n": None, "s": "nan", "x": 1e308})  # finite values and strings are fine
    assert json.loads(path.read_text()) == {"n": None, "s": "nan", "x": 1e308}


def test_write_json_to_unwritable_paths(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    before = _tree(tmp_path)
    for target in (tmp_path / "afile" / "result.json", tmp_path / "afile" / "a" / "b" / "result.json"):
        with pytest.raises(NotADirectoryError) as e:
            write_json(target, {"a": 1})
        assert str(e.value) == f"cannot write {target}: {tmp_path / 'afile'} exists and is not a folder"
    with pytest.raises(IsADirectoryError, match=re.escape(f"cannot write {tmp_path / 'adir'}: it is a folder")):
        write_json(tmp_path / "adir", {"a": 1})
    assert _tree(tmp_path) == before


def test_save_pretrained_to_unwritable_paths(tmp_path, tiny_model):
    model = tiny_model()
    (tmp_path / "afile").write_text("x")
    before = _tree(tmp_path)
    for target in (tmp_path / "afile" / "ckpt", tmp_path / "afile" / "a" / "ckpt"):
        with pytest.raises(NotADirectoryError) as e:
            model.save_pretrained(target)
        assert str(e.value) == f"cannot write {target}: {tmp_path / 'afile'} exists and is not a folder"
    with pytest.raises(FileExistsError, match="afile exists and is not a minisnip checkpoint folder"):
        model.save_pretrained(tmp_path / "afile")
    assert _tree(tmp_path) == before


def test_failed_save_into_new_folders_removes_them(tmp_path, tiny_model):
    model = tiny_model()
    model.layers[1].ffn.down.weight = model.layers[0].ffn.down.weight  # tied: safetensors refuses shared tensors
    with pytest.raises(Exception):
        model.save_pretrained(tmp_path / "a" / "b" / "ckpt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder(tmp_path, tiny_model):
    ro = tmp_path / "ro"
    ro.mkdir()
    write_json(ro / "old.json", {"a": 1})
    before = _tree(tmp_path)
    ro.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match=re.escape(f"cannot write {ro / 'ckpt'}: ")):
            tiny_model().save_pretrained(ro / "ckpt")
        with pytest.raises(PermissionError, match=re.escape(f"cannot write {ro / 'old.json'}: ")):
            write_json(ro / "old.json", {"a": 2})
        with pytest.raises(PermissionError, match=re.escape(f"cannot write {ro / 'x' / 'r.json'}: ")):
            write_json(ro / "x" / "r.json", {"a": 2})
    finally:
        ro.chmod(0o755)
    assert _tree(tmp_path) == before


def test_permission_denied_is_named_in_one_line(tmp_path, tiny_model, monkeypatch):
    """What a read-only folder does for a non-root user, simulated (tests may run as root)."""
    import errno

    import minisnip.checkpoint as ckpt

    write_json(tmp_path / "old.json", {"a": 1})
    before = _tree(tmp_path)

    def denied(prefix="", dir=None, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", f"{dir}/{prefix}xyz")

    monkeypatch.setattr(ckpt.tempfile, "mkdtemp", denied)
    monkeypatch.setattr(ckpt.tempfile, "mkstemp", denied)
    with pytest.raises(PermissionError) as e:
        tiny_model().save_pretrained(tmp_path / "sub" / "ckpt")
    assert str(e.value).startswith(f"cannot write {tmp_path / 'sub' / 'ckpt'}: [Errno 13] Permission denied")
    assert e.value.errno == errno.EACCES and "\n" not in str(e.value)
    old = tmp_path / "old.json"
    with pytest.raises(PermissionError, match=re.escape(f"cannot write {old}: [Errno 13] Permission denied")):
        write_json(old, {"a": 2})
    assert _tree(tmp_path) == before  # the folder 'sub' made for the checkpoint is gone again


def test_write_text_replaces_whole_files_and_keeps_their_permissions(tmp_path):
    from minisnip.checkpoint import write_text
    readme = tmp_path / "README.md"
    readme.write_text("old\n")
    readme.chmod(0o640)
    write_text(readme, "new ± table\n")
    assert readme.read_text(encoding="utf-8") == "new ± table\n" and readme.stat().st_mode & 0o777 == 0o640
    fresh = write_text(tmp_path / "out" / "t.md", "x\n")
    assert fresh.stat().st_mode & 0o777 != 0o600  # not mkstemp's private mode: others may read a result
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["README.md", "out", "t.md"]  # no temporary left
