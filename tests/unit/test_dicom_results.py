"""breastscan.imaging.dicom_results: SEG and SR written, read back with pydicom and highdicom."""

from __future__ import annotations

import io
import logging
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import format_number_as_ds

from breastscan.imaging.dicom_results import (
    DISCLAIMER,
    LESION_FRACTION,
    AlgorithmInfo,
    class_concept,
    probability_concept,
    segmentation,
    source_dataset,
    structured_report,
    to_bytes,
)
from tests.services.images import dicom

MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
ROWS, COLS = 48, 40

DENSITY = AlgorithmInfo("density-mg", "7", "production", "classification", ("A", "B", "C", "D"))
TUMOR = AlgorithmInfo("tumor-mg", "3", "staging", "classification", ("benign", "malignant", "normal"))
MIAS = AlgorithmInfo("density-mias", "2", "production", "classification", ("F", "G", "D"))
SEGMENTER = AlgorithmInfo("lesion-us", "5", "production", "segmentation", ("lesion",))

# Probabilities with more digits than a 16-character DS holds.
DENSITY_ANSWER: dict[str, Any] = {
    "probabilities": {"A": 0.0123456789012345, "B": 0.1234567890123456,
                      "C": 0.6543210987654321, "D": 0.2098765432109878},
    "predicted": "C", "confidence": 0.6543210987654321,
}
TUMOR_ANSWER: dict[str, Any] = {
    "model": "tumor-mg", "version": "3", "stage": "staging", "task": "classification",
    "probabilities": {"benign": 0.25, "malignant": 0.7123456789, "normal": 0.0376543211},
    "predicted": "malignant", "confidence": 0.7123456789,
}
SEG_ANSWER: dict[str, Any] = {
    "lesion_area_px": 120, "lesion_fraction": 120 / (ROWS * COLS), "bbox": [5, 6, 12, 10],
}


# --------------------------------------------------------------------------- sources


def _file_dataset(ds: pydicom.Dataset, sop_class: str) -> pydicom.Dataset:
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.UID(sop_class)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _patient_and_study(ds: pydicom.Dataset) -> None:
    ds.PatientName, ds.PatientID = "Doe^Jane", "SECRET-1234"
    ds.PatientBirthDate, ds.PatientSex, ds.PatientAge = "19700101", "F", "055Y"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20250101", "101010", "S1", "ACC1"
    ds.ReferringPhysicianName = "Ref^Doc"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Manufacturer, ds.InstitutionName = "Vendor", "Hospital"


def mg_source(monochrome1: bool = False) -> pydicom.Dataset:
    """A Digital Mammography X-Ray Image - For Presentation as a PACS sends it (14-bit)."""
    ds = _file_dataset(pydicom.Dataset(), MG_FOR_PRESENTATION)
    _patient_and_study(ds)
    ds.Modality, ds.PresentationIntentType, ds.BodyPartExamined = "MG", "FOR PRESENTATION", "BREAST"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.ImageLaterality, ds.ViewPosition, ds.PatientOrientation = "L", "CC", ["A", "R"]
    ds.FrameOfReferenceUID = generate_uid()
    ds.ImagerPixelSpacing = ds.PixelSpacing = [0.07, 0.07]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 14, 13, 0
    ds.WindowCenter, ds.WindowWidth = 8000, 12000
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, 0, "US"
    ds.Rows, ds.Columns = ROWS, COLS
    ds.PixelData = np.full((ROWS, COLS), 4000, "<u2").tobytes()
    return ds


