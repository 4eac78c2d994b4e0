"""The service's HTTP API (breastscan.serving.http.Edge), driven as a plain ASGI app.

Every API request is parsed once (breastscan.serving.request.parse_http) and answered by the
engine; every refusal is the error table's status with an ``{"error", "code"}`` body naming
the problem; what is not the API goes to the wrapped application, whose 4xx answers are
normalized; oversize bodies are answered 413 after what the client is still sending has been
read. The engine here is the real :class:`breastscan.serving.engine.Engine` over fake model
calls (no Keras), or a fake that records the parsed requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import numpy as np
import pytest
from urllib3.filepost import encode_multipart_formdata

from breastscan.bundle import ModelContract
from breastscan.imaging.preprocessing import PreprocessSpec
from breastscan.serving import http
from breastscan.serving.answer import INTERNAL_MESSAGE, ApiError, Preview, to_json
from breastscan.serving.batching import OVERLOADED_MESSAGE, Overloaded
from breastscan.serving.engine import Engine, ServedModel
from breastscan.serving.http import DRAIN_FACTOR, Edge, normalized_error, read_body, send_error
from breastscan.serving.request import (
    MAX_PARTS,
    ImageInput,
    Request,
    api_routes,
    parse_multipart,
    predict_request,
)
from tests.services import images

MODELS = ("density", "lesion", "tumor")
ROUTES = api_routes(MODELS)
IMAGE = ("i.png", b"\x89PNG fake", "image/png")
BOUNDARY = "b0undary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
URLENCODED = "application/x-www-form-urlencoded"
BIG = 1 << 22  # the body limit where a test is not about it


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
    """The wrapped application: records what reached it, answers ``status`` with ``chunks``."""

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


class FakeEngine:
    """Records the parsed requests; answers a preview, or raises ``error``, or sleeps ``delay`` s."""

    def __init__(self, error: Exception | None = None, delay: float = 0.0) -> None:
        self.requests: list[Request] = []
        self.error, self.delay = error, delay

    async def answer(self, request: Request) -> Preview:
        self.requests.append(request)
        await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return Preview(width=1, height=2, modality=None, png=b"png")


def edge(app: Any = None, engine: Any = None, *, limit: int = BIG, timeout_s: float = 10.0,
         on_answer: Callable[[str, str], None] | None = None) -> Edge:
    """The edge over ``app`` (default :class:`App`) with ``engine`` (default a :class:`FakeEngine`)."""
    engine = FakeEngine() if engine is None else engine
    return Edge(App() if app is None else app, routes=ROUTES, engine=lambda: engine, max_body_bytes=limit,
                timeout_s=timeout_s, on_answer=on_answer)


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


def post(body: bytes, content_type: str | None = MULTIPART, *, path: str = "/tumor", chunks: int = 1,
         engine: Any = None) -> tuple[Result, App, Any]:
    """POST ``body`` through the edge: ``(result, the wrapped app, the engine)``."""
    app, engine = App(), FakeEngine() if engine is None else engine
    headers = {"content-type": content_type} if content_type is not None else {}
    return run(edge(app, engine), path=path, body=body, headers=headers, chunks=chunks), app, engine


def refused(body: bytes, content_type: str | None = MULTIPART, *, path: str = "/tumor",
            status: int = 400) -> tuple[str, str]:
    """``(code, message)`` of a request the edge refuses (neither the app nor the engine sees it)."""
    result, app, engine = post(body, content_type, path=path)
    assert result.status == status, result.body
    assert result.headers["content-type"] == "application/json"
    assert int(result.headers["content-length"]) == len(result.body)
    assert set(result.json) == {"error", "code"} and app.scopes == [] and engine.requests == []
    return result.json["code"], result.json["error"]


# --------------------------------------------------------------------------- a real engine, fake models


SPEC = PreprocessSpec(height=32, width=24)


def _contract(name: str, modality: str, task: str) -> ModelContract:
    names = ("A", "B", "C", "D") if name == "density" else ("benign", "malignant", "normal")
    classes = names if task == "classification" else ()
    return ModelContract(name=name, task=task, label="x", classes=classes, class_names=classes or ("lesion",),
                         input_shape=(32, 24, 1), dataset="d", modality=modality, spec_id=SPEC.spec_id)


def fake_model_engine() -> Engine:
    """The engine over fake models whose answers depend on the image (its mean, its bright pixels)."""
    models = {n: ServedModel(n, SPEC, _contract(n, modality, task), "3", "production")
              for n, modality, task in [("density", "mammography", "classification"),
                                        ("tumor", "mammography", "classification"),
                                        ("lesion", "ultrasound", "segmentation")]}

    async def infer(name: str, batch: np.ndarray) -> np.ndarray:
        if name == "lesion":
            return (batch > 0.5).astype(np.float32)
        k = len(models[name].contract.class_names)
        logits = batch.mean(axis=(1, 2, 3))[:, None] * np.arange(1, k + 1, dtype=np.float32)
        return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)

    async def explain(name: str, batch: np.ndarray, classes: list[int]) -> np.ndarray:
        return batch[..., 0]

    return Engine(models, infer, explain, max_upload_bytes=1 << 20)


@pytest.fixture(scope="module")
def mammogram() -> np.ndarray:
    return images.mammogram(1)


def _answer(engine: Engine, request: Request) -> bytes:
    return to_json(asyncio.run(engine.answer(request)))


# --------------------------------------------------------------------------- one parse, one answer


def test_a_model_route_and_predict_give_the_same_bytes_as_the_engine(mammogram: np.ndarray) -> None:
    engine = fake_model_engine()
    png = images.png(mammogram)
    upload = ("m.png", png, "image/png")
    options = [("explain", "true"), ("roi", "4, 8,50,60")]
    by_model, app, _ = post(multipart([("image", upload), *options]), engine=engine, chunks=3)
    by_name, _, _ = post(multipart([("model", "tumor"), ("image", upload), *options]), path="/predict",
                         engine=engine)
    assert by_model.status == by_name.status == 200 and app.scopes == []
    assert by_model.body == by_name.body == _answer(
        engine, predict_request("tumor", ImageInput(data=png, roi=(4, 8, 50, 60)), explain=True))
    assert (by_model.json["width"], by_model.json["height"], by_model.json["roi"]) == (50, 60, [4, 8, 50, 60])
    assert "heatmap_png" in by_model.json
    assert by_model.headers["content-type"] == "application/json"
    assert int(by_model.headers["content-length"]) == len(by_model.body)


def test_json_url_encoded_and_multipart_bodies_give_the_same_answer(mammogram: np.ndarray) -> None:
    """An array sent as JSON or in a url-encoded form, and the same pixels as a PNG upload."""
    engine = fake_model_engine()
    values = mammogram.tolist()
    as_json, _, _ = post(json.dumps({"model": "tumor", "array": values, "dtype": "uint8", "explain": False,
                                     "roi": None}).encode(), "application/json", path="/predict_array",
                         engine=engine)
    form = urlencode({"model": "tumor", "array": json.dumps(values), "dtype": "uint8", "explain": "off"})
    as_form, _, _ = post(form.encode(), URLENCODED, path="/predict_array", engine=engine)
    upload, _, _ = post(multipart({"image": ("m.png", images.png(mammogram), "image/png")}), engine=engine)
    assert as_json.status == as_form.status == upload.status == 200
    assert as_json.body == as_form.body == upload.body == _answer(
        engine, predict_request("tumor", ImageInput.from_array(values, "uint8")))
    models, _, _ = post(b"", URLENCODED, path="/models", engine=engine)
    assert [m["name"] for m in models.json] == list(MODELS)


def test_analyze_preview_and_models_are_the_engines_answers(mammogram: np.ndarray) -> None:
    engine = fake_model_engine()
    png = images.png(mammogram)
    analyzed, _, _ = post(multipart({"image": ("m.png", png, "image/png"), "modality": "mammography"}),
                          path="/analyze", engine=engine)
    assert analyzed.status == 200 and analyzed.body == _answer(
        engine, Request("analyze", image=ImageInput(data=png), modality="mammography"))
    assert sorted(analyzed.json["models"]) == ["density", "tumor"] and "eight_category" in analyzed.json
    preview, _, _ = post(multipart({"image": ("m.png", png, "image/png")}), path="/preview", engine=engine)
    assert preview.body == _answer(engine, Request("preview", image=ImageInput(data=png)))
    for ctype in (None, "application/json"):
        models, _, _ = post(b"", ctype, path="/models", engine=engine)
        assert models.status == 200 and models.body == _answer(engine, Request("models"))


def test_the_request_is_parsed_once_into_its_fields() -> None:
    result, _, engine = post(multipart({"image": IMAGE, "explain": "true", "roi": "1, 2, 30,40"}), chunks=3)
    assert result.status == 200
    (request,) = engine.requests
    assert (request.action, request.model, request.explain) == ("predict", "tumor", True)
    assert request.image == ImageInput(data=IMAGE[1], roi=(1, 2, 30, 40))
    assert len(request.request_id) == 32 and request.request_id == result.headers["x-request-id"]


@pytest.mark.parametrize(("text", "value"), [
    ("true", True), ("TRUE", True), ("1", True), ("yes", True), ("on", True),
    ("false", False), ("0", False), ("no", False), ("off", False), ("", False),
])
def test_booleans_of_a_form(text: str, value: bool) -> None:
    result, _, engine = post(multipart({"image": IMAGE, "explain": text}))
    assert result.status == 200 and engine.requests[0].explain is value


@pytest.mark.parametrize(("sent", "value"), [(True, True), (False, False), (1, True), (0, False),
                                             ("yes", True), ("off", False)])
def test_booleans_of_a_json_body(sent: Any, value: bool) -> None:
    body = json.dumps({"model": "tumor", "array": [[1]], "explain": sent}).encode()
    result, _, engine = post(body, "application/json", path="/predict_array")
    assert result.status == 200 and engine.requests[0].explain is value


@pytest.mark.parametrize("sent", ["maybe", 2, [True]])
def test_a_value_that_is_no_boolean_is_refused(sent: Any) -> None:
    code, message = refused(json.dumps({"model": "tumor", "array": [[1]], "explain": sent}).encode(),
                            "application/json", path="/predict_array")
    assert code == "bad_field" and "'explain'" in message and "true or false" in message


@pytest.mark.parametrize(("roi", "parsed"), [("1,2,30,40", (1, 2, 30, 40)),
                                             (" 1 , 2,30 ,40 ", (1, 2, 30, 40)), ("", None)])
def test_a_roi_is_x_y_w_h(roi: str, parsed: tuple[int, ...] | None) -> None:
    result, _, engine = post(multipart({"image": IMAGE, "roi": roi}))
    assert result.status == 200 and engine.requests[0].image.roi == parsed


@pytest.mark.parametrize("roi", ["1,2,3", "a,b,c,d", "0,0,0,5", "-1,0,5,5", "[1, 2, 3, 4]"])
def test_a_bad_roi_is_refused(roi: str) -> None:
    code, message = refused(multipart({"image": IMAGE, "roi": roi}))
    assert code == "bad_roi" and message


# --------------------------------------------------------------------------- multipart refusals


def test_a_multipart_type_without_boundary_is_malformed() -> None:
    code, message = refused(multipart({"image": IMAGE}), "multipart/form-data")
    assert code == "malformed_request" and "boundary" in message


def test_a_body_that_is_not_multipart_is_malformed() -> None:
    code, message = refused(b"this is not a multipart body at all", MULTIPART)
    assert code == "malformed_request" and "does not parse" in message
    code, message = refused(b"--x\r\nnonsense", "multipart/form-data; boundary=x")
    assert code == "malformed_request" and "closing boundary" in message


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
    """A text ``image`` (say a URL a framework would fetch) is never read as an image."""
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
    code, message = refused(multipart({"image": IMAGE}), path="/predict")
    assert code == "missing_field" and "'model'" in message
    assert refused(b"", None)[0] == "missing_field"  # /tumor needs its image


# --------------------------------------------------------------------------- JSON and other bodies


@pytest.mark.parametrize(("body", "code", "words"), [
    (b'{"model": "tumor", "array": [[1]', "malformed_request", "not valid JSON"),
    (b"[1, 2]", "malformed_request", "must be an object"),
    (b'"text"', "malformed_request", "must be an object"),
    (b'{"model": "tumor", "array": [[1]], "colour": "red"}', "unknown_field", "'colour'"),
    (b'{"model": "tumor", "array": "[[1]"}', "bad_field", "'array'"),
    (b'{"model": 3, "array": [[1]]}', "bad_field", "'model'"),
    (b'{"model": "tumor", "array": [[1], [2, 3]]}', "bad_shape", "rectangular"),
    (b'{"model": "tumor", "array": [[1]], "dtype": "complex64"}', "bad_dtype", "complex64"),
])
def test_json_bodies_are_checked(body: bytes, code: str, words: str) -> None:
    got, message = refused(body, "application/json", path="/predict_array")
    assert got == code and words in message
    if code == "unknown_field":
        assert "model, array, dtype, explain, roi" in message


def test_a_file_field_cannot_travel_in_json() -> None:
    code, message = refused(b'{"image": "http://example.org/x.png"}', "application/json")
    assert code == "bad_field" and "'image'" in message and "file part" in message


@pytest.mark.parametrize("ctype", ["application/json", "application/json; charset=utf-8",
                                   "application/vnd.api+json", "Application/JSON"])
def test_json_content_types(ctype: str) -> None:
    body = b'{"model": "tumor", "array": [[1, 2], [3, 4]], "dtype": null}'
    result, app, engine = post(body, ctype, path="/predict_array", chunks=3)
    assert result.status == 200 and app.scopes == []
    np.testing.assert_array_equal(engine.requests[0].image.array, [[1, 2], [3, 4]])


@pytest.mark.parametrize("ctype", ["text/plain", "image/png", None])
def test_other_content_types_are_unsupported(ctype: str | None) -> None:
    code, message = refused(b"image=x", ctype, status=415)
    assert code == "unsupported_media_type"
    assert repr(ctype or "(none)") in message and "multipart/form-data" in message


@pytest.mark.parametrize(("body", "code", "names"), [
    (b"image=http%3A%2F%2Fexample.org%2Fx.png", "bad_field", "'image'"),   # no file in a url-encoded form
    (b"explain=true", "missing_field", "'image'"),
    (b"roi=%FF%FE&image=x", "bad_field", "'roi'"),                        # not UTF-8 once decoded
    (b"comment=x", "unknown_field", "'comment'"),
])
def test_a_url_encoded_form_is_checked_like_a_multipart_one(body: bytes, code: str, names: str) -> None:
    got, message = refused(body, URLENCODED)
    assert got == code and names in message


# --------------------------------------------------------------------------- the engine's answers


@pytest.mark.parametrize(("error", "status", "code", "message"), [
    (ApiError("not_an_image", "no"), 400, "not_an_image", "no"),
    (ApiError("too_large", "big"), 413, "too_large", "big"),
    (ApiError("unknown_model", "no model named 'x'"), 400, "unknown_model", "no model named 'x'"),
    (Overloaded(), 503, "overloaded", OVERLOADED_MESSAGE),
    (RuntimeError("secret-patient-name"), 500, "internal", INTERNAL_MESSAGE),
])
def test_the_engines_refusals_and_faults(error: Exception, status: int, code: str, message: str,
                                         caplog: pytest.LogCaptureFixture) -> None:
    seen: list[tuple[str, str]] = []
    with caplog.at_level(logging.ERROR, logger="breastscan.serving.http"):
        result = run(edge(engine=FakeEngine(error), on_answer=lambda e, o: seen.append((e, o))),
                     path="/density", body=multipart({"image": IMAGE}), headers={"content-type": MULTIPART})
    assert (result.status, result.json) == (status, {"error": message, "code": code})
    assert seen == [("density", code)]
    assert ("retry-after" in result.headers) is (status == 503)
    if code == "internal":  # logged with its traceback, never sent
        assert any(r.exc_info and "secret-patient-name" in str(r.exc_info[1]) for r in caplog.records)


def test_no_answer_in_time_is_a_504() -> None:
    seen: list[tuple[str, str]] = []
    result = run(edge(engine=FakeEngine(delay=5), timeout_s=0.05, on_answer=lambda e, o: seen.append((e, o))),
                 body=multipart({"image": IMAGE}), headers={"content-type": MULTIPART})
    assert (result.status, result.json["code"]) == (504, "deadline_exceeded")
    assert seen == [("tumor", "deadline_exceeded")]


def test_an_answer_is_counted() -> None:
    seen: list[tuple[str, str]] = []
    result = run(edge(on_answer=lambda e, o: seen.append((e, o))), path="/models")
    assert result.status == 200 and seen == [("models", "ok")]


def test_while_the_models_load_the_api_is_unavailable() -> None:
    app = App()
    result = run(Edge(app, routes=ROUTES, engine=lambda: None, max_body_bytes=BIG, timeout_s=1),
                 body=multipart({"image": IMAGE}), headers={"content-type": MULTIPART})
    assert (result.status, result.json["code"]) == (503, "unavailable")
    assert result.headers["retry-after"] == "1" and app.scopes == []


# --------------------------------------------------------------------------- methods, paths, docs


@pytest.mark.parametrize(("method", "path"), [("GET", "/tumor"), ("PUT", "/predict"), ("GET", "/models")])
def test_an_api_route_takes_only_post(method: str, path: str) -> None:
    app, engine = App(), FakeEngine()
    result = run(edge(app, engine), method=method, path=path)
    assert (result.status, result.json["code"]) == (405, "method_not_allowed")
    assert result.headers["allow"] == "POST" and app.scopes == [] and engine.requests == []


@pytest.mark.parametrize(("method", "path"), [("GET", "/ui/app.js"), ("POST", "/ui/upload"),
                                              ("POST", "/tumor/extra"), ("GET", "/readyz")])
def test_other_paths_go_to_the_application_untouched(method: str, path: str) -> None:
    app, engine = App(), FakeEngine()
    body = b"not multipart, not checked"
    result = run(edge(app, engine), method=method, path=path, body=body, chunks=2,
                 headers={"content-type": "text/plain"})
    assert (result.status, result.body) == (299, b"app") and app.bodies == [body]
    assert result.receives == 2 and engine.requests == []  # read by the application, chunk by chunk
    assert app.scopes[0]["state"]["request_id"] == result.headers["x-request-id"]


def test_other_scope_types_pass_untouched() -> None:
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    for kind in ("lifespan", "websocket"):
        asyncio.run(edge(app)({"type": kind, "path": "/tumor"}, None, None))  # type: ignore[arg-type]
    assert seen == ["lifespan", "websocket"]


def test_the_request_id_is_echoed_or_made(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="breastscan.serving.http"):
        given = run(edge(), path="/models", headers={"x-request-id": "abc-123.X_y"})
        insane = run(edge(), path="/models", headers={"x-request-id": "bad id with spaces"})
        made = run(edge(), path="/other", body=b"a" * 100)
    assert given.headers["x-request-id"] == "abc-123.X_y"
    made_id = insane.headers["x-request-id"]
    assert made_id != "bad id with spaces" and len(made_id) == 32
    assert made.headers["x-request-id"] != insane.headers["x-request-id"]
    lines = [r.getMessage() for r in caplog.records]
    assert any("request_id=abc-123.X_y" in m and "path=/models status=200" in m for m in lines)
    assert any("path=/other status=299" in m and "bytes=100" in m for m in lines)


def test_the_request_log_line_names_the_model_and_version_that_answered(
        mammogram: np.ndarray, caplog: pytest.LogCaptureFixture) -> None:
    engine, png = fake_model_engine(), images.png(mammogram)
    upload = multipart({"image": ("m.png", png, "image/png")})
    both = multipart({"image": ("m.png", png, "image/png"), "modality": "mammography"})
    headers = {"content-type": MULTIPART}
    with caplog.at_level(logging.INFO, logger="breastscan.serving.http"):
        run(edge(engine=engine), path="/tumor", body=upload, headers={**headers, "x-request-id": "one"})
        run(edge(engine=engine), path="/analyze", body=both, headers={**headers, "x-request-id": "two"})
        engine.withdraw("tumor")
        gone = run(edge(engine=engine), path="/tumor", body=upload,
                   headers={**headers, "x-request-id": "three"})
    lines = {m.split()[0]: m for m in (r.getMessage() for r in caplog.records) if m.startswith("request_id=")}
    one, two, three = (lines[f"request_id={i}"] for i in ("one", "two", "three"))
    assert "path=/tumor status=200" in one and one.endswith(" model=tumor version=3")
    assert "path=/analyze status=200" in two and two.endswith(" model=density,tumor version=3,3")
    assert (gone.status, gone.json["code"]) == (404, "model_withdrawn")
    assert "path=/tumor status=404" in three and three.endswith(" model=tumor")  # no version answered


def test_docs_json_is_the_openapi_description_of_every_route() -> None:
    app = App()
    result = run(edge(app), method="GET", path="/docs.json")
    assert result.status == 200 and app.scopes == []
    doc = result.json
    assert doc["openapi"].startswith("3.") and set(doc["paths"]) == set(ROUTES)
    schemas = doc["components"]["schemas"]
    results = {"predict": "Prediction", "analyze": "Analysis", "preview": "Preview"}
    for path, route in ROUTES.items():
        operation = doc["paths"][path]["post"]
        body = next(iter(operation["requestBody"]["content"].values()))["schema"]
        assert list(body["properties"]) == list(route.fields), path
        assert body["required"] == sorted(route.required)
        answer = operation["responses"]["200"]["content"]["application/json"]["schema"]
        ref = answer["$ref"] if route.action != "models" else answer["items"]["$ref"]
        assert ref == f"#/components/schemas/{results.get(route.action, 'ModelInfo')}", path
        assert ref.rsplit("/", 1)[1] in schemas
        assert {"400", "413", "415"} <= set(operation["responses"])
    assert doc["paths"]["/tumor"]["post"]["requestBody"]["content"].keys() == {"multipart/form-data"}
    assert doc["paths"]["/predict_array"]["post"]["requestBody"]["content"].keys() == {"application/json"}
    assert set(schemas["Error"]["properties"]["code"]["enum"]) >= {"bad_roi", "unauthorized", "too_large"}
    assert "mask_png" in schemas["Prediction"]["properties"]
    assert set(schemas["Analysis"]["properties"]["dicom"]["properties"]) == {"sr", "seg"}


# --------------------------------------------------------------------------- the application's answers


def test_the_applications_404_is_normalized() -> None:
    app = App(404, (b'{"detail": "Not Found"}',), ((b"content-type", b"application/json"),
                                                   (b"content-length", b"23")))
    result = run(edge(app), method="GET", path="/nowhere")
    assert (result.status, result.json) == (404, {"error": "Not Found", "code": "not_found"})
    assert int(result.headers["content-length"]) == len(result.body)


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


def test_a_framework_4xx_is_rewritten_with_its_length() -> None:
    app = App(400, (b'{"error": "1 validation error", ', b'"detail": [{"loc": ["roi"], "msg": "bad"}]}'),
              headers=((b"content-type", b"application/json"), (b"Content-Length", b"75"), (b"x-keep", b"1")))
    result = run(edge(app), method="GET", path="/other")
    assert result.status == 400 and result.json == {"error": "field 'roi': bad", "code": "bad_field"}
    assert int(result.headers["content-length"]) == len(result.body)
    assert result.headers["content-type"] == "application/json" and result.headers["x-keep"] == "1"
    assert len(result.messages) == 2  # one start, one body


def test_a_4xx_already_in_shape_passes_unchanged() -> None:
    shaped = b'{"error": "no", "code": "not_an_image"}'
    headers = ((b"content-type", b"application/json"), (b"content-length", str(len(shaped)).encode()))
    result = run(edge(App(400, (shaped,), headers)), method="GET", path="/other")
    assert (result.status, result.body) == (400, shaped)
    assert result.messages[0]["headers"][:2] == list(headers)


@pytest.mark.parametrize("status", [200, 299, 500, 503])
def test_2xx_and_5xx_pass_unchanged(status: int) -> None:
    chunks = (b'{"error": "An unexpected error', b' has occurred"}')
    headers = ((b"content-type", b"application/json"), (b"content-length", b"44"))
    result = run(edge(App(status, chunks, headers)), method="GET", path="/other")
    assert result.status == status and result.body == b"".join(chunks)
    assert result.messages[0]["headers"][:2] == list(headers) and len(result.messages) == 3  # streamed


def test_send_error_sends_the_tables_status_and_headers() -> None:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(send_error(send, "bad_request", "no tea", headers=[(b"x-a", b"1")]))
    asyncio.run(send_error(send, "overloaded", "busy"))
    (start, body), (busy, _) = sent[:2], sent[2:]
    assert start["status"] == 400 and (b"x-a", b"1") in start["headers"]
    assert json.loads(body["body"]) == {"error": "no tea", "code": "bad_request"}
    assert (b"content-length", str(len(body["body"])).encode()) in start["headers"]
    assert busy["status"] == 503 and (b"retry-after", b"1") in busy["headers"]


# --------------------------------------------------------------------------- the size limit: 413


LIMIT = 100


class Spy:
    """The application behind the edge: reads the whole body (or records that it was not called)."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.calls += 1
        body = await read_body(receive)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(body)).encode()})


