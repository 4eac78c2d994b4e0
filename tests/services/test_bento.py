"""``breastscan build`` packs the service, the library and the production models into a Bento
that serves on its own: HTTP, gRPC and the UI, with nothing fetched at start."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from breastscan.serving.client import GRPCClient
from tests.services import images
from tests.services.conftest import BIN, REPO, free_port, start_service, stop_service

pytestmark = [pytest.mark.slow, pytest.mark.service]


# A newer tumor model imported after the build: the Bento must go on serving its own.
NEWER_IMPORT = """
import shutil, bentoml
old = bentoml.models.get("breastscan-tumor:latest")
labels = {**old.info.labels, "registry_version": "99"}
with bentoml.models.create("breastscan-tumor", labels=labels, metadata=dict(old.info.metadata)) as m:
    shutil.copytree(old.path, m.path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model.yaml"))
"""


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
    assert set(pinned) == {"breastscan-density", "breastscan-tumor", "breastscan-lesion"}
    newer = subprocess.run([sys.executable, "-c", NEWER_IMPORT], env=env, capture_output=True, text=True,
                           timeout=120)
    assert newer.returncode == 0, newer.stderr[-3000:]
    listed = subprocess.run([sys.executable, "-m", "bentoml", "list", "-o", "json"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert "breastscan:test1" in listed.stdout

    # The Bento serves from its own copy of the code and models, in another directory.
    served = start_service(root, env, http_port=free_port(), grpc_port=free_port(),
                           log_name="bento.log", target="breastscan:test1")
    try:
        upload = {"image": ("m.png", images.png(images.mammogram(2)))}
        r = httpx.post(f"{served.http_url}/tumor", files=upload, timeout=60)
        assert r.status_code == 200 and r.json()["stage"] == "production"
        versions = {m["name"]: m["version"] for m in httpx.post(f"{served.http_url}/models", json={},
                                                                timeout=10).json()}
        assert versions == {"density": "1", "tumor": "1", "lesion": "1"}  # not the newer "99"
        with GRPCClient(served.grpc_target) as g:
            assert g.predict("lesion", images.png(images.ultrasound(2)))["task"] == "segmentation"
        assert httpx.get(f"{served.http_url}/ui/", timeout=10).status_code == 200
    finally:
        stop_service(served)
