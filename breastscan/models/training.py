"""Fitting one declared model: distribution strategy, compile, early stopping, history.

:func:`train_model` builds the model of a :class:`~breastscan.config.ModelConfig` with
:func:`breastscan.models.build_model` under a ``tf.distribute`` strategy, fits it on the
training split with early stopping on the validation loss, and returns a
:class:`~breastscan.bundle.ModelBundle` (uncalibrated: temperature 1.0; the evaluate stage
fits the temperature on the validation split).

Distribution (``cfg.distribution``, see :func:`get_strategy`):

* ``none``: TensorFlow's default strategy (one device).
* ``mirrored``: synchronous data parallelism over the local GPUs, or over several
  *logical* CPU devices when the process has split its CPU with
  :func:`configure_logical_cpus` before TensorFlow initialised its devices (useful to
  exercise the mirrored path on a CPU-only machine; it does not add compute).
* ``multi_worker``: ``MultiWorkerMirroredStrategy`` across hosts, configured by the
  ``TF_CONFIG`` environment variable of each worker. Every worker runs the same program
  (the same training steps, in lock-step: gradients are all-reduced); only the chief
  (:func:`is_chief`) keeps what it saves and logs. Keras 3 (3.15 checked) needs three
  fixes for this, see :func:`_adapt_keras_to_multi_worker`.

``cfg.batch_size`` is the *global* batch: each of ``r`` replicas sees ``batch_size / r``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from breastscan.bundle import ModelBundle, ModelContract
from breastscan.config import ModelConfig
from breastscan.data.loading import SplitData
from breastscan.models.inputs import class_weights, make_dataset, steps_per_epoch

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


def configure_logical_cpus(n: int) -> None:
    """Split the first physical CPU into ``n`` logical devices (for ``mirrored`` on a CPU).

    Must run before TensorFlow initialises its devices, i.e. before any tensor, model or
    ``tf.config.list_logical_devices`` call in the process; hence a separate process (or
    the very start of ``main()``) is the place for it.

    Args:
        n: number of logical CPU devices (>= 1).

    Raises:
        RuntimeError: TensorFlow's devices are already initialised.
    """
    import tensorflow as tf

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(int(n))]
        )
    except RuntimeError as exc:
        raise RuntimeError(
            "logical CPU devices must be configured before TensorFlow initialises its devices "
            f"(call configure_logical_cpus first thing in the process): {exc}"
        ) from None
    log.info("split the CPU into %d logical devices", n)


def _check_tf_config(raw: str | None) -> dict[str, Any]:
    if not raw:
        raise RuntimeError(
            "distribution 'multi_worker' needs the TF_CONFIG environment variable on every worker, "
            'e.g. {"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
            '"task": {"type": "worker", "index": 0}}; use distribution "none" or "mirrored" '
            "on a single machine"
        )
    try:
        conf = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"TF_CONFIG is not valid JSON: {exc}") from None
    if not isinstance(conf, dict):
        raise ValueError("TF_CONFIG must be a JSON object with 'cluster' and 'task'")
    cluster, task = conf.get("cluster"), conf.get("task")
    workers = cluster.get("worker") if isinstance(cluster, dict) else None
    if not isinstance(workers, list) or not workers:
        raise ValueError("TF_CONFIG needs cluster.worker: a non-empty list of 'host:port'")
    if not isinstance(task, dict) or task.get("type") not in ("worker", "chief", "evaluator"):
        raise ValueError("TF_CONFIG needs task.type: 'worker' (or 'chief' / 'evaluator')")
    index = task.get("index")
    assert isinstance(cluster, dict)  # checked with the workers above
    size = len(cluster.get(task["type"], [])) if task["type"] != "evaluator" else 1
    if not isinstance(index, int) or not 0 <= index < max(size, 1):
        raise ValueError(f"TF_CONFIG task.index must be an integer in [0, {max(size, 1) - 1}], got {index!r}")
    return conf


def is_chief(tf_config: str | Mapping[str, Any] | None = None) -> bool:
    """Whether this process saves and logs: the chief of a multi-worker cluster, or alone.

    TensorFlow's rule (the one ``MultiWorkerMirroredStrategy`` and Keras follow): when the
    cluster has a ``chief`` job, its task is the chief; otherwise ``worker`` 0 is. Any other
    worker, and an ``evaluator``, is not. Without ``TF_CONFIG`` (or with no cluster in it) the
    process trains alone and is its own chief. Every worker must still run the same steps
    (and save, to a directory it then discards): the collectives need all of them.

    Args:
        tf_config: the cluster description (JSON text or its parsed object); ``None`` reads
            the ``TF_CONFIG`` environment variable.

    Raises:
        ValueError: ``TF_CONFIG`` is not a valid cluster spec.
    """
    raw = os.environ.get("TF_CONFIG") if tf_config is None else tf_config
    if not raw:
        return True
    text = raw if isinstance(raw, str) else json.dumps(raw)
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"TF_CONFIG is not valid JSON: {exc}") from None
    if not isinstance(loaded, dict) or not loaded.get("cluster"):
        return True
    conf = _check_tf_config(text)
    task_type, index = conf["task"]["type"], conf["task"]["index"]
    if task_type == "chief":
        return True
    return task_type == "worker" and index == 0 and "chief" not in conf["cluster"]


def _cluster_size(conf: Mapping[str, Any]) -> int:
    """Tasks that train (``chief`` and ``worker`` jobs) in a checked ``TF_CONFIG``."""
    cluster = conf["cluster"]
    return len(cluster.get("chief", [])) + len(cluster.get("worker", []))


def get_strategy(distribution: str, *, tf_config: str | None = None) -> tf.distribute.Strategy:
    """The ``tf.distribute`` strategy of a ``distribution`` setting.

    Args:
        distribution: ``none`` (default strategy), ``mirrored`` (every local GPU, else the
            logical CPU devices if there are several, see :func:`configure_logical_cpus`)
            or ``multi_worker`` (``MultiWorkerMirroredStrategy``).
        tf_config: the cluster description for ``multi_worker``; ``None`` reads the
            ``TF_CONFIG`` environment variable, as TensorFlow itself does.

    Returns:
        The strategy; build and compile models inside ``strategy.scope()``. For
        ``multi_worker``, create it first thing in the process (before any tensor or
        model): TensorFlow configures its collectives when it initialises.

    Raises:
        ValueError: unknown distribution, or ``TF_CONFIG`` is not a valid cluster spec.
        RuntimeError: ``multi_worker`` without ``TF_CONFIG``, or created too late in the
            process, or (cluster of several tasks) the strategy did not join the cluster.
    """
    if distribution not in ("none", "mirrored", "multi_worker"):
        raise ValueError(f"distribution must be none, mirrored or multi_worker, got {distribution!r}")
    if distribution == "multi_worker":
        raw = os.environ.get("TF_CONFIG") if tf_config is None else tf_config
        conf = _check_tf_config(raw)
        import tensorflow as tf

        if tf_config is not None:
            os.environ["TF_CONFIG"] = tf_config  # the strategy's resolver reads the environment
        try:
            strategy: tf.distribute.Strategy = tf.distribute.MultiWorkerMirroredStrategy()
        except RuntimeError as exc:
            raise RuntimeError(
                "distribution 'multi_worker': the MultiWorkerMirroredStrategy must be created before "
                "TensorFlow initialises its devices (call get_strategy first thing in the process, "
                f"before any tensor or model): {exc}"
            ) from exc
        size = _cluster_size(conf)
        joined = getattr(strategy.extended, "_in_multi_worker_mode", lambda: size > 1)()
        if size > 1 and not joined:
            raise RuntimeError(f"distribution 'multi_worker': TF_CONFIG names {size} tasks but the strategy "
                               "runs on this process alone; refusing to train without the cluster")
        log.info("multi-worker strategy: %d task(s), this is %s %s (%s), %d replica(s) in sync", size,
                 conf["task"]["type"], conf["task"]["index"], "chief" if is_chief(raw) else "not the chief",
                 strategy.num_replicas_in_sync)
        return strategy

    import tensorflow as tf

    if distribution == "none":
        return tf.distribute.get_strategy()
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        strategy = tf.distribute.MirroredStrategy()
    else:
        cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
        if len(cpus) < 2:
            log.warning("mirrored strategy on one CPU device: no parallelism (no GPU, and no logical "
                        "CPU devices configured; see breastscan.models.training.configure_logical_cpus)")
        strategy = tf.distribute.MirroredStrategy(devices=cpus)
    log.info("mirrored strategy over %d replica(s)", strategy.num_replicas_in_sync)
    return strategy


def _in_multi_worker_mode(strategy: tf.distribute.Strategy) -> bool:
    """Keras' own test for the multi-worker code path of its TensorFlow trainer."""
    import tensorflow as tf

    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and bool(getattr(strategy.extended, "_in_multi_worker_mode", lambda: False)()))


