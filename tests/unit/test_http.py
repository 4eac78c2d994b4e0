"""The HTTP edge (breastscan.serving.edge, breastscan.serving.http): every API request checked
against its route's declared fields before the framework parses it, every refusal a 4xx
``{"error", "code"}`` naming the problem, the framework's own 4xx answers normalized, and
oversize bodies answered 413 after what the client is still sending has been read."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from urllib3.filepost import encode_multipart_formdata

from breastscan.serving import http
from breastscan.serving.edge import (
    FORM_STATE,
    MAX_PARTS,
    Form,
    RequestCheck,
    RouteSpec,
    check_request,
    normalized_error,
    parse_multipart,
    route_specs,
    send_error,
)
from breastscan.serving.http import DRAIN_FACTOR, RequestGuard, read_body
from breastscan.serving.requests import InputError

ROUTES = {
    "/tumor": RouteSpec("/tumor", files=frozenset({"image"}), values=frozenset({"explain", "roi"}),
                        required=frozenset({"image"})),
    "/predict_array": RouteSpec("/predict_array", values=frozenset({"model", "array", "dtype"}),
                                required=frozenset({"model", "array"})),
    "/models": RouteSpec("/models"),
}
IMAGE = ("i.png", b"\x89PNG fake", "image/png")
BOUNDARY = "b0undary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


# --------------------------------------------------------------------------- harness


@dataclass
class Result:
    status: int
    headers: dict[str, str]
    body: bytes
    receives: int  # how many times the server called receive
    messages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class App:
    """The wrapped application: records what reached it, answers ``answer`` (default 299 "app")."""

    def __init__(self, status: int = 299, chunks: tuple[bytes, ...] = (b"app",),
                 headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        self.status, self.chunks, self.headers = status, chunks, list(headers)
        self.bodies: list[bytes] = []
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        self.bodies.append(await read_body(receive))
        await send({"type": "http.response.start", "status": self.status, "headers": list(self.headers)})
        for i, chunk in enumerate(self.chunks):
            await send({"type": "http.response.body", "body": chunk, "more_body": i < len(self.chunks) - 1})


def run(asgi: Any, *, method: str = "POST", path: str = "/tumor", body: bytes = b"",
        headers: dict[str, str] | None = None, chunks: int = 1, hang: bool = False,
        stall: bool = False) -> Result:
    """Send one request through ``asgi``; the body in ``chunks`` messages.

    After the body, ``receive`` answers ``http.disconnect`` (or, with ``hang``, never answers:
    what a real server does until the response is sent). With ``stall`` the client stops
    before its body ends (the last message says more is coming, and nothing comes).
    """
    size = max(1, -(-len(body) // chunks))
    pieces = [body[i:i + size] for i in range(0, len(body), size)] or [b""]
    messages = [{"type": "http.request", "body": p, "more_body": stall or i < len(pieces) - 1}
                for i, p in enumerate(pieces)]
    hang = hang or stall
    scope = {"type": "http", "method": method, "path": path,
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}
    sent: list[dict[str, Any]] = []
    calls = 0

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if messages:
            return messages.pop(0)
        if hang:
            await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(asyncio.wait_for(asgi(scope, receive, send), 10))
    start = sent[0]
    assert start["type"] == "http.response.start"
    return Result(start["status"], {k.decode(): v.decode() for k, v in start["headers"]},
                  b"".join(m.get("body", b"") for m in sent[1:]), calls, sent)


def multipart(fields: Any) -> bytes:
    return encode_multipart_formdata(fields, boundary=BOUNDARY)[0]


def check(body: bytes, content_type: str | None = MULTIPART, *, path: str = "/tumor",
          chunks: int = 1) -> tuple[Result, App]:
    app = App()
    headers = {"content-type": content_type} if content_type is not None else {}
    return run(RequestCheck(app, routes=ROUTES), path=path, body=body, headers=headers, chunks=chunks), app


def refused(body: bytes, content_type: str | None = MULTIPART, *, path: str = "/tumor",
            status: int = 400) -> tuple[str, str]:
    """``(code, message)`` of a request the edge refuses (the application never sees it)."""
    result, app = check(body, content_type, path=path)
    assert result.status == status, result.body
    assert result.headers["content-type"] == "application/json"
    assert int(result.headers["content-length"]) == len(result.body)
    assert set(result.json) == {"error", "code"} and app.scopes == []
    return result.json["code"], result.json["error"]


# --------------------------------------------------------------------------- multipart


def test_a_multipart_type_without_boundary_is_malformed() -> None:
    code, message = refused(multipart({"image": IMAGE}), "multipart/form-data")
    assert code == "malformed_request" and "boundary" in message


def test_a_body_that_is_not_multipart_is_malformed() -> None:
    code, message = refused(b"this is not a multipart body at all", MULTIPART)
    assert code == "malformed_request" and "does not parse" in message


def test_a_body_cut_before_its_closing_boundary_is_malformed() -> None:
    whole = multipart({"image": IMAGE, "explain": "true"})
    for cut in (whole[:-10], whole[: len(whole) // 2], b""):
        code, message = refused(cut)
        assert code == "malformed_request" and "closing boundary" in message


@pytest.mark.parametrize("headers", [b"Content-Disposition: form-data", b"Content-Type: text/plain",
                                     b'Content-Disposition: attachment; name="image"'])
def test_a_part_without_a_form_data_name_is_malformed(headers: bytes) -> None:
    dashes = b"--" + BOUNDARY.encode()
    body = dashes + b"\r\n" + headers + b"\r\n\r\nabc\r\n" + dashes + b"--\r\n"
    code, message = refused(body)
    assert code == "malformed_request" and "Content-Disposition: form-data; name=" in message


def test_too_many_parts_are_malformed() -> None:
    code, message = refused(multipart([("explain", "true")] * (MAX_PARTS + 1)))
    assert code == "malformed_request" and f"more than {MAX_PARTS} parts" in message
    # the limit is on parts, not fields: at the limit the parse goes on to the field checks
    assert refused(multipart([("explain", "true")] * MAX_PARTS))[0] == "bad_field"


def test_parse_multipart_keeps_parts_in_order_with_their_kind() -> None:
    parts = parse_multipart(f'multipart/form-data; boundary="{BOUNDARY}"',
                            multipart([("image", IMAGE), ("roi", "1,2,3,4"), ("explain", "")]))
    assert [(p.name, p.data, p.filename, p.is_file) for p in parts] == [
        ("image", IMAGE[1], "i.png", True), ("roi", b"1,2,3,4", None, False), ("explain", b"", None, False)]


def test_an_unknown_field_is_named_with_the_declared_fields() -> None:
    code, message = refused(multipart({"image": IMAGE, "comment": "x"}))
    assert code == "unknown_field"
    assert "'comment'" in message and "/tumor" in message and "image (file), explain, roi" in message


def test_a_field_sent_twice_is_refused() -> None:
    code, message = refused(multipart([("image", IMAGE), ("image", IMAGE)]))
    assert code == "bad_field" and "'image'" in message and "more than once" in message
    assert refused(multipart([("image", IMAGE), ("roi", "1,2,3,4"), ("roi", "1,2,3,4")]))[0] == "bad_field"


def test_a_url_where_the_file_belongs_is_refused() -> None:
    """A text ``image`` (say a URL the framework would fetch) never reaches the application."""
    code, message = refused(multipart({"image": "http://169.254.169.254/latest/meta-data/"}))
    assert code == "bad_field" and "'image'" in message and "file upload" in message


def test_a_file_where_text_belongs_is_refused() -> None:
    code, message = refused(multipart({"image": IMAGE, "explain": ("e.txt", b"true", "text/plain")}))
    assert code == "bad_field" and "'explain'" in message and "text field" in message


def test_text_that_is_not_utf8_is_refused() -> None:
    code, message = refused(multipart({"image": IMAGE, "roi": b"\xff\xfe"}))
    assert code == "bad_field" and "'roi'" in message and "UTF-8" in message


def test_a_missing_required_field_is_named() -> None:
    code, message = refused(multipart({"explain": "true"}))
    assert code == "missing_field" and "'image'" in message and "multipart/form-data" in message
    code, message = refused(b'{"explain": true}', "application/json")
    assert code == "missing_field" and "'image'" in message
    code, message = refused(b'{"model": "tumor"}', "application/json", path="/predict_array")
    assert code == "missing_field" and "'array'" in message and "'model'" not in message


# --------------------------------------------------------------------------- JSON


@pytest.mark.parametrize(("body", "code", "words"), [
    (b'{"model": "tumor", "array": [[1]', "malformed_request", "not valid JSON"),
    (b"[1, 2]", "malformed_request", "must be an object"),
    (b'"text"', "malformed_request", "must be an object"),
    (b'{"model": "tumor", "array": [[1]], "colour": "red"}', "unknown_field", "'colour'"),
])
def test_json_bodies_are_checked(body: bytes, code: str, words: str) -> None:
    got, message = refused(body, "application/json", path="/predict_array")
    assert got == code and words in message
    if code == "unknown_field":
        assert "array, dtype, model" in message


def test_a_file_field_cannot_travel_in_json() -> None:
    code, message = refused(b'{"image": "http://example.org/x.png"}', "application/json")
    assert code == "bad_field" and "'image'" in message and "file part" in message


def test_a_good_json_body_reaches_the_application_intact() -> None:
    body = b'{"model": "tumor", "array": [[1, 2], [3, 4]], "dtype": null}'
    for ctype in ("application/json", "application/json; charset=utf-8", "application/vnd.api+json",
                  "Application/JSON"):
        result, app = check(body, ctype, path="/predict_array", chunks=3)
        assert (result.status, result.body) == (299, b"app") and app.bodies == [body], ctype
        assert app.scopes[0]["state"][FORM_STATE] is None


def test_an_empty_body_passes_on_a_route_without_required_fields() -> None:
    for ctype in (None, "application/json"):
        result, app = check(b"", ctype, path="/models")
        assert result.status == 299 and app.bodies == [b""]
    assert refused(b"", None)[0] == "missing_field"  # /tumor needs its image


# --------------------------------------------------------------------------- content types


@pytest.mark.parametrize("ctype", ["text/plain", "image/png", None])
def test_other_content_types_are_unsupported(ctype: str | None) -> None:
    code, message = refused(b"image=x", ctype, status=415)
    assert code == "unsupported_media_type"
    assert repr(ctype or "(none)") in message and "multipart/form-data" in message


URLENCODED = "application/x-www-form-urlencoded"


@pytest.mark.parametrize(("body", "code", "names"), [
    (b"image=http%3A%2F%2Fexample.org%2Fx.png", "bad_field", "'image'"),   # no file in a url-encoded form
    (b"explain=true", "missing_field", "'image'"),
    (b"roi=%FF%FE&image=x", "bad_field", "'roi'"),                        # not UTF-8 once decoded
    (b"comment=x", "unknown_field", "'comment'"),
])
def test_a_url_encoded_form_is_checked_like_a_multipart_one(body: bytes, code: str, names: str) -> None:
    got, message = refused(body, URLENCODED)
    assert got == code and names in message


def test_a_url_encoded_form_of_text_fields_passes() -> None:
    result, app = check(b"", URLENCODED, path="/models")
    assert result.status == 299 and app.bodies == [b""]


# --------------------------------------------------------------------------- what passes


def test_a_good_upload_reaches_the_application_byte_for_byte_with_its_form() -> None:
    body = multipart([("image", IMAGE), ("explain", "true"), ("roi", "1,2,30,40")])
    result, app = check(body, chunks=4)
    assert (result.status, result.body) == (299, b"app") and app.bodies == [body]
    form = app.scopes[0]["state"][FORM_STATE]
    assert isinstance(form, Form) and set(form.parts) == {"image", "explain", "roi"}
    assert form.parts["image"].data == IMAGE[1] and form.parts["image"].filename == "i.png"
    assert form.text("roi") == "1,2,30,40" and form.text("missing", "d") == "d"


def test_check_request_returns_the_form_or_none() -> None:
    spec = ROUTES["/tumor"]
    form = check_request(spec, "Multipart/Form-Data; boundary=" + BOUNDARY, multipart({"image": IMAGE}))
    assert form is not None and list(form.parts) == ["image"]
    assert check_request(ROUTES["/models"], "", b"  ") is None
    with pytest.raises(InputError) as info:
        check_request(spec, "text/csv", b"a,b")
    assert info.value.code == "unsupported_media_type"


@pytest.mark.parametrize(("method", "path"), [("GET", "/tumor"), ("PUT", "/tumor"), ("POST", "/ui/upload"),
                                              ("POST", "/tumor/extra")])
def test_other_methods_and_paths_pass_untouched(method: str, path: str) -> None:
    app = App()
    body = b"not multipart, not checked"
    result = run(RequestCheck(app, routes=ROUTES), method=method, path=path, body=body, chunks=2,
                 headers={"content-type": "text/plain"})
    assert (result.status, result.body) == (299, b"app") and app.bodies == [body]
    assert FORM_STATE not in app.scopes[0].get("state", {})
    assert result.receives == 2  # read by the application itself, chunk by chunk


def test_other_scope_types_pass_untouched() -> None:
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    for kind in ("lifespan", "websocket"):
        asyncio.run(RequestCheck(app, routes=ROUTES)({"type": kind, "path": "/tumor"}, None, None))
    assert seen == ["lifespan", "websocket"]


def test_send_error_sends_a_complete_json_answer() -> None:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(send_error(send, 418, "bad_request", "no tea", headers=[(b"x-a", b"1")]))
    start, body = sent
    assert start["status"] == 418 and (b"x-a", b"1") in start["headers"]
    assert json.loads(body["body"]) == {"error": "no tea", "code": "bad_request"}
    assert (b"content-length", str(len(body["body"])).encode()) in start["headers"]


# --------------------------------------------------------------------------- the framework's answers


def test_pydantic_validation_errors_name_the_field() -> None:
    body = json.dumps({"error": "1 validation error for Input",
                       "detail": [{"loc": ["explain"], "msg": "Input should be a valid boolean",
                                   "type": "bool_parsing"}]}).encode()
    fixed = json.loads(normalized_error(400, body) or b"")
    assert fixed["code"] == "bad_field" and "'explain'" in fixed["error"]
    assert "Input should be a valid boolean" in fixed["error"]
    nested = json.dumps({"detail": [{"loc": ["array", 0, 1], "msg": "bad number"}]}).encode()
    assert "'array.0.1'" in json.loads(normalized_error(400, nested) or b"")["error"]
    nowhere = json.dumps({"detail": [{"loc": [], "msg": "bad body"}]}).encode()
    assert json.loads(normalized_error(400, nowhere) or b"") == {"error": "bad body",
                                                                  "code": "malformed_request"}


@pytest.mark.parametrize(("status", "body", "code", "message"), [
    (404, b'{"detail": "Not Found"}', "not_found", "Not Found"),
    (405, b'{"detail": "Method Not Allowed"}', "method_not_allowed", "Method Not Allowed"),
    (404, b"Not Found", "not_found", "Not Found"),                    # plain text
    (400, b'{"error": "task_id is required"}', "bad_request", "task_id is required"),
    (400, b'[{"error": "Invalid input"}]', "bad_request", "Invalid input"),  # BentoMLException 4xx
    (422, b"", "bad_request", "bad request"),
    (400, b"\xff\xfe not json", "bad_request", "\ufffd\ufffd not json"),
])
def test_other_framework_errors_get_a_code(status: int, body: bytes, code: str, message: str) -> None:
    assert json.loads(normalized_error(status, body) or b"") == {"error": message, "code": code}


def test_an_answer_already_in_shape_is_left_alone() -> None:
    assert normalized_error(400, b'{"error": "no", "code": "not_an_image"}') is None


def _through_check(app: App, method: str = "GET") -> Result:
    return run(RequestCheck(app, routes=ROUTES), method=method, path="/tumor")


def test_a_framework_4xx_is_rewritten_with_its_length() -> None:
    app = App(400, (b'{"error": "1 validation error", ', b'"detail": [{"loc": ["roi"], "msg": "bad"}]}'),
              headers=((b"content-type", b"application/json"), (b"Content-Length", b"75"), (b"x-keep", b"1")))
    result = _through_check(app)
    assert result.status == 400 and result.json == {"error": "field 'roi': bad", "code": "bad_field"}
    assert int(result.headers["content-length"]) == len(result.body)
    assert result.headers["content-type"] == "application/json" and result.headers["x-keep"] == "1"
    assert len(result.messages) == 2  # one start, one body


def test_a_4xx_already_in_shape_passes_unchanged() -> None:
    shaped = b'{"error": "no", "code": "not_an_image"}'
    headers = ((b"content-type", b"application/json"), (b"content-length", str(len(shaped)).encode()))
    result = _through_check(App(400, (shaped,), headers))
    assert (result.status, result.body) == (400, shaped)
    assert result.messages[0]["headers"] == list(headers)


@pytest.mark.parametrize("status", [200, 299, 500, 503])
def test_2xx_and_5xx_pass_unchanged(status: int) -> None:
    chunks = (b'{"error": "An unexpected error', b' has occurred"}')
    headers = ((b"content-type", b"application/json"), (b"content-length", b"44"))
    result = _through_check(App(status, chunks, headers))
    assert result.status == status and result.body == b"".join(chunks)
    assert result.messages[0]["headers"] == list(headers) and len(result.messages) == 3  # streamed as sent


def test_a_refused_value_from_behind_the_edge_is_normalized_on_post() -> None:
    app = App(400, (json.dumps({"error": "1 validation error for Input",
                                "detail": [{"loc": ["explain"], "msg": "Input should be a valid boolean"}]}
                               ).encode(),))
    body = multipart({"image": IMAGE, "explain": "maybe"})
    result = run(RequestCheck(app, routes=ROUTES), body=body, headers={"content-type": MULTIPART})
    assert app.bodies == [body] and result.status == 400
    assert result.json["code"] == "bad_field" and "'explain'" in result.json["error"]


# --------------------------------------------------------------------------- route specs


def _field(required: bool) -> Any:
    return SimpleNamespace(is_required=lambda: required)


def test_route_specs_read_the_services_input_schemas() -> None:
    def api(route: str, fields: dict[str, bool], files: list[str] | None) -> Any:
        spec = SimpleNamespace(model_fields={n: _field(r) for n, r in fields.items()})
        if files is not None:
            spec.multipart_fields = files
        return SimpleNamespace(route=route, input_spec=spec)

    specs = route_specs({
        "tumor": api("/tumor", {"image": True, "explain": False, "roi": False}, ["image"]),
        "predict_array": api("/predict_array", {"model": True, "array": True, "dtype": False}, []),
        "models": api("/models", {}, None),
    })
    assert set(specs) == {"/tumor", "/predict_array", "/models"}
    assert specs["/tumor"] == ROUTES["/tumor"]
    assert specs["/predict_array"] == ROUTES["/predict_array"]
    assert specs["/models"] == RouteSpec("/models") and specs["/models"].listing() == "no fields"


# --------------------------------------------------------------------------- RequestGuard: 413


LIMIT = 100


class Spy:
    """The application behind the guard: reads the whole body (or records that it was not called)."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.calls += 1
        body = await read_body(receive)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(body)).encode()})


