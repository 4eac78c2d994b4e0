"""Drift monitoring without labels (breastscan.monitoring): statistics, tests, recorder, report.

Phantoms are the reference; windows from the same generator must pass, windows shifted in
contrast or with added noise must be flagged. No TensorFlow: models are stand-ins.
"""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from breastscan.bundle import ModelContract, prepare_batch, read_reference, write_contract
from breastscan.cli import main as cli
from breastscan.data.phantoms import mammography_phantom
from breastscan.imaging.preprocessing import PreprocessSpec
from breastscan.monitoring.drift import (
    HIST_BINS,
    Thresholds,
    compare,
    dicom_facts,
    image_stats,
    model_reference,
    output_summary,
    reference_records,
)
from breastscan.monitoring.recorder import Recorder, RecordStore
from breastscan.serving.config import parse_monitoring
from breastscan.serving.engine import Engine, ServedModel
from breastscan.serving.request import ImageInput, predict_request
from tests.services import images

PATIENT = ("Doe", "Jane", "SECRET", "1234", "Patient")


def phantoms(seed: int, n: int) -> list[np.ndarray]:
    """``n`` mammography phantoms as ``(160, 128)`` float32 in [0, 1], drawn from ``[seed, i]``."""
    out = []
    for i in range(n):
        img, _ = mammography_phantom(np.random.default_rng([seed, i]), density=1 + i % 4,
                                     pathology=("benign", "malignant", "normal")[i % 3])
        out.append(img.astype(np.float32) / 255.0)
    return out


def stats(grays: list[np.ndarray]) -> list[dict[str, Any]]:
    return [image_stats(g, modality="mammography") for g in grays]


@pytest.fixture(scope="module")
def reference() -> list[dict[str, Any]]:
    return stats(phantoms(0, 150))


@pytest.fixture(scope="module")
def fresh() -> list[np.ndarray]:
    return phantoms(7, 60)


def contract(task: str = "classification", temperature: float = 1.0) -> ModelContract:
    spec = PreprocessSpec(height=32, width=32)
    classes = ("benign", "malignant", "normal") if task == "classification" else ()
    return ModelContract(name="tumor" if classes else "lesion", task=task,
                         label="pathology" if classes else "mask", classes=classes,
                         class_names=classes or ("lesion",), input_shape=(32, 32, 1), dataset="mammography",
                         modality="mammography", temperature=temperature, spec_id=spec.spec_id)


# --------------------------------------------------------------------------- statistics


def test_image_stats_ranges_and_shapes() -> None:
    gray = phantoms(1, 1)[0]
    s = image_stats(gray, modality=" Mammography ")
    assert len(s["hist"]) == HIST_BINS and abs(sum(s["hist"]) - 1.0) < 1e-4
    for key in ("mean", "std", "p05", "p50", "p95", "dark_fraction", "texture"):
        assert 0.0 <= s[key] <= 1.0, key
    assert s["p05"] <= s["p50"] <= s["p95"]
    assert (s["height"], s["width"], s["aspect"]) == (160, 128, 0.8)
    assert (s["modality"], s["manufacturer"], s["manufacturer_model"]) == (
        "mammography", "unknown", "unknown")
    big = image_stats(np.full((3000, 2000), 0.5, np.float32), modality="mammography")  # subsampled
    assert (big["height"], big["width"], big["mean"], big["texture"]) == (3000, 2000, 0.5, 0.0)
    with pytest.raises(ValueError):
        image_stats(np.zeros((4, 4, 3), np.float32), modality="mammography")


def test_stats_never_hold_patient_fields() -> None:
    raw = images.dicom(np.full((64, 48), 900, np.uint16), "MG")
    modality, header = dicom_facts(raw)
    assert modality == "mammography" and str(header.PatientID) == "SECRET-1234"
    header.Manufacturer, header.ManufacturerModelName = "ACME Imaging", "Senograph 9"
    s = image_stats(np.zeros((64, 48), np.float32), modality=modality, dicom_header=header)
    assert (s["manufacturer"], s["manufacturer_model"]) == ("ACME Imaging", "Senograph 9")
    mapping = {"PatientName": "Doe^Jane", "PatientID": "SECRET-1234", "Manufacturer": "ACME"}
    for found in (s, image_stats(np.zeros((8, 8), np.float32), modality="us", dicom_header=mapping)):
        text = json.dumps(found)
        assert not any(p in text for p in PATIENT), text
    assert dicom_facts(images.png(np.zeros((8, 8), np.uint8))) == (None, None)
    assert dicom_facts(raw[:200]) == (None, None)  # a header cut short: unknown, no error


