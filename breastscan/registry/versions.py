"""MLflow model registry: log a bundle as a pyfunc model, register it, promote it through gates.

Stages are **aliases**: :func:`register` points ``@staging`` at the new version and
:func:`promote` moves ``@production`` (``models:/breastscan-<model>@production`` is what the
service imports) only if the quality gates of params.yaml pass on the same test split.

Facts about MLflow 3.17 this module relies on (checked against the installed package):

* ``mlflow.pyfunc.log_model(name="model", ...)`` (``artifact_path`` is deprecated) creates
  a *logged model* and returns ``ModelInfo.model_uri == "models:/m-<id>"``; the files live
  under ``<experiment artifacts>/models/m-<id>/artifacts``, not in the run's artifacts, so
  ``runs:/<run>/model`` only resolves through a fallback lookup. :func:`log_bundle`
  returns the ``models:/m-<id>`` URI and :func:`register` registers that URI (with the
  run id and model id), which is what ``mlflow.register_model`` ends up doing too.
* Aliases: ``set_registered_model_alias`` / ``get_model_version_by_alias``;
  ``models:/<name>@<alias>`` resolves anywhere a model URI is accepted. Aliases are read
  from the registered model (``search_model_versions`` returns versions with empty
  ``aliases`` on the SQL store).
* Classic stages still exist but are deprecated since 2.9 ("will be removed in a future
  major release"): ``transition_model_version_stage`` emits a ``FutureWarning`` and works,
  and ``models:/<name>/Production`` still resolves to the latest version in that stage.
  They are mirrored here for old clients only (``Staging`` on register, ``Production`` with
  the older versions archived on promotion); a failure or a future removal is logged and
  ignored, never fatal.

The logged pyfunc is usable by any MLflow client, without breastscan installed:

* :class:`BundlePyfunc` is pickled (cloudpickle) by reference to this module, and the
  ``breastscan`` package source is logged with it as ``code_paths`` (``code/breastscan`` in
  the model; MLflow puts ``<model>/code`` first on ``sys.path`` before unpickling, so the
  model's own copy is what ``import breastscan`` finds in a process that has not imported
  breastscan yet). ``mlflow.pyfunc.load_model`` and ``mlflow models serve --env-manager
  local`` in a venv holding only the model's ``requirements.txt`` are tested
  (``tests/integration/test_pyfunc_anywhere.py``).
* Its ``requirements.txt`` pins, at the versions installed when logging, every distribution
  that code imports on the load/predict path (:data:`_REQUIREMENTS`): MLflow, Keras,
  TensorFlow, NumPy, OpenCV and pydicom, plus PyYAML and pandas (``breastscan.models``
  imports ``breastscan.config``, which imports ``yaml`` and ``breastscan.data.manifest`` ->
  ``pandas``), SciPy (mask sigmoid) and cloudpickle (the pickled model). Nothing on that
  path imports BentoML, DVC or Great Expectations. breastscan itself is not on PyPI and is
  not listed.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel, PythonModelContext

from breastscan.bundle import ModelBundle, read_contract
from breastscan.imaging.preprocessing import PreprocessSpec
from breastscan.jsonable import finite_float, fmt_number
from breastscan.registry.modelcard import report_metric, version_summary
from breastscan.registry.resolver import BUNDLE_ARTIFACT, RegistryError, get_version

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

    from breastscan.bundle import ModelContract
    from breastscan.config import ModelConfig

log = logging.getLogger(__name__)

STAGING = "staging"
PRODUCTION = "production"
MODEL_NAME = "model"
CLASSIC_STAGES = {STAGING: "Staging", PRODUCTION: "Production"}
"""Alias -> classic stage mirrored for old clients."""

# Version tags written by register() and read by promote().
TAG_HEADLINE = "headline"
TAG_HEADLINE_VALUE = "headline_value"
TAG_SITE_PREFIX = "site."
TAG_SPLIT = "split_id"
TAG_DATA_HASH = "data_hash"
TAG_COMMIT = "git_commit"
METRIC_TAG_PREFIX = "metric."
TAG_NEVER_PREDICTED = "classes_never_predicted"
TAG_EXPERIMENT = "dvc_experiment"
TAG_EXPORT_PREFIX = "export."
"""Version tags of the ONNX export's check (:func:`export_tags`): ``export.runtime``, ``export.passed`` ..."""
TAG_AUDIT_LAST = "audit.last"
"""Version tag: the last audit event about the version, ``<kind> by <who> at <when>``."""
DESCRIPTION_LIMIT = 5000
"""Most characters MLflow's SQL store keeps in a version description."""
STAGE_NOTE_MARKER = "\n\n---\n**Last stage change:** "
"""Separates a version's description (the model card in brief) from the note of its last stage change."""

