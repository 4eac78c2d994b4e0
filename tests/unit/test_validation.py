"""breastscan.data.validation: a good manifest passes; each planted defect fails and is named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from breastscan.config import DatasetConfig, ValidationRules
from breastscan.data.manifest import read_manifest, write_manifest
from breastscan.data.validation import validate_dataset
from breastscan.imaging.files import write_mask, write_png

RULES = ValidationRules(min_class_count=5, min_side=32, max_side=4096)


def _cfg(root: Path, modality: str = "ultrasound") -> DatasetConfig:
    labels = ("density", "pathology") if modality == "mammography" else ("pathology",)
    return DatasetConfig(name=root.name, path=root, modality=modality, labels=labels,
                         stratify=labels, masks_required=True)


@pytest.fixture()
def dataset(tiny_phantoms, tmp_path) -> Path:
    """A private copy of the ultrasound phantoms that a test may break."""
    root = tmp_path / "ultrasound"
    shutil.copytree(tiny_phantoms / "ultrasound", root)
    return root


def _edit(root: Path, row: int, **values: str | None) -> str:
    """Overwrite cells of one manifest row; return the row's image path before the edit."""
    df = read_manifest(root)
    before = str(df.loc[row, "image"])
    for k, v in values.items():
        df.loc[row, k] = v
    write_manifest(df, root)
    return before


@pytest.mark.parametrize("modality", ["mammography", "ultrasound"])
def test_phantoms_pass(tiny_phantoms, modality: str, tmp_path) -> None:
    root = tiny_phantoms / modality
    report = validate_dataset(root, _cfg(root, modality), RULES)
    assert report.success, report.summary()
    assert report.statistics["evaluated"] >= 20
    out = report.write(tmp_path / "r.json")
    data = json.loads(out.read_text())
    assert data["success"] is True and data["n_rows"] == len(read_manifest(root))


def _failed(report) -> dict[str, list]:
    return {f"{f.expectation}:{f.column}": f.rows for f in report.failures}


def test_missing_file_is_named(dataset: Path) -> None:
    image = _edit(dataset, 3, image="images/does_not_exist.png")
    report = validate_dataset(dataset, _cfg(dataset), RULES)
    assert not report.success
    rows = _failed(report)["expect_column_values_to_be_in_set:image_exists"]
    assert rows[0]["image"] == "images/does_not_exist.png"
    assert "does_not_exist.png" in report.summary() and image not in report.summary()


def test_unknown_label_is_named(dataset: Path) -> None:
    image = _edit(dataset, 5, pathology="Malignant")
    report = validate_dataset(dataset, _cfg(dataset), RULES)
    assert not report.success
    rows = _failed(report)["expect_column_values_to_be_in_set:pathology"]
    assert rows == [{"pathology": "Malignant", "image": image}]
    assert "Malignant" in report.summary()


def test_corrupt_png_is_named_with_reason(dataset: Path) -> None:
    df = read_manifest(dataset)
    target = dataset / df.loc[2, "image"]
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 3])
    report = validate_dataset(dataset, _cfg(dataset), RULES)
    rows = _failed(report)["expect_column_values_to_be_in_set:image_decodes"]
    assert rows[0]["image"] == df.loc[2, "image"]
    assert "truncated" in rows[0]["error"] or "corrupt" in rows[0]["error"]


def test_mask_defects(dataset: Path) -> None:
    df = read_manifest(dataset)
    lesion = df.index[df["pathology"] != "normal"]
    normal = df.index[df["pathology"] == "normal"]
    write_mask(dataset / df.loc[lesion[0], "mask"], np.ones((40, 40)))  # wrong size
    m = (np.arange(64 * 64).reshape(64, 64) % 7).astype(np.uint8)  # not binary
    write_png(dataset / df.loc[lesion[1], "mask"], m)
    df.loc[lesion[2], "mask"] = np.nan  # lesion without mask
    write_manifest(df, dataset)
    img_shape = cv2.imread(str(dataset / df.loc[normal[0], "image"]), 0).shape
    write_mask(dataset / df.loc[normal[0], "mask"], np.ones(img_shape))  # normal with a lesion
    report = validate_dataset(dataset, _cfg(dataset), RULES)
    failed = {k.split(":")[1]: v for k, v in _failed(report).items()}
    assert failed["mask_same_size"][0]["image"] == df.loc[lesion[0], "image"]
    assert any(r["image"] == df.loc[lesion[1], "image"]
               for r in failed["mask_binary"])
    assert failed["mask_present"][0]["image"] == df.loc[lesion[2], "image"]
    assert failed["normal_mask_empty"][0]["image"] == df.loc[normal[0], "image"]


def test_black_and_tiny_images(dataset: Path) -> None:
    df = read_manifest(dataset)
    shape = cv2.imread(str(dataset / df.loc[0, "image"]), 0).shape
    write_png(dataset / df.loc[0, "image"], np.zeros(shape, np.uint8))
    write_png(dataset / df.loc[1, "image"], np.full((8, 8), 128, np.uint8))
    report = validate_dataset(dataset, _cfg(dataset), RULES)
    failed = _failed(report)
    assert failed["expect_column_values_to_be_between:image_max"][0]["image"] == df.loc[0, "image"]
    assert any(r["image"] == df.loc[1, "image"]
               for r in failed["expect_column_values_to_be_between:image_height"])


def test_duplicate_rows_and_missing_labels(dataset: Path) -> None:
    df = read_manifest(dataset)
    df = pd.concat([df, df.iloc[[0]]], ignore_index=True)
    df.loc[4, "pathology"] = np.nan
    write_manifest(df, dataset)
    failed = _failed(validate_dataset(dataset, _cfg(dataset), RULES))
    assert "expect_column_values_to_be_unique:image" in failed
    assert failed["expect_column_values_to_not_be_null:pathology"][0]["image"] == df.loc[4, "image"]


def test_small_class_and_wrong_modality(dataset: Path) -> None:
    report = validate_dataset(dataset, _cfg(dataset), ValidationRules(min_class_count=1000))
    rows = _failed(report)["expect_column_values_to_be_between:count"]
    assert {r["value"] for r in rows} == {"benign", "malignant", "normal"}
    wrong = _cfg(dataset, "mammography")
    failed = _failed(validate_dataset(dataset, wrong, RULES))
    assert "expect_column_values_to_be_in_set:modality" in failed
    assert "expect_column_values_to_not_be_null:density" in failed


def test_missing_columns_and_missing_manifest(dataset: Path, tmp_path: Path) -> None:
    df = read_manifest(dataset).drop(columns=["group"])
    df.to_csv(dataset / "manifest.csv", index=False)
    report = validate_dataset(dataset, _cfg(dataset), RULES)
    assert not report.success and "group" in report.summary()
    empty = tmp_path / "empty"
    empty.mkdir()
    report = validate_dataset(empty, _cfg(empty), RULES)
    assert not report.success and "manifest.csv" in report.summary()
