"""The platform's answers as DICOM objects a PACS or viewer files with the source image.

* :func:`segmentation` turns a lesion mask into a DICOM Segmentation (SEG) instance: one
  segment "Lesion" (SCT Morphologically Abnormal Structure / Mass), BINARY or FRACTIONAL
  (probability), pixel-aligned with the source image it references.
* :func:`structured_report` turns the service's JSON answers (one per model, see
  :meth:`breastscan.serving.requests.Prediction.to_dict`) into a Comprehensive SR holding a
  TID 1500 Measurement Report: per model one measurement group with its algorithm
  identification (TID 4019), the source image reference, the predicted class, every
  calibrated probability (unit ``1``), the BI-RADS composition of a density model and the
  lesion area / fraction of a segmenter; plus a "NOT FOR DIAGNOSTIC USE" text and, per
  classifier, a text stating the decision rule that called its predicted class.
* :func:`to_bytes` writes either as a DICOM Part 10 file; :func:`source_dataset` parses
  the source image's bytes.

Both objects are in the source's study and in new series (new Series / SOP Instance UIDs),
carry ContentQualification ``RESEARCH`` and a series description saying they are not for
diagnostic use. Patient and study attributes are those highdicom copies from the source
(the Patient, General Study and Patient Study modules, as the IODs require); nothing else
about the patient is added. Type 2 attributes the source lacks are written empty.

Geometry: the SEG is tied to the source pixel for pixel through its Derivation/Source
Image references, not through patient coordinates. Projection mammograms and ultrasound
images have no patient coordinate system (no Image Position (Patient)); their Pixel
Spacing is therefore left out of the SEG (highdicom would write a Pixel Measures item
without Slice Thickness, which highdicom itself cannot read back).

Nothing here imports TensorFlow or Keras, reads params or logs a header value.
"""

from __future__ import annotations

import copy
import io
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from breastscan.imaging.dicom import load_dataset
from breastscan.labels import BIRADS_DENSITY, MIAS_DENSITY

logger = logging.getLogger(__name__)

MANUFACTURER = "breastscan"
"""Manufacturer (0008,0070) of every object written here."""

DISCLAIMER = "NOT FOR DIAGNOSTIC USE: research software output, not reviewed by a physician."
"""Text item of every SR (and, shortened, the series description of SEG and SR)."""

PRIVATE_SCHEME = "99BREASTSCAN"
"""Private coding scheme of concepts no standard dictionary has (class names, fractions)."""

SEG_SERIES_DESCRIPTION = "breastscan lesion SEG - NOT FOR DIAGNOSTIC USE"
SR_SERIES_DESCRIPTION = "breastscan results SR - NOT FOR DIAGNOSTIC USE"

_LESION_RGB = (255, 0, 0)  # red, as the service's overlays (breastscan.imaging.overlay)
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Attributes highdicom reads with attribute access (type 2 in SEG/SR): written empty if absent.
_TYPE2_COPIED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName",
)
# Patient-coordinate geometry of a 2-D image; the SEG is pixel-aligned without it.
_PATIENT_GEOMETRY = (
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
    "SliceThickness", "SpacingBetweenSlices",
)
_PROJECTION_MODALITIES = ("CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA")  # highdicom's list
_SCT_CLASS_CODES: dict[str, Any] = {
    "benign": codes.SCT.Benign,
    "malignant": codes.SCT.Malignant,
    "normal": codes.SCT.Normal,
}
_BIRADS_CODES: dict[str, Any] = dict(zip(BIRADS_DENSITY, (
    codes.SCT.AlmostEntirelyFatBreastComposition,
    codes.SCT.ScatteredFibroglandularDensities,
    codes.SCT.HeterogeneouslyDense,
    codes.SCT.ExtremelyDenseBreastComposition,
), strict=True))
_MIAS_MEANINGS = dict(zip(MIAS_DENSITY, ("fatty", "fatty-glandular", "dense-glandular"), strict=True))


