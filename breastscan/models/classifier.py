"""Image classifiers: a compact CPU-sized CNN or a ``keras.applications`` backbone, logits out.

The model's input is ``(batch, H, W, 1)`` float32 in [0, 1] (what
:func:`breastscan.imaging.preprocessing.preprocess_image` produces); its output, the layer named
``"logits"``, is ``(batch, n_classes)`` float32 **logits, no softmax**, so that a calibration
temperature can be applied afterwards (``softmax(logits / T)``, see
:func:`breastscan.evaluation.metrics.fit_temperature`). Train with
``keras.losses.SparseCategoricalCrossentropy(from_logits=True)``.

``keras.applications`` backbones are built *inline* (via ``input_tensor``), so their layers
are layers of the returned model: the last convolutional feature map is reachable by name
(:func:`last_conv_layer_name`, for Grad-CAM) and freezing works layer by layer.
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from breastscan.config import BACKBONES
from breastscan.models.layers import BackbonePreprocess, GrayToRGB, Standardize

logger = logging.getLogger(__name__)


_COMPACT_WIDTHS = (1, 2, 4, 6, 8)  # filters of the compact blocks, in units of base_filters
_APP_MIN_SIDE = 32  # five stride-2 stages in every keras.applications backbone
_PREPROCESSING_LAYERS = (GrayToRGB, BackbonePreprocess, Standardize)



BN_MOMENTUM = 0.9
"""Batch-norm moving-average momentum of the project's own blocks.

