"""Load shedding of the real service: a request that waits past ``max_latency_ms`` is refused
as HTTP 503 (with ``Retry-After``) or gRPC ``UNAVAILABLE``, code ``overloaded``, on both
protocols, and the service serves normally afterwards.

A second service over the same registered models, with a latency bound of 1 ms and no
batching, so a burst of concurrent requests must queue past it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from breastscan.serving.batching import OVERLOADED_MESSAGE
from breastscan.serving.client import GRPCClient, ServiceError
from tests.services import images
from tests.services.conftest import Served, variant_service

pytestmark = [pytest.mark.slow, pytest.mark.service]

US = images.png(images.ultrasound(3))


@pytest.fixture(scope="module")
def shedding(served_project: tuple[Path, dict[str, str]]) -> Iterator[Served]:
    batching = {"enabled": False, "max_batch_size": 32, "max_latency_ms": 1}
    with variant_service(served_project, "shedding", {"batching": batching}) as served:
        yield served


def test_a_burst_past_the_latency_bound_is_shed_over_http(shedding: Served) -> None:
    def call(_: int) -> httpx.Response:
        return httpx.post(f"{shedding.http_url}/lesion", files={"image": ("u.png", US)}, timeout=60)

    with ThreadPoolExecutor(48) as pool:
        answers = list(pool.map(call, range(192)))
    codes = {r.status_code for r in answers}
    assert codes <= {200, 503}, codes
    shed = [r for r in answers if r.status_code == 503]
    assert shed and len(shed) < len(answers), len(shed)
    assert shed[0].json() == {"error": OVERLOADED_MESSAGE, "code": "overloaded"}
    assert shed[0].headers["retry-after"] == "1"
    after = httpx.post(f"{shedding.http_url}/lesion", files={"image": ("u.png", US)}, timeout=60)
    assert after.status_code == 200 and after.json()["task"] == "segmentation"
    assert not re.search(r"status=5(?!03)\d\d", shedding.log_text())  # 503 is the shedding; no other 5xx


def test_a_burst_past_the_latency_bound_is_shed_over_grpc(shedding: Served) -> None:
    def call(_: int) -> str:
        with GRPCClient(shedding.grpc_target) as client:
            try:
                client.predict("lesion", US)
                return "ok"
            except ServiceError as exc:
                return f"{exc.code} {exc.status}"

    with ThreadPoolExecutor(48) as pool:
        outcomes = list(pool.map(call, range(192)))
    assert set(outcomes) <= {"ok", "overloaded StatusCode.UNAVAILABLE"}, set(outcomes)
    assert "ok" in outcomes and "overloaded StatusCode.UNAVAILABLE" in outcomes
    with GRPCClient(shedding.grpc_target) as client:
        assert client.predict("lesion", US)["task"] == "segmentation"
