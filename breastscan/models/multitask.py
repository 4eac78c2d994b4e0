"""A multi-task ultrasound model: one encoder, a lesion-mask decoder and a class head.

:func:`build_multitask` is a U-Net (:func:`breastscan.models.unet.unet_layers`, the same
layers and names as the lesion U-Net) whose features also feed a classification head: the
bottleneck, average- and max-pooled, and a decoder level pooled over the lesion the model
outlines (:class:`~breastscan.models.layers.LesionPool`). One forward pass gives both
outputs, trained jointly (:func:`breastscan.training.loop.train_model`: the mask's
BCE + Dice loss and the classes' cross-entropy weighted by the declared
``class_loss_weight``). The encoder learns from every outline and every label at once,
instead of a U-Net and a crop classifier learning apart (the lesion-aware classifier of
:mod:`breastscan.models.roi`).
"""

from __future__ import annotations

import logging
from typing import Any

import keras

from breastscan.models.layers import LesionPool, Standardize
from breastscan.models.unet import check_unet_args, unet_layers

log = logging.getLogger(__name__)

OUTPUTS: tuple[str, str] = ("logits", "mask_logits")
"""The model's outputs, by name: ``(batch, k)`` class logits and ``(batch, H, W, 1)`` mask logits."""


def build_multitask(
    *,
    n_classes: int,
    input_shape: tuple[int, int, int] = (128, 128, 1),
    base_filters: int = 16,
    depth: int = 4,
    dropout: float = 0.3,
    normalize: str = "none",
    name: str = "multitask",
) -> keras.Model:
    """Build an (untrained) multi-task model.

    Args:
        n_classes: classes of the head (>= 2).
        input_shape: ``(H, W, 1)``; ``H`` and ``W`` divisible by ``2**depth``.
        base_filters: filters of the U-Net's first level (>= 1).
        depth: the U-Net's down-sampling steps (>= 1).
        dropout: dropout before the class logits, in [0, 1); the U-Net's own dropout is
            ``min(dropout, 0.1)`` (as the lesion U-Net's).
        normalize: ``"none"``, or ``"per_image"``: a :class:`Standardize` layer first.
        name: the model's name.

    Returns:
        A ``keras.Model`` mapping ``(batch, H, W, 1)`` float32 in [0, 1] to a dict:
        ``"logits"`` ``(batch, n_classes)`` float32 class logits (no softmax) and
        ``"mask_logits"`` ``(batch, H, W, 1)`` float32 mask logits (no sigmoid).

    Raises:
        ValueError: a bad shape or argument.
    """
    if int(n_classes) < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes!r}")
    shape = check_unet_args(input_shape, base_filters=base_filters, depth=depth, dropout=dropout)
    inputs = keras.Input(shape=shape, name="image")
    x = Standardize(name="standardize")(inputs) if normalize == "per_image" else inputs
    unet = unet_layers(x, base_filters=int(base_filters), depth=int(depth), dropout=min(float(dropout), 0.1))
    # the decoder level at half resolution (the full one where depth is 1): lesion texture
    level = unet.decoded[-2] if len(unet.decoded) > 1 else unet.decoded[-1]
    features = keras.layers.Concatenate(name="class_features")([
        keras.layers.GlobalAveragePooling2D(name="class_avg_pool")(unet.bottleneck),
        keras.layers.GlobalMaxPooling2D(name="class_max_pool")(unet.bottleneck),
        LesionPool(name="lesion_pool")([level, unet.mask_logits]),
    ])
    if dropout > 0:
        features = keras.layers.Dropout(float(dropout), name="class_dropout")(features)
    logits = keras.layers.Dense(int(n_classes), name="logits", dtype="float32")(features)
    log.debug("built multi-task model %r: input %s, %d classes", name, shape, n_classes)
    return keras.Model(inputs, {"logits": logits, "mask_logits": unet.mask_logits}, name=name)


def output_model(model: keras.Model, output: str) -> keras.Model:
    """One output of a multi-task model as a model of its own (the same layers and weights).

    Args:
        model: a model built by :func:`build_multitask` (or reloaded).
        output: ``"logits"`` (a classifier) or ``"mask_logits"`` (a segmenter).

    Returns:
        A ``keras.Model`` from the same input to that output alone.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    return keras.Model(model.input, model.get_layer(output).output, name=f"{model.name}_{output}")


def is_multitask(model: Any) -> bool:
    """Whether a Keras model has both outputs of :func:`build_multitask`."""
    names = getattr(model, "output_names", None) or []
    return set(OUTPUTS) <= set(names)