Keras' default 0.99 needs thousands of steps to settle; on datasets of a few hundred images
(a dozen steps per epoch) the moving statistics lag far behind and the model in inference
mode is much worse than in training mode.
"""

@dataclass(frozen=True)
class _AppSpec:
    constructor: str  # attribute of keras.applications
    preprocess_mode: str  # BackbonePreprocess mode
    extra: tuple[tuple[str, Any], ...] = ()


# Input scaling checked in keras/src/applications (Keras 3.15): EfficientNet and MobileNetV3
# rescale inside the model and expect [0, 255]; ResNet50 uses mode="caffe"; DenseNet uses
# mode="torch".
_APPS: dict[str, _AppSpec] = {
    "mobilenetv3small": _AppSpec("MobileNetV3Small", "raw255", (("include_preprocessing", True),)),
    "efficientnetb0": _AppSpec("EfficientNetB0", "raw255"),
    "resnet50": _AppSpec("ResNet50", "caffe"),
    "densenet121": _AppSpec("DenseNet121", "torch"),
    "densenet201": _AppSpec("DenseNet201", "torch"),
}


def build_classifier(
    *,
    n_classes: int,
    input_shape: tuple[int, int, int] = (128, 128, 1),
    backbone: str = "compact",
    weights: str = "none",
    freeze: float | int = 0,
    dropout: float = 0.2,
    base_filters: int = 16,
    normalize: str = "none",
    name: str = "classifier",
) -> keras.Model:
    """Build an (untrained unless ``weights`` says otherwise) image classifier.

    Args:
        n_classes: number of classes (>= 2; a binary task uses two logits).
        input_shape: ``(H, W, C)`` of one input image, ``C`` = 1 (gray, the project's
            contract) or 3. ``keras.applications`` backbones need ``H, W >= 32``; the
            compact one ``H, W >= 16``.
        backbone: one of :data:`BACKBONES`. ``"compact"`` is a small 5-block CNN
            (``base_filters`` x 1-2-4-6-8 filters: 16-32-64-96-128 and ~190k parameters
            by default, average and max pooled) sized for a 2-core CPU; the others are
            ``keras.applications`` models (``include_top=False, pooling="avg"``) fed
            through :class:`GrayToRGB` and :class:`BackbonePreprocess`.
        weights: ``"none"`` (random initialisation), ``"imagenet"`` (keras.applications
            backbones only; downloaded by Keras or read from its cache ``~/.keras/models``),
            or the path of saved weights: a ``.weights.h5`` file written by
            ``model.save_weights`` or a ``.keras`` model (layers are matched by name; every
            backbone layer must match, the head is loaded too when its shape matches and
            otherwise keeps its random initialisation), or for keras.applications backbones
            a legacy ``.h5`` file of the bare backbone (e.g. Keras' ``*_notop.h5`` ImageNet
            file copied by hand).
        freeze: backbone layers made non-trainable, counted from the input: an ``int`` is a
            number of layers, a ``float`` in [0, 1] a fraction of them (rounded down).
            Frozen ``BatchNormalization`` layers run in inference mode (Keras 3 uses the
            moving statistics when ``trainable=False``), the usual fine-tuning practice.
            The head (dropout, logits) always stays trainable.
        dropout: dropout rate before the logits layer, in [0, 1).
        base_filters: filters of the compact backbone's first block (>= 1; the cost of a
            training step grows about with its square). Ignored by the other backbones.
        normalize: ``"none"``, or ``"per_image"``: a :class:`Standardize` layer first (each
            image to zero mean and unit variance; compact backbone only).
        name: the model's name.

    Returns:
        A ``keras.Model`` mapping ``(batch, H, W, C)`` float32 in [0, 1] to
        ``(batch, n_classes)`` float32 logits (output layer ``"logits"``, no softmax).

    Raises:
        ValueError: unknown backbone, bad shape/argument, ``"imagenet"`` for the compact
            backbone, or a weights file that does not fit the backbone.
        FileNotFoundError: ``weights`` is a path that does not exist.
        RuntimeError: ImageNet weights could not be downloaded or read.

    Note:
        Keras' EfficientNet inserts an extra ``Rescaling`` layer only when it is built with
        ``weights="imagenet"`` (keras-team/keras, tensorflow/tensorflow#49930). A model
        built from a path uses the plain architecture, so to continue from an EfficientNet
        that started from ImageNet, load its ``.keras`` file directly instead.
    """
    backbone = str(backbone).strip().lower()
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    if isinstance(n_classes, bool) or not isinstance(n_classes, numbers.Integral) or n_classes < 2:
        raise ValueError(f"n_classes must be an integer >= 2, got {n_classes!r}")
    if isinstance(base_filters, bool) or not isinstance(base_filters, numbers.Integral) or base_filters < 1:
        raise ValueError(f"base_filters must be an integer >= 1, got {base_filters!r}")
    compact_min = 2 ** (len(_COMPACT_WIDTHS) - 1)  # one max-pool between blocks
    shape = _check_input_shape(input_shape, min_side=compact_min if backbone == "compact" else _APP_MIN_SIDE)
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    weights_path = _parse_weights(weights, backbone)

    inputs = keras.Input(shape=shape, name="image")
    logits = classifier_logits(inputs, n_classes=int(n_classes), backbone=backbone, weights=weights,
                               dropout=dropout, base_filters=int(base_filters), normalize=normalize)
    model = keras.Model(inputs, logits, name=name)

    if weights_path is not None and not _is_legacy_h5(weights_path):
        _load_path_weights(model, weights_path, backbone)
    n_frozen = _freeze(backbone_layers(model), freeze)
    logger.debug("built %s classifier %r: %d classes, input %s, %d backbone layers frozen",
                 backbone, name, n_classes, shape, n_frozen)
    return model


def classifier_logits(inputs: Any, *, n_classes: int, backbone: str = "compact", weights: str = "none",
                      dropout: float = 0.2, base_filters: int = 16, normalize: str = "none") -> Any:
    """The classifier's layers applied inline to a ``(batch, H, W, C)`` tensor in [0, 1].

    The body of :func:`build_classifier` (which checks the arguments), also used where the
    classifier's input is computed inside a bigger model (a lesion crop,
    :func:`breastscan.models.roi.build_roi_classifier`), so Grad-CAM finds its layers.

    Returns:
        The ``(batch, n_classes)`` float32 logits tensor (layer ``"logits"``).
    """
    x = inputs
    if normalize == "per_image":
        if backbone != "compact":
            raise ValueError("normalize: per_image is for the compact backbone (the others scale "
                             "their input as their weights expect)")
        x = Standardize(name="standardize")(x)
    if backbone == "compact":
        pooled = _compact_features(x, int(base_filters))
    else:
        weights_path = _parse_weights(weights, backbone)
        app_weights: str | None = None
        if weights_path is None and str(weights).lower() == "imagenet":
            app_weights = "imagenet"
        elif weights_path is not None and _is_legacy_h5(weights_path):
            app_weights = str(weights_path)
        pooled = _application_features(x, backbone, app_weights)
    if dropout > 0:
        pooled = keras.layers.Dropout(float(dropout), name="dropout")(pooled)
    return keras.layers.Dense(int(n_classes), name="logits", dtype="float32")(pooled)


def backbone_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The feature-extractor layers of a classifier, in the model's (topological) order.

    These are the layers :func:`build_classifier`'s ``freeze`` counts: everything from the
    first layer after the input and the fixed preprocessing layers (:class:`GrayToRGB`,
    :class:`BackbonePreprocess`, :class:`Standardize`) up to and including the last layer
    with a 4-D output (see :func:`last_conv_layer_name`).

    Args:
        model: a model built by :func:`build_classifier` (or reloaded from ``.keras``).

    Returns:
        The backbone layers, input side first.
    """
    layers = model.layers
    last = layers.index(model.get_layer(last_conv_layer_name(model)))
    return [
        layer for layer in layers[: last + 1]
        if not isinstance(layer, (keras.layers.InputLayer, *_PREPROCESSING_LAYERS))
    ]


