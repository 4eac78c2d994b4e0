"""breastscan.evaluation.metrics (the metric registry) agrees with scikit-learn and handles edge
cases; breastscan.evaluation.calibration; the bootstrap."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    jaccard_score,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)

from breastscan.bundle import apply_temperature, sigmoid, softmax
from breastscan.evaluation.calibration import (
    calibration_curve_data,
    expected_calibration_error,
    fit_temperature,
)
from breastscan.evaluation.metrics import (
    CLASSIFICATION,
    METRICS,
    SEGMENTATION,
    STANDARD,
    ClassOutcomes,
    MaskOutcomes,
    bootstrap_ci,
    confusion,
    declared_metrics,
    headlines,
    interval,
    per_class,
    rank_auc,
    score,
    value,
)
from breastscan.labels import BIRADS_DENSITY, PATHOLOGIES

CLASS_METRICS = ("accuracy", "balanced_accuracy", "macro_auc", "quadratic_kappa", "log_loss")


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


def _sklearn(name: str, y: np.ndarray, p: np.ndarray, pred: np.ndarray) -> float:
    """scikit-learn's value of a registry metric (macro AUC: one-vs-rest over defined classes)."""
    k = p.shape[1]
    if name == "accuracy":
        return float(accuracy_score(y, pred))
    if name == "balanced_accuracy":
        return float(balanced_accuracy_score(y, pred))
    if name == "macro_auc":
        defined = [c for c in range(k) if 0 < (y == c).sum() < len(y)]
        return float(np.mean([roc_auc_score(y == c, p[:, c]) for c in defined]))
    if name == "quadratic_kappa":
        return float(cohen_kappa_score(y, pred, weights="quadratic", labels=list(range(k))))
    if name == "log_loss":
        return float(log_loss(y, p, labels=list(range(k))))
    raise KeyError(name)


# --------------------------------------------------------------------------- activations


def test_softmax_and_sigmoid_are_stable() -> None:
    p = softmax(np.array([[1000.0, 0.0, -1000.0], [1.0, 1.0, 1.0]]))
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    np.testing.assert_allclose(p[1], 1 / 3)
    s = sigmoid(np.array([-1000.0, 0.0, 1000.0]))
    np.testing.assert_allclose(s, [0.0, 0.5, 1.0])


# --------------------------------------------------------------------------- the registry


def test_registry_lists_what_each_model_can_report() -> None:
    assert set(STANDARD[CLASSIFICATION]) | set(STANDARD[SEGMENTATION]) <= set(METRICS)
    assert all(METRICS[n].task == CLASSIFICATION for n in STANDARD[CLASSIFICATION])
    assert all(METRICS[n].task == SEGMENTATION for n in STANDARD[SEGMENTATION])
    assert not METRICS["log_loss"].higher_is_better and METRICS["macro_auc"].higher_is_better
    binary_only = {"auc", "sensitivity", "specificity"}
    assert {n for n, m in METRICS.items() if m.binary_only} == binary_only
    three = headlines(CLASSIFICATION, 3)
    assert not binary_only & set(three) and "quadratic_kappa" in three and "mean_dice" not in three
    assert binary_only <= set(headlines(CLASSIFICATION, 2))
    assert set(headlines(SEGMENTATION)) == {"mean_dice", "mean_iou", "lesion_mean_dice", "lesion_mean_iou"}


def test_declared_metrics_follow_the_declaration() -> None:
    assert declared_metrics(CLASSIFICATION, 3, "macro_auc") == STANDARD[CLASSIFICATION]
    # a binary model reports its AUC; kappa only when headlined or gated
    assert declared_metrics(CLASSIFICATION, 2, "accuracy") == (*STANDARD[CLASSIFICATION], "auc")
    assert declared_metrics(CLASSIFICATION, 4, "quadratic_kappa", ["accuracy"]) == \
        (*STANDARD[CLASSIFICATION], "quadratic_kappa")
    assert declared_metrics(CLASSIFICATION, 2, "macro_auc", ["sensitivity", "per_class.malignant.auc"]) == \
        (*STANDARD[CLASSIFICATION], "auc", "sensitivity")
    assert declared_metrics(SEGMENTATION, 0, "lesion_mean_dice") == STANDARD[SEGMENTATION]
    with pytest.raises(ValueError, match="not a metric of a classification model with 3 classes"):
        declared_metrics(CLASSIFICATION, 3, "auc")
    with pytest.raises(ValueError, match="choose one of"):
        declared_metrics(CLASSIFICATION, 3, "macro_auc", ["f1"])
    with pytest.raises(ValueError, match="segmentation"):
        declared_metrics(SEGMENTATION, 0, "accuracy")


