"""breastscan.serving: its config file, the HTTP request guard, the engine's input handling, the launcher."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from breastscan.serving.config import load_serving_config, parse_serving_config
from breastscan.serving.engine import Engine, ImageInput, ServedModel, crop, dicom_modality_code, parse_roi
from breastscan.serving.http import RequestGuard
from breastscan.serving.requests import InputError
from load_tests.harness import LaunchedService, ServiceStartError, serve_command, wait_until_serving
from tests.services import images

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- config


def test_the_committed_serving_config_parses() -> None:
    cfg = load_serving_config(REPO / "services" / "serving.yaml")
    assert cfg.models == () and cfg.stage == "production"  # models: auto, the registry decides
    assert cfg.batching.enabled and cfg.batching.max_batch_size >= 2
    assert cfg.grpc_host == "127.0.0.1"


def test_config_overrides_and_env() -> None:
    raw = {"models": ["tumor"], "grpc": {"port": 1234},
           "batching": {"max_batch_size": 8, "per_model": {"tumor": {"max_latency_ms": 50}}}}
    cfg = parse_serving_config(raw, {"BREASTSCAN_GRPC_PORT": "4321", "BREASTSCAN_GRPC_HOST": "0.0.0.0"})
    assert cfg.grpc_port == 4321 and cfg.grpc_host == "0.0.0.0"
    tumor = cfg.batching_for("tumor")
    assert (tumor.max_batch_size, tumor.max_latency_ms) == (8, 50)  # inherits the default size
    assert cfg.batching_for("other").max_latency_ms == cfg.batching.max_latency_ms


def test_auto_serves_what_the_registry_has_and_a_list_wins() -> None:
    from breastscan.serving.config import with_models

    auto = parse_serving_config({"models": "auto"})
    assert with_models(auto, ("tumor", "busi_lesion")).models == ("busi_lesion", "tumor")
    with pytest.raises(ValueError, match="no model to serve: none is imported at stage 'production'"):
        with_models(auto, ())
    listed = parse_serving_config({"models": ["density"]})
    assert with_models(listed, ("tumor",)).models == ("density",)


@pytest.mark.parametrize(("raw", "message"), [
    ({"modelz": []}, "unknown serving config keys: modelz"),
    ({"models": []}, "name at least one model"),
    ({"batching": {"max_batch_size": 1}}, "at least 2"),
    ({"batching": {"max_latency": 5}}, "unknown batching keys"),
    ({"batching": {"max_latency_ms": 0}}, "positive"),
    ({"models_service": {"workers": 2}}, "models_service is gone: the models run in the service"),
])
def test_config_mistakes_are_named(raw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_serving_config(raw)


def test_config_file_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ValueError, match="mapping"):
        load_serving_config(path)


# --------------------------------------------------------------------------- request guard


async def _echo(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    from breastscan.serving.http import read_body

    body = await read_body(receive)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": str(len(body)).encode()})


def _client(limit: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=RequestGuard(_echo, max_body_bytes=limit)),
                             base_url="http://test")


def test_guard_passes_small_bodies_and_sets_a_request_id(caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> tuple[httpx.Response, httpx.Response]:
        async with _client(100) as c:
            return (await c.post("/x", content=b"a" * 100),
                    await c.post("/x", content=b"a", headers={"X-Request-ID": "bad id with spaces"}))

    with caplog.at_level(logging.INFO, logger="breastscan.serving.requests"):
        ok, other = asyncio.run(go())
    assert ok.status_code == 200 and ok.text == "100"
    assert len(ok.headers["x-request-id"]) == 32
    assert other.headers["x-request-id"] != "bad id with spaces"  # not echoed: not a sane id
    assert any("path=/x status=200" in r.getMessage() and "bytes=100" in r.getMessage()
               for r in caplog.records)


def test_guard_refuses_large_bodies_declared_or_streamed() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b"x" * 40

    async def go() -> tuple[httpx.Response, httpx.Response]:
        async with _client(100) as c:
            return await c.post("/x", content=b"a" * 101), await c.post("/x", content=chunks())

    declared, streamed = asyncio.run(go())
    for r in (declared, streamed):
        assert r.status_code == 413
        assert r.json()["code"] == "too_large" and "limit of 100 bytes" in r.json()["error"]
    assert "content-length" not in streamed.request.headers  # the streamed one was counted


# --------------------------------------------------------------------------- engine inputs


def test_parse_roi_and_crop() -> None:
    assert parse_roi("") is None and parse_roi(None) is None and parse_roi([]) is None
    assert parse_roi(" 1, 2,3 ,4") == (1, 2, 3, 4) and parse_roi([5, 6, 7, 8]) == (5, 6, 7, 8)
    for bad in ("1,2,3", "a,b,c,d", "0,0,0,5", "-1,0,5,5"):
        with pytest.raises(InputError) as info:
            parse_roi(bad)
        assert info.value.code == "bad_roi"
    img = np.arange(20 * 30, dtype=np.float32).reshape(20, 30)
    assert crop(img, (2, 3, 10, 5)).shape == (5, 10) and crop(img, (2, 3, 10, 5))[0, 0] == img[3, 2]
    with pytest.raises(InputError, match="inside the 30x20 image"):
        crop(img, (25, 0, 10, 5))


def test_arrays_are_read_as_their_declared_dtype() -> None:
    as_u8 = ImageInput.from_array([[0, 255]] * 2, "uint8").array
    assert as_u8 is not None and as_u8.dtype == np.uint8
    as_float = ImageInput.from_array([[0.0, 0.5]], "float32").array
    assert as_float is not None and as_float.dtype == np.float32
    for values, dtype, code in [([[0, 256]], "uint8", "bad_dtype"), ([[0.5, 1.0]], "uint16", "bad_dtype"),
                                ([[1, 2]], "complex64", "bad_dtype"), ([[1, 2], [3]], None, "bad_shape"),
                                ([["a", "b"]], "uint8", "bad_dtype")]:
        with pytest.raises(InputError) as info:
            ImageInput.from_array(values, dtype)
        assert info.value.code == code, (values, dtype)


def _engine(calls: list[tuple[str, tuple[int, ...]]], tumor_rule: dict | None = None,
            explained: list[tuple[str, list[int]]] | None = None) -> Engine:
    from breastscan.bundle import ModelContract
    from breastscan.imaging.preprocessing import PreprocessSpec

    spec = PreprocessSpec(height=32, width=24)

    def contract(name: str, modality: str, task: str) -> ModelContract:
        names = ("A", "B", "C", "D") if name == "density" else ("benign", "malignant", "normal")
        classes = names if task == "classification" else ()
        rule = {"decision": tumor_rule} if name == "tumor" and tumor_rule else {}
        return ModelContract(name=name, task=task, label="x", classes=classes,
                             class_names=classes or ("lesion",),
                             input_shape=(32, 24, 1), dataset="d", modality=modality, spec_id=spec.spec_id,
                             **rule)  # type: ignore[arg-type]

    models = {n: ServedModel(n, spec, contract(n, mod, task), "3", "production")
              for n, mod, task in [("density", "mammography", "classification"),
                                   ("tumor", "mammography", "classification"),
                                   ("lesion", "ultrasound", "segmentation")]}

    async def infer(name: str, batch: np.ndarray) -> np.ndarray:
        calls.append((name, batch.shape))
        if name == "lesion":
            return np.ones((len(batch), 32, 24, 1), np.float32)
        k = len(models[name].contract.class_names)
        return np.full((len(batch), k), 1.0 / k, np.float32)

    async def explain(name: str, batch: np.ndarray, classes: list[int]) -> np.ndarray:
        if explained is not None:
            explained.append((name, list(classes)))
        return np.ones(batch.shape[:3], np.float32)

    return Engine(models, infer, explain, max_upload_bytes=1 << 20)


def test_engine_refuses_before_calling_a_model() -> None:
    calls: list[tuple[str, tuple[int, ...]]] = []
    engine = _engine(calls)
    png = images.png(images.mammogram(1))
    for call, code in [
        (engine.predict("nope", ImageInput(data=png)), "unknown_model"),
        (engine.predict("tumor", ImageInput(data=b"")), "empty"),
        (engine.predict("tumor", ImageInput()), "empty"),
        (engine.predict("tumor", ImageInput(data=b"x" * (2 << 20))), "too_large"),
        (engine.predict("tumor", ImageInput(data=png, roi=(0, 0, 999, 10))), "bad_roi"),
        (engine.analyze(ImageInput(data=png)), "unknown_modality"),
        (engine.analyze(ImageInput(data=png), modality="xray"), "unknown_modality"),
    ]:
        with pytest.raises(InputError) as info:
            asyncio.run(call)
        assert info.value.code == code
    assert calls == []


def test_engine_answers_at_the_original_size_with_registry_facts() -> None:
    calls: list[tuple[str, tuple[int, ...]]] = []
    engine = _engine(calls)
    png = images.png(images.mammogram(1))
    answer = asyncio.run(engine.predict("tumor", ImageInput(data=png, roi=(4, 8, 50, 60)), explain=True))
    assert (answer["width"], answer["height"], answer["roi"]) == (50, 60, [4, 8, 50, 60])
    assert (answer["version"], answer["stage"]) == ("3", "production")
    assert images.decode_png_b64(answer["heatmap_png"]).shape == (60, 50)
    both = asyncio.run(engine.analyze(ImageInput(data=png), modality="mammography"))
    assert sorted(both["models"]) == ["density", "tumor"] and "eight_category" in both
    dcm = images.dicom(images.ultrasound(1).astype(np.uint16), modality="US")
    us = asyncio.run(engine.analyze(ImageInput(data=dcm)))
    mask = images.decode_png_b64(us["models"]["lesion"]["mask_png"])
    assert us["modality"] == "ultrasound" and mask.shape == (112, 144)
    assert us["models"]["lesion"]["bbox"] is not None
    assert ("lesion", (1, 32, 24, 1)) in calls and all(shape[0] == 1 for _, shape in calls)
    described = engine.describe()
    assert [m["name"] for m in described] == ["density", "lesion", "tumor"]


def test_every_consumer_of_the_engine_follows_the_decision_rule() -> None:
    """Probabilities 1/3 each: the arg-max calls benign; malignant vs benign (ratio 0.5) at cutoff 0.4
    calls malignant -- in the answer, Grad-CAM's target, the 8-category view and ``/models``."""
    explained: list[tuple[str, list[int]]] = []
    rule = {"rule": "positive_ratio", "positive": "malignant", "versus": "benign", "cutoff": 0.4}
    engine = _engine([], tumor_rule=rule, explained=explained)
    png = images.png(images.mammogram(1))
    answer = asyncio.run(engine.predict("tumor", ImageInput(data=png), explain=True))
    assert answer["predicted"] == "malignant" and answer["confidence"] == pytest.approx(1 / 3)
    assert explained == [("tumor", [1])]  # the heatmap shows the evidence for the predicted class
    plain = asyncio.run(_engine([]).predict("tumor", ImageInput(data=png)))
    assert plain["predicted"] == "benign"  # the same probabilities at the arg-max
    view = asyncio.run(engine.analyze(ImageInput(data=png), modality="mammography"))["eight_category"]
    assert view["finding"] == "malignant" and view["pathology"] == "malignant"
    described = {m["name"]: m for m in engine.describe()}
    assert described["tumor"]["decision"].startswith("malignant is called when p(malignant)")
    assert described["density"]["decision"] is None and described["lesion"]["decision"] is None
    assert "malignant is called" in engine.models["tumor"].algorithm().decision  # the DICOM SR's text


