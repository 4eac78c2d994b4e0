"""Batch inference: a folder, a manifest or a DICOM tree through one registered model, in process.

The in-process counterpart of the service (``breastscan predict``): every image goes through
:meth:`breastscan.serving.engine.Engine.predict` -- the service's decoding, input checks,
preprocessing and calibrated answer -- so a batch answer equals the service's answer for the
same file. Images are submitted ``batch_size`` at a time and the engine's
:class:`breastscan.serving.batching.Batcher` merges them into model batches; no server runs.

What is read (:func:`find_inputs`): a folder of images (PNG, JPEG, PGM, TIFF, BMP, DICOM,
searched recursively; a file without a known extension is taken when it has the DICOM
preamble, as in a study/series tree), a manifest CSV (its ``image`` -- or ``path`` -- column,
relative to the CSV's folder as :func:`breastscan.data.manifest.resolve` reads it), or a
folder holding ``manifest.csv`` (the images it lists, not the masks beside them).

What is written to ``OUT`` (:class:`ResultWriter`), appended and flushed after every batch:

* ``predictions.csv``: one row per image -- path, model, version, stage, status (``ok`` or
  the refusal's code), size, then ``predicted`` (the class the model's decision rule calls, as
  the service answers), ``confidence`` and ``p_<class>`` (classifiers)
  and/or ``lesion_area_px``, ``lesion_fraction``, ``bbox`` (segmenters; a multi-task model
  has both);
* ``predictions.jsonl``: the engine's full answer per image (or its refusal, ``"error"`` and
  ``"code"`` as the service answers it), one JSON a line;
* ``errors.csv``: path, code, message of each refused image.

Runs resume: the paths ``predictions.csv`` already holds for the same model version are
skipped (:func:`load_done`), so an interrupted run loses at most the batch in flight and the
same command continues it.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

import pandas as pd

from breastscan.data.manifest import MANIFEST_NAME
from breastscan.data.manifest import resolve as resolve_manifest_path
from breastscan.imaging.preprocessing import is_dicom
from breastscan.serving import answer as answers
from breastscan.serving.answer import (
    ApiError,
    Prediction,
    error_dict,
    has_classes,
    has_mask,
    mask_of,
    to_dict,
)
from breastscan.serving.engine import Engine, ServedModel, local_engine
from breastscan.serving.request import ImageInput, predict_request

if TYPE_CHECKING:
    from breastscan.bundle import ModelBundle

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".pgm", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"})
"""Extensions taken as images; any other file is taken only when it has the DICOM preamble."""
PREDICTIONS_CSV = "predictions.csv"
PREDICTIONS_JSONL = "predictions.jsonl"
ERRORS_CSV = "errors.csv"
ERROR_COLUMNS = ("path", "code", "message")
OK = "ok"
"""The status of an image the model answered."""
FILE_ERROR_CODES: dict[str, str] = {
    "missing": "the file a manifest row names does not exist",
    "unreadable": "the file cannot be read (permissions, I/O error, a folder)",
}
"""Codes of files that never reached the engine (the others are the engine's InputError codes)."""
NEVER_SHED_MS = 24 * 3600 * 1000
"""A batch run waits for the model as long as it takes: requests are never shed as overloaded."""

DicomHook = Callable[["InputFile", bytes, Prediction], list[Path]]
"""``(input, its DICOM bytes, the answer) -> files written``: DICOM results (SEG/SR) of one image."""


class BatchError(Exception):
    """An input or output the run cannot use (named in the message)."""


@dataclass(frozen=True)
class InputFile:
    """One image to predict.

    Attributes:
        key: the path reported in the results: relative to INPUT (a folder), or as the
            manifest writes it.
        path: where the file is.
    """

    key: str
    path: Path


@dataclass(frozen=True)
class LoadedModel:
    """A registered model version loaded for inference.

    Attributes:
        name: the served name (``tumor``).
        bundle: the Keras model with its spec and contract.
        version: the registry version it resolved to.
        stage: the stage (alias) asked for, ``None`` for a pinned version.
    """

    name: str
    bundle: ModelBundle
    version: str
    stage: str | None


@dataclass(frozen=True)
class Outcome:
    """What one image got: an answer (``status == "ok"``) or a refusal's code and message."""

    item: InputFile
    status: str
    answer: Prediction | None = None
    message: str = ""
    dicom: bytes | None = None


@dataclass(frozen=True)
class BatchSummary:
    """What a run did.

    Attributes:
        total: images in INPUT (after ``limit``).
        skipped: of those, already in OUT for this model version (not run again).
        ok: answered now.
        refused: refused now, by code.
        seconds: wall time of the predictions made now.
        out: the output folder.
        dicom_files: DICOM result files written now.
    """

    total: int
    skipped: int
    ok: int
    refused: dict[str, int]
    seconds: float
    out: Path
    dicom_files: int = 0

    @property
    def done(self) -> int:
        """Images run now."""
        return self.ok + sum(self.refused.values())

    @property
    def images_per_s(self) -> float:
        """Throughput of this run (0 when nothing ran)."""
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """One line for the log: counts, refusals by code, throughput."""
        refused = ", ".join(f"{code} {n}" for code, n in sorted(self.refused.items()))
        refused_text = f" ({refused})" if refused else ""
        return (f"{self.ok} ok, {sum(self.refused.values())} refused{refused_text}, {self.skipped} "
                f"already done, of {self.total}; {self.done} in {self.seconds:.1f} s "
                f"({self.images_per_s:.1f} images/s)")


# --------------------------------------------------------------------------- the model


def load_model(ref: str, runtime: str = "auto") -> LoadedModel:
    """Resolve ``NAME[@STAGE|/VERSION]`` in the configured registry and load that version.

    Args:
        ref: the model reference.
        runtime: ``auto`` (its checked export when it has one, else Keras), ``onnx`` or ``keras``
            (:meth:`breastscan.bundle.ModelBundle.load`).

    Raises:
        ValueError: a malformed reference, or ``onnx`` for a version without an export.
        breastscan.registry.resolver.RegistryError: no such model, stage or version.
    """
    from breastscan.registry import resolver

    parsed = resolver.parse_model_ref(ref)
    fetched, bundle = resolver.fetch_and_load(parsed, runtime=runtime)  # by version: an alias may move
    assert fetched is not None
    return LoadedModel(name=parsed.name, bundle=bundle, version=str(fetched.resolved.version),
                       stage=parsed.alias)


def batch_engine(model: LoadedModel, batch_size: int) -> Engine:
    """The service's engine around one loaded model, batching up to ``batch_size`` images a call."""
    from breastscan.serving.config import Batching

    settings = Batching(enabled=True, max_batch_size=batch_size, max_latency_ms=NEVER_SHED_MS)
    return local_engine({model.name: model.bundle}, versions={model.name: model.version},
                        stages={model.name: model.stage} if model.stage else None, batching=settings)


# --------------------------------------------------------------------------- the inputs


def find_inputs(source: Path, *, exclude: Path | None = None) -> list[InputFile]:
    """The images of INPUT: a folder (recursive), a manifest CSV, a folder with ``manifest.csv``.

    Args:
        source: the folder, CSV or single image.
        exclude: a folder whose files are never inputs (the output folder).

    Raises:
        BatchError: ``source`` does not exist, or a manifest has no image column.
    """
    if source.is_file():
        if source.suffix.lower() == ".csv":
            return manifest_inputs(source)
        return [InputFile(key=source.name, path=source)]
    if not source.is_dir():
        raise BatchError(f"{source} is neither a folder nor a file")
    if (source / MANIFEST_NAME).is_file():
        log.info("%s holds %s: predicting the images it lists", source, MANIFEST_NAME)
        return manifest_inputs(source / MANIFEST_NAME)
    return folder_inputs(source, exclude=exclude)


def manifest_inputs(csv_path: Path) -> list[InputFile]:
    """The images a manifest lists (``image`` column, else ``path``), each once, in file order.

    Raises:
        BatchError: the CSV has neither column.
    """
    df = pd.read_csv(csv_path, dtype=str, keep_default_na=False, na_values=[""])
    column = next((c for c in ("image", "path") if c in df.columns), None)
    if column is None:
        raise BatchError(f"{csv_path} has no 'image' (or 'path') column; columns: {', '.join(df.columns)}")
    keys = dict.fromkeys(str(v).strip() for v in df[column].dropna())
    return [InputFile(key=k, path=resolve_manifest_path(csv_path.parent, k)) for k in keys if k]


def folder_inputs(root: Path, *, exclude: Path | None = None) -> list[InputFile]:
    """Image files under ``root`` in path order, hidden files and ``exclude`` left out."""
    skip = exclude.resolve() if exclude is not None else None
    found = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if skip is not None and path.resolve().is_relative_to(skip):
            continue
        if is_image_file(path):
            found.append(InputFile(key=rel.as_posix(), path=path))
    return found


def is_image_file(path: Path) -> bool:
    """An image extension, or (any other name, e.g. a series' ``IM0001``) the DICOM preamble."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    if path.name.upper() == "DICOMDIR":  # the media directory, not an image
        return False
    try:
        with path.open("rb") as fh:
            return is_dicom(fh.read(132))
    except OSError:
        return False


# --------------------------------------------------------------------------- the results


def csv_columns(served: ServedModel) -> list[str]:
    """Columns of ``predictions.csv`` for a model: the path, the answer's CSV fields
    (:func:`breastscan.serving.answer.csv_columns`) with the status after the model's version and stage."""
    fields = answers.csv_columns(served.contract.task, served.contract.class_names)
    return ["path", *fields[:3], "status", *fields[3:]]


def csv_row(outcome: Outcome, served: ServedModel) -> dict[str, Any]:
    """The ``predictions.csv`` row of one image (empty measures for a refused one)."""
    row: dict[str, Any] = {"path": outcome.item.key, "model": served.contract.name,
                           "version": served.version or "", "stage": served.stage or "",
                           "status": outcome.status}
    if outcome.answer is not None:
        row.update(answers.csv_row(outcome.answer))
    return row


def json_line(outcome: Outcome, served: ServedModel) -> dict[str, Any]:
    """The ``predictions.jsonl`` record of one image: the answer, or the error with the model."""
    head = {"path": outcome.item.key, "status": outcome.status}
    if outcome.answer is not None:
        return head | to_dict(outcome.answer)
    return head | {"model": served.contract.name, "version": served.version, "stage": served.stage,
                   **error_dict(outcome.status, outcome.message)}


class ResultWriter:
    """Appends results to ``OUT``'s three files and flushes them to disk after each batch.

    ``predictions.csv`` is written last: a row there means the image is done (see
    :func:`load_done`, which also drops what a crash left half-written in the other two).
    """

    def __init__(self, out: Path, served: ServedModel) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.served = served
        self._jsonl = (out / PREDICTIONS_JSONL).open("a", encoding="utf-8")
        self._errors, self._errors_csv = _csv_appender(out / ERRORS_CSV, ERROR_COLUMNS)
        self._preds, self._preds_csv = _csv_appender(out / PREDICTIONS_CSV, csv_columns(served))

    def write(self, outcomes: Sequence[Outcome]) -> None:
        """Append one batch's results and flush them (``fsync``)."""
        for o in outcomes:
            self._jsonl.write(json.dumps(json_line(o, self.served), allow_nan=False) + "\n")
            if o.status != OK:
                self._errors_csv.writerow({"path": o.item.key, "code": o.status, "message": o.message})
        _sync(self._jsonl, self._errors)
        self._preds_csv.writerows(csv_row(o, self.served) for o in outcomes)
        _sync(self._preds)

    def close(self) -> None:
        """Close the files."""
        for fh in (self._jsonl, self._errors, self._preds):
            fh.close()

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _csv_appender(path: Path, columns: Sequence[str]) -> tuple[IO[str], csv.DictWriter[str]]:
    """An append handle on a CSV file and its writer, the header written when the file is new
    (a file written with the same columns in another order keeps its order)."""
    header: list[str] = []
    if path.is_file() and path.stat().st_size:
        with path.open(newline="", encoding="utf-8") as existing:
            header = next(csv.reader(existing), [])
    fh = path.open("a", newline="", encoding="utf-8")
    fields = header if sorted(header) == sorted(columns) else list(columns)
    writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="raise")
    if fh.tell() == 0:
        writer.writeheader()
    return fh, writer