# --------------------------------------------------------------------------- classification


def test_classification_metrics_match_sklearn() -> None:
    y, p = _random_task()
    o = ClassOutcomes(y, p)
    pred = p.argmax(axis=1)
    assert o.n == len(y) and o.k == 3
    np.testing.assert_array_equal(o.pred, pred)
    for name in CLASS_METRICS:
        assert value(name, o) == pytest.approx(_sklearn(name, y, p, pred), abs=1e-12), name
    assert value("macro_auc", o) == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert confusion(o) == confusion_matrix(y, pred).tolist()

    stats = per_class(o, PATHOLOGIES)
    assert list(stats) == list(PATHOLOGIES)
    recalls = recall_score(y, pred, average=None)
    precisions = precision_score(y, pred, average=None)
    for c, name in enumerate(PATHOLOGIES):
        row = stats[name]
        assert row["sensitivity"] == pytest.approx(recalls[c])
        assert row["specificity"] == pytest.approx(recall_score(y != c, pred != c))  # recall of the negatives
        assert row["precision"] == pytest.approx(precisions[c])
        assert row["auc"] == pytest.approx(roc_auc_score(y == c, p[:, c]))
        assert row["support"] == int((y == c).sum())


def test_metrics_of_a_resample_equal_sklearn_on_the_resampled_rows() -> None:
    """``fn(outcomes, idx)`` is the metric of the rows ``idx``, repeats included: what the bootstrap uses."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 60)
    probs = rng.dirichlet(np.ones(4), 60)
    probs[np.arange(60), y] += rng.uniform(0, 1, 60)  # agreement better than chance, not perfect
    probs /= probs.sum(axis=1, keepdims=True)
    o = ClassOutcomes(y, probs)
    for _ in range(20):
        idx = rng.integers(0, 60, 60)
        yi, pi = y[idx], probs[idx]
        for name in CLASS_METRICS:
            with warnings.catch_warnings():  # "y_pred contains classes not in y_true"
                warnings.simplefilter("ignore")
                expected = _sklearn(name, yi, pi, pi.argmax(axis=1))
            assert METRICS[name].fn(o, idx) == pytest.approx(expected, abs=1e-12), name
    agreeing = int(np.flatnonzero(probs.argmax(1) == y)[0])
    assert np.isnan(METRICS["quadratic_kappa"].fn(o, np.full(5, agreeing)))  # one class, alike: undefined
    assert value("quadratic_kappa", o, np.full(5, agreeing)) is None


def test_binary_metrics_match_sklearn_at_argmax_and_at_a_threshold() -> None:
    y, p = _random_task(k=2, seed=1)
    o = ClassOutcomes(y, p)
    assert value("auc", o) == pytest.approx(roc_auc_score(y, p[:, 1]))
    assert value("auc", o) == pytest.approx(per_class(o, ("benign", "malignant"))["malignant"]["auc"])
    assert value("sensitivity", o) == pytest.approx(recall_score(y, p.argmax(axis=1)))
    assert value("specificity", o) == pytest.approx(recall_score(1 - y, 1 - p.argmax(axis=1)))
    for t in (0.3, 0.7):
        at = ClassOutcomes(y, p, threshold=t)
        called = (p[:, 1] >= t).astype(int)
        np.testing.assert_array_equal(at.pred, called)
        assert value("sensitivity", at) == pytest.approx(recall_score(y, called))
        assert value("specificity", at) == pytest.approx(recall_score(1 - y, 1 - called))
        assert value("accuracy", at) == pytest.approx(accuracy_score(y, called))
        assert value("auc", at) == value("auc", o)  # a threshold does not move the AUC
    per_image = np.where(np.arange(len(y)) % 2 == 0, 0.3, 0.7)
    called = (p[:, 1] >= per_image).astype(int)
    assert value("accuracy", ClassOutcomes(y, p, threshold=per_image)) == pytest.approx(
        accuracy_score(y, called))
    # ties are averaged, as scikit-learn does
    tied = np.array([0.5, 0.5, 0.2, 0.5, 0.9])
    positive = np.array([True, False, False, True, True])
    assert rank_auc(positive, tied) == pytest.approx(roc_auc_score(positive, tied))
    assert np.isnan(rank_auc(np.ones(4, bool), tied[:4]))
    # a 1-D probability of the positive class is accepted by the calibration helpers
    assert expected_calibration_error(p[:, 1], y) == pytest.approx(expected_calibration_error(p, y))


def test_a_decision_rule_moves_the_called_classes_and_every_statistic_on_them() -> None:
    from breastscan.decision import DecisionRule

    y, p = _random_task(n=400, seed=4)
    rule = DecisionRule("positive_ratio", positive="malignant", versus="benign", cutoff=0.25)
    o = ClassOutcomes.decided(y, p, rule, PATHOLOGIES)
    called = rule.decide(p, PATHOLOGIES)
    np.testing.assert_array_equal(o.pred, called)
    assert (called != p.argmax(axis=1)).any()  # the rule is not the arg-max here
    assert value("accuracy", o) == pytest.approx(accuracy_score(y, called))
    assert value("balanced_accuracy", o) == pytest.approx(balanced_accuracy_score(y, called))
    assert value("macro_auc", o) == value("macro_auc", ClassOutcomes(y, p))  # the scores do not move
    stats = per_class(o, PATHOLOGIES)["malignant"]
    assert stats["sensitivity"] == pytest.approx(recall_score(y == 1, called == 1))
    assert stats["specificity"] == pytest.approx(recall_score(y != 1, called != 1))
    assert stats["precision"] == pytest.approx(precision_score(y == 1, called == 1))
    assert confusion(o) == confusion_matrix(y, called, labels=[0, 1, 2]).tolist()
    assert stats["sensitivity"] > per_class(ClassOutcomes(y, p), PATHOLOGIES)["malignant"]["sensitivity"]
    with pytest.raises(ValueError, match="class indices"):
        ClassOutcomes(y, p, called=called[:-1])
    with pytest.raises(ValueError, match="not both"):
        ClassOutcomes(y % 2, p[:, :2] / p[:, :2].sum(axis=1, keepdims=True), threshold=0.5, called=y % 2)


def test_perfect_predictions() -> None:
    y = np.array([0, 1, 2, 3] * 10)
    p = np.eye(4)[y] * 0.96 + 0.01
    o = ClassOutcomes(y, p)
    for name in ("accuracy", "balanced_accuracy", "macro_auc", "quadratic_kappa"):
        assert value(name, o) == pytest.approx(1.0), name
    assert confusion(o) == (np.eye(4, dtype=int) * 10).tolist()
    for row in per_class(o, BIRADS_DENSITY).values():
        assert row["sensitivity"] == 1.0 and row["specificity"] == 1.0 and row["auc"] == 1.0
        assert row["precision"] == 1.0


def test_absent_class_gives_none_not_a_crash() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 50)  # class 2 never occurs
    p = softmax(rng.normal(size=(50, 3)))
    o = ClassOutcomes(y, p)
    stats = per_class(o, PATHOLOGIES)
    absent = stats["normal"]
    assert absent["auc"] is None and absent["sensitivity"] is None and absent["support"] == 0
    assert absent["specificity"] is not None
    defined = [roc_auc_score(y == c, p[:, c]) for c in (0, 1)]
    assert [stats[c]["auc"] for c in ("benign", "malignant")] == pytest.approx(defined)
    assert value("macro_auc", o) == pytest.approx(np.mean(defined))
    assert value("quadratic_kappa", o) == pytest.approx(
        cohen_kappa_score(y, p.argmax(axis=1), weights="quadratic", labels=[0, 1, 2]))
    assert confusion(o) == confusion_matrix(y, p.argmax(axis=1), labels=[0, 1, 2]).tolist()


def test_undefined_values_are_none() -> None:
    y, p = _random_task(n=30)
    o = ClassOutcomes(y, p)
    one_class = np.flatnonzero(y == 0)
    assert value("macro_auc", o, one_class) is None  # ValueError inside: one class only
    assert value("accuracy", o, one_class) is not None
    assert value("accuracy", o, np.array([], np.int64)) is None
    with pytest.raises(KeyError):
        value("f1", o)


def test_outcomes_reject_bad_input() -> None:
    y, p = _random_task()
    with pytest.raises(ValueError, match="outside"):
        ClassOutcomes(y + 5, p)
    with pytest.raises(ValueError, match="need y"):
        ClassOutcomes(y[:-1], p)
    with pytest.raises(ValueError, match="need y"):
        ClassOutcomes(y, p[:, 0])
    with pytest.raises(ValueError, match="exactly two classes"):
        ClassOutcomes(y, p, threshold=0.5)
    with pytest.raises(ValueError, match="one length"):
        MaskOutcomes(dice=[1.0, 0.5], iou=[1.0], lesion=[True, False])
    # probabilities are checked where they are read from a model's output
    with pytest.raises(ValueError, match="sum to 1|logits"):
        expected_calibration_error(p * 3, y)
    with pytest.raises(ValueError, match="outside"):
        expected_calibration_error(p, y + 5)
    with pytest.raises(ValueError, match="need y_true"):
        calibration_curve_data(p, y[:-1])


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
    # the ECE is the count-weighted gap between accuracy and confidence
    bins = zip(data["count"], data["accuracy"], data["confidence"], strict=True)
    gaps = [c * abs(a - f) for c, a, f in bins if c]
    assert data["ece"] == pytest.approx(sum(gaps) / 5000)


def test_fit_temperature_recovers_scale_and_reduces_nll() -> None:
    logits, y = _calibrated_sample(20000, seed=5)
    hot = 3.0 * logits
    t = fit_temperature(hot, y)
    assert t == pytest.approx(3.0, rel=0.10)
    nll_before = log_loss(y, softmax(hot))
    nll_after = log_loss(y, apply_temperature(hot, t))
    assert nll_after < nll_before
    # the registry's log loss is scikit-learn's, before and after
    assert value("log_loss", ClassOutcomes(y, apply_temperature(hot, t))) == pytest.approx(nll_after)
    np.testing.assert_allclose(apply_temperature(hot, t).sum(axis=1), 1.0)
    with pytest.raises(ValueError):
        apply_temperature(hot, 0.0)
    with pytest.raises(ValueError, match="outside"):
        fit_temperature(hot, y + 3)


# --------------------------------------------------------------------------- segmentation


def _pair(truth: np.ndarray, pred: np.ndarray) -> MaskOutcomes:
    """Outcomes of one binary prediction against one binary truth."""
    return MaskOutcomes.from_masks(truth[None].astype(float), pred[None].astype(float), 0.5)


def test_dice_and_iou_hand_computed() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    empty = _pair(a, b)
    assert empty.dice.tolist() == [1.0] and empty.iou.tolist() == [1.0]  # empty vs empty
    assert empty.lesion.tolist() == [False]
    a[0, :2] = True  # 2 pixels
    assert _pair(a, b).dice.tolist() == [0.0] and _pair(a, b).iou.tolist() == [0.0]
    b[0, 1:4] = True  # 3 pixels, 1 shared
    assert _pair(a, b).dice[0] == pytest.approx(2 * 1 / 5)
    assert _pair(a, b).iou[0] == pytest.approx(1 / 4)
    assert _pair(a, a).dice[0] == 1.0 and _pair(b, b).iou[0] == 1.0
    with pytest.raises(ValueError, match="shapes"):
        MaskOutcomes.from_masks(a[None], b[None, :2].astype(float))


def test_dice_and_iou_match_sklearn_on_pixels() -> None:
    rng = np.random.default_rng(8)
    truth = (rng.random((6, 16, 16, 1)) > 0.7).astype(np.float32)
    probs = rng.random((6, 16, 16, 1))
    o = MaskOutcomes.from_masks(truth, probs, threshold=0.6)
    for i in range(6):
        t, q = truth[i].ravel() > 0.5, probs[i].ravel() >= 0.6
        assert o.dice[i] == pytest.approx(f1_score(t, q))
        assert o.iou[i] == pytest.approx(jaccard_score(t, q))


def test_segmentation_metrics() -> None:
    truth = np.zeros((3, 4, 4), np.uint8)
    truth[0, :2, :2] = 1  # 4 pixels
    truth[1, 0, 0] = 1
    probs = np.zeros((3, 4, 4), np.float32)
    probs[0, :2, :2] = 0.9  # perfect
    probs[1, 3, 3] = 0.6  # miss: dice 0
    probs[2, 0, 0] = 0.4  # empty truth, below threshold: dice 1
    o = MaskOutcomes.from_masks(truth[..., None], probs[..., None], threshold=0.5)
    assert o.n == 3 and o.dice.tolist() == [1.0, 0.0, 1.0] and o.iou.tolist() == [1.0, 0.0, 1.0]
    assert o.lesion.tolist() == [True, True, False]
    assert value("mean_dice", o) == pytest.approx(2 / 3) and value("mean_iou", o) == pytest.approx(2 / 3)
    assert value("lesion_mean_dice", o) == pytest.approx(0.5)
    assert value("lesion_mean_iou", o) == pytest.approx(0.5)
    assert value("lesion_mean_dice", o, np.array([2, 2])) is None  # no lesion image: undefined
    assert value("mean_dice", o, np.array([0, 0, 1])) == pytest.approx(2 / 3)
    low = MaskOutcomes.from_masks(truth, probs, threshold=0.3)
    assert low.dice[2] == 0.0  # now a false positive on the empty image
    scored = score(o, STANDARD[SEGMENTATION], n_boot=0)
    assert {n: s["value"] for n, s in scored.items()} == pytest.approx(
        {"mean_dice": 2 / 3, "mean_iou": 2 / 3, "lesion_mean_dice": 0.5, "lesion_mean_iou": 0.5})


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
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci(lambda idx: 0.0, 10, n_boot=0)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
def test_bootstrap_skips_undefined_resamples() -> None:
    y = np.array([0] * 19 + [1])
    scores = np.linspace(0, 1, 20)
    lo, hi = bootstrap_ci(lambda idx: roc_auc_score(y[idx], scores[idx]), len(y), n_boot=300)
    assert 0.0 <= lo <= hi <= 1.0
    # the registry's AUC is NaN on a one-class resample: skipped the same way
    o = ClassOutcomes(y, np.stack([1 - scores, scores], axis=1))
    assert bootstrap_ci(lambda idx: METRICS["auc"].fn(o, idx), len(y), n_boot=300) == (lo, hi)
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


def test_score_gives_every_metric_a_grouped_interval() -> None:
    y, p = _random_task(n=120, seed=9)
    o = ClassOutcomes(y, p)
    groups = np.repeat(np.arange(40), 3).astype(str)
    names = (*STANDARD[CLASSIFICATION], "quadratic_kappa")
    scored = score(o, names, groups, n_boot=200, seed=5)
    assert list(scored) == list(names)
    for name in names:
        s = scored[name]
        assert s["value"] == pytest.approx(_sklearn(name, y, p, p.argmax(axis=1)), abs=1e-12), name
        assert s["ci_low"] <= s["value"] <= s["ci_high"], name
        # the same interval as the bootstrap of the registry function itself
        expected = bootstrap_ci(lambda idx, n=name: METRICS[n].fn(o, idx), o.n, n_boot=200, seed=5,
                                groups=groups)
        assert (s["ci_low"], s["ci_high"]) == expected
        assert interval(name, o, groups, n_boot=200, seed=5) == expected
    assert score(o, names, groups, n_boot=200, seed=5) == scored  # seeded
    no_ci = score(o, names, groups, n_boot=0)
    assert all(s["ci_low"] is None and s["ci_high"] is None for s in no_ci.values())
    assert {n: s["value"] for n, s in no_ci.items()} == {n: s["value"] for n, s in scored.items()}
    one_class = ClassOutcomes(np.zeros(6, int), p[:6])
    assert score(one_class, ["macro_auc"], n_boot=50)["macro_auc"] == {"value": None, "ci_low": None,
                                                                        "ci_high": None}


def test_metrics_module_imports_without_tensorflow_or_sklearn() -> None:
    code = (
        "import sys, breastscan.evaluation.metrics, breastscan.evaluation.calibration; "
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules; "
        "assert 'sklearn' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
