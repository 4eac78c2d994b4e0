"""``breastscan evaluate``: a registered model scored on an external dataset.

One throwaway SQLite MLflow store per module holds a tiny untrained tumor classifier
(v1 at ``@production``, v2 at ``@staging``) and a tiny lesion U-Net (``@production``).
The external dataset mixes mammography and ultrasound phantoms with planted bad rows: a
missing file, a corrupt PNG (random bytes), rows of the other modality, an unknown and an
empty label, a lesion without a mask and a mask that does not exist; every skip count is
exact, and the metrics are recomputed here with scikit-learn / NumPy from predictions made
directly with the bundle.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner, Result
from mlflow import MlflowClient

from breastscan.bundle import ModelBundle, ModelContract
from breastscan.cli import main
from breastscan.config import ModelConfig
from breastscan.data.loading import SKIP_REASONS
from breastscan.data.manifest import CONTRACT_COLUMNS, write_manifest
from breastscan.evaluation import external
from breastscan.evaluation.metrics import STANDARD
from breastscan.imaging.files import read_mask
from breastscan.imaging.preprocessing import PreprocessSpec, decode_image, preprocess_image, preprocess_mask
from breastscan.registry import external_runs, resolver, tracking, versions
from tests.conftest import sqlite_mlflow, tiny_model

SPEC = PreprocessSpec(height=32, width=32)
TUMOR_CLASSES = ("benign", "malignant", "normal")
N_MG, N_US = 24, 10
TUMOR_TEMPERATURE = 1.5

TUMOR_CONTRACT = ModelContract(
    name="tumor", task="classification", label="pathology", classes=TUMOR_CLASSES,
    class_names=TUMOR_CLASSES, input_shape=(32, 32, 1), dataset="mammography", modality="mammography",
    temperature=TUMOR_TEMPERATURE, spec_id=SPEC.spec_id)
LESION_CONTRACT = ModelContract(
    name="lesion", task="segmentation", label="mask", classes=(), class_names=("lesion",),
    input_shape=(32, 32, 1), dataset="ultrasound", modality="ultrasound", threshold=0.5,
    spec_id=SPEC.spec_id)

# Rows planted after the phantoms, with the reason each model must skip them for.
PLANTED_TUMOR = {"missing_image": 1, "unreadable_image": 1, "unknown_label": 1, "no_label": 1,
                 "wrong_modality": N_US + 2}
PLANTED_LESION = {"wrong_modality": N_MG + 4, "no_mask": 1, "missing_mask": 1}


# --------------------------------------------------------------------------- fixtures


def make_dataset(root: Path) -> pd.DataFrame:
    """Mammography and ultrasound phantoms in one manifest, plus six planted bad rows."""
    from breastscan.data.phantoms import generate_dataset

    mg = generate_dataset(root, "mammography", n_images=N_MG, seed=5, height=80, width=64,
                          duplicate_rate=0.0, label_conflicts=0)
    us = generate_dataset(root, "ultrasound", n_images=N_US, seed=6, height=56, width=72,
                          duplicate_rate=0.0, label_conflicts=0)
    (root / "images" / "mg_corrupt.png").write_bytes(np.random.default_rng(0).bytes(3000))
    mg0, mg1 = mg.iloc[0], mg.iloc[1]
    planted = [
        dict(image="images/mg_missing.png", modality="mammography", density=2, pathology="benign",
             mask="", group="planted-1"),                                   # tumor: missing_image
        dict(image="images/mg_corrupt.png", modality="mammography", density=2, pathology="malignant",
             mask="", group="planted-2"),                                   # tumor: unreadable_image
        dict(image=mg0["image"], modality="mammography", density=mg0["density"], pathology="atypical",
             mask=mg0["mask"], group="planted-3"),                          # tumor: unknown_label
        dict(image=mg1["image"], modality="mammography", density=mg1["density"], pathology="",
             mask=mg1["mask"], group="planted-4"),                          # tumor: no_label
        dict(image=us.iloc[0]["image"], modality="ultrasound", density=None, pathology="benign",
             mask="", group="planted-5"),                                   # lesion: no_mask
        dict(image=us.iloc[1]["image"], modality="ultrasound", density=None, pathology="malignant",
             mask="masks/us_gone.png", group="planted-6"),                  # lesion: missing_mask
    ]
    df = pd.concat([mg, us, pd.DataFrame(planted)], ignore_index=True)[list(CONTRACT_COLUMNS)]
    df["density"] = df["density"].astype("Int64")
    write_manifest(df, root)
    return df


def _bundle(contract: ModelContract, directory: Path) -> Path:
    model = tiny_model(contract.task, len(contract.classes), seed=7)
    return ModelBundle(model=model, spec=SPEC, contract=contract).save(directory)


def _register(root: Path, contract: ModelContract, bundle_dir: Path, headline: str, n_versions: int) -> None:
    classes = contract.classes or ("lesion",)
    cfg = ModelConfig(name=contract.name, task=contract.task, dataset=contract.dataset, label=contract.label,
                      classes=classes, preprocess=SPEC, headline=headline, depth=2)
    with tracking.start_training_run(contract.name, root, params={"tiny": "1"}, tags={}) as run:
        uri = versions.log_bundle(bundle_dir)
    for _ in range(n_versions):
        versions.register(cfg, uri, metrics={"headline": headline}, split_id="tiny", run_id=run.info.run_id)
    MlflowClient().set_registered_model_alias(cfg.registered_name, versions.PRODUCTION, "1")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A project dir (cwd) with a SQLite store, the registered models and the external dataset."""
    root = tmp_path_factory.mktemp("project")
    with sqlite_mlflow(root) as mp:
        mp.chdir(root)
        tracking.configure(root)
        tumor_dir = _bundle(TUMOR_CONTRACT, root / "bundles" / "tumor")
        lesion_dir = _bundle(LESION_CONTRACT, root / "bundles" / "lesion")
        _register(root, TUMOR_CONTRACT, tumor_dir, "macro_auc", n_versions=2)   # v1 @production, v2 @staging
        _register(root, LESION_CONTRACT, lesion_dir, "mean_dice", n_versions=1)
        dataset = root / "ext"
        manifest = make_dataset(dataset)
        yield {"root": root, "dataset": dataset, "manifest": manifest, "tumor_dir": tumor_dir,
               "lesion_dir": lesion_dir}


