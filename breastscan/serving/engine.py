"""The engine: a parsed :class:`breastscan.serving.request.Request` in, an answer out.

An :class:`Engine` holds, per served model, everything but the network weights: the
preprocessing spec, the contract, the registry version and stage (:class:`ServedModel`).
:meth:`Engine.answer` is the one way a request is answered -- over HTTP, over gRPC, by
``breastscan predict`` and in tests -- and for a ``predict``:

1. the image is decoded and checked (:func:`breastscan.serving.request.decode_upload` /
   :func:`~breastscan.serving.request.validate_array`) and cropped to its region of interest,
2. preprocessed into a one-image batch (:func:`prepare_inputs`),
3. sent to the model through ``infer`` -- in the service, the model's
   :class:`breastscan.serving.batching.Batcher`, which merges concurrent requests into one
   model call,
4. turned into the answer at the image's own size (:func:`breastscan.serving.answer.predictions`).

A multi-task model answers its classes and its mask from that one call; explained, its
class head gets Grad-CAM on the U-Net's bottleneck (:func:`explainer`).

Client mistakes raise :class:`breastscan.serving.answer.ApiError` before anything reaches the
model, so one bad upload can never fail a batch it would have shared with others. CPU
work (decoding, preprocessing, PNG encoding) runs in worker threads, off the event loop.
In process (tests, benchmarks, notebooks) :func:`local_engine` builds an engine whose
``infer`` calls the bundles directly.

**Versions.** Each served model is one :class:`ModelSlot`: one registry version with its
own batcher and explainer. A request takes the slots it needs once, when it is admitted,
and finishes on them; :meth:`Engine.replace` serves a new version from then on in one
assignment (:mod:`breastscan.serving.follow` does it when the registry stage moves), so no
batch ever mixes two versions and every answer names the version that computed it.
:meth:`Engine.retire` closes the old slot's batcher once its requests have finished;
:meth:`Engine.withdraw` stops serving a model (``model_withdrawn``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from dataclasses import replace as dataclass_replace
from typing import TYPE_CHECKING, Any

import numpy as np

from breastscan.bundle import ModelContract, prepare_batch
from breastscan.imaging.preprocessing import Letterbox, PreprocessSpec
from breastscan.labels import DICOM_MODALITY_CODES, MODALITIES
from breastscan.serving.answer import (
    Analysis,
    Answer,
    ApiError,
    ModelFacts,
    ModelInfo,
    Prediction,
    Preview,
    analysis,
    has_classes,
    has_mask,
    mask_of,
    model_info,
    output_parts,
    png_bytes,
    predictions,
    to_dict,
)
from breastscan.serving.batching import Batcher, BatchSettings, ModelOutput, model_batcher, output_rows
from breastscan.serving.request import (
    ImageInput,
    Request,
    check_dicom_output,
    crop,
    decode_upload,
    dicom_modality_code,
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

SlotInfer = Callable[[np.ndarray], Awaitable[ModelOutput]]
"""One model version's call: ``(n, H, W, 1) float32 batch ->`` its served probabilities."""

SlotExplain = Callable[[np.ndarray, list[int]], Awaitable[np.ndarray]]
"""One model version's Grad-CAM: ``((n, H, W, 1) batch, class index per image) -> (n, H, W)``."""

CLASS_POOL = "class_avg_pool"
"""The layer of a multi-task model's class head that pools the U-Net's bottleneck
(:func:`breastscan.models.multitask.build_multitask`): Grad-CAM explains the map it pools."""


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
        runtime: what runs it in this process, ``onnx`` or ``keras`` (set by :func:`bundle_slot`).
    """

    name: str
    spec: PreprocessSpec
    contract: ModelContract
    version: str | None = None
    stage: str | None = None
    source: str | None = None
    runtime: str | None = None

    def algorithm(self) -> AlgorithmInfo:
        """What identifies the model in DICOM results (name, registry version and stage)."""
        from breastscan.imaging.dicom_results import AlgorithmInfo

        c = self.contract
        return AlgorithmInfo(name=self.name, version=self.version or "unknown", stage=self.stage or "",
                             task=c.task, class_names=tuple(c.class_names),
                             decision=c.rule.describe() if has_classes(c.task) else "")

    @functools.cached_property
    def facts(self) -> ModelFacts:
        """What each of its answers repeats (contract, spec id, version, stage)."""
        return ModelFacts(self.contract, self.spec.spec_id, self.version, self.stage)

    def describe(self) -> ModelInfo:
        """What ``/models`` says about it."""
        return model_info(self.name, self.spec, self.contract, version=self.version, stage=self.stage,
                          source=self.source, runtime=self.runtime)



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

    Raises:
        ApiError: an image fails :func:`validate_array` (the message names its index when
            there is more than one image).
    """
    grays = []
    for i, image in enumerate(images):
        try:
            grays.append(validate_array(image, spec))
        except ApiError as exc:
            message = f"image {i}: {exc.message}" if len(images) > 1 else exc.message
            raise ApiError(exc.code, message) from None
    batch, boxes = prepare_batch(spec, contract.input_shape, grays)
    return PreparedBatch(grays=grays, batch=batch, boxes=boxes)


