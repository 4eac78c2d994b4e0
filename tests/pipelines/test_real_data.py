"""Real data, first class: from two hospitals' public packs to served models, with no code edit.

In a throwaway git+DVC repo (:func:`tests.pipelines.repo.make_repo`) the test runs what the
README's "Real data" section tells a user to run, on small real subsets of the BUSI and
BUS-BRA packs (../shared/datasets; skipped when absent): ``breastscan ingest ... --copy``
into ``datasets/busi`` and ``datasets/busbra``, ``dvc add``, ``breastscan declare
ultrasound_sites`` (a pool of the two sites), then the commands ``declare`` prints (``git
add``, ``dvc repro register@us_tumor register@us_lesion``, ``breastscan promote``),
``breastscan import-models`` and a real ``bentoml serve``
(:func:`load_tests.harness.launch_service`). The HTTP and gRPC answers for real
images of both sites must equal the in-process prediction of the registered production
versions, and the evaluation must score each site apart.

The one departure from the README: after ``declare``, the test shrinks the declared models
(32x32 inputs, 2 epochs) so that they train in seconds, and drops their gates, which such
models would not pass.
"""

from __future__ import annotations

import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import REPO
from tests.pipelines.repo import env, make_repo, run

pytestmark = [pytest.mark.slow, pytest.mark.data]

SUBSET_ROWS = 120
MODELS = ("us_tumor", "us_lesion")
SITES = {"busi": "dup_group", "busbra": "group"}
"""The two sites and the pack column whose groups a subset keeps whole."""
TINY = {
    "us_tumor": {"epochs": 2, "batch_size": 16, "patience": 0, "preprocess": {"height": 32, "width": 32},
                   "roi": {"seg_size": [32, 32], "seg_filters": 4, "seg_depth": 2, "seg_epochs": 2,
                           "seg_batch_size": 8, "crop_size": [32, 32]}},
    "us_lesion": {"epochs": 2, "batch_size": 8, "patience": 0, "depth": 2, "base_filters": 4,
                    "preprocess": {"height": 32, "width": 32}},
}
"""Applied to the declared entries: seconds of training instead of minutes."""


def pack_subset(pack: Path, out: Path, group: str, n: int = SUBSET_ROWS, seed: int = 0) -> Path:
    """A ``manifest.csv`` in ``out`` of about ``n`` rows of a pack, its files referenced in place.

    Stratified by label, groups (``group`` column) kept whole (a group is never cut), groups
    with conflicting labels left out; image and mask paths absolute.
    """
    df = pd.read_csv(pack / "manifest.csv", dtype=str, keep_default_na=False)
    df = df[df["dup_label_conflict"] != "1"].copy()
    df["_group"] = df[group].where(df[group] != "", df["image"])
    rng = np.random.default_rng(seed)
    picked = []
    for _, rows in df.groupby("label"):
        quota, taken = round(len(rows) * n / len(df)), 0
        for group in rng.permutation(rows["_group"].unique()):
            if taken >= quota:
                break
            members = rows[rows["_group"] == group]
            picked.append(members)
            taken += len(members)
    subset = pd.concat(picked).drop(columns="_group")
    for col in ("image", "mask"):
        subset[col] = [str(pack / v) if v else "" for v in subset[col]]
    out.mkdir(parents=True)
    subset.to_csv(out / "manifest.csv", index=False)
    return out / "manifest.csv"


def shrink_models(params: Path) -> None:
    """Merge :data:`TINY` into the declared models of ``params``."""
    raw = yaml.safe_load(params.read_text())
    for name, over in TINY.items():
        entry = raw["models"][name]
        entry.pop("gates", None)
        for key, value in over.items():
            entry[key] = {**entry[key], **value} if isinstance(value, dict) else value
    params.write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture()
