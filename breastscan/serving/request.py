"""A request to the service, parsed once: :class:`Request`, and everything about reading it.

Every way in builds the same typed :class:`Request` -- the HTTP edge from a form or JSON
body (:func:`parse_http`, against the route's declared fields, :data:`ROUTE_FIELDS`), the
gRPC server from a message (:func:`from_proto`), ``breastscan predict``, the tests and
notebooks by constructing it -- and every later step (the engine, its batcher, the
answer) receives that object. No step parses a field again.

The image a request carries is checked and decoded by :func:`decode_upload` (a file) or
:func:`validate_array` (raw pixels) into the ``(H, W)`` float32 gray image in [0, 1]
preprocessing takes; :func:`crop` applies the region of interest. Every client mistake
raises :class:`breastscan.serving.answer.ApiError` with a code of the error table
(:data:`breastscan.serving.answer.ERRORS`). Nothing here imports Keras or TensorFlow.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus, unquote_to_bytes

import numpy as np
import orjson
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from breastscan.imaging.preprocessing import ImageDecodeError, PreprocessSpec, decode_image, is_dicom
from breastscan.labels import DICOM_MODALITY_CODES
from breastscan.serving.answer import ApiError

log = logging.getLogger(__name__)

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_PIXEL_KINDS = "uif"  # unsigned, signed integer, floating point

ARRAY_DTYPES = ("uint8", "uint16", "int16", "int32", "float32", "float64")
"""dtype names an array input may declare (JSON and gRPC carry no dtype of their own)."""

MAX_PARTS = 32
"""Most parts a multipart body may have (every route takes a handful of fields)."""



# --------------------------------------------------------------------------- the image


@dataclass(frozen=True)
class ImageInput:
    """One image in a request: a file's bytes or an array, and an optional crop.

    Attributes:
        data: the bytes of an image file (PNG, JPEG, PGM, TIFF, BMP, DICOM), or ``None``.
        array: one image as an array (see :func:`validate_array`), or
            ``None``. Exactly one of ``data`` and ``array`` is set.
        roi: ``(x, y, w, h)`` region of interest in the image's pixel coordinates, or
            ``None`` for the whole image. Answers are then about (and sized as) the crop.
    """

    data: bytes | None = None
    array: np.ndarray | None = None
    roi: tuple[int, int, int, int] | None = None

    @classmethod
    def from_array(cls, values: Any, dtype: str | None = None,
                   roi: tuple[int, int, int, int] | None = None) -> ImageInput:
        """An array input from nested lists (JSON) or an array, cast to a declared dtype.

        Args:
            values: ``(H, W)`` or ``(H, W, C)`` numbers.
            dtype: one of :data:`ARRAY_DTYPES`; ``None`` keeps NumPy's own reading
                (JSON integers become int64 and are min-max stretched, floats must be in [0, 1]).
            roi: optional ``(x, y, w, h)`` crop.

        Raises:
            ApiError: ``bad_dtype`` (unknown dtype, or values that do not fit it) or
                ``bad_shape`` (ragged lists).
        """
        if dtype is not None and dtype not in ARRAY_DTYPES:
            raise ApiError("bad_dtype", f"dtype {dtype!r} is not supported; use one of "
                                          f"{', '.join(ARRAY_DTYPES)}")
        try:
            arr = np.asarray(values)
        except (TypeError, ValueError) as exc:
            raise ApiError("bad_shape", f"not a rectangular array: {exc}") from None
        if arr.dtype == object:
            raise ApiError("bad_shape", "not a rectangular array of numbers")
        if dtype is not None and arr.dtype != np.dtype(dtype):
            target = np.dtype(dtype)
            if arr.size and target.kind in "iu" and arr.dtype.kind in "iuf":
                info = np.iinfo(target)
                finite = np.isfinite(arr) if arr.dtype.kind == "f" else np.ones(arr.shape, bool)
                if not finite.all():
                    raise ApiError("not_finite", "image contains NaN or infinite values")
                lo, hi = float(arr.min()), float(arr.max())
                fractional = arr.dtype.kind == "f" and not np.all(arr == np.rint(arr))
                if lo < info.min or hi > info.max or fractional:
                    raise ApiError("bad_dtype", f"values in [{lo:.6g}, {hi:.6g}] are not {dtype} pixels")
            try:
                with np.errstate(invalid="ignore", over="ignore"):
                    arr = arr.astype(target)
            except (TypeError, ValueError) as exc:
                raise ApiError("bad_dtype", f"cannot read the values as {dtype}: {exc}") from None
        return cls(array=arr, roi=roi)


def parse_roi(text: str | Sequence[int] | None) -> tuple[int, int, int, int] | None:
    """Read a region of interest given as ``"x,y,w,h"`` or four integers.

    Returns:
        ``(x, y, w, h)``, or ``None`` for an empty value.

    Raises:
        ApiError: ``bad_roi`` when it is not four integers with ``w, h > 0``, ``x, y >= 0``.
    """
    if text is None or (isinstance(text, str) and not text.strip()) or (
            not isinstance(text, str) and len(text) == 0):
        return None
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        x, y, w, h = (int(str(p).strip()) for p in parts)
    except ValueError:
        raise ApiError("bad_roi", f"roi must be four integers x,y,w,h; got {text!r}") from None
    if x < 0 or y < 0 or w <= 0 or h <= 0:
        raise ApiError("bad_roi", f"roi x,y must be >= 0 and w,h > 0; got {x},{y},{w},{h}")
    return x, y, w, h


def crop(gray: np.ndarray, roi: tuple[int, int, int, int] | None) -> np.ndarray:
    """Crop an ``(H, W)`` image to ``roi = (x, y, w, h)`` (``None``: unchanged).

    Raises:
        ApiError: ``bad_roi`` when the region does not lie inside the image.
    """
    if roi is None:
        return gray
    x, y, w, h = roi
    height, width = gray.shape[:2]
    if x + w > width or y + h > height:
        raise ApiError("bad_roi", f"roi {x},{y},{w},{h} does not lie inside the {width}x{height} image")
    return gray[y : y + h, x : x + w]


def dicom_modality_code(data: bytes) -> str:
    """The Modality code a DICOM file's header names (``MG``, ``US``, ``CT`` ...), read without
    its pixels; ``""`` for another kind of file, a header without the tag, or one that does not parse."""
    if not is_dicom(data):
        return ""
    from breastscan.imaging.dicom import load_dataset

    try:
        header = load_dataset(data, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 -- decoding reports what is wrong with the file
        return ""
    return str(header.get("Modality", "") or "").strip().upper()





def decode_upload(
    data: bytes | bytearray | memoryview,
    *,
    max_bytes: int,
    spec: PreprocessSpec | None = None,
    modality: str | None = None,
) -> np.ndarray:
    """Decode an uploaded image file (PNG, JPEG, PGM, TIFF, BMP, DICOM; 8/16-bit; gray/RGB/RGBA).

    Sizes are checked before pixels are decoded: the byte count first, then the width and
    height from the file's header (for DICOM from Rows/Columns), so a decompression bomb is
    refused without allocating it. A DICOM header's Modality must be ``modality`` when one
    is asked for (a file without the tag passes: nothing says it is wrong).

    Args:
        data: the file's bytes.
        max_bytes: largest accepted upload in bytes.
        spec: the preprocessing spec whose ``min_side``/``max_side`` apply (default: the
            defaults of :class:`PreprocessSpec`).
        modality: the modality the image must be (``mammography``, ``ultrasound``), checked
            against a DICOM header's Modality (0008,0060); ``None`` checks nothing.

    Returns:
        ``(H, W)`` float32 gray in [0, 1] at the file's own size (see
        :func:`breastscan.imaging.preprocessing.decode_image`: 16-bit data is min-max stretched,
        DICOM goes through its LUTs, alpha is dropped).

    Raises:
        ApiError: ``empty``, ``too_large``, ``too_small``, ``not_an_image``,
            ``truncated``, ``corrupt``, ``unsupported``, ``no_pixel_data``, ``not_finite``,
            ``bad_shape`` or ``wrong_modality``.
    """
    spec = spec or PreprocessSpec()
    raw = bytes(data)
    if not raw:
        raise ApiError("empty", "empty upload: no bytes to decode")
    if len(raw) > max_bytes:
        raise ApiError("too_large", f"upload is {len(raw)} bytes; at most {max_bytes} are accepted")
    # An upload cut short is the commonest broken file: name it before the decoder, whose
    # own message for a cut PNG is only "does not decode".
    if raw.startswith(_PNG_MAGIC) and b"IEND" not in raw[-32:]:
        raise ApiError("truncated", "truncated PNG: the file ends before its IEND chunk")
    if raw.startswith(_JPEG_MAGIC) and b"\xff\xd9" not in raw[-64:]:
        raise ApiError("truncated", "truncated JPEG: the end-of-image marker is missing")
    try:
        if is_dicom(raw):
            _check_dicom_header(raw, spec, modality)
        return decode_image(raw, min_side=spec.min_side, max_side=spec.max_side)
    except ImageDecodeError as exc:
        raise ApiError(exc.reason, str(exc)) from None  # the reasons are error codes of ERRORS


def _check_dicom_header(raw: bytes, spec: PreprocessSpec, modality: str | None) -> None:
    """Check the Modality and Rows/Columns of a DICOM header before its pixel data is decoded."""
    from breastscan.imaging.dicom import load_dataset

    header = load_dataset(raw, stop_before_pixels=True)
    if modality is not None:
        check_modality(str(header.get("Modality", "") or ""), modality)
    rows, cols = header.get("Rows"), header.get("Columns")
    if rows is None or cols is None:
        return  # no image attributes: decoding says what is missing
    try:
        height, width = int(rows), int(cols)
    except (TypeError, ValueError):
        raise ImageDecodeError("corrupt DICOM image attributes (Rows/Columns)", reason="corrupt") from None
    _check_side(height, width, spec)


def check_modality(code: str, modality: str) -> None:
    """Refuse an image whose DICOM Modality code is not the one a model was trained on.

    Args:
        code: the header's Modality (0008,0060), e.g. ``MG``, ``US``, ``CT``; empty when
            the header has none (accepted: nothing says the image is wrong).
        modality: the model's modality (``mammography``, ``ultrasound``).

    Raises:
        ApiError: ``wrong_modality`` naming both.
    """
    code = code.strip().upper()
    if code and DICOM_MODALITY_CODES.get(code) != modality:
        wanted = ", ".join(c for c, name in DICOM_MODALITY_CODES.items() if name == modality) or modality
        raise ApiError("wrong_modality", f"the DICOM header says Modality {code[:16]!r}; the model is "
                                           f"for {modality} ({wanted})")


def _check_side(height: int, width: int, spec: PreprocessSpec) -> None:
    if min(height, width) < spec.min_side:
        raise ApiError("too_small", f"image is {width}x{height} pixels; the smallest side must be "
                                      f"at least {spec.min_side}")
    if max(height, width) > spec.max_side:
        raise ApiError("too_large", f"image is {width}x{height} pixels; the largest side may be at "
                                      f"most {spec.max_side}")


def validate_array(array: Any, spec: PreprocessSpec | None = None) -> np.ndarray:
    """Check a raw image array and convert it to the gray float image preprocessing takes.

    The array is one image at its own size, never a model batch; it goes through the same
    preprocessing (resize, letterbox, contrast steps) as a decoded file.

    Args:
        array: ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` (RGB) or ``(H, W, 4)`` (RGBA, alpha
            ignored). ``uint8`` is read as 0-255; any other integer type is min-max
            stretched (as 16-bit files are); floating types must already be in [0, 1].
        spec: the preprocessing spec whose ``min_side``/``max_side`` apply (default: the
            defaults of :class:`PreprocessSpec`).

    Returns:
        ``(H, W)`` float32 gray in [0, 1] (a constant integer image becomes zeros).

    Raises:
        ApiError: ``bad_shape`` (ndim, channels), ``too_small``/``too_large`` (sides),
            ``bad_dtype`` (bool, complex, object, text ...), ``not_finite`` (NaN/inf),
            ``out_of_range`` (floats outside [0, 1]).
    """
    spec = spec or PreprocessSpec()
    try:
        arr = np.asarray(array)
    except (TypeError, ValueError) as exc:  # ragged nested lists
        raise ApiError("bad_shape", f"not a rectangular array: {exc}") from None
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise ApiError("bad_shape", f"expected one image (H, W) or (H, W, C) with C in 1, 3, 4; "
                                      f"got shape {tuple(arr.shape)}")
    _check_side(int(arr.shape[0]), int(arr.shape[1]), spec)
    if arr.dtype.kind not in _PIXEL_KINDS:
        raise ApiError("bad_dtype", f"pixel dtype {arr.dtype} is not supported; send uint8, uint16 "
                                      "or float in [0, 1]")
    if arr.ndim == 3:
        arr = arr[:, :, 0] if arr.shape[2] == 1 else _rgb_to_gray(arr[:, :, :3])
    if arr.dtype.kind == "f":
        # Errors are ignored here: float16 overflow shows up as inf just below.
        with np.errstate(invalid="ignore", over="ignore"):
            gray = arr.astype(np.float32)
        if not np.isfinite(gray).all():
            raise ApiError("not_finite", "image contains NaN or infinite values")
        lo, hi = float(gray.min()), float(gray.max())
        if lo < 0.0 or hi > 1.0:
            raise ApiError("out_of_range", f"floating-point pixels must be in [0, 1], got "
                                             f"[{lo:.4g}, {hi:.4g}]")
        return gray
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255.0)
    wide = arr.astype(np.float64)
    lo, hi = float(wide.min()), float(wide.max())
    if hi <= lo:
        return np.zeros(wide.shape, np.float32)
    return ((wide - lo) / (hi - lo)).astype(np.float32)


def _rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma (OpenCV's weights) of an RGB array, keeping integer input integral."""
    weights = np.asarray([0.299, 0.587, 0.114])
    with np.errstate(invalid="ignore", over="ignore"):
        gray = rgb.astype(np.float64) @ weights
    if rgb.dtype.kind in "iu":
        info = np.iinfo(rgb.dtype)
        return np.clip(np.rint(gray), info.min, info.max).astype(rgb.dtype)
    return gray




def check_dicom_output(data: bytes | None, roi: tuple[int, int, int, int] | None) -> None:
    """Refuse a request for DICOM results that cannot have them (before any model runs).

    Raises:
        ApiError: ``not_dicom`` (an array or a file that is not DICOM: there is no study
            to reference) or ``bad_roi`` (results describe the whole image).
    """
    if data is None or not is_dicom(data):
        raise ApiError("not_dicom", "DICOM results reference the source image's study and series: "
                                      "send a DICOM file")
    if roi is not None:
        raise ApiError("bad_roi", "DICOM results describe the whole image: leave roi out")



# --------------------------------------------------------------------------- bodies


@dataclass(frozen=True)
class Part:
    """One part of a multipart body.

    Attributes:
        name: the field name (``Content-Disposition: form-data; name=...``).
        data: the part's bytes.
        filename: the file name of a file part; ``None`` for a text field.
    """

    name: str
    data: bytes
    filename: str | None = None

    @property
    def is_file(self) -> bool:
        """Whether the client sent this part as a file."""
        return self.filename is not None



def _bad(code: str, message: str) -> ApiError:
    return ApiError(code, message)


def multipart_boundary(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` content type.

    Raises:
        ApiError: ``malformed_request`` when it has none.
    """
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary", b"")
    if not boundary or len(boundary) > 200:
        raise _bad("malformed_request", "Content-Type multipart/form-data needs a boundary parameter "
                                        "(let the HTTP client build the multipart body)")
    return boundary


@dataclass
class _Collector:
    """python-multipart callbacks gathering the parts of one body."""

    parts: list[Part] = field(default_factory=list)
    headers: dict[bytes, bytes] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)
    header_field: bytes = b""
    header_value: bytes = b""
    ended: bool = False

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._begin, "on_part_data": self._data, "on_part_end": self._end,
            "on_header_field": self._field, "on_header_value": self._value,
            "on_header_end": self._header_end, "on_end": self._finish,
        }

    def _begin(self) -> None:
        if len(self.parts) >= MAX_PARTS:
            raise _bad("malformed_request", f"more than {MAX_PARTS} parts in the multipart body")
        self.headers, self.chunks = {}, []

    def _data(self, data: bytes, start: int, end: int) -> None:
        self.chunks.append(data[start:end])

    def _field(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]

    def _value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def _header_end(self) -> None:
        self.headers[self.header_field.lower()] = self.header_value
        self.header_field, self.header_value = b"", b""

    def _end(self) -> None:
        kind, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        name = options.get(b"name")
        if kind != b"form-data" or not name:
            raise _bad("malformed_request",
                       "a multipart part has no Content-Disposition: form-data; name=...")
        filename = options.get(b"filename")
        self.parts.append(Part(name=name.decode("utf-8", "replace"), data=b"".join(self.chunks),
                               filename=None if filename is None else filename.decode("utf-8", "replace")))

    def _finish(self) -> None:
        self.ended = True


def parse_multipart(content_type: str, body: bytes) -> list[Part]:
    """Every part of a ``multipart/form-data`` body, in order.

    Args:
        content_type: the request's ``Content-Type`` (with its boundary).
        body: the whole body.

    Raises:
        ApiError: ``malformed_request`` (no boundary, a body that does not parse or
            ends early, a part without a name, more than :data:`MAX_PARTS` parts).
    """
    collector = _Collector()
    parser = MultipartParser(multipart_boundary(content_type), collector.callbacks())  # type: ignore[arg-type]
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise _bad("malformed_request", f"the multipart body does not parse: {exc}") from None
    if not collector.ended:
        raise _bad("malformed_request", "the multipart body ends before its closing boundary")
    return collector.parts


def parse_urlencoded(body: bytes) -> list[Part]:
    """The fields of an ``application/x-www-form-urlencoded`` body, as text parts (values
    percent-decoded to bytes: whether they are UTF-8 is checked with the route's fields)."""
    parts = []
    for pair in body.split(b"&"):
        if not pair:
            continue
        name, _, value = pair.partition(b"=")
        parts.append(Part(name=unquote_plus(name.decode("latin-1")),
                          data=unquote_to_bytes(value.replace(b"+", b" "))))
        if len(parts) > MAX_PARTS:
            raise _bad("malformed_request", f"more than {MAX_PARTS} fields in the form")
    return parts



def _json(body: bytes) -> Any:
    """Parse JSON as the framework does: strict and fast first, then Python's reader, which
    also takes the ``NaN`` / ``Infinity`` that ``json.dumps`` writes (refused later, by value)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)



# --------------------------------------------------------------------------- the request

FILE, TEXT, BOOL, ROI, ARRAY = "file", "text", "bool", "roi", "array"
"""Kinds of request fields: an uploaded file, text, a boolean, a region of interest, an array."""

ACTIONS = ("predict", "analyze", "preview", "models")
"""What a request asks for."""


@dataclass(frozen=True)
class Route:
    """One HTTP API route: what it does and the fields it takes.

    Attributes:
        path: e.g. ``/tumor``, ``/predict``.
        action: one of :data:`ACTIONS`.
        fields: field name -> kind (:data:`FILE`, :data:`TEXT`, :data:`BOOL`, :data:`ROI`, :data:`ARRAY`).
        required: the fields a request must send.
        model: the model a per-model route (``/<model>``) answers with, else ``None``.
        doc: one sentence for the API description.
    """

    path: str
    action: str
    fields: Mapping[str, str]
    required: frozenset[str]
    model: str | None = None
    doc: str = ""

    def listing(self) -> str:
        """The declared fields, for messages (``"image (file), explain, roi"``)."""
        names = [f"{n} (file)" if k == FILE else n for n, k in self.fields.items()]
        return ", ".join(names) or "no fields"


_IMAGE = {"image": FILE, "explain": BOOL, "roi": ROI}
ROUTE_FIELDS: dict[str, tuple[str, dict[str, str], frozenset[str], str]] = {
    "/predict": ("predict", {"model": TEXT, **_IMAGE}, frozenset({"model", "image"}),
                 "One model's answer for an uploaded image (PNG, JPEG, PGM, TIFF, BMP, DICOM; 8/16-bit)."),
    "/predict_array": ("predict", {"model": TEXT, "array": ARRAY, "dtype": TEXT, "explain": BOOL, "roi": ROI},
                       frozenset({"model", "array"}),
                       "One model's answer for an image sent as nested lists (H, W) or (H, W, C), read "
                       "as dtype (uint8 0-255, other integers min-max stretched, floats in [0, 1])."),
    "/analyze": ("analyze", {"image": FILE, "modality": TEXT, "explain": BOOL, "roi": ROI, "dicom": BOOL},
                 frozenset({"image"}),
                 "Every model of the image's modality; a mammogram's 8-category view; with dicom, a "
                 "DICOM Structured Report and a Segmentation per mask."),
    "/preview": ("preview", {"image": FILE}, frozenset({"image"}),
                 "The decoded image as an 8-bit PNG, as the models see it (DICOM windowed)."),
    "/models": ("models", {}, frozenset(), "The served models: version, stage, task, modality, classes."),
}
"""The fixed API routes: action, fields, required fields, description."""

SYSTEM_PATHS = frozenset({"/metrics", "/readyz", "/livez", "/healthz", "/docs", "/docs.json", "/ui",
                          "/static_content"})
"""Paths the service answers besides its API (probes, metrics, docs, the web UI): no model takes them."""


def api_routes(models: Iterable[str]) -> dict[str, Route]:
    """Every HTTP API route of a service serving ``models``: the fixed ones and ``/<model>`` each.

    Raises:
        ValueError: a model name that is a fixed route's.
    """
    routes = {path: Route(path, action, fields, required, doc=doc)
              for path, (action, fields, required, doc) in ROUTE_FIELDS.items()}
    for name in models:
        if f"/{name}" in routes or f"/{name}" in SYSTEM_PATHS or not name.isidentifier():
            raise ValueError(f"a model may not be called {name!r}: /{name} is another route of the service "
                             "(or not a plain name)")
        routes[f"/{name}"] = Route(f"/{name}", "predict", _IMAGE, frozenset({"image"}), model=name,
                                   doc=f"Model {name!r} on an uploaded image (PNG, JPEG, PGM, TIFF, BMP, "
                                       "DICOM).")
    return routes


@dataclass(frozen=True)
class Request:
    """One request, whatever way it came in.

    Attributes:
        action: ``predict`` (one model), ``analyze`` (every model of a modality),
            ``preview`` (the decoded image) or ``models`` (what is served).
        model: the model a ``predict`` asks for.
        image: the image (``predict``, ``analyze``, ``preview``).
        explain: add Grad-CAM heatmaps to the answers of models with classes.
        modality: ``mammography`` or ``ultrasound`` (``analyze``; ``None``: the DICOM header's,
            or the only one served).
        dicom: also answer as DICOM objects (``analyze`` of a DICOM file).
        request_id: the request's id (``X-Request-ID``), for logs.
        caller: the API key's label when authentication is on, else ``None``.
    """

    action: str
    model: str | None = None
    image: ImageInput | None = None
    explain: bool = False
    modality: str | None = None
    dicom: bool = False
    request_id: str = ""
    caller: str | None = field(default=None, compare=False)


def predict_request(model: str, image: ImageInput, *, explain: bool = False, request_id: str = "") -> Request:
    """A ``predict`` request (in process: tests, ``breastscan predict``, notebooks)."""
    return Request("predict", model=model, image=image, explain=explain, request_id=request_id)


# --------------------------------------------------------------------------- HTTP bodies

_TRUE = frozenset({"true", "1", "yes", "on", "t", "y"})
_FALSE = frozenset({"false", "0", "no", "off", "f", "n", ""})


def parse_http(route: Route, content_type: str, body: bytes, *, request_id: str = "",
               caller: str | None = None) -> Request:
    """Parse and check one ``POST`` body against its route: the :class:`Request`.

    Accepts ``multipart/form-data`` (files and text), a url-encoded form (text only) and
    ``application/json`` (no files), or no body for a route without required fields.

    Raises:
        ApiError: ``unsupported_media_type``, ``malformed_request``, ``unknown_field``,
            ``bad_field``, ``missing_field``, or an image field's error (``bad_roi``,
            ``bad_dtype``, ``bad_shape`` ...).
    """
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind == "multipart/form-data":
        values = _form_values(route, parse_multipart(content_type, body))
    elif kind == "application/x-www-form-urlencoded":
        values = _form_values(route, parse_urlencoded(body))
    elif kind == "application/json" or kind.endswith("+json") or (not kind and not body.strip()):
        values = _json_values(route, body)
    else:
        raise ApiError("unsupported_media_type", f"Content-Type {kind or '(none)'!r} is not accepted: send "
                                                 "multipart/form-data (files), application/json or a "
                                                 "url-encoded form (text fields only)")
    missing = sorted(route.required - set(values))
    if missing:
        raise ApiError("missing_field", "missing " + ", ".join(
            f"{n!r} (a file part of a multipart/form-data request)" if route.fields[n] == FILE else repr(n)
            for n in missing) + f"; {route.path} takes {route.listing()}")
    return _request(route, values, request_id, caller)


def _form_values(route: Route, parts: Iterable[Part]) -> dict[str, Any]:
    """Each field of a form once: a file's bytes, a text field's (UTF-8) text."""
    values: dict[str, Any] = {}
    for part in parts:
        kind = _field_kind(route, part.name)
        if part.name in values:
            raise ApiError("bad_field", f"field {part.name!r} is sent more than once")
        if kind == FILE:
            if not part.is_file:
                raise ApiError("bad_field", f"field {part.name!r} must be a file upload (a part with a "
                                            "filename), not text")
            values[part.name] = part.data
            continue
        if part.is_file:
            raise ApiError("bad_field", f"field {part.name!r} is a text field; got a file")
        try:
            values[part.name] = part.data.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError("bad_field", f"field {part.name!r} is not UTF-8 text") from None
    return values


def _json_values(route: Route, body: bytes) -> dict[str, Any]:
    """The fields of a JSON object body (files cannot travel in JSON)."""
    try:
        value = _json(body) if body.strip() else {}
    except (ValueError, RecursionError) as exc:
        raise ApiError("malformed_request", f"the body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ApiError("malformed_request", f"the JSON body must be an object with the fields "
                                            f"{route.listing()}")
    for name in value:
        if _field_kind(route, str(name)) == FILE:
            raise ApiError("bad_field", f"field {name!r} must be uploaded as a file part of a "
                                        "multipart/form-data request, not a JSON value")
    return {k: v for k, v in value.items() if v is not None}


def _field_kind(route: Route, name: str) -> str:
    kind = route.fields.get(name)
    if kind is None:
        raise ApiError("unknown_field", f"{route.path} takes no field {name[:64]!r}; its fields: "
                                        f"{route.listing()}")
    return kind


def _request(route: Route, values: Mapping[str, Any], request_id: str, caller: str | None) -> Request:
    """The :class:`Request` of a route's checked field values."""
    roi = parse_roi(_typed(values, "roi", ROI))
    image = None
    if "image" in route.fields:
        image = ImageInput(data=values.get("image"), roi=roi)
    elif "array" in route.fields:
        dtype = _typed(values, "dtype", TEXT) or None
        image = ImageInput.from_array(_typed(values, "array", ARRAY), dtype, roi)
    return Request(route.action, model=route.model or _typed(values, "model", TEXT), image=image,
                   explain=bool(_typed(values, "explain", BOOL)),
                   modality=_typed(values, "modality", TEXT) or None,
                   dicom=bool(_typed(values, "dicom", BOOL)), request_id=request_id, caller=caller)


