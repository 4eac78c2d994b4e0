"""Plot data of an evaluation: the rows of the ``dvc plots`` CSV files (and of the PNGs).

Classifiers: one-vs-rest ROC and precision-recall curves (scikit-learn), the confusion
rows, the reliability diagram before and after calibration. Segmenters: per-image Dice
and IoU, and the Dice histogram.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from breastscan.evaluation import calibration

log = logging.getLogger(__name__)

Rows = list[dict[str, Any]]

PLOT_COLUMNS: dict[str, tuple[str, ...]] = {
    "roc": ("class", "fpr", "tpr"),
    "pr": ("class", "recall", "precision"),
    "confusion": ("actual", "predicted"),
    "calibration": ("stage", "bin", "bin_lower", "bin_upper", "confidence", "accuracy", "count"),
    "dice": ("image", "dice", "iou", "lesion"),
    "dice_hist": ("bin_lower", "bin_upper", "count"),
}
"""Columns of each plot CSV (written even when a plot has no rows)."""


def _roc_pr(y: np.ndarray, probs: np.ndarray, names: Sequence[str]) -> tuple[Rows, Rows]:
    from sklearn.metrics import precision_recall_curve, roc_curve

    roc: Rows = []
    pr: Rows = []
    for c, name in enumerate(names):
        positive = (y == c).astype(int)
        if not 0 < positive.sum() < len(y):
            log.info("no ROC/PR curve for class %s: the rows do not hold both outcomes", name)
            continue
        fpr, tpr, _ = roc_curve(positive, probs[:, c])
        roc += [{"class": name, "fpr": float(a), "tpr": float(b)} for a, b in zip(fpr, tpr, strict=True)]
        precision, recall, _ = precision_recall_curve(positive, probs[:, c])
        pr += [{"class": name, "recall": float(r), "precision": float(p)}
               for r, p in zip(recall, precision, strict=True)]
    return roc, pr


def _calibration(probs: np.ndarray, y: np.ndarray, stage: str, n_bins: int) -> Rows:
    data = calibration.calibration_curve_data(probs, y, n_bins=n_bins)
    return [
        {"stage": stage, "bin": i, "bin_lower": data["bin_lower"][i], "bin_upper": data["bin_upper"][i],
         "confidence": data["confidence"][i], "accuracy": data["accuracy"][i], "count": data["count"][i]}
        for i in range(data["n_bins"]) if data["count"][i] > 0
    ]


def classifier_rows(y: np.ndarray, before: np.ndarray, probs: np.ndarray, names: Sequence[str],
                    n_bins: int, *, pred: np.ndarray | None = None) -> dict[str, Rows]:
    """``roc``, ``pr``, ``confusion`` and ``calibration`` rows of a classifier.

    Args:
        y: ``(n,)`` true class indices.
        before: ``(n, k)`` probabilities before temperature scaling.
        probs: ``(n, k)`` calibrated probabilities (curves and confusion use these).
        names: ``k`` class names.
        n_bins: reliability-diagram bins.
        pred: ``(n,)`` called class indices (the model's decision rule); ``None``: the arg-max.
    """
    roc, pr = _roc_pr(y, probs, names)
    pred = probs.argmax(axis=1) if pred is None else np.asarray(pred)
    return {
        "roc": roc,
        "pr": pr,
        "confusion": [{"actual": names[t], "predicted": names[p]} for t, p in zip(y, pred, strict=True)],
        "calibration": _calibration(before, y, "before", n_bins) + _calibration(probs, y, "after", n_bins),
    }


def segmenter_rows(pred: pd.DataFrame, n_bins: int) -> dict[str, Rows]:
    """``dice`` (per image) and ``dice_hist`` rows of a segmenter's prediction rows."""
    dice = pred["dice"].to_numpy(np.float64)
    counts, edges = np.histogram(dice, bins=n_bins, range=(0.0, 1.0))
    return {
        "dice": [{"image": im, "dice": float(d), "iou": float(v), "lesion": int(le)}
                 for im, d, v, le in zip(pred["image"], dice, pred["iou"], pred["lesion"], strict=True)],
        "dice_hist": [
            {"bin_lower": float(edges[i]), "bin_upper": float(edges[i + 1]), "count": int(counts[i])}
            for i in range(len(counts))],
    }
