"""breastscan.data.loading (split arrays, excluded rows, labels) and breastscan.models.inputs (class
weights, tf.data pipelines)."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from breastscan.config import AugmentConfig, DedupConfig, ModelConfig, SplitConfig
from breastscan.data.loading import SplitData, load_split, read_splits
from breastscan.data.manifest import normalize_manifest, read_manifest
from breastscan.data.splits import prepare_splits
from breastscan.imaging.preprocessing import PreprocessSpec, decode_image, preprocess_image
from breastscan.models.inputs import class_weights, make_dataset

SPEC = PreprocessSpec(height=32, width=32)
NO_AUGMENT = AugmentConfig(flip=False, rotation_deg=0.0, brightness=0.0, contrast=0.0)
DENSITY = ModelConfig(name="density", task="classification", dataset="mammography", label="density",
                      classes=(1, 2, 3, 4), preprocess=SPEC, batch_size=8, imbalance="none")
LESION = ModelConfig(name="lesion", task="segmentation", dataset="ultrasound", label="mask", depth=2,
                     preprocess=SPEC, batch_size=8, imbalance="none")


def _splits(root: Path, out: Path, labels: tuple[str, ...]) -> Path:
    manifest = normalize_manifest(read_manifest(root))
    df, _ = prepare_splits(manifest, root, labels=labels, stratify=("pathology",),
                           dedup=DedupConfig(max_hamming=10, min_correlation=0.9),
                           cfg=SplitConfig(seed=1, test_fraction=0.2, val_fraction=0.2))
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    return out


@pytest.fixture(scope="module")
def mammo(tiny_phantoms: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(splits.csv, dataset root) of the tiny mammography phantoms."""
    root = tiny_phantoms / "mammography"
    return _splits(root, tmp_path_factory.mktemp("mg") / "splits.csv", ("density", "pathology")), root


