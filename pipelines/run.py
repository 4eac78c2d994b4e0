"""The MLflow run a model's stages share: started by train, continued by evaluate and register."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow

from breastscan import tracking

log = logging.getLogger("pipelines.run")

RUN_FILE = "run.json"


@contextmanager
def model_run(model: str, bundle_dir: Path, *, stage: str) -> Iterator[mlflow.ActiveRun]:
    """Continue the run recorded in ``<bundle_dir>/run.json``, or start a new one.

    A new run is started (tagged ``breastscan.continued_from``) when the recorded run is
    not in the current tracking store: DVC restored the bundle from its cache, or
    ``MLFLOW_TRACKING_URI`` points elsewhere than at training time.
    """
    project = Path.cwd()
    tracking.configure(project)
    recorded = json.loads((bundle_dir / RUN_FILE).read_text()) if (bundle_dir / RUN_FILE).is_file() else {}
    run_id = recorded.get("run_id")
    if run_id and tracking.run_exists(run_id):
        with tracking.resume_run(run_id) as run:
            mlflow.set_tag(f"breastscan.{stage}", "done")
            yield run
        return
    log.warning("run %s of %s is not in %s; logging %s to a new run", run_id, model,
                mlflow.get_tracking_uri(), stage)
    tags = {**tracking.run_tags(project), "breastscan.model": model, "breastscan.continued_from": str(run_id)}
    with tracking.start_training_run(model, project, params={}, tags=tags) as run:
        mlflow.set_tag(f"breastscan.{stage}", "done")
        yield run
