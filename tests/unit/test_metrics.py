"""breastscan.evaluation.metrics: agrees with scikit-learn, handles edge cases; calibration and bootstrap."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    log_loss,
    recall_score,
    roc_auc_score,
)

from breastscan.evaluation.metrics import (
    apply_temperature,
    bootstrap_ci,
    calibration_curve_data,
    classification_report,
    dice_score,
    expected_calibration_error,
    fit_temperature,
    iou_score,
    segmentation_report,
    sigmoid,
    softmax,
)
from breastscan.labels import BIRADS_DENSITY, PATHOLOGIES


def _random_task(n: int = 300, k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 1.0  # some signal
    return y, softmax(logits)


def _calibrated_sample(
    n: int, k: int = 3, scale: float = 2.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from softmax(logits): perfectly calibrated by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=scale, size=(n, k))
    p = softmax(logits)
    y = (rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    return logits, np.minimum(y, k - 1)


# --------------------------------------------------------------------------- activations


def test_softmax_and_sigmoid_are_stable() -> None:
    p = softmax(np.array([[1000.0, 0.0, -1000.0], [1.0, 1.0, 1.0]]))
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    np.testing.assert_allclose(p[1], 1 / 3)
    s = sigmoid(np.array([-1000.0, 0.0, 1000.0]))
    np.testing.assert_allclose(s, [0.0, 0.5, 1.0])


# --------------------------------------------------------------------------- classification


def test_classification_report_matches_sklearn() -> None:
    y, p = _random_task()
    rep = classification_report(y, p, PATHOLOGIES, quadratic_kappa=True)
    pred = p.argmax(axis=1)
    assert rep["n"] == len(y) and rep["class_names"] == list(PATHOLOGIES)
    assert rep["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert rep["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert rep["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    assert rep["log_loss"] == pytest.approx(log_loss(y, p))
    assert rep["quadratic_kappa"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))
    assert rep["macro_auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    recalls = recall_score(y, pred, average=None)
    for c, name in enumerate(PATHOLOGIES):
        row = rep["per_class"][name]
        assert row["sensitivity"] == pytest.approx(recalls[c])
        specificity = recall_score(y != c, pred != c)  # recall of the negatives
        assert row["specificity"] == pytest.approx(specificity)
        assert row["auc"] == pytest.approx(roc_auc_score(y == c, p[:, c]))
        assert row["support"] == int((y == c).sum())
    assert "auc" not in rep  # only for binary tasks


def test_binary_report_has_positive_class_auc() -> None:
    y, p = _random_task(k=2, seed=1)
    rep = classification_report(y, p, ("benign", "malignant"))
    assert rep["auc"] == pytest.approx(roc_auc_score(y, p[:, 1]))
    # a 1-D probability of the positive class is accepted by the calibration helpers
    assert expected_calibration_error(p[:, 1], y) == pytest.approx(expected_calibration_error(p, y))


def test_perfect_predictions() -> None:
    y = np.array([0, 1, 2, 3] * 10)
    p = np.eye(4)[y] * 0.96 + 0.01
    rep = classification_report(y, p, BIRADS_DENSITY, quadratic_kappa=True)
    assert rep["accuracy"] == 1.0 and rep["balanced_accuracy"] == 1.0
    assert rep["macro_auc"] == 1.0 and rep["quadratic_kappa"] == pytest.approx(1.0)
    for row in rep["per_class"].values():
        assert row["sensitivity"] == 1.0 and row["specificity"] == 1.0 and row["auc"] == 1.0


def test_absent_class_gives_none_not_a_crash() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 50)  # class 2 never occurs
    p = softmax(rng.normal(size=(50, 3)))
    rep = classification_report(y, p, PATHOLOGIES, quadratic_kappa=True)
    absent = rep["per_class"]["normal"]
    assert absent["auc"] is None and absent["sensitivity"] is None and absent["support"] == 0
    assert absent["specificity"] is not None
    defined = [rep["per_class"][c]["auc"] for c in ("benign", "malignant")]
    assert rep["macro_auc"] == pytest.approx(np.mean(defined))


def test_report_rejects_bad_input() -> None:
    y, p = _random_task()
    with pytest.raises(ValueError, match="class names"):
        classification_report(y, p, ("a", "b"))
    with pytest.raises(ValueError, match="sum to 1|logits"):
        classification_report(y, p * 3, PATHOLOGIES)
    with pytest.raises(ValueError, match="outside"):
        classification_report(y + 5, p, PATHOLOGIES)
    with pytest.raises(ValueError, match="shape|need"):
        classification_report(y[:-1], p, PATHOLOGIES)


# --------------------------------------------------------------------------- calibration


def test_ece_small_when_calibrated_and_larger_when_overconfident() -> None:
    logits, y = _calibrated_sample(20000)
    calibrated = expected_calibration_error(softmax(logits), y)
    overconfident = expected_calibration_error(softmax(3.0 * logits), y)
    assert calibrated < 0.03
    assert overconfident > calibrated + 0.05


def test_calibration_curve_data_is_consistent() -> None:
    logits, y = _calibrated_sample(5000, seed=4)
    probs = softmax(logits)
    data = calibration_curve_data(probs, y, n_bins=10)
    assert data["n_bins"] == 10 and len(data["count"]) == 10 and sum(data["count"]) == 5000
    assert data["ece"] == pytest.approx(expected_calibration_error(probs, y, n_bins=10))
    # top-label confidence is >= 1/k, so the lowest bins of a 3-class task are empty
    assert data["count"][0] == 0 and data["confidence"][0] is None and data["accuracy"][0] is None
    for lo, hi, conf in zip(data["bin_lower"], data["bin_upper"], data["confidence"], strict=True):
        assert conf is None or lo <= conf <= hi


def test_fit_temperature_recovers_scale_and_reduces_nll() -> None:
    logits, y = _calibrated_sample(20000, seed=5)
    hot = 3.0 * logits
    t = fit_temperature(hot, y)
    assert t == pytest.approx(3.0, rel=0.10)
    nll_before = log_loss(y, softmax(hot))
    nll_after = log_loss(y, apply_temperature(hot, t))
    assert nll_after < nll_before
    np.testing.assert_allclose(apply_temperature(hot, t).sum(axis=1), 1.0)
    with pytest.raises(ValueError):
        apply_temperature(hot, 0.0)


# --------------------------------------------------------------------------- segmentation


def test_dice_and_iou_hand_computed() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert dice_score(a, b) == 1.0 and iou_score(a, b) == 1.0  # empty vs empty
    a[0, :2] = True  # 2 pixels
    assert dice_score(a, b) == 0.0 and iou_score(a, b) == 0.0
    b[0, 1:4] = True  # 3 pixels, 1 shared
    assert dice_score(a, b) == pytest.approx(2 * 1 / 5)
    assert iou_score(a, b) == pytest.approx(1 / 4)
    assert dice_score(a, a) == 1.0 and iou_score(b, b) == 1.0
    with pytest.raises(ValueError, match="shapes"):
        dice_score(a, b[:2])


def test_segmentation_report() -> None:
    truth = np.zeros((3, 4, 4), np.uint8)
    truth[0, :2, :2] = 1  # 4 pixels
    truth[1, 0, 0] = 1
    probs = np.zeros((3, 4, 4), np.float32)
    probs[0, :2, :2] = 0.9  # perfect
    probs[1, 3, 3] = 0.6  # miss: dice 0
    probs[2, 0, 0] = 0.4  # empty truth, below threshold: dice 1
    rep = segmentation_report(truth[..., None], probs[..., None], threshold=0.5)
    assert rep["dice_per_image"] == [1.0, 0.0, 1.0]
    assert rep["mean_dice"] == pytest.approx(2 / 3)
    assert rep["n_lesion_images"] == 2 and rep["lesion_mean_dice"] == pytest.approx(0.5)
    assert rep["iou_per_image"] == [1.0, 0.0, 1.0]
    low = segmentation_report(truth, probs, threshold=0.3)
    assert low["dice_per_image"][2] == 0.0  # now a false positive on the empty image


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_contains_estimate_and_narrows_with_n() -> None:
    rng = np.random.default_rng(6)
    small, large = rng.normal(size=100), rng.normal(size=2000)
    lo_s, hi_s = bootstrap_ci(lambda idx: float(small[idx].mean()), len(small), n_boot=500)
    lo_l, hi_l = bootstrap_ci(lambda idx: float(large[idx].mean()), len(large), n_boot=500)
    assert lo_s <= small.mean() <= hi_s
    assert lo_l <= large.mean() <= hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s)


def test_bootstrap_ci_is_seeded() -> None:
    x = np.random.default_rng(7).normal(size=200)
    a = bootstrap_ci(lambda idx: float(x[idx].mean()), len(x), n_boot=200, seed=3)
    b = bootstrap_ci(lambda idx: float(x[idx].mean()), len(x), n_boot=200, seed=3)
    c = bootstrap_ci(lambda idx: float(x[idx].mean()), len(x), n_boot=200, seed=4)
    assert a == b and a != c


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
def test_bootstrap_skips_undefined_resamples() -> None:
    y = np.array([0] * 19 + [1])
    scores = np.linspace(0, 1, 20)
    lo, hi = bootstrap_ci(lambda idx: roc_auc_score(y[idx], scores[idx]), len(y), n_boot=300)
    assert 0.0 <= lo <= hi <= 1.0
    with pytest.raises(ValueError, match="undefined"):
        bootstrap_ci(lambda idx: float("nan"), 10, n_boot=20)


def test_group_bootstrap_resamples_whole_groups() -> None:
    groups = np.repeat(np.arange(10), 5)  # 10 patients, 5 images each
    values = np.repeat(np.arange(10, dtype=float), 5)
    seen: list[np.ndarray] = []

    def metric(idx: np.ndarray) -> float:
        seen.append(idx)
        return float(values[idx].mean())

    lo, hi = bootstrap_ci(metric, len(values), n_boot=300, groups=groups)
    assert lo <= values.mean() <= hi
    for idx in seen[:20]:
        # every group drawn appears with all five of its members, a multiple of 5 times
        counts = np.bincount(groups[idx], minlength=10)
        assert np.all(counts % 5 == 0) and len(idx) == 50
    # correlated samples widen the interval compared with treating images as independent
    lo_i, hi_i = bootstrap_ci(lambda idx: float(values[idx].mean()), len(values), n_boot=300)
    assert (hi - lo) > (hi_i - lo_i)
    with pytest.raises(ValueError, match="groups"):
        bootstrap_ci(metric, len(values), groups=groups[:-1])


def test_metrics_module_imports_without_tensorflow() -> None:
    code = (
        "import sys, breastscan.evaluation.metrics; "
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
