"""API keys on the real service (``auth: enabled``), over HTTP and gRPC alike.

A second service over the session's registered models (:mod:`tests.services.auth_server`)
accepts two keys: one made by ``add_key`` into its keys file, one whose hash alone is in
``BREASTSCAN_API_KEYS``. Without a valid key every API route and ``/metrics`` answer 401
``{"error", "code": "unauthorized"}`` (with ``WWW-Authenticate``) and every gRPC call
``UNAUTHENTICATED`` (trailer ``error-code: unauthorized``), before the request's body is
read; with one, the answers are the usual ones. Health probes, the UI's files, the API
description, gRPC health and reflection stay open. No key ever reaches the log.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import grpc
import httpx
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from breastscan.serving.auth import UNAUTHORIZED_MESSAGE, new_key
from breastscan.serving.client import API_KEY_ENV, GRPCClient, HTTPClient, ServiceError
from breastscan.serving.proto.breastscan.v1 import breastscan_pb2 as pb
from breastscan.serving.proto.breastscan.v1 import breastscan_pb2_grpc as pb_grpc
from tests.services import images
from tests.services.make_registry import MODELS

if TYPE_CHECKING:  # imported by pytest_plugins below: importing it first would skip its assert rewriting
    from tests.services.auth_server import AuthServed

pytest_plugins = ["tests.services.auth_server"]  # the auth_service fixture, one server a session
pytestmark = [pytest.mark.slow, pytest.mark.service]

US = images.png(images.ultrasound(3))
WRONG_KEY = new_key()
SEGMENTATION_KEYS = {"model", "version", "stage", "spec_id", "task", "width", "height", "mask_png",
                     "lesion_area_px", "lesion_fraction", "bbox", "overlay_png"}
SERVED = sorted(MODELS)  # tests.services.make_registry's, in name order


@pytest.fixture(autouse=True)
def _no_client_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The clients read BREASTSCAN_API_KEY: a developer's own must not change these tests."""
    monkeypatch.delenv(API_KEY_ENV, raising=False)


@pytest.fixture(scope="module")
def http(auth_service: AuthServed) -> Iterator[httpx.Client]:
    """A plain HTTP client of the service, no key."""
    with httpx.Client(base_url=auth_service.http_url, timeout=60) as client:
        yield client


def lesion(http: httpx.Client, **headers: str) -> httpx.Response:
    return http.post("/lesion", files={"image": ("u.png", US, "image/png")}, headers=headers)


def assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.json() == {"error": UNAUTHORIZED_MESSAGE, "code": "unauthorized"}
    assert response.headers["www-authenticate"] == 'Bearer realm="breastscan"'


# --------------------------------------------------------------------------- HTTP


def test_http_without_a_valid_key_is_401(http: httpx.Client) -> None:
    assert_refused(lesion(http))
    assert_refused(lesion(http, authorization=f"Bearer {WRONG_KEY}"))
    assert_refused(lesion(http, **{"x-api-key": WRONG_KEY}))
    assert_refused(lesion(http, authorization=f"Basic {WRONG_KEY}"))  # only Bearer carries a key
    assert_refused(http.post("/models", json={}))
    assert_refused(http.post("/analyze", files={"image": ("u.png", US)}, data={"modality": "ultrasound"}))
    assert_refused(http.get("/no-such-route"))  # no route list for strangers either
    for key in ("", WRONG_KEY):
        with HTTPClient(str(http.base_url), api_key=key) as client, pytest.raises(ServiceError) as info:
            client.models()
        assert (info.value.code, info.value.status) == ("unauthorized", 401)


def test_http_with_either_key_answers(http: httpx.Client, auth_service: AuthServed) -> None:
    by_header = lesion(http, **{"X-API-Key": auth_service.file_key})
    assert by_header.status_code == 200, by_header.text
    answer = by_header.json()
    assert set(answer) == SEGMENTATION_KEYS and answer["task"] == "segmentation"
    assert (answer["model"], answer["version"], answer["stage"]) == ("lesion", "1", "production")
    by_bearer = lesion(http, authorization=f"bearer {auth_service.env_key}")  # scheme in any case
    assert by_bearer.status_code == 200 and by_bearer.json() == answer
    with HTTPClient(auth_service.http_url, api_key=auth_service.env_key) as client:
        assert client.predict("lesion", US) == answer
        assert [m["name"] for m in client.models()] == SERVED


def test_http_client_reads_the_key_from_the_environment(auth_service: AuthServed,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, auth_service.file_key)
    with HTTPClient(auth_service.http_url) as client:
        assert [m["name"] for m in client.models()] == SERVED


