"""Benchmark peer: the minimal BentoML baseline, one service serving one model bundle.

``bentoml serve load_tests.peers.bentoml_app:PeerService`` loads the bundle in
``$PEER_BUNDLE`` in each of ``$PEER_WORKERS`` workers (default 1), warms it up, and answers
``POST /predict`` (multipart, file field ``image``) with the project's answer dict, built by
the same request steps as :mod:`load_tests.peers.fastapi_app`; health is BentoML's
``/readyz``. No second service, no adaptive batching, BentoML's defaults otherwise (a sync
API runs in the worker's thread pool, one thread unless ``threads`` is configured).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import bentoml
import numpy as np

from breastscan.bundle import ModelBundle
from breastscan.serving.requests import InputError, decode_upload, finish_predictions, prepare_inputs

from .launch import BUNDLE_ENV, WORKERS_ENV, mark_ready

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 32 * 2**20


@bentoml.service(name="peer", workers=int(os.environ.get(WORKERS_ENV, "1")))
class PeerService:
    """The bundle in ``$PEER_BUNDLE``, served by ``POST /predict``."""

    def __init__(self) -> None:
        self.bundle = ModelBundle.load(os.environ[BUNDLE_ENV])
        self.bundle.predict(np.zeros((1, *self.bundle.contract.input_shape), np.float32))  # warm-up
        log.info("peer %d serves %s", os.getpid(), self.bundle.contract.name)
        mark_ready()

    @bentoml.api
    def predict(self, image: Path, ctx: bentoml.Context) -> dict[str, Any]:
        """The answer for one uploaded image; a client's mistake is a 4xx ``{"error", "code"}``."""
        bundle = self.bundle
        try:
            gray = decode_upload(image.read_bytes(), max_bytes=MAX_UPLOAD_BYTES)
            prepared = prepare_inputs(bundle.spec, bundle.contract, [gray])
        except InputError as exc:
            ctx.response.status_code = 413 if exc.code == "too_large" else 400
            return {"error": exc.message, "code": exc.code}
        probs = bundle.predict(prepared.batch)
        return finish_predictions(bundle.contract, bundle.spec.spec_id, prepared, probs)[0].to_dict()
