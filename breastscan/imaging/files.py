"""Writing and reading image and mask files on disk (PNG for everything the project writes)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """Write a grayscale image as PNG, creating parent directories.

    Args:
        path: destination file.
        image: ``(H, W)`` uint8 or uint16, or float in [0, 1] (stored as uint8).

    Returns:
        The path written.

    Raises:
        OSError: when OpenCV cannot write the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(image)
    if arr.dtype.kind == "f":
        arr = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    elif arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if not cv2.imwrite(str(path), arr):
        raise OSError(f"could not write {path}")
    return path


def write_mask(path: str | Path, mask: np.ndarray) -> Path:
    """Write a binary mask as an 8-bit PNG with values 0 (background) and 255 (lesion).

    Args:
        path: destination file.
        mask: ``(H, W)`` array; any non-zero value is lesion.
    """
    return write_png(path, (np.asarray(mask) > 0).astype(np.uint8) * 255)


def read_mask(path: str | Path) -> np.ndarray:
    """Read a mask file as a boolean ``(H, W)`` array.

    Masks stored as 0/1 and as 0/255 (or 0/65535) are both understood: a pixel is lesion
    when it is above half of the range in use. Multi-channel masks are reduced to their
    maximum over channels.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when the file does not decode as an image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask not found: {path}")
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ValueError(f"mask does not decode as an image: {path}")
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    if arr.size and arr.max() <= 1:
        return np.asarray(arr > 0)
    half = np.iinfo(arr.dtype).max // 2 if arr.dtype.kind in "ui" else 0.5
    return np.asarray(arr > half)
