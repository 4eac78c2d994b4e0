"""``breastscan import-models``: the registry's production versions into the BentoML store, once."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.services.conftest import BIN, REPO
from tests.services.make_registry import MODELS

pytestmark = [pytest.mark.slow, pytest.mark.service]


def _import(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "breastscan"), "import-models", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_again_reuses_the_stored_models(served_project: tuple[Path, dict[str, str]]) -> None:
    _, env = served_project
    again = _import(env, *MODELS)  # the test registry's models (params.yaml declares three)
    assert again.returncode == 0, again.stderr[-3000:]
    tags = dict(line.split(": ", 1) for line in again.stdout.splitlines())
    assert sorted(tags) == sorted(MODELS) == ["density", "lesion", "mammo_lesion", "tumor", "us_mt"]
    assert again.stderr.count("is already the newest in the BentoML store") == len(MODELS)


def test_a_missing_stage_is_a_clear_error(served_project: tuple[Path, dict[str, str]]) -> None:
    _, env = served_project
    missing = _import(env, "tumor", "--stage", "champion")  # no such alias: nothing imported
    assert missing.returncode == 1
    assert "breastscan-tumor has no version with alias @champion" in missing.stderr
    assert "make demo" in missing.stderr
