"""Static PNG figures of an evaluation and of training curves (matplotlib, Agg, offline).

Each function draws from the same row lists that :mod:`breastscan.evaluation.scoring` writes as
``dvc plots`` CSV files, so a PNG and its CSV cannot disagree. Figures are drawn with
matplotlib's object API on an Agg canvas (no pyplot, no GUI, no global backend switch);
fonts are matplotlib's bundled ones, so nothing is fetched.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

Rows = Sequence[Mapping[str, Any]]


def _figure(width: float = 5.0, height: float = 4.0) -> tuple[Figure, Axes]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="tight")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig: Figure, png: str | Path) -> Path:
    path = Path(png)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    log.debug("wrote %s", path)
    return path


def _by_class(rows: Rows, x: str, y: str) -> dict[str, tuple[list[float], list[float]]]:
    curves: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        xs, ys = curves.setdefault(str(row["class"]), ([], []))
        xs.append(float(row[x]))
        ys.append(float(row[y]))
    return curves


def plot_roc(rows: Rows, png: str | Path, *, aucs: Mapping[str, float | None] | None = None) -> Path:
    """One-vs-rest ROC curves.

    Args:
        rows: ``{"class", "fpr", "tpr"}`` points in curve order.
        png: output file.
        aucs: optional class name -> AUC, shown in the legend.

    Returns:
        The PNG path.
    """
    fig, ax = _figure()
    for name, (fpr, tpr) in _by_class(rows, "fpr", "tpr").items():
        auc = (aucs or {}).get(name)
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})" if auc is not None else name)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1)
    ax.set(xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (sensitivity)",
           xlim=(0, 1), ylim=(0, 1.02), title="ROC, one-vs-rest (test)")
    if rows:
        ax.legend(loc="lower right", fontsize="small")
    return _save(fig, png)


def plot_pr(rows: Rows, png: str | Path) -> Path:
    """One-vs-rest precision-recall curves.

    Args:
        rows: ``{"class", "recall", "precision"}`` points in curve order.
        png: output file.

    Returns:
        The PNG path.
    """
    fig, ax = _figure()
    for name, (recall, precision) in _by_class(rows, "recall", "precision").items():
        ax.step(recall, precision, where="post", label=name)
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", xlim=(0, 1), ylim=(0, 1.02),
           title="Precision-recall, one-vs-rest (test)")
    if rows:
        ax.legend(loc="lower left", fontsize="small")
    return _save(fig, png)


def plot_confusion(rows: Rows, class_names: Sequence[str], png: str | Path) -> Path:
    """Confusion matrix with counts and row-normalised shading.

    Args:
        rows: one ``{"actual", "predicted"}`` row per test image (class names).
        class_names: classes in index order (axis order).
        png: output file.

    Returns:
        The PNG path.
    """
    import numpy as np

    names = [str(c) for c in class_names]
    index = {n: i for i, n in enumerate(names)}
    cm = np.zeros((len(names), len(names)), int)
    for row in rows:
        cm[index[str(row["actual"])], index[str(row["predicted"])]] += 1
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = _figure(1.2 * len(names) + 2.5, 1.0 * len(names) + 2.0)
    ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(names)), labels=names)
    ax.set_yticks(range(len(names)), labels=names)
    ax.set(xlabel="predicted", ylabel="actual", title="Confusion matrix (test)")
    return _save(fig, png)


def plot_calibration(rows: Rows, png: str | Path) -> Path:
    """Reliability diagram: mean confidence vs accuracy per bin, before and after scaling.

    Args:
        rows: ``{"stage", "confidence", "accuracy"}`` per non-empty bin (``stage`` is
            ``before`` / ``after`` temperature scaling).
        png: output file.

    Returns:
        The PNG path.
    """
    fig, ax = _figure()
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1, label="perfect calibration")
    stages: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        xs, ys = stages.setdefault(str(row["stage"]), ([], []))
        xs.append(float(row["confidence"]))
        ys.append(float(row["accuracy"]))
    for stage, (conf, acc) in stages.items():
        ax.plot(conf, acc, marker="o", label=f"{stage} temperature scaling")
    ax.set(xlabel="mean confidence (top class)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.02),
           title="Calibration (test)")
    ax.legend(loc="upper left", fontsize="small")
    return _save(fig, png)


def plot_dice_hist(dice: Sequence[float], png: str | Path, *, bins: int = 20) -> Path:
    """Histogram of per-image Dice scores.

    Args:
        dice: per-image Dice values in [0, 1].
        png: output file.
        bins: equal-width bins over [0, 1].

    Returns:
        The PNG path.
    """
    fig, ax = _figure()
    ax.hist([float(d) for d in dice], bins=bins, range=(0.0, 1.0), color="tab:blue", edgecolor="white")
    ax.set(xlabel="Dice per image", ylabel="images", xlim=(0, 1), title=f"Dice on {len(dice)} test images")
    return _save(fig, png)


def plot_history(history_csv: str | Path, png: str | Path) -> Path:
    """Training curves from a history CSV (``epoch`` plus metric columns).

    Each metric ``m`` with a ``val_m`` partner is drawn in one panel (training and
    validation), other columns in panels of their own.

    Args:
        history_csv: the CSV written by :func:`breastscan.training.loop.write_history`.
        png: output file.

    Returns:
        The PNG path.
    """
    import pandas as pd
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    frame = pd.read_csv(history_csv)
    epoch = frame["epoch"] if "epoch" in frame.columns else pd.Series(range(1, len(frame) + 1))
    columns = [c for c in frame.columns if c != "epoch"]
    panels = [c for c in columns if not c.startswith("val_")]
    panels += [c for c in columns if c.startswith("val_") and c[4:] not in columns]
    panels = panels or ["(empty)"]
    fig = Figure(figsize=(4.0 * len(panels), 3.5), dpi=100, layout="tight")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, name in zip(axes, panels, strict=True):
        if name in frame.columns:
            ax.plot(epoch, frame[name], marker=".", label="train" if not name.startswith("val_") else "val")
            if f"val_{name}" in frame.columns:
                ax.plot(epoch, frame[f"val_{name}"], marker=".", label="val")
            ax.legend(fontsize="small")
        ax.set(xlabel="epoch", title=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, png)
