"""Image-level checks: one row of facts per manifest row, for the suites to judge.

The facts are plain columns (``image_decodes``, ``mask_same_size`` ...) so that every
decision stays in one Great Expectations suite and shows up in one report.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from breastscan.data.manifest import resolve
from breastscan.imaging.preprocessing import ImageDecodeError, decode_image

log = logging.getLogger(__name__)

FACT_COLUMNS: tuple[str, ...] = (
    "image_exists",
    "image_decodes",
    "image_height",
    "image_width",
    "image_max",
    "image_error",
    "mask_exists",
    "mask_decodes",
    "mask_same_size",
    "mask_binary",
    "mask_empty",
)


def _decode_mask(path: Path) -> np.ndarray:
    import cv2

    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ImageDecodeError("mask does not decode")
    return arr if arr.ndim == 2 else arr.max(axis=2)


def _is_binary(mask: np.ndarray) -> bool:
    values = np.unique(mask)
    if values.size > 2:
        return False
    top = 1 if values.max(initial=0) <= 1 else (np.iinfo(mask.dtype).max if mask.dtype.kind in "ui" else 1)
    return bool(set(values.tolist()) <= {0, top})


def inspect_row(root: Path, image: object, mask: object) -> dict[str, object]:
    """Facts about one row's image and mask files.

    Args:
        root: dataset directory the paths are relative to.
        image: the row's ``image`` cell (path text, or missing).
        mask: the row's ``mask`` cell (path text, or missing).

    Returns:
        A dict keyed by :data:`FACT_COLUMNS`; mask facts are ``None`` when the row has no
        mask, image facts are ``None`` when the file is missing or does not decode.
    """
    facts: dict[str, object] = dict.fromkeys(FACT_COLUMNS)
    shape: tuple[int, int] | None = None
    if isinstance(image, str) and image:
        path = resolve(root, image)
        facts["image_exists"] = path.is_file()
        if facts["image_exists"]:
            try:
                # No size limits here: the suite judges size, so the report names it.
                pixels = decode_image(path, min_side=1, max_side=10**6)
                shape = pixels.shape
                facts.update(
                    image_decodes=True,
                    image_height=int(shape[0]),
                    image_width=int(shape[1]),
                    image_max=float(pixels.max()),
                )
            except ImageDecodeError as exc:
                facts.update(image_decodes=False, image_error=str(exc))
    else:
        facts["image_exists"] = False
    if isinstance(mask, str) and mask:
        mpath = resolve(root, mask)
        facts["mask_exists"] = mpath.is_file()
        if facts["mask_exists"]:
            try:
                m = _decode_mask(mpath)
                facts["mask_decodes"] = True
                facts["mask_binary"] = _is_binary(m)
                facts["mask_empty"] = not bool((m > 0).any())
                if shape is not None:
                    facts["mask_same_size"] = tuple(m.shape) == tuple(shape)
            except ImageDecodeError:
                facts["mask_decodes"] = False
    return facts


def inspect_images(df: pd.DataFrame, root: str | Path) -> pd.DataFrame:
    """Facts about every row's files (see :func:`inspect_row`).

    Args:
        df: a manifest as read by :func:`breastscan.data.manifest.read_manifest`.
        root: the dataset directory.

    Returns:
        A frame indexed like ``df`` with the :data:`FACT_COLUMNS`.
    """
    root = Path(root)
    image_col = df["image"] if "image" in df else pd.Series([None] * len(df), index=df.index)
    mask_col = df["mask"] if "mask" in df else pd.Series([None] * len(df), index=df.index)
    rows = [inspect_row(root, img, msk) for img, msk in zip(image_col, mask_col, strict=True)]
    facts = pd.DataFrame(rows, index=df.index, columns=list(FACT_COLUMNS))
    log.info(
        "inspected %d images: %d missing, %d undecodable",
        len(facts),
        int((facts["image_exists"] == False).sum()),  # noqa: E712 (object column)
        int((facts["image_decodes"] == False).sum()),  # noqa: E712
    )
    return facts
