"""Synthetic breast-imaging phantoms with ground truth: the project's own demo data.

Two generators draw one image and its lesion mask from a seeded random generator:

* :func:`mammography_phantom` - a breast outline against the chest wall, fibroglandular
  texture whose dense fraction follows the BI-RADS density category (A-D), and an optional
  mass: benign = round/oval and circumscribed, malignant = irregular and spiculated.
* :func:`ultrasound_phantom` - skin, fat, glandular and muscle layers under multiplicative
  speckle with depth attenuation, and an optional hypoechoic lesion: benign = oval, wider
  than tall, smooth margin; malignant = irregular, taller than wide, posterior shadowing.

Size, contrast, noise, position and tissue vary from image to image, and the class ranges
overlap (a small mass in dense tissue is hard to see, a benign lesion may be lobulated),
so the classes are learnable but not trivially separable.

:func:`generate_dataset` writes a dataset in the manifest contract (``images/``,
``masks/`` - one mask per image, empty for ``normal`` - and ``manifest.csv``), and plants
the defects real datasets have: near-duplicates filed under a new group, some of them
with a conflicting label. The extra columns ``phantom_id`` and ``planted`` record the
ground truth of those defects so that tests can check the splitter finds them.
Every image is drawn from ``numpy.random.default_rng([seed, index])``: the output is
deterministic by seed and does not depend on the order images are drawn in.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from breastscan.data.manifest import write_manifest
from breastscan.imaging.files import write_mask, write_png
from breastscan.labels import DENSITY_LEVELS, PATHOLOGIES

log = logging.getLogger(__name__)

DENSE_FRACTION: dict[int, tuple[float, float]] = {
    1: (0.03, 0.24),
    2: (0.20, 0.46),
    3: (0.42, 0.70),
    4: (0.64, 0.90),
}
"""Range of the dense (fibroglandular) share of the breast per density level 1-4 (A-D).

