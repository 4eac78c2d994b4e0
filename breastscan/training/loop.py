"""Fitting one declared model: compile, early stopping, class weights, history.

:func:`train_model` builds the model of a :class:`~breastscan.config.ModelConfig` with
:func:`breastscan.models.build_model` under a ``tf.distribute`` strategy
(:func:`breastscan.training.distribute.get_strategy`), fits it on the training split with
early stopping on the validation loss, and returns a :class:`~breastscan.bundle.ModelBundle`
(uncalibrated: temperature 1.0; the evaluate stage fits the temperature on the validation
split).

``cfg.batch_size`` is the *global* batch: each of ``r`` replicas sees ``batch_size / r``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from breastscan.bundle import ModelBundle, ModelContract
from breastscan.config import ModelConfig
from breastscan.data.loading import SplitData
from breastscan.models.inputs import class_weights, make_dataset, steps_per_epoch
from breastscan.training.distribute import (
    adapt_keras_to_multi_worker,
    get_strategy,
    in_multi_worker_mode,
    weights_digest,
)

if TYPE_CHECKING:
    import tensorflow as tf

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """Outcome of :func:`train_model`.

    Attributes:
        bundle: the trained model with its spec and contract (temperature 1.0); with early
            stopping it holds the weights of the best epoch.
        history: metric name (``loss``, ``val_loss``, ``accuracy`` / ``dice`` ...) -> one
            value per epoch run.
        best_epoch: 1-based epoch whose weights the bundle holds (lowest ``val_loss`` with
            early stopping; the last epoch when ``cfg.patience == 0``).
        epochs_run: epochs actually run (``<= cfg.epochs``).
        seconds: wall-clock time of the fit.
    """

    bundle: ModelBundle
    history: dict[str, list[float]]
    best_epoch: int
    epochs_run: int
    seconds: float


def _learning_rate(cfg: ModelConfig, epoch_steps: int) -> Any:
    """The optimizer's learning rate: a number, or a cosine decay to 0 over all steps."""
    import keras

    if cfg.schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(cfg.learning_rate,
                                                      decay_steps=max(1, cfg.epochs * epoch_steps))
    return cfg.learning_rate


def _class_weights(cfg: ModelConfig, train: SplitData, class_sets: list[list[bool]] | None
                   ) -> dict[int, float] | None:
    """Inverse-frequency weights by (encoded) target, when the config asks for them."""
    if not cfg.has_classes or cfg.imbalance != "class_weight":
        return None
    k = len(cfg.classes)
    weights = class_weights(np.asarray(train.targets) % k, k)
    log.info("%s: class weights %s", cfg.name,
             {name: round(weights[i], 3) for i, name in enumerate(cfg.class_names)})
    if class_sets:  # looked up by the encoded target
        weights = {y + k * s: weights[y] for s in range(len(class_sets)) for y in range(k)}
    return weights


def _build_and_compile(cfg: ModelConfig, epoch_steps: int = 1,
                       class_sets: list[list[bool]] | None = None) -> Any:
    """The model a config declares, compiled (``class_sets``: a pool's partial labels, see
    :func:`breastscan.models.losses.encode_partial_labels`)."""
    import keras

    from breastscan.models import BceDiceLoss, DiceCoefficient, IoUScore, build_model

    # weight_average "ema": Keras keeps the moving average beside the weights and fit() ends
    # by writing it into them (Optimizer.finalize_variable_values).
    optimizer = keras.optimizers.Adam(_learning_rate(cfg, epoch_steps), use_ema=cfg.weight_average == "ema",
                                      ema_momentum=0.99)
    if cfg.task == "segmentation":
        model = build_model("segmentation", input_shape=cfg.input_shape, base_filters=cfg.base_filters,
                            depth=cfg.depth, dropout=cfg.dropout, normalize=cfg.normalize, name=cfg.name)
        model.compile(optimizer=optimizer, loss=BceDiceLoss(from_logits=True),
                      metrics=[DiceCoefficient(threshold=cfg.threshold), IoUScore(threshold=cfg.threshold)])
        return model
    if cfg.task == "multitask":
        return _compile_multitask(cfg, optimizer, class_sets)
    model = build_model(
        "classification", n_classes=len(cfg.classes), input_shape=cfg.input_shape,
        backbone=cfg.backbone, weights=cfg.weights, freeze=cfg.freeze, dropout=cfg.dropout,
        base_filters=cfg.base_filters, normalize=cfg.normalize, name=cfg.name,
    )
    loss, accuracy = _class_loss(cfg, class_sets)
    model.compile(optimizer=optimizer, loss=loss, metrics=[accuracy])
    return model


