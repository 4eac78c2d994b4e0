"""The HTTP edge: every request to an API route is checked against what the route declares
before the framework parses it, and every refusal is a 4xx ``{"error", "code"}``.

A client's malformed request must never reach a parser that answers it with a 500.
:class:`RequestCheck` (an ASGI middleware) reads the body of a ``POST`` to an API route
once (its size is already bounded by :class:`breastscan.serving.http.RequestGuard`) and checks
it against the route's declared fields (:class:`RouteSpec`, read from the BentoML service's
own input schemas by :func:`route_specs`):

* the content type: ``multipart/form-data`` with a boundary, ``application/json`` (or no
  body at all), or a url-encoded form (text fields only), else **415**
  ``unsupported_media_type``;
* the body parses (:func:`parse_multipart`, python-multipart; JSON;
  :func:`parse_urlencoded`), else ``malformed_request``;
* every field is declared (``unknown_field``), given once, a file field as a file part and
  a text field as UTF-8 text (``bad_field``), and every required field is there
  (``missing_field``).

A request that passes goes on with its body replayed and its parsed form in the scope
(:data:`FORM_STATE`, for :class:`breastscan.serving.fastpath.ModelRoutes`). A 4xx the framework
itself answers (a value its validation refuses, an unknown route, a wrong method) is
rewritten into the same ``{"error", "code"}`` shape (:func:`normalized_error`), so a client
branches on one field whatever refused it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus, unquote_to_bytes

import orjson
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from breastscan.serving.http import ASGIApp, Message, Receive, Scope, Send, error_body, read_body, replay
from breastscan.serving.requests import InputError

log = logging.getLogger(__name__)

FORM_STATE = "breastscan.form"
"""Scope-state key of the checked :class:`Form` of a multipart request."""
_STATUS_CODES = {404: "not_found", 405: "method_not_allowed", 415: "unsupported_media_type"}
MAX_PARTS = 32
"""Most parts a multipart body may have (every route takes a handful of fields)."""


@dataclass(frozen=True)
class Part:
    """One part of a multipart body.

    Attributes:
        name: the field name (``Content-Disposition: form-data; name=...``).
        data: the part's bytes.
        filename: the file name of a file part; ``None`` for a text field.
    """

    name: str
    data: bytes
    filename: str | None = None

    @property
    def is_file(self) -> bool:
        """Whether the client sent this part as a file."""
        return self.filename is not None


@dataclass(frozen=True)
class Form:
    """A checked multipart form: at most one part per field name."""

    parts: dict[str, Part]

    def text(self, name: str, default: str = "") -> str:
        """A text field's value (checked UTF-8 by :class:`RequestCheck`), or ``default``."""
        part = self.parts.get(name)
        return default if part is None else part.data.decode("utf-8")


@dataclass(frozen=True)
class RouteSpec:
    """The fields one API route declares.

    Attributes:
        route: its path, e.g. ``/tumor``.
        files: fields that are uploaded files.
        values: every other field (text, numbers, booleans, JSON values).
        required: the fields a request must send.
    """

    route: str
    files: frozenset[str] = frozenset()
    values: frozenset[str] = frozenset()
    required: frozenset[str] = frozenset()

    @property
    def fields(self) -> frozenset[str]:
        """Every declared field."""
        return self.files | self.values

    def listing(self) -> str:
        """The declared fields, for messages (``"image (file), explain, roi"``)."""
        names = [f"{n} (file)" for n in sorted(self.files)] + sorted(self.values)
        return ", ".join(names) or "no fields"


def route_specs(apis: Mapping[str, Any]) -> dict[str, RouteSpec]:
    """The :class:`RouteSpec` of every API of a BentoML service (``service.apis``), by route.

    Reads each API's ``input_spec`` (a pydantic model): its ``model_fields`` and
    ``multipart_fields`` (the file fields).
    """
    specs = {}
    for api in apis.values():
        spec = api.input_spec
        fields = dict(spec.model_fields)
        files = frozenset(getattr(spec, "multipart_fields", ()) or ())
        specs[api.route] = RouteSpec(route=api.route, files=files, values=frozenset(fields) - files,
                                     required=frozenset(n for n, f in fields.items() if f.is_required()))
    return specs


# --------------------------------------------------------------------------- parsing


def _bad(code: str, message: str) -> InputError:
    return InputError(code, message)