def _sync(*handles: IO[str]) -> None:
    for fh in handles:
        fh.flush()
        os.fsync(fh.fileno())


def load_done(out: Path, served: ServedModel) -> set[str]:
    """The paths ``OUT`` already holds results for, from an earlier run of the same model version.

    Also repairs what an interrupted run may have left: a half-written last line of
    ``predictions.csv`` is cut, and lines of ``predictions.jsonl`` / ``errors.csv`` for paths
    the CSV does not hold (or holds already) are dropped.

    Raises:
        BatchError: ``OUT`` holds results of another model or version (use another folder).
    """
    path = out / PREDICTIONS_CSV
    if not path.is_file():
        for name in (PREDICTIONS_JSONL, ERRORS_CSV):
            (out / name).unlink(missing_ok=True)  # left by a run interrupted before its first batch
        return set()
    _cut_partial_line(path)
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        header = list(reader.fieldnames or [])
    theirs = {(r["model"], r["version"]) for r in rows}
    mine = (served.contract.name, served.version or "")
    if (header and header != csv_columns(served)) or theirs - {mine}:
        found = ", ".join(sorted(f"{m} v{v}" for m, v in theirs)) or "other columns"
        raise BatchError(f"{out} holds predictions of {found}, not of {mine[0]} v{mine[1]}: "
                         "give another --out (or remove those files)")
    done = {r["path"] for r in rows}
    _keep_jsonl(out / PREDICTIONS_JSONL, done)
    _keep_errors(out / ERRORS_CSV, done)
    return done


