"""HTTP plumbing of the service: request ids, the request size limit, request logs.

:class:`RequestGuard` is a plain ASGI middleware:

* every request gets an ``X-Request-ID`` (the client's, if it sent a sane one, else a new
  UUID), echoed in the response and in the log line;
* a body larger than the limit is refused with ``413`` and a JSON error before the
  application reads it -- by its ``Content-Length`` up front, and by counting while it
  streams when the client sends none -- so an oversize upload never reaches the parser.
  The client reads that answer: one that waits for ``100 Continue`` gets it before it
  sends anything; any other is still writing its body, so the rest of the body (up to
  :data:`DRAIN_FACTOR` times the limit, for at most :data:`DRAIN_S` seconds) is read and
  dropped first -- a server that closes on unread data resets the connection, and the
  client's TCP stack then drops the answer;
* one log line per API request: request id, method, path, status, duration and body size;
  never the body, a file name or a header value other than the id.
"""

from __future__ import annotations

import asyncio
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


DRAIN_FACTOR = 4
"""An oversize body is read (and dropped) up to this many times the limit before the 413."""
DRAIN_S = 30.0
"""... and for at most this many seconds."""


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
        received = {"bytes": 0, "ended": 0}
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
                received["ended"] = not message.get("more_body", False)
                if received["bytes"] > self.max_body_bytes:
                    raise BodyTooLarge
            return message

        try:
            declared = int(headers.get("content-length", "0") or 0)
        except ValueError:
            declared = 0
        try:
            if declared > self.max_body_bytes:
                if headers.get("expect", "").lower() != "100-continue":
                    await self._drain(receive, declared, read=0)
                await self._refuse(send_with_id, declared)
            else:
                try:
                    await self.app(scope, counted_receive, send_with_id)
                except BodyTooLarge:
                    if status["code"]:
                        raise
                    if not received["ended"]:  # else the chunk that went over was the last
                        await self._drain(receive, received["bytes"], read=received["bytes"])
                    await self._refuse(send_with_id, received["bytes"])
        finally:
            if not path.startswith(_QUIET_PATHS):
                log.info("request_id=%s method=%s path=%s status=%s ms=%.1f bytes=%d", request_id,
                         scope.get("method", ""), path, status["code"] or "-",
                         (time.perf_counter() - start) * 1e3, max(declared, received["bytes"]))

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

    async def _refuse(self, send: Send, size: int) -> None:
        body = error_body("too_large", f"request body of {size} bytes or more is over the limit of "
                                       f"{self.max_body_bytes} bytes")
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


async def read_body(receive: Receive) -> bytes:
    """An ASGI request's whole body (its size is bounded by :class:`RequestGuard` outside)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` giving ``body`` once, then the original channel (disconnects)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
