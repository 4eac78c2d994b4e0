"""Training inputs: class weights, steps per epoch and the batched ``tf.data`` pipelines.

TensorFlow is imported inside :func:`make_dataset` only: importing this module stays cheap.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from breastscan.config import ModelConfig
from breastscan.data.loading import SplitData

if TYPE_CHECKING:
    import tensorflow as tf

log = logging.getLogger(__name__)


def class_weights(targets: np.ndarray, n_classes: int) -> dict[int, float]:
    """Inverse-frequency class weights (scikit-learn's ``compute_class_weight("balanced")``).

    The weight of a present class ``c`` is ``n / (n_present * count_c)``; a class with no
    sample gets 1.0.

    Args:
        targets: ``(n,)`` int class indices in ``[0, n_classes)``.
        n_classes: number of classes of the model.

    Returns:
        ``{class index: weight}`` for every index in ``range(n_classes)``.

    Raises:
        ValueError: no targets, or an index outside ``[0, n_classes)``.
    """
    from sklearn.utils.class_weight import compute_class_weight

    y = np.asarray(targets).astype(np.int64).ravel()
    if y.size == 0:
        raise ValueError("no targets to weight")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"targets hold class indices outside [0, {n_classes - 1}]")
    present = np.unique(y)
    weights = compute_class_weight("balanced", classes=present, y=y)
    out = {c: 1.0 for c in range(int(n_classes))}
    out.update({int(c): float(wt) for c, wt in zip(present, weights, strict=True)})
    return out


def steps_per_epoch(n: int, cfg: ModelConfig) -> int:
    """Training steps (batches) in one epoch of :func:`make_dataset` over ``n`` images.

    ``n // batch_size`` full batches (one when ``n < batch_size``); ``ceil(n / batch_size)``
    with balanced sampling (classification).
    """
    bs = int(cfg.batch_size)
    if cfg.task == "classification" and cfg.imbalance == "balanced_sampling":
        return max(1, math.ceil(n / bs))
    return max(1, n // bs)


def make_dataset(data: SplitData, cfg: ModelConfig, *, training: bool,
                 class_weight: dict[int, float] | None = None) -> tf.data.Dataset:
    """Wrap a split in a batched ``tf.data`` pipeline.

    Training: shuffled (seeded by ``cfg.seed``, reshuffled every epoch), augmented per batch
    with :func:`breastscan.models.build_augmentation` (classification, images only) or a
    :class:`breastscan.models.PairAugmenter` (segmentation, one geometric transform for the
    image and its mask), and, when ``cfg.imbalance == "balanced_sampling"`` (classification),
    drawn with equal probability from each class present (``sample_from_datasets``), the
    epoch keeping ``ceil(n / batch_size)`` batches. Training batches are full: an epoch is
    ``n // batch_size`` of them (the ``n % batch_size`` left over differ from epoch to epoch),
    or one smaller batch when ``n < batch_size``. Evaluation: file order, no augmentation.
    A multi-task model's rows carry their class and their mask (``data.masks``), augmented
    as a segmenter's.

    Args:
        data: the split's arrays.
        cfg: batch size, seed, augmentation and imbalance handling of the model.
        training: build the training pipeline (else the evaluation one).
        class_weight: a multi-task model's weight of each (encoded) class target, given to
            the training batches as per-row weights of the class output (Keras'
            ``class_weight`` takes one output).

    Returns:
        A dataset of ``(x, y)`` batches: ``x`` ``(b, H, W, 1)`` float32 in [0, 1]; ``y``
        ``(b,)`` int64 class indices, ``(b, H, W, 1)`` float32 masks in {0, 1}, or for a
        multi-task model ``{"logits": classes, "mask_logits": masks}`` (then ``(x, y, w)``
        with ``class_weight``); ``b <= cfg.batch_size``.

    Raises:
        ValueError: the split is empty.
    """
    import tensorflow as tf

    n = len(data)
    if n == 0:
        raise ValueError(f"model {cfg.name}: cannot build a dataset from an empty split")
    images = np.asarray(data.images, np.float32)
    targets: Any = np.asarray(data.targets)
    targets = targets.astype(np.float32) if cfg.task == "segmentation" else targets.astype(np.int64)
    if cfg.task == "multitask":
        if data.masks is None:
            raise ValueError(f"model {cfg.name}: a multi-task model needs each row's lesion mask")
        targets = (targets, np.asarray(data.masks, np.float32))
    ds = _batches(images, targets, cfg, training=training)
    if training:
        ds = _augmented(ds, cfg)
    if cfg.task == "multitask":
        ds = ds.map(lambda x, y: (x, {"logits": y[0], "mask_logits": y[1]}))
        if training and class_weight:
            table = tf.constant([class_weight.get(i, 0.0) for i in range(max(class_weight) + 1)], tf.float32)
            ds = ds.map(lambda x, y: (x, y, {"logits": tf.gather(table, y["logits"]),
                                             "mask_logits": tf.ones(tf.shape(y["logits"]), tf.float32)}))
    options = tf.data.Options()
    # In-memory arrays: split by element across workers (no files to shard by).
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    # No autotuning: the arrays are in memory and one batch ahead is enough. On a 2-core CPU
    # the autotuner's extra parallelism competed with the training step: every other epoch
    # ran ~60 % slower (tumor: 340 instead of 210 ms a step); without it, every epoch ~210 ms.
    options.autotune.enabled = False
    return ds.with_options(options).prefetch(2)


def _batches(images: np.ndarray, targets: np.ndarray, cfg: ModelConfig, *, training: bool) -> tf.data.Dataset:
    """Batches in file order (evaluation), class-balanced draws, or shuffled full batches."""
    import tensorflow as tf

    n, bs = len(images), int(cfg.batch_size)
    if not training:
        ds = tf.data.Dataset.from_tensor_slices((images, targets)).batch(bs)
    elif cfg.task == "classification" and cfg.imbalance == "balanced_sampling":
        present = [int(c) for c in np.unique(targets)]
        per_class = []
        for c in present:
            idx = np.flatnonzero(targets == c)
            per_class.append(
                tf.data.Dataset.from_tensor_slices((images[idx], targets[idx]))
                .shuffle(len(idx), seed=cfg.seed + 1 + c, reshuffle_each_iteration=True)
                .repeat()
            )
        ds = tf.data.Dataset.sample_from_datasets(
            per_class, weights=[1.0 / len(present)] * len(present), seed=cfg.seed,
            rerandomize_each_iteration=True,
        )
        ds = ds.batch(bs).take(math.ceil(n / bs))
        log.debug("%s: balanced sampling over classes %s", cfg.name, present)
    else:
        # Full batches only (unless the split is smaller than one): a smaller last batch has
        # another shape, for which Keras would trace and optimise the training step again
        # (seconds per model on a CPU). Reshuffled every epoch, a different remainder sits out.
        ds = (tf.data.Dataset.from_tensor_slices((images, targets))
              .shuffle(n, seed=cfg.seed, reshuffle_each_iteration=True)
              .batch(bs, drop_remainder=n >= bs))
    return ds


def _augmented(ds: tf.data.Dataset, cfg: ModelConfig) -> tf.data.Dataset:
    """Training batches augmented: images alone (classification), image and mask together."""
    # Augmentation layers hold seeded random state: mapped sequentially, so that a seed
    # gives the same transforms run after run.
    if cfg.task == "classification":
        from breastscan.models import build_augmentation

        augment = build_augmentation(cfg.augment, seed=cfg.seed)
        return ds.map(lambda x, y: (augment(x, training=True), y))
    from breastscan.models import PairAugmenter

    pair = PairAugmenter(cfg.augment, seed=cfg.seed)
    if cfg.task == "multitask":  # (classes, masks): the mask moves with the image
        return ds.map(lambda x, y: _with_class(pair(x, y[1]), y[0]))
    return ds.map(lambda x, y: pair(x, y))


def _with_class(pair: tuple[Any, Any], classes: Any) -> tuple[Any, tuple[Any, Any]]:
    image, mask = pair
    return image, (classes, mask)
