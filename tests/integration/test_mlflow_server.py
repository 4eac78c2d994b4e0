"""Tracking, registry and promotion over HTTP against a real ``mlflow server`` process.

The server (``tests/mlflow_server.py``) runs on 127.0.0.1 with a SQLite backend and proxied
artifacts; the client only knows ``http://127.0.0.1:<port>``. Run with ``pytest --slow``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from breastscan.registry import promotion, resolver, tracking, versions
from breastscan.registry.bundle import ModelBundle
from tests.mlflow_server import mlflow_server, tracking_against
from tests.unit.test_registry import GOOD, make_bundle, make_cfg

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A live server for this module: its URI and its working directory."""
    workdir = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server(workdir) as uri:
        yield uri, workdir


@pytest.fixture
def remote(server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    uri, _ = server
    with tracking_against(uri, monkeypatch):
        yield uri


def test_server_helper_is_healthy(server: tuple[str, Path]) -> None:
    import urllib.request

    uri, workdir = server
    with urllib.request.urlopen(f"{uri}/health", timeout=5) as resp:
        assert resp.status == 200
    assert (workdir / "mlflow.db").is_file()


def test_log_register_promote_over_http(remote: str, server: tuple[str, Path], tmp_path: Path) -> None:
    _, workdir = server
    project = tmp_path / "project"
    project.mkdir()
    assert tracking.configure(project) == remote
    bundle_dir = make_bundle(tmp_path / "bundle")
    cfg = make_cfg("remote")

    tags = {**tracking.run_tags(project), "breastscan.model": cfg.name}
    with tracking.start_training_run(cfg.name, project, params={"model.preprocess.height": "32"},
                                     tags=tags) as run:
        mlflow.log_metrics({"loss": 1.0}, step=0)
        model_uri = versions.log_bundle(bundle_dir)
        version = versions.register(cfg, model_uri, metrics=GOOD, split_id="split-a", run_id=run.info.run_id)
    assert version == 1

    # the server chose the artifact location (proxied), nothing was written into the project
    exp = MlflowClient().get_experiment_by_name("breastscan-remote")
    assert exp.artifact_location.startswith("mlflow-artifacts:")
    assert not (project / "mlartifacts").exists()
    assert any((workdir / "artifacts").rglob("model.keras"))

    # gates: a weak second version is refused, then the good one is promoted
    result = promotion.promote(cfg)
    assert result.passed and result.previous is None
    weak = versions.register(cfg, model_uri, metrics={**GOOD, "accuracy": 0.4}, split_id="split-a",
                             run_id=run.info.run_id)
    refused = promotion.promote(cfg, version=weak)
    assert not refused.passed
    assert refused.failures == ["accuracy 0.400 < floor 0.500",
                                "accuracy 0.400 < 0.670 (production v1 0.700 - max_regression 0.030)"]
    client = MlflowClient()
    assert int(client.get_model_version_by_alias(cfg.registered_name, "production").version) == 1
    assert client.get_model_version(cfg.registered_name, "1").current_stage == "Production"

    # the service's URI resolves over HTTP and serves the bundle's probabilities
    x = np.random.default_rng(0).random((3, 32, 32, 1), dtype=np.float32)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{cfg.registered_name}@production")
    expected = ModelBundle.load(bundle_dir).predict(x)
    np.testing.assert_allclose(pyfunc.predict(x), expected, rtol=1e-5, atol=1e-6)
    assert (resolver.fetch(f"{cfg.registered_name}@production", tmp_path / "dl").bundle_dir
            / "model.keras").is_file()
    assert resolver.load_bundle(f"models:/{cfg.registered_name}/Production").contract.name == "tiny"

    rows = versions.list_models()
    assert [(r["version"], r["aliases"]) for r in rows if r["name"] == cfg.registered_name] == [
        (2, ["staging"]), (1, ["production"])]
    assert tracking.run_exists(run.info.run_id)
    assert client.get_metric_history(run.info.run_id, "loss")[0].step == 0
