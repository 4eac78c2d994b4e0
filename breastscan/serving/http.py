"""The service's HTTP API: one ASGI middleware, :class:`Edge`, in front of BentoML.

Every HTTP request passes through it once, outermost:

* it gets an ``X-Request-ID`` (the client's, if it sent a sane one, else a new id), echoed
  in the answer and in the one log line of the request (id, method, path, status,
  duration, body size, and the model and registry version that answered, e.g.
  ``model=tumor version=4`` -- never the body, a file name or another header value);
* a body larger than the limit is refused with ``413`` before anything reads it -- by its
  ``Content-Length`` up front, by counting while it streams when the client sends none --
  after reading and dropping the rest of it (up to :data:`DRAIN_FACTOR` times the limit,
  for at most :data:`DRAIN_S` seconds: a server that closes on unread data resets the
  connection, and the client's TCP stack then drops the answer);
* with authentication on, a request without a valid API key is refused (``401``) before
  its body is read, except the open paths (probes, the UI's files, the API description);
* a ``POST`` to an API route (:func:`breastscan.serving.request.api_routes`) is parsed once
  into a :class:`breastscan.serving.request.Request`, answered by the engine
  (:meth:`breastscan.serving.engine.Engine.answer`) and sent as the answer's JSON
  (:func:`breastscan.serving.answer.to_json`), or refused with the error table's status and
  ``{"error", "code"}`` body;
* ``GET /docs.json`` is the API's OpenAPI description, derived from the route declarations
  and the answer definitions (:func:`openapi`);
* anything else (probes, ``/metrics``, the web UI, unknown paths) goes to BentoML, whose
  4xx answers are rewritten into the same ``{"error", "code"}`` shape.

Why the API is answered here and not by BentoML endpoints: profiled under load (py-spy,
``reports/profiles``), BentoML's handling of one upload -- validating the form with
pydantic, spooling the file to disk, building the response schema, its tracing and
metrics middlewares -- took about 6 ms of the worker's event loop, more than the model's
share of an image. BentoML runs the workers, their lifecycle, probes and metrics.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

import orjson

from breastscan.serving.answer import (
    ANSWERS,
    ERRORS,
    INTERNAL_MESSAGE,
    Analysis,
    ApiError,
    Prediction,
    error_headers,
    error_json,
    json_schema,
    to_json,
)
from breastscan.serving.auth import UNAUTHORIZED_MESSAGE, ApiKeys, is_open_path, presented_key
from breastscan.serving.request import ARRAY, BOOL, FILE, ROI, TEXT, Route, parse_http

if TYPE_CHECKING:
    from breastscan.serving.engine import Engine

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUEST_ID_HEADER = "x-request-id"
_SANE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_QUIET_PATHS = ("/healthz", "/livez", "/readyz", "/metrics")
"""Probes and scrapes are not logged line by line."""
DRAIN_FACTOR = 4
"""An oversize body is read (and dropped) up to this many times the limit before the 413."""
DRAIN_S = 30.0
"""... and for at most this many seconds."""
_FRAMEWORK_CODES = {404: "not_found", 405: "method_not_allowed", 415: "unsupported_media_type"}


class BodyTooLarge(Exception):
    """Raised inside the app's ``receive`` when a streamed body passes the limit."""


