"""minisnip.glue: task table, local TSV loading (real GLUE copy + hand-made fixtures), errors, hub path."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import datasets
import pytest

from minisnip.glue import (
    GLUE_DIR_ENV,
    TASKS,
    GlueDataError,
    GlueFileNotFoundError,
    get_task,
    load_split,
    read_tsv,
)

# ----------------------------------------------------------------------------------------------
# task table


def test_all_nine_tasks():
    assert list(TASKS) == ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]
    assert [t.folder for t in TASKS.values()] == ["CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE", "WNLI"]


def test_label_orders_follow_hf_glue_builder():
    assert TASKS["mnli"].labels == ("entailment", "neutral", "contradiction")
    assert TASKS["qnli"].labels == TASKS["rte"].labels == ("entailment", "not_entailment")
    for name in ("cola", "sst2", "mrpc", "qqp", "wnli"):
        assert TASKS[name].labels == ("0", "1")
    assert TASKS["stsb"].labels is None and TASKS["stsb"].is_regression and TASKS["stsb"].num_labels == 1
    assert TASKS["mnli"].num_labels == 3 and TASKS["rte"].num_labels == 2


def test_metrics_and_properties():
    main = {t.name: t.main_metric for t in TASKS.values()}
    assert main == {"cola": "mcc", "sst2": "accuracy", "mrpc": "f1", "stsb": "pearson", "qqp": "f1",
                    "mnli": "accuracy", "qnli": "accuracy", "rte": "accuracy", "wnli": "accuracy"}
    assert TASKS["mrpc"].metrics == TASKS["qqp"].metrics == ("f1", "accuracy")
    assert TASKS["stsb"].metrics == ("pearson", "spearman")
    for t in TASKS.values():
        assert t.main_metric in t.metrics
        assert t.is_pair == (t.name not in ("cola", "sst2"))
        assert t.dev_splits == (("dev_matched", "dev_mismatched") if t.name == "mnli" else ("dev",))
    with pytest.raises(AttributeError):  # frozen
        TASKS["rte"].name = "x"


@pytest.mark.parametrize("alias,name", [("SST-2", "sst2"), ("sts_b", "stsb"), ("MNLI", "mnli"),
                                        ("CoLA", "cola"), ("sts-b", "stsb"), ("Qnli", "qnli")])
def test_get_task_aliases(alias, name):
    assert get_task(alias) is TASKS[name]
    assert get_task(TASKS[name]) is TASKS[name]


def test_get_task_unknown_lists_valid_names():
    with pytest.raises(ValueError, match="unknown GLUE task 'squad'") as e:
        get_task("squad")
    assert isinstance(e.value, GlueDataError)
    for name in TASKS:
        assert name in str(e.value)


# ----------------------------------------------------------------------------------------------
# the real GLUE copy (skipped when absent)

# task, split, rows, label counts (class index -> count; from MANIFEST.md)
REAL = [
    ("cola", "train", 8551, {1: 6023, 0: 2528}),
    ("cola", "dev", 1043, {1: 721, 0: 322}),
    ("sst2", "train", 67349, {1: 37569, 0: 29780}),
    ("sst2", "dev", 872, {1: 444, 0: 428}),
    ("mrpc", "train", 3668, {1: 2474, 0: 1194}),
    ("mrpc", "dev", 408, {1: 279, 0: 129}),
    ("stsb", "train", 5749, None),
    ("stsb", "dev", 1500, None),
    ("qnli", "dev", 5463, {0: 2702, 1: 2761}),  # entailment = 0
    ("rte", "train", 2490, {0: 1249, 1: 1241}),
    ("rte", "dev", 277, {0: 146, 1: 131}),
    ("wnli", "train", 635, {0: 323, 1: 312}),
    ("wnli", "dev", 71, {0: 40, 1: 31}),
]


def _require(glue_dir: Path, task: str, split: str) -> None:
    if not (glue_dir / TASKS[task].folder / f"{split}.tsv").is_file():
        pytest.skip(f"{task} {split} not in {glue_dir}")


@pytest.mark.parametrize("task,split,rows,counts", REAL, ids=[f"{t}-{s}" for t, s, *_ in REAL])
def test_real_split_counts_and_labels(glue_dir, task, split, rows, counts):
    _require(glue_dir, task, split)
    ds = load_split(task, split, glue_dir)
    assert len(ds) == rows
    expected_cols = ["text_a", "text_b", "label"] if TASKS[task].is_pair else ["text_a", "label"]
    assert ds.column_names == expected_cols
    if counts is None:  # STS-B
        assert ds.features["label"].dtype == "float32"
        scores = ds["label"][:]
        assert min(scores) >= 0.0 and max(scores) <= 5.0
    else:
        assert ds.features["label"].dtype == "int64"
        assert dict(Counter(ds["label"][:])) == counts
    assert all(isinstance(t, str) and t for t in ds["text_a"][:50])


def test_real_first_rows(glue_dir):
    _require(glue_dir, "rte", "dev")
    _require(glue_dir, "stsb", "dev")
    _require(glue_dir, "cola", "dev")
    rte = load_split("rte", "dev", glue_dir)
    assert rte[0]["text_b"] == "Christopher Reeve had an accident."
    assert rte[0]["label"] == 1  # not_entailment
    stsb = load_split("stsb", "dev", glue_dir)
    assert stsb[0] == {"text_a": "A man with a hard hat is dancing.",
                       "text_b": "A man wearing a hard hat is dancing.", "label": 5.0}
    assert stsb[1]["label"] == pytest.approx(4.75)
    cola = load_split("cola", "dev", glue_dir)  # no header; dev.tsv has no final newline
    assert cola[0] == {"text_a": "The sailors rode the breeze clear of the rocks.", "label": 1}


def test_real_mrpc_bom_header(glue_dir):
    _require(glue_dir, "mrpc", "dev")
    assert (glue_dir / "MRPC" / "dev.tsv").read_bytes().startswith(b"\xef\xbb\xbfQuality\t")
    ds = load_split("mrpc", "dev", glue_dir)
    assert ds[0]["text_a"] == "He said the foodservice pie business doesn 't fit the company 's long-term growth strategy ."
    assert ds[0]["text_b"] == '" The foodservice pie business does not fit our long-term growth strategy .'
    assert ds[0]["label"] == 1


def test_real_qnli_quotes_are_text(glue_dir):
    """19 QNLI dev rows have a field starting with '"' and 90 an odd number of '"' (MANIFEST)."""
    _require(glue_dir, "qnli", "dev")
    ds = load_split("qnli", "dev", glue_dir)
    raw = (glue_dir / "QNLI" / "dev.tsv").read_text(encoding="utf-8").split("\n")[1:-1]
    fields = [line.split("\t") for line in raw]
    assert ds["text_a"][:] == [f[1] for f in fields]
    assert ds["text_b"][:] == [f[2] for f in fields]
    pairs = list(zip(ds["text_a"][:], ds["text_b"][:]))
    assert sum(a.startswith('"') or b.startswith('"') for a, b in pairs) == 19
    assert sum(a.count('"') % 2 == 1 or b.count('"') % 2 == 1 for a, b in pairs) == 90
    assert ds[658]["text_b"].startswith('" This term describes cells')


def test_real_sampling_seeded_and_in_file_order(glue_dir):
    _require(glue_dir, "rte", "train")
    full = load_split("rte", "train", glue_dir)
    a = load_split("rte", "train", glue_dir, max_examples=100, seed=3)
    b = load_split("rte", "train", glue_dir, max_examples=100, seed=3)
    c = load_split("rte", "train", glue_dir, max_examples=100, seed=4)
    assert len(a) == 100 and a.to_dict() == b.to_dict()
    assert a.to_dict() != c.to_dict()
    keep = sorted(random.Random(3).sample(range(len(full)), 100))
    assert a.to_dict() == full.select(keep).to_dict()
    assert len(load_split("rte", "dev", glue_dir, max_examples=10_000)) == 277  # N >= rows: whole split


# ----------------------------------------------------------------------------------------------
# hand-made fixtures (data/fixtures/glue): every task, MNLI and QQP in particular


def test_fixtures_all_tasks_load(glue_fixtures_dir):
    for task in TASKS.values():
        for split in ("train", *task.dev_splits):
            ds = load_split(task, split, glue_fixtures_dir)
            assert len(ds) >= 2
            assert ("text_b" in ds.column_names) == task.is_pair
            assert ds.features["label"].dtype == ("float32" if task.is_regression else "int64")


def test_fixture_mnli(glue_fixtures_dir):
    header_train = (glue_fixtures_dir / "MNLI" / "train.tsv").read_text().split("\n")[0].split("\t")
    header_dev = (glue_fixtures_dir / "MNLI" / "dev_matched.tsv").read_text().split("\n")[0].split("\t")
    assert len(header_train) == 12 and len(header_dev) == 16 and header_dev[-1] == "gold_label"
    train = load_split("mnli", "train", glue_fixtures_dir)
    assert train["label"][:] == [0, 2, 1, 0, 0, 2]  # entailment=0, neutral=1, contradiction=2
    assert train[0]["text_a"] == "The lantern swung above the empty dock."
    assert train[0]["text_b"] == "A light hung over the dock."
    assert train[3]["text_a"] == 'She called the plan "bold, if a little naive.'  # unbalanced quote is text
    matched = load_split("mnli", "dev_matched", glue_fixtures_dir)
    assert matched["label"][:] == [0, 2, 1, 0]  # gold_label, not label1..label5
    assert load_split("mnli", "dev", glue_fixtures_dir).to_dict() == matched.to_dict()
    assert load_split("mnli", "validation_matched", glue_fixtures_dir).to_dict() == matched.to_dict()
    mismatched = load_split("mnli", "dev_mismatched", glue_fixtures_dir)
    assert mismatched["label"][:] == [0, 2, 1]
    assert mismatched[1]["text_b"] == "No word ending in -ly is an adverb."


def test_fixture_qqp(glue_fixtures_dir):
    train = load_split("qqp", "train", glue_fixtures_dir)
    assert train["label"][:] == [1, 0, 1, 1, 0]
    assert train[2]["text_a"] == 'What does "bespoke" mean?'
    dev = load_split("qqp", "dev", glue_fixtures_dir)
    assert dev.column_names == ["text_a", "text_b", "label"]
    assert dev[1] == {"text_a": "What is a good first programming language?",
                      "text_b": "Why do trains run on rails?", "label": 0}


def test_read_tsv_plain_columns(glue_fixtures_dir):
    cols = read_tsv("sst2", glue_fixtures_dir / "SST-2" / "dev.tsv")
    assert cols == {"text_a": ["a joyless slog ", "sharp and generous "], "label": [0, 1]}


def test_env_var_default_and_sources(glue_fixtures_dir, monkeypatch):
    monkeypatch.setenv(GLUE_DIR_ENV, str(glue_fixtures_dir))
    assert len(load_split("rte", "dev")) == 2  # auto + env var -> local
    assert len(load_split("rte", "dev", source="local")) == 2
    monkeypatch.delenv(GLUE_DIR_ENV)
    with pytest.raises(GlueFileNotFoundError, match="glue_dir"):
        load_split("rte", "dev", source="local")
    with pytest.raises(ValueError, match="source"):
        load_split("rte", "dev", glue_fixtures_dir, source="web")


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_bad_max_examples(glue_fixtures_dir, bad):
    with pytest.raises(ValueError, match="max_examples"):
        load_split("rte", "dev", glue_fixtures_dir, max_examples=bad)


def test_unknown_split(glue_fixtures_dir):
    with pytest.raises(GlueDataError, match=r"unknown split 'test' for RTE; valid splits: train, dev$"):
        load_split("rte", "test", glue_fixtures_dir)
    with pytest.raises(GlueDataError, match="valid splits: train, dev, dev_matched, dev_mismatched"):
        load_split("mnli", "dev_mm", glue_fixtures_dir)


# ----------------------------------------------------------------------------------------------
# broken files


NLI_HEADER = "index\tsentence1\tsentence2\tlabel\n"
STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"


def _write(root: Path, folder: str, name: str, text: str | bytes) -> Path:
    path = root / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_wrong_column_count(tmp_path):
    path = _write(tmp_path, "RTE", "dev.tsv", NLI_HEADER + "0\tA.\tB.\tentailment\n1\tonly two\tentailment\n")
    with pytest.raises(GlueDataError) as e:
        load_split("rte", "dev", tmp_path)
    msg = str(e.value)
    assert str(path) in msg and "line 3" in msg and "expected 4" in msg and "found 3" in msg
    assert "only two" in msg


def test_wrong_column_count_headerless_cola(tmp_path):
    path = _write(tmp_path, "CoLA", "train.tsv", "src\t1\t\tFine.\nsrc\t0\tBroken row\n")
    with pytest.raises(GlueDataError, match=r"line 2: expected 4 .*found 3") as e:
        load_split("cola", "train", tmp_path)
    assert str(path) in str(e.value)


def test_unknown_label(tmp_path):
    path = _write(tmp_path, "RTE", "dev.tsv", NLI_HEADER + "0\tA.\tB.\tmaybe\n")
    with pytest.raises(GlueDataError) as e:
        load_split("rte", "dev", tmp_path)
    msg = str(e.value)
    assert str(path) in msg and "line 2" in msg and "'maybe'" in msg
    assert "'entailment'" in msg and "'not_entailment'" in msg


def test_unknown_label_cola(tmp_path):
    _write(tmp_path, "CoLA", "dev.tsv", "src\t1\t\tFine.\nsrc\t2\t\tOdd.\n")
    with pytest.raises(GlueDataError, match=r"line 2: unknown CoLA label '2'; allowed: '0', '1'"):
        load_split("cola", "dev", tmp_path)


def test_empty_file(tmp_path):
    path = _write(tmp_path, "SST-2", "dev.tsv", "")
    with pytest.raises(GlueDataError, match="empty") as e:
        load_split("sst2", "dev", tmp_path)
    assert str(path) in str(e.value)


def test_header_only(tmp_path):
    _write(tmp_path, "SST-2", "dev.tsv", "sentence\tlabel\n")
    with pytest.raises(GlueDataError, match="no data rows"):
        load_split("sst2", "dev", tmp_path)


def test_bad_header(tmp_path):
    path = _write(tmp_path, "SST-2", "dev.tsv", "text\tlabel\nnice film\t1\n")
    with pytest.raises(GlueDataError) as e:
        load_split("sst2", "dev", tmp_path)
    msg = str(e.value)
    assert str(path) in msg and "line 1" in msg and "header" in msg and "'sentence'" in msg and "'text'" in msg


def test_headerless_file_where_header_expected(tmp_path):
    _write(tmp_path, "RTE", "train.tsv", "0\tA.\tB.\tentailment\n")  # header line missing
    with pytest.raises(GlueDataError, match="line 1: header not as expected"):
        load_split("rte", "train", tmp_path)


def test_mnli_header_without_gold_label(tmp_path):
    header = "index\tpromptID\tpairID\tgenre\ts1b\ts2b\ts1p\ts2p\tsentence1\tsentence2\tlabel1\tlabel\n"
    _write(tmp_path, "MNLI", "train.tsv", header + "\t".join(["0"] * 8 + ["A.", "B.", "neutral", "neutral"]) + "\n")
    with pytest.raises(GlueDataError, match="gold_label"):
        load_split("mnli", "train", tmp_path)


@pytest.mark.parametrize("score", ["abc", "nan", "inf", "-inf", "5.5", "-0.1", ""])
def test_bad_stsb_score(tmp_path, score):
    good = "0\tg\tf\ty\t0\tnone\tnone\tA.\tB.\t3.0\n"
    bad = f"1\tg\tf\ty\t1\tnone\tnone\tA.\tC.\t{score}\n"
    path = _write(tmp_path, "STS-B", "train.tsv", STSB_HEADER + good + bad)
    with pytest.raises(GlueDataError) as e:
        load_split("stsb", "train", tmp_path)
    msg = str(e.value)
    assert str(path) in msg and "line 3" in msg and repr(score) in msg


def test_missing_split_file(tmp_path):
    _write(tmp_path, "RTE", "train.tsv", NLI_HEADER + "0\tA.\tB.\tentailment\n")
    with pytest.raises(GlueFileNotFoundError) as e:
        load_split("rte", "dev", tmp_path)
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)
    msg = str(e.value)
    assert str(tmp_path / "RTE" / "dev.tsv") in msg and "train.tsv" in msg


def test_missing_folder_and_dir(tmp_path):
    _write(tmp_path, "RTE", "train.tsv", NLI_HEADER)
    with pytest.raises(GlueFileNotFoundError) as e:
        load_split("mnli", "train", tmp_path)
    assert str(tmp_path / "MNLI") in str(e.value) and "RTE" in str(e.value)
    with pytest.raises(GlueFileNotFoundError, match="GLUE directory not found"):
        load_split("rte", "train", tmp_path / "nope")


def test_error_in_last_row_even_when_sampling(tmp_path):
    rows = "".join(f"{i}\tA{i}.\tB{i}.\tentailment\n" for i in range(50))
    _write(tmp_path, "RTE", "train.tsv", NLI_HEADER + rows + "50\tA.\tB.\tyes\n")
    with pytest.raises(GlueDataError, match="line 52"):  # nothing returned partially
        load_split("rte", "train", tmp_path, max_examples=5)


def test_quotes_crlf_and_bom(tmp_path):
    text = '\ufeffindex\tsentence1\tsentence2\tlabel\r\n0\t"He said\tit\'s "fine""\tentailment\r\n'
    _write(tmp_path, "RTE", "dev.tsv", text)
    ds = load_split("rte", "dev", tmp_path)
    assert ds[0] == {"text_a": '"He said', "text_b": 'it\'s "fine""', "label": 0}


@pytest.mark.parametrize("task,folder,text", [
    ("rte", "RTE", NLI_HEADER + "0\tA.\tB.\tentailment\n1\tC.\tD.\tnot_entailment\n"),
    ("cola", "CoLA", "src\t1\t\tA sentence.\nsrc\t0\t*\tBad sentence.\n"),  # no header
])
def test_cr_only_line_endings_are_named(tmp_path, task, folder, text):
    path = _write(tmp_path, folder, "dev.tsv", text.replace("\n", "\r").encode())
    before = path.read_bytes()
    with pytest.raises(GlueDataError) as e:
        read_tsv(task, path)
    assert str(e.value) == (f"{path}: uses CR-only (old Mac) line endings; convert to LF, e.g. "
                            "`tr '\\r' '\\n' < dev.tsv > fixed.tsv`")
    with pytest.raises(GlueDataError, match="CR-only"):
        load_split(task, "dev", tmp_path)
    assert path.read_bytes() == before
    path.write_bytes(before.replace(b"\r", b"\n"))  # the suggested conversion gives a readable file
    assert len(read_tsv(task, path)["label"]) == 2
    path.write_bytes(before.replace(b"\r", b"\r\n"))  # CRLF (Windows) stays fine
    assert len(read_tsv(task, path)["label"]) == 2


def test_invalid_utf8(tmp_path):
    _write(tmp_path, "SST-2", "dev.tsv", b"sentence\tlabel\nok\t1\nbad \xff byte\t0\n")
    with pytest.raises(GlueDataError, match="line 3: not valid UTF-8"):
        load_split("sst2", "dev", tmp_path)


# ----------------------------------------------------------------------------------------------
# hub path, offline: datasets.load_dataset is replaced by an in-memory fake


def _fake_hub(config: str) -> datasets.DatasetDict:
    two = datasets.ClassLabel(names=["entailment", "not_entailment"])
    if config == "rte":
        feats = datasets.Features({"sentence1": datasets.Value("string"), "sentence2": datasets.Value("string"),
                                   "label": two, "idx": datasets.Value("int32")})
        split = lambda n, lab: datasets.Dataset.from_dict(  # noqa: E731
            {"sentence1": [f"p{i}" for i in range(n)], "sentence2": [f"h{i}" for i in range(n)],
             "label": lab, "idx": list(range(n))}, features=feats)
        return datasets.DatasetDict(train=split(4, [0, 1, 1, 0]), validation=split(2, [1, 0]),
                                    test=split(2, [-1, -1]))
    if config == "sst2":
        feats = datasets.Features({"sentence": datasets.Value("string"),
                                   "label": datasets.ClassLabel(names=["negative", "positive"]),
                                   "idx": datasets.Value("int32")})
        split = lambda texts, lab: datasets.Dataset.from_dict(  # noqa: E731
            {"sentence": texts, "label": lab, "idx": list(range(len(texts)))}, features=feats)
        return datasets.DatasetDict(train=split(["good", "bad", "fine"], [1, 0, 1]),
                                    validation=split(["meh"], [0]), test=split(["?"], [-1]))
    if config == "mnli":
        feats = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                   "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]),
                                   "idx": datasets.Value("int32")})
        split = lambda tag, lab: datasets.Dataset.from_dict(  # noqa: E731
            {"premise": [f"{tag}p{i}" for i in range(len(lab))], "hypothesis": [f"{tag}h{i}" for i in range(len(lab))],
             "label": lab, "idx": list(range(len(lab)))}, features=feats)
        return datasets.DatasetDict(train=split("t", [0, 1, 2]), validation_matched=split("m", [2, 1]),
                                    validation_mismatched=split("mm", [0]), test_matched=split("x", [-1]),
                                    test_mismatched=split("y", [-1]))
    if config == "stsb":
        feats = datasets.Features({"sentence1": datasets.Value("string"), "sentence2": datasets.Value("string"),
                                   "label": datasets.Value("float32"), "idx": datasets.Value("int32")})
        split = lambda lab: datasets.Dataset.from_dict(  # noqa: E731
            {"sentence1": ["a"] * len(lab), "sentence2": ["b"] * len(lab), "label": lab,
             "idx": list(range(len(lab)))}, features=feats)
        return datasets.DatasetDict(train=split([0.0, 2.5, 5.0]), validation=split([4.25]), test=split([-1.0]))
    raise AssertionError(f"unexpected config {config}")


@pytest.fixture
def fake_hub(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, *args, **kwargs):
        calls.append((path, name, args, kwargs))
        return _fake_hub(name)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.delenv(GLUE_DIR_ENV, raising=False)
    return calls


def test_hub_rte(fake_hub):
    ds = load_split("rte", "dev")  # auto without glue_dir -> hub
    assert fake_hub == [("nyu-mll/glue", "rte", (), {})]
    assert ds.column_names == ["text_a", "text_b", "label"]
    assert ds.features["label"] == datasets.Value("int64")
    assert ds.to_dict() == {"text_a": ["p0", "p1"], "text_b": ["h0", "h1"], "label": [1, 0]}
    train = load_split("RTE", "train", source="hub")
    assert train["label"][:] == [0, 1, 1, 0]


def test_hub_sst2_single_sentence(fake_hub):
    ds = load_split("sst2", "train", source="hub")
    assert ds.column_names == ["text_a", "label"]
    assert ds.to_dict() == {"text_a": ["good", "bad", "fine"], "label": [1, 0, 1]}


def test_hub_mnli_split_names(fake_hub):
    assert load_split("mnli", "dev", source="hub")["text_a"][:] == ["mp0", "mp1"]
    assert load_split("mnli", "dev_matched", source="hub")["label"][:] == [2, 1]
    mm = load_split("mnli", "dev_mismatched", source="hub")
    assert mm.to_dict() == {"text_a": ["mmp0"], "text_b": ["mmh0"], "label": [0]}
    assert [c[1] for c in fake_hub] == ["mnli"] * 3


def test_hub_stsb_float_labels(fake_hub):
    ds = load_split("stsb", "train", source="hub")
    assert ds.features["label"] == datasets.Value("float32")
    assert ds["label"][:] == [0.0, 2.5, 5.0]


def test_hub_sampling(fake_hub):
    ds = load_split("rte", "train", source="hub", max_examples=2, seed=1)
    keep = sorted(random.Random(1).sample(range(4), 2))
    assert ds["text_a"][:] == [f"p{i}" for i in keep]


def test_hub_glue_dir_wins_over_hub_in_auto(fake_hub, glue_fixtures_dir):
    assert len(load_split("rte", "dev", glue_fixtures_dir)) == 2
    assert fake_hub == []


def test_hub_unlabeled_rows_rejected(monkeypatch):
    dd = _fake_hub("rte")
    dd["validation"] = dd["test"]  # label -1
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: dd)
    with pytest.raises(GlueDataError, match="row 0: label -1"):
        load_split("rte", "dev", source="hub")
