"""The service's request recorder: per-request statistics in a bounded local store, off the
request's path, and periodic drift scores of the latest window against each model's reference.

:meth:`Recorder.record` only puts the request's decoded image, answer and DICOM header bytes
on a bounded queue and returns at once: a full queue (by count, or by the bytes of the
images waiting) drops the request and counts it in :attr:`Recorder.dropped`; it never
blocks and never raises. One background thread computes :func:`breastscan.monitoring.drift.image_stats`
and :func:`breastscan.monitoring.drift.output_summary`, appends them to a SQLite file
(:class:`RecordStore`, at most ``max_records`` rows per model, oldest dropped -- several
workers can share the file) and every ``interval_s`` compares the latest ``window`` records
of each model that has a reference (:func:`breastscan.monitoring.drift.compare`), handing the
report to ``on_report`` (the service sets its Prometheus gauges there).
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from breastscan.imaging.preprocessing import is_dicom
from breastscan.monitoring.drift import (
    DICOM_HEAD_BYTES,
    DriftReport,
    Thresholds,
    compare,
    dicom_facts,
    image_stats,
    output_summary,
)

log = logging.getLogger(__name__)

BATCH = 64
"""Most queued requests written in one transaction."""
GATHER_S = 0.25
"""After the first queued request, the recorder waits this long for more before it works: it
wakes a few times a second, not once per request, and writes them in one transaction (a
flush or close cuts the wait short). Measured at one request at a time, a wake-up, a
transaction and a prune per request cost the service about a tenth of its throughput."""

ReportFn = Callable[[DriftReport, int], None]
"""``(report, requests of its model dropped so far)``: called on the recorder's thread after each scoring."""


class RecordStore:
    """A SQLite file of recorded statistics: one row per image and model, bounded per model.

    Args:
        path: the database file (its directory is created).
        timeout_s: how long a write waits for another process holding the file.
    """

    def __init__(self, path: str | Path, timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), timeout=timeout_s)
        self._db.execute("PRAGMA journal_mode=WAL")
        # A commit per answered request, each synced to disk, cost the service about a tenth
        # of its one-at-a-time throughput (py-spy, A/B with monitoring off). In WAL mode,
        # NORMAL syncs at checkpoints only: the database stays consistent, and a power cut
        # loses at most the last records -- statistics of a window, not clinical data.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS records (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                         "ts REAL NOT NULL, model TEXT NOT NULL, version TEXT, stats TEXT NOT NULL)")
        self._db.execute("CREATE INDEX IF NOT EXISTS records_model ON records (model, id)")
        self._db.commit()

    def append(self, rows: Sequence[tuple[str, str | None, float, Mapping[str, Any]]]) -> None:
        """Add ``(model, version, unix time, stats)`` rows in one transaction."""
        with self._db:
            self._db.executemany("INSERT INTO records (model, version, ts, stats) VALUES (?, ?, ?, ?)",
                                 [(m, v, ts, json.dumps(s)) for m, v, ts, s in rows])

    def prune(self, model: str, keep: int) -> int:
        """Delete all but the newest ``keep`` rows of ``model``; returns the rows deleted."""
        with self._db:
            cur = self._db.execute(
                "DELETE FROM records WHERE model = ? AND id < (SELECT id FROM records WHERE model = ? "
                "ORDER BY id DESC LIMIT 1 OFFSET ?)", (model, model, max(keep, 1) - 1))
        return int(cur.rowcount)

    def latest(self, model: str, n: int) -> list[dict[str, Any]]:
        """The newest ``n`` statistics of ``model``, oldest first."""
        rows = self._db.execute("SELECT stats FROM records WHERE model = ? ORDER BY id DESC LIMIT ?",
                                (model, int(n))).fetchall()
        return [json.loads(r[0]) for r in reversed(rows)]

    def count(self, model: str | None = None) -> int:
        """Rows of ``model`` (every model: ``None``)."""
        if model is None:
            return int(self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0])
        return int(self._db.execute("SELECT COUNT(*) FROM records WHERE model = ?", (model,)).fetchone()[0])

    def models(self) -> list[str]:
        """Models with at least one row, in name order."""
        return [r[0] for r in self._db.execute("SELECT DISTINCT model FROM records ORDER BY model")]

    def close(self) -> None:
        """Close the connection."""
        self._db.close()


