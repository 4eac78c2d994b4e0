"""Typed view of ``params.yaml``: frozen dataclasses and :func:`load_params`.

Stage entry points call :func:`load_params` once and pass typed values into the library;
library code never reads ``params.yaml`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from breastscan.labels import MODALITIES
from breastscan.manifest import LABEL_COLUMNS

DEFAULT_PARAMS = Path("params.yaml")


@dataclass(frozen=True)
class DedupConfig:
    """Near-duplicate detection: a pair is a duplicate when both conditions hold.

    Attributes:
        max_hamming: largest Hamming distance between 64-bit perceptual (DCT) hashes.
        min_correlation: smallest Pearson correlation of 64x64 thumbnails.
    """

    max_hamming: int = 8
    min_correlation: float = 0.9


@dataclass(frozen=True)
class DatasetConfig:
    """One dataset directory in the manifest contract, as declared under ``datasets:``.

    Attributes:
        name: key in params.yaml (``mammography``, ``ultrasound``, ...).
        path: dataset directory holding ``manifest.csv``.
        modality: the modality every row must have.
        labels: label columns that must be filled on every row.
        stratify: label columns whose combination the splits keep balanced.
        masks_required: benign/malignant rows must have a lesion mask.
        dedup: near-duplicate detection thresholds.
    """

    name: str
    path: Path
    modality: str
    labels: tuple[str, ...] = ("pathology",)
    stratify: tuple[str, ...] = ("pathology",)
    masks_required: bool = False
    dedup: DedupConfig = field(default_factory=DedupConfig)

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"dataset {self.name}: modality must be one of {MODALITIES}")
        for col in (*self.labels, *self.stratify):
            if col not in LABEL_COLUMNS:
                raise ValueError(f"dataset {self.name}: {col!r} is not a label column {LABEL_COLUMNS}")


@dataclass(frozen=True)
class ValidationRules:
    """Thresholds of the validation stage.

    Attributes:
        min_class_count: every class present in a label column needs this many rows.
        min_side: smallest accepted image side in pixels.
        max_side: largest accepted image side in pixels.
        min_max_intensity: an image whose brightest pixel is below this (in [0, 1]) is
            treated as all-black.
    """

    min_class_count: int = 10
    min_side: int = 32
    max_side: int = 8192
    min_max_intensity: float = 0.02


@dataclass(frozen=True)
class SplitConfig:
    """Leak-free split settings of the prepare stage.

    Attributes:
        seed: seed of the grouped, stratified assignment.
        test_fraction: share of groups held out for the final test.
        val_fraction: share of groups used for validation (early stopping, calibration).
        exclude_label_conflicts: drop duplicate groups whose members disagree on a label.
    """

    seed: int = 42
    test_fraction: float = 0.2
    val_fraction: float = 0.15
    exclude_label_conflicts: bool = True

    def __post_init__(self) -> None:
        if not (0 < self.test_fraction < 1 and 0 < self.val_fraction < 1):
            raise ValueError("test_fraction and val_fraction must be in (0, 1)")
        if self.test_fraction + self.val_fraction >= 0.9:
            raise ValueError("test_fraction + val_fraction leaves too little for training")


@dataclass(frozen=True)
class Params:
    """Everything in params.yaml that the stages read."""

    datasets: dict[str, DatasetConfig]
    validate: ValidationRules
    prepare: SplitConfig
    raw: dict[str, Any]

    def dataset(self, name: str) -> DatasetConfig:
        """The dataset declared under ``datasets.<name>``; KeyError lists the known names."""
        try:
            return self.datasets[name]
        except KeyError:
            known = sorted(self.datasets)
            raise KeyError(f"unknown dataset {name!r}; params.yaml declares {known}") from None


def _dataset(name: str, raw: dict[str, Any]) -> DatasetConfig:
    raw = dict(raw)
    dedup = DedupConfig(**raw.pop("dedup", {}))
    return DatasetConfig(
        name=name,
        path=Path(raw.pop("path")),
        modality=raw.pop("modality"),
        labels=tuple(raw.pop("labels", ("pathology",))),
        stratify=tuple(raw.pop("stratify", ("pathology",))),
        masks_required=bool(raw.pop("masks_required", False)),
        dedup=dedup,
        **_no_extra(name, raw),
    )


def _no_extra(where: str, raw: dict[str, Any]) -> dict[str, Any]:
    if raw:
        raise ValueError(f"params.yaml: unknown keys under {where}: {', '.join(sorted(raw))}")
    return {}


def parse_params(raw: dict[str, Any]) -> Params:
    """Build :class:`Params` from an already-loaded params mapping.

    Raises:
        ValueError: on unknown or invalid keys, with the offending section named.
    """
    datasets = {name: _dataset(name, cfg) for name, cfg in (raw.get("datasets") or {}).items()}
    return Params(
        datasets=datasets,
        validate=ValidationRules(**(raw.get("validate") or {})),
        prepare=SplitConfig(**(raw.get("prepare") or {})),
        raw=raw,
    )


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Read and check ``params.yaml``.

    Args:
        path: the params file.

    Returns:
        The typed parameters.
    """
    with open(path) as fh:
        raw = yaml.safe_load(fh) or {}
    return parse_params(raw)
