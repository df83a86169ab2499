"""GLUE tasks and loading: local GLUE TSV files or the Hugging Face hub.

Every split comes back as a ``datasets.Dataset`` with the same columns, whatever the source:

* ``text_a`` (str): the first (or only) sentence;
* ``text_b`` (str): the second sentence. **The column exists only for sentence-pair tasks**
  (``task.is_pair``); single-sentence tasks (CoLA, SST-2) have no ``text_b`` column;
* ``label``: int64 class index for classification (in the order of ``task.labels``, which is the
  order of the HF ``datasets`` GLUE builder), float32 score in [0, 5] for STS-B.

Local files use the layout written by the classic ``download_glue_data.py`` script::

    <glue_dir>/<Folder>/train.tsv and dev.tsv        (MNLI: dev_matched.tsv, dev_mismatched.tsv)

They are read line by line, split on tabs, with quoting disabled: a ``"`` inside a field is text.
Any defect (wrong header, wrong column count, unknown label, bad STS-B score, ...) raises
:class:`GlueDataError` naming the file, the 1-based line number and the offending value; nothing
is returned partially.

``load_split(..., source="auto")`` reads local files when ``glue_dir`` is given, else from the
directory in the environment variable ``MINISNIP_GLUE_DIR`` if it is set, else from the hub (``nyu-mll/glue``;
a failure there, e.g. offline, says how to pass a local folder instead).
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # `datasets` is an optional dependency, imported only when loading
    import datasets

__all__ = [
    "GLUE_DIR_ENV",
    "GlueDataError",
    "GlueFileNotFoundError",
    "GlueTask",
    "TASKS",
    "get_task",
    "load_split",
    "read_tsv",
    "split_path",
]

GLUE_DIR_ENV = "MINISNIP_GLUE_DIR"


class GlueDataError(ValueError):
    """Bad GLUE input: unknown task or split, malformed file, bad label or score."""


class GlueFileNotFoundError(GlueDataError, FileNotFoundError):
    """A GLUE directory or split file does not exist (also a FileNotFoundError)."""


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: its names, labels, metrics and file layout.

    ``text_columns`` / ``label_column`` locate the fields in the local TSV: header names, or
    0-based column indices for CoLA, the only file without a header (``num_columns`` = 4).
    ``hub_text_columns`` are the text column names of the hub's ``glue`` dataset.
    """

    name: str
    display: str
    folder: str
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]
    main_metric: str
    text_columns: tuple[str | int, ...]
    label_column: str | int
    hub_text_columns: tuple[str, ...]
    dev_splits: tuple[str, ...] = ("dev",)
    num_columns: int | None = None  # fixed column count of a headerless file (CoLA)

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def has_header(self) -> bool:
        return self.num_columns is None


_ACC = ("accuracy",)
_F1_ACC = ("f1", "accuracy")

TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in [
        # CoLA: no header; source, label, original label, sentence.
        GlueTask("cola", "CoLA", "CoLA", ("0", "1"), ("mcc",), "mcc",
                 text_columns=(3,), label_column=1, hub_text_columns=("sentence",), num_columns=4),
        GlueTask("sst2", "SST-2", "SST-2", ("0", "1"), _ACC, "accuracy",
                 text_columns=("sentence",), label_column="label", hub_text_columns=("sentence",)),
        GlueTask("mrpc", "MRPC", "MRPC", ("0", "1"), _F1_ACC, "f1",
                 text_columns=("#1 String", "#2 String"), label_column="Quality",
                 hub_text_columns=("sentence1", "sentence2")),
        GlueTask("stsb", "STS-B", "STS-B", None, ("pearson", "spearman"), "pearson",
                 text_columns=("sentence1", "sentence2"), label_column="score",
                 hub_text_columns=("sentence1", "sentence2")),
        GlueTask("qqp", "QQP", "QQP", ("0", "1"), _F1_ACC, "f1",
                 text_columns=("question1", "question2"), label_column="is_duplicate",
                 hub_text_columns=("question1", "question2")),
        GlueTask("mnli", "MNLI", "MNLI", ("entailment", "neutral", "contradiction"), _ACC, "accuracy",
                 text_columns=("sentence1", "sentence2"), label_column="gold_label",
                 hub_text_columns=("premise", "hypothesis"),
                 dev_splits=("dev_matched", "dev_mismatched")),
        GlueTask("qnli", "QNLI", "QNLI", ("entailment", "not_entailment"), _ACC, "accuracy",
                 text_columns=("question", "sentence"), label_column="label",
                 hub_text_columns=("question", "sentence")),
        GlueTask("rte", "RTE", "RTE", ("entailment", "not_entailment"), _ACC, "accuracy",
                 text_columns=("sentence1", "sentence2"), label_column="label",
                 hub_text_columns=("sentence1", "sentence2")),
        GlueTask("wnli", "WNLI", "WNLI", ("0", "1"), _ACC, "accuracy",
                 text_columns=("sentence1", "sentence2"), label_column="label",
                 hub_text_columns=("sentence1", "sentence2")),
    ]
}


def get_task(name: str | GlueTask) -> GlueTask:
    """Look a task up by name in any case, with or without hyphens/underscores ("SST-2", "sts_b")."""
    if isinstance(name, GlueTask):
        return name
    key = str(name).lower().replace("-", "").replace("_", "").strip()
    if key not in TASKS:
        raise GlueDataError(f"unknown GLUE task {name!r}; valid names: {', '.join(TASKS)}")
    return TASKS[key]


# ----------------------------------------------------------------------------------------------
# splits and paths

_SPLIT_ALIASES = {"validation": "dev", "validation_matched": "dev_matched",
                  "validation_mismatched": "dev_mismatched"}


def _resolve_split(task: GlueTask, split: str) -> str:
    """Canonical local split name: "train" or one of task.dev_splits ("dev" → the first)."""
    s = _SPLIT_ALIASES.get(split, split)
    if s == "dev":
        s = task.dev_splits[0]
    if s != "train" and s not in task.dev_splits:
        valid = ["train", "dev", *(d for d in task.dev_splits if d != "dev")]
        raise GlueDataError(f"unknown split {split!r} for {task.display}; valid splits: {', '.join(valid)}")
    return s


def _hub_split(split: str) -> str:
    """Local split name → hub split name ("dev" → "validation", "dev_matched" → "validation_matched")."""
    return split if split == "train" else "validation" + split[len("dev"):]


def split_path(task: str | GlueTask, split: str, glue_dir: str | os.PathLike) -> Path:
    """Path of a split's TSV file, checking that it exists (GlueFileNotFoundError otherwise)."""
    task = get_task(task)
    split = _resolve_split(task, split)
    root = Path(glue_dir)
    if not root.is_dir():
        raise GlueFileNotFoundError(f"GLUE directory not found: {root}")
    folder = root / task.folder
    if not folder.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise GlueFileNotFoundError(
            f"{task.display} folder not found: expected {folder}; "
            f"folders in {root}: {', '.join(present) or '(none)'}")
    path = folder / f"{split}.tsv"
    if not path.is_file():
        present = sorted(p.name for p in folder.iterdir())
        raise GlueFileNotFoundError(
            f"{task.display} {split} file not found: expected {path}; "
            f"files in {folder}: {', '.join(present) or '(none)'}")
    return path


# ----------------------------------------------------------------------------------------------
# reading one TSV file


def _parse_score(value: str, where: str) -> float:
    try:
        score = float(value)
    except ValueError:
        raise GlueDataError(f"{where}: STS-B score {value!r} is not a number") from None
    if not math.isfinite(score) or not 0.0 <= score <= 5.0:
        raise GlueDataError(f"{where}: STS-B score {value!r} must be a finite number in [0, 5]")
    return score


