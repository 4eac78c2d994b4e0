"""Lesion-aware classification: segment, crop the lesion's neighbourhood, classify the crop.

:func:`build_roi_classifier` composes one Keras model from a trained U-Net and a fresh
classifier: ``image (H, W, 1) -> resize to the U-Net's size -> mask logits -> LesionBox ->
CropResize of the full-resolution image -> classifier -> logits``. It maps the same input to
the same kind of output as :func:`breastscan.models.build_classifier`, so it is trained,
saved, calibrated, evaluated and served like any other classifier. The U-Net is frozen
inside it: only the classifier learns from the class labels.

:func:`segmenter_data` prepares the U-Net's training phase from a classifier's split,
:func:`lesion_crops` the classifier's (the crops of the trained U-Net, computed once: the
classifier then trains as any other, on augmented crops), and :func:`copy_classifier_weights`
moves the trained classifier into the composed model.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from breastscan.models.classifier import classifier_logits
from breastscan.models.layers import CropResize, LesionBox

if TYPE_CHECKING:
    from breastscan.config import ModelConfig, RoiConfig
    from breastscan.data.loading import SplitData

log = logging.getLogger(__name__)

SEGMENTER_LAYER = "segmenter"
"""Name of the nested U-Net inside a lesion-aware classifier."""
BOX_LAYER = "lesion_box"
"""Name of its :class:`~breastscan.models.layers.LesionBox` layer (Grad-CAM pastes into it)."""


def build_roi_classifier(segmenter: keras.Model, cfg: ModelConfig) -> keras.Model:
    """A classifier that sees only the lesion its frozen ``segmenter`` finds.

    Args:
        segmenter: a U-Net mapping ``(batch, *cfg.roi.seg_size, 1)`` in [0, 1] to mask logits
            of the same size (trained; frozen here).
        cfg: the classifier's declaration; ``cfg.roi`` says the crop, ``cfg.input_shape`` the
            full-resolution input, the other fields the classifier on the crop.

    Returns:
        A ``keras.Model`` mapping ``(batch, H, W, 1)`` float32 in [0, 1] to
        ``(batch, n_classes)`` float32 logits (layer ``"logits"``).

    Raises:
        ValueError: ``cfg`` has no ``roi``.
    """
    roi = cfg.roi
    if roi is None:
        raise ValueError(f"model {cfg.name} declares no roi")
    segmenter = _uncompiled_copy(segmenter, SEGMENTER_LAYER)  # no optimizer state in the bundle
    segmenter.trainable = False
    crops = crop_model(segmenter, cfg)
    logits = classifier_logits(crops.output, n_classes=len(cfg.classes), backbone=cfg.backbone,
                               weights=cfg.weights,
                               dropout=cfg.dropout, base_filters=cfg.base_filters, normalize=cfg.normalize)
    return keras.Model(crops.input, logits, name=cfg.name)


def _uncompiled_copy(model: keras.Model, name: str) -> keras.Model:
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return keras.Model(copy.input, copy.output, name=name)


def segmenter_data(data: SplitData, size: tuple[int, int]) -> SplitData:
    """A classifier split's images and lesion masks at the U-Net's size.

    Args:
        data: a split loaded with masks (``data.masks``, :func:`breastscan.data.loading.load_split`
            of a model with ``roi``).
        size: ``(h, w)`` of the U-Net.

    Returns:
        A segmentation split: images ``(n, h, w, 1)`` in [0, 1] (area-resized as inside the
        model) and masks ``(n, h, w, 1)`` in {0, 1}.

    Raises:
        ValueError: the split has no masks.
    """
    if data.masks is None:
        raise ValueError("a lesion-aware classifier needs the lesion masks of its training rows")
    resize = keras.layers.Resizing(*size, interpolation="area")
    images = np.asarray(resize(data.images), np.float32) if len(data) else np.zeros((0, *size, 1), np.float32)
    masks = np.asarray(resize(data.masks), np.float32) if len(data) else images
    return replace(data, images=np.clip(images, 0.0, 1.0), targets=(masks >= 0.5).astype(np.float32),
                   masks=None)


def lesion_boxes(model: keras.Model, batch: Any) -> np.ndarray | None:
    """``(n, 4)`` normalised ``[y1, x1, y2, x2]`` lesion boxes of a lesion-aware classifier, else ``None``."""
    try:
        layer = model.get_layer(BOX_LAYER)
    except ValueError:
        return None
    return np.asarray(keras.Model(model.input, layer.output)(batch, training=False), np.float32)


def crop_config(cfg: ModelConfig) -> ModelConfig:
    """The declaration of a lesion-aware classifier's second phase: a plain classifier of crops."""
    roi: RoiConfig = cfg.roi  # type: ignore[assignment]
    spec = replace(cfg.preprocess, height=roi.crop_size[0], width=roi.crop_size[1])
    return replace(cfg, roi=None, preprocess=spec)


def crop_model(segmenter: keras.Model, cfg: ModelConfig) -> keras.Model:
    """``(batch, H, W, 1)`` images -> ``(batch, *cfg.roi.crop_size, 1)`` lesion crops (no classifier)."""
    roi: RoiConfig = cfg.roi  # type: ignore[assignment]
    inputs = keras.Input(shape=cfg.input_shape, name="image")
    small = inputs
    if tuple(cfg.input_shape[:2]) != tuple(roi.seg_size):
        small = keras.layers.Resizing(*roi.seg_size, interpolation="area", name="segmenter_input")(inputs)
    box = LesionBox(roi.threshold, roi.margin, roi.min_side, name=BOX_LAYER)(segmenter(small, training=False))
    return keras.Model(inputs, CropResize(roi.crop_size, name="lesion_crop")([inputs, box]))


def lesion_crops(segmenter: keras.Model, cfg: ModelConfig, data: SplitData,
                 batch_size: int = 64) -> SplitData:
    """The split as the classifier inside the composed model sees it: each image's lesion crop.

    Args:
        segmenter: the trained U-Net.
        cfg: the lesion-aware classifier's declaration.
        data: images ``(n, H, W, 1)`` in [0, 1] with their class targets.
        batch_size: images per forward pass.

    Returns:
        The same rows with images ``(n, *cfg.roi.crop_size, 1)`` float32 in [0, 1] (no masks).
    """
    roi: RoiConfig = cfg.roi  # type: ignore[assignment]
    if not len(data):
        return replace(data, images=np.zeros((0, *roi.crop_size, 1), np.float32), masks=None)
    model = crop_model(segmenter, cfg)
    crops = np.concatenate([np.asarray(model(data.images[i:i + batch_size], training=False), np.float32)
                            for i in range(0, len(data), batch_size)])
    return replace(data, images=np.clip(crops, 0.0, 1.0), masks=None)


def copy_classifier_weights(source: keras.Model, target: keras.Model) -> int:
    """Copy every weighted layer of a crop classifier into the composed model (matched by name).

    Returns:
        The number of layers copied.

    Raises:
        ValueError: a weighted layer of ``source`` has no same-named layer in ``target``.
    """
    copied = 0
    for layer in source.layers:
        if not layer.weights:
            continue
        try:
            target.get_layer(layer.name).set_weights(layer.get_weights())
        except ValueError:
            raise ValueError(f"layer {layer.name!r} of {source.name!r} is not in {target.name!r}") from None
        copied += 1
    return copied
