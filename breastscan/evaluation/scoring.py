"""Score a bundle on rows: predictions, then metrics from the predictions alone.

Two steps, so that everything that judges a model agrees:

1. :func:`score_bundle` runs the model on loaded rows (:class:`~breastscan.data.loading.SplitData`)
   and writes one **prediction row** per image (``image``, ``group``, and ``true``,
   ``pred``, ``prob_<class>`` for a classifier; ``lesion``, ``dice``, ``iou``,
   ``true_pixels``, ``pred_pixels`` for a segmenter). A classifier's temperature, and the
   cutoff of a decision rule that declares a target sensitivity, are fitted on a
   validation split when one is given (the evaluate stage, each benchmark fold) and the
   ones stored with the model are kept otherwise (external data, the promotion re-score);
   ``pred`` is the class the rule calls (:class:`breastscan.decision.DecisionRule`).
2. :func:`score_predictions` turns prediction rows into metrics with the metric registry
   (:mod:`breastscan.evaluation.metrics`), resampling whole ``group`` s for the intervals.
   The called classes are the rows' ``pred`` (so pooled rows of several models, e.g. the
   folds of a benchmark, keep each model's decisions).
   The evaluate stage, ``breastscan evaluate``, ``breastscan bench-quality`` (and its
   ``--rescore`` from saved predictions) and the promotion gate all call it.

Which metrics are reported follows from the model's declaration (:class:`Scoring`).
Nothing here imports TensorFlow: the bundle runs the model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from breastscan.decision import ARGMAX_RULE, DecisionRule
from breastscan.evaluation import calibration
from breastscan.evaluation import metrics as M
from breastscan.jsonable import json_clean

if TYPE_CHECKING:
    from breastscan.bundle import ModelBundle, ModelContract
    from breastscan.config import ModelConfig
    from breastscan.data.loading import SplitData

log = logging.getLogger(__name__)

BATCH = 64
"""Images per model call when computing logits."""

CALIBRATION_BINS = 15
"""Equal-width confidence bins of the ECE and the reliability diagram."""

DICE_HIST_BINS = 20


@dataclass(frozen=True)
class Scoring:
    """What a model is scored on, from its declaration.

    Attributes:
        task: ``classification`` or ``segmentation``.
        class_names: display names in class-index order (``("lesion",)`` for a segmenter).
        headline: the metric promotions compare and reports lead with.
        metrics: every metric reported (:func:`~breastscan.evaluation.metrics.declared_metrics`).
    """

    task: str
    class_names: tuple[str, ...]
    headline: str
    metrics: tuple[str, ...]

    @classmethod
    def declare(cls, task: str, class_names: Sequence[str], headline: str,
                gated: Sequence[str] = ()) -> Scoring:
        """The scoring of a model of ``task`` with ``class_names``, a headline and gates.

        Raises:
            ValueError: the headline or a gated metric does not apply to the model.
        """
        names = tuple(str(c) for c in class_names)
        if task == M.MULTITASK:  # a classifier's and a segmenter's metrics, each checked as theirs
            parts = [cls.declare(kind, names if kind == M.CLASSIFICATION else ("lesion",),
                                 _own_headline(kind, len(names), headline),
                                 [g for g in gated if _kind_of(g, len(names)) == kind])
                     for kind in (M.CLASSIFICATION, M.SEGMENTATION)]
            if headline not in (p.headline for p in parts):
                raise ValueError(f"{headline!r} is not a metric of a multi-task model with "
                                 f"{len(names)} classes")
            return cls(task=task, class_names=names, headline=headline,
                       metrics=parts[0].metrics + parts[1].metrics)
        k = len(names) if task == M.CLASSIFICATION else 0
        return cls(task=task, class_names=names, headline=headline,
                   metrics=M.declared_metrics(task, k, headline, gated))

    def view(self, task: str) -> Scoring:
        """A multi-task model's scoring of one output (``classification`` / ``segmentation``):
        that kind's metrics, the headline when it is one of them (else the kind's default)."""
        if self.task != M.MULTITASK:
            return self
        k = len(self.class_names)
        return Scoring(task=task, class_names=self.class_names if task == M.CLASSIFICATION else ("lesion",),
                       headline=_own_headline(task, k, self.headline),
                       metrics=tuple(m for m in self.metrics if _kind_of(m, k) == task))

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> Scoring:
        """The scoring of a model declared in params.yaml (headline and gate floors)."""
        return cls.declare(cfg.task, cfg.class_names, cfg.headline, tuple(cfg.gates.floors))

    @classmethod
    def from_contract(cls, contract: ModelContract, headline: str | None = None) -> Scoring:
        """The scoring a bundle declares; ``headline`` overrides its own (checked)."""
        own = contract.headline or ("mean_dice" if contract.task == M.SEGMENTATION else "macro_auc")
        return cls.declare(contract.task, contract.class_names, headline or own,
                           tuple(contract.metrics) + ((own,) if headline else ()))


def _kind_of(metric: str, n_classes: int) -> str:
    """``classification`` or ``segmentation``: which output a metric (or ``per_class.*`` gate) reads."""
    return M.SEGMENTATION if metric in M.headlines(M.SEGMENTATION) else M.CLASSIFICATION


def _own_headline(task: str, n_classes: int, headline: str) -> str:
    """``headline`` when it is a metric of ``task``, else that task's default (macro AUC, lesion Dice)."""
    if headline in M.headlines(task, n_classes):
        return headline
    return "macro_auc" if task == M.CLASSIFICATION else "lesion_mean_dice"


