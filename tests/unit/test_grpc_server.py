"""The gRPC front end: a real server on 127.0.0.1 over an in-process engine, driven by GRPCClient.

Answers must be exactly the engine's own, in their JSON shape; client mistakes must come back as
INVALID_ARGUMENT with their stable code; health, reflection, time limits, internal
errors and the message size limit are those of the API's contract.
"""

from __future__ import annotations

import asyncio
import base64
import filecmp
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import pytest

from breastscan.bundle import ModelBundle, ModelContract
from breastscan.data.phantoms import mammography_phantom, ultrasound_phantom
from breastscan.imaging.preprocessing import PreprocessSpec
from breastscan.serving.answer import INTERNAL_MESSAGE, to_dict
from breastscan.serving.batching import OVERLOADED_MESSAGE, Overloaded
from breastscan.serving.client import GRPCClient, ServiceError
from breastscan.serving.engine import Engine, ServedModel, local_engine
from breastscan.serving.grpc_server import SERVICE_NAME, GrpcBindError, GrpcServerHandle, start_grpc_server
from breastscan.serving.proto.breastscan.v1 import breastscan_pb2 as pb
from breastscan.serving.request import ImageInput, Request, predict_request

pytestmark = pytest.mark.service

SPEC = PreprocessSpec(height=32, width=32)
MAX_MESSAGE = 1 << 20  # the server's request limit in these tests
MAMMO_SIZE = (80, 64)  # (H, W) of the test mammogram
US_SIZE = (56, 72)


# --------------------------------------------------------------------------- fixtures