def _multitask_contract() -> Any:
    from breastscan.bundle import ModelContract

    names = ("benign", "malignant", "normal")
    rule = {"rule": "positive_ratio", "positive": "malignant", "versus": "benign", "cutoff": 0.6}
    return ModelContract(name="us_mt", task="multitask", label="pathology", classes=names, class_names=names,
                         input_shape=(32, 24, 1), dataset="d", modality="ultrasound", threshold=0.5,
                         decision=rule)


def test_a_multitask_answer_is_its_classifier_and_its_segmenter_answers_in_one() -> None:
    """finish_predictions: the class part and the mask part are those of the model's two views,
    ``predicted`` follows the decision rule, and explained, the overlay is the heatmap's."""
    from breastscan.imaging.preprocessing import PreprocessSpec
    from breastscan.serving.requests import finish_predictions, prepare_inputs

    contract, spec = _multitask_contract(), PreprocessSpec(height=32, width=24)
    prepared = prepare_inputs(spec, contract, [images.ultrasound(1).astype(np.float32) / 255.0])
    probs = np.asarray([[0.30, 0.36, 0.34]], np.float32)  # arg-max malignant; the rule calls benign
    mask = np.random.default_rng(0).random((1, 32, 24, 1)).astype(np.float32)
    heat = np.random.default_rng(1).random((1, 32, 24)).astype(np.float32)

    def answer(task: str, out: Any, explained: bool = False) -> dict[str, Any]:
        view = contract.view(task) if task != "multitask" else contract
        answers = finish_predictions(view, spec.spec_id, prepared, out, heat=heat if explained else None)
        return answers[0].to_dict()

    both = {"probabilities": probs, "mask": mask}
    for explained in (False, True):
        mt = answer("multitask", both, explained)
        cls, seg = answer("classification", probs, explained), answer("segmentation", mask)
        class_keys = ["probabilities", "predicted", "confidence", *(["heatmap_png"] if explained else [])]
        assert list(mt)[7:] == [*class_keys, "mask_png", "lesion_area_px", "lesion_fraction", "bbox",
                                "overlay_png"]
        assert {k: mt[k] for k in class_keys} == {k: cls[k] for k in class_keys}
        assert {k: mt[k] for k in ("mask_png", "lesion_area_px", "bbox")} == \
            {k: seg[k] for k in ("mask_png", "lesion_area_px", "bbox")}
        assert mt["overlay_png"] == (cls if explained else seg)["overlay_png"]
        assert (mt["task"], mt["predicted"]) == ("multitask", "benign")
        assert images.decode_png_b64(mt["mask_png"]).shape == (mt["height"], mt["width"]) == (112, 144)


