"""A real service on loopback: tiny models registered in MLflow, imported, ``bentoml serve``d.

The path is the production one: ``tests.services.make_registry`` registers seeded tiny
density / tumor / lesion models at ``production`` in a throwaway MLflow store,
``breastscan import-models`` copies them into a throwaway BentoML store, and
``bentoml serve services.service:BreastScan`` starts the front and model services with
the gRPC server, on free ports of 127.0.0.1. One server serves the whole session.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from breastscan.processes import free_port, stop_process_group

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 240


@dataclass
class Served:
    """A running service and where its models came from."""

    http_url: str
    grpc_target: str
    root: Path
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

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
    })
    env.update(extra)
    return env


def _run(cmd: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                           f"{done.stderr[-5000:]}")


def start_service(root: Path, env: dict[str, str], *, http_port: int, grpc_port: int,
                  log_name: str = "serve.log", target: str = "services.service:BreastScan") -> Served:
    """Start ``bentoml serve`` and wait until /readyz answers 200 and gRPC is SERVING."""
    env = {**env, "BREASTSCAN_GRPC_PORT": str(grpc_port)}
    log = root / log_name
    handle = log.open("wb")
    process = subprocess.Popen(
        [str(BIN / "bentoml"), "serve", target, "--host", "127.0.0.1", "--port", str(http_port)],
        cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    served = Served(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", root, env, log, process)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"bentoml serve exited {process.returncode}:\n{served.log_text()[-6000:]}")
        try:
            if httpx.get(f"{served.http_url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        stop_service(served)
        raise RuntimeError(f"service not ready in {START_TIMEOUT_S} s:\n{served.log_text()[-6000:]}")
    _wait_grpc_serving(served, deadline)
    return served


def _wait_grpc_serving(served: Served, deadline: float) -> None:
    from breastscan.serving.client import GRPCClient

    with GRPCClient(served.grpc_target, timeout=5) as client:
        while time.monotonic() < deadline:
            try:
                if client.health() == "SERVING":
                    return
            except Exception:  # noqa: BLE001 -- not listening yet
                pass
            time.sleep(0.5)
    raise RuntimeError(f"gRPC not SERVING:\n{served.log_text()[-6000:]}")


def stop_service(served: Served) -> None:
    """SIGTERM the server's process group, then SIGKILL what is left after 20 s."""
    stop_process_group(served.process, 20)


@pytest.fixture(scope="session")
def served_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """Tiny models at ``production`` in MLflow, imported into a BentoML store."""
    root = tmp_path_factory.mktemp("served")
    env = service_env(root)
    _run([sys.executable, "-m", "tests.services.make_registry", str(root)], env)
    _run([str(BIN / "breastscan"), "import-models"], env)
    return root, env


@pytest.fixture(scope="session")
def service(served_project: tuple[Path, dict[str, str]]) -> Iterator[Served]:
    """The service on free loopback ports, for the whole session."""
    root, env = served_project
    served = start_service(root, env, http_port=free_port(), grpc_port=free_port())
    try:
        yield served
    finally:
        stop_service(served)


@pytest.fixture(scope="session")
def reference(served_project: tuple[Path, dict[str, str]]) -> Any:
    """An in-process engine over the same registered models (loaded from the registry)."""
    root, env = served_project
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    mp.setenv("MLFLOW_REGISTRY_URI", env["MLFLOW_TRACKING_URI"])
    try:
        import mlflow

        from breastscan.registry.versions import load_bundle
        from breastscan.serving.engine import local_engine

        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(env["MLFLOW_TRACKING_URI"])
        names = ("density", "tumor", "lesion")
        bundles = {n: load_bundle(f"breastscan-{n}", "production") for n in names}
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
