"""The service's own configuration (``services/serving.yaml``): what it serves and how it batches.

The service reads no ``params.yaml``: what a model needs travels with it in the model
store (spec, contract, calibration), and everything about serving -- the models served,
adaptive batching, workers, limits, the gRPC port -- is in this one file.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from breastscan.monitoring.drift import Thresholds

CONFIG_ENV = "BREASTSCAN_SERVING_CONFIG"
"""Environment variable naming another serving config file (benchmarks, tests)."""
AUTO = "auto"
"""``models: auto``: serve what the registry has at the stage (imported into the store)."""
GRPC_PORT_ENV = "BREASTSCAN_GRPC_PORT"
"""Environment variable overriding ``grpc.port``."""
GRPC_HOST_ENV = "BREASTSCAN_GRPC_HOST"
"""Environment variable overriding ``grpc.host`` (``0.0.0.0`` in a container)."""
AUTH_ENV = "BREASTSCAN_AUTH"
"""Environment variable overriding ``auth.enabled`` (``on`` / ``off``)."""
KEYS_FILE_ENV = "BREASTSCAN_API_KEYS_FILE"
"""Environment variable overriding ``auth.keys_file``."""
MONITORING_STORE_ENV = "BREASTSCAN_MONITORING_STORE"
"""Environment variable overriding ``monitoring.store``."""
RUNTIME_ENV = "BREASTSCAN_RUNTIME"
"""Environment variable overriding ``runtime`` (``auto``, ``onnx``, ``keras``)."""


@dataclass(frozen=True)
class Auth:
    """API-key authentication (:mod:`breastscan.serving.auth`).

    Attributes:
        enabled: require a key on every API call, both protocols (health, UI files and the
            API description stay open).
        keys_file: a file of hashed keys (``breastscan api-key add`` writes it), or ``None``.
        keys_env: an environment variable holding hashed keys (comma-separated), or ``None``.
    """

    enabled: bool = False
    keys_file: str | None = None
    keys_env: str | None = "BREASTSCAN_API_KEYS"


@dataclass(frozen=True)
class Monitoring:
    """Drift monitoring of served requests (:mod:`breastscan.monitoring.recorder`).

    Attributes:
        enabled: record per-request statistics and score drift.
        store: the SQLite file of records (relative paths: to the service's working directory).
        max_records: records kept per model, oldest dropped.
        window: newest records compared with the model's training reference.
        interval_s: seconds between drift scorings (the Prometheus gauges).
        queue_size: requests waiting to be recorded at most; beyond, dropped and counted.
        thresholds: when a feature, and a window, drift.
    """

    enabled: bool = True
    store: str = ".breastscan/monitoring/requests.sqlite"
    max_records: int = 10000
    window: int = 500
    interval_s: float = 60.0
    queue_size: int = 1024
    thresholds: Thresholds = field(default_factory=Thresholds)


@dataclass(frozen=True)
class Follow:
    """Following the registry stage while serving (:mod:`breastscan.serving.follow`).

    Attributes:
        enabled: each worker polls the registry for its models' ``@stage`` alias and swaps
            to the version it points at (only with ``models: auto``, never in a Bento; off,
            logged, when no registry is reachable).
        poll_s: seconds between two looks at the registry (> 0).
    """

    enabled: bool = True
    poll_s: float = 10.0


@dataclass(frozen=True)
class Batching:
    """Adaptive batching of one model (:class:`breastscan.serving.batching.Batcher`).

    Attributes:
        enabled: ``False`` serves one request per model call (for comparison).
        max_batch_size: the most images one model call takes (> 1).
        max_latency_ms: the longest a request may wait in the queue before it is shed.
    """

    enabled: bool = True
    max_batch_size: int = 32
    max_latency_ms: int = 200


@dataclass(frozen=True)
class ServingConfig:
    """Everything the service needs that does not travel with the models.

    Attributes:
        models: served model names, each ``breastscan-<name>`` in the BentoML store; empty
            (``models: auto``): every model imported at ``stage`` (:func:`with_models`).
        stage: registry alias ``breastscan build`` imports (``production``).
        batching: default batching of every model API.
        per_model: batching overrides by model name.
        api_workers: worker processes of the service (each holds every model; HTTP, gRPC, UI).
        max_concurrency: requests at once per worker before it answers 503.
        timeout_s: request timeout.
        max_upload_bytes: largest request body / image file accepted (413 beyond).
        grpc_enabled: serve gRPC from the service's workers.
        grpc_host: address the gRPC server binds.
        grpc_port: its port.
        grpc_max_workers: gRPC handler threads per worker.
        auth: API-key authentication.
        monitoring: drift monitoring.
        follow: following the registry stage (live swaps of the served versions).
        tracing: BentoML's OpenTelemetry tracing options (``sample_rate``, ``exporter_type``,
            ``otlp`` ...), passed through; empty: nothing is traced.
        runtime: what runs the models (:data:`breastscan.exported.RUNTIMES`): ``auto`` (each
            model's checked ONNX export when it has one, TensorFlow otherwise), ``onnx`` (every
            model's export, or the worker does not start) or ``keras`` (TensorFlow);
            :data:`RUNTIME_ENV` overrides.
    """

    models: tuple[str, ...] = ()
    stage: str = "production"
    batching: Batching = field(default_factory=Batching)
    per_model: dict[str, Batching] = field(default_factory=dict)
    api_workers: int = 1
    max_concurrency: int = 512
    timeout_s: float = 60.0
    max_upload_bytes: int = 32 * 2**20
    grpc_enabled: bool = True
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051
    grpc_max_workers: int = 64
    auth: Auth = field(default_factory=Auth)
    monitoring: Monitoring = field(default_factory=Monitoring)
    follow: Follow = field(default_factory=Follow)
    tracing: dict[str, Any] = field(default_factory=dict)
    runtime: str = "auto"

    def batching_for(self, model: str) -> Batching:
        """The batching of ``model``'s API (its override, else the default)."""
        return self.per_model.get(model, self.batching)


def _batching(raw: dict[str, Any], base: Batching) -> Batching:
    unknown = set(raw) - {"enabled", "max_batch_size", "max_latency_ms"}
    if unknown:
        raise ValueError(f"unknown batching keys: {', '.join(sorted(unknown))}")
    out = Batching(enabled=bool(raw.get("enabled", base.enabled)),
                   max_batch_size=int(raw.get("max_batch_size", base.max_batch_size)),
                   max_latency_ms=int(raw.get("max_latency_ms", base.max_latency_ms)))
    if out.max_batch_size < 2:
        raise ValueError("max_batch_size must be at least 2 (set enabled: false to turn batching off)")
    if out.max_latency_ms <= 0:
        raise ValueError("max_latency_ms must be positive")
    return out


def parse_serving_config(raw: dict[str, Any], env: dict[str, str] | None = None) -> ServingConfig:
    """Build a :class:`ServingConfig` from the YAML's dict (unknown keys are errors).

    Args:
        raw: the parsed YAML.
        env: environment overrides (:data:`GRPC_PORT_ENV`, :data:`GRPC_HOST_ENV`,
            :data:`AUTH_ENV`, :data:`KEYS_FILE_ENV`, :data:`MONITORING_STORE_ENV`, :data:`RUNTIME_ENV`).
    """
    env = env or {}
    known = {"models", "stage", "batching", "api_service", "limits", "grpc", "auth", "monitoring", "follow",
             "tracing", "runtime"}
    if "models_service" in raw:
        raise ValueError("models_service is gone: the models run in the service's own workers "
                         "(api_service.workers)")
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"unknown serving config keys: {', '.join(sorted(unknown))}")
    batching_raw = dict(raw.get("batching") or {})
    per_model_raw = batching_raw.pop("per_model", None) or {}
    batching = _batching(batching_raw, Batching())
    per_model = {name: _batching(dict(v or {}), batching) for name, v in per_model_raw.items()}
    api = raw.get("api_service") or {}
    limits, grpc = raw.get("limits") or {}, raw.get("grpc") or {}
    listed = raw.get("models", AUTO)
    models = () if listed in (AUTO, None) else tuple(str(m) for m in listed)
    if listed not in (AUTO, None) and not models:
        raise ValueError(f"models: name at least one model, or `{AUTO}`")
    return ServingConfig(
        models=models, stage=str(raw.get("stage", "production")), batching=batching, per_model=per_model,
        api_workers=int(api.get("workers", 1)), max_concurrency=int(api.get("max_concurrency", 512)),
        timeout_s=float(api.get("timeout_s", 60.0)),
        max_upload_bytes=int(limits.get("max_upload_bytes", 32 * 2**20)),
        grpc_enabled=bool(grpc.get("enabled", True)),
        grpc_host=str(env.get(GRPC_HOST_ENV) or grpc.get("host", "127.0.0.1")),
        grpc_port=int(env.get(GRPC_PORT_ENV) or grpc.get("port", 50051)),
        grpc_max_workers=int(grpc.get("max_workers", 64)),
        auth=_auth(dict(raw.get("auth") or {}), env),
        monitoring=parse_monitoring(dict(raw.get("monitoring") or {}), env),
        follow=parse_follow(dict(raw.get("follow") or {})),
        tracing=dict(raw.get("tracing") or {}),
        runtime=_runtime(str(env.get(RUNTIME_ENV) or raw.get("runtime", "auto"))),
    )