def test_a_multitask_model_answers_from_one_call_and_is_explained_on_its_bottleneck(tmp_path: Path) -> None:
    """The engine's one model call per image (the batcher's count) serves both parts; Grad-CAM
    explains the class head on the U-Net's bottleneck, not on the mask logits."""
    from breastscan.bundle import ModelBundle
    from breastscan.models.classifier import last_conv_layer_name
    from breastscan.serving.config import Batching
    from breastscan.serving.engine import class_feature_layer, local_engine
    from tests.services.make_registry import build_bundle

    bundle = ModelBundle.load(build_bundle("us_mt", tmp_path / "us_mt"))
    view = bundle.view("classification").model
    assert class_feature_layer(view) == "bottleneck_dropout" and last_conv_layer_name(view) == "mask_logits"
    engine = local_engine({"us_mt": bundle}, batching=Batching(max_batch_size=8, max_latency_ms=5000))
    png = images.png(images.ultrasound(2))
    try:
        plain = asyncio.run(engine.predict("us_mt", ImageInput(data=png)))
        explained = asyncio.run(engine.predict("us_mt", ImageInput(data=png), explain=True))
        analysed = asyncio.run(engine.analyze(ImageInput(data=png), modality="ultrasound"))
        stats = engine.batchers["us_mt"].stats
    finally:
        engine.batchers["us_mt"].close()
    assert (stats.calls, stats.images) == (3, 3)  # one model call per answer, both parts from it
    described = engine.describe()[0]
    assert (described["task"], described["classes"], described["threshold"]) == \
        ("multitask", ["benign", "malignant", "normal"], 0.51)
    assert described["decision"].startswith("malignant is called")
    assert analysed["models"] == {"us_mt": plain}
    assert plain["probabilities"] and plain["mask_png"] and "heatmap_png" not in plain
    heat = images.decode_png_b64(explained["heatmap_png"])
    assert heat.shape == (112, 144) and heat.max() > 0
    assert explained["overlay_png"] != plain["overlay_png"]  # the heatmap drawn, not the mask
    assert {k: v for k, v in explained.items() if k not in ("heatmap_png", "overlay_png")} == \
        {k: v for k, v in plain.items() if k != "overlay_png"}