def last_conv_layer_name(model: keras.Model) -> str:
    """Name of the last layer with a 4-D ``(batch, h, w, c)`` output: the feature map before pooling.

    This is the layer Grad-CAM differentiates against.

    Args:
        model: a functional model whose backbone is inline (as built by
            :func:`build_classifier`; a U-Net gives its ``"mask_logits"`` layer).

    Returns:
        The layer's name.

    Raises:
        ValueError: the model has no 4-D layer output, or its backbone is a nested model
            (Grad-CAM then needs the nested model's own layers).
    """
    for layer in reversed(model.layers):
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.Model):
            raise ValueError(
                f"layer {layer.name!r} of {model.name!r} is a nested model; "
                "build the backbone inline (as build_classifier does) to find its last conv layer"
            )
        try:
            out_shape = layer.output.shape
        except (AttributeError, ValueError):  # not connected, or shared by several nodes
            continue
        if len(out_shape) == 4:
            return str(layer.name)
    raise ValueError(f"model {model.name!r} has no layer with a 4-D output")


# --------------------------------------------------------------------------- backbones


def _compact_features(inputs: Any, base_filters: int) -> Any:
    """Conv-BN-ReLU blocks (``base_filters`` x ``_COMPACT_WIDTHS``), max-pooling between them,
    then both global average and global max pooling, concatenated.

    The max-pooled half answers "is there a small bright mass anywhere", which averaging
    over a whole breast dilutes; the average half carries global texture (density).
    """
    x = inputs
    for i, width in enumerate(_COMPACT_WIDTHS, start=1):
        x = keras.layers.Conv2D(base_filters * width, 3, padding="same", use_bias=False,
                                name=f"block{i}_conv")(x)
        x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"block{i}_bn")(x)
        x = keras.layers.ReLU(name=f"block{i}_relu")(x)
        if i < len(_COMPACT_WIDTHS):
            x = keras.layers.MaxPooling2D(2, name=f"block{i}_pool")(x)
    avg = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    peak = keras.layers.GlobalMaxPooling2D(name="max_pool")(x)
    return keras.layers.Concatenate(name="pooled")([avg, peak])


