"""breastscan.evaluation.scoring (score_bundle, score_predictions), reports, curves, combined and plots
on hand-built models with known outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, cohen_kappa_score, roc_auc_score

from breastscan.bundle import ModelBundle, ModelContract
from breastscan.config import GateConfig, ModelConfig
from breastscan.data.loading import SplitData
from breastscan.evaluation.combined import eight_category
from breastscan.evaluation.metrics import STANDARD, headlines
from breastscan.evaluation.plots import plot_history
from breastscan.evaluation.reports import write_evaluation
from breastscan.evaluation.scoring import Scoring, score_bundle, score_predictions
from breastscan.imaging.preprocessing import PreprocessSpec

SPEC = PreprocessSpec(height=8, width=8)
TUMOR = ModelConfig(name="tumor", task="classification", dataset="mammography", label="pathology",
                    classes=("benign", "malignant", "normal"), preprocess=SPEC)
LESION = ModelConfig(name="lesion", task="segmentation", dataset="ultrasound", label="mask", depth=2,
                     preprocess=SPEC, headline="mean_dice")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _scoring(headline: str, gated: tuple[str, ...] = ()) -> Scoring:
    return Scoring.declare("classification", TUMOR.class_names, headline, gated)


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
    groups = np.repeat(np.arange(15), 2).astype(str)
    test = _split(np.eye(3)[y], y, groups=groups)
    ev = score_bundle(_classifier(10.0), test, val=test, scoring=_scoring("macro_auc", ("quadratic_kappa",)),
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
    assert ev.predictions.columns.tolist() == ["image", "group", "true", "pred", "prob_benign",
                                               "prob_malignant", "prob_normal"]
    assert ev.predictions["group"].tolist() == groups.tolist()  # the bootstrap's resampling unit
    assert [(r["actual"], r["predicted"]) for r in ev.plots["confusion"]] == \
        [(TUMOR.class_names[c],) * 2 for c in y]


def test_classifier_metrics_match_sklearn_for_every_headline() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    scores = np.clip(np.eye(3)[y] * 0.5 + rng.random((60, 3)) * 0.6, 0, 1)
    test, val = _split(scores, y), _overconfident(60, seed=1)
    bundle = _classifier(4.0)
    ev = score_bundle(bundle, test, val=val, scoring=_scoring("accuracy", ("quadratic_kappa",)), n_boot=0)
    m = ev.metrics
    probs = ev.predictions[[f"prob_{c}" for c in TUMOR.class_names]].to_numpy()
    pred = probs.argmax(axis=1)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["macro_auc"] == pytest.approx(np.mean([roc_auc_score(y == c, probs[:, c]) for c in range(3)]))
    assert m["quadratic_kappa"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))
    # Test metrics use the probabilities calibrated with the temperature fitted on val.
    expected = bundle.with_temperature(ev.temperature).predict(test.images)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert m["temperature"] == ev.temperature and ev.temperature != 1.0
    assert m["headline_ci_low"] is None  # n_boot=0: no interval
    for name in headlines("classification", 3):
        ev = score_bundle(bundle, test, val=val, scoring=_scoring(name), n_boot=50)
        assert ev.metrics["headline"] == name
        assert ev.metrics["headline_value"] == pytest.approx(ev.metrics[name], abs=1e-9), name
        assert ev.metrics["headline_ci_low"] <= ev.metrics["headline_ci_high"]
        assert (ev.metrics["headline_ci_low"], ev.metrics["headline_ci_high"]) == \
            (ev.scores[name]["ci_low"], ev.scores[name]["ci_high"])
        # only the headline gets an interval unless all are asked for
        assert all(s["ci_low"] is None for n, s in ev.scores.items() if n != name), name
    assert "auc" not in headlines("classification", 3)  # binary models only
    with pytest.raises(ValueError, match="'f1' is not a metric"):
        _scoring("f1")
    with pytest.raises(ValueError, match="'auc' is not a metric of a classification model with 3"):
        _scoring("auc")


def test_declaration_decides_what_is_reported() -> None:
    y = np.array([0, 1, 2] * 8)
    test = _split(np.clip(np.eye(3)[y] * 0.4 + 0.3, 0, 1), y)
    bundle = _classifier(4.0)
    plain = score_bundle(bundle, test, n_boot=0)  # the bundle's own declaration (headline accuracy)
    assert plain.metrics["headline"] == TUMOR.headline == "accuracy"
    assert set(plain.scores) == set(STANDARD["classification"]) and "quadratic_kappa" not in plain.metrics
    # kappa is reported when the declaration headlines or gates it
    gated = ModelConfig(name="density", task="classification", dataset="mammography", label="pathology",
                        classes=TUMOR.classes, preprocess=SPEC, headline="macro_auc",
                        gates=GateConfig(floors={"quadratic_kappa": 0.1}))
    ev = score_bundle(bundle, test, scoring=Scoring.from_config(gated), n_boot=0)
    assert list(ev.scores) == [*STANDARD["classification"], "quadratic_kappa"]
    assert ev.metrics["quadratic_kappa"] == pytest.approx(
        cohen_kappa_score(y, ev.predictions[[f"prob_{c}" for c in TUMOR.class_names]].to_numpy().argmax(1),
                          weights="quadratic"))
    contract = ModelContract.from_config(gated, "mammography")
    assert Scoring.from_contract(contract) == Scoring.from_config(gated)
    # a headline given for the contract is checked, and the model's own one is still reported
    other = Scoring.from_contract(contract, "balanced_accuracy")
    assert other.headline == "balanced_accuracy" and {"macro_auc", "quadratic_kappa"} <= set(other.metrics)
    with pytest.raises(ValueError, match="not a metric"):
        Scoring.from_contract(contract, "mean_dice")
    # every declared metric gets an interval when asked
    full = score_bundle(bundle, test, scoring=Scoring.from_config(gated), n_boot=50, all_intervals=True)
    for name, s in full.scores.items():
        assert s["ci_low"] is not None and s["ci_low"] <= s["value"] <= s["ci_high"], name


def test_stored_temperature_is_kept_without_validation_rows() -> None:
    test = _overconfident(60, seed=2)
    bundle = _classifier(8.0).with_temperature(2.5)
    ev = score_bundle(bundle, test, val=None, scoring=_scoring("accuracy"), n_boot=0)
    assert ev.temperature == ev.metrics["temperature"] == 2.5 and ev.metrics["n_val"] == 0
    probs = ev.predictions[[f"prob_{c}" for c in TUMOR.class_names]].to_numpy()
    np.testing.assert_allclose(probs, bundle.predict(test.images), atol=1e-5)
    # the ECE at T = 1 is that of the uncalibrated probabilities
    from breastscan.evaluation.calibration import expected_calibration_error

    raw = bundle.with_temperature(1.0).predict(test.images).astype(np.float64)
    raw /= raw.sum(axis=1, keepdims=True)
    assert ev.metrics["ece_before"] == pytest.approx(expected_calibration_error(raw, test.targets), abs=1e-6)
    refit = score_bundle(bundle, test, val=_overconfident(60, seed=1), scoring=_scoring("accuracy"), n_boot=0)
    assert refit.temperature != 2.5 and refit.metrics["n_val"] == 60


def _malignant_task(n: int, seed: int) -> SplitData:
    """Noisy scores: malignant images score high on malignant more often than not."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    return _split(np.clip(np.eye(3)[y] * 0.3 + rng.random((n, 3)) * 0.7, 0, 1), y)


