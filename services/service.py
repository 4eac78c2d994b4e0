"""The breastscan model service: the production models over HTTP and gRPC, with a web UI.

Two BentoML services, started together by ``bentoml serve services.service:BreastScan``:

``BreastScan`` (the front, port 3000)
    HTTP endpoints (``/density``, ``/tumor``, ``/lesion``, ``/predict``, ``/predict_array``,
    ``/analyze``, ``/preview``, ``/models``), the gRPC server (port 50051, run inside its
    worker processes), the web UI at ``/ui``, health, readiness and ``/metrics``. It decodes,
    checks and preprocesses each request (:class:`breastscan.serving.engine.Engine`), so a
    client's mistake is answered 4xx before it reaches a model, and it sends the model input
    to ...

``BreastScanModels`` (the model service)
    one **batchable** API per model: BentoML's adaptive batching merges the concurrent
    requests of every front worker -- HTTP and gRPC alike -- into one model call
    (``predict_on_batch``), on the GPU when there is one.

What is served comes from ``services/serving.yaml`` (or the file named by
``BREASTSCAN_SERVING_CONFIG``); the models come from the BentoML store, where
``breastscan build`` imports the registry's production versions.
"""

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import bentoml
import numpy as np

from breastscan.logs import configure_service_logging
from breastscan.serving.config import CONFIG_ENV, load_serving_config, with_models
from breastscan.serving.engine import Engine, ImageInput, Overloaded, parse_roi
from breastscan.serving.http import RequestGuard
from breastscan.serving.remote import call_models
from breastscan.serving.requests import InputError
from breastscan.serving.store import PREFIX as STORE_PREFIX
from breastscan.serving.store import load_served, store_name, stored_models
from breastscan.serving.ui import make_ui_app

log = logging.getLogger("breastscan.service")

RESERVED = {"predict", "predict_array", "analyze", "preview", "models", "explain", "run", "backend", "engine"}

REQUESTS = bentoml.metrics.Counter(
    name="breastscan_requests", documentation="Requests answered by the front service, by endpoint and "
    "outcome (ok, or the input error code)", labelnames=["endpoint", "outcome"])
PREDICTIONS = bentoml.metrics.Counter(
    name="breastscan_model_predictions", documentation="Images run through each model",
    labelnames=["model"])