@dataclass
class Evaluation:
    """A model scored on one set of rows.

    Attributes:
        task: ``classification`` or ``segmentation``.
        metrics: JSON-able metrics (:func:`summary_metrics`): a ``dvc metrics`` file and
            the input of the promotion gates; ``None`` where undefined.
        plots: plot name -> row dicts (``roc``, ``pr``, ``confusion``, ``calibration``;
            ``dice``, ``dice_hist``).
        predictions: one row per image (see the module docstring).
        class_names: the model's class names in index order.
        temperature: a classifier's calibration temperature, else ``None``.
        decision: a classifier's decision rule as scored (fitted on the validation rows, or
            the stored one), else ``None``.
        scores: metric -> ``{"value", "ci_low", "ci_high"}`` for every declared metric.
    """

    task: str
    metrics: dict[str, Any]
    plots: dict[str, list[dict[str, Any]]]
    predictions: pd.DataFrame
    class_names: tuple[str, ...] = ()
    temperature: float | None = None
    scores: dict[str, dict[str, float | None]] | None = None
    decision: DecisionRule | None = None


# --------------------------------------------------------------------------- predictions


def batched_logits(bundle: ModelBundle, images: np.ndarray, batch_size: int = BATCH) -> np.ndarray:
    """Raw model outputs of many images, ``batch_size`` at a time.

    Args:
        bundle: the model.
        images: ``(n, H, W, 1)`` float32 in [0, 1] at the model's input size.
        batch_size: images per model call.

    Returns:
        ``(n, k)`` logits or ``(n, H, W, 1)`` mask logits, float32.
    """
    images = np.asarray(images, np.float32)
    if len(images) == 0:
        return bundle.logits(images)
    parts = [bundle.logits(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return np.concatenate(parts, axis=0)


def _row_ids(rows: SplitData) -> tuple[list[str], list[str]]:
    n = len(rows)
    images = rows.frame["image"].astype(str).tolist() if "image" in rows.frame.columns else [""] * n
    return images, [str(g) for g in np.asarray(rows.groups)]


def class_predictions(rows: SplitData, probs: np.ndarray, class_names: Sequence[str],
                      rule: DecisionRule = ARGMAX_RULE) -> pd.DataFrame:
    """Prediction rows of a classifier: ``image``, ``group``, ``true``, ``pred``, ``prob_<class>``.

    Args:
        rows: the scored rows (targets are class indices).
        probs: ``(n, k)`` calibrated probabilities.
        class_names: ``k`` display names.
        rule: the model's decision rule; ``pred`` is the class it calls.
    """
    images, groups = _row_ids(rows)
    y = np.asarray(rows.targets).astype(np.int64)
    pred = rule.decide(probs, class_names)
    return pd.DataFrame({
        "image": images, "group": groups,
        "true": [class_names[t] for t in y], "pred": [class_names[p] for p in pred],
        **{f"prob_{name}": probs[:, c] for c, name in enumerate(class_names)},
    })


def mask_predictions(rows: SplitData, probs: np.ndarray, threshold: float) -> pd.DataFrame:
    """Prediction rows of a segmenter: ``image``, ``group``, ``lesion``, ``dice``, ``iou``, pixel counts.

    Args:
        rows: the scored rows (targets are ``(n, H, W, 1)`` masks in {0, 1}).
        probs: ``(n, H, W, 1)`` mask probabilities in [0, 1].
        threshold: a pixel is lesion when its probability is ``>= threshold``.
    """
    images, groups = _row_ids(rows)
    truth = np.asarray(rows.targets)
    outcomes = M.MaskOutcomes.from_masks(truth, probs, threshold)
    n = outcomes.n
    return pd.DataFrame({
        "image": images, "group": groups, "lesion": outcomes.lesion.astype(int),
        "dice": outcomes.dice, "iou": outcomes.iou,
        "true_pixels": (truth.reshape(n, -1) > 0.5).sum(axis=1),
        "pred_pixels": (np.asarray(probs).reshape(n, -1) >= threshold).sum(axis=1),
    })


def outcomes_of(pred: pd.DataFrame, scoring: Scoring) -> M.ClassOutcomes | M.MaskOutcomes:
    """The registry's outcomes of prediction rows (the one reader of prediction rows).

    A classifier's called classes are the rows' ``pred`` (the decision rule's, see
    :func:`class_predictions`); rows without that column are read at the arg-max.

    Raises:
        ValueError: a true or called class that is not one of the model's, or missing columns.
    """
    if scoring.task == M.SEGMENTATION:
        return M.MaskOutcomes(dice=pred["dice"].to_numpy(np.float64), iou=pred["iou"].to_numpy(np.float64),
                              lesion=pred["lesion"].to_numpy().astype(bool))
    index = {name: i for i, name in enumerate(scoring.class_names)}
    unknown = sorted(set(pred["true"].astype(str)) - set(index))
    if unknown:
        raise ValueError(f"true classes {unknown} are not among {list(scoring.class_names)}")
    probs = pred[[f"prob_{name}" for name in scoring.class_names]].to_numpy(np.float64)
    if len(probs):
        probs = probs / probs.sum(axis=1, keepdims=True)  # CSV round-off
    called = None
    if "pred" in pred.columns:
        named = pred["pred"].astype(str)
        strange = sorted(set(named) - set(index))
        if strange:
            raise ValueError(f"called classes {strange} are not among {list(scoring.class_names)}")
        called = named.map(index).to_numpy(np.int64)
    y = pred["true"].astype(str).map(index).to_numpy(np.int64)
    return M.ClassOutcomes(y=y, probs=probs, called=called)


# --------------------------------------------------------------------------- metrics


def pooled_calibration(pred: pd.DataFrame, scoring: Scoring) -> dict[str, Any] | None:
    """Top-label ECE of a classifier's prediction rows, as served and before calibration.

    The rows hold calibrated probabilities ``softmax(z / T)`` and, per row, the ``temperature``
    ``T`` of the model that scored it (e.g. out-of-fold rows of five folds' models), so the
    uncalibrated ``softmax(z)`` is recovered as ``softmax(T * log p)``.

    Returns:
        ``{"ece", "ece_at_t1", "n_bins"}`` (ECE in [0, 1]), or ``None`` for a segmenter,
        rows without a ``temperature`` column, or no rows.
    """
    scoring = scoring.view(M.CLASSIFICATION)
    if scoring.task == M.SEGMENTATION or "temperature" not in pred.columns or not len(pred):
        return None
    out = outcomes_of(pred, scoring)
    assert isinstance(out, M.ClassOutcomes)
    temperature = pred["temperature"].to_numpy(np.float64)[:, None]
    z = temperature * np.log(np.clip(out.probs, 1e-12, 1.0))
    raw = np.exp(z - z.max(axis=1, keepdims=True))
    raw /= raw.sum(axis=1, keepdims=True)
    return {"ece": calibration.expected_calibration_error(out.probs, out.y, n_bins=CALIBRATION_BINS),
            "ece_at_t1": calibration.expected_calibration_error(raw, out.y, n_bins=CALIBRATION_BINS),
            "n_bins": CALIBRATION_BINS}


def score_predictions(pred: pd.DataFrame, scoring: Scoring, *, n_boot: int = 1000, seed: int = 0,
                      intervals: Sequence[str] | None = None) -> dict[str, dict[str, float | None]]:
    """Every declared metric of prediction rows, with grouped 95 % bootstrap intervals.

    Args:
        pred: prediction rows (:func:`class_predictions` / :func:`mask_predictions`, or
            the same columns read back from ``predictions.csv``); ``group`` (when present)
            is the resampling unit, else each image is its own.
        scoring: the model's declaration.
        n_boot: resamples (0: values only).
        seed: bootstrap seed.
        intervals: metrics that get an interval (default: all of ``scoring.metrics``).

    Returns:
        Metric -> ``{"value", "ci_low", "ci_high"}`` in ``scoring.metrics`` order.
    """
    wanted = set(scoring.metrics if intervals is None else intervals)
    if scoring.task == M.MULTITASK:  # each output's metrics from its own columns
        parts: dict[str, dict[str, float | None]] = {}
        for kind in (M.CLASSIFICATION, M.SEGMENTATION):
            view = scoring.view(kind)
            parts.update(score_predictions(pred, view, n_boot=n_boot, seed=seed,
                                           intervals=[m for m in view.metrics if m in wanted]))
        return {name: parts[name] for name in scoring.metrics}
    outcomes = outcomes_of(pred, scoring)
    groups = pred["group"].astype(str).to_numpy() if "group" in pred.columns else None
    out: dict[str, dict[str, float | None]] = {}
    for name in scoring.metrics:
        out.update(M.score(outcomes, [name], groups, n_boot=n_boot if name in wanted else 0, seed=seed))
    return out


def summary_metrics(scores: dict[str, dict[str, float | None]], scoring: Scoring,
                    pred: pd.DataFrame) -> dict[str, Any]:
    """The flat metrics of a report (``metrics.json``): values, the headline and its interval.

    Classifiers add ``per_class`` (support, sensitivity, specificity, precision, AUC);
    segmenters ``n_lesion_images``; a multi-task model both. All end with ``n_test``.
    """
    if scoring.task == M.MULTITASK:
        views = [scoring.view(kind) for kind in (M.SEGMENTATION, M.CLASSIFICATION)]
        out = {}
        for view in views:
            out.update(summary_metrics({m: scores[m] for m in view.metrics}, view, pred))
        head = scores.get(scoring.headline, {})
        out.update({"headline": scoring.headline, "headline_value": head.get("value"),
                    "headline_ci_low": head.get("ci_low"), "headline_ci_high": head.get("ci_high")})
        return json_clean(out)
    out = {name: s["value"] for name, s in scores.items()}
    head = scores.get(scoring.headline, {})
    out.update({"headline": scoring.headline, "headline_value": head.get("value"),
                "headline_ci_low": head.get("ci_low"), "headline_ci_high": head.get("ci_high")})
    outcomes = outcomes_of(pred, scoring)
    if isinstance(outcomes, M.ClassOutcomes):
        out["per_class"] = M.per_class(outcomes, scoring.class_names)
    else:
        out["n_lesion_images"] = int(outcomes.lesion.sum())
    out["n_test"] = int(len(pred))
    return json_clean(out)



# --------------------------------------------------------------------------- a bundle on rows


def score_bundle(bundle: ModelBundle, rows: SplitData, *, val: SplitData | None = None,
                 scoring: Scoring | None = None, n_boot: int = 1000, seed: int = 0,
                 all_intervals: bool = False) -> Evaluation:
    """Run a bundle on rows and score it: the one way a model is judged.

    Args:
        bundle: the model.
        rows: the scored rows (a test split, an external dataset, a benchmark fold).
        val: a classifier's validation rows: the temperature is fitted there; ``None``
            keeps the temperature stored in the bundle's contract.
        scoring: what to report (default: the bundle's own declaration).
        n_boot: bootstrap resamples of the intervals (0: none).
        seed: bootstrap seed.
        all_intervals: an interval for every declared metric (default: the headline only).

    Returns:
        The evaluation: ``metrics`` (the flat report of :func:`summary_metrics` plus
        calibration or threshold), ``scores`` (every declared metric with its interval),
        prediction rows and plot data.

    Raises:
        ValueError: no rows, or the scoring's task is not the bundle's.
    """
    contract = bundle.contract
    scoring = scoring or Scoring.from_contract(contract)
    if scoring.task != contract.task:
        raise ValueError(f"model {contract.name} is a {contract.task} model, not {scoring.task}")
    if len(rows) == 0:
        raise ValueError(f"model {contract.name}: no rows to score")
    wanted = scoring.metrics if all_intervals else (scoring.headline,)
    if contract.task == M.CLASSIFICATION:
        return _score_classifier(bundle, rows, val, scoring, (n_boot, seed, wanted))
    if contract.task == M.MULTITASK:
        return _score_multitask(bundle, rows, val, scoring, (n_boot, seed, wanted))
    return _score_segmenter(bundle, rows, scoring, (n_boot, seed, wanted))


def _score_multitask(bundle: ModelBundle, rows: SplitData, val: SplitData | None, scoring: Scoring,
                     boot: Bootstrap) -> Evaluation:
    """A multi-task model: its class head as a classifier, its mask as a segmenter, one report.

    The rows carry class targets and masks (``rows.masks``); the prediction rows hold both
    kinds of columns, the metrics both kinds of values, the plots both kinds of curves.
    """
    if rows.masks is None:
        raise ValueError(f"model {bundle.contract.name}: scoring a multi-task model needs the rows' masks")
    views = {kind: scoring.view(kind) for kind in (M.CLASSIFICATION, M.SEGMENTATION)}
    wanted = {kind: tuple(m for m in boot[2] if m in v.metrics) or (v.headline,) for kind, v in views.items()}
    cls = _score_classifier(bundle.view(M.CLASSIFICATION), rows, val, views[M.CLASSIFICATION],
                            (boot[0], boot[1], wanted[M.CLASSIFICATION]))
    seg = _score_segmenter(bundle.view(M.SEGMENTATION), replace(rows, targets=rows.masks, masks=None),
                           views[M.SEGMENTATION], (boot[0], boot[1], wanted[M.SEGMENTATION]))
    mask_columns = seg.predictions.drop(columns=["image", "group"])
    pred = pd.concat([cls.predictions, mask_columns], axis=1)
    scores = {name: {**cls.scores, **seg.scores}[name] for name in scoring.metrics}  # type: ignore[dict-item]
    metrics = summary_metrics(scores, scoring, pred)
    for key in ("ece_before", "ece_after", "temperature", "calibration", "n_val", "decision", "threshold"):
        if key in cls.metrics or key in seg.metrics:
            metrics[key] = cls.metrics.get(key, seg.metrics.get(key))
    return Evaluation(task=M.MULTITASK, metrics=json_clean(metrics), plots={**cls.plots, **seg.plots},
                      predictions=pred, class_names=cls.class_names, temperature=cls.temperature,
                      scores=scores, decision=cls.decision)


def calibration_helps(record: dict[str, Any]) -> bool:
    """Keep a fitted temperature only when it lowers the validation NLL without raising its ECE.

    Args:
        record: ``val_nll_before/after`` and ``val_ece_before/after`` (T = 1 / fitted T).
    """
    return bool(record["val_nll_after"] < record["val_nll_before"]
                and record["val_ece_after"] <= record["val_ece_before"] + 1e-12)


def _temperature(bundle: ModelBundle, val: SplitData | None,
                 logits: np.ndarray | None) -> tuple[float, dict[str, Any]]:
    """The served temperature and the calibration record (``calibration`` in the metrics).

    With validation rows (``logits``: the model's on them), ``T`` is fitted there and kept
    only when it lowers the validation NLL without raising the validation ECE; otherwise the
    model is served uncalibrated (``T = 1``). Both candidates' validation numbers are recorded.
    """
    name = bundle.contract.name
    if val is None:
        log.info("model %s: keeping the stored temperature %.3f", name, bundle.contract.temperature)
        return float(bundle.contract.temperature), {"source": "stored"}
    if logits is None or not len(val):
        log.warning("model %s: empty validation split, temperature left at 1.0", name)
        return 1.0, {"source": "no validation rows"}
    y = np.asarray(val.targets).astype(np.int64)
    fitted = calibration.fit_temperature(logits, y)
    record: dict[str, Any] = {"fitted_temperature": fitted}
    for label, t in (("before", 1.0), ("after", fitted)):
        probs = _normalised(bundle.with_temperature(t).probabilities(logits))
        record[f"val_nll_{label}"] = float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-15, 1.0))))
        record[f"val_ece_{label}"] = calibration.expected_calibration_error(probs, y, n_bins=CALIBRATION_BINS)
    keep = calibration_helps(record)
    record["source"] = "fitted on validation" if keep else "uncalibrated: scaling did not help on validation"
    if not keep:
        log.warning("model %s: temperature %.3f raised the validation ECE (%.3f -> %.3f) or NLL: served "
                    "uncalibrated (T = 1)", name, fitted, record["val_ece_before"], record["val_ece_after"])
    return (fitted if keep else 1.0), record


