"""Model builders (classifier, U-Net, lesion-aware classifier), layers, losses, augmentation,
input pipelines, Grad-CAM (the training loop is :mod:`breastscan.training`).

Importing this package registers the custom layers, losses and metrics with Keras, so
``keras.models.load_model(path)`` reloads the project's ``.keras`` files without
``custom_objects``.
"""

from __future__ import annotations

from typing import Any

import keras

from breastscan.models.augment import AugmentConfig, PairAugmenter, augment_pair, build_augmentation
from breastscan.models.classifier import BACKBONES, backbone_layers, build_classifier, last_conv_layer_name
from breastscan.models.layers import BackbonePreprocess, CropResize, GrayToRGB, LesionBox, Standardize
from breastscan.models.losses import BceDiceLoss, DiceCoefficient, DiceLoss, IoUScore
from breastscan.models.roi import build_roi_classifier
from breastscan.models.unet import build_unet

TASKS = ("classification", "segmentation")
"""Tasks accepted by :func:`build_model`."""


def build_model(task: str, **kwargs: Any) -> keras.Model:
    """Build the model for a task.

    Args:
        task: ``"classification"`` (:func:`build_classifier`) or ``"segmentation"``
            (:func:`build_unet`).
        **kwargs: keyword arguments of that builder.

    Returns:
        The built ``keras.Model``.

    Raises:
        ValueError: unknown task.
    """
    if task == "classification":
        return build_classifier(**kwargs)
    if task == "segmentation":
        return build_unet(**kwargs)
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


__all__ = [
    "BACKBONES",
    "TASKS",
    "AugmentConfig",
    "BackbonePreprocess",
    "BceDiceLoss",
    "CropResize",
    "DiceCoefficient",
    "DiceLoss",
    "GrayToRGB",
    "IoUScore",
    "LesionBox",
    "PairAugmenter",
    "Standardize",
    "augment_pair",
    "backbone_layers",
    "build_augmentation",
    "build_classifier",
    "build_model",
    "build_roi_classifier",
    "build_unet",
    "last_conv_layer_name",
]
