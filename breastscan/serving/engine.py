"""The request logic of the service, shared by its HTTP and gRPC front ends and the web UI.

An :class:`Engine` holds, per served model, everything but the network weights: the
preprocessing spec, the contract, the registry version and stage (:class:`ServedModel`).
A request is

1. decoded and checked (:func:`breastscan.serving.requests.decode_upload` /
   :func:`breastscan.serving.requests.validate_array`), optionally cropped to a region of interest,
2. preprocessed into a one-image batch (:func:`breastscan.serving.requests.prepare_inputs`),
3. sent to the model through ``infer`` -- in the service, the model's
   :class:`breastscan.serving.batching.Batcher`, which merges concurrent requests into one
   model call,
4. turned into the answer at the original image size
   (:func:`breastscan.serving.requests.finish_predictions`).

A multi-task model answers its classes and its mask from that one call; explained, its
class head gets Grad-CAM on the U-Net's bottleneck (:func:`explainer`).

Client mistakes raise :class:`breastscan.serving.requests.InputError` before anything reaches the
model, so one bad upload can never fail a batch it would have shared with others. CPU
work (decoding, preprocessing, PNG encoding) runs in worker threads, off the event loop.

This is the only request path: in process (tests, benchmarks, notebooks)
:func:`local_engine` builds an engine whose ``infer`` calls the bundles directly.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from breastscan.bundle import ModelContract
from breastscan.imaging.preprocessing import PreprocessSpec, is_dicom
from breastscan.labels import DICOM_MODALITY_CODES
from breastscan.serving.batching import Batcher, BatchSettings, ModelOutput, model_batchers, output_rows
from breastscan.serving.requests import (
    InputError,
    Prediction,
    PreparedBatch,
    analysis,
    check_dicom_output,
    decode_upload,
    dicom_objects,
    finish_predictions,
    has_classes,
    has_mask,
    models_for_modality,
    output_parts,
    png_base64,
    prepare_inputs,
    validate_array,
)

if TYPE_CHECKING:
    import keras

    from breastscan.bundle import ModelBundle
    from breastscan.imaging.dicom_results import AlgorithmInfo
    from breastscan.monitoring.recorder import Recorder

log = logging.getLogger(__name__)

InferFn = Callable[[str, np.ndarray], Awaitable[ModelOutput]]
"""``(model name, (n, H, W, 1) float32 batch) -> served probabilities`` of that batch (a
multi-task model's: ``{"probabilities", "mask"}``)."""

ExplainFn = Callable[[str, np.ndarray, list[int]], Awaitable[np.ndarray]]
"""``(model name, (n, H, W, 1) batch, class index per image) -> (n, H, W)`` Grad-CAM maps."""

CLASS_POOL = "class_avg_pool"
"""The layer of a multi-task model's class head that pools the U-Net's bottleneck
(:func:`breastscan.models.multitask.build_multitask`): Grad-CAM explains the map it pools."""

ARRAY_DTYPES = ("uint8", "uint16", "int16", "int32", "float32", "float64")
"""dtype names an array input may declare (JSON and gRPC carry no dtype of their own)."""



@dataclass(frozen=True)
class ServedModel:
    """A served model as the front end knows it (no weights).

    Attributes:
        name: model name (``density``, ``tumor``, ``lesion`` ...), the endpoint's name.
        spec: its preprocessing spec.
        contract: its contract (task, modality, classes, calibration, threshold).
        version: registry version it was imported from, if known.
        stage: registry stage (alias) it was imported from, if known.
        source: where it came from (e.g. ``models:/breastscan-tumor@production``).
    """

    name: str
    spec: PreprocessSpec
    contract: ModelContract
    version: str | None = None
    stage: str | None = None
    source: str | None = None

    def algorithm(self) -> AlgorithmInfo:
        """What identifies the model in DICOM results (name, registry version and stage)."""
        from breastscan.imaging.dicom_results import AlgorithmInfo

        c = self.contract
        return AlgorithmInfo(name=self.name, version=self.version or "unknown", stage=self.stage or "",
                             task=c.task, class_names=tuple(c.class_names),
                             decision=c.rule.describe() if has_classes(c.task) else "")

    def describe(self) -> dict[str, Any]:
        """JSON-able facts about the model (what ``/models`` lists); ``decision`` says in one
        sentence how a model with classes whose rule is not the arg-max calls its class (else
        ``None``); ``threshold`` is the mask's (models with a mask, else ``None``)."""
        c = self.contract
        rule = c.rule
        return {
            "name": self.name, "version": self.version, "stage": self.stage, "source": self.source,
            "task": c.task, "modality": c.modality, "classes": list(c.class_names),
            "input_shape": list(c.input_shape), "spec_id": self.spec.spec_id,
            "temperature": c.temperature, "threshold": c.threshold if has_mask(c.task) else None,
            "decision": None if rule.is_argmax else rule.describe(),
        }


@dataclass(frozen=True)
class ImageInput:
    """One image in a request: a file's bytes or an array, and an optional crop.

    Attributes:
        data: the bytes of an image file (PNG, JPEG, PGM, TIFF, BMP, DICOM), or ``None``.
        array: one image as an array (see :func:`breastscan.serving.requests.validate_array`), or
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
            InputError: ``bad_dtype`` (unknown dtype, or values that do not fit it) or
                ``bad_shape`` (ragged lists).
        """
        if dtype is not None and dtype not in ARRAY_DTYPES:
            raise InputError("bad_dtype", f"dtype {dtype!r} is not supported; use one of "
                                          f"{', '.join(ARRAY_DTYPES)}")
        try:
            arr = np.asarray(values)
        except (TypeError, ValueError) as exc:
            raise InputError("bad_shape", f"not a rectangular array: {exc}") from None
        if arr.dtype == object:
            raise InputError("bad_shape", "not a rectangular array of numbers")
        if dtype is not None and arr.dtype != np.dtype(dtype):
            target = np.dtype(dtype)
            if arr.size and target.kind in "iu" and arr.dtype.kind in "iuf":
                info = np.iinfo(target)
                finite = np.isfinite(arr) if arr.dtype.kind == "f" else np.ones(arr.shape, bool)
                if not finite.all():
                    raise InputError("not_finite", "image contains NaN or infinite values")
                lo, hi = float(arr.min()), float(arr.max())
                fractional = arr.dtype.kind == "f" and not np.all(arr == np.rint(arr))
                if lo < info.min or hi > info.max or fractional:
                    raise InputError("bad_dtype", f"values in [{lo:.6g}, {hi:.6g}] are not {dtype} pixels")
            try:
                with np.errstate(invalid="ignore", over="ignore"):
                    arr = arr.astype(target)
            except (TypeError, ValueError) as exc:
                raise InputError("bad_dtype", f"cannot read the values as {dtype}: {exc}") from None
        return cls(array=arr, roi=roi)


def parse_roi(text: str | Sequence[int] | None) -> tuple[int, int, int, int] | None:
    """Read a region of interest given as ``"x,y,w,h"`` or four integers.

    Returns:
        ``(x, y, w, h)``, or ``None`` for an empty value.

    Raises:
        InputError: ``bad_roi`` when it is not four integers with ``w, h > 0``, ``x, y >= 0``.
    """
    if text is None or (isinstance(text, str) and not text.strip()) or (
            not isinstance(text, str) and len(text) == 0):
        return None
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        x, y, w, h = (int(str(p).strip()) for p in parts)
    except ValueError:
        raise InputError("bad_roi", f"roi must be four integers x,y,w,h; got {text!r}") from None
    if x < 0 or y < 0 or w <= 0 or h <= 0:
        raise InputError("bad_roi", f"roi x,y must be >= 0 and w,h > 0; got {x},{y},{w},{h}")
    return x, y, w, h


def crop(gray: np.ndarray, roi: tuple[int, int, int, int] | None) -> np.ndarray:
    """Crop an ``(H, W)`` image to ``roi = (x, y, w, h)`` (``None``: unchanged).

    Raises:
        InputError: ``bad_roi`` when the region does not lie inside the image.
    """
    if roi is None:
        return gray
    x, y, w, h = roi
    height, width = gray.shape[:2]
    if x + w > width or y + h > height:
        raise InputError("bad_roi", f"roi {x},{y},{w},{h} does not lie inside the {width}x{height} image")
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


class Engine:
    """Checks, preprocesses and answers requests; the model call itself is ``infer``.

    Args:
        models: the served models by name.
        infer: runs one model on a preprocessed batch (see :data:`InferFn`).
        explain: Grad-CAM of a classifier on a preprocessed batch (see :data:`ExplainFn`).
        max_upload_bytes: largest image file accepted.
        recorder: drift monitoring: gets each answered image and its answer (queued, off the
            request's path), or ``None``.
    """

    def __init__(self, models: Mapping[str, ServedModel], infer: InferFn, explain: ExplainFn, *,
                 max_upload_bytes: int, recorder: Recorder | None = None) -> None:
        self.models = dict(models)
        self._infer = infer
        self._explain = explain
        self.max_upload_bytes = int(max_upload_bytes)
        self.batchers: dict[str, Batcher] = {}
        self.recorder = recorder

    # ------------------------------------------------------------------ helpers
    def describe(self) -> list[dict[str, Any]]:
        """Facts about every served model, in name order."""
        return [self.models[name].describe() for name in sorted(self.models)]

    def select(self, name: str) -> ServedModel:
        """The served model called ``name``.

        Raises:
            InputError: ``unknown_model``; the message lists the served names.
        """
        try:
            return self.models[name]
        except KeyError:
            served = ", ".join(sorted(self.models)) or "none"
            raise InputError("unknown_model", f"no model named {name!r}; served: {served}") from None

    def decode(self, image: ImageInput, modality: str | None = None) -> np.ndarray:
        """The request's image as ``(H, W)`` float32 gray in [0, 1], cropped to its roi.

        Args:
            image: the request's image.
            modality: the modality it must be, checked against a DICOM file's header.

        Raises:
            InputError: any code of :func:`decode_upload` (``wrong_modality`` included) /
                :func:`validate_array`, or ``bad_roi``.
        """
        if (image.data is None) == (image.array is None):
            raise InputError("empty", "send exactly one image: a file or an array")
        if image.data is not None:
            gray = decode_upload(image.data, max_bytes=self.max_upload_bytes, modality=modality)
        else:
            gray = validate_array(image.array)
        return crop(gray, image.roi)

    def _prepare(self, served: ServedModel, image: ImageInput | np.ndarray) -> PreparedBatch:
        """Decode (unless already decoded) and preprocess one image for ``served``: one thread hop."""
        gray = image if isinstance(image, np.ndarray) else self.decode(image, served.contract.modality)
        return prepare_inputs(served.spec, served.contract, [gray])

    async def _run(self, served: ServedModel, image: ImageInput | np.ndarray, explain: bool,
                   data: bytes | None = None) -> Prediction:
        prepared = await asyncio.to_thread(self._prepare, served, image)
        out = await self._infer(served.name, prepared.batch)  # one model call, every output
        if output_rows(out) != len(prepared.batch):
            raise RuntimeError(f"model {served.name} answered {output_rows(out)} rows for "
                               f"{len(prepared.batch)} images")
        heat = await self._heat(served, prepared, out) if explain else None
        finish = functools.partial(finish_predictions, served.contract, served.spec.spec_id, prepared, out,
                                   heat=heat, version=served.version, stage=served.stage)
        if heat is None and not has_mask(served.contract.task):
            prediction = finish()[0]  # a few dict entries: cheaper here than a thread hop
        else:
            prediction = (await asyncio.to_thread(finish))[0]
        if self.recorder is not None:  # a queue put: the statistics are computed on its thread
            self.recorder.record(served.name, prepared.grays[0], prediction.to_dict(),
                                 modality=served.contract.modality, version=served.version,
                                 dicom=image.data if isinstance(image, ImageInput) else data)
        return prediction

    async def _heat(self, served: ServedModel, prepared: PreparedBatch,
                    out: ModelOutput) -> np.ndarray | None:
        """Grad-CAM of the class the answer calls (``predicted``); ``None`` for a model without classes."""
        probs, _ = output_parts(served.contract.task, out)
        if probs is None:
            return None
        called = served.contract.rule.decide(probs[:1], served.contract.class_names)
        return await self._explain(served.name, prepared.batch, [int(called[0])])

    # ------------------------------------------------------------------ requests
    async def predict(self, model: str, image: ImageInput, *, explain: bool = False) -> dict[str, Any]:
        """One model's answer for one image.

        Returns:
            :meth:`breastscan.serving.requests.Prediction.to_dict`, plus ``"roi"`` when cropped.

        Raises:
            InputError: the client's mistake (unknown model, bad image, bad roi).
        """
        served = self.select(model)
        answer = (await self._run(served, image, explain)).to_dict()
        if image.roi is not None:
            answer["roi"] = list(image.roi)
        return answer

    async def analyze(self, image: ImageInput, *, modality: str | None = None,
                      explain: bool = False, dicom: bool = False) -> dict[str, Any]:
        """Every model of the image's modality on one image, run concurrently.

        Args:
            image: the image.
            modality: ``mammography`` or ``ultrasound``; may be left out for a DICOM file
                whose header says (MG, US), or when only one modality is served.
            explain: add Grad-CAM heatmaps to the answers of models with classes.
            dicom: also return the answers as DICOM objects (a DICOM image, whole: no roi).

        Returns:
            ``{"modality", "models": {name: answer}}`` plus ``"eight_category"`` for a
            mammogram when a density and a tumor model both answered, ``"roi"``, and with
            ``dicom`` ``"dicom": {"sr": base64 Part 10, "seg": {segmenter: base64 Part 10}}``
            (:func:`breastscan.serving.requests.dicom_objects`; a multi-task model's mask has
            a SEG, its class and lesion measures are in the SR).

        Raises:
            InputError: ``unknown_modality``, ``wrong_modality`` (a DICOM header naming
                another modality than the one asked for, or one no model serves),
                ``not_dicom`` / ``bad_roi`` (DICOM results of a non-DICOM file or a crop)
                or any image error.
        """
        if dicom:
            check_dicom_output(image.data, image.roi)
        modality = await self._modality_of(image, modality)
        chosen = models_for_modality({n: m.contract.modality for n, m in self.models.items()}, modality)
        gray = await asyncio.to_thread(self.decode, image, modality)
        answers = dict(zip(chosen, await asyncio.gather(
            *(self._run(self.models[n], gray, explain, image.data) for n in chosen)), strict=True))
        result = analysis(modality, answers, rules={n: self.models[n].contract.rule for n in chosen})
        if image.roi is not None:
            result["roi"] = list(image.roi)
        if dicom and image.data is not None:
            result["dicom"] = await asyncio.to_thread(
                dicom_objects, image.data, answers, {n: self.models[n].algorithm() for n in chosen})
        return result

    async def _modality_of(self, image: ImageInput, modality: str | None) -> str:
        """The modality asked for, else the DICOM header's, else the one served (if only one)."""
        modality = (modality or "").strip().lower() or None
        if modality is None and image.data is not None:
            code = await asyncio.to_thread(dicom_modality_code, image.data)
            modality = DICOM_MODALITY_CODES.get(code)
            if code and modality is None:
                known = ", ".join(sorted(DICOM_MODALITY_CODES))
                raise InputError("wrong_modality", f"the DICOM header says Modality {code[:16]!r}; the "
                                                   f"models are for {known}")
        served_modalities = sorted({m.contract.modality for m in self.models.values()})
        if modality is None:
            if len(served_modalities) != 1:
                raise InputError("unknown_modality", "say which modality the image is: one of "
                                                     f"{', '.join(served_modalities)}")
            modality = served_modalities[0]
        return modality

    async def preview(self, image: ImageInput) -> dict[str, Any]:
        """The decoded image as an 8-bit PNG (how the service sees a DICOM or 16-bit file).

        Returns:
            ``{"width", "height", "modality" (from a DICOM header, else None),
            "png" (base64)}`` of the whole image (the roi is ignored).
        """
        gray = await asyncio.to_thread(self.decode, ImageInput(data=image.data, array=image.array))
        code = await asyncio.to_thread(dicom_modality_code, image.data) if image.data else ""
        modality = DICOM_MODALITY_CODES.get(code)
        png = await asyncio.to_thread(
            png_base64, np.clip(np.rint(gray * 255.0), 0, 255).astype(np.uint8))
        return {"width": int(gray.shape[1]), "height": int(gray.shape[0]), "modality": modality, "png": png}


def local_engine(bundles: Mapping[str, Any], *, max_upload_bytes: int = 32 * 2**20,
                 versions: Mapping[str, str] | None = None,
                 stages: Mapping[str, str] | None = None,
                 batching: BatchSettings | None = None) -> Engine:
    """An :class:`Engine` whose models run in this process (tests, benchmarks, notebooks).

    Args:
        bundles: :class:`breastscan.bundle.ModelBundle` by served name.
        max_upload_bytes: largest image file accepted.
        versions: registry version per name, reported in answers.
        stages: registry stage per name, reported in answers.
        batching: batch concurrent requests as the service does (its batchers are the
            engine's ``batchers``); ``None`` calls each bundle directly, one request a call.

    Returns:
        The engine.
    """
    versions, stages = versions or {}, stages or {}
    batchers = {} if batching is None else model_batchers(
        {name: b.predict for name, b in bundles.items()}, lambda _: batching)
    explainers = {name: explainer(b) for name, b in bundles.items()}

    async def infer(name: str, batch: np.ndarray) -> ModelOutput:
        if batchers:
            return await batchers[name].submit(batch)
        return await asyncio.to_thread(bundles[name].predict, batch)

    async def explain(name: str, batch: np.ndarray, classes: list[int]) -> np.ndarray:
        return await asyncio.to_thread(explainers[name], batch, np.asarray(classes))

    served = {name: ServedModel(name=name, spec=b.spec, contract=b.contract, version=versions.get(name),
                                stage=stages.get(name)) for name, b in bundles.items()}
    engine = Engine(served, infer, explain, max_upload_bytes=max_upload_bytes)
    engine.batchers = batchers
    return engine


def explainer(bundle: ModelBundle) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The Grad-CAM of a bundle's classes, ready to call per request.

    A classifier's map is taken on its last feature map
    (:func:`breastscan.models.gradcam.grad_cam`'s default). A multi-task model is explained
    through its classification view (built once, here) on the U-Net's bottleneck
    (:func:`class_feature_layer`): the last layer of the mask decoder would explain the
    mask, not the class.

    Returns:
        ``(batch (n, H, W, 1), class index per image (n,)) -> (n, H, W)`` maps in [0, 1].
    """
    from breastscan.models.gradcam import grad_cam

    if bundle.contract.task != "multitask":
        return functools.partial(grad_cam, bundle.model)
    model = bundle.view("classification").model
    return functools.partial(grad_cam, model, layer=class_feature_layer(model))


def class_feature_layer(model: keras.Model) -> str:
    """Name of the 4-D layer a multi-task model's class head pools: the U-Net's bottleneck
    (``bottleneck_dropout``, or ``bottleneck_relu2`` without dropout), the input of
    :data:`CLASS_POOL`.

    Raises:
        ValueError: the model has no :data:`CLASS_POOL` layer, or nothing feeds it.
    """
    pooled = model.get_layer(CLASS_POOL).input
    for layer in model.layers:
        if layer.output is pooled:
            return str(layer.name)
    raise ValueError(f"no layer of {model.name!r} feeds {CLASS_POOL!r}")
