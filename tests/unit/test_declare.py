"""``breastscan declare``: a benchmark's ready-made entries into a copy of params.yaml."""

from __future__ import annotations

import difflib
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from breastscan.cli import main
from breastscan.config import load_params
from breastscan.evaluation.declare import DeclareError, declare, next_steps
from tests.conftest import REPO


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of params.yaml and benchmarks/, as a checkout has them; the working directory."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(REPO / "benchmarks", tmp_path / "benchmarks")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _comments(text: str) -> list[str]:
    return [line.split("#", 1)[1] for line in text.splitlines() if "#" in line]


def test_declare_adds_entries_and_keeps_everything_else(project: Path) -> None:
    before = (project / "params.yaml").read_text()
    declared = declare("busi", Path("params.yaml"))
    after = (project / "params.yaml").read_text()

    assert declared.models == ("busi_tumor", "busi_lesion") and declared.replaced == ()
    p = load_params("params.yaml")  # the result parses
    assert p.dataset("busi").path == Path("datasets/busi")
    assert p.model("busi_tumor").dataset == "busi" and p.model("busi_lesion").task == "segmentation"
    old = yaml.safe_load(before)
    new = yaml.safe_load(after)
    for section in ("datasets", "models"):  # existing entries untouched, in their order, new ones last
        assert list(new[section])[: len(old[section])] == list(old[section])
        assert all(new[section][k] == v for k, v in old[section].items())
    assert list(new) == list(old)  # top-level order
    assert {k: v for k, v in new.items() if k not in ("datasets", "models")} == \
        {k: v for k, v in old.items() if k not in ("datasets", "models")}
    # every comment survives, and the benchmark's notes on its entries come along
    assert set(_comments(before)) <= set(_comments(after))
    assert "Lesion-aware: the model segments the image itself" in after
    # the 8-category note still sits right above its section, after a blank line
    assert "\n\n# The 8-category view" in after
    assert after.index("busi_lesion:") < after.index("# The 8-category")
    # lines were only inserted (no existing line changed or removed)
    diff = difflib.SequenceMatcher(None, before.splitlines(), after.splitlines(), autojunk=False)
    changes = [op for op in diff.get_opcodes() if op[0] != "equal"]
    assert changes and all(op[0] == "insert" for op in changes), changes


def test_second_declare_refuses_without_force(project: Path) -> None:
    declare("busi", Path("params.yaml"))
    first = (project / "params.yaml").read_text()
    with pytest.raises(DeclareError, match=r"already declares datasets\.busi.*--force"):
        declare("busi", Path("params.yaml"))
    assert (project / "params.yaml").read_text() == first

    again = declare("busi", Path("params.yaml"), "elsewhere/busi", force=True)
    assert again.replaced == ("datasets.busi", "models.busi_tumor", "models.busi_lesion")
    text = (project / "params.yaml").read_text()
    assert text.count("busi_tumor:") == 1 and load_params("params.yaml").dataset("busi").path == \
        Path("elsewhere/busi")
    assert text == first.replace("path: datasets/busi ", "path: elsewhere/busi")


def test_unknown_benchmark_lists_known_ones(project: Path) -> None:
    known = "busbra, busbra_gpu, busi, busi_gpu, mini_mias, ultrasound_sites"
    with pytest.raises(DeclareError, match=f"unknown benchmark 'nope'; known: {known}"):
        declare("nope", Path("params.yaml"))


def test_invalid_result_is_not_written(project: Path) -> None:
    bad = yaml.safe_load((project / "benchmarks/busi.yaml").read_text())
    bad["models"]["busi_tumor"]["classes"] = ["benign"]  # fewer than two classes
    (project / "bad.yaml").write_text(yaml.safe_dump(bad))
    before = (project / "params.yaml").read_text()
    with pytest.raises(DeclareError, match="classes needs at least two"):
        declare("bad.yaml", Path("params.yaml"))
    assert (project / "params.yaml").read_text() == before


def test_next_steps_name_the_commands(project: Path) -> None:
    steps = next_steps(declare("busi", Path("params.yaml")))
    assert steps == [
        "breastscan ingest --format csv ../shared/datasets/busi/manifest.csv datasets/busi "
        "--map label=pathology --map dup_group=group --modality ultrasound --copy",
        "dvc add datasets/busi",
        "git add params.yaml datasets/busi.dvc",
        "dvc repro register@busi_tumor register@busi_lesion",
        "breastscan promote busi_tumor busi_lesion --to production",
        "make serve",
    ]
    (project / "datasets/busi").mkdir(parents=True)
    (project / "datasets/busi/manifest.csv").write_text("image\n")
    assert not next_steps(declare("busi", Path("params.yaml"), force=True))[0].startswith("breastscan ingest")