def _class_loss(cfg: ModelConfig, class_sets: list[list[bool]] | None) -> tuple[Any, Any]:
    """Cross-entropy on logits and accuracy; a pool's partial-label versions with ``class_sets``."""
    import keras

    from breastscan.models.losses import PartialLabelAccuracy, PartialLabelCrossentropy

    if class_sets:
        return PartialLabelCrossentropy(class_sets), PartialLabelAccuracy(len(cfg.classes))
    return (keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            keras.metrics.SparseCategoricalAccuracy(name="accuracy"))


def _compile_multitask(cfg: ModelConfig, optimizer: Any, class_sets: list[list[bool]] | None) -> Any:
    """A multi-task model compiled: BCE + Dice on the mask, ``class_loss_weight`` x cross-entropy."""
    from breastscan.models import BceDiceLoss, DiceCoefficient
    from breastscan.models.multitask import build_multitask

    model = build_multitask(n_classes=len(cfg.classes), input_shape=cfg.input_shape,
                            base_filters=cfg.base_filters, depth=cfg.depth, dropout=cfg.dropout,
                            normalize=cfg.normalize, name=cfg.name)
    loss, accuracy = _class_loss(cfg, class_sets)
    model.compile(optimizer=optimizer, loss={"logits": loss, "mask_logits": BceDiceLoss(from_logits=True)},
                  loss_weights={"logits": cfg.class_loss_weight, "mask_logits": 1.0},
                  metrics={"logits": [accuracy], "mask_logits": [DiceCoefficient(threshold=cfg.threshold)]})
    return model


def partial_labels(cfg: ModelConfig, train: SplitData, val: SplitData
                   ) -> tuple[SplitData, SplitData, list[list[bool]] | None]:
    """A pool's splits with targets encoded for :class:`~breastscan.models.losses.PartialLabelCrossentropy`.

    Where every site has every class (or the rows have no ``site``), the splits come back
    unchanged with ``None``. Otherwise each row's target becomes its class packed with the
    classes its site labels in training (:func:`breastscan.data.pools.site_classes`).
    """
    from breastscan.data.pools import allowed_classes, site_classes
    from breastscan.models.losses import encode_partial_labels

    if not cfg.has_classes:
        return train, val, None
    sets = site_classes(train.frame, cfg.label, cfg.classes)
    if not sets:
        return train, val, None
    k = len(cfg.classes)
    both = np.concatenate([allowed_classes(train.frame, sets, k), allowed_classes(val.frame, sets, k)])
    codes, table = encode_partial_labels(np.concatenate([train.targets, val.targets]), both)
    named = {site: [c for c, ok in zip(cfg.class_names, flags, strict=True) if ok]
             for site, flags in sets.items()}
    log.info("%s: partial labels: %s", cfg.name, named)
    return (replace(train, targets=codes[:len(train)]), replace(val, targets=codes[len(train):]), table)


