"""The drift report of ``breastscan monitor``: ``drift.json``, ``drift.md`` and PNG plots of the
reference and window distributions (matplotlib's object API on an Agg canvas, offline)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from breastscan.monitoring.drift import (
    CATEGORICAL_FEATURES,
    HIST_BINS,
    OUTPUT_SCALARS,
    SCALAR_FEATURES,
    DriftReport,
    Thresholds,
    compare,
    reference_records,
)

log = logging.getLogger(__name__)

Records = Sequence[Mapping[str, Any]]


def _figure(rows: int, cols: int, width: float = 3.2, height: float = 2.4) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(cols * width, rows * height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _values(records: Records, key: str) -> list[Any]:
    return [r[key] for r in records if r.get(key) is not None]


def _title(report: DriftReport, feature: str) -> str:
    test = next((f for f in report.features if f.feature == feature), None)
    if test is None:
        return feature
    mark = " DRIFT" if test.drift else ""
    value = f"p={test.p_value:.2g}" if test.p_value is not None else f"PSI={test.statistic:.3f}"
    return f"{feature} ({test.test} {value}){mark}"


def plot_histogram(report: DriftReport, reference: Records, window: Records, path: Path) -> Path:
    """Mean intensity histogram of the reference and the window, side by side bars."""
    fig = _figure(1, 1, width=6.0, height=3.0)
    ax = fig.add_subplot(1, 1, 1)
    centres = (np.arange(HIST_BINS) + 0.5) / HIST_BINS
    for records, label, shift in ((reference, "reference", -0.25), (window, "window", 0.25)):
        hists = _values(records, "hist")
        if hists:
            mean = np.mean(np.asarray(hists, float), axis=0)
            ax.bar(centres + shift / HIST_BINS, mean, width=0.5 / HIST_BINS, label=label)
    ax.set(xlabel="gray level", ylabel="share of pixels", title=_title(report, "histogram"))
    ax.legend()
    fig.savefig(path, dpi=90)
    return path


def plot_scalars(report: DriftReport, reference: Records, window: Records, path: Path) -> Path:
    """One panel per scalar statistic: histograms (shares) of the reference and the window."""
    features = [f for f in (*SCALAR_FEATURES, *OUTPUT_SCALARS) if _values(reference, f) or _values(window, f)]
    cols = 4
    rows = max(1, -(-len(features) // cols))
    fig = _figure(rows, cols)
    for i, feature in enumerate(features):
        ax = fig.add_subplot(rows, cols, i + 1)
        ref, win = np.asarray(_values(reference, feature), float), np.asarray(_values(window, feature), float)
        both = np.concatenate([ref, win])
        lo, hi = float(both.min()), float(both.max())
        pad = 0.0 if hi > lo else max(abs(lo) * 0.05, 0.05)  # a constant: one visible bar
        bins = np.linspace(lo - pad, hi + pad, 21)
        for values, label in ((ref, "reference"), (win, "window")):
            if values.size:
                ax.hist(values, bins=bins, weights=np.full(values.size, 1.0 / values.size), alpha=0.5,
                        label=label)
        ax.set_title(_title(report, feature), fontsize=8)
        ax.ticklabel_format(axis="x", style="plain", useOffset=False)
        ax.tick_params(labelsize=7)
    if features:
        fig.axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=90)
    return path


def plot_categories(report: DriftReport, reference: Records, window: Records, path: Path) -> Path:
    """One panel per categorical fact: the share of each category in the reference and the window."""
    features = [f for f in CATEGORICAL_FEATURES if _values(reference, f) or _values(window, f)]
    fig = _figure(1, max(1, len(features)), width=3.6, height=2.8)
    for i, feature in enumerate(features):
        ax = fig.add_subplot(1, max(1, len(features)), i + 1)
        ref, win = [str(v) for v in _values(reference, feature)], [str(v) for v in _values(window, feature)]
        cats = sorted(set(ref) | set(win))
        x = np.arange(len(cats))
        for values, label, shift in ((ref, "reference", -0.2), (win, "window", 0.2)):
            shares = [values.count(c) / max(len(values), 1) for c in cats]
            ax.bar(x + shift, shares, width=0.4, label=label)
        ax.set_xticks(x, [c[:14] for c in cats], rotation=30, fontsize=7)
        ax.set_title(_title(report, feature), fontsize=8)
    if features:
        fig.axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=90)
    return path


def markdown(report: DriftReport, plots: Sequence[Path]) -> str:
    """``drift.md``: the verdict, a table of every feature's test, and the plots."""
    th = report.thresholds
    lines = [f"# Drift of `{report.model}`", "", f"**{report.summary()}**", "",
             f"Thresholds: PSI >= {th.psi}, KS p < {th.ks_alpha}, chi-square p < {th.chi2_alpha}; "
             f"the window drifts when at least {th.min_drifted} features do and it holds at least "
             f"{th.min_records} records.", "",
             "| feature | test | statistic | p-value | score | drift | n ref | n window |",
             "|---|---|---:|---:|---:|---|---:|---:|"]
    for f in report.features:
        p = "" if f.p_value is None else f"{f.p_value:.3g}"
        lines.append(f"| {f.feature} | {f.test} | {f.statistic:.4g} | {p} | {f.score:.3f} | "
                     f"{'**yes**' if f.drift else 'no'} | {f.n_reference} | {f.n_window} |")
    lines += ["", *(f"![{p.stem}]({p.name})" for p in plots), ""]
    return "\n".join(lines)


