"""breastscan.serving: its config file and the engine (one request in, one answer out).

The engine's models are fake here (known outputs, no Keras) except for the multi-task test,
which runs a tiny registered bundle; the HTTP edge is test_http.py's, the launcher
(load_tests/harness.py) test_harness.py's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from breastscan.serving.answer import ApiError, to_dict
from breastscan.serving.config import load_serving_config, parse_serving_config
from breastscan.serving.engine import Engine, ServedModel
from breastscan.serving.request import ImageInput, Request, predict_request
from tests.services import images

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- config


def test_the_committed_serving_config_parses() -> None:
    cfg = load_serving_config(REPO / "services" / "serving.yaml")
    assert cfg.models == () and cfg.stage == "production"  # models: auto, the registry decides
    assert cfg.batching.enabled and cfg.batching.max_batch_size >= 2
    assert cfg.grpc_host == "127.0.0.1"


def test_config_overrides_and_env() -> None:
    raw = {"models": ["tumor"], "grpc": {"port": 1234},
           "batching": {"max_batch_size": 8, "per_model": {"tumor": {"max_latency_ms": 50}}}}
    cfg = parse_serving_config(raw, {"BREASTSCAN_GRPC_PORT": "4321", "BREASTSCAN_GRPC_HOST": "0.0.0.0"})
    assert cfg.grpc_port == 4321 and cfg.grpc_host == "0.0.0.0"
    tumor = cfg.batching_for("tumor")
    assert (tumor.max_batch_size, tumor.max_latency_ms) == (8, 50)  # inherits the default size
    assert cfg.batching_for("other").max_latency_ms == cfg.batching.max_latency_ms


def test_auto_serves_what_the_registry_has_and_a_list_wins() -> None:
    from breastscan.serving.config import with_models

    auto = parse_serving_config({"models": "auto"})
    assert with_models(auto, ("tumor", "busi_lesion")).models == ("busi_lesion", "tumor")
    with pytest.raises(ValueError, match="no model to serve: none is imported at stage 'production'"):
        with_models(auto, ())
    listed = parse_serving_config({"models": ["density"]})
    assert with_models(listed, ("tumor",)).models == ("density",)


@pytest.mark.parametrize(("raw", "message"), [
    ({"modelz": []}, "unknown serving config keys: modelz"),
    ({"models": []}, "name at least one model"),
    ({"batching": {"max_batch_size": 1}}, "at least 2"),
    ({"batching": {"max_latency": 5}}, "unknown batching keys"),
    ({"batching": {"max_latency_ms": 0}}, "positive"),
    ({"models_service": {"workers": 2}}, "models_service is gone: the models run in the service"),
])
def test_config_mistakes_are_named(raw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_serving_config(raw)


def test_config_file_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ValueError, match="mapping"):
        load_serving_config(path)


# --------------------------------------------------------------------------- the engine


def _engine(calls: list[tuple[str, tuple[int, ...]]], tumor_rule: dict | None = None,
            explained: list[tuple[str, list[int]]] | None = None) -> Engine:
    from breastscan.bundle import ModelContract
    from breastscan.imaging.preprocessing import PreprocessSpec

    spec = PreprocessSpec(height=32, width=24)

    def contract(name: str, modality: str, task: str) -> ModelContract:
        names = ("A", "B", "C", "D") if name == "density" else ("benign", "malignant", "normal")
        classes = names if task == "classification" else ()
        rule = {"decision": tumor_rule} if name == "tumor" and tumor_rule else {}
        return ModelContract(name=name, task=task, label="x", classes=classes,
                             class_names=classes or ("lesion",),
                             input_shape=(32, 24, 1), dataset="d", modality=modality, spec_id=spec.spec_id,
                             **rule)  # type: ignore[arg-type]

    models = {n: ServedModel(n, spec, contract(n, mod, task), "3", "production")
              for n, mod, task in [("density", "mammography", "classification"),
                                   ("tumor", "mammography", "classification"),
                                   ("lesion", "ultrasound", "segmentation")]}

    async def infer(name: str, batch: np.ndarray) -> np.ndarray:
        calls.append((name, batch.shape))
        if name == "lesion":
            return np.ones((len(batch), 32, 24, 1), np.float32)
        k = len(models[name].contract.class_names)
        return np.full((len(batch), k), 1.0 / k, np.float32)

    async def explain(name: str, batch: np.ndarray, classes: list[int]) -> np.ndarray:
        if explained is not None:
            explained.append((name, list(classes)))
        return np.ones(batch.shape[:3], np.float32)

    return Engine(models, infer, explain, max_upload_bytes=1 << 20)


def _ask(engine: Engine, request: Request) -> Any:
    """The engine's answer to ``request``, in its JSON shape."""
    return to_dict(asyncio.run(engine.answer(request)))