def _train_segmenter(cfg: ModelConfig, train: SplitData, val: SplitData, modality: str,
                     strategy: tf.distribute.Strategy) -> Any:
    """First phase of a lesion-aware classifier: its U-Net on the rows' lesion masks."""
    from breastscan.config import segmenter_config
    from breastscan.models.roi import segmenter_data

    seg_cfg = segmenter_config(cfg)
    size = (seg_cfg.preprocess.height, seg_cfg.preprocess.width)
    log.info("%s: phase 1, the lesion segmenter (%dx%d, %d epochs)", cfg.name, *size, seg_cfg.epochs)
    result = train_model(seg_cfg, segmenter_data(train, size), segmenter_data(val, size), modality=modality,
                         strategy=strategy)
    log.info("%s: segmenter val Dice %.3f", cfg.name, result.history.get("val_dice", [float("nan")])[-1])
    return result.bundle.model


def _train_roi(cfg: ModelConfig, train: SplitData, val: SplitData, modality: str, callbacks: Sequence[Any],
               strategy: tf.distribute.Strategy, segmenter: Any) -> TrainResult:
    """Both phases of a lesion-aware classifier; the bundle holds the composed model."""
    from breastscan.models.roi import build_roi_classifier, copy_classifier_weights, crop_config, lesion_crops

    if segmenter is None:
        segmenter = _train_segmenter(cfg, train, val, modality, strategy)
    else:
        log.info("%s: phase 1 skipped, the segmenter %r given", cfg.name, segmenter.name)
    crops = crop_config(cfg)
    log.info("%s: phase 2, the classifier on the segmenter's %dx%d lesion crops", cfg.name,
             *cfg.roi.crop_size)  # type: ignore[union-attr]
    result = train_model(crops, lesion_crops(segmenter, cfg, train), lesion_crops(segmenter, cfg, val),
                         modality=modality, callbacks=callbacks, strategy=strategy)
    with strategy.scope():
        model = build_roi_classifier(segmenter, cfg)
    copy_classifier_weights(result.bundle.model, model)
    bundle = ModelBundle(model=model, spec=cfg.preprocess, contract=ModelContract.from_config(cfg, modality))
    return TrainResult(bundle=bundle, history=result.history, best_epoch=result.best_epoch,
                       epochs_run=result.epochs_run, seconds=result.seconds)


