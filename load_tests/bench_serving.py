"""Serving benchmark: what the service delivers against an honest limit and against plain peers.

One run measures, on this machine, and writes ``reports/serving_benchmark.json`` and a
markdown table (printed, and written to ``reports/serving_benchmark.md``):

1. **In-process limits** -- ``ModelBundle.predict`` of every served model at batch sizes
   1-64 (the model alone), and for the endpoint under load the **end-to-end** throughput:
   PNG bytes in, the answer's JSON out (decode and preprocess on one thread per core,
   overlapped with the batched model call, then each answer), at each batch size; its
   best is the limit the served numbers are held to, and best / batch 1 the headroom
   adaptive batching can at most capture. For each model whose bundle carries a checked
   ONNX export, the model call run by Keras and by ONNX Runtime side by side
   (:func:`runtime_comparison`).
2. **Served throughput and latency** -- ``bentoml serve services.service:BreastScan`` with
   the serving config as it is (adaptive batching on), then again with a copy that sets
   ``batching.enabled: false``. For each: closed-loop load over HTTP (``POST /<endpoint>``,
   multipart PNG) and over gRPC (``Predict``), one image per request, at each concurrency
   (1, 8, 32, 64), a warm-up first, then a fixed time: requests/s (median of sub-windows),
   p50/p95/p99 latency, errors, mean model batch size (from the service's ``/metrics``)
   and the CPU used by the server and by the load generator. With batching on, py-spy
   profiles the worker during the HTTP point at concurrency 32 (``reports/profiles``), and
   an open-loop (Poisson) run at half the saturation throughput gives the p99 a clinic
   would see on a busy but not overloaded day.
3. **Peers** (``load_tests/peers``) on the same bundle, preprocessing, answer and load, HTTP
   at concurrency 1 and 32: a plain FastAPI + uvicorn app calling ``ModelBundle.predict``
   per request (1 and 2 workers: the competent baseline), the same with Keras
   ``Model.predict`` per request, and a one-service BentoML app without batching. Each
   peer's JSON answer for one image must equal the service's (:func:`answer_differences`;
   the run exits non-zero, after writing its report, when one does not).
4. **Cold start and memory** -- process start to ``/readyz`` 200 and to gRPC ``SERVING``;
   resident memory (RSS) of every server process, idle after start and after the load.
5. **Served runtimes** -- the service again, once with a copy of the serving config that sets
   ``runtime: keras`` (TensorFlow) and once ``runtime: onnx`` (every model's checked ONNX
   export, no TensorFlow in the worker): cold start, RSS idle and after the load, what
   ``/models`` says runs each model, and HTTP closed loop at concurrency 1 and 32 on
   ``/density`` and ``/tumor`` (those served) (:func:`served_runtimes`; ``--no-served-runtimes``
   skips it). A server that refuses to start (``onnx`` with a model lacking an export) is
   recorded with its error.
6. **Ratios and targets** at concurrency 32 (:func:`ratios_and_targets`).

The load generator (asyncio: ``aiohttp`` for HTTP, ``grpc.aio`` for gRPC) runs in this
process, the servers in their own processes, the in-process measurement in a child
process of its own (TensorFlow never loads here). All of them share this machine's
cores: on a 2-core machine the load generator takes CPU from the server, which the JSON
records (CPU per process) and the table notes say.

Run (``make bench-serving``)::

    .venv/bin/python load_tests/bench_serving.py            # full run, ~16 min on 2 cores
    .venv/bin/python load_tests/bench_serving.py --quick    # ~5 min smoke run

By default the models are the project's production models: ``breastscan import-models``
copies them from the MLflow registry (``mlflow.db``, trained and promoted by ``make
demo``) into the checkout's own BentoML store (``$BENTOML_HOME``, else ``.bentoml/`` at
the repository root, as ``make`` sets it: :func:`default_bentoml_home`), as ``make serve``
does. ``--tracking-uri`` / ``--bentoml-home`` point at another registry and store (e.g. the
tiny models of the service tests); ``--no-import`` serves what the store holds. The run
stops before measuring anything when a model it would serve is not the registry's version
at the stage (:func:`foreign_models`: imported from another checkout's registry, or one the
registry does not hold at all); ``--allow-foreign-models`` measures them anyway, with a
warning in the log and the report.

``--runtimes-of DIR`` (repeatable) measures only :func:`runtime_comparison` -- Keras
against the bundle's ONNX export (``ModelBundle.load(dir, runtime=...)``), in this
process -- on bundle directories, and prints its table.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import click
import numpy as np
import yaml
from click.core import ParameterSource
from harness import LaunchedService, ServiceStartError, launch_service  # load_tests/harness.py

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
log = logging.getLogger("breastscan.bench")

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
RUNTIME_BATCH_SIZES = (1, 8, 32, 64)
"""Batch sizes of the Keras / ONNX Runtime comparison (:func:`runtime_comparison`)."""
RUNTIME_TARGETS = {"batch_1": 5.0, "best": 2.0}
"""ONNX Runtime over Keras images/s a model must reach: at batch 1, and best over best."""
BENTOML_HOME_DIR = ".bentoml"
"""The checkout's own BentoML home (git-ignored), as the Makefile sets ``BENTOML_HOME``."""
MODEL_MODALITY = {"density": "mammography", "tumor": "mammography", "lesion": "ultrasound"}
REF_CONCURRENCY = 32
"""The concurrency the ratios and targets are read at."""
SERVED_RUNTIMES = ("keras", "onnx")
"""The serving config's ``runtime`` values :func:`served_runtimes` serves side by side."""
SERVED_RUNTIME_ENDPOINTS = ("density", "tumor")
"""The endpoints (when served) whose HTTP throughput :func:`served_runtimes` measures."""
SERVED_RUNTIME_CONCURRENCY = (1, REF_CONCURRENCY)
"""The closed-loop concurrencies of :func:`served_runtimes`."""
SERVED_ONNX_TARGETS = {"cold_start_s": 5.0, "rss_mb_idle": 350.0}
"""The ONNX-run service's cold start to ``/readyz`` (s) and idle RSS per worker (MiB), at most."""
SERVED_ONNX_OVER_KERAS = {"density": 1.5, "tumor": 1.1}
"""HTTP req/s of the ONNX-run service over the TensorFlow-run one, at least, per endpoint."""
SHARED_CORES_NOTE = ("load generator, server and the in-process measurement "
                     "share this machine's {cores} CPU cores: the load generator's own CPU (column "
                     "'loadgen CPU') is taken from the server, so served numbers are a lower bound of "
                     "what the server does on cores of its own")
KERAS_PEER_TOLERANCE = 1e-4
"""How far the seeds peer's numbers (Keras) may be from the service's (its models' ONNX exports,
checked to this bound): the evaluate stage's class-probability tolerance."""
SERVED_RUNTIMES_NOTE = ("served runtimes: the service again, with a copy of the serving config whose "
                        "runtime is keras (TensorFlow), then one whose runtime is onnx (no TensorFlow in the "
                        "worker; a model without a checked export stops it from starting), other settings as "
                        "configured; HTTP closed loop only; RSS per worker is the largest worker process's")


# =========================================================================== settings


@dataclass(frozen=True)
class Settings:
    """What one benchmark run measures and how long.

    Attributes:
        quick: the short smoke run.
        endpoint: the model served endpoint under load (``/<endpoint>``, ``Predict(model=...)``).
        concurrency: closed-loop concurrencies.
        warmup_s: warm-up of every load point (not measured).
        duration_s: measured time of every load point.
        windows: sub-windows a point's throughput is split into (median reported).
        inprocess_repeats: timed repeats per batch size in process.
        inprocess_min_s: least time of one in-process repeat.
        half_saturation: run the open-loop point at half the saturation throughput.
    """

    quick: bool
    endpoint: str = "tumor"
    concurrency: tuple[int, ...] = (1, 8, 32, 64)
    warmup_s: float = 3.0
    duration_s: float = 15.0
    windows: int = 5
    inprocess_repeats: int = 5
    inprocess_min_s: float = 0.5
    half_saturation: bool = True

    @classmethod
    def make(cls, quick: bool, endpoint: str, concurrency: tuple[int, ...] | None,
             duration_s: float | None) -> Settings:
        """The full or quick settings, with the command line's overrides."""
        base = (cls(quick=True, endpoint=endpoint, concurrency=(1, 8, 32), warmup_s=1.0, duration_s=3.0,
                    windows=3, inprocess_repeats=3, inprocess_min_s=0.1)
                if quick else cls(quick=False, endpoint=endpoint))
        if concurrency:
            base = dataclasses.replace(base, concurrency=tuple(sorted(set(concurrency))))
        if duration_s:
            base = dataclasses.replace(base, duration_s=float(duration_s))
        return base


# =========================================================================== facts


def git_facts() -> dict[str, Any]:
    """The checkout's commit and whether tracked files are modified (``None`` when unknown).

    :func:`breastscan.provenance.git_state`, the provenance every MLflow run records,
    so a benchmark and a training run name a checkout the same way.
    """
    from breastscan.provenance import git_state

    commit, dirty = git_state(REPO)
    return {"commit": commit, "dirty": dirty}


def machine_facts() -> dict[str, Any]:
    """CPU count and model, memory, load average and the Python in use (GPU: see in_process)."""
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model, "memory_gb": mem_gb, "platform": platform.platform(),
        "python": platform.python_version(), "load_average_at_start": list(os.getloadavg()),
    }


# =========================================================================== stores


def default_bentoml_home(environ: Mapping[str, str] | None = None) -> Path:
    """The BentoML home (model store and Bentos) the benchmark serves from by default.

    ``$BENTOML_HOME`` when set (``make`` sets it to the checkout's ``.bentoml/`` unless the
    user did), else the checkout's own ``.bentoml/`` too -- never the user's ``~/bentoml``,
    which every checkout shares, so that a benchmark measures the models of this checkout's
    registry and no other's.
    """
    environ = os.environ if environ is None else environ
    return Path(environ.get("BENTOML_HOME") or REPO / BENTOML_HOME_DIR)


def store_provenance(models: Sequence[str], stage: str, tracking_uri: str) -> dict[str, dict[str, Any]]:
    """Where each model the benchmark would serve came from, and what the registry holds now.

    Reads the newest ``breastscan-<model>`` of the BentoML store (``$BENTOML_HOME``, set
    before ``bentoml`` is imported), the one the service loads, and the version holding
    ``@stage`` in the registry at ``tracking_uri`` (a missing SQLite file is an empty
    registry, and is not created).

    Returns:
        ``{model: {"tag", "stored_version", "stored_run", "registry_version",
        "registry_run"}}`` (``None`` where unknown or absent).
    """
    import bentoml

    from breastscan.serving.store import LABEL_VERSION, store_name

    client = None
    sqlite_file = tracking_uri.removeprefix("sqlite:///") if tracking_uri.startswith("sqlite:///") else None
    if sqlite_file is None or Path(sqlite_file).is_file():
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    out: dict[str, dict[str, Any]] = {}
    for name in models:
        stored = bentoml.models.get(f"{store_name(name)}:latest")
        held = None
        if client is not None:
            from breastscan.registry.resolver import alias_holder

            held = alias_holder(client, store_name(name), stage)
        out[name] = {"tag": str(stored.tag), "stored_version": (stored.info.labels or {}).get(LABEL_VERSION),
                     "stored_run": stored.info.metadata.get("run_id") or None,
                     "registry_version": None if held is None else str(held.version),
                     "registry_run": None if held is None else held.run_id or None}
    return out


