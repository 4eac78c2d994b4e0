"""Label-free drift statistics: one definition of an image's statistics, and the tests that
compare a window of served images with the model's training-set reference.

Every image, at training time and in the service, is summarised by :func:`image_stats`
(intensity histogram and percentiles, size, modality, the scanner's manufacturer from a
DICOM header -- never a patient field) and every answer by :func:`output_summary`
(predicted class and confidence, or lesion fraction). The train stage saves the statistics
of up to :data:`REFERENCE_LIMIT` training images, with the model's outputs on them, as
``reference.json`` in the model bundle (:func:`model_reference`); :func:`compare` tests a
window of recorded requests against it:

* ``histogram``: population stability index (PSI) of the mean 16-bin intensity histogram;
* scalar statistics (:data:`SCALAR_FEATURES`, :data:`OUTPUT_SCALARS`): two-sample
  Kolmogorov-Smirnov (:func:`scipy.stats.ks_2samp`);
* categorical facts (:data:`CATEGORICAL_FEATURES`): chi-square test of the 2 x k table of
  counts (:func:`scipy.stats.chi2_contingency`).

A feature drifts when its test crosses its threshold (:class:`Thresholds`); the window
drifts when at least ``min_drifted`` features do and it holds at least ``min_records``
records. Each feature also has a ``score`` for dashboards: PSI, the KS statistic ``D`` or
Cramer's V (0 = same distribution).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from breastscan.bundle import served_probabilities

if TYPE_CHECKING:
    from breastscan.bundle import ModelBundle, ModelContract

log = logging.getLogger(__name__)

REFERENCE_FORMAT = 1
"""Version of the ``reference.json`` layout."""
REFERENCE_LIMIT = 500
"""Most training images a reference summarises."""

HIST_BINS = 16
"""Bins of the intensity histogram over [0, 1]."""
DARK_LEVEL = 0.02
"""Pixels at or below this gray level count as near-black (background, padding)."""
MAX_STAT_PIXELS = 512 * 512
"""Larger images are summarised on a regular subsample of about this many pixels."""
MAX_TEXT = 64
"""Longest header value kept (characters)."""
DICOM_HEAD_BYTES = 256 * 1024
"""Bytes of a DICOM file read for its header (without pixels); a longer header reads as unknown."""

SCALAR_FEATURES: tuple[str, ...] = ("mean", "std", "p05", "p50", "p95", "dark_fraction", "texture",
                                    "height", "width", "aspect")
"""Per-image input statistics tested with Kolmogorov-Smirnov."""
OUTPUT_SCALARS: tuple[str, ...] = ("confidence", "lesion_fraction")
"""Per-answer output statistics tested with Kolmogorov-Smirnov (``None`` where not applicable)."""
CATEGORICAL_FEATURES: tuple[str, ...] = ("modality", "manufacturer", "manufacturer_model", "predicted")
"""Categorical facts tested with chi-square (``predicted`` is the answer's class)."""
HEADER_FIELDS: dict[str, str] = {"Manufacturer": "manufacturer",
                                 "ManufacturerModelName": "manufacturer_model"}
"""The only DICOM header fields read (keyword -> statistic name): no patient field, ever."""
UNKNOWN = "unknown"
"""Category of a missing header field."""


# --------------------------------------------------------------------------- statistics


def _subsample(gray: np.ndarray) -> np.ndarray:
    """``gray`` itself, or every ``s``-th row and column so that about :data:`MAX_STAT_PIXELS` remain."""
    step = math.ceil(math.sqrt(gray.size / MAX_STAT_PIXELS)) if gray.size > MAX_STAT_PIXELS else 1
    return gray[::step, ::step] if step > 1 else gray


def _texture(sample: np.ndarray) -> float:
    """Mean absolute difference of horizontally and vertically neighbouring pixels, in [0, 1]."""
    dx = np.abs(np.diff(sample, axis=1)).mean() if sample.shape[1] > 1 else 0.0
    dy = np.abs(np.diff(sample, axis=0)).mean() if sample.shape[0] > 1 else 0.0
    return float(dx + dy) / 2.0


def header_facts(header: Mapping[str, Any] | Any | None) -> dict[str, str]:
    """The scanner facts of a DICOM header (:data:`HEADER_FIELDS` only), ``unknown`` when absent.

    Args:
        header: a mapping or a ``pydicom.Dataset`` (anything with ``.get(keyword)``), or ``None``.

    Returns:
        ``{"manufacturer": str, "manufacturer_model": str}``, each at most :data:`MAX_TEXT` characters.
    """
    facts = dict.fromkeys(HEADER_FIELDS.values(), UNKNOWN)
    if header is None:
        return facts
    for keyword, name in HEADER_FIELDS.items():
        try:
            value = header.get(keyword)
        except Exception:  # noqa: BLE001 -- a malformed element is an unknown one
            value = None
        text = str(value).strip() if value is not None else ""
        facts[name] = text[:MAX_TEXT] or UNKNOWN
    return facts


def dicom_facts(head: bytes | None) -> tuple[str | None, Any]:
    """``(modality name or code, header)`` of a DICOM file's bytes (or its first bytes, enough
    for the header); ``(None, None)`` for another file or a header that does not parse.

    The header is returned as parsed (pixels not read); :func:`breastscan.monitoring.drift.image_stats`
    reads only its scanner fields from it.
    """
    from breastscan.imaging.dicom import load_dataset
    from breastscan.imaging.preprocessing import is_dicom
    from breastscan.labels import DICOM_MODALITY_CODES

    if not head or not is_dicom(head):
        return None, None
    try:
        header = load_dataset(head, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 -- a header cut short or malformed: unknown facts
        return None, None
    code = str(header.get("Modality", "") or "").strip().upper()
    return (DICOM_MODALITY_CODES.get(code, code.lower()) or None), header


def image_stats(gray: np.ndarray, *, modality: str,
                dicom_header: Mapping[str, Any] | Any | None = None) -> dict[str, Any]:
    """Summarise one image, as training and serving both see it.

    Args:
        gray: ``(H, W)`` float32 gray in [0, 1] (the decoded image, before preprocessing).
        modality: its modality (``mammography``, ``ultrasound``).
        dicom_header: the image's DICOM header (mapping or ``pydicom.Dataset``), or ``None``;
            only :data:`HEADER_FIELDS` are read.

    Returns:
        JSON-able dict: ``mean``, ``std``, ``p05``, ``p50``, ``p95``, ``dark_fraction``
        (share of pixels <= :data:`DARK_LEVEL`) in [0, 1]; ``texture`` (mean absolute
        difference of neighbouring pixels, of the subsample: noise and sharpness); ``hist`` (:data:`HIST_BINS`
        pixel shares summing to 1); ``height``, ``width`` (pixels), ``aspect`` (width /
        height); ``modality``, ``manufacturer``, ``manufacturer_model`` (text).

    Raises:
        ValueError: ``gray`` is not a non-empty 2-D array.
    """
    arr = np.asarray(gray, dtype=np.float32)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"expected a non-empty (H, W) image, got shape {arr.shape}")
    height, width = arr.shape
    sample = np.clip(_subsample(arr), 0.0, 1.0)
    values = sample.ravel()
    counts, _ = np.histogram(values, bins=HIST_BINS, range=(0.0, 1.0))
    p05, p50, p95 = (float(v) for v in np.percentile(values, [5, 50, 95]))
    stats: dict[str, Any] = {
        "mean": float(values.mean()), "std": float(values.std()), "p05": p05, "p50": p50, "p95": p95,
        "dark_fraction": float(np.mean(values <= DARK_LEVEL)), "texture": _texture(sample),
        "hist": [round(float(c) / values.size, 6) for c in counts],
        "height": int(height), "width": int(width), "aspect": float(width) / float(height),
        "modality": modality.strip().lower() or UNKNOWN,
    }
    stats.update(header_facts(dicom_header))
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in stats.items()}


