"""Locust load test of the breastscan model service, over HTTP and gRPC.

Start the service (``make serve``: HTTP on 127.0.0.1:3000, gRPC on 127.0.0.1:50051), then::

    .venv/bin/locust -f load_tests/locustfile.py --headless -u 16 -r 4 -t 60s \\
        --host http://127.0.0.1:3000 --grpc-target 127.0.0.1:50051 \\
        --csv reports/load/load --html reports/load/report.html

(``make load`` runs exactly this; drop ``--headless`` for Locust's web UI on :8089.)

API key
    When the service requires one (``auth:`` in ``services/serving.yaml``), export it as
    ``BREASTSCAN_API_KEY``: both kinds of user send it with every request (HTTP
    ``Authorization: Bearer <key>``, gRPC the same metadata). Without it every request
    fails with 401 / ``UNAUTHENTICATED``.

Users
    :class:`ClinicHTTPUser` (weight 3) posts one image per request, weighted as a clinic
    calls the API -- ``/analyze`` 4, ``/tumor`` 3, ``/density`` 2, ``/lesion`` 1 -- and now
    and then a *burst*: 2-8 single-image requests fired at once (gevent), the concurrent
    traffic that adaptive batching merges into one model call. :class:`ClinicGRPCUser`
    (weight 1) makes the same calls over gRPC through the project's
    :class:`breastscan.serving.client.GRPCClient`. With ``-u`` of 2 or more both kinds run.

Payloads
    mammography and ultrasound phantoms (:mod:`breastscan.data.phantoms`) drawn from fixed
    seeds when Locust starts and encoded as PNG -- nothing is read from outside the project.

Request names
    HTTP: the endpoint (``/analyze``, ``/tumor`` ...), bursts ``/tumor [burst]`` ...;
    gRPC (type ``grpc``): ``Analyze``, ``Predict/tumor`` ...

Pass/fail (checked when Locust quits, over all requests; exit code 1 when one fails)
    ``--max-fail-ratio`` (default 0.01: at most 1 % failed requests),
    ``--max-p95-ms`` (default 2000) and ``--max-p99-ms`` (default 5000): the 95th and 99th
    percentile response times over all requests, in milliseconds. The log names each
    threshold that failed with the measured and the allowed value. A run without a single
    request fails too.

Locust monkey-patches the interpreter (gevent) when it starts: run this file only with the
``locust`` command (or ``python -m locust``), never import it from another program.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import cv2
import gevent
import grpc.experimental.gevent
import numpy as np
from locust import HttpUser, User, between, events, task
from locust.env import Environment
from locust.runners import WorkerRunner
from urllib3.filepost import encode_multipart_formdata

from breastscan.data.phantoms import mammography_phantom, ultrasound_phantom
from breastscan.serving.answer import ERRORS, Analysis, Prediction, code_for_http, from_proto
from breastscan.serving.client import GRPCClient, ServiceError, resolve_api_key
from breastscan.serving.proto.breastscan.v1 import breastscan_pb2 as pb

# gRPC's core must cooperate with gevent's loop; this must run before any channel exists.
grpc.experimental.gevent.init_gevent()

log = logging.getLogger("breastscan.load")

DEFAULT_MAX_FAIL_RATIO = 0.01
DEFAULT_MAX_P95_MS = 2000.0
DEFAULT_MAX_P99_MS = 5000.0
DEFAULT_GRPC_TARGET = "127.0.0.1:50051"
N_IMAGES = 8
"""Phantoms drawn per modality (fixed seeds: every run sends the same images)."""
BURST_SIZES = (2, 8)
"""Smallest and largest number of requests a burst fires at once."""


# --------------------------------------------------------------------------- payloads


def _png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


@functools.cache
def make_payloads(n: int = N_IMAGES, seed: int = 20240) -> dict[str, list[bytes]]:
    """PNG bytes of ``n`` mammography and ``n`` ultrasound phantoms, by modality (drawn once)."""
    rng = np.random.default_rng(seed)
    pathologies = ("benign", "malignant", "normal")
    mammograms = [_png(mammography_phantom(rng, density=1 + i % 4, pathology=pathologies[i % 3],
                                           laterality="LR"[i % 2])[0]) for i in range(n)]
    ultrasounds = [_png(ultrasound_phantom(rng, pathology=pathologies[i % 3])[0]) for i in range(n)]
    return {"mammography": mammograms, "ultrasound": ultrasounds}


@events.test_start.add_listener
def draw_payloads(**_: Any) -> None:
    """Draw the phantoms before the first user starts, not in its first request."""
    make_payloads()


MODALITY = {"density": "mammography", "tumor": "mammography", "lesion": "ultrasound"}
"""The modality of the images each model endpoint is sent."""


def _image(modality: str) -> bytes:
    return random.choice(make_payloads()[modality])


def multipart(image: bytes, **fields: str) -> tuple[bytes, str]:
    """``(body, content type)`` of a multipart form with the ``image`` file and text fields."""
    form: dict[str, Any] = {"image": ("image.png", image, "image/png"), **fields}
    return encode_multipart_formdata(form)


def refusal(status: int, body: Any) -> str:
    """A failed HTTP answer as ``HTTP <status> <code>: <message>``, the code from the error table.

    Args:
        status: the HTTP status.
        body: the parsed JSON body, ``{"error": message, "code": code}`` for the service's
            refusals (anything else is read by its status, :func:`code_for_http`).
    """
    known = isinstance(body, dict) and body.get("code") in ERRORS
    code = body["code"] if known else code_for_http(status)
    message = body.get("error") if isinstance(body, dict) else None
    return f"HTTP {status} {code}: {str(message or body)[:200]}"


def _json_or_text(response: Any) -> Any:
    """A Locust (``requests``) response's JSON body, or its text when it is not JSON."""
    try:
        return response.json()
    except ValueError:
        return response.text