@dataclass(eq=False)
class ModelSlot:
    """One version of a served model, whole: what a request admitted to it uses to the end.

    Never changed once serving (a new version is a new slot, :meth:`Engine.replace`), except
    for ``in_flight``, which only the event loop's thread touches.

    Attributes:
        served: the version's spec, contract, registry version and stage.
        infer: its model call (through ``batcher`` in the service).
        explain: its Grad-CAM.
        batcher: its own batcher (``None`` in process without batching), closed by :meth:`retire`.
        in_flight: requests admitted to this slot and not finished yet.
    """

    served: ServedModel
    infer: SlotInfer
    explain: SlotExplain
    batcher: Batcher | None = None
    in_flight: int = field(default=0, init=False)

    @contextlib.contextmanager
    def held(self) -> Iterator[ModelSlot]:
        """Count one request on this slot while the block runs."""
        self.in_flight += 1
        try:
            yield self
        finally:
            self.in_flight -= 1

    async def retire(self, timeout_s: float, poll_s: float = 0.02) -> bool:
        """Close the batcher once every request held here has finished (waiting at most ``timeout_s``).

        Returns:
            Whether they all finished in time (the batcher is closed either way).
        """
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(poll_s)
        if self.batcher is not None:
            self.batcher.close()
            await self.batcher.wait_closed()
        return not self.in_flight


@contextlib.contextmanager
def _holding(slots: Iterable[ModelSlot]) -> Iterator[None]:
    """Hold every slot of ``slots`` (:meth:`ModelSlot.held`) while the block runs."""
    with contextlib.ExitStack() as stack:
        for slot in slots:
            stack.enter_context(slot.held())
        yield


def named_slot(served: ServedModel, infer: InferFn, explain: ExplainFn,
               batcher: Batcher | None = None) -> ModelSlot:
    """A slot whose calls go to engine-wide ``infer`` / ``explain`` functions with the model's name."""
    name = served.name

    async def call(batch: np.ndarray) -> ModelOutput:
        return await infer(name, batch)

    async def heat(batch: np.ndarray, classes: list[int]) -> np.ndarray:
        return await explain(name, batch, classes)

    return ModelSlot(served, call, heat, batcher)


def bundle_slot(served: ServedModel, bundle: ModelBundle, batching: BatchSettings | None = None,
                on_batch: Callable[[str, int], None] | None = None) -> ModelSlot:
    """A slot running ``bundle`` in this process (builds its explainer: call it off the event loop).

    Args:
        served: what the engine knows of the version (its name names the batcher).
        bundle: the loaded model.
        batching: batch concurrent requests with a :class:`Batcher` of its own; ``None`` runs
            each request alone on a thread.
        on_batch: ``(name, batch size)`` of every model call (metrics).
    """
    served = dataclass_replace(served, runtime=bundle.runtime)
    batcher = None if batching is None else model_batcher(served.name, bundle.predict, batching, on_batch)
    grad_cam = explainer(bundle)

    async def call(batch: np.ndarray) -> ModelOutput:
        if batcher is not None:
            return await batcher.submit(batch)
        return await asyncio.to_thread(bundle.predict, batch)

    async def heat(batch: np.ndarray, classes: list[int]) -> np.ndarray:
        return await asyncio.to_thread(grad_cam, batch, np.asarray(classes))

    return ModelSlot(served, call, heat, batcher)


