"""The registered pyfunc works in any MLflow client: a fresh venv holding only the logged
model's ``requirements.txt`` (no breastscan installed) loads ``models:/<name>/1`` with
``mlflow.pyfunc.load_model`` and predicts what :func:`breastscan.registry.resolver.load_bundle`
predicts in the project; ``mlflow models serve --env-manager local`` from that venv answers
``/invocations`` the same.

The venv is made with ``uv`` from its cache (``--offline`` first; online when a wheel is
missing). Run with ``pytest --slow``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import yaml

from breastscan.registry import resolver, tracking, versions
from tests.conftest import sqlite_mlflow
from tests.unit.test_registry import GOOD, make_bundle, make_cfg

pytestmark = pytest.mark.slow

ATOL = 1e-5
NOT_NEEDED = ("bentoml", "dvc", "great_expectations")
"""Project dependencies the model must not need (nor find in the fresh venv)."""

# Runs in the fresh venv: argv = model URI, batch .npy, output .npy, then the NOT_NEEDED
# modules; prints a JSON report.
LOAD_AND_PREDICT = """\
import importlib.util, json, sys

import numpy as np

report = {"breastscan_before": importlib.util.find_spec("breastscan") is not None,
          "not_installed": [m for m in sys.argv[4:] if importlib.util.find_spec(m) is None]}
import mlflow

model = mlflow.pyfunc.load_model(sys.argv[1])
np.save(sys.argv[3], np.asarray(model.predict(np.load(sys.argv[2]))))
import breastscan

report["breastscan_file"] = breastscan.__file__
report["loaded"] = sorted(m for m in sys.argv[4:] if m in sys.modules)
print("REPORT " + json.dumps(report))
"""


def _uv() -> str:
    here = Path(sys.executable).parent / "uv"
    found = str(here) if here.is_file() else shutil.which("uv")
    if not found:
        pytest.skip("uv not found beside the interpreter nor on PATH")
    return found


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything pointing at the project's venv or code.

    ``PYTHONDONTWRITEBYTECODE`` goes too: the first process in the throwaway venv compiles
    what it imports (TensorFlow: ~20 s of CPU) and the next one reuses it.
    """
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env


