"""Custom Keras layers that travel inside saved models (gray-to-RGB, input scaling, lesion crops).

Every layer is registered with ``keras.saving.register_keras_serializable`` under the
``breastscan`` package and implements ``get_config``, so a ``.keras`` file reloads with a
plain ``keras.models.load_model(path)`` once :mod:`breastscan.models` has been imported.
No ``Lambda`` layers are used: they cannot be deserialised in Keras' safe mode.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

# ImageNet statistics as used by ``keras.applications.imagenet_utils.preprocess_input``.
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
"""``mode="torch"`` channel means, on the [0, 1] scale."""
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
"""``mode="torch"`` channel standard deviations, on the [0, 1] scale."""
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
"""``mode="caffe"`` channel means (BGR order), on the [0, 255] scale."""

PREPROCESS_MODES = ("raw255", "caffe", "torch", "tf", "identity")
"""Modes of :class:`BackbonePreprocess`."""


@keras.saving.register_keras_serializable(package="breastscan")
class GrayToRGB(keras.layers.Layer):
    """Repeat a single gray channel three times.

    Input ``(batch, H, W, 1)``; output ``(batch, H, W, 3)``, same dtype and values.
    """

    def call(self, inputs: Any) -> Any:
        return ops.concatenate([inputs, inputs, inputs], axis=-1)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        if input_shape[-1] not in (1, None):
            raise ValueError(f"GrayToRGB expects one channel, got input shape {input_shape}")
        return (*input_shape[:-1], 3)


@keras.saving.register_keras_serializable(package="breastscan")
class BackbonePreprocess(keras.layers.Layer):
    """Map ``[0, 1]`` RGB images to the input scale a ``keras.applications`` backbone expects.

    Modes (checked against the Keras 3.15 sources of ``keras.applications``):

    * ``"raw255"``: ``x * 255``. EfficientNet and MobileNetV3 contain their own
      ``Rescaling``/``Normalization`` layers and expect raw pixels in [0, 255].
    * ``"caffe"``: ``x * 255``, RGB -> BGR, minus the ImageNet BGR mean, no scaling
      (ResNet50, ``imagenet_utils.preprocess_input(mode="caffe")``).
    * ``"torch"``: ``(x - mean) / std`` with ImageNet RGB statistics on the [0, 1] scale
      (DenseNet, ``mode="torch"``).
    * ``"tf"``: ``2 * x - 1``, i.e. [-1, 1] (``mode="tf"``: MobileNetV2, Inception, Xception).
    * ``"identity"``: unchanged.

    Input and output ``(batch, H, W, 3)`` float; the input is expected in [0, 1].
    """

    def __init__(self, mode: str = "identity", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mode not in PREPROCESS_MODES:
            raise ValueError(f"unknown preprocessing mode {mode!r}; choose from {PREPROCESS_MODES}")
        self.mode = mode

    def call(self, inputs: Any) -> Any:
        x = ops.cast(inputs, self.compute_dtype)
        if self.mode == "raw255":
            return x * 255.0
        if self.mode == "caffe":
            x = ops.flip(x, axis=-1) * 255.0  # RGB -> BGR
            return x - ops.convert_to_tensor(CAFFE_MEAN_BGR, dtype=self.compute_dtype)
        if self.mode == "torch":
            mean = ops.convert_to_tensor(IMAGENET_MEAN_RGB, dtype=self.compute_dtype)
            std = ops.convert_to_tensor(IMAGENET_STD_RGB, dtype=self.compute_dtype)
            return (x - mean) / std
        if self.mode == "tf":
            return x * 2.0 - 1.0
        return x

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="breastscan")
class Standardize(keras.layers.Layer):
    """Per-image standardisation: zero mean and unit variance over ``H, W, C``.

    Input and output ``(batch, H, W, C)`` float. A constant image maps to zeros.

    Args:
        epsilon: added to the standard deviation to avoid dividing by zero.
    """

    def __init__(self, epsilon: float = 1e-6, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def call(self, inputs: Any) -> Any:
        x = ops.cast(inputs, self.compute_dtype)
        axes = tuple(range(1, len(x.shape)))
        mean = ops.mean(x, axis=axes, keepdims=True)
        std = ops.std(x, axis=axes, keepdims=True)
        return (x - mean) / (std + self.epsilon)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="breastscan")
class LesionBox(keras.layers.Layer):
    """The square box around the lesion a segmenter found, as normalised ``[y1, x1, y2, x2]``.

    Input ``(batch, h, w, 1)`` mask logits; output ``(batch, 4)`` float32 box corners as
    fractions of the image's height and width (they may reach outside [0, 1]: the crop is
    zero-padded there). The box is centred on the bounding box of the pixels whose
    probability is at least ``threshold``; its side is ``margin`` times that bounding box's
    longer side, at least ``min_side`` of the image's longer side, in pixels, so the lesion
    keeps its shape. No lesion pixel: the whole image ``[0, 0, 1, 1]``. Not differentiable
    (a box is a decision), and not trained.

    Args:
        threshold: lesion probability threshold in (0, 1).
        margin: box side over the lesion's longer side (>= 1).
        min_side: smallest box side, a fraction of the image's longer side, in (0, 1].
    """

    def __init__(self, threshold: float = 0.5, margin: float = 1.5, min_side: float = 0.15,
                 **kwargs: Any) -> None:
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        self.threshold, self.margin, self.min_side = float(threshold), float(margin), float(min_side)

    def call(self, inputs: Any) -> Any:
        logits = ops.stop_gradient(ops.cast(inputs, "float32"))
        height, width = int(logits.shape[1]), int(logits.shape[2])
        lesion = ops.cast(ops.sigmoid(logits[..., 0]) >= self.threshold, "float32")  # (b, h, w)
        y1, y2, found_rows = _extent(ops.max(lesion, axis=2))
        x1, x2, _ = _extent(ops.max(lesion, axis=1))
        scale = float(max(height, width))
        side = ops.maximum(ops.maximum(y2 - y1, x2 - x1) * self.margin, self.min_side * scale)
        cy, cx = (y1 + y2) / 2.0, (x1 + x2) / 2.0
        box = ops.stack([(cy - side / 2) / height, (cx - side / 2) / width,
                         (cy + side / 2) / height, (cx + side / 2) / width], axis=-1)
        whole = ops.convert_to_tensor([0.0, 0.0, 1.0, 1.0], "float32")
        return ops.where(found_rows[:, None], box, whole[None, :])

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return (input_shape[0], 4)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "threshold": self.threshold, "margin": self.margin,
                "min_side": self.min_side}


def _extent(profile: Any) -> tuple[Any, Any, Any]:
    """``(first, last + 1, any)`` index of the non-zero entries of ``(batch, n)`` 0/1 profiles."""
    n = int(profile.shape[1])
    positions = ops.cast(ops.arange(n), "float32")[None, :]
    present = profile > 0.5
    first = ops.min(ops.where(present, positions, float(n)), axis=1)
    last = ops.max(ops.where(present, positions, -1.0), axis=1) + 1.0
    return first, last, ops.any(present, axis=1)


@keras.saving.register_keras_serializable(package="breastscan")
class CropResize(keras.layers.Layer):
    """Cut boxes out of images and resize them (bilinear, zero outside the image).

    Inputs ``[images (batch, H, W, C), boxes (batch, 4)]`` with normalised
    ``[y1, x1, y2, x2]`` boxes (:class:`LesionBox`); output ``(batch, *size, C)`` float32.
    TensorFlow backend (``tf.image.crop_and_resize``).

    Args:
        size: ``(height, width)`` of each crop.
    """

    def __init__(self, size: tuple[int, int] = (96, 96), **kwargs: Any) -> None:
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        self.size = (int(size[0]), int(size[1]))

    def call(self, inputs: Any) -> Any:
        import tensorflow as tf

        images, boxes = inputs
        n = tf.shape(images)[0]
        return tf.image.crop_and_resize(tf.cast(images, tf.float32), tf.stop_gradient(boxes),
                                        tf.range(n), self.size, method="bilinear", extrapolation_value=0.0)

    def compute_output_shape(self, input_shape: Any) -> tuple[int | None, ...]:
        images = input_shape[0]
        return (images[0], *self.size, images[-1])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "size": list(self.size)}


@keras.saving.register_keras_serializable(package="breastscan")
class LesionPool(keras.layers.Layer):
    """Average a feature map over the lesion the model itself outlines.

    Inputs ``[features (batch, h, w, c), mask_logits (batch, H, W, 1)]`` with ``H, W``
    multiples of ``h, w``; output ``(batch, c)`` float32: the features' mean weighted by the
    lesion probability (``sigmoid(mask_logits)``, area-averaged down to ``h x w``) plus
    ``floor``, so where the model sees no lesion the pooling tends to a plain average. The
    classification head of :func:`breastscan.models.multitask.build_multitask` reads the
    lesion's features through it, and its gradient reaches the mask.

    Args:
        floor: weight every position keeps, in [0, 1).
    """

    def __init__(self, floor: float = 0.01, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.floor = float(floor)

    def call(self, inputs: Any) -> Any:
        features, mask_logits = inputs
        features = ops.cast(features, "float32")
        weights = ops.sigmoid(ops.cast(mask_logits, "float32"))
        factor = (int(mask_logits.shape[1]) // int(features.shape[1]),
                  int(mask_logits.shape[2]) // int(features.shape[2]))
        if factor != (1, 1):
            weights = ops.average_pool(weights, pool_size=factor, strides=factor, padding="valid")
        weights = weights + self.floor
        total = ops.sum(features * weights, axis=(1, 2))
        return total / ops.sum(weights, axis=(1, 2))

    def compute_output_shape(self, input_shape: Any) -> tuple[int | None, ...]:
        features = input_shape[0]
        return (features[0], features[-1])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "floor": self.floor}
