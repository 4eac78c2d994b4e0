"""``breastscan predict``: batch answers equal the engine's, refusals are counted, runs resume."""

from __future__ import annotations

import asyncio
import csv
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from breastscan.cli import main
from breastscan.serving import answer as answers
from breastscan.serving import batch
from breastscan.serving.answer import Prediction, lesion_bbox, mask_of, to_dict
from breastscan.serving.engine import Engine, local_engine
from breastscan.serving.request import ImageInput, Request, predict_request
from tests.conftest import sqlite_mlflow
from tests.services import images

N_PNG = 40
BROKEN = {"broken/empty.png": "empty", "broken/cut.png": "truncated", "broken/notes.png": "not_an_image",
          "study/series2/US0001.dcm": "wrong_modality"}
"""Files the tumor model must refuse, with the code (an ultrasound DICOM is not a mammogram)."""
N_OK = N_PNG + 1  # and the mammography DICOM without an extension


pytestmark = pytest.mark.usefixtures("restore_root_logging")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A seeded tiny tumor model at ``production`` in a throwaway MLflow store."""
    from tests.services import make_registry

    root = tmp_path_factory.mktemp("registry")
    with sqlite_mlflow(root):
        make_registry.main(root, ("tumor",))
        yield root


@pytest.fixture(scope="module")
def tumor(registry: Path) -> batch.LoadedModel:
    return batch.load_model("tumor@production")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 phantom PNGs, 3 broken files, a DICOM series (MG without extension, US), a text file."""
    root = tmp_path_factory.mktemp("inputs")
    for i in range(N_PNG):
        (root / "png" / f"{i // 10}").mkdir(parents=True, exist_ok=True)
        (root / "png" / f"{i // 10}" / f"mg_{i:03d}.png").write_bytes(images.png(images.mammogram(i)))
    (root / "broken").mkdir()
    (root / "broken" / "empty.png").write_bytes(b"")
    good = images.png(images.mammogram(99))
    (root / "broken" / "cut.png").write_bytes(good[: len(good) // 2])
    (root / "broken" / "notes.png").write_text("not an image\n")
    (root / "broken" / "readme.txt").write_text("ignored: neither an image nor DICOM\n")
    series = root / "study" / "series1"
    series.mkdir(parents=True)
    (series / "IM0001").write_bytes(images.dicom(images.mammogram(5).astype("uint16") * 16, "MG"))
    (root / "study" / "series2").mkdir()
    (root / "study" / "series2" / "US0001.dcm").write_bytes(
        images.dicom(images.ultrasound(3).astype("uint16") * 16, "US"))
    return root


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _counting(engine: Engine, fail_at: int | None = None) -> list[str]:
    """Count (and list) the engine's predict calls; raise KeyboardInterrupt at call ``fail_at``."""
    calls: list[str] = []
    original = engine.predict

    async def predict(request: Request) -> Prediction:
        calls.append(str(request.model))
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        return await original(request)

    engine.predict = predict  # type: ignore[method-assign]
    return calls


def _reference(model: batch.LoadedModel, inputs: list[batch.InputFile]) -> dict[str, Prediction]:
    """The engine's answers one file at a time, without batching (as the service answers uploads)."""
    engine = local_engine({model.name: model.bundle}, versions={model.name: model.version},
                          stages={model.name: str(model.stage)})

    async def ask(item: batch.InputFile) -> tuple[str, Prediction | None]:
        request = predict_request(model.name, ImageInput(data=item.path.read_bytes()))
        try:
            return item.key, await engine.predict(request)
        except Exception:  # noqa: BLE001 -- refused files are checked elsewhere
            return item.key, None

    async def all_answers() -> list[tuple[str, Prediction | None]]:
        return await asyncio.gather(*(ask(i) for i in inputs))

    return {k: a for k, a in asyncio.run(all_answers()) if a is not None}


def _expected_header(loaded: batch.LoadedModel) -> list[str]:
    """The CSV header: the path, the answer's CSV columns with the status after version and stage."""
    contract = loaded.bundle.contract
    columns = answers.csv_columns(contract.task, contract.class_names)
    return ["path", *columns[:3], "status", *columns[3:]]


def _as_csv(answer: Prediction) -> dict[str, str]:
    """An answer's CSV values as the CSV reader gives them back (text)."""
    return {k: str(v) for k, v in answers.csv_row(answer).items()}


def test_inputs_folder_manifest_and_dicom_tree(folder: Path, tmp_path: Path) -> None:
    found = [f.key for f in batch.find_inputs(folder)]
    assert len(found) == N_PNG + len(BROKEN) + 1
    assert "study/series1/IM0001" in found and "broken/readme.txt" not in found
    out = folder / "results"
    out.mkdir(exist_ok=True)
    (out / "x.dcm").write_bytes(b"")
    assert all(not k.startswith("results/") for k in (f.key for f in batch.find_inputs(folder, exclude=out)))
    (out / "x.dcm").unlink()
    out.rmdir()
    (tmp_path / "list.csv").write_text(f"image,pathology\n{folder}/png/0/mg_000.png,benign\n"
                                       "rel/missing.png,\nrel/missing.png,\n")
    listed = batch.find_inputs(tmp_path / "list.csv")
    assert [f.key for f in listed] == [f"{folder}/png/0/mg_000.png", "rel/missing.png"]
    assert listed[1].path == tmp_path / "rel" / "missing.png"
    (tmp_path / "bad.csv").write_text("file\nx.png\n")
    with pytest.raises(batch.BatchError, match="no 'image'"):
        batch.find_inputs(tmp_path / "bad.csv")


def test_batch_rows_equal_the_engines_answers(tumor: batch.LoadedModel, folder: Path, tmp_path: Path) -> None:
    engine = batch.batch_engine(tumor, batch_size=8)
    inputs = batch.find_inputs(folder)
    summary = batch.predict_files(engine, tumor.name, inputs, tmp_path, batch_size=8, progress=False)
    assert (summary.ok, summary.refused, summary.skipped) == (N_OK, {c: 1 for c in BROKEN.values()}, 0)
    assert engine.batchers[tumor.name].stats.largest > 1  # the model saw batches

    all_rows = _rows(tmp_path / batch.PREDICTIONS_CSV)
    assert list(all_rows[0]) == _expected_header(tumor) == batch.csv_columns(engine.select(tumor.name))
    assert list(all_rows[0])[5:] == ["width", "height", "predicted", "confidence", "p_benign", "p_malignant",
                                     "p_normal", "decision_threshold"]
    rows = {r["path"]: r for r in all_rows}
    jsonl = (tmp_path / batch.PREDICTIONS_JSONL).read_text().splitlines()
    lines = {d["path"]: d for d in map(json.loads, jsonl)}
    assert set(rows) == set(lines) == {f.key for f in inputs}
    reference = _reference(tumor, inputs)
    assert len(reference) == N_OK
    for key, expected in reference.items():
        answer, row, line = to_dict(expected), rows[key], lines[key]
        assert (row["status"], row["model"], row["version"], row["stage"]) == ("ok", "tumor", tumor.version,
                                                                               "production")
        exact = {k: v for k, v in _as_csv(expected).items() if k != "confidence" and not k.startswith("p_")}
        assert {k: row[k] for k in exact} == exact  # model, version, stage, size, predicted
        for cls, p in answer["probabilities"].items():
            assert float(row[f"p_{cls}"]) == pytest.approx(p, abs=1e-5)
            assert line["probabilities"][cls] == pytest.approx(p, abs=1e-5)
        assert float(row["confidence"]) == pytest.approx(answer["confidence"], abs=1e-5)
        assert {k: v for k, v in line.items() if k not in ("path", "status", "probabilities", "confidence")} \
            == {k: v for k, v in answer.items() if k not in ("probabilities", "confidence")}
    errors = {r["path"]: r["code"] for r in _rows(tmp_path / batch.ERRORS_CSV)}
    assert errors == BROKEN
    assert {k: rows[k]["status"] for k in BROKEN} == BROKEN
    assert lines["broken/empty.png"]["code"] == "empty" and lines["broken/empty.png"]["error"]

    calls = _counting(engine)
    before = {n: (tmp_path / n).read_bytes() for n in (batch.PREDICTIONS_CSV, batch.PREDICTIONS_JSONL,
                                                       batch.ERRORS_CSV)}
    again = batch.predict_files(engine, tumor.name, inputs, tmp_path, batch_size=8, progress=False)
    assert calls == [] and (again.skipped, again.done) == (len(inputs), 0)
    assert before == {n: (tmp_path / n).read_bytes() for n in before}

    other = local_engine({"tumor": tumor.bundle}, versions={"tumor": "999"})
    with pytest.raises(batch.BatchError, match=f"holds predictions of tumor v{tumor.version}"):
        batch.predict_files(other, "tumor", inputs, tmp_path, progress=False)


def test_an_interrupted_run_resumes_each_file_once(tumor: batch.LoadedModel, folder: Path,
                                                   tmp_path: Path) -> None:
    inputs = batch.find_inputs(folder)
    engine = batch.batch_engine(tumor, batch_size=8)
    _counting(engine, fail_at=20)  # in the third batch
    with pytest.raises(KeyboardInterrupt):
        batch.predict_files(engine, tumor.name, inputs, tmp_path, batch_size=8, progress=False)
    assert len(_rows(tmp_path / batch.PREDICTIONS_CSV)) == 16  # two whole batches, nothing of the third
    with (tmp_path / batch.PREDICTIONS_CSV).open("a") as fh:  # a crash mid-write
        fh.write("png/3/mg_039.png,tumor,1")
    with (tmp_path / batch.PREDICTIONS_JSONL).open("a") as fh:
        fh.write('{"path": "png/3/mg_039.png", "status": "ok"}\n{"path": "png/3/mg_0')

    engine = batch.batch_engine(tumor, batch_size=8)
    calls = _counting(engine)
    summary = batch.predict_files(engine, tumor.name, inputs, tmp_path, batch_size=8, progress=False)
    assert (summary.skipped, len(calls)) == (16, len(inputs) - 16)
    keys = [r["path"] for r in _rows(tmp_path / batch.PREDICTIONS_CSV)]
    lines = [json.loads(s)["path"] for s in (tmp_path / batch.PREDICTIONS_JSONL).read_text().splitlines()]
    assert sorted(keys) == sorted(lines) == sorted(f.key for f in inputs)
    assert sorted(r["path"] for r in _rows(tmp_path / batch.ERRORS_CSV)) == sorted(BROKEN)


@pytest.mark.parametrize("name", ["lesion", "us_mt"])
def test_segmenter_rows_hold_lesion_measures_and_dicom_results(name: str, folder: Path,
                                                               tmp_path: Path) -> None:
    """A segmenter's rows hold its lesion measures; a multi-task model's also its classes, called
    by its decision rule. Each DICOM input gets a SEG of the mask and an SR."""
    import numpy as np
    import pydicom

    from breastscan.bundle import ModelBundle
    from tests.services.make_registry import build_bundle

    bundle = ModelBundle.load(build_bundle(name, tmp_path / "bundle"))  # unregistered: no MLflow needed
    loaded = batch.LoadedModel(name=name, bundle=bundle, version="3", stage="production")
    engine = batch.batch_engine(loaded, batch_size=4)
    inputs = batch.find_inputs(folder)
    chosen = inputs[3:6] + [i for i in inputs if i.key.startswith("study/")]
    out = tmp_path / "out"
    writer = batch.DicomWriter(out, engine.select(name))
    summary = batch.predict_files(engine, name, chosen, out, progress=False, dicom=writer)
    assert (summary.ok, summary.refused, summary.dicom_files) == (4, {"wrong_modality": 1}, 2)
    rows = _rows(out / batch.PREDICTIONS_CSV)
    assert len(rows) == 5 and list(rows[0]) == _expected_header(loaded)
    assert list(rows[0])[-3:] == ["lesion_area_px", "lesion_fraction", "bbox"]
    lines = {d["path"]: d for d in map(json.loads, (out / batch.PREDICTIONS_JSONL).read_text().splitlines())}
    reference = _reference(loaded, chosen)
    for r in rows[:3]:
        mask = mask_of(lines[r["path"]]["mask_png"])  # the row measures its answer's own mask
        expected = reference[r["path"]]  # ... which is the engine's answer to that file alone
        assert int(r["lesion_area_px"]) == int(mask.sum()) == expected.lesion_area_px
        assert float(r["lesion_fraction"]) == pytest.approx(mask.sum() / mask.size, abs=1e-9)
        assert r["bbox"] == " ".join(map(str, lesion_bbox(mask) or []))
        assert mask_of(expected.mask_png or b"").tolist() == mask.tolist()
    if name == "us_mt":
        names = list(bundle.contract.class_names)
        assert list(rows[0])[7:-3] == ["predicted", "confidence", *(f"p_{c}" for c in names),
                                       "decision_threshold"]
        probs = np.asarray([[float(r[f"p_{c}"]) for c in names] for r in rows[:3]])
        called = [names[k] for k in bundle.contract.rule.decide(probs, names)]
        assert [r["predicted"] for r in rows[:3]] == called != [names[k] for k in probs.argmax(axis=1)]
    seg = pydicom.dcmread(out / "dicom" / "study" / "series2" / "US0001.dcm.seg.dcm")
    sr = pydicom.dcmread(out / "dicom" / "study" / "series2" / "US0001.dcm.sr.dcm")
    assert (seg.Modality, sr.Modality, seg.SoftwareVersions) == ("SEG", "SR", loaded.version)


def test_cli_predict(registry: Path, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["predict", str(folder), "--model", "tumor", "--out", str(out), "--batch-size", "16",
            "--no-progress", "--dicom"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"tumor v1 @production (onnx): {N_OK} ok, {len(BROKEN)} refused (empty 1, not_an_image 1, " \
           f"truncated 1, wrong_modality 1), 0 already done" in result.output
    assert len(_rows(out / batch.PREDICTIONS_CSV)) == N_OK + len(BROKEN)
    assert sorted(p.name for p in (out / "dicom").rglob("*.dcm")) == ["IM0001.sr.dcm"]
    bad = CliRunner().invoke(main, ["predict", str(folder), "--model", "nope", "--out", str(out)])
    assert bad.exit_code == 1 and "has no version with alias @production" in bad.output
