"""breastscan.registry.versions (pyfunc logging, register, listing), breastscan.registry.promotion
(gated promotion, re-scoring on the candidate's split) and breastscan.registry.resolver (downloads)
on a SQLite store.

One store and one logged model per module (logging costs about a second); every test
registers versions of its own registered model (``breastscan-<test>``), so tests do not
share aliases.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from breastscan.bundle import ModelBundle, ModelContract
from breastscan.config import GateConfig, ModelConfig
from breastscan.imaging.preprocessing import PreprocessSpec
from breastscan.registry import modelcard, promotion, resolver, tracking, versions
from tests.conftest import sqlite_mlflow

FLOORS = {"macro_auc": 0.7, "accuracy": 0.5}
GOOD = {"macro_auc": 0.85, "accuracy": 0.7, "headline": "macro_auc", "headline_value": 0.85,
        "headline_ci_low": 0.78, "headline_ci_high": 0.91, "n_test": 79}


def make_bundle(directory: Path) -> Path:
    """A tiny untrained 3-class classifier bundle at 32x32, saved to ``directory``."""
    from breastscan.models import build_model

    spec = PreprocessSpec(height=32, width=32)
    model = build_model("classification", n_classes=3, input_shape=(32, 32, 1))
    contract = ModelContract(name="tiny", task="classification", label="pathology",
                             classes=("benign", "malignant", "normal"),
                             class_names=("benign", "malignant", "normal"), input_shape=(32, 32, 1),
                             dataset="mammography", modality="mammography", temperature=1.5,
                             spec_id=spec.spec_id)
    return ModelBundle(model=model, spec=spec, contract=contract).save(directory)


def make_cfg(name: str, floors: dict[str, float] | None = None, max_regression: float = 0.03) -> ModelConfig:
    return ModelConfig(name=name, task="classification", dataset="mammography", label="pathology",
                       classes=("benign", "malignant", "normal"),
                       preprocess=PreprocessSpec(height=32, width=32), headline="macro_auc",
                       gates=GateConfig(floors=dict(FLOORS if floors is None else floors),
                                        max_regression=max_regression))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A project with a SQLite store, a tiny bundle and one logged model in a tagged run."""
    root = tmp_path_factory.mktemp("project")
    bundle_dir = make_bundle(root / "bundle")
    card = root / "model_card.md"
    card.write_text("# card\n")
    tags = {**tracking.run_tags(root), tracking.TAG_DATA_HASH: "d" * 32 + ".dir",
            tracking.TAG_COMMIT: "c" * 40}
    with sqlite_mlflow(root):
        with tracking.start_training_run("tiny", root, params={"a": "1"}, tags=tags) as run:
            uri = versions.log_bundle(bundle_dir, extra_artifacts={"model_card.md": card})
        yield {"root": root, "bundle_dir": bundle_dir, "model_uri": uri, "run_id": run.info.run_id,
               "bundle": ModelBundle.load(bundle_dir)}


def alias_version(name: str, alias: str) -> int:
    """The version holding an alias (MLflow 3 returns ``version`` as int from the SQL store)."""
    return int(MlflowClient().get_model_version_by_alias(name, alias).version)


def reg(store: dict[str, Any], cfg: ModelConfig, metrics: dict[str, Any] | None = None,
        split: str = "split-a") -> int:
    return versions.register(cfg, store["model_uri"], metrics=metrics or GOOD, split_id=split,
                             run_id=store["run_id"])