def _application_features(inputs: Any, backbone: str, weights: str | None) -> Any:
    """Build a keras.applications backbone inline on ``inputs``; return its pooled output."""
    spec = _APPS[backbone]
    x = inputs
    if inputs.shape[-1] == 1:
        x = GrayToRGB(name="gray_to_rgb")(x)
    x = BackbonePreprocess(spec.preprocess_mode, name="backbone_preprocess")(x)
    constructor: Callable[..., keras.Model] = getattr(keras.applications, spec.constructor)
    kwargs: dict[str, Any] = dict(
        include_top=False,
        weights=weights,
        input_tensor=x,
        input_shape=(*inputs.shape[1:3], 3),
        pooling="avg",
        **dict(spec.extra),
    )
    if weights != "imagenet":
        return constructor(**kwargs).output
    try:
        app = constructor(**kwargs)
    except Exception as exc:  # Keras wraps URLError/HTTPError in a bare Exception
        if _is_download_failure(exc):
            raise RuntimeError(
                f"ImageNet weights for backbone {backbone!r} could not be downloaded ({exc}). "
                "The machine must reach the internet (storage.googleapis.com), or the weights "
                "file must already be in the Keras cache (~/.keras/models, or $KERAS_HOME/models). "
                "Otherwise use `weights: none` (random initialisation) or the local path of a "
                "weights file (.weights.h5, .keras, or Keras' *_notop.h5 file)."
            ) from exc
        raise
    return app.output


def _is_download_failure(exc: BaseException) -> bool:
    if isinstance(exc, OSError) or "URL fetch failure" in str(exc):
        return True
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "get_file":
            return True
        tb = tb.tb_next
    return False


# --------------------------------------------------------------------------- weights


def _parse_weights(weights: str | None, backbone: str) -> Path | None:
    """Validate ``weights``; return the path for a file, ``None`` for "none"/"imagenet"."""
    if weights is None or (isinstance(weights, str) and weights.lower() == "none"):
        return None
    if not isinstance(weights, (str, Path)):
        raise ValueError(f"weights must be 'none', 'imagenet' or a path, got {weights!r}")
    if str(weights).lower() == "imagenet":
        if backbone == "compact":
            raise ValueError(
                "the compact backbone has no ImageNet weights; use weights 'none' or the path of "
                "a saved model/weights file (ImageNet weights exist for: "
                f"{', '.join(b for b in BACKBONES if b != 'compact')})"
            )
        return None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file not found: {path} (weights must be 'none', 'imagenet' or the path of a "
            ".weights.h5 file or a .keras model)"
        )
    name = path.name.lower()
    if name.endswith(".keras") or name.endswith(".weights.h5"):
        return path
    if name.endswith(".h5") and backbone != "compact":
        return path
    raise ValueError(
        f"unsupported weights file {path}: expected a .weights.h5 file or a .keras model"
        + ("" if backbone == "compact" else " (or a legacy .h5 file of the bare backbone)")
    )


def _is_legacy_h5(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".h5") and not name.endswith(".weights.h5")


def _load_path_weights(model: keras.Model, path: Path, backbone: str) -> None:
    if path.name.lower().endswith(".keras"):
        _copy_weights_by_name(model, path, backbone)
    else:
        _load_weights_file(model, path, backbone)


def _copy_weights_by_name(model: keras.Model, path: Path, backbone: str) -> None:
    """Copy weights from a saved ``.keras`` model, layer by layer, matched by name."""
    source = keras.models.load_model(path, compile=False)
    source_layers = {layer.name: layer for layer in _walk_layers(source)}
    in_backbone = {id(layer) for layer in backbone_layers(model)}
    missing: list[str] = []
    kept: list[str] = []
    for layer in model.layers:
        if not layer.weights:
            continue
        src = source_layers.get(layer.name)
        if src is None or [tuple(w.shape) for w in src.weights] != [tuple(w.shape) for w in layer.weights]:
            (missing if id(layer) in in_backbone else kept).append(layer.name)
            continue
        layer.set_weights(src.get_weights())
    if missing:
        raise ValueError(
            f"{path} does not hold weights for backbone {backbone!r}: {len(missing)} backbone "
            f"layers are missing or have other shapes (first: {', '.join(missing[:5])})"
        )
    if kept:
        logger.info("layers %s not found in %s with matching shapes: kept their random init",
                    ", ".join(kept), path)
    if backbone == "efficientnetb0":
        n_src = sum(isinstance(lay, keras.layers.Rescaling) for lay in source_layers.values())
        n_new = sum(isinstance(lay, keras.layers.Rescaling) for lay in model.layers)
        if n_src != n_new:
            logger.warning(
                "%s was built with weights='imagenet', whose EfficientNet has an extra Rescaling "
                "layer; the new model does not, so its inputs are scaled differently", path
            )