def test_output_summary() -> None:
    assert output_summary({"predicted": "benign", "confidence": 0.9, "probabilities": {}}) == {
        "predicted": "benign", "confidence": 0.9, "lesion_fraction": None}
    assert output_summary({"lesion_fraction": 0.125, "mask_png": "..."})["lesion_fraction"] == 0.125


# --------------------------------------------------------------------------- tests


def test_new_phantoms_from_the_same_generator_are_not_flagged(reference: list, fresh: list) -> None:
    report = compare(reference, stats(fresh), model="tumor")
    assert report.enough_data and not report.drift, report.summary()
    assert report.drifted == []
    by_name = {f.feature: f for f in report.features}
    assert by_name["histogram"].test == "psi" and by_name["histogram"].statistic < 0.05
    assert by_name["mean"].test == "ks" and by_name["modality"].test == "chi2"


@pytest.mark.parametrize("shift", ["gamma", "scale"])
def test_a_contrast_shift_is_flagged(reference: list, fresh: list, shift: str) -> None:
    change = (lambda g: g ** 0.7) if shift == "gamma" else (lambda g: np.clip(g * 1.25, 0.0, 1.0))
    report = compare(reference, stats([change(g) for g in fresh]), model="tumor")
    assert report.drift, report.summary()
    assert {"mean", "std"} <= set(report.drifted)


def test_added_noise_is_flagged(reference: list, fresh: list) -> None:
    rng = np.random.default_rng(3)
    noisy = [np.clip(g + rng.normal(0.0, 0.06, g.shape), 0.0, 1.0).astype(np.float32) for g in fresh]
    report = compare(reference, stats(noisy), model="tumor")
    assert report.drift, report.summary()
    assert "texture" in report.drifted


def test_a_small_window_is_not_judged(reference: list, fresh: list) -> None:
    report = compare(reference, stats([g ** 0.5 for g in fresh[:10]]), Thresholds(min_records=30))
    assert not report.enough_data and not report.drift and report.drifted  # features drift, verdict waits
    assert "not judged" in report.summary()


def test_a_new_manufacturer_and_class_mix_are_categorical_drift(reference: list, fresh: list) -> None:
    window = [{**s, "manufacturer": "ACME"} for s in stats(fresh)]
    ref = [{**r, "predicted": "normal"} for r in reference]
    window = [{**w, "predicted": "malignant" if i % 2 else "normal"} for i, w in enumerate(window)]
    report = compare(ref, window)
    assert {"manufacturer", "predicted"} <= set(report.drifted) and report.drift
    assert {f.feature: f for f in report.features}["manufacturer"].score > 0.5  # Cramer's V


# --------------------------------------------------------------------------- the reference


class FakeBundle:
    """A stand-in for ModelBundle: real preprocessing, fixed logits (no Keras)."""

    def __init__(self, contract: ModelContract) -> None:
        self.contract, self.spec = contract, PreprocessSpec(height=32, width=32)

    def prepare(self, grays: list[np.ndarray]) -> tuple[np.ndarray, list]:
        return prepare_batch(self.spec, self.contract.input_shape, grays)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        if self.contract.task == "classification":
            return np.tile(np.array([[2.0, 0.0, 0.0]], np.float32), (len(batch), 1))
        out = np.full(batch.shape, -5.0, np.float32)
        out[:, 8:24, 8:24] = 5.0  # a lesion over a quarter of the input
        return out

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-logits))


def test_the_reference_holds_outputs_and_applies_the_served_temperature() -> None:
    grays = phantoms(2, 5)
    ref = model_reference(FakeBundle(contract()), grays, modality="mammography")  # type: ignore[arg-type]
    assert ref["n_images"] == 5 and ref["records"][0]["logits"] == [2.0, 0.0, 0.0]
    cold = reference_records(ref, contract(temperature=1.0))
    warm = reference_records(ref, contract(temperature=4.0))
    assert cold[0]["predicted"] == warm[0]["predicted"] == "benign" and "logits" not in cold[0]
    assert cold[0]["confidence"] > warm[0]["confidence"] > 1 / 3
    # the reference's predicted classes are called as the service calls them: by the decision rule
    # (logits 2, 0, 0: p(malignant) / (p(malignant) + p(benign)) = 1 / (1 + e^2) = 0.119)
    rule = {"rule": "positive_ratio", "positive": "malignant", "versus": "benign", "cutoff": 0.1}
    ruled = reference_records(ref, replace(contract(), decision=rule))
    assert ruled[0]["predicted"] == "malignant"
    assert ruled[0]["confidence"] == pytest.approx(1 / (np.exp(2.0) + 2.0), abs=1e-5)
    seg = model_reference(FakeBundle(contract("segmentation")), grays, modality="mammography")  # type: ignore[arg-type]
    fraction = seg["records"][0]["lesion_fraction"]
    assert 0.2 < fraction < 0.45  # a quarter of the input, letterboxed back to 160 x 128
    inputs_only = model_reference(None, grays, modality="mammography")
    assert "logits" not in inputs_only["records"][0]
    with pytest.raises(ValueError):
        reference_records({"format": 99, "records": []})


