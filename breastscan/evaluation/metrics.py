"""The metric registry: every quality number the project reports, defined once.

A metric is a function of **outcomes** and an **index**: ``fn(outcomes, idx) -> float``,
where ``idx`` selects (with repeats) the scored images. Called with ``idx = arange(n)`` it
is the point value; called with grouped bootstrap resamples it gives the 95 % interval
(:func:`bootstrap_ci`). So the evaluate stage, ``breastscan evaluate``, the
cross-validation benchmark and the promotion gate cannot disagree on what a metric means.

Outcomes are of two kinds:

* :class:`ClassOutcomes` -- true class indices and calibrated probabilities of a classifier,
  and the class called for each image: by the model's decision rule
  (:class:`breastscan.decision.DecisionRule`, so sensitivity, specificity, the per-class
  statistics and the gates on them are those of the served decisions), by a two-class
  threshold (readings at an operating point), or the arg-max;
* :class:`MaskOutcomes` -- per-image Dice and IoU of a segmenter, and which images hold a
  lesion.

Which metrics a model reports follows from its declaration (task, number of classes,
headline, gated metrics): :func:`declared_metrics`. :func:`score` gives every declared
metric its value and interval. Per-class statistics (:func:`per_class`) are point values.
Calibration lives in :mod:`breastscan.evaluation.calibration`.

Nothing here imports TensorFlow or scikit-learn; the tests check every metric against
scikit-learn.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from breastscan.config import METRIC_KINDS, metric_names
from breastscan.decision import DecisionRule

log = logging.getLogger(__name__)

CLASSIFICATION = "classification"
SEGMENTATION = "segmentation"
MULTITASK = "multitask"
"""A model with both a classifier's and a segmenter's outputs (its metrics: both kinds)."""


# --------------------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class ClassOutcomes:
    """A classifier's outcomes on ``n`` images.

    Attributes:
        y: ``(n,)`` int64 true class indices in ``[0, k)``.
        probs: ``(n, k)`` float64 probabilities, rows summing to 1.
        threshold: two classes only: class 1 is called when ``probs[:, 1] >= threshold``
            (a scalar, or ``(n,)`` per image); ``None``: the arg-max is called.
        called: ``(n,)`` class indices a decision rule called
            (:meth:`breastscan.decision.DecisionRule.decide`, or a prediction row's ``pred``);
            ``None``: ``threshold`` or the arg-max decides. Not with ``threshold``.
        pred: ``(n,)`` int64, the called class of each image (derived).
    """

    y: np.ndarray
    probs: np.ndarray
    threshold: float | np.ndarray | None = None
    called: np.ndarray | None = field(default=None, repr=False)
    pred: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        y = np.asarray(self.y).astype(np.int64)
        p = np.asarray(self.probs, np.float64)
        if y.ndim != 1 or p.ndim != 2 or len(y) != len(p):
            raise ValueError(f"need y (n,) and probs (n, k); got {y.shape} and {p.shape}")
        if len(y) and (y.min() < 0 or y.max() >= p.shape[1]):
            raise ValueError(f"y holds class indices outside [0, {p.shape[1] - 1}]")
        if self.threshold is not None and p.shape[1] != 2:
            raise ValueError("a decision threshold needs exactly two classes")
        if len(p) and (not np.isfinite(p).all() or p.min() < 0 or np.abs(p.sum(axis=1) - 1).max() > 1e-3):
            raise ValueError("probs must be probabilities in [0, 1] with rows summing to 1 (not logits)")
        object.__setattr__(self, "y", y)
        object.__setattr__(self, "probs", p)
        object.__setattr__(self, "pred", self._decisions(p))

    def _decisions(self, p: np.ndarray) -> np.ndarray:
        if self.called is None:
            if self.threshold is not None:
                return (p[:, 1] >= np.asarray(self.threshold, np.float64)).astype(np.int64)
            return p.argmax(axis=1).astype(np.int64)
        if self.threshold is not None:
            raise ValueError("give a threshold or the called classes, not both")
        called = np.asarray(self.called).astype(np.int64)
        if called.shape != (len(p),) or (len(called) and (called.min() < 0 or called.max() >= p.shape[1])):
            raise ValueError(f"called must be ({len(p)},) class indices in [0, {p.shape[1] - 1}]")
        return called

    @classmethod
    def decided(cls, y: np.ndarray, probs: np.ndarray, rule: DecisionRule,
                class_names: Sequence[str]) -> ClassOutcomes:
        """Outcomes whose called classes are a decision rule's.

        Args:
            y: ``(n,)`` true class indices.
            probs: ``(n, k)`` probabilities, columns in ``class_names`` order.
            rule: the model's decision rule (fitted, or argmax).
            class_names: ``k`` class names.
        """
        return cls(y=y, probs=probs, called=rule.decide(probs, class_names))

    @property
    def n(self) -> int:
        """Images scored."""
        return len(self.y)

    @property
    def k(self) -> int:
        """Classes."""
        return int(self.probs.shape[1])


@dataclass(frozen=True)
class MaskOutcomes:
    """A segmenter's outcomes on ``n`` images.

    Attributes:
        dice: ``(n,)`` per-image Dice in [0, 1] (1 when truth and prediction are both empty).
        iou: ``(n,)`` per-image IoU in [0, 1].
        lesion: ``(n,)`` bool, the ground truth holds a lesion.
    """

    dice: np.ndarray
    iou: np.ndarray
    lesion: np.ndarray

    def __post_init__(self) -> None:
        for name in ("dice", "iou"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), np.float64))
        object.__setattr__(self, "lesion", np.asarray(self.lesion).astype(bool))
        if not self.dice.shape == self.iou.shape == self.lesion.shape or self.dice.ndim != 1:
            raise ValueError("dice, iou and lesion must be (n,) arrays of one length")

    @property
    def n(self) -> int:
        """Images scored."""
        return len(self.dice)

    @classmethod
    def from_masks(cls, truth: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> MaskOutcomes:
        """Outcomes of thresholded mask probabilities against ground-truth masks.

        Args:
            truth: ``(n, H, W)`` or ``(n, H, W, 1)`` masks, foreground where > 0.5.
            probs: the same shape, predicted probabilities in [0, 1].
            threshold: a pixel is foreground when its probability is ``>= threshold``.
        """
        t = np.asarray(truth).reshape(len(truth), -1) > 0.5
        p = np.asarray(probs, np.float64).reshape(len(probs), -1) >= threshold
        if t.shape != p.shape:
            raise ValueError(f"mask shapes differ: {np.shape(truth)} vs {np.shape(probs)}")
        inter = np.logical_and(t, p).sum(axis=1).astype(np.float64)
        sizes = t.sum(axis=1) + p.sum(axis=1)
        union = np.logical_or(t, p).sum(axis=1)
        dice = np.where(sizes == 0, 1.0, 2.0 * inter / np.maximum(sizes, 1))
        iou = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
        return cls(dice=dice, iou=iou, lesion=np.asarray(t.any(axis=1)))


Outcomes = ClassOutcomes | MaskOutcomes


# --------------------------------------------------------------------------- metric functions


def rank_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC via the Mann-Whitney rank sum (ties averaged, as scikit-learn); NaN if undefined.

    Args:
        positive: ``(n,)`` bool, the positive cases.
        score: ``(n,)`` scores, higher = more positive.
    """
    from scipy.stats import rankdata

    positive = np.asarray(positive, bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _accuracy(o: ClassOutcomes, idx: np.ndarray) -> float:
    return float(np.mean(o.pred[idx] == o.y[idx]))


def _balanced_accuracy(o: ClassOutcomes, idx: np.ndarray) -> float:
    yi, pi = o.y[idx], o.pred[idx]
    return float(np.mean([np.mean(pi[yi == c] == c) for c in np.unique(yi)]))


def _macro_auc(o: ClassOutcomes, idx: np.ndarray) -> float:
    aucs = [rank_auc(o.y[idx] == c, o.probs[idx, c]) for c in range(o.k)]
    defined = [a for a in aucs if math.isfinite(a)]
    if not defined:
        raise ValueError("AUC undefined: one class only")
    return float(np.mean(defined))


def _auc(o: ClassOutcomes, idx: np.ndarray) -> float:
    return rank_auc(o.y[idx] == 1, o.probs[idx, 1])


def _quadratic_kappa(o: ClassOutcomes, idx: np.ndarray) -> float:
    # scikit-learn's cohen_kappa_score(weights="quadratic") in closed form: the bootstrap
    # calls this a thousand times, where scikit-learn's argument checks alone cost seconds.
    k = o.k
    observed = np.bincount(o.y[idx] * k + o.pred[idx], minlength=k * k).reshape(k, k).astype(float)
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / max(observed.sum(), 1.0)
    weights = (np.arange(k)[:, None] - np.arange(k)[None, :]).astype(float) ** 2
    disagreement = float((weights * expected).sum())
    if disagreement == 0.0:
        return float("nan")
    return 1.0 - float((weights * observed).sum()) / disagreement


def _log_loss(o: ClassOutcomes, idx: np.ndarray) -> float:
    p = np.clip(o.probs[idx, o.y[idx]], np.finfo(np.float64).eps, 1.0)
    return float(-np.mean(np.log(p)))


def _rate(o: ClassOutcomes, idx: np.ndarray, truth: int) -> float:
    sel = o.y[idx] == truth
    return float(np.mean(o.pred[idx][sel] == truth)) if sel.any() else float("nan")


def _sensitivity(o: ClassOutcomes, idx: np.ndarray) -> float:
    return _rate(o, idx, 1)


def _specificity(o: ClassOutcomes, idx: np.ndarray) -> float:
    return _rate(o, idx, 0)


def _mean_over(values: str, lesion_only: bool) -> Callable[[MaskOutcomes, np.ndarray], float]:
    def metric(o: MaskOutcomes, idx: np.ndarray) -> float:
        if lesion_only:
            idx = idx[o.lesion[idx]]
            if len(idx) == 0:
                raise ValueError("no lesion image among the scored images")
        return float(np.mean(getattr(o, values)[idx]))

    return metric


@dataclass(frozen=True)
class Metric:
    """One registered metric; its task and whether it is binary-only come from
    :data:`breastscan.config.METRIC_KINDS`, where every metric name is declared.

    Attributes:
        name: its name in reports, gates and MLflow.
        fn: ``fn(outcomes, idx) -> float`` (NaN or ``ValueError`` where undefined).
        higher_is_better: the direction gates compare in.
        doc: one line for people.
    """

    name: str
    fn: Callable[[Any, np.ndarray], float]
    higher_is_better: bool = True
    doc: str = ""

    @property
    def task(self) -> str:
        """``classification`` or ``segmentation``."""
        return METRIC_KINDS[self.name].task

    @property
    def binary_only(self) -> bool:
        """Defined for two-class outcomes only (class 1 is the positive one)."""
        return METRIC_KINDS[self.name].binary_only


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("accuracy", _accuracy, doc="share of images whose called class is true"),
    Metric("balanced_accuracy", _balanced_accuracy, doc="mean sensitivity over the classes present"),
    Metric("macro_auc", _macro_auc, doc="mean one-vs-rest ROC AUC over defined classes"),
    Metric("auc", _auc, doc="ROC AUC of class 1"),
    Metric("quadratic_kappa", _quadratic_kappa, doc="quadratic-weighted Cohen's kappa (ordinal classes)"),
    Metric("log_loss", _log_loss, higher_is_better=False, doc="mean negative log-likelihood"),
    Metric("sensitivity", _sensitivity, doc="share of class-1 images called class 1"),
    Metric("specificity", _specificity, doc="share of class-0 images called class 0"),
    Metric("mean_dice", _mean_over("dice", False), doc="mean per-image Dice"),
    Metric("mean_iou", _mean_over("iou", False), doc="mean per-image IoU"),
    Metric("lesion_mean_dice", _mean_over("dice", True), doc="mean Dice, lesion images"),
    Metric("lesion_mean_iou", _mean_over("iou", True), doc="mean IoU, lesion images"),
)}
"""Every metric the project reports, by name (the names and kinds of :data:`METRIC_KINDS`)."""
if set(METRICS) != set(METRIC_KINDS):  # a name declared without a function, or the reverse
    raise ImportError(f"metric registry and METRIC_KINDS differ: {sorted(set(METRICS) ^ set(METRIC_KINDS))}")

