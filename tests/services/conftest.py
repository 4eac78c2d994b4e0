"""A real service on loopback: tiny models registered in MLflow, imported, ``bentoml serve``d.

The path is the production one: ``tests.services.make_registry`` registers seeded tiny
density / tumor / lesion / mammo_lesion models at ``production`` in a throwaway MLflow store,
``breastscan import-models`` copies them into a throwaway BentoML store, and
``bentoml serve services.service:BreastScan`` starts the front and model services with
the gRPC server, on free ports of 127.0.0.1 (:func:`load_tests.harness.launch_service`,
the benchmark's starter too). One server serves the whole session.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from breastscan.processes import free_port
from breastscan.serving.answer import to_dict
from breastscan.serving.engine import Engine
from breastscan.serving.request import Request
from load_tests.harness import SERVICE_TARGET, LaunchedService, launch_service

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 240

MONITORING_WINDOW = 40
"""The session service's ``monitoring.window`` (tests/services/test_service_monitoring.py)."""
MONITORING_INTERVAL_S = 1.0
"""... and its ``interval_s``: the drift gauges follow the store within seconds."""
MONITORING_MIN_RECORDS = 30


@dataclass
class Served:
    """A running service (:class:`load_tests.harness.LaunchedService`) and its project root."""

    launched: LaunchedService
    root: Path

    @property
    def http_url(self) -> str:
        """e.g. ``http://127.0.0.1:41234``."""
        return self.launched.http_url

    @property
    def grpc_target(self) -> str:
        """e.g. ``127.0.0.1:41235``."""
        return self.launched.grpc_target

    @property
    def env(self) -> dict[str, str]:
        """The service's environment (the gRPC port included)."""
        return self.launched.env

    @property
    def log(self) -> Path:
        """The file the service logs to."""
        return self.launched.log_path

    @property
    def process(self) -> subprocess.Popen[bytes]:
        """``bentoml serve`` itself."""
        return self.launched.process

    def log_text(self) -> str:
        """Everything the service has logged so far."""
        return self.launched.log_text()

    def log_lines(self, needle: str, timeout_s: float = 10.0) -> list[str]:
        """The log lines containing ``needle``, waiting up to ``timeout_s`` for the first.

        The server logs a request after it has sent the answer, so a client can read the
        log before the line is there.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            lines = [line for line in self.log_text().splitlines() if needle in line]
            if lines or time.monotonic() > deadline:
                return lines
            time.sleep(0.1)

    def server_errors(self) -> str:
        """The log around the first 5xx answer (empty when there was none), for failure messages."""
        text = self.log_text()
        hit = re.search(r"status=5\d\d", text)
        return text[max(hit.start() - 6000, 0):hit.start() + 2000] if hit else ""


def service_env(root: Path, **extra: str) -> dict[str, str]:
    """The environment of every process of the served project under ``root``."""
    env = dict(os.environ)
    # MLflow 3 exports set_tracking_uri / set_registry_uri into the environment: a value an
    # earlier test left there must not point these processes at another store.
    env.pop("MLFLOW_REGISTRY_URI", None)
    env.update({
        "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db",
        "BENTOML_HOME": str(root / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONUNBUFFERED": "1",
        "BREASTSCAN_MONITORING_STORE": str(root / "monitoring" / "requests.sqlite"),
    })
    env.update(extra)
    return env


def _run(cmd: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                           f"{done.stderr[-5000:]}")


def start_service(root: Path, env: dict[str, str], *, http_port: int, grpc_port: int,
                  log_name: str = "serve.log", target: str = SERVICE_TARGET) -> Served:
    """Start ``bentoml serve`` (:func:`launch_service`) and wait until /readyz is 200 and gRPC SERVING.

    Raises:
        load_tests.harness.ServiceStartError: it exited or was not ready in time
            (a ``RuntimeError``; the message ends with the log's tail).
    """
    launched = launch_service(env, root / log_name, http_port=http_port, grpc_port=grpc_port,
                              target=target, cwd=REPO, timeout_s=START_TIMEOUT_S)
    return Served(launched, root)


def serving_config(root: Path, name: str, changes: dict[str, Any]) -> Path:
    """``services/serving.yaml`` with top-level keys replaced, written as ``serving-<name>.yaml``."""
    config = yaml.safe_load((REPO / "services" / "serving.yaml").read_text())
    config.update(changes)
    path = root / f"serving-{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def monitoring_section(store: Path) -> dict[str, Any]:
    """The session service's drift monitoring: a short window scored every second, and room
    for every request of the session (the store is never trimmed under a test)."""
    thresholds = {"psi": 0.2, "ks_alpha": 0.01, "chi2_alpha": 0.01, "min_drifted": 2,
                  "min_records": MONITORING_MIN_RECORDS}
    return {"enabled": True, "store": str(store), "max_records": 1_000_000, "window": MONITORING_WINDOW,
            "interval_s": MONITORING_INTERVAL_S, "queue_size": 1024, "thresholds": thresholds}


def own_bentoml_home(root: Path, name: str) -> Path:
    """A BentoML home of its own for another server, sharing the session's model store.

    ``bentoml serve`` empties ``$BENTOML_HOME/prometheus_multiproc_dir`` when it starts, so a
    second server on the same home wipes the first one's metrics (its /metrics loses every
    gauge and counter written so far).
    """
    home = root / f"bentoml-{name}"
    home.mkdir(exist_ok=True)
    if not (home / "models").exists():
        (home / "models").symlink_to(root / "bentoml" / "models", target_is_directory=True)
    return home


@contextlib.contextmanager
def variant_service(served_project: tuple[Path, dict[str, str]], name: str, changes: dict[str, Any],
                    env: dict[str, str] | None = None) -> Iterator[Served]:
    """Another service over the session's models, with ``services/serving.yaml`` changed.

    Args:
        served_project: the ``served_project`` fixture's value.
        name: names its config (``serving-<name>.yaml``) and log (``serve-<name>.log``).
        changes: top-level config keys replaced (e.g. ``{"batching": {...}}``).
        env: the service's environment (default: the project's).
    """
    root, project_env = served_project
    path = serving_config(root, name, changes)
    server_env = {**(env or project_env), "BREASTSCAN_SERVING_CONFIG": str(path),
                  "BENTOML_HOME": str(own_bentoml_home(root, name))}
    served = start_service(root, server_env, http_port=free_port(), grpc_port=free_port(),
                           log_name=f"serve-{name}.log")
    try:
        yield served
    finally:
        stop_service(served)


def worker_processes(served: Served) -> list[psutil.Process]:
    """The server's live worker processes (a killed one is a zombie until the arbiter reaps it)."""
    out = []
    for child in psutil.Process(served.process.pid).children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "_bentoml_impl.worker" in " ".join(child.cmdline()):
                out.append(child)
        except psutil.Error:  # gone meanwhile
            continue
    return out


