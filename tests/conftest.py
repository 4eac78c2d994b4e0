"""Shared fixtures: small synthetic datasets the project makes itself, paths to real data.

Plain ``pytest`` runs the fast tests; ``pytest --slow`` (what ``make test`` runs) adds the
slow ones (real ``dvc repro`` runs). Tests marked ``data`` need ../shared/datasets and skip
with the reason when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