def invoke(args: list[str]) -> Result:
    """Run ``breastscan ARGS``; drop the log handler bound to the runner's (then closed) stream."""
    result = CliRunner().invoke(main, ["--log-level", "WARNING", *args])
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
            root.removeHandler(handler)
    return result


def evaluate(store: dict[str, Any], model: str, *extra: str, dataset: Path | None = None) -> Result:
    return invoke(["evaluate", "--model", model, "--dataset", str(dataset or store["dataset"]),
                   "--out", str(store["root"] / "reports"), "--n-boot", "200", *extra])


def read_report(store: dict[str, Any], model: str, dataset: str = "ext") -> dict[str, Any]:
    return json.loads((store["root"] / "reports" / dataset / f"{model}.json").read_text())


def skip_counts(report: dict[str, Any]) -> dict[str, int]:
    return {k: v["count"] for k, v in report["counts"]["skipped_by_reason"].items()}


# --------------------------------------------------------------------------- no model needed


@pytest.mark.parametrize(("text", "name", "version", "alias"), [
    ("tumor", "tumor", None, "production"),
    ("breastscan-tumor", "tumor", None, "production"),
    ("tumor@staging", "tumor", None, "staging"),
    ("breastscan-lesion@production", "lesion", None, "production"),
    ("tumor/3", "tumor", 3, None),
    (" density/12 ", "density", 12, None),
])
def test_parse_model_ref(text: str, name: str, version: int | None, alias: str | None) -> None:
    ref = resolver.parse_model_ref(text)
    assert (ref.name, ref.version, ref.alias) == (name, version, alias)
    assert ref.registered_name == f"breastscan-{name}"


@pytest.mark.parametrize("text", ["", "tumor@", "tumor/", "tumor/0", "tumor/x", "tumor@a@b", "@staging",
                                  "breastscan-"])
