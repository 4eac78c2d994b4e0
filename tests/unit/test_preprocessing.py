"""breastscan.imaging.preprocessing: every input type decodes to [0, 1] gray; the spec round-trips."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from breastscan.imaging.preprocessing import (
    DECODE_REASONS,
    ImageDecodeError,
    PreprocessSpec,
    decode_image,
    enhance,
    letterbox,
    preprocess_image,
    preprocess_mask,
)
from breastscan.serving.answer import ERRORS, ApiError
from breastscan.serving.request import decode_upload
from tests.services import images


def _gradient(h: int = 40, w: int = 60) -> np.ndarray:
    """(h, w) uint8 with a horizontal ramp 0..255."""
    return np.tile(np.linspace(0, 255, w).astype(np.uint8), (h, 1))


def _encode(arr: np.ndarray, ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, arr)
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("ext", [".png", ".jpg", ".pgm", ".bmp", ".tif"])
def test_decode_8bit_formats(ext: str) -> None:
    img = _gradient()
    out = decode_image(_encode(img, ext))
    assert out.dtype == np.float32 and out.shape == img.shape
    assert 0.0 <= out.min() and out.max() <= 1.0
    # lossless formats keep values exactly; JPEG within a small tolerance
    tol = 0.05 if ext == ".jpg" else 1e-6
    np.testing.assert_allclose(out, img / 255.0, atol=tol)


def test_decode_16bit_is_stretched_to_full_range() -> None:
    img = (np.linspace(0, 4095, 64 * 64).reshape(64, 64)).astype(np.uint16)  # 12-bit data
    out = decode_image(_encode(img, ".png"))
    assert out.min() == pytest.approx(0.0) and out.max() == pytest.approx(1.0)


def test_decode_rgb_and_rgba_become_gray() -> None:
    gray = _gradient()
    bgr = np.dstack([gray, gray, gray])
    bgra = np.dstack([gray, gray, gray, np.full_like(gray, 7)])
    for arr in (bgr, bgra):
        out = decode_image(_encode(arr, ".png"))
        assert out.ndim == 2
        np.testing.assert_allclose(out, gray / 255.0, atol=1 / 255)


def test_decode_from_path(tmp_path) -> None:
    p = tmp_path / "x.png"
    cv2.imwrite(str(p), _gradient())
    assert decode_image(p).shape == (40, 60)
    assert decode_image(str(p)).shape == (40, 60)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty input"),
        (b"this is not an image at all" * 10, "not an image"),
    ],
)
def test_decode_rejects_non_images(data: bytes, message: str) -> None:
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data)


def test_decode_rejects_truncated_png_and_jpeg() -> None:
    png = _encode(_gradient(200, 200), ".png")
    jpg = _encode(_gradient(200, 200), ".jpg")
    with pytest.raises(ImageDecodeError, match="truncated PNG"):
        decode_image(png[: len(png) // 2])
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(jpg[: len(jpg) - 100])


def test_decode_size_limits_are_checked_from_header() -> None:
    tiny = _encode(np.zeros((1, 1), np.uint8), ".png")
    with pytest.raises(ImageDecodeError, match="at least 16"):
        decode_image(tiny)
    # A 20000 x 20000 PNG header: refused before any pixel is decoded.
    buf = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buf, format="PNG")
    with pytest.raises(ImageDecodeError, match="at most 16384"):
        decode_image(buf.getvalue())


# --------------------------------------------------------------------------- decode reasons


def test_every_decode_reason_is_an_error_code_of_the_service() -> None:
    assert len(set(DECODE_REASONS)) == len(DECODE_REASONS) == 10
    assert set(DECODE_REASONS) <= set(ERRORS), set(DECODE_REASONS) - set(ERRORS)


def test_decode_error_reason_is_checked_defaults_to_corrupt_and_pickles() -> None:
    assert ImageDecodeError("does not decode").reason == "corrupt"
    again = pickle.loads(pickle.dumps(ImageDecodeError("cut short", reason="truncated")))
    assert isinstance(again, ImageDecodeError) and again.reason == "truncated" and str(again) == "cut short"
    with pytest.raises(ValueError, match="unknown decode reason 'cut'"):
        ImageDecodeError("cut short", reason="cut")


def _nan_tiff() -> bytes:
    pixels = np.full((32, 32), 0.5, np.float32)
    pixels[3, 3] = np.nan
    return _encode(pixels, ".tif")


_PNG = _encode(_gradient(64, 64), ".png")
_JPEG = _encode(_gradient(64, 64), ".jpg")
BROKEN = {
    "empty bytes": (lambda: b"", "empty"),
    "cut PNG": (lambda: _PNG[: len(_PNG) // 2], "truncated"),
    "cut JPEG": (lambda: _JPEG[: len(_JPEG) // 2], "truncated"),
    "2x2 image": (lambda: _encode(np.zeros((2, 2), np.uint8), ".png"), "too_small"),
    "header claims 20000x20000": (lambda: images.png_claiming(20000, 20000), "too_large"),
    "DICOM without pixel data": (lambda: images.dicom(None), "no_pixel_data"),
    "NaN in a float TIFF": (_nan_tiff, "not_finite"),
    "garbage bytes": (lambda: np.random.default_rng(0).bytes(2000), "not_an_image"),
    "DICOM preamble, garbage after": (lambda: b"\0" * 128 + b"DICM" + b"\xff" * 40, "corrupt"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_input_gets_its_reason_and_the_service_answers_it(name: str) -> None:
    make, reason = BROKEN[name]
    data = make()
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data)
    assert info.value.reason == reason, str(info.value)
    with pytest.raises(ApiError) as answered:
        decode_upload(data, max_bytes=1 << 20)
    assert answered.value.code == reason, answered.value.message


def test_letterbox_keeps_aspect_and_centres() -> None:
    img = np.ones((50, 100), np.float32)
    out, geom = letterbox(img, 64, 64)
    assert out.shape == (64, 64)
    rows = np.nonzero(out.sum(axis=1))[0]
    assert len(rows) == 32 and rows[0] == 16  # 100 -> 64 wide, 50 -> 32 tall, centred
    assert geom.pad_top == 16 and geom.pad_left == 0
    back = geom.unletterbox(out)
    assert back.shape == (50, 100)
    np.testing.assert_allclose(back, 1.0, atol=1e-6)


def test_letterbox_stretch_when_aspect_not_kept() -> None:
    out, geom = letterbox(np.ones((50, 100), np.float32), 64, 64, keep_aspect=False)
    assert out.min() == 1.0 and geom.pad_top == 0 and geom.pad_left == 0


def test_preprocess_image_shape_range_and_spec_steps() -> None:
    rng = np.random.default_rng(0)
    img = rng.random((90, 70)).astype(np.float32) * 0.3 + 0.2  # low contrast
    plain = PreprocessSpec(height=32, width=48)
    x, _ = preprocess_image(img, plain)
    assert x.shape == (32, 48, 1) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    enhanced, _ = preprocess_image(img, PreprocessSpec(height=32, width=48, clahe=True))
    # CLAHE spreads the histogram of a low-contrast image
    assert enhanced.std() > x.std()


def test_unsharp_increases_edge_contrast() -> None:
    step = np.zeros((32, 32), np.float32)
    step[:, 16:] = 0.6
    step += 0.2
    sharp = enhance(step, PreprocessSpec(unsharp=True, unsharp_amount=1.0, unsharp_sigma=2.0))
    assert sharp.max() > step.max() and sharp.min() < step.min()  # overshoot at the edge
    assert 0.0 <= sharp.min() and sharp.max() <= 1.0


def test_preprocess_rejects_nan_and_wrong_rank() -> None:
    spec = PreprocessSpec(height=16, width=16)
    with pytest.raises(ImageDecodeError, match="NaN") as info:
        preprocess_image(np.full((20, 20), np.nan, np.float32), spec)
    assert info.value.reason == "not_finite"
    with pytest.raises(ImageDecodeError, match="2-D") as info:
        preprocess_image(np.zeros((20, 20, 3), np.float32), spec)
    assert info.value.reason == "bad_shape"


def test_mask_follows_image_geometry() -> None:
    spec = PreprocessSpec(height=64, width=64)
    img = np.zeros((50, 100), np.float32)
    mask = np.zeros((50, 100), bool)
    img[10:20, 60:80] = 1.0
    mask[10:20, 60:80] = True
    x, _ = preprocess_image(img, spec)
    m = preprocess_mask(mask, spec)
    assert m.shape == (64, 64, 1) and set(np.unique(m)) <= {0.0, 1.0}
    # the bright square and the mask land on the same pixels
    overlap = ((x[..., 0] > 0.5) & (m[..., 0] > 0.5)).sum() / (m > 0.5).sum()
    assert overlap > 0.9


def test_spec_round_trip_and_id(tmp_path) -> None:
    spec = PreprocessSpec(height=96, width=80, clahe=True, unsharp=True, unsharp_amount=0.7)
    path = spec.save(tmp_path)
    assert path.name == "preprocess.json"
    loaded = PreprocessSpec.load(tmp_path)
    assert loaded == spec and loaded.spec_id == spec.spec_id
    assert PreprocessSpec(height=96, width=81).spec_id != spec.spec_id


def test_spec_rejects_unknown_keys_and_tampering(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown preprocessing keys: clahe_clip"):
        PreprocessSpec.from_dict({"clahe_clip": 3})
    path = PreprocessSpec().save(tmp_path)
    path.write_text(path.read_text().replace('"height": 128', '"height": 64'))
    with pytest.raises(ValueError, match="does not match"):
        PreprocessSpec.load(path)


# --------------------------------------------------------------------------- CLAHE depth


def test_clahe_bits_default_keeps_saved_specs_and_their_ids(tmp_path: Path) -> None:
    import hashlib
    import json

    legacy = {"height": 160, "width": 128, "keep_aspect": True, "clahe": True, "clahe_clip_limit": 2.0,
              "clahe_tile_grid": 8, "unsharp": False, "unsharp_sigma": 1.0, "unsharp_amount": 0.5,
              "min_side": 16, "max_side": 16384}  # a spec as saved before clahe_bits existed
    legacy_id = hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:12]
    (tmp_path / "preprocess.json").write_text(json.dumps({**legacy, "spec_id": legacy_id}))
    loaded = PreprocessSpec.load(tmp_path)
    assert loaded.clahe_bits == 16 and loaded.spec_id == legacy_id
    fast = PreprocessSpec.from_dict({**legacy, "clahe_bits": 8})
    assert fast.spec_id != legacy_id
    fast.save(tmp_path / "fast")
    assert PreprocessSpec.load(tmp_path / "fast") == fast
    with pytest.raises(ValueError, match="clahe_bits"):
        PreprocessSpec(clahe=True, clahe_bits=12)


def test_clahe_at_8_bits_is_opencvs_8_bit_clahe_and_differs_from_16() -> None:


    rng = np.random.default_rng(3)
    image = cv2.GaussianBlur(rng.random((160, 128)).astype(np.float32), (0, 0), 6)
    image = (image - image.min()) / (image.max() - image.min())
    eight = enhance(image, PreprocessSpec(clahe=True, clahe_bits=8))
    sixteen = enhance(image, PreprocessSpec(clahe=True, clahe_bits=16))
    levels = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    expected = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(levels).astype(np.float32) / 255
    np.testing.assert_array_equal(eight, expected)
    assert eight.dtype == sixteen.dtype == np.float32 and 0 <= eight.min() and eight.max() <= 1
    assert np.abs(eight - sixteen).mean() > 0.01  # two transforms, not one at two precisions
