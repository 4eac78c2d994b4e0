"""A trained model with everything needed to use it: the one object training, evaluation,
the registry and the service share.

On disk a bundle is a directory::

    model.keras        the Keras model (logits out: "logits" or "mask_logits")
    model.onnx         optional: its forward pass exported and checked (breastscan.exported),
    export.json        which the service and ``breastscan predict`` run without TensorFlow
    preprocess.json    the PreprocessSpec used in training (breastscan.imaging.preprocessing)
    contract.json      ModelContract: task, label, classes, class names, input shape,
                       calibration temperature, decision rule, mask threshold, spec id
    reference.json     optional: statistics of training images and the model's outputs on
                       them, the reference of drift monitoring (breastscan.monitoring.drift)

:meth:`ModelBundle.predict` is the only place logits become served probabilities
(temperature-scaled softmax for classifiers, sigmoid for masks), and
:meth:`ModelBundle.prepare` the only place raw images become model input, both through
:mod:`breastscan.imaging.preprocessing`.
"""

from __future__ import annotations

import json
import logging
import shutil
import weakref
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from breastscan.decision import DecisionRule
from breastscan.exported import EXPORT_FILE, ONNX_FILE, OnnxModel, choose_runtime, read_export
from breastscan.imaging.preprocessing import Letterbox, PreprocessSpec, preprocess_image

if TYPE_CHECKING:  # keras is imported lazily: reading a contract must stay cheap
    import keras

    from breastscan.config import ModelConfig

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- logits to probabilities


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax.

    Args:
        logits: ``(..., k)`` real array.
        axis: the class axis.

    Returns:
        Probabilities of the same shape (float64 unless given float32), summing to 1 along
        ``axis``.
    """
    z = np.asarray(logits, dtype=np.result_type(np.asarray(logits).dtype, np.float32))
    z = z - np.max(z, axis=axis, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=axis, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function ``1 / (1 + exp(-x))``, elementwise, in [0, 1]."""
    from scipy.special import expit

    return expit(np.asarray(x, dtype=np.result_type(np.asarray(x).dtype, np.float32)))


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated probabilities ``softmax(logits / T)``.

    Args:
        logits: ``(n, k)`` logits.
        temperature: ``T > 0`` from :func:`breastscan.evaluation.calibration.fit_temperature`.

    Returns:
        ``(n, k)`` probabilities in [0, 1], rows summing to 1.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return softmax(np.asarray(logits, dtype=np.float64) / float(temperature), axis=-1)

MODEL_FILE = "model.keras"
CONTRACT_FILE = "contract.json"
REFERENCE_FILE = "reference.json"