STANDARD: dict[str, tuple[str, ...]] = {
    CLASSIFICATION: ("accuracy", "balanced_accuracy", "macro_auc", "log_loss"),
    SEGMENTATION: ("mean_dice", "mean_iou", "lesion_mean_dice", "lesion_mean_iou"),
}
"""Metrics every model of a task reports, whatever it declares."""


def headlines(task: str, n_classes: int = 0) -> tuple[str, ...]:
    """Names a model of ``task`` with ``n_classes`` classes can headline or gate on."""
    return metric_names(task, n_classes)


def declared_metrics(task: str, n_classes: int, headline: str, gated: Iterable[str] = ()) -> tuple[str, ...]:
    """The metrics a model reports, from its declaration.

    The task's :data:`STANDARD` metrics, ``auc`` for a two-class model, then the headline
    and every gated metric that is not yet among them (e.g. ``quadratic_kappa`` for a model
    that headlines it). Names that are not whole-model metrics (``per_class.*``) are left to
    the caller.

    Raises:
        ValueError: the headline or a gated metric is not a metric of this task.
    """
    allowed = headlines(task, n_classes)
    names = list(STANDARD[task]) + (["auc"] if task == CLASSIFICATION and n_classes == 2 else [])
    for name in (headline, *gated):
        if name.startswith("per_class."):
            continue
        if name not in allowed:
            raise ValueError(f"{name!r} is not a metric of a {task} model with {n_classes} classes; "
                             f"choose one of {', '.join(allowed)}")
        if name not in names:
            names.append(name)
    return tuple(names)