def _cut_partial_line(path: Path) -> None:
    """Cut a file after its last newline (what a crash mid-write leaves)."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def _keep_jsonl(path: Path, done: set[str]) -> None:
    """Keep the first complete line of each done path in a JSON-lines file."""
    if not path.is_file():
        return
    kept, seen = [], set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            key = json.loads(line)["path"]
        except (ValueError, KeyError, TypeError):
            continue
        if key in done and key not in seen:
            seen.add(key)
            kept.append(line + "\n")
    _rewrite(path, "".join(kept))


def _keep_errors(path: Path, done: set[str]) -> None:
    """Keep the first row of each done path in ``errors.csv``."""
    if not path.is_file():
        return
    _cut_partial_line(path)
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    first = {r["path"]: r for r in reversed(rows) if r.get("path") in done}
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(ERROR_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(r for r in rows if first.get(r["path"]) is r)
    _rewrite(path, text.getvalue())


def _rewrite(path: Path, text: str) -> None:
    """Replace a file's text atomically (an unchanged file is not touched)."""
    data = text.encode("utf-8")
    if path.read_bytes() == data:
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the run


async def predict_one(engine: Engine, model: str, item: InputFile, *, keep_dicom: bool = False) -> Outcome:
    """Read one file and ask the engine, as the service would answer an upload of it.

    Returns:
        The answer, or the refusal: an error code (:data:`breastscan.serving.answer.ERRORS`),
        ``missing`` or ``unreadable``.
    """
    try:
        data = await asyncio.to_thread(item.path.read_bytes)
    except FileNotFoundError:
        return Outcome(item, "missing", message=f"no such file: {item.path}")
    except OSError as exc:
        return Outcome(item, "unreadable", message=f"{exc.strerror or exc}: {item.path}")
    try:
        answer = await engine.predict(predict_request(model, ImageInput(data=data)))
    except ApiError as exc:
        return Outcome(item, exc.code, message=exc.message)
    return Outcome(item, OK, answer=answer, dicom=data if keep_dicom and is_dicom(data) else None)


