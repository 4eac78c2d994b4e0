"""``breastscan ingest``: a wrong source ends in one ``Error:`` line, never a traceback."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner, Result

from breastscan.cli import main
from tests.layouts import make_busi_layout, make_dicom_files, make_mias_layout


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The command configures the root logger onto the runner's stream: undo that."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


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