@pytest.fixture(scope="module")
def ultra(tiny_phantoms: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(splits.csv, dataset root) of the tiny ultrasound phantoms."""
    root = tiny_phantoms / "ultrasound"
    return _splits(root, tmp_path_factory.mktemp("us") / "splits.csv", ("pathology",)), root


def _edited(csv: Path, tmp_path: Path, edit: Any) -> Path:
    df = read_splits(csv)
    edit(df)
    out = tmp_path / "splits.csv"
    df.to_csv(out, index=False)
    return out


def _synthetic(targets: list[int], size: int = 32, seed: int = 0) -> SplitData:
    rng = np.random.default_rng(seed)
    n = len(targets)
    images = rng.random((n, size, size, 1)).astype(np.float32)
    frame = pd.DataFrame({"image": [f"img_{i}.png" for i in range(n)]})
    return SplitData(images=images, targets=np.asarray(targets, np.int64), frame=frame,
                     groups=np.array([f"g{i}" for i in range(n)]))


def _collect(ds: Any) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds], strict=True)
    return np.concatenate(xs), np.concatenate(ys)


# --------------------------------------------------------------------------- load_split


def test_load_split_shapes_ranges_and_groups(mammo: tuple[Path, Path]) -> None:
    csv, root = mammo
    rows = read_splits(csv)
    total = 0
    for split in ("train", "val", "test"):
        data = load_split(csv, root, DENSITY, split)
        n = int((rows["split"] == split).sum())
        assert len(data) == n > 0
        assert data.images.shape == (n, 32, 32, 1) and data.images.dtype == np.float32
        assert 0.0 <= data.images.min() and data.images.max() <= 1.0 and data.images.max() > 0.1
        assert data.targets.shape == (n,) and data.targets.dtype == np.int64
        assert set(data.targets) <= {0, 1, 2, 3}
        np.testing.assert_array_equal(data.targets, data.frame["density"].astype(int).to_numpy() - 1)
        np.testing.assert_array_equal(data.groups, data.frame["dup_group"].to_numpy())
        assert (data.frame["split"] == split).all()
        total += n
    assert total == int((rows["split"] != "excluded").sum())


def test_images_use_the_serving_preprocessing(mammo: tuple[Path, Path]) -> None:
    csv, root = mammo
    spec = PreprocessSpec(height=32, width=32, clahe=True)
    cfg = ModelConfig(name="tumor", task="classification", dataset="mammography", label="pathology",
                      classes=("benign", "malignant", "normal"), preprocess=spec)
    data = load_split(csv, root, cfg, "val")
    for i in (0, len(data) - 1):
        served, _ = preprocess_image(decode_image(root / data.frame.at[i, "image"]), spec)
        np.testing.assert_array_equal(data.images[i], served)
    index = dict(zip(cfg.classes, range(3), strict=True))
    assert data.targets.tolist() == [index[v] for v in data.frame["pathology"]]


def test_excluded_rows_are_never_used(mammo: tuple[Path, Path], tmp_path: Path) -> None:
    csv, root = mammo
    rows = read_splits(csv)
    excluded = set(rows.loc[rows["split"] == "excluded", "image"])
    assert excluded, "the tiny phantoms plant a label conflict, which must be excluded"
    train_images = rows.loc[rows["split"] == "train", "image"].tolist()[:5]

    def exclude(df: pd.DataFrame) -> None:
        df.loc[df["image"].isin(train_images), "split"] = "excluded"

    edited = _edited(csv, tmp_path, exclude)
    used: set[str] = set()
    for split in ("train", "val", "test"):
        used |= set(load_split(edited, root, DENSITY, split).frame["image"])
    assert used and not used & (excluded | set(train_images))
    with pytest.raises(ValueError, match="split must be one of"):
        load_split(edited, root, DENSITY, "excluded")


def test_unknown_label_raises_naming_the_image(mammo: tuple[Path, Path], tmp_path: Path) -> None:
    csv, root = mammo
    rows = read_splits(csv)
    victim = rows.loc[rows["split"] == "train", "image"].iloc[3]

    def corrupt(df: pd.DataFrame) -> None:
        df.loc[df["image"] == victim, "density"] = "7"

    with pytest.raises(ValueError, match=rf"{victim}.*density='7'"):
        load_split(_edited(csv, tmp_path, corrupt), root, DENSITY, "train")


def test_empty_labels_are_dropped_and_counted(mammo: tuple[Path, Path], tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    csv, root = mammo
    rows = read_splits(csv)
    blanked = rows.loc[rows["split"] == "val", "image"].tolist()[:3]

    def blank(df: pd.DataFrame) -> None:
        df.loc[df["image"].isin(blanked), "density"] = None

    with caplog.at_level(logging.INFO, logger="breastscan.data.loading"):
        data = load_split(_edited(csv, tmp_path, blank), root, DENSITY, "val")
    assert len(data) == int((rows["split"] == "val").sum()) - 3
    assert not set(blanked) & set(data.frame["image"])
    assert f"density: dropped 3 row(s) (label cell is empty), e.g. {blanked[0]}" in caplog.text


# --------------------------------------------------------------------------- segmentation


def test_segmentation_masks_align_with_images(ultra: tuple[Path, Path]) -> None:
    csv, root = ultra
    data = load_split(csv, root, LESION, "train")
    assert data.targets.shape == data.images.shape == (len(data), 32, 32, 1)
    assert data.targets.dtype == np.float32 and set(np.unique(data.targets)) <= {0.0, 1.0}
    mask = data.targets[..., 0] > 0.5
    has_lesion = mask.reshape(len(data), -1).any(axis=1)
    normal = (data.frame["pathology"] == "normal").to_numpy()
    assert normal.any() and not has_lesion[normal].any()
    assert has_lesion[~normal].all()
    # Phantom lesions are hypoechoic: a mask on the lesion covers darker pixels than the
    # rest of the scan (the zero letterbox padding left out); a misplaced mask would not.
    for x, m in zip(data.images[has_lesion, ..., 0], mask[has_lesion], strict=True):
        assert x[m].mean() < x[(x > 0) & ~m].mean()


def test_rows_without_mask(ultra: tuple[Path, Path], tmp_path: Path,
                           caplog: pytest.LogCaptureFixture) -> None:
    csv, root = ultra
    rows = read_splits(csv)
    test_rows = rows[rows["split"] == "test"]
    normal = test_rows.loc[test_rows["pathology"] == "normal", "image"].iloc[0]
    lesion = test_rows.loc[test_rows["pathology"] != "normal", "image"].iloc[0]

    def drop_masks(df: pd.DataFrame) -> None:
        df.loc[df["image"].isin([normal, lesion]), "mask"] = None

    with caplog.at_level(logging.WARNING, logger="breastscan.data.loading"):
        data = load_split(_edited(csv, tmp_path, drop_masks), root, LESION, "test")
    images = data.frame["image"].tolist()
    assert lesion not in images
    assert normal in images and data.targets[images.index(normal)].max() == 0.0
    assert len(data) == len(test_rows) - 1
    assert f"lesion: dropped 1 row(s) (lesion image without a mask), e.g. {lesion}" in caplog.text


# --------------------------------------------------------------------------- class weights


def test_class_weights_inverse_frequency() -> None:
    weights = class_weights(np.array([0, 0, 0, 1]), 3)
    assert weights == pytest.approx({0: 4 / (2 * 3), 1: 4 / (2 * 1), 2: 1.0})
    assert class_weights(np.array([1, 0, 1, 0]), 2) == pytest.approx({0: 1.0, 1: 1.0})
    with pytest.raises(ValueError, match="outside"):
        class_weights(np.array([0, 3]), 3)
    with pytest.raises(ValueError, match="no targets"):
        class_weights(np.array([], np.int64), 3)


# --------------------------------------------------------------------------- tf.data


def test_balanced_sampling_balances_classes() -> None:
    targets = [0] * 60 + [1] * 6 + [2] * 6
    data = _synthetic(targets)
    cfg = ModelConfig(name="tumor", task="classification", dataset="mammography", label="pathology",
                      classes=("benign", "malignant", "normal"), preprocess=SPEC, batch_size=16,
                      imbalance="balanced_sampling", augment=NO_AUGMENT, seed=3)
    ds = make_dataset(data, cfg, training=True)
    epochs = [_collect(ds)[1] for _ in range(4)]
    assert all(len(e) == 5 * 16 for e in epochs)  # ceil(72 / 16) batches an epoch
    assert not all(np.array_equal(epochs[0], e) for e in epochs[1:])  # redrawn every epoch
    shares = np.bincount(np.concatenate(epochs), minlength=3) / (4 * 80)
    assert np.all(np.abs(shares - 1 / 3) < 0.1), shares
    plain = _collect(make_dataset(data, replace(cfg, imbalance="none"), training=True))[1]
    assert len(plain) == 4 * 16  # full batches only: 72 % 16 = 8 sit the epoch out
    assert not Counter(plain.tolist()) - Counter(targets)  # no resampling without the option


def test_augmentation_only_in_training() -> None:
    data = _synthetic([0, 1, 2, 3] * 5)
    aug = AugmentConfig(flip=True, rotation_deg=20.0, brightness=0.1, contrast=0.1)
    cfg = replace(DENSITY, augment=aug, batch_size=6)

    x_eval, y_eval = _collect(make_dataset(data, cfg, training=False))
    np.testing.assert_array_equal(x_eval, data.images)  # file order, untouched
    np.testing.assert_array_equal(y_eval, data.targets)

    x_train, y_train = _collect(make_dataset(data, cfg, training=True))
    assert x_train.shape == (18, *data.images.shape[1:]) and x_train.dtype == np.float32  # 3 full batches
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    assert not Counter(y_train.tolist()) - Counter(data.targets.tolist())
    nearest = np.abs(x_train[:, None] - data.images[None]).max(axis=(2, 3, 4)).min(axis=1)
    assert (nearest > 1e-3).all()  # every training image was transformed

    plain_ds = make_dataset(data, replace(cfg, augment=NO_AUGMENT), training=True)
    seen = []
    for _ in range(2):  # two epochs
        x_plain, y_plain = _collect(plain_ds)
        match = np.abs(x_plain[:, None] - data.images[None]).max(axis=(2, 3, 4)).argmin(axis=1)
        np.testing.assert_array_equal(x_plain, data.images[match])  # shuffled copies, unchanged
        np.testing.assert_array_equal(y_plain, data.targets[match])
        assert len(set(match.tolist())) == len(match) == 18 and match.tolist() != list(range(18))
        seen.append(set(match.tolist()))
    assert seen[0] != seen[1]  # the two images left out change from epoch to epoch


def test_pair_augmentation_keeps_masks_aligned() -> None:
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:32, :32]
    masks = np.stack([((yy - rng.integers(8, 24)) ** 2 + (xx - rng.integers(4, 16)) ** 2 < 30)
                      for _ in range(12)]).astype(np.float32)[..., None]
    data = SplitData(images=masks.copy(), targets=masks, frame=pd.DataFrame({"image": range(12)}),
                     groups=np.arange(12).astype(str))
    aug = AugmentConfig(flip=True, rotation_deg=30.0, brightness=0.0, contrast=0.0)
    cfg = replace(LESION, augment=aug, batch_size=4)
    x, y = _collect(make_dataset(data, cfg, training=True))
    assert x.shape == y.shape == masks.shape and set(np.unique(y)) <= {0.0, 1.0}
    # The image *is* its mask: one geometric transform for both keeps them identical.
    np.testing.assert_array_equal(x >= 0.5, y > 0.5)
    unchanged = [any(np.array_equal(a, b) for b in masks) for a in y]
    assert sum(unchanged) <= len(y) // 2  # the transform did move the masks
    _, y_eval = _collect(make_dataset(data, cfg, training=False))
    np.testing.assert_array_equal(y_eval, masks)


def test_empty_split_is_refused() -> None:
    empty = SplitData(images=np.zeros((0, 32, 32, 1), np.float32), targets=np.zeros((0,), np.int64),
                      frame=pd.DataFrame({"image": []}), groups=np.array([], str))
    with pytest.raises(ValueError, match="empty split"):
        make_dataset(empty, DENSITY, training=False)
