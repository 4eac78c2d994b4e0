"""The real service over HTTP: every endpoint, answers equal to in-process predictions of the
registered models, client mistakes answered 4xx (never 5xx) with the server still serving,
health and readiness, adaptive batching seen in /metrics, request ids, OpenAPI."""

from __future__ import annotations

import json
import math
import re
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest

from breastscan.decision import DecisionRule
from breastscan.serving.client import GRPCClient
from breastscan.serving.engine import Engine
from breastscan.serving.request import ImageInput, Request, predict_request
from tests.services import images
from tests.services.conftest import Served, local_answer
from tests.services.make_registry import MODELS

pytestmark = [pytest.mark.slow, pytest.mark.service]

MG = images.png(images.mammogram(1))
US = images.png(images.ultrasound(2))
CLASS_KEYS = {"probabilities", "predicted", "confidence"}
MASK_KEYS = {"mask_png", "lesion_area_px", "lesion_fraction", "bbox", "overlay_png"}


def post_file(service: Served, path: str, data: bytes, **fields: Any) -> httpx.Response:
    form = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items()}
    return httpx.post(f"{service.http_url}{path}", files={"image": ("image.png", data)}, data=form,
                      timeout=60)


def assert_same_answer(served: dict[str, Any], local: dict[str, Any]) -> None:
    """Equal answers: same keys, same values, bit for bit (class order too).

    One request at a time is a batch of one in the service, the same graph and the same
    batch as the in-process call (``ModelBundle.predict``), so nothing may differ.
    """
    assert served.keys() == local.keys()
    for key, value in local.items():
        if key == "probabilities":
            assert list(served[key]) == list(value)  # class order too
        assert served[key] == value, key


def test_health_and_readiness(service: Served) -> None:
    for probe in ("/healthz", "/livez", "/readyz"):
        assert httpx.get(f"{service.http_url}{probe}", timeout=10).status_code == 200


def test_models_lists_the_production_versions(service: Served) -> None:
    listed = httpx.post(f"{service.http_url}/models", json={}, timeout=10).json()
    assert [m["name"] for m in listed] == ["density", "lesion", "mammo_lesion", "tumor", "us_mt"]
    for m in listed:
        assert m["version"] == "1" and m["stage"] == "production"
        assert m["source"] == f"models:/breastscan-{m['name']}@production"
        assert m["runtime"] == "onnx"  # each carries a checked export, and `runtime: auto` runs it
    by_name = {m["name"]: m for m in listed}
    assert by_name["density"]["classes"] == ["A", "B", "C", "D"]
    assert by_name["lesion"]["task"] == "segmentation" and by_name["lesion"]["modality"] == "ultrasound"
    assert (by_name["mammo_lesion"]["task"], by_name["mammo_lesion"]["modality"]) == ("segmentation",
                                                                                      "mammography")
    mt = by_name["us_mt"]
    assert (mt["task"], mt["modality"], mt["classes"], mt["threshold"]) == (
        "multitask", "ultrasound", ["benign", "malignant", "normal"], 0.51)
    assert mt["decision"] == MODELS["us_mt"]["decision"].describe()


@pytest.mark.parametrize(("model", "data"), [("density", MG), ("tumor", MG), ("lesion", US),
                                             ("mammo_lesion", MG), ("us_mt", US)])
def test_model_endpoint_equals_in_process_prediction(service: Served, reference: Engine, model: str,
                                                     data: bytes) -> None:
    r = post_file(service, f"/{model}", data)
    assert r.status_code == 200, r.text
    local = local_answer(reference, predict_request(model, ImageInput(data=data)))
    assert_same_answer(r.json(), local)


def test_generic_predict_with_explain_returns_heatmap_and_overlay(service: Served, reference: Engine) -> None:
    r = post_file(service, "/predict", MG, model="tumor", explain=True)
    assert r.status_code == 200, r.text
    body = r.json()
    heat = images.decode_png_b64(body["heatmap_png"])
    over = images.decode_png_b64(body["overlay_png"])
    assert heat.shape == (160, 128) and heat.dtype == np.uint8 and heat.max() > 0
    assert over.shape == (160, 128, 3)
    local = local_answer(reference, predict_request("tumor", ImageInput(data=MG), explain=True))
    assert body["predicted"] == local["predicted"]
    # Grad-CAM ran in the model service: same map up to float rounding of the gradients
    assert np.abs(heat.astype(int) - images.decode_png_b64(local["heatmap_png"]).astype(int)).max() <= 2