def test_parse_model_ref_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="model reference"):
        resolver.parse_model_ref(text)


def test_load_external_counts_every_skip_reason(tmp_path: Path) -> None:
    make_dataset(tmp_path / "ext")
    tumor = external.load_external(tmp_path / "ext", TUMOR_CONTRACT, SPEC)
    assert tumor.n_rows == N_MG + N_US + 6
    assert tumor.n_used == N_MG and tumor.n_used + tumor.n_skipped == tumor.n_rows
    assert tumor.skip_counts() == {r: PLANTED_TUMOR[r] for r in SKIP_REASONS if r in PLANTED_TUMOR}
    assert tumor.skip_summary() == ", ".join(f"{r} {n}" for r, n in tumor.skip_counts().items())
    assert [s.image for s in tumor.skipped["missing_image"]] == ["images/mg_missing.png"]
    assert [s.image for s in tumor.skipped["unreadable_image"]] == ["images/mg_corrupt.png"]
    assert "not an image" in tumor.skipped["unreadable_image"][0].detail
    assert tumor.skipped["unknown_label"][0].detail == \
        "pathology='atypical' is not a class of model tumor ['benign', 'malignant', 'normal']"
    assert tumor.skipped["no_label"][0].detail == "pathology is empty"
    assert tumor.data.images.shape == (N_MG, 32, 32, 1) and tumor.data.images.dtype == np.float32
    assert 0.0 <= tumor.data.images.min() and tumor.data.images.max() <= 1.0
    assert tumor.data.targets.dtype == np.int64 and set(tumor.data.targets) <= {0, 1, 2}
    assert list(tumor.data.frame["manifest_row"]) == list(range(N_MG))
    assert list(tumor.data.groups) == list(tumor.data.frame["group"].astype(str))  # patients

    lesion = external.load_external(tmp_path / "ext", LESION_CONTRACT, SPEC, name="other")
    assert lesion.name == "other"
    assert lesion.n_used == N_US
    assert lesion.skip_counts() == PLANTED_LESION
    assert lesion.skipped["missing_mask"][0].detail == "mask masks/us_gone.png: no such file"
    assert lesion.data.targets.shape == (N_US, 32, 32, 1)
    assert set(np.unique(lesion.data.targets)) <= {0.0, 1.0}


def test_require_usable_names_the_reasons(tmp_path: Path) -> None:
    root = tmp_path / "ext"
    df = make_dataset(root)
    write_manifest(df[df["modality"] == "ultrasound"], root)
    dataset = external.load_external(root, TUMOR_CONTRACT, SPEC)
    with pytest.raises(external.NoUsableRows, match=r"no row of ext \(12 rows\) is usable by model tumor"):
        external.require_usable(dataset, TUMOR_CONTRACT)


def test_manifest_missing_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no manifest.csv"):
        external.load_external(tmp_path, TUMOR_CONTRACT, SPEC)


# --------------------------------------------------------------------------- the command


def _direct_tumor_probs(store: dict[str, Any], images: list[str]) -> np.ndarray:
    """Served probabilities of the registered bundle, computed here image by image."""
    bundle = ModelBundle.load(store["tumor_dir"])
    batch = np.stack([preprocess_image(decode_image(store["dataset"] / p), bundle.spec)[0] for p in images])
    probs = bundle.predict(batch).astype(np.float64)
    return probs / probs.sum(axis=1, keepdims=True)