@dataclass(frozen=True)
class ModelContract:
    """What a model takes and returns, saved as ``contract.json`` beside it.

    Attributes:
        name: model name in params.yaml (``density``, ``tumor``, ``lesion`` ...).
        task: ``classification`` or ``segmentation``.
        label: manifest column learnt (``density``, ``pathology``, ``mask``).
        classes: manifest values in class-index order (text), empty for segmentation.
        class_names: display names in class-index order (``("lesion",)`` for segmentation).
        input_shape: ``(H, W, 1)`` of one model input.
        dataset: dataset key the model was trained on.
        modality: modality of that dataset.
        temperature: calibration temperature applied to the logits (1.0 = uncalibrated).
        decision: how a classifier calls a class from its probabilities
            (:meth:`breastscan.decision.DecisionRule.to_dict`; ``{"rule": "argmax"}``, the
            default, in contracts written before rules existed). The evaluate stage fits a
            declared cutoff on the validation split, beside the temperature; :attr:`rule`
            reads it.
        threshold: mask probability above which a pixel is lesion (segmentation).
        tta: test-time augmentation applied by :meth:`ModelBundle.logits` (so by evaluation,
            calibration and the service alike): ``none``, or ``flip``: the mean of the logits
            of the image and of its left-right mirror (a mask mirrored back first).
        spec_id: id of the preprocessing spec (must match ``preprocess.json``).
        headline: the metric the model is judged by (from its declaration).
        metrics: the metrics it declares beyond its task's standard ones (its gated
            metrics), so any scorer reports what the pipeline reported.
        extra: free-form facts (training data hash, run id ...); a lesion-aware classifier
            says ``classifies: lesion-aware`` and its ``roi`` (it still returns class
            probabilities of the whole image; they rest on the lesion's neighbourhood).
    """

    name: str
    task: str
    label: str
    classes: tuple[str, ...]
    class_names: tuple[str, ...]
    input_shape: tuple[int, int, int]
    dataset: str
    modality: str
    temperature: float = 1.0
    threshold: float = 0.5
    spec_id: str = ""
    headline: str = ""
    metrics: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    decision: dict[str, Any] = field(default_factory=DecisionRule().to_dict)
    tta: str = "none"

    def __post_init__(self) -> None:
        rule = DecisionRule.from_dict(self.decision)
        if self.task in ("classification", "multitask"):
            rule.check_classes(self.class_names)
        elif not rule.is_argmax:
            raise ValueError(f"model {self.name}: a decision rule applies to classifiers only")
        if self.tta not in ("none", "flip"):
            raise ValueError(f"model {self.name}: tta must be 'none' or 'flip', got {self.tta!r}")
        object.__setattr__(self, "decision", rule.to_dict())
        object.__setattr__(self, "_rule", rule)  # read per served request: parsed once

    @property
    def rule(self) -> DecisionRule:
        """The decision rule (:class:`~breastscan.decision.DecisionRule`) of :attr:`decision`."""
        return self._rule  # type: ignore[attr-defined]

    def view(self, task: str) -> ModelContract:
        """A multi-task model's contract read as its classifier's or its segmenter's alone.

        Args:
            task: ``classification`` or ``segmentation``.

        Returns:
            The contract of that output (this one, for a model of another task).
        """
        from breastscan.config import metric_names

        if self.task != "multitask":
            return self
        if task not in ("classification", "segmentation"):
            raise ValueError(f"a multi-task model has a classification and a segmentation view, not {task!r}")
        names = metric_names(task, len(self.classes))
        own = replace(self, metrics=tuple(m for m in self.metrics if m in names or
                                          (task == "classification" and m.startswith("per_class."))),
                      headline=self.headline if self.headline in names else "")
        if task == "classification":
            return replace(own, task=task)
        return replace(own, task=task, label="mask", classes=(), class_names=("lesion",), temperature=1.0,
                       decision=DecisionRule().to_dict(), headline=own.headline or "lesion_mean_dice")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of the contract."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelContract:
        """Build a contract from :meth:`to_dict` output.

        Keys this version does not know (written by a newer one) are left out with a warning:
        an older worker can still read a newer model's contract; the fields it knows keep
        their meaning, and a newer field's default is what this version does.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            log.warning("contract of %s: keys %s are not known to this version; ignored",
                        data.get("name", "?"), ", ".join(unknown))
        data = {k: v for k, v in data.items() if k in known}
        for key in ("classes", "class_names", "input_shape", "metrics"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)

    @classmethod
    def from_config(cls, cfg: ModelConfig, modality: str) -> ModelContract:
        """The contract of a model declared in params.yaml (before calibration)."""
        return cls(
            name=cfg.name, task=cfg.task, label=cfg.label,
            classes=tuple(str(c) for c in cfg.classes), class_names=tuple(cfg.class_names),
            input_shape=cfg.input_shape, dataset=cfg.dataset, modality=modality,
            threshold=cfg.threshold, spec_id=cfg.preprocess.spec_id,
            headline=cfg.headline, metrics=tuple(cfg.gates.floors),
            extra={} if cfg.roi is None else {"classifies": "lesion-aware", "roi": _roi_facts(cfg.roi)},
            decision=cfg.decision.to_dict(), tta=cfg.tta,
        )


def _roi_facts(roi: Any) -> dict[str, Any]:
    """A lesion-aware classifier's crop, for its contract: JSON-able ``RoiConfig`` fields."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(roi).items()}