class Edge:
    """ASGI middleware: the service's HTTP API (see the module docstring).

    Args:
        app: the wrapped ASGI application (BentoML's).
        routes: the API routes by path (:func:`breastscan.serving.request.api_routes`).
        engine: returns the worker's engine, ``None`` while its models load (then ``503``).
        max_body_bytes: largest request body accepted.
        timeout_s: longest time one answer may take (``504 deadline_exceeded`` after).
        keys: the accepted API keys, ``None`` when authentication is off.
        on_answer: called with ``(endpoint, outcome)`` after every API answer (metrics).
    """

    def __init__(self, app: ASGIApp, *, routes: Mapping[str, Route], engine: Callable[[], Engine | None],
                 max_body_bytes: int, timeout_s: float, keys: ApiKeys | None = None,
                 on_answer: Callable[[str, str], None] | None = None) -> None:
        self.app = app
        self.routes = dict(routes)
        self.engine = engine
        self.max_body_bytes = int(max_body_bytes)
        self.timeout_s = float(timeout_s)
        self.keys = keys
        self.on_answer = on_answer
        self._docs: bytes | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and self.keys is not None and not self._caller(scope):
            await send({"type": "websocket.close", "code": 1008})  # before the handshake: HTTP 403
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        request_id = given if _SANE_ID.match(given) else f"{random.getrandbits(128):032x}"  # uuid4 costs more
        scope.setdefault("state", {})["request_id"] = request_id
        start, status, received = time.perf_counter(), {"code": 0}, {"bytes": 0, "ended": False}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        async def counted_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                received["bytes"] += len(message.get("body", b""))
                received["ended"] = not message.get("more_body", False)
                if received["bytes"] > self.max_body_bytes:
                    raise BodyTooLarge
            return message

        declared = _content_length(scope)
        try:
            if declared > self.max_body_bytes:
                if _header(scope, b"expect").lower() != "100-continue":
                    await self._drain(receive, declared, read=0)
                await self._refuse_size(send_with_id, declared)
                return
            try:
                await self._route(scope, counted_receive, send_with_id, request_id)
            except BodyTooLarge:
                if status["code"]:
                    raise
                if not received["ended"]:  # else the chunk that went over was the last
                    await self._drain(receive, received["bytes"], read=received["bytes"])
                await self._refuse_size(send_with_id, received["bytes"])
        finally:
            path = scope.get("path", "")
            if not path.startswith(_QUIET_PATHS):
                log.info("request_id=%s method=%s path=%s status=%s ms=%.1f bytes=%d%s", request_id,
                         scope.get("method", ""), path, status["code"] or "-",
                         (time.perf_counter() - start) * 1e3, max(declared, received["bytes"]),
                         scope["state"].get("answered_by", ""))

    # ------------------------------------------------------------------ routing
    def _caller(self, scope: Scope) -> str | None:
        """The label of the request's API key (``None``: missing or not accepted)."""
        assert self.keys is not None
        headers = ((bytes(k).decode("latin-1").lower(), bytes(v).decode("latin-1"))
                   for k, v in scope.get("headers", []))
        return self.keys.client(presented_key(headers))

    async def _route(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        path = scope.get("path", "")
        caller = None
        if self.keys is not None and not is_open_path(path):
            caller = self._caller(scope)
            if caller is None:
                log.info("unauthorized request to %s", path[:64])
                await send_error(send, "unauthorized", UNAUTHORIZED_MESSAGE)
                return
            scope["state"]["client"] = caller
        route = self.routes.get(path)
        if route is not None and scope.get("method") == "POST":
            await self._api(route, scope, receive, send, request_id, caller)
        elif route is not None:
            await send_error(send, "method_not_allowed", f"{path} takes POST", [(b"allow", b"POST")])
        elif path == "/docs.json" and scope.get("method") in ("GET", "HEAD"):
            await self._send_docs(send)
        else:
            await self.app(scope, receive, _normalizing(send))

    async def _api(self, route: Route, scope: Scope, receive: Receive, send: Send, request_id: str,
                   caller: str | None) -> None:
        """Parse, answer and send one API request; every refusal through the error table."""
        body = await read_body(receive)
        endpoint = route.path.lstrip("/")
        engine = self.engine()
        try:
            if engine is None:
                raise ApiError("unavailable", "the service is loading its models: retry shortly")
            request = parse_http(route, _header(scope, b"content-type"), body, request_id=request_id,
                                 caller=caller)
            if request.model and _SANE_ID.match(request.model):  # named in the log line even if refused
                scope["state"]["answered_by"] = f" model={request.model}"
            result = await asyncio.wait_for(engine.answer(request), self.timeout_s)
            scope["state"]["answered_by"] = answered_by(result)
            payload, outcome = to_json(result), "ok"
        except ApiError as exc:
            (log.warning if exc.kind.http >= 500 else log.info)("refused %s: %s", endpoint, exc.code)
            await send_error(send, exc.code, exc.message)
            outcome = exc.code
        except TimeoutError:
            log.warning("%s: no answer within %.3g s", endpoint, self.timeout_s)
            await send_error(send, "deadline_exceeded", f"no answer within {self.timeout_s:g} s")
            outcome = "deadline_exceeded"
        except Exception:
            log.exception("%s failed", endpoint)
            await send_error(send, "internal", INTERNAL_MESSAGE)
            outcome = "internal"
        else:
            await send_json(send, 200, payload)
        if self.on_answer is not None:
            self.on_answer(endpoint, outcome)

    async def _send_docs(self, send: Send) -> None:
        if self._docs is None:
            self._docs = orjson.dumps(openapi(self.routes))
        await send_json(send, 200, self._docs)

    # ------------------------------------------------------------------ the size limit
    async def _drain(self, receive: Receive, size: int, read: int) -> None:
        """Read and drop the rest of an oversize body of (at least) ``size`` bytes, ``read`` of
        them already read (bounded in bytes and time)."""
        cap = DRAIN_FACTOR * self.max_body_bytes
        if size > cap:
            return

        async def drain() -> None:
            got = read
            while got <= cap:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return
                got += len(message.get("body", b""))

        try:
            await asyncio.wait_for(drain(), DRAIN_S)
        except TimeoutError:
            pass

    async def _refuse_size(self, send: Send, size: int) -> None:
        await send_error(send, "too_large", f"request body of {size} bytes or more is over the limit of "
                                            f"{self.max_body_bytes} bytes")


# --------------------------------------------------------------------------- answers


def answered_by(answer: Any) -> str:
    """What the request log line says answered: `` model=tumor version=4`` for a prediction,
    every model and version in name order for an analysis (`` model=density,tumor version=3,4``),
    ``""`` for anything else."""
    if isinstance(answer, Prediction):
        return f" model={answer.model} version={answer.version or '-'}"
    if isinstance(answer, Analysis) and answer.models:
        names = sorted(answer.models)
        return f" model={','.join(names)} version={','.join(answer.models[n].version or '-' for n in names)}"
    return ""


async def send_json(send: Send, status: int, body: bytes,
                    headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """Send a complete JSON answer."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, code: str, message: str,
                     headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """Send a refusal: the error table's status and headers, ``{"error": message, "code": code}``."""
    await send_json(send, ERRORS[code].http, error_json(code, message), [*error_headers(code), *headers])


def normalized_error(status: int, body: bytes) -> bytes | None:
    """A framework's 4xx body in the ``{"error", "code"}`` shape; ``None`` when it already is.

    pydantic validation errors (``{"error", "detail": [...]}``) name the first field and
    problem (code ``bad_field``); other bodies keep their text (code ``not_found``,
    ``method_not_allowed``, ``unsupported_media_type`` or ``bad_request``).
    """
    try:
        value = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        value = body.decode("utf-8", "replace")[:500]
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        value = value[0]  # BentoML answers a 4xx BentoMLException as [{"error": ...}]
    if isinstance(value, dict) and "code" in value and "error" in value:
        return None
    detail = value.get("detail") if isinstance(value, dict) else None
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        where = ".".join(str(p) for p in detail[0].get("loc", ()))
        problem = str(detail[0].get("msg", "invalid"))
        return error_json("bad_field" if where else "malformed_request",
                          f"field {where!r}: {problem}" if where else problem)
    text = value.get("error") or value.get("detail") if isinstance(value, dict) else value
    return error_json(_FRAMEWORK_CODES.get(status, "bad_request"), str(text or "bad request"))


def _normalizing(send: Send) -> Send:
    """``send`` with any 4xx JSON answer lacking a ``code`` rewritten by :func:`normalized_error`."""
    held: dict[str, Any] = {}

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start" and 400 <= int(message["status"]) < 500:
            held["start"], held["chunks"] = message, []
            return
        if "start" not in held or message["type"] != "http.response.body":
            await send(message)
            return
        held["chunks"].append(message.get("body", b""))
        if message.get("more_body", False):
            return
        start, body = held.pop("start"), b"".join(held.pop("chunks"))
        fixed = normalized_error(int(start["status"]), body)
        if fixed is not None:
            body = fixed
            headers = [(k, v) for k, v in start.get("headers", [])
                       if k.lower() not in (b"content-length", b"content-type")]
            start = {**start, "headers": [*headers, (b"content-type", b"application/json"),
                                          (b"content-length", str(len(body)).encode())]}
        await send(start)
        await send({"type": "http.response.body", "body": body})

    return wrapped


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return ""


def _content_length(scope: Scope) -> int:
    try:
        return int(_header(scope, b"content-length") or 0)
    except ValueError:
        return 0


# --------------------------------------------------------------------------- the API description

_FIELD_SCHEMAS: dict[str, dict[str, Any]] = {
                  FILE: {"type": "string", "format": "binary"}, TEXT: {"type": "string"},
                  BOOL: {"type": "boolean", "default": False},
                  ROI: {"type": "string", "description": "x,y,w,h (pixels) to answer about that crop only"},
                  ARRAY: {"type": "array", "items": {}, "description": "(H, W) or (H, W, C) numbers"}}
_RESULTS = {"predict": "Prediction", "analyze": "Analysis", "preview": "Preview"}
"""The answer schema of each action (``models`` answers a list of ModelInfo)."""


def openapi(routes: Mapping[str, Route], *, title: str = "breastscan", version: str = "1") -> dict[str, Any]:
    """The OpenAPI 3 description of the API: each route's fields (from its declaration), its
    answer (from :mod:`breastscan.serving.answer`) and its refusals (the error table)."""
    schemas: dict[str, Any] = {cls.__name__: json_schema(cls) for cls in ANSWERS}
    schemas["Error"] = {"type": "object", "required": ["error", "code"], "properties": {
        "error": {"type": "string"}, "code": {"type": "string", "enum": sorted(ERRORS)}}}
    models = sorted(route.model for route in routes.values() if route.model)
    paths = {path: {"post": _operation(route, models)} for path, route in routes.items()}
    return {"openapi": "3.0.2", "info": {"title": title, "version": version}, "paths": paths,
            "components": {"schemas": schemas}}


def _operation(route: Route, models: list[str]) -> dict[str, Any]:
    properties = {name: dict(_FIELD_SCHEMAS[kind]) for name, kind in route.fields.items()}
    if "model" in properties and models:
        properties["model"]["enum"] = models
    body_schema = {"type": "object", "properties": properties, "required": sorted(route.required),
                   "additionalProperties": False}
    media = "multipart/form-data" if FILE in route.fields.values() else "application/json"
    answer = ({"$ref": f"#/components/schemas/{_RESULTS[route.action]}"} if route.action in _RESULTS
              else {"type": "array", "items": {"$ref": "#/components/schemas/ModelInfo"}})
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    statuses = sorted({kind.http for kind in ERRORS.values() if 400 <= kind.http < 500 and kind.http != 499})
    return {"summary": route.doc, "operationId": route.path.strip("/") or "root",
            "requestBody": {"required": bool(route.required), "content": {media: {"schema": body_schema}}},
            "responses": {"200": {"description": "the answer",
                                  "content": {"application/json": {"schema": answer}}},
                          **{str(s): {"description": "refused", **error} for s in statuses}}}


async def read_body(receive: Receive) -> bytes:
    """An ASGI request's whole body (its size is bounded by :class:`Edge`'s counting ``receive``)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)