def output_summary(answer: Mapping[str, Any]) -> dict[str, Any]:
    """The drift-relevant part of one answer (:meth:`breastscan.serving.requests.Prediction.to_dict`).

    Returns:
        ``{"predicted": class name | None, "confidence": [0, 1] | None,
        "lesion_fraction": [0, 1] | None}`` (classifiers fill the first two, segmenters the last).
    """
    def number(key: str) -> float | None:
        value = answer.get(key)
        return None if value is None else round(float(value), 6)

    predicted = answer.get("predicted")
    return {"predicted": None if predicted is None else str(predicted), "confidence": number("confidence"),
            "lesion_fraction": number("lesion_fraction")}


# --------------------------------------------------------------------------- the training reference


def _reference_outputs(bundle: ModelBundle, grays: Sequence[np.ndarray],
                       batch_size: int) -> list[dict[str, Any]]:
    """The model's outputs on reference images: classifier logits (the temperature is applied when
    compared, see :func:`reference_records`), or the lesion fraction at the original size."""
    import cv2

    contract = bundle.contract
    out: list[dict[str, Any]] = []
    kinds = [k for k in ("classification", "segmentation") if contract.task in (k, "multitask")]
    for start in range(0, len(grays), batch_size):
        batch, boxes = bundle.prepare(list(grays[start:start + batch_size]))
        records: list[dict[str, Any]] = [{} for _ in boxes]
        for kind in kinds:  # a multi-task model: both kinds of record
            view = bundle.view(kind) if contract.task == "multitask" else bundle
            logits = view.logits(batch)
            if kind == "classification":
                for record, row in zip(records, logits, strict=True):
                    record["logits"] = [round(float(v), 5) for v in row]
                continue
            masks = (view.probabilities(logits)[..., 0] >= float(contract.threshold)).astype(np.uint8)
            for record, box, small in zip(records, boxes, masks, strict=True):
                mask = box.unletterbox(small, cv2.INTER_NEAREST_EXACT)
                record["lesion_fraction"] = round(float(mask.sum()) / float(mask.size), 6)
        out.extend(records)
    return out


