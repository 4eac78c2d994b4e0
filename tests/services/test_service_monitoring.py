"""Drift monitoring of the real service: the served models carry a reference of phantoms
(``tests.services.make_registry``); the session's service records every answered image into
its store and scores each model's latest window every second (tests/services/conftest.py).

A window of fresh phantoms leaves ``breastscan_drift_detected`` at 0; a window of the same
phantoms shifted in contrast (gamma) with Gaussian noise sets it to 1 and raises the scores;
``breastscan monitor`` over that store and the served bundle reports the same drift; a DICOM
upload leaves its scanner in the store and none of its patient fields.
"""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.services import images
from tests.services.conftest import BIN, MONITORING_INTERVAL_S, MONITORING_WINDOW, REPO, Served
from tests.services.make_registry import REFERENCE_SEEDS

pytestmark = [pytest.mark.slow, pytest.mark.service]

MODEL = "density"                      # mammography classifier: input and output statistics
WINDOW = MONITORING_WINDOW             # one window of requests per phase
INTERVAL_S = MONITORING_INTERVAL_S
FRESH_SEEDS = range(0, WINDOW)
SHIFTED_SEEDS = range(WINDOW, 2 * WINDOW)
PATIENT = {"PatientName": "Quimby^Henrietta", "PatientID": "SECRET-90817", "PatientBirthDate": "19610523",
           "PatientAddress": "12 Quietlane Road", "OtherPatientIDs": "MRN-778899",
           "AccessionNumber": "ACC-445566", "ReferringPhysicianName": "Welbyson^Marcus"}
SCANNER = {"Manufacturer": "ACME Imaging", "ManufacturerModelName": "Senograph 9"}
LEAKS = ("Quimby", "Henrietta", "SECRET-90817", "19610523", "Quietlane", "MRN-778899", "ACC-445566",
         "Welbyson", "Marcus")


@dataclass(frozen=True)
class Monitored:
    """The monitoring service, its record store, config and environment."""

    served: Served
    store: Path
    config: Path
    env: dict[str, str]


@dataclass(frozen=True)
class Drift:
    """One model's drift gauges in /metrics: ``detected`` and the score of each feature."""

    detected: float | None
    scores: dict[str, float]
    lines: tuple[str, ...] = ()
    """The drift lines of /metrics, for failure messages."""


@dataclass(frozen=True)
class Windows:
    """The gauges after a window of fresh phantoms, then after a window of shifted ones."""

    fresh: Drift
    shifted: Drift


@pytest.fixture(scope="module")
def monitored(service: Served, served_project: tuple[Path, dict[str, str]]) -> Monitored:
    """The session's service: its store holds every request of the session; a window of
    :data:`WINDOW` requests to one model is that model's latest records alone."""
    root, env = served_project
    return Monitored(service, Path(env["BREASTSCAN_MONITORING_STORE"]), root / "serving-main.yaml", env)


# --------------------------------------------------------------------------- helpers


def fresh_png(seed: int) -> bytes:
    return images.png(images.mammogram(seed))


def shifted_png(seed: int) -> bytes:
    """The phantom of ``seed`` brighter (gamma 0.6) with Gaussian noise (sigma 0.05)."""
    gray = images.mammogram(seed).astype(np.float32) / 255.0
    noise = np.random.default_rng(seed).normal(0.0, 0.05, gray.shape)
    return images.png(np.clip(np.rint(255.0 * (gray ** 0.6 + noise)), 0, 255).astype(np.uint8))


