"""What the service's worker processes run, wired by ``services/service.py``.

* :func:`service_config`: the serving config (``services/serving.yaml`` or
  ``$BREASTSCAN_SERVING_CONFIG``), its ``models: auto`` resolved to what a Bento was built
  with (:func:`pinned_model_tags`) or else to the store's models at the config's stage;
* :func:`service_options`: BentoML's service options (workers, traffic, a GPU when
  :func:`gpu_count` finds one);
* :class:`Worker`: one worker's models, engine, batchers, drift recorder, gRPC server and
  registry follower (:mod:`breastscan.serving.follow`);
* :func:`current_engine`: the worker's engine as the HTTP edge reaches it, through
  BentoML's own handle on the service instance (``bentoml.get_current_service``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from breastscan.exported import choose_runtime
from breastscan.serving.auth import ApiKeys
from breastscan.serving.config import CONFIG_ENV, ServingConfig, load_serving_config, with_models
from breastscan.serving.engine import Engine, ModelSlot, bundle_slot, warm_up
from breastscan.serving.metrics import ServiceMetrics
from breastscan.serving.request import api_routes
from breastscan.serving.store import PREFIX, load_served, store_name, stored_models

if TYPE_CHECKING:
    from breastscan.bundle import ModelBundle
    from breastscan.monitoring.recorder import Recorder
    from breastscan.serving.follow import Candidate
    from breastscan.serving.grpc_server import GrpcServerHandle

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- configuration


def pinned_model_tags(bento_dir: Path) -> dict[str, str]:
    """The model tags a built Bento recorded, by model name (``{}`` outside a Bento).

    ``bentoml build`` records the exact version of every model the service declares;
    BentoML 1.4 does not apply them when it loads the Bento again (only for Hugging Face
    models), so a Bento served after a newer import would take the newer ``latest``.
    Reading them from the Bento's own ``bento.yaml`` keeps a Bento serving exactly what it
    was built with: a Bento is an immutable artifact.
    """
    import yaml

    info_file = bento_dir / "bento.yaml"
    if not info_file.is_file():
        return {}
    info = yaml.safe_load(info_file.read_text()) or {}
    tags = [str(m["tag"]) for svc in info.get("services") or [] for m in svc.get("models") or []]
    return {tag.split(":", 1)[0]: tag for tag in tags}


def service_config(service_file: Path) -> tuple[ServingConfig, dict[str, str]]:
    """The serving config of the service defined in ``service_file``, and its model tags.

    The config is ``$BREASTSCAN_SERVING_CONFIG``, else ``serving.yaml`` beside the service
    file; ``models: auto`` serves a Bento's pinned models (the service file lies at
    ``<bento>/src/services/service.py``), else the store's at the config's stage. Only the
    latter follows the registry stage while serving (``follow``): a Bento is immutable, and a
    list of models serves what was imported.

    Returns:
        ``(config, {model name: BentoML tag served})``.

    Raises:
        ValueError: a model name that is another route of the service.
    """
    pinned = pinned_model_tags(service_file.resolve().parents[2])
    raw = load_serving_config(os.environ.get(CONFIG_ENV) or service_file.with_name("serving.yaml"),
                              dict(os.environ))
    if raw.models:
        served: tuple[str, ...] = ()
    elif pinned:
        served = tuple(tag[len(PREFIX):] for tag in pinned if tag.startswith(PREFIX))
    else:
        served = stored_models(raw.stage)
    config = with_models(raw, served)
    if raw.models or pinned:
        config = replace(config, follow=replace(config.follow, enabled=False))
    api_routes(config.models)  # refuses a model named like a route, before any worker starts
    tags = {name: pinned.get(store_name(name), f"{store_name(name)}:latest") for name in config.models}
    return config, tags


def gpu_count() -> int:
    """NVIDIA GPUs this process may use; 0 without one, without NVML, or with none visible.

    BentoML 1.4 has no public API for the machine's resources, so this asks NVML (the
    ``nvidia-ml-py`` package BentoML itself uses) for the device count, limited by
    ``CUDA_VISIBLE_DEVICES`` when it is set. Cheap, and never imports TensorFlow.
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


