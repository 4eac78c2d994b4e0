"""What the service answers -- results and refusals -- defined once.

**Results.** Each answer is a frozen dataclass whose fields declare, with
:func:`answer_field`, their gRPC field number and type, when the HTTP JSON carries them and
what they mean: :class:`Prediction` (one model, one image), :class:`EightCategory`,
:class:`Analysis`, :class:`ModelInfo` and :class:`Preview`. Everything else derives from
that one definition:

* the HTTP JSON: :func:`to_dict` / :func:`to_json` (PNG bytes as base64 text, class
  probabilities as an ordered ``{class: probability}`` object, a box as ``[x, y, w, h]``);
* the gRPC message: :func:`to_proto`, and the clients' decoding, :func:`from_proto`;
* the ``.proto`` messages themselves, rendered by :func:`proto_messages`
  (``python -m breastscan.serving.proto.generate`` writes them into ``breastscan.proto``);
* the JSON schemas of ``/docs.json``: :func:`json_schema`;
* the ``predictions.csv`` row of ``breastscan predict``: :func:`csv_columns`, :func:`csv_row`.

Adding a field is one :func:`answer_field` line here (and the line that computes it), then
regenerating the ``.proto``; every protocol, the clients, the CSV and the docs follow.

**Refusals.** :data:`ERRORS` is the one table of error codes: each code's HTTP status,
gRPC status and meaning. :class:`ApiError` carries a code and a message; every answer path
(the HTTP edge, the gRPC servicer, the API-key guard, the clients, the benchmark peers)
turns it into ``{"error": message, "code": code}`` (:func:`error_json`) with the table's
HTTP status, or into the table's gRPC status with the code in the ``error-code`` trailer.

How a model's output becomes a :class:`Prediction` (masks and heatmaps mapped back to the
image's own size, the decision rule, PNG encoding) is :func:`predictions`.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import cv2
import numpy as np
import orjson

from breastscan.bundle import ModelContract
from breastscan.decision import ARGMAX_RULE, DecisionRule
from breastscan.imaging.overlay import overlay
from breastscan.imaging.preprocessing import Letterbox, PreprocessSpec

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class ErrorKind:
    """How one error code is answered.

    Attributes:
        http: the HTTP status.
        grpc: the gRPC status name (``grpc.StatusCode`` member).
        meaning: what the code means, for the API's documentation.
        fallback: the code a client reports for a refusal with this status but no code.
    """

    http: int
    grpc: str
    meaning: str
    fallback: bool = False


def _input(meaning: str, http: int = 400) -> ErrorKind:
    return ErrorKind(http, "INVALID_ARGUMENT", meaning)


ERRORS: dict[str, ErrorKind] = {
    "empty": _input("the upload has no bytes"),
    "too_large": ErrorKind(413, "INVALID_ARGUMENT",
                           "the request or upload has too many bytes, or the image too many pixels per side",
                           fallback=True),
    "too_small": _input("the image has too few pixels per side"),
    "not_an_image": _input("the bytes are not a supported image format"),
    "truncated": _input("the file ends early (cut-off upload)"),
    "corrupt": _input("the file has a supported format but does not decode"),
    "unsupported": _input("a supported container with an unsupported encoding (e.g. a DICOM codec)"),
    "no_pixel_data": _input("a DICOM file without an image"),
    "bad_shape": _input("the array is not (H, W) or (H, W, C) with C in 1, 3, 4"),
    "bad_dtype": _input("the array's dtype is not an integer or floating type"),
    "not_finite": _input("the image holds NaN or infinite values"),
    "out_of_range": _input("a floating-point image has values outside [0, 1]"),
    "unknown_model": _input("no model of that name is served"),
    "model_withdrawn": ErrorKind(404, "NOT_FOUND", "the model was served, but no registry version holds "
                                                   "its stage any more: it is no longer served"),
    "unknown_modality": _input("no model is served for that modality, or the modality is not given"),
    "bad_roi": _input("the region of interest is not x,y,w,h inside the image"),
    "wrong_modality": _input("the DICOM header names a modality the model was not trained on"),
    "not_dicom": _input("DICOM results were asked for an image that is not a DICOM file"),
    "malformed_request": _input("the body does not parse (JSON, protobuf, or multipart without a "
                                "boundary / cut short)"),
    "unsupported_media_type": _input("the Content-Type is neither multipart/form-data, a url-encoded "
                                     "form nor application/json", http=415),
    "unknown_field": _input("a field the endpoint does not declare"),
    "missing_field": _input("a required field is missing"),
    "bad_field": _input("a field sent twice, as the wrong kind (file vs text), not UTF-8, or of the "
                        "wrong type"),
    "bad_request": ErrorKind(400, "INVALID_ARGUMENT", "any other request the service refuses", fallback=True),
    "not_found": ErrorKind(404, "UNIMPLEMENTED", "no such route or method", fallback=True),
    "method_not_allowed": ErrorKind(405, "UNIMPLEMENTED", "the route does not take that HTTP method"),
    "unauthorized": ErrorKind(401, "UNAUTHENTICATED", "no API key, or not a valid one (when "
                                                      "authentication is on)", fallback=True),
    "explain_unavailable": ErrorKind(501, "UNIMPLEMENTED", "Grad-CAM (explain) needs TensorFlow, which this "
                                                          "deployment leaves out (a Bento or image built "
                                                          "without it): ask without explain"),
    "overloaded": ErrorKind(503, "UNAVAILABLE", "the model is at capacity (adaptive batching shed the "
                                                "request): retry after a moment"),
    "unavailable": ErrorKind(503, "UNAVAILABLE", "the service cannot answer now (starting, stopping, "
                                                 "unreachable)", fallback=True),
    "deadline_exceeded": ErrorKind(504, "DEADLINE_EXCEEDED", "no answer within the time limit",
                                   fallback=True),
    "cancelled": ErrorKind(499, "CANCELLED", "the request was cancelled before its answer", fallback=True),
    "internal": ErrorKind(500, "INTERNAL", "the service failed (a fault, logged; never the client's "
                                           "mistake)", fallback=True),
}
"""Every error code: HTTP status, gRPC status and meaning (the API's error contract)."""

ERROR_CODE_KEY = "error-code"
"""gRPC trailing-metadata key carrying an error's code."""
RETRY_AFTER_S = 1
"""``Retry-After`` seconds of an HTTP 503 (a shed or not-yet-ready request)."""
INTERNAL_MESSAGE = "internal error: the service could not answer this request (see its log)"
"""The message of every ``internal`` answer (nothing of the request is echoed)."""


class ApiError(ValueError):
    """A request the service refuses or cannot answer, with its stable code.

    Attributes:
        code: a key of :data:`ERRORS`, stable for clients to branch on.
        message: a sentence for a human, naming the problem (never patient data).
    """

    def __init__(self, code: str, message: str) -> None:
        if code not in ERRORS:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def kind(self) -> ErrorKind:
        """This code's row of :data:`ERRORS`."""
        return ERRORS[self.code]


def error_dict(code: str, message: str) -> dict[str, str]:
    """Every refusal as JSON values: ``{"error": message, "code": code}``."""
    return {"error": message, "code": code}


def error_json(code: str, message: str) -> bytes:
    """The JSON body of every refusal (:func:`error_dict`)."""
    return orjson.dumps(error_dict(code, message))


def error_headers(code: str) -> list[tuple[bytes, bytes]]:
    """Extra HTTP headers of a refusal: ``Retry-After`` for 503s, ``WWW-Authenticate`` for 401."""
    status = ERRORS[code].http
    if status == 503:
        return [(b"retry-after", str(RETRY_AFTER_S).encode())]
    if status == 401:
        return [(b"www-authenticate", b'Bearer realm="breastscan"')]
    return []


def code_for_http(status: int) -> str:
    """The code a client reports for an HTTP error answer without one (by its status)."""
    for code, kind in ERRORS.items():
        if kind.fallback and kind.http == status:
            return code
    return "bad_request" if status < 500 else "internal"


def code_for_grpc(status: str) -> str:
    """The code a client reports for a gRPC error without an ``error-code`` trailer.

    ``RESOURCE_EXHAUSTED`` (gRPC's own message-size refusal) is ``too_large``, a bare
    ``INVALID_ARGUMENT`` is ``bad_request`` (not ``too_large``, whose gRPC status it shares);
    a status without a fallback code is its name in lower case.
    """
    if status == "RESOURCE_EXHAUSTED":
        return "too_large"
    for code, kind in ERRORS.items():
        if kind.fallback and kind.grpc == status and code != "too_large":
            return code
    return status.lower()


# --------------------------------------------------------------------------- answer fields

ALWAYS = "always"
"""The key is in every JSON answer (``null`` when unknown)."""
CLASSES = "classes"
"""The key is in the answers of models with classes (classifiers, multi-task)."""
MASK = "mask"
"""The key is in the answers of models with a mask (segmenters, multi-task)."""
IF_SET = "if_set"
"""The key is in the answer only when it has a value."""


def answer_field(number: int, proto: str, doc: str, *, when: str = ALWAYS, csv: bool = False,
                 json: str = "", default: Any = None) -> Any:
    """Declare one field of an answer.

    Args:
        number: its gRPC field number (never reused once released).
        proto: its ``.proto`` type, e.g. ``"optional double"``, ``"repeated ClassProbability"``.
        doc: what it holds, with units and ranges (comment in the ``.proto``, description in
            ``/docs.json``).
        when: when the HTTP JSON carries the key: :data:`ALWAYS`, :data:`CLASSES`,
            :data:`MASK`, :data:`IF_SET`, or the name of another field (the key is there when
            that field has a value).
        csv: whether ``breastscan predict`` writes it to ``predictions.csv``.
        json: its place in the HTTP JSON when not a top-level key named as the field
            (``"dicom.sr"``: key ``sr`` of the object ``dicom``).
        default: its value when not given.
    """
    return field(default=default, metadata={"number": number, "proto": proto, "doc": doc, "when": when,
                                            "csv": csv, "json": json})


def has_classes(task: str) -> bool:
    """Whether a model of ``task`` calls classes (a classifier, or a multi-task model's head)."""
    return task in ("classification", "multitask")


def has_mask(task: str) -> bool:
    """Whether a model of ``task`` outlines lesions (a segmenter, or a multi-task model's decoder)."""
    return task in ("segmentation", "multitask")


@dataclass(frozen=True)
class _Field:
    """One declared field, read once per answer class."""

    name: str
    number: int
    proto: str
    doc: str
    when: str
    csv: bool
    json: str
    nullable: bool

    @property
    def proto_type(self) -> str:
        """The ``.proto`` type without its label (``double``, ``ClassProbability`` ...)."""
        return self.proto.split()[-1]

    @property
    def repeated(self) -> bool:
        return self.proto.startswith(("repeated ", "map<"))


_FIELDS: dict[type, tuple[_Field, ...]] = {}


def answer_fields(cls: type) -> tuple[_Field, ...]:
    """The declared fields of an answer class, in order (computed once)."""
    found = _FIELDS.get(cls)
    if found is None:
        hints = typing.get_type_hints(cls)
        found = tuple(_Field(f.name, f.metadata["number"], f.metadata["proto"], f.metadata["doc"],
                             f.metadata["when"], f.metadata["csv"], f.metadata["json"] or f.name,
                             _nullable(hints[f.name]))
                      for f in dataclasses.fields(cls))
        _FIELDS[cls] = found
    return found


# --------------------------------------------------------------------------- the answers


@dataclass(frozen=True)
class Prediction:
    """One model's answer for one image, at the image's own size (the crop's, with a roi)."""

    PROTO: ClassVar[str] = "Prediction"
    DOC: ClassVar[str] = "One model's answer for one image."

    model: str = answer_field(
        1, "string", "the model's name, e.g. 'tumor'", csv=True)
    version: str | None = answer_field(
        2, "string", "registry version of the served model; null (gRPC: empty) when unknown", csv=True)
    stage: str | None = answer_field(
        3, "string", "registry stage (alias) it was served from, e.g. 'production'; null (gRPC: empty) "
        "when unknown", csv=True)
    spec_id: str = answer_field(
        4, "string", "id of the preprocessing spec applied", default="")
    task: str = answer_field(
        5, "string", "classification, segmentation or multitask (one model call, the fields of both): "
        "says which fields below are there", default="")
    width: int = answer_field(
        6, "int32", "width of the image answered about (the crop's, with a roi), in pixels", csv=True,
        default=0)
    height: int = answer_field(
        7, "int32", "height of the image answered about (the crop's, with a roi), in pixels", csv=True,
        default=0)
    probabilities: dict[str, float] | None = answer_field(
        8, "repeated ClassProbability", "calibrated probability of every class, in the model's class "
        "order; they sum to 1", when=CLASSES, csv=True)
    predicted: str | None = answer_field(
        9, "optional string", "the class the model's decision rule calls: the most probable one, or the "
        "contract's operating point", when=CLASSES, csv=True)
    confidence: float | None = answer_field(
        10, "optional double", "the called class's probability, in [0, 1]", when=CLASSES, csv=True)
    decision_threshold: float | None = answer_field(
        18, "optional double", "the cutoff of the model's decision rule, in [0, 1]: the positive class is "
        "called when p(positive) / (p(positive) + p(versus)) reaches it; null for the arg-max rule",
        when=CLASSES, csv=True)
    heatmap_png: bytes | None = answer_field(
        11, "optional bytes", "with explain: (height, width) 8-bit gray PNG, the Grad-CAM heatmap of the "
        "called class, 255 = strongest evidence", when=IF_SET)
    mask_png: bytes | None = answer_field(
        12, "optional bytes", "(height, width) 8-bit gray PNG, 255 = lesion, 0 = background", when=MASK)
    lesion_area_px: int | None = answer_field(
        13, "optional int64", "lesion pixels, in [0, width * height]", when=MASK, csv=True)
    lesion_fraction: float | None = answer_field(
        14, "optional double", "lesion pixels / all pixels, in [0, 1]", when=MASK, csv=True)
    bbox: list[int] | None = answer_field(
        15, "optional BoundingBox", "[x, y, w, h] of the lesion pixels; null (gRPC: not set) when no pixel "
        "is lesion", when=MASK, csv=True)
    overlay_png: bytes | None = answer_field(
        16, "optional bytes", "(height, width, 3) 8-bit RGB PNG: the image with the heatmap (with explain) "
        "or else the mask drawn over it", when=IF_SET)
    roi: list[int] | None = answer_field(
        17, "repeated int32", "the request's region of interest [x, y, w, h] (when cropped)", when=IF_SET)


@dataclass(frozen=True)
class EightCategory:
    """The 8-category view (pathology x density) of one mammogram."""

    PROTO: ClassVar[str] = "EightCategory"
    DOC: ClassVar[str] = ("The 8-category view (pathology x density) of a mammogram's density and tumor "
                          "answers (breastscan.evaluation.combined.eight_category).")

    category: str = answer_field(
        1, "string", "the most probable category, e.g. 'malignant-C'", default="")
    density: str = answer_field(
        2, "string", "density letter (A-D), the density model's arg-max", default="")
    pathology: str = answer_field(
        3, "string", "'benign' or 'malignant', the more likely of the two (malignant wins ties)", default="")
    finding: str = answer_field(
        4, "string", "the tumor model's called class (may be 'normal')", default="")
    p_malignant: float = answer_field(
        5, "double", "P(malignant | lesion) = p_malignant / (p_benign + p_malignant), in [0, 1]", default=0.0)
    p_normal: float | None = answer_field(
        6, "optional double", "the tumor model's probability of 'normal', in [0, 1]; null without that class")
    confidence: float = answer_field(
        7, "double", "joint probability of the category, in [0, 1]", default=0.0)
    probabilities: dict[str, float] | None = answer_field(
        8, "repeated ClassProbability", "joint probability of each of the eight categories (benign-A .. "
        "malignant-D); they sum to 1")


@dataclass(frozen=True)
class Analysis:
    """Every model of one modality on one image."""

    PROTO: ClassVar[str] = "AnalyzeResponse"
    DOC: ClassVar[str] = "Every model of the image's modality on one image."

    modality: str = answer_field(
        1, "string", "the modality analysed: 'mammography' or 'ultrasound'", default="")
    models: dict[str, Prediction] | None = answer_field(
        2, "map<string, Prediction>", "every model of that modality: model name -> its answer")
    eight_category: EightCategory | None = answer_field(
        3, "optional EightCategory", "for a mammogram when a density and a tumor model both answered",
        when=IF_SET)
    roi: list[int] | None = answer_field(
        4, "repeated int32", "the request's region of interest [x, y, w, h] (when cropped)", when=IF_SET)
    dicom_sr: bytes | None = answer_field(
        5, "bytes", "with dicom: the DICOM Structured Report (Part 10) of every answer, referencing the "
        "source image; NOT FOR DIAGNOSTIC USE", when=IF_SET, json="dicom.sr")
    dicom_seg: dict[str, bytes] | None = answer_field(
        6, "map<string, bytes>", "with dicom: name of a model with a mask -> its DICOM Segmentation "
        "(Part 10)",
        when="dicom_sr", json="dicom.seg")


@dataclass(frozen=True)
class ModelInfo:
    """What ``/models`` says about one served model."""

    PROTO: ClassVar[str] = "ModelInfo"
    DOC: ClassVar[str] = "Facts about one served model."

    name: str = answer_field(
        1, "string", "its served name (the model of a predict request)", default="")
    version: str | None = answer_field(
        2, "string", "registry version; null (gRPC: empty) when unknown")
    stage: str | None = answer_field(
        3, "string", "registry stage (alias); null (gRPC: empty) when unknown")
    source: str | None = answer_field(
        4, "string", "where it was imported from, e.g. 'models:/breastscan-tumor@production'; null (gRPC: "
        "empty) when unknown")
    task: str = answer_field(
        5, "string", "classification, segmentation or multitask", default="")
    modality: str = answer_field(
        6, "string", "'mammography' or 'ultrasound'", default="")
    classes: list[str] | None = answer_field(
        7, "repeated string", "class display names in class-index order ('lesion' for a segmenter)")
    input_shape: list[int] | None = answer_field(
        8, "repeated int32", "one model input: (H, W, 1)")
    spec_id: str = answer_field(
        9, "string", "id of its preprocessing spec", default="")
    temperature: float = answer_field(
        10, "double", "calibration temperature applied to the logits (1 = uncalibrated), > 0", default=1.0)
    threshold: float | None = answer_field(
        11, "optional double", "mask probability threshold in [0, 1] (models with a mask); null for "
        "classifiers")
    decision: str | None = answer_field(
        12, "optional string", "how a classifier calls its class, one sentence, when its decision rule is "
        "not the most probable class (an operating point fitted for a target sensitivity); null otherwise")
    runtime: str | None = answer_field(
        13, "string", "what runs it: 'onnx' (its checked ONNX export, ONNX Runtime) or 'keras' "
        "(TensorFlow); null (gRPC: empty) when unknown")


@dataclass(frozen=True)
class Preview:
    """The decoded image, as the models see it."""

    PROTO: ClassVar[str] = "PreviewResponse"
    DOC: ClassVar[str] = "The decoded image as an 8-bit PNG, as the service sees it (DICOM windowed)."

    width: int = answer_field(1, "int32", "width in pixels", default=0)
    height: int = answer_field(2, "int32", "height in pixels", default=0)
    modality: str | None = answer_field(
        3, "string", "the modality a DICOM header names; null (gRPC: empty) otherwise")
    png: bytes = answer_field(4, "bytes", "(height, width) 8-bit gray PNG", default=b"")


ANSWERS: tuple[type, ...] = (Prediction, EightCategory, Analysis, ModelInfo, Preview)
"""Every answer class (their ``.proto`` messages are rendered in this order)."""

Answer = Prediction | Analysis | Preview | list[ModelInfo]
"""What the engine answers one request with."""


# --------------------------------------------------------------------------- HTTP JSON


def _nullable(annotation: Any) -> bool:
    """Whether a field's type admits ``None``."""
    return type(None) in typing.get_args(annotation) or annotation is type(None)


def _present(f: _Field, answer: Any) -> bool:
    """Whether the JSON of ``answer`` carries field ``f`` (see :func:`answer_field`'s ``when``)."""
    when = f.when
    if when == ALWAYS:
        return True
    if when == CLASSES:
        return has_classes(answer.task)
    if when == MASK:
        return has_mask(answer.task)
    if when == IF_SET:
        return getattr(answer, f.name) is not None
    return getattr(answer, when) is not None


def _json_value(value: Any) -> Any:
    """A field value as JSON: bytes as base64 text, nested answers as their dicts."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if dataclasses.is_dataclass(value):
        return to_dict(value)
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    return value


def to_dict(answer: Any) -> Any:
    """The HTTP JSON of an answer (or a list of them) as Python values.

    Keys follow the declaration order; each appears as its :func:`answer_field` ``when`` says
    (``null`` for a present key without a value); PNGs and DICOM files are base64 text.
    """
    if isinstance(answer, list):
        return [to_dict(a) for a in answer]
    out: dict[str, Any] = {}
    for f in answer_fields(type(answer)):
        if not _present(f, answer):
            continue
        value = _json_value(getattr(answer, f.name))
        parent, _, key = f.json.rpartition(".")
        (out.setdefault(parent, {}) if parent else out)[key] = value
    return out


def to_json(answer: Any) -> bytes:
    """The HTTP JSON body of an answer (:func:`to_dict`, serialized)."""
    return orjson.dumps(to_dict(answer))


def from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """An answer of class ``cls`` read back from its HTTP JSON (:func:`to_dict`'s inverse)."""
    kwargs: dict[str, Any] = {}
    for f in answer_fields(cls):
        parent, _, key = f.json.rpartition(".")
        holder = data.get(parent) if parent else data
        value = holder.get(key) if isinstance(holder, Mapping) else None
        kwargs[f.name] = None if value is None else _from_json_value(f, value)
    return cls(**{k: v for k, v in kwargs.items() if v is not None or _field_nullable(cls, k)})


def _field_nullable(cls: type, name: str) -> bool:
    return next(f.nullable for f in answer_fields(cls) if f.name == name)


def _from_json_value(f: _Field, value: Any) -> Any:
    kind = f.proto_type
    if kind == "bytes" or kind == "bytes>":
        return base64.b64decode(value) if isinstance(value, str) else {
            k: base64.b64decode(v) for k, v in value.items()}
    nested = _ANSWER_BY_PROTO.get(kind.rstrip(">"))
    if nested is not None:
        return ({k: from_dict(nested, v) for k, v in value.items()} if f.proto.startswith("map<")
                else from_dict(nested, value))
    return value


# --------------------------------------------------------------------------- gRPC


def _pb() -> Any:
    from breastscan.serving.proto.breastscan.v1 import breastscan_pb2

    return breastscan_pb2


def to_proto(answer: Any) -> Any:
    """The gRPC message of an answer: the same numbers (doubles), PNGs as raw bytes, ``None``
    as an unset field (``""`` for a plain string)."""
    pb = _pb()
    kwargs: dict[str, Any] = {}
    for f in answer_fields(type(answer)):
        value = getattr(answer, f.name)
        if value is not None:
            kwargs[f.name] = _proto_value(pb, f, value)
    return getattr(pb, type(answer).PROTO)(**kwargs)


def _proto_value(pb: Any, f: _Field, value: Any) -> Any:
    kind = f.proto_type
    if kind == "ClassProbability":
        return [pb.ClassProbability(name=str(n), probability=float(p)) for n, p in value.items()]
    if kind == "BoundingBox":
        x, y, w, h = (int(v) for v in value)
        return pb.BoundingBox(x=x, y=y, width=w, height=h)
    if dataclasses.is_dataclass(value):
        return to_proto(value)
    if isinstance(value, dict):
        return {k: to_proto(v) if dataclasses.is_dataclass(v) else v for k, v in value.items()}
    return value


def from_proto(cls: type, message: Any) -> Any:
    """An answer of class ``cls`` from its gRPC message (the clients' decoding).

    Unset optional fields, empty nullable strings and empty repeated fields that are only
    there when set become ``None``; maps come back in key order.
    """
    kwargs = {f.name: _from_proto_field(f, message) for f in answer_fields(cls)}
    for f in answer_fields(cls):
        companion = f.when not in (ALWAYS, CLASSES, MASK, IF_SET) and kwargs[f.when] is not None
        if companion and kwargs[f.name] is None:
            kwargs[f.name] = {}  # a map present with its companion, however empty
    return cls(**{k: v for k, v in kwargs.items() if v is not None or _field_nullable(cls, k)})


def _from_proto_field(f: _Field, message: Any) -> Any:
    value = getattr(message, f.name)
    kind = f.proto_type.rstrip(">")
    if f.proto.startswith("optional "):
        if not message.HasField(f.name):
            return None
    elif f.repeated and not value and f.when != ALWAYS:
        return None
    elif not f.repeated and f.nullable and value in ("", b""):
        return None
    if kind == "ClassProbability":
        return {p.name: p.probability for p in value}
    if kind == "BoundingBox":
        return [value.x, value.y, value.width, value.height]
    nested = _ANSWER_BY_PROTO.get(kind)
    if nested is not None:
        return ({k: from_proto(nested, value[k]) for k in sorted(value)} if f.proto.startswith("map<")
                else from_proto(nested, value))
    if f.proto.startswith("map<"):
        return {k: value[k] for k in sorted(value)}
    if f.repeated:
        return list(value)
    return value


_ANSWER_BY_PROTO: dict[str, type] = {cls.PROTO: cls for cls in ANSWERS}  # type: ignore[attr-defined]

_FIXED_MESSAGES = '''message ClassProbability {
  string name = 1;
  double probability = 2;
}

message BoundingBox {
  int32 x = 1;       // left column, >= 0
  int32 y = 2;       // top row, >= 0
  int32 width = 3;   // columns, > 0
  int32 height = 4;  // rows, > 0
}
'''


def proto_messages() -> str:
    """The ``.proto`` text of every answer message, rendered from the declarations here."""
    blocks = [_FIXED_MESSAGES]
    for cls in ANSWERS:
        lines = [f"// {cls.DOC}", f"message {cls.PROTO} {{"]  # type: ignore[attr-defined]
        for f in answer_fields(cls):
            lines.append(f"  // {f.doc}")
            lines.append(f"  {f.proto} {f.name} = {f.number};")
        lines.append("}")
        blocks.append("\n".join(lines) + "\n")
    blocks.append("message ListModelsResponse {\n  repeated ModelInfo models = 1;\n}\n")
    return "\n".join(blocks)


# --------------------------------------------------------------------------- docs and CSV

_JSON_TYPES: dict[str, dict[str, Any]] = {
               "string": {"type": "string"}, "int32": {"type": "integer"}, "int64": {"type": "integer"},
               "double": {"type": "number"}, "bool": {"type": "boolean"},
               "bytes": {"type": "string", "contentEncoding": "base64"},
               "ClassProbability": {"type": "object", "additionalProperties": {"type": "number"}},
               "BoundingBox": {"type": "array", "items": {"type": "integer"}, "minItems": 4, "maxItems": 4}}


def json_schema(cls: type) -> dict[str, Any]:
    """The JSON schema of an answer's HTTP JSON (for ``/docs.json``), from its declarations."""
    properties: dict[str, Any] = {}
    for f in answer_fields(cls):
        kind = f.proto_type.rstrip(">")
        nested = _ANSWER_BY_PROTO.get(kind)
        schema = ({"$ref": f"#/components/schemas/{nested.__name__}"} if nested is not None
                  else dict(_JSON_TYPES[kind]))
        if f.proto.startswith("map<"):
            schema = {"type": "object", "additionalProperties": schema}
        elif f.repeated and kind != "ClassProbability":
            schema = {"type": "array", "items": schema}
        schema["description"] = f.doc + _presence_note(f)
        if f.nullable:
            schema = {"anyOf": [schema, {"type": "null"}], "description": schema["description"]}
        parent, _, key = f.json.rpartition(".")
        target = properties.setdefault(parent, {"type": "object", "properties": {}})["properties"] \
            if parent else properties
        target[key] = schema
    return {"type": "object", "description": cls.DOC, "properties": properties}  # type: ignore[attr-defined]


def _presence_note(f: _Field) -> str:
    return {ALWAYS: "", CLASSES: " (models with classes)", MASK: " (models with a mask)",
            IF_SET: " (only when set)"}.get(f.when, f" (with {f.when})")


def csv_columns(task: str, class_names: Sequence[str]) -> list[str]:
    """The answer columns of ``predictions.csv`` for a model: its CSV fields in declaration
    order, the class probabilities (``p_<class>`` per class) after ``predicted`` and ``confidence``."""
    probe = Prediction(model="", version=None, stage=None, task=task)
    columns = [f.name for f in answer_fields(Prediction) if f.csv and _present(f, probe)]
    if "probabilities" in columns:
        columns.remove("probabilities")
        after = columns.index("confidence") + 1
        columns[after:after] = [f"p_{c}" for c in class_names]
    return columns


def csv_row(answer: Prediction) -> dict[str, Any]:
    """An answer's ``predictions.csv`` values (a box as ``"x y w h"``, ``""`` when empty)."""
    row: dict[str, Any] = {}
    for f in answer_fields(Prediction):
        if not (f.csv and _present(f, answer)):
            continue
        value = getattr(answer, f.name)
        if f.name == "probabilities":
            row.update({f"p_{c}": p for c, p in (value or {}).items()})
        elif isinstance(value, list):
            row[f.name] = " ".join(map(str, value))
        else:
            row[f.name] = "" if value is None else value
    return row


# --------------------------------------------------------------------------- making answers


def png_bytes(image: np.ndarray) -> bytes:
    """Encode an image as PNG.

    Args:
        image: ``(H, W)`` uint8/uint16 gray, or ``(H, W, 3)`` uint8 **RGB**.
    """
    arr = np.ascontiguousarray(image)
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise ValueError(f"could not encode a {arr.dtype} array of shape {arr.shape} as PNG")
    return buf.tobytes()


def mask_of(mask_png: bytes | str) -> np.ndarray:
    """An answer's ``mask_png`` (PNG bytes, or their base64 text; 255 = lesion) as an ``(H, W)`` bool mask.

    Raises:
        ValueError: not a PNG that decodes.
    """
    raw = base64.b64decode(mask_png) if isinstance(mask_png, str) else mask_png
    png = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_GRAYSCALE)
    if png is None:
        raise ValueError("the answer's mask_png does not decode")
    return np.asarray(png) > 0


def lesion_bbox(mask: np.ndarray) -> list[int] | None:
    """``[x, y, w, h]`` of the non-zero pixels of an ``(H, W)`` mask, ``None`` when empty."""
    rows = np.flatnonzero(np.any(mask, axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(np.any(mask, axis=0))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    return [x0, y0, x1 - x0 + 1, y1 - y0 + 1]


def output_parts(task: str, out: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A model's served output split into its class part and its mask part.

    Args:
        task: the model's task.
        out: ``(n, k)`` class probabilities (classifiers), ``(n, H', W', 1)`` lesion
            probabilities (segmenters), or a multi-task model's dict of both
            (``"probabilities"``, ``"mask"``, :meth:`breastscan.bundle.ModelBundle.predict`).

    Returns:
        ``(probabilities, mask)`` as float32, ``None`` for the part the task has not.
    """
    if isinstance(out, Mapping):
        return np.asarray(out["probabilities"], np.float32), np.asarray(out["mask"], np.float32)
    arr = np.asarray(out, dtype=np.float32)
    return (arr, None) if task == "classification" else (None, arr)


@dataclass(frozen=True)
class ModelFacts:
    """What every answer of one served model repeats: its contract, spec and registry place."""

    contract: ModelContract
    spec_id: str
    version: str | None = None
    stage: str | None = None


def predictions(model: ModelFacts, grays: Sequence[np.ndarray], boxes: Sequence[Letterbox], out: Any, *,
                heat: np.ndarray | None = None,
                roi: tuple[int, int, int, int] | None = None) -> list[Prediction]:
    """One model call's output as answers at the images' own sizes.

    Args:
        model: the served model.
        grays: each image, ``(H, W)`` float32 in [0, 1] (the crop, with a roi).
        boxes: the letterbox geometry of each image (maps outputs back to ``(H, W)``).
        out: the model's served output for those images (:func:`output_parts`).
        heat: ``(n, H', W')`` Grad-CAM maps in [0, 1] at the model size, or ``None``;
            explained, the overlay shows the heatmap.
        roi: the region of interest the images were cropped to, reported in the answers.
    """
    contract = model.contract
    probs, lesion = output_parts(contract.task, out)
    n = len(grays)
    classes = [{}] * n if probs is None else _class_fields(contract, grays, boxes, probs, heat)
    masks = [{}] * n if lesion is None else _mask_fields(contract, grays, boxes, lesion,
                                                         overlaid=heat is None)
    return [Prediction(model=contract.name, version=model.version, stage=model.stage, spec_id=model.spec_id,
                       task=contract.task, width=int(gray.shape[1]), height=int(gray.shape[0]),
                       roi=None if roi is None else list(roi), **m, **c)
            for gray, c, m in zip(grays, classes, masks, strict=True)]


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)


def _class_fields(contract: ModelContract, grays: Sequence[np.ndarray], boxes: Sequence[Letterbox],
                  probs: np.ndarray, heat: np.ndarray | None) -> list[dict[str, Any]]:
    """Each image's class fields: probabilities, the class the decision rule calls, its
    probability and, explained, the heatmap and its overlay at the original size."""
    names = list(contract.class_names)
    called = contract.rule.decide(probs, names)
    out = []
    for i, (gray, box) in enumerate(zip(grays, boxes, strict=True)):
        k = int(called[i])
        fields: dict[str, Any] = dict(
            probabilities={name: float(p) for name, p in zip(names, probs[i], strict=True)},
            predicted=names[k], confidence=float(probs[i, k]), decision_threshold=contract.rule.cutoff)
        if heat is not None:
            heat_full = np.clip(box.unletterbox(np.asarray(heat[i], np.float32), cv2.INTER_LINEAR), 0.0, 1.0)
            fields.update(heatmap_png=png_bytes(_to_uint8(heat_full)),
                          overlay_png=png_bytes(overlay(gray, heat_full, kind="heatmap")))
        out.append(fields)
    return out


def _mask_fields(contract: ModelContract, grays: Sequence[np.ndarray], boxes: Sequence[Letterbox],
                 lesion: np.ndarray, *, overlaid: bool = True) -> list[dict[str, Any]]:
    """Each image's mask fields at the original size: the mask, its area, fraction and box and,
    when ``overlaid``, the mask drawn over the image."""
    # Thresholded at model resolution, as evaluation scores it, then mapped back to the
    # original size with nearest-neighbour (half-pixel exact) so the served mask is the
    # evaluated one.
    masks = (lesion[..., 0] >= float(contract.threshold)).astype(np.uint8)
    out = []
    for gray, box, small in zip(grays, boxes, masks, strict=True):
        mask = box.unletterbox(small, cv2.INTER_NEAREST_EXACT).astype(bool)
        area = int(mask.sum())
        fields: dict[str, Any] = dict(mask_png=png_bytes(mask.astype(np.uint8) * 255), lesion_area_px=area,
                                      lesion_fraction=area / float(mask.size), bbox=lesion_bbox(mask))
        if overlaid:
            fields["overlay_png"] = png_bytes(overlay(gray, mask, kind="mask"))
        out.append(fields)
    return out


def model_info(name: str, spec: PreprocessSpec, contract: ModelContract, *, version: str | None = None,
               stage: str | None = None, source: str | None = None, runtime: str | None = None) -> ModelInfo:
    """What ``/models`` says about a served model; ``decision`` says in one sentence how a
    model whose rule is not the arg-max calls its class, ``threshold`` is the mask's."""
    rule = contract.rule
    return ModelInfo(name=name, version=version, stage=stage, source=source, runtime=runtime,
                     task=contract.task,
                     modality=contract.modality, classes=list(contract.class_names),
                     input_shape=list(contract.input_shape), spec_id=spec.spec_id,
                     temperature=float(contract.temperature),
                     threshold=float(contract.threshold) if has_mask(contract.task) else None,
                     decision=None if rule.is_argmax else rule.describe())


def analysis(modality: str, answers: Mapping[str, Prediction], *, rules: Mapping[str, DecisionRule],
             roi: tuple[int, int, int, int] | None = None, density_model: str = "density",
             tumor_model: str = "tumor") -> Analysis:
    """The answer of an analysis: each model's answer, plus the 8-category view of a mammogram
    when its density and tumor models both answered (their classes fitting the view).

    Args:
        modality: the image's modality.
        answers: each model's answer, by name.
        rules: each classifier's decision rule, by name (absent: the arg-max).
        roi: the region of interest, reported in the answer.
        density_model: name of the density classifier of the 8-category view.
        tumor_model: name of the tumor classifier of the 8-category view.
    """
    density, tumor = answers.get(density_model), answers.get(tumor_model)
    view = None
    if modality == "mammography" and density is not None and tumor is not None:
        view = eight_category_view(density, tumor, rules.get(tumor_model, ARGMAX_RULE))
    return Analysis(modality=modality, models=dict(answers), eight_category=view,
                    roi=None if roi is None else list(roi))


def eight_category_view(density: Prediction, tumor: Prediction,
                        tumor_rule: DecisionRule = ARGMAX_RULE) -> EightCategory | None:
    """The 8-category view of one mammogram's density and tumor answers, the tumor model's
    called class following its decision rule; ``None`` when either has no probabilities or
    their classes do not fit the view (logged)."""
    from breastscan.evaluation.combined import eight_category

    if not density.probabilities or not tumor.probabilities:
        return None
    try:
        view = eight_category(np.asarray([list(density.probabilities.values())]),
                              np.asarray([list(tumor.probabilities.values())]), list(tumor.probabilities),
                              density_names=list(density.probabilities), tumor_rule=tumor_rule)[0]
    except ValueError as exc:  # a deployment mistake (wrong classes), not the client's
        log.warning("no 8-category view from %s and %s: %s", density.model, tumor.model, exc)
        return None
    return EightCategory(**view)


__all__ = [name for name, value in globals().items()
           if not name.startswith("_") and not isinstance(value, types.ModuleType)]