# --------------------------------------------------------------------------- values and intervals


def value(name: str, outcomes: Outcomes, idx: np.ndarray | None = None) -> float | None:
    """A metric's value on the images ``idx`` (default: all); ``None`` where undefined.

    Raises:
        KeyError: unknown metric name.
    """
    metric = METRICS[name]
    index = np.arange(outcomes.n) if idx is None else idx
    if not len(index) or (metric.binary_only and getattr(outcomes, "k", 2) != 2):
        return None
    try:
        v = float(metric.fn(outcomes, index))
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def bootstrap_ci(
    metric: Callable[[np.ndarray], float],
    n: int,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of a metric of an index array.

    ``metric`` receives a resample of ``range(n)`` (with repeats); resamples where it is
    undefined (``ValueError`` or NaN) are skipped. With ``groups``, whole groups (patients,
    near-duplicate groups) are resampled so that correlated images stay together.

    Args:
        metric: function of an ``(m,)`` int index array returning a float.
        n: number of samples (>= 1).
        n_boot: number of resamples (>= 1).
        alpha: 1 - confidence level (0.05: a 95 % interval).
        seed: seed of the resampling (same seed, same interval).
        groups: ``(n,)`` group ids, or ``None`` to resample images.

    Returns:
        ``(low, high)``: the ``alpha/2`` and ``1 - alpha/2`` percentiles.

    Raises:
        ValueError: bad arguments, or the metric is undefined on every resample.
    """
    if int(n) < 1 or int(n_boot) < 1 or not 0.0 < alpha < 1.0:
        raise ValueError(f"need n >= 1, n_boot >= 1 and 0 < alpha < 1; got {n}, {n_boot}, {alpha}")
    rng = np.random.default_rng(seed)
    members = _group_members(groups, n) if groups is not None else None
    stats: list[float] = []
    for _ in range(int(n_boot)):
        if members is None:
            idx = rng.integers(0, n, size=n)
        else:
            idx = np.concatenate([members[i] for i in rng.integers(0, len(members), size=len(members))])
        try:
            v = float(metric(idx))
        except ValueError:
            continue
        if not math.isnan(v):
            stats.append(v)
    if not stats:
        raise ValueError("the metric is undefined on every bootstrap resample")
    if len(stats) < n_boot:
        log.info("bootstrap: skipped %d of %d resamples where the metric is undefined",
                 n_boot - len(stats), n_boot)
    low, high = np.quantile(np.asarray(stats), [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def _group_members(groups: np.ndarray, n: int) -> list[np.ndarray]:
    g = np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"groups must have shape ({n},), got {g.shape}")
    _, inverse = np.unique(g, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.cumsum(np.bincount(inverse))[:-1])


def interval(name: str, outcomes: Outcomes, groups: np.ndarray | None, *, n_boot: int = 1000,
             seed: int = 0) -> tuple[float | None, float | None]:
    """The grouped 95 % bootstrap interval of a metric; ``(None, None)`` where undefined."""
    if n_boot <= 0 or value(name, outcomes) is None:
        return None, None
    fn = METRICS[name].fn
    try:
        return bootstrap_ci(lambda idx: fn(outcomes, idx), outcomes.n, n_boot=n_boot, seed=seed,
                            groups=groups)
    except ValueError as exc:
        log.warning("no bootstrap interval for %s: %s", name, exc)
        return None, None


def score(outcomes: Outcomes, names: Sequence[str], groups: np.ndarray | None = None, *,
          n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, float | None]]:
    """Every named metric with its value and grouped 95 % bootstrap interval.

    Args:
        outcomes: what the model did.
        names: metric names (:data:`METRICS`).
        groups: ``(n,)`` group ids resampled together (``None``: images).
        n_boot: resamples (0: values only, intervals ``None``).
        seed: bootstrap seed; the same for every metric.

    Returns:
        Name -> ``{"value", "ci_low", "ci_high"}`` (``None`` where undefined).
    """
    out: dict[str, dict[str, float | None]] = {}
    for name in names:
        low, high = interval(name, outcomes, groups, n_boot=n_boot, seed=seed)
        out[name] = {"value": value(name, outcomes), "ci_low": low, "ci_high": high}
    return out


def per_class(outcomes: ClassOutcomes, class_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """One-vs-rest statistics of every class (point values; ``None`` where undefined).

    Returns:
        Class name -> ``support``, ``sensitivity``, ``specificity``, ``precision``, ``auc``.
    """
    y, pred, n = outcomes.y, outcomes.pred, outcomes.n
    out: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(class_names):
        tp = int(np.sum((y == c) & (pred == c)))
        fn = int(np.sum(y == c)) - tp
        fp = int(np.sum(pred == c)) - tp
        tn = n - tp - fn - fp
        auc = rank_auc(y == c, outcomes.probs[:, c])
        out[str(name)] = {
            "support": tp + fn,
            "sensitivity": tp / (tp + fn) if tp + fn else None,
            "specificity": tn / (tn + fp) if tn + fp else None,
            "precision": tp / (tp + fp) if tp + fp else None,
            "auc": auc if math.isfinite(auc) else None,
        }
    return out


def confusion(outcomes: ClassOutcomes) -> list[list[int]]:
    """``(k, k)`` counts: rows the true class, columns the called class."""
    k = outcomes.k
    return np.bincount(outcomes.y * k + outcomes.pred, minlength=k * k).reshape(k, k).astype(int).tolist()
