"""The running service follows the registry stage: a promotion and a rollback under load.

A real ``bentoml serve`` over its own registry (two versions of the tiny tumor model, the
project's gates judging them; ``tests.services.make_registry.register_versions``), following
``@production`` every second. While HTTP and gRPC clients send requests in threads,
``breastscan promote`` moves the stage to v2 and ``breastscan rollback`` back to v1: every
client's answers switch within a few polls, no request fails, and ``breastscan history``
holds the promotion, the service's swaps and the rollback, in order. A second service, of two
workers, shows both workers following a promotion and both refusing a version whose contract
(its classes) differs from the one served, which keeps answering.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from breastscan.processes import free_port
from breastscan.serving.client import GRPCClient, HTTPClient
from tests.services import images
from tests.services.conftest import (
    BIN,
    REPO,
    Served,
    service_env,
    serving_config,
    start_service,
    stop_service,
)

pytestmark = [pytest.mark.slow, pytest.mark.service]

log = logging.getLogger(__name__)

POLL_S = 1.0
"""The service's ``follow.poll_s``."""
SWITCH_BOUND_S = 10.0
"""Longest time from a stage move (its audit event) to every client's first answer of the new
version: a poll, the download, the load and the warm-up of a tiny model, with room for a busy CI."""
REPORTS = [{"macro_auc": 0.83, "accuracy": 0.70}, {"macro_auc": 0.85, "accuracy": 0.72}]
"""The registered numbers of v1 and v2 (both pass params.yaml's tumor gates)."""
MG = images.png(images.mammogram(5))


@dataclass
class Stream:
    """One client's answers: ``(wall time, version)`` of each and its latency, and every failure."""

    protocol: str
    answers: list[tuple[float, str]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def first(self, version: str, after: float) -> float | None:
        """Wall time of the first answer of ``version`` at or after ``after``."""
        return next((t for t, v in self.answers if v == version and t >= after), None)

    def runs(self) -> list[str]:
        """The versions answered, consecutive repeats collapsed (``["1", "2", "1"]``)."""
        out: list[str] = []
        for _, version in self.answers:
            if not out or out[-1] != version:
                out.append(version)
        return out


def _following_service(root: Path, workers: int) -> Iterator[Served]:
    """The service over a registry of its own (tumor v1 at production, v2 registered), of
    ``workers`` workers polling every second."""
    env = service_env(root, BREASTSCAN_ACTOR="release-test")
    _cli(env, sys.executable, "-c", "from pathlib import Path; from tests.services.make_registry import "
         f"register_versions; register_versions(Path({str(root)!r}), 'tumor', {REPORTS!r}, production=1)")
    _cli(env, str(BIN / "breastscan"), "import-models", "tumor")
    api = {"workers": workers, "max_concurrency": 512, "timeout_s": 60}
    config = serving_config(root, "live", {"follow": {"enabled": True, "poll_s": POLL_S}, "api_service": api})
    served = start_service(root, {**env, "BREASTSCAN_SERVING_CONFIG": str(config)}, http_port=free_port(),
                           grpc_port=free_port(), log_name="serve-live.log")
    try:
        yield served
    finally:
        stop_service(served)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Served]:
    """One worker following @production."""
    yield from _following_service(tmp_path, workers=1)


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[Served]:
    """Two workers following @production."""
    yield from _following_service(tmp_path, workers=2)


def _cli(env: dict[str, str], *cmd: str) -> str:
    """Run a command in the project (the repository's params.yaml); its stdout.

    Raises:
        AssertionError: it failed (the message holds its output).
    """
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (f"{' '.join(cmd)[:200]} failed:\n{done.stdout[-3000:]}\n"
                                  f"{done.stderr[-5000:]}")
    return done.stdout


def _breastscan(served: Served, *args: str) -> str:
    return _cli(served.env, str(BIN / "breastscan"), *args)


