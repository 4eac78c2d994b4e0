"""The real service over gRPC: the same answers as HTTP, client mistakes answered INVALID_ARGUMENT,
standard health checking and reflection, and gRPC requests batched with HTTP ones."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from breastscan.serving.client import GRPCClient, HTTPClient, ServiceError
from tests.services import images
from tests.services.conftest import Served
from tests.services.test_service_http import (
    BAD_UPLOADS,
    CLASS_KEYS,
    MASK_KEYS,
    MG,
    US,
    _metric,
    assert_same_answer,
)

pytestmark = [pytest.mark.slow, pytest.mark.service]


@pytest.fixture(scope="module")
def clients(service: Served) -> Any:
    with GRPCClient(service.grpc_target, timeout=60) as g, HTTPClient(service.http_url, timeout=60) as h:
        yield g, h


@pytest.mark.parametrize(("model", "data"), [("density", MG), ("tumor", MG), ("lesion", US),
                                             ("mammo_lesion", MG), ("us_mt", US)])
def test_predict_equals_http(clients: Any, model: str, data: bytes) -> None:
    g, h = clients
    assert_same_answer(g.predict(model, data), h.predict(model, data))


def test_a_multitask_answer_equals_http_with_both_parts(clients: Any) -> None:
    g, h = clients
    for explain in (False, True):
        by_grpc = g.predict("us_mt", US, explain=explain)
        assert_same_answer(by_grpc, h.predict("us_mt", US, explain=explain))
        assert by_grpc["task"] == "multitask" and CLASS_KEYS | MASK_KEYS <= set(by_grpc)
        assert ("heatmap_png" in by_grpc) == explain
    by_grpc, by_http = g.analyze(US, modality="ultrasound"), h.analyze(US, modality="ultrasound")
    assert sorted(by_grpc["models"]) == sorted(by_http["models"]) == ["lesion", "us_mt"]
    for name in ("lesion", "us_mt"):
        assert_same_answer(by_grpc["models"][name], by_http["models"][name])


def test_explain_roi_and_array_equal_http(clients: Any) -> None:
    g, h = clients
    assert_same_answer(g.predict("tumor", MG, explain=True, roi=(5, 10, 100, 120)),
                       h.predict("tumor", MG, explain=True, roi=(5, 10, 100, 120)))
    arr = images.mammogram(3).astype(np.uint16) * 200
    assert_same_answer(g.predict_array("density", arr), h.predict_array("density", arr))


def test_analyze_and_preview_equal_http(clients: Any) -> None:
    g, h = clients
    by_grpc, by_http = g.analyze(MG, modality="mammography"), h.analyze(MG, modality="mammography")
    assert by_grpc["eight_category"] == by_http["eight_category"]
    assert sorted(by_grpc["models"]) == sorted(by_http["models"]) == ["density", "mammo_lesion", "tumor"]
    for name in ("density", "mammo_lesion", "tumor"):
        assert_same_answer(by_grpc["models"][name], by_http["models"][name])
    dcm = images.dicom(images.ultrasound(4).astype(np.uint16) * 16, modality="US")
    assert g.analyze(dcm)["modality"] == "ultrasound"
    assert g.preview(dcm) == h.preview(dcm)


def test_models_and_health(clients: Any) -> None:
    g, h = clients
    assert g.models() == h.models()
    assert g.health() == "SERVING"


def test_reflection_lists_the_service(service: Served) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(service.grpc_target) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "breastscan.v1.BreastScan" in services and "grpc.health.v1.Health" in services


# A gRPC roi is typed integers: "roi not numbers" cannot be sent.
GRPC_BAD_UPLOADS = [case for case in BAD_UPLOADS if case != "roi not numbers"]


@pytest.mark.parametrize("case", GRPC_BAD_UPLOADS)
def test_bad_upload_is_invalid_argument(clients: Any, case: str) -> None:
    g, _ = clients
    data, fields, _, code = BAD_UPLOADS[case]
    roi = tuple(int(v) for v in fields["roi"].split(",")) if "roi" in fields else None
    with pytest.raises(ServiceError) as info:
        g.predict("tumor", data, roi=roi)
    assert info.value.status == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.code == code and info.value.message


def test_bad_arrays_unknown_model_and_oversize(clients: Any, service: Served) -> None:
    g, _ = clients
    for call, code in [
        (lambda: g.predict("nope", MG), "unknown_model"),
        (lambda: g.predict_array("tumor", np.zeros((32, 32, 5), np.uint8)), "bad_shape"),
        (lambda: g.predict_array("tumor", np.zeros((4, 4), np.uint8)), "too_small"),
        (lambda: g.predict_array("tumor", np.full((32, 32), 2.0, np.float32)), "out_of_range"),
        (lambda: g.analyze(MG), "unknown_modality"),
    ]:
        with pytest.raises(ServiceError) as info:
            call()
        assert info.value.code == code
        assert info.value.status == grpc.StatusCode.INVALID_ARGUMENT
    nan = np.full((32, 32), np.nan, np.float32)
    with pytest.raises(ServiceError) as info:
        g.predict_array("tumor", nan)
    assert info.value.code == "not_finite"
    with pytest.raises(ServiceError) as info:
        g.predict("tumor", b"\x00" * (34 * 2**20))
    assert info.value.status == grpc.StatusCode.RESOURCE_EXHAUSTED
    # still serving, over both protocols
    assert g.health() == "SERVING" and g.predict("lesion", US)["task"] == "segmentation"
    assert httpx.get(f"{service.http_url}/readyz", timeout=10).status_code == 200


def test_grpc_and_http_requests_share_the_batcher(service: Served, clients: Any) -> None:
    g, h = clients
    before = httpx.get(f"{service.http_url}/metrics", timeout=10).text
    payloads = [images.png(images.mammogram(s)) for s in range(6)]

    def call(i: int) -> str:
        client = g if i % 2 else h
        return str(client.predict("tumor", payloads[i % len(payloads)])["predicted"])

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(call, range(96)))
    assert len(answers) == 96
    after = httpx.get(f"{service.http_url}/metrics", timeout=10).text
    calls = (_metric(after, "breastscan_model_batch_size_count", model="tumor")
             - _metric(before, "breastscan_model_batch_size_count", model="tumor"))
    run = (_metric(after, "breastscan_model_batch_size_sum", model="tumor")
           - _metric(before, "breastscan_model_batch_size_sum", model="tumor"))
    assert run == 96 and calls < 96, (calls, run)