def test_a_bundle_without_a_reference_reads_none(tmp_path: Path) -> None:
    assert read_reference(tmp_path) is None
    (tmp_path / "reference.json").write_text(json.dumps({"format": 1, "records": []}))
    assert read_reference(tmp_path) == {"format": 1, "records": []}


# --------------------------------------------------------------------------- the recorder


def answer(i: int = 0) -> dict[str, Any]:
    return {"predicted": "benign", "confidence": round(0.5 + i / 1000, 6)}


def test_the_store_is_bounded_per_model_and_keeps_the_newest(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path / "r.sqlite", max_records=20, interval_s=0).start()
    gray = phantoms(3, 1)[0]
    try:
        for i in range(50):
            assert recorder.record("tumor", gray, answer(i), modality="mammography")
        recorder.record("density", gray, answer(), modality="mammography")
        assert recorder.flush()
    finally:
        recorder.close()
    store = RecordStore(tmp_path / "r.sqlite")
    assert store.count("tumor") == 20 and store.count("density") == 1
    assert store.models() == ["density", "tumor"]
    assert [r["confidence"] for r in store.latest("tumor", 3)] == [0.547, 0.548, 0.549]
    store.close()
    assert recorder.recorded == 51 and recorder.dropped == 0


def test_a_full_queue_drops_and_counts_without_blocking(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path / "r.sqlite", queue_size=2, interval_s=0)  # not started: nothing drains
    gray = np.zeros((160, 128), np.float32)
    started = time.perf_counter()
    queued = [recorder.record("tumor", gray, answer(), modality="mammography") for _ in range(200)]
    assert time.perf_counter() - started < 0.5
    assert sum(queued) == 2 and recorder.dropped == 198 and recorder.dropped_by_model == {"tumor": 198}
    small = Recorder(tmp_path / "s.sqlite", max_pending_bytes=gray.nbytes * 3, interval_s=0)
    assert sum(small.record("lesion", gray, answer(), modality="ultrasound") for _ in range(10)) == 3
    assert small.dropped == 7
    recorder.start()
    assert recorder.flush()
    recorder.close()
    assert RecordStore(tmp_path / "r.sqlite").count() == 2


def test_recorded_dicom_requests_keep_the_scanner_not_the_patient(tmp_path: Path) -> None:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(images.dicom(np.full((64, 48), 700, np.uint16))))
    ds.Manufacturer = "ACME Imaging"
    buf = io.BytesIO()
    ds.save_as(buf)
    recorder = Recorder(tmp_path / "r.sqlite", interval_s=0).start()
    recorder.record("tumor", np.zeros((64, 48), np.float32), answer(), modality="mammography",
                    dicom=buf.getvalue())
    assert recorder.flush()
    recorder.close()
    row = RecordStore(tmp_path / "r.sqlite").latest("tumor", 1)[0]
    assert row["manufacturer"] == "ACME Imaging" and row["modality"] == "mammography"
    raw = (tmp_path / "r.sqlite").read_bytes() + json.dumps(row).encode()
    assert not any(p.encode() in raw for p in PATIENT)


def test_scoring_reports_each_referenced_model(tmp_path: Path, reference: list, fresh: list) -> None:
    reports: list[Any] = []
    recorder = Recorder(tmp_path / "r.sqlite", window=60, interval_s=0, references={"tumor": reference},
                        on_report=lambda r, dropped: reports.append((r, dropped))).start()
    for g in fresh:
        recorder.record("tumor", g ** 0.6, answer(), modality="mammography")
    assert recorder.flush()
    recorder.close()
    store = RecordStore(tmp_path / "r.sqlite")
    found = recorder.score_all(store)
    store.close()
    assert len(found) == 1 and found[0].drift and found[0].n_window == 60
    assert reports and reports[-1][1] == 0


