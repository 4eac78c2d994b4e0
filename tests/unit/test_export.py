"""ONNX export of every model kind, its check against Keras, and a bundle run by its export.

Tiny seeded untrained models at 32x32 (the lesion-aware classifier's U-Net at 16x16, so its
area resize is exported too), fed ultrasound phantoms through the bundle's own preprocessing.
Each model is exported once per module (about a second each).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

from breastscan.bundle import ModelBundle, ModelContract, inference_function
from breastscan.config import ModelConfig, RoiConfig
from breastscan.decision import DecisionRule
from breastscan.evaluation.export import (
    MAX_PROB_DIFF,
    ExportError,
    _compare_classes,
    _failed_criterion,
    area_weights,
    check_equivalence,
    export_and_check,
    export_onnx,
)
from breastscan.exported import EXPORT_FILE, ExportInfo, OnnxModel, choose_runtime, write_export
from breastscan.imaging.preprocessing import PreprocessSpec
from breastscan.models import build_classifier, build_unet
from breastscan.models.multitask import build_multitask
from breastscan.models.roi import build_roi_classifier
from breastscan.registry.modelcard import render_model_card, version_summary
from breastscan.registry.versions import export_tags
from tests.services.images import ultrasound

SPEC = PreprocessSpec(height=32, width=32)
CLASSES = ("benign", "malignant", "normal")
KINDS = ("classifier", "unet", "roi", "multitask")
OUTPUTS = {"classifier": ("logits",), "unet": ("mask_logits",), "roi": ("logits",),
           "multitask": ("logits", "mask_logits")}
TUMOR = ModelConfig(name="tumor", task="classification", dataset="ultrasound", label="pathology",
                    classes=CLASSES, base_filters=4, dropout=0.0, preprocess=SPEC,
                    roi=RoiConfig(seg_size=(16, 16), seg_filters=4, seg_depth=2, crop_size=(16, 16)))


def _contract(name: str, task: str, **changes: Any) -> ModelContract:
    classes = () if task == "segmentation" else CLASSES
    label = "mask" if task == "segmentation" else "pathology"
    contract = ModelContract(name=name, task=task, label=label, classes=classes,
                             class_names=classes or ("lesion",), input_shape=(32, 32, 1),
                             dataset="ultrasound", modality="ultrasound", spec_id=SPEC.spec_id)
    return replace(contract, **changes)


def _bundle(kind: str, seed: int = 0) -> ModelBundle:
    """A seeded untrained bundle of one model kind (calibrated, some with test-time flips)."""
    keras.utils.set_random_seed(seed)
    if kind == "classifier":
        model = build_classifier(n_classes=3, input_shape=(32, 32, 1), base_filters=4, dropout=0.0)
        contract = _contract("density", "classification", temperature=1.3)
    elif kind == "unet":
        model = build_unet(input_shape=(32, 32, 1), base_filters=4, depth=2, dropout=0.0)
        contract = _contract("lesion", "segmentation", tta="flip", threshold=0.6)
    elif kind == "roi":
        segmenter = build_unet(input_shape=(16, 16, 1), base_filters=4, depth=2, dropout=0.0)
        model = build_roi_classifier(segmenter, TUMOR)
        contract = replace(ModelContract.from_config(TUMOR, "ultrasound"), tta="flip")
    else:
        model = build_multitask(n_classes=3, input_shape=(32, 32, 1), base_filters=4, depth=2, dropout=0.0)
        rule = DecisionRule(rule="positive_ratio", positive="malignant", versus="benign", cutoff=0.5)
        contract = _contract("us_mt", "multitask", temperature=0.8, tta="flip", decision=rule.to_dict())
    return ModelBundle(model=model, spec=SPEC, contract=contract)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """``(40, 32, 32, 1)`` ultrasound phantoms, preprocessed as the models' own spec does."""
    batch, _ = _bundle("classifier").prepare([ultrasound(seed) for seed in range(300, 340)])
    return batch


@pytest.fixture(scope="module")
def exported(images: np.ndarray) -> dict[str, tuple[ModelBundle, bytes, ExportInfo]]:
    """Every kind's bundle, export and check, made once."""
    out = {}
    for kind in KINDS:
        bundle = _bundle(kind)
        graph, info = export_and_check(bundle, images)
        assert graph is not None, info.equivalence
        out[kind] = (bundle, graph, info)
    return out