def test_busbra_declares_a_two_class_lesion_aware_pair(project: Path) -> None:
    runner = CliRunner()
    done = runner.invoke(main, ["declare", "busbra"])
    assert done.exit_code == 0, done.output
    assert done.output.splitlines() == [
        "params.yaml: declared datasets.busbra (path datasets/busbra) and models busbra_tumor, busbra_lesion "
        "from busbra",
        "next:",
        # the pack's `group` column is the patient grouping already: no --map dup_group=group
        "  breastscan ingest --format csv ../shared/datasets/busbra/manifest.csv datasets/busbra "
        "--map label=pathology --modality ultrasound --copy",
        "  dvc add datasets/busbra",
        "  git add params.yaml datasets/busbra.dvc",
        "  dvc repro register@busbra_tumor register@busbra_lesion",
        "  breastscan promote busbra_tumor busbra_lesion --to production",
        "  make serve",
    ]
    p = load_params("params.yaml")
    assert p.dataset("busbra").path == Path("datasets/busbra") and p.dataset("busbra").masks_required
    tumor, lesion = p.model("busbra_tumor"), p.model("busbra_lesion")
    assert tumor.class_names == ("benign", "malignant") and tumor.roi is not None
    assert tumor.headline == "auc" and lesion.task == "segmentation"
    busi = load_params("benchmarks/busi.yaml")  # gates at least as strict as BUSI's
    assert tumor.gates.floors["auc"] >= busi.model("busi_tumor").gates.floors["macro_auc"]
    for name, floor in busi.model("busi_tumor").gates.floors.items():
        assert name == "macro_auc" or tumor.gates.floors[name] >= floor, name
    assert lesion.gates.floors["lesion_mean_dice"] >= \
        busi.model("busi_lesion").gates.floors["lesion_mean_dice"]
    assert tumor.gates.every_class_predicted
    for ours, theirs in ((tumor, busi.model("busi_tumor")), (lesion, busi.model("busi_lesion"))):
        same = {f: getattr(theirs, f)
                for f in ("name", "dataset", "classes", "class_names", "headline", "gates")}
        assert replace(ours, **same) == theirs, f"{ours.name} must keep {theirs.name}'s recipe"


def test_cli(project: Path) -> None:
    runner = CliRunner()
    done = runner.invoke(main, ["declare", "mini_mias", "--path", "datasets/mias"])
    assert done.exit_code == 0, done.output
    assert done.output.startswith("params.yaml: declared datasets.mini_mias (path datasets/mias) and models "
                                  "mias_density, mias_tumor from mini_mias\nnext:\n")
    assert "  dvc repro register@mias_density register@mias_tumor\n" in done.output
    refused = runner.invoke(main, ["declare", "mini_mias"])
    assert refused.exit_code == 1
    assert refused.output.strip().splitlines() == [
        "Error: params.yaml already declares datasets.mini_mias, models.mias_density, models.mias_tumor: "
        "pass --force to replace them"]
    unknown = runner.invoke(main, ["declare", "nope"])
    assert unknown.exit_code == 1
    assert "known: busbra, busbra_gpu, busi, busi_gpu, mini_mias, ultrasound_sites" in unknown.output


def test_a_pool_declares_its_sites_and_the_ingest_of_each(project: Path) -> None:
    declared = declare("ultrasound_sites", Path("params.yaml"))
    p = load_params("params.yaml")
    pool = p.dataset("ultrasound_sites")
    assert pool.path == Path("datasets") and pool.sites == {"busi": Path("datasets/busi"),
                                                             "busbra": Path("datasets/busbra")}
    assert declared.models == ("us_tumor", "us_lesion")
    assert p.model("us_tumor").dataset == "ultrasound_sites" and p.model("us_lesion").task == "segmentation"
    steps = next_steps(declared)
    ingest = [s for s in steps if s.startswith("breastscan ingest")]
    assert [s.split()[5] for s in ingest] == ["datasets/busi", "datasets/busbra"]
    assert "--map dup_group=group" in ingest[0] and "dup_group" not in ingest[1]
    assert "dvc add datasets/busi" in steps and "dvc add datasets/busbra" in steps
    assert "git add params.yaml datasets/busi.dvc datasets/busbra.dvc" in steps
    assert "dvc repro register@us_tumor register@us_lesion" in steps
    text = (project / "params.yaml").read_text()
    assert "dedup: {max_hamming: 8, min_correlation: 0.9}\n" in text  # layout kept