@dataclass(frozen=True)
class AlgorithmInfo:
    """What identifies the model behind a result (SEG AlgorithmIdentificationSequence, SR TID 4019).

    Attributes:
        name: the registered model's name (e.g. ``"density-mg"``); ManufacturerModelName.
        version: its registry version (e.g. ``"7"``); SoftwareVersions, Algorithm Version.
        stage: its registry stage / alias (e.g. ``"production"``).
        task: ``"classification"``, ``"segmentation"`` or ``"multitask"`` (a class head and a
            mask from one model: reported as both).
        class_names: display names in class-index order (``("A", "B", "C", "D")``,
            ``("benign", "malignant")``, ``("lesion",)``).
        decision: a classifier's decision rule in one sentence
            (:meth:`breastscan.decision.DecisionRule.describe`): how its predicted class was
            called; ``""`` for a segmenter.
    """

    name: str
    version: str
    stage: str
    task: str
    class_names: tuple[str, ...]
    decision: str = ""

    @property
    def is_density(self) -> bool:
        """True for a density classifier (BI-RADS A-D or mini-MIAS F/G/D classes)."""
        return self.task == "classification" and self.class_names in (BIRADS_DENSITY, MIAS_DENSITY)

    def parameters(self) -> dict[str, str]:
        """``{"stage": ..., "task": ..., "classes": "A,B,C,D"}`` (algorithm parameters)."""
        return {"stage": self.stage, "task": self.task, "classes": ",".join(self.class_names)}


# --------------------------------------------------------------------------- source and bytes


def source_dataset(data: bytes) -> Dataset:
    """Parse the source image's DICOM bytes (Part 10, or a bare dataset).

    Raises:
        breastscan.imaging.preprocessing.ImageDecodeError: not DICOM or a corrupt header.
    """
    return load_dataset(data)


def to_bytes(ds: Dataset) -> bytes:
    """Write a dataset (a SEG or SR from this module) as a DICOM Part 10 file.

    Returns:
        The file's bytes: preamble, ``DICM``, file meta (its own transfer syntax), dataset.
    """
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _header(source: Dataset) -> Dataset:
    """A copy of ``source`` without pixel data, with what highdicom reads from it present.

    A missing Study / Series Instance UID (a bare test file) is derived from the SOP
    Instance UID (so SEG and SR of one source agree) and logged; a
    missing type 2 attribute highdicom copies (PatientBirthDate, StudyDate, ...) is added
    empty.

    Raises:
        ValueError: the source has no SOP Class / Instance UID or no Rows / Columns.
    """
    for keyword in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns"):
        if keyword not in source:
            raise ValueError(f"the source image has no {keyword}")
    header = Dataset()
    for elem in source:
        if elem.keyword not in _PIXEL_KEYWORDS:
            header.add(pydicom.DataElement(elem.tag, elem.VR, copy.deepcopy(elem.value)))
    if hasattr(source, "file_meta"):
        header.file_meta = copy.deepcopy(source.file_meta)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if not header.get(keyword):
            logger.warning("source image has no %s; one is derived from its SOP Instance UID", keyword)
            # Derived, not random: the SEG and the SR of one source share the made-up study.
            setattr(header, keyword, generate_uid(entropy_srcs=[str(source.SOPInstanceUID), keyword]))
    for keyword in _TYPE2_COPIED:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


# --------------------------------------------------------------------------- SEG


def segmentation(
    source: Dataset,
    mask: np.ndarray,
    algorithm: AlgorithmInfo,
    *,
    fractional: bool = False,
    series_number: int = 901,
) -> hd.seg.Segmentation:
    """A DICOM SEG of one segment "Lesion" over the source image.

    Args:
        source: the source image's dataset (pixel data not needed): MG (Digital
            Mammography For Presentation), US (Ultrasound Image) or Secondary Capture,
            single frame.
        mask: ``(Rows, Columns)`` at the source's own size; bool or 0/1 for a BINARY SEG,
            float in [0, 1] (lesion probability) with ``fractional=True`` for a FRACTIONAL
            (PROBABILITY) SEG stored as 8 bits (value * 255, rounded).
        algorithm: the segmentation model (AlgorithmIdentificationSequence,
            ManufacturerModelName = name, SoftwareVersions = registry version).
        fractional: write a FRACTIONAL instead of a BINARY segmentation.
        series_number: SeriesNumber of the new series.

    Returns:
        The :class:`highdicom.seg.Segmentation` (new series and instance UIDs, source's study).

    Raises:
        ValueError: wrong mask shape, non-finite or out-of-range values, a non-binary mask
            without ``fractional``, a multi-frame source, a source without UIDs or size.
    """
    header = _seg_header(source)
    pixels = _checked_mask(mask, (int(header.Rows), int(header.Columns)), fractional)
    seg = hd.seg.Segmentation(
        source_images=[header],
        pixel_array=pixels,
        segmentation_type="FRACTIONAL" if fractional else "BINARY",
        segment_descriptions=[_lesion_segment(algorithm)],
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        device_serial_number=f"{algorithm.name}:{algorithm.version}"[:64],
        fractional_type="PROBABILITY",
        content_label="LESION",
        content_description=f"{algorithm.name} v{algorithm.version} lesion mask"[:64],
        omit_empty_frames=False,
        content_qualification="RESEARCH",
        series_description=SEG_SERIES_DESCRIPTION,
    )
    logger.info("SEG written: model %s v%s, %s, %dx%d", algorithm.name, algorithm.version,
                seg.SegmentationType, seg.Rows, seg.Columns)
    return seg


