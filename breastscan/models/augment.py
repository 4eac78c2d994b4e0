"""Training-time data augmentation with Keras preprocessing layers (tf.data only).

Augmentation runs in the ``tf.data`` training pipeline, never inside a saved model, so a
served model sees exactly the preprocessed image. Images are ``(H, W, 1)`` or
``(batch, H, W, 1)`` float32 in [0, 1] and stay in [0, 1].

For segmentation, :func:`augment_pair` applies one geometric transform to an image and its
mask (they are stacked on the channel axis and transformed together), photometric changes
to the image only, and re-binarises the mask at 0.5.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import keras
from keras import ops

from breastscan.config import AugmentConfig


def _seed(seed: int | None, offset: int) -> int | None:
    return None if seed is None else int(seed) + offset


def _geometric_layers(cfg: AugmentConfig, seed: int | None) -> list[keras.layers.Layer]:
    layers: list[keras.layers.Layer] = []
    if cfg.flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=_seed(seed, 0)))
    if cfg.rotation_deg > 0:
        layers.append(keras.layers.RandomRotation(
            cfg.rotation_deg / 360.0, fill_mode="constant", fill_value=0.0,
            interpolation="bilinear", seed=_seed(seed, 1),
        ))
    if cfg.zoom > 0:
        layers.append(keras.layers.RandomZoom(
            (-cfg.zoom, cfg.zoom), fill_mode="constant", fill_value=0.0,
            interpolation="bilinear", seed=_seed(seed, 2),
        ))
    return layers


def _photometric_layers(cfg: AugmentConfig, seed: int | None) -> list[keras.layers.Layer]:
    layers: list[keras.layers.Layer] = []
    # Both layers clip their output to value_range, so values stay in [0, 1].
    if cfg.brightness > 0:
        layers.append(keras.layers.RandomBrightness(cfg.brightness, value_range=(0.0, 1.0),
                                                    seed=_seed(seed, 3)))
    if cfg.contrast > 0:
        layers.append(keras.layers.RandomContrast(cfg.contrast, value_range=(0.0, 1.0),
                                                  seed=_seed(seed, 4)))
    if cfg.noise > 0:  # active in training only; clipped back to [0, 1] below
        layers.append(keras.layers.GaussianNoise(cfg.noise, seed=_seed(seed, 5)))
    if cfg.speckle > 0:
        layers.append(Speckle(cfg.speckle, seed=_seed(seed, 6), name="speckle"))
    return layers


def build_augmentation(cfg: AugmentConfig, *, seed: int | None = None) -> keras.Sequential:
    """Build the image augmentation for the classification training pipeline.

    Call it with ``training=True`` inside ``tf.data.Dataset.map``; do not put it in the
    served model.

    Args:
        cfg: which transforms and how strong.
        seed: base seed (each layer gets ``seed + i``); ``None`` for non-reproducible.

    Returns:
        A ``keras.Sequential`` mapping ``(batch, H, W, C)`` (or ``(H, W, C)``) float32 in
        [0, 1] to the same shape in [0, 1]: horizontal flip, rotation, zoom (geometric, zero
        fill), then brightness, contrast, additive Gaussian noise and multiplicative speckle
        (clipped). With everything switched off it is an identity.
    """
    layers = _geometric_layers(cfg, seed) + _photometric_layers(cfg, seed)
    if not layers:
        layers = [keras.layers.Identity(name="no_augmentation")]
    elif cfg.noise > 0 or cfg.speckle > 0:
        layers.append(_Clip01(name="clip01"))
    return keras.Sequential(layers, name="augmentation")


class Speckle(keras.layers.Layer):
    """Multiplicative Gaussian noise ``x * (1 + stddev * n)``, ``n ~ N(0, 1)`` per pixel.

    Ultrasound speckle is multiplicative: it grows with the echo's amplitude, so bright tissue
    is grainier than dark fluid, which additive noise does not mimic. Active with
    ``training=True`` only (identity otherwise); training pipeline only, never saved.

    Args:
        stddev: noise strength in [0, 1).
        seed: seed of the noise; ``None`` for non-reproducible.
    """

    def __init__(self, stddev: float, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stddev = float(stddev)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs: Any, training: bool = False) -> Any:
        if not training or self.stddev <= 0:
            return inputs
        noise = keras.random.normal(ops.shape(inputs), stddev=self.stddev, seed=self.seed_generator)
        return inputs * (1.0 + ops.cast(noise, inputs.dtype))


class _Clip01(keras.layers.Layer):
    """Clip to [0, 1] (after additive noise); training pipeline only, never saved."""

    def call(self, inputs: Any) -> Any:
        return ops.clip(inputs, 0.0, 1.0)


class PairAugmenter:
    """Augment an image and its mask with the same geometric transform.

    Build once (its random layers hold their seed state) and call inside
    ``tf.data.Dataset.map``.

    Args:
        cfg: which transforms and how strong.
        seed: base seed; ``None`` for non-reproducible.
    """

    def __init__(self, cfg: AugmentConfig, *, seed: int | None = None) -> None:
        self.cfg = cfg
        self.geometric = _geometric_layers(cfg, seed)
        self.photometric = _photometric_layers(cfg, seed)

    def __call__(self, image: Any, mask: Any) -> tuple[Any, Any]:
        """Apply the augmentation.

        Args:
            image: ``(batch, H, W, C)`` or ``(H, W, C)`` float in [0, 1].
            mask: same leading shape with one channel, in {0, 1}.

        Returns:
            ``(image, mask)``: float32, same shapes; image in [0, 1], mask in {0, 1}.
        """
        image = ops.cast(image, "float32")
        mask = ops.cast(mask, "float32")
        channels = image.shape[-1]
        if channels is None:
            raise ValueError("augment_pair needs a static channel count for the image")
        if self.geometric:
            stacked = ops.concatenate([image, mask], axis=-1)
            for layer in self.geometric:
                stacked = layer(stacked, training=True)
            image = stacked[..., :channels]
            mask = stacked[..., channels:]
        for layer in self.photometric:
            image = layer(image, training=True)
        image = ops.clip(image, 0.0, 1.0)
        mask = ops.cast(mask >= 0.5, "float32")
        return image, mask


@functools.lru_cache(maxsize=16)
def _cached_pair_augmenter(cfg: AugmentConfig, seed: int | None) -> PairAugmenter:
    return PairAugmenter(cfg, seed=seed)


def augment_pair(image: Any, mask: Any, cfg: AugmentConfig, seed: int | None = None) -> tuple[Any, Any]:
    """Augment an image and its mask with the same geometric transform.

    Convenience wrapper around a cached :class:`PairAugmenter` (one per ``(cfg, seed)``), so
    that repeated calls draw fresh random transforms instead of re-creating the layers.
    Works on batched ``(batch, H, W, 1)`` tensors inside ``tf.data.Dataset.map``.

    Args:
        image: ``(batch, H, W, C)`` or ``(H, W, C)`` float in [0, 1].
        mask: same leading shape with one channel, in {0, 1}.
        cfg: which transforms and how strong.
        seed: base seed; ``None`` for non-reproducible.

    Returns:
        ``(image, mask)``: float32, same shapes; image in [0, 1], mask in {0, 1}.
    """
    return _cached_pair_augmenter(cfg, seed)(image, mask)


def make_pair_augmenter(
    cfg: AugmentConfig, *, seed: int | None = None
) -> Callable[[Any, Any], tuple[Any, Any]]:
    """Return a new :class:`PairAugmenter` (for ``dataset.map(make_pair_augmenter(cfg))``)."""
    return PairAugmenter(cfg, seed=seed)