async def _run_batches(engine: Engine, model: str, todo: Sequence[InputFile], writer: ResultWriter,
                       batch_size: int, progress: Any, dicom: DicomHook | None) -> tuple[Counter[str], int]:
    """Predict ``todo`` in batches, writing each batch before the next starts."""
    counts: Counter[str] = Counter()
    dicom_files = 0
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        outcomes = await asyncio.gather(
            *(predict_one(engine, model, item, keep_dicom=dicom is not None) for item in chunk))
        if dicom is not None:  # before the rows: a row in predictions.csv means all is written
            dicom_files += await asyncio.to_thread(_write_dicom, dicom, outcomes)
        writer.write(outcomes)
        counts.update(o.status for o in outcomes)
        progress.update(len(chunk))
    return counts, dicom_files


def _write_dicom(hook: DicomHook, outcomes: Iterable[Outcome]) -> int:
    written = 0
    for o in outcomes:
        if o.dicom is not None and o.answer is not None:
            written += len(hook(o.item, o.dicom, o.answer))
    return written


def predict_files(engine: Engine, model: str, inputs: Sequence[InputFile], out: Path, *,
                  batch_size: int = 32, limit: int | None = None, progress: bool = True,
                  dicom: DicomHook | None = None) -> BatchSummary:
    """Predict every input not yet in ``out`` and append the results there, batch by batch.

    Args:
        engine: the engine serving ``model`` (see :func:`batch_engine`).
        model: the served name to ask.
        inputs: the images (:func:`find_inputs`).
        out: the output folder (created).
        batch_size: images submitted together (and written together).
        limit: only the first ``limit`` inputs.
        progress: show a progress bar (tqdm, on stderr).
        dicom: writes DICOM results of each answered DICOM input (see :data:`DicomHook`).

    Returns:
        The :class:`BatchSummary` (also logged).

    Raises:
        BatchError: ``out`` holds results of another model version.
        KeyboardInterrupt: the run was interrupted; finished batches are kept for a rerun.
    """
    from tqdm import tqdm

    served = engine.select(model)
    if has_classes(served.contract.task) and not served.contract.rule.is_argmax:
        log.info("%s v%s: `predicted` follows its decision rule: %s", served.contract.name, served.version,
                 served.contract.rule.describe())
    out.mkdir(parents=True, exist_ok=True)
    chosen = list(inputs)[:limit] if limit is not None else list(inputs)
    done = load_done(out, served)
    todo = [item for item in chosen if item.key not in done]
    skipped = len(chosen) - len(todo)
    if skipped:
        log.info("%s: %d of %d images already done by %s v%s, skipped", out, skipped, len(chosen),
                 served.contract.name, served.version)
    started = time.perf_counter()
    with ResultWriter(out, served) as writer, tqdm(total=len(chosen), initial=skipped, unit="img",
                                                    disable=not progress, desc=served.name) as bar:
        counts, dicom_files = asyncio.run(_run_batches(engine, model, todo, writer, batch_size, bar, dicom))
    ok = counts.pop(OK, 0)
    summary = BatchSummary(total=len(chosen), skipped=skipped, ok=ok, refused=dict(counts),
                           seconds=time.perf_counter() - started, out=out, dicom_files=dicom_files)
    log.info("%s v%s: %s", served.contract.name, served.version, summary.line())
    if model in engine.batchers and engine.batchers[model].stats.calls:
        stats = engine.batchers[model].stats
        log.info("model calls: %d, %.1f images a call on average, largest %d", stats.calls,
                 stats.images / stats.calls, stats.largest)
    return summary