def model_reference(bundle: ModelBundle | None, grays: Sequence[np.ndarray], *, modality: str,
                    headers: Sequence[Mapping[str, Any] | Any | None] | None = None,
                    batch_size: int = 32) -> dict[str, Any]:
    """The training-set reference of a model, saved as ``reference.json`` in its bundle.

    Args:
        bundle: the trained model (its outputs on the images are added), or ``None`` for
            input statistics only.
        grays: up to :data:`REFERENCE_LIMIT` decoded training images, each ``(H, W)``
            float32 in [0, 1].
        modality: their modality.
        headers: the DICOM header of each image (``None`` for other files), or ``None``.
        batch_size: images per model call.

    Returns:
        ``{"format", "model", "task", "modality", "n_images", "hist_bins", "records"}``;
        each record is :func:`image_stats` plus ``logits`` (classifiers) or ``lesion_fraction``.
    """
    headers = list(headers) if headers is not None else [None] * len(grays)
    records = [image_stats(g, modality=modality, dicom_header=h) for g, h in zip(grays, headers, strict=True)]
    if bundle is not None:
        for record, output in zip(records, _reference_outputs(bundle, grays, batch_size), strict=True):
            record.update(output)
    contract = bundle.contract if bundle is not None else None
    return {"format": REFERENCE_FORMAT, "model": contract.name if contract else None,
            "task": contract.task if contract else None, "modality": modality, "n_images": len(records),
            "hist_bins": HIST_BINS, "records": records}


def reference_records(reference: Mapping[str, Any],
                      contract: ModelContract | None = None) -> list[dict[str, Any]]:
    """The reference's records as comparable with served ones (:func:`output_summary` keys filled).

    Args:
        reference: a loaded ``reference.json``.
        contract: the served model's contract: classifier logits become the served
            ``predicted`` / ``confidence`` with its calibration temperature and decision
            rule; ``None`` drops them.

    Raises:
        ValueError: an unknown reference format.
    """
    if reference.get("format") != REFERENCE_FORMAT:
        raise ValueError(f"unknown reference format {reference.get('format')!r} "
                         f"(expected {REFERENCE_FORMAT})")
    records = [dict(r) for r in reference.get("records") or []]
    logits = [r.pop("logits", None) for r in records]
    if contract is not None and contract.task in ("classification", "multitask") and records and all(
            x is not None for x in logits):
        contract = contract.view("classification")
        probs = served_probabilities(contract, np.asarray(logits, np.float64))
        called = contract.rule.decide(probs, contract.class_names)  # as the service calls them
        for record, row, k in zip(records, probs, called, strict=True):
            record.update(predicted=contract.class_names[k], confidence=round(float(row[k]), 6))
    return records


