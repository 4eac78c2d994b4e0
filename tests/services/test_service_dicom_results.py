"""DICOM results from the real service: ``/analyze`` with ``dicom`` (HTTP) and ``dicom: true``
(gRPC) return a Structured Report of every answer and a Segmentation per segmentation model;
read back with pydicom and highdicom they reference the source image and hold the values
of the JSON answer."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest

from breastscan.serving.client import GRPCClient, HTTPClient, ServiceError
from tests.services import images
from tests.services.conftest import Served

pytestmark = [pytest.mark.slow, pytest.mark.service]

MG_DICOM = images.dicom(images.mammogram(6), "MG")
US_DICOM = images.dicom(images.ultrasound(6), "US")


def _read(text: str) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(base64.b64decode(text)))


def _numbers(items: Any) -> Iterator[float]:
    """Every NUM content item's value in an SR content tree."""
    for item in items or ():
        if item.get("ValueType") == "NUM" and "MeasuredValueSequence" in item:
            yield float(item.MeasuredValueSequence[0].NumericValue)
        yield from _numbers(item.get("ContentSequence"))


def _texts(items: Any) -> Iterator[str]:
    for item in items or ():
        if item.get("ValueType") == "TEXT":
            yield str(item.TextValue)
        yield from _texts(item.get("ContentSequence"))


def _check_sr(sr: pydicom.Dataset, source: pydicom.Dataset, answer: dict[str, Any]) -> None:
    assert sr.Modality == "SR" and sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert source.SOPInstanceUID in str(sr)  # the image it reports on is referenced
    numbers = list(_numbers(sr.ContentSequence))
    for name, model in answer["models"].items():
        for p in (model.get("probabilities") or {}).values():
            assert any(abs(n - p) < 1e-6 for n in numbers), (name, p, numbers)
    assert any("NOT FOR DIAGNOSTIC USE" in t.upper() for t in _texts(sr.ContentSequence))
    assert "SECRET-1234" == sr.PatientID  # the patient module, as the standard requires; no more


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_mammogram_gets_a_structured_report_of_its_answers(service: Served, protocol: str) -> None:
    client: Any = HTTPClient(service.http_url) if protocol == "http" else GRPCClient(service.grpc_target)
    with client:
        answer = client.analyze(MG_DICOM, dicom=True)
    source = pydicom.dcmread(io.BytesIO(MG_DICOM))
    assert set(answer["models"]) == {"density", "tumor"} and answer["dicom"]["seg"] == {}
    _check_sr(_read(answer["dicom"]["sr"]), source, answer)


def test_an_ultrasound_gets_a_segmentation_equal_to_the_json_mask(service: Served) -> None:
    with GRPCClient(service.grpc_target) as g:
        answer = g.analyze(US_DICOM, dicom=True)
    source = pydicom.dcmread(io.BytesIO(US_DICOM))
    seg = hd.seg.segread(io.BytesIO(base64.b64decode(answer["dicom"]["seg"]["lesion"])))
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert source.SOPInstanceUID in str(seg)
    mask = images.decode_png_b64(answer["models"]["lesion"]["mask_png"]) > 0
    pixels = np.asarray(seg.pixel_array).reshape(mask.shape)  # one frame, one segment
    assert (pixels > 0).sum() == mask.sum() and np.array_equal(pixels > 0, mask)
    _check_sr(_read(answer["dicom"]["sr"]), source, answer)


@pytest.mark.parametrize(("data", "fields", "code"), [
    (images.png(images.mammogram(6)), {}, "not_dicom"),
    (MG_DICOM, {"roi": (0, 0, 40, 40)}, "bad_roi"),
])
def test_dicom_results_of_a_png_or_a_crop_are_refused(service: Served, data: bytes, fields: dict[str, Any],
                                                      code: str) -> None:
    with HTTPClient(service.http_url) as h, pytest.raises(ServiceError) as info:
        h.analyze(data, modality="mammography", dicom=True, **fields)
    assert info.value.code == code
