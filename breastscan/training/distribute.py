"""Distribution strategies for training: ``TF_CONFIG``, ``tf.distribute``, and Keras 3's multi-worker fixes.

``cfg.distribution`` of a model (see :func:`get_strategy`):

* ``none``: TensorFlow's default strategy (one device).
* ``mirrored``: synchronous data parallelism over the local GPUs, or over several
  *logical* CPU devices when the process has split its CPU with
  :func:`configure_logical_cpus` before TensorFlow initialised its devices (useful to
  exercise the mirrored path on a CPU-only machine; it does not add compute).
* ``multi_worker``: ``MultiWorkerMirroredStrategy`` across hosts, configured by the
  ``TF_CONFIG`` environment variable of each worker. Every worker runs the same program
  (the same training steps, in lock-step: gradients are all-reduced); only the chief
  (:func:`is_chief`) keeps what it saves and logs. Keras 3 (3.15 checked) needs three
  fixes for this, see :func:`adapt_keras_to_multi_worker`.

TensorFlow and Keras are imported inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import tensorflow as tf

log = logging.getLogger(__name__)


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
                        "CPU devices configured; see breastscan.training.distribute.configure_logical_cpus)")
        strategy = tf.distribute.MirroredStrategy(devices=cpus)
    log.info("mirrored strategy over %d replica(s)", strategy.num_replicas_in_sync)
    return strategy


def in_multi_worker_mode(strategy: tf.distribute.Strategy) -> bool:
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


def adapt_keras_to_multi_worker(model: Any, strategy: tf.distribute.Strategy) -> list[Any]:
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
    in sync (:func:`breastscan.training.loop.train_model` logs it).
    """
    digest = hashlib.sha256()
    for array in model.get_weights():
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