def test_log_bundle_uri_signature_and_artifacts(store: dict[str, Any]) -> None:
    assert re.fullmatch(r"models:/m-[0-9a-f]+", store["model_uri"])  # MLflow 3: a logged model
    info = mlflow.models.get_model_info(store["model_uri"])
    inputs = info.signature.inputs.to_dict()[0]
    outputs = info.signature.outputs.to_dict()[0]
    assert inputs["tensor-spec"] == {"dtype": "float32", "shape": (-1, 32, 32, 1)}
    assert outputs["tensor-spec"] == {"dtype": "float32", "shape": (-1, 3)}
    assert info.metadata["contract"]["classes"] == ["benign", "malignant", "normal"]
    root = Path(mlflow.artifacts.download_artifacts(store["model_uri"], dst_path=str(store["root"] / "dl")))
    assert (root / "artifacts" / "bundle" / "model.keras").is_file()
    assert (root / "artifacts" / "model_card.md").read_text() == "# card\n"
    reqs = (root / "requirements.txt").read_text()
    assert "keras==" in reqs and "mlflow==" in reqs
    # artifacts stayed in the project (experiment artifact location under mlartifacts/)
    assert info.artifact_path is not None
    assert any((store["root"] / "mlartifacts" / "breastscan-tiny").rglob("model.keras"))
    with pytest.raises(ValueError, match="reserved"):
        versions.log_bundle(store["bundle_dir"], extra_artifacts={"bundle": store["bundle_dir"]})


def test_register_alias_tags_and_pyfunc(store: dict[str, Any]) -> None:
    cfg = make_cfg("reg")
    v1 = reg(store, cfg)
    assert v1 == 1
    client = MlflowClient()
    mv = client.get_model_version(cfg.registered_name, "1")
    assert mv.tags["split_id"] == "split-a"
    assert mv.tags["headline"] == "macro_auc" and float(mv.tags["headline_value"]) == 0.85
    assert float(mv.tags["metric.macro_auc"]) == 0.85 and float(mv.tags["metric.accuracy"]) == 0.7
    assert float(mv.tags["headline_ci_low"]) == 0.78
    assert mv.tags["data_hash"] == "d" * 32 + ".dir" and mv.tags["git_commit"] == "c" * 40
    assert mv.run_id == store["run_id"]
    assert alias_version(cfg.registered_name, "staging") == 1
    rm = client.get_registered_model(cfg.registered_name)
    assert rm.tags["task"] == "classification" and rm.tags["classes"] == '["benign", "malignant", "normal"]'
    assert "not for diagnosis" in rm.description

    # the pyfunc behind @staging serves the bundle's calibrated probabilities
    x = np.random.default_rng(0).random((4, 32, 32, 1), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "add type hints" warning from MLflow
        pyfunc = mlflow.pyfunc.load_model(f"models:/{cfg.registered_name}@staging")
    got = pyfunc.predict(x)
    np.testing.assert_allclose(got, store["bundle"].predict(x), rtol=1e-5, atol=1e-6)
    assert got.shape == (4, 3)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)

    # a second version takes @staging over
    assert reg(store, cfg) == 2
    assert alias_version(cfg.registered_name, "staging") == 2
    assert versions.version_split_id(cfg) == "split-a"
    assert versions.version_split_id(cfg, 99) is None


def test_register_runs_uri(store: dict[str, Any]) -> None:
    """``runs:/<run>/model`` also works: MLflow 3 resolves it to the run's logged model."""
    cfg = make_cfg("runsuri")
    version = versions.register(cfg, f"runs:/{store['run_id']}/model", metrics=GOOD, split_id="s",
                                run_id=store["run_id"])
    mv = MlflowClient().get_model_version(cfg.registered_name, str(version))
    assert mv.source == store["model_uri"] and mv.run_id == store["run_id"]
    pyfunc = mlflow.pyfunc.load_model(f"models:/{cfg.registered_name}@staging")
    assert pyfunc.predict(np.zeros((1, 32, 32, 1), np.float32)).shape == (1, 3)


def test_register_mirrors_classic_staging_stage(store: dict[str, Any]) -> None:
    """Classic stages still work in MLflow 3.17 (deprecated, FutureWarning): mirrored for old clients."""
    cfg = make_cfg("stage")
    reg(store, cfg)
    reg(store, cfg)
    client = MlflowClient()
    assert client.get_model_version(cfg.registered_name, "2").current_stage == "Staging"
    assert client.get_model_version(cfg.registered_name, "1").current_stage == "Archived"


