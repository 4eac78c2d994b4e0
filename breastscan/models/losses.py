"""Losses and metrics, registered so ``.keras`` files reload: binary masks, and partial labels.

Masks: ``y_true`` is ``(batch, H, W, 1)`` (or ``(batch, H, W)``) in {0, 1}; ``y_pred`` is the
same shape, logits when ``from_logits=True`` (the U-Net's output) or probabilities in
[0, 1] otherwise. Dice and IoU are computed per image and averaged over the batch, so a
small lesion counts as much as a large one.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops


def _per_image_sums(y_true: Any, y_pred: Any) -> tuple[Any, Any, Any]:
    """Return per-image ``sum(t * p)``, ``sum(t)``, ``sum(p)`` over every non-batch axis."""
    axes = tuple(range(1, len(y_pred.shape)))
    return (
        ops.sum(y_true * y_pred, axis=axes),
        ops.sum(y_true, axis=axes),
        ops.sum(y_pred, axis=axes),
    )


def _align(y_true: Any, y_pred: Any) -> tuple[Any, Any]:
    y_pred = ops.convert_to_tensor(y_pred)
    y_true = ops.cast(ops.convert_to_tensor(y_true), y_pred.dtype)
    if len(y_true.shape) == len(y_pred.shape) - 1:
        y_true = ops.expand_dims(y_true, -1)
    elif len(y_pred.shape) == len(y_true.shape) - 1:
        y_pred = ops.expand_dims(y_pred, -1)
    return y_true, y_pred


def soft_dice_per_image(y_true: Any, probs: Any, smooth: float = 1.0) -> Any:
    """Soft Dice ``(2 sum(t p) + s) / (sum(t) + sum(p) + s)`` per image.

    Args:
        y_true: ``(batch, H, W[, 1])`` in {0, 1}.
        probs: same shape, probabilities in [0, 1].
        smooth: additive smoothing ``s`` (> 0 makes empty-vs-empty equal 1).

    Returns:
        ``(batch,)`` Dice values in [0, 1].
    """
    inter, t_sum, p_sum = _per_image_sums(y_true, probs)
    return (2.0 * inter + smooth) / (t_sum + p_sum + smooth)


@keras.saving.register_keras_serializable(package="breastscan")
class DiceLoss(keras.losses.Loss):
    """``1 - soft Dice``, per image, averaged over the batch.

    Args:
        from_logits: ``y_pred`` holds logits (sigmoid applied here) rather than probabilities.
        smooth: additive smoothing of the Dice ratio.
        name: loss name.
        reduction: Keras reduction over the per-image values.
    """

    def __init__(self, from_logits: bool = True, smooth: float = 1.0, name: str = "dice_loss",
                 reduction: str = "sum_over_batch_size", **kwargs: Any) -> None:
        super().__init__(name=name, reduction=reduction, **kwargs)
        self.from_logits = bool(from_logits)
        self.smooth = float(smooth)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        y_true, y_pred = _align(y_true, y_pred)
        probs = ops.sigmoid(y_pred) if self.from_logits else y_pred
        return 1.0 - soft_dice_per_image(y_true, probs, self.smooth)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "from_logits": self.from_logits, "smooth": self.smooth}


@keras.saving.register_keras_serializable(package="breastscan")
class BceDiceLoss(keras.losses.Loss):
    """``bce_weight * BCE + (1 - bce_weight) * (1 - soft Dice)``, per image, batch-averaged.

    BCE is the pixel mean of binary cross-entropy within each image; Dice is the per-image
    soft Dice of :class:`DiceLoss`.

    Args:
        from_logits: ``y_pred`` holds logits rather than probabilities.
        bce_weight: weight of the BCE term in [0, 1].
        smooth: additive smoothing of the Dice ratio.
        name: loss name.
        reduction: Keras reduction over the per-image values.
    """

    def __init__(self, from_logits: bool = True, bce_weight: float = 0.5, smooth: float = 1.0,
                 name: str = "bce_dice_loss", reduction: str = "sum_over_batch_size",
                 **kwargs: Any) -> None:
        super().__init__(name=name, reduction=reduction, **kwargs)
        if not 0.0 <= float(bce_weight) <= 1.0:
            raise ValueError(f"bce_weight must be in [0, 1], got {bce_weight!r}")
        self.from_logits = bool(from_logits)
        self.bce_weight = float(bce_weight)
        self.smooth = float(smooth)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        y_true, y_pred = _align(y_true, y_pred)
        axes = tuple(range(1, len(y_pred.shape)))
        bce = ops.mean(
            ops.binary_crossentropy(y_true, y_pred, from_logits=self.from_logits), axis=axes
        )
        probs = ops.sigmoid(y_pred) if self.from_logits else y_pred
        dice_loss = 1.0 - soft_dice_per_image(y_true, probs, self.smooth)
        return self.bce_weight * bce + (1.0 - self.bce_weight) * dice_loss

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "from_logits": self.from_logits,
            "bce_weight": self.bce_weight,
            "smooth": self.smooth,
        }


class _MaskOverlapMetric(keras.metrics.Metric):
    """Mean over images of an overlap score of thresholded masks (empty vs empty = 1)."""

    def __init__(self, threshold: float = 0.5, from_logits: bool = True, name: str = "overlap",
                 dtype: Any = None) -> None:
        super().__init__(name=name, dtype=dtype)
        self.threshold = float(threshold)
        self.from_logits = bool(from_logits)
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def _score(self, inter: Any, t_sum: Any, p_sum: Any) -> Any:
        raise NotImplementedError

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        y_true, y_pred = _align(y_true, y_pred)
        y_pred = ops.cast(y_pred, self.dtype)
        probs = ops.sigmoid(y_pred) if self.from_logits else y_pred
        pred = ops.cast(probs >= self.threshold, self.dtype)
        true = ops.cast(ops.cast(y_true, self.dtype) >= 0.5, self.dtype)
        inter, t_sum, p_sum = _per_image_sums(true, pred)
        scores = self._score(inter, t_sum, p_sum)
        if sample_weight is None:
            weights = ops.ones_like(scores)
        else:
            weights = ops.reshape(ops.cast(sample_weight, self.dtype), (-1,))
            weights = ops.broadcast_to(weights, ops.shape(scores))
        self.total.assign_add(ops.sum(scores * weights))
        self.count.assign_add(ops.sum(weights))

    def result(self) -> Any:
        return ops.divide_no_nan(self.total, self.count)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "threshold": self.threshold, "from_logits": self.from_logits}


@keras.saving.register_keras_serializable(package="breastscan")
class DiceCoefficient(_MaskOverlapMetric):
    """Mean per-image Dice ``2|T∩P| / (|T| + |P|)`` of masks thresholded at ``threshold``.

    Args:
        threshold: probability threshold for the predicted mask.
        from_logits: ``y_pred`` holds logits (sigmoid applied before thresholding).
        name: metric name.
        dtype: metric dtype.
    """

    def __init__(self, threshold: float = 0.5, from_logits: bool = True, name: str = "dice",
                 dtype: Any = None) -> None:
        super().__init__(threshold=threshold, from_logits=from_logits, name=name, dtype=dtype)

    def _score(self, inter: Any, t_sum: Any, p_sum: Any) -> Any:
        denom = t_sum + p_sum
        return ops.where(denom > 0, ops.divide_no_nan(2.0 * inter, denom), ops.ones_like(denom))


@keras.saving.register_keras_serializable(package="breastscan")
class IoUScore(_MaskOverlapMetric):
    """Mean per-image IoU ``|T∩P| / |T∪P|`` of masks thresholded at ``threshold``.

    Args:
        threshold: probability threshold for the predicted mask.
        from_logits: ``y_pred`` holds logits (sigmoid applied before thresholding).
        name: metric name.
        dtype: metric dtype.
    """

    def __init__(self, threshold: float = 0.5, from_logits: bool = True, name: str = "iou",
                 dtype: Any = None) -> None:
        super().__init__(threshold=threshold, from_logits=from_logits, name=name, dtype=dtype)

    def _score(self, inter: Any, t_sum: Any, p_sum: Any) -> Any:
        union = t_sum + p_sum - inter
        return ops.where(union > 0, ops.divide_no_nan(inter, union), ops.ones_like(union))


# --------------------------------------------------------------------------- partial labels (pools of sites)


def encode_partial_labels(targets: np.ndarray, allowed: np.ndarray) -> tuple[np.ndarray, list[list[bool]]]:
    """Pack each row's class and the set of classes its site can label into one integer.

    A pool's sites may lack a class (BUS-BRA has no ``normal`` images). A plain softmax loss
    would teach the model that such a site's images are never of that class; instead each
    row's loss is taken over the classes its site can label (:class:`PartialLabelCrossentropy`).
    Keras passes one integer target per row, so the row's class ``y`` and the index ``s`` of
    its class set travel together as ``y + k * s``.

    Args:
        targets: ``(n,)`` int class indices in ``[0, k)``.
        allowed: ``(n, k)`` bool, ``True`` where the row's site can label the class (the row's
            own class must be allowed).

    Returns:
        ``(n,)`` int64 encoded targets, and the ``(S, k)`` table of class sets they index.

    Raises:
        ValueError: a row whose own class is not allowed.
    """
    y = np.asarray(targets).astype(np.int64).ravel()
    allowed = np.asarray(allowed, bool)
    k = allowed.shape[1]
    if len(y) and not allowed[np.arange(len(y)), y].all():
        raise ValueError("a row's own class is outside the classes its site can label")
    table, index = np.unique(allowed, axis=0, return_inverse=True)
    return y + k * np.asarray(index, np.int64).ravel(), [[bool(v) for v in row] for row in table]


def _decode(y_true: Any, table: Any, k: int) -> tuple[Any, Any]:
    """Encoded targets -> (class indices ``(b,)``, allowed-class flags ``(b, k)``)."""
    code = ops.cast(ops.reshape(y_true, (-1,)), "int32")
    return code % k, ops.take(table, code // k, axis=0)


@keras.saving.register_keras_serializable(package="breastscan")
class PartialLabelCrossentropy(keras.losses.Loss):
    """Softmax cross-entropy over the classes each row's site can label.

    ``y_true`` holds :func:`encode_partial_labels` codes; ``y_pred`` ``(b, k)`` logits. The
    logits of classes the row's site cannot label are left out of its softmax (set to a very
    large negative value), so for a BUS-BRA image the loss is ``-log p(y | benign or
    malignant)``: the model learns benign versus malignant there and nothing about ``normal``.
    Rows of a site with every class get the plain cross-entropy.

    Args:
        class_sets: ``(S, k)`` bool table of class sets (from :func:`encode_partial_labels`).
        name: loss name.
        reduction: Keras reduction over rows.
    """

    def __init__(self, class_sets: list[list[bool]], name: str = "partial_label_crossentropy",
                 reduction: str = "sum_over_batch_size", **kwargs: Any) -> None:
        super().__init__(name=name, reduction=reduction, **kwargs)
        self.class_sets = [[bool(v) for v in row] for row in class_sets]
        self.k = len(self.class_sets[0])

    def call(self, y_true: Any, y_pred: Any) -> Any:
        y, allowed = _decode(y_true, ops.convert_to_tensor(self.class_sets, dtype="bool"), self.k)
        logits = ops.where(allowed, ops.cast(y_pred, "float32"), -1e9)
        return ops.sparse_categorical_crossentropy(y, logits, from_logits=True)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "class_sets": self.class_sets}


@keras.saving.register_keras_serializable(package="breastscan")
class PartialLabelAccuracy(keras.metrics.MeanMetricWrapper):
    """Accuracy of the arg-max against the class inside :func:`encode_partial_labels` codes."""

    def __init__(self, k: int, name: str = "accuracy", dtype: Any = None) -> None:
        self.k = int(k)

        def accuracy(y_true: Any, y_pred: Any) -> Any:
            y = ops.cast(ops.reshape(y_true, (-1,)), "int32") % self.k
            return ops.cast(ops.equal(ops.cast(ops.argmax(y_pred, axis=-1), "int32"), y), "float32")

        super().__init__(fn=accuracy, name=name, dtype=dtype)

    def get_config(self) -> dict[str, Any]:
        return {"k": self.k, "name": self.name, "dtype": self.dtype}