def _seg_header(source: Dataset) -> Dataset:
    """The source header as highdicom needs it for a pixel-aligned single-frame SEG."""
    if int(source.get("NumberOfFrames", 1) or 1) > 1:
        raise ValueError("multi-frame source images are not supported (one frame is segmented)")
    header = _header(source)
    for keyword in _PATIENT_GEOMETRY:
        if keyword in header:
            delattr(header, keyword)
    return header


def _checked_mask(mask: np.ndarray, shape: tuple[int, int], fractional: bool) -> np.ndarray:
    """``mask`` as bool (binary) or float32 in [0, 1] (fractional), after checks."""
    arr = np.asarray(mask)
    if arr.shape != shape:
        raise ValueError(f"mask shape {arr.shape} is not the source's (Rows, Columns) {shape}")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"mask dtype {arr.dtype} is neither bool, integer nor floating point")
    values = arr.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError("mask holds NaN or infinite values")
    if values.size and (values.min() < 0.0 or values.max() > 1.0):
        raise ValueError("mask values must lie in [0, 1]")
    if fractional:
        return values.astype(np.float32)
    if not np.isin(values, (0.0, 1.0)).all():
        raise ValueError("a binary SEG needs a 0/1 mask: threshold it, or pass fractional=True")
    return values.astype(bool)


def _lesion_segment(algorithm: AlgorithmInfo) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Mass,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        display_color=hd.color.CIELabColor.from_rgb(*_LESION_RGB),
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm.name,
            family=codes.DCM.ArtificialIntelligence,
            version=algorithm.version,
            source=MANUFACTURER,
            parameters=algorithm.parameters(),
        ),
    )


# --------------------------------------------------------------------------- SR


def structured_report(
    source: Dataset,
    answers: Mapping[str, Mapping[str, Any]],
    algorithms: Mapping[str, AlgorithmInfo],
    *,
    series_number: int = 902,
) -> hd.sr.ComprehensiveSR:
    """A Comprehensive SR (TID 1500 Measurement Report) of the models' answers for one image.

    Args:
        source: the source image's dataset (pixel data not needed).
        answers: model name -> its JSON answer. Classifiers: ``probabilities``
            ``{class: p}`` (p in [0, 1]) and ``predicted``; segmenters:
            ``lesion_area_px`` (pixels, >= 0) and ``lesion_fraction`` (in [0, 1]); a
            multi-task model: all four.
        algorithms: model name -> :class:`AlgorithmInfo`, for every model in ``answers``.
        series_number: SeriesNumber of the new series.

    Returns:
        The :class:`highdicom.sr.ComprehensiveSR`: one measurement group per model (in the
        order of ``answers``), tracking id = model name, each referencing the source image;
        then a "Qualitative Evaluations" container with the disclaimer text and, for each
        classifier whose :attr:`AlgorithmInfo.decision` is set, a "Decision rule" text
        ``"<model>: <rule>"``.

    Raises:
        ValueError: no answers, an answer without its AlgorithmInfo or whose ``version``
            differs from it, a missing or invalid value (not finite, probability outside
            [0, 1], unknown predicted class).
    """
    if not answers:
        raise ValueError("no answers to report")
    header = _header(source)
    groups = [_model_group(header, answers[name], _algorithm(algorithms, name)) for name in answers]
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(),
        procedure_reported=_procedure(header),
        imaging_measurements=groups,
        referenced_images=[header] if _library_entry_possible(header) else None,
    )
    rules = [f"{name}: {algorithms[name].decision}" for name in answers
             if algorithms[name].task in ("classification", "multitask") and algorithms[name].decision]
    report[0].ContentSequence.append(_disclaimer_container(rules))
    sr = hd.sr.ComprehensiveSR(
        evidence=[header],
        content=report[0],
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        manufacturer_model_name=MANUFACTURER,
        content_qualification="RESEARCH",
        series_description=SR_SERIES_DESCRIPTION,
        coding_schemes=[_private_scheme()],
    )
    # Multi-valued: one "name version" per model (highdicom types it as one string).
    sr.add_new("SoftwareVersions", "LO", [f"{name} {algorithms[name].version}" for name in answers])
    logger.info("SR written: %d model answer(s)", len(groups))
    return sr


