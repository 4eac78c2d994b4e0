"""Report writers: an evaluation's files (metrics, prediction rows, plot CSVs, PNGs), JSON and markdown.

One writer for every report the project produces, so the evaluate stage, external
evaluation and the cross-validation benchmark format numbers and intervals alike.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from breastscan.evaluation import curves, scoring
from breastscan.evaluation.scoring import Evaluation
from breastscan.jsonable import fmt_number as fmt
from breastscan.jsonable import json_clean

log = logging.getLogger(__name__)


def fmt_interval(score: Mapping[str, Any] | None) -> str:
    """``0.812 (0.771-0.850)``: a value with its 95 % interval (``n/a`` when undefined)."""
    if not score or score.get("value") is None:
        return "n/a"
    text = fmt(score["value"])
    if score.get("ci_low") is not None and score.get("ci_high") is not None:
        text += f" ({fmt(score['ci_low'])}-{fmt(score['ci_high'])})"
    return text


def md_escape(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_json(data: Any, path: Path) -> Path:
    """Write JSON-safe data (NaN as ``null``) with a trailing newline; parents created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_clean(data), indent=2, allow_nan=False, default=str) + "\n")
    return path


def write_evaluation(evaluation: Evaluation, out_dir: str | Path) -> dict[str, Path]:
    """Write an evaluation: ``metrics.json``, ``predictions.csv``, ``plots/*.csv``, ``png/*.png``.

    Plot CSVs (for ``dvc plots``, columns :data:`~breastscan.evaluation.curves.PLOT_COLUMNS`):
    ``roc``, ``pr``, ``confusion`` (one row per image) and ``calibration`` for a classifier;
    ``dice`` (per image) and ``dice_hist`` for a segmenter. PNGs: ``roc``, ``pr``,
    ``confusion``, ``calibration`` or ``dice_hist``.

    Args:
        evaluation: the result of :func:`~breastscan.evaluation.scoring.score_bundle`.
        out_dir: the model's report directory (created).

    Returns:
        Name (``metrics``, ``predictions``, ``<plot>_csv``, ``<plot>_png``) -> path written.
    """
    out = Path(out_dir)
    written = {"metrics": write_json(evaluation.metrics, out / "metrics.json")}
    written["predictions"] = out / "predictions.csv"
    # full precision: a re-score from this file reproduces metrics.json exactly
    evaluation.predictions.to_csv(written["predictions"], index=False)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    for name, rows in evaluation.plots.items():
        columns = list(curves.PLOT_COLUMNS.get(name, rows[0].keys() if rows else ()))
        path = written[f"{name}_csv"] = out / "plots" / f"{name}.csv"
        pd.DataFrame(rows, columns=columns).to_csv(path, index=False, float_format="%.6g")
    written.update(_write_pngs(evaluation, out / "png"))
    log.info("wrote evaluation of %d images to %s", evaluation.metrics.get("n_test", 0), out)
    return written


def _write_pngs(evaluation: Evaluation, png: Path) -> dict[str, Path]:
    from breastscan.evaluation import plots

    p = evaluation.plots
    out: dict[str, Path] = {}
    if evaluation.task != "classification":  # a segmenter, or a multi-task model's mask
        out["dice_hist_png"] = plots.plot_dice_hist([r["dice"] for r in p.get("dice", [])],
                                                    png / "dice_hist.png", bins=scoring.DICE_HIST_BINS)
    if evaluation.task == "segmentation":
        return out
    aucs = {n: s.get("auc") for n, s in evaluation.metrics.get("per_class", {}).items()}
    return {
        **out,
        "roc_png": plots.plot_roc(p.get("roc", []), png / "roc.png", aucs=aucs),
        "pr_png": plots.plot_pr(p.get("pr", []), png / "pr.png"),
        "confusion_png": plots.plot_confusion(p.get("confusion", []), evaluation.class_names,
                                              png / "confusion.png"),
        "calibration_png": plots.plot_calibration(p.get("calibration", []), png / "calibration.png"),
    }
