"""breastscan.data.splits: near-duplicates merge groups, no group crosses splits, strata balance."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from breastscan.config import DedupConfig, SplitConfig
from breastscan.data.manifest import normalize_manifest, read_manifest
from breastscan.data.splits import (
    EXCLUDED,
    assign_splits,
    cv_folds,
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


# --- grouped, stratified k-fold cross-validation ------------------------------------------


def _cv_frame(n_groups: int = 200, seed: int = 0, n_ungrouped: int = 30) -> pd.DataFrame:
    """Groups of 1-3 rows sharing a label (3 imbalanced classes), plus rows with no group."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 4, n_groups)
    groups = np.repeat([f"g{i:03d}" for i in range(n_groups)], sizes).astype(object)
    labels = np.repeat(rng.choice(["benign", "malignant", "normal"], n_groups, p=[0.55, 0.3, 0.15]),
                       sizes).astype(object)
    extra = rng.choice(["benign", "malignant", "normal"], n_ungrouped, p=[0.55, 0.3, 0.15])
    return pd.DataFrame({
        "image": [f"img{i:04d}.png" for i in range(len(groups) + n_ungrouped)],
        "group": [*groups, *[None] * n_ungrouped],
        "pathology": [*labels, *extra],
    })


def assert_valid_cv(cv: pd.DataFrame, frame: pd.DataFrame, group_col: str, n_folds: int) -> None:
    """The contract of ``cv_folds``' long frame, on any input (shared with the data tests)."""
    assert sorted(cv["fold"].unique()) == list(range(n_folds))
    kept = cv[cv["split"] != EXCLUDED]
    # every fold holds every input row once
    for k in range(n_folds):
        part = cv[cv["fold"] == k]
        assert sorted(part["image"]) == sorted(frame["image"])
        assert set(part["split"]) <= {"train", "val", "test", EXCLUDED}
    # an excluded row is excluded in every fold, a kept row in none
    assert (cv.groupby("image")["split"].agg(lambda s: (s == EXCLUDED).sum()).isin([0, n_folds])).all()
    # exact partition: every kept row is in the test part of exactly one fold
    test = kept[kept["split"] == "test"]
    assert test["image"].is_unique
    assert set(test["image"]) == set(kept["image"])
    # no group leak: a group's rows share one test fold and, within a fold, one part
    grouped = kept.dropna(subset=[group_col])
    assert (grouped[grouped["split"] == "test"].groupby(group_col)["fold"].nunique() == 1).all()
    assert (grouped.groupby([group_col, "fold"])["split"].nunique() == 1).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cv_folds_partition_without_group_leak(seed: int) -> None:
    frame = _cv_frame(seed=seed)
    cv, report = cv_folds(frame, stratify=["pathology"], n_folds=5, seed=seed)
    assert len(cv) == 5 * len(frame)
    assert_valid_cv(cv, frame, "group", 5)
    assert report["n_folds"] == 5 and report["excluded_rows"] == 0
    assert report["n_groups"] == frame["group"].nunique() + frame["group"].isna().sum()
    for k, fold in enumerate(report["folds"]):
        part = cv[cv["fold"] == k]
        assert {s: fold[s]["rows"] for s in ("train", "val", "test")} == \
            part["split"].value_counts().to_dict()


def test_cv_folds_rows_without_group_are_singletons() -> None:
    frame = _cv_frame(n_groups=40, n_ungrouped=60)
    cv, _ = cv_folds(frame, stratify=["pathology"], n_folds=5, seed=3)
    ungrouped = cv[cv["group"].isna() & (cv["split"] == "test")]
    assert len(ungrouped) == 60
    # treated as one group they would all land in one fold; as singletons they spread
    assert ungrouped["fold"].nunique() == 5
    for k in range(5):
        part = cv[(cv["fold"] == k) & cv["group"].isna()]
        assert part["split"].nunique() > 1


@pytest.mark.parametrize("seed", [0, 7])
def test_cv_folds_are_stratified_and_sized(seed: int) -> None:
    frame = _cv_frame(n_groups=400, seed=seed)
    cv, _ = cv_folds(frame, stratify=["pathology"], n_folds=5, seed=seed, val_fraction=0.15)
    overall = frame["pathology"].value_counts(normalize=True)
    for k in range(5):
        part = cv[cv["fold"] == k]
        shares = part["split"].value_counts(normalize=True)
        assert shares["test"] == pytest.approx(0.2, abs=0.03)
        assert shares["val"] == pytest.approx(0.15, abs=0.04)
        for split in ("train", "val", "test"):
            dist = part.loc[part["split"] == split, "pathology"].value_counts(normalize=True)
            for label in overall.index:
                assert dist.get(label, 0) == pytest.approx(overall[label], abs=0.06), (k, split, label)