# --------------------------------------------------------------------------- tests


@dataclass(frozen=True)
class Thresholds:
    """When a feature, and a window, drift.

    Attributes:
        psi: the histogram drifts at a PSI at or above this (0.1 moderate, 0.2 significant).
        ks_alpha: a scalar drifts when its KS p-value is below this.
        chi2_alpha: a categorical fact drifts when its chi-square p-value is below this.
        min_drifted: the window drifts when at least this many features do.
        min_records: fewer records in the window: nothing is flagged (too little data).
    """

    psi: float = 0.2
    ks_alpha: float = 0.01
    chi2_alpha: float = 0.01
    min_drifted: int = 2
    min_records: int = 30

    def __post_init__(self) -> None:
        if self.psi <= 0 or not 0 < self.ks_alpha < 1 or not 0 < self.chi2_alpha < 1:
            raise ValueError("psi must be > 0 and the alphas in (0, 1)")
        if self.min_drifted < 1 or self.min_records < 1:
            raise ValueError("min_drifted and min_records must be at least 1")


@dataclass(frozen=True)
class FeatureDrift:
    """One feature's test.

    Attributes:
        feature: the statistic (``histogram``, ``mean``, ``manufacturer`` ...).
        test: ``psi``, ``ks`` or ``chi2``.
        statistic: the test statistic (PSI, KS ``D``, chi-square).
        p_value: its p-value (``None`` for PSI).
        score: dashboard value, 0 = no change: PSI, KS ``D`` or Cramer's V.
        threshold: the PSI or alpha the feature was judged with.
        drift: the feature drifted.
        n_reference: reference values tested.
        n_window: window values tested.
    """

    feature: str
    test: str
    statistic: float
    p_value: float | None
    score: float
    threshold: float
    drift: bool
    n_reference: int
    n_window: int


