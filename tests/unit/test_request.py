"""breastscan.serving.request: a request parsed once, every client mistake with its code.

The image checks (decoding, arrays, modality, region of interest), the parse of an HTTP
body against its route's declared fields, and the gRPC messages, each into the one
:class:`breastscan.serving.request.Request`. What the answers hold is test_answer.py's;
the HTTP edge around the parse is test_http.py's.
"""

from __future__ import annotations

import json
import struct
import zlib

import cv2
import numpy as np
import pytest
from urllib3.filepost import encode_multipart_formdata

from breastscan.data.phantoms import mammography_phantom
from breastscan.imaging.preprocessing import DECODE_REASONS, PreprocessSpec
from breastscan.serving.answer import ERRORS, ApiError
from breastscan.serving.proto.breastscan.v1 import breastscan_pb2 as pb
from breastscan.serving.request import (
    ROUTE_FIELDS,
    ImageInput,
    Request,
    api_routes,
    array_from_proto,
    check_dicom_output,
    check_modality,
    crop,
    decode_upload,
    dicom_modality_code,
    from_proto,
    image_from_proto,
    parse_http,
    parse_roi,
    parse_urlencoded,
    predict_request,
    validate_array,
)
from tests.services import images

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


def _code(call, *args, **kwargs) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(ApiError) as info:
        call(*args, **kwargs)
    assert info.value.message and str(info.value) == info.value.message
    return info.value.code


def _mammogram(seed: int, height: int = 160, width: int = 128) -> np.ndarray:
    return mammography_phantom(np.random.default_rng(seed), density=1 + seed % 4,
                               pathology=("benign", "malignant", "normal")[seed % 3],
                               height=height, width=width)[0]


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
        with pytest.raises(ApiError) as info:
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
        with pytest.raises(ApiError) as info:
            check_modality(code, modality)
        assert info.value.code == "wrong_modality" and repr(code) in info.value.message
    with pytest.raises(ApiError, match=r"for ultrasound \(US\)"):
        check_modality("MG", "ultrasound")


def test_every_decode_reason_is_an_error_code() -> None:
    """decode_upload answers a decoder's refusal with its reason as the code: each must be one."""
    assert set(DECODE_REASONS) <= set(ERRORS)


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


# --------------------------------------------------------------------------- roi, arrays, DICOM headers


def test_parse_roi_and_crop() -> None:
    assert parse_roi("") is None and parse_roi(None) is None and parse_roi([]) is None
    assert parse_roi(" 1, 2,3 ,4") == (1, 2, 3, 4) and parse_roi([5, 6, 7, 8]) == (5, 6, 7, 8)
    for bad in ("1,2,3", "a,b,c,d", "0,0,0,5", "-1,0,5,5", [1, 2, 3, 4, 5]):
        assert _code(parse_roi, bad) == "bad_roi"
    img = np.arange(20 * 30, dtype=np.float32).reshape(20, 30)
    assert crop(img, (2, 3, 10, 5)).shape == (5, 10) and crop(img, (2, 3, 10, 5))[0, 0] == img[3, 2]
    assert crop(img, None) is img
    with pytest.raises(ApiError, match="inside the 30x20 image"):
        crop(img, (25, 0, 10, 5))


def test_arrays_are_read_as_their_declared_dtype() -> None:
    as_u8 = ImageInput.from_array([[0, 255]] * 2, "uint8").array
    assert as_u8 is not None and as_u8.dtype == np.uint8
    as_float = ImageInput.from_array([[0.0, 0.5]], "float32").array
    assert as_float is not None and as_float.dtype == np.float32
    assert ImageInput.from_array([[1, 2]], None, (0, 0, 1, 1)).roi == (0, 0, 1, 1)
    for values, dtype, code in [([[0, 256]], "uint8", "bad_dtype"), ([[0.5, 1.0]], "uint16", "bad_dtype"),
                                ([[1, 2]], "complex64", "bad_dtype"), ([[1, 2], [3]], None, "bad_shape"),
                                ([["a", "b"]], "uint8", "bad_dtype"),
                                ([[float("nan"), 1.0]], "uint8", "not_finite")]:
        assert _code(ImageInput.from_array, values, dtype) == code, (values, dtype)


def test_dicom_modality_code_reads_the_header() -> None:
    pixels = images.ultrasound(1).astype(np.uint16)
    assert dicom_modality_code(images.dicom(pixels, modality="US")) == "US"
    assert dicom_modality_code(images.dicom(pixels, modality="CT")) == "CT"
    assert dicom_modality_code(images.dicom(pixels, modality="")) == ""
    assert dicom_modality_code(images.png(images.mammogram(1))) == ""
    assert dicom_modality_code(b"\0" * 128 + b"DICM" + b"\xff" * 20) == ""  # does not parse


def test_dicom_results_need_a_whole_dicom_image() -> None:
    dicom = images.dicom(images.ultrasound(1).astype(np.uint16), modality="US")
    check_dicom_output(dicom, None)
    assert _code(check_dicom_output, images.png(images.ultrasound(1)), None) == "not_dicom"
    assert _code(check_dicom_output, None, None) == "not_dicom"
    assert _code(check_dicom_output, dicom, (0, 0, 8, 8)) == "bad_roi"


# --------------------------------------------------------------------------- HTTP bodies into a Request


ROUTES = api_routes(["tumor", "lesion"])
PNG = images.png(images.mammogram(1))