def test_a_declared_rule_is_fitted_on_validation_and_every_test_number_follows_it(tmp_path: Path) -> None:
    from breastscan.decision import DecisionRule, fit_cutoff
    from breastscan.registry.runs import calibrated

    declared = DecisionRule("positive_ratio", positive="malignant", versus="benign", target_sensitivity=0.9)
    bundle = _classifier(4.0).with_decision(declared)
    test, val = _malignant_task(150, seed=1), _malignant_task(150, seed=2)
    scoring = _scoring("macro_auc", ("per_class.malignant.sensitivity",))
    ev = score_bundle(bundle, test, val=val, scoring=scoring, n_boot=0)
    rule, names = ev.decision, TUMOR.class_names
    assert rule is not None and ev.metrics["decision"] == pytest.approx(rule.to_dict())
    # the cutoff: fitted on the validation split's calibrated probabilities (the served temperature)
    val_probs = bundle.with_temperature(ev.temperature).predict(val.images).astype(np.float64)
    val_probs /= val_probs.sum(axis=1, keepdims=True)
    malignant_val = np.asarray(val.targets) == 1
    pair = declared.in_pair(val_probs, names)  # a malignant row called normal: a miss no cutoff undoes
    scores = np.where(pair, declared.ratio(val_probs, names), -np.inf)
    assert rule.cutoff == pytest.approx(max(0.0, fit_cutoff(scores, malignant_val, 0.9)))
    assert rule.val_sensitivity >= min(0.9, pair[malignant_val].mean())
    assert rule.fitted_on == "validation split"
    # every test number is at the rule: predictions, metrics, per-class statistics, confusion plot
    probs = ev.predictions[[f"prob_{c}" for c in names]].to_numpy()
    called = rule.decide(probs, names)
    assert (called != probs.argmax(axis=1)).any()
    assert ev.predictions["pred"].tolist() == [names[k] for k in called]
    y = np.asarray(test.targets)
    assert ev.metrics["accuracy"] == pytest.approx(accuracy_score(y, called))
    m = ev.metrics["per_class"]["malignant"]
    assert m["sensitivity"] == pytest.approx(np.mean(called[y == 1] == 1))
    assert m["specificity"] == pytest.approx(np.mean(called[y != 1] != 1))
    assert [r["predicted"] for r in ev.plots["confusion"]] == [names[k] for k in called]
    # re-scoring the written rows keeps the rule's decisions (a benchmark pools several folds' rows)
    write_evaluation(ev, tmp_path)
    saved = pd.read_csv(tmp_path / "predictions.csv", dtype={"group": str, "true": str})
    rescored = score_predictions(saved, scoring, n_boot=0)
    assert rescored["accuracy"]["value"] == pytest.approx(ev.metrics["accuracy"])
    # the served bundle carries the fitted rule; scored again without validation rows, it is kept
    served = calibrated(bundle, ev.metrics)
    again = score_bundle(served, test, val=None, scoring=scoring, n_boot=0)
    assert again.decision == rule and again.predictions["pred"].tolist() == ev.predictions["pred"].tolist()
    with pytest.raises(ValueError, match="needs a cutoff"):
        score_bundle(bundle, test, val=None, scoring=scoring, n_boot=0)
    # an arg-max model's report has no decision key (its metrics are as they were)
    assert "decision" not in score_bundle(_classifier(4.0), test, val=val, scoring=scoring, n_boot=0).metrics