def _make_venv(venv: Path, requirements: Path, workdir: Path) -> dict[str, Any]:
    """``uv venv`` + ``uv pip install -r requirements.txt`` (offline first); timings."""
    uv = _uv()
    base_python = getattr(sys, "_base_executable", None) or sys.executable
    env = _clean_env(UV_NO_PROGRESS="1")
    started = time.monotonic()
    subprocess.run([uv, "venv", "--python", base_python, str(venv)], cwd=workdir, env=env,
                   check=True, capture_output=True, text=True, timeout=120)
    python = venv / "bin" / "python"
    install = [uv, "pip", "install", "--python", str(python), "-r", str(requirements)]
    offline = subprocess.run([*install, "--offline"], cwd=workdir, env=env, capture_output=True,
                             text=True, timeout=600)
    mode = "offline"
    if offline.returncode != 0:  # a wheel not in the cache: the registries are reachable
        mode = "online"
        online = subprocess.run(install, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
        assert online.returncode == 0, f"uv pip install failed:\n{offline.stderr}\n{online.stderr}"
    return {"python": python, "mode": mode, "install_s": time.monotonic() - started}


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A registered tiny model, its expected probabilities, and a fresh venv made from its
    ``requirements.txt`` alone (the store stays configured for the module)."""
    root = tmp_path_factory.mktemp("anywhere")
    bundle_dir = make_bundle(root / "bundle")
    cfg = make_cfg("anywhere")
    with sqlite_mlflow(root):
        with tracking.start_training_run("tiny", root, params={"a": "1"}, tags={}) as run:
            logged = versions.log_bundle(bundle_dir)
        version = versions.register(cfg, logged, metrics=GOOD, split_id="s", run_id=run.info.run_id,
                                    alias=versions.PRODUCTION)
        model_uri = f"models:/{cfg.registered_name}/{version}"
        model_dir = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(root / "model")))
        batch = np.random.default_rng(0).random((4, 32, 32, 1), dtype=np.float32)
        np.save(root / "batch.npy", batch)
        expected = resolver.load_bundle(f"models:/{cfg.registered_name}@production").predict(batch)
        venv = _make_venv(root / "venv", model_dir / "requirements.txt", root)
        yield {"root": root, "model_uri": model_uri, "model_dir": model_dir, "batch": batch,
               "expected": expected, "venv": venv, "tracking_uri": os.environ["MLFLOW_TRACKING_URI"]}


def test_logged_model_declares_code_and_requirements(fresh: dict[str, Any]) -> None:
    model_dir: Path = fresh["model_dir"]
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    assert pyfunc["code"] == "code"
    assert (model_dir / "code" / "breastscan" / "registry" / "versions.py").is_file()
    assert not any((model_dir / "code").rglob("__pycache__"))
    reqs = (model_dir / "requirements.txt").read_text().split()
    names = {r.split("==")[0] for r in reqs}
    assert {"mlflow", "keras", "numpy", "opencv-python-headless", "pydicom", "pyyaml", "pandas",
            "scipy", "cloudpickle"} <= names
    assert names & {"tensorflow", "tensorflow-cpu"}
    assert all("==" in r for r in reqs), reqs  # every requirement pinned
    assert not names & {"breastscan", "bentoml", "dvc", "great-expectations"}


def test_pyfunc_loads_and_predicts_in_fresh_venv(fresh: dict[str, Any]) -> None:
    root: Path = fresh["root"]
    python: Path = fresh["venv"]["python"]
    script = root / "load_and_predict.py"
    script.write_text(LOAD_AND_PREDICT)
    out = root / "pred.npy"
    started = time.monotonic()
    proc = subprocess.run(
        [str(python), str(script), fresh["model_uri"], str(root / "batch.npy"), str(out), *NOT_NEEDED],
        cwd=root, env=_clean_env(MLFLOW_TRACKING_URI=fresh["tracking_uri"]),
        capture_output=True, text=True, timeout=300)
    predict_s = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-6000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT "))
    report = json.loads(line[len("REPORT "):])
    print(f"fresh venv ({fresh['venv']['mode']}): install {fresh['venv']['install_s']:.1f}s, "
          f"load+predict {predict_s:.1f}s")

    # the venv does not have breastscan: the model's own code/ is what got imported
    assert report["breastscan_before"] is False
    assert Path(report["breastscan_file"]).parts[-3:] == ("code", "breastscan", "__init__.py")
    assert sorted(report["not_installed"]) == sorted(NOT_NEEDED) and report["loaded"] == []

    got = np.load(out)
    assert got.shape == (4, 3)
    assert np.allclose(got, fresh["expected"], atol=ATOL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.service
def test_models_serve_from_fresh_venv(fresh: dict[str, Any]) -> None:
    """``mlflow models serve --env-manager local`` in the fresh venv answers one request."""
    root: Path = fresh["root"]
    venv_bin = Path(fresh["venv"]["python"]).parent
    port = _free_port()
    env = _clean_env(MLFLOW_TRACKING_URI=fresh["tracking_uri"],
                     PATH=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}")
    log_path = root / "serve.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [str(venv_bin / "mlflow"), "models", "serve", "-m", fresh["model_uri"], "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
            cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log_path.read_text()[-6000:]
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, "server not up in 120 s:\n" + log_path.read_text()[-6000:]
            time.sleep(0.5)
        body = json.dumps({"inputs": fresh["batch"].tolist()}).encode()
        request = urllib.request.Request(f"{url}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            payload = json.loads(resp.read())
        got = np.asarray(payload["predictions"], dtype=np.float32)
        assert got.shape == (4, 3)
        assert np.allclose(got, fresh["expected"], atol=ATOL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