@pytest.mark.parametrize(("model", "data", "shape"), [("lesion", US, (112, 144)),
                                                      ("mammo_lesion", MG, (160, 128)),
                                                      ("us_mt", US, (112, 144))])
def test_segmenter_answer_has_mask_area_and_box(service: Served, model: str, data: bytes,
                                                shape: tuple[int, int]) -> None:
    body = post_file(service, f"/{model}", data).json()
    mask = images.decode_png_b64(body["mask_png"])
    assert mask.shape == shape and set(np.unique(mask)) <= {0, 255}
    assert body["lesion_area_px"] == int((mask > 0).sum())
    assert body["lesion_fraction"] == pytest.approx(body["lesion_area_px"] / mask.size)
    if body["lesion_area_px"]:
        x, y, w, h = body["bbox"]
        ys, xs = np.nonzero(mask)
        assert (x, y, x + w - 1, y + h - 1) == (xs.min(), ys.min(), xs.max(), ys.max())
    assert images.decode_png_b64(body["overlay_png"]).shape == (*shape, 3)


def test_a_multitask_model_answers_classes_and_mask_from_one_model_call(service: Served,
                                                                         reference: Engine) -> None:
    """One image, one model call (the batch metrics), both key sets; ``predicted`` follows its
    decision rule (not the arg-max); explained, the class head's Grad-CAM is the overlay."""
    before = httpx.get(f"{service.http_url}/metrics", timeout=10).text
    body = post_file(service, "/us_mt", US).json()
    after = httpx.get(f"{service.http_url}/metrics", timeout=10).text
    for metric in ("breastscan_model_batch_size_count", "breastscan_model_batch_size_sum"):
        assert _metric(after, metric, model="us_mt") - _metric(before, metric, model="us_mt") == 1, metric
    assert body["task"] == "multitask" and CLASS_KEYS | MASK_KEYS <= set(body)
    names = list(body["probabilities"])
    probs = np.asarray([list(body["probabilities"].values())])
    rule: DecisionRule = MODELS["us_mt"]["decision"]
    assert body["predicted"] == names[rule.decide(probs, names)[0]] != names[int(probs.argmax())]
    assert body["confidence"] == body["probabilities"][body["predicted"]]
    explained = post_file(service, "/us_mt", US, explain=True).json()
    heat = images.decode_png_b64(explained["heatmap_png"])
    assert heat.shape == (112, 144) and heat.max() > 0 and explained["overlay_png"] != body["overlay_png"]
    assert {k: explained[k] for k in CLASS_KEYS | MASK_KEYS - {"overlay_png"}} == \
        {k: body[k] for k in CLASS_KEYS | MASK_KEYS - {"overlay_png"}}
    local = local_answer(reference, predict_request("us_mt", ImageInput(data=US), explain=True))
    assert np.abs(heat.astype(int) - images.decode_png_b64(local["heatmap_png"]).astype(int)).max() <= 2


def test_analyze_ultrasound_runs_each_model_once(service: Served, reference: Engine) -> None:
    before = httpx.get(f"{service.http_url}/metrics", timeout=10).text
    body = post_file(service, "/analyze", US, modality="ultrasound").json()
    after = httpx.get(f"{service.http_url}/metrics", timeout=10).text
    assert sorted(body["models"]) == ["lesion", "us_mt"]
    for name in ("lesion", "us_mt"):
        grew = (_metric(after, "breastscan_model_predictions_total", model=name)
                - _metric(before, "breastscan_model_predictions_total", model=name))
        assert grew == 1, name
    local = local_answer(reference, Request("analyze", image=ImageInput(data=US), modality="ultrasound"))
    for name in ("lesion", "us_mt"):
        assert_same_answer(body["models"][name], local["models"][name])


def test_array_input_equals_file_input(service: Served) -> None:
    gray = images.mammogram(1)
    by_file = post_file(service, "/tumor", MG).json()
    r = httpx.post(f"{service.http_url}/predict_array", timeout=60,
                   json={"model": "tumor", "array": gray.tolist(), "dtype": "uint8"})
    assert r.status_code == 200, r.text
    assert r.json()["probabilities"] == pytest.approx(by_file["probabilities"], abs=1e-6)
    as_float = httpx.post(f"{service.http_url}/predict_array", timeout=60,
                          json={"model": "tumor", "array": (gray / 255.0).tolist(), "dtype": "float32"})
    assert as_float.json()["probabilities"] == pytest.approx(by_file["probabilities"], abs=1e-4)


