"""From the MLflow registry to the BentoML model store, and back out for serving.

:func:`import_model` copies the bundle of ``models:/breastscan-<model>@<stage>`` (Keras
model, preprocessing spec, contract with calibration) into the BentoML store as
``breastscan-<model>``, labelled with the registry version and stage, so that
``bentoml build`` packs it into the Bento and the service needs no registry at run time.
Importing the same registry version again reuses the stored model.

:func:`load_served` reads a stored model's spec and contract without Keras (what the
engine knows of a model); :func:`stored_bundle_dir` is where the service loads the weights.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from breastscan.bundle import read_contract
from breastscan.imaging.preprocessing import PreprocessSpec
from breastscan.serving.engine import ServedModel

log = logging.getLogger(__name__)

PREFIX = "breastscan-"
LABEL_MODEL = "model"
LABEL_STAGE = "stage"
LABEL_VERSION = "registry_version"


def store_name(model: str) -> str:
    """The BentoML store (and MLflow registry) name of a model: ``breastscan-<model>``."""
    return f"{PREFIX}{model}"


def _labels(model: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in (model.info.labels or {}).items()}


def import_model(model: str, stage: str = "production") -> str:
    """Import the registry's ``models:/breastscan-<model>@<stage>`` into the BentoML store.

    Args:
        model: model name (``density``, ``tumor``, ``lesion`` ...).
        stage: registry alias to import.

    Returns:
        The BentoML tag (``breastscan-<model>:<version>``); when the newest stored model is
        already this registry version, stage and training run, it is reused.

    Raises:
        breastscan.registry.resolver.RegistryError: the registry has no such model or alias.
    """
    import bentoml

    from breastscan.registry.resolver import ModelRef, download_uri, resolve

    name = store_name(model)
    mv = resolve(ModelRef(name=model, registered_name=name, version=None, alias=stage))
    labels = {LABEL_MODEL: model, LABEL_STAGE: stage, LABEL_VERSION: str(mv.version)}
    try:
        stored = sorted(bentoml.models.list(name), key=lambda m: m.info.creation_time)
    except bentoml.exceptions.NotFound:
        stored = []
    # The same version number in another tracking store is another model: the run decides.
    if (stored and all(_labels(stored[-1]).get(k) == v for k, v in labels.items())
            and stored[-1].info.metadata.get("run_id") == (mv.run_id or "")):
        log.info("%s v%s (%s) is already the newest in the BentoML store as %s",
                 name, mv.version, stage, stored[-1].tag)
        return str(stored[-1].tag)
    with tempfile.TemporaryDirectory(prefix="breastscan-import-") as tmp:
        bundle_dir = download_uri(mv.uri, Path(tmp))  # by version: a moving alias cannot interfere
        contract = read_contract(bundle_dir)
        spec = PreprocessSpec.load(bundle_dir)
        metadata = {"source": f"models:/{name}@{stage}", "run_id": mv.run_id or "",
                    "spec_id": spec.spec_id, "task": contract.task, "modality": contract.modality,
                    "classes": list(contract.class_names)}
        with bentoml.models.create(name, labels=labels, metadata=metadata) as bento_model:
            shutil.copytree(bundle_dir, bento_model.path, dirs_exist_ok=True)
    log.info("imported %s v%s (%s) into the BentoML store as %s", name, mv.version, stage, bento_model.tag)
    return str(bento_model.tag)


def load_served(model: str, path: str | Path, labels: dict[str, Any] | None = None,
                source: str | None = None) -> ServedModel:
    """A stored model's spec and contract, without loading its weights.

    Args:
        model: the served name.
        path: the stored model's directory (holds the bundle files).
        labels: the stored model's labels (registry version and stage).
        source: where it came from, for ``/models``.

    Raises:
        FileNotFoundError: the directory holds no bundle.
        ValueError: its contract and spec disagree, or its name is not ``model``.
    """
    path = Path(path)
    contract = read_contract(path)
    spec = PreprocessSpec.load(path)
    if contract.spec_id and contract.spec_id != spec.spec_id:
        raise ValueError(f"{path}: contract spec_id {contract.spec_id} does not match the spec "
                         f"{spec.spec_id}")
    labels = labels or {}
    return ServedModel(name=model, spec=spec, contract=contract,
                       version=str(labels[LABEL_VERSION]) if labels.get(LABEL_VERSION) else None,
                       stage=str(labels[LABEL_STAGE]) if labels.get(LABEL_STAGE) else None,
                       source=source)


def stored_models(stage: str) -> tuple[str, ...]:
    """Models whose newest ``breastscan-<model>`` in the BentoML store was imported at ``stage``."""
    return tuple(sorted(newest_stored(stage)))


def newest_stored(stage: str) -> dict[str, Any]:
    """The newest stored BentoML model of each ``breastscan-<model>``, by model name, of those
    imported at ``stage``."""
    import bentoml

    newest: dict[str, Any] = {}
    for stored in bentoml.models.list():
        if stored.tag.name.startswith(PREFIX):
            current = newest.get(stored.tag.name)
            if current is None or stored.info.creation_time > current.info.creation_time:
                newest[stored.tag.name] = stored
    return {_labels(m).get(LABEL_MODEL, name[len(PREFIX):]): m for name, m in newest.items()
            if _labels(m).get(LABEL_STAGE) == stage}


def stored_runtimes(stage: str, runtime: str = "auto") -> dict[str, str]:
    """Which runtime (``onnx`` or ``keras``) runs each model of :func:`newest_stored` under the
    serving config's ``runtime`` (:func:`breastscan.exported.choose_runtime`).

    Raises:
        ValueError: ``runtime`` is ``onnx`` and a model carries no checked export.
    """
    from breastscan.exported import choose_runtime

    return {name: choose_runtime(m.path, runtime) for name, m in sorted(newest_stored(stage).items())}
