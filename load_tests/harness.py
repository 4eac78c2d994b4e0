"""Start the real service on loopback: ``bentoml serve services.service:BreastScan``.

A harness, not part of the served package: the one way the project starts a served
BreastScan outside production. The service tests (``tests/services/conftest.py``, which
import it as ``load_tests.harness``) and the serving benchmark (``load_tests/bench_serving.py``,
run as a script beside it, which imports it as ``harness``) both call :func:`launch_service`.
It starts ``bentoml serve`` on 127.0.0.1 (HTTP and gRPC) with the environment and serving
config it is given, in a process group of its own, waits until ``/readyz`` answers 200 and
the gRPC health check says ``SERVING``, and returns a :class:`LaunchedService`: its
addresses, log, cold-start times, the pids of its worker processes (their memory and CPU
time), and :meth:`LaunchedService.stop`, which ends the whole group
(:func:`breastscan.processes.stop_process_group`).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from breastscan.processes import cpu_seconds, descendants, free_port, rss_mb, stop_process_group
from breastscan.serving.config import CONFIG_ENV, GRPC_HOST_ENV, GRPC_PORT_ENV

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
"""The checkout holding ``services/`` (the directory ``bentoml serve`` runs in)."""
SERVICE_TARGET = "services.service:BreastScan"
HOST = "127.0.0.1"
START_TIMEOUT_S = 300.0
POLL_S = 0.1


class ServiceStartError(RuntimeError):
    """The service exited, or was not ready in time; the message ends with its log's tail."""


@dataclass
class LaunchedService:
    """A running ``bentoml serve`` and what is known about it.

    Attributes:
        process: ``bentoml serve`` itself (the arbiter; its pid is the group id).
        http_url: e.g. ``http://127.0.0.1:41234``.
        grpc_target: e.g. ``127.0.0.1:41235``.
        log_path: the file its stdout and stderr go to.
        env: the environment it runs in.
        started: ``time.perf_counter()`` when the process was started.
        ready_s: seconds from start to the first ``/readyz`` 200, once seen.
        grpc_serving_s: seconds from start to the first gRPC ``SERVING``, once seen.
        workers: ``{"<service>#<worker id>": pid}`` of the worker processes (e.g.
            ``breastscan#1``, ``breastscan-models#1``), found once the service is ready.
    """

    process: subprocess.Popen[bytes]
    http_url: str
    grpc_target: str
    log_path: Path
    env: dict[str, str]
    started: float
    ready_s: float | None = None
    grpc_serving_s: float | None = None
    workers: dict[str, int] = field(default_factory=dict)

    def log_text(self) -> str:
        """Everything the service has logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 6000) -> str:
        """The last ``chars`` characters of the log (for error messages)."""
        return self.log_text()[-chars:]

    def cold_start(self) -> dict[str, float | None]:
        """``{"ready_s", "grpc_serving_s"}``: seconds from start to ready, rounded to 0.01."""
        return {"ready_s": _round(self.ready_s), "grpc_serving_s": _round(self.grpc_serving_s)}

    def find_workers(self) -> dict[str, int]:
        """Name the worker processes by their ``--service-name`` and ``--worker-id`` arguments."""
        self.workers = {}
        for pid, argv in descendants(self.process.pid):
            service = _arg(argv, "--service-name")
            if service:
                self.workers[f"{service}#{_arg(argv, '--worker-id') or '?'}"] = pid
        return self.workers

    def pids(self) -> dict[str, int]:
        """Every process of the service: ``bentoml serve`` itself as ``arbiter``, then the workers."""
        return {"arbiter": self.process.pid, **self.workers}

    def rss_mb(self) -> dict[str, float | None]:
        """Resident memory of each process in MiB, and their ``total``."""
        out = {name: rss_mb(pid) for name, pid in self.pids().items()}
        out["total"] = round(sum(v for v in out.values() if v), 1)
        return out

    def cpu_seconds(self) -> dict[str, float | None]:
        """CPU time (user + system) each process has used so far."""
        return {name: cpu_seconds(pid) for name, pid in self.pids().items()}

    def running(self) -> bool:
        """True while ``bentoml serve`` has not exited."""
        return self.process.poll() is None

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``grace_s`` seconds."""
        stop_process_group(self.process, grace_s)


def _arg(argv: list[str], flag: str) -> str | None:
    i = argv.index(flag) if flag in argv else -1
    return argv[i + 1] if 0 <= i < len(argv) - 1 else None


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 2)