def warm_up(bundle: ModelBundle) -> None:
    """One prediction on zeros: the model's graph traced before a request needs it (every size)."""
    bundle.predict(np.zeros((1, *bundle.contract.input_shape), np.float32))


class Engine:
    """Checks, preprocesses and answers requests; the model call itself is each slot's ``infer``.

    Args:
        models: the served models by name: each a :class:`ModelSlot`, or a :class:`ServedModel`
            whose calls go to ``infer`` / ``explain`` (:func:`named_slot`).
        infer: runs one model on a preprocessed batch (see :data:`InferFn`); needed for a
            :class:`ServedModel` only.
        explain: Grad-CAM of a classifier on a preprocessed batch (see :data:`ExplainFn`); likewise.
        max_upload_bytes: largest image file accepted.
        recorder: drift monitoring: gets each answered image and its answer (queued, off the
            request's path), or ``None``.
        batchers: the batchers of the :class:`ServedModel` entries, closed by :meth:`close`.

    Raises:
        TypeError: a :class:`ServedModel` without ``infer`` and ``explain``.
    """

    def __init__(self, models: Mapping[str, ServedModel | ModelSlot], infer: InferFn | None = None,
                 explain: ExplainFn | None = None, *, max_upload_bytes: int, recorder: Recorder | None = None,
                 batchers: Mapping[str, Batcher] | None = None) -> None:
        batchers = batchers or {}
        slots = {}
        for name, model in models.items():
            if isinstance(model, ModelSlot):
                slots[name] = model
            elif infer is None or explain is None:
                raise TypeError(f"model {name}: a ServedModel needs the engine's infer and explain")
            else:
                slots[name] = named_slot(model, infer, explain, batchers.get(name))
        self.slots: Mapping[str, ModelSlot] = slots
        """The slot serving each model now; replaced whole, never changed in place."""
        self.withdrawn: Mapping[str, ServedModel] = {}
        """The last version of each model no longer served (:meth:`withdraw`)."""
        self.max_upload_bytes = int(max_upload_bytes)
        self.recorder = recorder
        self._retiring: set[ModelSlot] = set()

    @property
    def models(self) -> dict[str, ServedModel]:
        """The version served now of each model, by name."""
        return {name: slot.served for name, slot in self.slots.items()}

    @property
    def batchers(self) -> dict[str, Batcher]:
        """The batchers of the versions served now, by model name (``{}`` without batching)."""
        return {name: slot.batcher for name, slot in self.slots.items() if slot.batcher is not None}

    def replace(self, name: str, slot: ModelSlot) -> ModelSlot | None:
        """Serve ``slot`` as model ``name`` from now on (one assignment of :attr:`slots`).

        Requests admitted before keep their slot to the end; hand the returned one (``None``
        when the model was not served) to :meth:`retire`.
        """
        old = self.slots.get(name)
        self.slots = {**self.slots, name: slot}
        self.withdrawn = {n: m for n, m in self.withdrawn.items() if n != name}
        return old

    def withdraw(self, name: str) -> ModelSlot | None:
        """Stop serving model ``name``: its requests are refused ``model_withdrawn`` from now on.

        Returns:
            Its slot (hand it to :meth:`retire`), ``None`` when it was not served.
        """
        old = self.slots.get(name)
        if old is not None:
            self.slots = {n: s for n, s in self.slots.items() if n != name}
            self.withdrawn = {**self.withdrawn, name: old.served}
        return old

    async def retire(self, slot: ModelSlot, timeout_s: float) -> bool:
        """Close a replaced slot once its requests have finished (:meth:`ModelSlot.retire`).

        Returns:
            Whether they finished within ``timeout_s``.
        """
        self._retiring.add(slot)
        try:
            return await slot.retire(timeout_s)
        finally:
            self._retiring.discard(slot)

    async def answer(self, request: Request) -> Answer:
        """The answer to one request (:class:`Prediction`, :class:`Analysis`, :class:`Preview`,
        or the list of :class:`ModelInfo` for ``models``).

        Raises:
            ApiError: the client's mistake (unknown model, bad image, bad roi ...), or the
                model shedding the request (``overloaded``).
        """
        if request.action == "models":
            return self.describe()
        if request.action == "predict":
            return await self.predict(request)
        image = request.image if request.image is not None else ImageInput()
        if request.action == "analyze":
            return await self._analyze(image, request.modality, request.explain, request.dicom)
        if request.action == "preview":
            return await self._preview(image)
        raise ApiError("bad_request", f"unknown action {request.action!r}")

    async def predict(self, request: Request) -> Prediction:
        """The answer to a ``predict`` request: one model on one image.

        Raises:
            ApiError: as :meth:`answer`.
        """
        image = request.image if request.image is not None else ImageInput()
        slot = self.slot(request.model or "")  # admitted: this version answers, whatever swaps meanwhile
        with slot.held():
            return await self._predict(slot, image, request.explain)

    def describe(self) -> list[ModelInfo]:
        """Every served model, in name order."""
        slots = self.slots
        return [slots[name].served.describe() for name in sorted(slots)]

    def select(self, name: str) -> ServedModel:
        """The version of model ``name`` served now.

        Raises:
            ApiError: ``unknown_model`` (the message lists the served names) or ``model_withdrawn``.
        """
        return self.slot(name).served

    def slot(self, name: str) -> ModelSlot:
        """The slot serving model ``name`` now.

        Raises:
            ApiError: ``unknown_model`` (the message lists the served names) or
                ``model_withdrawn`` (its stage was removed from the registry while serving).
        """
        slots = self.slots
        if name in slots:
            return slots[name]
        gone = self.withdrawn.get(name)
        if gone is not None:
            raise ApiError("model_withdrawn", f"model {name} is no longer served: no version holds its "
                                              f"stage @{gone.stage or 'production'} in the registry")
        served = ", ".join(sorted(slots)) or "none"
        raise ApiError("unknown_model", f"no model named {name[:64]!r}; served: {served}")

    def decode(self, image: ImageInput, modality: str | None = None) -> np.ndarray:
        """The request's image as ``(H, W)`` float32 gray in [0, 1], cropped to its roi.

        Args:
            image: the request's image.
            modality: the modality it must be, checked against a DICOM file's header.

        Raises:
            ApiError: any code of :func:`decode_upload` (``wrong_modality`` included) /
                :func:`validate_array`, or ``bad_roi``.
        """
        if (image.data is None) == (image.array is None):
            raise ApiError("empty", "send exactly one image: a file or an array")
        if image.data is not None:
            gray = decode_upload(image.data, max_bytes=self.max_upload_bytes, modality=modality)
        else:
            gray = validate_array(image.array)
        return crop(gray, image.roi)

    def close(self) -> None:
        """Stop the model threads (of retiring slots too) and the drift recorder."""
        for slot in [*self.slots.values(), *self._retiring]:
            if slot.batcher is not None:
                slot.batcher.close()
        if self.recorder is not None:
            self.recorder.close()

    # ------------------------------------------------------------------ the steps
    def _prepare(self, served: ServedModel, image: ImageInput | np.ndarray) -> PreparedBatch:
        """Decode (unless already decoded) and preprocess one image for ``served``: one thread hop."""
        gray = image if isinstance(image, np.ndarray) else self.decode(image, served.contract.modality)
        return prepare_inputs(served.spec, served.contract, [gray])

    async def _predict(self, slot: ModelSlot, image: ImageInput, explain: bool,
                       gray: np.ndarray | None = None) -> Prediction:
        """One model version's answer for one image (``slot`` held by the caller; ``gray``: the
        image already decoded, for ``analyze``)."""
        served = slot.served
        prepared = await asyncio.to_thread(self._prepare, served, image if gray is None else gray)
        out = await slot.infer(prepared.batch)  # one model call, every output
        if output_rows(out) != len(prepared.batch):
            raise RuntimeError(f"model {served.name} answered {output_rows(out)} rows for "
                               f"{len(prepared.batch)} images")
        heat = await self._heat(slot, prepared, out) if explain else None
        finish = functools.partial(predictions, served.facts, prepared.grays, prepared.boxes, out, heat=heat,
                                   roi=image.roi if gray is None else None)  # an analysis reports it once
        if heat is None and not has_mask(served.contract.task):
            prediction = finish()[0]  # a few fields: cheaper here than a thread hop
        else:
            prediction = (await asyncio.to_thread(finish))[0]
        if self.recorder is not None:  # a queue put: the statistics are computed on its thread
            self.recorder.record(served.name, prepared.grays[0], to_dict(prediction),
                                 modality=served.contract.modality, version=served.version, dicom=image.data)
        return prediction

    async def _heat(self, slot: ModelSlot, prepared: PreparedBatch,
                    out: ModelOutput) -> np.ndarray | None:
        """Grad-CAM of the class the answer calls (``predicted``); ``None`` for a model without classes."""
        contract = slot.served.contract
        probs, _ = output_parts(contract.task, out)
        if probs is None:
            return None
        called = contract.rule.decide(probs[:1], contract.class_names)
        return await slot.explain(prepared.batch, [int(called[0])])

    async def _analyze(self, image: ImageInput, modality: str | None, explain: bool, dicom: bool) -> Analysis:
        """Every model of the image's modality on one image, run concurrently.

        ``modality`` may be left out for a DICOM file whose header says (MG, US), or when only
        one modality is served; ``dicom`` adds the answers as DICOM objects (a DICOM image,
        whole: no roi): a Structured Report and a Segmentation per model with a mask.

        Raises:
            ApiError: ``unknown_modality``, ``wrong_modality`` (a DICOM header naming another
                modality than the one asked for, or one no model serves), ``not_dicom`` /
                ``bad_roi`` (DICOM results of a non-DICOM file or a crop) or any image error.
        """
        if dicom:
            check_dicom_output(image.data, image.roi)
        slots = self.slots  # admitted: these versions answer, whatever swaps meanwhile
        with _holding(slots.values()):
            return await self._analyze_on(slots, image, modality, explain, dicom)

    async def _analyze_on(self, slots: Mapping[str, ModelSlot], image: ImageInput, modality: str | None,
                          explain: bool, dicom: bool) -> Analysis:
        """:meth:`_analyze` on the slots the request was admitted to."""
        modality = await self._modality_of(image, modality, slots)
        chosen = models_for_modality({n: s.served.contract.modality for n, s in slots.items()}, modality)
        gray = await asyncio.to_thread(self.decode, image, modality)
        answers = dict(zip(chosen, await asyncio.gather(
            *(self._predict(slots[n], image, explain, gray) for n in chosen)), strict=True))
        result = analysis(modality, answers, rules={n: slots[n].served.contract.rule for n in chosen},
                          roi=image.roi)
        if dicom and image.data is not None:
            sr, segs = await asyncio.to_thread(
                dicom_objects, image.data, answers, {n: slots[n].served.algorithm() for n in chosen})
            result = dataclass_replace(result, dicom_sr=sr, dicom_seg=segs)
        return result

    async def _modality_of(self, image: ImageInput, modality: str | None,
                           slots: Mapping[str, ModelSlot]) -> str:
        """The modality asked for, else the DICOM header's, else the one ``slots`` serve (if only one)."""
        modality = (modality or "").strip().lower() or None
        if modality is None and image.data is not None:
            code = await asyncio.to_thread(dicom_modality_code, image.data)
            modality = DICOM_MODALITY_CODES.get(code)
            if code and modality is None:
                known = ", ".join(sorted(DICOM_MODALITY_CODES))
                raise ApiError("wrong_modality", f"the DICOM header says Modality {code[:16]!r}; the "
                                                 f"models are for {known}")
        served_modalities = sorted({s.served.contract.modality for s in slots.values()})
        if modality is None:
            if len(served_modalities) != 1:
                raise ApiError("unknown_modality", "say which modality the image is: one of "
                                                   f"{', '.join(served_modalities)}")
            modality = served_modalities[0]
        return modality

    async def _preview(self, image: ImageInput) -> Preview:
        """The decoded image, whole (the roi is ignored), as an 8-bit PNG, with the modality a
        DICOM header names."""
        gray = await asyncio.to_thread(self.decode, ImageInput(data=image.data, array=image.array))
        code = await asyncio.to_thread(dicom_modality_code, image.data) if image.data else ""
        png = await asyncio.to_thread(png_bytes, np.clip(np.rint(gray * 255.0), 0, 255).astype(np.uint8))
        return Preview(width=int(gray.shape[1]), height=int(gray.shape[0]),
                       modality=DICOM_MODALITY_CODES.get(code), png=png)


