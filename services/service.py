"""The breastscan model service: the production models over HTTP and gRPC, with a web UI.

One BentoML service, started by ``bentoml serve services.service:BreastScan`` (port 3000):
HTTP endpoints (``/density``, ``/tumor``, ``/lesion``, ``/predict``, ``/predict_array``,
``/analyze``, ``/preview``, ``/models``), the gRPC server (port 50051, run inside its worker
processes), the web UI at ``/ui``, health, readiness and ``/metrics``.

Each worker holds every served model. A request is decoded, checked and preprocessed on a
thread (:class:`breastscan.serving.engine.Engine`), so a client's mistake is answered 4xx
before it reaches a model; its model input then joins that model's
:class:`breastscan.serving.batching.Batcher`, which runs whatever has queued -- HTTP and
gRPC requests alike -- as one model call on its own thread (on the GPU when there is one).
Nothing leaves the process: the measured cost of a separate model service (pickled arrays
over loopback HTTP, a second event loop) was larger than the model's own
(``make bench-serving``, README "Serving performance").

What is served comes from ``services/serving.yaml`` (or the file named by
``BREASTSCAN_SERVING_CONFIG``); the models come from the BentoML store, where
``breastscan build`` imports the registry's production versions.
"""

import asyncio
import gc
import logging
import os
import time
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from starlette.responses import Response

from breastscan.logs import configure_service_logging
from breastscan.serving.auth import ApiKeyGuard, ApiKeys, grpc_interceptor
from breastscan.serving.batching import ModelOutput, model_batchers
from breastscan.serving.config import CONFIG_ENV, load_serving_config, with_models
from breastscan.serving.edge import RequestCheck, route_specs
from breastscan.serving.engine import Engine, ImageInput, explainer, parse_roi
from breastscan.serving.fastpath import HOT, ModelRoutes, answer
from breastscan.serving.http import RequestGuard
from breastscan.serving.store import PREFIX as STORE_PREFIX
from breastscan.serving.store import load_served, store_name, stored_models
from breastscan.serving.ui import make_ui_app

log = logging.getLogger("breastscan.service")

RESERVED = {"predict", "predict_array", "analyze", "preview", "models", "explain", "bundles", "engine",
            "grpc"}

REQUESTS = bentoml.metrics.Counter(
    name="breastscan_requests", documentation="Requests answered by the service, by endpoint and "
    "outcome (ok, or the input error code)", labelnames=["endpoint", "outcome"])
PREDICTIONS = bentoml.metrics.Counter(
    name="breastscan_model_predictions", documentation="Images run through each model",
    labelnames=["model"])