def guarded(size: int, *, declared: bool = True, chunks: int = 1, expect: bool = False,
            hang: bool = False) -> tuple[Result, Spy]:
    spy = Spy()
    headers = {"content-length": str(size)} if declared else {}
    if expect:
        headers["expect"] = "100-continue"
    result = run(RequestGuard(spy, max_body_bytes=LIMIT), body=b"x" * size, headers=headers,
                 chunks=chunks, hang=hang)
    return result, spy


def _too_large(result: Result, size: int) -> None:
    assert result.status == 413 and result.json["code"] == "too_large"
    assert f"{size} bytes" in result.json["error"] and f"limit of {LIMIT} bytes" in result.json["error"]
    assert len(result.headers["x-request-id"]) == 32


def test_a_body_at_the_limit_passes() -> None:
    result, spy = guarded(LIMIT, chunks=3)
    assert (result.status, result.body, spy.calls) == (200, b"100", 1)


def test_a_declared_oversize_body_waiting_for_100_continue_is_refused_unread() -> None:
    result, spy = guarded(3 * LIMIT, chunks=6, expect=True, hang=True)
    _too_large(result, 3 * LIMIT)
    assert result.receives == 0 and spy.calls == 0


def test_a_declared_oversize_body_is_drained_before_the_413() -> None:
    result, spy = guarded(3 * LIMIT, chunks=6, hang=True)
    _too_large(result, 3 * LIMIT)
    assert result.receives == 6 and spy.calls == 0  # every chunk read, none after the last