def test_cv_folds_stratify_on_joint_labels() -> None:
    rng = np.random.default_rng(4)
    frame = _cv_frame(n_groups=300, seed=4, n_ungrouped=0)
    frame["density"] = frame.groupby("group")["group"].transform(lambda s: rng.integers(1, 5))
    cv, _ = cv_folds(frame, stratify=["pathology", "density"], n_folds=4, seed=4)
    joint = frame["pathology"] + "|" + frame["density"].astype(str)
    overall = joint.value_counts(normalize=True)
    test = cv[cv["split"] == "test"]
    for k in range(4):
        t = test[test["fold"] == k]
        dist = (t["pathology"] + "|" + t["density"].astype(str)).value_counts(normalize=True)
        for key in overall.index:
            assert dist.get(key, 0) == pytest.approx(overall[key], abs=0.05)


def test_cv_folds_is_seeded() -> None:
    frame = _cv_frame(seed=5)
    a, _ = cv_folds(frame, stratify=["pathology"], seed=5)
    b, _ = cv_folds(frame.copy(), stratify=["pathology"], seed=5)
    c, _ = cv_folds(frame, stratify=["pathology"], seed=6)
    pd.testing.assert_frame_equal(a, b)
    assert (a["fold"].to_numpy() == c["fold"].to_numpy()).all()  # same layout...
    assert (a["split"].to_numpy() != c["split"].to_numpy()).any()  # ...other assignment
    test_a = a[a["split"] == "test"].set_index("image")["fold"]
    test_c = c[c["split"] == "test"].set_index("image")["fold"]
    assert (test_a != test_c.loc[test_a.index]).any()


def test_cv_folds_keeps_input_index_and_replaces_split_columns() -> None:
    frame = _cv_frame(n_groups=30, n_ungrouped=5)
    frame.index = frame.index * 10 + 7
    frame["split"] = "train"  # e.g. prepare_splits' output
    cv, _ = cv_folds(frame, stratify=["pathology"], n_folds=3, val_fraction=0.1)
    for k in range(3):
        part = cv[cv["fold"] == k]
        assert part.index.tolist() == frame.index.tolist()
        assert {"train", "val", "test"} == set(part["split"])
    assert list(cv.columns) == [*frame.columns.drop("split"), "fold", "split", "exclusion"]


def test_cv_folds_without_validation_part() -> None:
    frame = _cv_frame(n_groups=50)
    cv, report = cv_folds(frame, stratify=["pathology"], n_folds=3, val_fraction=0.0)
    assert set(cv["split"]) == {"train", "test"}
    assert all(f["val"]["rows"] == 0 for f in report["folds"])


def test_cv_folds_merge_several_group_columns() -> None:
    frame = _cv_frame(n_groups=60, n_ungrouped=10)
    # two patients share a duplicate scan: they must land in one fold together
    frame["dup"] = None
    frame.loc[frame["group"] == "g000", "dup"] = "d1"
    frame.loc[frame["group"] == "g001", "dup"] = "d1"
    frame.loc[frame.index[-1], "dup"] = "d1"  # and an ungrouped row joins them
    linked = frame["dup"] == "d1"
    for seed in range(5):
        cv, _ = cv_folds(frame, stratify=["pathology"], group_column=["group", "dup"], n_folds=5,
                         seed=seed)
        rows = cv[cv["image"].isin(frame.loc[linked, "image"])]
        assert (rows.groupby("fold")["split"].nunique() == 1).all()
        assert rows.loc[rows["split"] == "test", "fold"].nunique() == 1


def _conflicted() -> pd.DataFrame:
    frame = _cv_frame(n_groups=80, seed=8)
    for g in ("g001", "g002"):  # same scan filed under two labels
        rows = frame.index[frame["group"] == g]
        frame.loc[rows[0], "pathology"] = "malignant"
        frame = pd.concat([frame, frame.loc[[rows[0]]].assign(
            image=f"{g}_copy.png", pathology="benign")], ignore_index=True)
    return frame


def test_cv_folds_excludes_label_conflicts_when_asked(caplog: pytest.LogCaptureFixture) -> None:
    frame = _conflicted()
    bad = frame["group"].isin(["g001", "g002"])
    with caplog.at_level("WARNING", logger="breastscan.data.splits"):
        cv, report = cv_folds(frame, stratify=["pathology"], n_folds=4, exclude_label_conflicts=True)
    assert report["label_conflict_groups"] == 2
    assert report["excluded_rows"] == int(bad.sum())
    assert "2 label-conflict group(s)" in caplog.text and "excluded" in caplog.text
    excluded = cv[cv["split"] == EXCLUDED]
    assert set(excluded["image"]) == set(frame.loc[bad, "image"])
    assert (excluded["exclusion"] == "label_conflict").all()
    assert cv.loc[cv["split"] != EXCLUDED, "exclusion"].isna().all()
    assert len(excluded) == 4 * bad.sum()  # excluded in every fold
    assert_valid_cv(cv, frame, "group", 4)


