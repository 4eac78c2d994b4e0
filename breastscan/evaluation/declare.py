"""Declare a benchmark's ready-made dataset and models in params.yaml (``breastscan declare``).

Each benchmark file (``benchmarks/<name>.yaml``) carries, in params.yaml's own schema, the
``datasets:`` entry of a real dataset and the ``models:`` entries of the best configuration
the quality benchmark found. :func:`declare` copies them into params.yaml, with the dataset's
``path`` set to where the user converted the data (``datasets/<dataset>`` by default), so the
pipeline's foreach stages (validate@, prepare@, train@, evaluate@, register@) pick them up
with no code edit.

params.yaml is edited in ruamel.yaml's round-trip mode: its comments, key order, flow style
and blank lines are kept, the new entries go at the end of their sections (a replaced one,
with ``force``, keeps its place) and the comments of the benchmark's entries come with them.
The result is checked with :func:`breastscan.config.parse_params` before anything is written.
"""

from __future__ import annotations

import copy
import io
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import CommentMark
from ruamel.yaml.tokens import CommentToken

from breastscan.config import parse_params
from breastscan.evaluation.crossval import BENCHMARKS_DIR, BenchmarkSpec, load_benchmark

SECTIONS: tuple[str, ...] = ("datasets", "models")
"""The params.yaml sections a benchmark declares entries in."""


class DeclareError(ValueError):
    """The benchmark is unknown or invalid, an entry exists already, or the result is invalid."""


@dataclass(frozen=True)
class PoolSpec:
    """A pool file (``pool:`` instead of ``benchmark:``): several sites' datasets trained together.

    Attributes:
        name: the file's name (``ultrasound_sites``).
        dataset: the pool's key under ``datasets:``.
        sites: site name -> that site's benchmark (its source and conversion).
    """

    name: str
    dataset: str
    sites: dict[str, BenchmarkSpec]


def load_pool(path: Path) -> PoolSpec:
    """Read a pool file: its ``pool:`` section names each site's benchmark file (beside it).

    Raises:
        DeclareError: no single dataset with ``sites:``, or a site the pool entry does not name.
    """
    raw = yaml.safe_load(path.read_text()) or {}
    pools = [k for k, v in (raw.get("datasets") or {}).items() if (v or {}).get("sites")]
    if len(pools) != 1:
        raise DeclareError(f"{path}: a pool file declares one dataset with `sites:`, found {pools}")
    files = dict(raw["pool"].get("sites") or {})
    if sorted(files) != sorted(raw["datasets"][pools[0]]["sites"]):
        raise DeclareError(f"{path}: pool.sites {sorted(files)} and datasets.{pools[0]}.sites differ")
    try:
        sites = {site: load_benchmark(path.parent / str(file)) for site, file in files.items()}
    except (KeyError, ValueError) as exc:
        raise DeclareError(f"{path}: {exc}") from None
    return PoolSpec(name=str(raw["pool"].get("name", path.stem)), dataset=pools[0], sites=sites)


@dataclass(frozen=True)
class Declared:
    """What :func:`declare` wrote.

    Attributes:
        spec: the benchmark the entries come from.
        params_path: the params file written.
        dataset: the dataset's key under ``datasets:``.
        data_path: the dataset's ``path`` as written.
        models: the keys added under ``models:``, in the benchmark's order.
        replaced: ``section.key`` of the entries that existed and were replaced (``force``).
        folders: ``(benchmark, folder)`` of each converted dataset the entries read (one;
            a pool's: one per site), for the next steps' ``breastscan ingest`` and ``dvc add``.
    """

    spec: BenchmarkSpec | PoolSpec
    params_path: Path
    dataset: str
    data_path: str
    models: tuple[str, ...]
    replaced: tuple[str, ...]
    folders: tuple[tuple[BenchmarkSpec, str], ...] = ()


def _round_trip() -> YAML:
    """A ruamel.yaml round-trip loader/dumper that leaves params.yaml's layout as it is."""
    rt = YAML(typ="rt")
    rt.preserve_quotes = True
    rt.width = 4096  # never re-wrap a long flow mapping (the preprocess lines)
    rt.indent(mapping=2, sequence=4, offset=2)
    return rt