def test_a_streamed_oversize_body_is_drained_before_the_413() -> None:
    result, spy = guarded(3 * LIMIT, declared=False, chunks=6, hang=True)
    _too_large(result, LIMIT + 50)  # counted up to the chunk that went over
    assert result.receives == 6 and spy.calls == 1


def test_a_streamed_body_going_over_in_its_last_chunk_is_not_read_further() -> None:
    result, spy = guarded(LIMIT + 20, declared=False, chunks=2, hang=True)
    _too_large(result, LIMIT + 20)
    assert result.receives == 2


def test_a_body_over_the_drain_cap_is_not_drained() -> None:
    huge = DRAIN_FACTOR * LIMIT + 1
    result, spy = guarded(huge, chunks=4, hang=True)
    _too_large(result, huge)
    assert result.receives == 0
    # streamed: the first chunk alone is over the cap, the rest is left unread
    result, spy = guarded(2 * huge, declared=False, chunks=2, hang=True)
    assert result.status == 413 and result.receives == 1


def test_a_client_lying_about_its_length_is_drained_only_up_to_the_cap() -> None:
    spy = Spy()
    body = b"x" * (10 * LIMIT)
    result = run(RequestGuard(spy, max_body_bytes=LIMIT), body=body, chunks=20, hang=True,
                 headers={"content-length": str(2 * LIMIT)})
    assert result.status == 413 and result.receives == 9  # 9 x 50 bytes > 4 x 100


def test_draining_stops_after_drain_s(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "DRAIN_S", 0.05)
    # the client declares 3x the limit and sends one chunk, then stalls
    spy = Spy()
    result = run(RequestGuard(spy, max_body_bytes=LIMIT), body=b"x" * 50, stall=True,
                 headers={"content-length": str(3 * LIMIT)})
    assert result.status == 413 and result.receives == 2 and spy.calls == 0
