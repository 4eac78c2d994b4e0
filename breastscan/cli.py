"""The ``breastscan`` command: data generation, ingestion and validation from the shell.

Pipeline stages live in ``pipelines/`` and run under ``dvc repro``; this command is for
work around the pipeline (making demo data, converting a public dataset, checking a folder).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from breastscan.logs import configure_logging

log = logging.getLogger("breastscan")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default="INFO", show_default=True, help="DEBUG, INFO, WARNING, ERROR")
@click.version_option(package_name="breastscan")
def main(log_level: str) -> None:
    """breastscan: breast-imaging datasets, models and services."""
    configure_logging(log_level.upper())


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("data"), show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--n-mammography", type=int, default=400, show_default=True)
@click.option("--n-ultrasound", type=int, default=300, show_default=True)
@click.option("--duplicate-rate", type=float, default=0.03, show_default=True,
              help="share of planted near-duplicates (filed under a new group)")
@click.option("--label-conflicts", type=int, default=2, show_default=True,
              help="planted near-duplicates carrying a different label")
def synth(out: Path, seed: int, n_mammography: int, n_ultrasound: int,
          duplicate_rate: float, label_conflicts: int) -> None:
    """Generate the synthetic mammography and ultrasound phantom datasets into OUT."""
    from breastscan.data.phantoms import generate_demo

    try:
        frames = generate_demo(
            out, seed=seed, n_mammography=n_mammography, n_ultrasound=n_ultrasound,
            duplicate_rate=duplicate_rate, label_conflicts=label_conflicts,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    for name, df in frames.items():
        click.echo(f"{out / name}: {len(df)} images, pathology {df['pathology'].value_counts().to_dict()}")


def _pairs(values: tuple[str, ...], option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        if "=" not in item:
            raise click.BadParameter(f"expected SRC=DST, got {item!r}", param_hint=option)
        src, dst = item.split("=", 1)
        out[src.strip()] = dst.strip()
    return out


@main.command()
@click.option("--format", "fmt", required=True, type=click.Choice(["busi", "mias", "csv", "dicom"]),
              help="layout of SOURCE")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--map", "mapping", multiple=True, metavar="SRC=DST",
              help="csv: rename a source column to a contract column (repeatable)")
@click.option("--value", "values", multiple=True, metavar="COLUMN:SRC=DST",
              help="csv: map a value of a contract column, e.g. density:F=1 (repeatable)")
@click.option("--roi", default=None, metavar="X,Y,RADIUS",
              help="csv: columns of a circular lesion ROI to rasterise into masks")
@click.option("--modality", default=None, type=click.Choice(["mammography", "ultrasound"]),
              help="csv/dicom: modality of every row")
@click.option("--copy/--no-copy", default=False, show_default=True,
              help="csv: copy files under OUT instead of referencing them in place")
@click.option("--labels", "labels_csv", default=None, type=click.Path(exists=True, path_type=Path),
              help="dicom: CSV keyed by file name with density/pathology/mask")
@click.option("--salt", default="breastscan", show_default=True,
              help="dicom: key of the hash that turns PatientID into a group id")
def ingest(fmt: str, source: Path, out: Path, mapping: tuple[str, ...], values: tuple[str, ...],
           roi: str | None, modality: str | None, copy: bool, labels_csv: Path | None,
           salt: str) -> None:
    """Convert a dataset from SOURCE (a public layout) into the manifest contract in OUT."""
    from breastscan.data.adapters import ingest as run_ingest

    options: dict[str, object] = {}
    if fmt == "csv":
        value_maps: dict[str, dict[str, str]] = {}
        for item in values:
            column, _, pair = item.partition(":")
            value_maps.setdefault(column, {}).update(_pairs((pair,), "--value"))
        options.update(columns=_pairs(mapping, "--map") or None, values=value_maps or None,
                       modality=modality, copy=copy)
        if roi:
            parts = tuple(p.strip() for p in roi.split(","))
            if len(parts) != 3:
                raise click.BadParameter("expected X,Y,RADIUS column names", param_hint="--roi")
            options["roi"] = parts
    elif fmt == "dicom":
        options.update(labels_csv=labels_csv, salt=salt, modality=modality)
    df = run_ingest(fmt, source, out, **options)
    click.echo(f"{out}/manifest.csv: {len(df)} rows")


@main.command()
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path), required=False)
@click.option("--dataset", default=None, help="validate a dataset declared in params.yaml instead")
@click.option("--params", type=click.Path(path_type=Path), default=Path("params.yaml"), show_default=True)
@click.option("--modality", type=click.Choice(["mammography", "ultrasound"]), default=None)
@click.option("--label", "labels", multiple=True, type=click.Choice(["density", "pathology"]),
              help="label column that must be filled (repeatable; default pathology)")
@click.option("--masks-required/--masks-optional", default=False, show_default=True)
@click.option("--min-class-count", type=int, default=None)
@click.option("--report", type=click.Path(path_type=Path), default=None, help="write the JSON report here")
def validate(root: Path | None, dataset: str | None, params: Path, modality: str | None,
             labels: tuple[str, ...], masks_required: bool, min_class_count: int | None,
             report: Path | None) -> None:
    """Validate a dataset folder (ROOT) or a declared dataset (--dataset); exit 1 on failure."""
    from dataclasses import replace

    from breastscan.config import DatasetConfig, ValidationRules, load_params
    from breastscan.validation import validate_dataset

    if dataset:
        p = load_params(params)
        cfg, rules = p.dataset(dataset), p.validate
        root = cfg.path
    else:
        if root is None or modality is None:
            raise click.UsageError("give ROOT and --modality, or --dataset NAME")
        cfg = DatasetConfig(name=root.name, path=root, modality=modality,
                            labels=labels or ("pathology",), stratify=labels or ("pathology",),
                            masks_required=masks_required)
        rules = ValidationRules()
    if min_class_count is not None:
        rules = replace(rules, min_class_count=min_class_count)
    result = validate_dataset(root, cfg, rules)
    if report:
        result.write(report)
    click.echo(result.summary())
    sys.exit(0 if result.success else 1)
