"""A 2-D U-Net for binary lesion segmentation, mask logits out.

The input is ``(batch, H, W, 1)`` float32 in [0, 1]; the output, the layer named
``"mask_logits"``, is ``(batch, H, W, 1)`` float32 **logits** (no sigmoid): the sigmoid is
applied inside the losses and metrics (``from_logits=True``, see
:mod:`breastscan.models.losses`) and at inference (``sigmoid(logits) >= 0.5``).
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import keras

from breastscan.models.classifier import BN_MOMENTUM
from breastscan.models.layers import Standardize

logger = logging.getLogger(__name__)



def build_unet(
    *,
    input_shape: tuple[int, int, int] = (128, 128, 1),
    base_filters: int = 16,
    depth: int = 4,
    dropout: float = 0.1,
    normalize: str = "none",
    name: str = "unet",
) -> keras.Model:
    """Build a U-Net (Ronneberger et al. 2015) with batch norm and transposed-conv upsampling.

    Each level has two 3x3 conv-BN-ReLU layers; level ``i`` (0 = full resolution) has
    ``base_filters * 2**i`` filters, the bottleneck ``base_filters * 2**depth``. Dropout is
    applied after the bottleneck and after the deepest encoder level.

    Args:
        input_shape: ``(H, W, C)``; ``H`` and ``W`` must be divisible by ``2**depth``.
        base_filters: filters of the first level (>= 1).
        depth: number of down-sampling steps (>= 1).
        dropout: dropout rate in [0, 1) at the bottom of the network.
        normalize: ``"none"``, or ``"per_image"``: a :class:`Standardize` layer first.
        name: the model's name.

    Returns:
        A ``keras.Model`` mapping ``(batch, H, W, C)`` float32 in [0, 1] to
        ``(batch, H, W, 1)`` float32 mask logits (output layer ``"mask_logits"``).

    Raises:
        ValueError: ``H`` or ``W`` not divisible by ``2**depth``, or a bad argument.
    """
    shape = check_unet_args(input_shape, base_filters=base_filters, depth=depth, dropout=dropout)
    depth, base_filters = int(depth), int(base_filters)
    inputs = keras.Input(shape=shape, name="image")
    x = Standardize(name="standardize")(inputs) if normalize == "per_image" else inputs
    logits = unet_layers(x, base_filters=base_filters, depth=depth, dropout=dropout).mask_logits
    logger.debug("built U-Net %r: input %s, depth %d, base filters %d", name, shape, depth, base_filters)
    return keras.Model(inputs, logits, name=name)


def check_unet_args(input_shape: Any, *, base_filters: int, depth: int, dropout: float) -> tuple[int, ...]:
    """``input_shape`` as a tuple of ints, after checking the U-Net's arguments.

    Raises:
        ValueError: a bad shape, sides not divisible by ``2**depth``, or a bad argument.
    """
    try:
        shape = tuple(int(v) for v in input_shape)
    except (TypeError, ValueError):
        raise ValueError(f"input_shape must be (H, W, C) integers, got {input_shape!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be (H, W, C) with positive sizes, got {input_shape!r}")
    if int(depth) < 1:
        raise ValueError(f"depth must be >= 1, got {depth!r}")
    if int(base_filters) < 1:
        raise ValueError(f"base_filters must be >= 1, got {base_filters!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    factor = 2 ** int(depth)
    height, width = shape[0], shape[1]
    if height % factor or width % factor:
        raise ValueError(
            f"U-Net input height and width must be divisible by 2**depth = {factor} "
            f"(depth={depth}), got {height}x{width}; change the input size or the depth"
        )

    return shape


class UNetTensors(NamedTuple):
    """The tensors of a U-Net built inline by :func:`unet_layers`."""

    bottleneck: Any
    """``(batch, H / 2**depth, W / 2**depth, base_filters * 2**depth)`` deepest features."""
    decoded: tuple[Any, ...]
    """Decoder outputs, coarsest first; the last is ``(batch, H, W, base_filters)``."""
    mask_logits: Any
    """``(batch, H, W, 1)`` float32 mask logits (layer ``"mask_logits"``)."""


def unet_layers(x: Any, *, base_filters: int, depth: int, dropout: float) -> UNetTensors:
    """A U-Net's layers applied inline to ``x`` (``(batch, H, W, C)``, sides divisible by ``2**depth``).

    The body of :func:`build_unet` (which checks the arguments), shared with the multi-task
    model (:func:`breastscan.models.multitask.build_multitask`), so both name their layers alike.
    """
    skips = []
    for level in range(depth):
        x = _conv_block(x, base_filters * 2**level, f"enc{level + 1}")
        if level == depth - 1 and dropout > 0:
            x = keras.layers.Dropout(float(dropout), name=f"enc{level + 1}_dropout")(x)
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, name=f"enc{level + 1}_pool")(x)
    x = _conv_block(x, base_filters * 2**depth, "bottleneck")
    if dropout > 0:
        x = keras.layers.Dropout(float(dropout), name="bottleneck_dropout")(x)
    bottleneck, decoded = x, []
    for level in reversed(range(depth)):
        filters = base_filters * 2**level
        x = keras.layers.Conv2DTranspose(filters, 2, strides=2, padding="same",
                                         name=f"dec{level + 1}_up")(x)
        x = keras.layers.Concatenate(name=f"dec{level + 1}_concat")([x, skips[level]])
        x = _conv_block(x, filters, f"dec{level + 1}")
        decoded.append(x)
    logits = keras.layers.Conv2D(1, 1, name="mask_logits", dtype="float32")(x)
    return UNetTensors(bottleneck, tuple(decoded), logits)


def _conv_block(x: Any, filters: int, prefix: str) -> Any:
    for j in (1, 2):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{prefix}_conv{j}")(x)
        x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{prefix}_bn{j}")(x)
        x = keras.layers.ReLU(name=f"{prefix}_relu{j}")(x)
    return x
