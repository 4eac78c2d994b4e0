"""The HTTP hot path (breastscan.serving.fastpath) behind the edge check
(breastscan.serving.edge.RequestCheck), as the service stacks them: what it answers itself from
the checked form, what it hands to the application unchanged (body replayed byte for byte),
and the answers it gives. What the edge refuses is tested in test_edge.py."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from urllib3.filepost import encode_multipart_formdata

from breastscan.serving import fastpath
from breastscan.serving.batching import Overloaded
from breastscan.serving.edge import FORM_STATE, RequestCheck, RouteSpec
from breastscan.serving.fastpath import HOT, ModelRoutes, answer
from breastscan.serving.http import read_body
from breastscan.serving.requests import InputError


def _route(path: str, *values: str, required: tuple[str, ...] = ("image",)) -> RouteSpec:
    return RouteSpec(path, files=frozenset({"image"}), values=frozenset(values), required=frozenset(required))


ROUTES = {"/tumor": _route("/tumor", "explain", "roi"), "/density": _route("/density", "explain", "roi"),
          "/predict": _route("/predict", "model", "explain", "roi", required=("model", "image"))}


class FakeEngine:
    """Records what the hot path asks for and answers like Engine.predict."""

    def __init__(self, error: Exception | None = None) -> None:
        self.calls: list[tuple[str, bytes | None, Any, bool]] = []
        self.error = error

    async def predict(self, model: str, image: Any, *, explain: bool = False) -> dict[str, Any]:
        self.calls.append((model, image.data, image.roi, explain))
        if self.error is not None:
            raise self.error
        return {"model": model, "explain": explain}


class App:
    """The wrapped application: records the body (and the checked form) it received."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.forms: list[Any] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.bodies.append(await read_body(receive))
        self.forms.append(scope.get("state", {}).get(FORM_STATE))
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b"app"})


def call(fields: dict[str, Any] | None, *, path: str = "/tumor", method: str = "POST",
         content_type: str | None = None, body: bytes | None = None,
         chunks: int = 1) -> tuple[int, bytes, dict[str, str], App]:
    """Send one request through RequestCheck(ModelRoutes(App)); ``(status, body, headers, app)``."""
    if fields is not None:
        body, ctype = encode_multipart_formdata(fields)
        content_type = content_type or ctype
    body = body or b""
    app = App()
    routes = RequestCheck(ModelRoutes(app, models=["tumor", "density"]), routes=ROUTES)
    headers = [(b"content-type", content_type.encode())] if content_type else []
    scope = {"type": "http", "method": method, "path": path, "headers": headers}
    size = max(1, len(body) // chunks + 1)
    parts = [body[i:i + size] for i in range(0, len(body), size)] or [b""]
    messages = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1}
                for i, p in enumerate(parts)]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(routes(scope, receive, send))
    start = sent[0]
    return (start["status"], b"".join(m.get("body", b"") for m in sent[1:]),
            {k.decode(): v.decode() for k, v in start["headers"]}, app)


@pytest.fixture
def engine() -> Any:
    fake = FakeEngine()
    HOT.engine, HOT.on_answer = fake, None  # type: ignore[assignment]
    yield fake
    HOT.engine = None


IMAGE = ("i.png", b"\x89PNG fake", "image/png")


def test_an_upload_is_answered_on_the_hot_path(engine: FakeEngine) -> None:
    status, body, headers, app = call({"image": IMAGE, "explain": "true", "roi": "1, 2, 30,40"}, chunks=3)
    assert status == 200 and json.loads(body) == {"model": "tumor", "explain": True}
    assert headers["content-type"] == "application/json" and int(headers["content-length"]) == len(body)
    assert engine.calls == [("tumor", b"\x89PNG fake", (1, 2, 30, 40), True)]
    assert app.bodies == []


@pytest.mark.parametrize("fields", [
    {"image": IMAGE, "explain": "maybe"},               # values BentoML reads its own way
    {"image": IMAGE, "explain": "yes"},
    {"image": IMAGE, "roi": "[1, 2, 3, 4]"},
    {"image": IMAGE, "roi": '"1,2,3,4"'},               # how BentoML's own client sends a str
])
def test_values_bentoml_reads_its_own_way_go_to_the_application_intact(engine: FakeEngine,
                                                                       fields: dict[str, Any]) -> None:
    sent, _ = encode_multipart_formdata(fields, boundary="b0undary")
    status, body, _, app = call(None, body=sent, content_type="multipart/form-data; boundary=b0undary",
                                chunks=2)
    assert (status, body) == (299, b"app") and app.bodies == [sent] and engine.calls == []
    assert app.forms[0] is not None and set(app.forms[0].parts) == set(fields)