def test_register_missing_metric_is_tagged_absent(store: dict[str, Any]) -> None:
    cfg = make_cfg("missing")
    reg(store, cfg, {"macro_auc": 0.9})
    result = promotion.promote(cfg)
    assert not result.passed
    assert result.failures == ["accuracy missing on v1 (not in its registered metrics)"]


def test_promote_first_version_passes(store: dict[str, Any]) -> None:
    cfg = make_cfg("first")
    reg(store, cfg)
    result = promotion.promote(cfg)
    assert result.passed and result.version == 1 and result.previous is None and not result.failures
    assert {c["gate"] for c in result.checks} == {"floor:macro_auc", "floor:accuracy"}
    assert all(c["ok"] for c in result.checks)
    client = MlflowClient()
    mv = client.get_model_version_by_alias(cfg.registered_name, "production")
    assert int(mv.version) == 1
    assert mv.tags["promoted_from"] == "none" and mv.tags["promoted_to"] == "production"
    assert re.match(r"\d{4}-\d\d-\d\dT", mv.tags["promoted_at"])
    assert mv.current_stage == "Production"
    # promoting the holder again changes nothing
    again = promotion.promote(cfg, version=1)
    assert again.passed and again.previous == 1


def test_promote_floor_failure_names_the_gate(store: dict[str, Any]) -> None:
    cfg = make_cfg("floor")
    reg(store, cfg, {**GOOD, "macro_auc": 0.61, "headline_value": 0.61})
    result = promotion.promote(cfg)
    assert not result.passed
    assert result.failures == ["macro_auc 0.610 < floor 0.700"]
    failed = [c for c in result.checks if not c["ok"]]
    assert failed == [{"gate": "floor:macro_auc", "metric": "macro_auc", "candidate": 0.61, "threshold": 0.7,
                       "ok": False, "detail": "macro_auc 0.610 < floor 0.700"}]
    with pytest.raises(MlflowException):
        MlflowClient().get_model_version_by_alias(cfg.registered_name, "production")
    assert versions.list_models(cfg.registered_name)[0]["aliases"] == ["staging"]


def test_promote_regression_gate_same_split(store: dict[str, Any]) -> None:
    cfg = make_cfg("regress")
    reg(store, cfg)                                   # v1: 0.85 / 0.70
    assert promotion.promote(cfg).passed
    reg(store, cfg, {**GOOD, "macro_auc": 0.80, "headline_value": 0.80})  # v2: above floor, -0.05
    result = promotion.promote(cfg)
    assert not result.passed and result.previous == 1
    assert result.failures == ["macro_auc 0.800 < 0.820 (production v1 0.850 - max_regression 0.030)"]
    assert any(c["gate"] == "same_split" and c["ok"] for c in result.checks)
    assert alias_version(cfg.registered_name, "production") == 1

    reg(store, cfg, {**GOOD, "macro_auc": 0.83, "headline_value": 0.83, "accuracy": 0.68})  # v3: within 0.03
    result = promotion.promote(cfg)
    assert result.passed, result.failures
    assert result.version == 3 and result.previous == 1
    gates = {c["gate"] for c in result.checks}
    assert gates == {"floor:macro_auc", "floor:accuracy", "same_split", "regression:macro_auc",
                     "regression:accuracy"}
    client = MlflowClient()
    assert alias_version(cfg.registered_name, "production") == 3
    assert client.get_model_version(cfg.registered_name, "3").tags["promoted_from"] == "1"
    assert client.get_model_version(cfg.registered_name, "1").current_stage == "Archived"


def test_promote_split_mismatch_without_evaluate_is_refused(store: dict[str, Any]) -> None:
    cfg = make_cfg("splitref")
    reg(store, cfg, split="split-a")
    assert promotion.promote(cfg).passed
    reg(store, cfg, {**GOOD, "macro_auc": 0.95, "headline_value": 0.95}, split="split-b")
    result = promotion.promote(cfg)
    assert not result.passed
    assert len(result.failures) == 1
    assert result.failures[0].startswith("test split differs: v2 on split-b, production v1 on split-a")
    assert "evaluate=" in result.failures[0]
    assert alias_version(cfg.registered_name, "production") == 1


