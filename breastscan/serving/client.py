"""Python clients of the model service: :class:`HTTPClient` and :class:`GRPCClient`.

Both have the same methods and give the same answers, in the shape of the HTTP API's JSON
(:func:`breastscan.serving.answer.to_dict`): PNGs as base64 text, probabilities as
an ordered ``{class: probability}`` dict, ``None`` for what is unknown or absent. The gRPC
client converts its messages to that shape; every probability, confidence and fraction
travels as a ``double`` in the gRPC API (never a 32-bit float) and as a full-precision
number in JSON, so the two protocols' answers for the same image compare equal with ``==``::

    with HTTPClient("http://127.0.0.1:3000") as http, GRPCClient("127.0.0.1:50051") as rpc:
        assert http.predict("tumor", "mammogram.png") == rpc.predict("tumor", "mammogram.png")

Errors of either protocol raise :class:`ServiceError`, whose ``code`` is the service's
stable input-error code (:data:`breastscan.serving.answer.ERRORS`, e.g.
``not_an_image``, ``bad_roi``) for a client mistake, and otherwise names what happened
(``bad_request``, ``too_large``, ``deadline_exceeded``, ``unavailable``, ``internal`` ...).

API keys: when the service requires one (``auth:`` in ``services/serving.yaml``), pass it
as ``api_key=`` or set the environment variable ``BREASTSCAN_API_KEY`` (:data:`API_KEY_ENV`),
which both clients read when ``api_key`` is ``None``; ``api_key=""`` sends none. The HTTP
client sends it as ``Authorization: Bearer <key>``, the gRPC client as the same metadata on
every call. A missing or refused key raises :class:`ServiceError` with code ``unauthorized``
(HTTP 401 / gRPC ``UNAUTHENTICATED``)::

    export BREASTSCAN_API_KEY=...   # printed once by `breastscan api-key add`

The clients need ``httpx`` and ``grpcio``, and no model library (Keras is never imported).
"""

from __future__ import annotations

import collections
import mimetypes
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeAlias

import grpc
import httpx
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from breastscan.serving.answer import (
    ERROR_CODE_KEY,
    ERRORS,
    Analysis,
    ModelInfo,
    Prediction,
    Preview,
    code_for_grpc,
    code_for_http,
    from_proto,
    to_dict,
)
from breastscan.serving.proto.breastscan.v1 import breastscan_pb2 as pb
from breastscan.serving.proto.breastscan.v1 import breastscan_pb2_grpc as pb_grpc

ImageSource: TypeAlias = "str | os.PathLike[str] | bytes | bytearray | memoryview"
"""An image file: its path, or its bytes."""

API_KEY_ENV = "BREASTSCAN_API_KEY"
"""Environment variable holding the API key both clients send when ``api_key`` is ``None``.

Not to be confused with the service's ``BREASTSCAN_API_KEYS``, which holds the *hashes* of
the keys it accepts.
"""
_JSON_KINDS = "biuf"  # array dtype kinds JSON numbers can carry


