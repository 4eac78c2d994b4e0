"""The Locust load test (``load_tests/locustfile.py``) against the real service, headless.

Locust runs as its own process, as ``make load`` runs it: it monkey-patches the interpreter
(gevent), so it is never imported here. One short run with loose thresholds must pass with
HTTP and gRPC requests and no failure; one with an impossible p95 must fail, saying so.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services.conftest import REPO, Served

pytestmark = [pytest.mark.slow, pytest.mark.service]

LOCUSTFILE = "load_tests/locustfile.py"
HTTP_NAMES = {"/analyze", "/tumor", "/density", "/lesion"}
GRPC_NAMES = {"Analyze", "Predict/tumor", "Predict/density", "Predict/lesion"}


def run_locust(service: Served, *options: str, users: int = 4, run_time: str = "15s",
               timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """``python -m locust`` headless against ``service``; its output merged into stdout."""
    cmd = [sys.executable, "-m", "locust", "-f", LOCUSTFILE, "--headless", "-u", str(users),
           "-r", str(users), "-t", run_time, "--host", service.http_url, "--grpc-target",
           service.grpc_target, "--only-summary", *options]
    return subprocess.run(cmd, cwd=REPO, env=service.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)


def read_stats(csv_prefix: Path) -> dict[tuple[str, str], tuple[int, int]]:
    """``{(type, name): (requests, failures)}`` of Locust's ``<prefix>_stats.csv``."""
    with Path(f"{csv_prefix}_stats.csv").open(newline="") as f:
        return {(row["Type"], row["Name"]): (int(row["Request Count"]), int(row["Failure Count"]))
                for row in csv.DictReader(f)}


def test_load_run_passes_over_http_and_grpc(service: Served, tmp_path: Path) -> None:
    prefix = tmp_path / "load"
    done = run_locust(service, "--csv", str(prefix), "--max-fail-ratio", "0", "--max-p95-ms", "30000",
                      "--max-p99-ms", "60000")
    assert done.returncode == 0, done.stdout[-5000:]
    assert "thresholds passed" in done.stdout
    stats = read_stats(prefix)
    http = {name: counts for (kind, name), counts in stats.items() if kind == "POST"}
    grpc = {name: counts for (kind, name), counts in stats.items() if kind == "grpc"}
    assert http and set(http) <= HTTP_NAMES | {f"{n} [burst]" for n in HTTP_NAMES}, stats
    assert grpc and set(grpc) <= GRPC_NAMES, stats
    for name, (requests, failures) in {**http, **grpc}.items():
        assert requests > 0 and failures == 0, (name, requests, failures, done.stdout[-3000:])
    total_requests, total_failures = stats[("", "Aggregated")]
    assert total_requests == sum(r for r, _ in {**http, **grpc}.values()) and total_failures == 0


def test_load_run_fails_on_its_p95_threshold(service: Served) -> None:
    done = run_locust(service, "--max-p95-ms", "0.001", "--max-p99-ms", "600000", "--max-fail-ratio", "1",
                      users=2, run_time="6s")
    assert done.returncode != 0, done.stdout[-3000:]
    failed = [line for line in done.stdout.splitlines() if "threshold failed" in line]
    assert failed and all("max-p95-ms 0.001" in line for line in failed), done.stdout[-3000:]
    assert "p95 response time" in failed[0]