def test_promote_split_mismatch_re_evaluates_production(store: dict[str, Any]) -> None:
    cfg = make_cfg("spliteval")
    reg(store, cfg, split="split-a")                                   # v1, 0.85 on split a
    assert promotion.promote(cfg).passed
    reg(store, cfg, {**GOOD, "macro_auc": 0.80, "headline_value": 0.80}, split="split-b")  # v2, 0.80 on b
    seen: list[ModelBundle] = []

    def evaluate_low(bundle: ModelBundle) -> dict[str, Any]:
        seen.append(bundle)
        return {"macro_auc": 0.78, "accuracy": 0.6}   # v1 re-scored on split b: worse than v2

    result = promotion.promote(cfg, evaluate=evaluate_low)
    assert result.passed, result.failures
    assert result.reevaluated and result.previous == 1
    assert len(seen) == 1 and isinstance(seen[0], ModelBundle)
    assert seen[0].contract.classes == ("benign", "malignant", "normal")
    regression = {c["metric"]: c for c in result.checks if c["gate"].startswith("regression:")}
    assert regression["macro_auc"]["threshold"] == pytest.approx(0.75)

    reg(store, cfg, {**GOOD, "macro_auc": 0.80, "headline_value": 0.80}, split="split-c")  # v3 on c

    def evaluate_high(bundle: ModelBundle) -> dict[str, Any]:
        return {"macro_auc": 0.9, "accuracy": None}  # v2 re-scored on c: much better; accuracy unknown

    result = promotion.promote(cfg, evaluate=evaluate_high)
    assert not result.passed and result.reevaluated
    assert result.failures == ["macro_auc 0.800 < 0.870 (production v2 0.900 - max_regression 0.030)",
                               "accuracy unknown for production v2: cannot compare"]


def test_promote_without_staging_version_is_a_clear_error(store: dict[str, Any]) -> None:
    with pytest.raises(resolver.RegistryError, match="breastscan-nothing has no version with alias @staging"):
        promotion.promote(make_cfg("nothing"))
    cfg = make_cfg("noversion")
    reg(store, cfg)
    with pytest.raises(resolver.RegistryError, match="has no version 7"):
        promotion.promote(cfg, version=7)
    MlflowClient().delete_registered_model_alias(cfg.registered_name, "staging")
    with pytest.raises(resolver.RegistryError, match="no version with alias @staging"):
        promotion.promote(cfg)


def test_list_models_rows(store: dict[str, Any]) -> None:
    cfg = make_cfg("listed")
    reg(store, cfg)
    promotion.promote(cfg)
    reg(store, cfg, {**GOOD, "macro_auc": 0.9, "headline_value": 0.9})
    rows = [r for r in versions.list_models() if r["name"] == cfg.registered_name]
    assert [r["version"] for r in rows] == [2, 1]
    assert rows[0]["aliases"] == ["staging"] and rows[1]["aliases"] == ["production"]
    assert rows[0]["stage"] == "Staging" and rows[1]["stage"] == "Production"
    assert rows[0]["headline"] == "macro_auc" and rows[0]["value"] == 0.9
    assert rows[0]["run_id"] == store["run_id"] and rows[0]["split_id"] == "split-a"
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$", rows[0]["created"])
    assert all(r["name"].startswith("breastscan-") for r in versions.list_models())
    assert versions.list_models("nobody-") == []