_REQUIREMENTS = (
    "mlflow", "keras", "tensorflow-cpu", "tensorflow", "numpy", "opencv-python-headless", "pydicom",
    "pyyaml", "pandas", "scipy", "cloudpickle",
)
"""Distributions the logged pyfunc needs, pinned at their installed versions (absent ones,
e.g. ``tensorflow`` beside ``tensorflow-cpu``, are skipped)."""
_LOGGED_MODEL_URI = re.compile(r"^models:/(m-[0-9a-f]+)$")


# --------------------------------------------------------------------------- pyfunc


class BundlePyfunc(PythonModel):
    """MLflow pyfunc around a :class:`~breastscan.bundle.ModelBundle`.

    The bundle directory is the model artifact ``"bundle"``; :meth:`predict` returns what
    :meth:`ModelBundle.predict` returns, so the registry serves calibrated probabilities.
    Loading it imports only this module's dependencies and, in :meth:`load_context`, Keras
    and :mod:`breastscan.models` (all covered by the logged requirements; see the module
    docstring).
    """

    def load_context(self, context: PythonModelContext) -> None:
        """Load the bundle from ``context.artifacts["bundle"]``."""
        self.bundle = ModelBundle.load(context.artifacts[BUNDLE_ARTIFACT])

    def predict(self, context: Any, model_input: np.ndarray,
                params: dict[str, Any] | None = None) -> np.ndarray:
        """Probabilities of a preprocessed batch.

        Args:
            context: MLflow's model context (unused; the bundle is loaded already).
            model_input: ``(n, H, W, 1)`` float32 in [0, 1] at the size of the contract.
            params: unused.

        Returns:
            ``(n, k)`` calibrated class probabilities, or ``(n, H, W, 1)`` lesion
            probabilities in [0, 1].
        """
        return self.bundle.predict(np.asarray(model_input, dtype=np.float32))


def _pip_requirements() -> list[str]:
    """``dist==version`` of every installed distribution of :data:`_REQUIREMENTS`."""
    reqs = []
    for dist in _REQUIREMENTS:
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return reqs


def _code_paths() -> list[str]:
    """The ``breastscan`` package directory, logged as the model's ``code/breastscan``.

    MLflow copies it without ``__pycache__`` and prepends ``<model>/code`` to ``sys.path``
    when loading, so the package must be logged as a directory named ``breastscan``.
    """
    import breastscan

    package = Path(breastscan.__file__).resolve().parent
    if package.name != "breastscan" or not (package / "registry" / "versions.py").is_file():
        raise RuntimeError(f"breastscan package source not found at {package}")
    return [str(package)]


def log_bundle(bundle_dir: Path, *, name: str = MODEL_NAME,
               extra_artifacts: Mapping[str, Path] | None = None) -> str:
    """Log a bundle as an MLflow pyfunc model (in the active run, if any).

    The signature follows from the bundle's contract: input tensor ``float32 (-1, H, W,
    1)``, output ``float32 (-1, k)`` (classifier, ``k`` classes) or ``(-1, H, W, 1)``
    (segmenter). One all-zero image is stored as the input example; MLflow checks it by
    loading the logged model and running it (the only time the model is loaded here). The
    contract and preprocessing spec also go into the ``MLmodel`` metadata. The ``breastscan``
    package source is logged as the model's code (``code_paths``) and ``requirements.txt``
    pins what it imports, so any MLflow client loads the model without breastscan installed.

    Args:
        bundle_dir: a directory written by :meth:`ModelBundle.save`.
        name: the logged model's name (MLflow 3's ``name=``).
        extra_artifacts: more files to ship with the model, e.g.
            ``{"model_card.md": path}`` (artifact key -> local path); ``"bundle"`` is reserved.

    Returns:
        The model URI to register, ``models:/m-<logged model id>``.
    """
    from mlflow.models import infer_signature

    extra = dict(extra_artifacts or {})
    if BUNDLE_ARTIFACT in extra:
        raise ValueError(f"extra artifact key {BUNDLE_ARTIFACT!r} is reserved for the bundle")
    bundle_dir = Path(bundle_dir)
    contract, spec = read_contract(bundle_dir), PreprocessSpec.load(bundle_dir)
    example = np.zeros((1, *contract.input_shape), dtype=np.float32)
    classes = np.zeros((1, len(contract.classes)), dtype=np.float32)
    mask = np.zeros((1, *contract.input_shape), dtype=np.float32)
    outputs = {"classification": classes, "segmentation": mask,
               "multitask": {"probabilities": classes, "mask": mask}}[contract.task]
    signature = infer_signature(example, outputs)
    artifacts = {BUNDLE_ARTIFACT: str(bundle_dir.resolve())}
    artifacts.update({k: str(Path(v).resolve()) for k, v in extra.items()})
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=BundlePyfunc(),
        artifacts=artifacts,
        signature=signature,
        input_example=example,
        pip_requirements=_pip_requirements(),
        code_paths=_code_paths(),
        metadata={"contract": contract.to_dict(), "preprocess": spec.to_dict()},
    )
    log.info("logged bundle %s as %s", bundle_dir, info.model_uri)
    return str(info.model_uri)


