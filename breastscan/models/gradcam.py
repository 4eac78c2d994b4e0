"""Grad-CAM heatmaps of a classifier and the overlays the service returns with them.

:func:`grad_cam` implements Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from
Deep Networks via Gradient-based Localization", ICCV 2017): the gradient of one class logit
with respect to the last convolutional feature map, averaged over space, weights that
feature map's channels; the weighted sum, passed through a ReLU, is the class's heatmap.
It differentiates the **logits** (the layer ``"logits"`` of
:func:`breastscan.models.build_classifier`), not the softmax, as the paper does: the
calibration temperature only rescales them, so it cannot change the map.

:func:`overlay` draws a heatmap or a binary mask over the gray image for display.

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

OVERLAY_KINDS = ("heatmap", "mask")
"""Values of :func:`overlay`'s ``kind``."""

_MASK_COLOR_RGB = (255, 0, 0)
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
            :meth:`breastscan.registry.bundle.ModelBundle.prepare` (in [0, 1]).
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


def overlay(
    image_gray: np.ndarray,
    heat_or_mask: np.ndarray,
    *,
    kind: str = "heatmap",
    alpha: float = 0.4,
) -> np.ndarray:
    """Draw a heatmap or a lesion mask over a gray image.

    Args:
        image_gray: ``(H, W)`` float in [0, 1] (uint8 is read as 0-255).
        heat_or_mask: ``(H, W)``; for ``kind="heatmap"`` floats in [0, 1] (values outside
            are clipped), drawn with OpenCV's JET colormap blended at ``alpha``; for
            ``kind="mask"`` any non-zero pixel is lesion, filled red at ``alpha`` and
            outlined with an opaque red contour.
        kind: ``"heatmap"`` or ``"mask"``.
        alpha: opacity of the heatmap or of the mask fill, in [0, 1].

    Returns:
        ``(H, W, 3)`` uint8 **RGB** image.

    Raises:
        ValueError: shapes differ or are not 2-D, unknown ``kind``, ``alpha`` outside [0, 1].
    """
    if kind not in OVERLAY_KINDS:
        raise ValueError(f"kind must be one of {OVERLAY_KINDS}, got {kind!r}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    img = np.asarray(image_gray)
    layer = np.asarray(heat_or_mask)
    if img.ndim != 2 or layer.shape != img.shape:
        raise ValueError(f"need two (H, W) arrays of one shape, got {img.shape} and {layer.shape}")
    if img.dtype == np.uint8:
        gray = img
    else:
        gray = np.clip(np.rint(np.nan_to_num(img.astype(np.float32)) * 255.0), 0, 255).astype(np.uint8)
    base = np.repeat(gray[:, :, None], 3, axis=2)

    if kind == "heatmap":
        heat = np.clip(np.nan_to_num(layer.astype(np.float32)), 0.0, 1.0)
        colored = cv2.applyColorMap(np.rint(heat * 255.0).astype(np.uint8), cv2.COLORMAP_JET)
        colored = cv2.cvtColor(colored, cv2.COLOR_BGR2RGB)
        return np.asarray(cv2.addWeighted(base, 1.0 - float(alpha), colored, float(alpha), 0.0), np.uint8)

    mask = layer > 0
    out = base.copy()
    if mask.any():
        red = np.asarray(_MASK_COLOR_RGB, np.float32)
        out[mask] = np.rint((1.0 - alpha) * base[mask].astype(np.float32) + alpha * red).astype(np.uint8)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        thickness = max(1, round(min(mask.shape) / 200))
        cv2.drawContours(out, contours, -1, _MASK_COLOR_RGB, thickness)
    return out
