"""Local server processes for tests and benchmarks: a free port, stopping a whole group.

Servers the project starts for tests and benchmarks (``bentoml serve``, ``mlflow server``)
fork workers; each is started with ``start_new_session=True`` so that its process group
holds the server and its workers only, and :func:`stop_process_group` ends them together.
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
