"""A service whose models run on their ONNX exports: no TensorFlow in the worker, the same answers.

The session's tiny models carry checked exports (``tests.services.make_registry``), as the
evaluate stage gives trained ones. A service with ``runtime: onnx`` answers every model over
HTTP and gRPC without TensorFlow in its worker -- checked on the process itself: no
TensorFlow library is mapped into it -- until the first Grad-CAM request, which loads the
Keras model and answers a map. The session service (``runtime: auto``) answers as the Keras
models do, within the export check's tolerance.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pytest

from breastscan.serving.client import GRPCClient, HTTPClient
from breastscan.serving.request import ImageInput, predict_request
from tests.services import images
from tests.services.conftest import Served, local_answer, variant_service, worker_processes
from tests.services.make_registry import MODELS

pytestmark = [pytest.mark.slow, pytest.mark.service]

MG = images.png(images.mammogram(3))
US = images.png(images.ultrasound(4))
PROBABILITY_TOLERANCE = 1e-4
"""The export check's bound on a served probability's difference."""


@pytest.fixture(scope="module")
def onnx_service(served_project: tuple[Path, dict[str, str]]) -> Iterator[Served]:
    """The session's models served with ``runtime: onnx`` (each model's export, or no start)."""
    with variant_service(served_project, "onnx", {"runtime": "onnx"}) as served:
        yield served


def _image(name: str) -> bytes:
    return MG if MODELS[name]["modality"] == "mammography" else US


def _tensorflow_mapped(process: psutil.Process) -> list[str]:
    """The TensorFlow shared libraries mapped into ``process``."""
    return sorted({m.path for m in process.memory_maps() if "tensorflow" in m.path.lower()})


def test_onnx_worker_answers_every_model_without_tensorflow(onnx_service: Served) -> None:
    served = onnx_service
    (worker,) = worker_processes(served)
    with HTTPClient(served.http_url) as http, GRPCClient(served.grpc_target) as grpc:
        for name in MODELS:
            by_http, by_grpc = http.predict(name, _image(name)), grpc.predict(name, _image(name))
            assert by_http["model"] == by_grpc["model"] == name
            if "probabilities" in by_http:
                assert np.allclose(list(by_http["probabilities"].values()),
                                   list(by_grpc["probabilities"].values()), atol=1e-6)
        http.analyze(MG, modality="mammography")
        http.analyze(US, modality="ultrasound")
    assert _tensorflow_mapped(worker) == [], "the ONNX worker loaded TensorFlow"
    assert served.log_lines("TensorFlow not loaded") and served.log_lines("tumor v1 (production, onnx)")
    with GRPCClient(served.grpc_target) as grpc:
        assert {m["runtime"] for m in grpc.models()} == {"onnx"}

    with HTTPClient(served.http_url) as http:  # Grad-CAM needs the Keras model: loaded now
        explained = http.predict("tumor", MG, explain=True)
    assert explained["heatmap_png"]
    assert _tensorflow_mapped(worker), "Grad-CAM ran without TensorFlow?"
    assert served.log_lines("tumor: Keras model loaded for Grad-CAM")


def test_exported_answers_match_keras(service: Served, served_project: tuple[Path, dict[str, str]],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The session service (``runtime: auto``: the exports) against the Keras models in process."""
    from breastscan.registry.resolver import load_bundle
    from breastscan.serving.engine import local_engine

    uri = served_project[1]["MLFLOW_TRACKING_URI"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    names = ("density", "tumor", "lesion")
    mlflow.set_tracking_uri(uri)  # an earlier test may have set another store in this process
    mlflow.set_registry_uri(uri)
    try:
        bundles = {n: load_bundle(f"breastscan-{n}@production", runtime="keras") for n in names}
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
        mlflow.set_registry_uri(None)  # type: ignore[arg-type]
    assert {b.runtime for b in bundles.values()} == {"keras"}
    keras = local_engine(bundles, versions=dict.fromkeys(names, "1"),
                         stages=dict.fromkeys(names, "production"))
    with HTTPClient(service.http_url) as http:
        for name in names:
            served = http.predict(name, _image(name))
            local = local_answer(keras, predict_request(name, ImageInput(data=_image(name))))
            assert served.keys() == local.keys(), name
            if "probabilities" in local:
                assert served["predicted"] == local["predicted"], name
                probs = local["probabilities"]
                gap = max(abs(served["probabilities"][k] - probs[k]) for k in probs)
                assert gap <= PROBABILITY_TOLERANCE, (name, gap)
            else:  # the thresholded masks agree to a pixel or two
                assert abs(served["lesion_fraction"] - local["lesion_fraction"]) < 1e-3, name