def write_report(report: DriftReport, reference: Records, window: Records,
                 out_dir: str | Path) -> dict[str, Path]:
    """Write ``drift.json``, ``drift.md`` and the PNG plots into ``out_dir``.

    Args:
        report: the comparison (:func:`breastscan.monitoring.drift.compare`).
        reference: the reference records it used.
        window: the window records it used.
        out_dir: the report directory (created).

    Returns:
        ``{"json", "markdown", "histogram", "scalars", "categories"}`` paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"histogram": plot_histogram(report, reference, window, out / "drift_histogram.png"),
             "scalars": plot_scalars(report, reference, window, out / "drift_scalars.png"),
             "categories": plot_categories(report, reference, window, out / "drift_categories.png")}
    data = {**report.to_dict(), "plots": {k: p.name for k, p in paths.items()}}
    paths["json"] = out / "drift.json"
    paths["json"].write_text(json.dumps(data, indent=2) + "\n")
    paths["markdown"] = out / "drift.md"
    plots = [paths["histogram"], paths["scalars"], paths["categories"]]
    paths["markdown"].write_text(markdown(report, plots))
    log.info("drift report of %s: %s", report.model, paths["markdown"])
    return paths


def monitor(model: str, bundle_dir: str | Path, store: str | Path, out_dir: str | Path, *, window: int,
            thresholds: Thresholds | None = None) -> tuple[DriftReport, dict[str, Path]]:
    """Compare the newest ``window`` records of ``model`` in ``store`` with its bundle's reference.

    Args:
        model: the served model's name (as recorded).
        bundle_dir: its bundle directory (``contract.json`` and ``reference.json``; no Keras).
        store: the recorder's SQLite file.
        out_dir: where the report goes (:func:`write_report`).
        window: newest records compared.
        thresholds: when features and the window drift.

    Raises:
        FileNotFoundError: no contract or reference in ``bundle_dir``, or no ``store``.
    """
    from breastscan.bundle import read_contract, read_reference
    from breastscan.monitoring.recorder import RecordStore

    contract = read_contract(bundle_dir)
    raw = read_reference(bundle_dir)
    if raw is None:
        raise FileNotFoundError(f"no reference.json in {bundle_dir}: the model was trained before drift "
                                "monitoring (train it again: dvc repro)")
    if not Path(store).is_file():
        raise FileNotFoundError(f"no record store {store}: the service records into monitoring.store")
    reference = reference_records(raw, contract)
    records = RecordStore(store)
    try:
        recent = records.latest(model, window)
    finally:
        records.close()
    report = compare(reference, recent, thresholds, model=model)
    return report, write_report(report, reference, recent, out_dir)
