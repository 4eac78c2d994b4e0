"""What a request is made of, outside the model call: checked inputs, their errors, the answers.

The one request path is :class:`breastscan.serving.engine.Engine` (HTTP, gRPC, the web UI,
and :func:`breastscan.serving.engine.local_engine` in process); this module holds the steps
it is built from, none of which runs a model:

* :func:`decode_upload` turns an uploaded file's bytes, and :func:`validate_array` a raw
  array, into the ``(H, W)`` float32 gray image in [0, 1] that preprocessing takes; every
  client mistake becomes an :class:`InputError` whose ``code`` (one of
  :data:`INPUT_ERROR_CODES`, a short stable word) and message the service returns as a 4xx
  answer.
* :func:`prepare_inputs` checks and preprocesses images into one model batch
  (:class:`PreparedBatch`); :func:`finish_predictions` turns the model's calibrated output
  for that batch into one :class:`Prediction` per image: class probabilities (with an
  optional Grad-CAM heatmap), a lesion mask with its area and bounding box
  (:func:`lesion_bbox`), or both (a multi-task model, :func:`has_classes` and
  :func:`has_mask`), always in the **original** image's pixel coordinates.
* :func:`models_for_modality` routes an image to the models of its modality, and
  :func:`analysis` builds the answer of an analysis: each model's answer and, for a
  mammogram with a density and a tumor answer, the 8-category view
  (:func:`eight_category_view`, :func:`breastscan.evaluation.combined.eight_category`).

Images, masks and overlays travel as base64-encoded PNG (:func:`png_base64`). Nothing here
reads params, env or argv, or imports Keras or TensorFlow.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from breastscan.bundle import ModelContract, prepare_batch
from breastscan.decision import ARGMAX_RULE, DecisionRule
from breastscan.imaging.overlay import overlay
from breastscan.imaging.preprocessing import (
    ImageDecodeError,
    Letterbox,
    PreprocessSpec,
    decode_image,
    is_dicom,
)
from breastscan.labels import DICOM_MODALITY_CODES, MODALITIES
from breastscan.serving.batching import ModelOutput

log = logging.getLogger(__name__)

INPUT_ERROR_CODES: dict[str, str] = {
    "empty": "the upload has no bytes",
    "too_large": "the upload has too many bytes, or the image too many pixels per side",
    "too_small": "the image has too few pixels per side",
    "not_an_image": "the bytes are not a supported image format",
    "truncated": "the file ends early (cut-off upload)",
    "corrupt": "the file has a supported format but does not decode",
    "unsupported": "a supported container with an unsupported encoding (e.g. a DICOM codec)",
    "no_pixel_data": "a DICOM file without an image",
    "bad_shape": "the array is not (H, W) or (H, W, C) with C in 1, 3, 4",
    "bad_dtype": "the array's dtype is not an integer or floating type",
    "not_finite": "the image holds NaN or infinite values",
    "out_of_range": "a floating-point image has values outside [0, 1]",
    "unknown_model": "no model of that name is served",
    "unknown_modality": "no model is served for that modality, or the modality is not given",
    "bad_roi": "the region of interest is not x,y,w,h inside the image",
    "wrong_modality": "the DICOM header names a modality the model was not trained on",
    "malformed_request": "the body does not parse (JSON, or multipart without a boundary / cut short)",
    "unsupported_media_type": "the Content-Type is neither multipart/form-data nor application/json",
    "unknown_field": "a field the endpoint does not declare",
    "missing_field": "a required field is missing",
    "bad_field": "a field sent twice, as the wrong kind (file vs text), not UTF-8, or of the wrong type",
    "not_found": "no such route",
    "method_not_allowed": "the route does not take that HTTP method",
    "bad_request": "any other request the service refuses",
    "unauthorized": "no API key, or not a valid one (when authentication is on)",
    "not_dicom": "DICOM results were asked for an image that is not a DICOM file",
}
"""Every :attr:`InputError.code`, with what it means (for API documentation)."""

# decode_image and read_dicom say what went wrong in their message only; the first phrase
# found decides the code (order matters: "corrupt or truncated" is not a clean truncation).
_DECODE_CODES: tuple[tuple[str, str], ...] = (
    ("empty input", "empty"),
    ("smallest side", "too_small"),
    ("largest side", "too_large"),
    ("no pixel data", "no_pixel_data"),
    ("nan or infinite", "not_finite"),
    ("transfer syntax", "unsupported"),
    ("unsupported channel count", "bad_shape"),
    ("expected a 2-d", "bad_shape"),
    ("corrupt or truncated", "corrupt"),
    ("truncated", "truncated"),
    ("not an image", "not_an_image"),
    ("not a dicom file", "not_an_image"),
)

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_PIXEL_KINDS = "uif"  # unsigned, signed integer, floating point


class InputError(ValueError):
    """A client's input the platform refuses; the service answers it with a 4xx.

    Attributes:
        code: one of :data:`INPUT_ERROR_CODES`, stable for clients to branch on.
        message: a sentence for a human, naming the problem (never patient data).
    """

    def __init__(self, code: str, message: str) -> None:
        if code not in INPUT_ERROR_CODES:
            raise ValueError(f"unknown input error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message

    def to_dict(self) -> dict[str, str]:
        """``{"code": ..., "message": ...}``, the body of the service's error answer."""
        return {"code": self.code, "message": self.message}