def models_for_modality(modalities: Mapping[str, str], modality: str) -> list[str]:
    """The names of the models of one modality, in name order.

    Args:
        modalities: each served model's modality, by name.
        modality: ``mammography`` or ``ultrasound``.

    Raises:
        ApiError: ``unknown_modality`` (not a modality, or no model serves it).
    """
    if modality not in MODALITIES:
        raise ApiError("unknown_modality", f"modality must be one of {', '.join(MODALITIES)}, "
                                           f"got {modality[:32]!r}")
    chosen = sorted(name for name, m in modalities.items() if m == modality)
    if not chosen:
        raise ApiError("unknown_modality", f"no model is served for {modality}")
    return chosen


def dicom_objects(data: bytes, answers: Mapping[str, Prediction],
                  algorithms: Mapping[str, Any]) -> tuple[bytes, dict[str, bytes]]:
    """The answers of one analysis as DICOM objects, each referencing the source image.

    Args:
        data: the source DICOM file.
        answers: each model's answer for it (whole image).
        algorithms: each model's :class:`breastscan.imaging.dicom_results.AlgorithmInfo`.

    Returns:
        ``(Structured Report of every answer, {name of a model with a mask: Segmentation of
        its mask})``, each a DICOM Part 10 file.
    """
    from breastscan.imaging import dicom_results as dr

    source = dr.source_dataset(data)
    segs = {}
    for name, answer in answers.items():
        if has_mask(answer.task) and answer.mask_png is not None:
            segs[name] = dr.to_bytes(dr.segmentation(source, mask_of(answer.mask_png), algorithms[name]))
    report = dr.structured_report(source, {n: to_dict(a) for n, a in answers.items()}, algorithms)
    return dr.to_bytes(report), segs


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
    served = {name: ServedModel(name=name, spec=b.spec, contract=b.contract, version=versions.get(name),
                                stage=stages.get(name)) for name, b in bundles.items()}
    slots = {name: bundle_slot(served[name], b, batching) for name, b in bundles.items()}
    return Engine(slots, max_upload_bytes=max_upload_bytes)