def multipart_boundary(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` content type.

    Raises:
        InputError: ``malformed_request`` when it has none.
    """
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary", b"")
    if not boundary or len(boundary) > 200:
        raise _bad("malformed_request", "Content-Type multipart/form-data needs a boundary parameter "
                                        "(let the HTTP client build the multipart body)")
    return boundary


@dataclass
class _Collector:
    """python-multipart callbacks gathering the parts of one body."""

    parts: list[Part] = field(default_factory=list)
    headers: dict[bytes, bytes] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)
    header_field: bytes = b""
    header_value: bytes = b""
    ended: bool = False

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._begin, "on_part_data": self._data, "on_part_end": self._end,
            "on_header_field": self._field, "on_header_value": self._value,
            "on_header_end": self._header_end, "on_end": self._finish,
        }

    def _begin(self) -> None:
        if len(self.parts) >= MAX_PARTS:
            raise _bad("malformed_request", f"more than {MAX_PARTS} parts in the multipart body")
        self.headers, self.chunks = {}, []

    def _data(self, data: bytes, start: int, end: int) -> None:
        self.chunks.append(data[start:end])

    def _field(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]

    def _value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def _header_end(self) -> None:
        self.headers[self.header_field.lower()] = self.header_value
        self.header_field, self.header_value = b"", b""

    def _end(self) -> None:
        kind, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        name = options.get(b"name")
        if kind != b"form-data" or not name:
            raise _bad("malformed_request",
                       "a multipart part has no Content-Disposition: form-data; name=...")
        filename = options.get(b"filename")
        self.parts.append(Part(name=name.decode("utf-8", "replace"), data=b"".join(self.chunks),
                               filename=None if filename is None else filename.decode("utf-8", "replace")))

    def _finish(self) -> None:
        self.ended = True


def parse_multipart(content_type: str, body: bytes) -> list[Part]:
    """Every part of a ``multipart/form-data`` body, in order.

    Args:
        content_type: the request's ``Content-Type`` (with its boundary).
        body: the whole body.

    Raises:
        InputError: ``malformed_request`` (no boundary, a body that does not parse or
            ends early, a part without a name, more than :data:`MAX_PARTS` parts).
    """
    collector = _Collector()
    parser = MultipartParser(multipart_boundary(content_type), collector.callbacks())  # type: ignore[arg-type]
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise _bad("malformed_request", f"the multipart body does not parse: {exc}") from None
    if not collector.ended:
        raise _bad("malformed_request", "the multipart body ends before its closing boundary")
    return collector.parts


def parse_urlencoded(body: bytes) -> list[Part]:
    """The fields of an ``application/x-www-form-urlencoded`` body, as text parts (values
    percent-decoded to bytes: whether they are UTF-8 is :func:`check_form`'s question)."""
    parts = []
    for pair in body.split(b"&"):
        if not pair:
            continue
        name, _, value = pair.partition(b"=")
        parts.append(Part(name=unquote_plus(name.decode("latin-1")),
                          data=unquote_to_bytes(value.replace(b"+", b" "))))
        if len(parts) > MAX_PARTS:
            raise _bad("malformed_request", f"more than {MAX_PARTS} fields in the form")
    return parts


# --------------------------------------------------------------------------- checks


def check_form(spec: RouteSpec, parts: Iterable[Part]) -> Form:
    """Check multipart parts against a route's declared fields.

    Raises:
        InputError: ``unknown_field``, ``bad_field`` (twice, a file field sent as text, a
            text field sent as a file, text that is not UTF-8) or ``missing_field``.
    """
    form: dict[str, Part] = {}
    for part in parts:
        _check_name(spec, part.name)
        if part.name in form:
            raise _bad("bad_field", f"field {part.name!r} is sent more than once")
        if part.name in spec.files and not part.is_file:
            raise _bad("bad_field", f"field {part.name!r} must be a file upload (a part with a filename), "
                                    "not text")
        if part.name in spec.values:
            if part.is_file:
                raise _bad("bad_field", f"field {part.name!r} is a text field; got a file")
            try:
                part.data.decode("utf-8")
            except UnicodeDecodeError:
                raise _bad("bad_field", f"field {part.name!r} is not UTF-8 text") from None
        form[part.name] = part
    _check_required(spec, form)
    return Form(form)


def check_json(spec: RouteSpec, body: bytes) -> None:
    """Check a JSON body against a route's declared fields (files cannot travel in JSON).

    Raises:
        InputError: ``malformed_request`` (not JSON, not an object), ``unknown_field``,
            ``bad_field`` (a file field given a value) or ``missing_field``.
    """
    try:
        value = _json(body) if body.strip() else {}
    except (ValueError, RecursionError) as exc:
        raise _bad("malformed_request", f"the body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _bad("malformed_request", f"the JSON body must be an object with the fields {spec.listing()}")
    for name in value:
        _check_name(spec, str(name))
        if name in spec.files:
            raise _bad("bad_field", f"field {name!r} must be uploaded as a file part of a "
                                    "multipart/form-data request, not a JSON value")
    _check_required(spec, value)


def _json(body: bytes) -> Any:
    """Parse JSON as the framework does: strict and fast first, then Python's reader, which
    also takes the ``NaN`` / ``Infinity`` that ``json.dumps`` writes (refused later, by value)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


def _check_name(spec: RouteSpec, name: str) -> None:
    if name not in spec.fields:
        raise _bad("unknown_field",
                   f"{spec.route} takes no field {name[:64]!r}; its fields: {spec.listing()}")


def _check_required(spec: RouteSpec, given: Mapping[str, Any]) -> None:
    missing = sorted(spec.required - set(given))
    if missing:
        how = {n: "a file part of a multipart/form-data request" for n in spec.files}
        raise _bad("missing_field", "missing " + ", ".join(
            f"{n!r} ({how[n]})" if n in how else repr(n) for n in missing) + f"; {spec.route} takes "
            f"{spec.listing()}")


def check_request(spec: RouteSpec, content_type: str, body: bytes) -> Form | None:
    """Check one ``POST`` body against its route; the checked :class:`Form` of a multipart body.

    Returns:
        The form of a multipart request, ``None`` for a JSON (or empty) one.

    Raises:
        InputError: ``unsupported_media_type`` or any code of :func:`parse_multipart`,
            :func:`check_form`, :func:`check_json`.
    """
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind == "multipart/form-data":
        return check_form(spec, parse_multipart(content_type, body))
    if kind == "application/x-www-form-urlencoded":
        return check_form(spec, parse_urlencoded(body))
    if kind == "application/json" or kind.endswith("+json") or (not kind and not body.strip()):
        check_json(spec, body)
        return None
    raise _bad("unsupported_media_type", f"Content-Type {kind or '(none)'!r} is not accepted: send "
                                         "multipart/form-data (files), application/json or a "
                                         "url-encoded form (text fields only)")


# --------------------------------------------------------------------------- framework errors


def normalized_error(status: int, body: bytes) -> bytes | None:
    """A framework's 4xx body in the ``{"error", "code"}`` shape; ``None`` when it already is.

    pydantic validation errors (``{"error", "detail": [...]}``) name the first field and
    problem (code ``bad_field``); other bodies keep their text (code ``not_found``,
    ``method_not_allowed`` or ``bad_request``).
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
        message = f"field {where!r}: {problem}" if where else problem
        return error_body("bad_field" if where else "malformed_request", message)
    text = value.get("error") or value.get("detail") if isinstance(value, dict) else value
    code = _STATUS_CODES.get(status, "bad_request")
    return error_body(code, str(text or "bad request"))


class RequestCheck:
    """ASGI middleware: API requests checked at the edge, framework 4xx answers normalized.

    Args:
        app: the wrapped ASGI application (BentoML's, with the hot path inside).
        routes: the API routes' declared fields (:func:`route_specs`).
    """

    def __init__(self, app: ASGIApp, routes: Mapping[str, RouteSpec]) -> None:
        self.app = app
        self.routes = dict(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        spec = self.routes.get(scope.get("path", ""))
        if spec is None or scope.get("method") != "POST":
            await self.app(scope, receive, _normalizing(send))
            return
        body = await read_body(receive)
        try:
            form = check_request(spec, _header(scope, b"content-type"), body)
        except InputError as exc:
            log.info("refused %s at the edge: %s", spec.route, exc.code)
            status = 415 if exc.code == "unsupported_media_type" else 400
            await send_error(send, status, exc.code, exc.message)
            return
        scope.setdefault("state", {})[FORM_STATE] = form
        await self.app(scope, replay(body, receive), _normalizing(send))


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return ""


async def send_error(send: Send, status: int, code: str, message: str,
                     headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """Send a complete JSON error answer ``{"error": message, "code": code}``."""
    body = error_body(code, message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


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