@dataclass
class ModelBundle:
    """A model with its preprocessing spec and contract.

    Attributes:
        model: maps ``(batch, H, W, 1)`` float32 in [0, 1] to logits: ``(batch, k)`` for
            a classifier, ``(batch, H, W, 1)`` for a segmenter. A Keras model, or the
            bundle's checked export in ONNX Runtime (:class:`breastscan.exported.OnnxModel`,
            ``load(..., runtime="onnx"|"auto")``), which answers the same.
        spec: the preprocessing applied to every input.
        contract: classes, calibration and threshold.
        reference: the drift-monitoring reference (``reference.json``, see
            :func:`breastscan.monitoring.drift.model_reference`), or ``None`` (older bundles).
        source: the directory it was loaded from (``None`` for a bundle built in memory);
            :meth:`keras_model` reads the Keras model there when :attr:`model` is an export.
    """

    model: keras.Model | OnnxModel
    spec: PreprocessSpec
    contract: ModelContract
    reference: dict[str, Any] | None = None
    source: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.contract.spec_id and self.contract.spec_id != self.spec.spec_id:
            raise ValueError(f"model {self.contract.name}: contract spec_id {self.contract.spec_id} "
                             f"does not match preprocess spec {self.spec.spec_id}")
        if tuple(self.contract.input_shape[:2]) != (self.spec.height, self.spec.width):
            raise ValueError(f"model {self.contract.name}: input shape {self.contract.input_shape} "
                             f"does not match preprocess size {self.spec.height}x{self.spec.width}")

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write ``model.keras``, ``preprocess.json``, ``contract.json`` (and ``reference.json``
        when the bundle has one) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if isinstance(self.model, OnnxModel):  # an export runs it: the files it was read from
            for name in (MODEL_FILE, ONNX_FILE, EXPORT_FILE):
                shutil.copyfile(self._source() / name, directory / name)
        else:
            self.model.save(directory / MODEL_FILE)
        self.spec.save(directory)
        write_contract(self.contract, directory)
        if self.reference is not None:
            (directory / REFERENCE_FILE).write_text(json.dumps(self.reference) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, compile: bool = False, runtime: str = "keras") -> ModelBundle:
        """Read a bundle written by :meth:`save`.

        Args:
            directory: the bundle.
            compile: compile the Keras model (training resumes).
            runtime: ``keras`` (TensorFlow), ``onnx`` (the bundle's checked export, without
                importing TensorFlow) or ``auto`` (the export when there is one); see
                :func:`breastscan.exported.choose_runtime`.

        Raises:
            FileNotFoundError: a bundle file is missing.
            ValueError: the contract and the spec disagree, or ``onnx`` without an export.
        """
        directory = Path(directory)
        if not (directory / MODEL_FILE).is_file():
            raise FileNotFoundError(f"no {MODEL_FILE} in {directory}")
        contract = read_contract(directory)
        model: keras.Model | OnnxModel
        if choose_runtime(directory, runtime) == "onnx":
            info = read_export(directory)
            if info is not None and info.tta != contract.tta:
                raise ValueError(f"model {contract.name}: its export runs tta {info.tta!r}, its contract "
                                 f"{contract.tta!r}; export it again")
            model = OnnxModel(directory / ONNX_FILE)
        else:
            model = _load_keras(directory, compile=compile)
        return cls(model=model, spec=PreprocessSpec.load(directory), contract=contract,
                   reference=read_reference(directory), source=directory)

    @property
    def runtime(self) -> str:
        """``onnx`` when its export runs it, else ``keras``."""
        return "onnx" if isinstance(self.model, OnnxModel) else "keras"

    def keras_model(self) -> keras.Model:
        """The Keras model (read from :attr:`source` when an export runs the bundle; Grad-CAM
        needs it). A multi-task bundle's view gives its view's output."""
        if not isinstance(self.model, OnnxModel):
            return self.model
        model = _load_keras(self._source())
        if self.model.output is not None:
            from breastscan.models.multitask import output_model

            model = output_model(model, self.model.output)
        return model

    def _source(self) -> Path:
        if self.source is None:
            raise ValueError(f"model {self.contract.name}: an exported bundle without its directory")
        return self.source

    def with_temperature(self, temperature: float) -> ModelBundle:
        """The same bundle with a new calibration temperature (> 0)."""
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        return replace(self, contract=replace(self.contract, temperature=float(temperature)))

    def with_decision(self, rule: DecisionRule) -> ModelBundle:
        """The same bundle with another decision rule (e.g. its cutoff fitted on validation data)."""
        return replace(self, contract=replace(self.contract, decision=rule.to_dict()))

    def view(self, task: str) -> ModelBundle:
        """A multi-task bundle as its classifier or its segmenter alone (shared layers, one
        output, :meth:`ModelContract.view`); any other bundle comes back unchanged.

        Args:
            task: ``classification`` or ``segmentation``.
        """
        if self.contract.task != "multitask":
            return self
        output = "logits" if task == "classification" else "mask_logits"
        if isinstance(self.model, OnnxModel):
            return replace(self, model=self.model.view(output), contract=self.contract.view(task))
        from breastscan.models.multitask import output_model

        return replace(self, model=output_model(self.model, output), contract=self.contract.view(task))

    # ------------------------------------------------------------------ inference
    def prepare(self, images: list[np.ndarray]) -> tuple[np.ndarray, list[Letterbox]]:
        """Preprocess decoded images into one model batch (see :func:`prepare_batch`)."""
        return prepare_batch(self.spec, self.contract.input_shape, images)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw model outputs of a preprocessed batch, through :func:`inference_function`.

        Args:
            batch: ``(n, H, W, 1)`` float32 in [0, 1].

        Returns:
            ``(n, k)`` logits, or ``(n, H, W, 1)`` mask logits.
        """
        if self.contract.task == "multitask":
            raise ValueError(f"model {self.contract.name} has two outputs: take one with "
                             "bundle.view('classification') or bundle.view('segmentation')")
        batch = self._checked(batch)
        expected = tuple(self.contract.input_shape)
        if len(batch) == 0:
            k = len(self.contract.classes)
            return np.zeros((0, k) if self.contract.task == "classification" else (0, *expected), np.float32)
        return np.asarray(inference_function(self.model, expected, self.contract.tta)(batch),
                          dtype=np.float32)

    def _checked(self, batch: np.ndarray) -> np.ndarray:
        """``batch`` as float32, refused unless ``(n, *input_shape)``."""
        batch = np.asarray(batch, dtype=np.float32)
        expected = tuple(self.contract.input_shape)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
            raise ValueError(f"model {self.contract.name} takes (n, {', '.join(map(str, expected))}), "
                             f"got {batch.shape}")
        return batch

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Served probabilities of raw logits (see :func:`served_probabilities`)."""
        return served_probabilities(self.contract, logits)

    def predict(self, batch: np.ndarray) -> Any:
        """Probabilities of a preprocessed batch, in one forward pass.

        Args:
            batch: ``(n, H, W, 1)`` float32 in [0, 1] (from :meth:`prepare`).

        Returns:
            ``(n, k)`` calibrated class probabilities (rows sum to 1), or
            ``(n, H, W, 1)`` lesion probabilities in [0, 1]; for a multi-task model a dict
            of both, ``{"probabilities": (n, k), "mask": (n, H, W, 1)}``.
        """
        if self.contract.task != "multitask":
            return self.probabilities(self.logits(batch))
        out = self._outputs(batch)
        classes, masks = self.contract.view("classification"), self.contract.view("segmentation")
        return {"probabilities": served_probabilities(classes, out["logits"]),
                "mask": served_probabilities(masks, out["mask_logits"])}

    def _outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """A multi-task model's raw outputs by name, one forward pass (test-time flips included)."""
        batch = self._checked(batch)
        expected = tuple(self.contract.input_shape)
        if not len(batch):
            return {"logits": np.zeros((0, len(self.contract.classes)), np.float32),
                    "mask_logits": np.zeros((0, *expected), np.float32)}
        out = inference_function(self.model, expected, self.contract.tta)(batch)
        return {name: np.asarray(value, dtype=np.float32) for name, value in out.items()}


