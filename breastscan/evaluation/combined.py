"""The combined 8-category view: BI-RADS density crossed with benign / malignant."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from breastscan.labels import BIRADS_DENSITY


def eight_category(
    density_probs: np.ndarray,
    tumor_probs: np.ndarray,
    tumor_class_names: Sequence[str],
    *,
    density_names: Sequence[str] = BIRADS_DENSITY,
) -> list[dict[str, Any]]:
    """Combine the density and tumor models into the 8-category view of the older tool.

    The older tool reported one of eight categories, ``<benign|malignant>-<A..D>``:
    pathology crossed with BI-RADS density. Here:

    * the density letter is the arg-max of the density model;
    * the pathology is the more likely of benign and malignant: the tumor model's
      probabilities of those two are renormalised, ``P(m | lesion) = p_m / (p_b + p_m)``
      (0.5 each if both are 0), and ``malignant`` wins ties (the cautious reading). A
      ``normal`` class, if the tumor model has one, does not take part: it is reported
      separately as ``p_normal``, and ``finding`` is the tumor model's own arg-max over
      all its classes (so it may say ``normal`` while the category still names the more
      likely lesion type);
    * the joint probability of category ``(t, d)`` is ``P(density = d) * P(t | lesion)``,
      treating the two models' outputs as independent; the eight values sum to 1 and
      ``category`` is their arg-max.

    Args:
        density_probs: ``(n, 4)`` density probabilities (rows sum to 1), columns in
            ``density_names`` order.
        tumor_probs: ``(n, k)`` tumor probabilities (rows sum to 1).
        tumor_class_names: ``k`` names; must include ``benign`` and ``malignant``.
        density_names: density letters of the columns (BI-RADS ``A``-``D``).

    Returns:
        One dict per image: ``category`` (e.g. ``"malignant-C"``), ``density`` (letter),
        ``pathology`` (``benign`` / ``malignant``), ``finding`` (arg-max tumor class),
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

    out: list[dict[str, Any]] = []
    for dp, tp in zip(d, t, strict=True):
        lesion = tp[ib] + tp[im]
        p_m = float(tp[im] / lesion) if lesion > 0 else 0.5
        pathology = "malignant" if p_m >= 0.5 else "benign"
        letter = letters[int(np.argmax(dp))]
        joint = {f"{kind}-{lt}": float(dp[j] * (p_m if kind == "malignant" else 1.0 - p_m))
                 for kind in ("benign", "malignant") for j, lt in enumerate(letters)}
        category = f"{pathology}-{letter}"
        out.append({
            "category": category,
            "density": letter,
            "pathology": pathology,
            "finding": str(tumor_class_names[int(np.argmax(tp))]),
            "p_malignant": p_m,
            "p_normal": float(tp[i_normal]) if i_normal is not None else None,
            "confidence": joint[category],
            "probabilities": joint,
        })
    return out