@dataclass(frozen=True)
class DriftReport:
    """A window compared with a reference.

    Attributes:
        model: the model's name.
        n_reference: reference records.
        n_window: window records.
        features: one test per feature present in both.
        enough_data: the window holds at least ``thresholds.min_records`` records.
        drift: enough data and at least ``thresholds.min_drifted`` features drifted.
        thresholds: what it was judged with.
    """

    model: str
    n_reference: int
    n_window: int
    features: tuple[FeatureDrift, ...]
    enough_data: bool
    drift: bool
    thresholds: Thresholds

    @property
    def drifted(self) -> list[str]:
        """Names of the features that drifted."""
        return [f.feature for f in self.features if f.drift]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able report (``drift.json``)."""
        return {"model": self.model, "drift": self.drift, "enough_data": self.enough_data,
                "n_reference": self.n_reference, "n_window": self.n_window, "drifted": self.drifted,
                "thresholds": asdict(self.thresholds),
                "features": {f.feature: {k: v for k, v in asdict(f).items() if k != "feature"}
                             for f in self.features}}

    def summary(self) -> str:
        """One line: verdict, drifted features, sample sizes."""
        if not self.enough_data:
            verdict = f"not judged ({self.n_window} records < {self.thresholds.min_records})"
        else:
            verdict = "DRIFT" if self.drift else "no drift"
        drifted = ", ".join(self.drifted) or "none"
        return (f"{self.model}: {verdict}; {len(self.drifted)} of {len(self.features)} features drifted "
                f"({drifted}); window {self.n_window} vs reference {self.n_reference}")


def psi(expected: np.ndarray, actual: np.ndarray, eps: float = 1e-4) -> float:
    """Population stability index ``sum((a - e) * ln(a / e))`` of two histograms.

    Args:
        expected: ``(k,)`` reference bin shares (or counts).
        actual: ``(k,)`` window bin shares (or counts).
        eps: floor of a bin share, so empty bins stay finite.

    Returns:
        PSI >= 0 (0 = identical).
    """
    e = np.clip(np.asarray(expected, np.float64) / max(float(np.sum(expected)), 1e-12), eps, None)
    a = np.clip(np.asarray(actual, np.float64) / max(float(np.sum(actual)), 1e-12), eps, None)
    e, a = e / e.sum(), a / a.sum()
    return float(np.sum((a - e) * np.log(a / e)))


def _values(records: Sequence[Mapping[str, Any]], key: str) -> list[Any]:
    return [r[key] for r in records if r.get(key) is not None]


def _histogram_test(ref: Sequence[Mapping[str, Any]], win: Sequence[Mapping[str, Any]],
                    th: Thresholds) -> FeatureDrift | None:
    ref_h, win_h = _values(ref, "hist"), _values(win, "hist")
    if not ref_h or not win_h:
        return None
    value = psi(np.mean(np.asarray(ref_h, np.float64), axis=0),
                np.mean(np.asarray(win_h, np.float64), axis=0))
    return FeatureDrift("histogram", "psi", value, None, value, th.psi, value >= th.psi,
                        len(ref_h), len(win_h))


def _ks_test(feature: str, ref: Sequence[Mapping[str, Any]], win: Sequence[Mapping[str, Any]],
             th: Thresholds) -> FeatureDrift | None:
    from scipy.stats import ks_2samp

    a, b = np.asarray(_values(ref, feature), np.float64), np.asarray(_values(win, feature), np.float64)
    if not a.size or not b.size:
        return None
    result = ks_2samp(a, b)
    stat, p = float(result.statistic), float(result.pvalue)
    return FeatureDrift(feature, "ks", stat, p, stat, th.ks_alpha, p < th.ks_alpha, int(a.size), int(b.size))


def _chi2_test(feature: str, ref: Sequence[Mapping[str, Any]], win: Sequence[Mapping[str, Any]],
               th: Thresholds) -> FeatureDrift | None:
    from scipy.stats import chi2_contingency

    a, b = [str(v) for v in _values(ref, feature)], [str(v) for v in _values(win, feature)]
    if not a or not b:
        return None
    categories = sorted(set(a) | set(b))
    if len(categories) < 2:
        return FeatureDrift(feature, "chi2", 0.0, 1.0, 0.0, th.chi2_alpha, False, len(a), len(b))
    table = np.array([[a.count(c) for c in categories], [b.count(c) for c in categories]])
    result = chi2_contingency(table, correction=False)
    stat, p = float(result.statistic), float(result.pvalue)
    cramers_v = math.sqrt(stat / float(table.sum()))  # a 2 x k table: min(r, c) - 1 = 1
    return FeatureDrift(feature, "chi2", stat, p, cramers_v, th.chi2_alpha, p < th.chi2_alpha, len(a), len(b))


def compare(reference: Sequence[Mapping[str, Any]], window: Sequence[Mapping[str, Any]],
            thresholds: Thresholds | None = None, *, model: str = "") -> DriftReport:
    """Test a window of records against the reference records, feature by feature.

    Args:
        reference: reference records (:func:`reference_records`).
        window: recorded requests (:func:`image_stats` plus :func:`output_summary`).
        thresholds: when features and the window drift (default :class:`Thresholds`).
        model: the model's name, for the report.

    Returns:
        The :class:`DriftReport`; features missing on either side are left out.
    """
    th = thresholds or Thresholds()
    tests = [_histogram_test(reference, window, th)]
    tests += [_ks_test(f, reference, window, th) for f in (*SCALAR_FEATURES, *OUTPUT_SCALARS)]
    tests += [_chi2_test(f, reference, window, th) for f in CATEGORICAL_FEATURES]
    features = tuple(t for t in tests if t is not None)
    enough = len(window) >= th.min_records
    drift = enough and sum(f.drift for f in features) >= th.min_drifted
    return DriftReport(model=model, n_reference=len(reference), n_window=len(window), features=features,
                       enough_data=enough, drift=drift, thresholds=th)
