"""Register tiny seeded density / tumor / lesion bundles at ``production`` in a fresh MLflow store.

Run as ``python -m tests.services.make_registry ROOT`` with ``MLFLOW_TRACKING_URI`` set:
the service tests serve these models through the real path (registry -> ``breastscan
import-models`` -> BentoML store -> ``bentoml serve``). The weights are untrained but
seeded, so every run serves the same numbers.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

from mlflow import MlflowClient

from breastscan.config import ModelConfig
from breastscan.imaging.preprocessing import PreprocessSpec
from breastscan.registry import tracking, versions
from breastscan.registry.bundle import ModelBundle, ModelContract

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
}


def build_bundle(name: str, directory: Path) -> Path:
    """A seeded untrained bundle of model ``name`` saved to ``directory``."""
    import keras

    from breastscan.models import build_model

    m = MODELS[name]
    spec: PreprocessSpec = m["spec"]
    shape = (spec.height, spec.width, 1)
    keras.utils.set_random_seed(7)
    if m["task"] == "classification":
        model = build_model("classification", n_classes=len(m["classes"]), input_shape=shape)
    else:
        model = build_model("segmentation", input_shape=shape, base_filters=4, depth=2)
    contract = ModelContract(name=name, task=m["task"], label=m["label"], classes=m["classes"],
                             class_names=m["class_names"], input_shape=shape, dataset=m["dataset"],
                             modality=m["modality"], temperature=m["temperature"], spec_id=spec.spec_id)
    return ModelBundle(model=model, spec=spec, contract=contract).save(directory)


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


if __name__ == "__main__":
    main(Path(sys.argv[1]))
