"""The multi-task model: one encoder, a mask decoder and a class head, trained jointly."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from breastscan.config import AugmentConfig, GateConfig, ModelConfig, metric_names, task_view
from breastscan.data.loading import SplitData
from breastscan.imaging.preprocessing import PreprocessSpec

SPEC = PreprocessSpec(height=32, width=32)
MT = ModelConfig(name="us_mt", task="multitask", dataset="us", label="pathology",
                 classes=("benign", "malignant", "normal"), preprocess=SPEC, base_filters=4, depth=2,
                 epochs=2, batch_size=8, patience=0, dropout=0.2, normalize="per_image",
                 augment=AugmentConfig(flip=True, rotation_deg=0, brightness=0, contrast=0),
                 headline="macro_auc", gates=GateConfig(floors={"macro_auc": 0.6, "lesion_mean_dice": 0.5,
                                                                 "per_class.malignant.sensitivity": 0.5}))


def _lesions(n: int, seed: int = 0) -> SplitData:
    """A bright square lesion (benign: small, malignant: large) or none (normal), its mask."""
    rng = np.random.default_rng(seed)
    targets = np.arange(n) % 3
    images = rng.random((n, 32, 32, 1)).astype(np.float32) * 0.3
    masks = np.zeros_like(images)
    for i, t in enumerate(targets):
        if t == 2:
            continue
        side = 6 if t == 0 else 12
        y, x = rng.integers(2, 32 - side - 2, size=2)
        masks[i, y:y + side, x:x + side] = 1.0
        images[i, y:y + side, x:x + side] += 0.6
    return SplitData(images=np.clip(images, 0, 1), targets=targets.astype(np.int64),
                     frame=pd.DataFrame({"image": [f"i{i}.png" for i in range(n)]}),
                     groups=np.array([f"g{i}" for i in range(n)]), masks=masks)


def test_one_forward_pass_gives_classes_and_mask(tmp_path: Path) -> None:
    """Both outputs from one call; the saved model reloads; each output alone keeps the weights."""
    import keras

    from breastscan.models.multitask import build_multitask, is_multitask, output_model

    model = build_multitask(n_classes=3, input_shape=(32, 32, 1), base_filters=4, depth=2)
    batch = np.random.default_rng(0).random((2, 32, 32, 1), dtype=np.float32)
    out = model(batch, training=False)
    assert tuple(out["logits"].shape) == (2, 3) and tuple(out["mask_logits"].shape) == (2, 32, 32, 1)
    assert is_multitask(model)
    model.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(np.asarray(again(batch, training=False)["logits"]), np.asarray(out["logits"]),
                               rtol=1e-5, atol=1e-5)
    head = output_model(again, "logits")
    np.testing.assert_allclose(np.asarray(head(batch, training=False)), np.asarray(out["logits"]),
                               rtol=1e-5, atol=1e-5)
    assert not is_multitask(head)
    with pytest.raises(ValueError, match="n_classes"):
        build_multitask(n_classes=1, input_shape=(32, 32, 1))
    with pytest.raises(ValueError, match="divisible"):
        build_multitask(n_classes=2, input_shape=(30, 30, 1), depth=2)


def test_lesion_pool_reads_the_outlined_region() -> None:
    """Where the mask is sure, the pooled features are the region's mean; with no lesion, the plain mean."""
    from breastscan.models.layers import LesionPool

    features = np.zeros((1, 8, 8, 2), np.float32)
    features[0, :4, :4, 0] = 1.0  # channel 0 lit in the top-left quarter
    features[0, :, :, 1] = 0.5
    logits = np.full((1, 16, 16, 1), -30.0, np.float32)
    logits[0, :8, :8] = 30.0  # the same quarter at twice the resolution
    pooled = np.asarray(LesionPool(floor=0.0)([features, logits]))
    np.testing.assert_allclose(pooled, [[1.0, 0.5]], atol=1e-5)
    nothing = np.asarray(LesionPool()([features, np.full((1, 16, 16, 1), -30.0, np.float32)]))
    np.testing.assert_allclose(nothing, [[0.25, 0.5]], atol=1e-4)