def _load_weights_file(model: keras.Model, path: Path, backbone: str) -> None:
    """Load a ``.weights.h5`` file; when the head does not fit, load the backbone only."""
    try:
        with warnings.catch_warnings():  # Keras warns about every group it skips before failing
            warnings.simplefilter("ignore")
            model.load_weights(path)
        return
    except ValueError as exc:
        first_error = exc
    # Mark every float weight with NaN, load what fits, then see what is still NaN.
    snapshot = {id(layer): layer.get_weights() for layer in model.layers if layer.weights}
    for layer in model.layers:
        if layer.weights:
            layer.set_weights([
                np.full(w.shape, np.nan, w.dtype) if np.issubdtype(w.dtype, np.floating) else w
                for w in layer.get_weights()
            ])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.load_weights(path, skip_mismatch=True)
    except ValueError:
        raise ValueError(f"{path} does not fit backbone {backbone!r}: {first_error}") from first_error
    in_backbone = {id(layer) for layer in backbone_layers(model)}
    missing: list[str] = []
    kept: list[str] = []
    for layer in model.layers:
        if not layer.weights:
            continue
        values = layer.get_weights()
        if any(np.issubdtype(v.dtype, np.floating) and np.isnan(v).any() for v in values):
            (missing if id(layer) in in_backbone else kept).append(layer.name)
            layer.set_weights(snapshot[id(layer)])
    if missing:
        raise ValueError(
            f"{path} does not hold weights for backbone {backbone!r}: {len(missing)} backbone "
            f"layers could not be loaded (first: {', '.join(missing[:5])}); Keras said: {first_error}"
        )
    logger.info("loaded the backbone from %s; layers %s kept their random init", path, ", ".join(kept))


def _walk_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """All layers, descending into nested models."""
    out: list[keras.layers.Layer] = []
    for layer in model.layers:
        out.append(layer)
        if isinstance(layer, keras.Model):
            out.extend(_walk_layers(layer))
    return out


# --------------------------------------------------------------------------- helpers


def _check_input_shape(input_shape: Any, *, min_side: int) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in input_shape)
    except (TypeError, ValueError):
        raise ValueError(f"input_shape must be (H, W, C) integers, got {input_shape!r}") from None
    if len(shape) != 3 or shape[2] not in (1, 3):
        raise ValueError(f"input_shape must be (H, W, 1) or (H, W, 3), got {input_shape!r}")
    if min(shape[:2]) < min_side:
        raise ValueError(f"input height and width must be at least {min_side}, got {shape[:2]}")
    return shape[0], shape[1], shape[2]


def _freeze(layers: list[keras.layers.Layer], freeze: float | int) -> int:
    """Make the first layers non-trainable; return how many."""
    if isinstance(freeze, bool) or not isinstance(freeze, numbers.Real):
        raise ValueError(f"freeze must be an int (layers) or a float in [0, 1] (fraction), got {freeze!r}")
    if isinstance(freeze, numbers.Integral):
        n = int(freeze)
        if not 0 <= n <= len(layers):
            raise ValueError(f"freeze={n} is out of range: the backbone has {len(layers)} layers")
    else:
        if not 0.0 <= float(freeze) <= 1.0:
            raise ValueError(f"a float freeze is a fraction in [0, 1], got {freeze!r}")
        n = math.floor(float(freeze) * len(layers))
    for layer in layers[:n]:
        layer.trainable = False
    return n