def _served(bundle: ModelBundle, batch: np.ndarray) -> dict[str, np.ndarray]:
    out = bundle.predict(batch)
    return out if isinstance(out, dict) else {"out": out}


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("kind", KINDS)
def test_every_model_kind_exports_with_named_outputs_and_keras_logits(
        kind: str, exported: dict[str, tuple[ModelBundle, bytes, ExportInfo]], images: np.ndarray) -> None:
    bundle, graph, info = exported[kind]
    model = OnnxModel(graph)
    assert sorted(model.output_names) == sorted(OUTPUTS[kind]) and info.outputs == OUTPUTS[kind]
    assert model.input_name and info.tta == bundle.contract.tta and info.converter.startswith("tf2onnx ")
    keras_out = inference_function(bundle.model, (32, 32, 1), bundle.contract.tta)(images)
    onnx_out = model(images)
    if kind == "multitask":
        for name in OUTPUTS[kind]:
            np.testing.assert_allclose(onnx_out[name], np.asarray(keras_out[name]), atol=1e-4)
    else:
        assert onnx_out.shape == tuple(keras_out.shape)
        np.testing.assert_allclose(onnx_out, np.asarray(keras_out), atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_the_export_passes_its_check(kind: str,
                                     exported: dict[str, tuple[ModelBundle, bytes, ExportInfo]]) -> None:
    _, _, info = exported[kind]
    check = info.equivalence
    assert info.passed and check["passed"] and check["reason"] == "", check
    assert check["images"] == 40
    if kind != "unet":
        assert check["max_prob_diff"] <= MAX_PROB_DIFF and check["decision_agreement"] == 1.0
    if kind in ("unet", "multitask"):
        assert check["mask_dice_min"] >= 0.999 and check["max_mask_prob_diff"] <= MAX_PROB_DIFF
    for runtime in ("keras_ms", "onnx_ms"):
        assert set(check[runtime]) == {"batch_1", "batch_32"} and min(check[runtime].values()) > 0
    json.dumps(info.to_dict())  # export.json is plain JSON


def test_area_resize_is_exported_exactly() -> None:
    """tf2onnx's own conversion of an area resize is a nearest-neighbour one; the export's is TF's."""
    x = np.random.default_rng(0).random((2, 50, 37, 1)).astype(np.float32)
    ours = np.einsum("nhwc,yh,xw->nyxc", x, area_weights(50, 32), area_weights(37, 16))
    np.testing.assert_allclose(ours, tf.image.resize(x, (32, 16), method="area").numpy(), atol=1e-5)


def test_captured_constants_are_frozen_into_the_graph(images: np.ndarray) -> None:
    """A Normalization layer's mean and variance (as in EfficientNet) are captured by the traced
    function; tf2onnx alone leaves them as graph inputs the service could not feed."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 1))
    normalized = keras.layers.Normalization(mean=0.3, variance=0.04, name="norm")(inputs)
    logits = keras.layers.Dense(3, name="logits")(keras.layers.Flatten()(normalized))
    bundle = ModelBundle(model=keras.Model(inputs, logits), spec=SPEC,
                         contract=_contract("norm", "classification"))
    graph = export_onnx(bundle)
    assert [i.name for i in OnnxModel(graph).session.get_inputs()] == ["x"]
    assert check_equivalence(bundle, graph, images[:8]).passed


def test_a_layer_that_cannot_convert_is_named() -> None:
    class Doubler(keras.layers.Layer):
        def call(self, x: Any) -> Any:
            y = tf.numpy_function(lambda a: a * 2, [x], tf.float32)
            y.set_shape(x.shape)
            return y

    inputs = keras.Input((32, 32, 1))
    logits = keras.layers.Dense(3, name="logits")(keras.layers.Flatten()(Doubler(name="doubler")(inputs)))
    bundle = ModelBundle(model=keras.Model(inputs, logits), spec=SPEC,
                         contract=_contract("odd", "classification"))
    with pytest.raises(ExportError, match=r"layer 'doubler' \(Doubler\).*PyFunc"):
        export_onnx(bundle)
    graph, info = export_and_check(bundle, np.zeros((2, 32, 32, 1), np.float32))
    assert graph is None and not info.passed and "doubler" in info.equivalence["error"]


# --------------------------------------------------------------------------- the check


def test_a_graph_of_other_weights_fails_the_check(
        exported: dict[str, tuple[ModelBundle, bytes, ExportInfo]], images: np.ndarray) -> None:
    _, graph, _ = exported["classifier"]
    check = check_equivalence(_bundle("classifier", seed=1), graph, images)
    assert not check.passed and check.reason.startswith("class probabilities differ")
    assert check.max_prob_diff is not None and check.max_prob_diff > MAX_PROB_DIFF


def test_a_graph_of_another_model_kind_fails_the_check(
        exported: dict[str, tuple[ModelBundle, bytes, ExportInfo]], images: np.ndarray) -> None:
    bundle, _, _ = exported["classifier"]
    check = check_equivalence(bundle, exported["unet"][1], images)
    assert not check.passed and check.reason == "the export answers probabilities (32, 32, 1), the model " \
                                                "probabilities (3,)"


def test_a_disagreement_at_a_tie_is_explained_and_tolerated(
        exported: dict[str, tuple[ModelBundle, bytes, ExportInfo]]) -> None:
    """1 of 1000 images called differently, its top two 6e-5 apart: a tie, the check passes."""
    bundle = exported["classifier"][0]
    keras_p = np.tile([0.6, 0.3, 0.1], (1000, 1))
    onnx_p = keras_p.copy()
    keras_p[7], onnx_p[7] = [0.40003, 0.39997, 0.2], [0.39997, 0.40003, 0.2]
    numbers = _compare_classes(bundle, keras_p, onnx_p)
    assert numbers["decision_agreement"] == 0.999 and _failed_criterion(numbers) == ""
    (one,) = numbers["disagreements"]
    assert one["index"] == 7 and one["tie"] and one["why"].startswith("near tie")
    assert (one["keras"], one["onnx"]) == ("benign", "malignant")
    onnx_p[9] = [0.59995, 0.30005, 0.1]  # far from a tie, probabilities within tolerance: no disagreement
    onnx_p[11] = [0.3, 0.6, 0.1]  # a changed call
    failed = _failed_criterion(_compare_classes(bundle, keras_p, onnx_p))
    assert failed.startswith("class probabilities differ")


# --------------------------------------------------------------------------- a bundle run by its export


@pytest.mark.parametrize("kind", ["classifier", "multitask"])
def test_a_bundle_loaded_with_its_export_answers_as_keras(
        kind: str, exported: dict[str, tuple[ModelBundle, bytes, ExportInfo]], images: np.ndarray,
        tmp_path: Path) -> None:
    bundle, graph, info = exported[kind]
    write_export(bundle.save(tmp_path / kind), graph, info)
    assert choose_runtime(tmp_path / kind) == "onnx"
    served = ModelBundle.load(tmp_path / kind, runtime="onnx")
    assert served.runtime == "onnx" and ModelBundle.load(tmp_path / kind, runtime="auto").runtime == "onnx"
    ours, theirs = _served(served, images), _served(bundle, images)
    for key, value in theirs.items():
        np.testing.assert_allclose(ours[key], value, atol=MAX_PROB_DIFF)
    probs = "probabilities" if kind == "multitask" else "out"
    classes = bundle.contract.view("classification")
    np.testing.assert_array_equal(classes.rule.decide(ours[probs], classes.class_names),
                                  classes.rule.decide(theirs[probs], classes.class_names))


def test_auto_runs_keras_when_the_export_failed_its_check(
        exported: dict[str, tuple[ModelBundle, bytes, ExportInfo]], tmp_path: Path) -> None:
    bundle, graph, info = exported["classifier"]
    write_export(bundle.save(tmp_path), graph, replace(info, passed=False))
    assert json.loads((tmp_path / EXPORT_FILE).read_text())["passed"] is False
    assert choose_runtime(tmp_path, "auto") == "keras"
    assert ModelBundle.load(tmp_path, runtime="auto").runtime == "keras"
    with pytest.raises(ValueError, match="no checked ONNX export"):
        ModelBundle.load(tmp_path, runtime="onnx")


# --------------------------------------------------------------------------- registry and card


def test_version_tags_card_and_summary_report_the_check(
        exported: dict[str, tuple[ModelBundle, bytes, ExportInfo]]) -> None:
    bundle, _, info = exported["multitask"]
    report = info.to_dict()
    tags = export_tags(report)
    assert tags["export.runtime"] == "onnx" and tags["export.passed"] == "true"
    assert float(tags["export.max_prob_diff"]) <= MAX_PROB_DIFF
    assert float(tags["export.decision_agreement"]) == 1.0 and float(tags["export.mask_dice_min"]) >= 0.999
    failed = export_tags({**report, "passed": False})
    assert failed["export.runtime"] == "keras" and failed["export.passed"] == "false"
    assert export_tags(None) == {}

    cfg = ModelConfig(name="us_mt", task="multitask", dataset="ultrasound", label="pathology",
                      classes=CLASSES, preprocess=SPEC)
    card = render_model_card(cfg, bundle.contract, {}, data={}, export=report)
    assert "## Serving runtime" in card and "ONNX Runtime, without TensorFlow" in card
    assert "test-time flips built in" in card and "| decision agreement | 100.0% (0 disagreeing) |" in card
    assert "## Serving runtime" not in render_model_card(cfg, bundle.contract, {}, data={})
    assert "**Serving runtime:** ONNX Runtime" in version_summary(cfg, {}, data={}, export=report)
    error = {**report, "passed": False, "equivalence": {"error": "layer 'doubler' cannot be exported"}}
    assert "TensorFlow (no ONNX export: layer 'doubler'" in version_summary(cfg, {}, data={}, export=error)
    assert "could not be exported to ONNX" in render_model_card(cfg, bundle.contract, {}, data={},
                                                                export=error)
