"""A real ``mlflow server`` on loopback for tests that talk to MLflow over HTTP.

Usage::

    from tests.mlflow_server import mlflow_server

    with mlflow_server(tmp_path) as uri:      # "http://127.0.0.1:<free port>"
        ...

The server runs the installed MLflow (``python -m mlflow server``) with a SQLite backend
(``<workdir>/mlflow.db``), or the database ``backend_store_uri`` names (PostgreSQL: see
tests/postgres.py), and proxied artifacts (``--serve-artifacts --artifacts-destination
<workdir>/artifacts``, so clients see ``mlflow-artifacts:/`` URIs and never touch the files
directly), one worker, telemetry off. Its output goes to ``<workdir>/server.log``, which
is quoted in the error when the server does not come up. On exit the whole process group
(uvicorn and its worker) is terminated, then killed if it lingers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from breastscan.processes import free_port, stop_process_group

__all__ = ["free_port", "mlflow_server", "wait_healthy"]


def wait_healthy(uri: str, proc: subprocess.Popen[bytes], timeout: float, log_file: Path) -> None:
    """Poll ``<uri>/health`` until it answers 200; raise with the server log otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{_tail(log_file)}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.3)
    raise TimeoutError(f"mlflow server at {uri} not healthy after {timeout:.0f} s:\n{_tail(log_file)}")


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no server log)"


def _stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    stop_process_group(proc, grace)


@contextmanager
def mlflow_server(workdir: Path, *, host: str = "127.0.0.1", timeout: float = 120.0,
                  backend_store_uri: str | None = None) -> Iterator[str]:
    """Run ``mlflow server`` for the duration of the block and yield its URI.

    Args:
        workdir: directory for the SQLite database, the artifacts and ``server.log``.
        host: interface to bind (loopback only).
        timeout: seconds to wait for ``/health``.
        backend_store_uri: the tracking and registry store (default ``sqlite:///<workdir>/mlflow.db``),
            e.g. ``postgresql+psycopg2://...`` (needs ``psycopg2``).

    Yields:
        ``http://<host>:<port>``.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port(host)
    uri = f"http://{host}:{port}"
    log_file = workdir / "server.log"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--host", host, "--port", str(port), "--workers", "1",
        "--backend-store-uri", backend_store_uri or f"sqlite:///{(workdir / 'mlflow.db').resolve()}",
        "--serve-artifacts", "--artifacts-destination", str((workdir / "artifacts").resolve()),
    ]
    with open(log_file, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_healthy(uri, proc, timeout, log_file)
        yield uri
    finally:
        _stop(proc)
