"""Heatmaps and lesion masks drawn over the gray image, for display (the service's overlays).

OpenCV only: the service's request path imports this, and it must not pull in TensorFlow.
"""

from __future__ import annotations

import cv2
import numpy as np

OVERLAY_KINDS = ("heatmap", "mask")
"""Values of :func:`overlay`'s ``kind``."""

_MASK_COLOR_RGB = (255, 0, 0)


def overlay(
    image_gray: np.ndarray,
    heat_or_mask: np.ndarray,
    *,
    kind: str = "heatmap",
    alpha: float = 0.4,
) -> np.ndarray:
    """Draw a heatmap or a lesion mask over a gray image.

    Args:
        image_gray: ``(H, W)`` float in [0, 1] (uint8 is read as 0-255).
        heat_or_mask: ``(H, W)``; for ``kind="heatmap"`` floats in [0, 1] (values outside
            are clipped), drawn with OpenCV's JET colormap blended at ``alpha``; for
            ``kind="mask"`` any non-zero pixel is lesion, filled red at ``alpha`` and
            outlined with an opaque red contour.
        kind: ``"heatmap"`` or ``"mask"``.
        alpha: opacity of the heatmap or of the mask fill, in [0, 1].

    Returns:
        ``(H, W, 3)`` uint8 **RGB** image.

    Raises:
        ValueError: shapes differ or are not 2-D, unknown ``kind``, ``alpha`` outside [0, 1].
    """
    if kind not in OVERLAY_KINDS:
        raise ValueError(f"kind must be one of {OVERLAY_KINDS}, got {kind!r}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    img = np.asarray(image_gray)
    layer = np.asarray(heat_or_mask)
    if img.ndim != 2 or layer.shape != img.shape:
        raise ValueError(f"need two (H, W) arrays of one shape, got {img.shape} and {layer.shape}")
    if img.dtype == np.uint8:
        gray = img
    else:
        gray = np.clip(np.rint(np.nan_to_num(img.astype(np.float32)) * 255.0), 0, 255).astype(np.uint8)
    base = np.repeat(gray[:, :, None], 3, axis=2)

    if kind == "heatmap":
        heat = np.clip(np.nan_to_num(layer.astype(np.float32)), 0.0, 1.0)
        colored = cv2.applyColorMap(np.rint(heat * 255.0).astype(np.uint8), cv2.COLORMAP_JET)
        colored = cv2.cvtColor(colored, cv2.COLOR_BGR2RGB)
        return np.asarray(cv2.addWeighted(base, 1.0 - float(alpha), colored, float(alpha), 0.0), np.uint8)

    mask = layer > 0
    out = base.copy()
    if mask.any():
        red = np.asarray(_MASK_COLOR_RGB, np.float32)
        out[mask] = np.rint((1.0 - alpha) * base[mask].astype(np.float32) + alpha * red).astype(np.uint8)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        thickness = max(1, round(min(mask.shape) / 200))
        cv2.drawContours(out, contours, -1, _MASK_COLOR_RGB, thickness)
    return out
