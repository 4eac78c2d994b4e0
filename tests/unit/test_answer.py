"""breastscan.serving.answer: the answers and the refusals, defined once.

The error table (every code's HTTP and gRPC status, the clients' fallbacks), the HTTP JSON of
each answer (exactly the keys clients have always had), its gRPC message and the way back
from both, the CSV of ``breastscan predict``, and how a model's output becomes an answer at the
image's own size -- tested through the one request path, :class:`breastscan.serving.engine.Engine`
(:func:`local_engine` runs tiny models in this process).
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import cv2
import grpc
import numpy as np
import pytest

from breastscan.bundle import ModelBundle, ModelContract
from breastscan.data.phantoms import mammography_phantom, ultrasound_phantom
from breastscan.imaging.preprocessing import PreprocessSpec
from breastscan.serving.answer import (
    ANSWERS,
    ERRORS,
    Analysis,
    ApiError,
    EightCategory,
    ModelFacts,
    ModelInfo,
    Prediction,
    Preview,
    answer_fields,
    code_for_grpc,
    code_for_http,
    csv_columns,
    csv_row,
    error_headers,
    error_json,
    from_dict,
    from_proto,
    json_schema,
    lesion_bbox,
    mask_of,
    png_bytes,
    predictions,
    to_dict,
    to_json,
    to_proto,
)
from breastscan.serving.engine import Engine, local_engine, prepare_inputs
from breastscan.serving.proto.breastscan.v1 import breastscan_pb2 as pb
from breastscan.serving.request import ImageInput, Request, predict_request
from tests.services import images

CLS_SPEC = PreprocessSpec(height=48, width=40)
SEG_SPEC = PreprocessSpec(height=32, width=32)

COMMON = ["model", "version", "stage", "spec_id", "task", "width", "height"]
CLASS_KEYS = ["probabilities", "predicted", "confidence", "decision_threshold"]
MASK_KEYS = ["mask_png", "lesion_area_px", "lesion_fraction", "bbox", "overlay_png"]


# --------------------------------------------------------------------------- the error table


def test_every_code_has_an_http_and_a_grpc_status() -> None:
    for code, kind in ERRORS.items():
        assert 400 <= kind.http < 600, code
        assert kind.grpc in grpc.StatusCode.__members__, code
        assert kind.grpc != "OK" and kind.meaning, code
    # the input codes clients have always branched on
    assert {"empty", "not_an_image", "truncated", "too_small", "too_large", "bad_shape", "bad_dtype",
            "not_finite", "no_pixel_data", "unknown_model", "wrong_modality", "malformed_request",
            "unsupported_media_type", "unknown_field", "missing_field", "bad_field"} <= set(ERRORS)
    assert (ERRORS["too_large"].http, ERRORS["unsupported_media_type"].http, ERRORS["bad_roi"].http) == \
        (413, 415, 400)
    assert (ERRORS["overloaded"].http, ERRORS["overloaded"].grpc) == (503, "UNAVAILABLE")
    assert (ERRORS["unauthorized"].http, ERRORS["unauthorized"].grpc) == (401, "UNAUTHENTICATED")


def test_an_api_error_carries_a_known_code() -> None:
    error = ApiError("empty", "nothing")
    assert isinstance(error, ValueError) and str(error) == error.message == "nothing"
    assert (error.code, error.kind) == ("empty", ERRORS["empty"])
    with pytest.raises(ValueError, match="unknown error code 'oops'"):
        ApiError("oops", "no such code")


def test_error_json_and_headers() -> None:
    assert json.loads(error_json("bad_roi", "no")) == {"error": "no", "code": "bad_roi"}
    assert error_headers("overloaded") == error_headers("unavailable") == [(b"retry-after", b"1")]
    assert error_headers("unauthorized") == [(b"www-authenticate", b'Bearer realm="breastscan"')]
    assert error_headers("bad_roi") == error_headers("internal") == []


@pytest.mark.parametrize(("status", "code"), [
    (400, "bad_request"), (401, "unauthorized"), (404, "not_found"), (413, "too_large"), (418, "bad_request"),
    (422, "bad_request"), (499, "cancelled"), (500, "internal"), (502, "internal"), (503, "unavailable"),
    (504, "deadline_exceeded"),
])
def test_the_code_of_an_http_status_without_one(status: int, code: str) -> None:
    assert code_for_http(status) == code


@pytest.mark.parametrize(("status", "code"), [
    ("INVALID_ARGUMENT", "bad_request"), ("RESOURCE_EXHAUSTED", "too_large"),
    ("UNAUTHENTICATED", "unauthorized"), ("UNAVAILABLE", "unavailable"),
    ("DEADLINE_EXCEEDED", "deadline_exceeded"), ("INTERNAL", "internal"),
    ("CANCELLED", "cancelled"), ("UNIMPLEMENTED", "not_found"), ("NOT_FOUND", "not_found"),
    ("DATA_LOSS", "data_loss"),
])
def test_the_code_of_a_grpc_status_without_one(status: str, code: str) -> None:
    assert code_for_grpc(status) == code


# --------------------------------------------------------------------------- answers as JSON and gRPC

PNG = png_bytes(np.zeros((4, 5), np.uint8))
FACTS = {"model": "m", "version": None, "stage": None, "spec_id": "s", "width": 5, "height": 4}
HEAD = {"task": "multitask", "probabilities": {"benign": 0.7, "malignant": 0.3}, "predicted": "benign",
        "confidence": 0.7}
ANSWER_EXAMPLES: dict[str, Prediction] = {
    "classifier": Prediction(**FACTS, task="classification", probabilities={"z": 0.1, "a": 0.3, "m": 0.6},
                             predicted="m", confidence=0.6),
    "classifier explained, roi": Prediction(
        **{**FACTS, "version": "7", "stage": "staging"}, task="classification",
        probabilities={"a": 1 / 3, "b": 2 / 3}, predicted="b", confidence=2 / 3, heatmap_png=PNG,
        overlay_png=PNG, roi=[1, 2, 5, 4]),
    "segmenter": Prediction(**FACTS, task="segmentation", mask_png=PNG, lesion_area_px=3,
                            lesion_fraction=0.15, bbox=[0, 1, 3, 1], overlay_png=PNG),
    "segmenter, empty mask": Prediction(**FACTS, task="segmentation", mask_png=PNG, lesion_area_px=0,
                                        lesion_fraction=0.0, bbox=None, overlay_png=PNG),
    "multitask": Prediction(**FACTS, **HEAD, mask_png=PNG, lesion_area_px=3, lesion_fraction=0.15,
                            bbox=[0, 1, 3, 1], overlay_png=PNG),
    "multitask explained, roi": Prediction(**FACTS, **HEAD, heatmap_png=PNG, mask_png=PNG, lesion_area_px=0,
                                           lesion_fraction=0.0, bbox=None, overlay_png=PNG, roi=[0, 0, 5, 4]),
}
JSON_KEYS = {
    "classifier": COMMON + CLASS_KEYS,
    "classifier explained, roi": COMMON + CLASS_KEYS + ["heatmap_png", "overlay_png", "roi"],
    "segmenter": COMMON + MASK_KEYS,
    "segmenter, empty mask": COMMON + MASK_KEYS,
    "multitask": COMMON + CLASS_KEYS + MASK_KEYS,
    "multitask explained, roi": COMMON + CLASS_KEYS + ["heatmap_png"] + MASK_KEYS + ["roi"],
}
"""The keys of each answer's JSON, in order: the ones clients have always had, and the decision
rule's cutoff (``decision_threshold``, added with the README's note)."""
VIEW = EightCategory(category="benign-A", density="A", pathology="benign", finding="benign", p_malignant=0.25,
                     p_normal=None, confidence=0.5,
                     probabilities={f"{k}-{d}": 0.125 for k in ("benign", "malignant") for d in "ABCD"})
OTHERS: dict[str, Any] = {
    "analysis": Analysis(modality="mammography", models={"a": ANSWER_EXAMPLES["classifier"],
                                                         "b": ANSWER_EXAMPLES["classifier explained, roi"]},
                         eight_category=VIEW, roi=[1, 2, 5, 4]),
    "analysis with DICOM": Analysis(modality="ultrasound", models={"s": ANSWER_EXAMPLES["segmenter"]},
                                    dicom_sr=b"DICM sr", dicom_seg={"s": b"DICM seg", "t": b"other"}),
    "analysis with DICOM, no mask": Analysis(modality="mammography", models={}, dicom_sr=b"sr", dicom_seg={}),
    "model info": ModelInfo(name="tumor", version="3", stage="production", source="models:/t@production",
                            task="multitask", modality="ultrasound", classes=["a", "b"],
                            input_shape=[32, 24, 1], spec_id="s", temperature=1.5, threshold=0.5,
                            decision="b is called when ..."),
    "model info, unknowns": ModelInfo(name="d", version=None, stage=None, source=None,
                                      task="classification", modality="mammography", classes=["A"],
                                      input_shape=[8, 8, 1], spec_id="s", temperature=1.0, threshold=None,
                                      decision=None),
    "preview": Preview(width=5, height=4, modality="mammography", png=PNG),
    "preview of a PNG": Preview(width=5, height=4, modality=None, png=PNG),
}


def _over_the_wire(answer: Any) -> Any:
    """The answer sent as its gRPC message and read back as a client reads it."""
    message = to_proto(answer)
    return from_proto(type(answer), type(message).FromString(message.SerializeToString()))


@pytest.mark.parametrize("name", [*ANSWER_EXAMPLES, *OTHERS])
def test_answers_round_trip_through_json_and_grpc(name: str) -> None:
    answer = {**ANSWER_EXAMPLES, **OTHERS}[name]
    assert to_dict(_over_the_wire(answer)) == to_dict(answer)
    assert from_dict(type(answer), to_dict(answer)) == answer
    assert from_dict(type(answer), json.loads(to_json(answer))) == answer  # through the bytes too


@pytest.mark.parametrize("name", list(ANSWER_EXAMPLES))
def test_the_json_keys_of_each_task_are_the_old_ones(name: str) -> None:
    answer = ANSWER_EXAMPLES[name]
    data = to_dict(answer)
    assert list(data) == JSON_KEYS[name]
    for key in ("heatmap_png", "mask_png", "overlay_png"):
        if key in data:
            assert base64.b64decode(data[key]) == PNG  # PNG bytes are base64 text in JSON
    if answer.task != "segmentation":
        assert list(data["probabilities"]) == list(answer.probabilities or {})  # class order kept
    assert to_dict(_over_the_wire(answer)) == data  # the gRPC client gives the same keys


def test_null_facts_are_present_as_null() -> None:
    data = to_dict(ANSWER_EXAMPLES["segmenter, empty mask"])
    assert (data["version"], data["stage"], data["bbox"]) == (None, None, None)
    message = to_proto(ANSWER_EXAMPLES["segmenter, empty mask"])
    assert (message.version, message.HasField("bbox")) == ("", False)


def test_an_analysis_carries_its_dicom_objects_under_dicom() -> None:
    data = to_dict(OTHERS["analysis with DICOM"])
    assert list(data) == ["modality", "models", "dicom"] and list(data["dicom"]) == ["sr", "seg"]
    assert data["dicom"] == {"sr": base64.b64encode(b"DICM sr").decode(),
                             "seg": {"s": base64.b64encode(b"DICM seg").decode(),
                                     "t": base64.b64encode(b"other").decode()}}
    assert to_dict(OTHERS["analysis with DICOM, no mask"])["dicom"] == {"sr": "c3I=", "seg": {}}
    assert list(to_dict(OTHERS["analysis"])) == ["modality", "models", "eight_category", "roi"]
    assert list(to_dict(OTHERS["analysis"])["eight_category"]) == [
        "category", "density", "pathology", "finding", "p_malignant", "p_normal", "confidence",
        "probabilities"]
    plain = Analysis(modality="ultrasound", models={"s": ANSWER_EXAMPLES["segmenter"]})
    assert list(to_dict(plain)) == ["modality", "models"]


def test_model_info_and_preview_keys() -> None:
    assert list(to_dict(OTHERS["model info"])) == ["name", "version", "stage", "source", "task", "modality",
                                                   "classes", "input_shape", "spec_id", "temperature",
                                                   "threshold", "decision", "runtime"]
    assert to_dict(OTHERS["preview of a PNG"]) == {"width": 5, "height": 4, "modality": None,
                                                   "png": base64.b64encode(PNG).decode()}
    assert to_dict([OTHERS["preview"], OTHERS["preview"]]) == [to_dict(OTHERS["preview"])] * 2


def test_the_compiled_messages_have_the_declared_fields() -> None:
    """The committed gRPC code carries each declared field under its number (regenerated, see
    test_grpc_server's generate test)."""
    for cls in ANSWERS:
        descriptor = getattr(pb, cls.PROTO).DESCRIPTOR  # type: ignore[attr-defined]
        assert {f.name: f.number for f in descriptor.fields} == {f.name: f.number for f in answer_fields(cls)}


@pytest.mark.parametrize("name", [*ANSWER_EXAMPLES, *OTHERS])
def test_the_json_schema_describes_every_key(name: str) -> None:
    answer = {**ANSWER_EXAMPLES, **OTHERS}[name]
    schema = json_schema(type(answer))
    data = to_dict(answer)
    assert set(data) <= set(schema["properties"])
    if "dicom" in data:
        assert set(data["dicom"]) == set(schema["properties"]["dicom"]["properties"])


# --------------------------------------------------------------------------- the CSV of breastscan predict


def test_csv_columns_and_rows() -> None:
    names = ["benign", "malignant"]
    assert csv_columns("classification", names) == [
        "model", "version", "stage", "width", "height", "predicted", "confidence", "p_benign", "p_malignant",
        "decision_threshold"]
    assert csv_columns("segmentation", names) == [
        "model", "version", "stage", "width", "height", "lesion_area_px", "lesion_fraction", "bbox"]
    assert csv_columns("multitask", names) == [
        "model", "version", "stage", "width", "height", "predicted", "confidence", "p_benign", "p_malignant",
        "decision_threshold", "lesion_area_px", "lesion_fraction", "bbox"]
    row = csv_row(ANSWER_EXAMPLES["multitask"])
    assert set(row) == set(csv_columns("multitask", names))
    assert row | {"p_benign": None} == {"model": "m", "version": "", "stage": "", "width": 5, "height": 4,
                                        "predicted": "benign", "confidence": 0.7, "p_benign": None,
                                        "p_malignant": 0.3, "decision_threshold": "", "lesion_area_px": 3,
                                        "lesion_fraction": 0.15,
                                        "bbox": "0 1 3 1"}
    assert csv_row(ANSWER_EXAMPLES["segmenter, empty mask"])["bbox"] == ""


# --------------------------------------------------------------------------- helpers of the answers


def test_png_bytes_round_trips_rgb_and_mask_of_reads_both_forms() -> None:
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 200  # red
    back = cv2.imdecode(np.frombuffer(png_bytes(rgb), np.uint8), cv2.IMREAD_UNCHANGED)
    assert back.shape == (4, 5, 3) and (back[..., 2] == 200).all() and not back[..., 0].any()  # BGR
    mask = np.zeros((6, 7), np.uint8)
    mask[1:3, 2:6] = 255
    encoded = png_bytes(mask)
    for form in (encoded, base64.b64encode(encoded).decode()):
        np.testing.assert_array_equal(mask_of(form), mask > 0)
    with pytest.raises(ValueError, match="does not decode"):
        mask_of(b"not a png")
    assert lesion_bbox(mask > 0) == [2, 1, 4, 2] and lesion_bbox(np.zeros((3, 3), bool)) is None


# --------------------------------------------------------------------------- predictions (through the Engine)


def _decode_b64_png(text: str) -> np.ndarray:
    arr = cv2.imdecode(np.frombuffer(base64.b64decode(text), np.uint8), cv2.IMREAD_UNCHANGED)
    assert arr is not None
    return arr


def _mammogram(seed: int, height: int = 160, width: int = 128) -> np.ndarray:
    return mammography_phantom(np.random.default_rng(seed), density=1 + seed % 4,
                               pathology=("benign", "malignant", "normal")[seed % 3],
                               height=height, width=width)[0]


def _classifier_bundle(name: str, label: str, classes: tuple[str, ...], names: tuple[str, ...],
                       temperature: float = 1.0) -> ModelBundle:
    from breastscan.models import build_model

    model = build_model("classification", n_classes=len(classes), input_shape=(48, 40, 1), dropout=0.0)
    contract = ModelContract(name=name, task="classification", label=label, classes=classes,
                             class_names=names, input_shape=(48, 40, 1), dataset="mammography",
                             modality="mammography", temperature=temperature, spec_id=CLS_SPEC.spec_id)
    return ModelBundle(model, CLS_SPEC, contract)


def _lesion_contract() -> ModelContract:
    return ModelContract(name="lesion", task="segmentation", label="mask", classes=(),
                         class_names=("lesion",), input_shape=(32, 32, 1), dataset="ultrasound",
                         modality="ultrasound", threshold=0.5, spec_id=SEG_SPEC.spec_id)


class _FixedMask(ModelBundle):
    """A segmenter whose mask logits are known: +10 on ``MODEL_RECT``, -10 elsewhere."""

    MODEL_RECT = (slice(12, 16), slice(8, 16))

    def logits(self, batch: np.ndarray) -> np.ndarray:
        out = np.full((len(batch), 32, 32, 1), -10.0, np.float32)
        out[:, self.MODEL_RECT[0], self.MODEL_RECT[1]] = 10.0
        return out


@pytest.fixture(scope="module")
def tumor() -> ModelBundle:
    return _classifier_bundle("tumor", "pathology", ("benign", "malignant", "normal"),
                              ("benign", "malignant", "normal"), temperature=2.0)


@pytest.fixture(scope="module")
def density() -> ModelBundle:
    return _classifier_bundle("density", "density", ("1", "2", "3", "4"), ("A", "B", "C", "D"))


@pytest.fixture(scope="module")
def lesion() -> ModelBundle:
    from breastscan.models import build_model

    model = build_model("segmentation", input_shape=(32, 32, 1), base_filters=4, depth=2, dropout=0.0)
    return ModelBundle(model, SEG_SPEC, _lesion_contract())


def _predict(bundles: dict[str, ModelBundle], model: str, image: np.ndarray, *, explain: bool = False,
             versions: dict[str, str] | None = None) -> dict[str, Any]:
    """The JSON of one answer of :func:`local_engine` over ``bundles`` for an array input."""
    engine = local_engine(bundles, versions=versions)
    request = predict_request(model, ImageInput(array=image), explain=explain)
    return to_dict(asyncio.run(engine.predict(request)))


def _analyze(engine: Engine, image: np.ndarray, modality: str) -> dict[str, Any]:
    return to_dict(asyncio.run(engine.answer(Request("analyze", image=ImageInput(array=image),
                                                     modality=modality))))


def test_concurrent_requests_equal_one_model_call_of_their_batch(tumor: ModelBundle) -> None:
    arrays = [_mammogram(0), _mammogram(1, 120, 100), _mammogram(2, 200, 90)]
    engine = local_engine({"tumor": tumor}, versions={"tumor": "7"}, stages={"tumor": "production"})

    async def all_at_once() -> list[Prediction]:
        return await asyncio.gather(*(engine.predict(predict_request("tumor", ImageInput(array=img)))
                                      for img in arrays))

    answers = [to_dict(a) for a in asyncio.run(all_at_once())]
    assert len(answers) == 3
    json.dumps(answers)  # JSON-able as is
    # The model service merges concurrent requests into one call: its rows are the answers.
    batch, _ = tumor.prepare([img.astype(np.float32) / 255.0 for img in arrays])
    for img, answer, expected in zip(arrays, answers, tumor.predict(batch), strict=True):
        got = np.array([answer["probabilities"][c] for c in ("benign", "malignant", "normal")])
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert answer["predicted"] == ("benign", "malignant", "normal")[int(np.argmax(expected))]
        assert answer["confidence"] == pytest.approx(float(expected.max()), abs=1e-5)
        assert (answer["height"], answer["width"]) == img.shape
        assert answer | {"probabilities": None, "predicted": None, "confidence": None} == {
            "model": "tumor", "version": "7", "stage": "production", "spec_id": CLS_SPEC.spec_id,
            "task": "classification", "width": img.shape[1], "height": img.shape[0],
            "probabilities": None, "predicted": None, "confidence": None, "decision_threshold": None,
        }  # no heatmap keys without explain, no roi key without a roi; the arg-max rule has no cutoff


def test_the_served_class_follows_the_contracts_decision_rule(tumor: ModelBundle) -> None:
    from breastscan.decision import DecisionRule

    names = ("benign", "malignant", "normal")
    arrays = [_mammogram(seed) for seed in range(6)]
    batch, _ = tumor.prepare([img.astype(np.float32) / 255.0 for img in arrays])
    expected = tumor.predict(batch)
    ratio = DecisionRule("positive_ratio", positive="malignant", versus="benign", cutoff=0.5).ratio(
        expected, names)
    differs = False
    # Every image / none, with a margin: one image alone and the six in a batch may differ in
    # the last bits of their probabilities, so a cutoff at a ratio itself could go either way.
    for cutoff in (max(float(ratio.min()) - 1e-4, 0.0), min(float(ratio.max()) + 1e-4, 1.0)):
        rule = DecisionRule("positive_ratio", positive="malignant", versus="benign", cutoff=cutoff)
        served = tumor.with_decision(rule)
        called = rule.decide(expected, names)
        differs |= bool((called != expected.argmax(axis=1)).any())
        for img, k, row in zip(arrays, called, expected, strict=True):
            answer = _predict({"tumor": served}, "tumor", img)
            assert answer["predicted"] == names[k]
            assert answer["confidence"] == pytest.approx(float(row[k]), abs=1e-5)  # p of the predicted class
            assert answer["decision_threshold"] == cutoff  # the cutoff it was called with
            assert list(answer) == JSON_KEYS["classifier"]  # the answer's keys as before
    assert differs  # one of the two rules calls some image otherwise than the arg-max
    ruled = from_dict(Prediction, answer)
    assert from_proto(Prediction, to_proto(ruled)).decision_threshold == cutoff  # over gRPC too


def test_calibration_temperature_is_applied(tumor: ModelBundle) -> None:
    img = _mammogram(4)
    hot = _predict({"tumor": tumor}, "tumor", img)["probabilities"]
    cold = _predict({"tumor": tumor.with_temperature(0.5)}, "tumor", img)["probabilities"]
    assert max(cold.values()) >= max(hot.values())  # lower temperature: more confident


def test_explain_returns_heatmap_and_overlay_at_original_size(tumor: ModelBundle) -> None:
    for img in (_mammogram(5, 150, 70), _mammogram(6)):
        answer = _predict({"tumor": tumor}, "tumor", img, explain=True)
        assert list(answer) == JSON_KEYS["classifier explained, roi"][:-1]
        heat = _decode_b64_png(answer["heatmap_png"])
        assert heat.shape == img.shape and heat.dtype == np.uint8
        over = _decode_b64_png(answer["overlay_png"])
        assert over.shape == (*img.shape, 3) and over.dtype == np.uint8


@pytest.mark.parametrize(
    ("size", "bbox"),
    [
        # 64x128 → scale 1/4, 16x32 content, 8 rows of padding on top: model rows 12:16, cols
        # 8:16 are original rows 16:32, cols 32:64.
        ((64, 128), [32, 16, 32, 16]),
        # 128x64 → scale 1/4, 32x16 content, 8 columns of padding on the left.
        ((128, 64), [0, 48, 32, 16]),
    ],
)
def test_mask_and_box_map_back_to_the_original_image(size: tuple[int, int], bbox: list[int]) -> None:
    bundle = _FixedMask(None, SEG_SPEC, _lesion_contract())
    image = np.random.default_rng(0).random(size, dtype=np.float32)
    answer = _predict({"lesion": bundle}, "lesion", image, versions={"lesion": "3"})
    json.dumps(answer)
    assert answer["version"] == "3" and list(answer) == JSON_KEYS["segmenter"]
    x, y, w, h = bbox
    expected = np.zeros(size, np.uint8)
    expected[y : y + h, x : x + w] = 255
    mask = _decode_b64_png(answer["mask_png"])
    np.testing.assert_array_equal(mask, expected)
    assert answer["bbox"] == bbox
    assert answer["lesion_area_px"] == w * h
    assert answer["lesion_fraction"] == pytest.approx(w * h / (size[0] * size[1]))
    assert (answer["height"], answer["width"]) == size
    over = _decode_b64_png(answer["overlay_png"])  # BGR as OpenCV reads it: lesion is red
    assert over.shape == (*size, 3)
    assert over[y + h // 2, x + w // 2, 2] > over[y + h // 2, x + w // 2, 1]


def test_empty_mask_has_no_box() -> None:
    class _Empty(ModelBundle):
        def logits(self, batch: np.ndarray) -> np.ndarray:
            return np.full((len(batch), 32, 32, 1), -5.0, np.float32)

    answer = _predict({"lesion": _Empty(None, SEG_SPEC, _lesion_contract())}, "lesion", np.zeros((50, 40)))
    assert answer["bbox"] is None and answer["lesion_area_px"] == 0 and answer["lesion_fraction"] == 0.0
    assert not _decode_b64_png(answer["mask_png"]).any()
    assert list(answer) == JSON_KEYS["segmenter, empty mask"]


def test_real_unet_bundle_answers(lesion: ModelBundle) -> None:
    rng = np.random.default_rng(0)
    for img in (ultrasound_phantom(rng, pathology=p)[0] for p in ("benign", "normal")):
        answer = _predict({"lesion": lesion}, "lesion", img)
        assert answer["task"] == "segmentation" and answer["model"] == "lesion"
        mask = _decode_b64_png(answer["mask_png"])
        assert mask.shape == img.shape and set(np.unique(mask)) <= {0, 255}
        assert answer["lesion_area_px"] == int((mask > 0).sum())
        assert answer["bbox"] == lesion_bbox(mask > 0)


def test_a_bad_image_is_refused_before_the_model_runs(tumor: ModelBundle) -> None:
    calls: list[int] = []

    class _Spy(ModelBundle):
        def logits(self, batch: np.ndarray) -> np.ndarray:
            calls.append(len(batch))
            return super().logits(batch)

    engine = local_engine({"tumor": _Spy(tumor.model, tumor.spec, tumor.contract)})
    with pytest.raises(ApiError) as info:
        asyncio.run(engine.predict(predict_request("tumor", ImageInput(array=np.full((40, 40), np.nan)))))
    assert info.value.code == "not_finite" and calls == []
    asyncio.run(engine.predict(predict_request("tumor", ImageInput(array=_mammogram(0)))))
    assert calls == [1]


def test_one_bad_image_of_a_batch_names_its_index(tumor: ModelBundle) -> None:
    with pytest.raises(ApiError, match="image 1") as info:
        prepare_inputs(tumor.spec, tumor.contract, [_mammogram(0), np.full((40, 40), np.nan)])
    assert info.value.code == "not_finite"
    empty = prepare_inputs(tumor.spec, tumor.contract, [])
    assert empty.batch.shape == (0, 48, 40, 1)
    facts = ModelFacts(tumor.contract, tumor.spec.spec_id)
    assert predictions(facts, empty.grays, empty.boxes, tumor.predict(empty.batch)) == []


# --------------------------------------------------------------------------- analyses (through the Engine)


def test_analyze_mammography_adds_eight_category(density: ModelBundle, tumor: ModelBundle,
                                                 lesion: ModelBundle) -> None:
    engine = local_engine({"density": density, "tumor": tumor, "lesion": lesion},
                          versions={"tumor": "2"}, stages={"tumor": "production"})
    img = _mammogram(7)
    result = _analyze(engine, img, "mammography")
    json.dumps(result)
    assert result["modality"] == "mammography" and set(result["models"]) == {"density", "tumor"}
    assert result["models"]["tumor"]["version"] == "2" and result["models"]["density"]["version"] is None
    assert result["models"]["tumor"]["stage"] == "production" and "roi" not in result
    view = result["eight_category"]
    assert sum(view["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert view["density"] == result["models"]["density"]["predicted"]
    assert view["category"] == f"{view['pathology']}-{view['density']}"
    np.testing.assert_allclose(result["models"]["tumor"]["probabilities"]["benign"],
                               _predict({"tumor": tumor}, "tumor", img)["probabilities"]["benign"])


def test_analyze_ultrasound_runs_only_its_models(density: ModelBundle, lesion: ModelBundle) -> None:
    img = ultrasound_phantom(np.random.default_rng(1), pathology="malignant")[0]
    engine = local_engine({"density": density, "lesion": lesion})
    result = _analyze(engine, img, "ultrasound")
    assert set(result["models"]) == {"lesion"} and "eight_category" not in result
    # Mammography with a density model only: no combined view.
    assert "eight_category" not in _analyze(local_engine({"density": density}), _mammogram(0), "mammography")


def test_unknown_modality_and_model(density: ModelBundle) -> None:
    engine = local_engine({"density": density})
    image = ImageInput(array=_mammogram(0))
    for modality in ("mri", "ultrasound"):
        with pytest.raises(ApiError) as info:
            asyncio.run(engine.answer(Request("analyze", image=image, modality=modality)))
        assert info.value.code == "unknown_modality"
    assert engine.select("density").contract is density.contract
    with pytest.raises(ApiError, match="served: density") as info:
        asyncio.run(engine.predict(predict_request("tumour", image)))
    assert info.value.code == "unknown_model"


# --------------------------------------------------------------------------- a multi-task answer


def _multitask_contract() -> ModelContract:
    names = ("benign", "malignant", "normal")
    rule = {"rule": "positive_ratio", "positive": "malignant", "versus": "benign", "cutoff": 0.6}
    return ModelContract(name="us_mt", task="multitask", label="pathology", classes=names, class_names=names,
                         input_shape=(32, 24, 1), dataset="d", modality="ultrasound", threshold=0.5,
                         decision=rule)


def test_a_multitask_answer_is_its_classifier_and_its_segmenter_answers_in_one() -> None:
    """The class part and the mask part are those of the model's two views, ``predicted``
    follows the decision rule, and explained, the overlay is the heatmap's."""
    contract, spec = _multitask_contract(), PreprocessSpec(height=32, width=24)
    prepared = prepare_inputs(spec, contract, [images.ultrasound(1).astype(np.float32) / 255.0])
    probs = np.asarray([[0.30, 0.36, 0.34]], np.float32)  # arg-max malignant; the rule calls benign
    mask = np.random.default_rng(0).random((1, 32, 24, 1)).astype(np.float32)
    heat = np.random.default_rng(1).random((1, 32, 24)).astype(np.float32)

    def answer(task: str, out: Any, explained: bool = False) -> dict[str, Any]:
        view = contract.view(task) if task != "multitask" else contract
        answers = predictions(ModelFacts(view, spec.spec_id), prepared.grays, prepared.boxes, out,
                              heat=heat if explained else None)
        return to_dict(answers[0])

    both = {"probabilities": probs, "mask": mask}
    for explained in (False, True):
        mt = answer("multitask", both, explained)
        cls, seg = answer("classification", probs, explained), answer("segmentation", mask)
        class_keys = [*CLASS_KEYS, *(["heatmap_png"] if explained else [])]
        assert list(mt) == [*COMMON, *class_keys, *MASK_KEYS]
        assert {k: mt[k] for k in class_keys} == {k: cls[k] for k in class_keys}
        assert {k: mt[k] for k in ("mask_png", "lesion_area_px", "bbox")} == \
            {k: seg[k] for k in ("mask_png", "lesion_area_px", "bbox")}
        assert mt["overlay_png"] == (cls if explained else seg)["overlay_png"]
        assert (mt["task"], mt["predicted"]) == ("multitask", "benign")
        assert images.decode_png_b64(mt["mask_png"]).shape == (mt["height"], mt["width"]) == (112, 144)