def test_classifier_report_metrics_and_mlflow_run(store: dict[str, Any]) -> None:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, log_loss, roc_auc_score

    result = evaluate(store, "tumor")
    assert result.exit_code == 0, result.output
    assert "breastscan-tumor v1 @production on ext: 24 of 40 rows scored" in result.output
    report = read_report(store, "tumor")
    assert (report["model"], report["registered_model"]) == ("tumor", "breastscan-tumor")
    assert report["version"] == 1
    assert report["stage"] == "production" and report["aliases"] == ["production"]
    assert report["model_run_id"]
    assert report["counts"]["rows"] == 40 and report["counts"]["used"] == N_MG
    assert report["counts"]["skipped"] == 40 - N_MG
    assert skip_counts(report) == PLANTED_TUMOR
    assert report["counts"]["skipped_by_reason"]["missing_image"]["examples"][0]["image"] == \
        "images/mg_missing.png"
    assert report["dataset"]["path"] == str(store["dataset"].resolve())

    # the same predictions, made here with the bundle, scored with scikit-learn
    preds = pd.read_csv(store["root"] / "reports" / "ext" / "tumor_predictions.csv")
    assert list(preds["manifest_row"]) == list(range(N_MG))
    probs = _direct_tumor_probs(store, list(preds["image"]))
    np.testing.assert_allclose(preds[[f"prob_{c}" for c in TUMOR_CLASSES]].to_numpy(), probs, atol=1e-5)
    y = np.asarray([TUMOR_CLASSES.index(p) for p in store["manifest"]["pathology"][:N_MG]])
    assert list(preds["true"]) == [TUMOR_CLASSES[i] for i in y]
    assert list(preds["group"]) == list(store["manifest"]["group"][:N_MG])  # the resampling unit
    assert len(set(y)) == 3
    m = report["metrics"]
    assert m["accuracy"]["value"] == pytest.approx(accuracy_score(y, probs.argmax(axis=1)), abs=1e-12)
    assert m["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(y, probs.argmax(axis=1)))
    assert m["macro_auc"]["value"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"), abs=1e-9)
    # the stored temperature (1.5) was used, not refitted: log loss at T = 1.5 matches
    assert report["calibration"]["temperature"] == TUMOR_TEMPERATURE
    assert report["calibration"]["refitted"] is False and report["evaluation"]["n_val"] == 0
    assert m["log_loss"]["value"] == pytest.approx(log_loss(y, probs, labels=[0, 1, 2]), rel=1e-6)
    from sklearn.metrics import confusion_matrix

    assert report["confusion_matrix"]["matrix"] == confusion_matrix(y, probs.argmax(axis=1)).tolist()
    assert report["confusion_matrix"]["labels"] == list(TUMOR_CLASSES)
    # every declared metric has a grouped 95 % interval; the headline's is the scoring core's own
    assert report["headline"] == "macro_auc"
    assert list(m) == list(STANDARD["classification"])  # kappa only when declared (see below)
    for name, v in m.items():
        assert v["ci_low"] is not None and v["ci_low"] <= v["ci_high"], (name, v)
    assert m["macro_auc"]["ci_low"] == report["evaluation"]["headline_ci_low"]
    assert m["macro_auc"]["ci_high"] == report["evaluation"]["headline_ci_high"]
    assert 0.0 <= report["calibration"]["ece"] <= 1.0
    # the predicted classes follow the stored decision rule (here the arg-max), not refitted
    assert report["decision"] == {"rule": "argmax", "refitted": False,
                                  "description": "The most probable class is called (arg-max)."}

    # the Markdown summary says the same
    md = (store["root"] / "reports" / "ext" / "tumor.md").read_text()
    assert "# External evaluation: tumor v1 on `ext`" in md
    assert f"| scored | {N_MG} |" in md and "| skipped | 16 |" in md
    for reason, count in PLANTED_TUMOR.items():
        assert f"| {reason} | {count} |" in md
    for name, v in m.items():
        assert f"{v['value']:.3f} | {v['ci_low']:.3f} – {v['ci_high']:.3f} |" in md, name
    assert f"ECE {report['calibration']['ece']:.3f}" in md
    assert "## Decision rule\n\nThe most probable class is called (arg-max). Stored with the model" in md
    benign_row = report["confusion_matrix"]["matrix"][0]
    assert "| benign | " + " | ".join(map(str, benign_row)) + " |" in md

    # the MLflow run: in the model's experiment, tagged with the version, metrics prefixed
    run = MlflowClient().get_run(report["mlflow"]["run_id"])
    assert run.info.run_name == "external:ext"
    exp = MlflowClient().get_experiment(run.info.experiment_id)
    assert exp.name == "breastscan-tumor" == report["mlflow"]["experiment"]
    tags = run.data.tags
    assert tags["breastscan.model_version"] == "1" and tags["breastscan.dataset"] == "ext"
    assert tags["breastscan.model_run_id"] == report["model_run_id"]
    assert tags["breastscan.evaluation"] == "external"
    metrics = run.data.metrics
    assert metrics["external_macro_auc"] == pytest.approx(m["macro_auc"]["value"])
    assert metrics["external_accuracy_ci_low"] == pytest.approx(m["accuracy"]["ci_low"])
    assert metrics["external_n_used"] == N_MG and metrics["external_skipped_wrong_modality"] == 12
    assert metrics["external_skipped_no_mask"] == 0
    assert metrics["external_temperature"] == TUMOR_TEMPERATURE
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "external/ext")}
    assert artifacts == {f"external/ext/{f}" for f in ("tumor.json", "tumor.md", "tumor_predictions.csv")}
    logged = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="external/ext/tumor.json",
        dst_path=str(store["root"] / "dl"))).read_text())
    assert logged == report