def guarded(size: int, *, declared: bool = True, chunks: int = 1, expect: bool = False,
            hang: bool = False, path: str = "/other") -> tuple[Result, Spy]:
    spy = Spy()
    headers = {"content-length": str(size)} if declared else {}
    if expect:
        headers["expect"] = "100-continue"
    result = run(edge(spy, limit=LIMIT), path=path, body=b"x" * size, headers=headers, chunks=chunks,
                 hang=hang)
    return result, spy


def _too_large(result: Result, size: int) -> None:
    assert result.status == 413 and result.json["code"] == "too_large"
    assert f"{size} bytes" in result.json["error"] and f"limit of {LIMIT} bytes" in result.json["error"]
    assert len(result.headers["x-request-id"]) == 32


def test_a_body_at_the_limit_passes() -> None:
    result, spy = guarded(LIMIT, chunks=3)
    assert (result.status, result.body, spy.calls) == (200, b"100", 1)


def test_an_api_body_over_the_limit_never_reaches_the_engine() -> None:
    engine = FakeEngine()
    body = multipart({"image": ("i.png", b"x" * LIMIT, "image/png")})
    declared = {"content-type": MULTIPART, "content-length": str(len(body))}
    for headers in (declared, {"content-type": MULTIPART}):
        result = run(edge(engine=engine, limit=LIMIT), body=body, headers=headers, chunks=4)
        assert (result.status, result.json["code"]) == (413, "too_large")
    assert engine.requests == []


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
    body = b"x" * (10 * LIMIT)
    result = run(edge(Spy(), limit=LIMIT), path="/other", body=body, chunks=20, hang=True,
                 headers={"content-length": str(2 * LIMIT)})
    assert result.status == 413 and result.receives == 9  # 9 x 50 bytes > 4 x 100


def test_draining_stops_after_drain_s(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "DRAIN_S", 0.05)
    # the client declares 3x the limit and sends one chunk, then stalls
    spy = Spy()
    result = run(edge(spy, limit=LIMIT), path="/other", body=b"x" * 50, stall=True,
                 headers={"content-length": str(3 * LIMIT)})
    assert result.status == 413 and result.receives == 2 and spy.calls == 0
