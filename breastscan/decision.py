"""A classifier's decision rule (operating point): how calibrated probabilities become one class.

Every consumer that names a class -- the test metrics and promotion gates, the served
``predicted``, Grad-CAM's target, the 8-category view, drift monitoring, the DICOM SR,
``breastscan predict`` and the external evaluation -- calls :meth:`DecisionRule.decide`, so
they all call the class the model was judged on.

Two rules:

* ``argmax`` (the default, and what a contract or a declaration without a rule means): the
  most probable class.
* ``positive_ratio``: a class outside the pair (``normal``) is called where it outweighs
  ``p(positive) + p(versus)`` (no lesion found); otherwise the ``positive`` class (e.g.
  ``malignant``) is called when ``r = p(positive) / (p(positive) + p(versus))`` reaches
  ``cutoff``, else ``versus``. With two classes ``r`` is ``p(positive)``. The cutoff is
  declared, or fitted (:meth:`DecisionRule.fit`) on the validation split's calibrated
  probabilities as the most specific cutoff that reaches ``target_sensitivity`` there
  (:func:`fit_cutoff`; a positive row called outside the pair counts as a miss, so the
  target may be out of reach: the fit's validation sensitivity says what was reached);
  the fit and its validation sensitivity / specificity travel with the model in its contract.

Only NumPy; no other project module.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ARGMAX = "argmax"
POSITIVE_RATIO = "positive_ratio"
RULES: tuple[str, ...] = (ARGMAX, POSITIVE_RATIO)
"""The decision rules a classifier can declare."""

DECLARED_KEYS: tuple[str, ...] = ("rule", "positive", "versus", "target_sensitivity", "cutoff")
"""The keys a model declaration (``decision:`` in params.yaml) may set; the rest are facts of a fit."""


def fit_cutoff(ratio: np.ndarray, is_positive: np.ndarray, target_sensitivity: float) -> float:
    """The most specific cutoff reaching a sensitivity: the largest ``c`` with
    ``mean(ratio[is_positive] >= c) >= target_sensitivity``.

    That is the ``k``-th largest positive score, ``k = ceil(target * n_positive)``.

    Args:
        ratio: ``(n,)`` scores in [0, 1], higher = more positive.
        is_positive: ``(n,)`` bool, the rows whose true class is the positive one.
        target_sensitivity: in ``(0, 1]``.

    Returns:
        The cutoff, one of the positive rows' scores.

    Raises:
        ValueError: no positive row, mismatched shapes or a target outside ``(0, 1]``.
    """
    scores = np.asarray(ratio, np.float64)
    positive = np.asarray(is_positive, bool)
    if scores.shape != positive.shape or scores.ndim != 1:
        raise ValueError(f"ratio and is_positive must be (n,) arrays of one length, got {scores.shape} "
                         f"and {positive.shape}")
    if not 0.0 < float(target_sensitivity) <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target_sensitivity}")
    ordered = np.sort(scores[positive])[::-1]
    if not len(ordered):
        raise ValueError("no positive row to fit a cutoff on")
    k = max(1, math.ceil(float(target_sensitivity) * len(ordered) - 1e-9))
    return float(ordered[k - 1])


@dataclass(frozen=True)
class DecisionRule:
    """How a classifier calls a class from its calibrated probabilities.

    Attributes:
        rule: ``argmax`` or ``positive_ratio`` (:data:`RULES`).
        positive: the class called when its ratio reaches ``cutoff`` (``positive_ratio``).
        versus: the class it is weighed against in the ratio (``positive_ratio``).
        target_sensitivity: in ``(0, 1)``: the cutoff is fitted on validation data to reach it.
        cutoff: the ratio at or above which ``positive`` is called, in [0, 1] (declared, or
            fitted); ``None`` while a target awaits its fit.
        fitted_on: where the cutoff was fitted (``validation split``), ``""`` when declared.
        val_sensitivity: share of the fit's ``positive`` rows called ``positive``.
        val_specificity: share of its other rows not called ``positive`` (one-vs-rest, as the
            ``per_class.<positive>.specificity`` gate counts).
        val_positives: ``positive`` rows of the fit.
        val_negatives: its other rows.
    """

    rule: str = ARGMAX
    positive: str = ""
    versus: str = ""
    target_sensitivity: float | None = None
    cutoff: float | None = None
    fitted_on: str = ""
    val_sensitivity: float | None = None
    val_specificity: float | None = None
    val_positives: int | None = None
    val_negatives: int | None = None

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"decision rule must be one of {RULES}, got {self.rule!r}")
        if self.rule == ARGMAX:
            if self.positive or self.versus or self.target_sensitivity is not None or self.cutoff is not None:
                raise ValueError("the argmax rule takes no positive, versus, target_sensitivity or cutoff")
            return
        if not self.positive or not self.versus or self.positive == self.versus:
            raise ValueError("positive_ratio needs two different classes: positive and versus")
        if self.target_sensitivity is None and self.cutoff is None:
            raise ValueError("positive_ratio needs a target_sensitivity (fitted cutoff) or a cutoff")
        if self.target_sensitivity is not None and not 0.0 < self.target_sensitivity < 1.0:
            raise ValueError(f"target_sensitivity must be in (0, 1), got {self.target_sensitivity}")
        if self.cutoff is not None and not 0.0 <= self.cutoff <= 1.0:
            raise ValueError(f"cutoff must be in [0, 1], got {self.cutoff}")

    # ------------------------------------------------------------------ reading it
    @property
    def is_argmax(self) -> bool:
        """The default rule: the most probable class."""
        return self.rule == ARGMAX

    @property
    def ready(self) -> bool:
        """Whether it can decide (argmax, or a cutoff declared or fitted)."""
        return self.is_argmax or self.cutoff is not None

    def check_classes(self, class_names: Sequence[str]) -> None:
        """Raise ``ValueError`` unless ``positive`` and ``versus`` are among ``class_names``."""
        if self.is_argmax:
            return
        names = [str(c) for c in class_names]
        for role, name in (("positive", self.positive), ("versus", self.versus)):
            if name not in names:
                raise ValueError(f"decision rule: {role} class {name!r} is not one of {names}")

    def ratio(self, probs: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
        """``r = p(positive) / (p(positive) + p(versus))`` of each row (0 where both are 0).

        Args:
            probs: ``(n, k)`` calibrated probabilities, columns in ``class_names`` order.
            class_names: ``k`` class names.

        Returns:
            ``(n,)`` float64 in [0, 1].

        Raises:
            ValueError: an argmax rule (it has no ratio), or a class not among ``class_names``.
        """
        if self.is_argmax:
            raise ValueError("the argmax rule has no positive ratio")
        self.check_classes(class_names)
        names = [str(c) for c in class_names]
        p = _probabilities(probs, len(names))
        pos, vs = p[:, names.index(self.positive)], p[:, names.index(self.versus)]
        total = pos + vs
        return np.where(total > 0, pos / np.where(total > 0, total, 1.0), 0.0)

    def decide(self, probs: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
        """The called class of each row.

        Args:
            probs: ``(n, k)`` calibrated probabilities, columns in ``class_names`` order.
            class_names: ``k`` class names.

        Returns:
            ``(n,)`` int64 class indices in ``[0, k)``.

        Raises:
            ValueError: a rule whose cutoff is not fitted yet, a class not among
                ``class_names``, or ``probs`` not ``(n, k)``.
        """
        p = _probabilities(probs, len(class_names))
        if self.is_argmax:
            return p.argmax(axis=1).astype(np.int64)
        if self.cutoff is None:
            raise ValueError(f"decision rule {self.positive} vs {self.versus} has no cutoff yet: fit it on "
                             "validation data (the evaluate stage does) before deciding")
        self.check_classes(class_names)
        names = [str(c) for c in class_names]
        i_pos, i_vs = names.index(self.positive), names.index(self.versus)
        pair = self.in_pair(p, class_names)
        rest = p.copy()
        rest[:, [i_pos, i_vs]] = -np.inf
        inside = np.where(self.ratio(p, class_names) >= self.cutoff, i_pos, i_vs)
        return np.where(pair, inside, rest.argmax(axis=1)).astype(np.int64)

    def in_pair(self, probs: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
        """``(n,)`` bool: rows decided inside the pair -- ``p(positive) + p(versus)`` at least as
        large as every other class's probability (with two classes, every row).

        A third class (``normal``) is called only where it outweighs the pair together: an
        image the model finds no lesion in is not called malignant because the little
        probability left to benign and malignant happens to lean that way.
        """
        names = [str(c) for c in class_names]
        p = _probabilities(probs, len(names))
        i_pos, i_vs = names.index(self.positive), names.index(self.versus)
        rest = np.delete(p, [i_pos, i_vs], axis=1)
        if not rest.shape[1]:
            return np.ones(len(p), dtype=bool)
        return p[:, i_pos] + p[:, i_vs] >= rest.max(axis=1)

    def describe(self) -> str:
        """One sentence for people (the UI, the model card, the DICOM SR)."""
        if self.is_argmax:
            return "The most probable class is called (arg-max)."
        score = f"p({self.positive}) / (p({self.positive}) + p({self.versus}))"
        if self.cutoff is None:
            return (f"{self.positive} is called when {score} reaches the cutoff that gives sensitivity "
                    f"{self.target_sensitivity:.2f} on the validation split (not fitted yet).")
        text = (f"{self.positive} is called when {score} >= {self.cutoff:.3f}, otherwise {self.versus}, "
                f"unless another class outweighs {self.positive} and {self.versus} together")
        if self.fitted_on and self.target_sensitivity is not None:
            text += (f"; cutoff fitted on the {self.fitted_on} for sensitivity >= "
                     f"{self.target_sensitivity:.2f}")
        if self.val_sensitivity is not None and self.val_specificity is not None:
            text += (f" (validation sensitivity {self.val_sensitivity:.2f}, "
                     f"specificity {self.val_specificity:.2f})")
        return text + "."

    # ------------------------------------------------------------------ fitting
    def fit(self, probs: np.ndarray, y: np.ndarray, class_names: Sequence[str], *,
            fitted_on: str = "validation split") -> DecisionRule:
        """The rule with its cutoff fitted (when it declares a target) and its validation facts.

        Args:
            probs: ``(n, k)`` calibrated validation probabilities (after temperature scaling).
            y: ``(n,)`` true class indices.
            class_names: ``k`` class names.
            fitted_on: what the rows are, for people.

        Returns:
            Argmax: itself. Otherwise a rule with ``cutoff`` (:func:`fit_cutoff` on the
            ``positive`` rows when a target is declared, else the declared one) and the
            sensitivity and specificity it gives on these rows.

        Raises:
            ValueError: a target but no ``positive`` row to fit it on.
        """
        if self.is_argmax:
            return self
        self.check_classes(class_names)
        p, truth = _probabilities(probs, len(class_names)), np.asarray(y).astype(np.int64)
        i_pos = [str(c) for c in class_names].index(self.positive)
        positive = truth == i_pos
        cutoff = self.cutoff
        if self.target_sensitivity is not None:  # a positive row called outside the pair is a miss
            scores = np.where(self.in_pair(p, class_names), self.ratio(p, class_names), -np.inf)
            cutoff = max(0.0, fit_cutoff(scores, positive, self.target_sensitivity))
        fitted = replace(self, cutoff=cutoff,
                         fitted_on=fitted_on if self.target_sensitivity is not None else "")
        called = fitted.decide(p, class_names) == i_pos
        out = replace(fitted, val_positives=int(positive.sum()), val_negatives=int((~positive).sum()),
                      val_sensitivity=float(called[positive].mean()) if positive.any() else None,
                      val_specificity=float((~called[~positive]).mean()) if (~positive).any() else None)
        log.info("decision rule fitted: %s", out.describe())
        return out

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """The JSON-able rule: every field that is set (``{"rule": "argmax"}`` for the default)."""
        return {k: v for k, v in asdict(self).items() if v is not None and v != ""}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> DecisionRule:
        """Read :meth:`to_dict` output; ``None`` or ``{}`` is the argmax rule.

        Raises:
            ValueError: unknown keys or an invalid rule.
        """
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown decision rule keys: {', '.join(unknown)}")
        for key in ("target_sensitivity", "cutoff", "val_sensitivity", "val_specificity"):
            if data.get(key) is not None:
                data[key] = float(data[key])
        for key in ("val_positives", "val_negatives"):
            if data.get(key) is not None:
                data[key] = int(data[key])
        for key in ("rule", "positive", "versus", "fitted_on"):
            if key in data:
                data[key] = str(data[key])
        return cls(**data)


ARGMAX_RULE = DecisionRule()
"""The default rule: the most probable class."""


def _probabilities(probs: np.ndarray, k: int) -> np.ndarray:
    p = np.asarray(probs, np.float64)
    if p.ndim != 2 or p.shape[1] != k:
        raise ValueError(f"probabilities must be (n, {k}), got {p.shape}")
    return p