def foreign_models(provenance: Mapping[str, Mapping[str, Any]], stage: str) -> list[str]:
    """The models of :func:`store_provenance` that are not the registry's version at ``stage``.

    A stored model is the registry's when the registry holds ``breastscan-<model>@<stage>``
    and the stored copy records that version and its training run (the same version number
    in another registry is another model).

    Returns:
        One line per foreign model, saying what the store and the registry hold; empty when
        every one is the registry's.
    """
    lines = []
    for name, p in provenance.items():
        stored = f"{p['tag']} (registry v{p['stored_version']}, run {p['stored_run']})"
        if p["registry_version"] is None:
            lines.append(f"{name}: the store holds {stored}, the registry has no breastscan-{name}@{stage}")
        elif (p["stored_version"], p["stored_run"]) != (p["registry_version"], p["registry_run"]):
            lines.append(f"{name}: the store holds {stored}, the registry's @{stage} is "
                         f"v{p['registry_version']} of run {p['registry_run']}")
    return lines


def checked_store(models: Sequence[str], stage: str, bentoml_home: Path, tracking_uri: str,
                  allow_foreign: bool) -> dict[str, Any]:
    """The report's ``stores`` block; stops the run when the store serves foreign models.

    Args:
        models: the models the benchmark would serve.
        stage: the registry stage they are served at.
        bentoml_home: the BentoML home (already ``$BENTOML_HOME`` of this process).
        tracking_uri: the registry the models should come from.
        allow_foreign: warn (in the log and the report) instead of stopping.

    Returns:
        ``{"bentoml_home", "tracking_uri", "provenance"`` (:func:`store_provenance`),
        ``"foreign_models"`` (:func:`foreign_models`)``}``.

    Raises:
        click.ClickException: a model is foreign and ``allow_foreign`` is false.
    """
    provenance = store_provenance(models, stage, tracking_uri)
    foreign = foreign_models(provenance, stage)
    if foreign and not allow_foreign:
        raise click.ClickException(
            f"the BentoML store {bentoml_home} serves models that are not the registry's ({tracking_uri}) "
            f"version at @{stage}:\n  " + "\n  ".join(foreign) + "\nThe benchmark would measure them. Use a "
            f"store of this checkout's own (--bentoml-home; default $BENTOML_HOME, else "
            f"{REPO / BENTOML_HOME_DIR}), remove them from it (bentoml models delete <tag>), or pass "
            "--allow-foreign-models to measure them anyway.")
    for line in foreign:
        log.warning("FOREIGN MODEL measured (--allow-foreign-models): %s", line)
    return {"bentoml_home": str(bentoml_home), "tracking_uri": tracking_uri, "provenance": provenance,
            "foreign_models": foreign}


# =========================================================================== payloads


def phantom_pngs(modality: str, n: int = 8, seed: int = 11) -> list[bytes]:
    """PNG bytes of ``n`` phantom images of ``modality`` (fixed seed)."""
    import cv2

    from breastscan.data.phantoms import mammography_phantom, ultrasound_phantom

    rng = np.random.default_rng(seed)
    pathologies = ("benign", "malignant", "normal")
    out = []
    for i in range(n):
        if modality == "mammography":
            image = mammography_phantom(rng, density=1 + i % 4, pathology=pathologies[i % 3])[0]
        else:
            image = ultrasound_phantom(rng, pathology=pathologies[i % 3])[0]
        ok, buf = cv2.imencode(".png", image)
        if not ok:
            raise RuntimeError("PNG encoding failed")
        out.append(buf.tobytes())
    return out


# =========================================================================== in process


def run_inprocess(models: Sequence[str], settings: Settings) -> dict[str, Any]:
    """``ModelBundle.predict`` throughput of each stored model at each batch size (this process).

    Loads each model from the BentoML store (``$BENTOML_HOME``) exactly as the model
    service does (``breastscan-<name>:latest``), warms each batch size up (tracing), then
    times ``repeats`` runs of at least ``min_s`` each.
    """
    import bentoml
    import tensorflow as tf

    from breastscan.bundle import ModelBundle
    from breastscan.serving.store import LABEL_STAGE, LABEL_VERSION, store_name

    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    out: dict[str, Any] = {"tensorflow": tf.__version__, "gpus": gpus,
                           "tf_threads": {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                                          "inter_op": tf.config.threading.get_inter_op_parallelism_threads()},
                           "models": {}}
    rng = np.random.default_rng(0)
    paths: dict[str, Path] = {}
    for name in models:
        stored = bentoml.models.get(f"{store_name(name)}:latest")
        paths[name] = Path(stored.path)
        bundle = ModelBundle.load(stored.path, runtime="auto")  # what the service runs
        shape = tuple(bundle.contract.input_shape)
        labels = dict(stored.info.labels or {})
        by_size: dict[str, Any] = {}
        for bs in BATCH_SIZES:
            batch = rng.random((bs, *shape), dtype=np.float32)
            by_size[str(bs)] = timed_rates({"keras": partial(bundle.predict, batch)}, bs,
                                           settings.inprocess_repeats, settings.inprocess_min_s)["keras"]
            log.info("in process: %s batch %d: %.0f images/s (%.2f ms/call)", name, bs,
                     by_size[str(bs)]["images_per_s_median"], by_size[str(bs)]["call_ms_median"])
        best = max(by_size, key=lambda k: by_size[k]["images_per_s_median"])
        if name == settings.endpoint:
            out["request_path"] = request_path(name, bundle, settings)
            out["end_to_end"] = end_to_end(name, bundle, settings)
        out["models"][name] = {
            "tag": str(stored.tag), "path": str(stored.path), "registry_version": labels.get(LABEL_VERSION),
            "stage": labels.get(LABEL_STAGE), "input_shape": list(shape), "by_batch_size": by_size,
            "best": {"batch_size": int(best), "images_per_s_median": by_size[best]["images_per_s_median"]},
        }
    out["runtimes"] = runtime_comparison(paths, settings)
    return out


def timed_rates(calls: Mapping[str, Callable[[], Any]], images: int, repeats: int,
                min_s: float) -> dict[str, dict[str, Any]]:
    """Images/s of each callable, its timed loops run in alternation (A/B, in this process).

    Each callable is warmed up (3 calls: tracing, caches), then its calls per loop are set so
    that one loop lasts at least ``min_s``. Then ``repeats`` rounds each time one loop of
    every callable, in the given order in even rounds and reversed in odd ones (ABBA), so a
    drift of the machine's load over the run falls on all of them alike.

    Args:
        calls: ``{label: callable}``; each call processes ``images`` images.
        images: images per call (the batch size).
        repeats: timed loops per callable.
        min_s: least seconds of one loop.

    Returns:
        ``{label: {"images_per_s_median", "images_per_s_repeats", "call_ms_median",
        "calls_per_repeat"}}``.
    """
    per_loop: dict[str, int] = {}
    for label, call in calls.items():
        for _ in range(3):
            call()
        t0 = time.perf_counter()
        call()
        per_loop[label] = max(2, int(np.ceil(min_s / max(time.perf_counter() - t0, 1e-5))))
    seconds: dict[str, list[float]] = {label: [] for label in calls}
    labels = list(calls)
    for r in range(repeats):
        for label in labels if r % 2 == 0 else labels[::-1]:
            call, n = calls[label], per_loop[label]
            t0 = time.perf_counter()
            for _ in range(n):
                call()
            seconds[label].append(time.perf_counter() - t0)
    out = {}
    for label, spans in seconds.items():
        n = per_loop[label]
        rates = [n * images / s for s in spans]
        out[label] = {"images_per_s_median": round(statistics.median(rates), 1),
                      "images_per_s_repeats": [round(r, 1) for r in rates],
                      "call_ms_median": round(1000 * statistics.median(spans) / n, 3), "calls_per_repeat": n}
    return out


def tensorflow_threads() -> dict[str, int]:
    """TensorFlow's intra-op threads as configured (0: its default) and as they run.

    The setting is ``tf.config.threading``'s, else ``$TF_NUM_INTRAOP_THREADS`` (which
    TensorFlow reads itself); its default (0) is one thread per core this process may use.
    The count that runs is the one ONNX Runtime is given.
    """
    import tensorflow as tf

    configured = (tf.config.threading.get_intra_op_parallelism_threads()
                  or int(os.environ.get("TF_NUM_INTRAOP_THREADS") or 0))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"intra_op_configured": configured, "intra_op": configured or cores}


def runtime_comparison(bundles: Mapping[str, Path], settings: Settings,
                       batch_sizes: Sequence[int] = RUNTIME_BATCH_SIZES) -> dict[str, Any]:
    """Keras against ONNX Runtime on each bundle that carries a checked export, in this process.

    Each bundle is loaded twice, ``ModelBundle.load(dir, runtime="keras")`` and
    ``runtime="onnx"`` (the export given as many intra-op threads as TensorFlow has,
    :func:`tensorflow_threads`), and ``ModelBundle.predict`` of the same random batch is
    timed for both, interleaved (:func:`timed_rates`), at each of ``batch_sizes`` (must
    include 1). A bundle without a checked export (``model.onnx`` and ``export.json`` that
    passed) is listed under ``without_export``.

    Returns:
        ``{"threads", "onnxruntime", "providers", "tensorflow_devices", "batch_sizes",
        "models": {name: :func:`compare_runtimes`' block plus the export's facts},
        "without_export": {name: reason}}``.
    """
    import onnxruntime as ort
    import tensorflow as tf

    from breastscan.bundle import ModelBundle
    from breastscan.exported import ONNX_FILE, OnnxModel, providers, read_export

    threads = tensorflow_threads()
    out: dict[str, Any] = {
        "threads": {"tensorflow_intra_op": threads["intra_op_configured"],
                    "onnxruntime_intra_op": threads["intra_op"]},
        "onnxruntime": ort.__version__, "providers": providers(),
        "tensorflow_devices": [d.name for d in tf.config.list_logical_devices()],
        "batch_sizes": list(batch_sizes), "models": {}, "without_export": {}}
    for name, directory in bundles.items():
        info = read_export(directory)
        if info is None or not info.passed:
            out["without_export"][name] = ("no model.onnx + export.json" if info is None
                                           else "its export failed the equivalence check")
            log.info("runtimes: %s has no checked ONNX export (%s)", name, directory)
            continue
        keras_bundle = ModelBundle.load(directory, runtime="keras")
        onnx_bundle = ModelBundle.load(directory, runtime="onnx")
        onnx_bundle = dataclasses.replace(onnx_bundle, model=OnnxModel(Path(directory) / ONNX_FILE,
                                                                       threads=threads["intra_op"]))
        block = compare_runtimes(name, keras_bundle, onnx_bundle, settings, batch_sizes)
        export = {"opset": info.opset, "converter": info.converter, "tta": info.tta}
        out["models"][name] = {"path": str(directory), "export": export, **block}
    return out


def compare_runtimes(name: str, keras_bundle: Any, onnx_bundle: Any, settings: Settings,
                     batch_sizes: Sequence[int] = RUNTIME_BATCH_SIZES, seed: int = 0) -> dict[str, Any]:
    """``predict`` images/s of two loadings of one bundle at each batch size, interleaved.

    Returns:
        ``{"input_shape", "max_abs_difference"`` (largest difference of the two runtimes'
        outputs on the first batch of 8 or more; probabilities in [0, 1]),
        ``"by_batch_size": {"<bs>": {"keras": ..., "onnx": ..., "onnx_over_keras"}}``, and
        :func:`runtime_verdict`'s ``best``, ``ratios`` and ``targets``.
    """
    shape = tuple(keras_bundle.contract.input_shape)
    rng = np.random.default_rng(seed)
    by_size: dict[str, Any] = {}
    difference = None
    for bs in batch_sizes:
        batch = rng.random((bs, *shape), dtype=np.float32)
        if difference is None and (bs >= 8 or bs == batch_sizes[-1]):
            difference = _max_difference(keras_bundle.predict(batch), onnx_bundle.predict(batch))
        rates = timed_rates({"keras": partial(keras_bundle.predict, batch),
                             "onnx": partial(onnx_bundle.predict, batch)},
                            bs, settings.inprocess_repeats, settings.inprocess_min_s)
        ratio = rates["onnx"]["images_per_s_median"] / rates["keras"]["images_per_s_median"]
        by_size[str(bs)] = {**rates, "onnx_over_keras": round(ratio, 3)}
        log.info("runtimes: %s batch %d: keras %.0f, onnx %.0f images/s (onnx / keras %.2f)", name, bs,
                 rates["keras"]["images_per_s_median"], rates["onnx"]["images_per_s_median"], ratio)
    return {"input_shape": list(shape), "max_abs_difference": difference, "by_batch_size": by_size,
            **runtime_verdict(by_size)}


