"""What a Bento carries: TensorFlow only when a packed model needs it.

``breastscan build`` packs the imported production models. When each carries a checked
ONNX export (the evaluate stage's), the Bento is built without TensorFlow and Keras: its
requirements are ``services/bentofile.yaml``'s less :data:`TENSORFLOW_PACKAGES`, and it
serves with ``runtime: onnx`` (:data:`breastscan.serving.config.RUNTIME_ENV` set in the
Bento), so a worker that would need TensorFlow refuses to start instead of failing on a
request. Grad-CAM (``explain=true``) needs TensorFlow: such a Bento answers it
``explain_unavailable``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from packaging.requirements import Requirement

from breastscan.serving.config import RUNTIME_ENV

TENSORFLOW_PACKAGES = frozenset({"tensorflow", "tensorflow-cpu", "keras"})
"""Distributions a Bento leaves out when no packed model needs TensorFlow."""


def bento_runtime(runtime: str, runtimes: Mapping[str, str]) -> str:
    """``onnx`` when the Bento can leave TensorFlow out, else ``keras``.

    Args:
        runtime: what ``breastscan build --runtime`` asked: ``auto``, ``onnx`` or ``keras``.
        runtimes: the runtime each packed model gets under ``auto``
            (:func:`breastscan.serving.store.stored_runtimes`).

    Raises:
        ValueError: ``onnx`` was asked and a model carries no checked export.
    """
    needing = sorted(name for name, r in runtimes.items() if r != "onnx")
    if runtime == "onnx" and needing:
        raise ValueError(f"--runtime onnx: {', '.join(needing)} carry no checked ONNX export (the "
                         "evaluate stage adds one); build with --runtime auto to include TensorFlow")
    if runtime == "keras" or needing or not runtimes:
        return "keras"
    return "onnx"


def without_tensorflow(bentofile: Mapping[str, Any]) -> dict[str, Any]:
    """A bentofile (its parsed YAML) with :data:`TENSORFLOW_PACKAGES` left out of
    ``python.packages`` and ``runtime: onnx`` set in its environment."""
    python = dict(bentofile.get("python") or {})
    python["packages"] = [p for p in python.get("packages", [])
                          if Requirement(p).name.lower() not in TENSORFLOW_PACKAGES]
    envs = [e for e in bentofile.get("envs", []) if e.get("name") != RUNTIME_ENV]
    return {**bentofile, "python": python, "envs": [*envs, {"name": RUNTIME_ENV, "value": "onnx"}]}


def write_bentofile(base: Path, runtime: str, out_dir: Path) -> Path:
    """The bentofile ``bentoml build`` gets: ``base`` itself for ``keras``, else its
    :func:`without_tensorflow` form written into ``out_dir``."""
    if runtime == "keras":
        return base
    out = out_dir / "bentofile-onnx.yaml"
    out.write_text(yaml.safe_dump(without_tensorflow(yaml.safe_load(base.read_text())), sort_keys=False))
    return out
