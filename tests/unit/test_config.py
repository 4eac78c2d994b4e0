"""params.yaml parsing: names people write, checked where they write them."""

from __future__ import annotations

from copy import deepcopy
from typing import Any

import pytest
import yaml

from breastscan.config import BACKBONES, parse_params
from tests.conftest import REPO


def _raw() -> dict[str, Any]:
    return deepcopy(yaml.safe_load((REPO / "params.yaml").read_text()))


@pytest.mark.parametrize("spelt", ["EfficientNetB0", "efficientnetb0", " EFFICIENTNETB0 ", "efficientNetB0"])
def test_backbone_names_in_any_case(spelt: str) -> None:
    raw = _raw()
    raw["models"]["tumor"]["backbone"] = spelt
    assert parse_params(raw).model("tumor").backbone == "efficientnetb0"


def test_unknown_backbone_lists_the_choices() -> None:
    raw = _raw()
    raw["models"]["tumor"]["backbone"] = "ResNet9000"
    with pytest.raises(ValueError, match="unknown backbone 'ResNet9000'; choose one of") as err:
        parse_params(raw)
    assert all(name in str(err.value) for name in BACKBONES)


@pytest.mark.parametrize(("weights", "kept"), [
    ("Weights/Tumor_V2.weights.h5", "Weights/Tumor_V2.weights.h5"),
    ("ImageNet", "imagenet"), ("None", "none"), (None, "none"),
])
def test_weights_paths_verbatim_keywords_in_any_case(weights: str | None, kept: str) -> None:
    raw = _raw()
    raw["models"]["tumor"]["weights"] = weights
    assert parse_params(raw).model("tumor").weights == kept


def test_headline_defaults_per_task_and_is_checked() -> None:
    raw = _raw()
    del raw["models"]["lesion"]["headline"]
    raw["models"]["lesion"]["gates"] = {"floors": {}}
    del raw["models"]["tumor"]["headline"]
    params = parse_params(raw)
    assert params.model("lesion").headline == "mean_dice"
    assert params.model("tumor").headline == "accuracy"
    raw["models"]["tumor"]["headline"] = "auc"  # binary only: tumor has three classes
    with pytest.raises(ValueError, match="'auc' is not a metric of this model"):
        parse_params(raw)


@pytest.mark.parametrize(("floor", "ok"), [
    ("per_class.malignant.sensitivity", True), ("per_class.benign.auc", True),
    ("per_class.cancer.sensitivity", False), ("per_class.malignant.recall", False), ("dice", False),
])
def test_gate_floors_name_real_metrics(floor: str, ok: bool) -> None:
    raw = _raw()
    raw["models"]["tumor"]["gates"]["floors"] = {floor: 0.5}
    if ok:
        assert parse_params(raw).model("tumor").gates.floors == {floor: 0.5}
    else:
        with pytest.raises(ValueError, match="not a metric of this model|per_class.<class>.<stat>"):
            parse_params(raw)


def test_every_class_predicted_gate_is_declared() -> None:
    raw = _raw()
    raw["models"]["tumor"]["gates"]["every_class_predicted"] = True
    assert parse_params(raw).model("tumor").gates.every_class_predicted
    assert not parse_params(_raw()).model("density").gates.every_class_predicted


def test_a_classifier_declares_its_decision_rule() -> None:
    from breastscan.decision import ARGMAX_RULE, DecisionRule

    assert parse_params(_raw()).model("tumor").decision == ARGMAX_RULE  # no key: the arg-max
    raw = _raw()
    ratio = {"rule": "positive_ratio", "positive": "malignant", "versus": "benign"}
    raw["models"]["tumor"]["decision"] = {**ratio, "target_sensitivity": 0.9}
    assert parse_params(raw).model("tumor").decision == DecisionRule(
        "positive_ratio", positive="malignant", versus="benign", target_sensitivity=0.9)
    raw["models"]["tumor"]["decision"] = {**ratio, "cutoff": 0.35}
    assert parse_params(raw).model("tumor").decision.cutoff == 0.35


RATIO = {"rule": "positive_ratio", "positive": "malignant", "versus": "benign"}


@pytest.mark.parametrize(("model", "decision", "match"), [
    ("tumor", {"rule": "positive_ratio", "positive": "cancer", "versus": "benign", "cutoff": 0.3},
     "models.tumor.decision: .*'cancer' is not one of"),
    ("tumor", {**RATIO, "target_sensitivity": 0.9, "cutoff": 0.3}, "not both"),
    ("tumor", {**RATIO, "cutoff": 1.0}, r"cutoff must be in \(0, 1\)"),
    ("tumor", {**RATIO, "target_sensitivity": 0}, r"target_sensitivity must be in \(0, 1\)"),
    ("tumor", {"rule": "argmax", "fitted_on": "validation split"}, "unknown keys fitted_on"),
    ("tumor", "positive_ratio", "must be a mapping"),
    ("lesion", {"rule": "positive_ratio", "positive": "lesion", "versus": "background", "cutoff": 0.3},
     "classification models only"),
])
def test_decision_rule_mistakes_are_named(model: str, decision: Any, match: str) -> None:
    raw = _raw()
    raw["models"][model]["decision"] = decision
    with pytest.raises(ValueError, match=match):
        parse_params(raw)


def test_tracing_is_passed_to_bentoml_and_skipped_when_nothing_is_sampled() -> None:
    from breastscan.serving.config import parse_serving_config
    from breastscan.serving.runtime import service_options

    off = service_options(parse_serving_config({}))["tracing"]
    assert off == {"excluded_urls": [".*"]}  # no span is built for a request nobody samples
    raw = {"sample_rate": 0.5, "exporter_type": "otlp", "otlp": {"protocol": "grpc", "endpoint": "http://c:4317"}}
    on = service_options(parse_serving_config({"tracing": raw}))["tracing"]
    assert on == raw  # passed through untouched: every request traced at that rate
