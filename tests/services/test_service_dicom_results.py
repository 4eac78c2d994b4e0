"""DICOM results from the real service: ``/analyze`` with ``dicom`` (HTTP) and ``dicom: true``
(gRPC) return a Structured Report of every answer and a Segmentation per segmentation model;
read back with pydicom and highdicom they reference the source image and hold the values
of the JSON answer (a multi-task model's mask in its SEG, its classes and measures in the SR)."""

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
    numbers, texts = list(_numbers(sr.ContentSequence)), list(_texts(sr.ContentSequence))
    for name, model in answer["models"].items():
        assert name in texts  # each model's group, tracked by its name
        values = [*(model.get("probabilities") or {}).values(),
                  *(model[k] for k in ("lesion_area_px", "lesion_fraction") if k in model)]
        for p in values:
            assert any(abs(n - p) < 1e-6 for n in numbers), (name, p, numbers)
    assert any("NOT FOR DIAGNOSTIC USE" in t.upper() for t in texts)
    assert "SECRET-1234" == sr.PatientID  # the patient module, as the standard requires; no more


def _check_seg(text: str, source: pydicom.Dataset, answer: dict[str, Any]) -> None:
    """A SEG of the source image (its study, series and instance referenced, its size) whose
    one segment's pixels are the answer's mask."""
    seg = hd.seg.segread(io.BytesIO(base64.b64decode(text)))
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    assert seg.get_source_image_uids() == [(source.StudyInstanceUID, source.SeriesInstanceUID,
                                            source.SOPInstanceUID)]
    assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns)
    mask = images.decode_png_b64(answer["mask_png"]) > 0
    assert mask.shape == (source.Rows, source.Columns) and mask.sum() == answer["lesion_area_px"]
    pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1])
    assert pixels.shape == (1, *mask.shape, 1) and np.array_equal(pixels[0, :, :, 0] > 0, mask)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_mammogram_gets_a_structured_report_and_a_segmentation(service: Served, protocol: str) -> None:
    client: Any = HTTPClient(service.http_url) if protocol == "http" else GRPCClient(service.grpc_target)
    with client:
        answer = client.analyze(MG_DICOM, dicom=True)
    source = pydicom.dcmread(io.BytesIO(MG_DICOM))
    assert sorted(answer["models"]) == ["density", "mammo_lesion", "tumor"]
    assert sorted(answer["dicom"]["seg"]) == ["mammo_lesion"]  # one SEG per segmenter, none of a classifier
    assert 0 < answer["models"]["mammo_lesion"]["lesion_area_px"] < 160 * 128  # a mask of both values
    _check_seg(answer["dicom"]["seg"]["mammo_lesion"], source, answer["models"]["mammo_lesion"])
    _check_sr(_read(answer["dicom"]["sr"]), source, answer)


def test_an_ultrasound_gets_a_segmentation_equal_to_the_json_mask(service: Served) -> None:
    with GRPCClient(service.grpc_target) as g:
        answer = g.analyze(US_DICOM, dicom=True)
    source = pydicom.dcmread(io.BytesIO(US_DICOM))
    assert sorted(answer["models"]) == sorted(answer["dicom"]["seg"]) == ["lesion", "us_mt"]
    for name in ("lesion", "us_mt"):  # the multi-task model's mask too
        _check_seg(answer["dicom"]["seg"][name], source, answer["models"][name])
    sr = _read(answer["dicom"]["sr"])
    _check_sr(sr, source, answer)  # us_mt: its class probabilities and its lesion measures
    texts = list(_texts(sr.ContentSequence))
    assert any(t.startswith("us_mt: malignant is called") for t in texts), texts  # its decision rule


@pytest.mark.parametrize(("data", "fields", "code"), [
    (images.png(images.mammogram(6)), {}, "not_dicom"),
    (MG_DICOM, {"roi": (0, 0, 40, 40)}, "bad_roi"),
])
def test_dicom_results_of_a_png_or_a_crop_are_refused(service: Served, data: bytes, fields: dict[str, Any],
                                                      code: str) -> None:
    with HTTPClient(service.http_url) as h, pytest.raises(ServiceError) as info:
        h.analyze(data, modality="mammography", dicom=True, **fields)
    assert info.value.code == code