def explainer(bundle: ModelBundle) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The Grad-CAM of a bundle's classes, ready to call per request.

    A classifier's map is taken on its last feature map
    (:func:`breastscan.models.gradcam.grad_cam`'s default). A multi-task model is explained
    through its classification view (built once, here) on the U-Net's bottleneck
    (:func:`class_feature_layer`): the last layer of the mask decoder would explain the
    mask, not the class.

    A bundle run by its ONNX export has no gradients: its Keras model is read (and TensorFlow
    imported) on the first call, so a service that is never asked for a map never loads it.

    Returns:
        ``(batch (n, H, W, 1), class index per image (n,)) -> (n, H, W)`` maps in [0, 1].
    """
    if bundle.runtime != "keras":
        return _on_first_call(bundle)
    from breastscan.models.gradcam import grad_cam

    if bundle.contract.task != "multitask":
        return functools.partial(grad_cam, bundle.model)
    model = bundle.view("classification").model
    return functools.partial(grad_cam, model, layer=class_feature_layer(model))


def _on_first_call(bundle: ModelBundle) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """:func:`explainer` of ``bundle``'s Keras model, built when first called (once, under a lock)."""
    built: list[Callable[[np.ndarray, np.ndarray], np.ndarray]] = []
    lock = threading.Lock()

    def explain(batch: np.ndarray, classes: np.ndarray) -> np.ndarray:
        with lock:
            if not built:
                started = time.perf_counter()
                built.append(explainer(dataclass_replace(bundle, model=_keras_of(bundle))))
                log.info("%s: Keras model loaded for Grad-CAM in %.1f s (first explain request)",
                         bundle.contract.name, time.perf_counter() - started)
        return built[0](batch, classes)

    return explain


def _keras_of(bundle: ModelBundle) -> keras.Model:
    """The bundle's Keras model (:meth:`~breastscan.bundle.ModelBundle.keras_model`).

    Raises:
        ApiError: ``explain_unavailable``: this installation has no TensorFlow.
    """
    try:
        return bundle.keras_model()
    except ModuleNotFoundError as exc:
        raise ApiError("explain_unavailable", f"{bundle.contract.name}: Grad-CAM needs TensorFlow, which "
                       f"this deployment does not have ({exc.name} missing)") from None


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
