"""Export a bundle's forward pass to ONNX and check that the export answers as Keras does.

:func:`export_onnx` converts :func:`breastscan.bundle.inference_function` (the contract's
test-time flips included) with tf2onnx into the graph :mod:`breastscan.exported` runs:
input ``(n, H, W, 1)`` float32 in [0, 1], outputs named ``logits`` (a classifier),
``mask_logits`` (a segmenter) or both (a multi-task model). :func:`check_equivalence` runs
the bundle and the export side by side on the version's own test images and compares what
is served: calibrated probabilities, the decision rule's calls, thresholded masks.
:func:`export_and_check` does both for the evaluate stage; a model whose export fails
either step is registered without one, and TensorFlow serves it.

tf2onnx converts TensorFlow's area resize (``keras.layers.Resizing(interpolation="area")``,
the lesion-aware classifier's input to its U-Net) as a nearest-neighbour resize; here it
becomes the exact linear map it is (:func:`area_weights`).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from breastscan.bundle import ModelBundle, inference_function
from breastscan.evaluation.metrics import MaskOutcomes
from breastscan.exported import MULTITASK_OUTPUTS, ExportInfo, OnnxModel

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

OPSET = 17
"""ONNX opset of the exports."""
MAX_PROB_DIFF = 1e-4
"""Largest |difference| allowed between a served class probability of the export and of the
Keras model."""
MAX_MASK_PROB_DIFF = 1e-3
"""Largest |difference| allowed between a served mask pixel's probabilities. Looser than
:data:`MAX_PROB_DIFF`: a U-Net's pixel logits reach hundreds, where float32 sums in another
order differ more (TensorFlow against itself, batch 1 against batch 32, on the demo lesion
model: 1.2e-4); what a mask serves is its thresholded pixels, held to :data:`MIN_MASK_DICE`."""
MIN_AGREEMENT = 0.995
"""Smallest share of test images on which both runtimes call the same class."""
TIE_MARGIN = 1e-4
"""A disagreement is a tie when, in either runtime, the call was this close: the top two
probabilities (arg-max), or the positive ratio and its cutoff (a cutoff rule)."""
MIN_MASK_DICE = 0.999
"""Smallest Dice, over test images, between the two runtimes' thresholded masks (two empty
masks agree: Dice 1)."""
CHECK_BATCH = 32
"""Images per forward pass of the check (and the larger batch timed)."""
TIMING_REPEATS = 5
"""Timed forward passes per runtime and batch size (their median is reported)."""


class ExportError(ValueError):
    """The model cannot be converted to ONNX; the message names the layer (or op) at fault."""


# --------------------------------------------------------------------------- export


def output_names(task: str) -> tuple[str, ...]:
    """The export's output names for a contract's task: ``logits``, ``mask_logits`` or both."""
    return {"classification": ("logits",), "segmentation": ("mask_logits",)}.get(task, MULTITASK_OUTPUTS)


def export_onnx(bundle: ModelBundle, *, opset: int = OPSET) -> bytes:
    """The ONNX graph of the bundle's forward pass (its contract's test-time flips built in).

    Args:
        bundle: the model (its Keras model is exported; calibration and decision rules stay
            in the bundle, applied to the export's outputs as to Keras').
        opset: ONNX opset.

    Returns:
        The serialised graph: input ``(n, H, W, 1)`` float32 in [0, 1]; outputs ``logits``
        ``(n, k)`` and/or ``mask_logits`` ``(n, H, W, 1)`` (see :func:`output_names`).

    Raises:
        ExportError: an op has no ONNX conversion (the message names its Keras layer), or the
            graph's outputs are not the contract's.
    """
    import tensorflow as tf
    import tf2onnx

    model = bundle.keras_model()
    shape = tuple(bundle.contract.input_shape)
    names = output_names(bundle.contract.task)
    spec = tf.TensorSpec((None, *shape), tf.float32)
    forward = _named(inference_function(model, shape, bundle.contract.tta), spec, names)
    with _failed_nodes() as failed:
        try:
            proto, _ = tf2onnx.convert.from_function(forward, input_signature=[spec], opset=opset,
                                                     custom_op_handlers={"ResizeArea": (_resize_area, [])})
        except Exception as exc:
            failed = failed or [("", "", f"{type(exc).__name__}: {exc}")]
            raise ExportError(_failure(bundle, model, failed)) from exc
    unknown = failed + _unknown_ops(proto)
    if unknown:
        raise ExportError(_failure(bundle, model, unknown))
    _freeze_captures(proto, forward.get_concrete_function(spec))
    found = tuple(o.name for o in proto.graph.output)
    if sorted(found) != sorted(names):
        raise ExportError(f"model {bundle.contract.name}: the export's outputs are {found}, not {names}")
    if len(proto.graph.input) != 1:
        raise ExportError(f"model {bundle.contract.name}: the export takes inputs "
                          f"{[i.name for i in proto.graph.input]}, not the image alone")
    return bytes(proto.SerializeToString())


def _freeze_captures(proto: Any, concrete: Any) -> None:
    """Constants the traced function captured (e.g. EfficientNet's ``Normalization`` mean and
    variance), which tf2onnx leaves as graph inputs: dropped where no node reads them, else
    made initializers."""
    import tensorflow as tf
    from onnx import numpy_helper

    placeholders = concrete.inputs[len(concrete.inputs) - len(concrete.captured_inputs):]
    values = {p.name: v for p, v in zip(placeholders, concrete.captured_inputs, strict=True)
              if v.dtype != tf.resource}
    read = {name for node in proto.graph.node for name in node.input}
    for graph_input in list(proto.graph.input):
        if graph_input.name in values:
            if graph_input.name in read:
                value = np.asarray(values[graph_input.name])
                proto.graph.initializer.append(numpy_helper.from_array(value, graph_input.name))
            proto.graph.input.remove(graph_input)


def _named(forward: Any, spec: Any, names: tuple[str, ...]) -> Any:
    """``forward`` answering a dict keyed by the output names (tf2onnx names outputs by its keys)."""
    import tensorflow as tf

    if len(names) > 1:  # a multi-task model answers its dict already
        return forward

    def named(x: Any) -> Any:
        return {names[0]: forward(x)}

    return tf.function(named, input_signature=[spec])


@contextmanager
def _failed_nodes() -> Iterator[list[tuple[str, str, str]]]:
    """Collect ``(node name, op type, why)`` of the TensorFlow nodes tf2onnx reports it could not
    convert (it logs them, and may go on to write a graph ONNX Runtime cannot run)."""
    found: list[tuple[str, str, str]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            args = record.args if isinstance(record.args, tuple) else ()
            text = str(record.msg)
            if text.startswith("Tensorflow op [") and len(args) >= 2:
                found.append((str(args[0]), str(args[1]), "no ONNX conversion"))
            elif text.startswith("Failed to convert node") and len(args) >= 3:
                op = re.match(r"OP=(\w+)", str(args[2]))
                error = record.exc_info[1] if record.exc_info else None
                found.append((str(args[0]), op.group(1) if op else "", str(error or "conversion failed")))

    handler, logger = Collect(level=logging.ERROR), logging.getLogger("tf2onnx")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)  # its INFO lines (versions, optimiser counts) say nothing here
    try:
        yield found
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _unknown_ops(proto: Any) -> list[tuple[str, str, str]]:
    """``(node name, op type, why)`` of graph nodes no ONNX schema defines (left as tf2onnx found them)."""
    import onnx

    return [(node.name, node.op_type, "no ONNX conversion") for node in proto.graph.node
            if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type)]


def _failure(bundle: ModelBundle, model: keras.Model, nodes: list[tuple[str, str, str]]) -> str:
    """``model x: layer 'y' (Class) cannot be exported to ONNX: TensorFlow op Op (node): why``."""
    node, op, why = nodes[0]
    layer = _layer_of(model, node)
    what = f"layer {layer.name!r} ({type(layer).__name__})" if layer is not None else f"op {op or node!r}"
    return (f"model {bundle.contract.name}: {what} cannot be exported to ONNX: TensorFlow op {op or '?'} "
            f"({node or 'unknown node'}): {why}")


def _layer_of(model: keras.Model, node: str) -> Any:
    """The innermost Keras layer whose name scope holds the TensorFlow node ``node``, or ``None``.

    Node names are scoped by the layers they run in (``functional_1/my_layer_1/PyFunc``);
    TensorFlow adds ``_<n>`` to a scope it has seen before.
    """
    layers = {layer.name: layer for layer in _layers(model)}
    for scope in reversed(node.split("/")[:-1]):
        for name in (scope, re.sub(r"_\d+$", "", scope)):
            if name in layers:
                return layers[name]
    return None


def _layers(model: Any) -> Iterator[Any]:
    """Every layer of a model, nested models' layers included."""
    for layer in getattr(model, "layers", ()):
        yield layer
        yield from _layers(layer)


