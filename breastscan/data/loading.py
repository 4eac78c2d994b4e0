"""Model inputs from manifest rows: the one row loader.

:func:`load_rows` turns manifest rows into arrays through
:func:`breastscan.imaging.preprocessing.preprocess_image`, the function the service uses,
so training, evaluation and serving cannot drift. It runs in two modes:

* **strict** (the pipeline: :func:`load_split` over the prepare stage's ``splits.csv``):
  validated data, so a label outside the model's classes or a missing file is an error;
  rows with no label, and lesion rows with no mask, are dropped and counted in the log.
* **lenient** (outside data: ``breastscan evaluate``): every row the model cannot score is
  counted under one reason of :data:`SKIP_REASONS` with its detail, nothing is dropped
  silently, and only rows of the model's modality are decoded.

A row's group (the unit the bootstrap resamples) is its ``dup_group`` (patients merged
through near-duplicates), else its ``group`` (patient), else the image itself.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from breastscan.data.manifest import resolve
from breastscan.imaging.files import read_mask
from breastscan.imaging.preprocessing import (
    ImageDecodeError,
    PreprocessSpec,
    decode_image,
    preprocess_image,
    preprocess_mask,
)

if TYPE_CHECKING:
    from breastscan.bundle import ModelContract
    from breastscan.config import ModelConfig

log = logging.getLogger(__name__)

LOADABLE_SPLITS: tuple[str, ...] = ("train", "val", "test")
"""Splits :func:`load_split` serves; ``excluded`` rows are never used."""

GROUP_COLUMNS: tuple[str, ...] = ("dup_group", "group")
"""Columns naming a row's group, in order of preference (the image itself otherwise)."""

SKIP_REASONS: dict[str, str] = {
    "wrong_modality": "modality is not the model's",
    "no_label": "label cell is empty",
    "unknown_label": "label is not one of the model's classes",
    "no_mask": "lesion image without a mask",
    "missing_image": "image file not found",
    "unreadable_image": "image cannot be decoded or preprocessed",
    "missing_mask": "mask file not found",
    "unreadable_mask": "mask cannot be read or differs in size from its image",
}
"""Why a row is not scored, in the order the checks run (the first failing check is the reason)."""

DROPPED_IN_STRICT: tuple[str, ...] = ("no_label", "no_mask")
"""Reasons a strict load drops a row (with a log line) instead of failing."""


@dataclass
class SplitData:
    """Arrays of loaded rows, ready for a model.

    Attributes:
        images: ``(n, H, W, 1)`` float32 in [0, 1], preprocessed with the model's spec.
        targets: classification: ``(n,)`` int64 class indices in ``[0, k)``;
            segmentation: ``(n, H, W, 1)`` float32 masks in {0, 1}.
        frame: the ``n`` rows used, in the order of the arrays (index reset).
        groups: ``(n,)`` group ids (:data:`GROUP_COLUMNS`), the unit of the grouped bootstrap.
        masks: lesion-aware classifiers (:attr:`RowSpec.with_masks`): ``(n, H, W, 1)``
            float32 lesion masks in {0, 1} (empty where a row has none); else ``None``.
    """

    images: np.ndarray
    targets: np.ndarray
    frame: pd.DataFrame
    groups: np.ndarray
    masks: np.ndarray | None = None

    def __len__(self) -> int:
        return int(len(self.images))


