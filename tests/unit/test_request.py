"""breastscan.serving.requests: every client mistake gets its code; answers map back to the original image.

Input checks are tested on the functions themselves; predictions and analyses through the
one request path, :class:`breastscan.serving.engine.Engine` (:func:`local_engine` runs the
models in this process).
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import zlib

import cv2
import numpy as np
import pytest

from breastscan.bundle import ModelBundle, ModelContract
from breastscan.data.phantoms import mammography_phantom, ultrasound_phantom
from breastscan.imaging.preprocessing import PreprocessSpec
from breastscan.serving.engine import ImageInput, local_engine
from breastscan.serving.requests import (
    INPUT_ERROR_CODES,
    InputError,
    check_modality,
    decode_upload,
    finish_predictions,
    lesion_bbox,
    png_base64,
    prepare_inputs,
    validate_array,
)
from tests.services import images

CLS_SPEC = PreprocessSpec(height=48, width=40)
SEG_SPEC = PreprocessSpec(height=32, width=32)
MAX_BYTES = 1 << 20


# --------------------------------------------------------------------------- helpers


def _png(arr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", arr)
    assert ok
    return buf.tobytes()


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return struct.pack(">I", len(data)) + kind + data + crc


def _png_with_header(width: int, height: int, idat: bytes) -> bytes:
    """A PNG whose header claims ``width x height`` pixels, whatever ``idat`` holds."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit gray
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _dicom(rows: int | None, cols: int | None, pixels: np.ndarray | None = None) -> bytes:
    return images.dicom(pixels, size=(rows, cols))