def test_cv_folds_reports_but_keeps_conflicts_by_default() -> None:
    frame = _conflicted()
    cv, report = cv_folds(frame, stratify=["pathology"], n_folds=4)
    assert report["label_conflict_groups"] == 2
    assert set(report["label_conflicts"]) == {"group=g001", "group=g002"}
    assert report["excluded_rows"] == 0
    assert (cv["split"] != EXCLUDED).all()
    assert_valid_cv(cv, frame, "group", 4)


def test_cv_folds_conflicts_sought_in_conflict_column() -> None:
    # a patient's left and right breasts may differ: grouped together, no conflict
    frame = pd.DataFrame({
        "image": [f"mdb{i:03d}.png" for i in range(40)],
        "patient": [f"p{i // 2:02d}" for i in range(40)],
        "scan": [f"s{i}" for i in range(40)],
        "pathology": ["normal", "benign", "normal", "malignant", "normal", "normal"] * 6 + ["normal"] * 4,
    })
    _, patient_level = cv_folds(frame, stratify=["pathology"], group_column="patient", n_folds=4)
    assert patient_level["label_conflict_groups"] > 0
    cv, report = cv_folds(frame, stratify=["pathology"], group_column="patient", n_folds=4,
                          conflict_column="scan", exclude_label_conflicts=True)
    assert report["label_conflict_groups"] == 0 and report["excluded_rows"] == 0
    assert_valid_cv(cv, frame, "patient", 4)
    _, unchecked = cv_folds(frame, stratify=["pathology"], group_column="patient", n_folds=4, labels=())
    assert unchecked["label_conflict_groups"] == 0


@pytest.mark.parametrize("n_folds", [1, 0, -3])
def test_cv_folds_rejects_fewer_than_two_folds(n_folds: int) -> None:
    with pytest.raises(ValueError, match=rf"n_folds must be at least 2, got {n_folds}"):
        cv_folds(_cv_frame(n_groups=20), stratify=["pathology"], n_folds=n_folds)


def test_cv_folds_rejects_fewer_groups_than_folds() -> None:
    frame = pd.DataFrame({"image": list("abcdefg"), "group": list("xxxyyzz"),
                          "pathology": ["benign"] * 4 + ["normal"] * 3})
    with pytest.raises(ValueError, match=r"3 group\(s\) to split .*n_folds=5"):
        cv_folds(frame, stratify=["pathology"], n_folds=5)
    # the same frame has enough groups for 3 folds
    cv, _ = cv_folds(frame, stratify=["pathology"], n_folds=3, val_fraction=0.0)
    assert_valid_cv(cv, frame, "group", 3)


def test_cv_folds_counts_groups_after_excluding_conflicts() -> None:
    frame = pd.DataFrame({"image": list("abcdef"), "group": list("xxyzuv"),
                          "pathology": ["benign", "normal", "benign", "normal", "benign", "normal"]})
    with pytest.raises(ValueError, match=r"4 group\(s\) to split .*label conflicts excluded.*n_folds=5"):
        cv_folds(frame, stratify=["pathology"], n_folds=5, exclude_label_conflicts=True)


def test_cv_folds_rejects_bad_arguments() -> None:
    frame = _cv_frame(n_groups=20)
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 0.5\) for n_folds=2, got 0.6"):
        cv_folds(frame, stratify=["pathology"], n_folds=2, val_fraction=0.6)
    with pytest.raises(ValueError, match=r"column\(s\) density, patient not in the frame"):
        cv_folds(frame, stratify=["density"], group_column="patient")
    two = pd.DataFrame({"image": ["a", "b"], "group": ["x", "y"], "pathology": ["benign", "benign"]})
    with pytest.raises(ValueError, match=r"fold 0 of 2 leaves 1 training row\(s\) in 1 group\(s\)"):
        cv_folds(two, stratify=["pathology"], n_folds=2)
    cv, _ = cv_folds(two, stratify=["pathology"], n_folds=2, val_fraction=0)
    assert_valid_cv(cv, two, "group", 2)
    tiny = pd.DataFrame({"image": list("abcd"), "group": list("wxyz"), "pathology": list("aabb")})
    with pytest.raises(ValueError, match=r"cannot make 3 folds of 4 row\(s\) in 4 group\(s\)"):
        cv_folds(tiny, stratify=["pathology"], n_folds=3)