def logged_model_id(model_uri: str) -> str | None:
    """The logged model id ``m-<hex>`` of a ``models:/m-<hex>`` URI (``None`` for other URIs)."""
    match = _LOGGED_MODEL_URI.match(model_uri or "")
    return match.group(1) if match else None


def logged_model_exists(model_uri: str | None) -> bool:
    """True when ``model_uri`` (``models:/m-<hex>``, from :func:`log_bundle`) names a logged
    model in the configured tracking store (no model files are read)."""
    model_id = logged_model_id(model_uri or "")
    if model_id is None:
        return False
    try:
        mlflow.get_logged_model(model_id)
    except MlflowException:
        return False
    return True


# --------------------------------------------------------------------------- helpers


def registry_client() -> MlflowClient:
    """A client of the registry MLflow is configured with."""
    return MlflowClient()


@contextmanager
def _quiet_deprecations() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def mirror_stage(client: MlflowClient, name: str, version: int | str, alias: str) -> str | None:
    """Mirror an alias as a classic stage for old clients; never raises."""
    stage = CLASSIC_STAGES.get(alias)
    transition = getattr(client, "transition_model_version_stage", None)
    if stage is None or transition is None:
        return None
    try:
        with _quiet_deprecations():
            transition(name=name, version=str(version), stage=stage, archive_existing_versions=True)
    except Exception as exc:  # stages are deprecated: a removal or refusal must not block the registry
        log.warning("could not mirror %s v%s as classic stage %s (%s); the alias @%s is what counts",
                    name, version, stage, exc, alias)
        return None
    return stage


def never_predicted(metrics: Mapping[str, Any]) -> list[str]:
    """Classes of a classifier's report that were never predicted (no true or false positive)."""
    per_class = metrics.get("per_class") or {}
    return [name for name, s in per_class.items()
            if isinstance(s, Mapping) and s.get("precision") is None and s.get("support") is not None]


def gated_metrics(cfg: ModelConfig) -> list[str]:
    """The metrics a model's gates compare: its floored metrics, then its headline."""
    names = list(cfg.gates.floors)
    if cfg.headline not in names:
        names.append(cfg.headline)
    return names


def version_metrics(mv: ModelVersion) -> dict[str, float]:
    """The gated metrics a version was registered with (its ``metric.<name>`` tags)."""
    out: dict[str, float] = {}
    for key, value in (mv.tags or {}).items():
        if key.startswith(METRIC_TAG_PREFIX):
            number = finite_float(value)
            if number is not None:
                out[key[len(METRIC_TAG_PREFIX):]] = number
    return out


# --------------------------------------------------------------------------- register


