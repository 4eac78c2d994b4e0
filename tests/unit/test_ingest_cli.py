"""``breastscan ingest``: a wrong source ends in one ``Error:`` line, never a traceback."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner, Result

from breastscan.cli import main
from breastscan.data.pseudonym_salt import SALT_ENV
from breastscan.imaging.dicom import pseudonymize
from tests.layouts import FAKE_PATIENT_ID, make_busi_layout, make_dicom_files, make_mias_layout

pytestmark = pytest.mark.usefixtures("restore_root_logging")


TEST_SALT = "0123456789abcdef-test-salt"


@pytest.fixture(autouse=True)
def _secret_salt(monkeypatch: pytest.MonkeyPatch) -> None:
    """A strong salt in the environment, so that no test creates a salt file in the checkout."""
    monkeypatch.setenv(SALT_ENV, TEST_SALT)


def _ingest(*args: str | Path) -> Result:
    return CliRunner().invoke(main, ["ingest", *(str(a) for a in args)])


def _one_error_line(result: Result) -> str:
    """Assert the run failed with exit code 1 and exactly one ``Error:`` line; return it."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not an uncaught error
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert result.stdout == ""
    return lines[0]


def _pngs(root: Path) -> Path:
    """A folder of three random PNGs (no layout at all)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        cv2.imwrite(str(root / f"r{i}.png"), rng.integers(0, 255, (8, 8), dtype=np.uint8))
    return root


def _empty(root: Path) -> Path:
    root.mkdir(parents=True)
    return root


def _a_file(root: Path) -> Path:
    root.parent.mkdir(parents=True, exist_ok=True)
    root.write_text("just a file\n")
    return root


_WRONG_SOURCES: dict[str, Callable[[Path], Path]] = {
    "missing": lambda p: p / "nowhere",
    "empty": _empty,
    "random-pngs": _pngs,
    "a-file": _a_file,
    "busi": make_busi_layout,
    "mias": make_mias_layout,
}
"""Source makers by name; each writes under the given path and returns the SOURCE."""


@pytest.mark.parametrize(("fmt", "source", "expected"), [
    ("busi", "missing", "not a BUSI layout: expected a folder with sub-folders benign/, malignant/"),
    ("busi", "empty", "found an empty folder"),
    ("busi", "random-pngs", "holding no folder and files r0.png, r1.png, r2.png"),
    ("busi", "a-file", "found a file"),
    ("busi", "mias", "found .*all-mias holding no folder and files Info.txt, mdb001.pgm"),
    ("mias", "missing", "not a mini-MIAS layout: expected a folder holding Info.txt"),
    ("mias", "empty", "found an empty folder"),
    ("mias", "random-pngs", "files r0.png"),
    ("mias", "a-file", "found a file"),
    ("mias", "busi", "found .*Dataset_BUSI_with_GT holding folders benign/, malignant/, normal/"),
    ("csv", "missing", "not a CSV layout: expected a CSV file, or a folder holding manifest.csv"),
    ("csv", "random-pngs", "files r0.png"),
    ("csv", "busi", "folders benign/"),
    ("dicom", "missing", "not a DICOM layout: expected a folder of DICOM files"),
    ("dicom", "empty", "found no candidate file"),
    ("dicom", "random-pngs", "found no candidate file .* files r0.png"),
    ("dicom", "a-file", "found a file"),
    ("dicom", "mias", r"8 files not DICOM \(e.g. mdb001.pgm"),
])
def test_wrong_layout_is_one_line(fmt: str, source: str, expected: str, tmp_path: Path) -> None:
    src = _WRONG_SOURCES[source](tmp_path / "src")
    line = _one_error_line(_ingest("--format", fmt, src, tmp_path / "out"))
    assert re.search(expected, line), line
    assert not (tmp_path / "out" / "manifest.csv").exists()


@pytest.fixture()
def csv_pack(tmp_path: Path) -> Path:
    """A CSV pack: three images, column names of its own, density as BI-RADS letters."""
    src = tmp_path / "pack"
    (src / "images").mkdir(parents=True)
    for name in "abcd":
        cv2.imwrite(str(src / "images" / f"{name}.png"), np.full((16, 16), 90, np.uint8))
    pd.DataFrame({
        "path": [f"images/{n}.png" for n in "abcd"],
        "birads": ["A", "B", "C", "B"],
        "label": ["benign", "normal", "malignant", ""],
    }).to_csv(src / "table.csv", index=False)
    return src / "table.csv"


@pytest.mark.parametrize(("extra", "expected"), [
    (["--map", "img=image"], r"columns to map not found: img \(columns are: path, birads, label\)"),
    ([], r"no 'image' column: .*\(columns are: path, birads, label\)"),
    (["--map", "path=image", "--value", "density:A=1"],
     "values given for column 'density', which the CSV does not have"),
    (["--map", "path=image", "--roi", "x,y,r"], "ROI columns not found: x, y, r"),
    (["--map", "path=image", "--map", "birads=density", "--value", "density:A=1"],
     r"values of 'density' not valid after the value mapping: B \(2\), C \(1\); valid: 1, 2, 3, 4"),
    (["--map", "path=image", "--map", "label=pathology", "--value", "pathology:benign=Benign"],
     r"values of 'pathology' not valid .*: benign->Benign \(1\)"),
])
def test_csv_mistakes_are_one_line(csv_pack: Path, extra: list[str], expected: str,
                                   tmp_path: Path) -> None:
    line = _one_error_line(_ingest("--format", "csv", csv_pack, tmp_path / "out", *extra))
    assert re.search(expected, line), line


def test_csv_not_a_csv_is_one_line(csv_pack: Path, tmp_path: Path) -> None:
    line = _one_error_line(_ingest("--format", "csv", csv_pack.parent / "images" / "a.png",
                                   tmp_path / "out"))
    assert "expected a text CSV with a header row" in line and "does not parse" in line


def test_dicom_missing_labels_is_one_line(tmp_path: Path) -> None:
    src = make_dicom_files(tmp_path / "src")
    line = _one_error_line(_ingest("--format", "dicom", src, tmp_path / "out",
                                   "--labels", tmp_path / "labels.csv"))
    assert "not a labels CSV layout" in line and "found nothing at" in line


def test_unmapped_values_warned_once(csv_pack: Path, tmp_path: Path) -> None:
    result = _ingest("--format", "csv", csv_pack, tmp_path / "out", "--map", "path=image",
                     "--map", "label=pathology", "--value", "pathology:benign=benign")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, result.stderr
    assert warnings[0].endswith("table.csv: 2 values of 'pathology' have no value mapping, kept as "
                                "they are: malignant (1), normal (1)")
    assert "manifest.csv: 4 rows" in result.stdout


def test_full_value_mapping_is_silent(csv_pack: Path, tmp_path: Path) -> None:
    result = _ingest("--format", "csv", csv_pack, tmp_path / "out", "--map", "path=image",
                     "--map", "birads=density", *(f"--value=density:{k}={v}" for k, v in
                                                  (("A", 1), ("B", 2), ("C", 3))))
    assert result.exit_code == 0, result.output
    assert "WARNING" not in result.stderr
    assert list(pd.read_csv(tmp_path / "out" / "manifest.csv")["density"]) == [1, 2, 3, 2]


def test_value_option_syntax_is_a_usage_error(csv_pack: Path, tmp_path: Path) -> None:
    result = _ingest("--format", "csv", csv_pack, tmp_path / "out", "--value", "A=1")
    assert result.exit_code == 2 and "expected COLUMN:SRC=DST, got 'A=1'" in result.stderr
    assert "Traceback" not in result.output


def test_out_is_a_file_is_a_usage_error(tmp_path: Path) -> None:
    src = make_busi_layout(tmp_path / "src")
    result = _ingest("--format", "busi", src, _a_file(tmp_path / "out.txt"))
    assert result.exit_code == 2 and "is a file" in result.stderr
    assert isinstance(result.exception, SystemExit)


def test_good_layout_converts(tmp_path: Path) -> None:
    result = _ingest("--format", "busi", make_busi_layout(tmp_path / "src"), tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"{tmp_path / 'out'}/manifest.csv: 7 rows"


# --------------------------------------------------------------------------- the DICOM salt


def _dicom_groups(out: Path) -> set[str]:
    return set(pd.read_csv(out / "manifest.csv")["group"])


@pytest.mark.parametrize("salt", ["breastscan", "short-salt"])
def test_public_or_short_salt_is_refused(salt: str, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SALT_ENV)
    line = _one_error_line(_ingest("--format", "dicom", make_dicom_files(tmp_path / "src"),
                                   tmp_path / "out", "--salt", salt))
    assert "could reverse the group ids" in line and "--allow-public-salt" in line
    assert ("public default" if salt == "breastscan" else "shorter than 16") in line
    assert not (tmp_path / "out" / "manifest.csv").exists()


def test_env_salt_wins(tmp_path: Path) -> None:
    result = _ingest("--format", "dicom", make_dicom_files(tmp_path / "src"), tmp_path / "out",
                     "--salt", "another-salt-of-enough-length")
    assert result.exit_code == 0, result.output
    assert pseudonymize(FAKE_PATIENT_ID, TEST_SALT) in _dicom_groups(tmp_path / "out")
    assert "is set: it is used" in result.stderr
    assert TEST_SALT not in result.output


def test_salt_file_created_0600_on_first_use_and_reused(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SALT_ENV)
    monkeypatch.chdir(tmp_path)
    src = make_dicom_files(tmp_path / "src")
    first = _ingest("--format", "dicom", src, tmp_path / "out1")
    assert first.exit_code == 0, first.output
    salt_file = tmp_path / ".breastscan" / "pseudonym.salt"
    assert salt_file.stat().st_mode & 0o777 == 0o600
    salt = salt_file.read_text().strip()
    assert len(salt) == 64
    assert "created a new pseudonymisation salt" in first.stderr and "back it up" in first.stderr
    assert salt not in first.output
    assert pseudonymize(FAKE_PATIENT_ID, salt) in _dicom_groups(tmp_path / "out1")

    second = _ingest("--format", "dicom", src, tmp_path / "out2")
    assert second.exit_code == 0, second.output
    assert "pseudonym_salt" not in second.stderr
    assert salt_file.read_text().strip() == salt
    assert _dicom_groups(tmp_path / "out2") == _dicom_groups(tmp_path / "out1")


def test_salt_file_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SALT_ENV)
    src = make_dicom_files(tmp_path / "src")
    line = _one_error_line(_ingest("--format", "dicom", src, tmp_path / "out",
                                   "--salt-file", tmp_path / "missing.salt"))
    assert "missing.salt not found" in line
    (tmp_path / "mine.salt").write_text("a-salt-kept-elsewhere-0001\n")
    result = _ingest("--format", "dicom", src, tmp_path / "out", "--salt-file", tmp_path / "mine.salt")
    assert result.exit_code == 0, result.output
    assert pseudonymize(FAKE_PATIENT_ID, "a-salt-kept-elsewhere-0001") in _dicom_groups(tmp_path / "out")


def test_allow_public_salt_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SALT_ENV)
    monkeypatch.chdir(tmp_path)
    result = _ingest("--format", "dicom", make_dicom_files(tmp_path / "src"), tmp_path / "out",
                     "--allow-public-salt")
    assert result.exit_code == 0, result.output
    assert pseudonymize(FAKE_PATIENT_ID, "breastscan") in _dicom_groups(tmp_path / "out")
    warnings = [line for line in result.stderr.splitlines() if "pseudonym_salt" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0], result.stderr
    assert "public default salt" in warnings[0] and "reversible" in warnings[0]
    assert not (tmp_path / ".breastscan").exists()