def test_dicom_modality_code_reads_the_header() -> None:
    pixels = images.ultrasound(1).astype(np.uint16)
    assert dicom_modality_code(images.dicom(pixels, modality="US")) == "US"
    assert dicom_modality_code(images.dicom(pixels, modality="CT")) == "CT"
    assert dicom_modality_code(images.dicom(pixels, modality="")) == ""
    assert dicom_modality_code(images.png(images.mammogram(1))) == ""
    assert dicom_modality_code(b"\0" * 128 + b"DICM" + b"\xff" * 20) == ""  # does not parse


def test_engine_refuses_a_dicom_of_another_modality_before_calling_a_model() -> None:
    calls: list[tuple[str, tuple[int, ...]]] = []
    engine = _engine(calls)
    us = images.dicom(images.ultrasound(1).astype(np.uint16), modality="US")
    mg = images.dicom(images.mammogram(1).astype(np.uint16), modality="MG")
    ct = images.dicom(images.mammogram(1).astype(np.uint16), modality="CT")
    for call, named in [
        (engine.predict("tumor", ImageInput(data=us)), "'US'"),          # a mammography model
        (engine.predict("lesion", ImageInput(data=mg)), "'MG'"),         # an ultrasound model
        (engine.predict("density", ImageInput(data=ct)), "'CT'"),
        (engine.analyze(ImageInput(data=ct)), "'CT'"),                   # no model serves CT
        (engine.analyze(ImageInput(data=us), modality="mammography"), "'US'"),  # header contradicts
        (engine.analyze(ImageInput(data=mg), modality="Ultrasound"), "'MG'"),
    ]:
        with pytest.raises(InputError) as info:
            asyncio.run(call)
        assert info.value.code == "wrong_modality" and named in info.value.message
    with pytest.raises(InputError, match="'US'.*mammography") as info:
        engine.decode(ImageInput(data=us), "mammography")
    assert calls == []
    assert engine.decode(ImageInput(data=us), "ultrasound").shape == (112, 144)
    assert engine.decode(ImageInput(data=us)).shape == (112, 144)  # no modality asked: not checked
    mammo = asyncio.run(engine.analyze(ImageInput(data=mg)))  # the header says which models
    assert mammo["modality"] == "mammography" and sorted(mammo["models"]) == ["density", "tumor"]
    assert asyncio.run(engine.predict("lesion", ImageInput(data=us)))["model"] == "lesion"


