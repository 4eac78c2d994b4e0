"""Start a benchmark peer on loopback the way it is run for real, and stop it again.

:func:`start_peer` starts one of :data:`PEER_KINDS` on 127.0.0.1 from the repository root,
in a process group of its own (``start_new_session=True``), its stdout and stderr in
``<logdir>/peer-<kind>-<workers>.log``:

* ``fastapi`` / ``seeds``: ``python -m uvicorn load_tests.peers.<kind>_app:app --workers N``
  (uvicorn picks uvloop and httptools);
* ``bentoml``: ``bentoml serve load_tests.peers.bentoml_app:PeerService``, its worker count
  passed in ``$PEER_WORKERS`` (BentoML takes it from the service decorator only).

It waits until the health URL (``/healthz``; BentoML's ``/readyz``) answers 200 **and**
every worker has loaded and warmed up its model: each worker calls :func:`mark_ready`,
which leaves a file named by its pid in ``$PEER_READY_DIR`` (a health answer only says
that one worker is ready). :meth:`Peer.pids` lists its processes for CPU accounting and
:meth:`Peer.stop` ends the group; :func:`running_peer` does both around a ``with`` block.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from breastscan.processes import descendants

log = logging.getLogger(__name__)

PEER_KINDS = ("fastapi", "seeds", "bentoml")
"""What :func:`start_peer` can start: the FastAPI baseline, the naive FastAPI, minimal BentoML."""
PROJECT_ROOT = Path(__file__).resolve().parents[2]
"""The checkout the peers run in (``load_tests`` and ``breastscan`` import from it)."""
HOST = "127.0.0.1"
BUNDLE_ENV = "PEER_BUNDLE"
"""The environment variable naming the model bundle directory a peer serves."""
WORKERS_ENV = "PEER_WORKERS"
"""The environment variable giving the BentoML peer its worker count."""
READY_DIR_ENV = "PEER_READY_DIR"
"""The environment variable naming the directory where each ready worker leaves its pid."""
STOP_GRACE_S = 10.0
POLL_S = 0.2
_HEALTH_PATHS = {"fastapi": "/healthz", "seeds": "/healthz", "bentoml": "/readyz"}


def mark_ready() -> None:
    """Say this worker has loaded and warmed up its model (called by the peer apps).

    Creates ``$PEER_READY_DIR/<pid>`` when ``$PEER_READY_DIR`` is set; does nothing otherwise.
    """
    ready_dir = os.environ.get(READY_DIR_ENV)
    if ready_dir:
        (Path(ready_dir) / str(os.getpid())).touch()


@dataclass
class Peer:
    """A running peer server.

    Attributes:
        kind: one of :data:`PEER_KINDS`.
        workers: its number of worker processes.
        url: its predict endpoint, e.g. ``http://127.0.0.1:41234/predict``.
        process: the server process (uvicorn, or ``bentoml serve``); its pid is the group id.
        log: the file its stdout and stderr go to.
    """

    kind: str
    workers: int
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def pids(self) -> list[int]:
        """The server process and all its live descendants (its workers), for CPU accounting."""
        return [self.process.pid, *(pid for pid, _ in descendants(self.process.pid))]

    def running(self) -> bool:
        """True while the server process has not exited."""
        return self.process.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        """The last ``chars`` characters of its log (for error messages)."""
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self) -> None:
        """SIGTERM the process group, wait up to 10 s for all its processes, then SIGKILL what is left.

        Waits for the workers too, not only the server: a process that outlives its parent
        (e.g. multiprocessing's resource tracker, which ignores SIGTERM) is gone on return.
        """
        import psutil

        others = []
        for pid in self.pids()[1:]:
            with suppress(psutil.Error):
                others.append(psutil.Process(pid))
        deadline = time.monotonic() + STOP_GRACE_S
        _signal_group(self.process, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            self.process.wait(STOP_GRACE_S)
        _, alive = psutil.wait_procs(others, timeout=max(0.0, deadline - time.monotonic()))
        if self.process.poll() is None or alive:
            log.warning("peer %s x%d: SIGKILL after %g s", self.kind, self.workers, STOP_GRACE_S)
            _signal_group(self.process, signal.SIGKILL)
            for proc in alive:
                with suppress(psutil.Error):
                    proc.kill()
            self.process.wait(STOP_GRACE_S)
            psutil.wait_procs(alive, timeout=STOP_GRACE_S)
        log.info("stopped peer %s x%d (pid %d, exit %s)", self.kind, self.workers, self.process.pid,
                 self.process.returncode)


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Send ``sig`` to ``process``'s group (its pid, as it was started in a new session)."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


def peer_command(kind: str, port: int, workers: int) -> list[str]:
    """The command line that serves peer ``kind`` on 127.0.0.1:``port`` with this Python.

    Raises:
        ValueError: ``kind`` is not one of :data:`PEER_KINDS`.
    """
    if kind in ("fastapi", "seeds"):
        return [sys.executable, "-m", "uvicorn", f"load_tests.peers.{kind}_app:app", "--host", HOST,
                "--port", str(port), "--workers", str(workers), "--log-level", "warning"]
    if kind == "bentoml":
        script = Path(sys.executable).parent / "bentoml"
        head = [str(script)] if script.is_file() else [sys.executable, "-m", "bentoml"]
        return [*head, "serve", "load_tests.peers.bentoml_app:PeerService", "--host", HOST,
                "--port", str(port)]
    raise ValueError(f"unknown peer kind {kind!r}; expected one of {', '.join(PEER_KINDS)}")


def start_peer(kind: str, *, bundle_dir: Path, port: int, workers: int = 1, env: dict[str, str],
               logdir: Path, timeout_s: float = 120) -> Peer:
    """Start a peer on 127.0.0.1:``port`` and wait until all its workers serve.

    Args:
        kind: one of :data:`PEER_KINDS`.
        bundle_dir: the model bundle directory it serves (``ModelBundle.load`` reads it).
        port: its HTTP port.
        workers: its number of worker processes (each loads the model).
        env: its whole environment; the bundle, worker count and ready directory are added.
        logdir: directory for ``peer-<kind>-<workers>.log`` (overwritten) and its ready files.
        timeout_s: seconds to wait for the health URL's 200 and every worker's ready file.

    Returns:
        The running peer.

    Raises:
        ValueError: unknown ``kind``, or ``workers`` < 1.
        RuntimeError: it exited, or was not ready in time (it is stopped first); the message
            ends with its log's tail.
    """
    command = peer_command(kind, port, workers)
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    logdir.mkdir(parents=True, exist_ok=True)
    log_path = logdir / f"peer-{kind}-{workers}.log"
    ready_dir = logdir / f"peer-{kind}-{workers}.ready"
    shutil.rmtree(ready_dir, ignore_errors=True)
    ready_dir.mkdir()
    full_env = {**env, BUNDLE_ENV: str(bundle_dir), WORKERS_ENV: str(workers), READY_DIR_ENV: str(ready_dir)}
    with log_path.open("wb") as handle:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=full_env, stdout=handle,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    peer = Peer(kind, workers, f"http://{HOST}:{port}/predict", process, log_path)
    log.info("started peer %s x%d (pid %d, %s, log %s)", kind, workers, process.pid, peer.url, log_path)
    try:
        _wait_until_ready(peer, f"http://{HOST}:{port}{_HEALTH_PATHS[kind]}", ready_dir, started, timeout_s)
    except BaseException:
        peer.stop()
        raise
    log.info("peer %s x%d ready in %.1f s", kind, workers, time.perf_counter() - started)
    return peer


@contextmanager
def running_peer(kind: str, *, bundle_dir: Path, port: int, workers: int = 1, env: dict[str, str],
                 logdir: Path, timeout_s: float = 120) -> Iterator[Peer]:
    """:func:`start_peer` for the duration of a ``with`` block, stopped on the way out."""
    peer = start_peer(kind, bundle_dir=bundle_dir, port=port, workers=workers, env=env, logdir=logdir,
                      timeout_s=timeout_s)
    try:
        yield peer
    finally:
        peer.stop()


def _wait_until_ready(peer: Peer, health_url: str, ready_dir: Path, started: float, timeout_s: float) -> None:
    """Poll ``health_url`` and ``ready_dir`` until it answers 200 and every worker is ready.

    Raises:
        RuntimeError: the process exited, or ``timeout_s`` seconds from ``started`` passed.
    """
    import httpx

    healthy = False
    while True:
        if not healthy:
            try:
                healthy = httpx.get(health_url, timeout=1).status_code == 200
            except httpx.HTTPError:
                pass
        ready = sum(1 for _ in ready_dir.iterdir())
        if healthy and ready >= peer.workers:
            return
        if not peer.running():
            raise RuntimeError(f"peer {peer.kind} exited {peer.process.returncode} (log {peer.log}):\n"
                               f"{peer.log_tail()}")
        if time.perf_counter() - started > timeout_s:
            raise RuntimeError(f"peer {peer.kind} not ready in {timeout_s:g} s (health 200: {healthy}, "
                               f"{ready}/{peer.workers} workers ready; log {peer.log}):\n{peer.log_tail()}")
        time.sleep(POLL_S)
