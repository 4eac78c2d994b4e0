"""The ``--model-uri`` option of the behavioural model tests (tests/model), as a pytest plugin.

pytest accepts new command-line options only from the root conftest or a plugin, so the
option lives here and is loaded by ``pytest_plugins = ["tests.model.plugin"]`` in
tests/conftest.py (or ``-p tests.model.plugin`` on the command line). This module only
adds the option: which tests run against which model is decided in tests/model/conftest.py.

``--model-uri`` may be given several times; each value is a registry reference
(``models:/breastscan-density@production``, ``density@production``, ``tumor/3``,
``breastscan-lesion``) or any MLflow model URI of a logged breastscan bundle
(``models:/m-<id>``, ``runs:/<run>/model``). Without it the model tests are skipped.
"""

from __future__ import annotations

import pytest

OPTION = "--model-uri"
DEST = "model_uri"
STORE_OPTION = "--model-store"
STORE_DEST = "model_store"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("breastscan models", "behavioural tests of trained models (tests/model)")
    group.addoption(
        OPTION, action="append", default=[], dest=DEST, metavar="REF",
        help="a registered model to run the behavioural tests (-m model) against: "
             "models:/breastscan-NAME@ALIAS, NAME@ALIAS, NAME/VERSION or an MLflow model URI; "
             "may be given several times",
    )
    group.addoption(
        STORE_OPTION, default=None, dest=STORE_DEST, metavar="URI",
        help="the MLflow store the --model-uri references resolve in [default: $MLFLOW_TRACKING_URI, "
             "else the project's sqlite:///<repo>/mlflow.db, where make demo registers]",
    )


def model_refs(config: pytest.Config) -> list[str] | None:
    """The ``--model-uri`` values in the order given, or ``None`` when this plugin is not loaded."""
    refs = config.getoption(DEST, default=None)
    return None if refs is None else [str(r) for r in refs]


def model_store(config: pytest.Config) -> str | None:
    """The ``--model-store`` value, or ``None`` when not given (or the plugin is not loaded)."""
    value = config.getoption(STORE_DEST, default=None)
    return None if value is None else str(value)