@dataclass(frozen=True)
class _Request:
    """One answered request waiting to be summarised."""

    model: str
    version: str | None
    gray: np.ndarray
    output: dict[str, Any]
    modality: str
    dicom_head: bytes | None
    ts: float
    nbytes: int


class Recorder:
    """Records answered requests (see the module docstring).

    Args:
        store: the SQLite file.
        max_records: rows kept per model (oldest dropped).
        window: newest records compared with a reference.
        interval_s: seconds between scorings (<= 0: never, e.g. in tests).
        queue_size: requests waiting at most; beyond, new ones are dropped.
        max_pending_bytes: image bytes waiting at most; beyond, new requests are dropped.
        references: reference records by model (:func:`breastscan.monitoring.drift.reference_records`);
            models without one are recorded but not scored.
        thresholds: drift thresholds.
        on_report: called with each scoring's report (see :data:`ReportFn`).
    """

    def __init__(self, store: str | Path, *, max_records: int = 10000, window: int = 500,
                 interval_s: float = 60.0, queue_size: int = 1024, max_pending_bytes: int = 256 * 2**20,
                 references: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
                 thresholds: Thresholds | None = None, on_report: ReportFn | None = None) -> None:
        if max_records < 1 or window < 1 or queue_size < 1:
            raise ValueError("max_records, window and queue_size must be at least 1")
        self.store_path = Path(store)
        self.max_records, self.window, self.interval_s = int(max_records), int(window), float(interval_s)
        self.max_pending_bytes = int(max_pending_bytes)
        self.references = {k: list(v) for k, v in (references or {}).items()}
        self.thresholds = thresholds or Thresholds()
        self.on_report = on_report
        self.dropped = self.recorded = self.failed = 0
        self.dropped_by_model: dict[str, int] = {}
        self.drifting: dict[str, bool] = {}
        """Each scored model's latest verdict (a change is logged, a repeat is not)."""
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._urgent = threading.Event()  # a flush or close is queued: stop gathering
        self._lock = threading.Lock()
        self._pending = 0
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the request side
    def record(self, model: str, gray: np.ndarray, answer: Mapping[str, Any], *, modality: str,
               dicom: bytes | None = None, version: str | None = None) -> bool:
        """Queue one answered request; never blocks, never raises.

        Args:
            model: the served model's name.
            gray: the decoded image, ``(H, W)`` float32 in [0, 1] (kept by reference, not copied).
            answer: the answer (:meth:`breastscan.serving.requests.Prediction.to_dict`); only its
                :func:`breastscan.monitoring.drift.output_summary` is kept.
            modality: the model's modality (a DICOM header's Modality overrides it).
            dicom: the uploaded file's bytes, or ``None``; kept (its first
                :data:`DICOM_HEAD_BYTES`) only when it is DICOM, for the header.
            version: the model's registry version.

        Returns:
            ``True`` when queued, ``False`` when dropped (counted in :attr:`dropped`).
        """
        try:
            head = bytes(dicom[:DICOM_HEAD_BYTES]) if dicom and is_dicom(dicom) else None
            nbytes = int(getattr(gray, "nbytes", 0)) + len(head or b"")
            with self._lock:
                if self._pending + nbytes > self.max_pending_bytes:
                    self._drop(model)
                    return False
                self._queue.put_nowait(_Request(model, version, gray, output_summary(answer), modality, head,
                                                time.time(), nbytes))
                self._pending += nbytes
            return True
        except queue.Full:
            with self._lock:
                self._drop(model)
            return False
        except Exception:  # noqa: BLE001 -- monitoring must never fail a request
            log.exception("recording a %s request failed", model)
            return False

    def _drop(self, model: str) -> None:
        """Count a dropped request (the caller holds the lock)."""
        self.dropped += 1
        self.dropped_by_model[model] = self.dropped_by_model.get(model, 0) + 1

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Recorder:
        """Start the background thread (idempotent); returns ``self``."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="breastscan-recorder", daemon=True)
            self._thread.start()
            log.info("recording request statistics into %s (%d per model, scoring %s every %.0f s)",
                     self.store_path, self.max_records, ", ".join(sorted(self.references)) or "no model",
                     self.interval_s)
        return self

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything queued so far is stored (``False`` on timeout or when not started)."""
        if self._thread is None:
            return False
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout_s)
        except queue.Full:
            return False
        self._urgent.set()
        return done.wait(timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Store what is queued, then stop the thread."""
        if self._thread is None:
            return
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            log.warning("recorder queue still full after %.0f s: stopping without it", timeout_s)
        self._urgent.set()
        self._thread.join(timeout_s)
        self._thread = None

    # ------------------------------------------------------------------ the background thread
    def _loop(self) -> None:
        store = RecordStore(self.store_path)
        next_score = time.monotonic() + self.interval_s
        try:
            while True:
                wait = max(0.05, next_score - time.monotonic()) if self.interval_s > 0 else None
                items = self._take(wait)
                stop = any(i is None for i in items)
                self._store(store, [i for i in items if isinstance(i, _Request)])
                for item in items:
                    if isinstance(item, threading.Event):
                        item.set()
                if self.interval_s > 0 and time.monotonic() >= next_score:
                    self.score_all(store)
                    next_score = time.monotonic() + self.interval_s
                if stop:
                    return
        finally:
            store.close()

    def _take(self, wait: float | None) -> list[Any]:
        """The next queued items (up to :data:`BATCH`), waiting at most ``wait`` seconds for the
        first, then :data:`GATHER_S` for more (unless a flush or close is queued)."""
        try:
            items = [self._queue.get(timeout=wait)]
        except queue.Empty:
            return []
        if isinstance(items[0], _Request) and self._urgent.wait(GATHER_S):
            self._urgent.clear()
        while len(items) < BATCH:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _summarise(self, item: _Request) -> dict[str, Any]:
        modality, header = dicom_facts(item.dicom_head)
        stats = image_stats(item.gray, modality=modality or item.modality, dicom_header=header)
        stats.update(item.output)
        return stats

    def _store(self, store: RecordStore, items: list[_Request]) -> None:
        rows = []
        for item in items:
            try:
                rows.append((item.model, item.version, item.ts, self._summarise(item)))
            except Exception:  # noqa: BLE001 -- one odd image must not stop the recorder
                self.failed += 1
                log.exception("request statistics of %s failed", item.model)
        with self._lock:
            self._pending -= sum(i.nbytes for i in items)
        if not rows:
            return
        try:
            store.append(rows)
            for model in {r[0] for r in rows}:
                store.prune(model, self.max_records)
            self.recorded += len(rows)
        except sqlite3.Error:
            self.failed += len(rows)
            log.exception("writing %d records to %s failed", len(rows), self.store_path)

    def _log_verdict(self, model: str, report: DriftReport) -> None:
        """WARNING when a model starts drifting, INFO when it stops; a repeat at DEBUG only
        (scored every ``interval_s``, the log would otherwise repeat itself)."""
        changed = report.enough_data and self.drifting.get(model, False) != report.drift
        if report.enough_data:
            self.drifting[model] = report.drift
        level = (logging.WARNING if report.drift else logging.INFO) if changed else logging.DEBUG
        log.log(level, "drift %s", report.summary())

    def score_all(self, store: RecordStore) -> list[DriftReport]:
        """Compare each referenced model's latest window with its reference; report each."""
        reports = []
        for model, reference in sorted(self.references.items()):
            try:
                report = compare(reference, store.latest(model, self.window), self.thresholds, model=model)
            except Exception:  # noqa: BLE001
                log.exception("drift scoring of %s failed", model)
                continue
            reports.append(report)
            self._log_verdict(model, report)
            if self.on_report is not None:
                try:
                    self.on_report(report, self.dropped_by_model.get(model, 0))
                except Exception:  # noqa: BLE001
                    log.exception("publishing the drift of %s failed", model)
        return reports
