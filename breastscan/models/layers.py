"""Custom Keras layers that travel inside saved models (gray-to-RGB, backbone input scaling).

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
