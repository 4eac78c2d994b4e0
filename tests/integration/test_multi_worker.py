"""``distribution: multi_worker`` for real: two workers on loopback train one model in lock-step.

Two ``python -m pipelines.train --model density`` processes, each in its own "node" directory
(params, split, validation report) with its own ``TF_CONFIG`` (task 0 = chief, 1 = worker; two
free ports on 127.0.0.1), train a tiny classifier (32x32 phantoms, 2 epochs) under
``MultiWorkerMirroredStrategy``. Both must finish with identical weights (synchronous
all-reduce; each logs the digest), and only the chief may write the bundle and the MLflow run
(to a store both can reach); the worker's copy goes to a temporary directory it deletes.

The :func:`~breastscan.training.distribute.is_chief` cases at the top are quick and need no
TensorFlow.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from breastscan.training.distribute import is_chief

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300
"""Both processes together; a hung collective (a peer died) ends here, both killed."""
DIGEST = re.compile(r"final weights sha256 ([0-9a-f]{64})")
TINY = {"epochs": 2, "batch_size": 16, "patience": 0, "base_filters": 4, "dropout": 0.2,
        "imbalance": "class_weight", "distribution": "multi_worker",
        "preprocess": {"height": 32, "width": 32, "keep_aspect": True, "clahe": False, "unsharp": False}}


def _tf_config(ports: list[int], task_type: str, index: int, chief: bool = False) -> str:
    hosts = [f"127.0.0.1:{p}" for p in ports]
    cluster = {"chief": hosts[:1], "worker": hosts[1:]} if chief else {"worker": hosts}
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


# --------------------------------------------------------------------------- who is the chief


@pytest.mark.parametrize(("tf_config", "expected"), [
    (_tf_config([1, 2], "worker", 0), True),
    (_tf_config([1, 2], "worker", 1), False),
    (_tf_config([1, 2, 3], "chief", 0, chief=True), True),
    (_tf_config([1, 2, 3], "worker", 0, chief=True), False),  # a chief job exists: worker 0 is not it
    (json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "evaluator", "index": 0}}), False),
    (json.dumps({"task": {"type": "worker", "index": 3}}), True),  # no cluster: alone
])
def test_is_chief(tf_config: str, expected: bool) -> None:
    assert is_chief(tf_config) is expected
    assert is_chief(json.loads(tf_config)) is expected


def test_is_chief_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert is_chief() is True  # a process alone saves and logs
    monkeypatch.setenv("TF_CONFIG", _tf_config([1, 2], "worker", 1))
    assert is_chief() is False
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        is_chief()
    monkeypatch.setenv("TF_CONFIG", _tf_config([1, 2], "worker", 2))
    with pytest.raises(ValueError, match="task.index"):
        is_chief()


# --------------------------------------------------------------------------- two real workers


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _node(root: Path, name: str, params: dict[str, Any], splits: Path) -> Path:
    """One node's working directory: what the prepare and validate stages left there."""
    node = root / name
    (node / "artifacts" / "prepared" / "mammography").mkdir(parents=True)
    shutil.copy(splits, node / "artifacts" / "prepared" / "mammography" / "splits.csv")
    (node / "reports" / "validation").mkdir(parents=True)
    (node / "reports" / "validation" / "mammography.json").write_text('{"success": true}\n')
    (node / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return node


def _kill(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # its own process group: the worker and nothing else
    for proc in procs:
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster(tiny_phantoms: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the two workers once; their nodes, logs and the shared MLflow store."""
    from breastscan.config import DedupConfig, SplitConfig
    from breastscan.data.manifest import normalize_manifest, read_manifest
    from breastscan.data.splits import prepare_splits

    root = tmp_path_factory.mktemp("multi_worker")
    mammo = tiny_phantoms / "mammography"
    frame, _ = prepare_splits(normalize_manifest(read_manifest(mammo)), mammo,
                              labels=("density", "pathology"), stratify=("pathology",),
                              dedup=DedupConfig(max_hamming=10, min_correlation=0.9),
                              cfg=SplitConfig(seed=1, test_fraction=0.2, val_fraction=0.2))
    splits = root / "splits.csv"
    frame.to_csv(splits, index=False)

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["datasets"]["mammography"]["path"] = str(mammo)
    params["datasets"]["ultrasound"]["path"] = str(tiny_phantoms / "ultrasound")
    params["models"] = {"density": {**params["models"]["density"], **TINY}}
    nodes = [_node(root, f"node{i}", params, splits) for i in range(2)]

    store = f"sqlite:///{root / 'mlflow.db'}"  # on a cluster: a server the chief can reach
    ports = _free_ports(2)
    base = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "MLFLOW_REGISTRY_URI")}
    base.update({"CUDA_VISIBLE_DEVICES": "-1", "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": store,
                 "TF_CPP_MIN_LOG_LEVEL": "2", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
                 "GX_ANALYTICS_ENABLED": "false", "PYTHONUNBUFFERED": "1"})
    logs = [root / f"worker{i}.log" for i in range(2)]
    procs: list[subprocess.Popen[bytes]] = []
    start = time.monotonic()
    try:
        for i, node in enumerate(nodes):
            with open(logs[i], "wb") as out:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "pipelines.train", "--model", "density"], cwd=node,
                    env={**base, "TF_CONFIG": _tf_config(ports, "worker", i)},
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = start + TIMEOUT_S
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break  # one failed: the other would wait for it forever
            time.sleep(0.5)
    finally:
        _kill(procs)
    seconds = time.monotonic() - start
    texts = [log.read_text(errors="replace") for log in logs]
    codes = [p.returncode for p in procs]
    if codes != [0, 0]:
        tails = "\n".join(f"--- worker {i} (exit {codes[i]}):\n{texts[i][-4000:]}" for i in range(2))
        pytest.fail(f"multi-worker training failed after {seconds:.0f} s (exit codes {codes}):\n{tails}")
    return {"nodes": nodes, "logs": texts, "store": store, "seconds": seconds}


@pytest.mark.slow
def test_two_workers_train_in_sync(cluster: dict[str, Any]) -> None:
    """Both finish with the same weights, which are the ones the chief saved."""
    from breastscan.bundle import ModelBundle
    from breastscan.training.distribute import weights_digest

    digests = [DIGEST.findall(text) for text in cluster["logs"]]
    assert all(len(d) == 1 for d in digests), digests
    assert digests[0] == digests[1], f"the workers' weights differ: {digests}"
    for text in cluster["logs"]:
        assert "2 replica(s) in sync" in text and "Epoch 2/2" in text

    bundle = ModelBundle.load(cluster["nodes"][0] / "artifacts" / "models" / "density")
    assert weights_digest(bundle.model) == digests[0][0]


@pytest.mark.slow
def test_only_the_chief_saves_and_logs(cluster: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    chief, worker = (node / "artifacts" / "models" / "density" for node in cluster["nodes"])
    saved = {p.name for p in chief.iterdir()}
    assert {"model.keras", "contract.json", "preprocess.json", "run.json"} <= saved
    assert not worker.exists(), f"the worker wrote {sorted(p.name for p in worker.rglob('*'))}"
    scratch = re.search(r"its copy of the bundle in (\S+) is discarded", cluster["logs"][1])
    assert scratch and not Path(scratch.group(1)).exists(), "the worker's temporary copy was not deleted"
    assert "MLflow run" not in cluster["logs"][1]

    client = MlflowClient(tracking_uri=cluster["store"])
    experiment = client.get_experiment_by_name("breastscan-density")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, f"expected the chief's run only, got {len(runs)}"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert json.loads((chief / "run.json").read_text())["run_id"] == run.info.run_id
    assert run.data.params["model.distribution"] == "multi_worker"
    assert run.data.metrics["epochs_run"] == 2
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 2  # one per epoch, logged once