@dataclass(frozen=True)
class RowSpec:
    """What a model needs from a manifest row.

    Attributes:
        name: the model's name (messages).
        task: ``classification`` or ``segmentation``.
        label: the label column (classification).
        classes: the model's classes as manifest text, in class-index order.
        spec: the model's preprocessing spec (input size, contrast steps, side limits).
        modality: rows of another modality are skipped (lenient loads); ``None``: no check.
        with_masks: a classifier that also needs each row's lesion mask (``roi``).
    """

    name: str
    task: str
    label: str
    classes: tuple[str, ...]
    spec: PreprocessSpec
    modality: str | None = None
    with_masks: bool = False

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> RowSpec:
        """The rows a model declared in params.yaml trains and is tested on."""
        return cls(name=cfg.name, task=cfg.task, label=cfg.label, classes=tuple(str(c) for c in cfg.classes),
                   spec=cfg.preprocess, with_masks=cfg.roi is not None or cfg.task == "multitask")

    @classmethod
    def from_contract(cls, contract: ModelContract, spec: PreprocessSpec) -> RowSpec:
        """The rows a trained model can score: its contract's label, classes and modality."""
        return cls(name=contract.name, task=contract.task, label=contract.label, classes=contract.classes,
                   spec=spec, modality=contract.modality, with_masks=contract.task == "multitask")

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(H, W, 1)`` of one input."""
        return (int(self.spec.height), int(self.spec.width), 1)


@dataclass(frozen=True)
class SkippedRow:
    """A manifest row that was not loaded.

    Attributes:
        row: 0-based row index in the table given (``manifest.csv`` line ``row + 2``).
        image: the row's ``image`` cell as written.
        detail: what was wrong, e.g. the decoder's message or the unknown label.
    """

    row: int
    image: str
    detail: str


@dataclass
class LoadedRows:
    """Rows loaded by :func:`load_rows`: the arrays, and every row left out with its reason."""

    data: SplitData
    n_rows: int
    skipped: dict[str, list[SkippedRow]] = field(default_factory=dict)

    def skip_counts(self) -> dict[str, int]:
        """Reason -> rows skipped for it (reasons with at least one row, in check order)."""
        return {r: len(self.skipped[r]) for r in SKIP_REASONS if self.skipped.get(r)}

    def skip_summary(self) -> str:
        """``wrong_modality 12, missing_image 1`` (or ``none``)."""
        return ", ".join(f"{r} {n}" for r, n in self.skip_counts().items()) or "none"


class _Skip(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def cell(row: pd.Series, column: str) -> str | None:
    """A row's cell as stripped text; ``None`` when the column is absent or the cell empty."""
    if column not in row.index:
        return None
    value = row[column]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def class_index(classes: tuple[str, ...], value: Any) -> int | None:
    """Index of a label among a model's classes (compared as text), ``None`` if absent.

    ``"2.0"`` (a density written by a float column) matches class ``"2"``.
    """
    text = str(value).strip()
    if text in classes:
        return classes.index(text)
    try:
        number = float(text)
    except ValueError:
        return None
    if number.is_integer() and str(int(number)) in classes:
        return classes.index(str(int(number)))
    return None


# --------------------------------------------------------------------------- one row


def _target_of(row: pd.Series, rs: RowSpec) -> int | None:
    """The class index of a row (classification), ``None`` for a segmenter; or skip."""
    if rs.task == "segmentation":
        pathology = (cell(row, "pathology") or "").lower()
        if cell(row, "mask") is None and pathology != "normal":
            raise _Skip("no_mask", f"no mask (pathology={pathology or 'unknown'})")
        return None
    value = cell(row, rs.label)
    if value is None:
        raise _Skip("no_label", f"{rs.label} is empty")
    index = class_index(rs.classes, value)
    if index is None:
        raise _Skip("unknown_label", f"{rs.label}={value!r} is not a class of model {rs.name} "
                                     f"{list(rs.classes)}")
    return index


def _check_row(row: pd.Series, rs: RowSpec) -> int | None:
    if rs.modality is not None:
        modality = cell(row, "modality")
        if modality is None or modality.lower() != rs.modality.strip().lower():
            raise _Skip("wrong_modality", f"modality={modality or ''!r}, model: {rs.modality}")
    return _target_of(row, rs)


