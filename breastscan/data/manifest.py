"""The manifest contract: one ``manifest.csv`` per dataset directory.

Every dataset the platform touches, synthetic or real, is a directory holding a
``manifest.csv`` with at least these columns (paths relative to that directory):

=========== ===============================================================
image       path of the image file (PNG, JPEG, PGM or DICOM)
modality    ``mammography`` or ``ultrasound``
density     breast density 1-4 (BI-RADS A-D; 1-3 for mini-MIAS F/G/D), or empty
pathology   ``benign``, ``malignant`` or ``normal``, or empty when unknown
mask        path of a binary lesion mask (0 / 255) of the image's size, or empty
group       patient or duplicate group: rows sharing a group never cross splits
=========== ===============================================================

Extra columns (``patient_id``, ``laterality``, ``source`` ...) are kept as they are.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

MANIFEST_NAME = "manifest.csv"
CONTRACT_COLUMNS: tuple[str, ...] = ("image", "modality", "density", "pathology", "mask", "group")
"""Columns every manifest must have, in their canonical order."""

def manifest_path(root: str | Path) -> Path:
    """Return the path of the manifest inside a dataset directory."""
    return Path(root) / MANIFEST_NAME


def read_manifest(root: str | Path) -> pd.DataFrame:
    """Read a dataset's manifest exactly as written, every column as text.

    Empty cells become missing values (``NaN``); nothing is coerced, so that validation
    sees what the file really says (``"7"`` stays ``"7"``, ``"Benign"`` stays ``"Benign"``).

    Args:
        root: the dataset directory holding ``manifest.csv``.

    Returns:
        One row per image, columns as in the file.

    Raises:
        FileNotFoundError: when the directory has no manifest.
    """
    path = manifest_path(root)
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {Path(root)}")
    return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])


def normalize_manifest(df: pd.DataFrame) -> pd.DataFrame:
    """Return a typed copy of a validated manifest.

    ``density`` becomes a nullable integer, empty ``group`` cells fall back to the image
    path (an image with no known group is its own group), text columns are stripped.

    Args:
        df: a manifest that passed validation.

    Returns:
        A new frame with the contract columns first, then the extra columns.
    """
    out = df.copy()
    for col in ("image", "modality", "pathology", "mask", "group"):
        out[col] = out[col].astype("string").str.strip()
    out["density"] = pd.to_numeric(out["density"], errors="raise").astype("Int64")
    out["group"] = out["group"].fillna(out["image"])
    return order_columns(out)


def order_columns(df: pd.DataFrame, first: Iterable[str] = CONTRACT_COLUMNS) -> pd.DataFrame:
    """Return ``df`` with the given columns first (those present) and the rest after."""
    first = [c for c in first if c in df.columns]
    return df[first + [c for c in df.columns if c not in first]]


def write_manifest(df: pd.DataFrame, root: str | Path) -> Path:
    """Write ``df`` as the manifest of ``root`` (contract columns first), creating the directory.

    Args:
        df: rows to write; must hold every contract column.
        root: the dataset directory.

    Returns:
        The path written.

    Raises:
        ValueError: when a contract column is missing.
    """
    missing = [c for c in CONTRACT_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"manifest is missing contract columns: {', '.join(missing)}")
    path = manifest_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    order_columns(df).to_csv(path, index=False)
    return path


def resolve(root: str | Path, relative: str) -> Path:
    """Resolve a manifest path (relative to the dataset directory, or absolute)."""
    p = Path(relative)
    return p if p.is_absolute() else Path(root) / p


def file_md5(path: str | Path) -> str:
    """MD5 hex digest of a file's bytes (the hash DVC uses)."""
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def content_hashes(df: pd.DataFrame, root: str | Path) -> tuple[list[str], list[str | None]]:
    """MD5 of every row's image file and mask file (``None`` where a row has no mask).

    Args:
        df: manifest rows with ``image`` and ``mask`` columns.
        root: the dataset directory the paths are relative to.

    Returns:
        ``(image_md5, mask_md5)``, one entry per row.
    """
    images = [file_md5(resolve(root, str(p))) for p in df["image"]]
    masks = [file_md5(resolve(root, str(m))) if isinstance(m, str) and m else None for m in df["mask"]]
    return images, masks