@pytest.mark.parametrize(("fields", "content_type", "code"), [
    ({"image": IMAGE, "comment": "x"}, None, "unknown_field"),
    ({"explain": "true"}, None, "missing_field"),
    ({"image": "http://example.org/x.png"}, None, "bad_field"),   # a text part where the file belongs
    ([("image", IMAGE), ("image", IMAGE)], None, "bad_field"),
    (b"--x\r\nnonsense", "multipart/form-data; boundary=x", "malformed_request"),
    (b'{"explain": true}', "application/json", "missing_field"),
])
def test_what_the_edge_refuses_reaches_neither_path(engine: FakeEngine, fields: Any, content_type: str | None,
                                                    code: str) -> None:
    if isinstance(fields, bytes):
        status, body, _, app = call(None, body=fields, content_type=content_type)
    else:
        status, body, _, app = call(fields)
    assert status == 400 and json.loads(body)["code"] == code
    assert app.bodies == [] and engine.calls == []


@pytest.mark.parametrize("kwargs", [{"path": "/predict"}, {"path": "/lesion"}, {"method": "GET"}])
def test_other_routes_and_methods_are_not_touched(engine: FakeEngine, kwargs: dict[str, Any]) -> None:
    fields = {"image": IMAGE, "model": "tumor"} if kwargs.get("path") == "/predict" else {"image": IMAGE}
    sent, ctype = encode_multipart_formdata(fields)
    status, _, _, app = call(None, body=sent, content_type=ctype, **kwargs)
    assert status == 299 and engine.calls == [] and app.bodies == [sent]


@pytest.mark.parametrize("state", [{}, {FORM_STATE: None}])
def test_without_a_checked_form_requests_go_to_the_application(engine: FakeEngine,
                                                               state: dict[str, Any]) -> None:
    """ModelRoutes only reads what RequestCheck has parsed: a JSON body, or no RequestCheck outside."""
    sent, ctype = encode_multipart_formdata({"image": IMAGE})
    app = App()
    scope = {"type": "http", "method": "POST", "path": "/tumor", "state": state,
             "headers": [(b"content-type", ctype.encode())]}
    messages = [{"type": "http.request", "body": sent, "more_body": False}]
    replies: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        replies.append(message)

    asyncio.run(ModelRoutes(app, models=["tumor"])(scope, receive, send))
    assert replies[0]["status"] == 299 and app.bodies == [sent] and engine.calls == []


def test_before_the_models_are_loaded_requests_go_to_the_application() -> None:
    HOT.engine = None
    assert call({"image": IMAGE})[0] == 299


def test_answers_refusals_and_shedding() -> None:
    async def ok() -> dict[str, Any]:
        return {"p": 0.5}

    def failing(exc: Exception) -> Any:
        async def run() -> None:
            raise exc
        return run

    good = asyncio.run(answer("tumor", ok))
    assert (good.status, json.loads(good.body), good.outcome) == (200, {"p": 0.5}, "ok")
    bad = asyncio.run(answer("tumor", failing(InputError("not_an_image", "no"))))
    assert (bad.status, json.loads(bad.body), bad.outcome) == (400, {"error": "no", "code": "not_an_image"},
                                                               "not_an_image")
    big = asyncio.run(answer("tumor", failing(InputError("too_large", "big"))))
    assert big.status == 413
    shed = asyncio.run(answer("tumor", failing(Overloaded())))
    assert (shed.status, shed.headers, shed.outcome) == (503, {"Retry-After": "1"}, "overloaded")
    with pytest.raises(RuntimeError):
        asyncio.run(answer("tumor", failing(RuntimeError("a bug stays a bug"))))


def test_the_outcome_is_counted(engine: FakeEngine) -> None:
    seen: list[tuple[str, str]] = []
    fastpath.HOT.on_answer = lambda endpoint, outcome: seen.append((endpoint, outcome))
    engine.error = InputError("bad_roi", "roi outside")
    status, body, _, _ = call({"image": IMAGE, "roi": "0,0,5,5"}, path="/density")
    assert status == 400 and json.loads(body)["code"] == "bad_roi"
    assert seen == [("density", "bad_roi")]