def train_model(
    cfg: ModelConfig,
    train: SplitData,
    val: SplitData,
    *,
    modality: str,
    callbacks: Sequence[Any] = (),
    strategy: tf.distribute.Strategy | None = None,
    segmenter: Any = None,
) -> TrainResult:
    """Build, compile and fit the model a config declares.

    Keras is seeded with ``cfg.seed`` (``keras.utils.set_random_seed``: Python, NumPy and
    TensorFlow). The loss is sparse categorical cross-entropy on logits (classification)
    or :class:`~breastscan.models.BceDiceLoss` (segmentation, with Dice and IoU metrics).
    ``cfg.imbalance == "class_weight"`` passes inverse-frequency weights to ``fit``
    (classification only); ``"balanced_sampling"`` is handled by
    :func:`~breastscan.models.inputs.make_dataset`. With ``cfg.patience > 0``, training stops
    after ``patience`` epochs without a lower ``val_loss`` and the best weights are
    restored. Keras prints one progress line per epoch. A classifier with ``cfg.roi`` trains
    in two phases: its U-Net on the rows' lesion masks (``train.masks``; skipped when
    ``segmenter`` is given), then the classifier on the crops the U-Net yields for the
    (un-augmented) images, augmented as any classifier's; the bundle holds the two composed
    (:func:`breastscan.models.roi.build_roi_classifier`).

    Args:
        cfg: the model declaration.
        train: training split (augmented, shuffled).
        val: validation split (early stopping).
        modality: modality of the dataset, recorded in the contract.
        callbacks: extra Keras callbacks (e.g. an MLflow per-epoch logger), run after the
            early stopping one.
        strategy: distribution strategy; ``None`` uses :func:`get_strategy` of
            ``cfg.distribution``.
        segmenter: a lesion-aware classifier's trained U-Net, reused instead of training one
            (it must take ``cfg.roi.seg_size`` inputs); ignored without ``cfg.roi``.

    Returns:
        The trained bundle and its history.

    Raises:
        ValueError: an empty training or validation split.
    """
    import keras

    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"model {cfg.name}: need training and validation images "
                         f"(got {len(train)} and {len(val)})")
    strategy = strategy if strategy is not None else get_strategy(cfg.distribution)
    if cfg.roi is not None:
        return _train_roi(cfg, train, val, modality, callbacks, strategy, segmenter)
    keras.utils.set_random_seed(cfg.seed)
    # Seeds alone do not make CPU training repeatable: multithreaded kernels (convolution
    # gradients, reductions) add in a varying order. Deterministic kernels cost a little speed.
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    train, val, class_sets = partial_labels(cfg, train, val)
    with strategy.scope():
        model = _build_and_compile(cfg, steps_per_epoch(len(train), cfg), class_sets)
        # Create the optimizer's slots now, eagerly. Left to the first training step, they
        # are created while tf.function traces it, which makes it trace twice (variables
        # may only be created on a first trace): 11 s instead of 5 s for a small U-Net.
        model.optimizer.build(model.trainable_variables)
    multi_worker = in_multi_worker_mode(strategy)
    synchronized_bn = adapt_keras_to_multi_worker(model, strategy) if multi_worker else []
    log.info("%s: %s model, %d parameters, %d replica(s), %d training / %d validation images",
             cfg.name, cfg.task, model.count_params(), strategy.num_replicas_in_sync, len(train), len(val))

    weights = _class_weights(cfg, train, class_sets)
    multitask = cfg.task == "multitask"  # Keras' class_weight takes one output: the dataset weighs rows
    train_ds = make_dataset(train, cfg, training=True, class_weight=weights if multitask else None)
    val_ds = make_dataset(val, cfg, training=False)

    cbs: list[Any] = []
    stopper = None
    if cfg.patience > 0:
        stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=cfg.patience,
                                                restore_best_weights=True, verbose=1)
        cbs.append(stopper)
    cbs.extend(callbacks)

    start = time.perf_counter()
    fit = model.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs, callbacks=cbs,  # dataset shuffles
                    class_weight=None if multitask else weights, shuffle=False, verbose=2)
    seconds = time.perf_counter() - start
    for layer in synchronized_bn:
        layer.synchronized = False

    history = {str(k): [float(v) for v in values] for k, values in fit.history.items()}
    epochs_run = len(history.get("loss", []))
    if stopper is not None and "val_loss" in history and history["val_loss"]:
        # EarlyStopping restores the weights of its best epoch at the end of training.
        best_epoch = int(np.nanargmin(history["val_loss"])) + 1
    else:
        best_epoch = epochs_run
    if multi_worker:
        log.info("%s: final weights sha256 %s (the same on every worker of the cluster)", cfg.name,
                 weights_digest(model))
    contract = ModelContract.from_config(cfg, modality)
    bundle = ModelBundle(model=model, spec=cfg.preprocess, contract=contract)
    log.info("%s: %d epoch(s) in %.1f s, best epoch %d (val_loss %s)", cfg.name, epochs_run, seconds,
             best_epoch, f"{history['val_loss'][best_epoch - 1]:.4f}" if history.get("val_loss") else "n/a")
    return TrainResult(bundle=bundle, history=history, best_epoch=best_epoch, epochs_run=epochs_run,
                       seconds=seconds)


def write_history(history: dict[str, Sequence[float]], path: str | Path) -> Path:
    """Write per-epoch metrics as CSV for ``dvc plots`` (columns ``epoch`` then the metrics).

    Args:
        history: metric name -> one value per epoch (all of the same length).
        path: destination CSV; parent directories are created.

    Returns:
        The path written. ``epoch`` counts from 1.

    Raises:
        ValueError: the metric lists differ in length.
    """
    lengths = {len(v) for v in history.values()}
    if len(lengths) > 1:
        raise ValueError(f"history lists differ in length: {sorted(lengths)}")
    n = lengths.pop() if lengths else 0
    frame = pd.DataFrame({"epoch": np.arange(1, n + 1), **{k: list(v) for k, v in history.items()}})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path