_INFERENCE: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def _load_keras(directory: Path, *, compile: bool = False) -> keras.Model:
    """``model.keras`` of a bundle directory, its custom layers registered."""
    import keras

    import breastscan.models  # noqa: F401  (registers custom layers, losses, metrics)

    return keras.models.load_model(directory / MODEL_FILE, compile=compile)


def inference_function(model: keras.Model | OnnxModel, input_shape: tuple[int, ...],
                       tta: str = "none") -> Any:
    """The model's forward pass (``training=False``) as one graph for every batch size.

    Keras' ``predict_on_batch`` traces its function again for each batch size it has not
    seen (TensorFlow logs "triggered tf.function retracing"), so a server whose adaptive
    batches vary in size keeps paying traces; this function is traced once, with the batch
    dimension left open, and cached per model (it follows the model's weights as they
    change). About 7 % faster than ``predict_on_batch`` at batch 1 to 32 on CPU, with the
    same values for the same batch.

    Args:
        model: a Keras model taking ``(n, *input_shape)`` float32, or an exported one
            (:class:`~breastscan.exported.OnnxModel`: returned as it is, since the export is
            this function's graph with the contract's ``tta`` built in).
        input_shape: one input's shape, e.g. ``(H, W, 1)``.
        tta: ``none``, or ``flip``: the mean of the outputs of the batch and of its left-right
            mirror (4-D outputs, masks, are mirrored back first), in the same graph.

    Returns:
        A callable ``(n, *input_shape) float32 -> tf.Tensor`` of the model's outputs.
    """
    if isinstance(model, OnnxModel):  # the exported graph has the flips of its contract built in
        return model
    fns = _INFERENCE.setdefault(model, {})
    fn = fns.get(tta)
    if fn is None:
        import tensorflow as tf

        spec = tf.TensorSpec((None, *input_shape), tf.float32)
        ref = weakref.ref(model)  # the cache must not keep the model alive

        def forward(x: Any) -> Any:
            live = ref()
            assert live is not None, "the model was freed"
            out = live(x, training=False)
            if tta != "flip":
                return out
            mirrored = live(tf.reverse(x, axis=[2]), training=False)
            # a 4-D output (a mask) is mirrored back; a multi-task model's dict, output by output
            return tf.nest.map_structure(
                lambda o, m: (o + (tf.reverse(m, axis=[2]) if len(o.shape) == 4 else m)) / 2.0, out, mirrored)

        fn = tf.function(forward, input_signature=[spec])
        fns[tta] = fn
    return fn


