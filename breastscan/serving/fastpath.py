"""The HTTP hot path: a model endpoint's upload answered without the framework's per-request work.

Profiled under load (py-spy, ``POST /tumor`` at concurrency 32, ``reports/profiles``), BentoML's
handling of one upload took about 6 ms of the worker's event loop -- validating the form with
pydantic, writing the file to a temporary file and cleaning the request's temporary
directory, building the response schema, the OpenTelemetry and metrics middlewares -- more
than the model's share of the image. :class:`ModelRoutes` answers the requests it fully
understands itself:

``POST /<model>`` with ``multipart/form-data``: one file part ``image`` and, optionally, the
text fields ``explain`` (``true``/``false``/``1``/``0``) and ``roi`` (``x,y,w,h``)

through the very call the BentoML endpoint makes (:func:`answer` around
:meth:`breastscan.serving.engine.Engine.predict`). It reads the form that
:class:`breastscan.serving.edge.RequestCheck`, outside it, has already parsed and checked (the
body is parsed once). Anything else -- another route or method, a JSON body, a value it
does not read the way BentoML would -- is handed to BentoML unchanged, so both paths accept
the same requests and give the same answers. Request ids, the size limit and the request
log stay in :class:`breastscan.serving.http.RequestGuard`, outermost.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from breastscan.serving.batching import Overloaded
from breastscan.serving.edge import FORM_STATE, Form
from breastscan.serving.engine import Engine, ImageInput, parse_roi
from breastscan.serving.http import ASGIApp, Receive, Scope, Send
from breastscan.serving.requests import InputError

log = logging.getLogger(__name__)

_BOOLS = {"true": True, "false": False, "1": True, "0": False}
_ROI = re.compile(r"^\s*\d+\s*(,\s*\d+\s*){3}$")


@dataclass
class Answer:
    """An HTTP answer: status, JSON body, extra headers, and the outcome for metrics."""

    status: int
    body: bytes
    outcome: str
    headers: dict[str, str] = field(default_factory=dict)


async def answer(endpoint: str, call: Callable[[], Awaitable[Any]]) -> Answer:
    """Run ``call()``; its result as JSON, or a client's mistake as a 4xx ``{"error", "code"}``.

    ``too_large`` answers 413, every other input error 400, a shed request 503 with
    ``Retry-After`` (code ``overloaded``). The one place both HTTP paths turn results and
    refusals into answers.
    """
    try:
        result = await call()
    except InputError as exc:
        log.info("refused %s: %s", endpoint, exc.code)
        return Answer(413 if exc.code == "too_large" else 400,
                      orjson.dumps({"error": exc.message, "code": exc.code}), exc.code)
    except Overloaded as exc:
        log.warning("shed %s: the model is at capacity", endpoint)
        body = orjson.dumps({"error": exc.message, "code": exc.code})
        return Answer(503, body, exc.code, {"Retry-After": "1"})
    return Answer(200, orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY), "ok")


@dataclass
class HotPath:
    """What :class:`ModelRoutes` serves with, set by the service once its models are loaded.

    Attributes:
        engine: the worker's engine (``None`` until loaded: requests go to BentoML).
        on_answer: called with ``(endpoint, outcome)`` after every answer (metrics).
    """

    engine: Engine | None = None
    on_answer: Callable[[str, str], None] | None = None


HOT = HotPath()
"""The worker's hot path (one engine per worker process)."""


class ModelRoutes:
    """ASGI middleware answering ``POST /<model>`` uploads directly (see the module docstring).

    Args:
        app: the wrapped ASGI application (BentoML's).
        models: the served model names (routes ``/<name>``).
    """

    def __init__(self, app: ASGIApp, models: list[str]) -> None:
        self.app = app
        self.routes = {f"/{name}": name for name in models}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        name = self.routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        engine = HOT.engine
        form = scope.get("state", {}).get(FORM_STATE) if name is not None else None
        request = _read(form) if form is not None and engine is not None else None
        if request is None:  # not a form this path reads exactly as BentoML does
            await self.app(scope, receive, send)
            return
        assert engine is not None and name is not None
        image, explain, roi = request
        result = await answer(name, lambda: engine.predict(
            name, ImageInput(data=image, roi=parse_roi(roi)), explain=explain))
        if HOT.on_answer is not None:
            HOT.on_answer(name, result.outcome)
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(result.body)).encode()),
                   *((k.lower().encode(), v.encode()) for k, v in result.headers.items())]
        await send({"type": "http.response.start", "status": result.status, "headers": headers})
        await send({"type": "http.response.body", "body": result.body})


def _read(form: Form) -> tuple[bytes, bool, str] | None:
    """``(image bytes, explain, roi)`` of a checked form this path reads exactly as BentoML; else ``None``."""
    image = form.parts.get("image")
    if image is None or not image.is_file or set(form.parts) - {"image", "explain", "roi"}:
        return None
    explain = _BOOLS.get(form.text("explain", "false").strip().lower())
    roi = form.text("roi")
    if explain is None or (roi and not _ROI.match(roi)):
        return None
    return image.data, explain, roi