def test_the_engine_records_answered_requests(tmp_path: Path) -> None:
    spec = PreprocessSpec(height=32, width=32)
    served = {"tumor": ServedModel(name="tumor", spec=spec, contract=contract(), version="3")}

    async def infer(name: str, batch: np.ndarray) -> np.ndarray:
        return np.tile(np.array([[0.7, 0.2, 0.1]], np.float32), (len(batch), 1))

    async def explain(name: str, batch: np.ndarray, classes: list[int]) -> np.ndarray:
        raise AssertionError("not asked")

    recorder = Recorder(tmp_path / "r.sqlite", interval_s=0).start()
    engine = Engine(served, infer, explain, max_upload_bytes=2**20, recorder=recorder)
    request = predict_request("tumor", ImageInput(data=images.png(images.mammogram(1))))
    result = asyncio.run(engine.predict(request))
    assert result.predicted == "benign"
    assert recorder.flush()
    recorder.close()
    with sqlite3.connect(tmp_path / "r.sqlite") as db:
        (version, stats_json), = db.execute("SELECT version, stats FROM records").fetchall()
    row = json.loads(stats_json)
    assert version == "3" and (row["height"], row["width"], row["predicted"]) == (160, 128, "benign")
    assert row["confidence"] == pytest.approx(0.7)


# --------------------------------------------------------------------------- config and CLI


def test_the_monitoring_config() -> None:
    cfg = parse_monitoring({})
    assert cfg.enabled and cfg.window == 500 and cfg.thresholds == Thresholds()
    cfg = parse_monitoring({"window": 50, "thresholds": {"psi": 0.1, "min_drifted": 3}},
                           {"BREASTSCAN_MONITORING_STORE": "/tmp/x.sqlite"})
    assert (cfg.window, cfg.store) == (50, "/tmp/x.sqlite")
    assert (cfg.thresholds.psi, cfg.thresholds.min_drifted) == (0.1, 3)
    for bad in ({"windw": 3}, {"thresholds": {"alpha": 0.1}}, {"enabled": "yes"}, {"window": 0},
                {"thresholds": {"ks_alpha": 2}}):
        with pytest.raises(ValueError):
            parse_monitoring(bad)


def test_the_monitor_command_writes_its_report(tmp_path: Path, reference: list, fresh: list) -> None:
    bundle = tmp_path / "bundle"
    write_contract(contract(), bundle)
    (bundle / "reference.json").write_text(json.dumps({"format": 1, "records": reference}))
    store = RecordStore(tmp_path / "requests.sqlite")
    store.append([("tumor", "1", 0.0, {**s, **answer()}) for s in stats([g ** 0.7 for g in fresh])])
    store.close()
    out = tmp_path / "report"
    args = ["monitor", "--model", "tumor", "--bundle", str(bundle),
            "--store", str(tmp_path / "requests.sqlite"), "--window", "60", "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "drift.json").read_text())
    assert report["drift"] is True and report["n_window"] == 60 and report["n_reference"] == 150
    assert report["features"]["mean"]["test"] == "ks" and report["features"]["mean"]["drift"] is True
    assert report["features"]["histogram"]["test"] == "psi"
    assert "| mean | ks |" in (out / "drift.md").read_text()
    for name in ("drift_histogram.png", "drift_scalars.png", "drift_categories.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    missing = CliRunner().invoke(cli, [*args[:-2], "--out", str(tmp_path / "o2"), "--store",
                                       str(tmp_path / "none.sqlite")])
    assert missing.exit_code == 1 and "no record store" in missing.output


def test_a_verdict_is_logged_when_it_changes_not_at_every_scoring(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    from types import SimpleNamespace

    recorder = Recorder(tmp_path / "store.sqlite", interval_s=0)

    def verdict(drift: bool, enough: bool = True) -> Any:
        return SimpleNamespace(drift=drift, enough_data=enough, summary=lambda: f"m: drift={drift}")

    caplog.set_level("DEBUG", logger="breastscan.monitoring.recorder")
    for report in (verdict(False), verdict(True), verdict(True), verdict(True, enough=False),
                   verdict(True), verdict(False), verdict(False)):
        recorder._log_verdict("m", report)
    levels = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [lv for lv, _ in levels] == ["DEBUG", "WARNING", "DEBUG", "DEBUG", "DEBUG", "INFO", "DEBUG"]
    assert levels[1][1] == "drift m: drift=True" and recorder.drifting == {"m": False}