def _runtime(value: str) -> str:
    from breastscan.exported import RUNTIMES

    if value not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {value!r}")
    return value


def _as(default: Any, value: Any) -> Any:
    """``value`` converted to ``default``'s type (``default`` when ``None``)."""
    return default if value is None else type(default)(value)


def parse_monitoring(raw: dict[str, Any], env: dict[str, str] | None = None) -> Monitoring:
    """The ``monitoring:`` section (unknown keys are errors; missing ones take the defaults).

    Raises:
        ValueError: an unknown key, or a count or interval below 1.
    """
    env = env or {}
    thresholds_raw = dict(raw.pop("thresholds", None) or {})
    known = {f.name for f in fields(Monitoring)} - {"thresholds"}
    unknown = set(raw) - known
    unknown_th = set(thresholds_raw) - {f.name for f in fields(Thresholds)}
    if unknown or unknown_th:
        names = sorted(unknown) + [f"thresholds.{k}" for k in sorted(unknown_th)]
        raise ValueError(f"unknown monitoring keys: {', '.join(names)}")
    base, th = Monitoring(), Thresholds()
    thresholds = Thresholds(**{f.name: _as(getattr(th, f.name), thresholds_raw.get(f.name))
                               for f in fields(Thresholds)})
    enabled = raw.get("enabled", base.enabled)
    if not isinstance(enabled, bool):
        raise ValueError(f"monitoring.enabled must be true or false, got {enabled!r}")
    store = env.get(MONITORING_STORE_ENV) or raw.get("store", base.store)
    out = Monitoring(enabled=enabled, store=str(store),
                     max_records=int(raw.get("max_records", base.max_records)),
                     window=int(raw.get("window", base.window)),
                     interval_s=float(raw.get("interval_s", base.interval_s)),
                     queue_size=int(raw.get("queue_size", base.queue_size)), thresholds=thresholds)
    if min(out.max_records, out.window, out.queue_size) < 1 or out.interval_s <= 0:
        raise ValueError("monitoring: max_records, window, queue_size must be >= 1 and interval_s > 0")
    return out


