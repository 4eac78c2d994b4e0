"""Calibration: top-label ECE, reliability-diagram data, temperature scaling.

A classifier's temperature ``T`` is fitted on its validation split
(:func:`fit_temperature`, minimising the NLL of ``softmax(logits / T)``); the bundle
applies it (:func:`breastscan.bundle.apply_temperature`), so the served
probabilities are the calibrated ones.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_PROB_SUM_TOL = 1e-3


def _check_labels_probs(y_true: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(y (n,) int, p (n, k) float64)``; a 1-D ``probs`` is P(class 1) of a binary task."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        p = np.stack([1.0 - p, p], axis=1)
    if y.ndim != 1 or p.ndim != 2 or len(y) != len(p):
        raise ValueError(f"need y_true (n,) and probs (n, k); got {y.shape} and {np.shape(probs)}")
    if len(y) == 0:
        raise ValueError("no samples")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError("y_true must hold integer class indices")
        y = y.astype(np.int64)
    k = p.shape[1]
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"y_true holds class indices outside [0, {k - 1}]")
    if not np.isfinite(p).all() or p.min() < 0.0 or p.max() > 1.0:
        raise ValueError("probs must be finite probabilities in [0, 1] (did you pass logits?)")
    sums = p.sum(axis=1)
    if np.abs(sums - 1.0).max() > _PROB_SUM_TOL:
        raise ValueError("each row of probs must sum to 1 (apply softmax to logits first)")
    return y, p / sums[:, None]  # remove float32 round-off


def _top_label_bins(probs: np.ndarray, y_true: np.ndarray, n_bins: int) -> tuple[np.ndarray, ...]:
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    y, p = _check_labels_probs(y_true, probs)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    # Bins are (lower, upper]; a confidence of exactly 0 goes to the first bin.
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins).astype(np.float64)
    conf_sum = np.bincount(bins, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(bins, weights=correct, minlength=n_bins)
    return count, conf_sum, acc_sum


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> float:
    """Top-label expected calibration error with equal-width confidence bins.

    ``ECE = sum_b (n_b / n) * |accuracy_b - mean confidence_b|`` where the confidence is
    the largest probability and accuracy whether the arg-max is the true class.

    Args:
        probs: ``(n, k)`` probabilities (or ``(n,)`` P(class 1) of a binary task).
        y_true: ``(n,)`` int class indices.
        n_bins: number of bins over [0, 1].

    Returns:
        ECE in [0, 1].
    """
    count, conf_sum, acc_sum = _top_label_bins(probs, y_true, n_bins)
    return float(np.abs(acc_sum - conf_sum).sum() / count.sum())


def calibration_curve_data(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> dict[str, Any]:
    """Per-bin data of a top-label reliability diagram.

    Args:
        probs: ``(n, k)`` probabilities (or ``(n,)`` P(class 1) of a binary task).
        y_true: ``(n,)`` int class indices.
        n_bins: number of equal-width bins over [0, 1].

    Returns:
        A JSON-able dict of lists, one entry per bin: ``bin_lower``, ``bin_upper``,
        ``confidence`` (mean top probability), ``accuracy`` (fraction correct) — both
        ``None`` for an empty bin — and ``count``; plus ``ece`` and ``n_bins``.
    """
    count, conf_sum, acc_sum = _top_label_bins(probs, y_true, n_bins)
    edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
    return {
        "n_bins": int(n_bins),
        "bin_lower": edges[:-1].tolist(),
        "bin_upper": edges[1:].tolist(),
        "confidence": [float(s / c) if c else None for s, c in zip(conf_sum, count, strict=True)],
        "accuracy": [float(s / c) if c else None for s, c in zip(acc_sum, count, strict=True)],
        "count": count.astype(int).tolist(),
        "ece": float(np.abs(acc_sum - conf_sum).sum() / count.sum()),
    }


def _nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    from scipy.special import log_softmax

    logp = log_softmax(logits / temperature, axis=1)
    return float(-logp[np.arange(len(y)), y].mean())


def fit_temperature(
    logits: np.ndarray,
    y_true: np.ndarray,
    *,
    bounds: tuple[float, float] = (0.05, 20.0),
) -> float:
    """Fit the temperature ``T`` of temperature scaling by minimising the mean NLL.

    ``softmax(logits / T)`` with ``T > 1`` softens over-confident predictions; the search
    is a bounded scalar minimisation over ``log T``.

    Args:
        logits: ``(n, k)`` validation logits (the model's output, before softmax).
        y_true: ``(n,)`` int class indices.
        bounds: search interval for ``T``.

    Returns:
        The fitted temperature (> 0).
    """
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y_true).astype(np.int64)
    if z.ndim != 2 or y.shape != (len(z),) or len(z) == 0:
        raise ValueError(f"need logits (n, k) and y_true (n,); got {z.shape} and {y.shape}")
    if not np.isfinite(z).all():
        raise ValueError("logits must be finite")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(f"y_true holds class indices outside [0, {z.shape[1] - 1}]")
    lo, hi = bounds
    if not 0 < lo < hi:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}")
    result = minimize_scalar(
        lambda log_t: _nll(z, y, math.exp(log_t)),
        bounds=(math.log(lo), math.log(hi)),
        method="bounded",
        options={"xatol": 1e-5},
    )
    temperature = float(math.exp(result.x))
    logger.debug("temperature %.4f: NLL %.4f -> %.4f", temperature, _nll(z, y, 1.0), result.fun)
    return temperature
