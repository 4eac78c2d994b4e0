"""Phantom sets and model outputs for the behavioural tests (no pytest, no thresholds here).

Every image comes from the project's own generator (:mod:`breastscan.data.phantoms`) with
``numpy.random.default_rng([PHANTOM_SEED, kind, i])``: fresh draws, never the training data
(the demo datasets draw image ``i`` from ``default_rng([seed, i])`` with a small ``seed``).
Two phantoms drawn from the same state share everything the generator draws first: the
left and right mammogram of one draw are exact mirror images (``laterality``), and a benign
and a malignant mass drawn from one state lie in the same breast, at the same place, with
the same size, and differ in shape, margin and spicules only.

Images go through the model's own preprocessing (:meth:`ModelBundle.prepare`, as serving
does) and predicted masks are thresholded at model resolution and mapped back to the
source image (nearest-neighbour), as :func:`breastscan.serving.requests.finish_predictions`
serves them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from breastscan.bundle import ModelBundle, ModelContract
from breastscan.data.phantoms import mammography_phantom, ultrasound_phantom
from breastscan.evaluation.metrics import MaskOutcomes
from breastscan.imaging.preprocessing import to_float_gray
from breastscan.labels import MODALITIES

PHANTOM_SEED = 20_260_915
"""Root seed of every phantom drawn here (far from the demo datasets' seeds 0 and 1)."""

PHANTOM_MODALITIES = MODALITIES
"""Modalities the phantom generator draws (a model of another modality cannot be tested)."""


@dataclass(frozen=True)
class Phantom:
    """One drawn phantom: ``(H, W)`` float32 image in [0, 1], ``(H, W)`` bool lesion mask,
    and what it was drawn as."""

    image: np.ndarray
    mask: np.ndarray
    pathology: str
    density: int | None


def draw(modality: str, kind: int, i: int, *, pathology: str, density: int = 2,
         laterality: str = "L") -> Phantom:
    """Phantom ``i`` of set ``kind`` (sets never share a random state).

    Args:
        modality: ``mammography`` or ``ultrasound`` (the model's contract's).
        kind: a small integer naming the set (one per test).
        i: index within the set.
        pathology: ``benign``, ``malignant`` or ``normal``.
        density: BI-RADS level 1-4 (mammography only).
        laterality: ``L`` or ``R`` (mammography only).
    """
    rng = np.random.default_rng([PHANTOM_SEED, kind, i])
    if modality == "mammography":
        image, mask = mammography_phantom(rng, density=density, pathology=pathology, laterality=laterality)
        return Phantom(to_float_gray(image), mask, pathology, density)
    if modality == "ultrasound":
        image, mask = ultrasound_phantom(rng, pathology=pathology)
        return Phantom(to_float_gray(image), mask, pathology, None)
    raise ValueError(f"no phantom generator for modality {modality!r} (have {PHANTOM_MODALITIES})")


def class_index(contract: ModelContract, value: str) -> int:
    """Index of the class whose manifest value is ``value`` (``malignant``, ``3``)."""
    classes = [str(c) for c in contract.classes]
    if value not in classes:
        raise ValueError(f"model {contract.name} has no class {value!r} (classes: {classes})")
    return classes.index(value)


def class_probabilities(bundle: ModelBundle, images: Sequence[np.ndarray]) -> np.ndarray:
    """``(n, k)`` served (calibrated) class probabilities of ``(H, W)`` images."""
    batch, _ = bundle.prepare(list(images))
    return np.asarray(bundle.predict(batch), np.float64)


def predicted_masks(bundle: ModelBundle, images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The served lesion mask of each image: ``(H, W)`` bool at the image's own size."""
    batch, boxes = bundle.prepare(list(images))
    probs = np.asarray(bundle.predict(batch), np.float32)[..., 0]
    small = (probs >= float(bundle.contract.threshold)).astype(np.uint8)
    return [box.unletterbox(m, cv2.INTER_NEAREST_EXACT).astype(bool)
            for box, m in zip(boxes, small, strict=True)]


def dice(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> np.ndarray:
    """``(n,)`` Dice of each pair of same-size masks (1.0 when both are empty), as the
    project scores masks (:meth:`breastscan.evaluation.metrics.MaskOutcomes.from_masks`)."""
    truth = np.stack([np.asarray(m, np.float32) for m in a])
    pred = np.stack([np.asarray(m, np.float32) for m in b])
    return MaskOutcomes.from_masks(truth, pred, threshold=0.5).dice


def total_variation(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``(n,)`` total-variation distance ``0.5 * sum |p - q|`` between rows of two
    ``(n, k)`` probability arrays: 0 = identical answers, 1 = disjoint."""
    return 0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum(axis=1)
