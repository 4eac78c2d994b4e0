"""Model inputs from the split artefact: arrays per split, class weights and ``tf.data`` pipelines.

:func:`load_split` reads the rows of one split of ``artifacts/prepared/<dataset>/splits.csv``
(written by the prepare stage, see :mod:`breastscan.data.splits`) and turns them into arrays
through :func:`breastscan.imaging.preprocessing.preprocess_image`, the same function the service
uses, so training and serving cannot drift. :func:`make_dataset` wraps the arrays in a
batched ``tf.data.Dataset``: shuffled, augmented and optionally class-balanced for
training; in file order and untouched for evaluation.

TensorFlow is imported inside :func:`make_dataset` only: loading arrays stays cheap.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from breastscan.config import ModelConfig
from breastscan.data.manifest import resolve
from breastscan.imaging.files import read_mask
from breastscan.imaging.preprocessing import decode_image, preprocess_image, preprocess_mask

if TYPE_CHECKING:
    import tensorflow as tf

log = logging.getLogger(__name__)

LOADABLE_SPLITS: tuple[str, ...] = ("train", "val", "test")
"""Splits :func:`load_split` serves; ``excluded`` rows are never used."""


@dataclass
class SplitData:
    """The arrays of one split, ready for a model.

    Attributes:
        images: ``(n, H, W, 1)`` float32 in [0, 1], preprocessed with the model's spec.
        targets: classification: ``(n,)`` int64 class indices in ``[0, k)``;
            segmentation: ``(n, H, W, 1)`` float32 masks in {0, 1}.
        frame: the ``n`` split rows used, in the order of the arrays (index reset).
        groups: ``(n,)`` ``dup_group`` ids (patients merged through near-duplicates), the
            unit of the grouped bootstrap.
    """

    images: np.ndarray
    targets: np.ndarray
    frame: pd.DataFrame
    groups: np.ndarray

    def __len__(self) -> int:
        return int(len(self.images))


def read_splits(splits_csv: str | Path) -> pd.DataFrame:
    """Read the split artefact with every column as text (empty cells are missing).

    Args:
        splits_csv: ``artifacts/prepared/<dataset>/splits.csv``.

    Returns:
        One row per manifest image, with at least ``image`` and ``split``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a required column is missing.
    """
    path = Path(splits_csv)
    if not path.is_file():
        raise FileNotFoundError(f"split artefact not found: {path} (run the prepare stage)")
    df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    missing = [c for c in ("image", "split") if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {', '.join(missing)}")
    return df


def _class_index(cfg: ModelConfig, value: Any, image: str) -> int:
    try:
        return cfg.class_index(value)
    except KeyError:
        pass
    try:  # "2.0" written by a float column still means class 2
        number = float(value)
        if number.is_integer():
            return cfg.class_index(int(number))
    except (TypeError, ValueError, KeyError):
        pass
    raise ValueError(f"{image}: {cfg.label}={value!r} is not a class of model {cfg.name} "
                     f"{[str(c) for c in cfg.classes]}")


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == ""


def load_split(splits_csv: str | Path, dataset_root: str | Path, cfg: ModelConfig, split: str) -> SplitData:
    """Load and preprocess the rows of one split for one model.

    Every image goes through ``preprocess_image(decode_image(path), cfg.preprocess)``.
    Classification rows with an empty label are dropped (the count is logged); a label
    outside ``cfg.classes`` is an error. Segmentation rows without a mask get an empty mask
    when their pathology is ``normal`` and are dropped (with a warning) otherwise.

    Args:
        splits_csv: the prepare stage's ``splits.csv``.
        dataset_root: the dataset directory the ``image`` / ``mask`` paths are relative to.
        cfg: the model (task, label, classes, preprocessing).
        split: ``train``, ``val`` or ``test``.

    Returns:
        The split's arrays (possibly empty, with a warning).

    Raises:
        ValueError: unknown split, a label value that is not a class of the model (the
            message names the image and the value), a mask whose size differs from its
            image, or a missing column.
        FileNotFoundError: the split artefact, an image or a mask is missing.
    """
    if split not in LOADABLE_SPLITS:
        raise ValueError(f"split must be one of {LOADABLE_SPLITS}, got {split!r}")
    root = Path(dataset_root)
    df = read_splits(splits_csv)
    needed = [cfg.label] if cfg.task == "classification" else ["mask"]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"{splits_csv}: model {cfg.name} needs column(s) {', '.join(missing)}")
    rows = df[df["split"].astype(str).str.strip() == split].reset_index(drop=True)

    if cfg.task == "classification":
        empty = rows[cfg.label].map(_is_missing).to_numpy(dtype=bool)
        if empty.any():
            log.info("%s/%s: dropped %d row(s) with no %s label", cfg.name, split, int(empty.sum()),
                     cfg.label)
        rows = rows[~empty].reset_index(drop=True)
        # Check every label before decoding a single image: a bad value fails fast.
        labels = np.array([_class_index(cfg, v, str(img)) for v, img in zip(rows[cfg.label], rows["image"],
                                                                            strict=True)], dtype=np.int64)
    else:
        no_mask = rows["mask"].map(_is_missing).to_numpy(dtype=bool)
        pathology = rows["pathology"] if "pathology" in rows.columns else pd.Series([None] * len(rows))
        normal = pathology.astype("string").str.strip().str.lower().eq("normal").fillna(False).to_numpy(bool)
        drop = no_mask & ~normal
        if drop.any():
            log.warning("%s/%s: dropped %d lesion row(s) without a mask (e.g. %s)", cfg.name, split,
                        int(drop.sum()), rows.loc[drop, "image"].iloc[0])
        rows = rows[~drop].reset_index(drop=True)

    spec = cfg.preprocess
    h, w, _ = cfg.input_shape
    images = np.zeros((len(rows), h, w, 1), np.float32)
    masks = np.zeros((len(rows), h, w, 1), np.float32) if cfg.task == "segmentation" else None
    for i, row in enumerate(rows.itertuples(index=False)):
        image_path = resolve(root, str(row.image))
        pixels = decode_image(image_path, min_side=spec.min_side, max_side=spec.max_side)
        images[i] = preprocess_image(pixels, spec)[0]
        if masks is not None:
            mask_rel = row.mask
            if _is_missing(mask_rel):
                continue  # a normal image: no lesion, empty mask
            mask = read_mask(resolve(root, str(mask_rel)))
            if mask.shape != pixels.shape:
                raise ValueError(f"{row.image}: mask {mask_rel} is {mask.shape[1]}x{mask.shape[0]}, "
                                 f"the image {pixels.shape[1]}x{pixels.shape[0]}")
            masks[i] = preprocess_mask(mask, spec)

    targets = labels if masks is None else masks
    group_col = next((c for c in ("dup_group", "group") if c in rows.columns), "image")
    groups = rows[group_col].fillna(rows["image"]).astype(str).to_numpy()
    if not len(rows):
        log.warning("%s/%s: no usable rows in %s", cfg.name, split, splits_csv)
    log.debug("%s/%s: %d images %s", cfg.name, split, len(rows), images.shape)
    return SplitData(images=images, targets=targets, frame=rows, groups=groups)


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


def make_dataset(data: SplitData, cfg: ModelConfig, *, training: bool) -> tf.data.Dataset:
    """Wrap a split in a batched ``tf.data`` pipeline.

    Training: shuffled (seeded by ``cfg.seed``, reshuffled every epoch), augmented per batch
    with :func:`breastscan.models.build_augmentation` (classification, images only) or a
    :class:`breastscan.models.PairAugmenter` (segmentation, one geometric transform for the
    image and its mask), and, when ``cfg.imbalance == "balanced_sampling"`` (classification),
    drawn with equal probability from each class present (``sample_from_datasets``), the
    epoch keeping ``ceil(n / batch_size)`` batches. Training batches are full: an epoch is
    ``n // batch_size`` of them (the ``n % batch_size`` left over differ from epoch to epoch),
    or one smaller batch when ``n < batch_size``. Evaluation: file order, no augmentation.

    Args:
        data: the split's arrays.
        cfg: batch size, seed, augmentation and imbalance handling of the model.
        training: build the training pipeline (else the evaluation one).

    Returns:
        A dataset of ``(x, y)`` batches: ``x`` ``(b, H, W, 1)`` float32 in [0, 1]; ``y``
        ``(b,)`` int64 class indices or ``(b, H, W, 1)`` float32 masks in {0, 1};
        ``b <= cfg.batch_size``.

    Raises:
        ValueError: the split is empty.
    """
    import tensorflow as tf

    n = len(data)
    if n == 0:
        raise ValueError(f"model {cfg.name}: cannot build a dataset from an empty split")
    images = np.asarray(data.images, np.float32)
    targets = np.asarray(data.targets)
    targets = targets.astype(np.int64) if cfg.task == "classification" else targets.astype(np.float32)
    bs = int(cfg.batch_size)

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

    if training:
        # Augmentation layers hold seeded random state: mapped sequentially, so that a seed
        # gives the same transforms run after run.
        if cfg.task == "classification":
            from breastscan.models import build_augmentation

            augment = build_augmentation(cfg.augment, seed=cfg.seed)
            ds = ds.map(lambda x, y: (augment(x, training=True), y))
        else:
            from breastscan.models import PairAugmenter

            pair = PairAugmenter(cfg.augment, seed=cfg.seed)
            ds = ds.map(lambda x, y: pair(x, y))

    options = tf.data.Options()
    # In-memory arrays: split by element across workers (no files to shard by).
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    # No autotuning: the arrays are in memory and one batch ahead is enough. On a 2-core CPU
    # the autotuner's extra parallelism competed with the training step: every other epoch
    # ran ~60 % slower (tumor: 340 instead of 210 ms a step); without it, every epoch ~210 ms.
    options.autotune.enabled = False
    return ds.with_options(options).prefetch(2)