def read_tsv(task: str | GlueTask, path: str | os.PathLike) -> dict[str, list]:
    """Parse one GLUE TSV file into columns {"text_a", ["text_b",] "label"} (plain lists).

    Lines are split on "\\n" only (a trailing "\\r" is dropped) and fields on tabs, with no
    quoting. A UTF-8 byte-order mark before the header is skipped (MRPC has one). A file with
    CR-only (old Mac) line endings is refused: it would read as one enormous first line.
    """
    task = get_task(task)
    path = Path(path)
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":  # the newline ending the last row
        lines.pop()
    if not lines:
        raise GlueDataError(f"{path}: file is empty")
    if b"\r" in lines[0][:-1]:  # a CR inside the first line, not the one ending a CRLF line
        raise GlueDataError(f"{path}: uses CR-only (old Mac) line endings; convert to LF, e.g. "
                            f"`tr '\\r' '\\n' < {path.name} > fixed.tsv`")

    def decode(raw: bytes, lineno: int) -> str:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GlueDataError(f"{path}, line {lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if lineno == 1:
            text = text.removeprefix("\ufeff")
        return text.removesuffix("\r")

    if task.has_header:
        header = decode(lines[0], 1).split("\t")
        wanted = [*task.text_columns, task.label_column]
        missing = [c for c in wanted if c not in header]
        if missing:
            raise GlueDataError(
                f"{path}, line 1: header not as expected for {task.display}: "
                f"missing column(s) {missing} in header {header}")
        n_cols = len(header)
        text_idx = [header.index(c) for c in task.text_columns]
        label_idx = header.index(task.label_column)
        first = 1
    else:
        n_cols = task.num_columns
        text_idx = list(task.text_columns)
        label_idx = task.label_column
        first = 0
    if first >= len(lines):
        raise GlueDataError(f"{path}: no data rows after the header")

    label_ids = None if task.labels is None else {s: i for i, s in enumerate(task.labels)}
    texts: list[list[str]] = [[] for _ in text_idx]
    labels: list = []
    for i in range(first, len(lines)):
        lineno = i + 1
        fields = decode(lines[i], lineno).split("\t")
        where = f"{path}, line {lineno}"
        if len(fields) != n_cols:
            raise GlueDataError(f"{where}: expected {n_cols} tab-separated columns, found {len(fields)}: "
                                f"{_clip(lines[i])!r}")
        for col, j in zip(texts, text_idx):
            col.append(fields[j])
        value = fields[label_idx]
        if label_ids is None:
            labels.append(_parse_score(value, where))
        elif value in label_ids:
            labels.append(label_ids[value])
        else:
            raise GlueDataError(f"{where}: unknown {task.display} label {value!r}; "
                                f"allowed: {', '.join(map(repr, task.labels))}")

    out = {"text_a": texts[0]}
    if task.is_pair:
        out["text_b"] = texts[1]
    out["label"] = labels
    return out


def _clip(raw: bytes, n: int = 120) -> str:
    text = raw.decode("utf-8", errors="replace")
    return text if len(text) <= n else text[:n] + "..."


# ----------------------------------------------------------------------------------------------
# loading a split as a datasets.Dataset


def _features(task: GlueTask) -> "datasets.Features":
    import datasets

    cols = {"text_a": datasets.Value("string")}
    if task.is_pair:
        cols["text_b"] = datasets.Value("string")
    cols["label"] = datasets.Value("float32" if task.is_regression else "int64")
    return datasets.Features(cols)


def _sample_indices(n_rows: int, max_examples: int | None, seed: int) -> list[int] | None:
    """Seeded random sample of row indices in file order, or None for "all rows"."""
    if max_examples is None or max_examples >= n_rows:
        return None
    return sorted(random.Random(seed).sample(range(n_rows), max_examples))


HUB_DATASET = "nyu-mll/glue"  # the hub id; a bare "glue" would read a local folder of that name instead


def _load_hub(task: GlueTask, split: str) -> "datasets.Dataset":
    import datasets

    hub_split = _hub_split(split)
    try:
        dd = datasets.load_dataset(HUB_DATASET, task.name)
    except Exception as e:  # noqa: BLE001 - offline, hub down, no such config: one message that says what to do
        reason = " ".join(str(e).split())[:300]
        raise GlueFileNotFoundError(
            f"{task.display}: no GLUE folder was given (--glue-dir or ${GLUE_DIR_ENV}), so the hub copy "
            f"{HUB_DATASET!r} was tried and could not be loaded ({type(e).__name__}: {reason}). Offline, point "
            f"--glue-dir (or {GLUE_DIR_ENV}) at a folder holding {task.folder}/train.tsv and dev.tsv "
            "(data/README.md says how to get them)") from None
    if hub_split not in dd:
        raise GlueDataError(f"hub dataset glue/{task.name} has no split {hub_split!r}; has: {', '.join(dd)}")
    ds = dd[hub_split]
    needed = [*task.hub_text_columns, "label"]
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise GlueDataError(f"hub dataset glue/{task.name} split {hub_split!r} lacks column(s) {missing}; "
                            f"has {ds.column_names}")
    ds = ds.select_columns(needed)
    names = ["text_a", "text_b"][: len(task.hub_text_columns)]
    ds = ds.rename_columns(dict(zip(task.hub_text_columns, names)))
    ds = ds.cast(_features(task))
    labels = ds.data.column("label").to_numpy()
    hi = 5.0 if task.is_regression else task.num_labels - 1  # test splits have label -1: rejected
    bad = np.flatnonzero(~((labels >= 0) & (labels <= hi)))  # NaN fails both comparisons
    if bad.size:
        raise GlueDataError(f"hub dataset glue/{task.name} split {hub_split!r}, row {bad[0]}: "
                            f"label {labels[bad[0]].item()!r} outside [0, {hi}]")
    return ds


def load_split(
    task: str | GlueTask,
    split: str,
    glue_dir: str | os.PathLike | None = None,
    *,
    max_examples: int | None = None,
    seed: int = 0,
    source: str = "auto",
) -> "datasets.Dataset":
    """Load one GLUE split as a Dataset with columns text_a, [text_b,] label.

    split: "train", "dev" (MNLI: dev_matched) or an explicit dev split name ("dev_mismatched");
    the hub names "validation*" are accepted too.
    max_examples: keep a random sample of this many rows (``random.Random(seed).sample`` over the
    row indices), in file order; the whole split when it has no more rows than that.
    source: "local" (read ``glue_dir``), "hub" (``datasets.load_dataset("glue", task)``) or "auto"
    (local when ``glue_dir`` or the MINISNIP_GLUE_DIR environment variable is set, else hub).
    """
    import datasets

    task = get_task(task)
    split = _resolve_split(task, split)
    if max_examples is not None and (not isinstance(max_examples, (int, np.integer)) or max_examples < 1):
        raise ValueError(f"max_examples must be a positive integer or None, got {max_examples!r}")
    if source not in ("auto", "local", "hub"):
        raise ValueError(f"source must be 'auto', 'local' or 'hub', got {source!r}")
    if glue_dir is None and source != "hub":
        glue_dir = os.environ.get(GLUE_DIR_ENV) or None
    if source == "auto":
        source = "local" if glue_dir is not None else "hub"

    if source == "local":
        if glue_dir is None:
            raise GlueFileNotFoundError(f"source='local' needs glue_dir (or the {GLUE_DIR_ENV} environment variable)")
        columns = read_tsv(task, split_path(task, split, glue_dir))
        keep = _sample_indices(len(columns["label"]), max_examples, seed)
        if keep is not None:
            columns = {k: [v[i] for i in keep] for k, v in columns.items()}
        return datasets.Dataset.from_dict(columns, features=_features(task))

    ds = _load_hub(task, split)
    keep = _sample_indices(len(ds), max_examples, seed)
    return ds if keep is None else ds.select(keep)