def test_temperature_lowers_ece_of_an_overconfident_model() -> None:
    ev = score_bundle(_classifier(8.0), _overconfident(300, seed=2), val=_overconfident(300, seed=1),
                      scoring=_scoring("accuracy"), n_boot=100)
    m = ev.metrics
    assert m["temperature"] > 1.5
    assert m["ece_before"] > 0.2
    assert m["ece_after"] < 0.1 and m["ece_after"] < m["ece_before"] / 3
    stages = {r["stage"] for r in ev.plots["calibration"]}
    assert stages == {"before", "after"}
    assert m["headline_ci_low"] < m["accuracy"] < m["headline_ci_high"]


def test_prediction_rows_alone_give_the_same_scores(tmp_path: Path) -> None:
    """The evaluate stage and a re-score of ``predictions.csv`` (benchmark, promotion) agree."""
    y = np.repeat([0, 1, 2], 20)
    rng = np.random.default_rng(4)
    scores = np.clip(np.eye(3)[y] * 0.4 + rng.random((60, 3)) * 0.6, 0, 1)
    groups = np.repeat(np.arange(20), 3).astype(str)
    scoring = _scoring("macro_auc", ("quadratic_kappa",))
    ev = score_bundle(_classifier(4.0), _split(scores, y, groups), val=_overconfident(60, seed=1),
                      scoring=scoring, n_boot=100, seed=3, all_intervals=True)
    assert score_predictions(ev.predictions, scoring, n_boot=100, seed=3) == ev.scores
    write_evaluation(ev, tmp_path)
    saved = pd.read_csv(tmp_path / "predictions.csv", dtype={"group": str, "true": str})
    again = score_predictions(saved, scoring, n_boot=100, seed=3)
    assert list(again) == list(ev.scores)
    for name, s in again.items():
        assert s == pytest.approx(ev.scores[name], abs=1e-4), name
    # the group column is the resampling unit: without it every image is its own group
    ungrouped = score_predictions(ev.predictions.drop(columns="group"), scoring, n_boot=100, seed=3)
    assert ungrouped["macro_auc"]["value"] == ev.scores["macro_auc"]["value"]
    assert ungrouped["macro_auc"]["ci_low"] != ev.scores["macro_auc"]["ci_low"]
    with pytest.raises(ValueError, match="not among"):
        score_predictions(ev.predictions.assign(true="cyst"), scoring, n_boot=0)