def serve_command(http_port: int, target: str = SERVICE_TARGET,
                  python: str | Path | None = None) -> list[str]:
    """The ``bentoml serve`` command line of a Python environment, on 127.0.0.1.

    Args:
        http_port: the HTTP port.
        target: what to serve: the service (default) or a built Bento's tag.
        python: the environment's interpreter (default: this one, ``sys.executable``).

    Returns:
        The argv: the ``bentoml`` script next to the interpreter when there is one, else
        ``python -m bentoml``.
    """
    python = str(python or sys.executable)
    script = Path(python).parent / "bentoml"
    head = [str(script)] if script.is_file() else [python, "-m", "bentoml"]
    return [*head, "serve", target, "--host", HOST, "--port", str(http_port)]


def launch_service(
    env: Mapping[str, str],
    log_path: Path,
    *,
    http_port: int | None = None,
    grpc_port: int | None = None,
    serving_config: Path | None = None,
    target: str = SERVICE_TARGET,
    cwd: Path = PROJECT_ROOT,
    timeout_s: float = START_TIMEOUT_S,
    python: str | Path | None = None,
) -> LaunchedService:
    """Start ``bentoml serve`` on 127.0.0.1 and wait until HTTP and gRPC both serve.

    Args:
        env: the environment of the service (``BENTOML_HOME``, ``MLFLOW_TRACKING_URI`` ...);
            the gRPC address and the serving config are added to it.
        log_path: file for the service's stdout and stderr (overwritten).
        http_port: HTTP port (default: a free one).
        grpc_port: gRPC port (default: a free one).
        serving_config: serving config file (default: the one ``env`` names, else
            ``services/serving.yaml``).
        target: what to serve: the service (default) or a built Bento's tag.
        cwd: the directory it runs in (the checkout holding ``services/``).
        timeout_s: how long to wait for ``/readyz`` 200 and gRPC ``SERVING``.
        python: the interpreter of the environment to serve from (default: this one; e.g.
            a fresh venv holding only a Bento's declared requirements).

    Returns:
        The running service, its workers found and its cold start recorded.

    Raises:
        ServiceStartError: it exited or was not ready in time (it is stopped first).
    """
    http_port, grpc_port = http_port or free_port(HOST), grpc_port or free_port(HOST)
    full_env = {**env, GRPC_HOST_ENV: HOST, GRPC_PORT_ENV: str(grpc_port)}
    if serving_config is not None:
        full_env[CONFIG_ENV] = str(serving_config)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as handle:
        started = time.perf_counter()
        process = subprocess.Popen(serve_command(http_port, target, python), cwd=cwd, env=full_env,
                                   stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    service = LaunchedService(process, f"http://{HOST}:{http_port}", f"{HOST}:{grpc_port}", log_path,
                              full_env, started)
    log.info("started %s (pid %d, HTTP %s, gRPC %s, log %s)", target, process.pid, service.http_url,
             service.grpc_target, log_path)
    try:
        wait_until_serving(service, timeout_s)
    except BaseException:
        service.stop()
        raise
    service.find_workers()
    log.info("%s ready in %.1f s (gRPC SERVING %.1f s), workers %s", target, service.ready_s,
             service.grpc_serving_s, ", ".join(service.workers) or "none found")
    return service


def wait_until_serving(service: LaunchedService, timeout_s: float = START_TIMEOUT_S) -> None:
    """Poll ``/readyz`` and the gRPC health check until both answer, recording when each did.

    Args:
        service: a just-started service (``ready_s`` / ``grpc_serving_s`` are set here).
        timeout_s: seconds from the service's start to give up.

    Raises:
        ServiceStartError: the process exited, or the time ran out.
    """
    import grpc
    from grpc_health.v1 import health_pb2_grpc

    # gRPC backs off reconnecting (1 s, growing 1.6x) while nothing listens yet, which would
    # record the port opening seconds late: poll it as often as /readyz.
    backoff = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
               ("grpc.max_reconnect_backoff_ms", 200)]
    channel = grpc.insecure_channel(service.grpc_target, options=backoff)
    health = health_pb2_grpc.HealthStub(channel)
    try:
        while True:
            if service.ready_s is None and _http_ready(service.http_url):
                service.ready_s = time.perf_counter() - service.started
            if service.grpc_serving_s is None and _grpc_serving(health):
                service.grpc_serving_s = time.perf_counter() - service.started
            if service.ready_s is not None and service.grpc_serving_s is not None:
                return
            if not service.running():
                raise ServiceStartError(f"bentoml serve exited {service.process.returncode} (log "
                                        f"{service.log_path}):\n{service.log_tail()}")
            if time.perf_counter() - service.started > timeout_s:
                raise ServiceStartError(f"service not ready in {timeout_s:g} s (log {service.log_path}):\n"
                                        f"{service.log_tail()}")
            time.sleep(POLL_S)
    finally:
        channel.close()


def _http_ready(http_url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{http_url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _grpc_serving(health: Any) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2

    try:
        answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
    except grpc.RpcError:
        return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)