def test_joint_training_learns_both_outputs_and_the_bundle_has_two_views() -> None:
    """train_model: class weights reach the class output; each view scores like a plain model."""
    from breastscan.training.loop import train_model

    train, val = _lesions(48), _lesions(24, seed=1)
    cfg = replace(MT, epochs=6, learning_rate=0.01, imbalance="class_weight")
    result = train_model(cfg, train, val, modality="ultrasound")
    history = result.history
    assert {"logits_loss", "mask_logits_loss", "val_mask_logits_dice", "val_logits_accuracy"} <= set(history)
    assert history["mask_logits_loss"][-1] < history["mask_logits_loss"][0]
    bundle = result.bundle
    assert bundle.contract.task == "multitask"
    with pytest.raises(ValueError, match="two outputs"):
        bundle.logits(val.images)
    classifier, segmenter = bundle.view("classification"), bundle.view("segmentation")
    probs = classifier.predict(val.images)
    assert probs.shape == (24, 3) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    masks = segmenter.predict(val.images)
    assert masks.shape == (24, 32, 32, 1) and 0.0 <= masks.min() and masks.max() <= 1.0
    assert classifier.contract.task == "classification" and classifier.contract.classes == cfg.classes
    assert segmenter.contract.task == "segmentation" and segmenter.contract.class_names == ("lesion",)
    assert segmenter.contract.headline == "lesion_mean_dice"


def test_a_multitask_declaration_is_checked_and_viewed() -> None:
    """Metrics of both outputs; no roi or balanced sampling; each view keeps its own gates."""
    assert {"macro_auc", "lesion_mean_dice"} <= set(metric_names("multitask", 3))
    with pytest.raises(ValueError, match="balanced_sampling|class_weight"):
        replace(MT, imbalance="balanced_sampling")
    with pytest.raises(ValueError, match="class_loss_weight"):
        replace(MT, class_loss_weight=0.0)
    classifier, segmenter = task_view(MT, "classification"), task_view(MT, "segmentation")
    assert classifier.task == "classification" and classifier.headline == "macro_auc"
    assert set(classifier.gates.floors) == {"macro_auc", "per_class.malignant.sensitivity"}
    assert segmenter.task == "segmentation" and segmenter.label == "mask"
    assert set(segmenter.gates.floors) == {"lesion_mean_dice"} and segmenter.headline == "lesion_mean_dice"


def test_the_scoring_core_reports_both_outputs_and_rescores_from_its_rows() -> None:
    """score_bundle of a multi-task bundle: one report of both kinds, reproduced from its prediction rows."""
    from breastscan.evaluation.scoring import Scoring, score_bundle, score_predictions, summary_metrics
    from breastscan.training.loop import train_model

    train, val, test = _lesions(36), _lesions(18, seed=1), _lesions(21, seed=2)
    bundle = train_model(replace(MT, epochs=2), train, val, modality="ultrasound").bundle
    scoring = Scoring.from_config(MT)
    masks = ("mean_dice", "mean_iou", "lesion_mean_dice", "lesion_mean_iou")
    assert scoring.view("segmentation").metrics == masks
    assert "macro_auc" in scoring.view("classification").metrics
    evaluation = score_bundle(bundle, test, val=val, scoring=scoring, n_boot=0)
    assert evaluation.task == "multitask" and evaluation.temperature is not None
    m = evaluation.metrics
    assert m["n_test"] == 21 and m["n_lesion_images"] == 14 and "per_class" in m and "lesion_mean_dice" in m
    again = score_predictions(evaluation.predictions, scoring, n_boot=0)
    assert list(again) == list(scoring.metrics)
    for name, score in again.items():
        assert score["value"] == pytest.approx(m[name], nan_ok=True), name
    assert summary_metrics(again, scoring, evaluation.predictions)["headline"] == "macro_auc"
    with pytest.raises(ValueError, match="masks"):
        score_bundle(bundle, replace(test, masks=None), scoring=scoring, n_boot=0)