# --------------------------------------------------------------------------- DICOM results


def dicom_results_available() -> bool:
    """Whether :mod:`breastscan.imaging.dicom_results` (DICOM SEG / SR writing) is installed."""
    import importlib.util

    return importlib.util.find_spec("breastscan.imaging.dicom_results") is not None


@dataclass
class DicomWriter:
    """A :data:`DicomHook` writing, per answered DICOM input, a DICOM SR of the answer and
    (models with a mask) a DICOM SEG of the lesion mask, with :mod:`breastscan.imaging.dicom_results`.

    Files go to ``out/dicom/<input path>.sr.dcm`` and ``.seg.dcm``. An input the writer
    cannot describe (e.g. a header without SOP Instance UID) is logged and skipped.
    """

    out: Path
    served: ServedModel

    def __call__(self, item: InputFile, data: bytes, answer: Prediction) -> list[Path]:
        """Write the result objects of one answered DICOM image; the files written."""
        from breastscan.imaging import dicom_results as dr

        base = self.out / "dicom" / _relative(item.key)
        algorithm, name = self.served.algorithm(), self.served.name  # as the service names it
        try:
            source = dr.source_dataset(data)
            report = dr.structured_report(source, {name: to_dict(answer)}, {name: algorithm})
            objects: dict[str, Any] = {".sr.dcm": report}
            if has_mask(answer.task) and answer.mask_png is not None:
                objects[".seg.dcm"] = dr.segmentation(source, mask_of(answer.mask_png), algorithm)
        except ValueError as exc:  # ImageDecodeError included: a header it cannot read
            log.warning("no DICOM results for %s: %s", item.key, exc)
            return []
        base.parent.mkdir(parents=True, exist_ok=True)
        paths = [base.with_name(base.name + suffix) for suffix in objects]
        for path, ds in zip(paths, objects.values(), strict=True):
            path.write_bytes(dr.to_bytes(ds))
        return paths


def _relative(key: str) -> Path:
    """A result path's relative form: a manifest's absolute or ``..`` path stays under OUT."""
    parts = [p for p in PurePosixPath(key.replace("\\", "/")).parts if p not in ("/", ".", "..")]
    return Path(*parts) if parts else Path("image")
