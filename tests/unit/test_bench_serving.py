"""The serving benchmark (load_tests/bench_serving.py): the BentoML home it and the Makefile's
serving targets use, its refusal of models the registry does not hold, and its in-process
comparison of Keras with ONNX Runtime (interleaved timing, ratios and targets).

The Makefile test runs the real targets with a stand-in virtual environment whose
``breastscan``, ``bentoml`` and ``python`` only record the ``BENTOML_HOME`` they were given.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SERVING_TARGETS = ("serve", "bento", "bench-serving")


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    """``load_tests/bench_serving.py`` imported as the script imports itself (``harness`` beside it)."""
    sys.path.insert(0, str(REPO / "load_tests"))
    try:
        yield importlib.import_module("bench_serving")
    finally:
        sys.path.remove(str(REPO / "load_tests"))


# --------------------------------------------------------------------------- the BentoML home


def _fake_venv(root: Path) -> Path:
    """A venv whose tools only append ``<tool> <$BENTOML_HOME>`` to ``$HOME_LOG`` (stamp up to date)."""
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    for tool in ("breastscan", "bentoml", "python"):
        script = bin_dir / tool
        script.write_text('#!/bin/sh\necho "$(basename "$0") ${BENTOML_HOME-unset}" >> "$HOME_LOG"\n')
        script.chmod(0o755)
    (root / ".installed").touch()  # newer than pyproject.toml: make installs nothing
    return root


def _homes_seen(venv: Path, log: Path, env_home: str | None, *make_args: str) -> list[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("BENTOML_HOME", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}
    env["HOME_LOG"] = str(log)
    if env_home is not None:
        env["BENTOML_HOME"] = env_home
    log.unlink(missing_ok=True)
    for target in SERVING_TARGETS:
        subprocess.run(["make", "-s", "-C", str(REPO), target, f"VENV={venv}", *make_args], env=env,
                       check=True, capture_output=True, timeout=60)
    return log.read_text().splitlines()


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
def test_make_serves_benchmarks_and_builds_in_the_checkouts_own_bentoml_home(tmp_path: Path) -> None:
    venv, log = _fake_venv(tmp_path / "venv"), tmp_path / "homes.log"
    own = str(REPO / ".bentoml")
    assert _homes_seen(venv, log, None) == [
        f"breastscan {own}", f"bentoml {own}",  # make serve: import-models, then bentoml serve
        f"breastscan {own}",                    # make bento: breastscan build
        f"python {own}"]                        # make bench-serving
    assert set(_homes_seen(venv, log, "/srv/bentoml")) == {f"{tool} /srv/bentoml"
                                                           for tool in ("breastscan", "bentoml", "python")}
    assert {line.split()[1] for line in _homes_seen(venv, log, None, "BENTOML_HOME=/cli")} == {"/cli"}


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_the_checkouts_bentoml_home_is_git_ignored() -> None:
    done = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", ".bentoml/models/x/model.keras"],
                          capture_output=True)
    if done.returncode == 128:
        pytest.skip("not a git checkout")
    assert done.returncode == 0, ".bentoml/ must be git-ignored"


def test_the_benchmark_uses_the_checkouts_home_unless_bentoml_home_is_set(bench: ModuleType) -> None:
    assert bench.default_bentoml_home({}) == REPO / ".bentoml"
    assert bench.default_bentoml_home({"BENTOML_HOME": ""}) == REPO / ".bentoml"
    assert bench.default_bentoml_home({"BENTOML_HOME": "/srv/bentoml"}) == Path("/srv/bentoml")


def _provenance(version: str | None, run: str | None, registry_version: str | None,
                registry_run: str | None) -> dict[str, Any]:
    return {"tag": "breastscan-x:abc", "stored_version": version, "stored_run": run,
            "registry_version": registry_version, "registry_run": registry_run}


def test_foreign_models_are_those_not_the_registrys_version_at_the_stage(bench: ModuleType) -> None:
    provenance = {"tumor": _provenance("3", "r3", "3", "r3"),          # the registry's
                  "busi_tumor": _provenance("1", "b1", None, None),    # another checkout's model
                  "density": _provenance("2", "other", "2", "d2"),     # same number, another registry
                  "lesion": _provenance("1", "l1", "2", "l2")}         # the stage moved on
    foreign = bench.foreign_models(provenance, "production")
    assert [line.split(":")[0] for line in foreign] == ["busi_tumor", "density", "lesion"]
    assert "no breastscan-busi_tumor@production" in foreign[0]
    assert "v2 of run d2" in foreign[1]
    assert bench.foreign_models({"tumor": provenance["tumor"]}, "production") == []


PROVENANCE_SCRIPT = """
import json, sys
import bentoml
from mlflow import MlflowClient