def _form(fields: dict[str, object]) -> tuple[bytes, str]:
    """``(body, content type)`` of a multipart/form-data request with ``fields``."""
    return encode_multipart_formdata(fields)


def test_the_routes_are_the_fixed_ones_and_one_per_model() -> None:
    assert set(ROUTES) == {*ROUTE_FIELDS, "/tumor", "/lesion"}
    tumor = ROUTES["/tumor"]
    assert (tumor.action, tumor.model, dict(tumor.fields), tumor.required) == (
        "predict", "tumor", {"image": "file", "explain": "bool", "roi": "roi"}, frozenset({"image"}))
    assert ROUTES["/predict"].model is None and ROUTES["/models"].listing() == "no fields"
    for name in ("predict", "models", "docs", "metrics", "ui", "no-dash"):
        with pytest.raises(ValueError, match=repr(name)):
            api_routes([name])


def test_a_form_becomes_its_request() -> None:
    body, ctype = _form({"model": "tumor", "image": ("m.png", PNG, "image/png"), "explain": "yes",
                         "roi": "1,2,30,40"})
    request = parse_http(ROUTES["/predict"], ctype, body, request_id="r1", caller="clinic")
    assert request == predict_request("tumor", ImageInput(data=PNG, roi=(1, 2, 30, 40)), explain=True,
                                      request_id="r1")
    assert request.caller == "clinic"
    body, ctype = _form({"image": ("m.png", PNG, "image/png"), "modality": "ultrasound", "dicom": "1"})
    assert parse_http(ROUTES["/analyze"], ctype, body) == Request(
        "analyze", image=ImageInput(data=PNG), modality="ultrasound", dicom=True)
    body, ctype = _form({"image": ("m.png", PNG, "image/png")})
    assert parse_http(ROUTES["/preview"], ctype, body) == Request("preview", image=ImageInput(data=PNG))
    assert parse_http(ROUTES["/lesion"], ctype, body) == predict_request("lesion", ImageInput(data=PNG))


def test_a_json_body_becomes_its_request() -> None:
    body = json.dumps({"model": "tumor", "array": [[0, 255], [255, 0]], "dtype": "uint8", "explain": True,
                       "roi": [0, 0, 2, 1]}).encode()
    request = parse_http(ROUTES["/predict_array"], "application/json", body)
    assert (request.action, request.model, request.explain) == ("predict", "tumor", True)
    assert request.image is not None and request.image.roi == (0, 0, 2, 1)
    np.testing.assert_array_equal(request.image.array, np.array([[0, 255], [255, 0]], np.uint8))
    assert request.image.array.dtype == np.uint8
    assert parse_http(ROUTES["/models"], "", b"") == Request("models")
    assert parse_http(ROUTES["/models"], "application/json", b"{}") == Request("models")


def test_parse_urlencoded_decodes_names_and_values() -> None:
    parts = parse_urlencoded(b"roi=1%2C2%2C3%2C4&explain=on&&a+b=c+d")
    assert [(p.name, p.data, p.is_file) for p in parts] == [
        ("roi", b"1,2,3,4", False), ("explain", b"on", False), ("a b", b"c d", False)]


# --------------------------------------------------------------------------- gRPC messages into a Request


def test_grpc_messages_become_their_requests() -> None:
    image = pb.Image(file=PNG, roi=[1, 2, 3, 4])
    assert from_proto("Predict", pb.PredictRequest(model="tumor", image=image, explain=True),
                      request_id="r") == predict_request("tumor", ImageInput(data=PNG, roi=(1, 2, 3, 4)),
                                                         explain=True, request_id="r")
    assert from_proto("Analyze", pb.AnalyzeRequest(image=pb.Image(file=PNG), modality="", dicom=True)) == \
        Request("analyze", image=ImageInput(data=PNG), modality=None, dicom=True)
    assert from_proto("Preview", pb.PreviewRequest(image=pb.Image(file=PNG))) == \
        Request("preview", image=ImageInput(data=PNG))
    assert from_proto("ListModels", pb.ListModelsRequest()) == Request("models")
    assert image_from_proto(pb.Image()) == ImageInput()  # no source: the engine answers "empty"


def test_an_array_message_is_read_little_endian() -> None:
    values = np.arange(12, dtype=np.uint16).reshape(3, 4) * 300
    message = pb.Array(shape=[3, 4], dtype="uint16", data=values.astype("<u2").tobytes())
    read = array_from_proto(message)
    np.testing.assert_array_equal(read, values)
    assert read.dtype == np.uint16 and read.dtype.isnative
    image = image_from_proto(pb.Image(array=message, roi=[0, 0, 2, 2]))
    assert image.data is None and image.roi == (0, 0, 2, 2)
    np.testing.assert_array_equal(image.array, values)


@pytest.mark.parametrize(("shape", "dtype", "size", "code"), [
    ([32, 32], "complex64", 8192, "bad_dtype"),
    ([32, 32], "int64", 8192, "bad_dtype"),
    ([32, 32], "uint8", 100, "bad_shape"),
    ([32, 32], "uint16", 4096, "bad_shape"),
    ([-32, -32], "uint8", 1024, "bad_shape"),
])
def test_a_bad_array_message_gets_its_code(shape: list[int], dtype: str, size: int, code: str) -> None:
    assert _code(array_from_proto, pb.Array(shape=shape, dtype=dtype, data=b"\0" * size)) == code
