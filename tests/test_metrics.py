"""minisnip.metrics: every metric on hand-computed cases, degenerate cases, optional scipy/sklearn cross-check."""

from __future__ import annotations

import math

import numpy as np
import pytest

from minisnip.metrics import (
    _average_ranks,
    accuracy,
    compute_metrics,
    constant_scores,
    f1_binary,
    learnt,
    matthews_corrcoef,
    pearson,
    spearman,
)

# A small binary case used several times:
#   preds  1 1 0 1 0
#   labels 1 0 0 1 1
#   TP = 2 (positions 0, 3), FP = 1 (pos 1), TN = 1 (pos 2), FN = 1 (pos 4)
P = [1, 1, 0, 1, 0]
Y = [1, 0, 0, 1, 1]


def test_accuracy():
    assert accuracy(P, Y) == pytest.approx(3 / 5)  # correct at positions 0, 2, 3
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5  # 2 of 4
    assert accuracy([2, 0, 1], [2, 0, 1]) == 1.0
    assert accuracy([0, 0], [1, 1]) == 0.0


def test_f1_binary():
    # F1 = 2TP / (2TP + FP + FN) = 4 / (4 + 1 + 1) = 2/3
    assert f1_binary(P, Y) == pytest.approx(2 / 3)
    # precision 1/1, recall 1/3: F1 = 2 / (2 + 0 + 2) = 1/2
    assert f1_binary([1, 0, 0], [1, 1, 1]) == pytest.approx(0.5)
    assert f1_binary([1, 0, 1], [1, 0, 1]) == 1.0


def test_f1_no_true_positive_is_zero(recwarn):
    assert f1_binary([0, 0, 0], [1, 0, 1]) == 0.0  # nothing predicted positive
    assert f1_binary([1, 1], [0, 0]) == 0.0  # no positive label
    assert f1_binary([0, 0], [0, 0]) == 0.0  # neither: 0/0 -> 0.0
    assert len(recwarn) == 0


def test_mcc_binary():
    # (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2·1 − 1·1) / sqrt(3·3·2·2) = 1/6
    assert matthews_corrcoef(P, Y) == pytest.approx(1 / 6)
    assert matthews_corrcoef([0, 1, 1, 0], [0, 1, 1, 0]) == pytest.approx(1.0)
    assert matthews_corrcoef([1, 0, 0, 1], [0, 1, 1, 0]) == pytest.approx(-1.0)


def test_mcc_multiclass():
    # labels 0 1 2 0 1 2, preds 0 2 1 0 0 2: correct c = 3 (pos 0, 3, 5), n = 6
    # true counts t = [2, 2, 2], predicted counts p = [3, 1, 2]
    # cov_yp = c·n − t·p = 18 − 12 = 6; cov_pp = n² − p·p = 36 − 14 = 22; cov_yy = 36 − 12 = 24
    # MCC = 6 / sqrt(22·24)
    assert matthews_corrcoef([0, 2, 1, 0, 0, 2], [0, 1, 2, 0, 1, 2]) == pytest.approx(6 / math.sqrt(22 * 24))


def test_mcc_degenerate_is_zero():
    assert matthews_corrcoef([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0  # one class predicted
    assert matthews_corrcoef([1, 0, 1, 0], [1, 1, 1, 1]) == 0.0  # one class in the labels
    assert matthews_corrcoef([1, 1], [1, 1]) == 0.0  # all correct but one class: undefined -> 0


def test_pearson():
    # x − x̄ = [−1, 0, 1]; y = [2, 4, 7], ȳ = 13/3, y − ȳ = [−7/3, −1/3, 8/3]
    # Σ(dx·dy) = 7/3 + 8/3 = 5; Σdx² = 2; Σdy² = (49 + 1 + 64)/9 = 114/9
    # r = 5 / sqrt(2 · 114/9) = 5 / sqrt(228/9)
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(228 / 9))
    assert pearson([1, 2, 3, 4], [3, 5, 7, 9]) == pytest.approx(1.0)  # y = 2x + 1
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_pearson_constant_is_zero():
    assert pearson([0.1, 0.1, 0.1], [1.0, 2.0, 3.0]) == 0.0
    assert pearson([1.0, 2.0, 3.0], [2.5, 2.5, 2.5]) == 0.0
    assert pearson([7.0], [3.0]) == 0.0  # a single pair is constant too


def test_average_ranks_ties():
    # sorted: 5 -> rank 1, 10 -> rank 2, the three 20s share ranks 3, 4, 5 -> 4
    assert _average_ranks(np.array([10.0, 20, 20, 20, 5])).tolist() == [2, 4, 4, 4, 1]


def test_spearman():
    # x = [1, 2, 2, 3] -> ranks [1, 2.5, 2.5, 4]; y = [1, 3, 2, 4] -> ranks [1, 3, 2, 4]; both mean 2.5
    # deviations [−1.5, 0, 0, 1.5] and [−1.5, 0.5, −0.5, 1.5]
    # Σ = 2.25 + 0 + 0 + 2.25 = 4.5; Σdx² = 4.5; Σdy² = 5 -> ρ = 4.5 / sqrt(22.5)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    # monotone but not linear: Spearman 1, Pearson below 1
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)
    assert pearson([1, 2, 3, 4], [1, 8, 27, 64]) < 0.99
    assert spearman([1, 2, 3], [9, 5, 0]) == pytest.approx(-1.0)
    assert spearman([2, 2, 2], [1, 2, 3]) == 0.0  # constant -> 0.0, not NaN


