"""The service launcher (load_tests/harness.py): the command, waiting for HTTP and gRPC,
reporting a service that exits or never answers, and measuring and stopping its processes.

Fake services stand in for ``bentoml serve``: a small HTTP server and a gRPC health server,
and Python processes named like BentoML's workers.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from load_tests.harness import LaunchedService, ServiceStartError, serve_command, wait_until_serving


def _process(code: str, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as handle:
        return subprocess.Popen([sys.executable, "-c", code], stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _launched(process: subprocess.Popen[bytes], log_path: Path, http_port: int,
              grpc_port: int) -> LaunchedService:
    return LaunchedService(process, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", log_path,
                           {}, time.perf_counter())


def test_serve_command_is_bentoml_serve_on_loopback() -> None:
    cmd = serve_command(1234)
    assert cmd[-6:] == ["serve", "services.service:BreastScan", "--host", "127.0.0.1", "--port", "1234"]
    assert serve_command(1, target="breastscan:v1")[-5] == "breastscan:v1"


def test_waiting_records_when_http_and_grpc_began_to_serve(tmp_path: Path) -> None:
    import http.server
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 -- the handler's API
            self.send_response(200 if self.path == "/readyz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ready)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    server = grpc.server(ThreadPoolExecutor(2))
    checker = health.HealthServicer()
    checker.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    service = _launched(_process("import time; time.sleep(60)", tmp_path / "log"), tmp_path / "log",
                        web.server_address[1], grpc_port)
    try:
        wait_until_serving(service, timeout_s=30)
        cold = service.cold_start()
        assert cold["ready_s"] is not None and cold["grpc_serving_s"] is not None
        assert 0 <= cold["ready_s"] < 30 and service.running()
    finally:
        service.stop(5)
        server.stop(None)
        web.shutdown()
    assert not service.running()


def test_a_service_that_exits_or_never_answers_is_reported_with_its_log(tmp_path: Path) -> None:
    from breastscan.processes import free_port

    port = free_port()
    exited = _launched(_process("print('boom: no models'); raise SystemExit(3)", tmp_path / "a.log"),
                       tmp_path / "a.log", port, port)
    with pytest.raises(ServiceStartError, match=r"exited 3 \(log .*a\.log\):\n.*boom: no models"):
        wait_until_serving(exited, timeout_s=30)
    sleeper = _process("import time; time.sleep(60)", tmp_path / "b.log")
    slow = _launched(sleeper, tmp_path / "b.log", port, port)
    try:
        with pytest.raises(ServiceStartError, match=r"not ready in 0.5 s"):
            wait_until_serving(slow, timeout_s=0.5)
    finally:
        slow.stop(5)


def test_workers_are_found_measured_and_stopped_with_their_group(tmp_path: Path) -> None:
    import psutil

    burned = tmp_path / "burned"
    # a worker that spends 0.3 s of CPU (then says so), beside an arbiter that only waits
    burn = ("import time, pathlib; t = time.process_time()\n"
            "while time.process_time() - t < 0.3: pass\n"
            f"pathlib.Path({str(burned)!r}).touch(); time.sleep(60)")
    worker = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
              f"{burn!r}, '--service-name', 'breastscan', '--worker-id', '2']); time.sleep(60)")
    service = _launched(_process(worker, tmp_path / "log"), tmp_path / "log", 1, 1)
    try:
        deadline = time.monotonic() + 30
        while not (service.find_workers() and burned.exists()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(service.workers) == ["breastscan#2"]
        assert list(service.pids()) == ["arbiter", "breastscan#2"]
        rss = service.rss_mb()
        assert set(rss) == {"arbiter", "breastscan#2", "total"}
        assert rss["total"] == pytest.approx((rss["arbiter"] or 0) + (rss["breastscan#2"] or 0), abs=0.11)
        assert min(rss["arbiter"] or 0, rss["breastscan#2"] or 0) > 1  # a Python process holds MiBs
        cpu = service.cpu_seconds()
        assert set(cpu) == {"arbiter", "breastscan#2"}
        assert (cpu["breastscan#2"] or 0) >= 0.25 > (cpu["arbiter"] or 0)  # each process's own time
    finally:
        service.stop(5)
    pid = service.workers["breastscan#2"]

    def gone() -> bool:
        try:
            return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    deadline = time.monotonic() + 10  # the signal reaches the worker a moment after its parent
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone() and not service.running()