def _scalar_logs_as_vectors(step: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A train/test step whose scalar outputs (loss, metrics) are shaped ``(1,)``.

    Keras 3's TensorFlow trainer (3.15, still) reduces each replica's step outputs under a
    *multi-worker* ``MultiWorkerMirroredStrategy`` with ``strategy.reduce("MEAN", v, axis=0)``,
    which fails on the scalars every step returns ("Invalid reduction dimension 0 for input
    with 0 dimensions"; keras-team/keras#20585, tensorflow/tensorflow#72388): ``fit`` cannot
    run on two workers as shipped. Shaped ``(1,)``, the same reduction is the mean over all
    replicas of all workers, a scalar again, which is what the logs then hold.
    """
    import tensorflow as tf

    def as_vector(value: Any) -> Any:
        if isinstance(value, tf.Tensor | tf.Variable) and value.shape.rank == 0:
            return tf.reshape(value, [1])
        return value

    def wrapped(data: Any) -> Any:
        return tf.nest.map_structure(as_vector, step(data))

    return wrapped


def _adapt_keras_to_multi_worker(model: Any, strategy: tf.distribute.Strategy) -> list[Any]:
    """Make Keras 3's ``fit`` run under a multi-worker ``MultiWorkerMirroredStrategy``.

    Keras 3 (3.15, with TensorFlow 2.21) ships two bugs on this path (keras-team/keras#20585,
    tensorflow/tensorflow#72388), both fixed here on the model instance, the model saved
    unchanged:

    * before training, ``fit`` takes one batch and averages it over the replicas with an
      eager ``strategy.reduce``, only to read its shapes; across workers that reduce fails
      ("Attempt to convert a value (PerReplica...) to a Tensor"). This worker's own first
      replica batch has the same shapes: the model is built from it instead.
    * every step's scalar outputs (loss, metrics) are reduced along an axis they do not have,
      see :func:`_scalar_logs_as_vectors`.

    And one gap: Keras 3 creates ``BatchNormalization``'s moving statistics without
    cross-replica aggregation, so each worker would average its own shard's batch statistics
    and the workers would end with different inference weights. Its batch normalization
    layers are switched to ``synchronized=True`` (moments of the global batch, all-reduced,
    as on one machine with the whole batch) for the fit; the caller switches them back
    (the returned layers) so that the saved model's config is the single-machine one.

    Returns:
        The batch normalization layers switched to ``synchronized``.

    Raises:
        RuntimeError: this Keras lacks the hooks the fix needs (another version): better
            than training with a silently wrong reduction.
    """
    import keras
    import tensorflow as tf

    hooks = ("_maybe_symbolic_build", "_symbolic_build", "train_step", "test_step")
    missing = [name for name in hooks if not callable(getattr(model, name, None))]
    if missing:
        raise RuntimeError(f"distribution 'multi_worker' is not supported with Keras {keras.__version__}: "
                           f"its fit() lacks {missing}, which breastscan's multi-worker fix relies on; "
                           "use distribution 'none' or 'mirrored'")

    def local(value: Any) -> Any:
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    def maybe_symbolic_build(iterator: Any = None, data_batch: Any = None) -> None:
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(local, next(batches))
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    # Instance attributes: Keras looks these up on the model when fit builds its functions.
    model._maybe_symbolic_build = maybe_symbolic_build
    model.train_step = _scalar_logs_as_vectors(model.train_step)
    model.test_step = _scalar_logs_as_vectors(model.test_step)
    switched = [layer for layer in _all_layers(model)
                if isinstance(layer, keras.layers.BatchNormalization) and not layer.synchronized]
    for layer in switched:
        layer.synchronized = True
    return switched


def _all_layers(model: Any) -> list[Any]:
    """Every layer of a model, nested models' layers included."""
    out = []
    for layer in getattr(model, "layers", []):
        out.append(layer)
        out.extend(_all_layers(layer))
    return out


def weights_digest(model: Any) -> str:
    """SHA-256 of a model's weights (shapes, dtypes and values, in ``get_weights`` order).

    Two workers of a multi-worker run end with the same digest: the check that they trained
    in sync (:func:`train_model` logs it).
    """
    digest = hashlib.sha256()
    for array in model.get_weights():
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


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
    multi_worker = _in_multi_worker_mode(strategy)
    synchronized_bn = _adapt_keras_to_multi_worker(model, strategy) if multi_worker else []
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