Neighbouring ranges overlap a little, as readers' BI-RADS assessments do.
"""

MAMMOGRAPHY_PROPORTIONS: dict[str, dict[object, float]] = {
    "pathology": {"normal": 0.40, "benign": 0.35, "malignant": 0.25},
    "density": {1: 0.15, 2: 0.35, 3: 0.35, 4: 0.15},
}
"""Default class shares of the mammography phantoms (density close to screening populations)."""

ULTRASOUND_PROPORTIONS: dict[str, dict[object, float]] = {
    "pathology": {"benign": 0.50, "malignant": 0.30, "normal": 0.20},
}
"""Default class shares of the ultrasound phantoms (close to BUSI's 437/210/133)."""


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-blurred white noise scaled to zero mean, unit standard deviation."""
    field = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), sigma)
    return (field - field.mean()) / (field.std() + 1e-6)


def _blob(
    rng: np.random.Generator,
    shape: tuple[int, int],
    centre: tuple[float, float],
    radii: tuple[float, float],
    angle: float,
    irregularity: float,
) -> np.ndarray:
    """A filled closed contour: an ellipse whose radius is modulated by random harmonics.

    Args:
        shape: ``(H, W)`` of the output.
        centre: ``(y, x)`` in pixels.
        radii: ``(ry, rx)`` semi-axes in pixels.
        angle: rotation in radians.
        irregularity: 0 = smooth ellipse; ~0.3 = lobulated / irregular margin.

    Returns:
        ``(H, W)`` bool mask.
    """
    t = np.linspace(0.0, 2.0 * np.pi, 180, endpoint=False)
    r = np.ones_like(t)
    if irregularity > 0:
        for k in range(2, 9):
            amp = irregularity * rng.uniform(0.3, 1.0) / (k ** 0.7)
            r += amp * np.cos(k * t + rng.uniform(0, 2 * np.pi))
        r = np.clip(r, 0.35, None)
    ry, rx = radii
    y = r * ry * np.sin(t)
    x = r * rx * np.cos(t)
    ca, sa = np.cos(angle), np.sin(angle)
    px = centre[1] + x * ca - y * sa
    py = centre[0] + x * sa + y * ca
    pts = np.stack([px, py], axis=1).round().astype(np.int32)
    out = np.zeros(shape, np.uint8)
    cv2.fillPoly(out, [pts], 1)
    return out.astype(bool)


def _check_mammography_args(density: int, pathology: str, laterality: str) -> None:
    """Refuse an unknown density, pathology or laterality."""
    if density not in DENSITY_LEVELS:
        raise ValueError(f"density must be one of {DENSITY_LEVELS}, got {density!r}")
    if pathology not in PATHOLOGIES:
        raise ValueError(f"pathology must be one of {PATHOLOGIES}, got {pathology!r}")
    if laterality not in ("L", "R"):
        raise ValueError(f"laterality must be L or R, got {laterality!r}")


def _breast_outline(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw the breast against the chest wall (left edge) and the pectoral muscle.

    Args:
        rng: the random generator (draws in a fixed order).
        yy: ``(H, W)`` float32 row coordinates.
        xx: ``(H, W)`` float32 column coordinates.

    Returns:
        ``(breast, radial, thickness, pectoral)``: ``(H, W)`` bool breast, ``(H, W)``
        normalised distance from the chest-wall centre (<= 1 inside the breast),
        ``(H, W)`` tissue thickness in [0, 1], ``(H, W)`` bool pectoral triangle.
    """
    h, w = yy.shape
    # Breast outline: a half-ellipse on the chest wall, its border wobbling a little.
    cy = h * rng.uniform(0.42, 0.58)
    ry = h * rng.uniform(0.36, 0.48)
    rx = w * rng.uniform(0.62, 0.90)
    wobble = 1.0 + 0.04 * _smooth_noise(rng, (h, w), sigma=max(h, w) / 6)
    radial = np.sqrt(((yy - cy) / ry) ** 2 + (xx / rx) ** 2) / wobble
    breast = radial <= 1.0
    # Skin-line fall-off: thinner tissue near the border is darker.
    thickness = np.clip((1.0 - radial) * rng.uniform(3.0, 6.0), 0.0, 1.0) ** 0.5
    # Pectoral muscle: a bright triangle in the upper chest-wall corner.
    pec_h = h * rng.uniform(0.25, 0.55)
    pec_w = w * rng.uniform(0.12, 0.30)
    pectoral = (xx / pec_w + yy / pec_h) <= 1.0
    return breast, radial, thickness, pectoral


def _add_fibroglandular(
    rng: np.random.Generator, image: np.ndarray, breast: np.ndarray, radial: np.ndarray, density: int
) -> None:
    """Add dense tissue to ``image`` in place: a multi-scale field, denser toward the chest
    wall, thresholded so that its share of the breast is drawn from :data:`DENSE_FRACTION`
    of ``density``, plus fine structure.

    Args:
        rng: the random generator (draws in a fixed order).
        image: ``(H, W)`` float32, modified in place.
        breast: ``(H, W)`` bool breast region.
        radial: ``(H, W)`` normalised distance from the chest-wall centre.
        density: BI-RADS density level 1-4.
    """
    h, w = image.shape
    field = (
        _smooth_noise(rng, (h, w), sigma=max(h, w) / rng.uniform(10, 18))
        + 0.6 * _smooth_noise(rng, (h, w), sigma=max(h, w) / rng.uniform(30, 45))
        + rng.uniform(0.8, 1.6) * (1.0 - radial)
    )
    lo, hi = DENSE_FRACTION[density]
    fraction = rng.uniform(lo, hi)
    cut = np.quantile(field[breast], 1.0 - fraction) if breast.any() else 0.0
    dense = cv2.GaussianBlur((field > cut).astype(np.float32), (0, 0), rng.uniform(1.0, 2.0))
    gland = rng.uniform(0.24, 0.38)
    image += breast * dense * gland
    # Fine structure inside the tissue (ducts, Cooper's ligaments).
    image += breast * 0.05 * _smooth_noise(rng, (h, w), sigma=1.2) * (0.4 + dense)


def _spicules(
    rng: np.random.Generator, shape: tuple[int, int], y0: float, x0: float, size: float
) -> np.ndarray:
    """``(H, W)`` float32 in [0, 1]: 6-13 thin anti-aliased lines radiating from a mass of
    radius ~``size`` centred at row ``y0``, column ``x0``."""
    spicules = np.zeros(shape, np.float32)
    for _ in range(int(rng.integers(6, 14))):
        a = rng.uniform(0, 2 * np.pi)
        length = size * rng.uniform(1.4, 2.6)
        p0 = (int(x0 + 0.6 * size * np.cos(a)), int(y0 + 0.6 * size * np.sin(a)))
        p1 = (int(x0 + length * np.cos(a)), int(y0 + length * np.sin(a)))
        cv2.line(spicules, p0, p1, 1.0, 1, lineType=cv2.LINE_AA)
    return spicules


def _add_mass(
    rng: np.random.Generator,
    image: np.ndarray,
    breast: np.ndarray,
    radial: np.ndarray,
    pectoral: np.ndarray,
    pathology: str,
) -> np.ndarray:
    """Add a mass to ``image`` in place: benign = round/oval, mostly circumscribed;
    malignant = irregular, with spicules.

    Args:
        rng: the random generator (draws in a fixed order).
        image: ``(H, W)`` float32, modified in place.
        breast: ``(H, W)`` bool breast region.
        radial: ``(H, W)`` normalised distance from the chest-wall centre.
        pectoral: ``(H, W)`` bool pectoral muscle (no mass is centred there).
        pathology: ``benign`` or ``malignant``.

    Returns:
        ``(H, W)`` bool mask of the mass (inside the breast).
    """
    h, w = image.shape
    inside = np.argwhere(breast & (radial < 0.72) & ~pectoral)
    y0, x0 = inside[rng.integers(len(inside))] if len(inside) else (h // 2, w // 4)
    size = min(h, w) * rng.uniform(0.055, 0.13)
    if pathology == "benign":
        aspect = rng.uniform(1.0, 1.6)
        radii = (size, size * aspect)
        irregular = rng.choice([0.0, 0.0, 0.08])  # mostly smooth, sometimes lobulated
    else:
        aspect = rng.uniform(0.8, 1.3)
        radii = (size, size * aspect)
        irregular = rng.uniform(0.22, 0.40)
    mask = _blob(rng, (h, w), (float(y0), float(x0)), radii, rng.uniform(0, np.pi), irregular) & breast
    body = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 1.2 if pathology == "benign" else 0.7)
    contrast = rng.uniform(0.14, 0.32)
    image += body * contrast
    if pathology == "malignant":
        # Spicules: thin bright lines radiating from the margin.
        spicules = _spicules(rng, (h, w), y0, x0, size)
        image += breast * spicules * contrast * rng.uniform(0.5, 0.9)
    return mask


def _expose_mammogram(
    rng: np.random.Generator,
    image: np.ndarray,
    breast: np.ndarray,
    pectoral: np.ndarray,
    thickness: np.ndarray,
) -> np.ndarray:
    """Finish the projection: brighten the pectoral muscle, darken thin tissue, add noise,
    vary gain and gamma.

    Args:
        rng: the random generator (draws in a fixed order).
        image: ``(H, W)`` float32 tissue image (left unchanged).
        breast: ``(H, W)`` bool breast region.
        pectoral: ``(H, W)`` bool pectoral muscle.
        thickness: ``(H, W)`` tissue thickness in [0, 1].

    Returns:
        ``(H, W)`` uint8 image.
    """
    h, w = image.shape
    image = np.where(pectoral & breast, image + rng.uniform(0.25, 0.4), image)
    image *= np.where(breast, 0.35 + 0.65 * thickness, 1.0)
    image += rng.normal(0.0, rng.uniform(0.008, 0.03), (h, w)).astype(np.float32)
    image = np.clip(image * rng.uniform(0.85, 1.15), 0.0, 1.0) ** rng.uniform(0.85, 1.15)
    return (image * 255.0).round().astype(np.uint8)


def mammography_phantom(
    rng: np.random.Generator,
    *,
    density: int,
    pathology: str,
    height: int = 160,
    width: int = 128,
    laterality: str = "L",
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one synthetic mammogram (MLO-like projection) and its lesion mask.

    Args:
        rng: the random generator; the same state draws the same image.
        density: BI-RADS density level 1-4 (A-D).
        pathology: ``benign``, ``malignant`` or ``normal`` (no mass).
        height: output rows (pixels, >= 32).
        width: output columns (pixels, >= 32).
        laterality: ``L`` (chest wall on the left of the image) or ``R`` (mirrored).

    Returns:
        ``(image, mask)``: ``(height, width)`` uint8 image, ``(height, width)`` bool mask
        (all ``False`` for ``normal``).

    Raises:
        ValueError: on an unknown density, pathology or laterality.
    """
    _check_mammography_args(density, pathology, laterality)
    h, w = height, width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    breast, radial, thickness, pectoral = _breast_outline(rng, yy, xx)

    fat = rng.uniform(0.22, 0.34)
    image = np.where(breast, fat, 0.0).astype(np.float32)
    _add_fibroglandular(rng, image, breast, radial, density)

    mask = np.zeros((h, w), bool)
    if pathology != "normal":
        mask = _add_mass(rng, image, breast, radial, pectoral, pathology)

    out = _expose_mammogram(rng, image, breast, pectoral, thickness)
    if laterality == "R":
        out, mask = out[:, ::-1].copy(), mask[:, ::-1].copy()
    return out, mask


def _layer_boundary(rng: np.random.Generator, h: int, w: int, depth: float, amp: float) -> np.ndarray:
    """``(W,)`` row of a wavy tissue boundary: ``depth`` (share of ``h``) plus a smooth wave
    of amplitude ``amp * h``."""
    wave = _smooth_noise(rng, (1, w), sigma=w / rng.uniform(3, 8))[0]
    return h * depth + amp * h * wave


def _tissue_layers(rng: np.random.Generator, yy: np.ndarray) -> np.ndarray:
    """Echogenicity of skin, subcutaneous fat, glandular and muscle layers with wavy
    boundaries, hyperechoic streaks and slow modulation.

    Args:
        rng: the random generator (draws in a fixed order).
        yy: ``(H, W)`` float32 row (depth) coordinates.

    Returns:
        ``(H, W)`` float32 echogenicity; the layer levels are drawn within [0.25, 0.95].
    """
    h, w = yy.shape
    skin = _layer_boundary(rng, h, w, rng.uniform(0.04, 0.09), 0.01)
    fat_end = _layer_boundary(rng, h, w, rng.uniform(0.15, 0.35), 0.05)
    gland_end = _layer_boundary(rng, h, w, rng.uniform(0.62, 0.85), 0.06)
    echo = np.full((h, w), rng.uniform(0.25, 0.38), np.float32)  # subcutaneous fat
    echo[yy < skin[None, :]] = rng.uniform(0.75, 0.95)
    gland = (yy >= fat_end[None, :]) & (yy < gland_end[None, :])
    echo[gland] = rng.uniform(0.5, 0.7)
    echo[yy >= gland_end[None, :]] = rng.uniform(0.3, 0.45)
    # Hyperechoic streaks: Cooper's ligaments and muscle fibres.
    streaks = np.clip(_smooth_noise(rng, (h, w), sigma=1.0), 0, None)
    streaks = cv2.GaussianBlur(streaks, (0, 0), sigmaX=rng.uniform(4, 9), sigmaY=0.8)
    echo += 0.35 * streaks / (streaks.max() + 1e-6)
    echo *= 1.0 + 0.25 * _smooth_noise(rng, (h, w), sigma=rng.uniform(4, 10))
    return echo


def _add_fat_lobules(rng: np.random.Generator, echo: np.ndarray) -> None:
    """Darken 0-3 small hypoechoic fat lobules in ``echo`` (``(H, W)`` float32, in place):
    present in every class, they look like lesions to the untrained eye."""
    h, w = echo.shape
    for _ in range(int(rng.integers(0, 4))):
        lob = _blob(rng, (h, w), (rng.uniform(0.2, 0.7) * h, rng.uniform(0.1, 0.9) * w),
                    (rng.uniform(2, 5), rng.uniform(4, 9)), rng.uniform(-0.3, 0.3), 0.05)
        echo[lob] *= rng.uniform(0.55, 0.8)


def _lesion_shape(rng: np.random.Generator, shape: tuple[int, int], pathology: str) -> np.ndarray:
    """``(H, W)`` bool lesion outline: benign = oval, wider than tall, smooth; malignant =
    irregular, taller than wide."""
    h, w = shape
    size = min(h, w) * rng.uniform(0.09, 0.2)
    cy = rng.uniform(0.35, 0.62) * h
    cx = rng.uniform(0.25, 0.75) * w
    if pathology == "benign":
        radii = (size / rng.uniform(1.3, 2.0), size)  # wider than tall ("parallel")
        angle = rng.uniform(-0.2, 0.2)
        irregular = rng.choice([0.0, 0.0, 0.1])
    else:
        radii = (size * rng.uniform(0.95, 1.4), size * rng.uniform(0.7, 1.0))  # taller than wide
        angle = rng.uniform(-0.4, 0.4)
        irregular = rng.uniform(0.25, 0.42)
    return _blob(rng, (h, w), (cy, cx), radii, angle, irregular)


def _add_lesion(rng: np.random.Generator, echo: np.ndarray, yy: np.ndarray, pathology: str) -> np.ndarray:
    """Add a hypoechoic lesion to ``echo`` in place, with its posterior features: an acoustic
    shadow and an echogenic halo (malignant), or enhancement (benign).

    Args:
        rng: the random generator (draws in a fixed order).
        echo: ``(H, W)`` float32 echogenicity, modified in place.
        yy: ``(H, W)`` float32 row (depth) coordinates.
        pathology: ``benign`` or ``malignant``.

    Returns:
        ``(H, W)`` bool lesion mask.
    """
    h, w = echo.shape
    mask = _lesion_shape(rng, (h, w), pathology)
    soft = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 1.0 if pathology == "benign" else 1.8)
    echo *= 1.0 - soft * rng.uniform(0.6, 0.85)
    cols = np.asarray(mask.any(axis=0))
    bottom = int(np.nonzero(mask.any(axis=1))[0].max()) if mask.any() else h
    behind = (yy > bottom) & cols[None, :]
    below = cv2.GaussianBlur(behind.astype(np.float32), (0, 0), 2.0)
    if pathology == "malignant":
        echo *= 1.0 - below * rng.uniform(0.3, 0.65)  # posterior acoustic shadow
        halo = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool) & ~mask
        echo[halo] *= rng.uniform(1.05, 1.3)  # echogenic halo
    else:
        echo *= 1.0 + below * rng.uniform(0.0, 0.3)  # posterior enhancement (cysts)
    return mask


def _acquire(rng: np.random.Generator, echo: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Image ``echo`` (``(H, W)`` float32, attenuated in place) as a B-mode scanner would:
    depth attenuation with imperfect gain compensation, Rayleigh speckle, gain and gamma.

    Returns:
        ``(H, W)`` uint8 image.
    """
    h, w = echo.shape
    # Depth attenuation with imperfect time-gain compensation.
    echo *= np.exp(-rng.uniform(0.2, 0.9) * yy / h)
    # Multiplicative speckle: Rayleigh-distributed, with a small correlation length.
    speckle = cv2.GaussianBlur(rng.rayleigh(1.0, (h, w)).astype(np.float32), (0, 0),
                               sigmaX=rng.uniform(0.6, 1.2), sigmaY=0.5)
    image = echo * speckle / np.sqrt(np.pi / 2.0)
    image = np.clip(image * rng.uniform(0.8, 1.1), 0.0, 1.0) ** rng.uniform(0.8, 1.2)
    return (image * 255.0).round().astype(np.uint8)


def ultrasound_phantom(
    rng: np.random.Generator,
    *,
    pathology: str,
    height: int = 112,
    width: int = 144,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one synthetic B-mode breast ultrasound image and its lesion mask.

    Args:
        rng: the random generator; the same state draws the same image.
        pathology: ``benign``, ``malignant`` or ``normal`` (no lesion).
        height: output rows (depth, pixels, >= 32).
        width: output columns (pixels, >= 32).

    Returns:
        ``(image, mask)``: ``(height, width)`` uint8 image, ``(height, width)`` bool mask
        (all ``False`` for ``normal``).

    Raises:
        ValueError: on an unknown pathology.
    """
    if pathology not in PATHOLOGIES:
        raise ValueError(f"pathology must be one of {PATHOLOGIES}, got {pathology!r}")
    h, w = height, width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    echo = _tissue_layers(rng, yy)
    _add_fat_lobules(rng, echo)
    mask = np.zeros((h, w), bool)
    if pathology != "normal":
        mask = _add_lesion(rng, echo, yy, pathology)
    return _acquire(rng, echo, yy), mask


def _allocate(n: int, shares: Mapping[object, float], rng: np.random.Generator) -> list[object]:
    """Exactly ``n`` labels in the given shares (largest remainder), shuffled."""
    keys = list(shares)
    p = np.array([shares[k] for k in keys], float)
    p = p / p.sum()
    counts = np.floor(p * n).astype(int)
    for i in np.argsort(-(p * n - counts))[: n - counts.sum()]:
        counts[i] += 1
    labels = [k for k, c in zip(keys, counts, strict=True) for _ in range(c)]
    order = rng.permutation(n)
    return [labels[i] for i in order]


def _perturb(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A near-duplicate of an image: a re-export with a one-pixel shift, a gain change and noise."""
    h, w = image.shape
    dx, dy = rng.integers(-1, 2, size=2)
    m = np.array([[1, 0, dx], [0, 1, dy]], dtype=np.float32)
    moved = cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    moved_mask = cv2.warpAffine(mask.astype(np.uint8), m, (w, h), flags=cv2.INTER_NEAREST) > 0
    out = moved.astype(np.float32) * rng.uniform(0.95, 1.05) + rng.normal(0, 2.0, (h, w))
    return np.clip(out, 0, 255).round().astype(np.uint8), moved_mask


def _check_dataset_args(modality: str, n_images: int, duplicate_rate: float) -> None:
    """Refuse an unknown modality, fewer than two images or a duplicate rate outside [0, 0.5]."""
    if modality not in ("mammography", "ultrasound"):
        raise ValueError(f"modality must be mammography or ultrasound, got {modality!r}")
    if n_images < 2:
        raise ValueError("n_images must be at least 2")
    if not 0.0 <= duplicate_rate <= 0.5:
        raise ValueError("duplicate_rate must be within [0, 0.5]")


def _patients(
    rng: np.random.Generator, n_orig: int, shares: Mapping[str, Mapping[object, float]], mammo: bool
) -> list[dict[str, Any]]:
    """Patient, density and laterality of each original image.

    Mammography patients contribute one or two breasts (L, then R) that share the density
    (drawn per patient in ``shares["density"]``); each ultrasound image is its own patient,
    without density or laterality.

    Returns:
        ``n_orig`` dicts ``{"patient": int, "density": int | None, "laterality": str}``.
    """
    if not mammo:
        return [{"patient": i, "density": None, "laterality": ""} for i in range(n_orig)]
    rows: list[dict[str, Any]] = []
    n_patients = int(np.ceil(n_orig / rng.uniform(1.4, 1.6)))
    sizes = np.ones(n_patients, int)
    sizes[rng.choice(n_patients, n_orig - n_patients, replace=False)] = 2
    densities = _allocate(n_patients, shares["density"], rng)
    patient_of = np.repeat(np.arange(n_patients), sizes)
    for i in range(n_orig):
        p = int(patient_of[i])
        side = "L" if i == 0 or patient_of[i - 1] != p else "R"
        rows.append({"patient": p, "density": densities[p], "laterality": side})
    return rows


def _write_pair(out_dir: Path, name: str, image: np.ndarray, mask: np.ndarray) -> None:
    """Write ``images/<name>.png`` and ``masks/<name>.png`` under ``out_dir``."""
    write_png(out_dir / "images" / f"{name}.png", image)
    write_mask(out_dir / "masks" / f"{name}.png", mask)


def _draw_originals(
    out_dir: Path,
    modality: str,
    rows: list[dict[str, Any]],
    pathology: list[object],
    seed: int,
    size: tuple[int, int],
) -> tuple[list[dict[str, Any]], dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Draw and write the original images, image ``i`` from ``default_rng([seed, i])``.

    Args:
        out_dir: the dataset directory.
        modality: ``mammography`` or ``ultrasound``.
        rows: patient, density and laterality per image (see :func:`_patients`).
        pathology: the pathology of each image.
        seed: the dataset seed.
        size: ``(height, width)`` of the images.

    Returns:
        The manifest records, and ``{i: (image, mask)}`` (``(H, W)`` uint8 and bool) for
        planting near-duplicates.
    """
    mammo = modality == "mammography"
    prefix = "mg" if mammo else "us"
    h, w = size
    records: list[dict[str, Any]] = []
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for i, r in enumerate(rows):
        img_rng = np.random.default_rng([seed, i])
        if mammo:
            image, mask = mammography_phantom(img_rng, density=int(r["density"]), pathology=str(pathology[i]),
                                              height=h, width=w, laterality=str(r["laterality"]))
        else:
            image, mask = ultrasound_phantom(img_rng, pathology=str(pathology[i]), height=h, width=w)
        name = f"{prefix}_{i:04d}"
        _write_pair(out_dir, name, image, mask)
        cache[i] = (image, mask)
        records.append({
            "image": f"images/{name}.png", "modality": modality,
            "density": r["density"], "pathology": pathology[i],
            "mask": f"masks/{name}.png", "group": f"{prefix}-p{int(r['patient']):04d}",
            "phantom_id": name, "planted": "", "laterality": r["laterality"],
        })
    return records, cache


def _duplicate_sources(
    rng: np.random.Generator, pathology: list[object], n_dup: int, label_conflicts: int
) -> list[int]:
    """The original rows to duplicate, ``n_dup`` distinct ones: first the
    ``label_conflicts`` sources of conflicts (lesion rows, so that the mask stays true),
    then the others."""
    n_orig = len(pathology)
    lesion_rows = [i for i in range(n_orig) if pathology[i] != "normal"]
    conflict_src: list[int] = []
    if label_conflicts:
        conflict_src = [int(i) for i in rng.choice(lesion_rows, size=label_conflicts, replace=False)]
    others = [i for i in range(n_orig) if i not in set(conflict_src)]
    return conflict_src + list(rng.choice(others, size=n_dup - label_conflicts, replace=False))


def _plant_duplicates(
    out_dir: Path,
    prefix: str,
    records: list[dict[str, Any]],
    cache: dict[int, tuple[np.ndarray, np.ndarray]],
    dup_src: list[int],
    label_conflicts: int,
    seed: int,
) -> None:
    """Write a perturbed copy of each ``dup_src`` row, filed under a new group, and append
    its record to ``records`` (in place); the first ``label_conflicts`` copies swap
    benign/malignant. Copy ``k`` is drawn from ``default_rng([seed, n_orig + k])``."""
    n_orig = len(cache)
    for k, src in enumerate(dup_src):
        src = int(src)
        image, mask = _perturb(np.random.default_rng([seed, n_orig + k]), *cache[src])
        base = dict(records[src])
        name = f"{prefix}_{n_orig + k:04d}"
        _write_pair(out_dir, name, image, mask)
        planted = "near_duplicate"
        if k < label_conflicts:
            planted = "label_conflict"
            base["pathology"] = "malignant" if base["pathology"] == "benign" else "benign"
        base.update({"image": f"images/{name}.png", "mask": f"masks/{name}.png",
                     "group": f"{prefix}-p{10_000 + k:05d}", "planted": planted})
        records.append(base)


def generate_dataset(
    out_dir: str | Path,
    modality: str,
    *,
    n_images: int,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    proportions: Mapping[str, Mapping[object, float]] | None = None,
    duplicate_rate: float = 0.03,
    label_conflicts: int = 2,
) -> pd.DataFrame:
    """Write a phantom dataset in the manifest contract.

    ``round(duplicate_rate * n_images)`` of the ``n_images`` rows are planted
    near-duplicates of other rows, filed under a new group (as a re-scan filed under a new
    patient id would be); the first ``label_conflicts`` of them carry a different
    pathology. Mammography patients have one or two breasts imaged (``laterality`` L/R),
    both with the patient's density and both under the patient's group.

    Args:
        out_dir: dataset directory (created); ``images/``, ``masks/`` and
            ``manifest.csv`` are written inside.
        modality: ``mammography`` or ``ultrasound``.
        n_images: rows in the manifest, duplicates included (>= 2).
        seed: the dataset seed; image ``i`` is drawn from ``default_rng([seed, i])``.
        height: image rows (defaults 160 for mammography, 112 for ultrasound).
        width: image columns (defaults 128 for mammography, 144 for ultrasound).
        proportions: class shares per label column, e.g. ``{"pathology": {...}}``;
            defaults :data:`MAMMOGRAPHY_PROPORTIONS` / :data:`ULTRASOUND_PROPORTIONS`.
        duplicate_rate: share of rows that are planted near-duplicates, in [0, 0.5].
        label_conflicts: how many of the planted duplicates carry a conflicting label.

    Returns:
        The manifest written: contract columns plus ``phantom_id``, ``planted``
        (``""``, ``near_duplicate`` or ``label_conflict``) and ``laterality``.

    Raises:
        ValueError: on an unknown modality or out-of-range counts.
    """
    _check_dataset_args(modality, n_images, duplicate_rate)
    mammo = modality == "mammography"
    h = height or (160 if mammo else 112)
    w = width or (128 if mammo else 144)
    shares = dict(proportions or (MAMMOGRAPHY_PROPORTIONS if mammo else ULTRASOUND_PROPORTIONS))
    n_dup = int(round(duplicate_rate * n_images))
    n_orig = n_images - n_dup
    if label_conflicts > n_dup:
        raise ValueError(f"label_conflicts ({label_conflicts}) exceeds planted duplicates ({n_dup})")

    rng = np.random.default_rng([seed, 10**6])
    pathology = _allocate(n_orig, shares["pathology"], rng)
    out_dir = Path(out_dir)
    rows = _patients(rng, n_orig, shares, mammo)
    records, cache = _draw_originals(out_dir, modality, rows, pathology, seed, (h, w))
    # Planted near-duplicates; conflicts come from lesion rows so that the mask stays true.
    dup_src = _duplicate_sources(rng, pathology, n_dup, label_conflicts)
    _plant_duplicates(out_dir, "mg" if mammo else "us", records, cache, dup_src, label_conflicts, seed)

    df = pd.DataFrame.from_records(records)
    df["density"] = df["density"].astype("Int64")
    write_manifest(df, out_dir)
    log.info("%s phantoms: %d images (%d planted near-duplicates, %d label conflicts) in %s",
             modality, len(df), n_dup, label_conflicts, out_dir)
    return df


def generate_demo(
    out_root: str | Path,
    *,
    seed: int = 0,
    n_mammography: int = 400,
    n_ultrasound: int = 300,
    mammography_size: tuple[int, int] = (160, 128),
    ultrasound_size: tuple[int, int] = (112, 144),
    duplicate_rate: float = 0.03,
    label_conflicts: int = 2,
) -> dict[str, pd.DataFrame]:
    """Write the demo tree: ``<out_root>/mammography`` and ``<out_root>/ultrasound``.

    Args:
        out_root: directory to fill (the project's ``data/``).
        seed: base seed; the two datasets use ``seed`` and ``seed + 1``.
        n_mammography: mammography rows (duplicates included).
        n_ultrasound: ultrasound rows (duplicates included).
        mammography_size: ``(height, width)`` of the mammograms.
        ultrasound_size: ``(height, width)`` of the ultrasound images.
        duplicate_rate: share of planted near-duplicates per dataset.
        label_conflicts: planted label conflicts per dataset.

    Returns:
        ``{"mammography": manifest, "ultrasound": manifest}``.
    """
    out_root = Path(out_root)
    return {
        "mammography": generate_dataset(
            out_root / "mammography", "mammography", n_images=n_mammography, seed=seed,
            height=mammography_size[0], width=mammography_size[1],
            duplicate_rate=duplicate_rate, label_conflicts=label_conflicts),
        "ultrasound": generate_dataset(
            out_root / "ultrasound", "ultrasound", n_images=n_ultrasound, seed=seed + 1,
            height=ultrasound_size[0], width=ultrasound_size[1],
            duplicate_rate=duplicate_rate, label_conflicts=label_conflicts),
    }
