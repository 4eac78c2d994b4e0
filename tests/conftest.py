"""Shared fixtures: small synthetic datasets the project makes itself, paths to real data.

Plain ``pytest`` runs the fast tests; ``pytest --slow`` (what ``make test`` runs) adds the
slow ones (real ``dvc repro`` runs). Tests marked ``data`` need ../shared/datasets and skip
with the reason when it is absent.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ["tests.model.plugin", "tests.postgres"]  # --model-uri; the `postgres` fixture

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"

# Nothing in the test suite may reach the network.
for _var, _value in {
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "BENTOML_DO_NOT_TRACK": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}.items():
    os.environ.setdefault(_var, _value)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow test: run with --slow (make test does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def restore_root_logging() -> Iterator[None]:
    """A CLI run by click's runner configures the root logger onto the runner's stream: undo that."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """../shared/datasets, or skip when this checkout has none beside it."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"real datasets not present at {SHARED_DATASETS}")
    return SHARED_DATASETS


@pytest.fixture(scope="session")
def tiny_phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo tree (data/mammography, data/ultrasound) generated once per session."""
    from breastscan.data.phantoms import generate_demo

    root = tmp_path_factory.mktemp("phantoms") / "data"
    generate_demo(root, seed=3, n_mammography=64, n_ultrasound=60,
                  duplicate_rate=0.1, label_conflicts=1)
    return root


@contextmanager
def mlflow_at(uri: str) -> Iterator[pytest.MonkeyPatch]:
    """MLflow (tracking and registry) on the store or server ``uri``, for a fixture.

    Whatever ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI`` the environment had is set
    aside; on exit an open run is ended, the URIs are reset and every change made through
    the yielded ``MonkeyPatch`` (which the caller may use for more) is undone.
    """
    import mlflow

    mp = pytest.MonkeyPatch()
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        mp.delenv(var, raising=False)
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        yield mp
    finally:
        if mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
        mlflow.set_registry_uri(None)  # type: ignore[arg-type]
        mp.undo()


@contextmanager
def sqlite_mlflow(root: Path) -> Iterator[pytest.MonkeyPatch]:
    """:func:`mlflow_at` a fresh SQLite store under ``root``."""
    with mlflow_at(f"sqlite:///{root}/store.db") as mp:
        yield mp


def tiny_model(task: str, n_classes: int = 0, seed: int = 0) -> Any:
    """An untrained, seeded Keras model of the project's builders at 32x32 (tests that need any model)."""
    import keras

    from breastscan.models import build_model

    keras.utils.set_random_seed(seed)
    if task == "classification":
        return build_model("classification", n_classes=n_classes, input_shape=(32, 32, 1), dropout=0.0)
    return build_model("segmentation", input_shape=(32, 32, 1), base_filters=4, depth=2, dropout=0.0)