def parse_follow(raw: dict[str, Any]) -> Follow:
    """The ``follow:`` section (missing keys take the defaults).

    Raises:
        ValueError: an unknown key, ``enabled`` not a boolean, or ``poll_s`` not positive.
    """
    unknown = set(raw) - {f.name for f in fields(Follow)}
    if unknown:
        raise ValueError(f"unknown follow keys: {', '.join(sorted(unknown))}")
    enabled = raw.get("enabled", Follow.enabled)
    if not isinstance(enabled, bool):
        raise ValueError(f"follow.enabled must be true or false, got {enabled!r}")
    poll_s = float(raw.get("poll_s", Follow.poll_s))
    if not poll_s > 0:
        raise ValueError(f"follow.poll_s must be positive, got {poll_s}")
    return Follow(enabled=enabled, poll_s=poll_s)


def _auth(raw: dict[str, Any], env: dict[str, str]) -> Auth:
    unknown = set(raw) - {"enabled", "keys_file", "keys_env"}
    if unknown:
        raise ValueError(f"unknown auth keys: {', '.join(sorted(unknown))}")
    enabled = raw.get("enabled", False)
    if not isinstance(enabled, bool):
        raise ValueError(f"auth.enabled must be true or false, got {enabled!r}")
    switch = env.get(AUTH_ENV, "").strip().lower()
    if switch:
        if switch not in ("on", "off", "true", "false", "1", "0"):
            raise ValueError(f"{AUTH_ENV} must be on or off, got {switch!r}")
        enabled = switch in ("on", "true", "1")
    keys_file = env.get(KEYS_FILE_ENV) or raw.get("keys_file")
    keys_env = raw.get("keys_env", Auth.keys_env)
    return Auth(enabled=enabled, keys_file=str(keys_file) if keys_file else None,
                keys_env=str(keys_env) if keys_env else None)


def load_serving_config(path: str | Path, env: dict[str, str] | None = None) -> ServingConfig:
    """Read a serving config file (see :func:`parse_serving_config`)."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping")
    return parse_serving_config(raw, env)


def with_models(cfg: ServingConfig, available: tuple[str, ...]) -> ServingConfig:
    """The config with its served models settled: the listed ones, or (``auto``) ``available``.

    Raises:
        ValueError: nothing to serve.
    """
    from dataclasses import replace

    models = cfg.models or tuple(sorted(available))
    if not models:
        raise ValueError(f"no model to serve: none is imported at stage {cfg.stage!r}; run "
                         "`breastscan import-models` (or `make serve`) after promoting one")
    return replace(cfg, models=models)
