"""breastscan.evaluation.crossval: benchmark files, leak-free folds, scoring, and a run on phantoms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from sklearn.metrics import accuracy_score, roc_auc_score

from breastscan.cli import main
from breastscan.evaluation import crossval

REPO = Path(__file__).resolve().parents[2]


def _bench_file(tmp_path: Path, source: Path, **model_overrides: object) -> Path:
    """A small benchmark file on a phantom ultrasound set: a 3-class tumor model and a U-Net."""
    tumor = {"task": "classification", "dataset": "us", "label": "pathology",
             "classes": ["benign", "malignant", "normal"], "backbone": "compact",
             "preprocess": {"height": 32, "width": 32}, "epochs": 1, "batch_size": 16, "patience": 0,
             "headline": "macro_auc", **model_overrides}
    lesion = {"task": "segmentation", "dataset": "us", "label": "mask", "base_filters": 4, "depth": 2,
              "preprocess": {"height": 32, "width": 32}, "epochs": 1, "batch_size": 16, "patience": 0,
              "imbalance": "none", "headline": "mean_dice"}
    raw = {
        "benchmark": {"name": "phantom_us", "title": "phantom ultrasound", "source": str(source),
                      "ingest": {"format": "csv"}, "dataset": "us", "folds": 3, "seed": 0,
                      "val_fraction": 0.2, "stratify": ["pathology"], "group_column": "group",
                      "conflict_labels": ["pathology"],
                      "tasks": [{"model": "tumor", "binary": {"positive": "malignant", "negative": "benign"}},
                                {"model": "lesion", "rows": {"pathology": ["benign", "malignant"]}}],
                      "references": [{"what": "a reference", "source": "a paper"}]},
        "datasets": {"us": {"path": str(tmp_path / "work" / "us"), "modality": "ultrasound"}},
        "models": {"tumor": tumor, "lesion": lesion},
    }
    path = tmp_path / "phantom_us.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("name", ["busi", "mini_mias", "busi_gpu", "busbra", "busbra_gpu"])
def test_the_shipped_benchmark_files_parse(name: str) -> None:
    spec = crossval.load_benchmark(REPO / "benchmarks" / f"{name}.yaml")
    assert spec.name == name and spec.folds == 5 and spec.tasks
    for task in spec.tasks:
        assert spec.model(task).dataset == spec.dataset  # checked by the loader as well


def test_full_size_benchmark_runs_by_default_only_where_there_is_a_gpu() -> None:
    names = lambda files: [f.stem for f in files]  # noqa: E731
    assert names(crossval.benchmark_files(gpu=False)) == ["busi", "mini_mias"]
    assert names(crossval.benchmark_files(gpu=True)) == ["busbra", "busbra_gpu", "busi", "busi_gpu",
                                                         "cross_site", "cross_site_gpu", "mini_mias"]
    assert names(crossval.benchmark_files(["busi_gpu"], gpu=False)) == ["busi_gpu"]  # named: runs anyway
    gpu = crossval.load_benchmark(REPO / "benchmarks" / "busi_gpu.yaml")
    cpu = crossval.load_benchmark(REPO / "benchmarks" / "busi.yaml")
    big, small = gpu.params.model("busi_tumor"), cpu.params.model("busi_tumor")
    assert big.input_shape[0] > small.input_shape[0] and big.base_filters > small.base_filters


def test_pooled_calibration_recovers_the_uncalibrated_ece() -> None:
    """Out-of-fold rows of models with different temperatures: ECE as served and at T = 1."""
    from breastscan.evaluation.calibration import expected_calibration_error
    from breastscan.evaluation.scoring import Scoring, pooled_calibration

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (200, 3))
    y = rng.integers(0, 3, 200)
    temperature = np.where(np.arange(200) < 100, 2.0, 0.5)
    served = np.exp(logits / temperature[:, None])
    served /= served.sum(axis=1, keepdims=True)
    raw = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    names = ("benign", "malignant", "normal")
    pred = pd.DataFrame({"image": [f"{i}.png" for i in range(200)], "true": [names[c] for c in y],
                         **{f"prob_{n}": served[:, c] for c, n in enumerate(names)},
                         "temperature": temperature})
    scoring = Scoring(task="classification", class_names=names, headline="macro_auc", metrics=("macro_auc",))
    cal = pooled_calibration(pred, scoring)
    assert cal is not None
    assert cal["ece"] == pytest.approx(expected_calibration_error(served, y, n_bins=15))
    assert cal["ece_at_t1"] == pytest.approx(expected_calibration_error(raw, y, n_bins=15))
    assert cal["ece"] != pytest.approx(cal["ece_at_t1"])
    assert pooled_calibration(pred.drop(columns="temperature"), scoring) is None


def test_overrides_change_a_run_like_dvc_exp_run_set() -> None:
    overrides = crossval.parse_overrides(["models.busi_tumor.epochs=3", "benchmark.folds=4",
                                         "models.busi_tumor.preprocess.height=64"])
    assert overrides == {"models.busi_tumor.epochs": 3, "benchmark.folds": 4,
                         "models.busi_tumor.preprocess.height": 64}
    spec = crossval.load_benchmark(REPO / "benchmarks" / "busi.yaml", overrides)
    cfg = spec.params.model("busi_tumor")
    assert (spec.folds, cfg.epochs, cfg.preprocess.height) == (4, 3, 64)
    with pytest.raises(KeyError, match="nosuch"):
        crossval.load_benchmark(REPO / "benchmarks" / "busi.yaml", {"nosuch.section.key": 1})
    with pytest.raises(ValueError, match="KEY=VALUE"):
        crossval.parse_overrides(["models.busi_tumor.epochs"])


def test_a_task_on_another_dataset_is_refused(tmp_path: Path) -> None:
    path = _bench_file(tmp_path, tmp_path / "x.csv")
    raw = yaml.safe_load(path.read_text())
    raw["datasets"]["other"] = {"path": "elsewhere", "modality": "ultrasound"}
    raw["models"]["tumor"]["dataset"] = "other"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="trains on 'other'"):
        crossval.load_benchmark(path)


def test_a_missing_dataset_says_what_is_needed(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["bench-quality", "busi", "--datasets", str(tmp_path / "none")])
    assert result.exit_code == 1
    assert str(tmp_path / "none" / "busi" / "manifest.csv") in result.output
    assert "not on this machine" in result.output
    spec = crossval.load_benchmark(REPO / "benchmarks" / "busi.yaml",
                                  {"benchmark.source": str(tmp_path / "none.csv")})
    with pytest.raises(crossval.MissingDataset, match="none.csv"):
        crossval.prepare_dataset(spec)


# --------------------------------------------------------------------------- folds


def _manifest() -> pd.DataFrame:
    """60 rows: groups of 2, one group filed under two classes, ungrouped singletons."""
    rows = []
    labels = ["benign", "malignant", "normal"]
    for i in range(60):
        group = f"g{i // 2:02d}" if i < 40 else None
        rows.append({"image": f"im{i:02d}.png", "pathology": labels[(i // 2) % 3], "group": group})
    rows[1]["pathology"] = "malignant" if rows[0]["pathology"] != "malignant" else "benign"  # conflict in g00
    return pd.DataFrame(rows)


def test_conflict_groups_are_kept_out_of_training_and_scored_on_test(tmp_path: Path) -> None:
    spec = crossval.load_benchmark(_bench_file(tmp_path, tmp_path / "x.csv"))
    cv, report = crossval.make_folds(spec, _manifest())
    assert report["conflict_groups"] == ["g00"] and report["conflict_rows"] == 2
    tested = []
    for fold in range(spec.folds):
        for task in spec.tasks:
            frame = crossval.fold_splits(spec, cv, fold, task)
            conflict = frame[frame["conflict"]]
            assert not conflict["split"].isin(["train", "val"]).any()
            parts = {s: set(frame.loc[frame["split"] == s, "group"].dropna())
                     for s in ("train", "val", "test")}
            assert not (parts["train"] & parts["test"]) and not (parts["val"] & parts["test"])
            if task.rows:  # the lesion task: lesion images only
                assert (frame.loc[frame["split"] != "excluded", "pathology"] != "normal").all()
        tested += list(cv.loc[(cv["fold"] == fold) & (cv["split"] == "test"), "image"])
    assert sorted(tested) == sorted(_manifest()["image"])  # every image tested once, conflicts included


# --------------------------------------------------------------------------- scoring


def _predictions(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    names = ["benign", "malignant", "normal"]
    n = 90
    true = np.array([names[i % 3] for i in range(n)])
    probs = rng.dirichlet(np.ones(3), size=n)
    probs[np.arange(n), [names.index(t) for t in true]] += 0.6  # informative, not perfect
    probs /= probs.sum(axis=1, keepdims=True)
    return pd.DataFrame({
        "image": [f"im{i}" for i in range(n)], "true": true,
        "pred": [names[k] for k in probs.argmax(axis=1)],
        **{f"prob_{c}": probs[:, i] for i, c in enumerate(names)},
        "fold": np.arange(n) % 3, "group": [f"g{i // 2}" for i in range(n)],
        "conflict": np.arange(n) < 4,
    })


def test_scores_are_per_fold_mean_sd_and_pooled_with_intervals(tmp_path: Path) -> None:
    spec = crossval.load_benchmark(_bench_file(tmp_path, tmp_path / "x.csv"))
    pred = _predictions()
    scores = crossval.score_task(spec, spec.tasks[0], pred)
    assert set(scores) == {"all", "without_conflicts"} and scores["without_conflicts"]["n"] == 86
    acc = scores["all"]["metrics"]["accuracy"]
    assert acc["value"] == pytest.approx(accuracy_score(pred["true"], pred["pred"]))
    probs = pred[["prob_benign", "prob_malignant", "prob_normal"]].to_numpy()
    auc = scores["all"]["metrics"]["macro_auc"]
    assert auc["value"] == pytest.approx(roc_auc_score(pred["true"], probs, multi_class="ovr"), abs=1e-12)
    # each fold of these rows holds one class only: no AUC per fold, a pooled one all the same
    assert pred.groupby("fold")["true"].nunique().tolist() == [1, 1, 1]
    assert auc["per_fold"] == [None, None, None] and auc["mean"] is None and auc["sd"] is None
    assert auc["ci_low"] <= auc["value"] <= auc["ci_high"]
    per_fold = [accuracy_score(f["true"], f["pred"]) for _, f in pred.groupby("fold")]
    assert acc["per_fold"] == pytest.approx(per_fold)
    assert acc["mean"] == pytest.approx(np.mean(per_fold))
    assert acc["sd"] == pytest.approx(np.std(per_fold, ddof=1))
    assert acc["ci_low"] <= acc["value"] <= acc["ci_high"]

    binary = pred[pred["true"].isin(["benign", "malignant"])]
    score = binary["prob_malignant"] / (binary["prob_malignant"] + binary["prob_benign"])
    y = (binary["true"] == "malignant").to_numpy()
    auc = scores["all"]["metrics"]["malignant_vs_benign_auc"]
    assert auc["value"] == pytest.approx(roc_auc_score(y, score))
    sens = scores["all"]["metrics"]["malignant_vs_benign_sensitivity"]["value"]
    spec_ = scores["all"]["metrics"]["malignant_vs_benign_specificity"]["value"]
    assert sens == pytest.approx(np.mean(score[y] >= 0.5))
    assert spec_ == pytest.approx(np.mean(score[~y] < 0.5))


def test_markdown_table_matches_the_json() -> None:
    results = {"benchmarks": {"x": {
        "title": "t", "folds": 5, "folds_run": [0, 1, 2, 3, 4], "quick": False, "n_rows": 10,
        "conflict_groups": [], "conflict_rows": 0, "minutes": 1.0,
        "references": [{"what": "AUC 0.86", "source": "BUSBench"}],
        "tasks": {"m": {"scores": {"all": {"n": 10, "metrics": {"auc": {
            "value": 0.81234, "ci_low": 0.7, "ci_high": 0.9, "mean": 0.8, "sd": 0.05}}}}}}}}}
    md = crossval.render_markdown(results)
    assert "| m | auc | all (n=10) | 0.812 (0.700-0.900); folds 0.800 ± 0.050 |" in md
    assert "AUC 0.86" in md and "BUSBench" in md


# --------------------------------------------------------------------------- a real run, tiny


@pytest.mark.slow
def test_quick_run_on_phantoms_trains_scores_and_writes_the_report(tiny_phantoms: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = _bench_file(tmp_path, tiny_phantoms / "ultrasound" / "manifest.csv")
    spec = crossval.load_benchmark(path)
    result = crossval.run_benchmark(spec, tmp_path / "out", folds=[1])
    assert result["folds_run"] == [1] and set(result["tasks"]) == {"tumor", "lesion"}
    tumor = result["tasks"]["tumor"]
    assert tumor["folds"][0]["n_test"] > 0 and tumor["folds"][0]["epochs_run"] == 1
    # the pooled AUC is scikit-learn's on the pooled out-of-fold scores (one-vs-rest, macro over
    # the classes the test rows hold), and the per-fold value of the only fold run is the same
    oof = pd.read_csv(tmp_path / "out" / "phantom_us" / "tumor" / "fold1" / "predictions.csv")
    assert len(oof) == tumor["folds"][0]["n_test"] == tumor["scores"]["all"]["n"]
    classes = ["benign", "malignant", "normal"]
    probs = oof[[f"prob_{c}" for c in classes]].to_numpy()
    present = [i for i, c in enumerate(classes) if 0 < (oof["true"] == c).sum() < len(oof)]
    expected = np.mean([roc_auc_score(oof["true"] == classes[i], probs[:, i]) for i in present])
    macro_auc = tumor["scores"]["all"]["metrics"]["macro_auc"]
    assert macro_auc["value"] == pytest.approx(expected, abs=1e-9)
    assert macro_auc["per_fold"] == [macro_auc["value"]]
    assert macro_auc["ci_low"] <= macro_auc["value"] <= macro_auc["ci_high"]
    binary = oof[oof["true"].isin(["benign", "malignant"])]
    score = binary["prob_malignant"] / (binary["prob_malignant"] + binary["prob_benign"])
    assert tumor["scores"]["all"]["metrics"]["malignant_vs_benign_auc"]["value"] == pytest.approx(
        roc_auc_score(binary["true"] == "malignant", score), abs=1e-9)
    assert "malignant_vs_benign_sensitivity" in tumor["scores"]["all"]["metrics"]
    calibration = tumor["scores"]["all"]["calibration"]  # pooled ECE, as served and at T = 1
    assert 0.0 <= calibration["ece"] <= 1.0 and 0.0 <= calibration["ece_at_t1"] <= 1.0
    assert (oof["temperature"] == tumor["folds"][0]["temperature"]).all()
    lesion = result["tasks"]["lesion"]
    pred = pd.read_csv(tmp_path / "out" / "phantom_us" / "lesion" / "fold1" / "predictions.csv")
    assert len(pred) == lesion["scores"]["all"]["n"] and pred["lesion"].all()  # normals left out
    report = crossval.write_report({"benchmarks": {"phantom_us": result}}, tmp_path / "q.json")
    written = json.loads(report.read_text())["benchmarks"]["phantom_us"]
    assert written["tasks"]["tumor"]["task"] == "classification"
    assert "phantom_us" in report.with_suffix(".md").read_text()


def test_a_report_keeps_the_benchmarks_not_rerun(tmp_path: Path) -> None:
    path = tmp_path / "q.json"
    assert crossval.read_report(path) == {"benchmarks": {}}
    crossval.write_report({"benchmarks": {"busi": {"title": "b", "folds": 5, "folds_run": [0], "quick": False,
                                                  "n_rows": 1, "conflict_groups": [], "conflict_rows": 0,
                                                  "minutes": 1.0, "tasks": {}}}}, path)
    kept = crossval.read_report(path)
    assert list(kept["benchmarks"]) == ["busi"]
    path.write_text("[1, 2]")
    assert crossval.read_report(path) == {"benchmarks": {}}


@pytest.mark.slow
def test_rescoring_the_saved_predictions_gives_the_same_scores(tiny_phantoms: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    spec = crossval.load_benchmark(_bench_file(tmp_path, tiny_phantoms / "ultrasound" / "manifest.csv"))
    result = crossval.run_benchmark(spec, tmp_path / "out", folds=[0, 2])
    again = crossval.rescore(spec, result, tmp_path / "out")
    for model, task in result["tasks"].items():
        assert again["tasks"][model]["scores"] == task["scores"], model
        assert again["tasks"][model]["folds"] == task["folds"]
    (tmp_path / "out" / "phantom_us" / "tumor" / "fold2" / "predictions.csv").unlink()
    with pytest.raises(FileNotFoundError, match="fold2"):
        crossval.rescore(spec, result, tmp_path / "out")


def test_threshold_for_a_target_sensitivity() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    assert crossval.threshold_for_sensitivity(scores, 0.88) == 0.1   # 9 of 10 at >= 0.1
    assert crossval.threshold_for_sensitivity(scores, 0.5) == 0.5
    assert crossval.threshold_for_sensitivity(scores, 1.0) == 0.05
    t = crossval.threshold_for_sensitivity(scores, 0.88)
    assert np.mean(scores >= t) >= 0.88


def test_the_target_operating_point_is_chosen_on_the_other_folds(tmp_path: Path) -> None:
    path = _bench_file(tmp_path, tmp_path / "x.csv")
    raw = yaml.safe_load(path.read_text())
    raw["benchmark"]["tasks"][0]["binary"]["target_sensitivity"] = 0.8
    path.write_text(yaml.safe_dump(raw))
    spec = crossval.load_benchmark(path)
    pred = _predictions(seed=1)
    pred["fold"] = (np.arange(len(pred)) // 3) % 3  # every class in every fold
    scored = crossval.score_task(spec, spec.tasks[0], pred)["all"]
    binary = pred[pred["true"].isin(["benign", "malignant"])].reset_index(drop=True)
    score = (binary["prob_malignant"] / (binary["prob_malignant"] + binary["prob_benign"])).to_numpy()
    y = (binary["true"] == "malignant").to_numpy()
    folds = binary["fold"].to_numpy()
    expected = {k: crossval.threshold_for_sensitivity(score[(folds != k) & y], 0.8) for k in range(3)}
    assert {int(k): v for k, v in scored["thresholds_at_target"].items()} == pytest.approx(expected)
    called = score >= np.array([expected[k] for k in folds])
    m = scored["metrics"]
    assert m["malignant_vs_benign_sensitivity_at_target"]["value"] == pytest.approx(called[y].mean())
    assert m["malignant_vs_benign_specificity_at_target"]["value"] == pytest.approx((~called[~y]).mean())
    per_fold = [called[(folds == k) & y].mean() for k in range(3)]
    assert m["malignant_vs_benign_sensitivity_at_target"]["per_fold"] == pytest.approx(per_fold)


def test_intervals_resample_the_benchmark_group_not_another_group_column(tmp_path: Path) -> None:
    spec = crossval.load_benchmark(_bench_file(tmp_path, tmp_path / "x.csv"))
    frame = pd.DataFrame({"image": ["a.png", "b.png", "c.png"], "group": ["p1", "p1", None],
                          "dup_group": [None, None, None]})  # as mini-MIAS: an empty dup_group
    assert crossval.bootstrap_groups(spec, frame) == {"a.png": "p1", "b.png": "p1", "c.png": "c.png"}
