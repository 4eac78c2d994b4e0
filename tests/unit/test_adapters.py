"""breastscan.data.adapters: each public layout converts into the manifest contract."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from breastscan.data.adapters import FORMATS, IngestError, LayoutError, ingest
from breastscan.data.adapters.busi import convert_busi
from breastscan.data.adapters.dicom_dir import convert_dicom
from breastscan.data.adapters.generic import convert_csv
from breastscan.data.adapters.mias import convert_mias
from breastscan.data.manifest import CONTRACT_COLUMNS, read_manifest, resolve
from breastscan.imaging.dicom import pseudonymize
from breastscan.imaging.files import read_mask
from breastscan.labels import MODALITIES, PATHOLOGIES
from tests.layouts import (
    BUSI_IMAGES,
    BUSI_MASK_RECTS,
    FAKE_PATIENT_ID,
    FAKE_STRINGS,
    MIAS_SIZE,
    make_busi_layout,
    make_dicom_files,
    make_mias_layout,
)


@pytest.fixture(autouse=True)
def secret_salt(monkeypatch: pytest.MonkeyPatch) -> str:
    """The project's pseudonymisation secret, from the environment (no salt file is created)."""
    salt = "unit-test-secret-salt-0123456789"
    monkeypatch.setenv("BREASTSCAN_PSEUDONYM_SALT", salt)
    return salt


def test_dicom_without_a_salt_takes_the_projects_secret(tmp_path: Path, secret_salt: str) -> None:
    df = convert_dicom(make_dicom_files(tmp_path / "src"), tmp_path / "out")
    assert pseudonymize(FAKE_PATIENT_ID, secret_salt) in set(df["group"])
    assert pseudonymize(FAKE_PATIENT_ID, "breastscan") not in set(df["group"])


def _rect_mask(shape: tuple[int, int], rects: list[tuple[int, int, int, int]]) -> np.ndarray:
    out = np.zeros(shape, bool)
    for r0, r1, c0, c1 in rects:
        out[r0:r1, c0:c1] = True
    return out


def _row(df: pd.DataFrame, column: str, value: str) -> pd.Series:
    match = df[df[column] == value]
    assert len(match) == 1, f"{column}={value}: {len(match)} rows"
    return match.iloc[0]


# --------------------------------------------------------------------------- BUSI


@pytest.fixture()
def busi_src(tmp_path: Path) -> Path:
    return make_busi_layout(tmp_path / "src")