def benchmark_file(name: str, benchmarks_dir: Path = BENCHMARKS_DIR) -> Path:
    """The file of benchmark ``name`` (``busi``: ``benchmarks/busi.yaml``), or ``name`` if a YAML file.

    Raises:
        DeclareError: no such benchmark; the message lists the known ones.
    """
    as_path = Path(name)
    if as_path.suffix in (".yaml", ".yml") and as_path.is_file():
        return as_path
    path = benchmarks_dir / f"{name}.yaml"
    if path.is_file():
        return path
    known = sorted(p.stem for p in benchmarks_dir.glob("*.yaml")
                   if "datasets" in (yaml.safe_load(p.read_text()) or {}))  # declarable ones
    listed = ", ".join(known) or f"none in {benchmarks_dir}/"
    raise DeclareError(f"unknown benchmark {name!r}; known: {listed}")


def _last_leaf(node: CommentedMap) -> tuple[CommentedMap, Any]:
    """The mapping and key of the last scalar of ``node``, where ruamel keeps trailing comments."""
    while len(node):
        key = list(node)[-1]
        if not isinstance(node[key], CommentedMap) or not len(node[key]):
            return node, key
        node = node[key]
    return node, None


def _split_trailing(node: CommentedMap) -> str:
    """Remove and return what follows the end of ``node``'s last line (blank lines, comments).

    The inline comment of that last line stays where it is.
    """
    holder, key = _last_leaf(node)
    slots = holder.ca.items.get(key) if key is not None else None
    if not slots or len(slots) < 3 or not isinstance(slots[2], CommentToken):
        return ""
    token = slots[2]
    inline, _, rest = token.value.partition("\n")
    if inline.strip():
        token.value = inline + "\n"
    else:
        slots[2] = None
    return rest


def _attach_trailing(node: CommentedMap, rest: str) -> None:
    """Put ``rest`` (from :func:`_split_trailing`) after the last line of ``node``."""
    if not rest:
        return
    holder, key = _last_leaf(node)
    if key is None:
        return
    slots = holder.ca.items.setdefault(key, [None, None, None, None])
    token = slots[2] if len(slots) > 2 else None
    if isinstance(token, CommentToken):
        token.value = token.value.rstrip("\n") + "\n" + rest
    else:
        slots[2] = CommentToken("\n" + rest, start_mark=CommentMark(0))


def _entries(path: Path, spec: BenchmarkSpec | PoolSpec, data_path: str) -> dict[str, CommentedMap]:
    """``{section: {key: entry}}`` of the benchmark file, comments kept, the dataset's path set
    (a pool's: its folder, and each site's folder inside it)."""
    raw = _round_trip().load(path.read_text())
    entries: dict[str, CommentedMap] = {}
    dataset = copy.deepcopy(raw["datasets"][spec.dataset])
    dataset["path"] = data_path
    dataset.ca.items.pop("path", None)  # the benchmark's note on its own (unversioned) folder
    if isinstance(spec, PoolSpec):
        dataset.yaml_add_eol_comment("# the folder holding every site", "path", column=30)
        for site in spec.sites:
            dataset["sites"][site] = f"{data_path}/{site}"
    else:
        dataset.yaml_add_eol_comment("# breastscan ingest's output, versioned by dvc add", "path", column=30)
    entries["datasets"] = CommentedMap([(spec.dataset, dataset)])
    # a benchmark's cross-validated models (its `tasks:`; e.g. not a model only cross_site runs)
    benchmarked = {t.model for t in spec.tasks} if isinstance(spec, BenchmarkSpec) else set(raw["models"])
    entries["models"] = CommentedMap(
        (name, copy.deepcopy(raw["models"][name])) for name in raw["models"] if name in benchmarked)
    for section in entries.values():  # no blank lines or notes trailing after the last entry
        _split_trailing(section)
    return entries


def _merge(doc: CommentedMap, entries: dict[str, CommentedMap]) -> None:
    """Add (or replace in place) each entry under its section of ``doc``."""
    for name, new in entries.items():
        section = doc.get(name)
        if section is None:
            doc[name] = section = CommentedMap()
        rest = _split_trailing(section) if len(section) else ""
        for key, entry in new.items():
            section[key] = entry
        _attach_trailing(section, rest)


def _existing(doc: CommentedMap, entries: dict[str, CommentedMap]) -> list[str]:
    """``section.key`` of each entry already declared in ``doc``."""
    return [f"{section}.{key}" for section, new in entries.items()
            for key in new if key in (doc.get(section) or {})]


def _dump(doc: CommentedMap) -> str:
    out = io.StringIO()
    _round_trip().dump(doc, out)
    return out.getvalue()


