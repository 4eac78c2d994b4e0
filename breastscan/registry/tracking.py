"""MLflow tracking: where runs go, what every run records, and per-epoch logging from Keras.

Where runs go (:func:`tracking_uri`): ``$MLFLOW_TRACKING_URI`` when set (a remote
``mlflow server``, or any store MLflow understands), else a SQLite store in the project,
``sqlite:///<project>/mlflow.db``. With a local store (SQLite or file) each experiment is
created with its artifacts under ``<project>/mlartifacts/<experiment>`` so that nothing lands
in whatever directory the process happens to run from; with a remote server the server
decides (``mlflow server --artifacts-destination ...`` proxies artifacts as
``mlflow-artifacts:/``).

One experiment per model, ``breastscan-<model>`` (:func:`experiment_name`). Every run is
tagged with provenance and nothing personal (:func:`run_tags`): git commit and dirty flag,
the DVC hash of ``data/`` and optionally the ``dvc.lock`` hash of the prepared split.

MLflow and Keras are imported inside the functions that need them: importing this module
costs nothing, so the CLI stays fast. :class:`MlflowEpochLogger` is built on first access
(``tracking.MlflowEpochLogger``), which is when Keras is imported.

Runs that die: every run a stage opens (:func:`start_training_run`, :func:`resume_run`)
records its owner process (:func:`owner_tags`). SIGTERM and SIGINT end the stage's open
runs as KILLED before the process dies (:func:`install_signal_handlers`); an exception
ends them as FAILED (MLflow's ``ActiveRun``). A SIGKILL cannot be caught, so the next
stage that opens a run of the model closes every RUNNING run of the model's experiment
whose owner process is gone from this host as KILLED (:func:`close_dead_runs`).

Note: ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI`` to the process
environment (so subprocesses inherit it); after :func:`configure`, :func:`tracking_uri`
therefore returns the configured URI for any project root.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import os
import re
import signal
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from breastscan.jsonable import finite_float
from breastscan.provenance import dvc_data_hash, dvc_lock_hash, git_state

if TYPE_CHECKING:
    import mlflow

log = logging.getLogger(__name__)

EXPERIMENT_PREFIX = "breastscan-"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
MAX_PARAM_VALUE = 6000
"""Longest parameter value MLflow 3 stores (``MAX_PARAM_VAL_LENGTH``)."""

TAG_COMMIT = "breastscan.git_commit"
TAG_DIRTY = "breastscan.git_dirty"
TAG_DATA_HASH = "breastscan.data_hash"
TAG_SPLIT_HASH = "breastscan.split_md5"
TAG_SPLIT_PATH = "breastscan.split_path"
UNKNOWN = "unknown"

TAG_OWNER_HOST = "breastscan.owner.host"
"""Short hash of the host name of the process that has the run open (no machine names in runs)."""
TAG_OWNER_PID = "breastscan.owner.pid"
TAG_OWNER_STARTED = "breastscan.owner.started"
"""Start time of the owner process (seconds since the epoch): a reused pid is not the owner."""
TAG_OWNER_STAGE = "breastscan.owner.stage"
TAG_ENDED_BY = "breastscan.ended_by"
"""Why a run was ended as KILLED: a signal, or the next start of a stage that found it dead."""
TAG_REOPENED = "breastscan.reopened_after"
"""Set when a stage reopens a KILLED/FAILED run: its former status and ``ended_by``."""
START_TIME_TOLERANCE_S = 1.0
"""How far a live process's start time may be from the recorded one and still be the owner."""

_LOCAL_SCHEMES = ("sqlite", "file", "")
_METRIC_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /:]")


# --------------------------------------------------------------------------- where runs go


