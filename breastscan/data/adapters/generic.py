"""Generic CSV adapter: any table of image paths and labels → the manifest contract.

Source layout: one CSV file (or a folder holding ``manifest.csv``) with one row per image
and any column names. Image and mask paths in it are relative to the CSV's folder (or
absolute). Example, the derived BUSI pack in ``../shared/datasets/busi``::

    image,mask,label,source_file,...,dup_group,...
    images/benign/benign_0001.png,masks/benign/benign_0001_mask.png,benign,...,g001,...

converted with ``columns={"label": "pathology", "dup_group": "group"}``,
``modality="ultrasound"``; the mini-MIAS pack (``x``, ``y``, ``radius`` lesion centre in
top-left pixel coordinates) with ``columns={"patient_id": "group"}``,
``modality="mammography"``, ``roi=("x", "y", "radius")``.

By default the output manifest references the source files in place (paths relative to
the output folder), so nothing is duplicated; ``copy=True`` copies them under the output
folder. Masks rasterised from ROI columns are always written under ``out_dir/masks/``.

The helpers :func:`read_gray_u8`, :func:`read_table` and :func:`finish_manifest` are shared by
the other adapters of this package.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from breastscan.data.adapters.errors import IngestError, LayoutError, not_layout
from breastscan.data.manifest import CONTRACT_COLUMNS, MANIFEST_NAME, order_columns, write_manifest
from breastscan.imaging.files import read_mask, write_mask
from breastscan.labels import DENSITY_LEVELS, MODALITIES, PATHOLOGIES

logger = logging.getLogger(__name__)

PATH_COLUMNS = ("image", "mask")
"""Contract columns holding file paths."""

VALUE_SETS: dict[str, tuple[str, ...]] = {
    "modality": tuple(MODALITIES),
    "density": tuple(str(d) for d in DENSITY_LEVELS),
    "pathology": tuple(PATHOLOGIES),
}
"""Contract columns with a fixed set of values (besides empty = unknown)."""

DERIVED_COLUMNS: tuple[str, ...] = ("dup_group", "dup_cluster", "split", "exclusion")
"""Columns the prepare stage derives (:func:`breastscan.data.splits.prepare_splits`). A source
column of one of these names is kept as ``source_<name>``: before prepare it would pass for
the derived one (a ``dup_group`` is read as the rows' groups, before ``group``), and prepare
would overwrite it."""

_EXPECTED = "a CSV file, or a folder holding manifest.csv"
"""What :func:`convert_csv` reads, as its layout errors say."""


# --------------------------------------------------------------------------- shared helpers


def read_gray_u8(path: str | Path) -> np.ndarray:
    """Read an image file as 8-bit gray.

    Args:
        path: a PNG/JPEG/PGM/... file OpenCV can read.

    Returns:
        ``(H, W)`` uint8. 3/4-channel images are converted to gray (alpha dropped);
        16-bit images are scaled by 255/65535.

    Raises:
        LayoutError: when the file does not decode as an image (the message names it).
    """
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise LayoutError(f"not a readable image: {path}")
    if arr.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if arr.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        arr = arr[:, :, 0] if arr.shape[2] == 1 else cv2.cvtColor(arr, code)
    if arr.dtype == np.uint16:
        arr = np.rint(arr.astype(np.float64) / 257.0).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise LayoutError(f"unsupported pixel type {arr.dtype} in {path}")
    return arr


def finish_manifest(rows: list[dict[str, object]] | pd.DataFrame, out_dir: Path) -> pd.DataFrame:
    """Add missing contract columns (empty), order the columns and write ``manifest.csv``.

    Args:
        rows: the converted rows.
        out_dir: the output dataset folder.

    Returns:
        The frame written (contract columns first, then the extra columns).
    """
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    df = df.copy()
    for col in CONTRACT_COLUMNS:
        if col not in df.columns:
            df[col] = ""
    df = order_columns(df).reset_index(drop=True)
    write_manifest(df, out_dir)
    return df


def read_table(source_csv: Path) -> pd.DataFrame:
    """Read a CSV file, every cell as text (empty cells as ``""``), header names stripped.

    Args:
        source_csv: the CSV file.

    Returns:
        Its rows, columns as in the file.

    Raises:
        LayoutError: the file is not a text CSV with a header row.
    """
    try:
        df = pd.read_csv(source_csv, dtype=str, keep_default_na=False)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        reason = " ".join(str(exc).split())
        raise not_layout("CSV", "a text CSV with a header row", source_csv,
                         found=f"{source_csv}, which does not parse ({reason})") from exc
    df.columns = [str(c).strip() for c in df.columns]
    return df


def image_size(path: Path) -> tuple[int, int]:
    """Return ``(height, width)`` of an image file, from its header when possible."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as probe:
            width, height = probe.size
        return int(height), int(width)
    except (UnidentifiedImageError, OSError):
        from breastscan.imaging.preprocessing import decode_image

        h, w = decode_image(path, min_side=1).shape
        return int(h), int(w)


def rasterise_circles(
    shape: tuple[int, int], circles: list[tuple[float, float, float]]
) -> np.ndarray:
    """Draw filled circles into an all-zero mask.

    Args:
        shape: ``(H, W)`` of the mask.
        circles: ``(col, row, radius)`` per circle, in pixels, origin at the top-left;
            sub-pixel centres and radii are honoured (1/16 pixel).

    Returns:
        ``(H, W)`` uint8 with 255 inside any circle, 0 elsewhere.
    """
    mask = np.zeros(shape, np.uint8)
    for col, row, radius in circles:
        cv2.circle(
            mask,
            (round(col * 16), round(row * 16)),
            max(1, round(radius * 16)),
            255,
            thickness=-1,
            lineType=cv2.LINE_8,
            shift=4,
        )
    return mask


# --------------------------------------------------------------------------- the adapter


def _is_empty(value: object) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == ""


def _to_float(value: object) -> float | None:
    if _is_empty(value):
        return None
    try:
        out = float(str(value).strip())
    except ValueError:
        return None
    return out if np.isfinite(out) else None


def _inside(path: Path, folder: Path) -> Path | None:
    """``path`` relative to ``folder`` when it lies inside it, else None."""
    try:
        rel = Path(os.path.relpath(path, folder))
    except ValueError:  # another drive
        return None
    return None if rel.parts and rel.parts[0] == ".." else rel


def _copy_target(src: Path, csv_dir: Path, out_dir: Path, kind: str) -> Path:
    """Where ``copy=True`` puts a file: its layout under the CSV folder is mirrored."""
    rel = _inside(src, csv_dir)
    return out_dir / rel if rel is not None else out_dir / f"{kind}s" / src.name


def _relative(path: Path, out_dir: Path) -> str:
    return Path(os.path.relpath(path, out_dir)).as_posix()


def _source_path(value: str, csv_dir: Path) -> Path:
    """A path cell of the CSV as a file path: absolute as is, else under ``csv_dir``."""
    p = Path(value)
    return p if p.is_absolute() else csv_dir / p


def _locate_source(source: str | Path, out_dir: Path) -> Path:
    """The CSV to read (``manifest.csv`` inside a folder).

    Raises:
        LayoutError: no such CSV.
        IngestError: the output would overwrite it.
    """
    source = Path(source)
    source_csv = source / MANIFEST_NAME if source.is_dir() else source
    if not source_csv.is_file():
        raise not_layout("CSV", _EXPECTED, source)
    target = out_dir / MANIFEST_NAME
    if target.exists() and target.resolve() == source_csv.resolve():
        raise IngestError(f"refusing to overwrite the source CSV {source_csv}: choose another out_dir")
    return source_csv


def _roi_values(
    df: pd.DataFrame, roi: tuple[str, str, str], source_csv: Path
) -> tuple[tuple[str, str, str], pd.DataFrame]:
    """Check the three ROI column names and copy their source values (before any rename)."""
    roi = tuple(roi)  # type: ignore[assignment]
    if len(roi) != 3:
        raise IngestError(f"roi must name 3 columns (x, y, radius), got {roi!r}")
    missing_roi = [c for c in roi if c not in df.columns]
    if missing_roi:
        raise LayoutError(f"{source_csv}: ROI columns not found: {', '.join(missing_roi)} "
                          f"(columns are: {', '.join(df.columns)})")
    return roi, df[list(roi)].copy()


def _rename_columns(df: pd.DataFrame, columns: Mapping[str, str], source_csv: Path) -> pd.DataFrame:
    """Apply the source → contract column renames.

    Raises:
        LayoutError: a column to rename is missing, or no ``image`` column results.
        IngestError: a rename collides with an existing column or another rename.
    """
    columns = dict(columns)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise LayoutError(
            f"{source_csv}: columns to map not found: {', '.join(missing)} "
            f"(columns are: {', '.join(df.columns)})"
        )
    targets = list(columns.values())
    clash = [t for t in targets if t in df.columns and t not in columns]
    dup_targets = {t for t in targets if targets.count(t) > 1}
    if clash or dup_targets:
        raise IngestError(
            f"{source_csv}: mapping would create duplicate columns: "
            f"{', '.join(sorted(set(clash) | dup_targets))}"
        )
    if "image" not in targets and "image" not in df.columns:
        raise LayoutError(
            f"{source_csv}: no 'image' column: expected a column of image paths named 'image' "
            f"or mapped to it (columns are: {', '.join(df.columns)})"
        )
    return df.rename(columns=columns)


def _set_aside_derived(df: pd.DataFrame, source_csv: Path) -> pd.DataFrame:
    """Rename each :data:`DERIVED_COLUMNS` column of the source to ``source_<name>``, with a warning.

    Raises:
        IngestError: ``source_<name>`` exists as well.
    """
    found = [c for c in DERIVED_COLUMNS if c in df.columns]
    clash = [f"source_{c}" for c in found if f"source_{c}" in df.columns]
    if clash:
        raise IngestError(f"{source_csv}: cannot set aside {', '.join(found)}: {', '.join(clash)} exists too")
    if found:
        logger.warning("%s: column(s) %s kept as %s: the prepare stage derives them (map one to group "
                       "if it is the rows' grouping)", source_csv.name, ", ".join(found),
                       ", ".join(f"source_{c}" for c in found))
    return df.rename(columns={c: f"source_{c}" for c in found})


def _counts(values: pd.Series) -> str:
    """``"B (12), C (7)"``: each distinct value with its count, most frequent first."""
    counts = sorted(values.value_counts().items(), key=lambda vn: (-vn[1], str(vn[0])))
    return ", ".join(f"{v} ({n})" for v, n in counts)


def _map_values(df: pd.DataFrame, column: str, mapping: Mapping[str, str], source_csv: Path) -> None:
    """In place: rename the values of one column; warn about the values left unmapped.

    Empty cells stay empty (unknown). For a column with a fixed value set
    (:data:`VALUE_SETS`), a value that is not valid after the mapping is refused.

    Raises:
        IngestError: a value of a :data:`VALUE_SETS` column is invalid after the mapping.
    """
    mapping = {str(k).strip(): str(v).strip() for k, v in mapping.items()}
    source = df[column]
    mapped = source.map(lambda v: mapping.get(v, v))
    valid = VALUE_SETS.get(column)
    if valid is not None:
        bad = (mapped != "") & ~mapped.isin(valid)
        if bad.any():
            shown = source.where(~source.isin(list(mapping)), source + "->" + mapped)
            raise IngestError(
                f"{source_csv}: values of {column!r} not valid after the value mapping: "
                f"{_counts(shown[bad])}; valid: {', '.join(valid)} or empty (map each one, "
                f"e.g. --value {column}:SRC=DST)"
            )
    unmapped = (source != "") & ~source.isin(list(mapping))
    if unmapped.any():
        logger.warning("%s: %d values of %r have no value mapping, kept as they are: %s",
                       source_csv.name, source[unmapped].nunique(), column, _counts(source[unmapped]))
    df[column] = mapped


def _normalise_cells(
    df: pd.DataFrame,
    modality: str | None,
    values: Mapping[str, Mapping[str, str]] | None,
    source_csv: Path,
) -> None:
    """In place: add empty contract columns, strip every cell, apply the value renames
    (:func:`_map_values`), fill empty ``modality`` cells.

    Raises:
        LayoutError: a row has no image path, or a value mapping names a column the CSV
            does not have (after the column renames).
        IngestError: a value is not valid after its column's value mapping.
    """
    unknown = [repr(c) for c in (values or {}) if c not in df.columns]
    if unknown:
        raise LayoutError(f"{source_csv}: values given for column {', '.join(unknown)}, which the "
                          f"CSV does not have (columns after the renames: {', '.join(df.columns)})")
    for col in CONTRACT_COLUMNS:
        if col not in df.columns:
            df[col] = ""
    for col in df.columns:
        df[col] = df[col].astype(str).str.strip()

    for col, mapping in (values or {}).items():
        _map_values(df, col, mapping, source_csv)
    if modality is not None:
        df.loc[df["modality"] == "", "modality"] = modality

    if (df["image"] == "").any():
        bad = int((df["image"] == "").sum())
        raise LayoutError(f"{source_csv}: {bad} rows have no image path")


def _check_files_exist(df: pd.DataFrame, csv_dir: Path, source_csv: Path) -> None:
    """Refuse a CSV naming image or mask files that do not exist (the first three named).

    Raises:
        LayoutError: a named file does not exist.
    """
    missing_files = [
        v for col in PATH_COLUMNS for v in df[col] if v and not _source_path(v, csv_dir).is_file()
    ]
    if missing_files:
        raise LayoutError(
            f"{source_csv}: {len(missing_files)} referenced files do not exist, e.g. "
            f"{', '.join(missing_files[:3])} (paths are relative to {csv_dir})"
        )


def _place_files(
    images: list[Path], masks: list[Path | None], csv_dir: Path, out_abs: Path, copy: bool
) -> tuple[list[str], list[str]]:
    """Copy (or reference in place) every image and mask; their paths relative to ``out_abs``
    (``""`` for a row without a mask)."""
    new_images: list[str] = []
    new_masks: list[str] = []
    for img, msk in zip(images, masks, strict=True):
        if copy:
            dst = _copy_target(img, csv_dir, out_abs, "image")
            _copy(img, dst)
            new_images.append(_relative(dst, out_abs))
            if msk is not None:
                mdst = _copy_target(msk, csv_dir, out_abs, "mask")
                _copy(msk, mdst)
                new_masks.append(_relative(mdst, out_abs))
            else:
                new_masks.append("")
        else:
            new_images.append(_relative(img, out_abs))
            new_masks.append(_relative(msk, out_abs) if msk is not None else "")
    return new_images, new_masks


def _roi_mask(
    img: Path, own_path: Path | None, x: float | None, y: float | None, r: float | None
) -> tuple[np.ndarray, bool]:
    """The ``(H, W)`` uint8 {0, 255} mask of one row: its circle (when ``x``, ``y``, ``r`` are
    all given and ``r > 0``) united with its own mask file, if any; and whether it had a circle."""
    circle = x is not None and y is not None and r is not None and r > 0
    shape = image_size(img)
    mask = rasterise_circles(shape, [(x, y, r)] if circle else [])  # type: ignore[list-item]
    if own_path is not None:
        own = read_mask(own_path)
        if own.shape != shape:
            raise LayoutError(
                f"mask {own_path} is {own.shape[1]}x{own.shape[0]} but its image "
                f"{img} is {shape[1]}x{shape[0]}"
            )
        mask = np.where(own, 255, mask).astype(np.uint8)
    return mask, bool(circle)


def _roi_mask_path(img: Path, csv_dir: Path, out_abs: Path) -> Path:
    """Where an image's rasterised mask goes: ``out_abs/masks/<image path>_mask.png``."""
    rel = _inside(img, csv_dir)
    stem = rel.with_suffix("") if rel is not None else Path(img.stem)
    if len(stem.parts) > 1 and stem.parts[0] == "images":
        stem = Path(*stem.parts[1:])  # images/a/b.png -> masks/a/b_mask.png
    return out_abs / "masks" / f"{stem.as_posix()}_mask.png"


def _rasterise_roi_masks(
    df: pd.DataFrame,
    images: list[Path],
    masks: list[Path | None],
    roi: tuple[str, str, str],
    roi_values: pd.DataFrame,
    csv_dir: Path,
    out_abs: Path,
) -> list[bool]:
    """Write every row's ROI mask and point its ``mask`` cell at it (in place); return
    ``has_roi`` per row."""
    has_roi: list[bool] = []
    for i, img in enumerate(images):
        x, y, r = (_to_float(roi_values.iloc[i][c]) for c in roi)
        mask, circle = _roi_mask(img, masks[i], x, y, r)
        has_roi.append(circle)
        dst = _roi_mask_path(img, csv_dir, out_abs)
        write_mask(dst, mask)
        df.loc[df.index[i], "mask"] = _relative(dst, out_abs)
    return has_roi


def convert_csv(
    source_csv: str | Path,
    out_dir: str | Path,
    *,
    columns: Mapping[str, str] | None = None,
    modality: str | None = None,
    values: Mapping[str, Mapping[str, str]] | None = None,
    roi: tuple[str, str, str] | None = None,
    copy: bool = False,
) -> pd.DataFrame:
    """Convert a CSV with arbitrary column names into a dataset in the manifest contract.

    Args:
        source_csv: the CSV file, or a folder holding ``manifest.csv``.
        out_dir: the output dataset folder (created); receives ``manifest.csv`` and, with
            ``copy`` or ``roi``, the files.
        columns: source column → contract column renames, e.g.
            ``{"label": "pathology", "dup_group": "group"}``.
        modality: modality written into every row whose ``modality`` is empty (or every
            row when the CSV has no such column).
        values: per column (after the ``columns`` renames), value renames, e.g.
            ``{"density": {"F": "1"}}``. Values not listed are kept, with ONE warning per
            column naming them and their counts; empty cells stay empty. In ``modality``,
            ``density`` and ``pathology`` (:data:`VALUE_SETS`), a value that is still not
            valid after the renames (unmapped, or mapped to an invalid value) is refused.
        roi: ``(x_col, y_col, radius_col)`` source columns of a circular lesion (centre
            column ``x``, row ``y``, radius, all in the image's pixels, origin at the
            top-left). Each row gets ``masks/<image path>_mask.png``: the circle (united
            with the row's own mask when it has one), or all zeros when the row has no
            coordinates; a ``has_roi`` column says which.
        copy: copy images and masks under ``out_dir`` (mirroring their layout under the
            CSV's folder) instead of referencing them in place.

    Returns:
        The manifest written: contract columns first, then every other source column (one
        named like a column the prepare stage derives, :data:`DERIVED_COLUMNS`, as
        ``source_<name>``); all values as text, empty cells as ``""`` (an empty ``group``
        stays empty).

    Raises:
        LayoutError: the CSV, or an image/mask it names, does not exist; the CSV does not
            parse; a column to rename, a value-mapped column or a ROI column is missing;
            there is no ``image`` column or it has empty cells; an existing mask's size
            differs from its image.
        IngestError: a rename collides with an existing column (or a derived column with
            its ``source_<name>``), a value is not valid after its value mapping, or the
            output would overwrite the source CSV.
    """
    out_dir = Path(out_dir)
    source_csv = _locate_source(source_csv, out_dir)
    csv_dir = Path(os.path.abspath(source_csv.parent))
    out_abs = Path(os.path.abspath(out_dir))

    df = read_table(source_csv)
    if roi is not None:
        roi, roi_values = _roi_values(df, roi, source_csv)
    df = _set_aside_derived(_rename_columns(df, columns or {}, source_csv), source_csv)
    _normalise_cells(df, modality, values, source_csv)
    _check_files_exist(df, csv_dir, source_csv)

    out_dir.mkdir(parents=True, exist_ok=True)
    images = [_source_path(v, csv_dir) for v in df["image"]]
    masks = [_source_path(v, csv_dir) if v else None for v in df["mask"]]
    df["image"], df["mask"] = _place_files(images, masks, csv_dir, out_abs, copy)

    if roi is not None:
        has_roi = _rasterise_roi_masks(df, images, masks, roi, roi_values, csv_dir, out_abs)
        df["has_roi"] = has_roi
        logger.info("rasterised %d circular ROIs into %s", sum(has_roi), out_dir / "masks")

    out = finish_manifest(df, out_dir)
    logger.info(
        "converted %s: %d rows into %s (%s)", source_csv.name, len(out), out_dir,
        "files copied" if copy else "files referenced in place",
    )
    return out


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() and dst.resolve() == src.resolve():
        return
    shutil.copy2(src, dst)
