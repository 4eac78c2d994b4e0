"""breastscan.registry.tracking: tracking URI, experiments, provenance tags, params, the epoch logger."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from breastscan import provenance
from breastscan.registry import tracking


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty project root with MLflow pointed at a SQLite store inside it.

    ``mlflow.set_tracking_uri`` exports ``MLFLOW_TRACKING_URI``; monkeypatch restores the
    environment and the module globals are reset at teardown.
    """
    root = tmp_path / "project"
    root.mkdir()
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(var, "unset")  # recorded, so undo restores the original state
        monkeypatch.delenv(var)
    yield root
    if mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    mlflow.set_registry_uri(None)  # type: ignore[arg-type]


def test_import_is_cheap() -> None:
    code = ("import sys, breastscan.registry.tracking as t; "
            "assert 'mlflow' not in sys.modules and 'keras' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_tracking_uri_default_and_env(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert tracking.tracking_uri(project) == f"sqlite:///{project.resolve()}/mlflow.db"
    assert tracking.tracking_uri(Path(".")) == f"sqlite:///{Path.cwd().resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.tracking_uri(project) == "http://127.0.0.1:5999"


def test_is_local_store() -> None:
    assert tracking.is_local_store("sqlite:////tmp/x.db")
    assert tracking.is_local_store("file:///tmp/mlruns")
    assert tracking.is_local_store("/tmp/mlruns")
    assert not tracking.is_local_store("http://127.0.0.1:5000")
    assert not tracking.is_local_store("databricks")


def test_configure_and_experiment_artifacts_stay_in_project(project: Path) -> None:
    uri = tracking.configure(project)
    assert uri == f"sqlite:///{project.resolve()}/mlflow.db"
    assert mlflow.get_tracking_uri() == uri and mlflow.get_registry_uri() == uri
    exp_id = tracking.ensure_experiment("x", project)
    assert tracking.ensure_experiment("x", project) == exp_id  # idempotent
    exp = MlflowClient().get_experiment(exp_id)
    assert exp.name == tracking.experiment_name("x") == "breastscan-x"
    assert exp.artifact_location == (project.resolve() / "mlartifacts" / "breastscan-x").as_uri()
    # a deleted experiment comes back
    MlflowClient().delete_experiment(exp_id)
    assert tracking.ensure_experiment("x", project) == exp_id
    assert MlflowClient().get_experiment(exp_id).lifecycle_stage == "active"


def test_run_tags_outside_git(tmp_path: Path) -> None:
    (tmp_path / "data.dvc").write_text(
        "outs:\n- md5: 285bbc4b1161f05404f51943c39e9e23.dir\n  size: 1\n  nfiles: 2\n"
        "  hash: md5\n  path: data\n")
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  prepare@mammography:\n    cmd: x\n    outs:\n"
        "    - path: artifacts/prepared/mammography/splits.csv\n      hash: md5\n"
        "      md5: 0601ddf708242d7660e9f6504b82d1c4\n      size: 45656\n")
    tags = tracking.run_tags(tmp_path, split="artifacts/prepared/mammography/splits.csv")
    assert tags[tracking.TAG_COMMIT] == "unknown"
    assert tags[tracking.TAG_DIRTY] == "unknown"
    assert tags[tracking.TAG_DATA_HASH] == "285bbc4b1161f05404f51943c39e9e23.dir"
    assert tags[tracking.TAG_SPLIT_HASH] == "0601ddf708242d7660e9f6504b82d1c4"
    assert "mlflow.source.git.commit" not in tags
    assert tracking.run_tags(tmp_path, split="artifacts/other.csv")[tracking.TAG_SPLIT_HASH] == "unknown"
    # no personal or machine data
    text = " ".join(f"{k}={v}" for k, v in tags.items()).lower()
    import getpass
    import socket
    assert socket.gethostname().lower() not in text
    assert getpass.getuser().lower() not in text


def test_run_tags_with_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    answers = {("rev-parse", "HEAD"): "a" * 40, ("status", "--porcelain", "--untracked-files=no"): " M x.py"}
    monkeypatch.setattr(provenance, "_git", lambda root, *args: answers.get(args))
    tags = tracking.run_tags(tmp_path)
    assert tags[tracking.TAG_COMMIT] == "a" * 40 == tags["mlflow.source.git.commit"]
    assert tags[tracking.TAG_DIRTY] == "true"
    assert tags[tracking.TAG_DATA_HASH] == "unknown"
    answers[("status", "--porcelain", "--untracked-files=no")] = ""
    assert tracking.run_tags(tmp_path)[tracking.TAG_DIRTY] == "false"


