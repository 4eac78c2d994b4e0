"""Calls from the front service to the model service, with the errors the front can answer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import TypeVar

import aiohttp
from bentoml.exceptions import BentoMLException

from breastscan.serving.engine import Overloaded

log = logging.getLogger(__name__)
T = TypeVar("T")


async def call_models(call: Callable[[], Awaitable[T]]) -> T:
    """Await ``call()`` (one call to the model service) and return its result.

    * A 503 from the model service -- adaptive batching shed the call because it could not
      meet ``max_latency_ms`` -- raises :class:`~breastscan.serving.engine.Overloaded`.
    * A connection lost before an answer is sent again once, on a fresh connection. The
      model service's server closes keep-alive connections idle for 5 s while the client
      pool keeps them 15 s, so a call can go out on a connection that is closing as it is
      sent. A model call has no side effect, so this is the retry HTTP allows for
      idempotent requests. A timeout is not retried (it would double the wait).

    Any other error is raised unchanged.
    """
    for attempt in (1, 2):
        try:
            return await call()
        except BentoMLException as exc:
            if exc.error_code == HTTPStatus.SERVICE_UNAVAILABLE:
                raise Overloaded() from exc
            raise
        except aiohttp.ClientConnectionError as exc:
            if attempt == 2 or isinstance(exc, (aiohttp.ServerTimeoutError, asyncio.TimeoutError)):
                raise
            log.warning("model service connection lost (%s: %s); sending the call again",
                        type(exc).__name__, exc)
    raise AssertionError("unreachable")
