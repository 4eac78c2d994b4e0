"""The breastscan model service: the production models over HTTP and gRPC, with a web UI.

``bentoml serve services.service:BreastScan`` (port 3000) starts it. Each worker process
holds every served model (:class:`breastscan.serving.runtime.Worker`): its HTTP API is the
edge middleware (:class:`breastscan.serving.http.Edge`: request ids, size limit, API keys,
every API route parsed once and answered by the engine), its gRPC server (port 50051)
runs beside it on the same engine, and the web UI is mounted at ``/ui``. BentoML runs the
workers, their health (``/healthz``, ``/livez``, ``/readyz``) and ``/metrics``.

What is served comes from ``services/serving.yaml`` (or the file named by
``BREASTSCAN_SERVING_CONFIG``); the models come from the BentoML store, where
``breastscan build`` imports the registry's production versions. With ``models: auto``
each worker then follows the registry stage, swapping in the version a promotion or a
rollback points it at (:mod:`breastscan.serving.follow`); a Bento serves exactly the
versions it was built with.
"""

import asyncio
from pathlib import Path

import bentoml

from breastscan.logs import configure_service_logging
from breastscan.serving.http import Edge
from breastscan.serving.runtime import Worker, edge_options, service_config, service_options
from breastscan.serving.ui import make_ui_app

CONFIG, MODEL_TAGS = service_config(Path(__file__))


@bentoml.service(**service_options(CONFIG))
class BreastScan:
    """Every served model in this worker, answered over HTTP (the edge) and gRPC, batched."""

    def __init__(self) -> None:
        configure_service_logging()
        self.worker = Worker(CONFIG, MODEL_TAGS)

    def __is_ready__(self) -> bool:
        """Ready once every model is loaded (it is by the time the worker takes requests)."""
        return self.worker.ready

    @bentoml.on_startup
    async def start_grpc(self) -> None:
        """Start the gRPC server in this worker, on its event loop's engine."""
        self.worker.start_grpc(asyncio.get_running_loop(), EDGE["keys"])

    @bentoml.on_startup
    async def follow_registry(self) -> None:
        """Follow the registry stage from this worker's event loop (``follow`` in the config)."""
        self.worker.follow_registry(asyncio.get_running_loop())

    @bentoml.on_shutdown
    def stop(self) -> None:
        """Stop the gRPC server (letting calls in flight finish), then the model threads."""
        self.worker.stop()


EDGE = edge_options(CONFIG)
# `bentoml build` packs these exact model versions into the Bento.
BreastScan.models.extend(bentoml.models.BentoModel(tag) for tag in MODEL_TAGS.values())
BreastScan.add_asgi_middleware(Edge, **EDGE)
BreastScan.mount_asgi_app(make_ui_app(), path="/ui", name="ui")