def _image_of(row: pd.Series, root: Path, rs: RowSpec) -> tuple[np.ndarray, np.ndarray]:
    """``(decoded pixels (h, w), model input (H, W, 1))`` of a row; or skip."""
    image = cell(row, "image")
    if image is None or not resolve(root, image).is_file():
        raise _Skip("missing_image", "no such file")
    try:
        pixels = decode_image(resolve(root, image), min_side=rs.spec.min_side, max_side=rs.spec.max_side)
        return pixels, preprocess_image(pixels, rs.spec)[0]
    except (ImageDecodeError, OSError, ValueError) as exc:
        raise _Skip("unreadable_image", str(exc)) from None


def _mask_of(row: pd.Series, root: Path, rs: RowSpec, pixels: np.ndarray) -> np.ndarray:
    """The ``(H, W, 1)`` mask of a row (empty for a normal image without one); or skip."""
    mask_rel = cell(row, "mask")
    if mask_rel is None:
        return np.zeros(rs.shape, np.float32)
    path = resolve(root, mask_rel)
    if not path.is_file():
        raise _Skip("missing_mask", f"mask {mask_rel}: no such file")
    try:
        raw = read_mask(path)
    except (OSError, ValueError) as exc:
        raise _Skip("unreadable_mask", str(exc)) from None
    if raw.shape != pixels.shape:
        raise _Skip("unreadable_mask", f"mask {mask_rel} is {raw.shape[1]}x{raw.shape[0]}, "
                                       f"the image {pixels.shape[1]}x{pixels.shape[0]}")
    return preprocess_mask(raw, rs.spec)


# --------------------------------------------------------------------------- many rows


def row_groups(frame: pd.DataFrame) -> np.ndarray:
    """``(n,)`` group of each row: ``dup_group``, else ``group``, else the image."""
    groups = pd.Series([None] * len(frame), index=frame.index, dtype=object)
    for column in GROUP_COLUMNS:
        if column in frame.columns:
            filled = frame[column].where(frame[column].astype(str).str.strip() != "")
            groups = groups.where(groups.notna(), filled)
    return groups.where(groups.notna(), frame["image"]).astype(str).to_numpy()


def _strict_failure(reason: str, image: str, detail: str) -> Exception:
    if reason in ("missing_image", "missing_mask"):
        return FileNotFoundError(f"{image}: {detail}")
    return ValueError(f"{image}: {detail}")


def load_rows(frame: pd.DataFrame, root: str | Path, rs: RowSpec, *, strict: bool) -> LoadedRows:
    """Load and preprocess manifest rows for one model.

    Args:
        frame: manifest (or split) rows, with at least ``image``.
        root: the directory the ``image`` / ``mask`` paths are relative to.
        rs: what the model needs.
        strict: fail on a bad row (pipeline data, validated) instead of counting it;
            rows with no label or lesion rows with no mask are dropped either way.

    Returns:
        The arrays and the skipped rows by reason.

    Raises:
        ValueError: (strict) a label outside the model's classes -- checked for every row
            before any image is decoded -- an unreadable image or mask, a mask whose size
            differs from its image.
        FileNotFoundError: (strict) an image or mask file is missing.
    """
    root = Path(root)
    rows = frame.reset_index(drop=True)
    skipped: dict[str, list[SkippedRow]] = {}
    checked: list[tuple[int, int | None]] = []
    for i in range(len(rows)):
        row = rows.iloc[i]
        try:
            checked.append((i, _check_row(row, rs)))
        except _Skip as skip:
            if strict and skip.reason not in DROPPED_IN_STRICT:
                raise _strict_failure(skip.reason, str(row.get("image")), skip.detail) from None
            skipped.setdefault(skip.reason, []).append(SkippedRow(i, cell(row, "image") or "", skip.detail))
    used, images, targets, masks = _decode_rows(rows, checked, root, rs, strict, skipped)
    data = _split_data(rows.iloc[used].reset_index(drop=True).assign(manifest_row=used), images, targets,
                       masks, rs)
    loaded = LoadedRows(data=data, n_rows=len(rows), skipped=skipped)
    for reason in DROPPED_IN_STRICT:
        if strict and skipped.get(reason):
            log.warning("%s: dropped %d row(s) (%s), e.g. %s", rs.name, len(skipped[reason]),
                        SKIP_REASONS[reason], skipped[reason][0].image)
    return loaded