def reference_engine(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``make(repo)``: an in-process engine over the production versions in ``repo``'s registry."""
    import mlflow

    def make(repo: Path) -> Any:
        from breastscan.registry.resolver import load_bundle
        from breastscan.serving.engine import local_engine

        uri = f"sqlite:///{repo}/mlflow.db"
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            monkeypatch.setenv(var, uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        bundles = {n: load_bundle(f"breastscan-{n}@production") for n in MODELS}
        return local_engine(bundles, versions=dict.fromkeys(MODELS, "1"),
                            stages=dict.fromkeys(MODELS, "production"))

    try:
        yield make
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
        mlflow.set_registry_uri(None)  # type: ignore[arg-type]


def test_two_hospital_packs_to_served_models(tmp_path: Path, tiny_phantoms: Path, shared_datasets: Path,
                                    reference_engine: Any) -> None:
    import httpx

    from breastscan.serving.client import GRPCClient, HTTPClient
    from breastscan.serving.request import ImageInput, predict_request
    from load_tests.harness import launch_service
    from tests.services.conftest import local_answer
    from tests.services.test_service_http import assert_same_answer

    manifests = {site: pack_subset(shared_datasets / site, tmp_path / site, group)
                 for site, group in SITES.items()}
    repo = tmp_path / "repo"
    repo.mkdir()
    make_repo(repo, tiny_phantoms)
    shutil.copytree(REPO / "benchmarks", repo / "benchmarks")  # a checkout has them
    with (repo / ".gitignore").open("a") as fh:
        fh.write("/datasets/*/\n")  # the project's .gitignore line for real data

    # 1. convert and version the data of both hospitals
    for site, manifest in manifests.items():
        mapped = ["--map", "dup_group=group"] if site == "busi" else []  # BUSI has no patient id
        ingested = run(["breastscan", "ingest", "--format", "csv", str(manifest), f"datasets/{site}",
                        "--map", "label=pathology", *mapped, "--modality", "ultrasound", "--copy"], repo)
        assert f"datasets/{site}/manifest.csv: {len(pd.read_csv(manifest))} rows" in ingested.stdout
        assert not any(p.is_symlink() for p in (repo / f"datasets/{site}").rglob("*"))  # self-contained
    run(["dvc", "add", "datasets/busi", "datasets/busbra"], repo)

    # 2. declare the pool's ready-made entries; it names the next commands
    declared = run(["breastscan", "declare", "ultrasound_sites"], repo).stdout
    assert declared.startswith("params.yaml: declared datasets.ultrasound_sites (path datasets) and models "
                               "us_tumor, us_lesion from ultrasound_sites\n")
    steps = [line.strip() for line in declared.split("next:\n", 1)[1].splitlines()]
    assert steps == ["git add params.yaml datasets/busi.dvc datasets/busbra.dvc",
                     "dvc repro register@us_tumor register@us_lesion",
                     "breastscan promote us_tumor us_lesion --to production",
                     "make serve"]
    again = run(["breastscan", "declare", "ultrasound_sites"], repo, check=False)
    assert again.returncode == 1 and "already declares datasets.ultrasound_sites" in again.stderr
    shrink_models(repo / "params.yaml")  # the test's only departure: seconds of training

    # 3. train, evaluate, register, promote: the printed commands, as they are
    run(shlex.split(steps[0]), repo)
    run(["git", "commit", "-qm", "declare the ultrasound sites"], repo)
    reproduced = run(shlex.split(steps[1]), repo)
    for stage in ("validate@ultrasound_sites", "prepare@ultrasound_sites",
                  *(f"{s}@{m}" for m in MODELS for s in ("train", "evaluate", "register"))):
        assert f"Running stage '{stage}'" in reproduced.stdout, reproduced.stdout[-3000:]
    assert "@density" not in reproduced.stdout  # the demo models are not retrained
    logged = reproduced.stdout + reproduced.stderr
    assert "partial labels: {'busbra': ['benign', 'malignant'], 'busi': " in logged
    for model in MODELS:  # every site scored apart
        assert f"{model} at site busi" in logged and f"{model} at site busbra" in logged
    promoted = run(shlex.split(steps[2]), repo).stdout
    for name in MODELS:
        assert f"breastscan-{name} v1 is now at stage production" in promoted, promoted

    # 4. serve (`make serve` = import-models + bentoml serve; here on free loopback ports)
    bentoml_home = str(repo / "bentoml")
    imported = run(["breastscan", "import-models", "--serving-config", str(REPO / "services/serving.yaml")],
                   repo, BENTOML_HOME=bentoml_home).stdout
    assert "density: skipped, no version at stage production" in imported
    assert all(f"{name}: " in imported and f"{name}: skipped" not in imported for name in MODELS), imported
    service_env = env(MLFLOW_TRACKING_URI=f"sqlite:///{repo}/mlflow.db", BENTOML_HOME=bentoml_home,
                      PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    served = launch_service(service_env, repo / "serve.log", cwd=REPO, timeout_s=240)
    try:
        listed = httpx.post(f"{served.http_url}/models", json={}, timeout=30).json()
        assert [(m["name"], m["version"], m["stage"]) for m in listed] == \
            [(n, "1", "production") for n in sorted(MODELS)]
        engine = reference_engine(repo)
        images = []
        for site, labels in (("busi", ("benign", "malignant", "normal")),
                             ("busbra", ("benign", "malignant"))):
            ds = pd.read_csv(repo / f"datasets/{site}/manifest.csv", dtype=str, keep_default_na=False)
            images += [(repo / f"datasets/{site}" / ds[ds["pathology"] == label]["image"].iloc[0])
                       .read_bytes() for label in labels]
        with HTTPClient(served.http_url, timeout=60) as http, \
                GRPCClient(served.grpc_target, timeout=60) as rpc:
            for name in MODELS:
                for data in images:
                    local = local_answer(engine, predict_request(name, ImageInput(data=data)))
                    r = httpx.post(f"{served.http_url}/{name}", files={"image": ("scan.png", data)},
                                   timeout=60)
                    assert r.status_code == 200, r.text
                    assert_same_answer(r.json(), local)
                    assert_same_answer(http.predict(name, data), local)
                    assert_same_answer(rpc.predict(name, data), local)
    except BaseException:
        print(served.log_tail())
        raise
    finally:
        served.stop(20)
