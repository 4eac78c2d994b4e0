"""Benchmark peer: the minimal BentoML baseline, one service serving one model bundle.

``bentoml serve load_tests.peers.bentoml_app:PeerService`` loads the bundle in
``$PEER_BUNDLE`` in each of ``$PEER_WORKERS`` workers (default 1), warms it up, and answers
``POST /predict`` (multipart, file field ``image``) with the project's answer JSON, built by
the same steps as :mod:`load_tests.peers.fastapi_app` and sent as ready bytes, as the
service sends them (BentoML passes a returned ``Response`` through as it is); a refusal is
the error table's status with :func:`~breastscan.serving.answer.error_json`. Health is
BentoML's ``/readyz``. No second service, no adaptive batching, BentoML's defaults
otherwise (a sync API runs in the worker's thread pool, one thread unless ``threads`` is
configured).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from starlette.responses import Response

from breastscan.bundle import ModelBundle
from breastscan.serving.answer import ERRORS, ApiError, ModelFacts, error_json, predictions, to_json
from breastscan.serving.config import ServingConfig
from breastscan.serving.engine import prepare_inputs
from breastscan.serving.request import decode_upload

from .launch import BUNDLE_ENV, WORKERS_ENV, mark_ready

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = ServingConfig().max_upload_bytes
"""The service's default upload limit."""
JSON = "application/json"


@bentoml.service(name="peer", workers=int(os.environ.get(WORKERS_ENV, "1")))
class PeerService:
    """The bundle in ``$PEER_BUNDLE``, served by ``POST /predict``."""

    def __init__(self) -> None:
        self.bundle = ModelBundle.load(os.environ[BUNDLE_ENV], runtime="auto")  # as the service runs it
        self.bundle.predict(np.zeros((1, *self.bundle.contract.input_shape), np.float32))  # warm-up
        self.facts = ModelFacts(self.bundle.contract, self.bundle.spec.spec_id)
        log.info("peer %d serves %s", os.getpid(), self.bundle.contract.name)
        mark_ready()

    @bentoml.api
    def predict(self, image: Path) -> Any:  # a Response: BentoML cannot declare one as its output type
        """The answer JSON for one uploaded image; a client's mistake is a 4xx ``{"error", "code"}``."""
        bundle = self.bundle
        try:
            gray = decode_upload(image.read_bytes(), max_bytes=MAX_UPLOAD_BYTES)
            prepared = prepare_inputs(bundle.spec, bundle.contract, [gray])
        except ApiError as exc:
            return Response(error_json(exc.code, exc.message), status_code=ERRORS[exc.code].http,
                            media_type=JSON)
        out = bundle.predict(prepared.batch)
        answer = predictions(self.facts, prepared.grays, prepared.boxes, out)[0]
        return Response(to_json(answer), media_type=JSON)