def _max_difference(a: Any, b: Any) -> float:
    """Largest absolute difference of two ``predict`` outputs (arrays, or dicts of them)."""
    if isinstance(a, dict):
        return max(_max_difference(a[k], b[k]) for k in a)
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def runtime_verdict(by_size: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Each runtime's best batch size, the ratios ONNX / Keras and their targets.

    Args:
        by_size: ``{"<bs>": {"keras": {"images_per_s_median"}, "onnx": {...}}}``, with ``"1"``.

    Returns:
        ``{"best": {runtime: {"batch_size", "images_per_s_median"}}, "ratios": {"batch_1",
        "best"}, "targets": {"onnx_over_keras_batch_1", "onnx_over_keras_best"}}``: ``batch_1``
        is ONNX over Keras at batch 1, ``best`` each runtime at its own best batch size; the
        targets (:data:`RUNTIME_TARGETS`) each with value, threshold and ``met``.
    """
    best = {}
    for runtime in ("keras", "onnx"):
        size = max(by_size, key=lambda k: by_size[k][runtime]["images_per_s_median"])
        best[runtime] = {"batch_size": int(size),
                         "images_per_s_median": by_size[size][runtime]["images_per_s_median"]}
    one = by_size["1"]
    ratios = {"batch_1": one["onnx"]["images_per_s_median"] / one["keras"]["images_per_s_median"],
              "best": best["onnx"]["images_per_s_median"] / best["keras"]["images_per_s_median"]}
    targets = {f"onnx_over_keras_{key}": _target(value, ">=", RUNTIME_TARGETS[key])
               for key, value in ratios.items()}
    return {"best": best, "ratios": {k: round(v, 3) for k, v in ratios.items()}, "targets": targets}


def request_path(name: str, bundle: Any, settings: Settings, n: int = 200) -> dict[str, Any]:
    """Median milliseconds of each step the service takes for one image of model ``name``, in process.

    ``decode`` (upload bytes to gray), ``prepare`` (preprocessing to the model batch),
    ``model`` (``bundle.predict`` of a batch of 1) and ``finish`` (answer at the image's
    size, its dict and JSON): the front worker's own work per request is decode + prepare +
    finish; what it spends beyond that is the serving framework (HTTP/gRPC, the call to the
    model service, metrics, logging).
    """
    from breastscan.serving.answer import ModelFacts, predictions, to_json
    from breastscan.serving.config import ServingConfig
    from breastscan.serving.engine import prepare_inputs
    from breastscan.serving.request import decode_upload

    images = phantom_pngs(MODEL_MODALITY.get(name, "mammography"))
    facts = ModelFacts(bundle.contract, bundle.spec.spec_id)
    max_bytes = ServingConfig().max_upload_bytes
    steps: dict[str, list[float]] = {"decode": [], "prepare": [], "model": [], "finish": []}
    n = n if not settings.quick else n // 4
    for i in range(n + 10):
        t0 = time.perf_counter()
        gray = decode_upload(images[i % len(images)], max_bytes=max_bytes)
        t1 = time.perf_counter()
        prepared = prepare_inputs(bundle.spec, bundle.contract, [gray])
        t2 = time.perf_counter()
        out = bundle.predict(prepared.batch)
        t3 = time.perf_counter()
        to_json(predictions(facts, prepared.grays, prepared.boxes, out)[0])
        t4 = time.perf_counter()
        if i >= 10:  # warm-up
            for key, a, b in (("decode", t0, t1), ("prepare", t1, t2), ("model", t2, t3), ("finish", t3, t4)):
                steps[key].append(1000 * (b - a))
    ms = {key: round(statistics.median(v), 3) for key, v in steps.items()}
    front = ms["decode"] + ms["prepare"] + ms["finish"]
    log.info("in process: %s request path %s ms (front work %.2f ms)", name, ms, front)
    return {"model": name, "median_ms": ms, "front_work_ms": round(front, 3),
            "one_at_a_time_rps": round(1000 / (front + ms["model"]), 1), "images": n}


def end_to_end(name: str, bundle: Any, settings: Settings) -> dict[str, Any]:
    """The honest ceiling of the served endpoint: files in, answers out, in this process.

    For each batch size, batches of PNG bytes go through exactly what the service does with
    a request -- decode and preprocess (:func:`~breastscan.serving.request.decode_upload`,
    :func:`~breastscan.serving.engine.prepare_inputs`) on a thread pool, one
    ``ModelBundle.predict`` of the batch, then each answer
    (:func:`~breastscan.serving.answer.predictions`) and its JSON bytes
    (:func:`~breastscan.serving.answer.to_json`) -- with the
    next batch decoded while the model runs the current one, as the server overlaps them.
    Nothing of HTTP, gRPC or the serving framework is in it. The pool has one thread per
    core or two, whichever is faster at the largest batch (OpenCV parallelises inside a
    call too, so the best split depends on the preprocessing).

    Returns:
        images/s (median of repeats) by batch size, the best, and ``headroom`` = best /
        batch 1: the most adaptive batching can gain on this machine.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    files = phantom_pngs(MODEL_MODALITY.get(name, "mammography"))
    probe = {threads: _e2e_rate(bundle, files, BATCH_SIZES[-1], threads, settings)
             for threads in (cores, 2 * cores)}
    threads = max(probe, key=lambda t: probe[t])
    by_size: dict[str, Any] = {}
    for bs in BATCH_SIZES:
        rates = [_e2e_rate(bundle, files, bs, threads, settings) for _ in range(settings.inprocess_repeats)]
        by_size[str(bs)] = {"images_per_s_median": round(statistics.median(rates), 1),
                            "images_per_s_repeats": [round(r, 1) for r in rates]}
        log.info("in process end to end: %s batch %d: %.0f images/s", name, bs, statistics.median(rates))
    best = max(by_size, key=lambda k: by_size[k]["images_per_s_median"])
    best_rate = by_size[best]["images_per_s_median"]
    return {"model": name, "threads": threads,
            "threads_probe_images_per_s": {str(k): round(v, 1) for k, v in probe.items()},
            "by_batch_size": by_size, "best": {"batch_size": int(best), "images_per_s_median": best_rate},
            "headroom": round(best_rate / by_size["1"]["images_per_s_median"], 3)}


def _e2e_rate(bundle: Any, files: list[bytes], bs: int, threads: int, settings: Settings) -> float:
    """Images/s of :func:`end_to_end`'s loop at batch size ``bs`` with ``threads`` decoding threads."""
    from concurrent.futures import ThreadPoolExecutor

    from breastscan.serving.answer import ModelFacts, predictions, to_json
    from breastscan.serving.batching import output_slice
    from breastscan.serving.config import ServingConfig
    from breastscan.serving.engine import prepare_inputs
    from breastscan.serving.request import decode_upload

    facts = ModelFacts(bundle.contract, bundle.spec.spec_id)
    max_bytes = ServingConfig().max_upload_bytes

    def prepare(data: bytes) -> Any:
        return prepare_inputs(bundle.spec, bundle.contract, [decode_upload(data, max_bytes=max_bytes)])

    def answer(prepared: list[Any]) -> list[bytes]:
        out = bundle.predict(np.concatenate([p.batch for p in prepared]))
        return [to_json(predictions(facts, p.grays, p.boxes, output_slice(out, i, i + 1))[0])
                for i, p in enumerate(prepared)]

    with ThreadPoolExecutor(threads) as workers, ThreadPoolExecutor(1) as ahead:
        def prepare_all(chunk: list[bytes]) -> list[Any]:
            return list(workers.map(prepare, chunk))

        def run(batches: int) -> float:
            chunks = [[files[(k * bs + i) % len(files)] for i in range(bs)] for k in range(batches)]
            t0 = time.perf_counter()
            pending = ahead.submit(prepare_all, chunks[0])
            for k in range(batches):
                prepared = pending.result()
                if k + 1 < batches:
                    pending = ahead.submit(prepare_all, chunks[k + 1])
                answer(prepared)
            return bs * batches / (time.perf_counter() - t0)

        run(2)  # warm-up
        batches = max(3, int(np.ceil(settings.inprocess_min_s * run(3) / bs)))
        return run(batches)


def inprocess_in_child(models: Sequence[str], settings: Settings, env: dict[str, str],
                       workdir: Path) -> dict[str, Any]:
    """Run :func:`run_inprocess` in a child process (TensorFlow stays out of this one)."""
    out = workdir / "inprocess.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--inprocess-worker", str(out),
           "--endpoint", settings.endpoint, "--models", ",".join(models)]
    if settings.quick:
        cmd.append("--quick")
    log.info("in-process measurement (child process): %s", ", ".join(models))
    done = subprocess.run(cmd, cwd=REPO, env=env, timeout=1800)
    if done.returncode or not out.is_file():
        raise click.ClickException(f"in-process measurement failed (exit {done.returncode})")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


# =========================================================================== processes


def machine_busy_seconds() -> float | None:
    """CPU seconds all cores of the machine have been busy (``/proc/stat``; ``None`` elsewhere)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def start_server(env: dict[str, str], config: Path, logdir: Path, label: str) -> LaunchedService:
    """Start the service with ``config`` (:func:`launch_service`), its log in ``logdir``.

    Returns:
        The running service; its ``cold_start()`` is the seconds from process start to
        /readyz 200 (``ready_s``) and to gRPC ``SERVING`` (``grpc_serving_s``), its
        ``workers`` the pids whose memory and CPU time the benchmark reads.

    Raises:
        click.ClickException: it exited or was not ready in time.
    """
    try:
        server = launch_service(env, logdir / f"serve-{label}.log", serving_config=config, cwd=REPO)
    except ServiceStartError as exc:
        raise click.ClickException(f"{label}: {exc}") from None
    log.info("%s: cold start %s, workers %s", label, server.cold_start(), ", ".join(server.workers))
    return server


# =========================================================================== load


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@dataclass
class Record:
    """One request: when it was sent (or scheduled), when it ended, and how."""

    start: float
    end: float
    error: str | None


Send = Callable[[int], Awaitable[str | None]]
"""Sends request number ``i``; the error's name, or ``None`` when it succeeded."""


def summarize(records: list[Record], t_from: float, t_to: float, windows: int) -> dict[str, Any]:
    """Throughput, latency percentiles and errors of the requests that ended in ``[t_from, t_to]``."""
    done = [r for r in records if t_from <= r.end <= t_to]
    ok = [r for r in done if r.error is None]
    span = t_to - t_from
    edges = [float(e) for e in np.linspace(t_from, t_to, windows + 1)]
    per_window = [sum(1 for r in ok if lo <= r.end < hi) / ((hi - lo) or 1.0)
                  for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    lat = np.array([1000 * (r.end - r.start) for r in ok]) if ok else np.array([np.nan])
    errors: dict[str, int] = {}
    for r in done:
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1
    return {
        "throughput_rps": round(statistics.median(per_window), 2),
        "throughput_rps_windows": [round(w, 2) for w in per_window],
        "throughput_rps_overall": round(len(ok) / span, 2),
        "requests_ok": len(ok), "errors": sum(errors.values()), "error_kinds": errors,
        "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 2),
                       "p95": round(float(np.percentile(lat, 95)), 2),
                       "p99": round(float(np.percentile(lat, 99)), 2),
                       "mean": round(float(np.mean(lat)), 2), "max": round(float(np.max(lat)), 2)},
    }