def _ensure_registered_model(client: MlflowClient, cfg: ModelConfig) -> None:
    name = cfg.registered_name
    try:
        client.create_registered_model(name)
        log.info("created registered model %s", name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    what = {"classification": f"classifies {cfg.label} into {', '.join(cfg.class_names)}",
            "segmentation": "segments lesions (per-pixel probability)",
            "multitask": f"classifies {cfg.label} into {', '.join(cfg.class_names)} and segments the "
                         "lesion in one forward pass"}[cfg.task]
    client.update_registered_model(
        name, description=(f"breastscan model `{cfg.name}` ({cfg.task}): {what}; trained on dataset "
                           f"`{cfg.dataset}`. Research and engineering use only, not for diagnosis."))
    tags = {
        "task": cfg.task, "label": cfg.label, "dataset": cfg.dataset, "headline": cfg.headline,
        "classes": json.dumps([str(c) for c in cfg.classes]),
        "class_names": json.dumps(list(cfg.class_names)),
    }
    for key, value in tags.items():
        client.set_registered_model_tag(name, key, value)


def register(cfg: ModelConfig, model_uri: str, *, metrics: Mapping[str, Any], split_id: str,
             run_id: str | None, data_hash: str | None = None, git_commit: str | None = None,
             alias: str | None = STAGING, extra_tags: Mapping[str, str] | None = None,
             data: Mapping[str, Any] | None = None, export: Mapping[str, Any] | None = None) -> int:
    """Create a new version of ``breastscan-<model>`` and point ``@staging`` (``alias``) at it.

    The version's description is the model card in brief
    (:func:`~breastscan.registry.modelcard.version_summary`; see :func:`version_description`).

    Version tags: ``headline`` and ``headline_value`` (plus ``headline_ci_low/high`` when
    the report has them), ``metric.<name>`` for the headline and every floored metric,
    ``split_id`` (id of the test split those metrics were computed on), ``data_hash`` and
    ``git_commit`` (default: the run's ``breastscan.data_hash`` / ``breastscan.git_commit``
    tags), ``model``, ``task``. The classic stage ``Staging`` is mirrored when MLflow still
    supports it.

    Args:
        cfg: the model's configuration.
        model_uri: URI returned by :func:`log_bundle` (``models:/m-...``) or ``runs:/...``.
        metrics: the evaluation report (``metrics.json``): metric name -> value, plus
            ``headline_value`` and optionally ``headline_ci_low``/``headline_ci_high``, ``n_test``.
        split_id: id of the test split (:func:`breastscan.data.splits.split_id`).
        run_id: the run that produced the model.
        data_hash: DVC hash of the data (default: from the run's tags).
        git_commit: code version (default: from the run's tags).
        alias: the stage the new version takes; ``None``: none (an experiment's version).
        extra_tags: more version tags (e.g. the DVC experiment that produced it).
        data: the model card's ``data`` (dataset, modality, split counts ...) for the
            description; what is missing comes from the tags and the logged contract.
        export: the ONNX export's report (``export.json`` of the evaluate stage) when the
            logged model is the one it describes: ``export.*`` tags (:func:`export_tags`) and a
            line of the description.

    Returns:
        The new version number.
    """
    from breastscan.registry.tracking import TAG_COMMIT as RUN_COMMIT
    from breastscan.registry.tracking import TAG_DATA_HASH as RUN_DATA_HASH

    client = registry_client()
    name = cfg.registered_name
    _ensure_registered_model(client, cfg)

    run_tags: dict[str, str] = {}
    if run_id and (data_hash is None or git_commit is None):
        try:
            run_tags = dict(client.get_run(run_id).data.tags)
        except MlflowException as exc:
            log.warning("run %s not readable (%s); data hash and commit unknown", run_id, exc)
    tags: dict[str, str] = {
        "model": cfg.name, "task": cfg.task, TAG_SPLIT: split_id,
        TAG_DATA_HASH: data_hash or run_tags.get(RUN_DATA_HASH, "unknown"),
        TAG_COMMIT: git_commit or run_tags.get(RUN_COMMIT, "unknown"),
        TAG_HEADLINE: cfg.headline,
    }
    headline = report_metric(metrics, cfg.headline)
    if headline is not None:
        tags[TAG_HEADLINE_VALUE] = repr(headline)
    for key in ("headline_ci_low", "headline_ci_high", "n_test"):
        value = finite_float(metrics.get(key))
        if value is not None:
            tags[key] = repr(value)
    for metric in gated_metrics(cfg):
        value = report_metric(metrics, metric)
        if value is None:
            log.warning("%s: metric %s missing from the report; gates on it will fail", name, metric)
            continue
        tags[METRIC_TAG_PREFIX + metric] = repr(value)
    if cfg.has_classes:
        tags[TAG_NEVER_PREDICTED] = ",".join(never_predicted(metrics))
    tags.update(site_tags(cfg, metrics))
    tags.update(export_tags(export))
    tags.update(extra_tags or {})

    description = version_description(cfg, model_uri, metrics, tags, data, export=export)
    model_id = logged_model_id(model_uri)
    if model_id or not model_uri.startswith("runs:/"):
        mv = client.create_model_version(name, source=model_uri, run_id=run_id, tags=tags, model_id=model_id,
                                         description=description)
    else:  # runs:/<run>/<name>: MLflow resolves it to the logged model of that run
        mv = mlflow.register_model(model_uri, name, tags=tags)
        client.update_model_version(name, str(mv.version), description=description)
    version = int(mv.version)
    stage = None
    if alias is not None:
        client.set_registered_model_alias(name, alias, str(version))
        stage = mirror_stage(client, name, version, alias)
    log.info("registered %s v%d %s%s (%s = %s)", name, version, f"as @{alias}" if alias else "with no stage",
             f" (classic stage {stage})" if stage else "", cfg.headline, fmt_number(headline))
    return version


def version_description(cfg: ModelConfig, model_uri: str, metrics: Mapping[str, Any],
                        tags: Mapping[str, str], data: Mapping[str, Any] | None = None, *,
                        export: Mapping[str, Any] | None = None) -> str:
    """A version's description: :func:`~breastscan.registry.modelcard.version_summary` of its report
    (and of its ONNX export's check, ``export``).

    The card's ``data`` is ``data`` where given, completed by the version's tags (dataset,
    test split id, data hash) and the modality of the contract logged with the model.
    """
    contract = logged_contract(model_uri)
    facts: dict[str, Any] = {"dataset": cfg.dataset, "split_id": tags.get(TAG_SPLIT)}
    if tags.get(TAG_DATA_HASH) not in (None, "unknown"):
        facts["data_hash"] = tags[TAG_DATA_HASH]
    if contract is not None:
        facts["modality"] = contract.modality
    return version_summary(cfg, metrics, data={**facts, **(data or {})}, contract=contract, export=export)


def logged_contract(model_uri: str) -> ModelContract | None:
    """The contract :func:`log_bundle` stored in a logged model's metadata (only ``MLmodel`` is
    read), or ``None`` when the model has none or cannot be read."""
    from breastscan.bundle import ModelContract

    try:
        found = (mlflow.models.get_model_info(model_uri).metadata or {}).get("contract")
        return ModelContract.from_dict(dict(found)) if isinstance(found, Mapping) else None
    except Exception as exc:  # a description without the contract's facts is still a description
        log.debug("no contract readable from %s (%s)", model_uri, exc)
        return None


def set_stage_note(client: MlflowClient, name: str, version: int | str, note: str) -> str:
    """Put ``note`` after :data:`STAGE_NOTE_MARKER` in a version's description (replacing the
    note before it; the text before the marker, the card in brief, is kept).

    Returns:
        The description written (at most :data:`DESCRIPTION_LIMIT` characters).
    """
    current = client.get_model_version(name, str(version)).description or ""
    base = current.split(STAGE_NOTE_MARKER, 1)[0][: DESCRIPTION_LIMIT - 1000]  # the note keeps ~1000
    room = DESCRIPTION_LIMIT - len(base) - len(STAGE_NOTE_MARKER)
    text = base + STAGE_NOTE_MARKER + (note if len(note) <= room else note[: room - 3] + "...")
    client.update_model_version(name, str(version), description=text)
    return text


def site_tags(cfg: ModelConfig, metrics: Mapping[str, Any]) -> dict[str, str]:
    """``site.<site>.<headline>`` version tags of a model trained on a pool: each site's headline value.

    Args:
        cfg: the model's configuration (its headline).
        metrics: the evaluation report; a pool's carries ``sites`` (site -> metrics).
    """
    out: dict[str, str] = {}
    for site, site_metrics in sorted((metrics.get("sites") or {}).items()):
        value = report_metric(site_metrics, cfg.headline)
        if value is not None:
            out[f"{TAG_SITE_PREFIX}{site}.{cfg.headline}"] = repr(value)
    return out


def export_tags(export: Mapping[str, Any] | None) -> dict[str, str]:
    """Version tags of the ONNX export's check (none without a report).

    Args:
        export: ``export.json`` (:meth:`breastscan.exported.ExportInfo.to_dict`).

    Returns:
        ``export.runtime`` (``onnx`` when the export passed and travels with the model, else
        ``keras``), ``export.passed`` (``true``/``false``), and where the check has them
        ``export.max_prob_diff`` (largest served probability difference, classes or mask
        pixels), ``export.decision_agreement``, ``export.mask_dice_min``; ``export.error``
        when the model could not be exported.
    """
    if not export:
        return {}
    check = export.get("equivalence") or {}
    passed = bool(export.get("passed"))
    tags = {f"{TAG_EXPORT_PREFIX}runtime": "onnx" if passed else "keras",
            f"{TAG_EXPORT_PREFIX}passed": str(passed).lower()}
    diffs = [v for v in (finite_float(check.get(k)) for k in ("max_prob_diff", "max_mask_prob_diff"))
             if v is not None]
    if diffs:
        tags[f"{TAG_EXPORT_PREFIX}max_prob_diff"] = repr(max(diffs))
    for key in ("decision_agreement", "mask_dice_min"):
        value = finite_float(check.get(key))
        if value is not None:
            tags[f"{TAG_EXPORT_PREFIX}{key}"] = repr(value)
    if check.get("error"):
        tags[f"{TAG_EXPORT_PREFIX}error"] = str(check["error"])[:500]
    return tags


def _site_values(tags: Mapping[str, str]) -> str:
    """``busbra 0.884, busi 0.912``: the per-site headline values of :func:`site_tags`."""
    pairs = [(key[len(TAG_SITE_PREFIX):].split(".", 1)[0], finite_float(value))
             for key, value in sorted(tags.items()) if key.startswith(TAG_SITE_PREFIX)]
    return ", ".join(f"{site} {fmt_number(value)}" for site, value in pairs)


def version_split_id(cfg: ModelConfig, version: int | None = None, *, alias: str = STAGING) -> str | None:
    """The ``split_id`` tag of a version (``None``: the version holding ``alias``).

    Returns:
        The id, or ``None`` when the version does not exist or has no such tag.
    """
    try:
        mv = get_version(registry_client(), cfg.registered_name, version, alias)
    except RegistryError:
        return None
    return (mv.tags or {}).get(TAG_SPLIT)


# --------------------------------------------------------------------------- list


def _paged(fetch: Callable[[str | None], Any]) -> Iterator[Any]:
    token: str | None = None
    while True:
        page = fetch(token)
        yield from page
        token = getattr(page, "token", None)
        if not token:
            return


def model_versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    """Every version of a registered model, with its tags (all pages)."""
    quoted = name.replace("'", "''")
    return list(_paged(lambda token: client.search_model_versions(filter_string=f"name = '{quoted}'",
                                                                  page_token=token)))


def list_models(prefix: str = "breastscan-") -> list[dict[str, Any]]:
    """Every version of every registered model whose name starts with ``prefix``.

    Returns:
        Rows sorted by name, newest version first: ``name``, ``version`` (int), ``aliases``
        (list), ``stage`` (classic stage or ``None``), ``headline`` (metric name),
        ``value`` (its value or ``None``), ``sites`` (each site's headline value, a model
        trained on a pool; else empty), ``split_id``, ``created`` (UTC ISO time), ``run_id``.
    """
    client = registry_client()
    pattern = prefix.replace("'", "''")
    models = [m for m in _paged(lambda t: client.search_registered_models(
        filter_string=f"name LIKE '{pattern}%'", page_token=t)) if m.name.startswith(prefix)]
    rows: list[dict[str, Any]] = []
    for rm in sorted(models, key=lambda m: m.name):
        by_version: dict[str, list[str]] = {}
        for alias, v in (rm.aliases or {}).items():
            by_version.setdefault(str(v), []).append(alias)
        versions = model_versions(client, rm.name)
        for mv in sorted(versions, key=lambda v: int(v.version), reverse=True):
            tags = mv.tags or {}
            stage = mv.current_stage if mv.current_stage and mv.current_stage != "None" else None
            created = datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=timezone.utc)
            rows.append({
                "name": rm.name, "version": int(mv.version),
                "aliases": sorted(by_version.get(str(mv.version), [])),
                "stage": stage, "headline": tags.get(TAG_HEADLINE),
                "value": finite_float(tags.get(TAG_HEADLINE_VALUE)),
                "sites": _site_values(tags),
                "split_id": tags.get(TAG_SPLIT), "created": created.isoformat(timespec="seconds"),
                "run_id": mv.run_id,
            })
    return rows