def declare(benchmark: str, params_path: Path = Path("params.yaml"), data_path: str | Path | None = None,
            *, force: bool = False, benchmarks_dir: Path = BENCHMARKS_DIR) -> Declared:
    """Copy a benchmark's ``datasets:`` and ``models:`` entries into params.yaml.

    Args:
        benchmark: a benchmark name (``busi``, ``mini_mias``) or the path of a benchmark file.
        params_path: the params file to edit (it must exist).
        data_path: the converted dataset's folder [default: ``datasets/<dataset>``].
        force: replace entries params.yaml already has instead of refusing.
        benchmarks_dir: where benchmark names are looked up.

    Returns:
        What was declared.

    Raises:
        DeclareError: unknown or invalid benchmark, missing params file, an entry that
            exists (without ``force``), or a result params.yaml would not accept.
    """
    path = benchmark_file(benchmark, benchmarks_dir)
    spec = _spec(path)
    if not params_path.is_file():
        raise DeclareError(f"{params_path} not found: run this in the project's checkout or pass --params")
    if isinstance(spec, PoolSpec):
        target = Path(data_path) if data_path is not None else Path("datasets")
        folders = tuple((site_spec, (target / site).as_posix()) for site, site_spec in spec.sites.items())
    else:
        target = Path(data_path) if data_path is not None else Path("datasets") / spec.dataset
        folders = ((spec, target.as_posix()),)
    entries = _entries(path, spec, target.as_posix())
    doc = _round_trip().load(params_path.read_text())
    existing = _existing(doc, entries)
    if existing and not force:
        raise DeclareError(f"{params_path} already declares {', '.join(existing)}: "
                           f"pass --force to replace {'it' if len(existing) == 1 else 'them'}")
    _merge(doc, entries)
    text = _dump(doc)
    try:
        parse_params(yaml.safe_load(text) or {})
    except (KeyError, TypeError, ValueError) as exc:
        raise DeclareError(f"{params_path} would be invalid after declaring {spec.name}: {exc}") from None
    params_path.write_text(text)
    return Declared(spec=spec, params_path=params_path, dataset=spec.dataset, data_path=target.as_posix(),
                    models=tuple(entries["models"]), replaced=tuple(existing), folders=folders)


def _spec(path: Path) -> BenchmarkSpec | PoolSpec:
    """The benchmark (``benchmark:``) or pool (``pool:``) a declarable file describes."""
    if "pool" in (yaml.safe_load(path.read_text()) or {}):
        return load_pool(path)
    try:
        return load_benchmark(path)
    except (KeyError, ValueError) as exc:
        raise DeclareError(f"{path}: {exc}") from None


def ingest_command(spec: BenchmarkSpec, out: str) -> str:
    """The ``breastscan ingest`` line converting the benchmark's source into ``out`` (files copied)."""
    options = dict(spec.ingest)
    args = ["breastscan", "ingest", "--format", str(options.pop("format")), str(spec.source), out]
    for src, dst in (options.pop("columns", None) or {}).items():
        args += ["--map", f"{src}={dst}"]
    for column, pairs in (options.pop("values", None) or {}).items():
        args += [a for src, dst in pairs.items() for a in ("--value", f"{column}:{src}={dst}")]
    if options.get("roi"):
        args += ["--roi", ",".join(options.pop("roi"))]
    if options.get("modality"):
        args += ["--modality", str(options.pop("modality"))]
    return shlex.join([*args, "--copy"])


def next_steps(declared: Declared) -> list[str]:
    """The commands that take the declared entries from data to a served model."""
    models = declared.models
    folders = declared.folders or ((declared.spec, declared.data_path),)
    steps = [ingest_command(spec, data) for spec, data in folders  # type: ignore[arg-type]
             if not Path(data, "manifest.csv").is_file()]
    params = shlex.quote(str(declared.params_path))
    if any(Path(data).is_absolute() for _, data in folders):  # outside the checkout: DVC cannot version it
        steps.append(f"git add {params}")
    else:
        steps += [f"dvc add {shlex.quote(data)}" for _, data in folders if not Path(data + ".dvc").is_file()]
        steps.append(" ".join(["git add", params, *(shlex.quote(data + ".dvc") for _, data in folders)]))
    return [
        *steps,
        "dvc repro " + " ".join(f"register@{m}" for m in models),
        f"breastscan promote {' '.join(models)} --to production",
        "make serve",
    ]
