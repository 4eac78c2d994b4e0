"""A model trained on a pool of two sites, through the real ``dvc repro`` and MLflow.

The second site has no ``normal`` images (as BUS-BRA beside BUSI): the pool's sites are
validated and split each on its own, the model trains on their union with the absent class
left out of that site's loss, and the evaluation scores every site apart as well as pooled.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from breastscan.data.phantoms import generate_dataset
from tests.pipelines.repo import make_repo, run

pytestmark = pytest.mark.slow

POOL = {
    "path": "data",
    "sites": {"cairo": "data/ultrasound", "rio": "data/ultrasound_rio"},
    "modality": "ultrasound", "labels": ["pathology"], "stratify": ["pathology"], "masks_required": True,
}
MODEL = {
    "task": "classification", "dataset": "us_sites", "label": "pathology",
    "classes": ["benign", "malignant", "normal"], "base_filters": 4, "epochs": 2, "batch_size": 16,
    "patience": 0, "preprocess": {"height": 32, "width": 48}, "headline": "macro_auc",
    "gates": {"floors": {}, "max_regression": 1.0},
}


@pytest.fixture(scope="module")
def pooled(tmp_path_factory: pytest.TempPathFactory, tiny_phantoms: Path) -> tuple[Path, str]:
    """A repo after ``dvc repro register@us_tumor`` of a model on a two-site pool, and its output."""
    data = tmp_path_factory.mktemp("pool-data") / "data"
    shutil.copytree(tiny_phantoms / "ultrasound", data / "ultrasound")
    generate_dataset(data / "ultrasound_rio", "ultrasound", n_images=40, seed=11, duplicate_rate=0.05,
                     label_conflicts=0, proportions={"pathology": {"benign": 0.6, "malignant": 0.4}})
    root = make_repo(tmp_path_factory.mktemp("pool"), data,
                     {"datasets": {"us_sites": POOL}, "models": {"us_tumor": MODEL}})
    proc = run(["dvc", "repro", "register@us_tumor"], root)
    return root, proc.stdout + proc.stderr


def test_each_site_is_validated_and_split_on_its_own(pooled: tuple[Path, str]) -> None:
    root, _ = pooled
    report = json.loads((root / "reports/validation/us_sites.json").read_text())
    assert report["success"] and sorted(report["statistics"]["sites"]) == ["cairo", "rio"]
    splits = pd.read_csv(root / "artifacts/prepared/us_sites/splits.csv", dtype=str, keep_default_na=False)
    assert sorted(splits["site"].unique()) == ["cairo", "rio"]
    kept = splits[splits["split"] != "excluded"]
    assert (kept.groupby("dup_group")["site"].nunique() == 1).all()
    assert (kept.groupby("dup_group")["split"].nunique() == 1).all()
    assert "normal" not in set(kept.loc[kept["site"] == "rio", "pathology"])


def test_the_absent_class_is_left_out_of_that_sites_loss(pooled: tuple[Path, str]) -> None:
    _, out = pooled
    named = "{'cairo': ['benign', 'malignant', 'normal'], 'rio': ['benign', 'malignant']}"
    assert f"partial labels: {named}" in out


def test_every_site_is_scored_apart_and_pooled(pooled: tuple[Path, str]) -> None:
    root, out = pooled
    metrics = json.loads((root / "reports/models/us_tumor/metrics.json").read_text())
    sites = metrics["sites"]
    assert sorted(sites) == ["cairo", "rio"]
    assert sites["cairo"]["n_test"] + sites["rio"]["n_test"] == metrics["n_test"]
    assert sites["rio"]["per_class"]["normal"]["support"] == 0
    assert 0.0 <= sites["cairo"]["ece"] <= 1.0
    pred = pd.read_csv(root / "reports/models/us_tumor/predictions.csv")
    assert pred["site"].value_counts().to_dict() == {s: sites[s]["n_test"] for s in sites}
    assert "us_tumor at site rio" in out
    card = (root / "reports/models/us_tumor/model_card.md").read_text()
    section = card.split("## Per site", 1)[1].split("\n## ", 1)[0]
    assert "| cairo |" in section and "| rio |" in section and "malignant sensitivity" in section
    registered = json.loads((root / "reports/models/us_tumor/registered.json").read_text())
    assert registered["version"]


def test_the_sites_are_params_of_the_stages(pooled: tuple[Path, str]) -> None:
    root, _ = pooled
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["datasets"]["us_sites"]["sites"] = {"cairo": "data/ultrasound", "brazil": "data/ultrasound_rio"}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = run(["dvc", "status", "prepare@us_sites"], root).stdout
    assert "modified" in status and "datasets.us_sites" in status


def test_the_registry_lists_each_sites_headline(pooled: tuple[Path, str]) -> None:
    root, _ = pooled
    metrics = json.loads((root / "reports/models/us_tumor/metrics.json").read_text())
    listed = json.loads(run(["breastscan", "models", "--json"], root).stdout)
    (row,) = [r for r in listed if r["name"] == "breastscan-us_tumor"]
    expected = ", ".join(f"{s} {metrics['sites'][s]['macro_auc']:.3f}" for s in ("cairo", "rio")
                         if metrics["sites"][s]["macro_auc"] is not None)
    assert row["sites"] == expected and expected.startswith("cairo ")
    table = run(["breastscan", "models"], root).stdout
    assert "sites" in table.splitlines()[0] and expected in table