def prepare_batch(
    spec: PreprocessSpec, input_shape: tuple[int, int, int], images: list[np.ndarray]
) -> tuple[np.ndarray, list[Letterbox]]:
    """Preprocess decoded images into one model batch (no Keras needed).

    Args:
        spec: the model's preprocessing spec.
        input_shape: ``(H', W', 1)`` of one model input (the contract's).
        images: ``(H, W)`` / ``(H, W, C)`` arrays of any size and dtype
            (see :func:`breastscan.imaging.preprocessing.preprocess_image`).

    Returns:
        ``(batch, H', W', 1)`` float32 in [0, 1] at the model size, and the letterbox
        geometry of each image (to map masks and heatmaps back to the original size).
    """
    out = [preprocess_image(img, spec) for img in images]
    h, w, _ = input_shape
    batch = np.stack([x for x, _ in out]) if out else np.zeros((0, h, w, 1), np.float32)
    return batch.astype(np.float32, copy=False), [box for _, box in out]


def served_probabilities(contract: ModelContract, logits: np.ndarray) -> np.ndarray:
    """The only place logits become served probabilities.

    Args:
        contract: the model's contract (task and calibration temperature).
        logits: ``(n, k)`` class logits, or ``(n, H, W, 1)`` mask logits.

    Returns:
        ``(n, k)`` temperature-scaled softmax (rows sum to 1), or ``(n, H, W, 1)`` per-pixel
        sigmoid, float32 in [0, 1].
    """
    if contract.task == "classification":
        probs = apply_temperature(np.asarray(logits, np.float64), contract.temperature)
        return probs.astype(np.float32)
    return sigmoid(np.asarray(logits, np.float32))


def write_contract(contract: ModelContract, directory: str | Path) -> Path:
    """Write ``contract.json`` into ``directory``."""
    path = Path(directory) / CONTRACT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(contract.to_dict(), indent=2) + "\n")
    return path


def read_reference(directory: str | Path) -> dict[str, Any] | None:
    """Read ``reference.json`` from a bundle directory; ``None`` when it has none (no Keras import)."""
    path = Path(directory) / REFERENCE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def read_contract(directory: str | Path) -> ModelContract:
    """Read ``contract.json`` from a bundle directory (no Keras import)."""
    path = Path(directory) / CONTRACT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONTRACT_FILE} in {directory}")
    return ModelContract.from_dict(json.loads(path.read_text()))