@pytest.mark.parametrize(("ref", "version", "stage", "aliases"), [
    ("tumor/1", 1, None, ["production"]),
    ("tumor/2", 2, None, ["staging"]),
    ("tumor@staging", 2, "staging", ["staging"]),
    ("breastscan-tumor@production", 1, "production", ["production"]),
])
def test_model_references_resolve(store: dict[str, Any], ref: str, version: int, stage: str | None,
                                  aliases: list[str]) -> None:
    result = evaluate(store, ref, "--no-mlflow", "--name", "refs")
    assert result.exit_code == 0, result.output
    report = read_report(store, "tumor", "refs")
    assert (report["version"], report["stage"], report["aliases"]) == (version, stage, aliases)
    assert report["mlflow"] is None
    assert skip_counts(report) == PLANTED_TUMOR


def test_segmenter_gets_dice_and_iou(store: dict[str, Any]) -> None:
    result = evaluate(store, "lesion")
    assert result.exit_code == 0, result.output
    report = read_report(store, "lesion")
    assert report["task"] == "segmentation" and report["headline"] == "mean_dice"
    assert skip_counts(report) == PLANTED_LESION and report["counts"]["used"] == N_US
    assert "confusion_matrix" not in report and "calibration" not in report

    # Dice / IoU recomputed here from the bundle's own masks
    bundle = ModelBundle.load(store["lesion_dir"])
    rows = store["manifest"].iloc[N_MG:N_MG + N_US]
    batch = np.stack([preprocess_image(decode_image(store["dataset"] / p), bundle.spec)[0]
                      for p in rows["image"]])
    pred = bundle.predict(batch)[..., 0] >= 0.5
    truth = np.stack([preprocess_mask(read_mask(store["dataset"] / p), bundle.spec)[..., 0] > 0.5
                      for p in rows["mask"]])
    inter = (pred & truth).reshape(N_US, -1).sum(axis=1)
    sizes = pred.reshape(N_US, -1).sum(axis=1) + truth.reshape(N_US, -1).sum(axis=1)
    union = (pred | truth).reshape(N_US, -1).sum(axis=1)
    dice = np.where(sizes == 0, 1.0, 2 * inter / np.maximum(sizes, 1))
    iou = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
    m = report["metrics"]
    assert m["mean_dice"]["value"] == pytest.approx(dice.mean(), abs=1e-9)
    assert m["mean_iou"]["value"] == pytest.approx(iou.mean(), abs=1e-9)
    assert 0.0 <= m["mean_dice"]["ci_low"] <= m["mean_dice"]["ci_high"] <= 1.0
    assert (m["mean_dice"]["ci_low"], m["mean_dice"]["ci_high"]) == (
        report["evaluation"]["headline_ci_low"], report["evaluation"]["headline_ci_high"])
    assert report["segmentation"]["threshold"] == 0.5
    md = (store["root"] / "reports" / "ext" / "lesion.md").read_text()
    assert f"| **mean_dice** (headline) | {m['mean_dice']['value']:.3f} |" in md
    run = MlflowClient().get_run(report["mlflow"]["run_id"])
    assert run.data.metrics["external_mean_dice"] == pytest.approx(m["mean_dice"]["value"])
    assert run.data.tags["breastscan.model"] == "lesion"