def test_probes_ui_and_api_description_are_open(http: httpx.Client) -> None:
    for path in ("/healthz", "/livez", "/readyz", "/docs.json", "/ui/", "/ui/app.js",
                 "/", "/static_content/swagger-ui.css"):  # BentoML's Swagger page and its files
        assert http.get(path).status_code == 200, path
    assert "paths" in http.get("/docs.json").json()
    with HTTPClient(str(http.base_url), api_key="") as client:
        assert client.health() == "SERVING"


def test_metrics_need_a_key(http: httpx.Client, auth_service: AuthServed) -> None:
    assert_refused(http.get("/metrics"))
    metrics = http.get("/metrics", headers={"authorization": f"Bearer {auth_service.file_key}"})
    assert metrics.status_code == 200 and "breastscan" in metrics.text


def test_a_refused_request_body_is_never_read(auth_service: AuthServed) -> None:
    """Headers announcing 20 MiB, then 5 bytes: the 401 comes at once, not after the body."""
    url = urlsplit(auth_service.http_url)
    assert url.hostname and url.port
    head = (f"POST /lesion HTTP/1.1\r\nHost: {url.netloc}\r\n"
            f"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: {20 * 2**20}\r\n\r\n")
    started = time.monotonic()
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(head.encode() + b"--x\r\n")
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert time.monotonic() - started < 5


# --------------------------------------------------------------------------- gRPC


def test_grpc_without_a_valid_key_is_unauthenticated(auth_service: AuthServed) -> None:
    for key in ("", WRONG_KEY):
        with GRPCClient(auth_service.grpc_target, timeout=30, api_key=key) as client:
            for call in (client.models, lambda c=client: c.predict("lesion", US)):
                with pytest.raises(ServiceError) as info:
                    call()
                assert info.value.code == "unauthorized"
                assert info.value.status == grpc.StatusCode.UNAUTHENTICATED
                assert info.value.message == UNAUTHORIZED_MESSAGE
    with grpc.insecure_channel(auth_service.grpc_target) as channel:  # the raw refusal
        stub = pb_grpc.BreastScanStub(channel)
        with pytest.raises(grpc.RpcError) as raw:
            stub.ListModels(pb.ListModelsRequest(), timeout=30, metadata=(("x-api-key", WRONG_KEY),))
    assert raw.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ("error-code", "unauthorized") in tuple(raw.value.trailing_metadata() or ())


def test_grpc_with_either_key_answers_as_http(auth_service: AuthServed) -> None:
    with GRPCClient(auth_service.grpc_target, timeout=60, api_key=auth_service.file_key) as rpc, \
            HTTPClient(auth_service.http_url, api_key=auth_service.env_key) as http:
        answer = rpc.predict("lesion", US)
        assert set(answer) == SEGMENTATION_KEYS
        assert answer == http.predict("lesion", US)
        assert rpc.models() == http.models()
    with grpc.insecure_channel(auth_service.grpc_target) as channel:  # X-API-Key as metadata
        stub = pb_grpc.BreastScanStub(channel)
        listed = stub.ListModels(pb.ListModelsRequest(), timeout=30,
                                 metadata=(("x-api-key", auth_service.env_key),))
    assert [m.name for m in listed.models] == SERVED


def test_grpc_client_reads_the_key_from_the_environment(auth_service: AuthServed,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, auth_service.env_key)
    with GRPCClient(auth_service.grpc_target, timeout=30) as client:
        assert [m["name"] for m in client.models()] == SERVED


def test_grpc_health_and_reflection_are_open(auth_service: AuthServed) -> None:
    with GRPCClient(auth_service.grpc_target, timeout=30, api_key="") as client:
        assert client.health() == "SERVING"
        assert client.health("breastscan.v1.BreastScan") == "SERVING"
        reflection = reflection_pb2_grpc.ServerReflectionStub(client.channel)
        asked = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        answers = reflection.ServerReflectionInfo(asked, timeout=30)
        names = {s.name for answer in answers for s in answer.list_services_response.service}
    assert "breastscan.v1.BreastScan" in names


# --------------------------------------------------------------------------- the log


def test_no_key_reaches_the_log(auth_service: AuthServed) -> None:
    """Runs last: every key above was sent, accepted or refused; none may be in the log."""
    assert auth_service.served.log_lines("status=401"), "the refusals are logged (without the key)"
    text = auth_service.served.log_text()
    for key in (auth_service.file_key, auth_service.env_key, WRONG_KEY):
        assert key not in text
