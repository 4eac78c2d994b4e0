"""breastscan.data.loading: the one row loader, lenient (skip reasons) and strict (raise or drop).

A hand-made dataset with one row per case: every skip reason is planted once (or a known
number of times), so every count, detail and index is exact.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from breastscan.bundle import ModelContract
from breastscan.data.loading import (
    DROPPED_IN_STRICT,
    SKIP_REASONS,
    RowSpec,
    class_index,
    load_rows,
    row_groups,
)
from breastscan.imaging.files import read_mask, write_mask, write_png
from breastscan.imaging.preprocessing import PreprocessSpec, decode_image, preprocess_image, preprocess_mask

SPEC = PreprocessSpec(height=16, width=16)
DENSITY = RowSpec(name="density", task="classification", label="density", classes=("1", "2", "3", "4"),
                  spec=SPEC, modality="mammography")
LESION = RowSpec(name="lesion", task="segmentation", label="mask", classes=(), spec=SPEC,
                 modality="ultrasound")


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    """Six good 32x40 images with masks, and broken files: a corrupt image, a tiny image,
    a corrupt mask and a mask of the wrong size."""
    rng = np.random.default_rng(0)
    for i in range(6):
        image = rng.random((32, 40)) * 0.5
        mask = np.zeros((32, 40), bool)
        mask[4 + i:12 + i, 6:18] = True
        image[mask] += 0.4
        write_png(tmp_path / "images" / f"ok_{i}.png", image)
        write_mask(tmp_path / "masks" / f"ok_{i}.png", mask)
    (tmp_path / "images" / "corrupt.png").write_bytes(rng.bytes(500))
    write_png(tmp_path / "images" / "tiny.png", rng.random((8, 8)))
    (tmp_path / "masks" / "corrupt.png").write_bytes(rng.bytes(500))
    write_mask(tmp_path / "masks" / "small.png", np.ones((16, 20), bool))
    return tmp_path


def _frame(rows: list[tuple]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["image", "modality", "density", "pathology", "mask", "group"])
    return frame.replace({"": None})


DENSITY_ROWS = [
    ("images/ok_0.png", "mammography", "2.0", "benign", None, "p1"),      # 0 used: "2.0" is class "2"
    ("images/ok_1.png", "Mammography ", "3", "benign", None, "p1"),       # 1 used (modality compared loosely)
    ("images/ok_2.png", "ultrasound", "1", "benign", None, "p2"),         # 2 wrong_modality
    ("images/ok_3.png", "mammography", "", "benign", None, "p3"),         # 3 no_label
    ("images/ok_4.png", "mammography", "7", "benign", None, "p4"),        # 4 unknown_label
    ("images/gone.png", "mammography", "1", "benign", None, "p5"),        # 5 missing_image
    ("images/corrupt.png", "mammography", "1", "benign", None, "p6"),     # 6 unreadable_image
    ("images/ok_5.png", "", "4", "benign", None, "p7"),                   # 7 wrong_modality (empty)
    ("images/ok_5.png", "ultrasound", "", "benign", None, "p8"),          # 8 wrong_modality, not no_label
    ("images/tiny.png", "mammography", "4", "benign", None, "p9"),        # 9 unreadable_image (8x8)
    ("images/ok_5.png", "mammography", "4", "benign", None, None),        # 10 used
]

LESION_ROWS = [
    ("images/ok_0.png", "ultrasound", None, "benign", "masks/ok_0.png", "q1"),      # 0 used
    ("images/ok_1.png", "ultrasound", None, "normal", None, "q2"),                  # 1 used: empty mask
    ("images/ok_2.png", "ultrasound", None, "malignant", None, "q3"),               # 2 no_mask
    ("images/ok_3.png", "ultrasound", None, "benign", "masks/gone.png", "q4"),      # 3 missing_mask
    ("images/ok_4.png", "ultrasound", None, "benign", "masks/small.png", "q5"),     # 4 unreadable_mask (size)
    ("images/ok_5.png", "ultrasound", None, "benign", "masks/corrupt.png", "q6"),   # 5 unreadable_mask
    ("images/ok_5.png", "mammography", None, "benign", "masks/ok_5.png", "q7"),     # 6 wrong_modality
    ("images/ok_2.png", "ultrasound", None, None, None, "q8"),                      # 7 no_mask (unknown)
    ("images/gone.png", "ultrasound", None, "benign", "masks/ok_1.png", "q9"),      # 8 missing_image
]


# --------------------------------------------------------------------------- lenient


def test_lenient_classification_counts_every_reason(root: Path) -> None:
    frame = _frame(DENSITY_ROWS)
    frame.index = range(100, 100 + len(frame))  # SkippedRow.row is the position, not the label
    loaded = load_rows(frame, root, DENSITY, strict=False)
    assert loaded.n_rows == 11
    assert loaded.skip_counts() == {"wrong_modality": 3, "no_label": 1, "unknown_label": 1,
                                    "missing_image": 1, "unreadable_image": 2}
    assert list(loaded.skip_counts()) == [r for r in SKIP_REASONS if r in loaded.skip_counts()]  # check order
    assert loaded.skip_summary() == ("wrong_modality 3, no_label 1, unknown_label 1, missing_image 1, "
                                     "unreadable_image 2")
    rows = {reason: [s.row for s in skipped] for reason, skipped in loaded.skipped.items()}
    assert rows == {"wrong_modality": [2, 7, 8], "no_label": [3], "unknown_label": [4], "missing_image": [5],
                    "unreadable_image": [6, 9]}
    assert loaded.skipped["missing_image"][0].image == "images/gone.png"
    assert loaded.skipped["no_label"][0].detail == "density is empty"
    assert loaded.skipped["unknown_label"][0].detail.startswith("density='7' is not a class of model density")
    assert "modality=''" in loaded.skipped["wrong_modality"][1].detail
    assert "smallest side must be at least 16" in loaded.skipped["unreadable_image"][1].detail

    data = loaded.data
    assert len(data) == 3 and data.frame["manifest_row"].tolist() == [0, 1, 10]
    assert data.frame["image"].tolist() == ["images/ok_0.png", "images/ok_1.png", "images/ok_5.png"]
    assert data.targets.dtype == np.int64 and data.targets.tolist() == [1, 2, 3]
    assert data.images.shape == (3, 16, 16, 1) and data.images.dtype == np.float32
    for i, image in enumerate(data.frame["image"]):
        served, _ = preprocess_image(decode_image(root / image), SPEC)  # serving's steps
        np.testing.assert_array_equal(data.images[i], served)
    assert data.groups.tolist() == ["p1", "p1", "images/ok_5.png"]  # no group: the image itself


def test_lenient_segmentation_counts_every_reason(root: Path) -> None:
    loaded = load_rows(_frame(LESION_ROWS), root, LESION, strict=False)
    assert loaded.skip_counts() == {"wrong_modality": 1, "no_mask": 2, "missing_image": 1,
                                    "missing_mask": 1, "unreadable_mask": 2}
    assert [s.row for s in loaded.skipped["no_mask"]] == [2, 7]
    assert loaded.skipped["no_mask"][0].detail == "no mask (pathology=malignant)"
    assert loaded.skipped["no_mask"][1].detail == "no mask (pathology=unknown)"
    assert loaded.skipped["missing_mask"][0].detail == "mask masks/gone.png: no such file"
    small, corrupt = loaded.skipped["unreadable_mask"]
    assert small.detail == "mask masks/small.png is 20x16, the image 40x32"
    assert corrupt.row == 5 and "decode" in corrupt.detail
    data = loaded.data
    assert data.frame["manifest_row"].tolist() == [0, 1]
    assert data.targets.shape == (2, 16, 16, 1) and data.targets.dtype == np.float32
    expected = preprocess_mask(read_mask(root / "masks" / "ok_0.png"), SPEC)
    np.testing.assert_array_equal(data.targets[0], expected)
    assert data.targets[0].max() == 1.0 and data.targets[1].max() == 0.0  # normal: an empty mask
    assert data.groups.tolist() == ["q1", "q2"]


def test_nothing_loadable_gives_empty_arrays(root: Path) -> None:
    frame = _frame([DENSITY_ROWS[2], DENSITY_ROWS[5]])
    data = load_rows(frame, root, DENSITY, strict=False).data
    assert len(data) == 0 and data.images.shape == (0, 16, 16, 1)
    assert data.targets.shape == (0,) and data.groups.shape == (0,)
    masks = load_rows(_frame([LESION_ROWS[2]]), root, LESION, strict=False).data
    assert masks.targets.shape == (0, 16, 16, 1)


def test_row_spec_from_a_contract_checks_the_modality(root: Path) -> None:
    contract = ModelContract(name="density", task="classification", label="density",
                             classes=("1", "2", "3", "4"), class_names=("A", "B", "C", "D"),
                             input_shape=(16, 16, 1), dataset="mammography", modality="mammography")
    rs = RowSpec.from_contract(contract, SPEC)
    assert (rs.modality, rs.classes, rs.label, rs.shape) == ("mammography", ("1", "2", "3", "4"), "density",
                                                             (16, 16, 1))
    assert load_rows(_frame(DENSITY_ROWS), root, rs, strict=False).skip_counts() == \
        load_rows(_frame(DENSITY_ROWS), root, DENSITY, strict=False).skip_counts()


# --------------------------------------------------------------------------- strict


def _pipeline(rs: RowSpec) -> RowSpec:
    """The pipeline's spec: validated data, no modality check."""
    return RowSpec(name=rs.name, task=rs.task, label=rs.label, classes=rs.classes, spec=rs.spec)