def area_weights(n_in: int, n_out: int) -> np.ndarray:
    """TensorFlow's area resize along one axis (``align_corners=False``) as a matrix.

    Output pixel ``y`` averages the input span ``[y s, (y + 1) s)``, ``s = n_in / n_out``,
    each input pixel weighed by its overlap with the span.

    Returns:
        ``(n_out, n_in)`` float32, rows summing to 1.
    """
    scale = n_in / n_out
    weights = np.zeros((n_out, n_in), np.float64)
    for y in range(n_out):
        start, end = y * scale, (y + 1) * scale
        for i in range(int(np.floor(start)), int(np.ceil(end))):
            weights[y, min(i, n_in - 1)] += (min(i + 1.0, end) - max(float(i), start)) / scale
    return weights.astype(np.float32)


def _resize_area(ctx: Any, node: Any, name: str, args: Any) -> None:
    """tf2onnx handler of ``ResizeArea``: ``out[n, y, x, c] = sum rows[y, h] img[n, h, w, c] cols[x, w]``."""
    from tf2onnx import utils

    shape = ctx.get_shape(node.input[0])
    size = node.inputs[1].get_tensor_value()
    utils.make_sure(shape is not None and len(shape) == 4 and min(shape[1:3]) > 0,
                    "an area resize needs a static image size, got %s", shape)
    utils.make_sure(not node.get_attr_value("align_corners", False), "area resize with align_corners")
    rows = ctx.make_const(utils.make_name(f"{name}_rows"), area_weights(shape[1], int(size[0])))
    cols = ctx.make_const(utils.make_name(f"{name}_cols"), area_weights(shape[2], int(size[1])))
    ctx.replace_inputs(node, [node.input[0], rows.output[0], cols.output[0]])
    node.type = "Einsum"
    node.set_attr("equation", "nhwc,yh,xw->nyxc")