def test_flatten_params() -> None:
    flat = tracking.flatten_params({
        "model": {"preprocess": {"height": 128, "keep_aspect": True}, "classes": (1, 2),
                  "gates": {"floors": {}, "max_regression": 0.03}, "weights": None},
        "long": "x" * 7000,
    })
    assert flat["model.preprocess.height"] == "128"
    assert flat["model.preprocess.keep_aspect"] == "True"
    assert flat["model.classes"] == "[1, 2]"
    assert flat["model.gates.floors"] == "{}"
    assert flat["model.gates.max_regression"] == "0.03"
    assert flat["model.weights"] == "None"
    assert len(flat["long"]) == tracking.MAX_PARAM_VALUE and flat["long"].endswith("...")
    assert all(isinstance(v, str) for v in flat.values())


def test_numeric_items() -> None:
    got = tracking.numeric_items({
        "accuracy": 0.5, "n": 3, "flag": True, "name": "x", "auc": None, "nan": float("nan"),
        "np": np.float32(0.25), "arr0": np.array(2.0), "arr": np.zeros(3), "npbool": np.bool_(True),
        "per_class": {"BI-RADS A": {"auc": 0.7}}, "cm": [[1, 2]],
    })
    assert got == {"accuracy": 0.5, "n": 3.0, "np": 0.25, "arr0": 2.0, "per_class.BI-RADS A.auc": 0.7}


def test_start_training_run_params_tags_resume(project: Path) -> None:
    params = tracking.flatten_params({"model": {"p": 3}} | {f"k{i}": i for i in range(150)})
    tags = {**tracking.run_tags(project), "breastscan.model": "x"}
    with tracking.start_training_run("x", project, params=params, tags=tags, run_name="t") as run:
        run_id = run.info.run_id
    stored = MlflowClient().get_run(run_id)
    assert stored.data.params["k149"] == "149" and len(stored.data.params) == len(params)
    assert stored.data.tags["breastscan.model"] == "x"
    assert stored.data.tags[tracking.TAG_COMMIT] == "unknown"
    exp = MlflowClient().get_experiment(stored.info.experiment_id)
    assert exp.name == "breastscan-x"
    assert stored.info.artifact_uri.startswith((project.resolve() / "mlartifacts").as_uri())
    assert tracking.run_exists(run_id)
    assert not tracking.run_exists("0" * 32)
    assert not tracking.run_exists(None)
    with tracking.resume_run(run_id) as again:
        assert again.info.run_id == run_id
        mlflow.log_metric("test_accuracy", 0.5)
    assert MlflowClient().get_run(run_id).data.metrics["test_accuracy"] == 0.5
    MlflowClient().delete_run(run_id)
    assert not tracking.run_exists(run_id)


def test_epoch_logger_logs_every_epoch(project: Path) -> None:
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
    x = np.random.default_rng(0).normal(size=(8, 2)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    with tracking.start_training_run("x", project, params={}, tags={}) as run:
        history = model.fit(x, y, validation_data=(x, y), epochs=3, batch_size=4, verbose=0,
                            callbacks=[tracking.MlflowEpochLogger()])
    client = MlflowClient()
    for key in ("loss", "mae", "val_loss", "val_mae"):
        points = client.get_metric_history(run.info.run_id, key)
        assert [p.step for p in points] == [0, 1, 2], key
        np.testing.assert_allclose([p.value for p in points], history.history[key], rtol=1e-5)


def test_epoch_logger_survives_tracking_errors(project: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    logger = tracking.MlflowEpochLogger()
    with caplog.at_level(logging.WARNING, logger="breastscan.registry.tracking"):
        logger.on_epoch_end(0, {"loss": 1.0})  # no active run: warn once, start no run
        logger.on_epoch_end(1, {"loss": 1.0})
        assert mlflow.active_run() is None
        assert sum("no active MLflow run" in r.message for r in caplog.records) == 1

        def broken(*args: object, **kwargs: object) -> None:
            raise ConnectionError("tracking server down")

        with tracking.start_training_run("x", project, params={}, tags={}):
            monkeypatch.setattr(mlflow, "log_metrics", broken)
            logger.on_epoch_end(2, {"loss": 0.5})
            logger.on_epoch_end(3, {"loss": 0.4})
    assert logger.failures == 2
    assert any("tracking server down" in r.message and "training goes on" in r.message
               for r in caplog.records)


def test_epoch_logger_is_a_keras_callback() -> None:
    import keras

    assert issubclass(tracking.MlflowEpochLogger, keras.callbacks.Callback)
    assert tracking.MlflowEpochLogger.__module__ == "breastscan.registry.tracking"
    with pytest.raises(AttributeError):
        tracking.NoSuchThing  # noqa: B018
