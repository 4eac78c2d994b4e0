"""breastscan.evaluation.crosssite: the cross-site file, each site's rows, and the table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from breastscan.decision import fit_cutoff
from breastscan.evaluation import crosssite as C
from breastscan.evaluation import metrics as M

REPO = Path(__file__).resolve().parents[2]


def _site_file(folder: Path, name: str, classes: list[str], source: Path | None = None,
               decision: dict[str, Any] | None = None) -> Path:
    """A site's benchmark file: a tiny tumor classifier and U-Net on dataset ``name``."""
    tumor: dict[str, Any] = {
        "task": "classification", "dataset": name, "label": "pathology", "classes": classes,
        "backbone": "compact", "base_filters": 4, "preprocess": {"height": 32, "width": 32},
        "epochs": 1, "batch_size": 16, "patience": 0, "headline": "macro_auc"}
    if decision:
        tumor["decision"] = decision
    lesion = {"task": "segmentation", "dataset": name, "label": "mask", "base_filters": 4, "depth": 2,
              "preprocess": {"height": 32, "width": 32}, "epochs": 1, "batch_size": 16, "patience": 0,
              "imbalance": "none", "headline": "mean_dice"}
    source = source or folder / f"{name}.csv"
    raw = {"benchmark": {"name": name, "title": f"site {name}", "source": str(source),
                         "ingest": {"format": "csv"}, "dataset": name, "folds": 3, "seed": 0,
                         "val_fraction": 0.2, "stratify": ["pathology"], "group_column": "group",
                         "conflict_labels": ["pathology"],
                         "tasks": [{"model": f"{name}_lesion"}, {"model": f"{name}_tumor"}]},
           "datasets": {name: {"path": str(folder / "work" / name), "modality": "ultrasound"}},
           "models": {f"{name}_tumor": tumor, f"{name}_lesion": lesion, f"{name}_multitask": {
               **lesion, "task": "multitask", "label": "pathology", "classes": classes,
               "headline": "macro_auc", "imbalance": "class_weight",
               **({"decision": decision} if decision else {})}}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _cross_file(folder: Path, **benchmark: Any) -> Path:
    raw = {"benchmark": {
        "name": "cross", "kind": "cross_site", "title": "a to b",
        "sites": {"a": {"file": "a.yaml", "lesion": "a_lesion", "tumor": "a_tumor"},
                  "b": {"file": "b.yaml", "lesion": "b_lesion", "tumor": "b_tumor"}},
        "runs": [{"name": "a->b", "train": ["a"], "score": ["b"]},
                 {"name": "both", "train": ["a", "b"], "score": ["a", "b"], "recipe": "a"}],
        "decision": {"rule": "positive_ratio", "positive": "malignant", "versus": "benign",
                     "target_sensitivity": 0.9},
        "readable": {"min_images": 30, "min_per_class": 10}, **benchmark}}
    path = folder / "cross.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture()
def spec(tmp_path: Path) -> C.CrossSiteSpec:
    _site_file(tmp_path, "a", ["benign", "malignant", "normal"])
    _site_file(tmp_path, "b", ["benign", "malignant"])
    return C.load_cross_site(_cross_file(tmp_path))


# --------------------------------------------------------------------------- the file


def test_the_shipped_cross_site_file_names_both_sites_and_three_runs() -> None:
    spec = C.load_cross_site(REPO / "benchmarks" / "cross_site.yaml")
    assert set(spec.sites) == {"busi", "busbra"}
    assert [(r.name, r.recipe) for r in spec.runs] == [
        ("busi->busbra", "busi"), ("busbra->busi", "busbra"), ("both", "busi")]
    assert spec.sites["busbra"].spec.group_column == "group"
    for run in spec.runs:  # every run has a positive_ratio rule with a target
        rule = C.decision_rule(spec, run)
        assert (rule.positive, rule.versus) == ("malignant", "benign") and rule.target_sensitivity
    assert C.is_cross_site(REPO / "benchmarks" / "cross_site.yaml")
    assert not C.is_cross_site(REPO / "benchmarks" / "busi.yaml")


def test_overrides_reach_the_site_files_and_bad_runs_are_refused(tmp_path: Path,
                                                                 spec: C.CrossSiteSpec) -> None:
    path = tmp_path / "cross.yaml"
    changed = C.load_cross_site(path, {"a.models.a_tumor.epochs": 7, "benchmark.readable.min_images": 5})
    assert changed.sites["a"].spec.params.model("a_tumor").epochs == 7 and changed.min_images == 5
    assert spec.sites["a"].spec.params.model("a_tumor").epochs == 1
    with pytest.raises(ValueError, match="unknown"):
        C.load_cross_site(_cross_file(tmp_path, runs=[{"name": "x", "train": ["a"], "score": ["c"]}]))
    with pytest.raises(ValueError, match="recipe"):  # two training sites need a recipe
        C.load_cross_site(_cross_file(tmp_path, runs=[{"name": "x", "train": ["a", "b"], "score": ["a"]}]))
    with pytest.raises(ValueError, match="no run"):
        spec.run("b->a")


def test_the_command_names_both_missing_sites_and_refuses_folds(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from breastscan.cli import main

    result = CliRunner().invoke(main, ["bench-quality", "cross_site", "--datasets", str(tmp_path / "none")])
    assert result.exit_code == 1 and "not on this machine" in result.output
    for site in ("busi", "busbra"):
        assert str(tmp_path / "none" / site / "manifest.csv") in result.output
    folds = CliRunner().invoke(main, ["bench-quality", "cross_site", "--fold", "0"])
    assert folds.exit_code == 2 and "--run" in folds.output
    runs = CliRunner().invoke(main, ["bench-quality", "busi", "--run", "both"])
    assert runs.exit_code == 2 and "cross-site" in runs.output


# --------------------------------------------------------------------------- rows


def _manifest(site: str, n: int = 60) -> pd.DataFrame:
    """``n`` rows in groups of 2 (one group's two images under two labels), 3 classes, 2 scanners."""
    labels = ["benign", "malignant", "normal"]
    rows = [{"image": f"images/{site}{i:03d}.png", "mask": f"masks/{site}{i:03d}.png",
             "pathology": labels[(i // 2) % 3], "group": f"g{i // 2:02d}", "device": f"scanner{i % 2}"}
            for i in range(n)]
    rows[1]["pathology"] = "malignant" if rows[0]["pathology"] == "benign" else "benign"  # conflict in g00
    return pd.DataFrame(rows)


@pytest.mark.parametrize("role", ["train", "score", "both"])
def test_a_sites_rows_for_each_role(spec: C.CrossSiteSpec, role: str) -> None:
    frame = C.site_rows(spec.sites["a"], _manifest("a"), role, hold_out_fold=0)
    parts = frame["split"].value_counts().to_dict()
    assert parts.get("excluded") == 2  # the label-conflict group: neither learnt nor scored
    assert frame.loc[frame["group"] == "a:g00", "split"].eq("excluded").all()
    if role == "train":
        assert "test" not in parts and parts["val"] > 0
    elif role == "score":
        assert set(parts) == {"test", "excluded"}
    else:  # held out: fold 0's test part, whole groups
        held = set(frame.loc[frame["split"] == "test", "group"])
        assert held and not held & set(frame.loc[frame["split"].isin(["train", "val"]), "group"])
    assert frame["group"].str.startswith("a:").all() and (frame["site"] == "a").all()
    assert all(Path(p).is_absolute() for p in frame["image"])
    assert frame["source_image"].iloc[0] == "images/a000.png"


def test_the_held_out_part_is_the_same_in_every_run(spec: C.CrossSiteSpec) -> None:
    both = C.site_rows(spec.sites["a"], _manifest("a"), "both", 0)
    train = C.site_rows(spec.sites["a"], _manifest("a"), "train", 0)
    # training on all of a site = the held-out run's training rows plus its test part
    assert set(train.loc[train["split"] == "val", "image"]) == set(both.loc[both["split"] == "val", "image"])
    assert (set(train.loc[train["split"] == "train", "image"])
            == set(both.loc[both["split"].isin(["train", "test"]), "image"]))


def test_a_two_class_model_leaves_the_normal_images_out(spec: C.CrossSiteSpec) -> None:
    frame = pd.concat([C.site_rows(spec.sites["a"], _manifest("a"), "score", 0),
                       C.site_rows(spec.sites["b"], _manifest("b"), "train", 0)], ignore_index=True)
    two = C.task_rows(spec, frame, spec.sites["b"].spec.params.model("b_tumor"), "tumor")
    assert two.loc[two["pathology"] == "normal", "split"].eq("excluded").all()
    unet = C.task_rows(spec, frame, spec.sites["b"].spec.params.model("b_lesion"), "lesion")
    assert unet.loc[unet["pathology"] == "normal", "split"].isin(["train", "val", "test"]).all()


# --------------------------------------------------------------------------- the table


def test_lesion_size_tertiles() -> None:
    fraction = np.arange(1, 10) / 100.0
    edges = C.size_edges(fraction)
    assert edges == pytest.approx((0.0366667, 0.0633333), abs=1e-6)
    sizes = C.size_class(fraction, edges)
    assert list(sizes) == ["small"] * 3 + ["medium"] * 3 + ["large"] * 3
    assert list(C.size_class(np.array([0.02, 0.05]), (0.02, 0.05))) == ["small", "medium"]  # edges: lower


def test_a_subgroup_below_the_minimums_is_too_small_to_read(spec: C.CrossSiteSpec) -> None:
    assert C.readable("auc", 30, {0: 20, 1: 10}, 0, spec)
    assert not C.readable("auc", 29, {0: 19, 1: 10}, 0, spec)      # fewer than 30 images
    assert not C.readable("auc", 40, {0: 31, 1: 9}, 0, spec)       # fewer than 10 malignant
    assert C.readable("specificity", 40, {0: 31, 1: 9}, 0, spec)   # ...which specificity does not use
    assert not C.readable("sensitivity", 40, {0: 31, 1: 9}, 0, spec)
    assert C.readable("lesion_dice", 0, {}, 30, spec) and not C.readable("lesion_dice", 99, {}, 29, spec)


def _predictions(rng: np.random.Generator, site: str, part: str, n: int, shift: float,
                 devices: tuple[str, ...] = ()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A site's tumor (3 classes) and lesion prediction rows; malignant rows score ``shift`` higher."""
    y = rng.random(n) < 0.35
    logit = rng.normal(0, 1, n) + shift * y
    ratio = 1 / (1 + np.exp(-logit))
    normal = rng.uniform(0.0, 0.2, n)
    images = [f"/{site}/{part}{i}.png" for i in range(n)]
    groups = [f"{site}:p{i // 3}" for i in range(n)]  # patients of 3 images
    tumor = pd.DataFrame({"image": images, "group": groups, "site": site, "part": part,
                          "true": np.where(y, "malignant", "benign"),
                          "prob_benign": (1 - ratio) * (1 - normal), "prob_malignant": ratio * (1 - normal),
                          "prob_normal": normal,
                          "device": [devices[i % len(devices)] for i in range(n)] if devices else None,
                          "histology": np.where(y, "carcinoma", np.select(
                              [np.arange(n) % 4 == 0, np.arange(n) % 31 == 1], ["cyst", "phyllodes"],
                              "fibroadenoma"))})
    lesion = pd.DataFrame({"image": images, "group": groups, "site": site, "part": part, "lesion": 1,
                           "device": tumor["device"], "histology": tumor["histology"],
                           "dice": rng.uniform(0.3, 0.9, n), "iou": rng.uniform(0.2, 0.8, n),
                           "true_pixels": rng.integers(10, 500, n)})
    return tumor, lesion


def _run_predictions(seed: int = 0) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    val_t, val_l = _predictions(rng, "a", "val", 120, 2.0)
    test_t, test_l = _predictions(rng, "b", "test", 300, 0.8, devices=("x", "y", "z"))
    small_t, small_l = _predictions(rng, "b", "test", 12, 0.8, devices=("u",))  # a scanner of 12 images
    small_t["image"] = small_t["image"].str.replace("test", "u")
    small_l["image"] = small_t["image"]
    return {"tumor": pd.concat([val_t, test_t, small_t], ignore_index=True),
            "lesion": pd.concat([test_l, small_l], ignore_index=True)}


def _record() -> dict[str, Any]:
    return {"models": {"lesion": "a_lesion", "tumor": "a_tumor"}, "fit": {}, "resumed": False}


def test_the_cutoff_is_fitted_on_the_training_site_and_applied_unchanged(spec: C.CrossSiteSpec) -> None:
    preds = _run_predictions()
    out = C.score_run(spec, spec.run("a->b"), preds, _record(), n_boot=50)
    tumor = preds["tumor"]
    val = tumor[tumor["part"] == "val"]
    val_ratio = val["prob_malignant"] / (val["prob_malignant"] + val["prob_benign"])
    cutoff = fit_cutoff(val_ratio.to_numpy(), (val["true"] == "malignant").to_numpy(), 0.9)
    assert out["decision"]["cutoff"] == pytest.approx(cutoff)
    assert out["decision"]["val_sensitivity"] >= 0.9
    test = tumor[(tumor["part"] == "test") & (tumor["site"] == "b")]
    ratio = (test["prob_malignant"] / (test["prob_malignant"] + test["prob_benign"])).to_numpy()
    y = (test["true"] == "malignant").to_numpy()
    every = out["scored"]["b"]["subgroups"][0]
    assert every["name"] == "all" and every["n"] == len(test) and every["n_positive"] == y.sum()
    m = every["metrics"]
    assert m["auc"]["value"] == pytest.approx(roc_auc_score(y, ratio))
    # the other site's rows are less separable: the training site's cutoff misses its target there
    assert m["sensitivity"]["value"] == pytest.approx(np.mean(ratio[y] >= cutoff))
    assert m["sensitivity"]["value"] < 0.9
    assert m["specificity"]["value"] == pytest.approx(np.mean(ratio[~y] < cutoff))
    lesion = preds["lesion"][preds["lesion"]["site"] == "b"]
    assert m["lesion_dice"]["value"] == pytest.approx(lesion["dice"].mean())
    for name in ("auc", "sensitivity", "specificity", "lesion_dice"):
        assert m[name]["readable"] and m[name]["ci_low"] <= m[name]["value"] <= m[name]["ci_high"]
    assert 0 <= m["ece"]["value"] <= 1 and m["ece"]["ci_low"] is None


def test_subgroups_scanner_size_and_histology(spec: C.CrossSiteSpec) -> None:
    out = C.score_run(spec, spec.run("a->b"), _run_predictions(), _record(), n_boot=20)
    table = {(e["kind"], e["name"], e["class"]): e for e in out["scored"]["b"]["subgroups"]}
    assert {k[1] for k in table if k[0] == "device"} == {"x", "y", "z", "u"}
    small = table[("device", "u", None)]
    assert small["n"] == 12 and all(not m["readable"] for m in small["metrics"].values())
    assert small["metrics"]["auc"]["ci_low"] is None  # no interval for a subgroup too small to read
    sizes = [table[("lesion size", s, None)]["n"] for s in C.SIZE_TERTILES]
    assert sum(sizes) == 312 and max(sizes) - min(sizes) <= 2
    cyst = table[("histology", "cyst", "benign")]
    assert set(cyst["metrics"]) == {"specificity"} and cyst["n_positive"] == 0
    carcinoma = table[("histology", "carcinoma", "malignant")]
    assert set(carcinoma["metrics"]) == {"sensitivity"} and carcinoma["n"] == carcinoma["n_positive"]
    md = "\n".join(C.markdown_lines("cross", {"title": "t", "quick": False, "minutes": 1.0, "n_boot": 20,
                                              "sites": {"b": {"n_rows": 312}},
                                              "readable": {"min_images": 30, "min_per_class": 10},
                                              "runs": {"a->b": out}}))
    assert "| device: u | 12 (" in md and "too small" in md
    assert "| histology: cyst (benign) |" in md
    rare = table[("histology", "phyllodes", "benign")]  # too small: on one line, not a row of its own
    assert not rare["metrics"]["specificity"]["readable"]
    assert f"histology phyllodes (benign, {rare['n']})" in md and "| histology: phyllodes" not in md
    assert "histology: cyst (benign)" in md and "lesion size: small (≤" in md


def test_the_intervals_resample_whole_patients(spec: C.CrossSiteSpec) -> None:
    rng = np.random.default_rng(1)
    rows, lesion = _predictions(rng, "b", "test", 90, 1.0)
    rows = C.binary_rows(rows, C.decision_rule(spec, spec.run("a->b")), ["benign", "malignant", "normal"])
    grouped = C.subgroup_scores(rows, lesion, 0.5, ["auc"], spec, n_boot=200)["metrics"]["auc"]
    probs = np.stack([1 - rows["ratio"], rows["ratio"]], axis=1)
    expected = M.interval("auc", M.ClassOutcomes(y=rows["y"].to_numpy(), probs=probs),
                          rows["group"].to_numpy(), n_boot=200, seed=spec.seed)
    assert (grouped["ci_low"], grouped["ci_high"]) == pytest.approx(expected)
    by_image = M.interval("auc", M.ClassOutcomes(y=rows["y"].to_numpy(), probs=probs), None, n_boot=200,
                          seed=spec.seed)
    assert (grouped["ci_low"], grouped["ci_high"]) != pytest.approx(by_image)


def test_a_finished_run_is_read_back_not_trained_again(spec: C.CrossSiteSpec, tmp_path: Path) -> None:
    frame = pd.concat([C.site_rows(spec.sites["a"], _manifest("a"), "train", 0),
                       C.site_rows(spec.sites["b"], _manifest("b"), "score", 0)], ignore_index=True)
    run = spec.run("a->b")
    with pytest.raises(FileNotFoundError, match="no finished run"):
        C.train_run(spec, run, frame, tmp_path / "r", train=False)
    lesion_cfg, tumor_cfg, _ = C.recipe(spec, run)
    frames = [C.task_rows(spec, frame, lesion_cfg, "lesion"), C.task_rows(spec, frame, tumor_cfg, "tumor")]
    where = tmp_path / "r"
    where.mkdir()
    preds = _run_predictions()
    for role, pred in preds.items():
        pred.to_csv(where / f"predictions_{role}.csv", index=False)
    (where / "run.json").write_text(json.dumps({**_record(), "fingerprint": C.fingerprint(
        [lesion_cfg, tumor_cfg], frames, None)}))
    back, record = C.train_run(spec, run, frame, where, train=False)
    assert record["resumed"] and len(back["tumor"]) == len(preds["tumor"])
    with pytest.raises(FileNotFoundError):  # other rows: another run
        C.train_run(spec, run, frame.iloc[2:], where, train=False)


# --------------------------------------------------------------------------- a real run, tiny


@pytest.mark.slow
def test_a_cross_site_run_on_phantoms_trains_scores_and_resumes(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from breastscan.data.phantoms import generate_dataset
    from breastscan.evaluation import crossval

    monkeypatch.chdir(tmp_path)
    for name, seed in (("a", 1), ("b", 2)):
        manifest = generate_dataset(tmp_path / "data" / name, "ultrasound", n_images=40, seed=seed,
                                    duplicate_rate=0.0, label_conflicts=0)
        if name == "b":  # a second hospital: two scanners, no normal class
            manifest = manifest[manifest["pathology"] != "normal"].assign(
                device=lambda f: [f"s{i % 2}" for i in range(len(f))])
            manifest.to_csv(tmp_path / "data" / name / "manifest.csv", index=False)
        classes = ["benign", "malignant", "normal"] if name == "a" else ["benign", "malignant"]
        _site_file(tmp_path, name, classes, source=tmp_path / "data" / name / "manifest.csv")
    runs = [{"name": "a->b", "train": ["a"], "score": ["b"]},
            {"name": "b->a", "train": ["b"], "score": ["a"]},
            {"name": "both", "train": ["a", "b"], "score": ["a", "b"], "recipe": "a"}]
    spec = C.load_cross_site(_cross_file(tmp_path, runs=runs, readable={"min_images": 5, "min_per_class": 2}))
    result = C.run_cross_site(spec, tmp_path / "out")
    assert list(result["runs"]) == ["a->b", "b->a", "both"]
    b_to_a = result["runs"]["b->a"]
    assert b_to_a["classes"] == ["benign", "malignant"]
    # the two-class model scores a's benign and malignant images; its U-Net every lesion image
    every = b_to_a["scored"]["a"]["subgroups"][0]
    a_rows = pd.read_csv(tmp_path / "data" / "a" / "manifest.csv")
    assert every["n"] == a_rows["pathology"].isin(["benign", "malignant"]).sum()
    both = result["runs"]["both"]
    assert set(both["scored"]) == {"a", "b"}
    held = pd.read_csv(tmp_path / "out" / "cross" / "both" / "splits_a_tumor.csv")
    held_b = (held["site"] == "b") & (held["split"] == "test")
    assert both["scored"]["b"]["subgroups"][0]["n"] == held_b.sum()
    assert any(e["kind"] == "device" for e in result["runs"]["a->b"]["scored"]["b"]["subgroups"])
    assert both["fit"]["a_tumor"]["rows"]["b"]["train"] > 0  # the union trained on both sites
    # b has no normal image: its rows' loss leaves normal out
    assert both["fit"]["a_tumor"]["partial_labels"] == {"a": ["benign", "malignant", "normal"],
                                                        "b": ["benign", "malignant"]}
    assert "partial_labels" not in result["runs"]["a->b"]["fit"]["a_tumor"]
    report = crossval.write_report({"benchmarks": {"cross": result}}, tmp_path / "q.json")
    assert "### both: trained on a + b" in report.with_suffix(".md").read_text()

    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("breastscan.training.loop.train_model", no_training)
    again = C.run_cross_site(spec, tmp_path / "out", runs=["both"], previous=result)
    assert again["runs"]["both"]["resumed"] and list(again["runs"]) == ["a->b", "b->a", "both"]
    assert again["runs"]["both"]["scored"] == both["scored"]


def test_a_multitask_model_takes_both_roles_or_none(tmp_path: Path) -> None:
    """A site's lesion and tumor may both be its multi-task model; one role alone is refused."""
    _site_file(tmp_path, "a", ["benign", "malignant", "normal"])
    _site_file(tmp_path, "b", ["benign", "malignant"])
    both = {"benchmark.sites.a.lesion": "a_multitask", "benchmark.sites.a.tumor": "a_multitask"}
    spec = C.load_cross_site(_cross_file(tmp_path), both)
    lesion, tumor, _ = C.recipe(spec, spec.run("a->b"))
    assert lesion is tumor or lesion == tumor
    with pytest.raises(ValueError, match="both roles"):
        C.load_cross_site(_cross_file(tmp_path), {"benchmark.sites.a.tumor": "a_multitask"})


@pytest.mark.slow
def test_a_multitask_cross_site_run_trains_once_and_scores_both_outputs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One model per run: its class head scores the tumor table, its mask the lesion table."""
    from breastscan.data.phantoms import generate_dataset
    from breastscan.training import loop

    monkeypatch.chdir(tmp_path)
    for name, seed in (("a", 1), ("b", 2)):
        manifest = generate_dataset(tmp_path / "data" / name, "ultrasound", n_images=30, seed=seed,
                                    duplicate_rate=0.0, label_conflicts=0)
        if name == "b":
            manifest = manifest[manifest["pathology"] != "normal"]
            manifest.to_csv(tmp_path / "data" / name / "manifest.csv", index=False)
        classes = ["benign", "malignant", "normal"] if name == "a" else ["benign", "malignant"]
        _site_file(tmp_path, name, classes, source=tmp_path / "data" / name / "manifest.csv")
    trained: list[str] = []
    real = loop.train_model

    def counting(cfg: Any, *args: Any, **kwargs: Any) -> Any:
        trained.append(cfg.name)
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(loop, "train_model", counting)
    both = {"benchmark.sites.a.lesion": "a_multitask", "benchmark.sites.a.tumor": "a_multitask"}
    spec = C.load_cross_site(_cross_file(tmp_path, runs=[{"name": "a->b", "train": ["a"], "score": ["b"]}],
                                         readable={"min_images": 5, "min_per_class": 2}), both)
    result = C.run_cross_site(spec, tmp_path / "out")
    assert trained == ["a_multitask"]
    run = result["runs"]["a->b"]
    assert list(run["fit"]) == ["a_multitask"]
    assert run["models"] == {"lesion": "a_multitask", "tumor": "a_multitask"}
    every = run["scored"]["b"]["subgroups"][0]["metrics"]
    assert every["auc"]["value"] is not None and every["lesion_dice"]["value"] is not None
    tumor = pd.read_csv(tmp_path / "out" / "cross" / "a-to-b" / "predictions_tumor.csv")
    lesion = pd.read_csv(tmp_path / "out" / "cross" / "a-to-b" / "predictions_lesion.csv")
    assert {"prob_benign", "prob_malignant", "prob_normal"} <= set(tumor.columns) and "dice" in lesion.columns


@pytest.mark.slow
@pytest.mark.data
def test_the_shipped_benchmark_quick_on_tiny_real_subsets(shared_datasets: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """BUSI and BUS-BRA, 80 images each, 1 epoch: the three runs end to end (numbers mean nothing)."""
    spec = C.load_cross_site(REPO / "benchmarks" / "cross_site.yaml",
                             {"benchmark.quick.images_per_site": 80, "benchmark.quick.max_epochs": 1})
    for site in spec.sites.values():
        if not (shared_datasets / site.spec.source.parent.name / site.spec.source.name).is_file():
            pytest.skip(f"real dataset {site.spec.source.parent.name} not present in {shared_datasets}")
    spec = C.with_datasets(spec, shared_datasets)
    monkeypatch.chdir(tmp_path)  # the converted copies go under ./work/quality/
    result = C.run_cross_site(spec, tmp_path / "out", quick=True)
    assert result["quick"] and list(result["runs"]) == ["busi->busbra", "busbra->busi", "both"]
    busbra = result["runs"]["busi->busbra"]["scored"]["busbra"]["subgroups"]
    assert {e["kind"] for e in busbra} >= {"all", "device", "lesion size", "histology"}
    busi = result["runs"]["busbra->busi"]["scored"]["busi"]["subgroups"]
    assert "device" not in {e["kind"] for e in busi}  # one site, no scanner column
    assert result["runs"]["busbra->busi"]["classes"] == ["benign", "malignant"]
    assert result["runs"]["both"]["decision"]["fitted_on"] == "validation rows of busi + busbra"