def _decision(bundle: ModelBundle, val: SplitData | None, logits: np.ndarray | None, temperature: float,
              class_names: Sequence[str]) -> DecisionRule:
    """The decision rule as scored and served: the contract's, fitted on the validation rows.

    With validation rows, a rule that declares a target sensitivity gets its cutoff fitted on
    their calibrated probabilities (at ``temperature``, as served), and any positive-ratio
    rule its validation sensitivity and specificity; without, the stored rule is kept.

    Raises:
        ValueError: a rule that still needs its cutoff and no validation row to fit it on.
    """
    rule = bundle.contract.rule
    if rule.is_argmax:
        return rule
    if val is None or logits is None or not len(val):
        if not rule.ready:
            raise ValueError(f"model {bundle.contract.name}: its decision rule needs a cutoff fitted on "
                             "validation rows, and none were given")
        log.info("model %s: keeping the stored decision rule: %s", bundle.contract.name, rule.describe())
        return rule
    probs = _normalised(bundle.with_temperature(temperature).probabilities(logits))
    y = np.asarray(val.targets).astype(np.int64)
    return rule.fit(probs, y, class_names, fitted_on="validation split")


Bootstrap = tuple[int, int, Sequence[str]]
"""``(n_boot, seed, metrics with an interval)``."""