class ServiceError(Exception):
    """The service refused or failed a request (or could not be reached).

    Attributes:
        code: the input-error code for a client mistake (one of
            :data:`breastscan.serving.answer.ERRORS`); ``bad_request`` for a refusal
            without a known code (e.g. BentoML's own request validation); ``too_large``
            for a request over the size limit; otherwise the gRPC status name in lower
            case or its HTTP equivalent (``internal``, ``unavailable``,
            ``deadline_exceeded`` ...); ``overloaded`` when adaptive batching shed the
            request (HTTP 503 / gRPC ``UNAVAILABLE``: retry after a moment);
            ``unauthorized`` for a missing or refused API key (HTTP 401 / gRPC
            ``UNAUTHENTICATED``).
        message: what the service (or the transport) said.
        status: the HTTP status code (``int``) or the ``grpc.StatusCode``; ``None`` when
            no answer came (connection failed, timed out) or the client refused to send.
    """

    def __init__(self, code: str, message: str, status: int | grpc.StatusCode | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


# --------------------------------------------------------------------------- helpers


def resolve_api_key(api_key: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """The API key to send: ``api_key``, else :data:`API_KEY_ENV` when ``api_key`` is ``None``.

    ``""`` (given, or an empty variable) sends no key. Surrounding whitespace is dropped.

    Raises:
        ValueError: a key with characters a header cannot carry (spaces, control or non-ASCII).
    """
    if api_key is None:
        api_key = (os.environ if env is None else env).get(API_KEY_ENV, "")
    key = api_key.strip()
    if any(not 0x21 <= ord(c) <= 0x7E for c in key):
        raise ValueError(f"the API key may hold only printable ASCII characters without spaces "
                         f"(check {API_KEY_ENV} or api_key)")
    return key or None


def _read_image(image: ImageSource) -> tuple[str, bytes]:
    """``(file name, bytes)`` of an image given as a path or as bytes."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return "image", bytes(image)
    path = Path(image)
    return path.name, path.read_bytes()


def _roi_values(roi: Sequence[int] | None) -> list[int]:
    return [] if roi is None else [int(v) for v in roi]


def array_to_proto(array: Any) -> pb.Array:
    """An ``Array`` message of an array: its shape, dtype name and little-endian C-order bytes.

    The dtype is sent as it is (the service answers ``bad_dtype`` for one it does not take).
    """
    arr = np.asarray(array)
    data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes(order="C")
    return pb.Array(shape=list(arr.shape), dtype=arr.dtype.name, data=data)


# --------------------------------------------------------------------------- HTTP


class HTTPClient:
    """Client of the service's HTTP API (BentoML), with the same methods as :class:`GRPCClient`.

    Args:
        base_url: the service's address.
        timeout: seconds to wait for each answer (and to connect).
        transport: an ``httpx`` transport to use instead of the network (tests).
        headers: extra headers sent with every request.
        api_key: the service's API key, sent as ``Authorization: Bearer <key>`` with every
            request (unless ``headers`` has an ``Authorization`` or ``X-API-Key`` of its
            own); ``None`` (the default) reads :data:`API_KEY_ENV` (``BREASTSCAN_API_KEY``),
            ``""`` sends none.
    """

    def __init__(self, base_url: str = "http://127.0.0.1:3000", timeout: float = 60, *,
                 transport: httpx.BaseTransport | None = None,
                 headers: Mapping[str, str] | None = None, api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = float(timeout)
        sent = dict(headers or {})
        key = resolve_api_key(api_key)
        if key and not any(name.lower() in ("authorization", "x-api-key") for name in sent):
            sent["Authorization"] = f"Bearer {key}"
        self._client = httpx.Client(base_url=self.base_url, timeout=self.timeout, transport=transport,
                                    headers=sent)

    # ------------------------------------------------------------------ API
    def predict(self, model: str, image: ImageSource, *, explain: bool = False,
                roi: Sequence[int] | None = None) -> dict[str, Any]:
        """One model's answer for one image file (``POST /predict``).

        Args:
            model: the served model's name (see :meth:`models`).
            image: the file's path or bytes (PNG, JPEG, PGM, TIFF, BMP, DICOM).
            explain: classifiers add a Grad-CAM heatmap and overlay.
            roi: ``(x, y, w, h)`` to answer about that crop only.

        Returns:
            :func:`breastscan.serving.answer.to_dict` (plus ``roi``).

        Raises:
            ServiceError: the service refused or failed the request.
        """
        return self._post("/predict", data={"model": model, **self._options(explain, roi)},
                          files=self._files(image))

    def predict_array(self, model: str, array: np.ndarray, *, explain: bool = False,
                      roi: Sequence[int] | None = None) -> dict[str, Any]:
        """One model's answer for one raw image array (``POST /predict_array``).

        Args:
            model: the served model's name.
            array: ``(H, W)`` or ``(H, W, C)`` pixels, sent with their dtype (uint8, uint16,
                int16, int32, float32 or float64; floats in [0, 1]).
            explain: classifiers add a Grad-CAM heatmap and overlay.
            roi: ``(x, y, w, h)`` to answer about that crop only.

        Raises:
            ServiceError: the service refused or failed the request; ``not_finite`` or
                ``bad_dtype`` with ``status=None`` for values JSON cannot carry (NaN,
                infinities, complex ...), which are not sent.
        """
        arr = np.asarray(array)
        if arr.dtype.kind not in _JSON_KINDS:
            raise ServiceError("bad_dtype", f"a {arr.dtype} array cannot be sent as JSON numbers")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ServiceError("not_finite", "image contains NaN or infinite values (JSON cannot carry them)")
        body = {"model": model, "array": arr.tolist(), "dtype": arr.dtype.name, "explain": bool(explain),
                "roi": self._roi_text(roi)}
        return self._post("/predict_array", json=body)

    def analyze(self, image: ImageSource, *, modality: str | None = None, explain: bool = False,
                roi: Sequence[int] | None = None, dicom: bool = False) -> dict[str, Any]:
        """Every model of the image's modality (``POST /analyze``).

        Args:
            image: the file's path or bytes.
            modality: ``mammography`` or ``ultrasound``; may be left out for a DICOM file
                whose header says, or when the service serves one modality.
            explain: add Grad-CAM heatmaps to classifier answers.
            roi: ``(x, y, w, h)`` to answer about that crop only.
            dicom: also return DICOM results (a DICOM image, no roi).

        Returns:
            ``{"modality", "models": {name: answer}}`` plus ``"eight_category"`` (mammograms
            with density and tumor models), ``"roi"``, and with ``dicom`` ``"dicom": {"sr":
            base64 Structured Report, "seg": {model: base64 Segmentation}}`` (DICOM Part 10).
        """
        fields = {"modality": modality or "", **self._options(explain, roi)}
        if dicom:
            fields["dicom"] = "true"
        return self._post("/analyze", data=fields, files=self._files(image))

    def preview(self, image: ImageSource) -> dict[str, Any]:
        """The decoded image as the service sees it (``POST /preview``).

        Returns:
            ``{"width", "height", "modality" (from a DICOM header, else None), "png" (base64)}``.
        """
        return self._post("/preview", files=self._files(image))

    def models(self) -> list[dict[str, Any]]:
        """The served models (``POST /models``), in name order."""
        answer = self._post("/models", json={})
        return list(answer)

    def health(self) -> str:
        """``"SERVING"`` when the service is ready (``GET /readyz`` answers 200), else ``"NOT_SERVING"``.

        Raises:
            ServiceError: the service cannot be reached.
        """
        response = self._send("GET", "/readyz")
        return "SERVING" if response.status_code == 200 else "NOT_SERVING"

    # ------------------------------------------------------------------ plumbing
    @staticmethod
    def _roi_text(roi: Sequence[int] | None) -> str:
        return ",".join(str(v) for v in _roi_values(roi))

    def _options(self, explain: bool, roi: Sequence[int] | None) -> dict[str, str]:
        return {"explain": "true" if explain else "false", "roi": self._roi_text(roi)}

    @staticmethod
    def _files(image: ImageSource) -> dict[str, tuple[str, bytes, str]]:
        name, data = _read_image(image)
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return {"image": (name, data, content_type)}

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._client.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ServiceError("deadline_exceeded", f"no answer from {self.base_url}{path} within "
                                                    f"{self.timeout:g} s") from exc
        except httpx.TransportError as exc:
            raise ServiceError("unavailable", f"cannot reach {self.base_url}{path}: {exc}") from exc

    def _post(self, path: str, **kwargs: Any) -> Any:
        response = self._send("POST", path, **kwargs)
        if response.status_code >= 400:
            raise http_error(response)
        try:
            return response.json()
        except ValueError as exc:
            raise ServiceError("bad_response", f"{path} answered {response.status_code} without JSON",
                               response.status_code) from exc

    def close(self) -> None:
        """Close the connections."""
        self._client.close()

    def __enter__(self) -> HTTPClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def http_error(response: httpx.Response) -> ServiceError:
    """The :class:`ServiceError` of an HTTP error answer.

    The service answers a client mistake with ``{"error": message, "code": code}``;
    BentoML's own validation with ``{"error": ..., "detail": [...]}``. An answer without a
    code of :data:`breastscan.serving.answer.ERRORS` is read by its status: 401
    ``unauthorized``, 413 ``too_large``, 503 ``unavailable``, 504 ``deadline_exceeded``, other 4xx
    ``bad_request``, 5xx ``internal``.
    """
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    message = ""
    code = None
    if isinstance(body, dict):
        for key in ("error", "message", "detail"):
            if isinstance(body.get(key), str) and body[key]:
                message = body[key]
                break
        if isinstance(body.get("code"), str) and body["code"] in ERRORS:
            code = body["code"]
    if not message:
        message = response.text.strip()[:500] or response.reason_phrase or f"HTTP {status}"
    return ServiceError(code or code_for_http(status), message, status)


# --------------------------------------------------------------------------- gRPC


class GRPCClient:
    """Client of the service's gRPC API (``breastscan.v1.BreastScan``), same methods as :class:`HTTPClient`.

    Answers are converted to the HTTP API's JSON shape (see the module docs): raw PNG
    bytes become base64 text, repeated probabilities an ordered dict, empty texts and unset
    optional fields ``None``. All floats are ``double`` on the wire, so the numbers are the
    service's own (no 32-bit rounding).

    Args:
        target: ``host:port`` of the gRPC server.
        timeout: deadline of each call, in seconds.
        max_message_bytes: largest message sent or received (answers with explanations
            carry PNGs at the image's size).
        credentials: channel credentials for TLS (``None``: plaintext).
        options: extra channel options.
        api_key: the service's API key, sent as the metadata ``authorization: Bearer <key>``
            with every call made through this client's channel (:attr:`stub`,
            :attr:`channel`, the health check); ``None`` (the default) reads
            :data:`API_KEY_ENV` (``BREASTSCAN_API_KEY``), ``""`` sends none.
    """

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float = 60, *,
                 max_message_bytes: int = 256 * 2**20,
                 credentials: grpc.ChannelCredentials | None = None,
                 options: Sequence[tuple[str, Any]] = (), api_key: str | None = None) -> None:
        self.target = target
        self.timeout = float(timeout)
        opts = [("grpc.max_receive_message_length", int(max_message_bytes)),
                ("grpc.max_send_message_length", int(max_message_bytes)), *options]
        self._channel = (grpc.secure_channel(target, credentials, options=opts) if credentials is not None
                         else grpc.insecure_channel(target, options=opts))
        key = resolve_api_key(api_key)
        if key:
            metadata = _MetadataInterceptor((("authorization", f"Bearer {key}"),))
            self._channel = grpc.intercept_channel(self._channel, metadata)
        self.stub = pb_grpc.BreastScanStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    @property
    def channel(self) -> grpc.Channel:
        """The underlying channel (e.g. for reflection or other stubs)."""
        return self._channel

    # ------------------------------------------------------------------ API
    def predict(self, model: str, image: ImageSource, *, explain: bool = False,
                roi: Sequence[int] | None = None) -> dict[str, Any]:
        """One model's answer for one image file (``Predict``); see :meth:`HTTPClient.predict`."""
        _, data = _read_image(image)
        request = pb.PredictRequest(model=model, image=pb.Image(file=data, roi=_roi_values(roi)),
                                    explain=explain)
        return to_dict(from_proto(Prediction, self.call("Predict", request)))

    def predict_array(self, model: str, array: np.ndarray, *, explain: bool = False,
                      roi: Sequence[int] | None = None) -> dict[str, Any]:
        """One model's answer for one raw image array (``Predict``); see :meth:`HTTPClient.predict_array`.

        The array travels as its raw bytes (little-endian, C order) with its shape and dtype
        name, so NaN or unsupported dtypes reach the service, which refuses them.
        """
        request = pb.PredictRequest(model=model, image=pb.Image(array=array_to_proto(array),
                                                                roi=_roi_values(roi)), explain=explain)
        return to_dict(from_proto(Prediction, self.call("Predict", request)))

    def analyze(self, image: ImageSource, *, modality: str | None = None, explain: bool = False,
                roi: Sequence[int] | None = None, dicom: bool = False) -> dict[str, Any]:
        """Every model of the image's modality (``Analyze``); see :meth:`HTTPClient.analyze`."""
        _, data = _read_image(image)
        request = pb.AnalyzeRequest(image=pb.Image(file=data, roi=_roi_values(roi)),
                                    modality=modality or "", explain=explain, dicom=dicom)
        return to_dict(from_proto(Analysis, self.call("Analyze", request)))

    def preview(self, image: ImageSource) -> dict[str, Any]:
        """The decoded image as the service sees it (``Preview``); see :meth:`HTTPClient.preview`."""
        _, data = _read_image(image)
        answer = self.call("Preview", pb.PreviewRequest(image=pb.Image(file=data)))
        return to_dict(from_proto(Preview, answer))

    def models(self) -> list[dict[str, Any]]:
        """The served models (``ListModels``), in name order."""
        answer = self.call("ListModels", pb.ListModelsRequest())
        return [to_dict(from_proto(ModelInfo, m)) for m in answer.models]

    def health(self, service: str = "") -> str:
        """The standard health check: ``"SERVING"``, ``"NOT_SERVING"`` ...

        Args:
            service: ``""`` for the server as a whole, or ``"breastscan.v1.BreastScan"``.

        Raises:
            ServiceError: the server cannot be reached, or does not know ``service``
                (``not_found``).
        """
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            response = self._health.Check(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise grpc_error(exc) from exc
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    # ------------------------------------------------------------------ plumbing
    def call(self, method: str, request: Any) -> Any:
        """Send a request message to one of the API's RPCs and return the answer message.

        The convenience methods use it; it is also the way to send a hand-built request.

        Args:
            method: ``Predict``, ``Analyze``, ``ListModels`` or ``Preview``.
            request: that RPC's request message.

        Raises:
            ServiceError: see :func:`grpc_error`.
        """
        try:
            return getattr(self.stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise grpc_error(exc) from exc

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> GRPCClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                            "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    """A call's details with other metadata (``grpc.ClientCallDetails`` is abstract)."""


class _MetadataInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                           grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds fixed metadata (the API key) to every call of a channel."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = tuple(metadata)

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        return _CallDetails(details.method, details.timeout, (*(details.metadata or ()), *self._metadata),
                            details.credentials, getattr(details, "wait_for_ready", None),
                            getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation: Callable[..., Any], client_call_details: Any,
                              request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], client_call_details: Any,
                               request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], client_call_details: Any,
                               request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation: Callable[..., Any], client_call_details: Any,
                                request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)


def grpc_error(exc: grpc.RpcError) -> ServiceError:
    """The :class:`ServiceError` of a failed gRPC call.

    The code is the server's ``error-code`` trailer when it is one of
    :data:`breastscan.serving.answer.ERRORS` (a client mistake, status
    ``INVALID_ARGUMENT``); otherwise ``bad_request`` for ``INVALID_ARGUMENT``,
    ``too_large`` for ``RESOURCE_EXHAUSTED`` (the message size limit), ``unauthorized`` for
    ``UNAUTHENTICATED`` (no valid API key), and the status name in lower case for the rest
    (``deadline_exceeded``, ``unavailable``, ``internal`` ...).
    """
    status = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = exc.details() if callable(getattr(exc, "details", None)) else None
    trailers = exc.trailing_metadata() if callable(getattr(exc, "trailing_metadata", None)) else None
    code = None
    for key, value in trailers or ():
        text = value.decode() if isinstance(value, bytes) else str(value)
        if key == ERROR_CODE_KEY and text in ERRORS:
            code = text
    return ServiceError(code or code_for_grpc(status.name), details or status.name, status)