# --------------------------------------------------------------------------- input checks


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
        InputError: ``empty``, ``too_large``, ``too_small``, ``not_an_image``,
            ``truncated``, ``corrupt``, ``unsupported``, ``no_pixel_data``, ``not_finite``,
            ``bad_shape`` or ``wrong_modality``.
    """
    spec = spec or PreprocessSpec()
    raw = bytes(data)
    if not raw:
        raise InputError("empty", "empty upload: no bytes to decode")
    if len(raw) > max_bytes:
        raise InputError("too_large", f"upload is {len(raw)} bytes; at most {max_bytes} are accepted")
    # An upload cut short is the commonest broken file: name it before the decoder, whose
    # own message for a cut PNG is only "does not decode".
    if raw.startswith(_PNG_MAGIC) and b"IEND" not in raw[-32:]:
        raise InputError("truncated", "truncated PNG: the file ends before its IEND chunk")
    if raw.startswith(_JPEG_MAGIC) and b"\xff\xd9" not in raw[-64:]:
        raise InputError("truncated", "truncated JPEG: the end-of-image marker is missing")
    try:
        if is_dicom(raw):
            _check_dicom_header(raw, spec, modality)
        return decode_image(raw, min_side=spec.min_side, max_side=spec.max_side)
    except ImageDecodeError as exc:
        raise InputError(_decode_code(str(exc)), str(exc)) from None


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
        raise ImageDecodeError("corrupt DICOM image attributes (Rows/Columns)") from None
    _check_side(height, width, spec)


def check_modality(code: str, modality: str) -> None:
    """Refuse an image whose DICOM Modality code is not the one a model was trained on.

    Args:
        code: the header's Modality (0008,0060), e.g. ``MG``, ``US``, ``CT``; empty when
            the header has none (accepted: nothing says the image is wrong).
        modality: the model's modality (``mammography``, ``ultrasound``).

    Raises:
        InputError: ``wrong_modality`` naming both.
    """
    code = code.strip().upper()
    if code and DICOM_MODALITY_CODES.get(code) != modality:
        wanted = ", ".join(c for c, name in DICOM_MODALITY_CODES.items() if name == modality) or modality
        raise InputError("wrong_modality", f"the DICOM header says Modality {code[:16]!r}; the model is "
                                           f"for {modality} ({wanted})")


def _decode_code(message: str) -> str:
    text = message.lower()
    for phrase, code in _DECODE_CODES:
        if phrase in text:
            return code
    return "corrupt"


def _check_side(height: int, width: int, spec: PreprocessSpec) -> None:
    if min(height, width) < spec.min_side:
        raise InputError("too_small", f"image is {width}x{height} pixels; the smallest side must be "
                                      f"at least {spec.min_side}")
    if max(height, width) > spec.max_side:
        raise InputError("too_large", f"image is {width}x{height} pixels; the largest side may be at "
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
        InputError: ``bad_shape`` (ndim, channels), ``too_small``/``too_large`` (sides),
            ``bad_dtype`` (bool, complex, object, text ...), ``not_finite`` (NaN/inf),
            ``out_of_range`` (floats outside [0, 1]).
    """
    spec = spec or PreprocessSpec()
    try:
        arr = np.asarray(array)
    except (TypeError, ValueError) as exc:  # ragged nested lists
        raise InputError("bad_shape", f"not a rectangular array: {exc}") from None
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise InputError("bad_shape", f"expected one image (H, W) or (H, W, C) with C in 1, 3, 4; "
                                      f"got shape {tuple(arr.shape)}")
    _check_side(int(arr.shape[0]), int(arr.shape[1]), spec)
    if arr.dtype.kind not in _PIXEL_KINDS:
        raise InputError("bad_dtype", f"pixel dtype {arr.dtype} is not supported; send uint8, uint16 "
                                      "or float in [0, 1]")
    if arr.ndim == 3:
        arr = arr[:, :, 0] if arr.shape[2] == 1 else _rgb_to_gray(arr[:, :, :3])
    if arr.dtype.kind == "f":
        # Errors are ignored here: float16 overflow shows up as inf just below.
        with np.errstate(invalid="ignore", over="ignore"):
            gray = arr.astype(np.float32)
        if not np.isfinite(gray).all():
            raise InputError("not_finite", "image contains NaN or infinite values")
        lo, hi = float(gray.min()), float(gray.max())
        if lo < 0.0 or hi > 1.0:
            raise InputError("out_of_range", f"floating-point pixels must be in [0, 1], got "
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


# --------------------------------------------------------------------------- predictions


@dataclass(frozen=True)
class Prediction:
    """One model's answer for one image (see :meth:`to_dict` for the JSON form).

    Attributes:
        model: the contract's model name (``density``, ``tumor``, ``lesion`` ...).
        version: registry version of the served model, if known.
        stage: registry stage (alias) it was served from, if known.
        spec_id: id of the preprocessing spec applied.
        task: ``classification``, ``segmentation`` or ``multitask`` (the keys of both).
        width: the original image's width in pixels.
        height: the original image's height in pixels.
        probabilities: class name -> calibrated probability, in class order (classifiers).
        predicted: the class the model's decision rule calls (classifiers): the most probable
            one, or the contract's operating point (:class:`breastscan.decision.DecisionRule`).
        confidence: its probability (classifiers).
        heatmap_png: base64 PNG, ``(height, width)`` 8-bit Grad-CAM heatmap, 255 = strongest
            evidence for ``predicted`` (classifiers, when explained).
        mask_png: base64 PNG, ``(height, width)`` 8-bit mask, 255 = lesion (segmenters).
        lesion_area_px: lesion pixels in the original image (segmenters).
        lesion_fraction: lesion pixels / all pixels, in [0, 1] (segmenters).
        bbox: ``[x, y, w, h]`` of the lesion pixels in original pixel coordinates, ``None``
            when no pixel is lesion (segmenters).
        overlay_png: base64 PNG, ``(height, width, 3)`` RGB image with the heatmap (when
            explained) or else the mask drawn over it.
    """

    model: str
    version: str | None
    stage: str | None
    spec_id: str
    task: str
    width: int
    height: int
    probabilities: dict[str, float] | None = None
    predicted: str | None = None
    confidence: float | None = None
    heatmap_png: str | None = None
    mask_png: str | None = None
    lesion_area_px: int | None = None
    lesion_fraction: float | None = None
    bbox: list[int] | None = None
    overlay_png: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able answer: common keys plus the keys of the task.

        Classifiers: ``probabilities``, ``predicted``, ``confidence`` and, when explained,
        ``heatmap_png`` and ``overlay_png``. Segmenters: ``mask_png``, ``lesion_area_px``,
        ``lesion_fraction``, ``bbox`` (``null`` when empty) and ``overlay_png``. A multi-task
        model: the keys of both, in that order (``heatmap_png`` before the mask's).
        """
        out: dict[str, Any] = {
            "model": self.model, "version": self.version, "stage": self.stage,
            "spec_id": self.spec_id, "task": self.task, "width": self.width, "height": self.height,
        }
        if has_classes(self.task):
            out.update(probabilities=self.probabilities, predicted=self.predicted,
                       confidence=self.confidence)
            if self.heatmap_png is not None:
                out["heatmap_png"] = self.heatmap_png
        if has_mask(self.task):
            out.update(mask_png=self.mask_png, lesion_area_px=self.lesion_area_px,
                       lesion_fraction=self.lesion_fraction, bbox=self.bbox)
        if has_mask(self.task) or self.heatmap_png is not None:
            out["overlay_png"] = self.overlay_png
        return out


def has_classes(task: str) -> bool:
    """Whether a model of ``task`` calls classes (a classifier, or a multi-task model's head)."""
    return task in ("classification", "multitask")


def has_mask(task: str) -> bool:
    """Whether a model of ``task`` outlines lesions (a segmenter, or a multi-task model's decoder)."""
    return task in ("segmentation", "multitask")


def output_parts(task: str, out: ModelOutput) -> tuple[np.ndarray | None, np.ndarray | None]:
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


def png_base64(image: np.ndarray) -> str:
    """Encode an image as PNG and then base64 text.

    Args:
        image: ``(H, W)`` uint8/uint16 gray, or ``(H, W, 3)`` uint8 **RGB**.

    Returns:
        The base64 (ASCII) text of the PNG file.
    """
    arr = np.ascontiguousarray(image)
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise ValueError(f"could not encode a {arr.dtype} array of shape {arr.shape} as PNG")
    return base64.b64encode(buf.tobytes()).decode("ascii")


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)


def lesion_bbox(mask: np.ndarray) -> list[int] | None:
    """``[x, y, w, h]`` of the non-zero pixels of an ``(H, W)`` mask, ``None`` when empty."""
    rows = np.flatnonzero(np.any(mask, axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(np.any(mask, axis=0))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    return [x0, y0, x1 - x0 + 1, y1 - y0 + 1]


@dataclass(frozen=True)
class PreparedBatch:
    """Images checked and preprocessed for one model, ready for one model call.

    Attributes:
        grays: each image as ``(H, W)`` float32 gray in [0, 1] at its own size.
        batch: ``(n, H', W', 1)`` float32 in [0, 1], the model input.
        boxes: the letterbox geometry of each image (maps outputs back to ``(H, W)``).
    """

    grays: list[np.ndarray]
    batch: np.ndarray
    boxes: list[Letterbox]


def prepare_inputs(spec: PreprocessSpec, contract: ModelContract, images: Sequence[Any]) -> PreparedBatch:
    """Check raw images and preprocess them into one model batch (no Keras needed).

    Args:
        spec: the model's preprocessing spec.
        contract: the model's contract (input shape).
        images: raw images, each checked and converted by :func:`validate_array` against
            ``spec`` (decoded files, ``(H, W)`` float32 in [0, 1], pass unchanged).

    Returns:
        The :class:`PreparedBatch`.

    Raises:
        InputError: an image fails :func:`validate_array` (the message names its index
            when there is more than one image).
    """
    grays = []
    for i, image in enumerate(images):
        try:
            grays.append(validate_array(image, spec))
        except InputError as exc:
            message = f"image {i}: {exc.message}" if len(images) > 1 else exc.message
            raise InputError(exc.code, message) from None
    batch, boxes = prepare_batch(spec, contract.input_shape, grays)
    return PreparedBatch(grays=grays, batch=batch, boxes=boxes)


def finish_predictions(
    contract: ModelContract,
    spec_id: str,
    prepared: PreparedBatch,
    out: ModelOutput,
    *,
    heat: np.ndarray | None = None,
    version: str | None = None,
    stage: str | None = None,
) -> list[Prediction]:
    """Turn one model call's output into answers at the original image sizes.

    Args:
        contract: the model's contract (task, class names, decision rule, mask threshold).
        spec_id: id of the preprocessing spec applied.
        prepared: what :func:`prepare_inputs` returned for this call.
        out: the model's served output for ``prepared.batch`` (:func:`output_parts`):
            ``(n, k)`` calibrated class probabilities, ``(n, H', W', 1)`` lesion probabilities
            in [0, 1], or a multi-task model's dict of both.
        heat: ``(n, H', W')`` Grad-CAM maps in [0, 1] at the model size (models with
            classes, when explained), or ``None``. Explained, the overlay shows the heatmap.
        version: registry version to report.
        stage: registry stage (alias) to report.

    Returns:
        One :class:`Prediction` per image, in order.
    """
    probs, lesion = output_parts(contract.task, out)
    n = len(prepared.grays)
    classes: list[dict[str, Any]] = ([{}] * n if probs is None
                                     else _class_fields(contract, prepared, probs, heat))
    masks: list[dict[str, Any]] = ([{}] * n if lesion is None
                                   else _mask_fields(contract, prepared, lesion, overlaid=heat is None))
    return [Prediction(model=contract.name, version=version, stage=stage, spec_id=spec_id, task=contract.task,
                       width=int(gray.shape[1]), height=int(gray.shape[0]), **m, **c)
            for gray, c, m in zip(prepared.grays, classes, masks, strict=True)]


def _class_fields(contract: ModelContract, prepared: PreparedBatch, probs: np.ndarray,
                  heat: np.ndarray | None) -> list[dict[str, Any]]:
    """Each image's class fields: probabilities, the class the decision rule calls, its
    probability and, explained, the heatmap and its overlay at the original size."""
    names = list(contract.class_names)
    predicted = contract.rule.decide(probs, names)
    out = []
    for i, (gray, box) in enumerate(zip(prepared.grays, prepared.boxes, strict=True)):
        k = int(predicted[i])
        fields: dict[str, Any] = dict(
            probabilities={name: float(p) for name, p in zip(names, probs[i], strict=True)},
            predicted=names[k], confidence=float(probs[i, k]))
        if heat is not None:
            heat_full = np.clip(box.unletterbox(np.asarray(heat[i], np.float32), cv2.INTER_LINEAR), 0.0, 1.0)
            fields.update(heatmap_png=png_base64(_to_uint8(heat_full)),
                          overlay_png=png_base64(overlay(gray, heat_full, kind="heatmap")))
        out.append(fields)
    return out


def _mask_fields(contract: ModelContract, prepared: PreparedBatch, lesion: np.ndarray, *,
                 overlaid: bool = True) -> list[dict[str, Any]]:
    """Each image's mask fields at the original size: the mask, its area, fraction and box and,
    when ``overlaid``, the mask drawn over the image."""
    # Thresholded at model resolution, as evaluation scores it, then mapped back to the
    # original size with nearest-neighbour (half-pixel exact) so the served mask is the
    # evaluated one.
    masks = (lesion[..., 0] >= float(contract.threshold)).astype(np.uint8)
    out = []
    for gray, box, small in zip(prepared.grays, prepared.boxes, masks, strict=True):
        mask = box.unletterbox(small, cv2.INTER_NEAREST_EXACT).astype(bool)
        area = int(mask.sum())
        fields: dict[str, Any] = dict(mask_png=png_base64(mask.astype(np.uint8) * 255), lesion_area_px=area,
                                      lesion_fraction=area / float(mask.size), bbox=lesion_bbox(mask))
        if overlaid:
            fields["overlay_png"] = png_base64(overlay(gray, mask, kind="mask"))
        out.append(fields)
    return out


def mask_of(mask_png: str) -> np.ndarray:
    """An answer's ``mask_png`` (base64 PNG, 255 = lesion) as an ``(H, W)`` bool mask.

    Raises:
        ValueError: the text is not a PNG that decodes.
    """
    png = cv2.imdecode(np.frombuffer(base64.b64decode(mask_png), np.uint8), cv2.IMREAD_GRAYSCALE)
    if png is None:
        raise ValueError("the answer's mask_png does not decode")
    return np.asarray(png) > 0


def models_for_modality(modalities: Mapping[str, str], modality: str) -> list[str]:
    """The names of the models of one modality, in name order.

    Args:
        modalities: each served model's modality, by name.
        modality: ``mammography`` or ``ultrasound``.

    Raises:
        InputError: ``unknown_modality`` (not a modality, or no model serves it).
    """
    if modality not in MODALITIES:
        raise InputError("unknown_modality", f"modality must be one of {', '.join(MODALITIES)}, "
                                             f"got {modality!r}")
    chosen = sorted(name for name, m in modalities.items() if m == modality)
    if not chosen:
        raise InputError("unknown_modality", f"no model is served for {modality}")
    return chosen


def analysis(modality: str, answers: Mapping[str, Prediction], *, density_model: str = "density",
             tumor_model: str = "tumor", rules: Mapping[str, DecisionRule] | None = None) -> dict[str, Any]:
    """The answer of an analysis: each model's answer, plus the 8-category view of a mammogram.

    Args:
        modality: the image's modality.
        answers: each model's :class:`Prediction` for the image, by name.
        density_model: name of the density classifier of the 8-category view.
        tumor_model: name of the tumor classifier of the 8-category view.
        rules: each classifier's decision rule (its contract's), by name; absent: the arg-max.

    Returns:
        ``{"modality", "models": {name: answer dict}}`` plus ``"eight_category"`` for
        mammography when both classifiers answered.
    """
    result: dict[str, Any] = {"modality": modality,
                              "models": {name: p.to_dict() for name, p in answers.items()}}
    density, tumor = answers.get(density_model), answers.get(tumor_model)
    if modality == "mammography" and density is not None and tumor is not None:
        combined = eight_category_view(density, tumor, (rules or {}).get(tumor_model, ARGMAX_RULE))
        if combined is not None:
            result["eight_category"] = combined
    return result


def eight_category_view(density: Prediction, tumor: Prediction,
                        tumor_rule: DecisionRule = ARGMAX_RULE) -> dict[str, Any] | None:
    """The 8-category view (pathology x density) of one mammogram's density and tumor answers,
    the tumor model's called class and pathology following its decision rule.

    Returns:
        One dict of :func:`breastscan.evaluation.combined.eight_category`, or ``None`` when either
        answer has no probabilities or their classes do not fit the view (logged).
    """
    from breastscan.evaluation.combined import eight_category

    if not density.probabilities or not tumor.probabilities:
        return None
    try:
        return eight_category(
            np.asarray([list(density.probabilities.values())]),
            np.asarray([list(tumor.probabilities.values())]),
            list(tumor.probabilities),
            density_names=list(density.probabilities),
            tumor_rule=tumor_rule,
        )[0]
    except ValueError as exc:  # a deployment mistake (wrong classes), not the client's
        log.warning("no 8-category view from %s and %s: %s", density.model, tumor.model, exc)
        return None


def check_dicom_output(data: bytes | None, roi: tuple[int, int, int, int] | None) -> None:
    """Refuse a request for DICOM results that cannot have them (before any model runs).

    Raises:
        InputError: ``not_dicom`` (an array or a file that is not DICOM: there is no study
            to reference) or ``bad_roi`` (results describe the whole image).
    """
    if data is None or not is_dicom(data):
        raise InputError("not_dicom", "DICOM results reference the source image's study and series: "
                                      "send a DICOM file")
    if roi is not None:
        raise InputError("bad_roi", "DICOM results describe the whole image: leave roi out")


def dicom_objects(data: bytes, answers: Mapping[str, Prediction],
                  algorithms: Mapping[str, Any]) -> dict[str, Any]:
    """The answers of one analysis as DICOM objects, each referencing the source image.

    Args:
        data: the source DICOM file.
        answers: each model's :class:`Prediction` for it (whole image).
        algorithms: each model's :class:`breastscan.imaging.dicom_results.AlgorithmInfo`.

    Returns:
        ``{"sr": base64 Part 10 Structured Report of every answer, "seg": {name of a model
        with a mask (segmenter, multi-task): base64 Part 10 Segmentation of its mask}}``.
    """
    from breastscan.imaging import dicom_results as dr

    source = dr.source_dataset(data)
    segs = {}
    for name, answer in answers.items():
        if has_mask(answer.task) and answer.mask_png is not None:
            seg = dr.segmentation(source, mask_of(answer.mask_png), algorithms[name])
            segs[name] = base64.b64encode(dr.to_bytes(seg)).decode("ascii")
    report = dr.structured_report(source, {n: a.to_dict() for n, a in answers.items()}, algorithms)
    return {"sr": base64.b64encode(dr.to_bytes(report)).decode("ascii"), "seg": segs}