def test_a_version_is_described_by_its_card_in_brief(store: dict[str, Any]) -> None:
    """register: the description is the card in brief, the modality from the logged contract."""
    cfg = make_cfg("brief")
    version = reg(store, cfg)
    description = MlflowClient().get_model_version(cfg.registered_name, str(version)).description
    assert description.startswith("**breastscan-brief** (classification). Classifies the **pathology** of a "
                                  "mammography image into 3 classes")
    assert "**macro_auc = 0.850** (95% CI 0.780-0.910, bootstrap)" in description
    assert "T = 1.500" in description  # the logged contract's temperature (the report has none)
    assert versions.logged_contract(store["model_uri"]).modality == "mammography"  # type: ignore[union-attr]
    assert versions.logged_contract("/nowhere") is None


def test_download_and_load_bundle(store: dict[str, Any], tmp_path: Path) -> None:
    cfg = make_cfg("download")
    reg(store, cfg)
    promotion.promote(cfg)
    fetched = resolver.fetch(cfg.registered_name, tmp_path / "prod")  # @production by default
    assert fetched.resolved.version == 1 and fetched.resolved.ref.alias == "production"
    bundle_dir = fetched.bundle_dir
    assert bundle_dir == tmp_path / "prod" / "artifacts" / "bundle"
    assert {p.name for p in bundle_dir.iterdir()} >= {"model.keras", "preprocess.json", "contract.json"}
    assert fetched.contract == store["bundle"].contract and fetched.spec == store["bundle"].spec
    assert resolver.download_uri(f"models:/{cfg.registered_name}@production", tmp_path / "uri") == \
        tmp_path / "uri" / "artifacts" / "bundle"
    bundle = resolver.load_bundle(f"{cfg.registered_name}@staging")
    x = np.random.default_rng(1).random((2, 32, 32, 1), dtype=np.float32)
    np.testing.assert_allclose(bundle.predict(x), store["bundle"].predict(x), rtol=1e-5, atol=1e-6)
    assert bundle.contract.temperature == 1.5
    assert resolver.load_bundle(f"{cfg.name}/1").contract.name == "tiny"
    with pytest.raises(resolver.RegistryError):
        resolver.fetch(f"{cfg.registered_name}@nope", tmp_path / "x")
    with pytest.raises(resolver.RegistryError):
        resolver.download_uri(f"models:/{cfg.registered_name}/9", tmp_path / "y")


def test_classic_stage_uri_still_resolves(store: dict[str, Any], tmp_path: Path) -> None:
    """``models:/<name>/Production`` (deprecated stage URI) resolves in MLflow 3.17 after mirroring."""
    cfg = make_cfg("stageuri")
    reg(store, cfg)
    promotion.promote(cfg)
    uri = f"models:/{cfg.registered_name}/Production"
    bundle_dir = resolver.download_uri(uri, tmp_path / "stage")
    assert (bundle_dir / "model.keras").is_file()
    pyfunc = mlflow.pyfunc.load_model(uri)
    assert pyfunc.predict(np.zeros((1, 32, 32, 1), np.float32)).shape == (1, 3)