def _algorithm(algorithms: Mapping[str, AlgorithmInfo], name: str) -> AlgorithmInfo:
    if name not in algorithms:
        raise ValueError(f"no AlgorithmInfo for model {name!r}")
    return algorithms[name]


def _library_entry_possible(header: Dataset) -> bool:
    """Whether highdicom can describe the source in the Image Library (TID 1601).

    A projection image (MG, DX, ...) needs Patient Orientation and Imager Pixel Spacing
    there; a bare Secondary Capture with Modality MG has neither, and its SR then goes
    without an Image Library (the measurement groups still reference the image).
    """
    projection = str(header.get("Modality", "") or "").upper() in _PROJECTION_MODALITIES
    if not projection:
        return True
    complete = len(header.get("PatientOrientation", None) or ()) == 2 and bool(
        header.get("ImagerPixelSpacing", None))
    if not complete:
        logger.info("source has no Patient Orientation / Imager Pixel Spacing: no Image Library")
    return complete


def _private_scheme() -> CodingSchemeIdentificationItem:
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name="breastscan model classes and measurements",
        responsible_organization=MANUFACTURER,
    )


def _private(value: str, meaning: str) -> hd.sr.CodedConcept:
    """A concept of the private scheme (a value over 16 characters becomes a LongCodeValue)."""
    return hd.sr.CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME, meaning=meaning[:64])


def _observation_context() -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=hd.UID(), name=MANUFACTURER, manufacturer_name=MANUFACTURER
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def _procedure(header: Dataset) -> Any:
    modality = str(header.get("Modality", "") or "").upper()
    if modality == "MG":
        return codes.SCT.Mammography
    if modality == "US":
        return codes.SCT.UltrasonographyOfBreast
    return codes.cid100.ImagingProcedure


def _disclaimer_container(rules: Sequence[str] = ()) -> hd.sr.ContainerContentItem:
    """TID 1500 row "Qualitative Evaluations" (UMLS C0034375) holding the disclaimer text, then
    one "Decision rule" text per classifier (``rules``)."""
    container = hd.sr.ContainerContentItem(
        name=hd.sr.CodedConcept(value="C0034375", scheme_designator="UMLS",
                                meaning="Qualitative Evaluations"),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence([
        hd.sr.TextContentItem(name=name, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        for name, text in ((codes.DCM.Comment, DISCLAIMER), *((DECISION_RULE, rule) for rule in rules))
    ])
    return container


def _model_group(
    header: Dataset, answer: Mapping[str, Any], algorithm: AlgorithmInfo
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group of one model's answer."""
    if "version" in answer and str(answer["version"]) != algorithm.version:
        raise ValueError(f"answer of {algorithm.name!r} is from another version than its AlgorithmInfo")
    if algorithm.task == "classification":
        measurements, evaluations = _classifier_items(answer, algorithm)
        density = algorithm.is_density
        finding: dict[str, Any] = {"finding_type": codes.DCM.BreastComposition} if density else {}
    elif algorithm.task == "segmentation":
        measurements, evaluations = _segmenter_items(answer), []
        finding = {"finding_category": codes.SCT.MorphologicallyAbnormalStructure,
                   "finding_type": codes.SCT.Mass}
    elif algorithm.task == "multitask":  # the class head's items and the mask's, in one group
        measurements, evaluations = _classifier_items(answer, algorithm)
        measurements += _segmenter_items(answer)
        finding = {"finding_category": codes.SCT.MorphologicallyAbnormalStructure,
                   "finding_type": codes.SCT.Mass}
    else:
        raise ValueError(f"model {algorithm.name!r} has unknown task {algorithm.task!r}")
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=algorithm.name[:64]),
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=algorithm.name, version=algorithm.version, manufacturer=MANUFACTURER,
            parameters=[f"{k}={v}" for k, v in algorithm.parameters().items()],
        ),
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(header)],
        **finding,
    )


