"""Stage ``summary``: one table of every model's run, printed at the end of ``dvc repro``.

Reads ``reports/models/<model>/metrics.json`` and ``registered.json`` of each model in
params.yaml and writes ``reports/summary.md`` (the same table, in Markdown).

Run: ``python -m pipelines.summary``
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from breastscan.config import load_params
from breastscan.logs import configure_logging
from pipelines._stage import REPORTS, model_reports

log = logging.getLogger("pipelines.summary")

COLUMNS = ("model", "task", "test images", "headline", "value", "95% CI", "ECE before/after",
           "registered", "stage")


def summary_rows(models: dict[str, str]) -> list[dict[str, str]]:
    """One row per model (name -> task) from its report files (missing files show as ``-``)."""
    rows = []
    for name, task in models.items():
        base = model_reports(name)
        m = json.loads((base / "metrics.json").read_text()) if (base / "metrics.json").is_file() else {}
        r = json.loads((base / "registered.json").read_text()) if (base / "registered.json").is_file() else {}
        ece = (f"{m['ece_before']:.3f} / {m['ece_after']:.3f}" if "ece_before" in m and "ece_after" in m
               else "-")
        rows.append({
            "model": name,
            "task": task,
            "test images": str(m.get("n_test", "-")),
            "headline": str(m.get("headline", "-")),
            "value": f"{m['headline_value']:.3f}" if "headline_value" in m else "-",
            "95% CI": (f"{m['headline_ci_low']:.3f}-{m['headline_ci_high']:.3f}"
                       if m.get("headline_ci_low") is not None else "-"),
            "ECE before/after": ece,
            "registered": f"{r['name']} v{r['version']}" if r else "-",
            "stage": str(r.get("alias", "-")),
        })
    return rows


def render(rows: list[dict[str, str]], markdown: bool = False) -> str:
    """The rows as an aligned text table, or as a Markdown table."""
    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(row[c] for c in COLUMNS) + " |" for row in rows]
        return "\n".join(lines) + "\n"
    widths = {c: max(len(c), *(len(row[c]) for row in rows)) if rows else len(c) for c in COLUMNS}
    line = "  ".join(c.ljust(widths[c]) for c in COLUMNS)
    out = [line, "  ".join("-" * widths[c] for c in COLUMNS)]
    out += ["  ".join(row[c].ljust(widths[c]) for c in COLUMNS) for row in rows]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print and write the summary table; return the exit code."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--params", default="params.yaml", type=Path)
    args = parser.parse_args(argv)
    configure_logging()
    params = load_params(args.params)
    rows = summary_rows({name: cfg.task for name, cfg in params.models.items()})
    (REPORTS / "summary.md").write_text("# Model summary\n\n" + render(rows, markdown=True))
    sys.stdout.write("\n" + render(rows) + "\n")
    log.info("promote a staging version with: breastscan promote <model> --to production")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
