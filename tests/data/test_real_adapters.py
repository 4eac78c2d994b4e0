"""The generic CSV adapter on the real derived packs in ../shared/datasets (opt-in data tests).

Counts come from the packs' READMEs: BUSI 780 images (437/210/133) in 145 near-duplicate
groups; mini-MIAS 322 films, density F/G/D 106/104/112, pathology 207/63/52, left and
right films of one patient paired.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from breastscan.data.adapters.generic import convert_csv
from breastscan.data.manifest import CONTRACT_COLUMNS, read_manifest, resolve
from breastscan.imaging.files import read_mask

pytestmark = pytest.mark.data

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"


@pytest.fixture(scope="module")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"real datasets not present at {SHARED}")
    return SHARED


@pytest.fixture(scope="module")
def busi(shared: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    out = tmp_path_factory.mktemp("busi")
    convert_csv(shared / "busi" / "manifest.csv", out,
                columns={"label": "pathology", "dup_group": "group"}, modality="ultrasound")
    return out, read_manifest(out)


@pytest.fixture(scope="module")
def mias(shared: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    out = tmp_path_factory.mktemp("mias")
    convert_csv(shared / "mini_mias" / "manifest.csv", out, columns={"patient_id": "group"},
                modality="mammography", roi=("x", "y", "radius"))
    return out, read_manifest(out)


def test_busi_pack(busi: tuple[Path, pd.DataFrame]) -> None:
    out, df = busi
    assert list(df.columns[: len(CONTRACT_COLUMNS)]) == list(CONTRACT_COLUMNS)
    assert len(df) == 780
    assert df["pathology"].value_counts().to_dict() == {"benign": 437, "malignant": 210,
                                                        "normal": 133}
    assert set(df["modality"]) == {"ultrasound"}
    assert df["group"].dropna().nunique() == 145
    assert df["group"].notna().sum() == 333
    assert df["mask"].notna().all()
    assert all(resolve(out, p).is_file() for p in df["image"])
    assert all(resolve(out, p).is_file() for p in df["mask"])
    assert not (out / "images").exists()  # copy=False: referenced in place


def test_mias_pack(mias: tuple[Path, pd.DataFrame]) -> None:
    out, df = mias
    assert len(df) == 322
    assert df["density"].value_counts().to_dict() == {"1": 106, "2": 104, "3": 112}
    assert df["pathology"].value_counts().to_dict() == {"normal": 207, "benign": 63,
                                                        "malignant": 52}
    with_roi = df[df["x"].notna()]
    assert len(with_roi) == 111 and (with_roi["has_roi"] == "True").all()
    for _, row in with_roi.iterrows():
        mask = read_mask(resolve(out, row["mask"]))
        assert mask.shape == (256, 256) and mask.any(), row["image"]
        r, c = min(255, round(float(row["y"]))), min(255, round(float(row["x"])))
        assert mask[r, c], f"{row['image']}: lesion centre not in mask"
    for _, row in df[df["pathology"] == "normal"].iterrows():
        assert not read_mask(resolve(out, row["mask"])).any()


def test_mias_pairs_share_group(mias: tuple[Path, pd.DataFrame]) -> None:
    _, df = mias
    number = df["refnum"].str[3:].astype(int)
    pairs = df.assign(pair=(number + 1) // 2).groupby("pair")
    assert pairs["group"].nunique().eq(1).all()
    assert pairs["side"].apply(lambda s: sorted(s) == ["L", "R"]).all()
    assert df["group"].nunique() == 161
    assert np.array_equal(df["group"].isna(), np.zeros(len(df), bool))
