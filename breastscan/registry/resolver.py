"""The one registry resolver: a model reference to one immutable version, downloaded by version.

``tumor``, ``breastscan-tumor``, ``tumor@staging`` (an alias; ``production`` by default)
or ``tumor/3`` (a version) resolve to exactly one registry version (:func:`resolve`); its
bundle is then downloaded **by version number** (:func:`fetch`), so an alias moved
meanwhile can never mix two versions. Evaluation, external evaluation, promotion and the
import of models for serving all resolve through here.

Uses the MLflow registry MLflow is configured with (``MLFLOW_TRACKING_URI`` /
``MLFLOW_REGISTRY_URI``, or :func:`breastscan.registry.tracking.configure`).
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from breastscan.bundle import ModelContract, read_contract
from breastscan.imaging.preprocessing import PreprocessSpec

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

    from breastscan.bundle import ModelBundle

log = logging.getLogger(__name__)

REGISTERED_PREFIX = "breastscan-"
"""Prefix of every registered model (and BentoML store) name."""
DEFAULT_ALIAS = "production"
"""Stage (alias) a reference without ``@stage`` or ``/version`` resolves to."""
BUNDLE_ARTIFACT = "bundle"
"""Name of the bundle directory among a logged pyfunc model's artifacts."""

_REF = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*?)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>\d+))?$")


class RegistryError(LookupError):
    """A registered model, alias or version does not exist (or a promotion cannot proceed)."""


@dataclass(frozen=True)
class ModelRef:
    """A model named by a person or a config.

    Attributes:
        name: the model's name in params.yaml (``tumor``).
        registered_name: its registry name (``breastscan-tumor``).
        version: the version asked for, or ``None``.
        alias: the stage (alias) asked for, ``None`` when a version is given.
    """

    name: str
    registered_name: str
    version: int | None
    alias: str | None

    def __str__(self) -> str:
        return f"{self.name}/{self.version}" if self.version is not None else f"{self.name}@{self.alias}"


def parse_model_ref(text: str, default_alias: str = DEFAULT_ALIAS) -> ModelRef:
    """Parse ``NAME``, ``NAME@STAGE`` or ``NAME/VERSION`` (NAME with or without ``breastscan-``).

    Raises:
        ValueError: the text is not of that form (or the version is 0).
    """
    match = _REF.match(text.strip())
    if not match:
        raise ValueError(f"model reference {text!r} is not NAME, NAME@STAGE or NAME/VERSION "
                         "(e.g. tumor, tumor@staging, tumor/3)")
    name = match["name"]
    short = name[len(REGISTERED_PREFIX):] if name.startswith(REGISTERED_PREFIX) else name
    if not short:
        raise ValueError(f"model reference {text!r} has no model name")
    version = int(match["version"]) if match["version"] is not None else None
    if version is not None and version < 1:
        raise ValueError(f"model reference {text!r}: registry versions start at 1")
    alias = None if version is not None else (match["alias"] or default_alias)
    return ModelRef(name=short, registered_name=REGISTERED_PREFIX + short, version=version, alias=alias)


# --------------------------------------------------------------------------- lookups


def is_missing(exc: MlflowException) -> bool:
    """The MLflow error says the model, version or alias does not exist."""
    return exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")


