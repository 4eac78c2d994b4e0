"""The combined 8-category view: BI-RADS density crossed with benign / malignant."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from breastscan.decision import ARGMAX_RULE, POSITIVE_RATIO, DecisionRule
from breastscan.labels import BIRADS_DENSITY

LESION_TYPES = ("benign", "malignant")
"""The pathology of a category, in the order of its two-class reading."""


def eight_category(
    density_probs: np.ndarray,
    tumor_probs: np.ndarray,
    tumor_class_names: Sequence[str],
    *,
    density_names: Sequence[str] = BIRADS_DENSITY,
    tumor_rule: DecisionRule = ARGMAX_RULE,
) -> list[dict[str, Any]]:
    """Combine the density and tumor models into the 8-category view of the older tool.

    The older tool reported one of eight categories, ``<benign|malignant>-<A..D>``:
    pathology crossed with BI-RADS density. Here:

    * the density letter is the arg-max of the density model;
    * the pathology weighs benign against malignant: the tumor model's probabilities of
      those two are renormalised, ``P(m | lesion) = p_m / (p_b + p_m)`` (0.5 each if both
      are 0), and ``malignant`` is called at ``P(m | lesion) >= 0.5`` (it wins ties: the
      cautious reading) -- or at the cutoff of the tumor model's decision rule when that
      rule weighs malignant against benign. A ``normal`` class, if the tumor model has one,
      does not take part: it is reported separately as ``p_normal``, and ``finding`` is the
      class the tumor model's decision rule calls over all its classes (so it may say
      ``normal`` while the category still names the more likely lesion type);
    * the joint probability of category ``(t, d)`` is ``P(density = d) * P(t | lesion)``,
      treating the two models' outputs as independent; the eight values sum to 1 and
      ``category`` is their arg-max.

    Args:
        density_probs: ``(n, 4)`` density probabilities (rows sum to 1), columns in
            ``density_names`` order.
        tumor_probs: ``(n, k)`` tumor probabilities (rows sum to 1).
        tumor_class_names: ``k`` names; must include ``benign`` and ``malignant``.
        density_names: density letters of the columns (BI-RADS ``A``-``D``).
        tumor_rule: the tumor model's decision rule (:class:`~breastscan.decision.DecisionRule`).

    Returns:
        One dict per image: ``category`` (e.g. ``"malignant-C"``), ``density`` (letter),
        ``pathology`` (``benign`` / ``malignant``), ``finding`` (the tumor class called),
        ``p_malignant`` (renormalised), ``p_normal`` (``None`` without a normal class),
        ``confidence`` (joint probability of ``category``) and ``probabilities`` (all
        eight categories -> joint probability).

    Raises:
        ValueError: shapes disagree, a row is not a probability vector, or ``benign`` /
            ``malignant`` is not a tumor class.
    """
    d = np.asarray(density_probs, np.float64)
    t = np.asarray(tumor_probs, np.float64)
    letters = [str(x) for x in density_names]
    names = [str(x).lower() for x in tumor_class_names]
    if d.ndim != 2 or d.shape[1] != len(letters):
        raise ValueError(f"density_probs must be (n, {len(letters)}), got {d.shape}")
    if t.ndim != 2 or t.shape[1] != len(names) or len(t) != len(d):
        raise ValueError(f"tumor_probs must be ({len(d)}, {len(names)}), got {t.shape}")
    for label, p in (("density_probs", d), ("tumor_probs", t)):
        if len(p) and (not np.isfinite(p).all() or p.min() < 0 or np.abs(p.sum(axis=1) - 1).max() > 1e-3):
            raise ValueError(f"{label} rows must be probabilities summing to 1")
    if "benign" not in names or "malignant" not in names:
        raise ValueError(f"tumor classes {list(tumor_class_names)} need 'benign' and 'malignant'")
    ib, im = names.index("benign"), names.index("malignant")
    i_normal = names.index("normal") if "normal" in names else None
    findings = tumor_rule.decide(t, tumor_class_names)
    two = np.stack([t[:, ib], t[:, im]], axis=1)
    two[two.sum(axis=1) <= 0] = 0.5  # no lesion probability at all: an even call
    pathologies = _pathology_rule(tumor_rule).decide(two, LESION_TYPES)
    p_ms = two[:, 1] / two.sum(axis=1)

    out: list[dict[str, Any]] = []
    for dp, tp, p_m, k, called in zip(d, t, p_ms.tolist(), pathologies, findings, strict=True):
        pathology = LESION_TYPES[int(k)]
        letter = letters[int(np.argmax(dp))]
        joint = {f"{kind}-{lt}": float(dp[j] * (p_m if kind == "malignant" else 1.0 - p_m))
                 for kind in ("benign", "malignant") for j, lt in enumerate(letters)}
        category = f"{pathology}-{letter}"
        out.append({
            "category": category,
            "density": letter,
            "pathology": pathology,
            "finding": str(tumor_class_names[int(called)]),
            "p_malignant": p_m,
            "p_normal": float(tp[i_normal]) if i_normal is not None else None,
            "confidence": joint[category],
            "probabilities": joint,
        })
    return out


def _pathology_rule(tumor_rule: DecisionRule) -> DecisionRule:
    """The benign-vs-malignant reading of ``P(m | lesion)``: the tumor rule when it weighs those
    two classes (its cutoff), else malignant at 0.5."""
    if tumor_rule.rule == POSITIVE_RATIO and tumor_rule.cutoff is not None and \
            {tumor_rule.positive.lower(), tumor_rule.versus.lower()} == set(LESION_TYPES):
        return DecisionRule(POSITIVE_RATIO, tumor_rule.positive.lower(), tumor_rule.versus.lower(),
                            cutoff=tumor_rule.cutoff)
    return DecisionRule(POSITIVE_RATIO, "malignant", "benign", cutoff=0.5)