def _score_classifier(bundle: ModelBundle, rows: SplitData, val: SplitData | None, scoring: Scoring,
                      boot: Bootstrap) -> Evaluation:
    from breastscan.evaluation import curves

    val_logits = batched_logits(bundle, val.images) if val is not None and len(val) else None
    temperature, record = _temperature(bundle, val, val_logits)
    rule = _decision(bundle, val, val_logits, temperature, scoring.class_names)
    logits = batched_logits(bundle, rows.images)
    before = _normalised(bundle.with_temperature(1.0).probabilities(logits))
    probs = _normalised(bundle.with_temperature(temperature).probabilities(logits))
    pred = class_predictions(rows, probs, scoring.class_names, rule)
    scores = score_predictions(pred, scoring, n_boot=boot[0], seed=boot[1], intervals=boot[2])
    y = np.asarray(rows.targets).astype(np.int64)
    metrics = summary_metrics(scores, scoring, pred)
    ece_before = calibration.expected_calibration_error(before, y, n_bins=CALIBRATION_BINS)
    ece_after = calibration.expected_calibration_error(probs, y, n_bins=CALIBRATION_BINS)
    n_test = metrics.pop("n_test")
    metrics.update({"ece_before": ece_before, "ece_after": ece_after, "temperature": float(temperature),
                    "calibration": record, "n_test": n_test,
                    "n_val": int(len(val)) if val is not None else 0})
    if not rule.is_argmax:  # argmax models' reports stay as they were
        metrics["decision"] = rule.to_dict()
    log.info("%s: T = %.3f, ECE %.3f -> %.3f, %s = %s on %d images", bundle.contract.name, temperature,
             ece_before, ece_after, scoring.headline, metrics["headline_value"], len(y))
    called = rule.decide(probs, scoring.class_names)
    plots = curves.classifier_rows(y, before, probs, scoring.class_names, CALIBRATION_BINS, pred=called)
    return Evaluation(task=M.CLASSIFICATION, metrics=json_clean(metrics), plots=plots, predictions=pred,
                      class_names=scoring.class_names, temperature=float(temperature), scores=scores,
                      decision=rule)


