"""breastscan.evaluation.scoring and breastscan.evaluation.plots on hand-built models with known outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from breastscan.config import ModelConfig
from breastscan.data.loading import SplitData
from breastscan.evaluation.plots import plot_history
from breastscan.evaluation.scoring import (
    CLASSIFICATION_HEADLINES,
    eight_category,
    evaluate_classifier,
    evaluate_segmenter,
    write_evaluation,
)
from breastscan.imaging.preprocessing import PreprocessSpec
from breastscan.registry.bundle import ModelBundle, ModelContract

SPEC = PreprocessSpec(height=8, width=8)
TUMOR = ModelConfig(name="tumor", task="classification", dataset="mammography", label="pathology",
                    classes=("benign", "malignant", "normal"), preprocess=SPEC)
LESION = ModelConfig(name="lesion", task="segmentation", dataset="ultrasound", label="mask", depth=2,
                     preprocess=SPEC)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _classifier(scale: float, k: int = 3) -> ModelBundle:
    """A linear model whose logit c is ``scale`` times pixel c of the flattened image."""
    import keras

    inputs = keras.Input((8, 8, 1))
    logits = keras.layers.Dense(k, use_bias=False, name="logits")(keras.layers.Flatten()(inputs))
    model = keras.Model(inputs, logits)
    weights = np.zeros((64, k), np.float32)
    weights[np.arange(k), np.arange(k)] = scale
    model.get_layer("logits").set_weights([weights])
    return ModelBundle(model, SPEC, ModelContract.from_config(TUMOR, "mammography"))


def _split(scores: np.ndarray, targets: np.ndarray, groups: np.ndarray | None = None) -> SplitData:
    """Images carrying ``scores`` (n, k) in [0, 1] in their first k pixels."""
    n, k = scores.shape
    images = np.zeros((n, 8, 8, 1), np.float32)
    images.reshape(n, -1)[:, :k] = scores
    return SplitData(images=images, targets=np.asarray(targets),
                     frame=pd.DataFrame({"image": [f"img_{i:03d}.png" for i in range(n)]}),
                     groups=np.arange(n).astype(str) if groups is None else groups)


def _overconfident(n: int, seed: int, accuracy: float = 0.7) -> SplitData:
    """Always certain, right ``accuracy`` of the time."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    wrong = rng.random(n) > accuracy
    pred = np.where(wrong, (y + rng.integers(1, 3, n)) % 3, y)
    return _split(np.eye(3)[pred], y)


def test_perfect_classifier_metrics() -> None:
    y = np.array([0, 1, 2] * 10)
    test = _split(np.eye(3)[y], y, groups=np.repeat(np.arange(15), 2).astype(str))
    ev = evaluate_classifier(_classifier(10.0), test, test, headline="macro_auc", quadratic_kappa=True,
                             n_boot=200)
    m = ev.metrics
    for key in ("accuracy", "balanced_accuracy", "macro_auc", "quadratic_kappa"):
        assert m[key] == pytest.approx(1.0)
    assert m["headline"] == "macro_auc" and m["headline_value"] == pytest.approx(1.0)
    assert m["headline_ci_low"] == pytest.approx(1.0) and m["headline_ci_high"] == pytest.approx(1.0)
    assert m["n_test"] == m["n_val"] == 30
    assert m["per_class"]["malignant"] == pytest.approx(
        {"support": 10, "sensitivity": 1.0, "specificity": 1.0, "precision": 1.0, "auc": 1.0})
    assert ev.predictions["pred"].tolist() == ev.predictions["true"].tolist()
    assert ev.predictions.columns.tolist() == ["image", "true", "pred", "prob_benign", "prob_malignant",
                                               "prob_normal"]
    assert [(r["actual"], r["predicted"]) for r in ev.plots["confusion"]] == \
        [(TUMOR.class_names[c],) * 2 for c in y]


def test_classifier_metrics_match_sklearn_for_every_headline() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    scores = np.clip(np.eye(3)[y] * 0.5 + rng.random((60, 3)) * 0.6, 0, 1)
    test, val = _split(scores, y), _overconfident(60, seed=1)
    bundle = _classifier(4.0)
    ev = evaluate_classifier(bundle, val, test, headline="accuracy", quadratic_kappa=True, n_boot=0)
    m = ev.metrics
    probs = ev.predictions[[f"prob_{c}" for c in TUMOR.class_names]].to_numpy()
    pred = probs.argmax(axis=1)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["macro_auc"] == pytest.approx(np.mean([roc_auc_score(y == c, probs[:, c]) for c in range(3)]))
    # Test metrics use the probabilities calibrated with the temperature fitted on val.
    expected = bundle.with_temperature(ev.temperature).predict(test.images)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert m["temperature"] == ev.temperature
    assert m["headline_ci_low"] is None  # n_boot=0: no interval
    for name in CLASSIFICATION_HEADLINES:
        if name == "auc":
            continue  # binary models only
        ev = evaluate_classifier(bundle, val, test, headline=name, quadratic_kappa=True, n_boot=50)
        assert ev.metrics["headline_value"] == pytest.approx(ev.metrics[name], abs=1e-9), name
        assert ev.metrics["headline_ci_low"] <= ev.metrics["headline_ci_high"]
    with pytest.raises(ValueError, match="unknown classification headline"):
        evaluate_classifier(bundle, val, test, headline="f1", quadratic_kappa=False)