uri, missing = sys.argv[1], sys.argv[2]
client = MlflowClient(tracking_uri=uri, registry_uri=uri)
runs = [client.create_run(client.create_experiment("e")).info.run_id, "another-registrys-run"]
client.create_registered_model("breastscan-tumor")
mv = client.create_model_version("breastscan-tumor", source=f"runs:/{runs[0]}/model", run_id=runs[0])
client.set_registered_model_alias("breastscan-tumor", "production", mv.version)
for name, run in (("tumor", runs[0]), ("busi_tumor", runs[1])):
    labels = {"registry_version": "1", "stage": "production", "model": name}
    with bentoml.models.create(f"breastscan-{name}", labels=labels, metadata={"run_id": run}):
        pass
sys.path.insert(0, "load_tests")
import bench_serving

print(json.dumps([bench_serving.store_provenance(["tumor", "busi_tumor"], "production", uri),
                  bench_serving.store_provenance(["tumor"], "production", missing)]))
"""


def test_store_provenance_reads_the_bentoml_store_and_the_registry(bench: ModuleType, tmp_path: Path) -> None:
    """A real BentoML store and MLflow registry (in a child process: BentoML reads its home once)."""
    import json

    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    missing = tmp_path / "none" / "mlflow.db"
    done = subprocess.run([sys.executable, "-c", PROVENANCE_SCRIPT, f"sqlite:///{tmp_path}/mlflow.db",
                           f"sqlite:///{missing}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found, without_registry = json.loads(done.stdout.strip().splitlines()[-1])
    tumor = found["tumor"]
    assert tumor["tag"].startswith("breastscan-tumor:") and tumor["stored_version"] == "1"
    assert (tumor["registry_version"], tumor["registry_run"]) == ("1", tumor["stored_run"])
    assert found["busi_tumor"]["registry_version"] is None
    assert [line.split(":")[0] for line in bench.foreign_models(found, "production")] == ["busi_tumor"]
    assert without_registry["tumor"]["registry_version"] is None and not missing.exists()


def test_the_benchmark_stops_before_measuring_a_foreign_model(
        bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_root_logging: None,
        caplog: pytest.LogCaptureFixture) -> None:
    import tempfile

    from click.testing import CliRunner

    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))  # main sets it; restored after
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the run's work directory
    monkeypatch.setattr(bench, "_config_dict", lambda path: {"models": ["tumor", "busi_tumor"],
                                                             "stage": "production"})
    monkeypatch.setattr(bench, "store_provenance", lambda models, stage, uri: {
        "tumor": _provenance("3", "r3", "3", "r3"), "busi_tumor": _provenance("1", "b1", None, None)})
    measured: list[Any] = []

    def measure(*args: Any) -> dict[str, Any]:
        measured.append(args)
        raise bench.click.ClickException("measuring stops here")

    monkeypatch.setattr(bench, "inprocess_in_child", measure)
    args = ["--no-import", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    refused = CliRunner().invoke(bench.main, args)
    assert refused.exit_code == 1 and not measured
    assert "busi_tumor: the store holds" in refused.output and "--allow-foreign-models" in refused.output
    assert str((tmp_path / "bentoml").resolve()) in refused.output
    with caplog.at_level(logging.WARNING):
        allowed = CliRunner().invoke(bench.main, [*args, "--allow-foreign-models"])
    assert "measuring stops here" in allowed.output and len(measured) == 1
    assert "FOREIGN MODEL measured" in caplog.text and "busi_tumor" in caplog.text


# --------------------------------------------------------------------------- Keras vs ONNX Runtime


def test_timed_rates_interleave_the_runtimes_and_rank_them_by_speed(bench: ModuleType) -> None:
    order: list[str] = []

    def runtime(label: str, seconds: float) -> Any:
        def call() -> None:
            order.append(label)
            time.sleep(seconds)
        return call

    rates = bench.timed_rates({"slow": runtime("slow", 0.006), "fast": runtime("fast", 0.001)}, images=8,
                              repeats=4, min_s=0.02)
    assert order[:8] == ["slow"] * 4 + ["fast"] * 4  # warm-up and the call that sizes the loops
    loops, i = [], 8
    while i < len(order):
        label, n = order[i], rates[order[i]]["calls_per_repeat"]
        assert order[i:i + n] == [label] * n, "a loop was interrupted"
        loops.append(label)
        i += n
    assert loops == ["slow", "fast", "fast", "slow", "slow", "fast", "fast", "slow"]  # ABBA
    ratio = rates["fast"]["images_per_s_median"] / rates["slow"]["images_per_s_median"]
    assert 2 < ratio < 8, rates
    assert len(rates["slow"]["images_per_s_repeats"]) == 4
    assert rates["slow"]["call_ms_median"] >= 6


def _rates(keras: float, onnx: float) -> dict[str, Any]:
    return {"keras": {"images_per_s_median": keras}, "onnx": {"images_per_s_median": onnx}}


def test_runtime_verdict_compares_at_batch_1_and_each_runtimes_best(bench: ModuleType) -> None:
    verdict = bench.runtime_verdict({"1": _rates(20, 110), "8": _rates(60, 150), "32": _rates(80, 140),
                                     "64": _rates(70, 120)})
    assert verdict["best"] == {"keras": {"batch_size": 32, "images_per_s_median": 80},
                               "onnx": {"batch_size": 8, "images_per_s_median": 150}}
    assert verdict["ratios"] == {"batch_1": 5.5, "best": 1.875}
    batch_1, best = verdict["targets"]["onnx_over_keras_batch_1"], verdict["targets"]["onnx_over_keras_best"]
    assert (batch_1["met"], batch_1["target"]) == (True, ">= 5")
    assert (best["met"], best["target"], best["value"]) == (False, ">= 2", 1.875)


def test_runtime_rows_reach_the_tables_and_the_targets(bench: ModuleType) -> None:
    by_size = {"1": _rates(20, 110), "8": _rates(60, 150)}
    for row in by_size.values():
        row["onnx_over_keras"] = row["onnx"]["images_per_s_median"] / row["keras"]["images_per_s_median"]
    block = {"threads": {"tensorflow_intra_op": 0, "onnxruntime_intra_op": 2}, "onnxruntime": "1.x",
             "providers": ["CPUExecutionProvider"], "batch_sizes": [1, 8],
             "models": {"density": {"by_batch_size": by_size, "max_abs_difference": 3e-7,
                                    **bench.runtime_verdict(by_size)}},
             "without_export": {"lesion": "no model.onnx + export.json"}}
    table = "\n".join(bench.runtimes_markdown(block))
    assert "| density | keras | 20 | 60 | 60 (bs 8) |" in table
    assert "| density | onnx / keras | 5.50 | 2.50 | 2.50 (best / best) |" in table
    assert "| density | onnx_over_keras_batch_1 | 5.5 | >= 5 | yes | 3e-07 |" in table
    assert "lesion (no model.onnx + export.json)" in table
    result = {"in_process": {"runtimes": block, "end_to_end": {"best": {"images_per_s_median": 1},
                                                               "headroom": 1},
                             "models": {"tumor": {"best": {"images_per_s_median": 1}}}},
              "served": {"batching_on": {"cold_start": {}}, "batching_off": {}}}
    _, targets = bench.ratios_and_targets(result, "tumor", 1000)
    assert targets["onnx_over_keras_batch_1_density"]["met"] is True
    assert targets["onnx_over_keras_best_density"]["value"] == 2.5


def test_runtime_comparison_measures_keras_and_the_export_of_a_tiny_bundle(bench: ModuleType,
                                                                           tmp_path: Path) -> None:
    from breastscan.bundle import ModelBundle, ModelContract
    from breastscan.evaluation.export import export_and_check
    from breastscan.exported import write_export
    from breastscan.imaging.preprocessing import PreprocessSpec
    from tests.conftest import tiny_model

    spec = PreprocessSpec(height=32, width=32)
    contract = ModelContract(name="tiny", task="classification", label="pathology",
                             classes=("benign", "malignant", "normal"),
                             class_names=("benign", "malignant", "normal"), input_shape=(32, 32, 1),
                             dataset="mammography", modality="mammography", spec_id=spec.spec_id)
    bundle = ModelBundle(model=tiny_model("classification", 3), spec=spec, contract=contract)
    exported, plain = bundle.save(tmp_path / "exported"), bundle.save(tmp_path / "plain")
    graph, info = export_and_check(bundle, np.random.default_rng(1).random((8, 32, 32, 1), dtype=np.float32))
    assert graph is not None and info.passed, info.equivalence
    write_export(exported, graph, info)

    settings = bench.Settings(quick=True, inprocess_repeats=2, inprocess_min_s=0.02)
    block = bench.runtime_comparison({"tiny": exported, "plain": plain}, settings, batch_sizes=(1, 8))
    assert block["without_export"] == {"plain": "no model.onnx + export.json"}
    assert block["threads"]["onnxruntime_intra_op"] >= 1
    tiny = block["models"]["tiny"]
    assert tiny["max_abs_difference"] < 1e-4
    for row in tiny["by_batch_size"].values():
        assert row["keras"]["images_per_s_median"] > 0 and row["onnx"]["images_per_s_median"] > 0
        assert len(row["onnx"]["images_per_s_repeats"]) == 2
    assert set(tiny["targets"]) == {"onnx_over_keras_batch_1", "onnx_over_keras_best"}
    assert tiny["ratios"]["batch_1"] == pytest.approx(
        tiny["by_batch_size"]["1"]["onnx_over_keras"], rel=1e-2)


# --------------------------------------------------------------------------- served runtimes


def _served(runtime: str, ready_s: float, worker_mb: float, rps: dict[str, tuple[float, float]],
            says: str | None = None) -> dict[str, Any]:
    """A :func:`served_runtime` block: ``rps`` = ``{endpoint: (req/s at c=1, at c=32)}``."""
    after = worker_mb + 50
    return {"runtime": runtime, "config": f"serving-runtime-{runtime}.yaml",
            "cold_start": {"ready_s": ready_s, "grpc_serving_s": ready_s + 0.1},
            "rss_mb_idle": {"arbiter": 90.0, "breastscan#1": worker_mb, "total": 90.0 + worker_mb},
            "rss_mb_after_load": {"arbiter": 91.0, "breastscan#1": after, "total": 91.0 + after},
            "models_runtime": {"density": says or runtime, "tumor": runtime}, "runs_as_asked": says is None,
            "http": {e: [{"concurrency": 1, "throughput_rps": a}, {"concurrency": 32, "throughput_rps": b}]
                     for e, (a, b) in rps.items()}}


def _served_runtimes(onnx: dict[str, Any]) -> dict[str, Any]:
    keras = _served("keras", 9.5, 700.0, {"density": (40.0, 60.0), "tumor": (50.0, 100.0)})
    return {"endpoints": ["density", "tumor"], "concurrency": [1, 32], "duration_s": 120.0,
            "runtimes": {"keras": keras, "onnx": onnx}}


def test_served_runtime_targets_hold_the_onnx_service_to_keras(bench: ModuleType) -> None:
    onnx = _served("onnx", 3.2, 300.0, {"density": (80.0, 84.0), "tumor": (60.0, 100.0)})
    ratios, targets = bench.served_runtime_ratios(_served_runtimes(onnx))
    assert ratios["served_keras_cold_start_s"] == 9.5 and ratios["served_keras_rss_mb_idle_worker"] == 700.0
    assert ratios["served_keras_http_c32_tumor_rps"] == 100.0  # the TensorFlow service stays visible
    assert ratios["served_onnx_rss_mb_after_load_worker"] == 350.0
    assert targets["onnx_cold_start_s"] == {"value": 3.2, "target": "<= 5", "met": True}
    assert targets["onnx_rss_mb_idle"] == {"value": 300.0, "target": "<= 350 MiB per worker", "met": True}
    assert targets["onnx_over_keras_http_c1_density"] == {"value": 2.0, "target": ">= 1.5", "met": True}
    assert targets["onnx_over_keras_http_c32_density"] == {"value": 1.4, "target": ">= 1.5", "met": False}
    assert targets["onnx_over_keras_http_c1_tumor"] == {"value": 1.2, "target": ">= 1.1", "met": True}
    assert targets["onnx_over_keras_http_c32_tumor"]["met"] is False  # 1.0 < 1.1
    fat = _served("onnx", 6.0, 351.0, {"density": (80.0, 90.0), "tumor": (60.0, 120.0)}, says="keras")
    _, targets = bench.served_runtime_ratios(_served_runtimes(fat))
    assert not targets["onnx_cold_start_s"]["met"] and not targets["onnx_rss_mb_idle"]["met"]
    # a model that /models says runs on Keras fails every target, however fast
    assert targets["onnx_over_keras_http_c1_density"]["value"] == 2.0
    assert not any(t["met"] for t in targets.values())


def test_an_onnx_service_that_did_not_start_fails_its_targets(bench: ModuleType) -> None:
    message = ("runtime_onnx: bentoml serve exited 1 (log serve-runtime_onnx.log):\n  File \"x.py\"\n"
               "ValueError: runtime onnx: /store/lesion carries no checked ONNX export\n")
    reason = bench.start_error_reason(message)
    assert reason == "ValueError: runtime onnx: /store/lesion carries no checked ONNX export"
    block = _served_runtimes({"runtime": "onnx", "config": "c.yaml", "error": message, "reason": reason})
    ratios, targets = bench.served_runtime_ratios(block)
    assert ratios["served_onnx_error"] == reason and ratios["served_keras_http_c1_density_rps"] == 40.0
    assert set(targets) == {"onnx_cold_start_s", "onnx_rss_mb_idle", "onnx_over_keras_http_c1_density",
                            "onnx_over_keras_http_c32_density", "onnx_over_keras_http_c1_tumor",
                            "onnx_over_keras_http_c32_tumor"}
    assert all(t["value"] is None and t["met"] is False for t in targets.values())
    table = "\n".join(bench.served_runtimes_markdown(block))
    assert f"| onnx | did not start: {reason} | - | - | - | - | - | - | - |" in table
    rows = dict(bench.served_runtime_rows(block))
    assert rows["served, runtime onnx"] == f"did not start: {reason}"
    assert rows["`/tumor` served, HTTP at c=32, runtime keras / onnx"] == "100.0 / - req/s"


def test_served_runtime_rows_reach_the_report_and_the_summary(bench: ModuleType) -> None:
    block = _served_runtimes(_served("onnx", 3.2, 300.0, {"density": (80.0, 84.0), "tumor": (60.0, 100.0)}))
    table = bench.served_runtimes_markdown(block)
    assert table[2].endswith("| density c=1 req/s | density c=32 req/s | tumor c=1 req/s "
                             "| tumor c=32 req/s |")
    assert table[3].count("|") == table[2].count("|")
    assert ("| keras | density keras, tumor keras | 9.5 | 700 (790.0) | 750 (841.0) "
            "| 40.0 | 60.0 | 50.0 | 100.0 |") in table
    assert ("| onnx | density onnx, tumor onnx | 3.2 | 300 (390.0) | 350 (441.0) "
            "| 80.0 | 84.0 | 60.0 | 100.0 |") in table
    rows = dict(bench.served_runtime_rows(block))
    assert rows["served, runtime keras / onnx: cold start / RSS idle per worker"] == \
        "9.5 s / 3.2 s, 700.0 MiB / 300.0 MiB"
    assert rows["`/density` served, HTTP at c=32, runtime keras / onnx"] == "60.0 / 84.0 req/s"
    assert bench.served_runtime_rows(None) == []


def test_served_runtimes_serve_a_config_copy_per_runtime_and_record_a_refusal(
        bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    config = tmp_path / "serving.yaml"
    config.write_text("models: auto\nruntime: auto\nbatching: {enabled: true}\n")
    started: list[tuple[str, dict[str, Any], dict[str, str]]] = []

    class Server:
        http_url = "http://127.0.0.1:1"
        stopped = False

        def cold_start(self) -> dict[str, float]:
            return {"ready_s": 7.0, "grpc_serving_s": 7.1}

        def rss_mb(self) -> dict[str, float]:
            return {"arbiter": 80.0, "breastscan#1": 600.0, "total": 680.0}

        def stop(self, grace_s: float) -> None:
            self.stopped = True

    server = Server()

    def start(env: dict[str, str], path: Path, logdir: Path, label: str) -> Server:
        raw = yaml.safe_load(path.read_text())
        started.append((label, raw, env))
        if raw["runtime"] == "onnx":
            raise bench.click.ClickException(f"{label}: exited\nValueError: runtime onnx: no export")
        return server

    monkeypatch.setattr(bench, "start_server", start)
    monkeypatch.setattr(bench, "runtime_refusal", lambda runtime, models, stage: None)
    monkeypatch.setattr(bench, "served_model_runtimes", lambda url: {"density": "keras", "tumor": "keras"})
    monkeypatch.setattr(bench, "http_points", lambda target, endpoint, settings, cs: [
        {"concurrency": c, "throughput_rps": 10.0 * c, "errors": 0} for c in cs])
    served = {"models": ["lesion", "tumor"], "stage": "production"}
    block = bench.served_runtimes({"BREASTSCAN_RUNTIME": "onnx", "PATH": "/bin"}, config, served, tmp_path,
                                  bench.Settings(quick=True))
    assert [(label, raw["runtime"], raw["batching"]) for label, raw, _ in started] == [
        ("runtime_keras", "keras", {"enabled": True}), ("runtime_onnx", "onnx", {"enabled": True})]
    assert all("BREASTSCAN_RUNTIME" not in env and env["PATH"] == "/bin" for _, _, env in started)
    keras, onnx = block["runtimes"]["keras"], block["runtimes"]["onnx"]
    assert keras["runs_as_asked"] is True and server.stopped
    assert keras["http"] == {"tumor": [{"concurrency": 1, "throughput_rps": 10.0, "errors": 0},
                                       {"concurrency": 32, "throughput_rps": 320.0, "errors": 0}]}
    assert keras["rss_mb_idle"]["breastscan#1"] == 600.0 and keras["rss_mb_after_load"]["total"] == 680.0
    assert onnx["reason"] == "ValueError: runtime onnx: no export" and "http" not in onnx
    assert (block["endpoints"], block["concurrency"]) == (["tumor"], [1, 32])  # only those served

    started.clear()  # a refusal known from the store: the server is not started at all
    monkeypatch.setattr(bench, "runtime_refusal",
                        lambda runtime, models, stage: "ValueError: no export" if runtime == "onnx" else None)
    block = bench.served_runtimes({}, config, served, tmp_path, bench.Settings(quick=True))
    assert [label for label, _, _ in started] == ["runtime_keras"]
    assert block["runtimes"]["onnx"]["reason"] == "ValueError: no export"


def test_runtime_refusal_is_the_workers_own_check(bench: ModuleType, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    import breastscan.serving.store as store

    bare = tmp_path / "bare"
    bare.mkdir()
    monkeypatch.setattr(store, "newest_stored", lambda stage: {"tumor": SimpleNamespace(path=str(bare))})
    refusal = bench.runtime_refusal("onnx", ["tumor", "absent"], "production")
    assert refusal is not None and refusal.startswith("ValueError: runtime onnx: ")
    assert "carries no checked ONNX export" in refusal
    assert bench.runtime_refusal("keras", ["tumor"], "production") is None
    assert bench.runtime_refusal("onnx", ["absent"], "production") is None


def test_answer_differences_exact_or_within_a_tolerance(bench: ModuleType) -> None:
    service = b'{"model": "tumor", "probabilities": {"benign": 0.32113936, "malignant": 0.1794}}'
    close = b'{"model": "tumor", "probabilities": {"benign": 0.32113918, "malignant": 0.1794}}'
    (line,) = bench.answer_differences(close, service)
    assert line.startswith("probabilities: peer {'benign': 0.32113918")
    assert bench.answer_differences(close, service, tolerance=1e-4) == []
    far = b'{"model": "tumor", "probabilities": {"benign": 0.3215, "malignant": 0.1794}}'
    assert len(bench.answer_differences(far, service, tolerance=1e-4)) == 1
    swapped = b'{"model": "tumor", "probabilities": {"malignant": 0.1794, "benign": 0.32113936}}'
    assert bench.answer_differences(swapped, service)[0].startswith("probabilities:")  # nested order counts
    assert bench.answer_differences(b'{"model": "lesion"}', b'{"model": "tumor"}', tolerance=1.0) != []