def test_write_classification_evaluation(tmp_path: Path) -> None:
    ev = score_bundle(_classifier(8.0), _overconfident(60, seed=2), val=_overconfident(90, seed=1),
                      scoring=_scoring("macro_auc"), n_boot=50)
    written = write_evaluation(ev, tmp_path / "tumor")
    for path in written.values():
        assert path.is_file() and path.stat().st_size > 0, path
    for name in ("roc", "pr", "confusion", "calibration"):
        assert (tmp_path / "tumor" / "png" / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    metrics = json.loads((tmp_path / "tumor" / "metrics.json").read_text())
    assert metrics["headline"] == "macro_auc" and set(metrics["per_class"]) == set(TUMOR.class_names)
    assert metrics == ev.metrics
    plots = tmp_path / "tumor" / "plots"
    roc = pd.read_csv(plots / "roc.csv")
    assert roc.columns.tolist() == ["class", "fpr", "tpr"] and set(roc["class"]) == set(TUMOR.class_names)
    assert pd.read_csv(plots / "pr.csv").columns.tolist() == ["class", "recall", "precision"]
    confusion = pd.read_csv(plots / "confusion.csv")
    assert confusion.columns.tolist() == ["actual", "predicted"] and len(confusion) == 60
    calibration = pd.read_csv(plots / "calibration.csv")
    assert {"stage", "bin", "confidence", "accuracy"} <= set(calibration.columns)
    predictions = pd.read_csv(tmp_path / "tumor" / "predictions.csv")
    assert len(predictions) == 60 and "group" in predictions.columns


def test_degenerate_test_split_still_writes(tmp_path: Path) -> None:
    y = np.zeros(6, int)  # one class only: AUC undefined
    ev = score_bundle(_classifier(5.0), _split(np.eye(3)[y], y), val=_overconfident(30, seed=1),
                      scoring=_scoring("macro_auc", ("quadratic_kappa",)), n_boot=20)
    assert ev.metrics["macro_auc"] is None and ev.metrics["headline_value"] is None
    assert ev.scores["macro_auc"] == {"value": None, "ci_low": None, "ci_high": None}
    assert ev.plots["roc"] == []
    write_evaluation(ev, tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["headline_ci_low"] is None
    assert pd.read_csv(tmp_path / "plots" / "roc.csv").columns.tolist() == ["class", "fpr", "tpr"]
    assert (tmp_path / "png" / "roc.png").read_bytes()[:8] == PNG_MAGIC
    empty = SplitData(images=np.zeros((0, 8, 8, 1), np.float32), targets=np.zeros(0, np.int64),
                      frame=pd.DataFrame({"image": []}), groups=np.array([], str))
    with pytest.raises(ValueError, match="no rows to score"):
        score_bundle(_classifier(5.0), empty, scoring=_scoring("accuracy"))


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
    scoring = Scoring.declare("segmentation", ("lesion",), "lesion_mean_dice")
    ev = score_bundle(_segmenter(), test, scoring=scoring, n_boot=200, seed=1)
    m = ev.metrics
    assert m["mean_dice"] == pytest.approx(0.75) and m["mean_iou"] == pytest.approx(0.75)
    assert m["lesion_mean_dice"] == pytest.approx(2 / 3) and m["n_lesion_images"] == 3
    assert m["lesion_mean_iou"] == pytest.approx(2 / 3)
    assert m["headline"] == "lesion_mean_dice" and m["headline_value"] == pytest.approx(2 / 3)
    assert 0.0 <= m["headline_ci_low"] <= 2 / 3 <= m["headline_ci_high"] <= 1.0
    assert m["threshold"] == 0.5 and m["n_test"] == 4
    assert ev.temperature is None and ev.class_names == ("lesion",)
    assert [r["dice"] for r in ev.plots["dice"]] == pytest.approx([1.0, 1.0, 1.0, 0.0])
    assert sum(r["count"] for r in ev.plots["dice_hist"]) == 4
    pred = ev.predictions
    assert pred.columns.tolist() == ["image", "group", "lesion", "dice", "iou", "true_pixels", "pred_pixels"]
    assert pred["group"].tolist() == ["p1", "p1", "p2", "p3"] and pred["lesion"].tolist() == [1, 1, 0, 1]
    assert pred["true_pixels"].tolist() == [9, 12, 0, 4] and pred["pred_pixels"].tolist() == [9, 12, 0, 0]
    # the bundle's own declaration (headline mean_dice) scores the same rows the same way
    own = score_bundle(_segmenter(), test, n_boot=0)
    assert own.metrics["headline"] == "mean_dice" and own.metrics["mean_dice"] == m["mean_dice"]

    written = write_evaluation(ev, tmp_path)
    dice = pd.read_csv(tmp_path / "plots" / "dice.csv")
    assert dice.columns.tolist() == ["image", "dice", "iou", "lesion"] and len(dice) == 4
    assert written["dice_hist_png"].read_bytes()[:8] == PNG_MAGIC
    assert json.loads((tmp_path / "metrics.json").read_text())["mean_dice"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="is a segmentation model, not classification"):
        score_bundle(_segmenter(), test, val=test, scoring=_scoring("accuracy"))


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

    # the tumor model's decision rule: its cutoff calls the pathology, its call is the finding
    from breastscan.decision import DecisionRule

    rule = DecisionRule("positive_ratio", positive="malignant", versus="benign", cutoff=0.2)
    cautious = eight_category(density, tumor, ("benign", "malignant", "normal"), tumor_rule=rule)
    assert cautious[0] == first  # p(m | lesion) = 0.75: the same call
    assert cautious[1]["pathology"] == "malignant" and cautious[1]["category"] == "malignant-A"  # 0.25 >= 0.2
    assert cautious[1]["finding"] == "normal"  # the rule's call: normal outweighs benign + malignant
    assert cautious[1]["p_malignant"] == second["p_malignant"]
    assert cautious[1]["confidence"] == pytest.approx(0.7 * 0.25)

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



@pytest.mark.parametrize(("nll", "ece", "kept"), [
    ((0.80, 0.70), (0.10, 0.05), True),    # both better: served calibrated
    ((0.80, 0.70), (0.10, 0.12), False),   # NLL better but ECE worse: served at T = 1
    ((0.80, 0.80), (0.10, 0.05), False),   # NLL not lower: nothing gained
    ((0.80, 0.70), (0.10, 0.10), True),    # ECE unchanged, NLL lower
])
def test_calibration_is_kept_only_when_it_helps_on_validation(nll: tuple[float, float],
                                                              ece: tuple[float, float], kept: bool) -> None:
    from breastscan.evaluation.scoring import calibration_helps

    record = {"val_nll_before": nll[0], "val_nll_after": nll[1],
              "val_ece_before": ece[0], "val_ece_after": ece[1]}
    assert calibration_helps(record) is kept