class LoadGenerator:
    """Closed- and open-loop load of one endpoint over HTTP and gRPC, from this process."""

    def __init__(self, server: Any, endpoint: str, settings: Settings, route: str | None = None) -> None:
        self.server = server
        self.endpoint = endpoint
        self.route = route or endpoint
        self.settings = settings
        from urllib3.filepost import encode_multipart_formdata

        self.images = phantom_pngs(MODEL_MODALITY.get(endpoint, "mammography"))
        self.bodies = [encode_multipart_formdata({"image": ("image.png", img, "image/png")})
                       for img in self.images]

    # ------------------------------------------------------------------ senders
    def _http_sender(self, session: Any) -> Send:
        import aiohttp

        url = f"{self.server.http_url}/{self.route}"

        async def send(i: int) -> str | None:
            body, content_type = self.bodies[i % len(self.bodies)]
            try:
                async with session.post(url, data=body, headers={"Content-Type": content_type}) as r:
                    await r.read()
                    return None if r.status == 200 else f"HTTP {r.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                return type(exc).__name__

        return send

    def _grpc_sender(self, stub: Any) -> Send:
        import grpc

        from breastscan.serving.proto.breastscan.v1 import breastscan_pb2 as pb

        requests = [pb.PredictRequest(model=self.endpoint, image=pb.Image(file=img)) for img in self.images]

        async def send(i: int) -> str | None:
            try:
                await stub.Predict(requests[i % len(requests)], timeout=120)
                return None
            except grpc.aio.AioRpcError as exc:
                return f"gRPC {exc.code().name}"

        return send

    async def _with_sender(self, protocol: str, concurrency: int,
                           body: Callable[[Send], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        if protocol == "http":
            import aiohttp

            connector = aiohttp.TCPConnector(limit=max(concurrency, 1), force_close=False)
            timeout = aiohttp.ClientTimeout(total=120)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                return await body(self._http_sender(session))
        import grpc

        from breastscan.serving.proto.breastscan.v1 import breastscan_pb2_grpc as pb_grpc

        async with grpc.aio.insecure_channel(self.server.grpc_target) as channel:
            return await body(self._grpc_sender(pb_grpc.BreastScanStub(channel)))

    # ------------------------------------------------------------------ measurement
    async def _observe(self, t_from: float, t_to: float, snapshots: dict[str, Any]) -> None:
        """Server /metrics and CPU times of every process at ``t_from`` and ``t_to``."""
        import aiohttp

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            for key, when in (("from", t_from), ("to", t_to)):
                await asyncio.sleep(max(0.0, when - time.perf_counter()))
                snapshots[key] = {"t": time.perf_counter(), "cpu": self.server.cpu_seconds(),
                                  "loadgen_cpu": time.process_time(), "machine": machine_busy_seconds()}
                try:
                    async with session.get(f"{self.server.http_url}/metrics") as r:
                        snapshots[key]["metrics"] = await r.text()
                except aiohttp.ClientError:
                    snapshots[key]["metrics"] = ""

    def _observed(self, snapshots: dict[str, Any]) -> dict[str, Any]:
        a, b = snapshots["from"], snapshots["to"]
        span = b["t"] - a["t"]
        cpu = {name: round(100 * (b["cpu"][name] - a["cpu"][name]) / span, 1)
               for name in a["cpu"] if a["cpu"][name] is not None and b["cpu"].get(name) is not None}
        cpu["loadgen"] = round(100 * (b["loadgen_cpu"] - a["loadgen_cpu"]) / span, 1)
        if a["machine"] is not None and b["machine"] is not None:
            cpu["machine"] = round(100 * (b["machine"] - a["machine"]) / span, 1)
            cpu["other"] = round(max(0.0, cpu["machine"] - sum(v for k, v in cpu.items()
                                                               if k not in ("machine", "other"))), 1)
        name = "breastscan_model_batch_size"
        calls = (_metric(b["metrics"], f"{name}_count", model=self.endpoint)
                 - _metric(a["metrics"], f"{name}_count", model=self.endpoint))
        images = (_metric(b["metrics"], f"{name}_sum", model=self.endpoint)
                  - _metric(a["metrics"], f"{name}_sum", model=self.endpoint))
        return {"cpu_percent": cpu, "model_calls": int(calls),
                "mean_batch_size": round(images / calls, 2) if calls else None}

    async def closed_loop(self, protocol: str, concurrency: int) -> dict[str, Any]:
        """``concurrency`` clients each sending the next request when the last is answered."""
        s = self.settings

        async def body(send: Send) -> dict[str, Any]:
            records: list[Record] = []
            counter = iter(range(10**12))
            t0 = time.perf_counter()
            t_from, t_to = t0 + s.warmup_s, t0 + s.warmup_s + s.duration_s
            snapshots: dict[str, Any] = {}

            async def client() -> None:
                while (start := time.perf_counter()) < t_to:
                    error = await send(next(counter))
                    records.append(Record(start, time.perf_counter(), error))

            await asyncio.gather(self._observe(t_from, t_to, snapshots),
                                 *(client() for _ in range(concurrency)))
            return self._per_request({"protocol": protocol, "mode": "closed", "concurrency": concurrency,
                                      **summarize(records, t_from, t_to, s.windows),
                                      **self._observed(snapshots)})

        return await self._with_sender(protocol, concurrency, body)

    @staticmethod
    def _per_request(point: dict[str, Any]) -> dict[str, Any]:
        """Add the CPU milliseconds each process spent per answered request."""
        rps = point["throughput_rps_overall"]
        point["cpu_ms_per_request"] = {k: round(10 * v / rps, 2) if rps else None
                                       for k, v in point["cpu_percent"].items()
                                       if k not in ("machine", "other")}
        return point

    async def open_loop(self, protocol: str, rate: float, max_in_flight: int = 256) -> dict[str, Any]:
        """Poisson arrivals at ``rate``/s; latency from each request's scheduled time."""
        s = self.settings

        async def body(send: Send) -> dict[str, Any]:
            records: list[Record] = []
            rng = random.Random(5)
            t0 = time.perf_counter()
            t_from, t_to = t0 + s.warmup_s, t0 + s.warmup_s + s.duration_s
            snapshots: dict[str, Any] = {}
            tasks: set[asyncio.Task[None]] = set()
            dropped = 0

            async def one(i: int, scheduled: float) -> None:
                error = await send(i)
                records.append(Record(scheduled, time.perf_counter(), error))

            async def arrivals() -> None:
                nonlocal dropped
                scheduled, i = t0, 0
                while scheduled < t_to:
                    await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
                    if len(tasks) >= max_in_flight:
                        dropped += 1
                    else:
                        task = asyncio.create_task(one(i, scheduled))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                    i += 1
                    scheduled += rng.expovariate(rate)
                while tasks:
                    await asyncio.gather(*list(tasks))

            await asyncio.gather(self._observe(t_from, t_to, snapshots), arrivals())
            return self._per_request({"protocol": protocol, "mode": "open", "rate_rps": round(rate, 2),
                                      "not_sent_over_in_flight_cap": dropped,
                                      **summarize(records, t_from, t_to, s.windows),
                                      **self._observed(snapshots)})

        return await self._with_sender(protocol, max_in_flight, body)


def measure_server(server: LaunchedService, settings: Settings, *, half_saturation: bool,
                   profile_to: Path | None = None) -> dict[str, Any]:
    """Every closed-loop point over HTTP and gRPC (and the open-loop point at half saturation).

    With ``profile_to``, py-spy samples the service's worker during one more HTTP run at
    concurrency 32, after the measured points (speedscope file there; its summary in
    ``out["profile"]``).
    """
    gen = LoadGenerator(server, settings.endpoint, settings)
    out: dict[str, Any] = {"http": [], "grpc": []}
    for protocol in ("http", "grpc"):
        asyncio.run(_warm(gen, protocol))
    # Concurrency ascending, both protocols at each: BentoML's adaptive batching learns from
    # the traffic it saw (after heavy load it waits longer for a batch, so a single request
    # then takes longer), so each protocol's point must follow the same history.
    for c in settings.concurrency:
        for protocol in ("http", "grpc"):
            point = asyncio.run(gen.closed_loop(protocol, c))
            out[protocol].append(point)
            log.info("%s c=%d: %.1f req/s, p50 %.1f ms, p99 %.1f ms, batch %s, errors %d, CPU %s",
                     protocol, c, point["throughput_rps"], point["latency_ms"]["p50"],
                     point["latency_ms"]["p99"], point["mean_batch_size"], point["errors"],
                     point["cpu_percent"])
    if profile_to is not None:  # a point of its own: the sampler's CPU must not bias a measured one
        worker = list(server.workers.values())[0]
        spy = start_profile(worker, settings.warmup_s + settings.duration_s, profile_to)
        profiled = asyncio.run(gen.closed_loop("http", REF_CONCURRENCY))
        if spy is not None and spy.wait(timeout=120) == 0:
            out["profile"] = {**profile_summary(profile_to),
                              "throughput_rps_while_sampled": profiled["throughput_rps"]}
    if half_saturation:
        out["open_loop_half_saturation"] = {}
        for protocol in ("http", "grpc"):
            saturation = max(p["throughput_rps"] for p in out[protocol])
            point = asyncio.run(gen.open_loop(protocol, saturation / 2))
            point["saturation_rps"] = saturation
            out["open_loop_half_saturation"][protocol] = point
            log.info("%s open loop at %.1f req/s: p50 %.1f ms, p99 %.1f ms, errors %d", protocol,
                     point["rate_rps"], point["latency_ms"]["p50"], point["latency_ms"]["p99"],
                     point["errors"])
    return out


async def _warm(gen: LoadGenerator, protocol: str) -> None:
    """A few requests at low concurrency before the first timed point (connections, caches)."""
    async def body(send: Send) -> dict[str, Any]:
        for i in range(8):
            error = await send(i)
            if error is not None:
                raise click.ClickException(f"{protocol} warm-up request failed: {error}")
        await asyncio.gather(*(send(i) for i in range(16)))
        return {}

    await gen._with_sender(protocol, 16, body)


# =========================================================================== profile


def start_profile(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    """py-spy sampling ``pid`` (every thread, 100 Hz) for ``seconds`` into a speedscope file.

    ``None`` when py-spy is not installed (``pip install py-spy``) or may not attach.
    """
    exe = BIN / "py-spy"
    if not exe.is_file():
        log.warning("py-spy is not installed: no profile")
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(exe), "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "100", "-f", "speedscope",
           "-o", str(out), "--nonblocking"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


_PLUMBING = ("_bootstrap", "Thread.", "_run_", "<module>", "Command.", "Context.invoke")


def profile_summary(path: Path, top: int = 20) -> dict[str, Any]:
    """Each sampled thread's busy seconds and the functions it spent them in (inclusive %).

    Frames are named ``function file`` (file relative to site-packages or the checkout).
    """
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]

    def name(i: int) -> str:
        f = frames[i]
        file = str(f.get("file", "")).split("site-packages/")[-1].replace(str(REPO) + "/", "")
        return f"{f['name']} {file}"

    threads = []
    for prof in data["profiles"]:
        busy = sum(prof["weights"])
        inclusive: dict[str, float] = {}
        for stack, w in zip(prof["samples"], prof["weights"], strict=True):
            for key in {name(i) for i in stack}:
                inclusive[key] = inclusive.get(key, 0.0) + w
        ranked = sorted(inclusive.items(), key=lambda kv: -kv[1])[:top * 2]
        threads.append({"thread": prof["name"], "busy_s": round(busy, 2),
                        "inclusive_percent": {k: round(100 * v / busy, 1) for k, v in ranked
                                              if not k.startswith(_PLUMBING)}})
    threads.sort(key=lambda t: -t["busy_s"])
    return {"file": str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path),
            "duration_s": round(max((p["endValue"] for p in data["profiles"]), default=0.0), 1),
            "threads": threads[:8]}


# =========================================================================== peers

PEER_RUNS = (("fastapi", 1), ("fastapi", 2), ("seeds", 1), ("bentoml", 1))
"""The plain servers the service is compared with: (kind, workers)."""


class PeerTarget:
    """A peer server as :class:`LoadGenerator` sees one: HTTP only, the CPU of its processes."""

    def __init__(self, peer: Any) -> None:
        self.peer = peer
        self.http_url = peer.url.rsplit("/", 1)[0]
        self.grpc_target = ""

    def cpu_seconds(self) -> dict[str, float | None]:
        """CPU seconds of the peer's processes (server and workers together)."""
        from breastscan.processes import cpu_seconds

        return {"peer": sum(cpu_seconds(pid) or 0.0 for pid in self.peer.pids())}


def measure_peers(bundle_dir: Path, settings: Settings, env: dict[str, str], workdir: Path,
                  reference: bytes) -> dict[str, Any]:
    """Each of :data:`PEER_RUNS` on the same bundle and load: closed-loop HTTP at c=1 and 32.

    Before its load, each peer's answer for the first payload image is compared with
    ``reference``, the service's (:func:`answer_differences`): ``answer_differences`` in its
    block lists what differs (empty: the same answer).
    """
    from peers.launch import running_peer

    from breastscan.processes import free_port, rss_mb

    image = phantom_pngs(MODEL_MODALITY.get(settings.endpoint, "mammography"))[0]
    out: dict[str, Any] = {}
    for kind, workers in PEER_RUNS:
        label = f"{kind}-{workers}w"
        t0 = time.perf_counter()
        with running_peer(kind, bundle_dir=bundle_dir, port=free_port(), workers=workers, env=env,
                          logdir=workdir) as peer:
            ready_s = round(time.perf_counter() - t0, 2)
            # the seeds peer runs Keras whatever the service runs: equal within the export check's bound
            differences = answer_differences(posted_answer(peer.url, image), reference,
                                             tolerance=KERAS_PEER_TOLERANCE if kind == "seeds" else 0.0)
            if differences:
                log.error("peer %s answers otherwise than the service: %s", label, "; ".join(differences))
            points = http_points(PeerTarget(peer), settings.endpoint, settings, (1, REF_CONCURRENCY),
                                 route="predict")
            rss = round(sum(rss_mb(pid) or 0.0 for pid in peer.pids()), 1)
        out[label] = {"kind": kind, "workers": workers, "ready_s": ready_s, "rss_mb_after_load": rss,
                      "answer_differences": differences, "http": points}
        log.info("peer %s: %s", label, ", ".join(f"c={p['concurrency']} {p['throughput_rps']:.1f} req/s"
                                                for p in points))
    return out


def http_points(target: Any, endpoint: str, settings: Settings, concurrencies: Sequence[int],
                route: str | None = None) -> list[dict[str, Any]]:
    """Closed-loop HTTP points of ``endpoint`` on a running server, after a warm-up.

    Args:
        target: the server as :class:`LoadGenerator` sees one (``http_url``, ``cpu_seconds()``).
        endpoint: the model whose payload images are posted.
        settings: warm-up, duration and windows of each point.
        concurrencies: the points, in this order.
        route: the path posted to (default ``/<endpoint>``).

    Returns:
        :meth:`LoadGenerator.closed_loop`'s point at each concurrency.
    """
    gen = LoadGenerator(target, endpoint, settings, route=route)
    asyncio.run(_warm(gen, "http"))
    return [asyncio.run(gen.closed_loop("http", c)) for c in concurrencies]


# =========================================================================== served runtimes


def _runtime_copy(config: Path, workdir: Path, runtime: str) -> Path:
    """A copy of the serving config ``config`` in ``workdir`` with ``runtime:`` set."""
    raw = yaml.safe_load(config.read_text()) or {}
    raw["runtime"] = runtime
    return _config_copy(raw, workdir / f"serving-runtime-{runtime}.yaml")


def served_runtimes(env: Mapping[str, str], config: Path, served: Mapping[str, Any], workdir: Path,
                    settings: Settings) -> dict[str, Any]:
    """The service run by each of :data:`SERVED_RUNTIMES`, one server after the other.

    Each server is started as the benchmark's others are (:func:`start_server`), with a
    copy of ``config`` whose ``runtime`` is set (:func:`_runtime_copy`) and without
    ``$BREASTSCAN_RUNTIME`` (which would override the copy), and measured by
    :func:`served_runtime` on the served ones of :data:`SERVED_RUNTIME_ENDPOINTS`.

    Args:
        env: the servers' environment.
        config: the serving config the copies are made of.
        served: that config settled (:func:`_config_dict`: ``models``, ``stage``).
        workdir: where the copies and the server logs go.
        settings: warm-up and duration of each load point.

    Returns:
        ``{"endpoints", "concurrency", "duration_s", "runtimes": {runtime: block}}``.
    """
    from breastscan.serving.config import RUNTIME_ENV

    t0 = time.perf_counter()
    if env.get(RUNTIME_ENV):
        log.info("served runtimes: %s=%s is not passed on (the config copy's runtime holds)", RUNTIME_ENV,
                 env[RUNTIME_ENV])
    plain = {k: v for k, v in env.items() if k != RUNTIME_ENV}
    endpoints = [e for e in SERVED_RUNTIME_ENDPOINTS if e in served["models"]]
    runtimes = {}
    for runtime in SERVED_RUNTIMES:
        copy = _runtime_copy(config, workdir, runtime)
        refusal = runtime_refusal(runtime, served["models"], served["stage"])
        runtimes[runtime] = (served_runtime(runtime, plain, copy, workdir, settings, endpoints)
                             if refusal is None else _refused(runtime, copy, refusal))
    return {"endpoints": endpoints, "concurrency": list(SERVED_RUNTIME_CONCURRENCY),
            "duration_s": round(time.perf_counter() - t0, 1), "runtimes": runtimes}


def runtime_refusal(runtime: str, models: Sequence[str], stage: str) -> str | None:
    """Why a worker would refuse to serve ``models`` on ``runtime``, or ``None``.

    The worker's own check (:func:`breastscan.exported.choose_runtime` on each model's newest
    stored copy at ``stage``, ``$BENTOML_HOME``), made here because a worker that raises
    is restarted by ``bentoml serve`` rather than ending it: the start would only fail at
    the harness's time limit.
    """
    from breastscan.exported import choose_runtime
    from breastscan.serving.store import newest_stored

    stored = newest_stored(stage)
    try:
        for name in models:
            if name in stored:  # else the worker's own error, when it starts
                choose_runtime(stored[name].path, runtime)
    except ValueError as exc:
        return f"ValueError: {exc}"
    return None


def _refused(runtime: str, config: Path, error: str) -> dict[str, Any]:
    """:func:`served_runtime`'s block of a server that did not start, with ``error``."""
    reason = start_error_reason(error)
    log.error("served runtimes: the %s server did not start: %s", runtime, reason)
    return {"runtime": runtime, "config": str(config), "error": error, "reason": reason}


def served_runtime(runtime: str, env: dict[str, str], config: Path, workdir: Path, settings: Settings,
                   endpoints: Sequence[str]) -> dict[str, Any]:
    """One server of :func:`served_runtimes`: started with ``config``, then measured.

    Returns:
        ``{"runtime", "config", "cold_start"`` (``ready_s``, ``grpc_serving_s``),
        ``"rss_mb_idle"`` (MiB per process and ``total``, right after ready),
        ``"models_runtime"`` (``{model: runtime}`` as ``/models`` says), ``"runs_as_asked"``
        (every model runs on ``runtime``), ``"http": {endpoint: [point at each of``
        :data:`SERVED_RUNTIME_CONCURRENCY` ``]}``, ``"rss_mb_after_load"}``; when the server
        did not start, ``{"runtime", "config", "error"`` (the message, with the log's tail),
        ``"reason"`` (its one line)``}``.
    """
    block: dict[str, Any] = {"runtime": runtime, "config": str(config)}
    try:
        server = start_server(env, config, workdir, f"runtime_{runtime}")
    except click.ClickException as exc:
        return _refused(runtime, config, exc.message)
    try:
        block.update(cold_start=server.cold_start(), rss_mb_idle=server.rss_mb())
        block["models_runtime"] = served_model_runtimes(server.http_url)
        block["runs_as_asked"] = all(r == runtime for r in block["models_runtime"].values())
        if not block["runs_as_asked"]:
            log.warning("served runtimes: %s asked, /models says %s", runtime, block["models_runtime"])
        block["http"] = {}
        for endpoint in endpoints:
            block["http"][endpoint] = http_points(server, endpoint, settings, SERVED_RUNTIME_CONCURRENCY)
            log.info("served runtimes: %s /%s: %s", runtime, endpoint, ", ".join(
                f"c={p['concurrency']} {p['throughput_rps']:.1f} req/s ({p['errors']} errors)"
                for p in block["http"][endpoint]))
        block["rss_mb_after_load"] = server.rss_mb()
    finally:
        server.stop(30)
    return block


def served_model_runtimes(http_url: str) -> dict[str, str | None]:
    """``{model: runtime}`` of every model the service at ``http_url`` serves (``POST /models``)."""
    from breastscan.serving.client import HTTPClient

    with HTTPClient(http_url, timeout=30) as client:
        return {info["name"]: info.get("runtime") for info in client.models()}


def start_error_reason(message: str) -> str:
    """The one line that says why a server did not start: the last ``...Error: ...`` line of
    :func:`start_server`'s message (the log's tail), else its first line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if "Error: " in line]
    return (errors[-1] if errors else lines[0] if lines else "")[:300]


def worker_rss(rss: Mapping[str, float | None] | None) -> float | None:
    """The largest RSS (MiB) of a server's worker processes, of :meth:`LaunchedService.rss_mb`'s
    dict (``arbiter`` and ``total`` left out); ``None`` when none is known."""
    values = [v for k, v in (rss or {}).items() if k not in ("arbiter", "total") and v is not None]
    return max(values) if values else None


REGISTRY_KEYS = ("version", "stage")
"""Answer keys a peer leaves null: it serves a bundle directory, not a registry version."""


def posted_answer(url: str, image: bytes) -> bytes:
    """The body of the answer to ``image`` posted to ``url`` as the multipart file ``image``.

    Raises:
        click.ClickException: the answer is not a 200.
    """
    import httpx
    from urllib3.filepost import encode_multipart_formdata

    body, content_type = encode_multipart_formdata({"image": ("image.png", image, "image/png")})
    response = httpx.post(url, content=body, headers={"Content-Type": content_type}, timeout=120)
    if response.status_code != 200:
        raise click.ClickException(f"POST {url}: HTTP {response.status_code}: {response.text[:500]}")
    return response.content


def answer_differences(peer: bytes, service: bytes, tolerance: float = 0.0) -> list[str]:
    """What differs between a peer's and the service's JSON answer for the same image.

    Every key, its place in the order and its value must be equal (numbers exactly, or within
    ``tolerance``), except :data:`REGISTRY_KEYS`; then the two bodies are the same bytes but
    for those values (with no tolerance).

    Returns:
        One line per differing key (values cut to 60 characters), or one for the key order
        (nested keys included); empty when the answers are the same.
    """
    a, b = json.loads(peer), json.loads(service)
    for key in REGISTRY_KEYS:
        a.pop(key, None)
        b.pop(key, None)
    missing = object()
    lines = [f"{key}: peer {repr(a.get(key, missing))[:60]}, service {repr(b.get(key, missing))[:60]}"
             for key in dict.fromkeys([*b, *a])
             if not _same(a.get(key, missing), b.get(key, missing), tolerance)]
    if not lines and list(_keys(a)) != list(_keys(b)):  # equal values, keys (nested too) in another order
        lines.append(f"key order: peer {json.dumps(a)[:200]}, service {json.dumps(b)[:200]}")
    return lines


def _same(a: Any, b: Any, tolerance: float) -> bool:
    """Equal JSON values, numbers within ``tolerance`` (booleans and text exactly)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same(a[k], b[k], tolerance) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y, tolerance) for x, y in zip(a, b, strict=True))
    if _number(a) and _number(b):
        return abs(float(a) - float(b)) <= tolerance
    return bool(a == b)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _keys(value: Any, prefix: str = "") -> Iterator[str]:
    """Every key path of a JSON value, in order."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield f"{prefix}{k}"
            yield from _keys(v, f"{prefix}{k}.")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _keys(v, f"{prefix}{i}.")


# =========================================================================== ratios and targets


def _point(points: list[dict[str, Any]], concurrency: int) -> dict[str, Any] | None:
    return next((p for p in points if p["concurrency"] == concurrency), None)


def _target(value: float | None, op: str, bound: float, text: str | None = None) -> dict[str, Any]:
    """A target's value, threshold and verdict; a value of ``None`` (not measured) is not met."""
    met = value is not None and (value >= bound if op == ">=" else value <= bound)
    return {"value": None if value is None else round(value, 3), "target": text or f"{op} {bound:g}",
            "met": bool(met)}