def test_nothing_usable_exits_nonzero_naming_the_reasons(store: dict[str, Any], tmp_path: Path) -> None:
    root = tmp_path / "unusable"
    df = store["manifest"]
    keep = pd.concat([df[df["modality"] == "ultrasound"], df[df["pathology"].isin(["atypical"])],
                      df[df["image"] == "images/mg_missing.png"]])
    def absolute(p: Any) -> Any:
        return str(store["dataset"] / p) if isinstance(p, str) and p else p

    keep = keep.assign(image=keep["image"].map(absolute), mask=keep["mask"].map(absolute))
    write_manifest(keep, root)
    result = evaluate(store, "tumor", "--no-mlflow", dataset=root)
    assert result.exit_code == 1
    assert "no row of unusable (14 rows) is usable by model tumor" in result.output
    assert "wrong_modality 12" in result.output
    assert "unknown_label 1" in result.output and "missing_image 1" in result.output
    assert not (store["root"] / "reports" / "unusable").exists()


def test_unknown_model_and_bad_reference(store: dict[str, Any]) -> None:
    result = evaluate(store, "density", "--no-mlflow")
    assert result.exit_code == 1
    assert "breastscan-density has no version with alias @production" in result.output
    assert "Registered breastscan models: lesion, tumor" in result.output
    result = evaluate(store, "tumor/9", "--no-mlflow")
    assert result.exit_code == 1 and "breastscan-tumor has no version 9" in result.output
    result = evaluate(store, "tumor@@x", "--no-mlflow")
    assert result.exit_code == 2 and "is not NAME, NAME@STAGE or NAME/VERSION" in result.output


def test_a_headline_adds_its_metric(store: dict[str, Any]) -> None:
    from sklearn.metrics import cohen_kappa_score

    result = evaluate(store, "tumor", "--no-mlflow", "--name", "kappa", "--headline", "quadratic_kappa")
    assert result.exit_code == 0, result.output
    report = read_report(store, "tumor", "kappa")
    assert report["headline"] == "quadratic_kappa"
    # the model's own headline (the version's tag) stays reported beside the one asked for
    assert list(report["metrics"]) == [*STANDARD["classification"], "quadratic_kappa"]
    preds = pd.read_csv(store["root"] / "reports" / "kappa" / "tumor_predictions.csv")
    kappa = cohen_kappa_score(preds["true"], preds["pred"], weights="quadratic", labels=list(TUMOR_CLASSES))
    assert report["metrics"]["quadratic_kappa"]["value"] == pytest.approx(kappa, abs=1e-9)
    assert report["evaluation"]["headline_value"] == report["metrics"]["quadratic_kappa"]["value"]
    result = evaluate(store, "tumor", "--no-mlflow", "--name", "kappa", "--headline", "auc")
    assert result.exit_code == 1 and "'auc' is not a metric of a classification model with 3" in result.output


def test_default_headline() -> None:
    from dataclasses import replace

    assert external.default_headline(TUMOR_CONTRACT) == "macro_auc"
    assert external.default_headline(TUMOR_CONTRACT, "quadratic_kappa") == "quadratic_kappa"
    assert external.default_headline(TUMOR_CONTRACT, "mean_dice") == "macro_auc"  # not a classifier metric
    assert external.default_headline(TUMOR_CONTRACT, "auc") == "macro_auc"  # binary models only
    assert external.default_headline(LESION_CONTRACT, "lesion_mean_iou") == "lesion_mean_iou"
    assert external.default_headline(LESION_CONTRACT) == "mean_dice"
    declared = replace(TUMOR_CONTRACT, headline="balanced_accuracy")
    assert external.default_headline(declared, "quadratic_kappa") == "balanced_accuracy"  # the model's own