def _normalised(probs: np.ndarray) -> np.ndarray:
    p = np.asarray(probs, np.float64)
    return p / p.sum(axis=1, keepdims=True)


def _score_segmenter(bundle: ModelBundle, rows: SplitData, scoring: Scoring, boot: Bootstrap) -> Evaluation:
    from breastscan.evaluation import curves

    threshold = float(bundle.contract.threshold)
    probs = bundle.probabilities(batched_logits(bundle, rows.images))
    pred = mask_predictions(rows, probs, threshold)
    scores = score_predictions(pred, scoring, n_boot=boot[0], seed=boot[1], intervals=boot[2])
    metrics = summary_metrics(scores, scoring, pred)
    n_test = metrics.pop("n_test")
    metrics.update({"threshold": threshold, "n_test": n_test})
    log.info("%s: mean Dice %s, mean IoU %s on %d images (%d with a lesion)", bundle.contract.name,
             metrics["mean_dice"], metrics["mean_iou"], n_test, metrics["n_lesion_images"])
    plots = curves.segmenter_rows(pred, DICE_HIST_BINS)
    return Evaluation(task=M.SEGMENTATION, metrics=json_clean(metrics), plots=plots, predictions=pred,
                      class_names=scoring.class_names, scores=scores)


# --------------------------------------------------------------------------- a pool's sites