# --------------------------------------------------------------------------- HTTP


class ClinicHTTPUser(HttpUser):
    """A clinic's client over HTTP: one image per request, and bursts of concurrent requests."""

    weight = 3
    wait_time = between(0.2, 1.0)

    def on_start(self) -> None:
        """Send the API key of ``BREASTSCAN_API_KEY`` (when set) with every request."""
        key = resolve_api_key(None)
        if key:
            self.client.headers["Authorization"] = f"Bearer {key}"

    def _post(self, endpoint: str, image: bytes, name: str | None = None, **fields: str) -> None:
        body, content_type = multipart(image, **fields)
        with self.client.post(f"/{endpoint}", data=body, headers={"Content-Type": content_type},
                              name=name or f"/{endpoint}", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(refusal(response.status_code, _json_or_text(response)))
            elif endpoint == "analyze" and not response.json().get("models"):
                response.failure("answer without models")

    @task(4)
    def analyze(self) -> None:
        """Every model of the image's modality (mostly mammograms, as in a screening clinic)."""
        modality = "mammography" if random.random() < 0.75 else "ultrasound"
        self._post("analyze", _image(modality), modality=modality)

    @task(3)
    def tumor(self) -> None:
        """Mass classification of a mammogram."""
        self._post("tumor", _image("mammography"))

    @task(2)
    def density(self) -> None:
        """Breast density of a mammogram."""
        self._post("density", _image("mammography"))

    @task(1)
    def lesion(self) -> None:
        """Lesion segmentation of an ultrasound image."""
        self._post("lesion", _image("ultrasound"))

    @task(1)
    def burst(self) -> None:
        """2-8 single-image requests to one model at once: adaptive batching merges them."""
        model = random.choice(("tumor", "density", "lesion"))
        n = random.randint(*BURST_SIZES)
        greenlets = [gevent.spawn(self._post, model, _image(MODALITY[model]), f"/{model} [burst]")
                     for _ in range(n)]
        gevent.joinall(greenlets)


# --------------------------------------------------------------------------- gRPC

GRPC_ANSWERS: dict[str, type] = {"Predict": Prediction, "Analyze": Analysis}
"""The answer class of each RPC the gRPC user calls."""


class ClinicGRPCUser(User):
    """The same clinic calls over gRPC (``breastscan.v1.BreastScan``), via :class:`GRPCClient`.

    Each call fires Locust's ``request`` event (type ``grpc``) with its response time, the
    answer's serialized size and the :class:`ServiceError` of a failed call (its code from
    the error table). Each answer is decoded as the clients decode it
    (:func:`breastscan.serving.answer.from_proto`), after the response time is taken, as
    the HTTP user reads its JSON; an ``Analyze`` answer without models fails.
    """

    weight = 1
    wait_time = between(0.2, 1.0)

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        target = getattr(environment.parsed_options, "grpc_target", None) or DEFAULT_GRPC_TARGET
        self.client = GRPCClient(target, timeout=60)  # sends BREASTSCAN_API_KEY's key when set

    def on_stop(self) -> None:
        """Close the channel."""
        self.client.close()

    def _call(self, name: str, method: str, make_request: Callable[[], Any]) -> None:
        request = make_request()
        start = time.perf_counter()
        length = 0
        exception: Exception | None = None
        try:
            message = self.client.call(method, request)
        except ServiceError as exc:
            exception, message = exc, None
        response_time = (time.perf_counter() - start) * 1000
        if message is not None:
            length = message.ByteSize()
            answer = from_proto(GRPC_ANSWERS[method], message)
            if method == "Analyze" and not answer.models:
                exception = ValueError("answer without models")
        self.environment.events.request.fire(
            request_type="grpc", name=name, response_time=response_time, response_length=length,
            exception=exception, context={})

    def _predict(self, model: str) -> None:
        self._call(f"Predict/{model}", "Predict", lambda: pb.PredictRequest(
            model=model, image=pb.Image(file=_image(MODALITY[model]))))

    @task(4)
    def analyze(self) -> None:
        """``Analyze``: every model of the image's modality."""
        modality = "mammography" if random.random() < 0.75 else "ultrasound"
        self._call("Analyze", "Analyze", lambda: pb.AnalyzeRequest(
            image=pb.Image(file=_image(modality)), modality=modality))

    @task(3)
    def tumor(self) -> None:
        """``Predict`` with the tumor model."""
        self._predict("tumor")

    @task(2)
    def density(self) -> None:
        """``Predict`` with the density model."""
        self._predict("density")

    @task(1)
    def lesion(self) -> None:
        """``Predict`` with the lesion model."""
        self._predict("lesion")


# --------------------------------------------------------------------------- thresholds


@events.init_command_line_parser.add_listener
def add_options(parser: Any) -> None:
    """The pass/fail thresholds and the gRPC address, as Locust command-line options."""
    parser.add_argument("--max-fail-ratio", type=float, default=DEFAULT_MAX_FAIL_RATIO,
                        help=f"largest share of failed requests that passes "
                             f"(default {DEFAULT_MAX_FAIL_RATIO})")
    parser.add_argument("--max-p95-ms", type=float, default=DEFAULT_MAX_P95_MS,
                        help=f"largest 95th percentile response time in ms (default {DEFAULT_MAX_P95_MS:g})")
    parser.add_argument("--max-p99-ms", type=float, default=DEFAULT_MAX_P99_MS,
                        help=f"largest 99th percentile response time in ms (default {DEFAULT_MAX_P99_MS:g})")
    parser.add_argument("--grpc-target", default=DEFAULT_GRPC_TARGET,
                        help=f"host:port of the service's gRPC server (default {DEFAULT_GRPC_TARGET})")


def threshold_failures(total: Any, max_fail_ratio: float, max_p95_ms: float, max_p99_ms: float) -> list[str]:
    """What failed, one line per threshold (empty when the run passes).

    Args:
        total: Locust's aggregated stats entry (``environment.stats.total``).
        max_fail_ratio: largest share of failed requests allowed.
        max_p95_ms: largest 95th percentile response time allowed, ms.
        max_p99_ms: largest 99th percentile response time allowed, ms.
    """
    if total.num_requests == 0:
        return ["no requests were made (is the service up?)"]
    failures = []
    if total.fail_ratio > max_fail_ratio:
        failures.append(f"fail ratio {total.fail_ratio:.4f} > max-fail-ratio {max_fail_ratio:g} "
                        f"({total.num_failures} of {total.num_requests} requests failed)")
    for percent, allowed in ((0.95, max_p95_ms), (0.99, max_p99_ms)):
        measured = total.get_response_time_percentile(percent)
        if measured > allowed:
            label = f"p{round(percent * 100)}"
            failures.append(f"{label} response time {measured:g} ms > max-{label}-ms {allowed:g} ms")
    return failures


@events.quitting.add_listener
def check_thresholds(environment: Environment, **_: Any) -> None:
    """Set exit code 1, and log why, when the run broke a threshold (not on a worker)."""
    if isinstance(environment.runner, WorkerRunner) or environment.parsed_options is None:
        return
    opts = environment.parsed_options
    total = environment.stats.total
    failures = threshold_failures(total, opts.max_fail_ratio, opts.max_p95_ms, opts.max_p99_ms)
    for failure in failures:
        log.error("threshold failed: %s", failure)
    if failures:
        environment.process_exit_code = 1
        return
    environment.process_exit_code = 0
    log.info("thresholds passed: %d requests, fail ratio %.4f <= %g, p95 %g ms <= %g, p99 %g ms <= %g",
             total.num_requests, total.fail_ratio, opts.max_fail_ratio,
             total.get_response_time_percentile(0.95), opts.max_p95_ms,
             total.get_response_time_percentile(0.99), opts.max_p99_ms)


# Importing this file blocks for seconds (numpy, OpenCV, gRPC, drawing the phantoms) while
# gevent's loop clock stands still; Locust's --run-time timer would start from that stale
# time and stop the run early by as much. Bring the clock up to date.
gevent.get_hub().loop.update_now()
