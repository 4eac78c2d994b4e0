"""Which runtime serves a model, and what a Bento carries for it.

``runtime`` in the serving config (or ``BREASTSCAN_RUNTIME``) picks ONNX Runtime or
TensorFlow; ``breastscan build`` leaves TensorFlow out of a Bento only when every packed model
carries a checked export, and then the Bento itself insists on ``runtime: onnx``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from breastscan.exported import EXPORT_FILE, ONNX_FILE, ExportInfo, choose_runtime, read_export
from breastscan.serving.bento import TENSORFLOW_PACKAGES, bento_runtime, without_tensorflow, write_bentofile
from breastscan.serving.config import RUNTIME_ENV, parse_serving_config

REPO = Path(__file__).resolve().parents[2]


def _bundle_dir(tmp_path: Path, *, passed: bool | None) -> Path:
    """A directory with ``model.onnx`` and ``export.json`` (``passed``), or neither (``None``)."""
    if passed is not None:
        (tmp_path / ONNX_FILE).write_bytes(b"graph")
        info = ExportInfo(passed=passed, outputs=("logits",))
        (tmp_path / EXPORT_FILE).write_text(json.dumps(info.to_dict()))
    return tmp_path


@pytest.mark.parametrize(("passed", "asked", "chosen"), [
    (True, "auto", "onnx"), (False, "auto", "keras"), (None, "auto", "keras"),
    (True, "keras", "keras"), (True, "onnx", "onnx")])
def test_choose_runtime(tmp_path: Path, passed: bool | None, asked: str, chosen: str) -> None:
    assert choose_runtime(_bundle_dir(tmp_path, passed=passed), asked) == chosen


@pytest.mark.parametrize("passed", [False, None])
def test_onnx_is_refused_without_a_checked_export(tmp_path: Path, passed: bool | None) -> None:
    with pytest.raises(ValueError, match="carries no checked ONNX export"):
        choose_runtime(_bundle_dir(tmp_path, passed=passed), "onnx")
    with pytest.raises(ValueError, match="runtime must be one of"):
        choose_runtime(tmp_path, "tensorrt")


def test_export_info_reads_keys_it_does_not_know(tmp_path: Path) -> None:
    info = ExportInfo(passed=True, outputs=("logits", "mask_logits"), tta="flip")
    (tmp_path / ONNX_FILE).write_bytes(b"graph")
    (tmp_path / EXPORT_FILE).write_text(json.dumps({**info.to_dict(), "written_by": "a newer version"}))
    assert read_export(tmp_path) == info


def test_config_runtime_and_its_override() -> None:
    raw = yaml.safe_load((REPO / "services" / "serving.yaml").read_text())
    assert parse_serving_config(raw).runtime == "auto"
    assert parse_serving_config({**raw, "runtime": "keras"}).runtime == "keras"
    assert parse_serving_config({**raw, "runtime": "keras"}, {RUNTIME_ENV: "onnx"}).runtime == "onnx"
    with pytest.raises(ValueError, match="runtime must be one of auto, onnx, keras, got 'tf'"):
        parse_serving_config({**raw, "runtime": "tf"})


def test_bento_runtime() -> None:
    assert bento_runtime("auto", {"density": "onnx", "tumor": "onnx"}) == "onnx"
    assert bento_runtime("auto", {"density": "onnx", "tumor": "keras"}) == "keras"
    assert bento_runtime("keras", {"density": "onnx"}) == "keras"
    assert bento_runtime("auto", {}) == "keras"
    with pytest.raises(ValueError, match="tumor carry no checked ONNX export"):
        bento_runtime("onnx", {"density": "onnx", "tumor": "keras"})


def test_a_bento_without_tensorflow(tmp_path: Path) -> None:
    base = REPO / "services" / "bentofile.yaml"
    declared = yaml.safe_load(base.read_text())
    assert write_bentofile(base, "keras", tmp_path) == base
    written = yaml.safe_load(write_bentofile(base, "onnx", tmp_path).read_text())
    assert written == without_tensorflow(declared)
    names = [p.split("==")[0].split("[")[0] for p in written["python"]["packages"]]
    assert not set(names) & TENSORFLOW_PACKAGES and "onnxruntime" in names
    assert len(names) == len(declared["python"]["packages"]) - 2  # tensorflow-cpu and keras
    assert {"name": RUNTIME_ENV, "value": "onnx"} in written["envs"]
    assert {k: v for k, v in written.items() if k not in ("python", "envs")} == \
        {k: v for k, v in declared.items() if k not in ("python", "envs")}