def ratios_and_targets(result: dict[str, Any], endpoint: str, max_latency_ms: float) -> tuple[dict, dict]:
    """The ratios at concurrency 32 and each target's value, threshold and verdict.

    * ``served_over_e2e_<protocol>``: served req/s over the in-process end-to-end ceiling
      (files in, answers out, best batch size) >= 0.8;
    * ``batching_capture_<protocol>``: (batching on / off) over the in-process headroom
      (end to end, best batch / batch 1) >= 0.8 -- the share of the possible gain captured;
    * ``over_peer_http``: HTTP req/s over the best plain FastAPI peer's >= 2;
    * ``grpc_at_least_http`` >= 1; ``p99_at_half_saturation_<protocol>`` <= 2 x p50 at c=1 +
      ``max_latency_ms``; ``cold_start_s`` (start to ready) <= 10;
    * in process, for each model with a checked ONNX export: ``onnx_over_keras_batch_1_<model>``
      >= 5 and ``onnx_over_keras_best_<model>`` >= 2 (:func:`runtime_verdict`).
    """
    e2e = result["in_process"]["end_to_end"]
    model_best = result["in_process"]["models"][endpoint]["best"]["images_per_s_median"]
    on, off = result["served"]["batching_on"], result["served"]["batching_off"]
    c = REF_CONCURRENCY
    ratios: dict[str, Any] = {"concurrency": c, "e2e_best_images_per_s": e2e["best"]["images_per_s_median"],
                              "e2e_headroom": e2e["headroom"]}
    targets: dict[str, Any] = {}

    def rps(block: dict[str, Any], protocol: str) -> float | None:
        p = _point(block.get(protocol, []), c)
        return p["throughput_rps"] if p else None

    for protocol in ("http", "grpc"):
        served = rps(on, protocol)
        if served is None:
            continue
        ratios[f"served_over_model_only_{protocol}"] = round(served / model_best, 3)
        limit = e2e["best"]["images_per_s_median"]
        targets[f"served_over_e2e_{protocol}"] = _target(served / limit, ">=", 0.8)
        off_rps = rps(off, protocol)
        if off_rps:
            ratios[f"batching_on_over_off_{protocol}"] = round(served / off_rps, 3)
            targets[f"batching_capture_{protocol}"] = _target(served / off_rps / e2e["headroom"], ">=", 0.8)
    peers = {label: rps(block, "http") for label, block in (result.get("peers") or {}).items()}
    fastapi = {k: v for k, v in peers.items() if k.startswith("fastapi") and v}
    http_rps, grpc_rps = rps(on, "http"), rps(on, "grpc")
    for label, value in peers.items():
        if value and http_rps:
            ratios[f"http_over_peer_{label}"] = round(http_rps / value, 3)
    if fastapi and http_rps:
        best_label = max(fastapi, key=lambda k: fastapi[k] or 0.0)
        targets["over_peer_http"] = _target(http_rps / fastapi[best_label], ">=", 2,
                                            f">= 2 (best plain FastAPI peer: {best_label})")
    if http_rps and grpc_rps:
        targets["grpc_at_least_http"] = _target(grpc_rps / http_rps, ">=", 1)
    for protocol, point in (on.get("open_loop_half_saturation") or {}).items():
        single = _point(on[protocol], 1)
        if single is None:
            continue
        bound = 2 * single["latency_ms"]["p50"] + max_latency_ms
        t = _target(point["latency_ms"]["p99"], "<=", bound, f"<= 2 x {single['latency_ms']['p50']} + "
                    f"{max_latency_ms:g} = {bound:.1f} ms")
        t["met"] = t["met"] and point["errors"] == 0
        targets[f"p99_at_half_saturation_{protocol}"] = t
    ready = on["cold_start"].get("ready_s")
    if ready is not None:
        targets["cold_start_s"] = _target(ready, "<=", 10)
    for name, info in ((result["in_process"].get("runtimes") or {}).get("models") or {}).items():
        targets.update({f"{key}_{name}": t for key, t in info["targets"].items()})
    if result.get("served_runtimes"):
        runtime_ratios, runtime_targets = served_runtime_ratios(result["served_runtimes"])
        ratios.update(runtime_ratios)
        targets.update(runtime_targets)
    return ratios, targets