@pytest.mark.parametrize("fn", [accuracy, f1_binary, matthews_corrcoef, pearson, spearman])
def test_bad_inputs(fn):
    with pytest.raises(ValueError, match="length mismatch"):
        fn([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="empty"):
        fn([], [])
    with pytest.raises(ValueError, match="1-D"):
        fn([[1, 0]], [[1, 0]])


@pytest.mark.parametrize("fn", [pearson, spearman])
def test_non_finite_rejected(fn):
    with pytest.raises(ValueError, match="finite"):
        fn([1.0, float("nan"), 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="finite"):
        fn([1.0, 2.0, 3.0], [1.0, float("inf"), 3.0])


# ----------------------------------------------------------------------------------------------
# compute_metrics


def test_compute_cola_from_logits():
    # argmax of the logits -> preds [0, 1, 0, 1]; labels [0, 1, 1, 1]
    # TP = 2, TN = 1, FN = 1, FP = 0 -> MCC = (2·1 − 0) / sqrt(2·3·1·2) = 2 / sqrt(12)
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    out = compute_metrics("cola", logits, [0, 1, 1, 1])
    assert out == {"mcc": pytest.approx(2 / math.sqrt(12))}


def test_compute_mrpc_combined():
    # f1 = 2/3, accuracy = 3/5 (see P, Y above); combined = (2/3 + 3/5) / 2 = 19/30
    out = compute_metrics("MRPC", np.array(P), np.array(Y))
    assert list(out) == ["f1", "accuracy", "combined"]
    assert out["f1"] == pytest.approx(2 / 3)
    assert out["accuracy"] == pytest.approx(3 / 5)
    assert out["combined"] == pytest.approx(19 / 30)
    assert all(type(v) is float for v in out.values())


def test_compute_stsb_scores_n_by_1():
    # pearson as in test_pearson; ranks of [1, 2, 3] and [2, 4, 7] agree -> spearman 1
    r = 5 / math.sqrt(228 / 9)
    out = compute_metrics("sts-b", np.array([[1.0], [2.0], [3.0]]), np.array([2.0, 4.0, 7.0], dtype=np.float32))
    assert out == {"pearson": pytest.approx(r), "spearman": pytest.approx(1.0), "combined": pytest.approx((r + 1) / 2)}
    const = compute_metrics("stsb", np.full(3, 2.5), [1.0, 2.0, 3.0])  # constant predictions
    assert const == {"pearson": 0.0, "spearman": 0.0, "combined": 0.0}


def test_compute_accuracy_tasks():
    logits = np.array([[3.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])  # preds 0, 2, 1
    assert compute_metrics("mnli", logits, [0, 2, 2]) == {"accuracy": pytest.approx(2 / 3)}
    assert compute_metrics("sst2", [1, 0, 1, 1], [1, 1, 1, 0]) == {"accuracy": 0.5}
    assert compute_metrics("qqp", [0, 0, 0], [0, 0, 0]) == {"f1": 0.0, "accuracy": 1.0, "combined": 0.5}


def test_compute_torch_tensors():
    torch = pytest.importorskip("torch")
    logits = torch.tensor([[0.2, 0.8], [0.9, 0.1]], requires_grad=True)
    assert compute_metrics("rte", logits, torch.tensor([1, 1])) == {"accuracy": 0.5}


def test_compute_metrics_errors():
    with pytest.raises(ValueError, match="length mismatch"):
        compute_metrics("sst2", [1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="empty"):
        compute_metrics("sst2", [], [])
    with pytest.raises(ValueError, match="empty"):
        compute_metrics("sst2", np.zeros((0, 2)), [])
    with pytest.raises(ValueError, match=r"expected logits \(N, 3\)"):
        compute_metrics("mnli", np.zeros((2, 2)), [0, 1])
    with pytest.raises(ValueError, match=r"\(N, 1\)"):
        compute_metrics("stsb", np.zeros((2, 2)), [0.0, 1.0])
    with pytest.raises(ValueError, match="unknown GLUE task"):
        compute_metrics("squad", [1], [1])


# ----------------------------------------------------------------------------------------------
# cross-checks, only where scipy / sklearn happen to be installed (they are not dependencies)


def _random_cases(n_cases: int = 20):
    rng = np.random.default_rng(0)
    for _ in range(n_cases):
        n = int(rng.integers(2, 60))
        yield rng.integers(0, 2, n), rng.integers(0, 2, n), rng.integers(0, 3, n), rng.integers(0, 3, n)


def test_cross_check_sklearn():
    skm = pytest.importorskip("sklearn.metrics")
    for p, y, p3, y3 in _random_cases():
        assert accuracy(p, y) == pytest.approx(skm.accuracy_score(y, p))
        assert f1_binary(p, y) == pytest.approx(skm.f1_score(y, p, zero_division=0.0))
        assert matthews_corrcoef(p, y) == pytest.approx(skm.matthews_corrcoef(y, p))
        assert matthews_corrcoef(p3, y3) == pytest.approx(skm.matthews_corrcoef(y3, p3))


def test_cross_check_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    for _ in range(20):
        n = int(rng.integers(3, 80))
        x = rng.normal(size=n)
        y = np.round(x + rng.normal(size=n), 1)  # rounding makes ties
        xt = rng.integers(0, 4, n).astype(float)  # many ties
        if np.all(xt == xt[0]):
            continue
        assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])
        assert spearman(xt, y) == pytest.approx(stats.spearmanr(xt, y)[0])
        assert _average_ranks(y).tolist() == stats.rankdata(y).tolist()


@pytest.mark.parametrize("task", ["sst2", "cola", "mrpc"])
def test_classification_logits_that_are_not_finite_are_refused_not_argmaxed(task):
    logits = np.zeros((4, 2))
    logits[1, 0] = float("nan")  # argmax would pick the NaN's class and score it
    with pytest.raises(ValueError, match="1 of 4 examples have non-finite logits"):
        compute_metrics(task, logits, [0, 0, 1, 1])
    logits[1, 0], logits[2, 1] = 0.0, float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        compute_metrics(task, logits, [0, 0, 1, 1])
    assert compute_metrics(task, np.array([0, 1, 1, 0]), [0, 0, 1, 1])  # integer predictions pass as they are


def test_constant_scores_are_the_majority_vote_s_hand_computed():
    # MRPC: the training labels' majority is 1 ("paraphrase"); on dev 1 0 1 1 always saying 1 gives TP 3, FP 1:
    # F1 = 6 / 7, accuracy 3 / 4
    m = constant_scores("mrpc", [1, 1, 0], [1, 0, 1, 1])
    assert m["f1"] == pytest.approx(6 / 7) and m["accuracy"] == pytest.approx(0.75)
    assert constant_scores("sst2", [0, 1], [1, 1, 0])["accuracy"] == pytest.approx(1 / 3)  # a tie: the smaller, 0
    assert constant_scores("cola", [1, 1, 0], [1, 0])["mcc"] == 0.0
    st = constant_scores("stsb", np.array([1.0, 2.0]), np.array([3.0, 1.0, 4.0]))
    assert st["pearson"] == 0.0 and st["spearman"] == 0.0  # a constant has no correlation
    with pytest.raises(ValueError, match="no training labels"):
        constant_scores("sst2", [], [1])


def test_learnt_means_strictly_better_than_the_constant_predictor():
    assert not learnt(0.8122, 0.8122) and not learnt(0.0, 0.0) and not learnt(0.50, 0.51)
    assert learnt(0.8123, 0.8122)
