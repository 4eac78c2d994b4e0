"""Validation and leak-free splitting on the real packs in ../shared/datasets (opt-in data tests).

BUSI's known defects are the yardstick: 145 near-duplicate groups over 333 images and 8
groups with conflicting labels (see the pack's README). Our detector, given no group
information at all, must find nearly all of them.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import pandas as pd
import pytest

from breastscan.config import DatasetConfig, DedupConfig, SplitConfig, ValidationRules, load_params
from breastscan.data.manifest import normalize_manifest
from breastscan.data.splits import EXCLUDED, prepare_splits
from breastscan.data.validation import validate_dataset
from tests.conftest import REPO

pytestmark = [pytest.mark.data, pytest.mark.slow]


@pytest.fixture(scope="module")
def busi(shared_datasets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from breastscan.data.adapters.generic import convert_csv

    out = tmp_path_factory.mktemp("busi")
    convert_csv(shared_datasets / "busi" / "manifest.csv", out,
                columns={"label": "pathology"}, modality="ultrasound")
    return out


@pytest.fixture(scope="module")
def mias(shared_datasets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from breastscan.data.adapters.generic import convert_csv

    out = tmp_path_factory.mktemp("mias")
    convert_csv(shared_datasets / "mini_mias" / "manifest.csv", out,
                columns={"patient_id": "group"}, modality="mammography",
                roi=("x", "y", "radius"))
    return out


def test_busi_passes_validation(busi: Path) -> None:
    cfg = DatasetConfig("busi", busi, "ultrasound", masks_required=True)
    report = validate_dataset(busi, cfg, ValidationRules())
    assert report.success, report.summary()
    assert report.statistics["label_counts"]["pathology"] == {"benign": 437, "malignant": 210, "normal": 133}


def test_mias_passes_validation(mias: Path) -> None:
    cfg = DatasetConfig("mias", mias, "mammography", labels=("density", "pathology"),
                        stratify=("pathology",), masks_required=True)
    report = validate_dataset(mias, cfg, ValidationRules())
    assert report.success, report.summary()
    assert report.statistics["label_counts"]["density"] == {"1": 106, "2": 104, "3": 112}


def _pairs(groups: pd.Series) -> set[frozenset[str]]:
    out: set[frozenset[str]] = set()
    for _, members in groups.groupby(groups):
        out |= {frozenset(p) for p in combinations(members.index, 2)}
    return out


def test_busi_near_duplicates_found_blind(busi: Path, shared_datasets: Path) -> None:
    """With no group information, the ultrasound dedup settings recover BUSI's duplicate groups."""
    reference = pd.read_csv(shared_datasets / "busi" / "manifest.csv")
    manifest = normalize_manifest(pd.read_csv(busi / "manifest.csv", dtype=str))
    manifest["group"] = manifest["image"]  # forget the pack's dup_group
    dedup = load_params(REPO / "params.yaml").dataset("ultrasound").dedup
    out, report = prepare_splits(manifest, busi, labels=["pathology"], stratify=["pathology"],
                                 dedup=dedup, cfg=SplitConfig(exclude_label_conflicts=True))
    ours = _pairs(out.set_index(reference["image"])["dup_group"])
    ref = _pairs(reference.set_index("image")["dup_group"].dropna())
    recall = len(ours & ref) / len(ref)
    precision = len(ours & ref) / len(ours)
    assert recall >= 0.9, f"recall of reference duplicate pairs {recall:.3f}"
    assert precision >= 0.9, f"precision {precision:.3f}"
    # the 8 label-conflict groups of the README are found and excluded
    assert report["summary"]["label_conflict_groups"] >= 8
    conflicted = set(reference.loc[reference["dup_label_conflict"] == 1, "image"])
    excluded = set(reference["image"][out["split"] == EXCLUDED])
    # The reference links groups with a looser second rule (Hamming <= 16 and correlation
    # >= 0.90); one benign frame of its g101 is only reachable through that rule.
    missed = conflicted - excluded
    assert len(missed) <= 1, f"conflicting images kept: {sorted(missed)}"


def test_busi_splits_do_not_leak_reference_groups(busi: Path, shared_datasets: Path) -> None:
    reference = pd.read_csv(shared_datasets / "busi" / "manifest.csv")
    manifest = normalize_manifest(pd.read_csv(busi / "manifest.csv", dtype=str))
    manifest["group"] = reference["dup_group"].fillna(reference["image"]).to_numpy()
    out, _ = prepare_splits(manifest, busi, labels=["pathology"], stratify=["pathology"],
                            dedup=DedupConfig(max_hamming=10, min_correlation=0.85), cfg=SplitConfig())
    kept = out[out["split"] != EXCLUDED]
    assert (kept.groupby("group")["split"].nunique() == 1).all()


def test_mias_patients_stay_together(mias: Path) -> None:
    manifest = normalize_manifest(pd.read_csv(mias / "manifest.csv", dtype=str))
    out, _ = prepare_splits(manifest, mias, labels=["density", "pathology"], stratify=["pathology"],
                            dedup=DedupConfig(max_hamming=4, min_correlation=0.97), cfg=SplitConfig())
    kept = out[out["split"] != EXCLUDED]
    assert (kept.groupby("group")["split"].nunique() == 1).all()
    assert out["group"].nunique() == 161