def _analyze(image: ImageInput, modality: str | None = None) -> Request:
    return Request("analyze", image=image, modality=modality)


def _refused(call: Coroutine[Any, Any, Any]) -> ApiError:
    with pytest.raises(ApiError) as info:
        asyncio.run(call)
    return info.value


def test_engine_refuses_before_calling_a_model() -> None:
    calls: list[tuple[str, tuple[int, ...]]] = []
    engine = _engine(calls)
    png = images.png(images.mammogram(1))
    for request, code in [
        (predict_request("nope", ImageInput(data=png)), "unknown_model"),
        (predict_request("tumor", ImageInput(data=b"")), "empty"),
        (predict_request("tumor", ImageInput()), "empty"),
        (predict_request("tumor", ImageInput(data=b"x" * (2 << 20))), "too_large"),
        (predict_request("tumor", ImageInput(data=png, roi=(0, 0, 999, 10))), "bad_roi"),
        (_analyze(ImageInput(data=png)), "unknown_modality"),
        (_analyze(ImageInput(data=png), modality="xray"), "unknown_modality"),
        (Request("analyze", image=ImageInput(data=png), modality="mammography", dicom=True), "not_dicom"),
        (Request("preview"), "empty"),
        (Request("explode"), "bad_request"),
    ]:
        assert _refused(engine.answer(request)).code == code, request
    assert calls == []


def test_engine_answers_at_the_original_size_with_registry_facts() -> None:
    calls: list[tuple[str, tuple[int, ...]]] = []
    engine = _engine(calls)
    png = images.png(images.mammogram(1))
    answer = _ask(engine, predict_request("tumor", ImageInput(data=png, roi=(4, 8, 50, 60)), explain=True))
    assert (answer["width"], answer["height"], answer["roi"]) == (50, 60, [4, 8, 50, 60])
    assert (answer["version"], answer["stage"]) == ("3", "production")
    assert images.decode_png_b64(answer["heatmap_png"]).shape == (60, 50)
    both = _ask(engine, _analyze(ImageInput(data=png), modality="mammography"))
    assert sorted(both["models"]) == ["density", "tumor"] and "eight_category" in both
    dcm = images.dicom(images.ultrasound(1).astype(np.uint16), modality="US")
    us = _ask(engine, _analyze(ImageInput(data=dcm)))
    mask = images.decode_png_b64(us["models"]["lesion"]["mask_png"])
    assert us["modality"] == "ultrasound" and mask.shape == (112, 144)
    assert us["models"]["lesion"]["bbox"] == [0, 0, 144, 112]  # the fake mask is lesion everywhere
    assert ("lesion", (1, 32, 24, 1)) in calls and all(shape[0] == 1 for _, shape in calls)
    preview = _ask(engine, Request("preview", image=ImageInput(data=dcm, roi=(0, 0, 8, 8))))
    assert (preview["width"], preview["height"], preview["modality"]) == (144, 112, "ultrasound")  # whole
    assert [m.name for m in engine.describe()] == ["density", "lesion", "tumor"]
    assert _ask(engine, Request("models")) == to_dict(engine.describe())


def test_every_consumer_of_the_engine_follows_the_decision_rule() -> None:
    """Probabilities 1/3 each: the arg-max calls benign; malignant vs benign (ratio 0.5) at cutoff 0.4
    calls malignant -- in the answer, Grad-CAM's target, the 8-category view and ``/models``."""
    explained: list[tuple[str, list[int]]] = []
    rule = {"rule": "positive_ratio", "positive": "malignant", "versus": "benign", "cutoff": 0.4}
    engine = _engine([], tumor_rule=rule, explained=explained)
    png = images.png(images.mammogram(1))
    answer = _ask(engine, predict_request("tumor", ImageInput(data=png), explain=True))
    assert answer["predicted"] == "malignant" and answer["confidence"] == pytest.approx(1 / 3)
    assert explained == [("tumor", [1])]  # the heatmap shows the evidence for the predicted class
    plain = _ask(_engine([]), predict_request("tumor", ImageInput(data=png)))
    assert plain["predicted"] == "benign"  # the same probabilities at the arg-max
    view = _ask(engine, _analyze(ImageInput(data=png), modality="mammography"))["eight_category"]
    assert view["finding"] == "malignant" and view["pathology"] == "malignant"
    described = {m.name: m for m in engine.describe()}
    assert (described["tumor"].decision or "").startswith("malignant is called when p(malignant)")
    assert described["density"].decision is None and described["lesion"].decision is None
    assert "malignant is called" in engine.models["tumor"].algorithm().decision  # the DICOM SR's text


