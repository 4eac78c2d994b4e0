"""HTTP plumbing of the service: request ids, the request size limit, request logs.

:class:`RequestGuard` is a plain ASGI middleware:

* every request gets an ``X-Request-ID`` (the client's, if it sent a sane one, else a new
  UUID), echoed in the response and in the log line;
* a body larger than the limit is refused with ``413`` and a JSON error before the
  application reads it -- by its ``Content-Length`` up front, and by counting while it
  streams when the client sends none -- so an oversize upload never reaches the parser;
* one log line per API request: request id, method, path, status, duration and body size;
  never the body, a file name or a header value other than the id.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

log = logging.getLogger("breastscan.serving.requests")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUEST_ID_HEADER = "x-request-id"
_SANE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# Probes and scrapes are not logged line by line.
_QUIET_PATHS = ("/healthz", "/livez", "/readyz", "/metrics")


class BodyTooLarge(Exception):
    """Raised inside the app's ``receive`` when a streamed body passes the limit."""


def error_body(code: str, message: str) -> bytes:
    """The JSON error body every client mistake gets: ``{"error": message, "code": code}``."""
    return json.dumps({"error": message, "code": code}).encode()


class RequestGuard:
    """ASGI middleware: request id, body size limit (413), one log line per request.

    Args:
        app: the wrapped ASGI application.
        max_body_bytes: largest request body accepted.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = int(max_body_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = headers.get(REQUEST_ID_HEADER, "")
        request_id = given if _SANE_ID.match(given) else f"{random.getrandbits(128):032x}"  # uuid4 costs more
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.perf_counter()
        status = {"code": 0}
        received = {"bytes": 0}
        path = scope.get("path", "")

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (REQUEST_ID_HEADER.encode(), request_id.encode())]
            await send(message)

        async def counted_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                received["bytes"] += len(message.get("body", b""))
                if received["bytes"] > self.max_body_bytes:
                    raise BodyTooLarge
            return message

        try:
            declared = int(headers.get("content-length", "0") or 0)
        except ValueError:
            declared = 0
        try:
            if declared > self.max_body_bytes:
                await self._refuse(send_with_id, declared)
            else:
                try:
                    await self.app(scope, counted_receive, send_with_id)
                except BodyTooLarge:
                    if status["code"]:
                        raise
                    await self._refuse(send_with_id, received["bytes"])
        finally:
            if not path.startswith(_QUIET_PATHS):
                log.info("request_id=%s method=%s path=%s status=%s ms=%.1f bytes=%d", request_id,
                         scope.get("method", ""), path, status["code"] or "-",
                         (time.perf_counter() - start) * 1e3, max(declared, received["bytes"]))

    async def _refuse(self, send: Send, size: int) -> None:
        body = error_body("too_large", f"request body of {size} bytes or more is over the limit of "
                                       f"{self.max_body_bytes} bytes")
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
