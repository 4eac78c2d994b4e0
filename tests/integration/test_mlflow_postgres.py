"""A team's tracking server for real: ``mlflow server`` on PostgreSQL, proxied artifacts.

A PostgreSQL cluster (tests/postgres.py: initdb in /tmp, unix socket only) holds the
tracking and registry store of a real ``mlflow server`` (tests/mlflow_server.py,
``--backend-store-uri postgresql://...`` ``--serve-artifacts --artifacts-destination <dir>``);
the client only knows ``http://127.0.0.1:<port>``. A run is logged, a tiny model registered,
promoted through the real gates (a remote store: no lock file, the optimistic before/after
re-read) and loaded back by stage, and the database itself is read to show that it, not some
file, holds the result. (The pipeline's stages against this server are in
tests/pipelines/test_dvc_repro.py.) Without PostgreSQL these tests skip with the reason (FAIL under CI or
``make test``); run with ``pytest --slow``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from breastscan.bundle import ModelBundle
from breastscan.registry import promotion, resolver, tracking, versions
from tests.conftest import mlflow_at
from tests.mlflow_server import mlflow_server
from tests.postgres import PostgresCluster
from tests.unit.test_registry import GOOD, make_bundle, make_cfg

pytestmark = pytest.mark.slow

DATABASE = "mlflow_integration"


@pytest.fixture(scope="module")
def pg_server(postgres: PostgresCluster,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``mlflow server`` on a fresh PostgreSQL database: its URI and its working directory."""
    workdir = tmp_path_factory.mktemp("mlflow-pg-server")
    store = postgres.create_database(DATABASE)
    with mlflow_server(workdir, backend_store_uri=store) as uri:
        yield uri, workdir


@pytest.fixture
def remote(pg_server: tuple[str, Path]) -> Iterator[str]:
    uri, _ = pg_server
    with mlflow_at(uri):
        yield uri


def test_server_stores_in_postgres(pg_server: tuple[str, Path], postgres: PostgresCluster) -> None:
    import urllib.request

    uri, workdir = pg_server
    with urllib.request.urlopen(f"{uri}/health", timeout=5) as resp:
        assert resp.status == 200
    # MLflow migrated its schema into the PostgreSQL database; no SQLite file anywhere
    tables = set(postgres.psql("SELECT tablename FROM pg_tables WHERE schemaname = 'public'",
                               DATABASE).split())
    assert {"alembic_version", "experiments", "runs", "registered_models", "model_versions",
            "registered_model_aliases"} <= tables
    assert not list(workdir.rglob("*.db"))


def test_log_register_promote_load_over_postgres(remote: str, pg_server: tuple[str, Path],
                                                 postgres: PostgresCluster, tmp_path: Path) -> None:
    _, workdir = pg_server
    project = tmp_path / "project"
    project.mkdir()
    assert tracking.configure(project) == remote
    bundle_dir = make_bundle(tmp_path / "bundle")
    cfg = make_cfg("pgteam")
    name = cfg.registered_name

    tags = {**tracking.run_tags(project), "breastscan.model": cfg.name}
    with tracking.start_training_run(cfg.name, project, params={"model.preprocess.height": "32"},
                                     tags=tags) as run:
        mlflow.log_metrics({"loss": 1.0}, step=0)
        mlflow.log_metrics({"loss": 0.5}, step=1)
        model_uri = versions.log_bundle(bundle_dir)
        v1 = versions.register(cfg, model_uri, metrics=GOOD, split_id="split-a", run_id=run.info.run_id)
    assert v1 == 1
    run_id = run.info.run_id

    # artifacts went through the server into its destination, not into the project
    assert MlflowClient().get_experiment_by_name(f"breastscan-{cfg.name}").artifact_location.startswith(
        "mlflow-artifacts:")
    assert any((workdir / "artifacts").rglob("model.keras"))
    assert not (project / "mlartifacts").exists() and not (project / "mlflow.db").exists()

    # the real promotion: a remote store has no lock file, its gates and alias moves still hold
    assert promotion.promotion_lock_path(remote, name) is None
    first = promotion.promote(cfg)
    assert first.passed and first.previous is None and first.version == 1
    weak = versions.register(cfg, model_uri, metrics={**GOOD, "accuracy": 0.4}, split_id="split-a",
                             run_id=run_id)
    refused = promotion.promote(cfg, version=weak)
    assert not refused.passed and refused.failures == [
        "accuracy 0.400 < floor 0.500",
        "accuracy 0.400 < 0.670 (production v1 0.700 - max_regression 0.030)"]
    better = versions.register(cfg, model_uri, metrics={**GOOD, "accuracy": 0.72}, split_id="split-a",
                               run_id=run_id)
    second = promotion.promote(cfg, version=better)
    assert second.passed and second.previous == 1 and second.version == better == 3
    client = MlflowClient()
    assert int(client.get_model_version_by_alias(name, "production").version) == 3
    assert client.get_model_version(name, "3").current_stage == "Production"
    assert not any(k.startswith(promotion.PENDING_TAG_PREFIX) for k in client.get_registered_model(name).tags)

    # PostgreSQL itself holds the registry state the client saw
    assert postgres.psql(f"SELECT alias || '=' || version FROM registered_model_aliases "
                         f"WHERE name = '{name}' ORDER BY alias", DATABASE).split() == [
        "production=3", "staging=3"]
    assert postgres.psql(f"SELECT count(*) FROM model_versions WHERE name = '{name}'", DATABASE) == "3"
    losses = postgres.psql(f"SELECT value FROM metrics WHERE run_uuid = '{run_id}' AND key = 'loss' "
                           f"ORDER BY step", DATABASE).split()
    assert [float(v) for v in losses] == [1.0, 0.5]

    # resolved and loaded over the server: the same bundle, the same probabilities
    x = np.random.default_rng(0).random((3, 32, 32, 1), dtype=np.float32)
    expected = ModelBundle.load(bundle_dir).predict(x)
    loaded = resolver.load_bundle(f"{cfg.name}@production")
    assert loaded.contract.name == "tiny"
    np.testing.assert_allclose(loaded.predict(x), expected, rtol=1e-5, atol=1e-6)
    assert resolver.resolve(f"{cfg.name}@production").version == 3
    assert resolver.load_bundle(f"models:/{name}/Production").contract.name == "tiny"
    assert (resolver.fetch(f"{name}@production", tmp_path / "dl").bundle_dir / "model.keras").is_file()
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@production")  # what the service's URI loads
    np.testing.assert_allclose(pyfunc.predict(x), expected, rtol=1e-5, atol=1e-6)
    rows = versions.list_models()
    assert [(r["version"], r["aliases"]) for r in rows if r["name"] == name] == [
        (3, ["production", "staging"]), (2, []), (1, [])]
    assert tracking.run_exists(run_id)