def test_analyze_mammogram_runs_every_mammography_model_and_the_eight_category_view(
        service: Served, reference: Engine) -> None:
    r = post_file(service, "/analyze", MG, modality="mammography")
    assert r.status_code == 200, r.text
    body = r.json()
    local = local_answer(reference, Request("analyze", image=ImageInput(data=MG), modality="mammography"))
    assert body["modality"] == "mammography"
    assert sorted(body["models"]) == sorted(local["models"]) == ["density", "mammo_lesion", "tumor"]
    for name in ("density", "mammo_lesion", "tumor"):
        assert_same_answer(body["models"][name], local["models"][name])
    view = body["eight_category"]
    assert view["category"] == local["eight_category"]["category"]
    assert sum(view["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)


def test_analyze_takes_the_modality_from_a_dicom_header(service: Served) -> None:
    pixels = (images.ultrasound(3).astype(np.uint16) * 16)
    r = post_file(service, "/analyze", images.dicom(pixels, modality="US"))
    assert r.status_code == 200, r.text
    assert r.json()["modality"] == "ultrasound" and list(r.json()["models"]) == ["lesion", "us_mt"]
    # a PNG says nothing about its modality, and two are served
    refused = post_file(service, "/analyze", MG)
    assert refused.status_code == 400 and refused.json()["code"] == "unknown_modality"


def test_roi_crops_before_the_model(service: Served) -> None:
    r = post_file(service, "/tumor", MG, roi="10,20,80,100")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"], body["roi"]) == (80, 100, [10, 20, 80, 100])
    cropped = images.png(images.mammogram(1)[20:120, 10:90])
    plain = post_file(service, "/tumor", cropped).json()
    assert body["probabilities"] == pytest.approx(plain["probabilities"], abs=1e-6)


def test_preview_renders_a_dicom_for_the_browser(service: Served) -> None:
    pixels = (images.mammogram(4).astype(np.uint16) * 16)
    body = post_file(service, "/preview", images.dicom(pixels)).json()
    assert (body["width"], body["height"], body["modality"]) == (128, 160, "mammography")
    assert images.decode_png_b64(body["png"]).shape == (160, 128)


def _rgba() -> bytes:
    gray = images.mammogram(5)
    return images.png(np.dstack([gray, gray, gray, np.full_like(gray, 255)]))


ACCEPTED = {
    "16-bit PNG": images.png(images.mammogram(6).astype(np.uint16) * 257),
    "RGBA PNG": _rgba(),
    "JPEG": images.jpeg(images.mammogram(7)),
    "DICOM 12-bit": images.dicom(images.mammogram(8).astype(np.uint16) * 16),
}


@pytest.mark.parametrize("kind", list(ACCEPTED))
def test_other_image_kinds_are_converted_not_refused(service: Served, kind: str) -> None:
    r = post_file(service, "/tumor", ACCEPTED[kind])
    assert r.status_code == 200, r.text
    assert sum(r.json()["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


BAD_UPLOADS = {
    "empty body": (b"", {}, 400, "empty"),
    "not an image": (b"%PDF-1.4 not an image at all", {}, 400, "not_an_image"),
    "truncated PNG": (MG[: len(MG) // 2], {}, 400, "truncated"),
    "truncated JPEG": (images.jpeg(images.mammogram(2))[:900], {}, 400, "truncated"),
    "1x1 image": (images.png(np.zeros((1, 1), np.uint8)), {}, 400, "too_small"),
    "20000x20000 image": (images.png_claiming(20000, 20000), {}, 413, "too_large"),
    "DICOM without pixel data": (images.dicom(None), {}, 400, "no_pixel_data"),
    "bad roi": (MG, {"roi": "0,0,500,500"}, 400, "bad_roi"),
    "roi not numbers": (MG, {"roi": "a,b,c,d"}, 400, "bad_roi"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_upload_is_a_4xx_naming_the_problem(service: Served, case: str) -> None:
    data, fields, status, code = BAD_UPLOADS[case]
    r = post_file(service, "/tumor", data, **fields)
    assert r.status_code == status, r.text
    assert r.json()["code"] == code and r.json()["error"]


def _array_request(service: Served, payload: Any, content: bytes | None = None) -> httpx.Response:
    if content is not None:
        return httpx.post(f"{service.http_url}/predict_array", content=content, timeout=30,
                          headers={"content-type": "application/json"})
    return httpx.post(f"{service.http_url}/predict_array", json=payload, timeout=30)


def test_bad_arrays_and_requests_are_4xx(service: Served) -> None:
    ok = np.full((32, 32), 0.5).tolist()
    cases = {
        "wrong shape": ({"model": "tumor", "array": np.zeros((32, 32, 5)).tolist()}, "bad_shape"),
        "ragged": ({"model": "tumor", "array": [[0.1, 0.2], [0.3]]}, "bad_shape"),
        "bad dtype": ({"model": "tumor", "array": ok, "dtype": "complex64"}, "bad_dtype"),
        "values beyond dtype": ({"model": "tumor", "array": np.full((32, 32), 300).tolist(),
                                 "dtype": "uint8"}, "bad_dtype"),
        "float out of range": ({"model": "tumor", "array": np.full((32, 32), 2.0).tolist()}, "out_of_range"),
        "unknown model": ({"model": "nope", "array": ok}, "unknown_model"),
    }
    for name, (payload, code) in cases.items():
        r = _array_request(service, payload)
        assert r.status_code == 400, (name, r.text)
        assert r.json()["code"] == code, name
    nan = json.dumps({"model": "tumor", "array": [[math.nan] * 32] * 32}).encode()
    r = _array_request(service, None, nan)
    assert r.status_code == 400 and r.json()["code"] == "not_finite"
    for content, code in ((b"{not json", "malformed_request"), (b'{"model": "tumor"}', "missing_field"),
                          (b"[]", "malformed_request")):  # the body itself is wrong
        r = _array_request(service, None, content)
        assert r.status_code == 400, r.text
        assert r.json()["code"] == code and r.json()["error"], content
    missing = httpx.post(f"{service.http_url}/tumor", data={"explain": "true"}, timeout=30)
    assert missing.status_code == 400 and missing.json()["code"] == "missing_field"


def test_oversize_request_is_413_before_it_is_read(service: Served) -> None:
    big = b"\x00" * (40 * 2**20)
    r = post_file(service, "/tumor", big)  # the client sends it all, then reads the answer
    assert r.status_code == 413 and r.json()["code"] == "too_large"
    assert "33554432 bytes" in r.json()["error"]  # the limit, in the message
    assert post_file(service, "/tumor", MG).status_code == 200


def test_a_client_waiting_for_100_continue_reads_the_413_without_sending(service: Served) -> None:
    host, port = service.http_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /tumor HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 41943040\r\nExpect: 100-continue\r\n\r\n")
        answer = ""
        while '"too_large"' not in answer and (chunk := sock.recv(65536)):
            answer += chunk.decode("latin-1")
    assert answer.startswith("HTTP/1.1 413") and '"too_large"' in answer, answer


def test_server_still_serves_after_every_mistake(service: Served, reference: Engine) -> None:
    before = httpx.get(f"{service.http_url}/metrics", timeout=10).text
    for case in BAD_UPLOADS.values():
        assert post_file(service, "/lesion", case[0], **case[1]).status_code < 500
    assert httpx.get(f"{service.http_url}/readyz", timeout=10).status_code == 200
    r = post_file(service, "/lesion", US)
    assert_same_answer(r.json(), local_answer(reference, predict_request("lesion", ImageInput(data=US))))
    after = httpx.get(f"{service.http_url}/metrics", timeout=10).text

    def counted(**outcome: str) -> float:  # requests to /lesion answered since `before`
        return (_metric(after, "breastscan_requests_total", endpoint="lesion", **outcome)
                - _metric(before, "breastscan_requests_total", endpoint="lesion", **outcome))

    # every answer counted once, a refusal under its code (both bad rois: bad_roi)
    assert (counted(), counted(outcome="ok"), counted(outcome="bad_roi")) == (len(BAD_UPLOADS) + 1, 1, 2)
    assert service.process.poll() is None
    log = service.log_text()
    # no answer was a 5xx
    assert not re.search(r"status=5\d\d", log), log[-4000:]
    assert "SECRET-1234" not in log and "Doe^Jane" not in log  # no DICOM patient data in logs


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_concurrent_requests_form_batches_larger_than_one(service: Served) -> None:
    before = httpx.get(f"{service.http_url}/metrics", timeout=10).text
    payloads = [images.png(images.mammogram(s)) for s in range(8)]

    def call(i: int) -> int:
        return post_file(service, "/density", payloads[i % len(payloads)]).status_code

    with ThreadPoolExecutor(32) as pool:
        codes = list(pool.map(call, range(96)))
    assert codes == [200] * 96, service.server_errors()
    after = httpx.get(f"{service.http_url}/metrics", timeout=10).text
    def grew(metric: str, **labels: str) -> float:
        return _metric(after, metric, model="density", **labels) - _metric(before, metric, model="density",
                                                                            **labels)

    name = "breastscan_model_batch_size"
    calls, images_run = grew(f"{name}_count"), grew(f"{name}_sum")
    singles = grew(f"{name}_bucket", le="1.0")
    assert images_run == 96
    assert calls < 96 and singles < calls, (calls, singles)  # some model calls took several images
    assert _metric(after, "breastscan_model_predictions_total", model="density") >= 96
    assert _metric(after, "breastscan_requests_total", endpoint="density", outcome="ok") >= 96


def test_request_id_is_echoed_and_logged_without_content(service: Served) -> None:
    r = post_file(service, "/tumor", MG, explain=False)
    generated = r.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    r = httpx.post(f"{service.http_url}/tumor", files={"image": ("x.png", MG)}, timeout=30,
                   headers={"X-Request-ID": "trace-abc.123"})
    assert r.headers["x-request-id"] == "trace-abc.123"
    lines = service.log_lines("request_id=trace-abc.123")
    assert lines and "path=/tumor status=200" in lines[0]


def test_openapi_documents_every_endpoint(service: Served) -> None:
    spec = httpx.get(f"{service.http_url}/docs.json", timeout=10).json()
    for path in ("/density", "/tumor", "/lesion", "/mammo_lesion", "/us_mt", "/predict", "/predict_array",
                 "/analyze", "/preview", "/models"):
        assert path in spec["paths"], path


def test_web_ui_page_is_served(service: Served) -> None:
    r = httpx.get(f"{service.http_url}/ui/", timeout=10)
    assert r.status_code == 200 and "<html" in r.text.lower()


def test_every_route_and_grpc_answer_the_same_pixels_alike(service: Served) -> None:
    """``/<model>`` and ``/predict`` (multipart), ``/predict_array`` (JSON) with the same pixels
    and gRPC: one parse, one engine, one answer -- equal bit for bit."""
    roi = "0,0,100,80"
    by_model = post_file(service, "/tumor", MG, explain=True, roi=roi)
    by_predict = post_file(service, "/predict", MG, model="tumor", explain=True, roi=roi)
    pixels = images.mammogram(1).tolist()  # MG's pixels
    by_array = httpx.post(f"{service.http_url}/predict_array", timeout=60, json={
        "model": "tumor", "array": pixels, "dtype": "uint8", "explain": True, "roi": roi})
    assert by_model.status_code == by_predict.status_code == by_array.status_code == 200, by_array.text
    assert by_model.headers["x-request-id"] and by_model.headers["content-type"] == "application/json"
    with GRPCClient(service.grpc_target, timeout=60) as rpc:
        by_grpc = rpc.predict("tumor", MG, explain=True, roi=(0, 0, 100, 80))
    assert by_model.json() == by_predict.json() == by_array.json() == by_grpc
    for word in ("yes", "on", "1"):  # a form's booleans, as HTML forms and curl send them
        assert post_file(service, "/tumor", MG, explain=word, roi=roi).json() == by_model.json(), word
    for fields, code in (({"explain": "maybe"}, "bad_field"), ({"roi": "1,2,3"}, "bad_roi"),
                         ({"comment": "not a field of the endpoint"}, "unknown_field")):
        refused = post_file(service, "/tumor", MG, **fields)
        assert refused.status_code == 400 and refused.json()["code"] == code, refused.text
        assert refused.json()["error"]
    refused = post_file(service, "/tumor", b"not an image")
    assert refused.status_code == 400 and refused.json()["code"] == "not_an_image"
    assert not service.server_errors()
