"""Runs of stages that die: SIGTERM/SIGINT end them KILLED, an exception FAILED, and after a
SIGKILL the next start of a stage closes the dead owner's run (breastscan.registry.tracking).

Owner processes are tiny Python subprocesses (MLflow only, no TensorFlow) on a real SQLite
store in ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import mlflow
import psutil
import pytest
from mlflow import MlflowClient

from breastscan.registry import tracking
from tests.conftest import REPO

MODEL = "m"

OWNER_SCRIPT = textwrap.dedent("""
    import signal, sys, time
    from pathlib import Path
    from breastscan.registry import tracking

    # A shell's background job starts with SIGINT ignored; a stage under dvc does not.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    project, run_id = Path(sys.argv[1]), sys.argv[2]
    if run_id == "new":
        run = tracking.start_training_run("m", project, params={}, tags={"breastscan.model": "m"})
    else:
        tracking.configure(project)
        run = tracking.resume_run(run_id, stage="evaluate")
    print(run.info.run_id, flush=True)
    time.sleep(120)
""")


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite store with its schema made (once: it takes seconds), and no runs."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    root = tmp_path_factory.mktemp("store")
    SqlAlchemyStore(f"sqlite:///{root / tracking.DB_FILE}", str(root / "artifacts"))
    return root / tracking.DB_FILE


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_store: Path) -> Iterator[Path]:
    """A project root whose SQLite store (a copy of ``empty_store``) holds the model's experiment."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(empty_store, root / tracking.DB_FILE)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    tracking.configure(root)
    tracking.ensure_experiment(MODEL, root)  # created here, not raced by two processes
    yield root
    if mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    mlflow.set_registry_uri(None)  # type: ignore[arg-type]


class Owner:
    """A subprocess holding an MLflow run open (a new one, or ``resume`` of a given one)."""

    def __init__(self, project: Path, resume: str | None = None) -> None:
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(project),
               "MLFLOW_DISABLE_TELEMETRY": "true"}
        self.proc = subprocess.Popen([sys.executable, "-c", OWNER_SCRIPT, str(project), resume or "new"],
                                     cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.run_id = self.proc.stdout.readline().strip()
        assert self.run_id, f"owner exited with {self.proc.wait(timeout=60)} before starting a run"

    def kill(self, sig: int) -> int:
        """Send ``sig`` and return the exit status."""
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=60)


@pytest.fixture
def owners(project: Path) -> Iterator[list[Owner]]:
    started: list[Owner] = []
    yield started
    for owner in started:
        owner.stop()


def _start_owner(owners: list[Owner], project: Path, resume: str | None = None) -> Owner:
    owner = Owner(project, resume)
    owners.append(owner)
    return owner


def _run(run_id: str) -> mlflow.entities.Run:
    return MlflowClient().get_run(run_id)


def test_sigkilled_owner_run_is_killed_on_next_start(project: Path, owners: list[Owner]) -> None:
    owner = _start_owner(owners, project)
    assert owner.kill(signal.SIGKILL) == -signal.SIGKILL
    assert _run(owner.run_id).info.status == "RUNNING"  # nothing could end it
    with tracking.start_training_run(MODEL, project, params={}, tags={}) as run:
        pass
    dead = _run(owner.run_id)
    assert dead.info.status == "KILLED" and dead.info.end_time
    assert dead.data.tags[tracking.TAG_ENDED_BY] == (
        f"next start of train@m: owner process {owner.proc.pid} is gone")
    assert _run(run.info.run_id).info.status == "FINISHED"


def test_live_owner_run_is_left_alone(project: Path, owners: list[Owner]) -> None:
    owner = _start_owner(owners, project)
    with tracking.start_training_run(MODEL, project, params={}, tags={}):
        pass
    live = _run(owner.run_id)
    assert live.info.status == "RUNNING"
    assert live.data.tags[tracking.TAG_OWNER_PID] == str(owner.proc.pid)
    assert live.data.tags[tracking.TAG_OWNER_STAGE] == "train@m"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_ends_run_killed(project: Path, owners: list[Owner], sig: signal.Signals) -> None:
    owner = _start_owner(owners, project)
    assert owner.kill(sig) == -sig  # dies of the signal, as a shell expects
    run = _run(owner.run_id)
    assert run.info.status == "KILLED" and run.info.end_time
    assert run.data.tags[tracking.TAG_ENDED_BY] == f"signal {sig.name} to process {owner.proc.pid}"


def test_exception_ends_run_failed(project: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), \
            tracking.start_training_run(MODEL, project, params={}, tags={}) as run:
        raise RuntimeError("boom")
    assert _run(run.info.run_id).info.status == "FAILED"
    assert mlflow.active_run() is None


def test_owner_checks_reused_pid_other_host_and_untagged(project: Path) -> None:
    client = MlflowClient()
    experiment_id = tracking.ensure_experiment(MODEL, project)
    me = tracking.owner_tags("train@m")
    reused = {**me, tracking.TAG_OWNER_STARTED: f"{psutil.Process().create_time() - 1000:.2f}"}
    other_host = {**me, tracking.TAG_OWNER_HOST: "0" * 16, tracking.TAG_OWNER_PID: str(2**22 + 1)}
    runs = {name: client.create_run(experiment_id, tags=tags).info.run_id
            for name, tags in {"me": me, "reused": reused, "other_host": other_host, "untagged": {}}.items()}
    closed = tracking.close_dead_runs(experiment_id, by="train@m")
    assert closed == [runs["reused"]]
    assert "pid reused" in _run(runs["reused"]).data.tags[tracking.TAG_ENDED_BY]
    assert {name: _run(r).info.status for name, r in runs.items()} == {
        "me": "RUNNING", "reused": "KILLED", "other_host": "RUNNING", "untagged": "RUNNING"}


def test_stage_resuming_a_run_its_dead_predecessor_left_open(project: Path, owners: list[Owner],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """evaluate is SIGKILLed with the training run open; the next evaluate closes and reopens it."""
    from breastscan.registry.runs import RUN_FILE, model_run

    with tracking.start_training_run(MODEL, project, params={}, tags={"breastscan.model": MODEL}) as run:
        run_id = run.info.run_id
    bundle = project / "bundle"
    bundle.mkdir()
    (bundle / RUN_FILE).write_text(json.dumps({"run_id": run_id}))
    evaluate = _start_owner(owners, project, resume=run_id)
    assert evaluate.kill(signal.SIGKILL) == -signal.SIGKILL
    assert _run(run_id).info.status == "RUNNING"

    monkeypatch.chdir(project)
    with model_run(MODEL, bundle, stage="evaluate") as again:
        assert again.info.run_id == run_id
        mlflow.log_metric("test_accuracy", 0.5)
    done = _run(run_id)
    assert done.info.status == "FINISHED" and done.data.metrics["test_accuracy"] == 0.5
    assert done.data.tags[tracking.TAG_REOPENED] == (
        f"KILLED: next start of evaluate@m: owner process {evaluate.proc.pid} is gone")
    assert tracking.TAG_ENDED_BY not in done.data.tags
    assert done.data.tags[tracking.TAG_OWNER_PID] == str(os.getpid())


def test_resume_of_failed_run_starts_cleanly(project: Path) -> None:
    with pytest.raises(ValueError), \
            tracking.start_training_run(MODEL, project, params={}, tags={}) as run:
        raise ValueError
    with tracking.resume_run(run.info.run_id, stage="register"):
        mlflow.set_tag("breastscan.register", "done")
    done = _run(run.info.run_id)
    assert done.info.status == "FINISHED"
    assert done.data.tags[tracking.TAG_REOPENED] == "FAILED"