def test_busi_manifest(busi_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "busi"
    df = convert_busi(busi_src, out)
    written = read_manifest(out)
    assert list(written.columns[: len(CONTRACT_COLUMNS)]) == list(CONTRACT_COLUMNS)
    assert {"source_file", "n_masks"} <= set(written.columns)
    assert len(df) == len(written) == sum(len(v) for v in BUSI_IMAGES.values())
    assert df["pathology"].value_counts().to_dict() == {k: len(v) for k, v in BUSI_IMAGES.items()}
    assert set(df["modality"]) == {"ultrasound"}
    assert written["density"].isna().all()
    assert df["group"].is_unique and _row(df, "source_file", "benign/benign (4).png")["group"] == (
        "busi-benign-0004"
    )
    row = _row(df, "source_file", "benign/benign (4).png")
    assert row["image"] == "images/benign/benign_0004.png"
    assert row["mask"] == "masks/benign/benign_0004_mask.png"
    assert int(row["n_masks"]) == 2
    for cls, items in BUSI_IMAGES.items():
        for number, (h, w) in items:
            r = _row(df, "source_file", f"{cls}/{cls} ({number}).png")
            img = cv2.imread(str(out / r["image"]), cv2.IMREAD_UNCHANGED)
            assert img.dtype == np.uint8 and img.shape == (h, w)  # 8-bit gray, same size
            mask = read_mask(out / r["mask"])
            np.testing.assert_array_equal(mask, _rect_mask((h, w), BUSI_MASK_RECTS[(cls, number)]))


def test_busi_masks_are_united(busi_src: Path, tmp_path: Path) -> None:
    df = convert_busi(busi_src, tmp_path / "out")
    mask = read_mask(tmp_path / "out" / _row(df, "group", "busi-benign-0004")["mask"])
    assert mask[5, 5] and mask[25, 35]  # one pixel from each of the two mask files
    assert mask.sum() == 8 * 10 + 10 * 14
    raw = cv2.imread(str(tmp_path / "out" / "masks/benign/benign_0004_mask.png"),
                     cv2.IMREAD_UNCHANGED)
    assert set(np.unique(raw)) == {0, 255}


def test_busi_image_without_mask_warns(busi_src: Path, tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    (busi_src / "benign" / "benign (2)_mask.png").unlink()
    with caplog.at_level(logging.WARNING):
        df = convert_busi(busi_src, tmp_path / "out")
    assert _row(df, "group", "busi-benign-0002")["mask"] == ""
    assert "benign (2).png" in caplog.text


def test_busi_mask_size_mismatch_names_file(busi_src: Path, tmp_path: Path) -> None:
    cv2.imwrite(str(busi_src / "malignant" / "malignant (3)_mask.png"), np.zeros((7, 9), np.uint8))
    with pytest.raises(LayoutError, match=r"malignant \(3\)_mask\.png"):
        convert_busi(busi_src, tmp_path / "out")


def test_busi_missing_source(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="not a BUSI layout: expected .*; found nothing at .*nowhere"):
        convert_busi(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayoutError, match="benign/, malignant/, normal/.*found an empty folder"):
        convert_busi(tmp_path / "empty", tmp_path / "out")


def test_busi_class_folders_without_images(busi_src: Path, tmp_path: Path) -> None:
    for path in busi_src.rglob("*.png"):
        path.rename(path.with_name(path.name.replace(" (", "_").replace(")", "")))
    with pytest.raises(LayoutError, match=r"benign/, malignant/, normal/ in .* but no image named"):
        convert_busi(busi_src, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written before the layout is checked


def test_busi_hint_for_a_manifest_folder(tmp_path: Path) -> None:
    (tmp_path / "pack").mkdir()
    (tmp_path / "pack" / "manifest.csv").write_text("image\n")
    with pytest.raises(LayoutError, match="holding .*manifest.csv.*read by format csv"):
        convert_busi(tmp_path / "pack", tmp_path / "out")


# --------------------------------------------------------------------------- mini-MIAS


@pytest.fixture()
def mias(tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    out = tmp_path / "mias"
    return out, convert_mias(make_mias_layout(tmp_path / "src"), out)


def test_mias_manifest(mias: tuple[Path, pd.DataFrame]) -> None:
    out, df = mias
    written = read_manifest(out)
    assert list(written.columns[: len(CONTRACT_COLUMNS)]) == list(CONTRACT_COLUMNS)
    assert {"refnum", "laterality", "abnormality", "has_roi"} <= set(written.columns)
    assert list(df["refnum"]) == [f"mdb{n:03d}" for n in range(1, 9)]  # comment/header skipped
    assert set(df["modality"]) == {"mammography"}
    density = dict(zip(df["refnum"], df["density"].astype(int), strict=True))
    assert density["mdb001"] == 2 and density["mdb003"] == 3 and density["mdb005"] == 1
    r = _row(df, "refnum", "mdb001")
    assert r["image"] == "images/mdb001.png" and r["mask"] == "masks/mdb001_mask.png"
    img = cv2.imread(str(out / r["image"]), cv2.IMREAD_UNCHANGED)
    assert img.dtype == np.uint8 and img.shape == (MIAS_SIZE, MIAS_SIZE)
    assert list(df["laterality"]) == ["R", "L"] * 4
    assert _row(df, "refnum", "mdb007")["abnormality"] == "CALC|MISC"


def test_mias_pathology_precedence(mias: tuple[Path, pd.DataFrame]) -> None:
    _, df = mias
    pathology = dict(zip(df["refnum"], df["pathology"], strict=True))
    assert pathology == {
        "mdb001": "benign", "mdb002": "normal", "mdb003": "normal", "mdb004": "malignant",
        "mdb005": "benign", "mdb006": "benign", "mdb007": "malignant", "mdb008": "normal",
    }
    assert set(pathology.values()) <= set(PATHOLOGIES)


def test_mias_pairs_share_group(mias: tuple[Path, pd.DataFrame]) -> None:
    _, df = mias
    groups = dict(zip(df["refnum"], df["group"], strict=True))
    assert groups["mdb001"] == groups["mdb002"] == "p001"
    assert groups["mdb003"] == groups["mdb004"] == "p002"
    assert groups["mdb002"] != groups["mdb003"]


def test_mias_circle_uses_bottom_left_origin(mias: tuple[Path, pd.DataFrame]) -> None:
    out, df = mias
    mask = read_mask(out / _row(df, "refnum", "mdb001")["mask"])  # x=40 y=100 r=10
    rows, cols = np.nonzero(mask)
    assert rows.mean() == pytest.approx(MIAS_SIZE - 100, abs=0.5)
    assert cols.mean() == pytest.approx(40, abs=0.5)
    assert mask[MIAS_SIZE - 100, 40] and not mask[100, 40]
    assert mask.sum() == pytest.approx(np.pi * 10**2, rel=0.15)


def test_mias_masks_union_and_empty(mias: tuple[Path, pd.DataFrame]) -> None:
    out, df = mias
    two = read_mask(out / _row(df, "refnum", "mdb005")["mask"])  # (30, 40, 5) and (80, 90, 6)
    assert two[MIAS_SIZE - 40, 30] and two[MIAS_SIZE - 90, 80]
    for refnum in ("mdb002", "mdb006"):  # normal; CALC without coordinates
        r = _row(df, "refnum", refnum)
        assert not read_mask(out / r["mask"]).any()
        assert not bool(r["has_roi"])
    assert bool(_row(df, "refnum", "mdb005")["has_roi"])


def test_mias_errors(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="not a mini-MIAS layout: .*found nothing at .*nowhere"):
        convert_mias(tmp_path / "nowhere", tmp_path / "out")
    src = make_mias_layout(tmp_path / "src")
    (src / "Info.txt").unlink()
    with pytest.raises(LayoutError, match=r"expected a folder holding Info.txt.*files mdb001.pgm"):
        convert_mias(src, tmp_path / "out")


def test_mias_info_without_films_or_pgms(tmp_path: Path) -> None:
    src = make_mias_layout(tmp_path / "src")
    for pgm in src.glob("*.pgm"):
        pgm.unlink()
    with pytest.raises(LayoutError, match=r"none of the 8 films listed in Info.txt \(e.g. mdb001.pgm\)"):
        convert_mias(src, tmp_path / "out")
    (src / "Info.txt").write_text("REFNUM BG CLASS\n")
    with pytest.raises(LayoutError, match="no line starting with 'mdb'"):
        convert_mias(src, tmp_path / "out")
    (src / "Info.txt").write_text("mdb001 X NORM\n")
    with pytest.raises(LayoutError, match="unknown tissue code 'X'"):
        convert_mias(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- generic CSV


@pytest.fixture()
def csv_source(tmp_path: Path) -> Path:
    """A CSV with its own column names, images in sub-folders, one existing mask."""
    src = tmp_path / "pack"
    (src / "images" / "sub").mkdir(parents=True)
    (src / "masks").mkdir()
    for name, shape in (("a", (40, 60)), ("b", (40, 60)), ("c", (30, 30))):
        cv2.imwrite(str(src / "images" / "sub" / f"{name}.png"), np.full(shape, 100, np.uint8))
    own = np.zeros((30, 30), np.uint8)
    own[0:5, 0:5] = 255
    cv2.imwrite(str(src / "masks" / "c_mask.png"), own)
    pd.DataFrame({
        "img": ["images/sub/a.png", "images/sub/b.png", "images/sub/c.png"],
        "lbl": ["malignant", "normal", "benign"],
        "tissue": ["F", "G", "D"],
        "pid": ["p1", "", "p1"],
        "cx": ["20", "", ""],
        "cy": ["10", "", ""],
        "r": ["4", "", ""],
        "seg": ["", "", "masks/c_mask.png"],
        "note": ["x", "y", "z"],
    }).to_csv(src / "labels.csv", index=False)
    return src / "labels.csv"


_MAPPING = {"img": "image", "lbl": "pathology", "tissue": "density", "pid": "group", "seg": "mask"}


def test_csv_mapping_values_roi_in_place(csv_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    df = convert_csv(csv_source, out, columns=_MAPPING, modality="mammography",
                     values={"density": {"F": "1", "G": "2", "D": "3"}}, roi=("cx", "cy", "r"))
    written = read_manifest(out)
    assert list(written.columns[: len(CONTRACT_COLUMNS)]) == list(CONTRACT_COLUMNS)
    assert {"note", "cx", "has_roi"} <= set(written.columns)  # extra columns kept
    assert list(df["density"]) == ["1", "2", "3"]
    assert set(df["modality"]) == {"mammography"} <= set(MODALITIES)
    assert list(df["pathology"]) == ["malignant", "normal", "benign"]
    assert pd.isna(written.loc[1, "group"]) and written.loc[0, "group"] == "p1"  # empty stays
    # copy=False: images referenced in place, nothing duplicated.
    assert df.loc[0, "image"].startswith("../")
    assert resolve(out, df.loc[0, "image"]).resolve() == (csv_source.parent / "images/sub/a.png")
    assert not (out / "images").exists()
    # ROI: circle at column 20, row 10 (top-left origin).
    mask = read_mask(resolve(out, df.loc[0, "mask"]))
    assert mask.shape == (40, 60) and mask[10, 20] and not mask[30, 20]
    rows, cols = np.nonzero(mask)
    assert (rows.mean(), cols.mean()) == (pytest.approx(10, abs=0.5), pytest.approx(20, abs=0.5))
    assert df.loc[0, "mask"] == "masks/sub/a_mask.png"
    # No ROI: all-zero mask; the row's own mask is kept (united with no circle).
    assert not read_mask(resolve(out, df.loc[1, "mask"])).any()
    own = read_mask(resolve(out, df.loc[2, "mask"]))
    assert own[:5, :5].all() and own.sum() == 25
    assert list(df["has_roi"]) == [True, False, False]


def test_csv_copy(csv_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "copied"
    df = convert_csv(csv_source, out, columns=_MAPPING, modality="ultrasound", copy=True)
    assert list(df["image"]) == [f"images/sub/{n}.png" for n in "abc"]
    assert list(df["mask"]) == ["", "", "masks/c_mask.png"]
    for rel in [*df["image"], df.loc[2, "mask"]]:
        assert (out / rel).is_file()
    assert list(df["density"]) == ["F", "G", "D"]  # no value mapping given: kept as is
    assert "has_roi" not in df.columns


def test_csv_missing_contract_columns_added(tmp_path: Path) -> None:
    src = tmp_path / "s"
    src.mkdir()
    cv2.imwrite(str(src / "x.png"), np.zeros((20, 20), np.uint8))
    (src / "t.csv").write_text("path\nx.png\n")
    df = convert_csv(src / "t.csv", tmp_path / "o", columns={"path": "image"})
    assert list(df.columns) == list(CONTRACT_COLUMNS)
    assert df.loc[0, "modality"] == "" and df.loc[0, "group"] == ""


def test_csv_columns_the_prepare_stage_derives_are_set_aside(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """A pack's own duplicate ids (BUS-BRA: a few of a patient's images) must not pass for its groups."""
    from breastscan.data.loading import row_groups

    src = tmp_path / "s"
    src.mkdir()
    for name in "abc":
        cv2.imwrite(str(src / f"{name}.png"), np.zeros((20, 20), np.uint8))
    (src / "t.csv").write_text("image,group,dup_group,split\na.png,p1,g1,test\nb.png,p1,,train\n"
                               "c.png,p2,g1,train\n")
    with caplog.at_level(logging.WARNING):
        df = convert_csv(src / "t.csv", tmp_path / "o")
    assert "t.csv: column(s) dup_group, split kept as source_dup_group, source_split" in caplog.text
    assert "dup_group" not in df.columns and "split" not in df.columns
    assert list(df["source_dup_group"]) == ["g1", "", "g1"]
    assert list(df["source_split"]) == ["test", "train", "train"]
    assert list(row_groups(read_manifest(tmp_path / "o"))) == ["p1", "p1", "p2"]  # the patients
    mapped = convert_csv(src / "t.csv", tmp_path / "m", columns={"group": "patient", "dup_group": "group"})
    assert list(mapped["group"]) == ["g1", "", "g1"]  # mapped to group: BUSI's way, unchanged
    (src / "t.csv").write_text("image,dup_group,source_dup_group\na.png,g1,x\n")
    with pytest.raises(IngestError, match="cannot set aside dup_group: source_dup_group exists too"):
        convert_csv(src / "t.csv", tmp_path / "x")


def test_csv_errors(csv_source: Path, tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="not a CSV layout: .*found nothing at .*nope.csv"):
        convert_csv(tmp_path / "nope.csv", tmp_path / "o")
    with pytest.raises(LayoutError, match="missing_col"):
        convert_csv(csv_source, tmp_path / "o", columns={"missing_col": "image"})
    with pytest.raises(LayoutError, match="no 'image' column.*columns are: img, lbl"):
        convert_csv(csv_source, tmp_path / "o")  # no image column after mapping
    with pytest.raises(LayoutError, match="ROI columns not found: radius"):
        convert_csv(csv_source, tmp_path / "o", columns=_MAPPING, roi=("cx", "cy", "radius"))
    with pytest.raises(LayoutError, match="column 'tissue', which the CSV does not have"):
        convert_csv(csv_source, tmp_path / "o", columns=_MAPPING, values={"tissue": {"F": "1"}})
    broken = csv_source.parent / "broken.csv"
    broken.write_text("img\nimages/sub/none.png\n")
    with pytest.raises(LayoutError, match="none.png"):
        convert_csv(broken, tmp_path / "o", columns={"img": "image"})
    with pytest.raises(LayoutError, match="a CSV file, or a folder holding manifest.csv.*labels.csv"):
        convert_csv(csv_source.parent, tmp_path / "o")  # a folder without manifest.csv
    with pytest.raises(LayoutError, match="a text CSV with a header row.*does not parse"):
        convert_csv(csv_source.parent / "images" / "sub" / "a.png", tmp_path / "o")
    manifest = csv_source.parent / "manifest.csv"
    manifest.write_text("image\nimages/sub/a.png\n")
    with pytest.raises(IngestError, match="overwrite"):
        convert_csv(manifest, csv_source.parent)


def test_csv_unmapped_values_warned(csv_source: Path, tmp_path: Path,
                                    caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        df = convert_csv(csv_source, tmp_path / "o", columns=_MAPPING,
                         values={"pathology": {"malignant": "malignant"}, "note": {"x": "X"}})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "labels.csv: 2 values of 'pathology' have no value mapping, kept as they are: "
        "benign (1), normal (1)",
        "labels.csv: 2 values of 'note' have no value mapping, kept as they are: y (1), z (1)",
    ]
    assert list(df["note"]) == ["X", "y", "z"]


def test_csv_invalid_label_after_mapping_refused(csv_source: Path, tmp_path: Path) -> None:
    with pytest.raises(IngestError, match=r"values of 'density' not valid after the value mapping: "
                                          r"D \(1\), G \(1\); valid: 1, 2, 3, 4 or empty"):
        convert_csv(csv_source, tmp_path / "o", columns=_MAPPING, values={"density": {"F": "1"}})
    with pytest.raises(IngestError, match=r"F->5 \(1\)"):
        convert_csv(csv_source, tmp_path / "o", columns=_MAPPING,
                    values={"density": {"F": "5", "G": "2", "D": "3"}})
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- DICOM folder


@pytest.fixture()
def dicom_src(tmp_path: Path) -> Path:
    return make_dicom_files(tmp_path / "src")


def test_dicom_folder(dicom_src: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "dcm"
    with caplog.at_level(logging.DEBUG):
        df = convert_dicom(dicom_src, out, salt="k1")
    written = read_manifest(out)
    assert list(written.columns[: len(CONTRACT_COLUMNS)]) == list(CONTRACT_COLUMNS)
    modality = dict(zip(df["source_file"], df["modality"], strict=True))
    assert modality == {"IM0004": "ultrasound", "mg_mono1.dcm": "mammography",
                        "mg_mono2.dcm": "mammography", "us_rgb.dcm": "ultrasound"}
    r = _row(df, "source_file", "mg_mono2.dcm")
    assert r["image"] == "images/mg_mono2.png" and r["laterality"] == "L"
    img = cv2.imread(str(out / r["image"]), cv2.IMREAD_UNCHANGED)
    assert img.dtype == np.uint16 and img.shape == (32, 48)
    assert img[0, 0] == 0 and img[0, -1] == 65535
    # Groups: pseudonymised, keyed, shared by the two films of one patient.
    g = _row(df, "source_file", "mg_mono1.dcm")["group"]
    assert g == r["group"] == pseudonymize(FAKE_PATIENT_ID, "k1")
    assert df["group"].nunique() == 3
    # Bad files are counted and named, not fatal.
    assert "1 unreadable" in caplog.text and "1 skipped" in caplog.text
    assert "1 not DICOM" in caplog.text
    assert "no_pixels.dcm" in caplog.text and "garbage.dcm" in caplog.text


def test_dicom_patient_data_leaks_nowhere(dicom_src: Path, tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "dcm"
    with caplog.at_level(logging.DEBUG):
        convert_dicom(dicom_src, out, modality="mammography")
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) == 6  # manifest + 5 images (OT included by the override)
    for path in files:
        data = path.read_bytes()
        for fake in FAKE_STRINGS:
            assert fake.encode() not in data, f"{fake} leaked into {path.name}"
    records = caplog.text + " ".join(str(r.args) for r in caplog.records)
    for fake in FAKE_STRINGS:
        assert fake not in records, f"{fake} leaked into the log"


def test_dicom_labels_csv(dicom_src: Path, tmp_path: Path) -> None:
    labels_dir = tmp_path / "labels"
    (labels_dir / "masks").mkdir(parents=True)
    mask = np.zeros((32, 48), np.uint8)
    mask[4:8, 4:8] = 255
    cv2.imwrite(str(labels_dir / "masks" / "m2.png"), mask)
    pd.DataFrame({
        "file": ["mg_mono2.dcm", "us_rgb.dcm", "not_there.dcm"],
        "density": ["3", "", ""],
        "pathology": ["benign", "normal", "malignant"],
        "mask": ["masks/m2.png", "", ""],
        "patient_name": ["should", "not", "copy"],
    }).to_csv(labels_dir / "labels.csv", index=False)
    out = tmp_path / "dcm"
    df = convert_dicom(dicom_src, out, labels_csv=labels_dir / "labels.csv")
    r = _row(df, "source_file", "mg_mono2.dcm")
    assert (r["density"], r["pathology"]) == ("3", "benign")
    assert read_mask(resolve(out, r["mask"])).sum() == 16
    assert _row(df, "source_file", "us_rgb.dcm")["pathology"] == "normal"
    assert _row(df, "source_file", "mg_mono1.dcm")["pathology"] == ""
    assert "patient_name" not in df.columns


def test_dicom_errors(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="not a DICOM layout: .*found nothing at .*nowhere"):
        convert_dicom(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.dcm").write_bytes(b"junk" * 100)
    with pytest.raises(LayoutError, match=r"1 files not DICOM \(e.g. a.dcm\), 0 unreadable"):
        convert_dicom(tmp_path / "junk", tmp_path / "out")
    (tmp_path / "junk" / "a.dcm").rename(tmp_path / "junk" / "a.png")
    with pytest.raises(LayoutError, match="no candidate file .*files a.png"):
        convert_dicom(tmp_path / "junk", tmp_path / "out")
    with pytest.raises(IngestError, match="salt"):
        convert_dicom(make_dicom_files(tmp_path / "src"), tmp_path / "out", salt="")


def test_dicom_labels_errors(dicom_src: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    with pytest.raises(LayoutError, match="not a labels CSV layout: .*found nothing at"):
        convert_dicom(dicom_src, tmp_path / "out", labels_csv=labels)
    labels.write_text("name,density\nmg_mono2.dcm,3\n")
    with pytest.raises(LayoutError, match="'file' column.*found .*with columns name, density"):
        convert_dicom(dicom_src, tmp_path / "out", labels_csv=labels)


# --------------------------------------------------------------------------- dispatch


def test_ingest_dispatch(tmp_path: Path) -> None:
    assert FORMATS == ("busi", "mias", "csv", "dicom")
    df = ingest("BUSI", make_busi_layout(tmp_path / "src"), tmp_path / "out")
    assert (tmp_path / "out" / "manifest.csv").is_file() and len(df) == 7
    df = ingest("dicom", make_dicom_files(tmp_path / "src"), tmp_path / "d", salt="s",
                labels_csv=None, modality=None)
    assert len(df) == 4
    with pytest.raises(IngestError, match="busi, mias, csv, dicom"):
        ingest("nifti", tmp_path, tmp_path / "x")
    with pytest.raises(IngestError, match="roi"):
        ingest("busi", tmp_path / "src", tmp_path / "x", roi=("x", "y", "r"))