def _send(served: Served, stream: Stream, stop: threading.Event) -> None:
    """Predict ``tumor`` until ``stop``, recording each answer's version or the failure."""
    client: Any = GRPCClient(served.grpc_target, timeout=30) if stream.protocol == "grpc" else \
        HTTPClient(served.http_url, timeout=30)
    with client:
        while not stop.is_set():
            sent = time.perf_counter()
            try:
                version = str(client.predict("tumor", MG)["version"])
                stream.latencies.append(time.perf_counter() - sent)
                stream.answers.append((time.time(), version))
            except Exception as exc:  # noqa: BLE001 -- every failure is counted and reported
                stream.failures.append(f"{type(exc).__name__}: {exc}"[:300])
                time.sleep(0.05)


def _events(served: Served) -> list[dict[str, Any]]:
    """``breastscan history tumor --json``: the audit trail, oldest first."""
    return list(json.loads(_breastscan(served, "history", "tumor", "--json")))


def _moved_at(served: Served, kind: str, to_version: int) -> float:
    """When the stage moved (the audit event of that promotion or rollback), as a Unix time."""
    event = [e for e in _events(served) if e["kind"] == kind and e["to_version"] == to_version][-1]
    return datetime.fromisoformat(event["when"]).timestamp()


def _wait_switch(streams: list[Stream], version: str, after: float) -> tuple[float, float]:
    """Seconds from ``after`` until the first stream, and until every stream, answered ``version``."""
    deadline = time.monotonic() + SWITCH_BOUND_S + 30
    while time.monotonic() < deadline:
        firsts = [s.first(version, after) for s in streams]
        if all(t is not None for t in firsts):
            times = [t - after for t in firsts if t is not None]
            return min(times), max(times)
        time.sleep(0.05)
    raise AssertionError(f"not every client answered v{version} within {SWITCH_BOUND_S + 30:.0f} s")


def _swaps(served: Served) -> float:
    text = httpx.get(f"{served.http_url}/metrics", timeout=10).text
    hit = re.search(r'^breastscan_model_swaps_total\{[^}]*model="tumor"[^}]*outcome="swapped"[^}]*\} (\S+)',
                    text, re.M)
    return float(hit.group(1)) if hit else 0.0


