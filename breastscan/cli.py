"""The ``breastscan`` command: data generation, ingestion and validation from the shell.

Pipeline stages live in ``pipelines/`` and run under ``dvc repro``; this command is for
work around the pipeline (making demo data, converting a public dataset, checking a folder,
promoting a model, scoring a registered model on an external dataset).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

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
    """Parse ``SRC=DST`` option values into a dict (later ones win).

    Raises:
        click.BadParameter: a value without ``=``.
    """
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
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--map", "mapping", multiple=True, metavar="SRC=DST",
              help="csv: rename a source column to a contract column (repeatable)")
@click.option("--value", "values", multiple=True, metavar="COLUMN:SRC=DST",
              help="csv: map a value of a column (after --map), e.g. density:F=1 (repeatable); "
                   "unmapped values: see above")
@click.option("--roi", default=None, metavar="X,Y,RADIUS",
              help="csv: columns of a circular lesion ROI to rasterise into masks")
@click.option("--modality", default=None, type=click.Choice(["mammography", "ultrasound"]),
              help="csv/dicom: modality of every row")
@click.option("--copy/--no-copy", default=False, show_default=True,
              help="csv: copy files under OUT instead of referencing them in place")
@click.option("--labels", "labels_csv", default=None, type=click.Path(path_type=Path),
              help="dicom: CSV keyed by file name with density/pathology/mask")
@click.option("--salt-file", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="dicom: file holding the secret key of the hash that turns PatientID into a "
                   "group id (default: $BREASTSCAN_PSEUDONYM_SALT, else .breastscan/pseudonym.salt, "
                   "created on first use)")
@click.option("--salt", default=None,
              help="dicom: that key given inline (visible to other users in the process list: "
                   "prefer the variable or --salt-file)")
@click.option("--allow-public-salt", is_flag=True,
              help="dicom: accept a public or short key, the public default without one "
                   "(demo and tests only: such ids are reversible)")
def ingest(fmt: str, source: Path, out: Path, mapping: tuple[str, ...], values: tuple[str, ...],
           roi: str | None, modality: str | None, copy: bool, labels_csv: Path | None,
           salt_file: Path | None, salt: str | None, allow_public_salt: bool) -> None:
    """Convert a dataset from SOURCE (a public layout) into the manifest contract in OUT.

    \b
    SOURCE, by --format:
      busi   the original Dataset_BUSI_with_GT/ folder (benign/, malignant/, normal/)
      mias   the folder holding Info.txt and the mdbNNN.pgm films
      csv    a CSV file, or a folder holding manifest.csv
      dicom  a folder of DICOM files (MG or US)
    A SOURCE not in that layout (or a missing column, file or option value) is refused
    with one line saying what was expected and what was found, and exit code 1.

    \b
    --value COLUMN:SRC=DST renames values of COLUMN. Values of COLUMN that no --value
    lists are kept as they are, with one warning naming them and their counts; empty
    cells stay empty (unknown). In modality, density (1-4) and pathology (benign,
    malignant, normal), a value that is still not valid after the mapping is refused:
    map every value, e.g. --value density:A=1 --value density:B=2 ...

    \b
    dicom: PatientID becomes an HMAC keyed by a secret salt, from $BREASTSCAN_PSEUDONYM_SALT,
    else --salt/--salt-file, else .breastscan/pseudonym.salt (created on first use, mode 0600:
    keep it and back it up; a new salt gives new group ids). A public or short salt is refused.
    """
    from breastscan.data.adapters import IngestError
    from breastscan.data.adapters import ingest as run_ingest

    options: dict[str, object] = {}
    if fmt == "csv":
        value_maps: dict[str, dict[str, str]] = {}
        for item in values:
            column, colon, pair = item.partition(":")
            if not colon or not column.strip():
                raise click.BadParameter(f"expected COLUMN:SRC=DST, got {item!r}", param_hint="--value")
            value_maps.setdefault(column.strip(), {}).update(_pairs((pair,), "--value"))
        options.update(columns=_pairs(mapping, "--map") or None, values=value_maps or None,
                       modality=modality, copy=copy)
        if roi:
            parts = tuple(p.strip() for p in roi.split(","))
            if len(parts) != 3:
                raise click.BadParameter("expected X,Y,RADIUS column names", param_hint="--roi")
            options["roi"] = parts
    elif fmt == "dicom":
        from breastscan.data.pseudonym_salt import SaltError, resolve_salt

        try:
            secret = resolve_salt(salt, salt_file, allow_public=allow_public_salt)
        except SaltError as exc:
            raise click.ClickException(str(exc)) from exc
        options.update(labels_csv=labels_csv, salt=secret, modality=modality)
    try:
        df = run_ingest(fmt, source, out, **options)
    except IngestError as exc:  # the source or an option is wrong: one line, no traceback
        raise click.ClickException(" ".join(str(exc).splitlines())) from exc
    except OSError as exc:  # e.g. OUT not writable
        raise click.ClickException(f"{exc.strerror or exc}: {exc.filename or out}") from exc
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
    from breastscan.data.validation import validate_dataset

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


@main.command()
@click.argument("model_names", metavar="MODEL...", nargs=-1)
@click.option("--all", "all_models", is_flag=True, help="every model declared in params.yaml")
@click.option("--version", "version", type=int, default=None,
              help="version to promote (default: the one at stage staging; one MODEL only)")
@click.option("--to", "to", default="production", show_default=True,
              type=click.Choice(["staging", "production"]))
@click.option("--params", type=click.Path(path_type=Path), default=Path("params.yaml"), show_default=True)
@click.option("--reason", default=None, metavar="TEXT", help="why, for the audit trail (breastscan history)")
def promote(model_names: tuple[str, ...], all_models: bool, version: int | None, to: str,
            params: Path, reason: str | None) -> None:
    """Move each MODEL's version to a registry stage if its quality gates in params.yaml pass.

    Gates: every floor under models.<MODEL>.gates.floors, and no drop beyond
    gates.max_regression versus the version now at that stage, on the same test split.
    Exits 1 and names the failed gates when any promotion is refused. Every promotion and
    every refusal is an event of the audit trail (who: $BREASTSCAN_ACTOR, else the OS user).
    """
    from breastscan.config import load_params
    from breastscan.registry import promotion, tracking, versions

    p = load_params(params)
    if all_models:
        model_names = tuple(p.models)
    if not model_names:
        raise click.UsageError("name at least one MODEL, or --all")
    if version is not None and len(model_names) > 1:
        raise click.UsageError("--version needs exactly one MODEL")
    try:
        cfgs = [p.model(name) for name in model_names]
    except KeyError as exc:
        raise click.UsageError(str(exc.args[0])) from None
    tracking.configure(Path.cwd())
    refused = 0
    for cfg in cfgs:
        try:
            dataset = p.dataset(cfg.dataset)
            splits = Path("artifacts/prepared") / dataset.name / "splits.csv"
            candidate_split = versions.version_split_id(cfg, version)
            rescore = promotion.rescore_on_split(cfg, splits, dataset.path, candidate_split)
            result = promotion.promote(cfg, version=version, to=to, evaluate=rescore, reason=reason)
        except (versions.RegistryError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
        _echo_checks(result.checks)
        if not result.passed:
            click.echo(f"refused: {cfg.registered_name} v{result.version} stays where it is -- "
                       + "; ".join(result.failures), err=True)
            refused += 1
            continue
        if result.previous == result.version:
            click.echo(f"{cfg.registered_name} v{result.version} already holds stage {to}: nothing changed")
            continue
        previous = f" (was v{result.previous})" if result.previous else ""
        click.echo(f"{cfg.registered_name} v{result.version} is now at stage {to}{previous}")
    if refused:
        sys.exit(1)


def _echo_checks(checks: list[dict[str, Any]]) -> None:
    """One line per gate of a promotion or rollback: ``[ok ]`` or ``[FAIL]``, its name and numbers."""
    for check in checks:
        mark = "ok " if check["ok"] else "FAIL"
        click.echo(f"  [{mark}] {check['gate']}: {check['detail']}")


def _echo_table(cols: list[str], table: list[list[str]]) -> None:
    """Left-aligned columns under a header line."""
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for t in table:
        click.echo("  ".join(v.ljust(w) for v, w in zip(t, widths, strict=True)))


@main.command()
@click.argument("model")
@click.option("--reason", required=True, metavar="TEXT", help="why (required; kept in the audit trail)")
@click.option("--to-version", type=click.IntRange(min=1), default=None,
              help="a version that held the stage before [default: the one before the current holder]")
@click.option("--stage", default="production", show_default=True,
              type=click.Choice(["staging", "production"]))
@click.option("--force", is_flag=True, help="move the stage even when a floor refuses (recorded as forced)")
@click.option("--params", type=click.Path(path_type=Path), default=Path("params.yaml"), show_default=True)
def rollback(model: str, reason: str, to_version: int | None, stage: str, force: bool, params: Path) -> None:
    """Move MODEL's stage back to the version that held it before (or --to-version N).

    \b
    The previous holder is read from the audit trail (and, for promotions older than it,
    from the versions' promoted_from tags); N must have held the stage before. The
    no-regression gate is skipped; the floors of params.yaml still apply unless --force.
    Exits 1 when refused. The rollback (or its refusal) is an audit event.
    """
    from breastscan.config import load_params
    from breastscan.registry import promotion, tracking, versions

    try:
        cfg = load_params(params).model(model)
    except KeyError as exc:
        raise click.UsageError(str(exc.args[0])) from None
    tracking.configure(Path.cwd())
    try:
        result = promotion.rollback(cfg, reason=reason, to_version=to_version, stage=stage, force=force)
    except (versions.RegistryError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    _echo_checks(result.checks)
    if not result.passed:
        click.echo(f"refused: {cfg.registered_name} stays on v{result.previous} at stage {stage} -- "
                   + "; ".join(result.failures) + " (--force overrides the floors)", err=True)
        sys.exit(1)
    forced = f", forced past {len(result.failures)} failed gate(s)" if result.forced else ""
    click.echo(f"{cfg.registered_name} v{result.version} is back at stage {stage} "
               f"(was v{result.previous}{forced})")


@main.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="print the events as a JSON list")
def history(model: str, as_json: bool) -> None:
    """The audit trail of MODEL: promotions, refusals, rollbacks and live swaps, oldest first."""
    import json

    from breastscan.registry import audit, tracking

    tracking.configure(Path.cwd())
    events = audit.read_events(model)
    if as_json:
        click.echo(json.dumps([e.to_dict() for e in events], indent=2))
        return
    if not events:
        click.echo(f"no audit events for {audit.registered_name(model)} in "
                   f"{tracking.tracking_uri(Path.cwd())}")
        return

    def change(e: audit.Event) -> str:
        before = f"v{e.from_version}" if e.from_version else "none"
        return f"{before} -> {f'v{e.to_version}' if e.to_version else '-'}"

    table = [[e.when[:19].replace("T", " "), e.who, e.kind + (" (forced)" if e.forced else ""), change(e),
              e.stage, e.reason or "", e.gates_text()] for e in events]
    _echo_table(["when (UTC)", "who", "kind", "from -> to", "stage", "reason", "gates"], table)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
def models(as_json: bool) -> None:
    """List registered models: versions, stages, headline metrics."""
    import json

    from breastscan.registry import tracking, versions

    tracking.configure(Path.cwd())
    rows = versions.list_models()
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        click.echo(f"no breastscan models registered in {tracking.tracking_uri(Path.cwd())}; run `dvc repro`")
        return
    cols = ["name", "version", "aliases", "stage", "headline", "value", "created"]
    if any(r.get("sites") for r in rows):  # a model trained on a pool: each site's headline
        cols.insert(6, "sites")
    def cell(value: Any) -> str:
        if isinstance(value, list):
            return ",".join(map(str, value))
        if isinstance(value, float):
            return f"{value:.3f}"
        return "" if value is None else str(value)

    _echo_table(cols, [[cell(r.get(c)) for c in cols] for r in rows])


@main.command("evaluate")
@click.option("--model", "model_ref", required=True, metavar="NAME[@STAGE|/VERSION]",
              help="registered model: tumor, breastscan-tumor, tumor@staging, tumor/3 "
                   "[default stage: production]")
@click.option("--dataset", "dataset_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="dataset folder holding manifest.csv (the manifest contract)")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/external"), show_default=True,
              help="reports go to OUT/<dataset>/<model>.json and .md")
@click.option("--name", "dataset_name", default=None,
              help="dataset name in the report path and MLflow [default: the folder's name]")
@click.option("--headline", default=None,
              help="metric to headline [default: the version's headline tag]")
@click.option("--n-boot", type=click.IntRange(min=0), default=1000, show_default=True,
              help="bootstrap resamples of the 95% intervals (0: none)")
@click.option("--seed", type=int, default=0, show_default=True, help="bootstrap seed")
@click.option("--mlflow/--no-mlflow", "log_mlflow", default=True, show_default=True,
              help="log a run external:<dataset> in the model's experiment")
def evaluate_command(model_ref: str, dataset_dir: Path, out: Path, dataset_name: str | None,
                     headline: str | None, n_boot: int, seed: int, log_mlflow: bool) -> None:
    """Score a registered model on an external dataset (a folder with manifest.csv).

    Rows the model cannot score (other modality, no or unknown label, no mask, missing or
    corrupt files) are counted by reason in the report; exits 1 when no row is usable.
    The calibration stored with the model is used as is (nothing is refitted).
    """
    from breastscan.evaluation import external
    from breastscan.registry import external_runs, resolver, tracking, versions

    try:
        resolver.parse_model_ref(model_ref)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--model") from None
    tracking.configure(Path.cwd())
    try:
        result = external_runs.evaluate_external(
            model_ref, dataset_dir, out, project_root=Path.cwd(), dataset_name=dataset_name,
            headline=headline, n_boot=n_boot, seed=seed, log_to_mlflow=log_mlflow,
        )
    except external.NoUsableRows as exc:
        raise click.ClickException(str(exc)) from None
    except versions.RegistryError as exc:
        raise click.ClickException(str(exc)) from None
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None

    r = result.report
    counts = r["counts"]
    stage = f"@{r['stage']}" if r["stage"] else "(pinned)"
    click.echo(f"{r['registered_model']} v{r['version']} {stage} on {r['dataset']['name']}: "
               f"{counts['used']} of {counts['rows']} rows scored")
    for reason, info in counts["skipped_by_reason"].items():
        example = info["examples"][0]["image"] if info["examples"] else ""
        click.echo(f"  skipped {info['count']:>5}  {reason} ({info['meaning']}; e.g. {example})")

    def num(value: Any) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    for name, v in r["metrics"].items():
        mark = "*" if name == r["headline"] else " "
        click.echo(f" {mark}{name:<18} {num(v['value'])}  95% CI {num(v['ci_low'])}-{num(v['ci_high'])}")
    if "calibration" in r:
        cal = r["calibration"]
        click.echo(f"  calibration: T = {num(cal['temperature'])} (stored), ECE {num(cal['ece'])}")
    if r.get("decision", {}).get("rule", "argmax") != "argmax":
        click.echo(f"  decision rule (stored): {r['decision']['description']}")
    click.echo(f"report: {result.paths['json']} and {result.paths['markdown'].name}")
    if result.run_id:
        click.echo(f"MLflow run {result.run_id} ({r['mlflow']['run_name']}) in {r['mlflow']['experiment']}")


def _serving_models(serving_config: Path, names: tuple[str, ...],
                    params: Path) -> tuple[list[str], str, bool]:
    """The models to import, the stage, and whether they were chosen automatically."""
    from breastscan.config import load_params
    from breastscan.serving.config import load_serving_config

    cfg = load_serving_config(serving_config)
    if names or cfg.models:
        return list(names or cfg.models), cfg.stage, False
    return list(load_params(params).models), cfg.stage, True


@main.command("import-models")
@click.argument("model_names", nargs=-1, metavar="[MODEL]...")
@click.option("--stage", default=None, help="registry stage (alias) to import [default: the config's]")
@click.option("--serving-config", type=click.Path(path_type=Path, exists=True),
              default=Path("services/serving.yaml"), show_default=True)
@click.option("--params", type=click.Path(path_type=Path), default=Path("params.yaml"), show_default=True)
def import_models(model_names: tuple[str, ...], stage: str | None, serving_config: Path,
                  params: Path) -> None:
    """Copy each MODEL's registry version at a stage into the BentoML model store.

    Default: the models the serving config lists or, with `models: auto`, every model declared
    in params.yaml that has a version at the stage (the others are named and skipped).
    """
    from breastscan.registry import resolver, tracking
    from breastscan.serving.store import import_model

    names, default_stage, auto = _serving_models(serving_config, model_names, params)
    tracking.configure(Path.cwd())
    imported = 0
    for name in names:
        try:
            tag = import_model(name, stage or default_stage)
        except resolver.RegistryError as exc:
            if not auto:
                raise click.ClickException(f"{exc} -- train and promote it first (make demo)") from None
            click.echo(f"{name}: skipped, no version at stage {stage or default_stage}")
            continue
        imported += 1
        click.echo(f"{name}: {tag}")
    if not imported:
        raise click.ClickException(f"no declared model has a version at stage {stage or default_stage}: "
                                   "train and promote one first (make demo)")


@main.command()
@click.option("--serving-config", type=click.Path(path_type=Path, exists=True),
              default=Path("services/serving.yaml"), show_default=True)
@click.option("--bentofile", type=click.Path(path_type=Path, exists=True),
              default=Path("services/bentofile.yaml"), show_default=True)
@click.option("--version", "bento_version", default=None, help="Bento version (default: BentoML's)")
@click.option("--runtime", type=click.Choice(["auto", "onnx", "keras"]), default="auto", show_default=True,
              help="auto: without TensorFlow when every packed model carries a checked ONNX export")
def build(serving_config: Path, bentofile: Path, bento_version: str | None, runtime: str) -> None:
    """Import the production models into the BentoML store, then `bentoml build` the service."""
    import subprocess
    import tempfile

    from breastscan.serving.bento import bento_runtime, write_bentofile
    from breastscan.serving.config import load_serving_config
    from breastscan.serving.store import stored_runtimes

    ctx = click.get_current_context()
    ctx.invoke(import_models, model_names=(), stage=None, serving_config=serving_config,
               params=Path("params.yaml"))
    runtimes = stored_runtimes(load_serving_config(serving_config).stage)
    try:
        chosen = bento_runtime(runtime, runtimes)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"Bento runtime: {chosen} ({', '.join(f'{n}: {r}' for n, r in runtimes.items())})")
    with tempfile.TemporaryDirectory(prefix="breastscan-bentofile-") as tmp:
        used = write_bentofile(bentofile, chosen, Path(tmp))
        cmd = [sys.executable, "-m", "bentoml", "build", "-f", str(used), "."]
        if bento_version:
            cmd[4:4] = ["--version", bento_version]
        log.info("%s", " ".join(cmd))
        done = subprocess.run(cmd, check=False)
    if done.returncode:
        raise click.ClickException(f"bentoml build failed (exit {done.returncode})")


@main.command("bench-quality")
@click.argument("names", nargs=-1, metavar="[BENCHMARK]...")
@click.option("--quick", is_flag=True,
              help="fold 0 only (cross_site: a subset of each site), at most 3 epochs: a smoke run of "
                   "a few minutes")
@click.option("--fold", "only_folds", type=int, multiple=True,
              help="run only this fold (repeatable); the report says which folds ran")
@click.option("--run", "cross_runs", multiple=True, metavar="RUN",
              help="cross_site: make only this run (repeatable, e.g. both); the others keep their last entry")
@click.option("--set", "overrides", multiple=True, metavar="[BENCHMARK:]KEY=VALUE",
              help="override a value of the benchmark file(s), e.g. busi:models.busi_tumor.epochs=20")
@click.option("--datasets", "datasets_dir", type=click.Path(path_type=Path), default=None,
              help="folder holding the packs (busi/, busbra/, mini_mias/) [default: the files' source]")
@click.option("--rescore", is_flag=True,
              help="score the last run's saved predictions again (no training), e.g. after a metric change")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="JSON report [default: reports/quality_benchmark.json; with --quick or --fold: "
                   "reports/quality/partial.json]")
def bench_quality(names: tuple[str, ...], quick: bool, only_folds: tuple[int, ...],
                  cross_runs: tuple[str, ...], overrides: tuple[str, ...], datasets_dir: Path | None,
                  rescore: bool, out: Path | None) -> None:
    """Leak-free cross-validated quality of the benchmark models on real datasets.

    BENCHMARK: busi, mini_mias, busi_gpu, cross_site ... (files in benchmarks/); all by
    default, except those declaring ``device: gpu`` (full-size or hours-long ones) when no
    GPU is visible. cross_site trains at one hospital and scores at the other (README,
    "Cross-site evaluation"). Exits 1 with what is missing when a dataset is not on this machine.
    """
    from breastscan.evaluation import crosssite, crossval

    try:
        files = crossval.benchmark_files(names)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="BENCHMARK") from None
    specs = _benchmark_specs(files, overrides, datasets_dir)
    cross = [s for s in specs if isinstance(s, crosssite.CrossSiteSpec)]
    if only_folds and cross:
        raise click.BadParameter("a cross-site benchmark has no folds to choose: use --run",
                                 param_hint="--fold")
    if cross_runs and not cross:
        raise click.BadParameter("--run names runs of a cross-site benchmark; none is in this run",
                                 param_hint="--run")
    missing = [(s, source) for s in specs for source in _benchmark_sources(s)
               if not source.exists() and (s in cross or not rescore)]
    if missing:
        raise click.ClickException("\n".join(
            f"benchmark {s.name} needs {source} ({s.title}); it is not on this machine"
            for s, source in missing)
            + "\nPut the datasets there (see the README, 'Clinical quality on real data') "
              "or pass --datasets DIR.")
    partial = quick or bool(only_folds)
    out = out or Path("reports/quality/partial.json" if partial else "reports/quality_benchmark.json")
    # Benchmarks not run now keep their last entry: `bench-quality mini_mias` refreshes one.
    results: dict[str, Any] = crossval.read_report(out) if not partial else {"benchmarks": {}}
    for spec in specs:
        log.info("benchmark %s: %s", spec.name, spec.title)
        previous = results["benchmarks"].get(spec.name)
        try:
            if isinstance(spec, crosssite.CrossSiteSpec):
                results["benchmarks"][spec.name] = crosssite.run_cross_site(
                    spec, Path("work/quality"), quick=quick, runs=cross_runs, train=not rescore,
                    previous=previous)
            elif rescore:
                if previous is None:
                    raise click.ClickException(f"{out} has no {spec.name} run to score again")
                results["benchmarks"][spec.name] = crossval.rescore(spec, previous, Path("reports/quality"))
            else:
                results["benchmarks"][spec.name] = crossval.run_benchmark(
                    spec, Path("reports/quality"), quick=quick, folds=list(only_folds) or None)
        except (FileNotFoundError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
        crossval.write_report(results, out)  # after each benchmark: a long run keeps what it has
    click.echo(out.with_suffix(".md").read_text())
    click.echo(f"report: {out} and {out.with_suffix('.md').name}")


def _benchmark_specs(files: list[Path], overrides: tuple[str, ...], datasets_dir: Path | None) -> list[Any]:
    """The benchmark files parsed (a cross-site one by its own loader), ``--set`` and ``--datasets``
    applied."""
    from dataclasses import replace

    from breastscan.evaluation import crosssite, crossval

    per_file: dict[str, dict[str, Any]] = {f.stem: {} for f in files}
    try:
        for item in overrides:
            target, sep, rest = item.partition(":")
            scoped = bool(sep) and "=" not in target
            for key, value in crossval.parse_overrides([rest if scoped else item]).items():
                for stem in ([target] if scoped else per_file):
                    if stem not in per_file:
                        raise ValueError(f"--set {item}: no benchmark {stem!r} in this run")
                    per_file[stem][key] = value
        specs: list[Any] = [crosssite.load_cross_site(f, per_file[f.stem]) if crosssite.is_cross_site(f)
                            else crossval.load_benchmark(f, per_file[f.stem]) for f in files]
    except (KeyError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--set / benchmark file") from None
    if datasets_dir is None:
        return specs
    return [crosssite.with_datasets(s, datasets_dir) if isinstance(s, crosssite.CrossSiteSpec)
            else replace(s, source=datasets_dir / s.source.parent.name / s.source.name) for s in specs]


def _benchmark_sources(spec: Any) -> list[Path]:
    """The real datasets a benchmark reads (a cross-site one: one per site)."""
    from breastscan.evaluation import crosssite

    return crosssite.sources(spec) if isinstance(spec, crosssite.CrossSiteSpec) else [spec.source]


@main.command()
@click.argument("benchmark")
@click.option("--path", "data_path", type=click.Path(path_type=Path), default=None,
              help="the converted dataset's folder [default: datasets/<dataset>; a pool: datasets, "
                   "holding one folder per site]")
@click.option("--params", type=click.Path(path_type=Path), default=Path("params.yaml"), show_default=True)
@click.option("--force", is_flag=True, help="replace entries params.yaml already has")
def declare(benchmark: str, data_path: Path | None, params: Path, force: bool) -> None:
    """Declare BENCHMARK's ready-made dataset and models (benchmarks/BENCHMARK.yaml) in params.yaml.

    \b
    Copies the benchmark file's `datasets:` and `models:` entries (the best configuration
    the quality benchmark found) into params.yaml, the dataset's path set to --path;
    params.yaml keeps its comments and order. The pipeline's foreach stages then train,
    evaluate and register the models: no code to edit. An entry params.yaml already has
    is refused (exit 1) unless --force. A pool file (ultrasound_sites: BUSI + BUS-BRA) declares
    a pool of sites, each site's folder inside --path. BENCHMARK: busi, busbra, mini_mias,
    ultrasound_sites, or such a file.
    """
    from breastscan.evaluation.declare import DeclareError, next_steps
    from breastscan.evaluation.declare import declare as run_declare

    try:
        done = run_declare(benchmark, params, data_path, force=force)
    except DeclareError as exc:
        raise click.ClickException(str(exc)) from None
    replaced = f" (replaced {', '.join(done.replaced)})" if done.replaced else ""
    click.echo(f"{params}: declared datasets.{done.dataset} (path {done.data_path}) and models "
               f"{', '.join(done.models)} from {done.spec.name}{replaced}")
    click.echo("next:")
    for line in next_steps(done):
        click.echo(f"  {line}")


@main.group("api-key")
def api_key() -> None:
    """API keys of the service (when `auth.enabled` in the serving config)."""


@api_key.command("add")
@click.option("--label", required=True, help="who the key is for (one word; shown in the service's log)")
@click.option("--serving-config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=Path("services/serving.yaml"), show_default=True)
@click.option("--keys-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="append to this file (default: the config's auth.keys_file)")
def api_key_add(label: str, serving_config: Path, keys_file: Path | None) -> None:
    """Create a key: print it once, store only its SHA-256 hash.

    \b
    The key is printed on stdout and kept nowhere: hand it to the client. The file gets
    `sha256:<hash> <label>` (mode 0600). For a deployment, put such lines in the variable
    the config's auth.keys_env names (e.g. from a secret) instead of a file.
    """
    import os

    from breastscan.serving.auth import add_key, hash_key
    from breastscan.serving.config import load_serving_config

    config = load_serving_config(serving_config, dict(os.environ))
    target = keys_file or (Path(config.auth.keys_file) if config.auth.keys_file else None)
    if target is None:
        raise click.ClickException("no keys file: give --keys-file or set auth.keys_file in the config")
    try:
        key = add_key(target, label)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(key)
    click.echo(f"stored {hash_key(key)[:15]}... for {label!r} in {target}"
               + ("" if config.auth.enabled else " (auth is off in the serving config: turn it on, "
                  "or set BREASTSCAN_AUTH=on)"), err=True)


@main.command("predict")
@click.argument("source", metavar="INPUT", type=click.Path(exists=True, path_type=Path))
@click.option("--model", "model_ref", required=True, metavar="NAME[@STAGE|/VERSION]",
              help="registered model: tumor, tumor@staging, tumor/3 [default stage: production]")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="folder for predictions.csv, predictions.jsonl and errors.csv")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="images submitted and written together (the most per model call)")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="only the first N images of INPUT")
@click.option("--dicom", "write_dicom", is_flag=True,
              help="also write a DICOM SEG / SR per DICOM input, under OUT/dicom/")
@click.option("--progress/--no-progress", default=True, show_default=True, help="progress bar on stderr")
@click.option("--runtime", type=click.Choice(["auto", "onnx", "keras"]), default="auto", show_default=True,
              help="auto: the version's checked ONNX export when it has one (no TensorFlow), else Keras")
def predict_command(source: Path, model_ref: str, out: Path, batch_size: int, limit: int | None,
                    write_dicom: bool, progress: bool, runtime: str) -> None:
    """Run a registered model over INPUT, in process, exactly as the service answers each file.

    \b
    INPUT: a folder of images (png, jpg, pgm, tif, dcm; recursive; files without an extension
    are taken when they are DICOM, as in a study/series tree), a manifest CSV (its `image`
    column), or a folder holding manifest.csv. Refused files are counted by code in
    OUT/errors.csv. A rerun skips the images OUT already holds for that model version, so
    an interrupted run (Ctrl-C) continues where it stopped.
    """
    from breastscan.registry import resolver, tracking
    from breastscan.serving import batch

    try:
        resolver.parse_model_ref(model_ref)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--model") from None
    if write_dicom and not batch.dicom_results_available():
        raise click.ClickException("--dicom needs breastscan.imaging.dicom_results (DICOM SEG/SR "
                                   "writing), which this installation does not have")
    try:
        inputs = batch.find_inputs(source, exclude=out)
    except batch.BatchError as exc:
        raise click.ClickException(str(exc)) from None
    if not inputs:
        raise click.ClickException(f"no image in {source}")
    tracking.configure(Path.cwd())
    try:
        model = batch.load_model(model_ref, runtime=runtime)
    except (resolver.RegistryError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    engine = batch.batch_engine(model, batch_size)
    served = engine.select(model.name)
    hook = batch.DicomWriter(out, served) if write_dicom else None
    try:
        summary = batch.predict_files(engine, model.name, inputs, out, batch_size=batch_size,
                                      limit=limit, progress=progress, dicom=hook)
    except batch.BatchError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        click.echo(f"interrupted: the finished batches are in {out}; run the same command again "
                   "to continue", err=True)
        sys.exit(130)
    stage = f"@{model.stage}" if model.stage else "(pinned)"
    click.echo(f"{served.contract.name} v{model.version} {stage} ({model.bundle.runtime}): {summary.line()}")
    click.echo(f"results: {out / batch.PREDICTIONS_CSV}, {batch.PREDICTIONS_JSONL}, {batch.ERRORS_CSV}")
    if write_dicom:
        click.echo(f"DICOM results: {summary.dicom_files} files under {out / 'dicom'}")


def _monitored_bundle(model: str) -> Path:
    """Where ``breastscan monitor`` finds a model's reference: the newest ``breastscan-<model>`` in
    the BentoML store (what the service serves, calibrated), else ``artifacts/models/<model>``."""
    try:
        import bentoml

        from breastscan.serving.store import store_name

        return Path(bentoml.models.get(f"{store_name(model)}:latest").path)
    except Exception as exc:  # noqa: BLE001 -- no store, or not imported: the pipeline's bundle
        log.info("%s is not in the BentoML store (%s): using artifacts/models/%s", model, exc, model)
        return Path("artifacts/models") / model


@main.command("monitor")
@click.option("--model", required=True, help="served model name (density, tumor, lesion ...)")
@click.option("--store", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="the service's record store [default: the serving config's monitoring.store]")
@click.option("--window", type=click.IntRange(min=1), default=None,
              help="newest records compared [default: the serving config's monitoring.window]")
@click.option("--bundle", "bundle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="model bundle holding reference.json and contract.json [default: the "
                                 "BentoML store's newest, else artifacts/models/MODEL]")
@click.option("--serving-config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=Path("services/serving.yaml"), show_default=True,
              help="monitoring: store, window and drift thresholds")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="report directory: drift.json, drift.md and PNG plots")
def monitor(model: str, store: Path | None, window: int | None, bundle_dir: Path | None,
            serving_config: Path, out: Path) -> None:
    """Compare the newest served requests of MODEL with its training reference (no labels needed).

    \b
    PSI of the intensity histogram, Kolmogorov-Smirnov of the scalar statistics (intensity
    percentiles, texture, size, confidence, lesion fraction), chi-square of modality,
    manufacturer and predicted class; thresholds from the config's monitoring.thresholds.
    Exits 0 whether or not the window drifted (drift.json says); 1 when there is no
    reference or no store.
    """
    import os

    from breastscan.monitoring.report import monitor as run_monitor
    from breastscan.serving.config import load_serving_config

    cfg = load_serving_config(serving_config, dict(os.environ)).monitoring
    bundle_dir = bundle_dir or _monitored_bundle(model)
    try:
        report, paths = run_monitor(model, bundle_dir, store or Path(cfg.store), out,
                                    window=window or cfg.window, thresholds=cfg.thresholds)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    log.log(logging.WARNING if report.drift else logging.INFO, "%s", report.summary())
    click.echo(f"report: {paths['json']}, {paths['markdown'].name} and "
               f"{', '.join(paths[k].name for k in ('histogram', 'scalars', 'categories'))}")