BATCH_SIZE = bentoml.metrics.Histogram(
    name="breastscan_model_batch_size", documentation="Images per model call (adaptive batches)",
    labelnames=["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, float("inf")))
DRIFT_SCORE = bentoml.metrics.Gauge(
    name="breastscan_drift_score", documentation="Drift of the latest window of requests from the "
    "model's training reference, per feature: PSI (histogram), KS D (scalars), Cramer's V (categories)",
    labelnames=["model", "feature"])
DRIFT_DETECTED = bentoml.metrics.Gauge(
    name="breastscan_drift_detected", documentation="1 when the latest window of a model drifted "
    "(monitoring.thresholds), else 0", labelnames=["model"])
DRIFT_DROPPED = bentoml.metrics.Gauge(
    name="breastscan_drift_records_dropped", documentation="Requests not recorded for drift "
    "monitoring because its queue was full (this worker)", labelnames=["model"])


def gpu_count() -> int:
    """NVIDIA GPUs this process may use; 0 without one, without NVML, or with none visible.

    BentoML 1.4 has no public API for the machine's resources, so this asks NVML (the
    ``nvidia-ml-py`` package BentoML itself uses) for the device count, limited by
    ``CUDA_VISIBLE_DEVICES`` when it is set. Cheap, and never imports TensorFlow: this runs
    in every process that imports the service.
    """
    visible = _cuda_visible_devices()
    if visible == 0:
        return 0
    try:
        import pynvml
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 -- no driver or library: no GPU
        return 0
    try:
        count = int(pynvml.nvmlDeviceGetCount())
    except Exception:  # noqa: BLE001
        count = 0
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass
    return count if visible is None else min(count, visible)


def _cuda_visible_devices() -> int | None:
    """How many devices ``CUDA_VISIBLE_DEVICES`` lists (``None`` when unset).

    CUDA stops at the first invalid entry, so ``""``, ``"-1"`` and ``"-1,0"`` all hide every GPU.
    """
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    count = 0
    for entry in value.split(","):
        entry = entry.strip()
        if not entry or entry.startswith("-"):
            break
        count += 1
    return count


def pinned_model_tags(bento_dir: Path) -> dict[str, str]:
    """The model tags a built Bento recorded, by model name (``{}`` outside a Bento).

    ``bentoml build`` records the exact version of every model the services declare; BentoML
    1.4 does not apply them when it loads the Bento again (only for Hugging Face models), so
    a Bento served after a newer import would take the newer ``latest``. Reading them from
    the Bento's own ``bento.yaml`` keeps a Bento serving exactly what it was built with.
    """
    import yaml

    info_file = bento_dir / "bento.yaml"
    if not info_file.is_file():
        return {}
    info = yaml.safe_load(info_file.read_text()) or {}
    tags = [str(m["tag"]) for svc in info.get("services") or [] for m in svc.get("models") or []]
    return {tag.split(":", 1)[0]: tag for tag in tags}


# In a Bento this file is <bento>/src/services/service.py.
PINNED = pinned_model_tags(Path(__file__).resolve().parents[2])


def _served_here(stage: str) -> tuple[str, ...]:
    """What ``models: auto`` serves: a Bento's pinned models, else the store's at ``stage``."""
    if PINNED:
        return tuple(tag[len(STORE_PREFIX):] for tag in PINNED if tag.startswith(STORE_PREFIX))
    return stored_models(stage)


_config = load_serving_config(os.environ.get(CONFIG_ENV) or Path(__file__).with_name("serving.yaml"),
                              dict(os.environ))
CONFIG = with_models(_config, () if _config.models else _served_here(_config.stage))
KEYS = ApiKeys.load(CONFIG.auth.keys_file, CONFIG.auth.keys_env) if CONFIG.auth.enabled else None
if RESERVED & set(CONFIG.models):
    raise ValueError(f"model names may not be {', '.join(sorted(RESERVED & set(CONFIG.models)))}")


def model_tag(name: str) -> str:
    """The BentoML tag served for model ``name``: the Bento's pinned one, else the newest."""
    return PINNED.get(store_name(name), f"{store_name(name)}:latest")


def _stored(name: str) -> Any:
    ref = bentoml.models.BentoModel(model_tag(name))
    if ref.stored is None:
        raise RuntimeError(f"model {model_tag(name)} is not in the BentoML store: run `breastscan build` "
                           "(or `make serve`), which imports the registry's production versions")
    return ref.stored


# --------------------------------------------------------------------------- the service


def _configure_gpus() -> None:
    """Let several workers share a GPU: TensorFlow takes memory as it needs it."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError as exc:  # already initialised
            log.warning("memory growth not set on %s: %s", gpu.name, exc)


def _count_request(endpoint: str, outcome: str) -> None:
    REQUESTS.labels(endpoint=endpoint, outcome=outcome).inc()


def _count_batch(name: str, n: int) -> None:
    BATCH_SIZE.labels(model=name).observe(n)
    PREDICTIONS.labels(model=name).inc(n)


def _publish_drift(report: Any, dropped: int) -> None:
    """Set the drift gauges of one model from a scoring (on the recorder's thread)."""
    DRIFT_DROPPED.labels(model=report.model).set(dropped)
    if not report.enough_data:
        return
    for feature in report.features:
        DRIFT_SCORE.labels(model=report.model, feature=feature.feature).set(feature.score)
    DRIFT_DETECTED.labels(model=report.model).set(int(report.drift))


def _recorder(bundles: dict[str, Any]) -> Any:
    """The drift recorder of the served models (``None`` when ``monitoring.enabled`` is false)."""
    monitoring = CONFIG.monitoring
    if not monitoring.enabled:
        return None
    from breastscan.monitoring.drift import reference_records
    from breastscan.monitoring.recorder import Recorder

    references = {n: reference_records(b.reference, b.contract) for n, b in bundles.items() if b.reference}
    if set(bundles) - set(references):
        log.warning("no drift reference (reference.json) in %s: recorded, not scored",
                    ", ".join(sorted(set(bundles) - set(references))))
    return Recorder(monitoring.store, max_records=monitoring.max_records, window=monitoring.window,
                    interval_s=monitoring.interval_s, queue_size=monitoring.queue_size,
                    references=references, thresholds=monitoring.thresholds, on_report=_publish_drift).start()


class _ServiceImpl:
    """HTTP and gRPC endpoints and the UI; every model runs in this worker, batched."""

    def __init__(self) -> None:
        import breastscan.evaluation.combined  # noqa: F401  (the 8-category view: imported before traffic)
        from breastscan.bundle import ModelBundle

        configure_service_logging()
        started = time.perf_counter()
        _configure_gpus()
        served, self.bundles = {}, {}
        for name in CONFIG.models:
            stored = _stored(name)
            self.bundles[name] = bundle = ModelBundle.load(stored.path)
            served[name] = load_served(name, stored.path, dict(stored.info.labels or {}),
                                       source=str(stored.info.metadata.get("source", stored.tag)))
            bundle.predict(np.zeros((1, *bundle.contract.input_shape), np.float32))  # one trace, every size
        self.explainers = {n: explainer(b) for n, b in self.bundles.items()}  # Grad-CAM of their classes
        self.recorder = _recorder(self.bundles)
        self.engine = Engine(served, self._infer, self._explain, max_upload_bytes=CONFIG.max_upload_bytes,
                             recorder=self.recorder)
        self.engine.batchers = model_batchers({n: b.predict for n, b in self.bundles.items()},
                                              CONFIG.batching_for, on_batch=_count_batch)
        HOT.engine, HOT.on_answer = self.engine, _count_request  # POST /<model> uploads: the hot path
        # TensorFlow and the models leave ~460,000 long-lived objects: a full garbage
        # collection walked them all, about 0.5 s with every request waiting (measured:
        # the p99 at half saturation was 1.6 s with a 35 ms median). Freezing them keeps
        # collections to what requests allocate.
        gc.collect()
        gc.freeze()
        self.grpc: Any = None
        log.info("serving %s (TensorFlow, models and traces ready in %.1f s)",
                 ", ".join(f"{m.name} v{m.version} ({m.stage})" for m in served.values()),
                 time.perf_counter() - started)

    def __is_ready__(self) -> bool:
        """Ready once every model is loaded (it is by the time the worker takes requests)."""
        return len(self.bundles) == len(CONFIG.models)

    async def _infer(self, name: str, batch: np.ndarray) -> ModelOutput:
        return await self.engine.batchers[name].submit(batch)

    async def _explain(self, name: str, batch: np.ndarray, classes: list[int]) -> np.ndarray:
        return await asyncio.to_thread(self.explainers[name], batch, np.asarray(classes))

    async def _answer(self, endpoint: str, call: Any) -> Any:
        """Run ``call()`` and send its JSON; a client's mistake becomes a 4xx ``{"error", "code"}``.

        The answer goes out as a ready JSON response (:func:`breastscan.serving.fastpath.answer`,
        as on the hot path): BentoML would otherwise validate the dict against the endpoint's
        output schema and rebuild that schema on every request.
        """
        result = await answer(endpoint, call)
        _count_request(endpoint, result.outcome)
        return Response(result.body, status_code=result.status, media_type="application/json",
                        headers=result.headers)

    # ------------------------------------------------------------------ gRPC
    @bentoml.on_startup
    async def start_grpc(self) -> None:
        """Start the gRPC server in this worker (workers share the port: SO_REUSEPORT)."""
        if not CONFIG.grpc_enabled:
            return
        from breastscan.serving.grpc_server import start_grpc_server

        self.grpc = start_grpc_server(
            self.engine, asyncio.get_running_loop(), host=CONFIG.grpc_host, port=CONFIG.grpc_port,
            max_workers=CONFIG.grpc_max_workers, max_message_bytes=CONFIG.max_upload_bytes + 2**20,
            timeout_s=CONFIG.timeout_s, interceptors=[grpc_interceptor(KEYS)] if KEYS else [])
        self.grpc.set_serving(True)
        log.info("gRPC listening on %s:%d", CONFIG.grpc_host, self.grpc.port)

    @bentoml.on_shutdown
    def stop_grpc(self) -> None:
        """Stop the gRPC server, letting calls in flight finish, then the model threads."""
        if self.grpc is not None:
            self.grpc.set_serving(False)
            self.grpc.stop(5)
        for batcher in self.engine.batchers.values():
            batcher.close()
        if self.recorder is not None:
            self.recorder.close()

    # ------------------------------------------------------------------ HTTP API
    @bentoml.api(route="/predict")
    async def predict(self, model: str, image: Path, explain: bool = False,
                      roi: str = "") -> dict[str, Any]:
        """One model's answer for an uploaded image (PNG, JPEG, PGM, DICOM; 8/16-bit).

        ``roi`` ``"x,y,w,h"`` crops first; ``explain`` adds a Grad-CAM heatmap (models with classes).
        A multi-task model answers its classes and its mask from one model call.
        """
        return await self._answer("predict", lambda: self.engine.predict(
            model, ImageInput(data=image.read_bytes(), roi=parse_roi(roi)), explain=explain))

    @bentoml.api(route="/predict_array")
    async def predict_array(self, model: str, array: list[Any],
                            dtype: str | None = None, explain: bool = False,
                            roi: str = "") -> dict[str, Any]:
        """One model's answer for an image sent as nested lists ``(H, W)`` or ``(H, W, C)``.

        ``dtype`` (uint8, uint16, int16, int32, float32, float64) says how to read the
        numbers: uint8 is 0-255, other integers are min-max stretched, floats must be in [0, 1].
        """
        return await self._answer("predict_array", lambda: self.engine.predict(
            model, ImageInput.from_array(array, dtype, parse_roi(roi)), explain=explain))

    @bentoml.api(route="/analyze")
    async def analyze(self, image: Path, modality: str = "", explain: bool = False,
                      roi: str = "", dicom: bool = False) -> dict[str, Any]:
        """Every model of the image's modality; for a mammogram also the 8-category view.

        ``modality`` (mammography, ultrasound) may be left empty for a DICOM file (MG/US).
        ``dicom`` (a DICOM image, no roi) adds ``"dicom": {"sr", "seg": {model: ...}}``: a
        Structured Report of every answer and a Segmentation per model with a mask, each a
        base64 DICOM Part 10 file referencing the source image ("NOT FOR DIAGNOSTIC USE").
        """
        return await self._answer("analyze", lambda: self.engine.analyze(
            ImageInput(data=image.read_bytes(), roi=parse_roi(roi)), modality=modality or None,
            explain=explain, dicom=dicom))

    @bentoml.api(route="/preview")
    async def preview(self, image: Path) -> dict[str, Any]:
        """The decoded image as an 8-bit PNG, as the models see it (DICOM windowed)."""
        return await self._answer("preview",
                                  lambda: self.engine.preview(ImageInput(data=image.read_bytes())))

    @bentoml.api(route="/models")
    def models(self) -> list[dict[str, Any]]:
        """The served models: name, registry version and stage, task, modality, classes, spec."""
        return self.engine.describe()


def _front_api(name: str) -> Any:
    async def endpoint(self: _ServiceImpl, image: Path, explain: bool = False,
                       roi: str = "") -> dict[str, Any]:
        return await self._answer(name, lambda: self.engine.predict(
            name, ImageInput(data=image.read_bytes(), roi=parse_roi(roi)), explain=explain))

    endpoint.__name__ = endpoint.__qualname__ = name
    endpoint.__doc__ = (f"Model {name!r} on an uploaded image (PNG, JPEG, PGM, DICOM). ``roi`` "
                        "``\"x,y,w,h\"`` crops first; ``explain`` adds a Grad-CAM heatmap (models with "
                        "classes).")
    return bentoml.api(route=f"/{name}")(endpoint)


def _service() -> Any:
    namespace: dict[str, Any] = {"__module__": __name__, "__doc__": _ServiceImpl.__doc__}
    namespace.update({name: _front_api(name) for name in CONFIG.models})
    # Declared models: `bentoml build` packs these exact versions into the Bento.
    namespace.update({f"{name}_model": bentoml.models.BentoModel(model_tag(name)) for name in CONFIG.models})
    inner = type("BreastScan", (_ServiceImpl,), namespace)
    options: dict[str, Any] = {
        "name": "breastscan", "workers": CONFIG.api_workers,
        "traffic": {"timeout": CONFIG.timeout_s, "max_concurrency": CONFIG.max_concurrency},
        # breastscan.serving.http.RequestGuard logs every request once (id, status, time,
        # size); BentoML's access log would log each a second time.
        "logging": {"access": {"enabled": False}},
    }
    if gpu_count():
        options["resources"] = {"gpu": 1}
    svc = bentoml.service(**options)(inner)
    # Outermost first: request id, size limit and log; the API key (when on); every API
    # request checked against its declared fields (4xx at the edge); the hot path, which
    # reads the checked form.
    svc.add_asgi_middleware(RequestGuard, max_body_bytes=CONFIG.max_upload_bytes)
    if KEYS is not None:  # a request without a key is refused before its body is read
        svc.add_asgi_middleware(ApiKeyGuard, keys=KEYS)
    svc.add_asgi_middleware(RequestCheck, routes=route_specs(svc.apis))
    svc.add_asgi_middleware(ModelRoutes, models=list(CONFIG.models))
    svc.mount_asgi_app(make_ui_app(), path="/ui", name="ui")
    return svc


BreastScan = _service()
