"""GLUE metrics in plain numpy (no sklearn / scipy), each following the GLUE definition.

* CoLA: Matthews correlation ("mcc");
* SST-2, MNLI, QNLI, RTE, WNLI: "accuracy";
* MRPC, QQP: "f1" (positive class 1) and "accuracy", plus "combined" = their mean;
* STS-B: "pearson" and "spearman", plus "combined" = their mean.

Degenerate inputs never give NaN: F1 is 0.0 without true positives, MCC is 0.0 when its
denominator is 0 (a single class predicted or present, as sklearn does), and Pearson / Spearman are
0.0 when either input is constant (the correlation is undefined there; scipy would return NaN).
Empty inputs, length mismatches and non-finite values raise ValueError.
"""

from __future__ import annotations

import numpy as np

from minisnip.glue import GlueTask, get_task

__all__ = ["accuracy", "compute_metrics", "constant_scores", "f1_binary", "learnt", "matthews_corrcoef", "pearson", "spearman"]


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _pair(a, b, what: str, dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """Two 1-D arrays of the same, non-zero length."""
    a, b = _to_numpy(a), _to_numpy(b)
    if dtype is not None:
        a, b = a.astype(dtype), b.astype(dtype)
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError(f"{what}: expected 1-D inputs, got shapes {a.shape} and {b.shape}")
    if len(a) != len(b):
        raise ValueError(f"{what}: length mismatch, {len(a)} vs {len(b)}")
    if len(a) == 0:
        raise ValueError(f"{what}: empty input")
    return a, b


def accuracy(preds, labels) -> float:
    """Fraction of predictions equal to the labels."""
    p, y = _pair(preds, labels, "accuracy")
    return float(np.mean(p == y))


def f1_binary(preds, labels) -> float:
    """F1 of the positive class 1: 2·TP / (2·TP + FP + FN); 0.0 when there is no true positive."""
    p, y = _pair(preds, labels, "f1_binary")
    tp = int(np.sum((p == 1) & (y == 1)))
    fp = int(np.sum((p == 1) & (y != 1)))
    fn = int(np.sum((p != 1) & (y == 1)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews_corrcoef(preds, labels) -> float:
    """Matthews correlation coefficient (multi-class form, as sklearn); 0.0 when undefined.

    With confusion matrix C (rows true, columns predicted), t = row sums, p = column sums,
    c = trace, n = total: MCC = (c·n − t·p) / sqrt((n² − p·p)(n² − t·t)).
    """
    p, y = _pair(preds, labels, "matthews_corrcoef")
    classes, inv = np.unique(np.concatenate([y, p]), return_inverse=True)
    yi, pi = inv[: len(y)], inv[len(y):]
    k = len(classes)
    conf = np.zeros((k, k), dtype=np.float64)
    np.add.at(conf, (yi, pi), 1.0)
    t_sum, p_sum = conf.sum(axis=1), conf.sum(axis=0)
    n, correct = conf.sum(), np.trace(conf)
    cov_yp = correct * n - t_sum @ p_sum
    cov_pp = n * n - p_sum @ p_sum
    cov_yy = n * n - t_sum @ t_sum
    if cov_pp * cov_yy == 0:
        return 0.0
    return float(np.clip(cov_yp / np.sqrt(cov_pp * cov_yy), -1.0, 1.0))


def pearson(x, y) -> float:
    """Pearson correlation; 0.0 when either input is constant (undefined there)."""
    a, b = _pair(x, y, "pearson", dtype=np.float64)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("pearson: inputs must be finite (no NaN or inf)")
    if np.all(a == a[0]) or np.all(b == b[0]):
        return 0.0
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt(np.sum(a * a) * np.sum(b * b))
    if denom == 0:
        return 0.0
    return float(np.clip(np.sum(a * b) / denom, -1.0, 1.0))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks (scipy's rankdata 'average')."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts_group = np.r_[True, xs[1:] != xs[:-1]]
    group = np.cumsum(starts_group) - 1  # group id of each sorted element
    starts = np.flatnonzero(starts_group)  # 0-based first position of each group
    ends = np.r_[starts[1:], len(x)]  # one past its last position
    mean_rank = (starts + ends - 1) / 2 + 1
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = mean_rank[group]
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation: Pearson of average ranks (ties averaged); 0.0 if an input is constant."""
    a, b = _pair(x, y, "spearman", dtype=np.float64)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("spearman: inputs must be finite (no NaN or inf)")
    return pearson(_average_ranks(a), _average_ranks(b))


_METRIC_FNS = {"accuracy": accuracy, "f1": f1_binary, "mcc": matthews_corrcoef,
               "pearson": pearson, "spearman": spearman}


def compute_metrics(task: str | GlueTask, preds_or_logits, labels) -> dict[str, float]:
    """The task's GLUE metrics, plus "combined" (mean) where GLUE reports two.

    Classification: logits (N, num_labels) are argmax-ed; predictions (N,) are used as they are.
    Regression (STS-B): scores (N,) or (N, 1).
    """
    task = get_task(task)
    out = _to_numpy(preds_or_logits)
    y = _to_numpy(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if task.is_regression:
        if out.ndim == 2 and out.shape[1] == 1:
            out = out[:, 0]
        if out.ndim != 1:
            raise ValueError(f"{task.display}: expected scores (N,) or (N, 1), got shape {out.shape}")
        out, y = out.astype(np.float64), y.astype(np.float64)
    else:
        if np.issubdtype(out.dtype, np.floating) and not np.isfinite(out).all():
            bad = int((~np.isfinite(out)).any(axis=-1).sum()) if out.ndim == 2 else int((~np.isfinite(out)).sum())
            raise ValueError(f"{task.display}: {bad} of {out.shape[0]} examples have non-finite logits (NaN or inf): "
                             "the model diverged; an argmax over them would give a meaningless score")
        if out.ndim == 2:
            if out.shape[1] != task.num_labels:
                raise ValueError(f"{task.display}: expected logits (N, {task.num_labels}), got shape {out.shape}")
            if out.shape[0] == 0:
                raise ValueError(f"{task.display}: empty input")
            out = out.argmax(axis=1)
        elif out.ndim != 1:
            raise ValueError(f"{task.display}: expected logits (N, C) or predictions (N,), got shape {out.shape}")
    results = {name: _METRIC_FNS[name](out, y) for name in task.metrics}
    if len(task.metrics) == 2:
        results["combined"] = (results[task.metrics[0]] + results[task.metrics[1]]) / 2
    return results


def constant_scores(task: str | GlueTask, train_labels, dev_labels) -> dict[str, float]:
    """The dev metrics of the best constant predictor fitted on the training labels: every dev example gets the
    majority class of train_labels (ties: the smallest label), or for regression their mean (whose correlations
    are 0.0, as for any constant). What a model scores that has learnt nothing of the inputs: on MRPC, F1 of
    always saying "paraphrase"; on CoLA, MCC 0."""
    task = get_task(task)
    y_train, y_dev = _to_numpy(train_labels).reshape(-1), _to_numpy(dev_labels).reshape(-1)
    if len(y_train) == 0:
        raise ValueError(f"{task.display}: no training labels to fit a constant predictor on")
    if task.is_regression:
        constant = float(np.mean(y_train.astype(np.float64)))
        preds = np.full(len(y_dev), constant)
    else:
        classes, counts = np.unique(y_train.astype(np.int64), return_counts=True)
        preds = np.full(len(y_dev), classes[np.argmax(counts)], dtype=np.int64)  # argmax: the first, smallest
    return compute_metrics(task, preds, y_dev)


def learnt(score: float, constant: float) -> bool:
    """Whether a model's score beats the constant predictor's (`constant_scores`, the same metric); one that does
    not has learnt nothing a majority vote could not give, and a pruned score of it says nothing of the method."""
    return score > constant + 1e-9
