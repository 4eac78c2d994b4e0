"""The service clients without a server: HTTPClient's requests and error parsing, gRPC errors.

The HTTP side runs over ``httpx.MockTransport`` (the real HTTP service is tested with the
service); the gRPC client's answers are tested against a real server in test_grpc_server.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from breastscan.serving.client import HTTPClient, ServiceError, grpc_error, http_error

ANSWER = {"model": "tumor", "version": "3", "stage": "production", "spec_id": "s", "task": "classification",
          "width": 64, "height": 80, "probabilities": {"benign": 0.25, "malignant": 0.5, "normal": 0.25},
          "predicted": "malignant", "confidence": 0.5}
PNG = b"\x89PNG\r\n\x1a\n fake png bytes"


def _form(request: httpx.Request) -> dict[str, tuple[str | None, bytes]]:
    """``{field: (file name or None, bytes)}`` of a multipart/form-data request."""
    head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + request.read())
    assert message.is_multipart()
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        fields[str(name)] = (part.get_filename(), payload)
    return fields


def _client(handler: Callable[[httpx.Request], httpx.Response]) -> HTTPClient:
    return HTTPClient("http://service:3000/", timeout=5, transport=httpx.MockTransport(handler))


# --------------------------------------------------------------------------- requests


def test_predict_sends_a_multipart_form(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=ANSWER)

    path = tmp_path / "scan.png"
    path.write_bytes(PNG)
    with _client(handler) as client:
        assert client.predict("tumor", path, explain=True, roi=(1, 2, 30, 40)) == ANSWER
        assert client.predict("tumor", PNG) == ANSWER
    first, second = seen
    assert (first.method, first.url.path) == ("POST", "/predict")
    form = _form(first)
    assert form["model"] == (None, b"tumor") and form["explain"] == (None, b"true")
    assert form["roi"] == (None, b"1,2,30,40") and form["image"] == ("scan.png", PNG)
    form = _form(second)
    assert form["explain"] == (None, b"false") and form["roi"] == (None, b"") and form["image"][1] == PNG


def test_analyze_preview_models_and_health() -> None:
    seen: dict[str, httpx.Request] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen[request.url.path] = request
        if request.url.path == "/readyz":
            return httpx.Response(200, text="\n")
        answers: dict[str, Any] = {"/analyze": {"modality": "mammography", "models": {"tumor": ANSWER}},
                                   "/preview": {"width": 1, "height": 1, "modality": None, "png": "eA=="},
                                   "/models": [{"name": "tumor"}]}
        return httpx.Response(200, json=answers[request.url.path])

    with _client(handler) as client:
        assert client.analyze(PNG)["models"] == {"tumor": ANSWER}
        assert client.preview(PNG)["png"] == "eA=="
        assert client.models() == [{"name": "tumor"}]
        assert client.health() == "SERVING"
    form = _form(seen["/analyze"])
    assert form["modality"] == (None, b"") and form["explain"] == (None, b"false")
    assert set(_form(seen["/preview"])) == {"image"}
    assert json.loads(seen["/models"].read()) == {} and seen["/readyz"].method == "GET"
    with _client(lambda r: httpx.Response(503, text="not ready")) as client:
        assert client.health() == "NOT_SERVING"


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32", ">u2"])
def test_predict_array_sends_values_and_dtype(dtype: str) -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/predict_array"
        seen.append(json.loads(request.read()))
        return httpx.Response(200, json=ANSWER)

    arr = (np.arange(20 * 24).reshape(20, 24) % 251).astype(dtype)
    if arr.dtype.kind == "f":
        arr /= 251
    with _client(handler) as client:
        client.predict_array("tumor", arr, roi=[0, 0, 10, 10])
    body = seen[0]
    assert body["model"] == "tumor" and body["explain"] is False and body["roi"] == "0,0,10,10"
    assert body["dtype"] == arr.dtype.name
    np.testing.assert_array_equal(np.asarray(body["array"], dtype=arr.dtype.name), arr)  # exact values


def test_predict_array_refuses_what_json_cannot_carry() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("nothing may be sent")

    nan = np.full((32, 32), 0.5, np.float32)
    nan[0, 0] = np.nan
    with _client(handler) as client:
        for arr, code in ((nan, "not_finite"), (np.zeros((32, 32), np.complex64), "bad_dtype")):
            with pytest.raises(ServiceError) as info:
                client.predict_array("tumor", arr)
            assert (info.value.code, info.value.status) == (code, None)


# --------------------------------------------------------------------------- HTTP errors


@pytest.mark.parametrize(
    ("status", "body", "code", "message"),
    [
        (400, {"error": "roi must be 4 integers", "code": "bad_roi"}, "bad_roi", "roi must be 4 integers"),
        (404, {"error": "no model 'x'", "code": "unknown_model"}, "unknown_model", "no model 'x'"),
        (400, {"error": "Invalid request", "detail": [{"loc": ["image"], "msg": "field required"}]},
         "bad_request", "Invalid request"),
        (400, {"error": "odd", "code": "no_such_code"}, "bad_request", "odd"),
        (422, {"detail": "unprocessable"}, "bad_request", "unprocessable"),
        (413, "Request Entity Too Large", "too_large", "Request Entity Too Large"),
        (500, "Internal Server Error", "internal", "Internal Server Error"),
        (503, "", "unavailable", "Service Unavailable"),
        (503, {"error": "the model service is at capacity: retry shortly", "code": "overloaded"},
         "overloaded", "the model service is at capacity: retry shortly"),
        (504, {"error": "timeout"}, "deadline_exceeded", "timeout"),
    ],
)
def test_http_errors_become_service_errors(status: int, body: Any, code: str, message: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(body, str):
            return httpx.Response(status, text=body)
        return httpx.Response(status, json=body)

    with _client(handler) as client, pytest.raises(ServiceError) as info:
        client.predict("tumor", PNG)
    assert (info.value.code, info.value.message, info.value.status) == (code, message, status)
    assert http_error(httpx.Response(status, json=body) if not isinstance(body, str)
                      else httpx.Response(status, text=body)).code == code


@pytest.mark.parametrize(
    ("error", "code"),
    [(httpx.ConnectError("refused"), "unavailable"), (httpx.ReadTimeout("slow"), "deadline_exceeded")],
)
def test_transport_failures_become_service_errors(error: Exception, code: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise error

    with _client(handler) as client, pytest.raises(ServiceError) as info:
        client.models()
    assert (info.value.code, info.value.status) == (code, None)
    assert info.value.__cause__ is error


def test_success_without_json_is_an_error() -> None:
    with _client(lambda r: httpx.Response(200, text="<html>")) as client, pytest.raises(ServiceError) as info:
        client.models()
    assert (info.value.code, info.value.status) == ("bad_response", 200)


# --------------------------------------------------------------------------- gRPC errors


class _RpcError(grpc.RpcError):
    def __init__(self, status: grpc.StatusCode, details: str,
                 trailers: tuple[tuple[str, Any], ...] = ()) -> None:
        self._status, self._details, self._trailers = status, details, trailers

    def code(self) -> grpc.StatusCode:
        return self._status

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._trailers


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (_RpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad", (("error-code", "bad_roi"),)), "bad_roi"),
        (_RpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad", (("x", "y"), ("error-code", b"empty"))), "empty"),
        (_RpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad", (("error-code", "made_up"),)), "bad_request"),
        (_RpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad"), "bad_request"),
        (_RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max"), "too_large"),
        (_RpcError(grpc.StatusCode.UNAVAILABLE, "connection refused"), "unavailable"),
        (_RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"), "deadline_exceeded"),
        (_RpcError(grpc.StatusCode.INTERNAL, "internal error"), "internal"),
    ],
)
def test_grpc_errors_become_service_errors(error: _RpcError, code: str) -> None:
    converted = grpc_error(error)
    assert (converted.code, converted.message, converted.status) == (code, error.details(), error.code())
    assert str(converted) == f"{code}: {error.details()}"