def stop_service(served: Served) -> None:
    """SIGTERM the server's process group, then SIGKILL what is left after 20 s."""
    served.launched.stop(20)


@pytest.fixture(scope="session")
def served_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """Tiny models at ``production`` in MLflow, imported into a BentoML store."""
    root = tmp_path_factory.mktemp("served")
    env = service_env(root)
    _run([sys.executable, "-m", "tests.services.make_registry", str(root)], env)
    from tests.services.make_registry import MODELS

    # named: `models: auto` would import only the models params.yaml declares
    _run([str(BIN / "breastscan"), "import-models", *MODELS], env)
    return root, env


@pytest.fixture(scope="session")
def service(served_project: tuple[Path, dict[str, str]]) -> Iterator[Served]:
    """The service on free loopback ports, for the whole session (drift monitoring with a
    short window, :func:`monitoring_section`, into ``$BREASTSCAN_MONITORING_STORE``)."""
    root, env = served_project
    store = Path(env["BREASTSCAN_MONITORING_STORE"])
    config = serving_config(root, "main", {"monitoring": monitoring_section(store)})
    served = start_service(root, {**env, "BREASTSCAN_SERVING_CONFIG": str(config)},
                           http_port=free_port(), grpc_port=free_port())
    try:
        yield served
    finally:
        stop_service(served)


@pytest.fixture(scope="session")
def reference(served_project: tuple[Path, dict[str, str]]) -> Iterator[Engine]:
    """An in-process engine over the same registered models (loaded from the registry)."""
    root, env = served_project
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    mp.setenv("MLFLOW_REGISTRY_URI", env["MLFLOW_TRACKING_URI"])
    try:
        import mlflow

        from breastscan.registry.resolver import load_bundle
        from breastscan.serving.engine import local_engine
        from tests.services.make_registry import MODELS

        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(env["MLFLOW_TRACKING_URI"])
        names = tuple(MODELS)  # every model served
        # the runtime the service picks (`runtime: auto`), so its answers compare with ``==``
        bundles = {n: load_bundle(f"breastscan-{n}@production", runtime="auto") for n in names}
        engine = local_engine(bundles, versions={n: "1" for n in names},
                              stages={n: "production" for n in names})
        yield engine
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
        mlflow.set_registry_uri(None)  # type: ignore[arg-type]
        mp.undo()


def run_async(coro: Any) -> Any:
    """Run a coroutine to completion from a test."""
    return asyncio.run(coro)


def local_answer(engine: Engine, request: Request) -> Any:
    """The HTTP JSON (as Python values) of an in-process engine's answer to ``request``:
    what the service sends for it, to compare with ``==``."""
    return to_dict(run_async(engine.answer(request)))
