"""Pools of sites: declaration, per-site splits, partial labels, per-site scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from breastscan.config import SplitConfig, parse_params
from breastscan.data.phantoms import generate_dataset
from breastscan.data.pools import SITE_COLUMN, allowed_classes, prepare_pool, site_classes
from breastscan.models.losses import encode_partial_labels

BASE = {"validate": {}, "prepare": {}}


def _pool(root: Path, **extra: object) -> dict:
    return {"datasets": {"us": {"path": str(root), "modality": "ultrasound", "masks_required": True,
                                "sites": {"cairo": str(root / "a"), "rio": str(root / "b")}, **extra}},
            **BASE}


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two phantom ultrasound sites; the second has no normal images (as BUS-BRA)."""
    root = tmp_path_factory.mktemp("pool")
    generate_dataset(root / "a", "ultrasound", n_images=40, seed=1, duplicate_rate=0.1, label_conflicts=0)
    generate_dataset(root / "b", "ultrasound", n_images=30, seed=2, duplicate_rate=0.1, label_conflicts=0,
                     proportions={"pathology": {"benign": 0.6, "malignant": 0.4}})
    return root


def test_a_pool_is_declared_with_sites_inside_its_path(tmp_path: Path) -> None:
    pool = parse_params(_pool(tmp_path)).dataset("us")
    assert pool.is_pool and sorted(pool.sites) == ["cairo", "rio"]
    site = pool.site("rio")
    assert site.name == "us/rio" and site.path == tmp_path / "b" and not site.is_pool
    assert site.modality == "ultrasound" and site.masks_required


@pytest.mark.parametrize("sites, message", [
    ({"cairo": "a"}, "at least two sites"),
    ({"cairo": "{root}/a", "rio": "/elsewhere/b"}, "inside the pool's path"),
    ({"cairo": "{root}/a", "Rio": "{root}/b"}, "site name"),
])
def test_a_bad_pool_is_refused(tmp_path: Path, sites: dict, message: str) -> None:
    raw = _pool(tmp_path)
    raw["datasets"]["us"]["sites"] = {k: v.format(root=tmp_path) for k, v in sites.items()}
    with pytest.raises(ValueError, match=message):
        parse_params(raw)


def test_each_site_is_split_on_its_own_and_stacked(two_sites: Path) -> None:
    pool = parse_params(_pool(two_sites)).dataset("us")
    frame, report = prepare_pool(pool, SplitConfig(seed=0))
    assert list(frame[SITE_COLUMN].unique()) == ["cairo", "rio"]
    assert len(frame) == 70 and report["summary"]["n_images"] == 70
    # paths resolve from the pool's folder; groups never shared between sites or splits
    assert all((two_sites / p).is_file() for p in frame["image"])
    assert all(g.startswith(f"{s}:") for s, g in zip(frame[SITE_COLUMN], frame["dup_group"], strict=True))
    kept = frame[frame["split"] != "excluded"]
    assert (kept.groupby("dup_group")["split"].nunique() == 1).all()
    # each site has every split of its own, as its own prepare would give
    for site in ("cairo", "rio"):
        assert set(kept.loc[kept[SITE_COLUMN] == site, "split"]) == {"train", "val", "test"}
        assert report["summary"]["sites"][site]["n_images"] == (frame[SITE_COLUMN] == site).sum()
    assert report["summary"]["splits"]["test"]["site=rio"] == ((kept[SITE_COLUMN] == "rio")
                                                              & (kept["split"] == "test")).sum()
    assert len(frame["image_md5"].dropna()) == 70


def test_site_classes_names_what_each_site_can_label() -> None:
    frame = pd.DataFrame({SITE_COLUMN: ["a", "a", "a", "b", "b"],
                          "pathology": ["benign", "malignant", "normal", "benign", "malignant"]})
    sets = site_classes(frame, "pathology", ["benign", "malignant", "normal"])
    assert sets == {"a": (True, True, True), "b": (True, True, False)}
    allowed = allowed_classes(frame, sets, 3)
    assert allowed.tolist() == [[True] * 3] * 3 + [[True, True, False]] * 2
    only_a = frame[frame[SITE_COLUMN] == "a"]
    assert site_classes(only_a, "pathology", ["benign", "malignant", "normal"]) == {}
    assert site_classes(frame.drop(columns=SITE_COLUMN), "pathology", ["benign", "malignant"]) == {}


def test_partial_labels_pack_class_and_class_set() -> None:
    allowed = np.array([[1, 1, 1], [1, 1, 0], [1, 1, 0]], bool)
    codes, table = encode_partial_labels(np.array([2, 0, 1]), allowed)
    assert len(table) == 2 and [codes[i] % 3 for i in range(3)] == [2, 0, 1]
    assert [table[c // 3] for c in codes] == [[True, True, True], [True, True, False], [True, True, False]]
    with pytest.raises(ValueError, match="outside the classes"):
        encode_partial_labels(np.array([2]), np.array([[1, 1, 0]], bool))


def test_partial_label_loss_leaves_absent_classes_out() -> None:
    import keras

    from breastscan.models.losses import PartialLabelAccuracy, PartialLabelCrossentropy

    logits = np.array([[1.0, 0.0, 3.0], [1.0, 0.0, 3.0]], np.float32)
    codes, table = encode_partial_labels(np.array([0, 0]), np.array([[1, 1, 1], [1, 1, 0]], bool))
    loss = PartialLabelCrossentropy(table, reduction="none")(codes, logits)
    full = -np.log(np.exp(1) / np.exp([1.0, 0.0, 3.0]).sum())
    partial = -np.log(np.exp(1) / np.exp([1.0, 0.0]).sum())
    np.testing.assert_allclose(np.asarray(loss), [full, partial], rtol=1e-5)
    acc = PartialLabelAccuracy(3)
    acc.update_state(codes, np.array([[5.0, 0, 0], [0, 5.0, 0]], np.float32))
    assert float(acc.result()) == pytest.approx(0.5)
    again = keras.losses.deserialize(keras.losses.serialize(PartialLabelCrossentropy(table)))
    assert again.class_sets == table
