"""The tokenizer gives exactly what Hugging Face's BertTokenizerFast gives, on 1,000 real GLUE examples.

Two paths are checked: a checkpoint's `tokenizer.json`, and a folder holding only `vocab.txt` (+ its
tokenizer_config.json), where minisnip builds BERT's pipeline itself.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch

import minisnip
from minisnip.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

# (task, file, header?, text column(s)): quoting disabled, lines split on tab
GLUE_COLUMNS = {
    "CoLA": ("dev.tsv", False, (3,)),
    "SST-2": ("dev.tsv", True, (0,)),
    "MRPC": ("dev.tsv", True, (3, 4)),
    "RTE": ("dev.tsv", True, (1, 2)),
    "STS-B": ("dev.tsv", True, (7, 8)),
    "QNLI": ("dev.tsv", True, (1, 2)),
    "WNLI": ("dev.tsv", True, (1, 2)),
}
# how many examples per task: 1,000 in all, about half single sentences, half pairs (all of RTE dev: long pairs)
SAMPLE = {"CoLA": 250, "SST-2": 250, "MRPC": 100, "RTE": 200, "STS-B": 70, "QNLI": 100, "WNLI": 30}


def read_glue(path: Path, header: bool, cols: tuple[int, ...]) -> list[tuple[str, ...]]:
    lines = path.read_text(encoding="utf-8").split("\n")
    rows = [line.split("\t") for line in lines[1 if header else 0:] if line]
    return [tuple(r[c] for c in cols) for r in rows]


@pytest.fixture(scope="module")
def glue_examples(glue_dir) -> dict[str, list[tuple[str, ...]]]:
    """1,000 GLUE examples drawn with a fixed seed: {task: [(text,) or (text, pair)]}."""
    rng = random.Random(0)
    out = {}
    for task, (name, header, cols) in GLUE_COLUMNS.items():
        rows = read_glue(glue_dir / task / name, header, cols)
        assert all(all(t for t in r) for r in rows), task
        out[task] = rng.sample(rows, SAMPLE[task])
    assert sum(map(len, out.values())) == 1000
    return out


@pytest.fixture(scope="module")
def hf_tok(minilm_path):
    return transformers.BertTokenizerFast.from_pretrained(str(minilm_path))


@pytest.fixture(scope="module")
def vocab_only_folder(minilm_path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vocab_only")
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(minilm_path / name, folder / name)
    return folder


def _compare(tok: Tokenizer, hf_tok, examples, max_length: int) -> torch.Tensor:
    """Assert equal ids / types / masks on one batch; return the lengths (for the truncation checks)."""
    texts = [e[0] for e in examples]
    pairs = [e[1] for e in examples] if len(examples[0]) == 2 else None
    ours = tok(texts, pairs, max_length=max_length)
    theirs = hf_tok(texts, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert ours[key].shape == theirs[key].shape, key
        diff = (ours[key] != theirs[key]).any(1).nonzero().flatten().tolist()
        assert not diff, f"{key} differs on {[examples[i] for i in diff[:3]]}"
    return ours["attention_mask"].sum(1)


@pytest.mark.parametrize("max_length", [128, 32])
@pytest.mark.parametrize("source", ["tokenizer.json", "vocab.txt"])
def test_equal_to_hf_on_glue(glue_examples, hf_tok, minilm_path, vocab_only_folder, source, max_length):
    folder = minilm_path if source == "tokenizer.json" else vocab_only_folder
    tok = minisnip.load_tokenizer(folder)
    assert tok.vocab_size == hf_tok.vocab_size == 30522
    truncated = 0
    for task, examples in glue_examples.items():
        lengths = _compare(tok, hf_tok, examples, max_length)
        assert lengths.max() <= max_length
        truncated += int((lengths == max_length).sum())
    if max_length == 128:  # long RTE pairs are cut, by longest_first, and still match
        assert int((_compare(tok, hf_tok, glue_examples["RTE"], 128) == 128).sum()) >= 2
    assert truncated >= (5 if max_length == 128 else 300)


def test_vocab_only_folder_builds_the_pipeline(vocab_only_folder):
    assert not (vocab_only_folder / "tokenizer.json").exists()
    tok = minisnip.load_tokenizer(vocab_only_folder)
    assert tok.tokens("Héllo, WORLD!", "unaffable") == ["[CLS]", "hello", ",", "world", "!", "[SEP]",
                                                        "una", "##ffa", "##ble", "[SEP]"]


HARD_TEXTS = ["Café naïve résumé — “quotes” and ‘apostrophes’…",
              "日本語のテキストと中文混合 with English",
              "tabs\tand\nnewlines\r\nand  multiple   spaces",
              "control\x00chars\u200band zero\ufeffwidth",
              "emoji 😀🎉 and symbols ∑∫√ ½",
              "a" * 150 + " word-longer-than-100-characters",
              "ÀÉÎÕÜ ß ﬁ ligature Ⅻ",
              "",
              "don't can't won't 3.14159 $1,000,000 e-mail@example.com http://x.org/a?b=c"]


@pytest.mark.parametrize("source", ["tokenizer.json", "vocab.txt"])
def test_equal_to_hf_on_hard_strings(hf_tok, minilm_path, vocab_only_folder, source):
    tok = minisnip.load_tokenizer(minilm_path if source == "tokenizer.json" else vocab_only_folder)
    _compare(tok, hf_tok, [(t,) for t in HARD_TEXTS], 64)
    _compare(tok, hf_tok, list(zip(HARD_TEXTS, reversed(HARD_TEXTS))), 64)
    assert tok.encode(["a" * 150])[0][0] == [tok.cls_id, hf_tok.unk_token_id, tok.sep_id]


def test_long_sentences_are_truncated(minilm_path):
    tok = minisnip.load_tokenizer(minilm_path)
    long = " ".join(["word"] * 1000)
    [(ids, types)] = tok.encode([long], max_length=128)
    assert len(ids) == len(types) == 128 and ids[0] == tok.cls_id and ids[-1] == tok.sep_id
    # longest_first: the long segment loses tokens, the short one keeps all of its own
    [(ids, types)] = tok.encode([long], ["a short pair ."], max_length=32)
    assert len(ids) == 32 and types.count(1) == 5  # "a short pair ." + [SEP]
    assert ids[-5:] == tok.encode(["a short pair ."])[0][0][1:]
    [(ids, types)] = tok.encode([long], [long], max_length=33)
    assert types.count(0) == 1 + 15 + 1 and types.count(1) == 15 + 1  # 30 content tokens, 15 from each
    batch = tok([long, "short"], max_length=16)
    assert batch["input_ids"].shape == (2, 16) and batch["attention_mask"].sum().item() == 16 + 3


def test_padding_is_per_batch(minilm_path):
    tok = minisnip.load_tokenizer(minilm_path)
    b = tok(["one two three four five", "one"])
    assert b["input_ids"].shape == (2, 7) and b["input_ids"].dtype == torch.long
    assert b["attention_mask"].tolist() == [[1] * 7, [1, 1, 1, 0, 0, 0, 0]]
    assert (b["input_ids"][1, 3:] == tok.pad_id).all() and (b["token_type_ids"] == 0).all()


def test_bad_calls(minilm_path):
    tok = minisnip.load_tokenizer(minilm_path)
    with pytest.raises(TypeError, match="encode takes a list of texts"):
        tok.encode("a bare string")
    with pytest.raises(TypeError, match="encode takes a list of texts"):
        tok(["a"], "a bare pair string")
    with pytest.raises(ValueError, match="cannot pad an empty batch"):
        tok.pad([])
    with pytest.raises(ValueError, match="cannot pad an empty batch"):
        tok([])
    with pytest.raises(ValueError, match="2 texts but 1 pair texts"):
        tok.encode(["a", "b"], ["c"])
    with pytest.raises(ValueError, match=r"max_length must be an integer in \[3, 512\], got 513"):
        tok.encode(["a"], max_length=513)
    with pytest.raises(ValueError, match=r"max_length must be an integer in \[3, 512\], got 2"):
        tok.encode(["a"], max_length=2)



@pytest.mark.parametrize("texts,pairs,message", [
    (["a", "b", "c", None], None, "texts[3] is None; every text must be a str"),
    (["a", 5], None, "texts[1] is an int (5); every text must be a str"),
    ([float("nan")], None, "texts[0] is a float (nan); every text must be a str"),
    ([b"bytes"], None, "texts[0] is a bytes (b'bytes'); every text must be a str"),
    (["a", "b"], ["c", None], "pairs[1] is None; every text must be a str"),
    (["a", "b", "c"], ["x"], "3 texts but 1 pair texts: texts[1] has no pair text"),
    (["a"], ["x", "y"], "1 texts but 2 pair texts: pairs[1] has no text"),
    (["a"], None, None),
])
def test_bad_texts_are_named_by_position(minilm_path, texts, pairs, message):
    tok = minisnip.load_tokenizer(minilm_path)
    if message is None:
        assert tok(texts, pairs)["input_ids"].shape[0] == len(texts)
        return
    with pytest.raises(ValueError) as e:
        tok(texts, pairs)
    assert str(e.value).startswith(message)


def test_other_bad_arguments(minilm_path):
    tok = minisnip.load_tokenizer(minilm_path)
    with pytest.raises(TypeError, match="texts must be a list of str, got NoneType"):
        tok.encode(None)
    with pytest.raises(TypeError, match="pairs must be a list of str, got int"):
        tok.encode(["a"], 3)
    with pytest.raises(ValueError, match=r"max_length must be an integer in \[3, 512\], got 64.5"):
        tok.encode(["a"], max_length=64.5)
    with pytest.raises(ValueError, match=r"max_length must be an integer in \[3, 512\], got True"):
        tok.encode(["a"], max_length=True)
    with pytest.raises(ValueError, match="pair is an int \\(3\\); it must be a str"):
        tok.tokens("a", 3)
    with pytest.raises(ValueError, match="text is None; it must be a str"):
        tok.tokens(None)
    assert tok.encode(("a", "b"), (t for t in ["c", "d"])) == tok.encode(["a", "b"], ["c", "d"])  # any iterable


def test_bad_folders(tmp_path, minilm_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or vocab.txt"):
        minisnip.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="tokenizer.json: cannot read tokenizer"):
        minisnip.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "vocab.txt").write_text("[PAD]\n[CLS]\n[SEP]\nhello\n")
    with pytest.raises(ValueError, match=r"vocab.txt: no \[UNK\] token in the vocabulary"):
        minisnip.load_tokenizer(tmp_path)


def test_save_and_reload(tmp_path, minilm_path, glue_examples):
    tok = minisnip.load_tokenizer(minilm_path)
    tok.save(tmp_path)
    again = minisnip.load_tokenizer(tmp_path)
    assert again.max_length == tok.max_length == 512
    rte = glue_examples["RTE"][:50]
    texts, pairs = [e[0] for e in rte], [e[1] for e in rte]
    for a, b in zip(tok(texts, pairs).values(), again(texts, pairs).values()):
        assert torch.equal(a, b)
    assert tok.decode(tok.encode(["Hello, World!"])[0][0]) == "hello, world!"  # special tokens skipped
