"""Benchmark peer: the naive FastAPI server, Keras ``Model.predict`` on every request.

The same app as :mod:`load_tests.peers.fastapi_app` (``uvicorn
load_tests.peers.seeds_app:app``), but its model call is ``model.predict(batch, verbose=0)``
then the bundle's calibration, the way a first serving script is usually written: each call
builds a data adapter and runs Keras' whole predict loop, where ``ModelBundle.predict`` calls
the model once. A model whose contract asks for test-time flips (``tta: flip``) is run on the
mirrored batch too, as ``ModelBundle.predict`` does, so the answer is the same (within the
ONNX export check's bound when the service runs the export).
"""

from __future__ import annotations

import numpy as np

from breastscan.bundle import ModelBundle

from .fastapi_app import make_app


def keras_predict(bundle: ModelBundle, batch: np.ndarray) -> np.ndarray:
    """Served probabilities of ``(n, H, W, 1)`` float32 ``batch`` through ``Model.predict``.

    Classifiers and segmenters (a multi-task model's two outputs are not handled): ``(n, k)``
    class probabilities or ``(n, H, W, 1)`` lesion probabilities, as :meth:`ModelBundle.predict`.
    """
    logits = bundle.model.predict(batch, verbose=0)
    if bundle.contract.tta == "flip":  # the mean with the mirror's outputs, a mask mirrored back
        mirrored = bundle.model.predict(np.flip(batch, axis=2), verbose=0)
        logits = (logits + (np.flip(mirrored, axis=2) if logits.ndim == 4 else mirrored)) / 2.0
    return bundle.probabilities(logits)


app = make_app(keras_predict, runtime="keras")