def per_site(evaluation: Evaluation, rows: SplitData, scoring: Scoring, *, column: str = "site",
             n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """The metrics of each site of a pool, scored apart (the pooled ones are ``evaluation.metrics``).

    Each site's prediction rows are scored as a model's test split is
    (:func:`score_predictions`, :func:`summary_metrics`, with the headline's grouped 95 %
    interval); a classifier's site also gets its calibration (top-label ECE). A metric a
    site cannot define (an AUC of a class the site lacks) is ``None``.

    Args:
        evaluation: the model scored on ``rows`` (:func:`score_bundle`).
        rows: the scored rows, in the order of ``evaluation.predictions``.
        scoring: the model's declaration.
        column: the column naming each row's site.
        n_boot: bootstrap resamples of the headline's interval.
        seed: bootstrap seed.

    Returns:
        ``{site: metrics}`` in site order; empty when the rows have no ``column``.
    """
    if column not in rows.frame.columns:
        return {}
    sites = rows.frame[column].astype(str).to_numpy()
    out: dict[str, dict[str, Any]] = {}
    for site in sorted(set(sites)):
        pred = evaluation.predictions[sites == site].reset_index(drop=True)
        scores = score_predictions(pred, scoring, n_boot=n_boot, seed=seed, intervals=(scoring.headline,))
        metrics = summary_metrics(scores, scoring, pred)
        if scoring.task != M.SEGMENTATION:
            out_ = outcomes_of(pred, scoring.view(M.CLASSIFICATION))
            assert isinstance(out_, M.ClassOutcomes)
            metrics["ece"] = calibration.expected_calibration_error(out_.probs, out_.y,
                                                                    n_bins=CALIBRATION_BINS)
        out[site] = json_clean(metrics)
    return out
