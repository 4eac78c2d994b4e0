"""The real service as an unfriendly client finds it: generated requests from its own OpenAPI
schema (schemathesis), a table of malformed requests on both protocols, DICOM headers of the
wrong modality, and a short soak mixing good and bad requests -- never a 5xx (or gRPC
INTERNAL / UNKNOWN), always a 4xx / INVALID_ARGUMENT whose code says what was wrong, and the
service answers normally afterwards with its memory flat."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import httpx
import psutil
import pytest

from breastscan.serving.client import GRPCClient, HTTPClient, ServiceError
from tests.services import images
from tests.services.conftest import BIN, Served

pytestmark = [pytest.mark.slow, pytest.mark.service]

MG = images.png(images.mammogram(4))
US = images.png(images.ultrasound(4))
NOT_UTF8 = b"\xff\xfe\xfa"


def _multipart(*parts: tuple[str, bytes, str | None]) -> tuple[bytes, str]:
    """A multipart body of ``(name, data, filename or None)`` parts, and its content type."""
    out = b""
    for name, data, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--XyZ\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return out + b"--XyZ--\r\n", "multipart/form-data; boundary=XyZ"


def _case(*parts: tuple[str, bytes, str | None]) -> tuple[dict[str, str], bytes]:
    body, ctype = _multipart(*parts)
    return {"content-type": ctype}, body


IMG = ("image", MG, "m.png")
FORM = {"content-type": "application/x-www-form-urlencoded"}
# name: (path, headers, body, status, code)
HTTP_CASES: dict[str, tuple[str, dict[str, str], bytes, int, str]] = {
    "text field sent as a non-UTF-8 file": ("/predict", *_case(("model", NOT_UTF8, "m.txt"), IMG), 400,
                                            "bad_field"),
    "non-UTF-8 text field": ("/tumor", *_case(IMG, ("roi", NOT_UTF8, None)), 400, "bad_field"),
    "non-UTF-8 modality": ("/analyze", *_case(IMG, ("modality", NOT_UTF8, None)), 400, "bad_field"),
    "non-UTF-8 explain": ("/density", *_case(IMG, ("explain", NOT_UTF8, None)), 400, "bad_field"),
    "image under another name": ("/tumor", *_case(("picture", MG, "m.png")), 400, "unknown_field"),
    "image as a URL text": ("/tumor", *_case(("image", b"http://169.254.169.254/x", None)), 400,
                            "bad_field"),
    "image twice": ("/tumor", *_case(IMG, IMG), 400, "bad_field"),
    "no image": ("/tumor", *_case(("explain", b"true", None)), 400, "missing_field"),
    "multipart without a boundary": ("/tumor", {"content-type": "multipart/form-data"}, b"abc", 400,
                                     "malformed_request"),
    "multipart garbage": ("/tumor", {"content-type": "multipart/form-data; boundary=XyZ"}, b"garbage",
                          400, "malformed_request"),
    "multipart cut short": ("/lesion", {"content-type": "multipart/form-data; boundary=XyZ"},
                            _multipart(IMG)[0][:200], 400, "malformed_request"),
    "part without a name": ("/tumor", {"content-type": "multipart/form-data; boundary=XyZ"},
                            b"--XyZ\r\nContent-Disposition: form-data\r\n\r\nx\r\n--XyZ--\r\n", 400,
                            "malformed_request"),
    "undeclared content type": ("/tumor", {"content-type": "text/plain"}, b"hello", 415,
                                "unsupported_media_type"),
    "url-encoded image as text": ("/predict", FORM, b"model=tumor&image=http%3A%2F%2F10.0.0.1%2F",
                                   400, "bad_field"),
    "url-encoded non-UTF-8": ("/predict", FORM, b"model=%FF%FE", 400, "bad_field"),
    "JSON not an object": ("/predict_array", {"content-type": "application/json"}, b"[1, 2]", 400,
                           "malformed_request"),
    "JSON invalid": ("/models", {"content-type": "application/json"}, b"{bad", 400, "malformed_request"),
    "JSON unknown field": ("/predict_array", {"content-type": "application/json"},
                           b'{"model": "tumor", "array": [[0]], "extra": 1}', 400, "unknown_field"),
    "JSON file field": ("/tumor", {"content-type": "application/json"}, b'{"image": "/etc/passwd"}', 400,
                        "bad_field"),
    "JSON wrong type": ("/predict_array", {"content-type": "application/json"},
                        b'{"model": "tumor", "array": "x"}', 400, "bad_field"),
    "JSON nested past any parser's depth": ("/predict_array", {"content-type": "application/json"},
                                            b'{"model": "tumor", "array": ' + b"[" * 100_000 + b"]" * 100_000
                                            + b"}", 400, "malformed_request"),
    "array nested 100 deep": ("/predict_array", {"content-type": "application/json"},
                              b'{"model": "tumor", "array": ' + b"[" * 100 + b"0" + b"]" * 100 + b"}", 400,
                              "bad_shape"),
    "explain not a boolean": ("/tumor", *_case(IMG, ("explain", b"maybe", None)), 400, "bad_field"),
    "US DICOM to a mammography model": ("/tumor", *_case(("image", images.dicom(images.ultrasound(4), "US"),
                                                          "u.dcm")), 400, "wrong_modality"),
    "CT DICOM to the ultrasound model": ("/lesion", *_case(("image", images.dicom(images.ultrasound(4), "CT"),
                                                            "c.dcm")), 400, "wrong_modality"),
    "US DICOM to the mammography segmenter": ("/mammo_lesion", *_case(
        ("image", images.dicom(images.ultrasound(4), "US"), "u.dcm")), 400, "wrong_modality"),
    "CT DICOM to analyze": ("/analyze", *_case(("image", images.dicom(images.mammogram(4), "CT"), "c.dcm")),
                            400, "wrong_modality"),
    "MG DICOM analyzed as ultrasound": ("/analyze", *_case(("image", images.dicom(images.mammogram(4), "MG"),
                                                            "m.dcm"), ("modality", b"ultrasound", None)),
                                       400, "wrong_modality"),
    "unknown route": ("/nothing", {"content-type": "application/json"}, b"{}", 404, "not_found"),
}


@pytest.mark.parametrize("case", list(HTTP_CASES))
def test_malformed_http_requests_are_4xx_with_their_code(service: Served, case: str) -> None:
    path, headers, body, status, code = HTTP_CASES[case]
    r = httpx.post(f"{service.http_url}{path}", headers=headers, content=body, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["code"] == code and r.json()["error"], r.text


def test_a_wrong_method_is_405_with_a_code(service: Served) -> None:
    r = httpx.get(f"{service.http_url}/tumor", timeout=10)
    assert r.status_code == 405 and r.json()["code"] == "method_not_allowed"


RAW_PREDICT = "/breastscan.v1.BreastScan/Predict"


def _raw_call(target: str, method: str, payload: bytes) -> grpc.RpcError:
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            call(payload, timeout=30)
    return info.value  # type: ignore[return-value]


@pytest.mark.parametrize("payload", [b"\xff\xff\xff", b"\x0a\x05tumor\x12\x03abc", b"\x08" * 7])
def test_a_message_that_is_not_protobuf_is_invalid_argument(service: Served, payload: bytes) -> None:
    error = _raw_call(service.grpc_target, RAW_PREDICT, payload)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert ("error-code", "malformed_request") in tuple(error.trailing_metadata() or ())


GRPC_CASES = {
    "US DICOM to tumor": (lambda g: g.predict("tumor", images.dicom(images.ultrasound(4), "US")),
                          "wrong_modality"),
    "CT DICOM to lesion": (lambda g: g.predict("lesion", images.dicom(images.ultrasound(4), "CT")),
                           "wrong_modality"),
    "US DICOM to mammo_lesion": (lambda g: g.predict("mammo_lesion", images.dicom(images.ultrasound(4),
                                                                                  "US")), "wrong_modality"),
    "CT DICOM to analyze": (lambda g: g.analyze(images.dicom(images.mammogram(4), "CT")), "wrong_modality"),
    "MG DICOM as ultrasound": (lambda g: g.analyze(images.dicom(images.mammogram(4), "MG"),
                                                   modality="ultrasound"), "wrong_modality"),
    "empty file": (lambda g: g.predict("tumor", b""), "empty"),
    "text as an image": (lambda g: g.predict("tumor", b"not an image at all"), "not_an_image"),
}


@pytest.mark.parametrize("case", list(GRPC_CASES))
def test_malformed_grpc_requests_are_invalid_argument(service: Served, case: str) -> None:
    call, code = GRPC_CASES[case]
    with GRPCClient(service.grpc_target) as g, pytest.raises(ServiceError) as info:
        call(g)
    assert info.value.status == grpc.StatusCode.INVALID_ARGUMENT and info.value.code == code


def test_an_unknown_grpc_method_is_unimplemented(service: Served) -> None:
    error = _raw_call(service.grpc_target, "/breastscan.v1.BreastScan/Nope", b"")
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


def test_schemathesis_finds_no_server_error(service: Served, tmp_path: Any) -> None:
    """Requests generated from the service's OpenAPI schema, every operation: no 5xx."""
    done = subprocess.run(
        [str(BIN / "schemathesis"), "run", f"{service.http_url}/docs.json", "--checks", "not_a_server_error",
         "--max-examples", "25", "--seed", "1", "--request-timeout", "60", "--no-color"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env={"PATH": str(BIN),
                                                           "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert re.search(r"\d+ generated, \d+ passed", done.stdout), done.stdout[-3000:]
    assert not re.search(r"status=5\d\d", service.log_text())


def _worker_rss(service: Served) -> int:
    children = psutil.Process(service.process.pid).children(recursive=True)
    return sum(p.memory_info().rss for p in children if "worker" in " ".join(p.cmdline()))


def _soak_call(service: Served, i: int) -> str:
    """One request of the soak: good or bad, HTTP or gRPC; its outcome as text."""
    kind = i % 6
    try:
        if kind in (0, 1):
            with HTTPClient(service.http_url) as h:
                return h.predict("tumor" if kind else "lesion", MG if kind else US)["model"]
        if kind == 2:
            with GRPCClient(service.grpc_target) as g:
                return g.predict("density", MG)["model"]
        if kind == 3:
            path, headers, body, _, _ = list(HTTP_CASES.values())[i % len(HTTP_CASES)]
            return str(httpx.post(f"{service.http_url}{path}", headers=headers, content=body,
                                  timeout=60).status_code)
        if kind == 4:
            with GRPCClient(service.grpc_target) as g:
                return g.predict("tumor", images.dicom(images.ultrasound(4), "US"))["model"]
        return _raw_call(service.grpc_target, RAW_PREDICT, b"\xff" * (i % 17 + 1)).code().name
    except ServiceError as exc:
        return exc.code


def test_a_short_soak_mixing_good_and_bad_requests(service: Served) -> None:
    """20 s at 8 clients: only expected outcomes, no 5xx, resident memory flat."""
    for i in range(12):  # warm-up: every kind once, allocations settled
        _soak_call(service, i)
    before, outcomes, deadline = _worker_rss(service), [], time.monotonic() + 20

    def client(k: int) -> list[str]:
        out, i = [], k
        while time.monotonic() < deadline:
            out.append(_soak_call(service, i))
            i += 8
        return out

    with ThreadPoolExecutor(8) as pool:
        for chunk in pool.map(client, range(8)):
            outcomes.extend(chunk)
    after = _worker_rss(service)
    allowed = {"lesion", "tumor", "density", "400", "404", "415", "wrong_modality", "INVALID_ARGUMENT"}
    assert set(outcomes) <= allowed, set(outcomes) - allowed
    assert len(outcomes) > 50
    assert after - before < 150 * 2**20, (before, after)  # no leak per request
    assert not re.search(r"status=5\d\d", service.log_text())
    with HTTPClient(service.http_url) as h:
        assert h.predict("tumor", MG)["model"] == "tumor"
    print(f"soak: {len(outcomes)} requests, worker RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB",
          file=sys.stderr)
