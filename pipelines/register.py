"""Stage ``register@<model>``: register the model evaluate logged and mark it ``staging``.

Reads ``reports/models/<model>/logged_model.json`` (the calibrated model, with its card,
that ``evaluate@<model>`` logged to the model's MLflow run) and ``metrics.json``, creates
a new version of ``breastscan-<model>`` carrying the test metrics and the test split's
id, and points the alias ``staging`` at it. Promotion to ``production`` is a separate,
gated step: ``breastscan promote <model>``.

No TensorFlow is imported unless the logged model is missing from the tracking store in
use (``MLFLOW_TRACKING_URI`` changed since evaluate, or DVC restored evaluate's outputs
from its cache): then the bundle of ``train@<model>`` is logged again here, with
evaluate's temperature and model card.

Inside ``dvc exp run`` (DVC sets ``DVC_EXP_NAME``) the version is tagged with the
experiment's name and baseline commit and takes **no** stage: an experiment someone is only
trying never changes what the next promotion picks up. Promote a winning experiment's
version by number (``breastscan promote <model> --version N``), or apply the experiment
(``dvc exp apply``), commit it and ``dvc repro``.

The version is tagged with the check of the model's ONNX export (``export.json`` of evaluate:
``export.runtime``, ``export.passed``, ``export.max_prob_diff`` ...). A model logged again here
carries no export: TensorFlow serves it.

Writes ``reports/models/<model>/registered.json`` (name, version, stage, run, model URI).

Run: ``python -m pipelines.register --model lesion``
"""

from __future__ import annotations

import json
import logging
import os

import mlflow

from breastscan.data.splits import split_id
from breastscan.exported import EXPORT_FILE
from breastscan.registry import versions
from breastscan.registry.runs import LOGGED_MODEL_FILE, log_served_model, model_run
from pipelines._stage import model_dir, model_reports, parse, splits_csv

log = logging.getLogger("pipelines.register")


def main(argv: list[str] | None = None) -> int:
    """Register the model named on the command line; return the process exit code."""
    args = parse(__doc__, "model", argv)
    cfg = args.params.model(args.name)
    dataset = args.params.dataset(cfg.dataset)
    reports = model_reports(cfg.name)
    metrics = json.loads((reports / "metrics.json").read_text())
    logged = json.loads((reports / LOGGED_MODEL_FILE).read_text())
    export_report = reports / EXPORT_FILE
    export = json.loads(export_report.read_text()) if export_report.is_file() else None
    test_split = split_id(splits_csv(dataset.name), "test")

    with model_run(cfg.name, model_dir(cfg.name), stage="register") as run:
        model_uri = str(logged.get("model_uri") or "")
        if not versions.logged_model_exists(model_uri):
            log.warning("%s: logged model %r is not in %s; logging the bundle of %s again", cfg.name,
                        model_uri, mlflow.get_tracking_uri(), model_dir(cfg.name))
            from breastscan.bundle import ModelBundle

            model_uri = log_served_model(ModelBundle.load(model_dir(cfg.name)), metrics,
                                         reports / "model_card.md")
            export = None  # logged without its export: TensorFlow serves it
        experiment = os.environ.get("DVC_EXP_NAME")
        alias = None if experiment else versions.STAGING
        tags = {versions.TAG_EXPERIMENT: experiment,
                "dvc_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", "")} if experiment else {}
        version = versions.register(cfg, model_uri, metrics=metrics, split_id=test_split,
                                    run_id=run.info.run_id, alias=alias, extra_tags=tags, export=export)
        out = {
            "name": cfg.registered_name, "version": version, "alias": alias, "experiment": experiment,
            "run_id": run.info.run_id, "model_uri": model_uri,
            "headline": metrics["headline"], "headline_value": metrics["headline_value"],
        }
    (reports / "registered.json").write_text(json.dumps(out, indent=2) + "\n")
    where = f"as {alias}" if alias else f"for experiment {experiment}, with no stage"
    how = f"breastscan promote {cfg.name}" + ("" if alias else f" --version {version}") + " --to production"
    log.info("registered %s version %s %s (%s %.3f); promote with: %s", cfg.registered_name, version, where,
             metrics["headline"], metrics["headline_value"], how)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
