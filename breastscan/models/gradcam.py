"""Grad-CAM heatmaps of a classifier and the overlays the service returns with them.

:func:`grad_cam` implements Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from
Deep Networks via Gradient-based Localization", ICCV 2017): the gradient of one class logit
with respect to the last convolutional feature map, averaged over space, weights that
feature map's channels; the weighted sum, passed through a ReLU, is the class's heatmap.
It differentiates the **logits** (the layer ``"logits"`` of
:func:`breastscan.models.build_classifier`), not the softmax, as the paper does: the
calibration temperature only rescales them, so it cannot change the map.

:func:`breastscan.imaging.overlay.overlay` draws the heatmaps over the image for display.

TensorFlow and Keras are imported inside the functions; importing this module is cheap.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

_EPS = 1e-12


def grad_cam(
    model: keras.Model,
    batch: np.ndarray,
    class_index: np.ndarray | int | None = None,
    layer: str | None = None,
) -> np.ndarray:
    """Grad-CAM heatmaps of a batch, at the model's input size.

    Args:
        model: a functional classifier mapping ``(n, H, W, C)`` to ``(n, k)`` logits, whose
            feature map ``layer`` is a layer of the model itself (as
            :func:`breastscan.models.build_classifier` builds them, keras.applications
            backbones included). Needs the TensorFlow backend (``tf.GradientTape``). A
            lesion-aware classifier's map, computed on its crop, is placed back in the
            lesion's box (:func:`paste_into_boxes`); it is zero elsewhere.
        batch: ``(n, H, W, C)`` float32 model input, e.g. from
            :meth:`breastscan.bundle.ModelBundle.prepare` (in [0, 1]).
        class_index: the class explained for each image: ``(n,)`` integers in ``[0, k)``, one
            integer for every image, or ``None`` for each image's arg-max logit (the
            predicted class).
        layer: name of the 4-D ``(n, h, w, c)`` feature-map layer; default
            :func:`breastscan.models.last_conv_layer_name` (the map before pooling).

    Returns:
        ``(n, H, W)`` float32 in [0, 1]: each map divided by its own maximum after the ReLU
        and bilinear upsampling; a map with no positive evidence stays all zeros.

    Raises:
        ValueError: the batch is not 4-D or does not match the model input, ``class_index``
            has the wrong shape or is out of range, or ``layer`` has no 4-D output.
        RuntimeError: Keras is not running on the TensorFlow backend.
    """
    import keras
    import tensorflow as tf

    from breastscan.models.classifier import last_conv_layer_name
    from breastscan.models.roi import lesion_boxes

    if keras.backend.backend() != "tensorflow":
        backend = keras.backend.backend()
        raise RuntimeError(f"grad_cam needs the TensorFlow backend; Keras runs on {backend!r}")
    x = np.asarray(batch, dtype=np.float32)
    in_shape = tuple(model.inputs[0].shape[1:])
    if x.ndim != 4 or any(m is not None and m != s for m, s in zip(in_shape, x.shape[1:], strict=True)):
        raise ValueError(f"model {model.name!r} takes (n, {', '.join(map(str, in_shape))}), got {x.shape}")
    n, height, width = x.shape[0], x.shape[1], x.shape[2]
    if n == 0:
        return np.zeros((0, height, width), np.float32)

    layer_name = layer or last_conv_layer_name(model)
    feature_output = model.get_layer(layer_name).output
    if len(feature_output.shape) != 4:
        raise ValueError(f"layer {layer_name!r} has output shape {feature_output.shape}, not (n, h, w, c)")
    grad_model = keras.Model(model.inputs, [feature_output, model.outputs[0]], name=f"{model.name}_gradcam")

    inputs = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        features, logits = grad_model(inputs, training=False)
        n_classes = int(logits.shape[-1])
        if class_index is None:
            index = np.asarray(tf.argmax(logits, axis=-1), dtype=np.int64)
        else:
            index = _class_indices(class_index, n, n_classes)
        # Samples are independent in inference mode, so the gradient of the sum of the
        # chosen logits gives every image the gradient of its own logit.
        score = tf.gather(logits, tf.constant(index), axis=1, batch_dims=1)
    grads = tape.gradient(score, features)
    if grads is None:
        raise ValueError(f"the logits do not depend on layer {layer_name!r}")

    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # (n, 1, 1, c): channel importance
    cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1, keepdims=True))  # (n, h, w, 1)
    boxes = lesion_boxes(model, inputs)
    if boxes is None:
        heat = np.asarray(tf.image.resize(cam, (height, width), method="bilinear"), np.float32)[..., 0]
    else:  # the classifier saw a crop: put its map back where the crop came from
        heat = paste_into_boxes(np.asarray(cam, np.float32)[..., 0], boxes, (height, width))
    peak = heat.reshape(n, -1).max(axis=1)
    scale = np.where(peak > _EPS, 1.0 / np.maximum(peak, _EPS), 0.0).astype(np.float32)
    heat = np.clip(heat * scale[:, None, None], 0.0, 1.0)
    log.debug("Grad-CAM of %d images on layer %r (classes %s)", n, layer_name, index.tolist())
    return heat.astype(np.float32, copy=False)


def paste_into_boxes(maps: np.ndarray, boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize each map to its box and place it on an empty image (the parts outside are cut).

    Args:
        maps: ``(n, h, w)`` float32 maps of crops.
        boxes: ``(n, 4)`` normalised ``[y1, x1, y2, x2]`` boxes the crops were cut from.
        size: ``(H, W)`` of the image.

    Returns:
        ``(n, H, W)`` float32, zero outside the boxes.
    """
    height, width = size
    out = np.zeros((len(maps), height, width), np.float32)
    for i, (y1, x1, y2, x2) in enumerate(np.asarray(boxes, np.float64)):
        top, left = int(round(y1 * height)), int(round(x1 * width))
        bottom, right = int(round(y2 * height)), int(round(x2 * width))
        if bottom - top < 1 or right - left < 1:
            continue
        tile = cv2.resize(maps[i], (right - left, bottom - top), interpolation=cv2.INTER_LINEAR)
        r0, c0 = max(top, 0), max(left, 0)
        r1, c1 = min(bottom, height), min(right, width)
        if r1 > r0 and c1 > c0:
            out[i, r0:r1, c0:c1] = tile[r0 - top:r1 - top, c0 - left:c1 - left]
    return out


def _class_indices(class_index: np.ndarray | int, n: int, n_classes: int) -> np.ndarray:
    """``class_index`` as an ``(n,)`` int64 array, checked against ``n_classes``."""
    index = np.asarray(class_index)
    if index.dtype.kind not in "iu":
        raise ValueError(f"class_index must hold integers, got dtype {index.dtype}")
    if index.ndim == 0:
        index = np.full(n, int(index), np.int64)
    if index.shape != (n,):
        raise ValueError(f"class_index must have shape ({n},), got {index.shape}")
    if index.min() < 0 or index.max() >= n_classes:
        raise ValueError(f"class_index must be in [0, {n_classes}), got {index.tolist()}")
    return index.astype(np.int64)