def test_a_multitask_model_answers_from_one_call_and_is_explained_on_its_bottleneck(tmp_path: Path) -> None:
    """The engine's one model call per image (the batcher's count) serves both parts; Grad-CAM
    explains the class head on the U-Net's bottleneck, not on the mask logits."""
    from breastscan.bundle import ModelBundle
    from breastscan.models.classifier import last_conv_layer_name
    from breastscan.serving.config import Batching
    from breastscan.serving.engine import class_feature_layer, local_engine
    from tests.services.make_registry import build_bundle

    bundle = ModelBundle.load(build_bundle("us_mt", tmp_path / "us_mt"))
    view = bundle.view("classification").model
    assert class_feature_layer(view) == "bottleneck_dropout" and last_conv_layer_name(view) == "mask_logits"
    engine = local_engine({"us_mt": bundle}, batching=Batching(max_batch_size=8, max_latency_ms=5000))
    png = images.png(images.ultrasound(2))
    try:
        plain = _ask(engine, predict_request("us_mt", ImageInput(data=png)))
        explained = _ask(engine, predict_request("us_mt", ImageInput(data=png), explain=True))
        analysed = _ask(engine, _analyze(ImageInput(data=png), modality="ultrasound"))
        stats = engine.batchers["us_mt"].stats
    finally:
        engine.close()
    assert (stats.calls, stats.images) == (3, 3)  # one model call per answer, both parts from it
    described = engine.describe()[0]
    assert (described.task, described.classes, described.threshold) == \
        ("multitask", ["benign", "malignant", "normal"], 0.51)
    assert (described.decision or "").startswith("malignant is called")
    assert analysed["models"] == {"us_mt": plain}
    assert plain["probabilities"] and plain["mask_png"] and "heatmap_png" not in plain
    heat = images.decode_png_b64(explained["heatmap_png"])
    assert heat.shape == (112, 144) and heat.max() > 0
    assert explained["overlay_png"] != plain["overlay_png"]  # the heatmap drawn, not the mask
    assert {k: v for k, v in explained.items() if k not in ("heatmap_png", "overlay_png")} == \
        {k: v for k, v in plain.items() if k != "overlay_png"}


def test_engine_refuses_a_dicom_of_another_modality_before_calling_a_model() -> None:
    calls: list[tuple[str, tuple[int, ...]]] = []
    engine = _engine(calls)
    us = images.dicom(images.ultrasound(1).astype(np.uint16), modality="US")
    mg = images.dicom(images.mammogram(1).astype(np.uint16), modality="MG")
    ct = images.dicom(images.mammogram(1).astype(np.uint16), modality="CT")
    for request, named in [
        (predict_request("tumor", ImageInput(data=us)), "'US'"),          # a mammography model
        (predict_request("lesion", ImageInput(data=mg)), "'MG'"),         # an ultrasound model
        (predict_request("density", ImageInput(data=ct)), "'CT'"),
        (_analyze(ImageInput(data=ct)), "'CT'"),                          # no model serves CT
        (_analyze(ImageInput(data=us), modality="mammography"), "'US'"),  # header contradicts
        (_analyze(ImageInput(data=mg), modality="Ultrasound"), "'MG'"),
    ]:
        error = _refused(engine.answer(request))
        assert error.code == "wrong_modality" and named in error.message
    with pytest.raises(ApiError, match="'US'.*mammography"):
        engine.decode(ImageInput(data=us), "mammography")
    assert calls == []
    assert engine.decode(ImageInput(data=us), "ultrasound").shape == (112, 144)
    assert engine.decode(ImageInput(data=us)).shape == (112, 144)  # no modality asked: not checked
    mammo = _ask(engine, _analyze(ImageInput(data=mg)))  # the header says which models
    assert mammo["modality"] == "mammography" and sorted(mammo["models"]) == ["density", "tumor"]
    assert _ask(engine, predict_request("lesion", ImageInput(data=us)))["model"] == "lesion"