def service_options(config: ServingConfig) -> dict[str, Any]:
    """The options of ``bentoml.service`` for ``config`` (a GPU when one is visible)."""
    options: dict[str, Any] = {
        "name": "breastscan", "workers": config.api_workers,
        "traffic": {"timeout": config.timeout_s, "max_concurrency": config.max_concurrency},
        # The edge (breastscan.serving.http.Edge) logs every request once (id, status, time,
        # size); BentoML's access log would log each a second time.
        "logging": {"access": {"enabled": False}},
    }
    tracing = dict(config.tracing)
    if not tracing.get("sample_rate"):
        # Nothing is sampled, yet OpenTelemetry's ASGI middleware would still build a span
        # and its attributes for every request and every send (measured with py-spy at c=1:
        # about a seventh of the event loop's busy time): excluded, it passes requests through.
        tracing.setdefault("excluded_urls", [".*"])
    options["tracing"] = tracing
    if gpu_count():
        options["resources"] = {"gpu": 1}
    return options


def edge_options(config: ServingConfig) -> dict[str, Any]:
    """The options of the HTTP edge (:class:`breastscan.serving.http.Edge`) for ``config``.

    Raises:
        ValueError: authentication is on and no key is configured.
    """
    keys = ApiKeys.load(config.auth.keys_file, config.auth.keys_env) if config.auth.enabled else None
    return {"routes": api_routes(config.models), "engine": current_engine, "keys": keys,
            "max_body_bytes": config.max_upload_bytes, "timeout_s": config.timeout_s,
            "on_answer": lambda endpoint, outcome: current_metrics().count_request(endpoint, outcome)}


def current_engine() -> Engine | None:
    """The engine of this worker's service instance; ``None`` before it is built."""
    worker = _current_worker()
    return None if worker is None else worker.engine


def current_metrics() -> ServiceMetrics:
    """The metrics of this worker's service instance."""
    worker = _current_worker()
    assert worker is not None, "metrics are reported once the worker is built"
    return worker.metrics


def _current_worker() -> Worker | None:
    import bentoml
    from bentoml.exceptions import BentoMLException

    try:
        service = bentoml.get_current_service()
    except BentoMLException:
        return None
    return getattr(service, "worker", None)


# --------------------------------------------------------------------------- one worker


