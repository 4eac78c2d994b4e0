"""Register tiny seeded density, tumor, lesion, mammo_lesion and us_mt bundles at ``production``.

Run as ``python -m tests.services.make_registry ROOT`` with ``MLFLOW_TRACKING_URI`` set:
the service tests serve these models through the real path (registry -> ``breastscan
import-models`` -> BentoML store -> ``bentoml serve``). The weights are untrained but
seeded, so every run serves the same numbers.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient

from breastscan.bundle import ModelBundle, ModelContract
from breastscan.config import ModelConfig
from breastscan.decision import DecisionRule
from breastscan.imaging.preprocessing import PreprocessSpec
from breastscan.registry import tracking, versions
from tests.services import images

MODELS: dict[str, dict] = {
    "density": dict(task="classification", label="density", classes=("1", "2", "3", "4"),
                    class_names=("A", "B", "C", "D"), modality="mammography", dataset="mammography",
                    spec=PreprocessSpec(height=48, width=40), temperature=1.3),
    "tumor": dict(task="classification", label="pathology", classes=("benign", "malignant", "normal"),
                  class_names=("benign", "malignant", "normal"), modality="mammography",
                  dataset="mammography", spec=PreprocessSpec(height=48, width=40, clahe=True),
                  temperature=0.8),
    "lesion": dict(task="segmentation", label="mask", classes=(), class_names=("lesion",),
                   modality="ultrasound", dataset="ultrasound", spec=PreprocessSpec(height=32, width=32),
                   temperature=1.0),
    "mammo_lesion": dict(task="segmentation", label="mask", classes=(), class_names=("lesion",),
                         modality="mammography", dataset="mammography",
                         spec=PreprocessSpec(height=48, width=32), temperature=1.0),
    # one U-Net answering classes and a mask in one call; its operating point calls benign where
    # the arg-max calls malignant, and its threshold leaves a mask of both values (seeded weights)
    "us_mt": dict(task="multitask", label="pathology", classes=("benign", "malignant", "normal"),
                  class_names=("benign", "malignant", "normal"), modality="ultrasound", dataset="ultrasound",
                  spec=PreprocessSpec(height=32, width=32), temperature=1.2, tta="flip", threshold=0.51,
                  decision=DecisionRule(rule="positive_ratio", positive="malignant", versus="benign",
                                        cutoff=0.6)),
}


PROJECT_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"
"""The project's params.yaml: its gates judge the versions of :func:`register_versions`."""

REFERENCE_SEEDS = range(1000, 1048)
"""Phantom seeds of every bundle's drift reference (service tests draw their requests elsewhere)."""


def build_bundle(name: str, directory: Path, **changes: Any) -> Path:
    """A seeded untrained bundle of model ``name`` saved to ``directory``, with a drift reference
    (``reference.json``) over the phantoms of :data:`REFERENCE_SEEDS` of its modality and a
    checked ONNX export (``model.onnx``: the service runs it), as trained bundles have.
    ``changes`` replace entries of its :data:`MODELS` row (e.g. ``classes`` and ``class_names``:
    a version whose contract differs)."""
    import keras

    from breastscan.evaluation.export import export_and_check
    from breastscan.exported import write_export
    from breastscan.models import build_model
    from breastscan.models.multitask import build_multitask
    from breastscan.monitoring.drift import model_reference

    m = {**MODELS[name], **changes}
    spec: PreprocessSpec = m["spec"]
    shape = (spec.height, spec.width, 1)
    keras.utils.set_random_seed(7)
    if m["task"] == "classification":
        model = build_model("classification", n_classes=len(m["classes"]), input_shape=shape)
    elif m["task"] == "multitask":
        model = build_multitask(n_classes=len(m["classes"]), input_shape=shape, base_filters=4, depth=2)
    else:
        model = build_model("segmentation", input_shape=shape, base_filters=4, depth=2)
    contract = ModelContract(name=name, task=m["task"], label=m["label"], classes=m["classes"],
                             class_names=m["class_names"], input_shape=shape, dataset=m["dataset"],
                             modality=m["modality"], temperature=m["temperature"], spec_id=spec.spec_id,
                             threshold=m.get("threshold", 0.5), tta=m.get("tta", "none"),
                             decision=m.get("decision", DecisionRule()).to_dict())
    bundle = ModelBundle(model=model, spec=spec, contract=contract)
    phantom = images.mammogram if m["modality"] == "mammography" else images.ultrasound
    grays = [phantom(seed).astype(np.float32) / 255.0 for seed in REFERENCE_SEEDS]
    reference = model_reference(bundle, grays, modality=m["modality"])
    saved = replace(bundle, reference=reference).save(directory)
    if m.get("export", True):  # checked on the reference phantoms, as evaluate checks the test split
        graph, info = export_and_check(bundle, bundle.prepare(grays)[0])
        assert graph is not None and info.passed, (name, info.equivalence)
        write_export(saved, graph, info)
    return saved