def test_strict_drops_rows_without_label_or_mask_and_logs_them(root: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    assert set(DROPPED_IN_STRICT) == {"no_label", "no_mask"}
    good = [DENSITY_ROWS[i] for i in (0, 1, 3, 10)]
    with caplog.at_level(logging.WARNING, logger="breastscan.data.loading"):
        loaded = load_rows(_frame(good), root, _pipeline(DENSITY), strict=True)
    assert loaded.data.frame["manifest_row"].tolist() == [0, 1, 3]
    assert loaded.skip_counts() == {"no_label": 1}
    assert "density: dropped 1 row(s) (label cell is empty), e.g. images/ok_3.png" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="breastscan.data.loading"):
        masks = load_rows(_frame([LESION_ROWS[i] for i in (0, 1, 2, 7)]), root, _pipeline(LESION),
                          strict=True)
    assert masks.data.frame["manifest_row"].tolist() == [0, 1] and masks.skip_counts() == {"no_mask": 2}
    assert "lesion: dropped 2 row(s) (lesion image without a mask), e.g. images/ok_2.png" in caplog.text


@pytest.mark.parametrize(("rows", "spec", "error", "match"), [
    ([DENSITY_ROWS[0], DENSITY_ROWS[4]], DENSITY, ValueError, r"images/ok_4.png: density='7' is not a class"),
    ([DENSITY_ROWS[0], DENSITY_ROWS[5]], DENSITY, FileNotFoundError, r"images/gone.png: no such file"),
    ([DENSITY_ROWS[0], DENSITY_ROWS[6]], DENSITY, ValueError, r"images/corrupt.png: "),
    ([DENSITY_ROWS[0], DENSITY_ROWS[9]], DENSITY, ValueError, r"images/tiny.png: image is 8x8 pixels"),
    ([LESION_ROWS[0], LESION_ROWS[3]], LESION, FileNotFoundError, r"images/ok_3.png: mask masks/gone.png"),
    ([LESION_ROWS[0], LESION_ROWS[4]], LESION, ValueError, r"images/ok_4.png: mask masks/small.png is 20x16"),
    ([LESION_ROWS[0], LESION_ROWS[5]], LESION, ValueError, r"images/ok_5.png: .*decode"),
])
def test_strict_raises_on_a_bad_row(root: Path, rows: list[tuple], spec: RowSpec, error: type,
                                    match: str) -> None:
    with pytest.raises(error, match=match):
        load_rows(_frame(rows), root, _pipeline(spec), strict=True)
    # the same rows, leniently: the bad one is counted, the good one loaded
    loaded = load_rows(_frame(rows), root, _pipeline(spec), strict=False)
    assert len(loaded.data) == 1 and sum(loaded.skip_counts().values()) == 1


