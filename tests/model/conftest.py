"""Which registered models the behavioural tests run against, and loading them once.

Each ``--model-uri`` (option added by :mod:`tests.model.plugin`) is resolved at collection
to **one** registry version and its bundle downloaded once, by version number, through the
project's resolver (:func:`breastscan.registry.resolver.fetch`, what
:func:`~breastscan.registry.resolver.load_bundle` is made of): the contract read from that
download decides which tests the model gets, and the same download is the model tested, so
an alias moved during the session cannot mix two versions. Reading a contract needs no
Keras; the Keras model is loaded once per session, on first use.

A test asks for a model through one of the fixtures of :data:`FITS` (``density_model``,
``tumor_model``, ``lesion_model``) and is parametrised over the given models whose
contract fits; with no ``--model-uri``, or none that fits, it is skipped with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from breastscan.labels import MODALITIES as PHANTOM_MODALITIES  # what breastscan.data.phantoms draws
from tests.conftest import REPO
from tests.model.plugin import OPTION, model_refs, model_store

if TYPE_CHECKING:
    from breastscan.bundle import ModelBundle, ModelContract

def _is_int(text: str) -> bool:
    return re.fullmatch(r"-?\d+", str(text)) is not None


def fits_density(c: ModelContract) -> bool:
    """A BI-RADS density classifier on mammograms (integer density levels as classes)."""
    return (c.task == "classification" and c.label == "density" and c.modality == "mammography"
            and len(c.classes) >= 2 and all(_is_int(k) for k in c.classes))


def fits_tumor(c: ModelContract) -> bool:
    """A pathology classifier with a ``malignant`` class, on a modality the phantoms cover."""
    return (c.task == "classification" and c.label == "pathology" and "malignant" in c.classes
            and c.modality in PHANTOM_MODALITIES)


def fits_lesion(c: ModelContract) -> bool:
    """A lesion segmenter on a modality the phantoms cover."""
    return c.task == "segmentation" and c.modality in PHANTOM_MODALITIES


FITS: dict[str, tuple[Callable[[ModelContract], bool], str]] = {
    "density_model": (fits_density, "a BI-RADS density classifier on mammography"),
    "tumor_model": (fits_tumor, "a pathology classifier with a malignant class"),
    "lesion_model": (fits_lesion, "a lesion segmenter"),
}
"""Fixture name -> (contract predicate, what it asks for, for the skip reason)."""


@dataclass(frozen=True)
class GivenModel:
    """One ``--model-uri``, resolved and downloaded.

    Attributes:
        ref: the value as given on the command line (the test id).
        resolved: what it resolved to (``models:/breastscan-density/1``), or the URI itself
            when it is not a registry reference.
        bundle_dir: the downloaded bundle.
        contract: its contract.
    """

    ref: str
    resolved: str
    bundle_dir: Path
    contract: ModelContract

    def describe(self) -> str:
        c = self.contract
        return f"{self.ref} ({c.task}, label {c.label}, {c.modality})"


_REGISTRY_URI = re.compile(r"^models:/(?P<ref>breastscan-[^/@]+(?:@[^/@]+|/\d+)?)$")


def fetch_given(ref: str, dst: Path) -> GivenModel:
    """Resolve and download one ``--model-uri`` value into ``dst``.

    ``models:/breastscan-NAME@ALIAS`` (or ``/VERSION``) and the short forms go through the
    resolver (one version, downloaded by number); any other URI is downloaded as it is.

    Raises:
        pytest.UsageError: the reference is malformed, or names no model or no bundle.
    """
    from mlflow.exceptions import MlflowException

    from breastscan.bundle import read_contract
    from breastscan.registry.resolver import RegistryError, download_uri, fetch

    text = ref.strip()
    match = _REGISTRY_URI.match(text)
    try:
        if match or ":/" not in text:
            fetched = fetch(match["ref"] if match else text, dst)
            return GivenModel(ref, fetched.resolved.uri, fetched.bundle_dir, fetched.contract)
        bundle_dir = download_uri(text, dst)
        return GivenModel(ref, text, bundle_dir, read_contract(bundle_dir))
    except (ValueError, LookupError, RegistryError, FileNotFoundError, MlflowException) as exc:
        raise pytest.UsageError(f"{OPTION} {ref}: {exc}") from None


_GIVEN = pytest.StashKey[list[GivenModel]]()


def given_models(config: pytest.Config) -> list[GivenModel]:
    """Every ``--model-uri``, fetched on first call (only when tests/model is collected)."""
    if _GIVEN not in config.stash:
        refs = model_refs(config) or []
        root = Path(tempfile.mkdtemp(prefix="breastscan-model-tests-"))
        config.add_cleanup(lambda: shutil.rmtree(root, ignore_errors=True))
        with _registry(config):
            config.stash[_GIVEN] = [fetch_given(ref, root / f"m{i}") for i, ref in enumerate(refs)]
    return config.stash[_GIVEN]


@contextmanager
def _registry(config: pytest.Config) -> Iterator[None]:
    """MLflow pointed at the models' store while they are fetched, and restored afterwards.

    The store is ``--model-store``, else ``$MLFLOW_TRACKING_URI``, else the project's own
    (``sqlite:///<repo>/mlflow.db``, where ``make demo`` registers); nothing else in the
    session sees it.
    """
    import mlflow

    from breastscan.registry.tracking import tracking_uri

    uri = model_store(config) or os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri(REPO)
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    os.environ["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_REGISTRY_URI"] = uri
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])  # type: ignore[arg-type]
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])  # type: ignore[arg-type]
        for key, value in saved.items():  # MLflow 3 mirrors the URIs into the environment
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    for fixture, (fits, wanted) in FITS.items():
        if fixture not in metafunc.fixturenames:
            continue
        refs = model_refs(metafunc.config)
        if not refs:
            reason = f"no {OPTION} given"
            if refs is None:
                reason += " (the option comes from tests.model.plugin: pytest -p tests.model.plugin)"
            params = [pytest.param(None, marks=pytest.mark.skip(reason=reason), id="no-model")]
        else:
            given = given_models(metafunc.config)
            params = [pytest.param(g, id=g.ref) for g in given if fits(g.contract)]
            if not params:
                names = "; ".join(g.describe() for g in given)
                params = [pytest.param(None, id="no-fitting-model", marks=pytest.mark.skip(
                    reason=f"no {OPTION} names {wanted} (given: {names})"))]
        metafunc.parametrize(fixture, params, indirect=True)


@pytest.fixture(scope="session")
def loaded_bundles() -> dict[Path, ModelBundle]:
    """Keras bundles loaded this session, by download directory (each model loads once)."""
    return {}


def _bundle(request: pytest.FixtureRequest, loaded: dict[Path, ModelBundle]) -> ModelBundle:
    given: GivenModel = request.param
    if given.bundle_dir not in loaded:
        from breastscan.bundle import ModelBundle

        loaded[given.bundle_dir] = ModelBundle.load(given.bundle_dir)
    bundle = loaded[given.bundle_dir]
    request.node.user_properties.append(("model", given.resolved))
    return bundle


@pytest.fixture
def density_model(request: pytest.FixtureRequest, loaded_bundles: dict[Path, ModelBundle]) -> ModelBundle:
    """A density classifier named by ``--model-uri`` (one test per fitting model)."""
    return _bundle(request, loaded_bundles)


@pytest.fixture
def tumor_model(request: pytest.FixtureRequest, loaded_bundles: dict[Path, ModelBundle]) -> ModelBundle:
    """A pathology classifier named by ``--model-uri`` (one test per fitting model)."""
    return _bundle(request, loaded_bundles)


@pytest.fixture
def lesion_model(request: pytest.FixtureRequest, loaded_bundles: dict[Path, ModelBundle]) -> ModelBundle:
    """A lesion segmenter named by ``--model-uri`` (one test per fitting model)."""
    return _bundle(request, loaded_bundles)