# --------------------------------------------------------------------------- equivalence


@dataclass(frozen=True)
class Equivalence:
    """How an export answered against the Keras model on the same images.

    Attributes:
        images: images compared.
        max_prob_diff: largest |difference| of a served class probability (``None`` without classes).
        decision_agreement: share of images called the same class by both (``None`` without classes).
        disagreements: each image called differently: ``index``, ``keras`` and ``onnx`` class,
            and ``why`` (``near tie ...`` or ``decision changed ...``).
        mask_dice_min: smallest Dice between the two thresholded masks of an image (``None``
            without masks).
        mask_dice_mean: their mean.
        max_mask_prob_diff: largest |difference| of a mask pixel's probability.
        keras_batch_diff: for scale, the largest |difference| of a served probability of the
            Keras model with itself, run one image at a time against :data:`CHECK_BATCH` at a
            time (first :data:`CHECK_BATCH` images): TensorFlow's own floating-point noise.
        keras_ms: milliseconds per image of the Keras forward pass, ``{"batch_1": .., "batch_32": ..}``.
        onnx_ms: the same for ONNX Runtime.
        criteria: the pass criteria applied (:data:`MAX_PROB_DIFF`, :data:`MIN_AGREEMENT`,
            :data:`MIN_MASK_DICE`, :data:`TIE_MARGIN`).
        passed: every criterion met.
        reason: why it failed (one line), ``""`` when it passed.
    """

    images: int
    max_prob_diff: float | None = None
    decision_agreement: float | None = None
    disagreements: list[dict[str, Any]] = field(default_factory=list)
    mask_dice_min: float | None = None
    mask_dice_mean: float | None = None
    max_mask_prob_diff: float | None = None
    keras_batch_diff: float | None = None
    keras_ms: dict[str, float] = field(default_factory=dict)
    onnx_ms: dict[str, float] = field(default_factory=dict)
    criteria: dict[str, float] = field(default_factory=lambda: {
        "max_prob_diff": MAX_PROB_DIFF, "decision_agreement": MIN_AGREEMENT,
        "mask_dice_min": MIN_MASK_DICE, "tie_margin": TIE_MARGIN})
    passed: bool = False
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def check_equivalence(bundle: ModelBundle, graph: bytes, batch: np.ndarray) -> Equivalence:
    """Compare the export with the Keras model on ``batch``, through the bundle (calibration included).

    Args:
        bundle: the model as served (calibrated; its Keras model).
        graph: its export (:func:`export_onnx`).
        batch: ``(n, H, W, 1)`` float32 in [0, 1]: the version's preprocessed test images.

    Returns:
        The comparison; ``passed`` when probabilities are within :data:`MAX_PROB_DIFF`, the
        calls agree on at least :data:`MIN_AGREEMENT` of the images with every disagreement a
        tie, and every image's masks reach a Dice of :data:`MIN_MASK_DICE`.
    """
    batch = np.asarray(batch, np.float32)
    if not len(batch):
        return Equivalence(images=0, reason="no images to compare on")
    if bundle.runtime != "keras":  # compare with TensorFlow, not with an export
        bundle = replace(bundle, model=bundle.keras_model())
    try:
        onnx_model = OnnxModel(graph)
        onnx_bundle = replace(bundle, model=onnx_model)
        keras_out, onnx_out = _served(bundle, batch), _served(onnx_bundle, batch)
    except Exception as exc:  # a graph that does not run fails the check
        return Equivalence(images=len(batch), reason=f"the export does not run as the model: {exc}")
    shapes = {k: v.shape for k, v in keras_out.items()}
    if shapes != {k: v.shape for k, v in onnx_out.items()}:
        return Equivalence(images=len(batch), reason=f"the export answers {_shapes(onnx_out)}, the model "
                                                     f"{_shapes(keras_out)}")
    numbers: dict[str, Any] = {}
    if "probabilities" in keras_out:
        numbers.update(_compare_classes(bundle, keras_out["probabilities"], onnx_out["probabilities"]))
    if "mask" in keras_out:
        numbers.update(_compare_masks(bundle, keras_out["mask"], onnx_out["mask"]))
    reason = _failed_criterion(numbers)
    keras_ms, onnx_ms = _timings(bundle, onnx_model, batch)
    return Equivalence(images=len(batch), **numbers, keras_batch_diff=_batch_noise(bundle, batch),
                       keras_ms=keras_ms, onnx_ms=onnx_ms, passed=not reason, reason=reason)