def tracking_uri(project_root: Path) -> str:
    """The tracking URI: ``$MLFLOW_TRACKING_URI`` if set, else the project's SQLite store.

    Args:
        project_root: the project directory (holds ``params.yaml``, ``dvc.yaml``).

    Returns:
        e.g. ``http://127.0.0.1:5000`` or ``sqlite:////abs/project/mlflow.db``.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    return f"sqlite:///{Path(project_root).resolve() / DB_FILE}"


def is_local_store(uri: str) -> bool:
    """True for stores on this machine (``sqlite:``, ``file:`` or a plain path)."""
    if uri.startswith("databricks"):
        return False
    scheme = uri.split(":", 1)[0].lower() if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri) else ""
    return scheme in _LOCAL_SCHEMES


def configure(project_root: Path) -> str:
    """Point MLflow's tracking and registry at :func:`tracking_uri` and return it.

    The registry always uses the tracking URI (MLflow's default outside Databricks).

    Args:
        project_root: the project directory.

    Returns:
        The tracking URI now in use.
    """
    import mlflow

    # Progress bars of artifact downloads flood the pipeline logs; a user's setting wins.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = tracking_uri(project_root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    log.debug("MLflow tracking and registry: %s", uri)
    return uri


def experiment_name(model: str) -> str:
    """``breastscan-<model>``: the experiment of one model."""
    return f"{EXPERIMENT_PREFIX}{model}"


def ensure_experiment(model: str, project_root: Path) -> str:
    """The id of the model's experiment, created if missing (restored if deleted).

    With a local store the experiment's artifact location is
    ``<project_root>/mlartifacts/<experiment>`` (a ``file://`` URI); with a remote server
    the server picks it. An existing experiment keeps the location it was created with.

    Args:
        model: model name in params.yaml.
        project_root: the project directory.

    Returns:
        The experiment id.
    """
    import mlflow
    from mlflow import MlflowClient

    name = experiment_name(model)
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            log.warning("experiment %s was deleted; restoring it", name)
            client.restore_experiment(exp.experiment_id)
        return str(exp.experiment_id)
    location = None
    if is_local_store(mlflow.get_tracking_uri()):
        artifacts = Path(project_root).resolve() / ARTIFACTS_DIR / name
        artifacts.mkdir(parents=True, exist_ok=True)
        location = artifacts.as_uri()
    experiment_id = client.create_experiment(name, artifact_location=location)
    log.info("created MLflow experiment %s (artifacts: %s)", name, location or "chosen by the server")
    return str(experiment_id)


# --------------------------------------------------------------------------- provenance


def run_tags(project_root: Path, *, split: str | Path | None = None) -> dict[str, str]:
    """Provenance tags of a run: code and data versions, nothing about people or machines.

    Args:
        project_root: the project directory (a git checkout with ``data.dvc``).
        split: optional prepared split artefact (e.g.
            ``artifacts/prepared/mammography/splits.csv``) whose ``dvc.lock`` hash to record.

    Returns:
        ``breastscan.git_commit`` (``"unknown"`` outside a git checkout),
        ``breastscan.git_dirty`` (``"true"``/``"false"``/``"unknown"``: tracked files
        modified), ``breastscan.data_hash`` (``data.dvc`` md5 or ``"unknown"``), MLflow's
        ``mlflow.source.git.commit`` when the commit is known, and with ``split``
        ``breastscan.split_path`` and ``breastscan.split_md5``.
    """
    root = Path(project_root).resolve()
    commit, dirty = git_state(root)
    tags = {
        TAG_COMMIT: commit or UNKNOWN,
        TAG_DIRTY: UNKNOWN if dirty is None else ("true" if dirty else "false"),
        TAG_DATA_HASH: dvc_data_hash(root) or UNKNOWN,
    }
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if split is not None:
        tags[TAG_SPLIT_PATH] = Path(split).as_posix()
        tags[TAG_SPLIT_HASH] = dvc_lock_hash(root, split) or UNKNOWN
    return tags


# --------------------------------------------------------------------------- params and metrics


def _param_text(value: Any) -> str:
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else list(value)
        text = json.dumps(items, default=str)
    elif isinstance(value, Mapping):  # only an empty mapping reaches here
        text = json.dumps(dict(value), default=str)
    else:
        text = str(value)
    if len(text) > MAX_PARAM_VALUE:
        text = text[: MAX_PARAM_VALUE - 3] + "..."
    return text


def flatten_params(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested mapping into MLflow parameters.

    ``{"model": {"preprocess": {"height": 128}}}`` becomes ``{"model.preprocess.height": "128"}``;
    sequences become JSON lists, values longer than 6000 characters are cut.

    Args:
        d: nested mapping (e.g. ``dataclasses.asdict(ModelConfig)``).
        prefix: key prefix (used in recursion).

    Returns:
        Flat ``{dotted key: text}``.
    """
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, name))
        else:
            out[name] = _param_text(value)
    return out