def _decode_rows(rows: pd.DataFrame, checked: list[tuple[int, int | None]], root: Path, rs: RowSpec,
                 strict: bool, skipped: dict[str, list[SkippedRow]]) -> tuple[list[int], list, list, list]:
    used: list[int] = []
    images: list[np.ndarray] = []
    targets: list[Any] = []
    masks: list[np.ndarray] = []
    for i, label in checked:
        row = rows.iloc[i]
        try:
            pixels, x = _image_of(row, root, rs)
            mask = _mask_of(row, root, rs, pixels) if rs.task == "segmentation" or rs.with_masks else None
        except _Skip as skip:
            if strict:
                raise _strict_failure(skip.reason, str(row.get("image")), skip.detail) from None
            skipped.setdefault(skip.reason, []).append(SkippedRow(i, cell(row, "image") or "", skip.detail))
            continue
        used.append(i)
        images.append(x)
        targets.append(mask if rs.task == "segmentation" else label)
        if rs.with_masks and mask is not None:
            masks.append(mask)
    return used, images, targets, masks


def _stack(arrays: list, rs: RowSpec) -> np.ndarray:
    return np.stack(arrays).astype(np.float32) if arrays else np.zeros((0, *rs.shape), np.float32)


def _split_data(frame: pd.DataFrame, images: list, targets: list, masks: list, rs: RowSpec) -> SplitData:
    target_array = _stack(targets, rs) if rs.task == "segmentation" else np.asarray(targets, dtype=np.int64)
    return SplitData(images=_stack(images, rs), targets=target_array, frame=frame, groups=row_groups(frame),
                     masks=_stack(masks, rs) if rs.with_masks else None)


# --------------------------------------------------------------------------- the pipeline's splits


def read_splits(splits_csv: str | Path) -> pd.DataFrame:
    """Read the split artefact with every column as text (empty cells are missing).

    Args:
        splits_csv: ``artifacts/prepared/<dataset>/splits.csv``.

    Returns:
        One row per manifest image, with at least ``image`` and ``split``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a required column is missing.
    """
    path = Path(splits_csv)
    if not path.is_file():
        raise FileNotFoundError(f"split artefact not found: {path} (run the prepare stage)")
    df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    missing = [c for c in ("image", "split") if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {', '.join(missing)}")
    return df


def load_split(splits_csv: str | Path, dataset_root: str | Path, cfg: ModelConfig, split: str) -> SplitData:
    """Load and preprocess the rows of one split for one model (strict :func:`load_rows`).

    Args:
        splits_csv: the prepare stage's ``splits.csv``.
        dataset_root: the dataset directory the ``image`` / ``mask`` paths are relative to.
        cfg: the model (task, label, classes, preprocessing).
        split: ``train``, ``val`` or ``test``.

    Returns:
        The split's arrays (possibly empty, with a warning).

    Raises:
        ValueError: unknown split, a missing column, or a bad row (see :func:`load_rows`).
        FileNotFoundError: the split artefact, an image or a mask is missing.
    """
    if split not in LOADABLE_SPLITS:
        raise ValueError(f"split must be one of {LOADABLE_SPLITS}, got {split!r}")
    df = read_splits(splits_csv)
    needed = [cfg.label] if cfg.task == "classification" else ["mask"]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"{splits_csv}: model {cfg.name} needs column(s) {', '.join(missing)}")
    rows = df[df["split"].astype(str).str.strip() == split]
    data = load_rows(rows, dataset_root, RowSpec.from_config(cfg), strict=True).data
    if not len(data):
        log.warning("%s/%s: no usable rows in %s", cfg.name, split, splits_csv)
    return data
