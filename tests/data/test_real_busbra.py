"""BUS-BRA on the real pack in ../shared/datasets/busbra (opt-in data tests, about 20 s).

The README's line ingests it (files referenced in place), the GX suites pass, the extra
columns the cross-site work needs survive, and both ways of splitting it (the prepare
stage's train/val/test and the quality benchmark's 5 folds) keep every ``group`` (a patient,
merged with any duplicate link between two patients) in one part. The numbers come from the
pack's README: 1,875 images, benign 1268 / malignant 607, 1,064 patients in 1,055 groups,
four scanners; 7 merged groups (28 images) span two of the authors' official folds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from breastscan.cli import main
from breastscan.config import load_params
from breastscan.data.loading import row_groups
from breastscan.data.manifest import normalize_manifest, read_manifest, resolve
from breastscan.data.splits import EXCLUDED, prepare_splits
from breastscan.data.validation import validate_dataset
from breastscan.evaluation import crossval
from tests.conftest import REPO
from tests.unit.test_splits import assert_valid_cv

pytestmark = pytest.mark.data

BENCHMARK = REPO / "benchmarks" / "busbra.yaml"
EXTRA = ("patient_id", "device", "histology", "birads", "side", "official_fold")
"""Pack columns the manifest must keep (device and histology: the cross-site benchmark)."""
DEVICES = {"GE Logiq 7 @10-14MHz": 902, "GE Logiq 5 @10-12MHz": 809,
           "Toshiba Aplio 300 @12-14 MHz": 139, "U-Systems @10-14MHz": 25}


@pytest.fixture(scope="module")
def source(shared_datasets: Path) -> Path:
    path = shared_datasets / "busbra" / "manifest.csv"
    if not path.is_file():
        pytest.skip(f"BUS-BRA pack not present at {path} (see benchmarks/busbra.yaml)")
    return path


@pytest.fixture(scope="module")
def pack(source: Path) -> pd.DataFrame:
    return pd.read_csv(source, dtype=str, keep_default_na=False, na_values=[""])


@pytest.fixture(scope="module")
def ingested(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The pack converted by the README's command (no --copy: files referenced in place)."""
    out = tmp_path_factory.mktemp("busbra")
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # the CLI configures the root logger
    try:
        done = CliRunner().invoke(main, ["ingest", "--format", "csv", str(source), str(out),
                                         "--map", "label=pathology", "--modality", "ultrasound"])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert done.exit_code == 0, done.output
    assert f"{out}/manifest.csv: 1875 rows" in done.stdout
    yield out


@pytest.fixture(scope="module")
def dataset() -> crossval.BenchmarkSpec:
    return crossval.load_benchmark(BENCHMARK)


def _cross_fold_groups(pack: pd.DataFrame) -> pd.Series:
    """The groups spanning two of the authors' folds (patients linked by a duplicate)."""
    spans = pack.groupby("group")["official_fold"].nunique()
    return spans[spans > 1].index.to_series()


def test_ingest_keeps_labels_groups_and_extra_columns(ingested: Path, pack: pd.DataFrame) -> None:
    df = read_manifest(ingested)
    assert len(df) == 1875 and set(df["modality"]) == {"ultrasound"}
    assert df["pathology"].value_counts().to_dict() == {"benign": 1268, "malignant": 607}
    assert df["group"].tolist() == pack["group"].tolist()  # the pack's grouping, as it stands
    assert df["group"].nunique() == 1055 and df["patient_id"].nunique() == 1064
    for column in EXTRA:  # kept, cell for cell, and never empty
        assert df[column].tolist() == pack[column].tolist(), column
        assert df[column].notna().all(), column
    assert df["device"].value_counts().to_dict() == DEVICES
    # the pack's duplicate ids (65 images) are kept aside: the rows' groups are the patients
    assert "dup_group" not in df.columns and df["source_dup_group"].notna().sum() == 65
    assert list(row_groups(df)) == pack["group"].tolist()
    assert df["histology"].nunique() > 10 and set(df["official_fold"]) == {"1", "2", "3", "4", "5"}
    assert all(resolve(ingested, p).is_file() for p in df["image"])
    assert all(resolve(ingested, p).is_file() for p in df["mask"])
    assert not (ingested / "images").exists()  # referenced in place


def test_validation_passes(ingested: Path, dataset: crossval.BenchmarkSpec) -> None:
    cfg = replace(dataset.params.dataset("busbra"), path=ingested)
    report = validate_dataset(ingested, cfg, load_params(REPO / "params.yaml").validate)
    assert report.success, report.summary()
    assert report.statistics["label_counts"]["pathology"] == {"benign": 1268, "malignant": 607}


def test_prepare_keeps_every_group_in_one_split(ingested: Path, pack: pd.DataFrame,
                                                dataset: crossval.BenchmarkSpec) -> None:
    cfg = dataset.params.dataset("busbra")
    manifest = normalize_manifest(read_manifest(ingested))
    out, report = prepare_splits(manifest, ingested, labels=cfg.labels, stratify=cfg.stratify,
                                 dedup=cfg.dedup, cfg=load_params(REPO / "params.yaml").prepare)
    assert report["summary"]["near_duplicate_pairs"] == 1  # busbra_0526-l and -r: one patient
    assert report["summary"]["label_conflict_groups"] == 0 and not (out["split"] == EXCLUDED).any()
    assert (out.groupby("group")["split"].nunique() == 1).all()
    assert (out.groupby("group")["dup_group"].nunique() == 1).all()  # links only merge groups
    spanning = _cross_fold_groups(pack)
    assert len(spanning) == 7 and pack["group"].isin(spanning).sum() == 28
    assert (out[out["group"].isin(spanning)].groupby("group")["split"].nunique() == 1).all()
    shares = out["split"].value_counts(normalize=True)
    assert shares["test"] == pytest.approx(0.2, abs=0.02) and shares["val"] == pytest.approx(0.15, abs=0.02)
    malignant = out.groupby("split")["pathology"].apply(lambda s: (s == "malignant").mean())
    assert (malignant - 607 / 1875).abs().max() < 0.03  # stratified


def test_benchmark_folds_keep_groups_together(source: Path, pack: pd.DataFrame, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the benchmark's copy goes under ./work/quality/
    spec = crossval.load_benchmark(BENCHMARK, {"benchmark.source": str(source)})
    manifest = crossval.prepare_dataset(spec)
    cv, report = crossval.make_folds(spec, manifest)
    assert report["conflict_groups"] == [] and report["n_groups"] == 1055
    assert_valid_cv(cv, manifest, "group", spec.folds)
    spanning = set(_cross_fold_groups(pack))
    for fold in range(spec.folds):
        for task in spec.tasks:
            frame = crossval.fold_splits(spec, cv, fold, task)
            assert (frame.groupby("group")["split"].nunique() == 1).all(), (fold, task.model)
            assert frame[frame["group"].isin(spanning)]["group"].nunique() == 7
    assert manifest["device"].value_counts().to_dict() == DEVICES