def post(served: Served, model: str, data: bytes) -> dict[str, Any]:
    r = httpx.post(f"{served.http_url}/{model}", files={"image": ("image", data)}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def wait_until(check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def stored(store: Path, model: str) -> list[dict[str, Any]]:
    """Every recorded statistic of ``model``, oldest first (none before the table exists)."""
    with closing(sqlite3.connect(store)) as db:
        try:
            rows = db.execute("SELECT stats FROM records WHERE model = ? ORDER BY id", (model,)).fetchall()
        except sqlite3.OperationalError:
            return []
    return [json.loads(r[0]) for r in rows]


def drift_gauges(served: Served, model: str) -> Drift:
    text = httpx.get(f"{served.http_url}/metrics", timeout=10).text
    detected, scores = None, {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            if sample.name == "breastscan_drift_detected":
                detected = sample.value
            elif sample.name == "breastscan_drift_score":
                scores[sample.labels["feature"]] = sample.value
    return Drift(detected, scores, tuple(line for line in text.splitlines() if "breastscan_drift" in line))


def send_window(monitored: Monitored, payloads: list[bytes]) -> Drift:
    """Send ``payloads`` to :data:`MODEL`; the gauges once they were scored over them."""
    before = len(stored(monitored.store, MODEL))
    for data in payloads:
        post(monitored.served, MODEL, data)
    wait_until(lambda: len(stored(monitored.store, MODEL)) >= before + len(payloads))
    time.sleep(2.5 * INTERVAL_S)  # at least one full scoring over the stored window
    return drift_gauges(monitored.served, MODEL)


@pytest.fixture(scope="module")
def windows(monitored: Monitored) -> Windows:
    assert not set(REFERENCE_SEEDS) & {*FRESH_SEEDS, *SHIFTED_SEEDS}  # new images, same generator
    fresh = send_window(monitored, [fresh_png(s) for s in FRESH_SEEDS])
    shifted = send_window(monitored, [shifted_png(s) for s in SHIFTED_SEEDS])
    return Windows(fresh, shifted)


def patient_dicom() -> bytes:
    """A mammography DICOM carrying :data:`PATIENT` fields and the :data:`SCANNER`."""
    ds = pydicom.dcmread(io.BytesIO(images.dicom(images.mammogram(90).astype(np.uint16) * 16, "MG")))
    for keyword, value in {**PATIENT, **SCANNER}.items():
        setattr(ds, keyword, value)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def store_dump(store: Path) -> str:
    """Every row of every table of the store, and the raw bytes of its files, as text."""
    with closing(sqlite3.connect(store)) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        rows = [repr(db.execute(f'SELECT * FROM "{t}"').fetchall()) for t in tables]
    files = [p.read_bytes().decode("latin-1") for p in store.parent.glob(f"{store.name}*")]
    return "\n".join([*tables, *rows, *files])


# --------------------------------------------------------------------------- tests


def test_fresh_phantoms_pass_and_shifted_ones_raise_the_drift_gauges(windows: Windows) -> None:
    fresh, shifted = windows.fresh, windows.shifted
    assert fresh.detected == 0.0, fresh
    assert shifted.detected == 1.0, shifted
    assert fresh.scores["histogram"] < 0.2 <= shifted.scores["histogram"], (fresh, shifted)
    for feature in ("mean", "p95", "texture"):  # KS D of brightness and noise
        assert shifted.scores[feature] > fresh.scores[feature] + 0.3, (feature, fresh, shifted)
    assert max(shifted.scores.values()) > max(fresh.scores.values())


def test_a_dicom_records_its_scanner_and_no_patient_field(monitored: Monitored) -> None:
    post(monitored.served, "tumor", patient_dicom())

    def scanner_rows() -> list[dict[str, Any]]:
        return [r for r in stored(monitored.store, "tumor") if r["manufacturer"] == SCANNER["Manufacturer"]]

    wait_until(lambda: bool(scanner_rows()))
    row = scanner_rows()[-1]
    assert (row["manufacturer_model"], row["modality"]) == (SCANNER["ManufacturerModelName"], "mammography")
    dump = store_dump(monitored.store)
    assert SCANNER["Manufacturer"] in dump  # the dump sees what was stored ...
    assert not [leak for leak in LEAKS if leak in dump]  # ... and no patient field


def test_the_monitor_command_reports_the_shifted_window(windows: Windows, monitored: Monitored,
                                                        tmp_path: Path) -> None:
    out = tmp_path / "report"
    cmd = [str(BIN / "breastscan"), "monitor", "--model", MODEL, "--store", str(monitored.store),
           "--serving-config", str(monitored.config), "--out", str(out)]  # the bundle: BentoML's newest
    done = subprocess.run(cmd, cwd=REPO, env=monitored.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "drift.json").read_text())
    assert report["drift"] is True and report["enough_data"] is True
    assert (report["n_window"], report["n_reference"]) == (WINDOW, len(REFERENCE_SEEDS))
    assert {"histogram", "mean", "texture"} <= set(report["drifted"])
    scores = {name: f["score"] for name, f in report["features"].items()}
    assert scores == pytest.approx(windows.shifted.scores)  # the service scored the same window
    assert "DRIFT" in (out / "drift.md").read_text()
    for name in report["plots"].values():
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
