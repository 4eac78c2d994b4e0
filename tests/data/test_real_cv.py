"""5-fold grouped, stratified cross-validation on the real packs in ../shared/datasets (opt-in).

BUSI is grouped by near-duplicate group (145 groups over 333 images, 8 of them with
conflicting labels, 19 images); mini-MIAS by patient, so a patient's left and right films
stay in one part of every fold (161 patients, 322 films).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from breastscan.data.splits import EXCLUDED, cv_folds
from tests.unit.test_splits import assert_valid_cv

pytestmark = pytest.mark.data


def _manifest(shared_datasets: Path, name: str) -> pd.DataFrame:
    path = shared_datasets / name / "manifest.csv"
    if not path.is_file():
        pytest.skip(f"real dataset manifest not present at {path}")
    return pd.read_csv(path)


def _test_shares_close(cv: pd.DataFrame, label: str, tol: float) -> None:
    kept = cv[cv["split"] != EXCLUDED]
    overall = kept.drop_duplicates("image")[label].value_counts(normalize=True)
    test = kept[kept["split"] == "test"]
    for k, part in test.groupby("fold"):
        dist = part[label].value_counts(normalize=True)
        for value in overall.index:
            assert dist.get(value, 0) == pytest.approx(overall[value], abs=tol), (k, value)


def test_busi_five_fold_cv(shared_datasets: Path) -> None:
    busi = _manifest(shared_datasets, "busi")
    cv, report = cv_folds(busi, stratify=["label"], group_column="dup_group", n_folds=5, seed=0,
                          exclude_label_conflicts=True)
    assert report["label_conflict_groups"] == 8
    assert report["excluded_rows"] == 19
    assert_valid_cv(cv, busi, "dup_group", 5)
    _test_shares_close(cv, "label", tol=0.03)
    sizes = [f["test"]["rows"] for f in report["folds"]]
    assert max(sizes) - min(sizes) <= 0.05 * (780 - 19)


def test_mias_five_fold_cv_keeps_patients_together(shared_datasets: Path) -> None:
    mias = _manifest(shared_datasets, "mini_mias")
    # labels=(): a patient's two films may rightly differ (normal left, malignant right)
    cv, report = cv_folds(mias, stratify=["pathology"], group_column="patient_id", n_folds=5,
                          seed=0, labels=())
    assert report["n_groups"] == 161
    assert report["excluded_rows"] == 0
    assert_valid_cv(cv, mias, "patient_id", 5)
    both_sides = cv.groupby(["patient_id", "fold"])["side"].nunique()
    assert (both_sides == 2).all()  # every patient has both films in every fold...
    assert (cv.groupby(["patient_id", "fold"])["split"].nunique() == 1).all()  # ...in one part
    _test_shares_close(cv, "pathology", tol=0.05)


@pytest.mark.parametrize("name, conflicts", [("busi", 8), ("mini_mias", 0)])
def test_the_quality_benchmark_folds_on_the_real_packs(shared_datasets: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, name: str,
                                                       conflicts: int) -> None:
    from breastscan.evaluation import crossval

    source = shared_datasets / name / "manifest.csv"
    if not source.is_file():
        pytest.skip(f"real dataset manifest not present at {source}")
    bench = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.yaml"
    monkeypatch.chdir(tmp_path)  # the converted copy goes under ./work/quality/
    spec = crossval.load_benchmark(bench, {"benchmark.source": str(source)})
    manifest = crossval.prepare_dataset(spec)
    cv, report = crossval.make_folds(spec, manifest)
    assert len(report["conflict_groups"]) == conflicts
    for fold in range(spec.folds):
        for task in spec.tasks:
            frame = crossval.fold_splits(spec, cv, fold, task)
            groups = {s: set(frame.loc[frame["split"] == s, "group"].dropna())
                      for s in ("train", "val", "test")}
            assert not groups["train"] & groups["test"] and not groups["val"] & groups["test"]
            assert not frame.loc[frame["conflict"], "split"].isin(["train", "val"]).any()
    assert cv[cv["split"] == "test"]["image"].is_unique and (cv["split"] == "test").sum() == len(manifest)
