"""breastscan.splits: near-duplicates merge groups, no group crosses splits, strata balance."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from breastscan.config import DedupConfig, SplitConfig
from breastscan.manifest import normalize_manifest, read_manifest
from breastscan.splits import (
    EXCLUDED,
    assign_splits,
    fingerprint,
    label_conflicts,
    merge_groups,
    near_duplicate_pairs,
    prepare_splits,
)


def _blobs(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    import cv2

    return [
        cv2.GaussianBlur(rng.random((80, 80)).astype(np.float32), (0, 0), 4) * 4 % 1.0
        for _ in range(n)
    ]


def test_near_duplicates_found_and_distinct_images_not() -> None:
    imgs = _blobs(6)
    shifted = np.roll(imgs[2], 1, axis=1) * 0.97 + 0.01  # same scan, 1 px shift, dimmer
    fp = fingerprint([*imgs, shifted])
    pairs = near_duplicate_pairs(fp, DedupConfig(max_hamming=10, min_correlation=0.8))
    assert pairs == [(2, 6)]


def test_near_duplicate_blocks_give_same_pairs() -> None:
    imgs = _blobs(12, seed=1)
    imgs += [np.roll(imgs[i], 1, axis=0) for i in (0, 5, 9)]
    fp = fingerprint(imgs)
    cfg = DedupConfig(max_hamming=10, min_correlation=0.8)
    assert near_duplicate_pairs(fp, cfg, block=4) == near_duplicate_pairs(fp, cfg, block=1000)


def test_merge_groups_is_transitive_and_keeps_patients() -> None:
    groups = ["p1", "p1", "p2", "p3", "p4", "p5"]
    merged = merge_groups(groups, [(1, 2), (2, 3)])
    # p1 (rows 0, 1) -- dup --> p2 -- dup --> p3: one component named p1
    assert merged[:4] == ["p1"] * 4
    assert merged[4:] == ["p4", "p5"]


def test_label_conflicts_reports_only_disagreeing_groups() -> None:
    df = pd.DataFrame({
        "g": ["a", "a", "b", "b", "c"],
        "pathology": ["benign", "malignant", "normal", "normal", "benign"],
        "density": [1, 1, 2, 3, pd.NA],
    })
    found = label_conflicts(df, "g", ["pathology", "density"])
    assert found == {"a": {"pathology": ["benign", "malignant"]}, "b": {"density": ["2", "3"]}}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_assign_splits_no_group_leak_and_stratified(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_groups = 300
    sizes = rng.integers(1, 4, n_groups)
    groups = np.repeat([f"g{i}" for i in range(n_groups)], sizes)
    group_label = rng.choice(["benign", "malignant", "normal"], n_groups, p=[0.55, 0.3, 0.15])
    y = np.repeat(group_label, sizes)
    split = assign_splits(y, groups, SplitConfig(seed=seed, test_fraction=0.2, val_fraction=0.15))
    frame = pd.DataFrame({"g": groups, "y": y, "split": split})
    assert (frame.groupby("g")["split"].nunique() == 1).all(), "a group crosses splits"
    shares = frame["split"].value_counts(normalize=True)
    assert shares["test"] == pytest.approx(0.2, abs=0.05)
    assert shares["val"] == pytest.approx(0.15, abs=0.05)
    overall = frame["y"].value_counts(normalize=True)
    for part in ("train", "val", "test"):
        dist = frame.loc[frame.split == part, "y"].value_counts(normalize=True)
        for label in overall.index:
            assert dist.get(label, 0) == pytest.approx(overall[label], abs=0.07)


def test_assign_splits_is_seeded() -> None:
    y = np.array(["a", "b"] * 50)
    g = np.array([f"g{i // 2}" for i in range(100)])
    cfg = SplitConfig(seed=5)
    assert (assign_splits(y, g, cfg) == assign_splits(y, g, cfg)).all()
    assert (assign_splits(y, g, cfg) != assign_splits(y, g, SplitConfig(seed=6))).any()


def test_prepare_splits_on_phantoms_finds_planted_defects(tiny_phantoms) -> None:
    root = tiny_phantoms / "ultrasound"
    manifest = normalize_manifest(read_manifest(root))
    out, report = prepare_splits(
        manifest, root, labels=["pathology"], stratify=["pathology"],
        dedup=DedupConfig(max_hamming=10, min_correlation=0.85),
        cfg=SplitConfig(seed=1, exclude_label_conflicts=True),
    )
    planted = out[out["planted"].fillna("") != ""]
    assert len(planted) > 0
    # every planted copy is merged with its original (same phantom, new group)
    for _, row in planted.iterrows():
        siblings = out[out["phantom_id"] == row["phantom_id"]]
        assert siblings["dup_group"].nunique() == 1, f"{row['image']} not merged"
    # the planted label conflict is reported and excluded, nothing else is
    conflict_ids = set(out.loc[out["planted"] == "label_conflict", "phantom_id"])
    excluded = out[out["split"] == EXCLUDED]
    assert set(excluded["phantom_id"]) == conflict_ids
    assert report["summary"]["label_conflict_groups"] == len(conflict_ids)
    kept = out[out["split"] != EXCLUDED]
    assert (kept.groupby("dup_group")["split"].nunique() == 1).all()
    assert (kept.groupby("group")["split"].nunique() == 1).all()
    # no false merges: distinct phantoms stay in distinct dup groups
    per_group = out.groupby("dup_group")["phantom_id"].nunique()
    assert (per_group == 1).all()


def test_prepare_splits_keeps_conflicts_when_asked(tiny_phantoms) -> None:
    root = tiny_phantoms / "ultrasound"
    manifest = normalize_manifest(read_manifest(root))
    out, report = prepare_splits(
        manifest, root, labels=["pathology"], stratify=["pathology"],
        dedup=DedupConfig(max_hamming=10, min_correlation=0.85),
        cfg=SplitConfig(seed=1, exclude_label_conflicts=False),
    )
    assert report["summary"]["label_conflict_groups"] >= 1
    assert (out["split"] != EXCLUDED).all()


def test_patient_images_with_different_labels_are_not_conflicts(tiny_phantoms) -> None:
    root = tiny_phantoms / "mammography"
    manifest = normalize_manifest(read_manifest(root))
    out, report = prepare_splits(
        manifest, root, labels=["density", "pathology"], stratify=["pathology"],
        dedup=DedupConfig(max_hamming=10, min_correlation=0.96),
        cfg=SplitConfig(seed=1, exclude_label_conflicts=True),
    )
    two_breasts = out.groupby("group")["pathology"].nunique()
    assert (two_breasts > 1).any()  # patients whose breasts differ exist...
    conflict_ids = set(out.loc[out["planted"] == "label_conflict", "phantom_id"])
    excluded = out[out["split"] == EXCLUDED]
    assert set(excluded["phantom_id"]) == conflict_ids  # ...and only planted conflicts are excluded
    assert report["summary"]["label_conflict_groups"] == len(conflict_ids)
    kept = out[out["split"] != EXCLUDED]
    assert (kept.groupby("group")["split"].nunique() == 1).all()