def main(root: Path, names: Iterable[str] = tuple(MODELS)) -> None:
    """Log, register and promote (alias ``production``) each tiny model (or only ``names``) under ``root``."""
    tracking.configure(root)
    client = MlflowClient()
    for name in names:
        m = MODELS[name]
        bundle_dir = build_bundle(name, root / "bundles" / name)
        cfg = ModelConfig(name=name, task=m["task"], dataset=m["dataset"], label=m["label"],
                          classes=m["classes"] or ("lesion",), preprocess=m["spec"])
        with tracking.start_training_run(name, root, params={"tiny": "1"}, tags={}) as run:
            uri = versions.log_bundle(bundle_dir)
        version = versions.register(cfg, uri, metrics={"headline": "x"}, split_id="tiny",
                                    run_id=run.info.run_id)
        client.set_registered_model_alias(cfg.registered_name, versions.PRODUCTION, str(version))


def register_versions(root: Path, name: str, reports: Sequence[Mapping[str, Any]], *, production: int,
                      params: Path = PROJECT_PARAMS) -> list[int]:
    """Register one version of ``name`` per report, judged by the gates of ``params`` (the project's).

    Unlike :func:`main`'s versions, these carry the metrics the project's gates read, so
    ``breastscan promote`` and ``breastscan rollback`` judge them as they would a trained model.
    Version ``production`` is promoted to ``production`` (a ``promote`` audit event); ``staging``
    ends on the last one.

    Args:
        root: the project root (its MLflow store, unless ``MLFLOW_TRACKING_URI`` is set).
        name: a model of :data:`MODELS` declared in ``params``.
        reports: each version's evaluation report (e.g. ``{"macro_auc": 0.83, "accuracy": 0.7}``).
        production: the version (1-based, of these) promoted to ``production``.

    Returns:
        The registry versions, in order.
    """
    from breastscan.config import load_params
    from breastscan.registry import promotion

    cfg = load_params(params).model(name)
    out = [register_version(root, name, report, params=params) for report in reports]
    result = promotion.promote(cfg, version=out[production - 1], to=versions.PRODUCTION,
                               reason="first release")
    assert result.passed, result.failures
    return out


def register_version(root: Path, name: str, report: Mapping[str, Any], *, params: Path = PROJECT_PARAMS,
                     **changes: Any) -> int:
    """Register one more version of ``name`` (its bundle by :func:`build_bundle` with ``changes``)
    carrying the metrics of ``report``, as the pipeline's register stage would; its version."""
    from breastscan.config import load_params

    tracking.configure(root)
    cfg = load_params(params).model(name)
    existing = len(MlflowClient().search_model_versions(f"name='{cfg.registered_name}'"))
    bundle_dir = build_bundle(name, root / "bundles" / f"{name}-{existing + 1}", **changes)
    with tracking.start_training_run(name, root, params={"tiny": "1"}, tags={}) as run:
        uri = versions.log_bundle(bundle_dir)
    return versions.register(cfg, uri, metrics=report, split_id="tiny", run_id=run.info.run_id)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