def numeric_items(d: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a nested mapping, as MLflow metrics.

    Nested mappings are flattened with dots (``per_class.benign.auc``); strings, lists,
    ``None``, booleans and non-finite values are skipped; characters MLflow rejects in a
    metric key become ``_``.

    Args:
        d: e.g. a metrics report or a Keras ``logs`` dict.
        prefix: key prefix (used in recursion).

    Returns:
        Flat ``{key: float}``.
    """
    out: dict[str, float] = {}
    for key, value in d.items():
        name = _METRIC_KEY_BAD.sub("_", f"{prefix}.{key}" if prefix else str(key))
        if isinstance(value, Mapping):
            out.update(numeric_items(value, name))
            continue
        number = _as_number(value)
        if number is not None:
            out[name] = number
    return out


def _as_number(value: Any) -> float | None:
    """A finite float of a Python/NumPy number or 0-d array/tensor; None for anything else."""
    if value is None or isinstance(value, (bool, str, bytes)):
        return None
    if getattr(getattr(value, "dtype", None), "kind", "") == "b":
        return None
    if not isinstance(value, numbers.Real) and getattr(value, "shape", None) != ():
        return None
    return finite_float(value)


# --------------------------------------------------------------------------- run owners


def host_id() -> str:
    """A short, stable hash of this machine's host name (runs carry no machine names)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:16]


def _process_start_time(pid: int) -> float | None:
    """Start time (seconds since the epoch) of a live process; None when it is gone or a
    zombie; NaN when it exists but may not be inspected (no mismatch can be shown: alive)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return float(proc.create_time())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        return math.nan


def owner_tags(stage: str) -> dict[str, str]:
    """Tags naming this process as the owner of a run, so that a later start can tell it died.

    Args:
        stage: the DVC stage, e.g. ``train@tumor``.

    Returns:
        ``breastscan.owner.host`` (:func:`host_id`), ``breastscan.owner.pid``,
        ``breastscan.owner.started`` (process start time) and ``breastscan.owner.stage``.
    """
    pid = os.getpid()
    started = _process_start_time(pid)
    return {TAG_OWNER_HOST: host_id(), TAG_OWNER_PID: str(pid),
            TAG_OWNER_STARTED: UNKNOWN if started is None else f"{started:.2f}",
            TAG_OWNER_STAGE: stage}


def owner_gone(tags: Mapping[str, str]) -> str | None:
    """Why the owner of a run with these tags is dead, or None when it may be alive.

    Only owners on this host can be checked: the owner is gone when no process has its pid,
    or the process with that pid started at another time (the pid was reused). Runs without
    owner tags, or owned by another host, count as alive.

    Args:
        tags: the run's tags.

    Returns:
        e.g. ``"owner process 1234 is gone"``, or None.
    """
    if tags.get(TAG_OWNER_HOST) != host_id() or not str(tags.get(TAG_OWNER_PID, "")).isdigit():
        return None
    pid = int(tags[TAG_OWNER_PID])
    started = _process_start_time(pid)
    if started is None:
        return f"owner process {pid} is gone"
    try:
        recorded = float(tags.get(TAG_OWNER_STARTED, ""))
    except ValueError:
        return None
    if abs(started - recorded) > START_TIME_TOLERANCE_S:  # False for NaN: maybe alive
        return f"owner process {pid} is gone (pid reused by a process started at {started:.0f})"
    return None


def close_dead_runs(experiment_id: str, *, by: str) -> list[str]:
    """End as KILLED the RUNNING runs of an experiment whose owner process died on this host.

    A run left RUNNING by a process that was SIGKILLed (or lost its machine) would otherwise
    stay RUNNING forever. Each closed run gets ``breastscan.ended_by``. Runs owned by other
    hosts, or without owner tags, are left alone and logged.

    Args:
        experiment_id: the experiment to look in (one model's).
        by: who is looking, e.g. ``train@tumor`` (goes into ``breastscan.ended_by``).

    Returns:
        The ids of the runs closed.
    """
    from mlflow import MlflowClient

    client, host = MlflowClient(), host_id()
    running = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                                 max_results=1000)
    closed, foreign = [], 0
    for run in running:
        reason = owner_gone(run.data.tags)
        if reason is None:
            if run.data.tags.get(TAG_OWNER_HOST) != host:
                foreign += 1
            continue
        _close_dead_run(client, run.info.run_id, f"next start of {by}: {reason}")
        closed.append(run.info.run_id)
    if foreign:
        log.info("%d RUNNING run(s) in experiment %s are not owned by a process on this host "
                 "(or record no owner); left alone", foreign, experiment_id)
    return closed


def _close_dead_runs_quietly(experiment_id: str, by: str) -> None:
    """:func:`close_dead_runs`, whose failure never stops the stage that calls it."""
    try:
        close_dead_runs(experiment_id, by=by)
    except Exception as exc:  # housekeeping: the next start tries again
        log.warning("could not look for dead runs in experiment %s (%s: %s)", experiment_id,
                    type(exc).__name__, exc)


def _close_dead_run(client: Any, run_id: str, why: str) -> None:
    client.set_tag(run_id, TAG_ENDED_BY, why)
    client.set_terminated(run_id, "KILLED")
    log.warning("MLflow run %s was left RUNNING; ended it as KILLED (%s)", run_id, why)


# --------------------------------------------------------------------------- signals

_HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_previous_handlers: dict[int, Any] = {}
_handler_pid: int | None = None
"""The process that installed the handlers: a forked child must not end its parent's runs."""
_ending = False


def install_signal_handlers() -> None:
    """On SIGTERM or SIGINT, end this process's open MLflow runs as KILLED, then die as before.

    After the runs are ended the signal gets its previous handling: SIGINT raises
    ``KeyboardInterrupt``, SIGTERM terminates the process (exit status 143 in a shell).
    A signal this process ignores stays ignored. Calling it again changes nothing; outside
    the main thread (where Python cannot set handlers) it does nothing.
    """
    global _handler_pid
    if threading.current_thread() is not threading.main_thread():
        return
    _handler_pid = os.getpid()
    for sig in _HANDLED_SIGNALS:
        current = signal.getsignal(sig)
        if current is _on_signal or current in (signal.SIG_IGN, None):
            continue
        _previous_handlers[sig] = current
        signal.signal(sig, _on_signal)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _ending
    if not _ending and os.getpid() == _handler_pid:
        _ending = True
        try:
            end_active_runs("KILLED", why=f"signal {signal.Signals(signum).name} to process {os.getpid()}")
        finally:
            _ending = False
    previous = _previous_handlers.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
        return
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def end_active_runs(status: str, *, why: str) -> list[str]:
    """End every run open in this process (MLflow's active-run stack) with ``status``.

    Never raises: a tracking store that cannot be reached is logged, and the next start of a
    stage closes the run instead (:func:`close_dead_runs`).

    Args:
        status: ``KILLED`` or ``FAILED``.
        why: goes into the ``breastscan.ended_by`` tag.

    Returns:
        The ids of the runs ended.
    """
    import mlflow

    ended: list[str] = []
    while (active := mlflow.active_run()) is not None:
        run_id = active.info.run_id
        try:
            mlflow.set_tag(TAG_ENDED_BY, why)
            mlflow.end_run(status=status)
        except Exception as exc:  # dying anyway: the next start closes the run
            log.warning("could not end MLflow run %s as %s (%s: %s)", run_id, status, type(exc).__name__, exc)
            return ended
        ended.append(run_id)
        log.warning("MLflow run %s ended as %s: %s", run_id, status, why)
    return ended


# --------------------------------------------------------------------------- runs


def start_training_run(model: str, project_root: Path, *, params: Mapping[str, Any],
                       tags: Mapping[str, str], run_name: str | None = None,
                       stage: str = "train") -> mlflow.ActiveRun:
    """Start a run in the model's experiment and log its parameters.

    Use as a context manager: ``with start_training_run(...) as run:``. First closes the
    runs of the experiment that dead processes of this host left RUNNING
    (:func:`close_dead_runs`); the new run records this process as its owner
    (:func:`owner_tags`) and a SIGTERM/SIGINT ends it as KILLED (:func:`install_signal_handlers`).

    Args:
        model: model name in params.yaml.
        project_root: the project directory.
        params: flat parameters (see :func:`flatten_params`); values are logged as text.
        tags: run tags (e.g. :func:`run_tags` plus ``breastscan.model``).
        run_name: optional display name (MLflow invents one otherwise).
        stage: the stage starting the run (``train``, ``evaluate``...), for the owner tags.

    Returns:
        The active run.
    """
    import mlflow

    configure(project_root)
    experiment_id = ensure_experiment(model, project_root)
    label = f"{stage}@{model}"
    _close_dead_runs_quietly(experiment_id, label)
    install_signal_handlers()
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name,
                           tags={**{k: str(v) for k, v in tags.items()}, **owner_tags(label)})
    try:
        if params:
            mlflow.log_params({k: _param_text(v) for k, v in params.items()})
    except Exception:
        mlflow.end_run(status="FAILED")
        raise
    log.info("MLflow run %s in experiment %s (%s)", run.info.run_id, experiment_name(model),
             mlflow.get_tracking_uri())
    return run


def resume_run(run_id: str, *, stage: str = "resume") -> mlflow.ActiveRun:
    """Reopen an existing run (evaluate and register add to the training run).

    Like :func:`start_training_run`, first closes the runs of the run's experiment that dead
    processes of this host left RUNNING, then makes this process the run's owner and ends
    the run as KILLED on SIGTERM/SIGINT. A run that was ended as KILLED or FAILED (a stage
    died while it had the run open) is reopened: its former status and ``ended_by`` go
    into ``breastscan.reopened_after``.

    Args:
        run_id: id of a run in the configured tracking store.
        stage: the stage reopening the run (``evaluate``, ``register``), for the owner tags.

    Returns:
        The active run (use as a context manager).
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import RunTag

    client = MlflowClient()
    before = client.get_run(run_id)
    label = f"{stage}@{before.data.tags.get('breastscan.model', before.info.experiment_id)}"
    _close_dead_runs_quietly(before.info.experiment_id, label)
    status = client.get_run(run_id).info.status
    install_signal_handlers()
    # Owner first, then RUNNING: a run never shows RUNNING under the dead owner's tags.
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in owner_tags(label).items()])
    run = mlflow.start_run(run_id=run_id)
    if status in ("KILLED", "FAILED"):
        _note_reopened(client, run_id, status, label)
    return run


def _note_reopened(client: Any, run_id: str, status: str, label: str) -> None:
    ended_by = client.get_run(run_id).data.tags.get(TAG_ENDED_BY)
    client.set_tag(run_id, TAG_REOPENED, f"{status}: {ended_by}" if ended_by else status)
    if ended_by:
        client.delete_tag(run_id, TAG_ENDED_BY)
    log.warning("%s reopens MLflow run %s, which had ended as %s", label, run_id, status)


def run_exists(run_id: str | None) -> bool:
    """True when ``run_id`` is a live (not deleted) run in the configured tracking store."""
    if not run_id:
        return False
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException:
        return False
    return run.info.lifecycle_stage != "deleted"


# --------------------------------------------------------------------------- Keras callback


def _make_epoch_logger() -> type:
    import keras
    import mlflow

    class MlflowEpochLogger(keras.callbacks.Callback):
        """Keras callback: log each epoch's ``logs`` as MLflow metrics at ``step=epoch``.

        Logs into the run ``run_id``, or the active run. A failing tracking server never
        stops training: the error is logged as a warning and the epoch's metrics are lost.

        Args:
            run_id: run to log into (default: the active run at each epoch end).
            prefix: optional metric-name prefix (e.g. ``"fold1."``).
        """

        def __init__(self, run_id: str | None = None, prefix: str = "") -> None:
            super().__init__()
            self.run_id = run_id
            self.prefix = prefix
            self.failures = 0
            self._warned_no_run = False

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            metrics = {f"{self.prefix}{k}": v for k, v in numeric_items(logs or {}).items()}
            if not metrics:
                return
            run_id = self.run_id
            if run_id is None:
                active = mlflow.active_run()
                if active is None:
                    if not self._warned_no_run:
                        log.warning("MlflowEpochLogger: no active MLflow run; epoch metrics are not logged")
                        self._warned_no_run = True
                    return
                run_id = active.info.run_id
            try:
                mlflow.log_metrics(metrics, step=int(epoch), run_id=run_id)
            except Exception as exc:  # a tracking hiccup must not kill hours of training
                self.failures += 1
                log.warning("MLflow: could not log metrics of epoch %d (%s: %s); training goes on",
                            epoch, type(exc).__name__, exc)

    MlflowEpochLogger.__module__ = __name__
    MlflowEpochLogger.__qualname__ = "MlflowEpochLogger"
    return MlflowEpochLogger


def __getattr__(name: str) -> Any:
    # PEP 562: build the Keras callback class on first use, so importing this module
    # does not import Keras/TensorFlow.
    if name == "MlflowEpochLogger":
        cls = _make_epoch_logger()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