BATCH_SIZE = bentoml.metrics.Histogram(
    name="breastscan_model_batch_size", documentation="Images per model call (adaptive batches)",
    labelnames=["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, float("inf")))


def gpu_count() -> int:
    """NVIDIA GPUs this process may use; 0 without one, without NVML, or with none visible.

    BentoML 1.4 has no public API for the machine's resources, so this asks NVML (the
    ``nvidia-ml-py`` package BentoML itself uses) for the device count, limited by
    ``CUDA_VISIBLE_DEVICES`` when it is set. Cheap, and never imports TensorFlow: this runs
    in every process that imports the service, the front included.
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


# --------------------------------------------------------------------------- model service


class _ModelsImpl:
    """The model service: loads every bundle once per worker and runs batches through it."""

    def __init__(self) -> None:
        from breastscan.registry.bundle import ModelBundle

        configure_service_logging()
        _configure_gpus()
        self.bundles: dict[str, ModelBundle] = {}
        for name in CONFIG.models:
            stored = _stored(name)
            self.bundles[name] = ModelBundle.load(stored.path)
            log.info("model service: loaded %s (%s)", name, stored.tag)
        for bundle in self.bundles.values():  # trace the model functions before traffic
            for n in (1, 2):
                bundle.predict(np.zeros((n, *bundle.contract.input_shape), np.float32))

    def __is_ready__(self) -> bool:
        return len(self.bundles) == len(CONFIG.models)

    def run(self, name: str, batch: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of a preprocessed batch ``(n, H, W, 1)`` float32 in [0, 1]."""
        n = int(len(batch))
        BATCH_SIZE.labels(model=name).observe(n)
        PREDICTIONS.labels(model=name).inc(n)
        return self.bundles[name].predict(batch)

    @bentoml.api
    def explain(self, model: str, batch: np.ndarray, classes: list[int]) -> np.ndarray:
        """Grad-CAM maps ``(n, H, W)`` in [0, 1] of classifier ``model`` for ``classes``."""
        from breastscan.models.gradcam import grad_cam

        return grad_cam(self.bundles[model].model, np.asarray(batch, np.float32), np.asarray(classes))


def _configure_gpus() -> None:
    """Let several workers share a GPU: TensorFlow takes memory as it needs it."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError as exc:  # already initialised
            log.warning("memory growth not set on %s: %s", gpu.name, exc)


def _model_api(name: str) -> Any:
    batching = CONFIG.batching_for(name)

    def predict(self: _ModelsImpl, batch: np.ndarray) -> np.ndarray:
        return self.run(name, batch)

    predict.__name__ = predict.__qualname__ = name
    predict.__doc__ = f"Model {name!r}: served probabilities of a batch (n, H, W, 1) float32 in [0, 1]."
    if batching.enabled:
        return bentoml.api(batchable=True, batch_dim=0, max_batch_size=batching.max_batch_size,
                           max_latency_ms=batching.max_latency_ms)(predict)
    return bentoml.api(predict)


def _models_service() -> Any:
    namespace: dict[str, Any] = {"__module__": __name__, "__doc__": _ModelsImpl.__doc__}
    namespace.update({name: _model_api(name) for name in CONFIG.models})
    namespace.update({f"{name}_model": bentoml.models.BentoModel(model_tag(name)) for name in CONFIG.models})
    inner = type("BreastScanModels", (_ModelsImpl,), namespace)
    options: dict[str, Any] = {
        "workers": CONFIG.models_workers, "threads": CONFIG.models_threads,
        "traffic": {"timeout": CONFIG.timeout_s},
        # BentoML 1.4.39 renews the front's client session to this service every 100
        # requests / 300 s by closing the old one while concurrent requests are still in
        # flight on it, which fails them with 500 ("Cannot write to closing transport").
        # The renewal only matters for re-resolving replicas behind DNS, not for two local
        # services, so the session lives as long as the worker.
        "runner_connection": {"max_requests": 2**31 - 1, "max_age": 10.0**9},
    }
    if gpu_count():
        options["resources"] = {"gpu": 1}
    return bentoml.service(name="breastscan-models", **options)(inner)


BreastScanModels = _models_service()


# --------------------------------------------------------------------------- front service


class _FrontImpl:
    """The front service: HTTP and gRPC endpoints, the UI; the models run in BreastScanModels."""

    backend = bentoml.depends(BreastScanModels)

    def __init__(self) -> None:
        import breastscan.evaluation.combined  # noqa: F401  (the 8-category view: imported before traffic)

        configure_service_logging()
        served = {}
        for name in CONFIG.models:
            stored = _stored(name)
            served[name] = load_served(name, stored.path, dict(stored.info.labels or {}),
                                       source=str(stored.info.metadata.get("source", stored.tag)))
        self.engine = Engine(served, self._infer, self._explain, max_upload_bytes=CONFIG.max_upload_bytes)
        self.grpc: Any = None
        log.info("front service: serving %s", ", ".join(
            f"{m.name} v{m.version} ({m.stage})" for m in served.values()))

    async def __is_ready__(self) -> bool:
        """Ready once the models are loaded: here (specs) and in the model service (weights)."""
        if not self.engine.models:
            return False
        try:
            return bool(await self.backend.is_ready(2))
        except Exception:  # noqa: BLE001 -- the model service is not up yet
            return False

    async def _infer(self, name: str, batch: np.ndarray) -> np.ndarray:
        return await call_models(lambda: getattr(self.backend.to_async, name)(batch))

    async def _explain(self, name: str, batch: np.ndarray, classes: list[int]) -> np.ndarray:
        return await call_models(lambda: self.backend.to_async.explain(model=name, batch=batch,
                                                                        classes=classes))

    async def _answer(self, ctx: bentoml.Context, endpoint: str, call: Any) -> Any:
        """Run ``call()``; a client's mistake becomes a 4xx ``{"error", "code"}`` answer."""
        try:
            result = await call()
        except InputError as exc:
            ctx.response.status_code = 413 if exc.code == "too_large" else 400
            REQUESTS.labels(endpoint=endpoint, outcome=exc.code).inc()
            log.info("refused %s: %s", endpoint, exc.code)
            return {"error": exc.message, "code": exc.code}
        except Overloaded as exc:
            ctx.response.status_code = 503
            ctx.response.headers["Retry-After"] = "1"
            REQUESTS.labels(endpoint=endpoint, outcome=exc.code).inc()
            log.warning("shed %s: the model service is at capacity", endpoint)
            return {"error": exc.message, "code": exc.code}
        REQUESTS.labels(endpoint=endpoint, outcome="ok").inc()
        return result

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
            timeout_s=CONFIG.timeout_s)
        self.grpc.set_serving(False)
        self._grpc_ready = asyncio.get_running_loop().create_task(self._grpc_serving_when_ready())
        log.info("gRPC listening on %s:%d", CONFIG.grpc_host, self.grpc.port)

    async def _grpc_serving_when_ready(self) -> None:
        while True:
            try:
                if await self.backend.is_ready(5):
                    self.grpc.set_serving(True)
                    return
            except Exception:  # noqa: BLE001 -- not up yet
                pass
            await asyncio.sleep(0.5)

    @bentoml.on_shutdown
    def stop_grpc(self) -> None:
        """Stop the gRPC server, letting calls in flight finish."""
        if self.grpc is not None:
            self.grpc.set_serving(False)
            self.grpc.stop(5)

    # ------------------------------------------------------------------ HTTP API
    @bentoml.api(route="/predict")
    async def predict(self, model: str, image: Path, ctx: bentoml.Context, explain: bool = False,
                      roi: str = "") -> dict[str, Any]:
        """One model's answer for an uploaded image (PNG, JPEG, PGM, DICOM; 8/16-bit).

        ``roi`` ``"x,y,w,h"`` crops first; ``explain`` adds a Grad-CAM heatmap (classifiers).
        """
        return await self._answer(ctx, "predict", lambda: self.engine.predict(
            model, ImageInput(data=image.read_bytes(), roi=parse_roi(roi)), explain=explain))

    @bentoml.api(route="/predict_array")
    async def predict_array(self, model: str, array: list[Any], ctx: bentoml.Context,
                            dtype: str | None = None, explain: bool = False,
                            roi: str = "") -> dict[str, Any]:
        """One model's answer for an image sent as nested lists ``(H, W)`` or ``(H, W, C)``.

        ``dtype`` (uint8, uint16, int16, int32, float32, float64) says how to read the
        numbers: uint8 is 0-255, other integers are min-max stretched, floats must be in [0, 1].
        """
        return await self._answer(ctx, "predict_array", lambda: self.engine.predict(
            model, ImageInput.from_array(array, dtype, parse_roi(roi)), explain=explain))

    @bentoml.api(route="/analyze")
    async def analyze(self, image: Path, ctx: bentoml.Context, modality: str = "", explain: bool = False,
                      roi: str = "") -> dict[str, Any]:
        """Every model of the image's modality; for a mammogram also the 8-category view.

        ``modality`` (mammography, ultrasound) may be left empty for a DICOM file (MG/US).
        """
        return await self._answer(ctx, "analyze", lambda: self.engine.analyze(
            ImageInput(data=image.read_bytes(), roi=parse_roi(roi)), modality=modality or None,
            explain=explain))

    @bentoml.api(route="/preview")
    async def preview(self, image: Path, ctx: bentoml.Context) -> dict[str, Any]:
        """The decoded image as an 8-bit PNG, as the models see it (DICOM windowed)."""
        return await self._answer(ctx, "preview",
                                  lambda: self.engine.preview(ImageInput(data=image.read_bytes())))

    @bentoml.api(route="/models")
    def models(self) -> list[dict[str, Any]]:
        """The served models: name, registry version and stage, task, modality, classes, spec."""
        return self.engine.describe()


def _front_api(name: str) -> Any:
    async def endpoint(self: _FrontImpl, image: Path, ctx: bentoml.Context, explain: bool = False,
                       roi: str = "") -> dict[str, Any]:
        return await self._answer(ctx, name, lambda: self.engine.predict(
            name, ImageInput(data=image.read_bytes(), roi=parse_roi(roi)), explain=explain))

    endpoint.__name__ = endpoint.__qualname__ = name
    endpoint.__doc__ = (f"Model {name!r} on an uploaded image (PNG, JPEG, PGM, DICOM). ``roi`` "
                        "``\"x,y,w,h\"`` crops first; ``explain`` adds a Grad-CAM heatmap (classifiers).")
    return bentoml.api(route=f"/{name}")(endpoint)


def _front_service() -> Any:
    namespace: dict[str, Any] = {"__module__": __name__, "__doc__": _FrontImpl.__doc__}
    namespace.update({name: _front_api(name) for name in CONFIG.models})
    inner = type("BreastScan", (_FrontImpl,), namespace)
    svc = bentoml.service(
        name="breastscan", workers=CONFIG.api_workers,
        traffic={"timeout": CONFIG.timeout_s, "max_concurrency": CONFIG.max_concurrency},
    )(inner)
    svc.add_asgi_middleware(RequestGuard, max_body_bytes=CONFIG.max_upload_bytes)
    svc.mount_asgi_app(make_ui_app(), path="/ui", name="ui")
    return svc


BreastScan = _front_service()