def test_stage_mirror_failure_is_not_fatal(store: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    def gone(self: object, *args: object, **kwargs: object) -> None:
        raise AttributeError("stages removed")

    monkeypatch.setattr(MlflowClient, "transition_model_version_stage", gone)
    cfg = make_cfg("nostage")
    reg(store, cfg)
    assert promotion.promote(cfg).passed
    mv = MlflowClient().get_model_version_by_alias(cfg.registered_name, "production")
    assert mv.current_stage == "None"
    assert "could not mirror" in caplog.text


# --------------------------------------------------------------------------- re-scoring on a split


@pytest.fixture(scope="module")
def mammo_split(tiny_phantoms: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(splits.csv, dataset root) of the tiny mammography phantoms."""
    from breastscan.config import DedupConfig, SplitConfig
    from breastscan.data.manifest import normalize_manifest, read_manifest
    from breastscan.data.splits import prepare_splits

    root = tiny_phantoms / "mammography"
    df, _ = prepare_splits(normalize_manifest(read_manifest(root)), root, labels=("pathology",),
                           stratify=("pathology",), dedup=DedupConfig(max_hamming=10, min_correlation=0.9),
                           cfg=SplitConfig(seed=1, test_fraction=0.3, val_fraction=0.2))
    csv = tmp_path_factory.mktemp("split") / "splits.csv"
    df.to_csv(csv, index=False)
    return csv, root


def test_rescore_on_split_is_the_evaluate_stage_with_the_stored_calibration(
        store: dict[str, Any], mammo_split: tuple[Path, Path], tmp_path: Path) -> None:
    from breastscan.data.loading import load_split
    from breastscan.data.splits import split_id
    from breastscan.evaluation.scoring import Scoring, score_bundle

    csv, root = mammo_split
    cfg = make_cfg("rescored")
    evaluate = promotion.rescore_on_split(cfg, csv, root, split_id(csv, "test"))
    metrics = evaluate(store["bundle"])
    test = load_split(csv, root, cfg, "test")
    expected = score_bundle(store["bundle"], test, scoring=Scoring.from_config(cfg), n_boot=0).metrics
    assert metrics == expected
    assert metrics["n_test"] == len(test) > 0
    assert metrics["temperature"] == 1.5 and metrics["n_val"] == 0  # nothing refitted
    assert all(modelcard.report_metric(metrics, m) is not None for m in versions.gated_metrics(cfg))
    with pytest.raises(resolver.RegistryError, match="is not the one the candidate was evaluated on"):
        promotion.rescore_on_split(cfg, csv, root, "0123456789ab")(store["bundle"])
    with pytest.raises(resolver.RegistryError, match="is missing"):
        promotion.rescore_on_split(cfg, tmp_path / "none.csv", root, None)(store["bundle"])


def test_promote_rescores_production_on_the_candidates_split(store: dict[str, Any],
                                                            mammo_split: tuple[Path, Path]) -> None:
    from breastscan.data.splits import split_id

    csv, root = mammo_split
    here = split_id(csv, "test")
    cfg = make_cfg("rescoring", floors={})  # the headline alone is compared
    reg(store, cfg, split="split-a")
    assert promotion.promote(cfg).passed
    evaluate = promotion.rescore_on_split(cfg, csv, root, here)
    # v2 is the same model registered with the numbers of this split: it ties with v1 re-scored there
    scored = dict(evaluate(store["bundle"]))
    reg(store, cfg, scored, split=here)
    result = promotion.promote(cfg, evaluate=evaluate)
    assert result.passed and result.reevaluated, result.failures
    check = next(c for c in result.checks if c["gate"] == "regression:macro_auc")
    assert check["candidate"] == pytest.approx(scored["macro_auc"])
    assert check["threshold"] == pytest.approx(scored["macro_auc"] - cfg.gates.max_regression)
    assert alias_version(cfg.registered_name, "production") == 2

    # a re-score that cannot run is passed on, and nothing moves
    reg(store, cfg, scored, split="split-z")
    with pytest.raises(resolver.RegistryError, match="is not the one the candidate"):
        promotion.promote(cfg, evaluate=promotion.rescore_on_split(cfg, csv, root, "split-z"))
    assert alias_version(cfg.registered_name, "production") == 2


def test_per_class_floor_and_every_class_gate_refuse_a_model_that_never_predicts_a_class(
        store: dict[str, Any]) -> None:
    """A classifier that never calls `benign` is refused, and the refusal gives the numbers."""
    floors = {"macro_auc": 0.7, "per_class.benign.sensitivity": 0.3}
    cfg = make_cfg("blind", floors)
    cfg = replace(cfg, gates=replace(cfg.gates, every_class_predicted=True))
    blind = {**GOOD, "per_class": {
        "benign": {"support": 10, "sensitivity": 0.0, "specificity": 1.0, "precision": None, "auc": 0.7},
        "malignant": {"support": 10, "sensitivity": 0.9, "specificity": 0.5, "precision": 0.5, "auc": 0.9},
        "normal": {"support": 10, "sensitivity": 0.8, "specificity": 0.8, "precision": 0.7, "auc": 0.9}}}
    version = reg(store, cfg, blind)
    tags = MlflowClient().get_model_version(cfg.registered_name, str(version)).tags
    assert tags["metric.per_class.benign.sensitivity"] == "0.0"
    assert tags["classes_never_predicted"] == "benign"
    result = promotion.promote(cfg)
    assert not result.passed
    assert result.failures == ["per_class.benign.sensitivity 0.000 < floor 0.300",
                               f"v{version} never predicts benign on its test split (sensitivity 0.000)"]
    seeing = {**blind, "per_class": {**blind["per_class"], "benign": {
        "support": 10, "sensitivity": 0.4, "specificity": 0.9, "precision": 0.6, "auc": 0.8}}}
    reg(store, cfg, seeing)
    assert promotion.promote(cfg).passed


def test_the_inference_function_is_traced_once_for_every_batch_size() -> None:
    """ModelBundle.logits: one graph with an open batch dimension, the values of predict_on_batch."""
    from breastscan.bundle import inference_function
    from tests.conftest import tiny_model

    model = tiny_model("classification", n_classes=3, seed=4)
    fn = inference_function(model, (32, 32, 1))
    assert inference_function(model, (32, 32, 1)) is fn  # cached per model
    rng = np.random.default_rng(0)
    for n in (1, 3, 8, 5):
        batch = rng.random((n, 32, 32, 1), dtype=np.float32)
        np.testing.assert_array_equal(np.asarray(fn(batch)), np.asarray(model.predict_on_batch(batch)))
    assert fn.experimental_get_tracing_count() == 1


def test_test_time_flips_average_the_model_and_its_mirror(tmp_path: Path) -> None:
    """tta "flip": ModelBundle.logits is the mean over the image and its mirror (a mask mirrored back)."""
    from breastscan.bundle import ModelBundle, inference_function
    from tests.conftest import tiny_model

    rng = np.random.default_rng(1)
    batch = rng.random((3, 32, 32, 1), dtype=np.float32)
    for task in ("classification", "segmentation"):
        model = tiny_model(task, n_classes=3, seed=5)
        plain = np.asarray(model(batch, training=False))
        mirrored = np.asarray(model(batch[:, :, ::-1], training=False))
        if task == "segmentation":
            mirrored = mirrored[:, :, ::-1]
        flipped = np.asarray(inference_function(model, (32, 32, 1), "flip")(batch))
        np.testing.assert_allclose(flipped, (plain + mirrored) / 2, rtol=1e-5, atol=1e-5)
        assert not np.allclose(flipped, plain, atol=1e-4)  # an asymmetric model: the mirror counts
        np.testing.assert_allclose(np.asarray(inference_function(model, (32, 32, 1))(batch)), plain,
                                   rtol=1e-5, atol=1e-6)
    bundle = ModelBundle.load(make_bundle(tmp_path / "a"))
    flipping = replace(bundle, contract=replace(bundle.contract, tta="flip"))
    flipping.save(tmp_path / "b")
    again = ModelBundle.load(tmp_path / "b")
    assert again.contract.tta == "flip"
    image = rng.random((2, *bundle.contract.input_shape), dtype=np.float32)
    expected = (bundle.logits(image) + bundle.logits(image[:, :, ::-1])) / 2
    np.testing.assert_allclose(again.logits(image), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="tta"):
        replace(bundle.contract, tta="rotate")


def test_a_contract_with_keys_a_newer_version_wrote_still_reads(caplog: pytest.LogCaptureFixture,
                                                                 tmp_path: Path) -> None:
    """An older worker reading a newer model: unknown contract keys are left out with a warning."""
    from breastscan.bundle import ModelContract, read_contract

    contract = read_contract(make_bundle(tmp_path))
    data = {**contract.to_dict(), "explained_by": "a newer field", "outputs": ["logits", "mask"]}
    with caplog.at_level("WARNING"):
        again = ModelContract.from_dict(data)
    assert again == contract
    assert "explained_by, outputs" in caplog.text
