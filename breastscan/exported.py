"""A model's exported inference graph, run by ONNX Runtime: serving without TensorFlow.

The evaluate stage exports each trained model's forward pass
(:func:`breastscan.bundle.inference_function`, test-time flips included) to ONNX
(:mod:`breastscan.evaluation.export`) and keeps the export only when it answers as the Keras
model does on the version's own test images. A bundle that carries one holds two files
beside ``model.keras``::

    model.onnx     the graph: input ``(n, H, W, 1)`` float32 in [0, 1]; output the logits
                   ``(n, k)`` or mask logits ``(n, H, W, 1)``; a multi-task model's two
                   outputs named ``logits`` and ``mask_logits``
    export.json    how it was made and checked (:class:`ExportInfo`)

This module imports neither TensorFlow nor Keras: a service whose models all carry an
export starts without them.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
EXPORT_FILE = "export.json"
RUNTIMES = ("auto", "onnx", "keras")
"""Which runtime runs a bundle: ``auto`` (the export when the bundle has a checked one,
else Keras), ``onnx`` (the export, or an error), ``keras`` (TensorFlow)."""
MULTITASK_OUTPUTS = ("logits", "mask_logits")


@dataclass(frozen=True)
class ExportInfo:
    """``export.json``: how an export was made and how it compared with the Keras model.

    Attributes:
        format: ``onnx``.
        opset: ONNX opset of the graph.
        converter: converter and version (``tf2onnx 1.17.0``).
        tta: the contract's test-time augmentation baked into the graph (``none``/``flip``).
        outputs: output names in order (one, or :data:`MULTITASK_OUTPUTS`).
        passed: whether the equivalence check passed (a bundle carries a failed export
            never; its numbers go to the version's tags and model card only).
        equivalence: the check's numbers (:class:`breastscan.evaluation.export.Equivalence` as a
            dict: images, largest probability difference, decision agreement, Dice ...).
    """

    format: str = "onnx"
    opset: int = 17
    converter: str = ""
    tta: str = "none"
    outputs: tuple[str, ...] = ()
    passed: bool = False
    equivalence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``outputs`` as a list)."""
        return {**asdict(self), "outputs": list(self.outputs)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExportInfo:
        """Read :meth:`to_dict`'s dict; keys this version does not know are ignored."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**{**known, "outputs": tuple(known.get("outputs", ()))})


def read_export(directory: str | Path) -> ExportInfo | None:
    """The bundle's :class:`ExportInfo`, or ``None`` when it carries no export."""
    directory = Path(directory)
    if not (directory / ONNX_FILE).is_file() or not (directory / EXPORT_FILE).is_file():
        return None
    return ExportInfo.from_dict(json.loads((directory / EXPORT_FILE).read_text()))


def write_export(directory: str | Path, graph: bytes, info: ExportInfo) -> Path:
    """Write ``model.onnx`` and ``export.json`` into a saved bundle's ``directory``."""
    directory = Path(directory)
    (directory / ONNX_FILE).write_bytes(graph)
    (directory / EXPORT_FILE).write_text(json.dumps(info.to_dict(), indent=2) + "\n")
    return directory


def choose_runtime(directory: str | Path, runtime: str = "auto") -> str:
    """``onnx`` or ``keras``: which runtime runs the bundle in ``directory``.

    Args:
        directory: a saved bundle.
        runtime: one of :data:`RUNTIMES`.

    Raises:
        ValueError: ``runtime`` is unknown, or ``onnx`` for a bundle without a checked export.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "keras":
        return "keras"
    info = read_export(directory)
    if info is not None and info.passed:
        return "onnx"
    if runtime == "onnx":
        raise ValueError(f"runtime onnx: {directory} carries no checked ONNX export "
                         "(the evaluate stage adds one; see its export.json)")
    return "keras"


def default_threads() -> int:
    """Intra-op threads of a session: ``BREASTSCAN_ONNX_THREADS``, else every core of the process."""
    env = os.environ.get("BREASTSCAN_ONNX_THREADS")
    if env:
        return max(1, int(env))
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def providers() -> list[str]:
    """ONNX Runtime's execution providers, CUDA first when this install has it."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxModel:
    """An exported graph in an ONNX Runtime session: ``model(batch)`` gives its outputs.

    Stands where a Keras model stands in a :class:`breastscan.bundle.ModelBundle`
    (``bundle.model``): :func:`breastscan.bundle.inference_function` returns it as the
    forward pass, and the bundle applies calibration, thresholds and decision rules to its
    outputs as it does to Keras'. Safe to call from several threads (ONNX Runtime sessions are).
    """

    def __init__(self, graph: str | Path | bytes, *, threads: int | None = None,
                 output: str | None = None, _session: Any = None) -> None:
        """Open a session on ``graph`` (a path to ``model.onnx`` or its bytes).

        Args:
            graph: the ONNX graph.
            threads: intra-op threads (default :func:`default_threads`).
            output: answer only this output (a multi-task model's view), as an array.
        """
        if _session is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads or default_threads()
            options.inter_op_num_threads = 1
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # idle intra-op threads sleep instead of spinning: in a worker they share the cores
            # with decoding and preprocessing (served /tumor, 2 cores: 116 against 78 req/s at c=1,
            # 157 against 129 at c=32)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            source = graph if isinstance(graph, bytes) else str(graph)
            _session = ort.InferenceSession(source, options, providers=providers())
        self.session = _session
        self.input_name: str = _session.get_inputs()[0].name
        self.output_names: tuple[str, ...] = tuple(o.name for o in _session.get_outputs())
        if output is not None and output not in self.output_names:
            raise ValueError(f"the graph has no output {output!r} (it has {', '.join(self.output_names)})")
        self.output = output

    def __call__(self, batch: np.ndarray) -> np.ndarray | dict[str, np.ndarray]:
        """Run the graph.

        Args:
            batch: ``(n, H, W, 1)`` float32 in [0, 1].

        Returns:
            The one output (``(n, k)`` logits or ``(n, H, W, 1)`` mask logits), or for a graph
            of several outputs (and no :attr:`output`) a dict of them by name.
        """
        outs = self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
        if self.output is not None:
            return np.asarray(outs[self.output_names.index(self.output)])
        if len(outs) == 1:
            return np.asarray(outs[0])
        return {name: np.asarray(value) for name, value in zip(self.output_names, outs, strict=True)}

    def view(self, output: str) -> OnnxModel:
        """The same session answering only ``output`` (e.g. ``logits``): a multi-task model's view."""
        return OnnxModel(b"", output=output, _session=self.session)

    def __repr__(self) -> str:
        return f"OnnxModel(outputs={self.output_names}, output={self.output})"
