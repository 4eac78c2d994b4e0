"""breastscan.data.phantoms: deterministic, labels agree with masks, classes differ as designed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from breastscan.cli import main
from breastscan.data.manifest import CONTRACT_COLUMNS, read_manifest
from breastscan.data.phantoms import (
    DENSE_FRACTION,
    generate_dataset,
    mammography_phantom,
    ultrasound_phantom,
)
from breastscan.imaging.files import read_mask


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    opts = {"n_images": 12, "duplicate_rate": 0.2, "label_conflicts": 1}
    a = generate_dataset(tmp_path / "a", "ultrasound", seed=4, **opts)
    b = generate_dataset(tmp_path / "b", "ultrasound", seed=4, **opts)
    generate_dataset(tmp_path / "c", "ultrasound", seed=5, **opts)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert a.equals(b)
    da, dc = _digest(tmp_path / "a"), _digest(tmp_path / "c")
    assert sum(da[k] != dc.get(k) for k in da if k.startswith("images/")) >= 10


def test_image_does_not_depend_on_dataset_size(tmp_path: Path) -> None:
    only_benign = {"pathology": {"benign": 1.0}}
    for name, n in (("small", 4), ("big", 9)):
        generate_dataset(tmp_path / name, "ultrasound", n_images=n, seed=1, duplicate_rate=0,
                         label_conflicts=0, proportions=only_benign)
    # image i is drawn from rng([seed, i]) alone
    for i in range(4):
        name = f"images/us_{i:04d}.png"
        assert (tmp_path / "small" / name).read_bytes() == (tmp_path / "big" / name).read_bytes()


@pytest.mark.parametrize("modality", ["mammography", "ultrasound"])
def test_manifest_contract_and_mask_agreement(tmp_path: Path, modality: str) -> None:
    df = generate_dataset(tmp_path, modality, n_images=40, seed=0, duplicate_rate=0.1, label_conflicts=1)
    on_disk = read_manifest(tmp_path)
    assert list(on_disk.columns[: len(CONTRACT_COLUMNS)]) == list(CONTRACT_COLUMNS)
    assert len(on_disk) == 40 and on_disk["image"].is_unique
    assert set(on_disk["modality"]) == {modality}
    if modality == "mammography":
        assert set(df["density"].astype(int)) <= {1, 2, 3, 4}
        # both breasts of a patient share the patient's density
        assert (df.groupby("group")["density"].nunique() == 1).all()
    else:
        assert on_disk["density"].isna().all()
    for _, row in on_disk.iterrows():
        mask = read_mask(tmp_path / row["mask"])
        image = np.asarray(cv2.imread(str(tmp_path / row["image"]), 0))
        assert mask.shape == image.shape
        if row["pathology"] == "normal":
            assert not mask.any(), row["image"]
        else:
            assert mask.sum() >= 20, row["image"]
            # the lesion differs from its surroundings
            ring = cv2.dilate(mask.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool) & ~mask
            assert abs(image[mask].mean() - image[ring].mean()) > 5, row["image"]


def test_planted_defects_are_recorded(tmp_path: Path) -> None:
    df = generate_dataset(tmp_path, "ultrasound", n_images=50, seed=2, duplicate_rate=0.1, label_conflicts=2)
    planted = df[df["planted"] != ""]
    assert len(planted) == 5
    assert (planted["planted"] == "label_conflict").sum() == 2
    for _, row in planted.iterrows():
        original = df[(df["phantom_id"] == row["phantom_id"]) & (df["planted"] == "")].iloc[0]
        assert row["group"] != original["group"]
        same_label = row["pathology"] == original["pathology"]
        assert same_label == (row["planted"] == "near_duplicate")


def test_density_raises_the_dense_fraction() -> None:
    def dense_share(level: int) -> float:
        shares = []
        for i in range(12):
            img, _ = mammography_phantom(np.random.default_rng([9, i]), density=level, pathology="normal")
            breast = img > 20
            shares.append((img[breast] > np.percentile(img[breast], 5) + 60).mean())
        return float(np.median(shares))

    means = [dense_share(level) for level in (1, 2, 3, 4)]
    assert means == sorted(means), means
    assert means[3] - means[0] > 0.3
    assert all(lo < hi for lo, hi in DENSE_FRACTION.values())


def test_ultrasound_lesion_shapes_and_shadow() -> None:
    def stats(pathology: str) -> tuple[float, float]:
        ratios, shadows = [], []
        for i in range(16):
            img, mask = ultrasound_phantom(np.random.default_rng([11, i]), pathology=pathology)
            ys, xs = np.nonzero(mask)
            ratios.append((np.ptp(ys) + 1) / (np.ptp(xs) + 1))
            cols = np.unique(xs)
            below = img[ys.max() + 3:, cols].astype(float)
            side = img[ys.max() + 3:, :].astype(float)
            shadows.append(below.mean() / side.mean())
        return float(np.median(ratios)), float(np.median(shadows))

    benign_ratio, benign_shadow = stats("benign")
    malignant_ratio, malignant_shadow = stats("malignant")
    assert benign_ratio < 1.0 < malignant_ratio  # wider-than-tall vs taller-than-wide
    assert malignant_shadow < 0.9 < benign_shadow  # posterior shadowing


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="density"):
        mammography_phantom(np.random.default_rng(0), density=5, pathology="normal")
    with pytest.raises(ValueError, match="pathology"):
        ultrasound_phantom(np.random.default_rng(0), pathology="Benign")
    with pytest.raises(ValueError, match="modality"):
        generate_dataset(tmp_path, "mri", n_images=4)
    with pytest.raises(ValueError, match="label_conflicts"):
        generate_dataset(tmp_path, "ultrasound", n_images=10, duplicate_rate=0.1, label_conflicts=3)


def test_synth_command(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["synth", "--out", str(tmp_path / "d"), "--n-mammography", "20",
                                       "--n-ultrasound", "20", "--seed", "1", "--label-conflicts", "1"])
    assert result.exit_code == 0, result.output
    assert len(read_manifest(tmp_path / "d" / "mammography")) == 20
    assert len(read_manifest(tmp_path / "d" / "ultrasound")) == 20


def test_synth_command_reports_bad_counts(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["synth", "--out", str(tmp_path / "d"), "--n-mammography", "20"])
    assert result.exit_code == 2
    assert "label_conflicts (2) exceeds planted duplicates (1)" in result.output
