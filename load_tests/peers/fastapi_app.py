"""Benchmark peer: the plain-server baseline, one FastAPI app serving one model bundle.

``uvicorn load_tests.peers.fastapi_app:app`` loads the bundle in ``$PEER_BUNDLE`` at
startup, warms it up, and answers ``POST /predict`` (multipart, file field ``image``) with
the project's answer JSON, built by the service's own steps around ``ModelBundle.predict``:
:func:`~breastscan.serving.request.decode_upload`,
:func:`~breastscan.serving.engine.prepare_inputs`, the model call,
:func:`~breastscan.serving.answer.predictions` and :func:`~breastscan.serving.answer.to_json`
(ready bytes, as the service sends them); a refusal is the error table's status with
:func:`~breastscan.serving.answer.error_json`. ``GET /healthz`` is 200 once the model is
loaded. :func:`make_app` builds it around any model call
(:mod:`load_tests.peers.seeds_app` is the naive ``Model.predict`` variant).
"""

import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Request
from fastapi.responses import Response

from breastscan.bundle import ModelBundle
from breastscan.serving.answer import ERRORS, ApiError, ModelFacts, error_json, predictions, to_json
from breastscan.serving.config import ServingConfig
from breastscan.serving.engine import prepare_inputs
from breastscan.serving.request import decode_upload

from .launch import BUNDLE_ENV, mark_ready

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = ServingConfig().max_upload_bytes
"""The service's default upload limit."""
JSON = "application/json"
RunModel = Callable[[ModelBundle, np.ndarray], Any]
"""``(bundle, batch) -> served output`` (probabilities, a mask, or a multi-task model's dict of
both, as ``ModelBundle.predict`` gives them): the model call a peer is built around."""


def make_app(run_model: RunModel, runtime: str = "auto") -> FastAPI:
    """A FastAPI peer that answers ``POST /predict`` with ``run_model`` as its model call, the
    bundle loaded with ``runtime`` (``auto``: as the service runs it)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        bundle = ModelBundle.load(os.environ[BUNDLE_ENV], runtime=runtime)
        run_model(bundle, np.zeros((1, *bundle.contract.input_shape), np.float32))  # warm-up
        app.state.bundle = bundle
        app.state.facts = ModelFacts(bundle.contract, bundle.spec.spec_id)
        log.info("peer %d serves %s", os.getpid(), bundle.contract.name)
        mark_ready()
        yield

    app = FastAPI(title="breastscan benchmark peer", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def refuse(request: Request, exc: ApiError) -> Response:
        return Response(error_json(exc.code, exc.message), status_code=ERRORS[exc.code].http, media_type=JSON)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    def predict(request: Request, image: Annotated[bytes, File()]) -> Response:
        # A sync endpoint: FastAPI runs it in its thread pool, off the event loop.
        bundle: ModelBundle = request.app.state.bundle
        gray = decode_upload(image, max_bytes=MAX_UPLOAD_BYTES)
        prepared = prepare_inputs(bundle.spec, bundle.contract, [gray])
        out = run_model(bundle, prepared.batch)
        answer = predictions(request.app.state.facts, prepared.grays, prepared.boxes, out)[0]
        return Response(to_json(answer), media_type=JSON)

    return app


app = make_app(ModelBundle.predict)