def class_concept(name: str, class_names: Sequence[str]) -> hd.sr.CodedConcept:
    """The coded concept of a class: SNOMED CT where one exists, else the private scheme.

    BI-RADS A-D (when ``class_names`` are A-D) become the SCT breast-composition findings;
    benign / malignant / normal the SCT qualifiers; mini-MIAS F/G/D and anything else a
    ``99BREASTSCAN`` code whose value is the class name.
    """
    if tuple(class_names) == BIRADS_DENSITY and name in _BIRADS_CODES:
        return hd.sr.CodedConcept.from_code(_BIRADS_CODES[name])
    if name.lower() in _SCT_CLASS_CODES:
        return hd.sr.CodedConcept.from_code(_SCT_CLASS_CODES[name.lower()])
    if tuple(class_names) == MIAS_DENSITY:
        return _private(f"MIAS-{name}", f"{_MIAS_MEANINGS.get(name, name)} ({name})")
    return _private(name, name)


def probability_concept(name: str) -> hd.sr.CodedConcept:
    """Concept name of the measurement "Probability of <class>" (private scheme)."""
    return _private(f"P-{name}", f"Probability of {name}")


DECISION_RULE = _private("DECISION-RULE", "Decision rule")
"""Concept name of the text stating how a classifier called its predicted class."""

LESION_FRACTION = _private("LESION-FRACTION", "Lesion fraction of image area")
"""Concept name of a segmenter's lesion fraction (unit ``1``)."""

PIXELS = hd.sr.CodedConcept(value="{pixels}", scheme_designator="UCUM", meaning="pixels")
"""UCUM unit of a lesion area counted in pixels."""


def _classifier_items(
    answer: Mapping[str, Any], algorithm: AlgorithmInfo
) -> tuple[list[hd.sr.Measurement], list[hd.sr.QualitativeEvaluation]]:
    probabilities = answer.get("probabilities")
    predicted = answer.get("predicted")
    if not isinstance(probabilities, Mapping) or not probabilities:
        raise ValueError(f"answer of {algorithm.name!r} has no probabilities")
    if predicted not in probabilities:
        raise ValueError(f"answer of {algorithm.name!r}: predicted class is not one of its classes")
    measurements = [
        hd.sr.Measurement(name=probability_concept(str(cls)),
                          value=_unit_interval(p, f"probability of {cls}"), unit=codes.UCUM.NoUnits)
        for cls, p in probabilities.items()
    ]
    value = class_concept(str(predicted), algorithm.class_names)
    evaluations = [hd.sr.QualitativeEvaluation(name=codes.SCT.Classification, value=value)]
    if algorithm.is_density:
        evaluations.append(hd.sr.QualitativeEvaluation(name=codes.DCM.BreastComposition, value=value))
    return measurements, evaluations


def _segmenter_items(answer: Mapping[str, Any]) -> list[hd.sr.Measurement]:
    area = _finite(answer.get("lesion_area_px"), "lesion_area_px")
    if area < 0:
        raise ValueError("lesion_area_px must not be negative")
    fraction = _unit_interval(answer.get("lesion_fraction"), "lesion_fraction")
    return [
        hd.sr.Measurement(name=codes.DCM.AreaOfDefinedRegion, value=area, unit=PIXELS),
        hd.sr.Measurement(name=LESION_FRACTION, value=fraction, unit=codes.UCUM.NoUnits),
    ]


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} is missing or not a finite number")
    return float(value)


def _unit_interval(value: Any, what: str) -> float:
    number = _finite(value, what)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"{what} must lie in [0, 1]")
    return number