def _runtime_rps(block: Mapping[str, Any], endpoint: str, concurrency: int) -> float | None:
    """HTTP req/s of one :func:`served_runtime` block at ``endpoint`` and ``concurrency``."""
    p = _point((block.get("http") or {}).get(endpoint, []), concurrency)
    return None if p is None else p["throughput_rps"]


def served_runtime_ratios(block: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each served runtime's figures (ratios rows) and the ONNX-run service's targets.

    Args:
        block: :func:`served_runtimes`' block.

    Returns:
        ``ratios``: per runtime ``served_<runtime>_cold_start_s``, ``_rss_mb_idle_worker``,
        ``_rss_mb_after_load_worker`` (the largest worker's MiB) and
        ``_http_c<c>_<endpoint>_rps``, or ``served_<runtime>_error`` (why it did not start);
        ``targets``: ``onnx_cold_start_s`` <= 5, ``onnx_rss_mb_idle`` <= 350 (per worker) and
        ``onnx_over_keras_http_c<c>_<endpoint>`` >= :data:`SERVED_ONNX_OVER_KERAS`, each
        with value (``None`` when not measured), threshold and ``met`` (false too when a
        server's models do not all run on the runtime asked).
    """
    runs = block["runtimes"]
    ratios: dict[str, Any] = {}
    for runtime, info in runs.items():
        if "error" in info:
            ratios[f"served_{runtime}_error"] = info["reason"]
            continue
        after = worker_rss(info.get("rss_mb_after_load"))
        ratios.update({f"served_{runtime}_cold_start_s": info["cold_start"]["ready_s"],
                       f"served_{runtime}_rss_mb_idle_worker": worker_rss(info["rss_mb_idle"]),
                       f"served_{runtime}_rss_mb_after_load_worker": after})
        ratios.update({f"served_{runtime}_http_c{c}_{e}_rps": _runtime_rps(info, e, c)
                       for e in block["endpoints"] for c in block["concurrency"]})
    onnx, keras = runs.get("onnx") or {}, runs.get("keras") or {}
    onnx_ok = "error" not in onnx and bool(onnx.get("runs_as_asked"))
    targets = {"onnx_cold_start_s": _target((onnx.get("cold_start") or {}).get("ready_s"), "<=",
                                            SERVED_ONNX_TARGETS["cold_start_s"]),
               "onnx_rss_mb_idle": _target(worker_rss(onnx.get("rss_mb_idle")), "<=",
                                           SERVED_ONNX_TARGETS["rss_mb_idle"],
                                           f"<= {SERVED_ONNX_TARGETS['rss_mb_idle']:g} MiB per worker")}
    both_ok = onnx_ok and bool(keras.get("runs_as_asked"))
    for e in block["endpoints"]:
        for c in block["concurrency"]:
            a, b = _runtime_rps(onnx, e, c), _runtime_rps(keras, e, c)
            t = _target(a / b if a is not None and b else None, ">=", SERVED_ONNX_OVER_KERAS.get(e, 1.0))
            targets[f"onnx_over_keras_http_c{c}_{e}"] = {**t, "met": t["met"] and both_ok}
    for key in ("onnx_cold_start_s", "onnx_rss_mb_idle"):
        targets[key]["met"] = targets[key]["met"] and onnx_ok
    return ratios, targets


# =========================================================================== report


def markdown(result: dict[str, Any]) -> str:
    """The human-readable report of a result."""
    m, s = result["machine"], result["settings"]
    endpoint = s["endpoint"]
    models = ", ".join(f"{k} {v['tag']} (registry v{v['registry_version']})"
                       for k, v in result["models"].items())
    lines = [
        "# Serving benchmark", "",
        f"{result['started_at']} -- commit `{(result['git']['commit'] or '?')[:12]}`"
        f"{' (dirty)' if result['git']['dirty'] else ''} -- {'quick' if s['quick'] else 'full'} run -- "
        f"{m['cpus_usable']} CPU cores ({m['cpu_model']}), GPU: {', '.join(m['gpus']) or 'none'} -- "
        f"load average at start {', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}", "",
        f"Models: {models}; "
        f"served endpoint under load: `{endpoint}`, one image per request. Medians throughout "
        f"(throughput: median of {s['windows']} sub-windows of {s['duration_s']:g} s; in process: "
        f"median of {s['inprocess_repeats']} repeats).", "",
        "## In process (`ModelBundle.predict`), images/s", "",
        "| model | " + " | ".join(f"bs {b}" for b in BATCH_SIZES) + " | best |",
        "|---|" + "---|" * (len(BATCH_SIZES) + 1),
    ]
    for name, info in result["in_process"]["models"].items():
        cells = [f"{info['by_batch_size'][str(b)]['images_per_s_median']:.0f}" for b in BATCH_SIZES]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {info['best']['images_per_s_median']:.0f} "
                     f"(bs {info['best']['batch_size']}) |")
    if (result["in_process"].get("runtimes") or {}).get("models"):
        lines += ["", *runtimes_markdown(result["in_process"]["runtimes"])]
    e2e = result["in_process"].get("end_to_end")
    if e2e:
        rates = [f"{e2e['by_batch_size'][str(b)]['images_per_s_median']:.0f}" for b in BATCH_SIZES]
        lines += ["", f"## In process, end to end (`{endpoint}`: PNG bytes in, answer JSON out), images/s",
                  "",
                  "| " + " | ".join(f"bs {b}" for b in BATCH_SIZES) + " | best | headroom (best / bs 1) |",
                  "|" + "---|" * (len(BATCH_SIZES) + 2),
                  "| " + " | ".join(rates) + f" | {e2e['best']['images_per_s_median']:.0f} "
                  f"(bs {e2e['best']['batch_size']}) | {e2e['headroom']} |"]
    path = result["in_process"].get("request_path")
    if path:
        lines += ["", f"In process, one `{endpoint}` request's steps (median ms): "
                  + ", ".join(f"{k} {v}" for k, v in path["median_ms"].items())
                  + f" -- the front's own work (decode + prepare + finish) {path['front_work_ms']} ms, "
                  f"one request at a time {path['one_at_a_time_rps']} req/s."]
    lines += ["", f"## Served `/{endpoint}` (closed loop) and the peers (same model, preprocessing, load)",
              "",
              "| server | protocol | concurrency | req/s | p50 ms | p95 ms | p99 ms | mean batch | errors "
              "| CPU % server / loadgen / other / machine | CPU ms/request server |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, block in result["served"].items():
        for protocol in ("http", "grpc"):
            for p in block.get(protocol, []):
                name = f"breastscan, {label.replace('_', ' ')}"
                lines.append(_served_row(name, protocol, str(p["concurrency"]), p))
    for label, block in (result.get("peers") or {}).items():
        for p in block["http"]:
            lines.append(_served_row(f"peer {label}", "http", str(p["concurrency"]), p))
    lines += ["", "## Open loop at half saturation (batching on)", "",
              "| protocol | rate req/s | req/s done | p50 ms | p95 ms | p99 ms | mean batch | errors "
              "| CPU % server / loadgen / other / machine | CPU ms/request server |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for protocol, p in (result["served"]["batching_on"].get("open_loop_half_saturation") or {}).items():
        lines.append(f"| {protocol} | {p['rate_rps']:.1f} | {p['throughput_rps_overall']:.1f} | "
                     f"{_latencies(p)} | {_tail(p)}")
    lines += ["", "## Cold start and memory", "",
              "| batching | /readyz 200 s | gRPC SERVING s | RSS MiB idle (after load) |",
              "|---|---|---|---|"]
    for label, block in result["served"].items():
        rss = ", ".join(f"{k} {v} ({block['rss_mb_after_load'].get(k)})"
                        for k, v in block["rss_mb_idle"].items())
        cold = block["cold_start"]
        lines.append(f"| {label} | {cold['ready_s']} | {cold['grpc_serving_s']} | {rss} |")
    if result.get("served_runtimes"):
        lines += ["", *served_runtimes_markdown(result["served_runtimes"])]
    lines += ["", f"## Ratios (concurrency {REF_CONCURRENCY}) and targets", ""]
    lines += [f"- {k}: {v}" for k, v in result["ratios"].items() if k != "concurrency"]
    lines += ["", "| target | value | threshold | met |", "|---|---|---|---|"]
    for name, t in result["targets"].items():
        lines.append(f"| {name} | {t['value']} | {t['target']} | {'yes' if t['met'] else '**no**'} |")
    prof = result["served"]["batching_on"].get("profile")
    if prof:
        lines += ["", f"## Profile (py-spy, HTTP at concurrency {REF_CONCURRENCY}, `{prof['file']}`)", ""]
        for t in prof["threads"][:4]:
            top = ", ".join(f"{k.split(' ')[0]} {v} %" for k, v in list(t["inclusive_percent"].items())[:8])
            lines.append(f"- {t['thread']}: busy {t['busy_s']} s of {prof['duration_s']} s -- {top}")
    lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def runtimes_markdown(block: dict[str, Any]) -> list[str]:
    """The table of :func:`runtime_comparison`'s block: images/s of each runtime and the ratio
    at each batch size, then each model's targets."""
    sizes = [str(b) for b in block["batch_sizes"]]
    threads = block["threads"]
    lines = ["## In process, Keras vs ONNX Runtime (`ModelBundle.predict`), images/s", "",
             f"Interleaved in one process (A/B, medians of the repeats); ONNX Runtime "
             f"{block['onnxruntime']} ({', '.join(block['providers'])}) with "
             f"{threads['onnxruntime_intra_op']} intra-op threads, TensorFlow's intra-op setting "
             f"{threads['tensorflow_intra_op']} (0: one per core).", "",
             "| model | runtime | " + " | ".join(f"bs {b}" for b in sizes) + " | best |",
             "|---|---|" + "---|" * (len(sizes) + 1)]
    for name, info in block["models"].items():
        by = info["by_batch_size"]
        for runtime in ("keras", "onnx"):
            best = info["best"][runtime]
            lines.append(f"| {name} | {runtime} | " + " | ".join(
                f"{by[b][runtime]['images_per_s_median']:.0f}" for b in sizes)
                + f" | {best['images_per_s_median']:.0f} (bs {best['batch_size']}) |")
        ratios = " | ".join(f"{by[b]['onnx_over_keras']:.2f}" for b in sizes)
        lines.append(f"| {name} | onnx / keras | {ratios} | {info['ratios']['best']:.2f} (best / best) |")
    lines += ["", "| model | target | value | threshold | met | max abs difference |",
              "|---|---|---|---|---|---|"]
    for name, info in block["models"].items():
        for key, t in info["targets"].items():
            met = "yes" if t["met"] else "**no**"
            lines.append(f"| {name} | {key} | {t['value']} | {t['target']} | {met} "
                         f"| {info['max_abs_difference']:.2g} |")
    if block.get("without_export"):
        lines += ["", "Without a checked export: " + "; ".join(f"{k} ({v})"
                                                             for k, v in block["without_export"].items())]
    return lines


def served_runtimes_markdown(block: Mapping[str, Any]) -> list[str]:
    """The table of :func:`served_runtimes`' block: one row per runtime (cold start, RSS of the
    largest worker and of the whole server, HTTP req/s of each endpoint and concurrency)."""
    points = [(e, c) for e in block["endpoints"] for c in block["concurrency"]]
    lines = ["## Served, Keras vs ONNX Runtime (`runtime:` of the serving config), HTTP closed loop", "",
             "| runtime | /models says | /readyz 200 s | RSS MiB idle per worker (server) "
             "| RSS MiB after load per worker (server) | "
             + " | ".join(f"{e} c={c} req/s" for e, c in points) + " |",
             "|---|---|---|---|---|" + "---|" * len(points)]
    for runtime, info in block["runtimes"].items():
        if "error" in info:
            lines.append(f"| {runtime} | did not start: {info['reason']} |" + " - |" * (3 + len(points)))
            continue
        says = ", ".join(f"{name} {r}" for name, r in info["models_runtime"].items())
        rates = " | ".join(_rate(_runtime_rps(info, e, c)) for e, c in points)
        lines.append(f"| {runtime} | {says} | {info['cold_start']['ready_s']} | {_rss(info['rss_mb_idle'])} "
                     f"| {_rss(info.get('rss_mb_after_load'))} | {rates} |")
    return lines


def _rate(rps: float | None) -> str:
    return "-" if rps is None else f"{rps:.1f}"


def _rss(rss: Mapping[str, float | None] | None) -> str:
    worker = worker_rss(rss)
    return "-" if worker is None else f"{worker:.0f} ({(rss or {}).get('total')})"


_NOT_SERVER = ("loadgen", "machine", "other")


def served_runtime_rows(block: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """:func:`summary`'s rows of :func:`served_runtimes`' block: each runtime's cold start and
    idle RSS per worker, then each endpoint's HTTP req/s at each concurrency, Keras / ONNX."""
    if not block:
        return []
    runs = block["runtimes"]
    names = " / ".join(runs)

    def each(value: Callable[[Mapping[str, Any]], str]) -> str:
        return " / ".join("-" if "error" in info else value(info) for info in runs.values())

    rows = [(f"served, runtime {runtime}", f"did not start: {info['reason']}")
            for runtime, info in runs.items() if "error" in info]
    rows += [(f"served, runtime {names}: cold start / RSS idle per worker",
             each(lambda i: f"{i['cold_start']['ready_s']} s") + ", "
             + each(lambda i: f"{worker_rss(i['rss_mb_idle'])} MiB"))]
    for e in block["endpoints"]:
        for c in block["concurrency"]:
            rows.append((f"`/{e}` served, HTTP at c={c}, runtime {names}",
                         each(partial(_endpoint_rate, endpoint=e, concurrency=c)) + " req/s"))
    return rows


def _endpoint_rate(info: Mapping[str, Any], endpoint: str, concurrency: int) -> str:
    return _rate(_runtime_rps(info, endpoint, concurrency))


def summary(result: dict[str, Any]) -> str:
    """The README's tables: the headline figures and the targets of a result."""
    on, off = result["served"]["batching_on"], result["served"]["batching_off"]
    e2e = result["in_process"]["end_to_end"]
    endpoint = result["settings"]["endpoint"]

    def rps(block: dict[str, Any], protocol: str, c: int) -> str:
        p = _point(block.get(protocol, []), c)
        return "-" if p is None else f"{p['throughput_rps']:.1f}"

    def p50(block: dict[str, Any], protocol: str, c: int) -> str:
        p = _point(block.get(protocol, []), c)
        return "-" if p is None else f"{p['latency_ms']['p50']:.1f}"

    c = REF_CONCURRENCY
    half = on.get("open_loop_half_saturation") or {}
    rows = [
        ("in process, end to end (PNG in, answer out): batch 1 / best",
         f"{e2e['by_batch_size']['1']['images_per_s_median']:.0f} / {e2e['best']['images_per_s_median']:.0f} "
         f"(bs {e2e['best']['batch_size']}) images/s, headroom {e2e['headroom']}"),
        (f"`/{endpoint}` at c=1: HTTP / gRPC", f"{rps(on, 'http', 1)} / {rps(on, 'grpc', 1)} req/s, p50 "
         f"{p50(on, 'http', 1)} / {p50(on, 'grpc', 1)} ms"),
        (f"`/{endpoint}` at c={c}, batching on: HTTP / gRPC",
         f"{rps(on, 'http', c)} / {rps(on, 'grpc', c)} req/s"),
        (f"`/{endpoint}` at c={c}, batching off: HTTP / gRPC",
         f"{rps(off, 'http', c)} / {rps(off, 'grpc', c)} req/s"),
    ]
    rows[1:1] = [(f"in process, `{name}` model call, ONNX Runtime / Keras: batch 1 / best",
                  f"{info['ratios']['batch_1']} / {info['ratios']['best']} (best batch: ONNX "
                  f"{info['best']['onnx']['batch_size']}, Keras {info['best']['keras']['batch_size']})")
                 for name, info in ((result["in_process"].get("runtimes") or {}).get("models") or {}).items()]
    for label, block in (result.get("peers") or {}).items():
        rows.append((f"peer {label}, HTTP at c=1 / c={c}",
                     f"{rps(block, 'http', 1)} / {rps(block, 'http', c)} req/s"))
    rows += served_runtime_rows(result.get("served_runtimes"))
    if half:
        rows.append(("open loop at half saturation: p99 HTTP / gRPC", " / ".join(
            f"{half[p]['latency_ms']['p99']:.0f}" for p in ("http", "grpc") if p in half) + " ms"))
    rows.append(("cold start (to `/readyz` 200) / memory idle", f"{on['cold_start']['ready_s']} s / "
                 f"{on['rss_mb_idle'].get('total')} MiB "
                 f"(after load {on['rss_mb_after_load'].get('total')} MiB)"))
    lines = ["| | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
             "| target | value | threshold | met |", "|---|---|---|---|"]
    lines += [f"| `{n}` | {t['value']} | {t['target']} | {'yes' if t['met'] else '**no**'} |"
              for n, t in result["targets"].items()]
    return "\n".join(lines) + "\n"


def _cpu(p: dict[str, Any]) -> str:
    cpu = p["cpu_percent"]
    server = sum(v for k, v in cpu.items() if k not in _NOT_SERVER)
    nan = float("nan")
    return (f"{server:.0f} / {cpu.get('loadgen', 0):.0f} / {cpu.get('other', nan):.0f} "
            f"/ {cpu.get('machine', nan):.0f}")


def _cpu_per_request(p: dict[str, Any]) -> str:
    per = p.get("cpu_ms_per_request") or {}
    return f"{sum(v or 0 for k, v in per.items() if k not in _NOT_SERVER):.1f}"


def _served_row(label: str, protocol: str, c: str, p: dict[str, Any]) -> str:
    return (f"| {label} | {protocol} | {c} | {p['throughput_rps']:.1f} | "
            f"{_latencies(p)} | {_tail(p)}")


def _tail(p: dict[str, Any]) -> str:
    return f"{p['mean_batch_size']} | {p['errors']} | {_cpu(p)} | {_cpu_per_request(p)} |"


def _latencies(p: dict[str, Any]) -> str:
    lat = p["latency_ms"]
    return f"{lat['p50']:.1f} | {lat['p95']:.1f} | {lat['p99']:.1f}"


# =========================================================================== main


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _config_dict(path: Path) -> dict[str, Any]:
    """A serving config with its served models settled as the service settles them (``models:
    auto``: what the benchmark's BentoML store, ``$BENTOML_HOME``, holds at the stage)."""
    from breastscan.serving.config import load_serving_config, with_models
    from breastscan.serving.store import stored_models

    cfg = load_serving_config(path)
    if not cfg.models:
        cfg = with_models(cfg, stored_models(cfg.stage))
    settled = dataclasses.asdict(cfg)
    settled["file"] = str(path)
    return settled


def _batching_off_copy(config: Path, workdir: Path) -> Path:
    raw = yaml.safe_load(config.read_text()) or {}
    batching = dict(raw.get("batching") or {})
    batching["enabled"] = False
    batching["per_model"] = {name: {**dict(v or {}), "enabled": False}
                             for name, v in (batching.get("per_model") or {}).items()}
    raw["batching"] = batching
    return _config_copy(raw, workdir / "serving-batching-off.yaml")


def _config_copy(raw: Mapping[str, Any], out: Path) -> Path:
    """Write the serving config ``raw`` (as read from YAML, changed) to ``out``; ``out``."""
    out.write_text(yaml.safe_dump(dict(raw), sort_keys=False))
    return out


def _env(bentoml_home: Path, tracking_uri: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"BENTOML_HOME": str(bentoml_home), "MLFLOW_TRACKING_URI": tracking_uri,
                "BENTOML_DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
                "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1",
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})
    return env


def _csv_ints(_: Any, __: Any, value: str | None) -> tuple[int, ...] | None:
    if not value:
        return None
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter("comma-separated integers, e.g. 1,8,32,64") from None


def runtimes_only(bundle_dirs: Sequence[Path], settings: Settings, output: Path | None) -> dict[str, Any]:
    """``--runtimes-of``: :func:`runtime_comparison` of bundle directories (named by their
    folder) in this process; prints its table, writes the JSON block to ``output`` if given."""
    block = runtime_comparison({d.name: d for d in bundle_dirs}, settings)
    block.update(machine=machine_facts(), git=git_facts(), settings=dataclasses.asdict(settings))
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(block, indent=2, default=_json_default) + "\n")
        log.info("wrote %s", output)
    click.echo("\n".join(runtimes_markdown(block)))
    return block


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quick", is_flag=True, help="short smoke run (~4 min): concurrency 1,8,32, 3 s points")
@click.option("--bentoml-home", type=click.Path(path_type=Path), default=lambda: str(default_bentoml_home()),
              show_default=f"$BENTOML_HOME or {BENTOML_HOME_DIR}/ of this checkout",
              help="the BentoML home (model store) the server loads from")
@click.option("--tracking-uri", default=lambda: os.environ.get("MLFLOW_TRACKING_URI")
              or f"sqlite:///{REPO / 'mlflow.db'}",
              show_default="$MLFLOW_TRACKING_URI or the project's mlflow.db",
              help="the MLflow registry `breastscan import-models` copies the production models from")
@click.option("--import/--no-import", "do_import", default=True, show_default=True,
              help="run `breastscan import-models` first (the registry's production models)")
@click.option("--allow-foreign-models", is_flag=True,
              help="measure served models that are not the registry's version at the stage (warned), "
                   "instead of stopping")
@click.option("--runtimes-of", "runtimes_of", multiple=True, metavar="DIR",
              type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="only compare Keras and ONNX Runtime on this bundle directory (repeatable), in this "
                   "process; print the table (JSON to --output only when it is given)")
@click.option("--serving-config", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              default=REPO / "services" / "serving.yaml", show_default=True,
              help="serving config of the batching-on server (the batching-off one is a copy of it)")
@click.option("--endpoint", default="tumor", show_default=True, help="model endpoint under load")
@click.option("--concurrency", callback=_csv_ints, default=None, help="e.g. 1,8,32,64 [default: 1,8,32,64]")
@click.option("--duration", type=float, default=None, help="measured seconds per load point [15; quick 3]")
@click.option("--output", type=click.Path(path_type=Path, dir_okay=False),
              default=REPO / "reports" / "serving_benchmark.json", show_default=True)
@click.option("--markdown-output", type=click.Path(path_type=Path, dir_okay=False),
              default=REPO / "reports" / "serving_benchmark.md", show_default=True)
@click.option("--peers/--no-peers", "peers_on", default=True, show_default=True,
              help="also measure the plain FastAPI / naive / minimal BentoML peers on the same model")
@click.option("--served-runtimes/--no-served-runtimes", "served_runtimes_on", default=True, show_default=True,
              help="also serve the models with runtime keras and with runtime onnx (one server each): cold "
                   "start, memory and HTTP req/s of /density and /tumor at concurrency 1 and 32")
@click.option("--profile-dir", type=click.Path(path_type=Path, file_okay=False),
              default=REPO / "reports" / "profiles", show_default=True,
              help="where the py-spy profile of the service under load goes")
@click.option("--summary-of", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="print the README's tables of a report (e.g. reports/serving_benchmark.json) and exit")
@click.option("--models", default=None, hidden=True)
@click.option("--inprocess-worker", type=click.Path(path_type=Path), default=None, hidden=True)
def main(quick: bool, bentoml_home: Path, tracking_uri: str, do_import: bool, allow_foreign_models: bool,
         runtimes_of: tuple[Path, ...], serving_config: Path, endpoint: str,
         concurrency: tuple[int, ...] | None, duration: float | None, output: Path, markdown_output: Path,
         peers_on: bool, served_runtimes_on: bool, profile_dir: Path, summary_of: Path | None,
         models: str | None, inprocess_worker: Path | None) -> None:
    """Benchmark the service: in-process limits, served HTTP/gRPC with and without batching, peers,
    the service run by Keras and by ONNX Runtime."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if summary_of is not None:
        click.echo(summary(json.loads(summary_of.read_text())))
        return
    settings = Settings.make(quick, endpoint, concurrency, duration)
    if inprocess_worker is not None:  # the child process of inprocess_in_child
        names = (models or endpoint).split(",")
        inprocess_worker.write_text(json.dumps(run_inprocess(names, settings), indent=2))
        return
    if runtimes_of:
        explicit = click.get_current_context().get_parameter_source("output") != ParameterSource.DEFAULT
        runtimes_only(runtimes_of, settings, output if explicit else None)
        return
    started = dt.datetime.now(dt.timezone.utc)
    t_start = time.perf_counter()
    bentoml_home = bentoml_home.expanduser().resolve()
    os.environ["BENTOML_HOME"] = str(bentoml_home)  # before bentoml is imported in this process
    log.info("BentoML home: %s", bentoml_home)
    serving_config = serving_config.resolve()
    env = _env(bentoml_home, tracking_uri)
    if do_import:
        cmd = [str(BIN / "breastscan"), "import-models", "--serving-config", str(serving_config)]
        log.info("importing the production models: %s", " ".join(cmd))
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
        if done.returncode:
            raise click.ClickException(f"import-models failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
        log.info("imported: %s", done.stdout.strip().replace("\n", "; "))
    cfg_on = _config_dict(serving_config)
    if endpoint not in cfg_on["models"]:
        raise click.BadParameter(f"{endpoint!r} is not served (models: {', '.join(cfg_on['models'])})")
    stores = checked_store(cfg_on["models"], cfg_on["stage"], bentoml_home, tracking_uri,
                           allow_foreign_models)
    workdir = Path(tempfile.mkdtemp(prefix="breastscan-bench-"))
    log.info("work directory (server logs): %s", workdir)
    off_config = _batching_off_copy(serving_config, workdir)
    result: dict[str, Any] = {
        "benchmark": "breastscan serving", "started_at": started.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "git": git_facts(),
        "machine": machine_facts(), "settings": dataclasses.asdict(settings),
        "stores": stores, "config": {"batching_on": cfg_on, "batching_off": _config_dict(off_config)},
    }
    result["in_process"] = inprocess_in_child(cfg_on["models"], settings, env, workdir)
    result["machine"]["gpus"] = result["in_process"]["gpus"]
    result["models"] = {name: {k: v for k, v in info.items() if k in ("tag", "registry_version", "stage",
                                                                      "input_shape")}
                        for name, info in result["in_process"]["models"].items()}
    result["served"] = {}
    reference = b""  # the service's answer for one image, which every peer's must equal
    for label, config in (("batching_on", serving_config), ("batching_off", off_config)):
        server = start_server(env, config, workdir, label)
        try:
            block: dict[str, Any] = {"cold_start": server.cold_start(), "rss_mb_idle": server.rss_mb()}
            on = label == "batching_on"
            if on:
                image = phantom_pngs(MODEL_MODALITY.get(endpoint, "mammography"))[0]
                reference = posted_answer(f"{server.http_url}/{endpoint}", image)
            profile = profile_dir / "serving_http_c32.speedscope.json" if on else None
            block.update(measure_server(server, settings, half_saturation=settings.half_saturation and on,
                                        profile_to=profile))
            block["rss_mb_after_load"] = server.rss_mb()
        finally:
            server.stop(30)
        result["served"][label] = block
    if served_runtimes_on:
        result["served_runtimes"] = served_runtimes(env, serving_config, cfg_on, workdir, settings)
    if peers_on:
        result["peers"] = measure_peers(Path(result["in_process"]["models"][endpoint]["path"]), settings, env,
                                        workdir, reference)
    max_latency = float(cfg_on["batching"]["max_latency_ms"])
    result["ratios"], result["targets"] = ratios_and_targets(result, endpoint, max_latency)
    cores = result["machine"]["cpus_usable"]
    result["notes"] = [
        SHARED_CORES_NOTE.format(cores=cores),
        "CPU % over the measured window (100 % = one core fully busy); 'server' is every process of the "
        "server (bentoml serve and its worker; a peer's uvicorn/bentoml processes), 'machine' all cores "
        f"together (at most {cores * 100} %), 'other' what processes outside the benchmark used meanwhile",
        "p99 at half saturation: open-loop Poisson arrivals at half the best closed-loop throughput, "
        f"latency from the scheduled send time; bound 2 x p50 at concurrency 1 + max_latency_ms "
        f"({max_latency:g})",
        "points run in order of concurrency, HTTP then gRPC at each",
        "the limit is the in-process end-to-end throughput (PNG bytes in, answer JSON out: decode and "
        "preprocess on one thread per core, overlapped with the batched model call) at its best batch size; "
        "served_over_model_only compares with the model call alone, which leaves decoding and "
        "preprocessing out",
        "peers: the same bundle, preprocessing and answer behind a plain FastAPI + uvicorn app calling "
        "ModelBundle.predict per request (1 and 2 workers), the same with Keras Model.predict per request "
        "('seeds'), and a one-service BentoML app without batching; HTTP only, same load generator; each "
        "peer's JSON answer for one image was compared with the service's before its load (equal but for "
        "the registry version and stage, which a peer does not know: 'answer_differences' empty)",
        f"machine load average at start {result['machine']['load_average_at_start']}, at end "
        f"{list(os.getloadavg())}: other work on the machine adds noise",
    ]
    if served_runtimes_on:
        result["notes"].insert(-1, SERVED_RUNTIMES_NOTE)
    if stores["foreign_models"]:
        result["notes"].insert(0, "FOREIGN MODELS measured (--allow-foreign-models), not the registry's "
                                  "version at the stage: " + "; ".join(stores["foreign_models"]))
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    result["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    result["duration_s"] = round(time.perf_counter() - t_start, 1)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    table = markdown(result)
    markdown_output.parent.mkdir(parents=True, exist_ok=True)
    markdown_output.write_text(table)
    click.echo(table)
    log.info("wrote %s and %s in %.0f s", output, markdown_output, result["duration_s"])
    unlike = [label for label, block in (result.get("peers") or {}).items() if block["answer_differences"]]
    if unlike:
        raise click.ClickException(f"peers {', '.join(unlike)} answer otherwise than the service (see "
                                   f"answer_differences in {output}): the comparison is not like for like")


if __name__ == "__main__":
    main()
