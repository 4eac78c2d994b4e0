"""Benchmark peer: the plain-server baseline, one FastAPI app serving one model bundle.

``uvicorn load_tests.peers.fastapi_app:app`` loads the bundle in ``$PEER_BUNDLE`` at
startup, warms it up, and answers ``POST /predict`` (multipart, file field ``image``) with
the project's answer dict, built by the project's own request steps
(:mod:`breastscan.serving.requests`) around ``ModelBundle.predict``; ``GET /healthz`` is 200
once the model is loaded. :func:`make_app` builds it around any model call
(:mod:`load_tests.peers.seeds_app` is the naive ``Model.predict`` variant).
"""

import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Request
from fastapi.responses import JSONResponse

from breastscan.bundle import ModelBundle
from breastscan.serving.requests import InputError, decode_upload, finish_predictions, prepare_inputs

from .launch import BUNDLE_ENV, mark_ready

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 32 * 2**20
RunModel = Callable[[ModelBundle, np.ndarray], np.ndarray]
"""``(bundle, batch) -> probabilities``: the model call a peer is built around."""


def make_app(run_model: RunModel) -> FastAPI:
    """A FastAPI peer that answers ``POST /predict`` with ``run_model`` as its model call."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        bundle = ModelBundle.load(os.environ[BUNDLE_ENV])
        run_model(bundle, np.zeros((1, *bundle.contract.input_shape), np.float32))  # warm-up
        app.state.bundle = bundle
        log.info("peer %d serves %s", os.getpid(), bundle.contract.name)
        mark_ready()
        yield

    app = FastAPI(title="breastscan benchmark peer", lifespan=lifespan)

    @app.exception_handler(InputError)
    async def refuse(request: Request, exc: InputError) -> JSONResponse:
        return JSONResponse({"error": exc.message, "code": exc.code},
                            status_code=413 if exc.code == "too_large" else 400)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    def predict(request: Request, image: Annotated[bytes, File()]) -> dict[str, Any]:
        # A sync endpoint: FastAPI runs it in its thread pool, off the event loop.
        bundle: ModelBundle = request.app.state.bundle
        gray = decode_upload(image, max_bytes=MAX_UPLOAD_BYTES)
        prepared = prepare_inputs(bundle.spec, bundle.contract, [gray])
        probs = run_model(bundle, prepared.batch)
        return finish_predictions(bundle.contract, bundle.spec.spec_id, prepared, probs)[0].to_dict()

    return app


app = make_app(ModelBundle.predict)