def test_strict_checks_every_label_before_decoding_an_image(root: Path) -> None:
    # a missing image comes first, yet the unknown label further down is what fails
    rows = [DENSITY_ROWS[5], DENSITY_ROWS[0], DENSITY_ROWS[4]]
    with pytest.raises(ValueError, match="density='7'"):
        load_rows(_frame(rows), root, _pipeline(DENSITY), strict=True)


def test_strict_with_a_modality_refuses_another_modality(root: Path) -> None:
    with pytest.raises(ValueError, match="modality='ultrasound', model: mammography"):
        load_rows(_frame([DENSITY_ROWS[0], DENSITY_ROWS[2]]), root, DENSITY, strict=True)


# --------------------------------------------------------------------------- labels and groups


@pytest.mark.parametrize(("value", "index"), [
    ("2", 1), ("2.0", 1), (" 3 ", 2), (2, 1), (2.0, 1), ("4.000", 3),
    ("2.5", None), ("5", None), ("x", None), ("", None), ("nan", None),
])
def test_class_index_compares_as_text(value: object, index: int | None) -> None:
    assert class_index(("1", "2", "3", "4"), value) == index


def test_class_index_of_named_classes() -> None:
    classes = ("benign", "malignant", "normal")
    assert class_index(classes, "malignant") == 1 and class_index(classes, " normal ") == 2
    assert class_index(classes, "atypical") is None and class_index(classes, "1") is None


def test_row_groups_prefer_dup_group_then_group_then_image() -> None:
    frame = pd.DataFrame({"image": ["a.png", "b.png", "c.png", "d.png", "e.png"],
                          "dup_group": ["d1", "", None, np.nan, " "],
                          "group": ["g1", "g2", "", None, "g5"]})
    assert row_groups(frame).tolist() == ["d1", "g2", "c.png", "d.png", "g5"]
    assert row_groups(frame.drop(columns="dup_group")).tolist() == ["g1", "g2", "c.png", "d.png", "g5"]
    assert row_groups(frame[["image"]]).tolist() == ["a.png", "b.png", "c.png", "d.png", "e.png"]


def test_loaded_groups_follow_the_same_rule(root: Path) -> None:
    frame = _frame([DENSITY_ROWS[0], DENSITY_ROWS[1], DENSITY_ROWS[10]])
    frame["dup_group"] = ["dg", None, None]
    groups = load_rows(frame, root, DENSITY, strict=False).data.groups
    assert groups.tolist() == ["dg", "p1", "images/ok_5.png"]