class Worker:
    """One worker process's models, engine, batchers, drift recorder, gRPC server and registry follower.

    Args:
        config: the serving config.
        tags: the BentoML tag served for each model (:func:`service_config`).
    """

    def __init__(self, config: ServingConfig, tags: dict[str, str]) -> None:
        started = time.perf_counter()
        self.config = config
        self.metrics = ServiceMetrics()
        stored = {name: _stored(tags[name]) for name in config.models}
        runtimes = {name: choose_runtime(s.path, config.runtime) for name, s in stored.items()}
        if "keras" in runtimes.values():
            _configure_gpus()  # before TensorFlow starts
        candidates = {name: _load_stored(name, s, runtimes[name]) for name, s in stored.items()}
        self.engine = Engine({n: self._slot_of(c) for n, c in candidates.items()},
                             max_upload_bytes=config.max_upload_bytes,
                             recorder=self._recorder({n: c.bundle for n, c in candidates.items()}))
        self.grpc: GrpcServerHandle | None = None
        self._follow: asyncio.Task[None] | None = None
        del candidates  # the engine's slots hold the models from here on
        # TensorFlow and the models leave ~460,000 long-lived objects: a full garbage
        # collection walked them all, about 0.5 s with every request waiting (measured:
        # the p99 at half saturation was 1.6 s with a 35 ms median). Freezing them keeps
        # collections to what requests allocate.
        gc.collect()
        gc.freeze()
        log.info("serving %s (models loaded and warmed in %.1f s; TensorFlow %s)",
                 ", ".join(f"{m.name} v{m.version} ({m.stage}, {runtimes[m.name]})"
                           for m in self.engine.models.values()),
                 time.perf_counter() - started, "loaded" if "tensorflow" in sys.modules else "not loaded")

    @property
    def ready(self) -> bool:
        """Whether every model is loaded (it is once the worker exists; a withdrawn one counts)."""
        return set(self.engine.slots) | set(self.engine.withdrawn) == set(self.config.models)

    def _slot_of(self, candidate: Candidate) -> ModelSlot:
        """A loaded version's slot in this worker: its own batcher (the model's batching, counted in
        the metrics) and explainer."""
        name = candidate.served.name
        return bundle_slot(candidate.served, candidate.bundle, self.config.batching_for(name),
                           self.metrics.count_batch)

    def _swap_slot(self, candidate: Candidate) -> ModelSlot:
        """:meth:`_slot_of` for a version about to replace the served one; drift is scored against
        its reference from now on."""
        bundle, recorder = candidate.bundle, self.engine.recorder
        if recorder is not None and bundle.reference:
            from breastscan.monitoring.drift import reference_records

            recorder.references[candidate.served.name] = list(reference_records(bundle.reference,
                                                                                bundle.contract))
        return self._slot_of(candidate)

    def _recorder(self, bundles: dict[str, ModelBundle]) -> Recorder | None:
        """The drift recorder of the served models (``None`` when ``monitoring.enabled`` is false)."""
        monitoring = self.config.monitoring
        if not monitoring.enabled:
            return None
        from breastscan.monitoring.drift import reference_records
        from breastscan.monitoring.recorder import Recorder

        references = {n: reference_records(b.reference, b.contract)
                      for n, b in bundles.items() if b.reference}
        if set(bundles) - set(references):
            log.warning("no drift reference (reference.json) in %s: recorded, not scored",
                        ", ".join(sorted(set(bundles) - set(references))))
        return Recorder(monitoring.store, max_records=monitoring.max_records, window=monitoring.window,
                        interval_s=monitoring.interval_s, queue_size=monitoring.queue_size,
                        references=references, thresholds=monitoring.thresholds,
                        on_report=self.metrics.publish_drift).start()

    def start_grpc(self, loop: asyncio.AbstractEventLoop, keys: ApiKeys | None) -> None:
        """Start the gRPC server in this worker (workers share the port: SO_REUSEPORT)."""
        if not self.config.grpc_enabled:
            return
        from breastscan.serving.auth import grpc_interceptor
        from breastscan.serving.grpc_server import start_grpc_server

        config = self.config
        self.grpc = start_grpc_server(
            self.engine, loop, host=config.grpc_host, port=config.grpc_port,
            max_workers=config.grpc_max_workers, max_message_bytes=config.max_upload_bytes + 2**20,
            timeout_s=config.timeout_s, interceptors=[grpc_interceptor(keys)] if keys else [])

    def follow_registry(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start following the registry stage on this worker's event loop (when ``follow.enabled``)."""
        from breastscan.serving.follow import MlflowRegistry, StageFollower

        follow = self.config.follow
        if not follow.enabled:
            log.info("not following the registry stage: follow.enabled is false, or a Bento or a list of "
                     "models is served")
            return
        registry = MlflowRegistry(runtime=self.config.runtime)
        follower = StageFollower(self.engine, registry, self._swap_slot, stage=self.config.stage,
                                 poll_s=follow.poll_s, retire_s=self.config.timeout_s, metrics=self.metrics,
                                 on_retired=_refreeze)
        self._follow = loop.create_task(follower.run(), name="follow-registry")

    def stop(self) -> None:
        """Stop following the registry and the gRPC server (calls in flight finish), then the model
        threads and the recorder."""
        if self._follow is not None and not self._follow.get_loop().is_closed():
            self._follow.get_loop().call_soon_threadsafe(self._follow.cancel)
        if self.grpc is not None:
            self.grpc.set_serving(False)
            self.grpc.stop(5)
        self.engine.close()


def _load_stored(name: str, stored: Any, runtime: str) -> Candidate:
    """The stored BentoML model ``stored`` served as ``name``: loaded by ``runtime`` (``onnx`` or
    ``keras``) and warmed (one prediction)."""
    from breastscan.bundle import ModelBundle
    from breastscan.serving.follow import Candidate

    bundle = ModelBundle.load(stored.path, runtime=runtime)
    warm_up(bundle)
    served = load_served(name, stored.path, dict(stored.info.labels or {}),
                         source=str(stored.info.metadata.get("source", stored.tag)))
    return Candidate(served, bundle)


def _stored(tag: str) -> Any:
    """The stored BentoML model of ``tag``.

    Raises:
        RuntimeError: it is not in the store.
    """
    import bentoml

    ref = bentoml.models.BentoModel(tag)
    if ref.stored is None:
        raise RuntimeError(f"model {tag} is not in the BentoML store: run `breastscan build` (or "
                           "`make serve`), which imports the registry's production versions")
    return ref.stored


def _refreeze() -> None:
    """Collect what a replaced model version left, then freeze the survivors again.

    The worker froze its long-lived objects (TensorFlow, the first models); an unreachable
    frozen model is never collected, so after a swap one full collection (about half a
    second with TensorFlow loaded, logged) frees the old version.
    """
    started = time.perf_counter()
    gc.unfreeze()
    freed = gc.collect()
    gc.freeze()
    log.info("replaced model collected (%d objects) in %.0f ms", freed, (time.perf_counter() - started) * 1e3)


def _configure_gpus() -> None:
    """Let several workers share a GPU: TensorFlow takes memory as it needs it."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError as exc:  # already initialised
            log.warning("memory growth not set on %s: %s", gpu.name, exc)
