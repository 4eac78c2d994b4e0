"""Benchmark peer: the naive FastAPI server, Keras ``Model.predict`` on every request.

The same app as :mod:`load_tests.peers.fastapi_app` (``uvicorn
load_tests.peers.seeds_app:app``), but its model call is ``model.predict(batch, verbose=0)``
then the bundle's calibration, the way a first serving script is usually written: each call
builds a data adapter and runs Keras' whole predict loop, where ``ModelBundle.predict`` calls
the model once.
"""

from __future__ import annotations

from .fastapi_app import make_app

app = make_app(lambda bundle, batch: bundle.probabilities(bundle.model.predict(batch, verbose=0)))