# --------------------------------------------------------------------------- launching a service


def _process(code: str, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as handle:
        return subprocess.Popen([sys.executable, "-c", code], stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _launched(process: subprocess.Popen[bytes], log_path: Path, http_port: int,
              grpc_port: int) -> LaunchedService:
    return LaunchedService(process, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", log_path,
                           {}, time.perf_counter())


def test_serve_command_is_bentoml_serve_on_loopback() -> None:
    cmd = serve_command(1234)
    assert cmd[-6:] == ["serve", "services.service:BreastScan", "--host", "127.0.0.1", "--port", "1234"]
    assert serve_command(1, target="breastscan:v1")[-5] == "breastscan:v1"


def test_waiting_records_when_http_and_grpc_began_to_serve(tmp_path: Path) -> None:
    import http.server
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 -- the handler's API
            self.send_response(200 if self.path == "/readyz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ready)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    server = grpc.server(ThreadPoolExecutor(2))
    checker = health.HealthServicer()
    checker.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    service = _launched(_process("import time; time.sleep(60)", tmp_path / "log"), tmp_path / "log",
                        web.server_address[1], grpc_port)
    try:
        wait_until_serving(service, timeout_s=30)
        cold = service.cold_start()
        assert cold["ready_s"] is not None and cold["grpc_serving_s"] is not None
        assert 0 <= cold["ready_s"] < 30 and service.running()
    finally:
        service.stop(5)
        server.stop(None)
        web.shutdown()
    assert not service.running()


def test_a_service_that_exits_or_never_answers_is_reported_with_its_log(tmp_path: Path) -> None:
    from breastscan.processes import free_port

    port = free_port()
    exited = _launched(_process("print('boom: no models'); raise SystemExit(3)", tmp_path / "a.log"),
                       tmp_path / "a.log", port, port)
    with pytest.raises(ServiceStartError, match=r"exited 3 \(log .*a\.log\):\n.*boom: no models"):
        wait_until_serving(exited, timeout_s=30)
    sleeper = _process("import time; time.sleep(60)", tmp_path / "b.log")
    slow = _launched(sleeper, tmp_path / "b.log", port, port)
    try:
        with pytest.raises(ServiceStartError, match=r"not ready in 0.5 s"):
            wait_until_serving(slow, timeout_s=0.5)
    finally:
        slow.stop(5)


def test_workers_are_found_measured_and_stopped_with_their_group(tmp_path: Path) -> None:
    import psutil

    worker = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
              "'import time; time.sleep(60)', '--service-name', 'breastscan', '--worker-id', '2']); "
              "time.sleep(60)")
    service = _launched(_process(worker, tmp_path / "log"), tmp_path / "log", 1, 1)
    try:
        deadline = time.monotonic() + 30
        while not service.find_workers() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(service.workers) == ["breastscan#2"]
        assert list(service.pids()) == ["arbiter", "breastscan#2"]
        rss = service.rss_mb()
        assert set(rss) == {"arbiter", "breastscan#2", "total"} and rss["total"] > 0
        assert all(v is not None and v >= 0 for v in service.cpu_seconds().values())
    finally:
        service.stop(5)
    pid = service.workers["breastscan#2"]

    def gone() -> bool:
        try:
            return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    deadline = time.monotonic() + 10  # the signal reaches the worker a moment after its parent
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone() and not service.running()