def test_temperature_lowers_ece_of_an_overconfident_model() -> None:
    ev = evaluate_classifier(_classifier(8.0), _overconfident(300, seed=1), _overconfident(300, seed=2),
                             headline="accuracy", quadratic_kappa=False, n_boot=100)
    m = ev.metrics
    assert m["temperature"] > 1.5
    assert m["ece_before"] > 0.2
    assert m["ece_after"] < 0.1 and m["ece_after"] < m["ece_before"] / 3
    stages = {r["stage"] for r in ev.plots["calibration"]}
    assert stages == {"before", "after"}
    assert m["headline_ci_low"] < m["accuracy"] < m["headline_ci_high"]


def test_write_classification_evaluation(tmp_path: Path) -> None:
    ev = evaluate_classifier(_classifier(8.0), _overconfident(90, seed=1), _overconfident(60, seed=2),
                             headline="macro_auc", quadratic_kappa=False, n_boot=50)
    written = write_evaluation(ev, tmp_path / "tumor")
    for path in written.values():
        assert path.is_file() and path.stat().st_size > 0, path
    for name in ("roc", "pr", "confusion", "calibration"):
        assert (tmp_path / "tumor" / "png" / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    metrics = json.loads((tmp_path / "tumor" / "metrics.json").read_text())
    assert metrics["headline"] == "macro_auc" and set(metrics["per_class"]) == set(TUMOR.class_names)
    plots = tmp_path / "tumor" / "plots"
    roc = pd.read_csv(plots / "roc.csv")
    assert roc.columns.tolist() == ["class", "fpr", "tpr"] and set(roc["class"]) == set(TUMOR.class_names)
    assert pd.read_csv(plots / "pr.csv").columns.tolist() == ["class", "recall", "precision"]
    confusion = pd.read_csv(plots / "confusion.csv")
    assert confusion.columns.tolist() == ["actual", "predicted"] and len(confusion) == 60
    calibration = pd.read_csv(plots / "calibration.csv")
    assert {"stage", "bin", "confidence", "accuracy"} <= set(calibration.columns)
    assert len(pd.read_csv(tmp_path / "tumor" / "predictions.csv")) == 60


def test_degenerate_test_split_still_writes(tmp_path: Path) -> None:
    y = np.zeros(6, int)  # one class only: AUC undefined
    ev = evaluate_classifier(_classifier(5.0), _overconfident(30, seed=1), _split(np.eye(3)[y], y),
                             headline="macro_auc", quadratic_kappa=True, n_boot=20)
    assert ev.metrics["macro_auc"] is None and ev.metrics["headline_value"] is None
    assert ev.plots["roc"] == []
    write_evaluation(ev, tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["headline_ci_low"] is None
    assert pd.read_csv(tmp_path / "plots" / "roc.csv").columns.tolist() == ["class", "fpr", "tpr"]
    assert (tmp_path / "png" / "roc.png").read_bytes()[:8] == PNG_MAGIC


# --------------------------------------------------------------------------- segmentation


def _segmenter() -> ModelBundle:
    """Predicts lesion exactly where the image is >= 0.5 (logit 20 x - 10)."""
    import keras

    inputs = keras.Input((8, 8, 1))
    conv = keras.layers.Conv2D(1, 1, name="mask_logits")
    model = keras.Model(inputs, conv(inputs))
    conv.set_weights([np.full((1, 1, 1, 1), 20.0, np.float32), np.array([-10.0], np.float32)])
    return ModelBundle(model, SPEC, ModelContract.from_config(LESION, "ultrasound"))


def test_segmenter_metrics(tmp_path: Path) -> None:
    masks = np.zeros((4, 8, 8, 1), np.float32)
    masks[0, 2:5, 2:5] = 1
    masks[1, 4:8, 0:3] = 1
    masks[3, 1:3, 1:3] = 1  # image 2 is normal (empty mask)
    images = masks.copy()
    images[3] = 0.0  # the lesion of image 3 is invisible: predicted empty
    test = SplitData(images=images, targets=masks, frame=pd.DataFrame({"image": ["a", "b", "c", "d"]}),
                     groups=np.array(["p1", "p1", "p2", "p3"]))
    ev = evaluate_segmenter(_segmenter(), test, headline="lesion_mean_dice", n_boot=200, seed=1)
    m = ev.metrics
    assert m["mean_dice"] == pytest.approx(0.75) and m["mean_iou"] == pytest.approx(0.75)
    assert m["lesion_mean_dice"] == pytest.approx(2 / 3) and m["n_lesion_images"] == 3
    assert m["headline"] == "lesion_mean_dice" and m["headline_value"] == pytest.approx(2 / 3)
    assert 0.0 <= m["headline_ci_low"] <= 2 / 3 <= m["headline_ci_high"] <= 1.0
    assert m["threshold"] == 0.5 and m["n_test"] == 4
    assert [r["dice"] for r in ev.plots["dice"]] == pytest.approx([1.0, 1.0, 1.0, 0.0])
    assert sum(r["count"] for r in ev.plots["dice_hist"]) == 4

    written = write_evaluation(ev, tmp_path)
    dice = pd.read_csv(tmp_path / "plots" / "dice.csv")
    assert dice.columns.tolist() == ["image", "dice", "iou", "lesion"] and len(dice) == 4
    assert written["dice_hist_png"].read_bytes()[:8] == PNG_MAGIC
    assert json.loads((tmp_path / "metrics.json").read_text())["mean_dice"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="not a classifier"):
        evaluate_classifier(_segmenter(), test, test, headline="accuracy", quadratic_kappa=False)


# --------------------------------------------------------------------------- 8 categories


def test_eight_category_math() -> None:
    density = np.array([[0.1, 0.2, 0.6, 0.1], [0.7, 0.1, 0.1, 0.1]])
    tumor = np.array([[0.2, 0.6, 0.2], [0.15, 0.05, 0.8]])
    first, second = eight_category(density, tumor, ("benign", "malignant", "normal"))

    assert first["category"] == "malignant-C" and first["finding"] == "malignant"
    assert first["p_malignant"] == pytest.approx(0.75) and first["p_normal"] == pytest.approx(0.2)
    assert first["probabilities"]["malignant-C"] == pytest.approx(0.6 * 0.75) == first["confidence"]
    assert first["probabilities"]["benign-A"] == pytest.approx(0.1 * 0.25)
    assert len(first["probabilities"]) == 8 and sum(first["probabilities"].values()) == pytest.approx(1.0)
    assert max(first["probabilities"], key=first["probabilities"].get) == first["category"]

    # Normal is the most likely finding, yet the category names the likelier lesion type.
    assert second["finding"] == "normal" and second["category"] == "benign-A"
    assert second["probabilities"]["benign-A"] == pytest.approx(0.7 * 0.75)

    binary = eight_category(np.array([[0.25] * 4]), np.array([[0.5, 0.5]]), ("benign", "malignant"))[0]
    assert binary["p_normal"] is None and binary["pathology"] == "malignant"  # ties: the cautious call
    assert binary["category"] == "malignant-A"

    with pytest.raises(ValueError, match="'benign' and 'malignant'"):
        eight_category(density, tumor, ("benign", "cancer", "normal"))
    with pytest.raises(ValueError, match="density_probs must be"):
        eight_category(density[:, :3], tumor, ("benign", "malignant", "normal"))
    with pytest.raises(ValueError, match="summing to 1"):
        eight_category(density * 2, tumor, ("benign", "malignant", "normal"))


def test_plot_history_renders(tmp_path: Path) -> None:
    csv = tmp_path / "history.csv"
    pd.DataFrame({"epoch": [1, 2, 3], "loss": [1.0, 0.7, 0.6], "val_loss": [1.1, 0.8, 0.9],
                  "accuracy": [0.4, 0.6, 0.7], "val_accuracy": [0.3, 0.5, 0.5]}).to_csv(csv, index=False)
    png = plot_history(csv, tmp_path / "png" / "curves.png")
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000


def test_bootstrap_kappa_equals_scikit_learn_on_resamples() -> None:
    from sklearn.metrics import cohen_kappa_score

    from breastscan.evaluation.scoring import _classification_metric

    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 60)
    probs = rng.dirichlet(np.ones(4), 60)
    probs[np.arange(60), y] += rng.uniform(0, 1, 60)  # agreement better than chance, not perfect
    kappa = _classification_metric("quadratic_kappa", y, probs)
    for _ in range(20):
        idx = rng.integers(0, 60, 60)
        expected = cohen_kappa_score(y[idx], probs[idx].argmax(1), weights="quadratic", labels=[0, 1, 2, 3])
        assert kappa(idx) == pytest.approx(expected, abs=1e-12)
    agreeing = int(np.flatnonzero(probs.argmax(1) == y)[0])
    assert np.isnan(kappa(np.full(5, agreeing)))  # one class, predicted alike: undefined