def _png(arr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", arr)
    assert ok
    return buf.tobytes()


def _decode_png(text: str) -> np.ndarray:
    arr = cv2.imdecode(np.frombuffer(base64.b64decode(text), np.uint8), cv2.IMREAD_UNCHANGED)
    assert arr is not None
    return arr


def _classifier(name: str, label: str, classes: tuple[str, ...], names: tuple[str, ...]) -> ModelBundle:
    from breastscan.models import build_model

    model = build_model("classification", n_classes=len(classes), input_shape=(32, 32, 1), dropout=0.0)
    contract = ModelContract(name=name, task="classification", label=label, classes=classes,
                             class_names=names, input_shape=(32, 32, 1), dataset="mammography",
                             modality="mammography", temperature=1.5, spec_id=SPEC.spec_id)
    return ModelBundle(model, SPEC, contract)


def _segmenter() -> ModelBundle:
    from breastscan.models import build_model

    model = build_model("segmentation", input_shape=(32, 32, 1), base_filters=4, depth=2, dropout=0.0)
    contract = ModelContract(name="lesion", task="segmentation", label="mask", classes=(),
                             class_names=("lesion",), input_shape=(32, 32, 1), dataset="ultrasound",
                             modality="ultrasound", threshold=0.5, spec_id=SPEC.spec_id)
    return ModelBundle(model, SPEC, contract)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in a background thread, as BentoML's worker loop does."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="engine-loop", daemon=True)
    thread.start()
    yield loop
    asyncio.run_coroutine_threadsafe(loop.shutdown_default_executor(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


@pytest.fixture(scope="module")
def engine() -> Engine:
    bundles = {
        "density": _classifier("density", "density", ("1", "2", "3", "4"), ("A", "B", "C", "D")),
        "tumor": _classifier("tumor", "pathology", ("benign", "malignant", "normal"),
                             ("benign", "malignant", "normal")),
        "lesion": _segmenter(),
    }
    return local_engine(bundles, versions={"tumor": "3"}, stages={"tumor": "production"})


@pytest.fixture(scope="module")
def server(engine: Engine, loop: asyncio.AbstractEventLoop) -> Iterator[GrpcServerHandle]:
    handle = start_grpc_server(engine, loop, host="127.0.0.1", port=0, max_workers=4,
                               max_message_bytes=MAX_MESSAGE, timeout_s=60)
    yield handle
    handle.stop(None)


@pytest.fixture(scope="module")
def client(server: GrpcServerHandle) -> Iterator[GRPCClient]:
    with GRPCClient(f"127.0.0.1:{server.port}", timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def run(loop: asyncio.AbstractEventLoop, engine: Engine) -> Callable[[Request], Any]:
    """The engine's own answer to a request, in its JSON shape (run on the engine's loop)."""
    return lambda request: to_dict(asyncio.run_coroutine_threadsafe(engine.answer(request), loop).result(60))


@pytest.fixture(scope="module")
def mammogram() -> np.ndarray:
    return mammography_phantom(np.random.default_rng(1), density=3, pathology="malignant",
                               height=MAMMO_SIZE[0], width=MAMMO_SIZE[1])[0]


@pytest.fixture(scope="module")
def mammogram_png(mammogram: np.ndarray) -> bytes:
    return _png(mammogram)


@pytest.fixture(scope="module")
def ultrasound_png() -> bytes:
    return _png(ultrasound_phantom(np.random.default_rng(2), pathology="benign",
                                   height=US_SIZE[0], width=US_SIZE[1])[0])


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize("model", ["tumor", "density"])
def test_predict_equals_the_engine(client: GRPCClient, engine: Engine, run: Any, mammogram_png: bytes,
                                   model: str) -> None:
    answer = client.predict(model, mammogram_png)
    assert answer == run(predict_request(model, ImageInput(data=mammogram_png)))
    assert list(answer["probabilities"]) == list(engine.models[model].contract.class_names)
    assert (answer["width"], answer["height"]) == (MAMMO_SIZE[1], MAMMO_SIZE[0])
    assert "heatmap_png" not in answer and "roi" not in answer
    expected_version = ("3", "production") if model == "tumor" else (None, None)
    assert (answer["version"], answer["stage"]) == expected_version


def test_segmenter_answer_equals_the_engine(client: GRPCClient, engine: Engine, run: Any,
                                            ultrasound_png: bytes) -> None:
    answer = client.predict("lesion", ultrasound_png)
    assert answer == run(predict_request("lesion", ImageInput(data=ultrasound_png)))
    assert _decode_png(answer["mask_png"]).shape == US_SIZE
    assert _decode_png(answer["overlay_png"]).shape == (*US_SIZE, 3)


def test_image_from_a_path(client: GRPCClient, mammogram_png: bytes, tmp_path: Path) -> None:
    path = tmp_path / "mammogram.png"
    path.write_bytes(mammogram_png)
    assert client.predict("tumor", path) == client.predict("tumor", str(path)) == \
        client.predict("tumor", mammogram_png)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_predict_array_equals_the_engine(client: GRPCClient, engine: Engine, run: Any, mammogram: np.ndarray,
                                         dtype: str) -> None:
    arr = {"uint8": mammogram, "uint16": mammogram.astype(np.uint16) * 257,
           "float32": mammogram.astype(np.float32) / np.float32(255.0)}[dtype]
    answer = client.predict_array("tumor", arr)
    assert answer == run(predict_request("tumor", ImageInput(array=arr)))
    assert (answer["width"], answer["height"]) == (MAMMO_SIZE[1], MAMMO_SIZE[0])


def test_array_byte_order_and_layout_do_not_matter(client: GRPCClient, mammogram: np.ndarray) -> None:
    native = mammogram.astype(np.uint16) * 257
    answer = client.predict_array("tumor", native)
    assert client.predict_array("tumor", native.astype(">u2")) == answer  # big-endian input
    assert client.predict_array("tumor", np.asfortranarray(native)) == answer
    rgb = np.dstack([mammogram] * 3)
    assert client.predict_array("tumor", rgb) == client.predict_array("tumor", mammogram)


def test_analyze_mammogram_has_the_eight_category_view(client: GRPCClient, engine: Engine, run: Any,
                                                       mammogram_png: bytes) -> None:
    result = client.analyze(mammogram_png, modality="mammography")
    assert result == run(Request("analyze", image=ImageInput(data=mammogram_png), modality="mammography"))
    assert result["modality"] == "mammography" and sorted(result["models"]) == ["density", "tumor"]
    view = result["eight_category"]
    assert set(view) == {"category", "density", "pathology", "finding", "p_malignant", "p_normal",
                         "confidence", "probabilities"}
    assert len(view["probabilities"]) == 8 and view["p_normal"] is not None
    assert sum(view["probabilities"].values()) == pytest.approx(1.0)


def test_analyze_ultrasound(client: GRPCClient, engine: Engine, run: Any, ultrasound_png: bytes) -> None:
    result = client.analyze(ultrasound_png, modality="ultrasound")
    assert result == run(Request("analyze", image=ImageInput(data=ultrasound_png), modality="ultrasound"))
    assert list(result["models"]) == ["lesion"] and "eight_category" not in result


def test_explain_returns_heatmaps_at_the_image_size(client: GRPCClient, engine: Engine, run: Any,
                                                    mammogram_png: bytes) -> None:
    answer = client.predict("tumor", mammogram_png, explain=True)
    assert answer == run(predict_request("tumor", ImageInput(data=mammogram_png), explain=True))
    heat, over = _decode_png(answer["heatmap_png"]), _decode_png(answer["overlay_png"])
    assert heat.shape == MAMMO_SIZE and heat.dtype == np.uint8
    assert over.shape == (*MAMMO_SIZE, 3)
    result = client.analyze(mammogram_png, modality="mammography", explain=True)
    for name in ("density", "tumor"):
        assert _decode_png(result["models"][name]["heatmap_png"]).shape == MAMMO_SIZE


def test_roi_crops_the_answer(client: GRPCClient, engine: Engine, run: Any, mammogram_png: bytes,
                              ultrasound_png: bytes) -> None:
    roi = (8, 10, 40, 50)
    answer = client.predict("tumor", mammogram_png, roi=roi, explain=True)
    assert answer == run(predict_request("tumor", ImageInput(data=mammogram_png, roi=roi), explain=True))
    assert (answer["width"], answer["height"], answer["roi"]) == (40, 50, list(roi))
    assert _decode_png(answer["heatmap_png"]).shape == (50, 40)
    lesion = client.predict("lesion", ultrasound_png, roi=(4, 4, 32, 20))
    assert (lesion["width"], lesion["height"]) == (32, 20)
    assert _decode_png(lesion["mask_png"]).shape == (20, 32)
    result = client.analyze(mammogram_png, modality="mammography", roi=roi)
    assert result == run(Request("analyze", image=ImageInput(data=mammogram_png, roi=roi),
                                 modality="mammography"))
    assert result["roi"] == list(roi)
    assert all((a["width"], a["height"]) == (40, 50) for a in result["models"].values())


def test_preview(client: GRPCClient, engine: Engine, run: Any, mammogram: np.ndarray,
                 mammogram_png: bytes) -> None:
    preview = client.preview(mammogram_png)
    assert preview == run(Request("preview", image=ImageInput(data=mammogram_png)))
    assert (preview["width"], preview["height"], preview["modality"]) == (MAMMO_SIZE[1], MAMMO_SIZE[0], None)
    np.testing.assert_array_equal(_decode_png(preview["png"]), mammogram)


def test_models(client: GRPCClient, engine: Engine) -> None:
    models = client.models()
    assert models == to_dict(engine.describe())
    assert [m["name"] for m in models] == ["density", "lesion", "tumor"]
    assert models[1]["threshold"] == 0.5 and models[0]["threshold"] is None


# --------------------------------------------------------------------------- health, reflection


def test_health_follows_set_serving(client: GRPCClient, server: GrpcServerHandle) -> None:
    assert client.health() == client.health(SERVICE_NAME) == "SERVING" and server.serving
    server.set_serving(False)
    try:
        assert client.health() == client.health(SERVICE_NAME) == "NOT_SERVING"
        assert client.models()  # the status is advice: requests are still answered
    finally:
        server.set_serving(True)
    assert client.health() == "SERVING"
    with pytest.raises(ServiceError) as info:
        client.health("no.such.Service")
    assert info.value.status == grpc.StatusCode.NOT_FOUND and info.value.code == "not_found"


def test_reflection_lists_the_service(client: GRPCClient) -> None:
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    database = ProtoReflectionDescriptorDatabase(client.channel)
    services = set(database.get_services())
    assert {SERVICE_NAME, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
    pool = DescriptorPool(database)
    service = pool.FindServiceByName(SERVICE_NAME)
    assert {m.name for m in service.methods} == {"Predict", "Analyze", "ListModels", "Preview"}
    assert service.file.name == "breastscan/v1/breastscan.proto"
    assert "probabilities" in pool.FindMessageTypeByName("breastscan.v1.Prediction").fields_by_name


# --------------------------------------------------------------------------- client mistakes


def _truncated_png() -> bytes:
    data = _png(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
    return data[: len(data) // 2]


def _raw_array(shape: list[int], dtype: str, data: bytes) -> Callable[[GRPCClient], Any]:
    array = pb.Array(shape=shape, dtype=dtype, data=data)
    request = pb.PredictRequest(model="tumor", image=pb.Image(array=array))
    return lambda c: c.call("Predict", request)


def _png_with(roi: list[int]) -> Callable[[GRPCClient], Any]:
    image = pb.Image(file=_png(np.zeros((40, 40), np.uint8)), roi=roi)
    request = pb.PredictRequest(model="tumor", image=image)
    return lambda c: c.call("Predict", request)


_GOOD = _png(np.full((40, 48), 128, np.uint8))
_NAN = np.full((32, 32), 0.5, np.float32)
_NAN[3, 4] = np.nan

BAD_REQUESTS: dict[str, tuple[Callable[[GRPCClient], Any], str]] = {
    "empty bytes": (lambda c: c.predict("tumor", b""), "empty"),
    "no image": (lambda c: c.call("Predict", pb.PredictRequest(model="tumor")), "empty"),
    "not an image": (lambda c: c.predict("tumor", b"GET / HTTP/1.1\r\n\r\n" * 20), "not_an_image"),
    "truncated PNG": (lambda c: c.predict("tumor", _truncated_png()), "truncated"),
    "too small": (lambda c: c.predict("tumor", _png(np.zeros((8, 8), np.uint8))), "too_small"),
    "unknown model": (lambda c: c.predict("nope", _GOOD), "unknown_model"),
    "unknown modality": (lambda c: c.analyze(_GOOD, modality="xray"), "unknown_modality"),
    "no modality for a PNG": (lambda c: c.analyze(_GOOD), "unknown_modality"),
    "int64 array": (lambda c: c.predict_array("tumor", np.zeros((32, 32), np.int64)), "bad_dtype"),
    "bool array": (lambda c: c.predict_array("tumor", np.zeros((32, 32), bool)), "bad_dtype"),
    "unknown dtype name": (_raw_array([32, 32], "complex64", b"\0" * 8192), "bad_dtype"),
    "data shorter than shape": (_raw_array([32, 32], "uint8", b"\0" * 100), "bad_shape"),
    "data longer than shape": (_raw_array([32, 32], "uint16", b"\0" * 4096), "bad_shape"),
    "negative side": (_raw_array([-32, -32], "uint8", b"\0" * 1024), "bad_shape"),
    "1-D array": (lambda c: c.predict_array("tumor", np.zeros(1024, np.uint8)), "bad_shape"),
    "two channels": (lambda c: c.predict_array("tumor", np.zeros((32, 32, 2), np.uint8)), "bad_shape"),
    "NaN float array": (lambda c: c.predict_array("tumor", _NAN), "not_finite"),
    "float out of range": (lambda c: c.predict_array("tumor", np.full((32, 32), 2.0, np.float32)),
                           "out_of_range"),
    "zero-width roi": (lambda c: c.predict("tumor", _GOOD, roi=(0, 0, 0, 10)), "bad_roi"),
    "roi outside the image": (lambda c: c.predict("tumor", _GOOD, roi=(30, 0, 20, 20)), "bad_roi"),
    "roi of three values": (_png_with([1, 2, 3]), "bad_roi"),
    "negative roi": (_png_with([-1, 0, 10, 10]), "bad_roi"),
    "bad roi on analyze": (lambda c: c.analyze(_GOOD, modality="mammography", roi=(0, 0, 99, 99)), "bad_roi"),
    "preview of text": (lambda c: c.preview(b"hello, world" * 10), "not_an_image"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_client_mistakes_get_their_code(client: GRPCClient, name: str) -> None:
    send, code = BAD_REQUESTS[name]
    with pytest.raises(ServiceError) as info:
        send(client)
    assert (info.value.code, info.value.status) == (code, grpc.StatusCode.INVALID_ARGUMENT), name
    assert info.value.message and INTERNAL_MESSAGE not in info.value.message


def test_oversize_message_is_refused_by_grpc(client: GRPCClient, mammogram_png: bytes) -> None:
    with pytest.raises(ServiceError) as info:
        client.predict("tumor", mammogram_png + b"\0" * MAX_MESSAGE)
    assert (info.value.code, info.value.status) == ("too_large", grpc.StatusCode.RESOURCE_EXHAUSTED)


def test_server_answers_after_and_among_bad_requests(client: GRPCClient, engine: Engine, run: Any,
                                                     mammogram_png: bytes) -> None:
    expected = run(predict_request("tumor", ImageInput(data=mammogram_png)))

    def good(_: int) -> dict[str, Any]:
        return client.predict("tumor", mammogram_png)

    def bad(name: str) -> str:
        try:
            BAD_REQUESTS[name][0](client)
        except ServiceError as exc:
            return exc.code
        return "answered"

    with ThreadPoolExecutor(4) as pool:
        good_answers = pool.map(good, range(6))
        codes = dict(zip(BAD_REQUESTS, pool.map(bad, BAD_REQUESTS), strict=True))
        assert all(a == expected for a in good_answers)
    assert codes == {name: code for name, (_, code) in BAD_REQUESTS.items()}
    assert client.predict("tumor", mammogram_png) == expected and client.health() == "SERVING"


# --------------------------------------------------------------------------- failures, binding


@pytest.fixture(scope="module")
def failing_server(loop: asyncio.AbstractEventLoop) -> Iterator[tuple[GrpcServerHandle, threading.Event]]:
    """A server whose model ``boom`` raises, ``late`` times out, ``busy`` is shed by batching and
    ``slow`` never answers (1 s limit)."""
    cancelled = threading.Event()

    async def infer(name: str, batch: np.ndarray) -> np.ndarray:
        if name == "boom":
            raise RuntimeError("secret-patient-name")
        if name == "late":
            raise TimeoutError("the model service did not answer")
        if name == "busy":
            raise Overloaded()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("not cancelled")

    async def explain(name: str, batch: np.ndarray, classes: list[int]) -> np.ndarray:
        raise AssertionError("not called")

    contract = ModelContract(name="boom", task="classification", label="pathology", classes=("a", "b"),
                             class_names=("a", "b"), input_shape=(32, 32, 1), dataset="mammography",
                             modality="mammography", spec_id=SPEC.spec_id)
    models = {name: ServedModel(name=name, spec=SPEC, contract=contract)
              for name in ("boom", "late", "busy", "slow")}
    engine = Engine(models, infer, explain, max_upload_bytes=MAX_MESSAGE)
    handle = start_grpc_server(engine, loop, host="127.0.0.1", port=0, max_workers=2,
                               max_message_bytes=MAX_MESSAGE, timeout_s=1.0)
    yield handle, cancelled
    handle.stop(None)


def test_a_shed_request_is_unavailable_and_retryable(
        failing_server: tuple[GrpcServerHandle, threading.Event]) -> None:
    handle, _ = failing_server
    with GRPCClient(f"127.0.0.1:{handle.port}") as c:
        with pytest.raises(ServiceError) as info:
            c.predict("busy", _GOOD)
        assert (info.value.code, info.value.status) == ("overloaded", grpc.StatusCode.UNAVAILABLE)
        assert info.value.message == OVERLOADED_MESSAGE
        assert c.health() == "SERVING"


def test_internal_errors_are_logged_not_leaked(failing_server: tuple[GrpcServerHandle, threading.Event],
                                               caplog: pytest.LogCaptureFixture) -> None:
    handle, _ = failing_server
    with caplog.at_level(logging.ERROR, logger="breastscan.serving.grpc_server"), \
            GRPCClient(f"127.0.0.1:{handle.port}") as c, pytest.raises(ServiceError) as info:
        c.predict("boom", _GOOD)
    assert (info.value.code, info.value.status) == ("internal", grpc.StatusCode.INTERNAL)
    assert info.value.message == INTERNAL_MESSAGE
    assert any(r.exc_info and "secret-patient-name" in str(r.exc_info[1]) for r in caplog.records)


def test_time_limit_ends_in_deadline_exceeded(
        failing_server: tuple[GrpcServerHandle, threading.Event]) -> None:
    handle, cancelled = failing_server
    with GRPCClient(f"127.0.0.1:{handle.port}") as c:
        with pytest.raises(ServiceError) as info:
            c.predict("slow", _GOOD)
        assert info.value.code == "deadline_exceeded"
        assert info.value.status == grpc.StatusCode.DEADLINE_EXCEEDED
        assert cancelled.wait(10), "the engine's work was not cancelled"
        with pytest.raises(ServiceError) as info:
            c.predict("late", _GOOD)  # the engine's own time-out
        assert info.value.status == grpc.StatusCode.DEADLINE_EXCEEDED
        assert c.health() == "SERVING"


def test_port_sharing_and_bind_errors(engine: Engine, loop: asyncio.AbstractEventLoop,
                                      failing_server: tuple[GrpcServerHandle, threading.Event]) -> None:
    handle, _ = failing_server
    # SO_REUSEPORT: a second worker's server may listen on the same port.
    twin = start_grpc_server(engine, loop, host="127.0.0.1", port=handle.port, max_workers=1,
                             max_message_bytes=MAX_MESSAGE, timeout_s=5)
    try:
        assert twin.port == handle.port
    finally:
        twin.stop(None)
    # A port held by a socket without SO_REUSEPORT cannot be shared.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with pytest.raises(GrpcBindError, match=str(port)):
            start_grpc_server(engine, loop, host="127.0.0.1", port=port, max_workers=1,
                              max_message_bytes=MAX_MESSAGE, timeout_s=5)


# --------------------------------------------------------------------------- generated code


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    from breastscan.serving.proto import generate

    written = generate.generate(tmp_path)
    committed = [generate.PROTO_ROOT / p for p in generate.PROTO_FILES] + generate.generated_files()
    assert [p.relative_to(tmp_path) for p in written] == \
        [p.relative_to(generate.PROTO_ROOT) for p in committed]
    assert [p.name for p in written] == ["breastscan.proto", "breastscan_pb2.py", "breastscan_pb2.pyi",
                                         "breastscan_pb2_grpc.py"]
    for new, old in zip(written, committed, strict=True):
        assert filecmp.cmp(new, old, shallow=False), \
            f"{old} is stale: run `python -m breastscan.serving.proto.generate`"
    proto = written[0].read_text(encoding="utf-8")
    assert generate.render_proto(proto) == proto  # rendering is idempotent
    assert pb.DESCRIPTOR.name == "breastscan/v1/breastscan.proto" and pb.DESCRIPTOR.package == "breastscan.v1"
