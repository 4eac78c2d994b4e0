"""``breastscan build`` packs the service, the library and the production models into a Bento
that serves on its own: HTTP, gRPC and the UI, with nothing fetched at start.

It is served from a fresh venv holding only what the Bento declares (its
``env/python/requirements.txt``, installed as its Dockerfile does; with ``uv`` from its
cache, ``--offline`` first), without breastscan: a package the service imports but ``services/bentofile.yaml``
does not declare fails here as it would in the container, not only in production.
``tests/unit/test_bento_requirements.py`` is the cheap guard of the same.

Every packed model carries a checked ONNX export, so the Bento is built without TensorFlow
and Keras (``breastscan.serving.bento``): neither is importable in its venv, every model
answers on ONNX Runtime, and a Grad-CAM request is answered ``501 explain_unavailable``.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from breastscan.serving.client import GRPCClient
from load_tests.harness import launch_service
from tests.services import images
from tests.services.conftest import BIN, REPO, START_TIMEOUT_S, Served, stop_service
from tests.services.make_registry import MODELS

pytestmark = [pytest.mark.slow, pytest.mark.service]


# A newer tumor model imported after the build: the Bento must go on serving its own.
NEWER_IMPORT = """
import shutil, bentoml
old = bentoml.models.get("breastscan-tumor:latest")
labels = {**old.info.labels, "registry_version": "99"}
with bentoml.models.create("breastscan-tumor", labels=labels, metadata=dict(old.info.metadata)) as m:
    shutil.copytree(old.path, m.path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model.yaml"))
"""

# Runs in the fresh venv: breastscan (the Bento's src/ is the code) and the project-only
# packages must not be importable there.
NOT_THERE = """
import importlib.util, json
print(json.dumps({m: importlib.util.find_spec(m) is not None
                  for m in ("breastscan", "mlflow", "dvc", "tensorflow", "keras")}))
"""


def _uv() -> str:
    here = BIN / "uv"
    found = str(here) if here.is_file() else shutil.which("uv")
    if not found:
        pytest.skip("uv not found beside the interpreter nor on PATH")
    return found


def _clean_env(env: dict[str, str], venv: Path) -> dict[str, str]:
    """``env`` without anything pointing at the project's venv or code, the venv's bin first."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PYTHONDONTWRITEBYTECODE")
    clean = {k: v for k, v in env.items() if k not in drop}
    clean["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return clean


def bento_venv(bento: Path, venv: Path) -> dict[str, Any]:
    """A venv with the Bento's Python packages and nothing else, as its Dockerfile makes it
    (``uv venv --python <image.python_version>``, then ``uv pip install -r
    env/python/requirements.txt`` in ``src/``), from this interpreter; ``--offline`` first."""
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    wanted = str(info["image"]["python_version"])
    assert platform.python_version().startswith(f"{wanted}."), f"the Bento wants Python {wanted}"
    uv = _uv()
    env = _clean_env(dict(os.environ), venv) | {"UV_NO_PROGRESS": "1"}
    started = time.monotonic()
    base_python = getattr(sys, "_base_executable", None) or sys.executable
    subprocess.run([uv, "venv", "--python", base_python, str(venv)], cwd=bento, env=env, check=True,
                   capture_output=True, text=True, timeout=120)
    python = venv / "bin" / "python"
    install = [uv, "pip", "install", "--python", str(python), "-r",
               str(bento / "env" / "python" / "requirements.txt")]
    offline = subprocess.run([*install, "--offline"], cwd=bento / "src", env=env, capture_output=True,
                             text=True, timeout=600)
    mode = "offline"
    if offline.returncode != 0:  # a wheel not in the cache: the registries are reachable
        mode = "online"
        online = subprocess.run(install, cwd=bento / "src", env=env, capture_output=True, text=True,
                                timeout=900)
        assert online.returncode == 0, f"uv pip install failed:\n{offline.stderr}\n{online.stderr}"
    return {"python": python, "mode": mode, "install_s": time.monotonic() - started}


def _mib(path: Path) -> float:
    """Bytes of the files under ``path``, in MiB."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20


def serve_bento(venv: Path, tag: str, root: Path, env: dict[str, str], log_name: str) -> Served:
    """``<venv>/bin/bentoml serve <tag>`` on free loopback ports, in ``root`` (no code there),
    ready for HTTP and gRPC (:func:`load_tests.harness.wait_until_serving`)."""
    launched = launch_service(_clean_env(env, venv), root / log_name, target=tag, cwd=root,
                              python=venv / "bin" / "python", timeout_s=START_TIMEOUT_S)
    return Served(launched, root)


def test_build_then_serve_the_bento(served_project: tuple[Path, dict[str, str]],
                                    tmp_path: Path) -> None:
    shared_root, shared_env = served_project
    root = tmp_path  # its own BentoML store: the newer import below must not reach other tests
    shutil.copytree(shared_root / "bentoml", root / "bentoml")
    env = {**shared_env, "BENTOML_HOME": str(root / "bentoml")}
    done = subprocess.run([str(BIN / "breastscan"), "build", "--version", "test1"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    bento = Path(env["BENTOML_HOME"]) / "bentos" / "breastscan" / "test1"
    src = bento / "src"
    for packed in ("services/service.py", "services/serving.yaml", "breastscan/serving/engine.py",
                   "breastscan/serving/ui/static/index.html",
                   "breastscan/serving/proto/breastscan/v1/breastscan.proto"):
        assert (src / packed).is_file(), packed
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    pinned = {m["tag"].split(":")[0]: m["tag"] for svc in info["services"] for m in svc["models"]}
    assert set(pinned) == {f"breastscan-{name}" for name in MODELS}
    newer = subprocess.run([sys.executable, "-c", NEWER_IMPORT], env=env, capture_output=True, text=True,
                           timeout=120)
    assert newer.returncode == 0, newer.stderr[-3000:]
    listed = subprocess.run([sys.executable, "-m", "bentoml", "list", "-o", "json"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert "breastscan:test1" in listed.stdout

    # The Bento serves from its own copy of the code and models, in another directory, with
    # only the packages it declares.
    venv = bento_venv(bento, root / "venv")
    print(f"Bento venv ({venv['mode']}): created and installed in {venv['install_s']:.1f} s")
    there = subprocess.run([str(venv["python"]), "-c", NOT_THERE], cwd=root,
                           env=_clean_env(env, root / "venv"), capture_output=True, text=True, timeout=60)
    assert there.returncode == 0, there.stderr[-3000:]
    # every packed model carries a checked export: the Bento leaves TensorFlow out
    assert yaml.safe_load(there.stdout) == {"breastscan": False, "mlflow": False, "dvc": False,
                                            "tensorflow": False, "keras": False}
    assert "Bento runtime: onnx" in done.stdout
    print(f"Bento venv: {_mib(root / 'venv'):.0f} MiB; the Bento: {_mib(bento):.0f} MiB")
    started = time.monotonic()
    served = serve_bento(root / "venv", "breastscan:test1", root, env, "bento.log")
    print(f"Bento served from the venv: ready in {time.monotonic() - started:.1f} s")
    try:
        upload = {"image": ("m.png", images.png(images.mammogram(2)))}
        r = httpx.post(f"{served.http_url}/tumor", files=upload, timeout=60)
        assert r.status_code == 200 and r.json()["stage"] == "production"
        versions = {m["name"]: m["version"] for m in httpx.post(f"{served.http_url}/models", json={},
                                                                timeout=10).json()}
        assert versions == dict.fromkeys(MODELS, "1")  # not "99"
        with GRPCClient(served.grpc_target) as g:
            assert g.predict("lesion", images.png(images.ultrasound(2)))["task"] == "segmentation"
            assert g.predict("mammo_lesion", upload["image"][1])["task"] == "segmentation"
        assert httpx.get(f"{served.http_url}/ui/", timeout=10).status_code == 200
        listed = httpx.post(f"{served.http_url}/models", json={}, timeout=10).json()
        assert {m["runtime"] for m in listed} == {"onnx"}
        explained = httpx.post(f"{served.http_url}/tumor", files=upload, data={"explain": "true"}, timeout=60)
        assert explained.status_code == 501 and explained.json()["code"] == "explain_unavailable"
        assert httpx.post(f"{served.http_url}/tumor", files=upload, timeout=60).status_code == 200
    finally:
        stop_service(served)
