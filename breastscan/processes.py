"""Local server processes for tests and benchmarks: a free port, their workers, stopping a group.

Servers the project starts for tests and benchmarks (``bentoml serve``, ``mlflow server``)
fork workers; each is started with ``start_new_session=True`` so that its process group
holds the server and its workers only, and :func:`stop_process_group` ends them together.
:func:`descendants`, :func:`rss_mb` and :func:`cpu_seconds` describe those processes
(``psutil``, which BentoML depends on, is imported only when they are called).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from typing import Any


def stop_process_group(process: subprocess.Popen[Any], grace_s: float = 20.0) -> None:
    """SIGTERM ``process``'s group, then SIGKILL what is left after ``grace_s`` seconds.

    Args:
        process: a child started with ``start_new_session=True`` (its pid is its group id).
        grace_s: seconds to wait for a clean shutdown before killing, and again after.
    """
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(grace_s)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port of ``host`` nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def descendants(pid: int) -> list[tuple[int, list[str]]]:
    """``(pid, argv)`` of every live descendant of process ``pid`` (``[]`` once it is gone)."""
    import psutil

    out = []
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    for child in children:
        try:
            out.append((child.pid, child.cmdline()))
        except psutil.Error:  # ended meanwhile
            continue
    return out


def rss_mb(pid: int) -> float | None:
    """Resident memory of process ``pid`` in MiB (one decimal); ``None`` when it is gone."""
    import psutil

    try:
        return round(psutil.Process(pid).memory_info().rss / 2**20, 1)
    except psutil.Error:
        return None


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) process ``pid`` has used so far; ``None`` when it is gone."""
    import psutil

    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return float(times.user + times.system)