def _served(bundle: ModelBundle, batch: np.ndarray) -> dict[str, np.ndarray]:
    """What the bundle serves for ``batch``, :data:`CHECK_BATCH` images a pass: ``probabilities``
    and/or ``mask``."""
    parts: list[dict[str, np.ndarray]] = []
    for i in range(0, len(batch), CHECK_BATCH):
        out = bundle.predict(batch[i:i + CHECK_BATCH])
        if not isinstance(out, dict):
            out = {"probabilities" if bundle.contract.task == "classification" else "mask": out}
        parts.append({k: np.asarray(v, np.float64) for k, v in out.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _shapes(out: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{k} {v.shape[1:]}" for k, v in out.items())


def _batch_noise(bundle: ModelBundle, batch: np.ndarray) -> float:
    """Largest |difference| of a served probability of the bundle run one image at a time
    against :data:`CHECK_BATCH` at a time, on the first :data:`CHECK_BATCH` images."""
    x = batch[:CHECK_BATCH]
    together = _served(bundle, x)
    alone = [_served(bundle, x[i:i + 1]) for i in range(len(x))]
    return max(float(np.abs(together[k] - np.concatenate([a[k] for a in alone])).max()) for k in together)


def _compare_classes(bundle: ModelBundle, keras_p: np.ndarray, onnx_p: np.ndarray) -> dict[str, Any]:
    """Largest probability difference, decision agreement and the disagreements explained."""
    contract = bundle.contract.view("classification")
    rule, names = contract.rule, contract.class_names
    keras_call, onnx_call = rule.decide(keras_p, names), rule.decide(onnx_p, names)
    margin = np.minimum(_margin(rule, keras_p, names), _margin(rule, onnx_p, names))
    disagreements = []
    for i in np.flatnonzero(keras_call != onnx_call):
        tie = margin[i] < TIE_MARGIN
        why = (f"near tie: margin {margin[i]:.1e} < {TIE_MARGIN:g}" if tie
               else f"decision changed: margin {margin[i]:.1e}")
        disagreements.append({"index": int(i), "keras": names[keras_call[i]], "onnx": names[onnx_call[i]],
                              "tie": bool(tie), "why": why})
    return {"max_prob_diff": float(np.abs(keras_p - onnx_p).max()),
            "decision_agreement": float(np.mean(keras_call == onnx_call)), "disagreements": disagreements}


def _margin(rule: Any, probs: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """``(n,)`` how close each call was: the top-two probability gap (arg-max), else the
    positive ratio's distance to the cutoff (and, beside a third class, the pair's distance
    to the largest other probability)."""
    ordered = np.sort(probs, axis=1)
    if rule.is_argmax:
        return np.asarray(ordered[:, -1] - ordered[:, -2])
    margin = np.abs(rule.ratio(probs, names) - rule.cutoff)
    if probs.shape[1] > 2:
        pair = [names.index(rule.positive), names.index(rule.versus)]
        rest = np.delete(probs, pair, axis=1).max(axis=1)
        margin = np.minimum(margin, np.abs(probs[:, pair].sum(axis=1) - rest))
    return np.asarray(margin)


def _compare_masks(bundle: ModelBundle, keras_m: np.ndarray, onnx_m: np.ndarray) -> dict[str, Any]:
    """Dice between the thresholded masks (min and mean) and the largest pixel probability difference."""
    threshold = float(bundle.contract.threshold)
    dice = MaskOutcomes.from_masks((keras_m >= threshold).astype(np.float32), onnx_m, threshold).dice
    return {"mask_dice_min": float(dice.min()), "mask_dice_mean": float(dice.mean()),
            "max_mask_prob_diff": float(np.abs(keras_m - onnx_m).max())}


def _failed_criterion(numbers: dict[str, Any]) -> str:
    """The first criterion ``numbers`` miss, as one line (``""``: none)."""
    diff, mask_diff = numbers.get("max_prob_diff") or 0.0, numbers.get("max_mask_prob_diff") or 0.0
    if diff > MAX_PROB_DIFF:
        return f"class probabilities differ by up to {diff:.2e} (> {MAX_PROB_DIFF:g})"
    if mask_diff > MAX_MASK_PROB_DIFF:
        return f"mask probabilities differ by up to {mask_diff:.2e} (> {MAX_MASK_PROB_DIFF:g})"
    agreement = numbers.get("decision_agreement")
    if agreement is not None and agreement < MIN_AGREEMENT:
        return f"decisions agree on {agreement:.1%} of the images (< {MIN_AGREEMENT:.1%})"
    changed = [d["index"] for d in numbers.get("disagreements", []) if not d["tie"]]
    if changed:
        return f"decisions changed away from a tie on images {changed[:10]}"
    dice = numbers.get("mask_dice_min")
    if dice is not None and dice < MIN_MASK_DICE:
        return f"masks differ: smallest Dice {dice:.4f} (< {MIN_MASK_DICE:g})"
    return ""


def _timings(bundle: ModelBundle, onnx_model: OnnxModel,
             batch: np.ndarray) -> tuple[dict[str, float], dict[str, float]]:
    """Milliseconds per image of each runtime's forward pass at batch 1 and :data:`CHECK_BATCH`
    (the median of :data:`TIMING_REPEATS` passes after one warm-up)."""
    keras_forward = inference_function(bundle.keras_model(), tuple(bundle.contract.input_shape),
                                       bundle.contract.tta)
    keras_ms, onnx_ms = {}, {}
    for size in (1, CHECK_BATCH):
        x = np.resize(batch, (size, *batch.shape[1:])).astype(np.float32)
        keras_ms[f"batch_{size}"] = _ms_per_image(lambda x=x: _numpy(keras_forward(x)), size)
        onnx_ms[f"batch_{size}"] = _ms_per_image(lambda x=x: onnx_model(x), size)
    return keras_ms, onnx_ms


def _numpy(out: Any) -> Any:
    """A forward pass's tensors (or dict of them) as numpy: the pass has finished."""
    return {k: np.asarray(v) for k, v in out.items()} if isinstance(out, dict) else np.asarray(out)


def _ms_per_image(run: Any, size: int) -> float:
    run()
    times = []
    for _ in range(TIMING_REPEATS):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return round(float(np.median(times)) * 1000.0 / size, 4)


# --------------------------------------------------------------------------- both


def export_and_check(bundle: ModelBundle, batch: np.ndarray, *,
                     opset: int = OPSET) -> tuple[bytes | None, ExportInfo]:
    """Export the bundle and check the export on ``batch`` (the evaluate stage's step).

    Args:
        bundle: the model as served (calibrated).
        batch: ``(n, H, W, 1)`` float32 in [0, 1]: the version's preprocessed test images.
        opset: ONNX opset.

    Returns:
        The graph (``None`` when the model cannot be exported) and its :class:`ExportInfo`:
        ``passed`` and the :class:`Equivalence` as ``equivalence`` (or ``{"error": ...}``).
        Only a passed export is meant to travel with the model.
    """
    import tf2onnx

    base = ExportInfo(opset=opset, converter=f"tf2onnx {tf2onnx.__version__}", tta=bundle.contract.tta,
                      outputs=output_names(bundle.contract.task))
    name = bundle.contract.name
    start = time.perf_counter()
    try:
        graph = export_onnx(bundle, opset=opset)
    except ExportError as exc:
        log.warning("%s: no ONNX export (%s); TensorFlow serves it", name, exc)
        return None, replace(base, equivalence={"error": str(exc)})
    seconds = time.perf_counter() - start
    check = check_equivalence(bundle, graph, batch)
    if check.passed:
        log.info("%s: exported to ONNX in %.1f s; on %d test images %s", name, seconds, check.images,
                 _summary(check))
    else:
        log.warning("%s: the ONNX export failed its check (%s); TensorFlow serves it", name, check.reason)
    return graph, replace(base, passed=check.passed, equivalence=check.to_dict())


def _summary(check: Equivalence) -> str:
    """``probabilities within 4.2e-07, decisions agree on 100.0%, smallest mask Dice 1.0000``."""
    diffs = [v for v in (check.max_prob_diff, check.max_mask_prob_diff) if v is not None]
    parts = [f"probabilities within {max(diffs):.1e}"] if diffs else []
    if check.decision_agreement is not None:
        parts.append(f"decisions agree on {check.decision_agreement:.1%}")
    if check.mask_dice_min is not None:
        parts.append(f"smallest mask Dice {check.mask_dice_min:.4f}")
    return ", ".join(parts)