def _code(call, *args, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        call(*args, **kwargs)
    assert info.value.message and str(info.value) == info.value.message
    return info.value.code


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


# --------------------------------------------------------------------------- decode_upload


def test_good_uploads_decode() -> None:
    ramp16 = np.linspace(0, 4095, 40 * 50).reshape(40, 50).astype(np.uint16)  # 12-bit in 16-bit PNG
    out = decode_upload(_png(ramp16), max_bytes=MAX_BYTES)
    assert out.shape == (40, 50) and out.dtype == np.float32
    assert out.min() == pytest.approx(0.0) and out.max() == pytest.approx(1.0)

    gray = _mammogram(0, 64, 48)
    rgba = np.dstack([gray, gray, gray, np.full_like(gray, 9)])
    np.testing.assert_allclose(decode_upload(_png(rgba), max_bytes=MAX_BYTES), gray / 255.0, atol=1 / 255)

    dicom = _dicom(32, 48, np.tile(np.arange(48) * 80, (32, 1)))  # 16-bit DICOM
    out = decode_upload(dicom, max_bytes=MAX_BYTES)
    assert out.shape == (32, 48) and out[:, 0].max() == 0.0 and out[:, -1].min() == 1.0


@pytest.mark.parametrize(
    ("name", "data", "code"),
    [
        ("empty bytes", b"", "empty"),
        ("random bytes", np.random.default_rng(0).bytes(2000), "not_an_image"),
        ("text", b"GET / HTTP/1.1\r\n\r\n", "not_an_image"),
        ("1x1 PNG", _png(np.zeros((1, 1), np.uint8)), "too_small"),
        ("header claims 20000x20000", _png_with_header(20000, 20000, zlib.compress(b"\0" * 64)), "too_large"),
        ("garbage pixel data", _png_with_header(32, 32, b"not zlib at all" * 8), "corrupt"),
        ("DICOM without pixel data", _dicom(32, 32), "no_pixel_data"),
        ("DICOM without pixel data or size", _dicom(None, None), "no_pixel_data"),
        ("DICOM header claims 20000 rows", _dicom(20000, 20000), "too_large"),
    ],
)
def test_bad_uploads_get_their_code(name: str, data: bytes, code: str) -> None:
    assert _code(decode_upload, data, max_bytes=MAX_BYTES) == code, name


def test_truncated_png_and_jpeg_are_named() -> None:
    img = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    png = _png(img)
    ok, jpg = cv2.imencode(".jpg", img)
    assert ok
    for cut in (png[: len(png) // 2], png[:-12], png[:40], jpg.tobytes()[: len(jpg) // 2]):
        assert _code(decode_upload, cut, max_bytes=MAX_BYTES) == "truncated"


def test_byte_limit_is_checked_first() -> None:
    data = _png(np.zeros((64, 64), np.uint8))
    assert _code(decode_upload, data, max_bytes=len(data) - 1) == "too_large"
    assert decode_upload(data, max_bytes=len(data)).shape == (64, 64)


def test_spec_sets_the_side_limits() -> None:
    data = _png(np.zeros((40, 60), np.uint8))
    assert _code(decode_upload, data, max_bytes=MAX_BYTES, spec=PreprocessSpec(min_side=41)) == "too_small"
    assert _code(decode_upload, data, max_bytes=MAX_BYTES, spec=PreprocessSpec(max_side=59)) == "too_large"


def test_a_dicom_of_another_modality_is_refused() -> None:
    pixels = np.tile(np.arange(48) * 80, (32, 1))
    mammogram, ct = images.dicom(pixels, modality="MG"), images.dicom(pixels, modality="CT")
    assert decode_upload(mammogram, max_bytes=MAX_BYTES, modality="mammography").shape == (32, 48)
    assert decode_upload(mammogram, max_bytes=MAX_BYTES).shape == (32, 48)  # nothing asked: nothing checked
    for data, modality, named in [(mammogram, "ultrasound", "'MG'"), (ct, "mammography", "'CT'")]:
        with pytest.raises(InputError) as info:
            decode_upload(data, max_bytes=MAX_BYTES, modality=modality)
        assert info.value.code == "wrong_modality"
        assert named in info.value.message and modality in info.value.message
    # no Modality in the header, or not a DICOM at all: nothing says it is wrong
    untagged = images.dicom(pixels, modality="")
    assert decode_upload(untagged, max_bytes=MAX_BYTES, modality="ultrasound").shape == (32, 48)
    png = _png(_mammogram(0, 64, 48))
    assert decode_upload(png, max_bytes=MAX_BYTES, modality="ultrasound").shape == (64, 48)


def test_check_modality() -> None:
    check_modality("MG", "mammography")
    check_modality(" us ", "ultrasound")
    check_modality("", "mammography")
    for code, modality in [("US", "mammography"), ("MG", "ultrasound"), ("CT", "mammography"),
                           ("MG", "xray")]:
        with pytest.raises(InputError) as info:
            check_modality(code, modality)
        assert info.value.code == "wrong_modality" and repr(code) in info.value.message
    with pytest.raises(InputError, match=r"for ultrasound \(US\)"):
        check_modality("MG", "ultrasound")


def test_input_error_codes_are_closed() -> None:
    err = InputError("empty", "nothing")
    assert isinstance(err, ValueError) and err.to_dict() == {"code": "empty", "message": "nothing"}
    with pytest.raises(ValueError, match="unknown input error code"):
        InputError("oops", "no such code")
    assert {"empty", "not_an_image", "truncated", "too_small", "too_large", "bad_shape", "bad_dtype",
            "not_finite", "no_pixel_data", "unknown_model", "wrong_modality", "malformed_request",
            "unsupported_media_type", "unknown_field", "missing_field", "bad_field"} <= set(INPUT_ERROR_CODES)


# --------------------------------------------------------------------------- validate_array


@pytest.mark.parametrize(
    ("array", "code"),
    [
        (np.full((32, 32), np.nan, np.float32), "not_finite"),
        (np.where(np.eye(32) > 0, np.inf, 0.5), "not_finite"),
        (np.full((32, 32, 3), np.nan), "not_finite"),
        (np.zeros(32, np.uint8), "bad_shape"),
        (np.zeros((2, 32, 32, 1), np.float32), "bad_shape"),
        (np.zeros((32, 32, 2), np.uint8), "bad_shape"),
        ([[1, 2, 3], [4, 5]], "bad_shape"),
        (np.zeros((32, 32), bool), "bad_dtype"),
        (np.zeros((32, 32), np.complex64), "bad_dtype"),
        (np.empty((32, 32), object), "bad_dtype"),
        (np.full((32, 32), "a"), "bad_dtype"),
        (np.full((32, 32), 2.0), "out_of_range"),
        (np.full((32, 32), -0.1, np.float32), "out_of_range"),
        (np.zeros((8, 64), np.uint8), "too_small"),
        (np.zeros((16, 20000), np.uint8), "too_large"),
    ],
)
def test_bad_arrays_get_their_code(array: object, code: str) -> None:
    assert _code(validate_array, array) == code


def test_arrays_convert_like_decoded_files() -> None:
    img = _mammogram(3, 40, 32)
    expected = img.astype(np.float32) / 255.0
    np.testing.assert_array_equal(validate_array(img), expected)
    np.testing.assert_array_equal(validate_array(img[:, :, None]), expected)
    np.testing.assert_allclose(validate_array(np.dstack([img] * 3)), expected)
    np.testing.assert_allclose(validate_array(np.dstack([img] * 3 + [np.zeros_like(img)])), expected)
    np.testing.assert_array_equal(validate_array(expected), expected)  # float [0, 1] unchanged
    wide = validate_array((img.astype(np.uint16) * 16).astype(np.uint16))  # 12-bit data: stretched
    assert wide.min() == 0.0 and wide.max() == pytest.approx(1.0)
    assert not validate_array(np.full((32, 32), 700, np.int64)).any()  # constant → zeros
    assert validate_array(np.zeros((40, 60)), PreprocessSpec(min_side=40, max_side=60)).shape == (40, 60)
    assert _code(validate_array, np.zeros((40, 60)), PreprocessSpec(min_side=41)) == "too_small"


# --------------------------------------------------------------------------- predictions (through the Engine)


def _predict(bundles: dict[str, ModelBundle], model: str, image: np.ndarray, *, explain: bool = False,
             versions: dict[str, str] | None = None) -> dict:
    """One answer of :func:`local_engine` over ``bundles`` for an array input."""
    engine = local_engine(bundles, versions=versions)
    return asyncio.run(engine.predict(model, ImageInput(array=image), explain=explain))


def test_concurrent_requests_equal_one_model_call_of_their_batch(tumor: ModelBundle) -> None:
    images = [_mammogram(0), _mammogram(1, 120, 100), _mammogram(2, 200, 90)]
    engine = local_engine({"tumor": tumor}, versions={"tumor": "7"}, stages={"tumor": "production"})

    async def all_at_once() -> list[dict]:
        return await asyncio.gather(*(engine.predict("tumor", ImageInput(array=img)) for img in images))

    answers = asyncio.run(all_at_once())
    assert len(answers) == 3
    json.dumps(answers)  # JSON-able as is
    # The model service merges concurrent requests into one call: its rows are the answers.
    batch, _ = tumor.prepare([img.astype(np.float32) / 255.0 for img in images])
    for img, answer, expected in zip(images, answers, tumor.predict(batch), strict=True):
        got = np.array([answer["probabilities"][c] for c in ("benign", "malignant", "normal")])
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert answer["predicted"] == ("benign", "malignant", "normal")[int(np.argmax(expected))]
        assert answer["confidence"] == pytest.approx(float(expected.max()), abs=1e-5)
        assert (answer["height"], answer["width"]) == img.shape
        assert answer | {"probabilities": None, "predicted": None, "confidence": None} == {
            "model": "tumor", "version": "7", "stage": "production", "spec_id": CLS_SPEC.spec_id,
            "task": "classification", "width": img.shape[1], "height": img.shape[0],
            "probabilities": None, "predicted": None, "confidence": None,
        }  # no heatmap keys without explain, no roi key without a roi


def test_the_served_class_follows_the_contracts_decision_rule(tumor: ModelBundle) -> None:
    from breastscan.decision import DecisionRule

    names = ("benign", "malignant", "normal")
    images = [_mammogram(seed) for seed in range(6)]
    batch, _ = tumor.prepare([img.astype(np.float32) / 255.0 for img in images])
    expected = tumor.predict(batch)
    ratio = DecisionRule("positive_ratio", positive="malignant", versus="benign", cutoff=0.5).ratio(
        expected, names)
    differs = False
    for cutoff in (float(ratio.min()), float(np.nextafter(ratio.max(), 1.0))):  # every image / none
        rule = DecisionRule("positive_ratio", positive="malignant", versus="benign", cutoff=cutoff)
        served = tumor.with_decision(rule)
        called = rule.decide(expected, names)
        differs |= bool((called != expected.argmax(axis=1)).any())
        for img, k, row in zip(images, called, expected, strict=True):
            answer = _predict({"tumor": served}, "tumor", img)
            assert answer["predicted"] == names[k]
            assert answer["confidence"] == pytest.approx(float(row[k]), abs=1e-5)  # p of the predicted class
            assert set(answer) == {"model", "version", "stage", "spec_id", "task", "width", "height",
                                   "probabilities", "predicted", "confidence"}  # the answer's keys as before
    assert differs  # one of the two rules calls some image otherwise than the arg-max


def test_calibration_temperature_is_applied(tumor: ModelBundle) -> None:
    img = _mammogram(4)
    hot = _predict({"tumor": tumor}, "tumor", img)["probabilities"]
    cold = _predict({"tumor": tumor.with_temperature(0.5)}, "tumor", img)["probabilities"]
    assert max(cold.values()) >= max(hot.values())  # lower temperature: more confident


def test_explain_returns_heatmap_and_overlay_at_original_size(tumor: ModelBundle) -> None:
    for img in (_mammogram(5, 150, 70), _mammogram(6)):
        answer = _predict({"tumor": tumor}, "tumor", img, explain=True)
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
    assert answer["version"] == "3"
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
    assert lesion_bbox(np.zeros((3, 3), bool)) is None


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
    nan = ImageInput(array=np.full((40, 40), np.nan))
    assert _code(asyncio.run, engine.predict("tumor", nan)) == "not_finite"
    assert calls == []
    asyncio.run(engine.predict("tumor", ImageInput(array=_mammogram(0))))
    assert calls == [1]


def test_one_bad_image_of_a_batch_names_its_index(tumor: ModelBundle) -> None:
    with pytest.raises(InputError, match="image 1") as info:
        prepare_inputs(tumor.spec, tumor.contract, [_mammogram(0), np.full((40, 40), np.nan)])
    assert info.value.code == "not_finite"
    empty = prepare_inputs(tumor.spec, tumor.contract, [])
    assert empty.batch.shape == (0, 48, 40, 1)
    assert finish_predictions(tumor.contract, tumor.spec.spec_id, empty, tumor.predict(empty.batch)) == []


def test_png_base64_round_trips_rgb() -> None:
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 200  # red
    back = _decode_b64_png(png_base64(rgb))
    assert back.shape == (4, 5, 3) and (back[..., 2] == 200).all() and not back[..., 0].any()


# --------------------------------------------------------------------------- analyze (through the Engine)


def test_analyze_mammography_adds_eight_category(density: ModelBundle, tumor: ModelBundle,
                                                 lesion: ModelBundle) -> None:
    engine = local_engine({"density": density, "tumor": tumor, "lesion": lesion},
                          versions={"tumor": "2"}, stages={"tumor": "production"})
    img = _mammogram(7)
    result = asyncio.run(engine.analyze(ImageInput(array=img), modality="mammography"))
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
    result = asyncio.run(engine.analyze(ImageInput(array=img), modality="ultrasound"))
    assert set(result["models"]) == {"lesion"} and "eight_category" not in result
    # Mammography with a density model only: no combined view.
    alone = local_engine({"density": density})
    assert "eight_category" not in asyncio.run(alone.analyze(ImageInput(array=_mammogram(0)),
                                                             modality="mammography"))


def test_unknown_modality_and_model(density: ModelBundle) -> None:
    engine = local_engine({"density": density})
    image = ImageInput(array=_mammogram(0))
    assert _code(asyncio.run, engine.analyze(image, modality="mri")) == "unknown_modality"
    assert _code(asyncio.run, engine.analyze(image, modality="ultrasound")) == "unknown_modality"
    assert engine.select("density").contract is density.contract
    assert _code(engine.select, "tumour") == "unknown_model"
    with pytest.raises(InputError, match="served: density") as info:
        asyncio.run(engine.predict("tumour", image))
    assert info.value.code == "unknown_model"