def _typed(values: Mapping[str, Any], name: str, kind: str) -> Any:
    """A field's value as its kind (``None`` when not sent); text from a form is read here.

    Raises:
        ApiError: ``bad_field`` naming the field and what it must be.
    """
    value = values.get(name)
    if value is None:
        return None
    if kind == BOOL:
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ApiError("bad_field", f"field {name!r} must be true or false, got {str(value)[:32]!r}")
    if kind == ARRAY and isinstance(value, str):
        try:
            return _json(value.encode())
        except (ValueError, RecursionError):
            raise ApiError("bad_field", f"field {name!r} must be a JSON array of numbers") from None
    if kind == ROI and isinstance(value, list):
        return value
    if kind in (TEXT, ROI) and not isinstance(value, str):
        raise ApiError("bad_field", f"field {name!r} must be text, got {type(value).__name__}")
    if kind == ARRAY and not isinstance(value, list):
        raise ApiError("bad_field", f"field {name!r} must be an array of numbers, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------- gRPC messages


def from_proto(method: str, message: Any, *, request_id: str = "", caller: str | None = None) -> Request:
    """The :class:`Request` of a gRPC request message.

    Args:
        method: ``Predict``, ``Analyze``, ``Preview`` or ``ListModels``.
        message: that RPC's request message.

    Raises:
        ApiError: ``bad_roi``, ``bad_dtype`` or ``bad_shape`` (see :func:`image_from_proto`).
    """
    if method == "ListModels":
        return Request("models", request_id=request_id, caller=caller)
    image = image_from_proto(message.image)
    if method == "Predict":
        return Request("predict", model=message.model, image=image, explain=message.explain,
                       request_id=request_id, caller=caller)
    if method == "Analyze":
        return Request("analyze", image=image, modality=message.modality or None, explain=message.explain,
                       dicom=message.dicom, request_id=request_id, caller=caller)
    return Request("preview", image=image, request_id=request_id, caller=caller)


def image_from_proto(image: Any) -> ImageInput:
    """The :class:`ImageInput` of an ``Image`` message: a file's bytes or a raw ``Array``, and a roi.

    Neither source set gives an input without an image, which the engine refuses as ``empty``.

    Raises:
        ApiError: ``bad_roi`` (not 0 or 4 values, or out of range), ``bad_dtype`` (a dtype
            outside :data:`ARRAY_DTYPES`) or ``bad_shape`` (negative sides, or the byte count
            does not match the shape).
    """
    roi = parse_roi(list(image.roi))
    source = image.WhichOneof("source")
    if source == "file":
        return ImageInput(data=bytes(image.file), roi=roi)
    if source == "array":
        return ImageInput(array=array_from_proto(image.array), roi=roi)
    return ImageInput(roi=roi)


def array_from_proto(array: Any) -> np.ndarray:
    """Read an ``Array`` message: little-endian C-order bytes of ``dtype`` in ``shape``.

    The result is in the machine's byte order; its checks as an image (ndim, channels,
    sides, value range) are :func:`validate_array`'s.

    Raises:
        ApiError: ``bad_dtype`` or ``bad_shape``.
    """
    if array.dtype not in ARRAY_DTYPES:
        raise ApiError("bad_dtype", f"dtype {array.dtype!r} is not supported; use one of "
                                    f"{', '.join(ARRAY_DTYPES)}")
    shape = tuple(int(s) for s in array.shape)
    if any(s < 0 for s in shape):
        raise ApiError("bad_shape", f"array shape {list(shape)} has a negative side")
    dtype = np.dtype(array.dtype)
    expected = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if len(array.data) != expected:
        raise ApiError("bad_shape", f"array of shape {list(shape)} and dtype {array.dtype} needs "
                                    f"{expected} bytes of data, got {len(array.data)}")
    values = np.frombuffer(array.data, dtype=dtype.newbyteorder("<"))
    return values.astype(dtype, copy=False).reshape(shape)