def test_fetch_score_and_report_through_the_api(store: dict[str, Any], tmp_path: Path) -> None:
    """The steps of ``breastscan evaluate`` one by one: resolver.fetch, load_external, score_external,
    build_report."""
    fetched = resolver.fetch("tumor@staging", tmp_path / "dl")
    assert fetched.resolved.version == 2 and fetched.resolved.aliases == ("staging",)
    assert fetched.resolved.uri == "models:/breastscan-tumor/2"
    assert fetched.resolved.tags["headline"] == "macro_auc"
    assert fetched.contract == TUMOR_CONTRACT and fetched.spec == SPEC
    assert fetched.bundle_dir.is_relative_to(tmp_path / "dl")
    dataset = external.load_external(store["dataset"], fetched.contract, fetched.spec)
    bundle = fetched.load_bundle()
    evaluation = external.score_external(bundle, dataset, headline="accuracy", n_boot=100, seed=2)
    assert list(evaluation.scores) == list(STANDARD["classification"])
    for name, s in evaluation.scores.items():  # every declared metric, not only the headline
        assert s["ci_low"] is not None and s["ci_low"] <= s["value"] <= s["ci_high"], name
    assert evaluation.temperature == TUMOR_TEMPERATURE and evaluation.metrics["n_val"] == 0
    assert evaluation.metrics["headline"] == "accuracy"
    np.testing.assert_allclose(
        evaluation.predictions[[f"prob_{c}" for c in TUMOR_CLASSES]].to_numpy(),
        _direct_tumor_probs(store, list(evaluation.predictions["image"])), atol=1e-5)
    again = external.score_external(bundle, dataset, headline="accuracy", n_boot=100, seed=2)
    assert again.scores == evaluation.scores  # seeded

    report = external.build_report(external_runs.scored_model(fetched), dataset, evaluation, n_boot=100,
                                   seed=2)
    assert (report["version"], report["stage"], report["aliases"]) == (2, "staging", ["staging"])
    assert report["metrics"] == evaluation.scores and report["headline"] == "accuracy"
    assert report["ci"]["n_boot"] == 100 and report["ci"]["seed"] == 2
    assert report["ci"]["n_groups"] == len(set(store["manifest"]["group"][:N_MG]))
    y = [TUMOR_CLASSES.index(t) for t in evaluation.predictions["true"]]
    pred = [TUMOR_CLASSES.index(t) for t in evaluation.predictions["pred"]]
    from sklearn.metrics import confusion_matrix

    assert report["confusion_matrix"]["matrix"] == confusion_matrix(y, pred, labels=[0, 1, 2]).tolist()
    assert report["per_class"] == evaluation.metrics["per_class"]
    assert report["calibration"]["refitted"] is False
    assert report["calibration"]["ece"] == evaluation.metrics["ece_after"]

    # a dataset with nothing usable fails before any model call
    root = tmp_path / "us_only"
    write_manifest(store["manifest"][store["manifest"]["modality"] == "ultrasound"], root)
    unusable = external.load_external(root, fetched.contract, fetched.spec)
    with pytest.raises(external.NoUsableRows, match="wrong_modality 12"):
        external.score_external(bundle, unusable, headline="accuracy")
    with pytest.raises(ValueError, match="'mean_dice' is not a metric"):
        external.score_external(bundle, dataset, headline="mean_dice")


def test_resolver_errors_and_downloads(store: dict[str, Any], tmp_path: Path) -> None:
    resolved = resolver.resolve("breastscan-tumor")
    assert (resolved.version, resolved.aliases, resolved.ref.alias) == (1, ("production",), "production")
    with pytest.raises(resolver.RegistryError, match="breastscan-tumor has no version with alias @nope"):
        resolver.resolve("tumor@nope")
    with pytest.raises(resolver.RegistryError, match="Registered breastscan models: lesion, tumor"):
        resolver.fetch("density", tmp_path / "x")
    bundle_dir = resolver.download_uri("models:/breastscan-lesion/1", tmp_path / "lesion")
    assert bundle_dir.is_relative_to(tmp_path / "lesion")
    assert {p.name for p in bundle_dir.iterdir()} >= {"model.keras", "preprocess.json", "contract.json"}
    assert resolver.load_bundle("lesion/1").contract == LESION_CONTRACT
    assert resolver.load_bundle("models:/breastscan-tumor@staging").contract == TUMOR_CONTRACT
