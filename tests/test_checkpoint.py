"""Checkpoints: bit-exact round trips (dense and pruned), atomic saving, and clear errors for bad folders."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import minisnip
from minisnip import surgery
from minisnip.checkpoint import CheckpointError, save_pretrained
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
    what = "expected a state dict" if damage == "not_a_state_dict" else "cannot read weights"
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
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: cannot read weights"):
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