def alias_holder(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version holding ``@alias`` of a registered model, ``None`` when none does."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if is_missing(exc):
            return None
        raise


def get_version(client: MlflowClient, name: str, version: int | None, alias: str) -> ModelVersion:
    """Version ``version`` of a registered model, or the one holding ``@alias`` when ``None``.

    Raises:
        RegistryError: no such model, version or alias.
    """
    if version is None:
        mv = alias_holder(client, name, alias)
        if mv is None:
            raise RegistryError(f"{name} has no version with alias @{alias} in {mlflow.get_registry_uri()}; "
                                f"register one first (the register stage) or pass a version")
        return mv
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if is_missing(exc):
            raise RegistryError(f"{name} has no version {version} in {mlflow.get_registry_uri()}") from None
        raise


def registered_names(prefix: str = REGISTERED_PREFIX) -> list[str]:
    """Registered model names with ``prefix`` (``[]`` when the registry cannot be listed)."""
    try:
        models = MlflowClient().search_registered_models(filter_string=f"name LIKE '{prefix}%'")
    except Exception as exc:  # only used to enrich error messages
        log.debug("could not list registered models: %s", exc)
        return []
    return sorted(m.name for m in models)


@dataclass(frozen=True)
class ResolvedVersion:
    """One registry version, as resolved (immutable: later alias moves do not change it).

    Attributes:
        ref: what was asked for.
        version: the registry version it resolved to.
        aliases: every alias (stage) that version held when resolved.
        run_id: the MLflow run that produced it (``None`` if not recorded).
        source: the version's source URI.
        tags: the version's tags (headline, split id, gated metrics ...).
    """

    ref: ModelRef
    version: int
    aliases: tuple[str, ...]
    run_id: str | None
    source: str | None
    tags: dict[str, str]

    @property
    def uri(self) -> str:
        """``models:/<registered name>/<version>``: this version, whatever the aliases do."""
        return f"models:/{self.ref.registered_name}/{self.version}"


def resolve(ref: ModelRef | str, client: MlflowClient | None = None) -> ResolvedVersion:
    """Resolve a reference to one version (no download).

    Raises:
        ValueError: a malformed reference.
        RegistryError: no such model, alias or version; the message lists the registered
            breastscan models.
    """
    ref = parse_model_ref(ref) if isinstance(ref, str) else ref
    client = client or MlflowClient()
    try:
        mv = get_version(client, ref.registered_name, ref.version, ref.alias or DEFAULT_ALIAS)
    except RegistryError as exc:
        known = [n[len(REGISTERED_PREFIX):] for n in registered_names()]
        raise RegistryError(f"{exc}. Registered breastscan models: {', '.join(known) or 'none'}") from None
    try:
        holders = client.get_registered_model(ref.registered_name).aliases or {}
    except MlflowException as exc:  # aliases are informative only
        log.warning("could not read the aliases of %s: %s", ref.registered_name, exc)
        holders = {}
    aliases = tuple(sorted(a for a, v in holders.items() if str(v) == str(mv.version)))
    return ResolvedVersion(ref=ref, version=int(mv.version), aliases=aliases, run_id=mv.run_id or None,
                           source=mv.source, tags=dict(mv.tags or {}))


# --------------------------------------------------------------------------- downloads


def download_uri(uri: str, dst: Path | None = None) -> Path:
    """Download a logged breastscan model (any MLflow model URI) and return its bundle directory.

    Args:
        uri: ``models:/<name>/<version>``, ``models:/m-<id>``, ``runs:/...`` ...
        dst: download directory (default: a new temporary directory, left to the caller).

    Returns:
        The directory holding ``model.keras``, ``preprocess.json`` and ``contract.json``.

    Raises:
        RegistryError: the URI does not resolve.
        FileNotFoundError: what it names is not a breastscan bundle.
    """
    from mlflow.models import Model

    target = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="breastscan-bundle-"))
    target.mkdir(parents=True, exist_ok=True)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target)))
    except MlflowException as exc:
        if is_missing(exc):
            raise RegistryError(f"cannot resolve {uri}: {exc.message}") from None
        raise
    conf = Model.load(str(local / "MLmodel")).flavors.get("python_function", {})
    rel = (conf.get("artifacts") or {}).get(BUNDLE_ARTIFACT, {}).get("path", f"artifacts/{BUNDLE_ARTIFACT}")
    bundle_dir = local / rel
    read_contract(bundle_dir)  # fails clearly if this is not a breastscan bundle
    return bundle_dir


@dataclass(frozen=True)
class FetchedModel:
    """A resolved version and its downloaded bundle (contract and spec read without Keras)."""

    resolved: ResolvedVersion
    bundle_dir: Path
    contract: ModelContract
    spec: PreprocessSpec

    def load_bundle(self, runtime: str = "keras") -> ModelBundle:
        """Load the model with its spec and contract: Keras (imports TensorFlow), or its
        checked export (``runtime`` ``onnx``/``auto``; :meth:`breastscan.bundle.ModelBundle.load`)."""
        from breastscan.bundle import ModelBundle

        return ModelBundle.load(self.bundle_dir, runtime=runtime)


def fetch(ref: ModelRef | str, dst: Path | None = None) -> FetchedModel:
    """Resolve a reference and download that version's bundle, by version number.

    Raises:
        ValueError: a malformed reference.
        RegistryError: no such model, alias or version.
    """
    resolved = resolve(ref)
    bundle_dir = download_uri(resolved.uri, dst)
    log.info("%s resolved to %s v%d (aliases: %s, run %s)", resolved.ref, resolved.ref.registered_name,
             resolved.version, ", ".join(resolved.aliases) or "none", resolved.run_id)
    return FetchedModel(resolved=resolved, bundle_dir=bundle_dir, contract=read_contract(bundle_dir),
                        spec=PreprocessSpec.load(bundle_dir))


def load_bundle(ref: ModelRef | str, *, runtime: str = "keras") -> ModelBundle:
    """Resolve, download (to a temporary directory) and load a registered model's bundle.

    ``ref`` may also be a model URI (``models:/...``, ``runs:/...``), loaded as it is.
    ``runtime`` as in :meth:`FetchedModel.load_bundle`.
    """
    return fetch_and_load(ref, runtime=runtime)[1]


def fetch_and_load(ref: ModelRef | str, *, runtime: str = "keras") -> tuple[FetchedModel | None, ModelBundle]:
    """:func:`fetch` (``None`` for a model URI, downloaded as it is) and load the bundle.

    A Keras bundle is read whole and its download removed at once; a bundle run by its export
    keeps its download while the model lives (its Keras model is read there on demand, for
    Grad-CAM), removed when the model is collected.
    """
    tmp = Path(tempfile.mkdtemp(prefix="breastscan-bundle-"))
    try:
        if isinstance(ref, str) and ":/" in ref:
            from breastscan.bundle import ModelBundle

            fetched, bundle = None, ModelBundle.load(download_uri(ref, tmp), runtime=runtime)
        else:
            fetched = fetch(ref, tmp)
            bundle = fetched.load_bundle(runtime)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    from breastscan.exported import OnnxModel

    if isinstance(bundle.model, OnnxModel):
        weakref.finalize(bundle.model.session, shutil.rmtree, tmp, True)  # views share the session
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return fetched, bundle
