"""A training stage SIGKILLed mid-way under ``dvc repro``: the next ``dvc repro`` recovers.

The killed stage's MLflow run cannot be ended by the dying process; the next start of the
stage finds its owner gone and ends it as KILLED, and trains again in a new run.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml

from breastscan.registry import tracking
from tests.pipelines.repo import env, make_repo, run

pytestmark = pytest.mark.slow

MODEL = "lesion"
STAGE = f"train@{MODEL}"
RUNNING = """
    SELECT r.run_uuid, t.value FROM runs r
    JOIN experiments e ON e.experiment_id = r.experiment_id
    JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = ?
    WHERE e.name = ? AND r.status = 'RUNNING'
"""


def _running_run(db: Path) -> tuple[str, int] | None:
    """The model's RUNNING run and its owner's pid, if any (the store is opened read only)."""
    if not db.is_file():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            row = con.execute(RUNNING, (tracking.TAG_OWNER_PID,
                                        tracking.experiment_name(MODEL))).fetchone()
    except sqlite3.Error:  # tables not created yet, or locked by the writer
        return None
    return (str(row[0]), int(row[1])) if row else None


def _wait_running(dvc: subprocess.Popen[bytes], db: Path, log: Path) -> tuple[str, int]:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if (found := _running_run(db)) is not None:
            return found
        if dvc.poll() is not None:
            raise AssertionError(f"dvc repro ended ({dvc.returncode}) first:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"no {STAGE} run started:\n{log.read_text()[-3000:]}")


def _train_process(dvc: subprocess.Popen[bytes], owner_pid: int) -> psutil.Process:
    """The run's owner, which must be a process under ``dvc repro`` (not the shell DVC may
    start it through: killing that would leave the trainer running as an orphan)."""
    for child in psutil.Process(dvc.pid).children(recursive=True):
        if child.pid == owner_pid:
            assert "pipelines.train" in " ".join(child.cmdline())
            return child
    raise AssertionError(f"the run's owner {owner_pid} is not a process under dvc repro")


def _kill_tree(dvc: subprocess.Popen[bytes]) -> None:
    """Kill ``dvc repro`` and everything under it (nothing may outlive the test)."""
    try:
        children = psutil.Process(dvc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for proc in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    if dvc.poll() is None:
        dvc.kill()
    dvc.wait(timeout=60)


def _set_epochs(root: Path, epochs: int, patience: int) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["models"][MODEL].update(epochs=epochs, patience=patience)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_sigkilled_train_stage_recovers_on_next_repro(tmp_path: Path, tiny_phantoms: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    make_repo(root, tiny_phantoms,
                     {"models": {MODEL: {"epochs": 1000, "patience": 1000}}})  # cannot end before the kill
    log = tmp_path / "killed_repro.log"
    with log.open("wb") as out:
        dvc = subprocess.Popen(["dvc", "repro", STAGE], cwd=root, env=env(), stdout=out,
                               stderr=subprocess.STDOUT)
        try:
            killed_run, owner_pid = _wait_running(dvc, root / "mlflow.db", log)
            train = _train_process(dvc, owner_pid)
            train.send_signal(signal.SIGKILL)
            assert dvc.wait(timeout=120) != 0
        finally:
            _kill_tree(dvc)

    _set_epochs(root, epochs=2, patience=0)
    run(["dvc", "repro", STAGE], root)

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(tracking.experiment_name(MODEL))
    assert experiment is not None
    runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id])}
    dead = runs.pop(killed_run)
    assert dead.info.status == "KILLED" and dead.info.end_time
    assert dead.data.tags[tracking.TAG_ENDED_BY] == (
        f"next start of {STAGE}: owner process {train.pid} is gone")
    assert [r.info.status for r in runs.values()] == ["FINISHED"]
    recorded = json.loads((root / "artifacts/models" / MODEL / "run.json").read_text())
    assert recorded["run_id"] in runs
