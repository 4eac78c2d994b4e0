"""What every stage's ``main()`` shares: the argument parser, logging, params and paths.

Each stage is ``python -m pipelines.<stage> --dataset NAME`` or ``--model NAME``; the paths
a stage reads and writes are defined here once, so that stages agree on them and
``dvc.yaml`` can be checked against them by the tests.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from breastscan.config import Params, load_params
from breastscan.logs import configure_logging

PREPARED = Path("artifacts/prepared")
MODELS = Path("artifacts/models")
REPORTS = Path("reports")


def validation_report(dataset: str) -> Path:
    """``reports/validation/<dataset>.json``: the validate stage's report of record."""
    return REPORTS / "validation" / f"{dataset}.json"


def splits_csv(dataset: str) -> Path:
    """``artifacts/prepared/<dataset>/splits.csv``: the prepare stage's split artefact."""
    return PREPARED / dataset / "splits.csv"


def model_dir(model: str) -> Path:
    """``artifacts/models/<model>/``: the train stage's bundle (model, spec, contract, run.json)."""
    return MODELS / model


def model_reports(model: str) -> Path:
    """``reports/models/<model>/``: metrics, plots, predictions, model card of one model."""
    return REPORTS / "models" / model


@dataclass(frozen=True)
class StageArgs:
    """Parsed command line of a stage."""

    name: str
    params: Params
    params_path: Path


def parse(doc: str | None, kind: str, argv: list[str] | None) -> StageArgs:
    """Parse ``--<kind> NAME [--params FILE]``, configure logging, load params.

    Args:
        doc: the stage module's docstring (its first line is the help text).
        kind: ``dataset`` or ``model``.
        argv: arguments (``None`` = ``sys.argv``).
    """
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
    parser.add_argument(f"--{kind}", required=True, help=f"a key under `{kind}s:` in params.yaml")
    parser.add_argument("--params", default="params.yaml", type=Path)
    args = parser.parse_args(argv)
    configure_logging()
    return StageArgs(name=getattr(args, kind), params=load_params(args.params), params_path=args.params)
