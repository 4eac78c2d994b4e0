"""A worker of the real service killed (SIGKILL) under load, over HTTP and gRPC.

One worker process is both the front (HTTP, gRPC, UI) and the models' home, so killing it
kills both. With two workers the other keeps answering while BentoML's arbiter starts a new
one: only the requests the dead worker had in flight may fail (a reset connection, never a
5xx), the new worker serves within the recovery bound, and the service answers normally.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from breastscan.serving.client import GRPCClient, HTTPClient, ServiceError
from tests.services import images
from tests.services.conftest import Served, variant_service, worker_processes

pytestmark = [pytest.mark.slow, pytest.mark.service]

MG = images.png(images.mammogram(5))
MAX_FAILED_RATIO = 0.05
RECOVERY_S = 120.0
READY_LINE = "models loaded and warmed in"  # each worker logs it once loaded


@pytest.fixture(scope="module")
def two_workers(served_project: tuple[Path, dict[str, str]]) -> Iterator[Served]:
    api = {"workers": 2, "max_concurrency": 512, "timeout_s": 60}
    with variant_service(served_project, "two-workers", {"api_service": api}) as served:
        yield served


def _load(served: Served, stop: threading.Event, outcomes: Counter[str], k: int) -> None:
    """One client sending until ``stop``: HTTP on even ``k``, gRPC on odd; a new client after a failure."""
    client: Any = None
    while not stop.is_set():
        try:
            if client is None:
                client = (GRPCClient(served.grpc_target, timeout=60) if k % 2
                          else HTTPClient(served.http_url, timeout=60))
            client.predict("tumor", MG)
            outcomes["ok"] += 1
        except ServiceError as exc:
            outcomes[f"refused {exc.code} {exc.status}"] += 1
            if exc.code == "unavailable":  # a channel to the dead worker: reconnect, as a client does
                client.close()  # (left alone, gRPC's reconnect back-off fails every call at once meanwhile)
                client = None
        except Exception as exc:  # noqa: BLE001 -- a reset connection: counted, judged below
            outcomes[f"failed {type(exc).__name__}"] += 1
            client.close()
            client = None
    if client is not None:
        client.close()


def _wait_for_new_worker(served: Served, old: set[int], deadline: float) -> float:
    """Seconds until two workers run again, the new one having loaded its models."""
    start = time.monotonic()
    while time.monotonic() < deadline:
        pids = {p.pid for p in worker_processes(served)}
        ready = served.log_text().count(READY_LINE)
        if len(pids) == 2 and pids - old and ready >= 3:  # two at start, then the new one
            return time.monotonic() - start
        time.sleep(0.5)
    raise AssertionError(f"no new worker serving after {RECOVERY_S} s: {served.log_text()[-3000:]}")


def test_a_killed_worker_under_load_loses_only_its_requests(two_workers: Served) -> None:
    served = two_workers
    workers = worker_processes(served)
    assert len(workers) == 2
    stop, outcomes = threading.Event(), Counter[str]()
    threads = [threading.Thread(target=_load, args=(served, stop, outcomes, k)) for k in range(8)]
    for t in threads:
        t.start()
    try:
        time.sleep(6)
        os.kill(workers[0].pid, signal.SIGKILL)
        recovery = _wait_for_new_worker(served, {w.pid for w in workers}, time.monotonic() + RECOVERY_S)
        time.sleep(4)  # load on the recovered service
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    total = sum(outcomes.values())
    failed = total - outcomes["ok"]
    print(f"killed worker: {failed}/{total} failed ({dict(outcomes)}), recovered in {recovery:.1f} s")
    assert total > 40 and failed / total <= MAX_FAILED_RATIO, outcomes
    assert not any(k.startswith("refused") and "INTERNAL" in k for k in outcomes), outcomes
    assert not re.search(r"status=5\d\d", served.log_text())
    with HTTPClient(served.http_url) as h, GRPCClient(served.grpc_target) as g:
        assert h.predict("tumor", MG)["model"] == "tumor" and g.predict("tumor", MG)["model"] == "tumor"