def test_answers_follow_a_promotion_and_a_rollback_with_no_failed_request(live: Served) -> None:
    assert live.log_lines(f"following @production of tumor in sqlite:///{live.root}", timeout_s=30)
    streams = [Stream(p) for p in ("http", "grpc", "http", "grpc")]
    stop = threading.Event()
    threads = [threading.Thread(target=_send, args=(live, s, stop), daemon=True) for s in streams]
    for t in threads:
        t.start()
    try:
        started = time.time()
        _wait_switch(streams, "1", started)  # every client is answered before the stage moves
        _breastscan(live, "promote", "tumor", "--version", "2", "--to", "production", "--reason", "v2 live")
        promoted = _moved_at(live, "promote", 2)
        to_v2 = _wait_switch(streams, "2", promoted)
        _breastscan(live, "rollback", "tumor", "--reason", "back to v1 under load")
        rolled_back = _moved_at(live, "rollback", 1)
        to_v1 = _wait_switch(streams, "1", rolled_back)
        time.sleep(2 * POLL_S)  # and it stays there
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    latencies = sorted(x for s in streams for x in s.latencies)
    log.warning("promotion -> first answer of v2 %.2f s, every client on v2 %.2f s; rollback -> first v1 "
                "%.2f s, every client %.2f s; %d answers (latency median %.0f ms, max %.0f ms), %d failed",
                *to_v2, *to_v1, len(latencies), 1e3 * latencies[len(latencies) // 2], 1e3 * latencies[-1],
                sum(len(s.failures) for s in streams))
    assert [f for s in streams for f in s.failures] == []
    assert to_v2[1] < SWITCH_BOUND_S and to_v1[1] < SWITCH_BOUND_S
    for s in streams:  # each client's answers: v1, then v2, then v1 again -- never back and forth
        assert s.runs() == ["1", "2", "1"], (s.protocol, s.runs())
    during = [v for s in streams for t, v in s.answers if promoted <= t < promoted + to_v2[0]]
    assert during and set(during) == {"1"}  # v1 answered while v2 downloaded and loaded

    kinds = [(e["kind"], e["from_version"], e["to_version"]) for e in _events(live)]
    assert kinds == [("promote", None, 1), ("promote", 1, 2), ("swap", 1, 2), ("rollback", 2, 1),
                     ("swap", 2, 1)], kinds
    swaps = [e for e in _events(live) if e["kind"] == "swap"]
    assert {(e["who"], e["stage"]) for e in swaps} == {("breastscan-service", "production")}
    assert all(e["host"] and "now serves" in e["reason"] for e in swaps)
    assert _swaps(live) == 2.0
    assert live.log_lines("model=tumor version=2") and live.log_lines("tumor: now serving v1 (was v2)")
    assert [m["version"] for m in HTTPClient(live.http_url).models()] == ["1"]


def _wait_events(served: Served, kind: str, count: int, timeout_s: float = SWITCH_BOUND_S + 30) -> list[dict]:
    """The audit events of ``kind``, once there are ``count`` of them."""
    deadline = time.monotonic() + timeout_s
    while True:
        events = [e for e in _events(served) if e["kind"] == kind]
        if len(events) >= count or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


def _versions_answered(served: Served, n: int = 16) -> list[str]:
    """The version answering each of ``n`` requests, each on a new connection (HTTP, then gRPC,
    alternately), so that the kernel spreads them over the workers."""
    out = []
    for i in range(n):
        client: Any = HTTPClient(served.http_url, timeout=30) if i % 2 else \
            GRPCClient(served.grpc_target, timeout=30)
        with client:
            out.append(str(client.predict("tumor", MG)["version"]))
    return out


def _workers_of(events: list[dict]) -> set[str]:
    return {m.group(1) for e in events if (m := re.search(r"worker (\d+)", e["reason"]))}


def test_two_workers_follow_a_promotion_and_refuse_a_contract_change(two_workers: Served) -> None:
    served = two_workers
    deadline = time.monotonic() + 60  # each worker starts following once it has its models
    while len(served.log_lines("following @production of tumor")) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(served.log_lines("following @production of tumor")) == 2
    _breastscan(served, "promote", "tumor", "--version", "2", "--to", "production", "--reason", "v2 live")
    swaps = _wait_events(served, "swap", 2)
    assert len(swaps) == 2 and len(_workers_of(swaps)) == 2, swaps  # each worker swapped, once
    assert set(_versions_answered(served)) == {"2"}
    assert _swaps(served) == 2.0

    # v3 answers two classes where v1 and v2 answer three: its contract is not the endpoint's
    _cli(served.env, sys.executable, "-c", "from pathlib import Path; from tests.services.make_registry "
         f"import register_version; print(register_version(Path({str(served.root)!r}), 'tumor', "
         "{'macro_auc': 0.9, 'accuracy': 0.8}, classes=('benign', 'malignant'), "
         "class_names=('benign', 'malignant')))")
    _breastscan(served, "promote", "tumor", "--version", "3", "--to", "production", "--reason", "two classes")
    refusals = _wait_events(served, "swap_refused", 2)
    assert len(refusals) == 2 and len(_workers_of(refusals)) == 2, refusals
    assert all(e["from_version"] == 2 and e["to_version"] == 3 and "still serving v2" in e["reason"]
               for e in refusals), refusals
    assert len(served.log_lines("tumor v3 (now @production) not served")) == 2
    time.sleep(2 * POLL_S)  # refused once: the next polls neither retry nor log it again
    assert len(served.log_lines("tumor v3 (now @production) not served")) == 2
    assert set(_versions_answered(served)) == {"2"}
    text = httpx.get(f"{served.http_url}/metrics", timeout=10).text
    assert re.search(r'^breastscan_model_swaps_total\{[^}]*outcome="refused"[^}]*\} 2\.0$', text, re.M), \
        [line for line in text.splitlines() if "swaps_total" in line]
    assert [m["version"] for m in HTTPClient(served.http_url).models()] == ["2"]
    assert "status=5" not in served.log_text()