def us_source() -> pydicom.Dataset:
    """An Ultrasound Image (8-bit, with a calibrated region and no frame of reference)."""
    ds = _file_dataset(pydicom.Dataset(), US_IMAGE)
    _patient_and_study(ds)
    ds.Modality, ds.ImageType = "US", ["ORIGINAL", "PRIMARY", "SMALL PARTS"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    region = pydicom.Dataset()
    region.RegionSpatialFormat, region.RegionDataType, region.RegionFlags = 1, 1, 0
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 0, 0
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = COLS - 1, ROWS - 1
    region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3  # cm
    region.PhysicalDeltaX = region.PhysicalDeltaY = 0.01
    ds.SequenceOfUltrasoundRegions = [region]
    ds.Rows, ds.Columns = ROWS, COLS
    ds.PixelData = np.full((ROWS, COLS), 90, np.uint8).tobytes()
    return ds


def sc_source() -> pydicom.Dataset:
    """The services' test file: Secondary Capture without study/series UIDs."""
    return source_dataset(dicom(np.zeros((ROWS, COLS), np.uint16), "MG"))


SOURCES = {"mg": mg_source, "mg-mono1": lambda: mg_source(True), "us": us_source, "sc": sc_source}


def _roundtrip(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A source as the service receives it: written to bytes and parsed again."""
    return source_dataset(to_bytes(ds))


def _mask() -> np.ndarray:
    mask = np.zeros((ROWS, COLS), bool)
    mask[6:16, 5:17] = True
    return mask


def _patient_elements(ds: pydicom.Dataset) -> dict[str, Any]:
    return {e.keyword: e.value for e in ds if e.tag.group == 0x0010 and e.value not in (None, "", [])}


# --------------------------------------------------------------------------- SEG


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_binary_seg_round_trips(kind: str) -> None:
    source = _roundtrip(SOURCES[kind]())
    mask = _mask()
    data = to_bytes(segmentation(source, mask, SEGMENTER))
    assert data[128:132] == b"DICM"

    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.SOPClassUID == SEG_STORAGE and ds.file_meta.MediaStorageSOPClassUID == SEG_STORAGE
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert (ds.Rows, ds.Columns) == (source.Rows, source.Columns)
    assert ds.StudyInstanceUID == source.get("StudyInstanceUID", ds.StudyInstanceUID)
    assert ds.SeriesInstanceUID != source.get("SeriesInstanceUID")
    assert ds.SOPInstanceUID != source.SOPInstanceUID and ds.SeriesNumber == 901
    ref = ds.ReferencedSeriesSequence[0]
    assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert ref.ReferencedInstanceSequence[0].ReferencedSOPClassUID == source.SOPClassUID
    if "SeriesInstanceUID" in source:
        assert ref.SeriesInstanceUID == source.SeriesInstanceUID

    seg = hd.seg.segread(io.BytesIO(data))
    pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], combine_segments=False)
    assert pixels.shape == (1, ROWS, COLS, 1)
    np.testing.assert_array_equal(pixels[0, :, :, 0].astype(bool), mask)


def test_seg_identifies_the_algorithm_and_the_segment() -> None:
    ds = pydicom.dcmread(io.BytesIO(to_bytes(segmentation(_roundtrip(mg_source()), _mask(), SEGMENTER))))
    assert ds.Manufacturer == "breastscan"
    assert ds.ManufacturerModelName == "lesion-us" and ds.SoftwareVersions == "5"
    assert "NOT FOR DIAGNOSTIC USE" in ds.SeriesDescription
    segment = ds.SegmentSequence[0]
    assert segment.SegmentLabel == "Lesion" and segment.SegmentAlgorithmType == "AUTOMATIC"
    category = codes.SCT.MorphologicallyAbnormalStructure
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == category.value
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.SCT.Mass.value
    assert len(segment.RecommendedDisplayCIELabValue) == 3
    algo = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("lesion-us", "5")
    assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == codes.DCM.ArtificialIntelligence.value
    assert "stage=production" in algo.AlgorithmParameters


@pytest.mark.parametrize("kind", ["mg", "us"])
def test_fractional_seg_stores_the_probabilities(kind: str) -> None:
    source = _roundtrip(SOURCES[kind]())
    rng = np.random.default_rng(0)
    mask = rng.random((ROWS, COLS)).astype(np.float32)
    mask[0, :3] = (0.0, 1.0, 0.5)
    data = to_bytes(segmentation(source, mask, SEGMENTER, fractional=True))

    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.SegmentationType == "FRACTIONAL" and ds.SegmentationFractionalType == "PROBABILITY"
    assert ds.MaximumFractionalValue == 255 and (ds.Rows, ds.Columns) == (ROWS, COLS)
    np.testing.assert_array_equal(ds.pixel_array, np.round(mask * 255).astype(np.uint8))

    seg = hd.seg.segread(io.BytesIO(data))
    pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], combine_segments=False)
    np.testing.assert_allclose(pixels[0, :, :, 0], mask, atol=0.5 / 255 + 1e-6)


def test_empty_mask_gives_one_empty_frame() -> None:
    ds = pydicom.dcmread(io.BytesIO(to_bytes(
        segmentation(_roundtrip(us_source()), np.zeros((ROWS, COLS), bool), SEGMENTER))))
    assert int(ds.NumberOfFrames) == 1 and not ds.pixel_array.any()


def test_seg_copies_patient_data_but_adds_none() -> None:
    source = _roundtrip(mg_source())
    ds = pydicom.dcmread(io.BytesIO(to_bytes(segmentation(source, _mask(), SEGMENTER))))
    assert str(ds.PatientName) == "Doe^Jane" and ds.PatientID == "SECRET-1234"
    written, given = _patient_elements(ds), _patient_elements(source)
    assert set(written) <= set(given)
    assert all(written[k] == given[k] for k in written)
    assert "InstitutionName" not in ds  # the source's, not ours


def test_seg_of_bare_test_file_adds_no_patient_data() -> None:
    source = sc_source()
    ds = pydicom.dcmread(io.BytesIO(to_bytes(segmentation(source, _mask(), SEGMENTER))))
    assert _patient_elements(ds) == {"PatientName": "Doe^Jane", "PatientID": "SECRET-1234"}
    assert ds.PatientBirthDate == "" and ds.PatientSex == ""


def test_seg_and_sr_of_a_bare_file_share_the_derived_study() -> None:
    source = sc_source()
    seg = pydicom.dcmread(io.BytesIO(to_bytes(segmentation(source, _mask(), SEGMENTER))))
    sr = pydicom.dcmread(io.BytesIO(_report(source)))
    assert seg.StudyInstanceUID == sr.StudyInstanceUID
    assert seg.SeriesInstanceUID != sr.SeriesInstanceUID


def test_seg_leaves_the_source_unchanged() -> None:
    source = _roundtrip(mg_source())
    before = to_bytes(source)
    segmentation(source, _mask(), SEGMENTER)
    assert to_bytes(source) == before


@pytest.mark.parametrize(("mask", "fractional", "match"), [
    (np.zeros((ROWS, COLS + 1), bool), False, "shape"),
    (np.full((ROWS, COLS), 0.5, np.float32), False, "binary"),
    (np.full((ROWS, COLS), 1.5, np.float32), True, r"\[0, 1\]"),
    (np.full((ROWS, COLS), np.nan, np.float32), True, "NaN"),
])
def test_seg_refuses_bad_masks(mask: np.ndarray, fractional: bool, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        segmentation(mg_source(), mask, SEGMENTER, fractional=fractional)


def test_seg_refuses_a_multiframe_source() -> None:
    source = us_source()
    source.NumberOfFrames = 2
    with pytest.raises(ValueError, match="multi-frame"):
        segmentation(source, _mask(), SEGMENTER)


def test_missing_uids_are_logged_without_header_values(caplog: pytest.LogCaptureFixture) -> None:
    source = sc_source()
    del source.StudyInstanceUID, source.SeriesInstanceUID  # as in a bare Secondary Capture
    with caplog.at_level(logging.INFO, logger="breastscan.imaging.dicom_results"):
        segmentation(source, _mask(), SEGMENTER)
    assert "StudyInstanceUID" in caplog.text
    assert "Doe" not in caplog.text and "SECRET" not in caplog.text


# --------------------------------------------------------------------------- SR


def _report(source: pydicom.Dataset) -> bytes:
    answers = {"density-mg": DENSITY_ANSWER, "tumor-mg": TUMOR_ANSWER, "lesion-us": SEG_ANSWER}
    algorithms = {a.name: a for a in (DENSITY, TUMOR, SEGMENTER)}
    return to_bytes(structured_report(source, answers, algorithms))


def _groups(data: bytes) -> dict[str, Any]:
    """Model name -> its TID 1501 group, read back through highdicom."""
    sr = hd.sr.srread(io.BytesIO(data))
    report = hd.sr.MeasurementReport.from_sequence(sr.content)
    return {str(g.tracking_identifier): g for g in report.get_image_measurement_groups()}


def _texts(group: Any, code: str) -> list[str]:
    items = hd.sr.utils.find_content_items(group[0], name=hd.sr.CodedConcept(code, "DCM", "x"))
    return [str(item.value) for item in items]


@pytest.fixture(scope="module")
def mg_report() -> tuple[pydicom.Dataset, bytes, dict[str, Any]]:
    """The SR of the three models' answers for a realistic MG: source, bytes, groups read back."""
    source = _roundtrip(mg_source())
    data = _report(source)
    return source, data, _groups(data)


def _num(group: Any, name: Any) -> Any:
    items = group.get_measurements(name=name)
    assert len(items) == 1, name
    return items[0]


@pytest.mark.parametrize("kind", ["mg", "us", "sc"])
def test_sr_round_trips(kind: str) -> None:
    source = _roundtrip(SOURCES[kind]())
    data = _report(source)
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.SOPClassUID == COMPREHENSIVE_SR and ds.Modality == "SR"
    assert ds.StudyInstanceUID == source.get("StudyInstanceUID", ds.StudyInstanceUID)
    assert ds.SeriesInstanceUID != source.get("SeriesInstanceUID") and ds.SeriesNumber == 902
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    ref = evidence.ReferencedSOPSequence[0]
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (source.SOPClassUID,
                                                                         source.SOPInstanceUID)
    assert isinstance(hd.sr.srread(io.BytesIO(data)), hd.sr.ComprehensiveSR)
    assert set(_groups(data)) == {"density-mg", "tumor-mg", "lesion-us"}


def test_sr_holds_the_probabilities_at_dicom_precision(mg_report: Any) -> None:
    _, data, groups = mg_report
    for model, answer in (("density-mg", DENSITY_ANSWER), ("tumor-mg", TUMOR_ANSWER)):
        for cls, p in answer["probabilities"].items():
            item = _num(groups[model], probability_concept(cls))
            assert item.value == p  # FloatingPointValue (FD): exact
            assert item.unit.value == "1" and item.unit.scheme_designator == "UCUM"
    # The DS NumericValue as pydicom reads it from the file: at most 16 characters.
    stored = {item.ConceptNameCodeSequence[0].CodeMeaning: item.MeasuredValueSequence[0].NumericValue
              for item in _walk(pydicom.dcmread(io.BytesIO(data))) if item.ValueType == "NUM"}
    for answer in (DENSITY_ANSWER, TUMOR_ANSWER):
        for cls, p in answer["probabilities"].items():
            text = stored[f"Probability of {cls}"]
            assert len(str(text)) <= 16 and str(text) == format_number_as_ds(p)
            assert float(text) == pytest.approx(p, rel=1e-12, abs=1e-14)


def test_sr_holds_predicted_class_and_density_category(mg_report: Any) -> None:
    groups = mg_report[2]
    density = groups["density-mg"]
    [predicted] = density.get_qualitative_evaluations(name=codes.SCT.Classification)
    assert predicted.value == class_concept("C", DENSITY.class_names)
    assert predicted.value.value == codes.SCT.HeterogeneouslyDense.value
    [composition] = density.get_qualitative_evaluations(name=codes.DCM.BreastComposition)
    assert composition.value.value == codes.SCT.HeterogeneouslyDense.value
    tumor = groups["tumor-mg"]
    [predicted] = tumor.get_qualitative_evaluations(name=codes.SCT.Classification)
    assert predicted.value.value == codes.SCT.Malignant.value
    assert not tumor.get_qualitative_evaluations(name=codes.DCM.BreastComposition)


def test_sr_holds_lesion_area_and_fraction() -> None:
    lesion = _groups(_report(_roundtrip(us_source())))["lesion-us"]
    assert _num(lesion, codes.DCM.AreaOfDefinedRegion).value == 120
    assert _num(lesion, codes.DCM.AreaOfDefinedRegion).unit.value == "{pixels}"
    assert _num(lesion, LESION_FRACTION).value == SEG_ANSWER["lesion_fraction"]
    assert lesion.finding_type.value == codes.SCT.Mass.value


def test_sr_identifies_algorithms_and_references_the_source(mg_report: Any) -> None:
    source, _, groups = mg_report
    for info in (DENSITY, TUMOR, SEGMENTER):
        group = groups[info.name]
        assert _texts(group, "111001") == [info.name]  # Algorithm Name
        assert _texts(group, "111003") == [info.version]  # Algorithm Version
        parameters = _texts(group, "111002")
        assert f"stage={info.stage}" in parameters and f"task={info.task}" in parameters
        [image] = group.source_images
        assert image.referenced_sop_instance_uid == source.SOPInstanceUID
        assert image.referenced_sop_class_uid == source.SOPClassUID


def test_sr_has_the_disclaimer_and_no_added_patient_data(mg_report: Any) -> None:
    source, data, _ = mg_report
    assert DISCLAIMER.encode() in data
    ds = pydicom.dcmread(io.BytesIO(data))
    texts = [item.TextValue for item in _walk(ds) if item.get("ValueType") == "TEXT"]
    assert DISCLAIMER in texts
    assert "NOT FOR DIAGNOSTIC USE" in ds.SeriesDescription
    written, given = _patient_elements(ds), _patient_elements(source)
    assert set(written) <= set(given) and all(written[k] == given[k] for k in written)
    assert ds.Manufacturer == "breastscan"
    assert {"density-mg 7", "tumor-mg 3", "lesion-us 5"} <= set(ds.SoftwareVersions)


def test_sr_states_the_decision_rule_of_a_classifier() -> None:
    from dataclasses import replace

    rule = "malignant is called when p(malignant) / (p(malignant) + p(benign)) >= 0.210, otherwise ..."
    algorithms = {"tumor-mg": replace(TUMOR, decision=rule), "density-mg": DENSITY}  # density: none stated
    data = to_bytes(structured_report(_roundtrip(mg_source()), {"tumor-mg": TUMOR_ANSWER,
                                                                "density-mg": DENSITY_ANSWER}, algorithms))
    ds = pydicom.dcmread(io.BytesIO(data))
    texts = {item.TextValue: item.ConceptNameCodeSequence[0] for item in _walk(ds)
             if item.get("ValueType") == "TEXT"}
    assert f"tumor-mg: {rule}" in texts and not any(t.startswith("density-mg:") for t in texts)
    concept = texts[f"tumor-mg: {rule}"]
    assert (concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning) == \
        ("DECISION-RULE", "99BREASTSCAN", "Decision rule")
    [predicted] = _groups(data)["tumor-mg"].get_qualitative_evaluations(name=codes.SCT.Classification)
    assert predicted.value == codes.SCT.Malignant  # the answer's predicted class, called by that rule


def _walk(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    out = []
    for item in ds.get("ContentSequence", []):
        out.append(item)
        out.extend(_walk(item))
    return out


def test_sr_of_a_mias_density_model_uses_private_codes() -> None:
    answer = {"probabilities": {"F": 0.2, "G": 0.5, "D": 0.3}, "predicted": "G", "confidence": 0.5}
    data = to_bytes(structured_report(_roundtrip(mg_source()), {"density-mias": answer},
                                      {"density-mias": MIAS}))
    group = _groups(data)["density-mias"]
    [composition] = group.get_qualitative_evaluations(name=codes.DCM.BreastComposition)
    assert composition.value.scheme_designator == "99BREASTSCAN"
    assert _num(group, probability_concept("D")).value == 0.3
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99BREASTSCAN"


@pytest.mark.parametrize(("answers", "match"), [
    ({}, "no answers"),
    ({"unknown": TUMOR_ANSWER}, "AlgorithmInfo"),
    ({"tumor-mg": {**TUMOR_ANSWER, "probabilities": {"benign": 1.2, "malignant": 0.1}}}, r"\[0, 1\]"),
    ({"tumor-mg": {**TUMOR_ANSWER, "predicted": "cyst"}}, "predicted"),
    ({"tumor-mg": {**TUMOR_ANSWER, "probabilities": {"benign": float("nan")}, "predicted": "benign"}},
     "finite"),
    ({"lesion-us": {**SEG_ANSWER, "lesion_area_px": None}}, "lesion_area_px"),
    ({"tumor-mg": {**TUMOR_ANSWER, "version": "4"}}, "another version"),
])
def test_sr_refuses_bad_answers(answers: dict[str, Any], match: str) -> None:
    algorithms = {a.name: a for a in (TUMOR, SEGMENTER)}
    with pytest.raises(ValueError, match=match):
        structured_report(mg_source(), answers, algorithms)


def test_sr_keeps_long_class_names_apart() -> None:
    names = ("suspicious-for-malignancy-a", "suspicious-for-malignancy-b")
    info = AlgorithmInfo("long-names", "1", "production", "classification", names)
    answer = {"probabilities": dict(zip(names, (0.4, 0.6), strict=True)), "predicted": names[1]}
    group = _groups(to_bytes(structured_report(_roundtrip(us_source()), {info.name: answer},
                                               {info.name: info})))[info.name]
    assert [_num(group, probability_concept(n)).value for n in names] == [0.4, 0.6]
    [predicted] = group.get_qualitative_evaluations(name=codes.SCT.Classification)
    assert predicted.value.value == names[1]
