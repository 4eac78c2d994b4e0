"""The web UI at ``/ui`` in a real browser (Debian's Chromium driven by Playwright) against the
real service: the models table, a mammogram with Grad-CAM, its lesion mask and the
8-category view (the shown answer equal to the HTTP API's), an ultrasound DICOM with the
modality read from its header (a segmenter's card and a multi-task model's, classes and mask),
a region of interest dragged on the canvas, and an API error shown without breaking the page.
Every test also checks that the page logged no console error and asked no host but the
service's (loopback) for anything: no CDN, no framework download.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import pytest

from tests.services import images
from tests.services.conftest import Served
from tests.services.make_registry import MODELS

pytestmark = [pytest.mark.slow, pytest.mark.service]

# Debian's Chromium (Playwright's own browsers cannot be downloaded here); BREASTSCAN_CHROMIUM names another.
CHROMIUM = Path(os.environ.get("BREASTSCAN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium")
# Set by `make test` (its BROWSER variable): "require", a missing browser fails the tests
# (`make test` installs it first); "skip", they are skipped. Unset (a plain pytest run): skipped
# when the browser is missing, with the reason, except under CI (fail).
BROWSER_TESTS = os.environ.get("BREASTSCAN_BROWSER_TESTS", "")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
LOCAL_SCHEMES = {"data", "blob", "about"}
TIMEOUT_MS = 30_000
RESULTS_SCREENSHOT = Path("/tmp/ui_results.png")
# Chromium logs every 4xx answer to fetch() as a console error; expected where a test sends a
# bad file on purpose, nowhere else.
HTTP_4XX_LOG = re.compile(r"^Failed to load resource: the server responded with a status of 4\d\d\b")
CLASSIFIERS = ("density", "tumor")
MAMMOGRAPHY_MODELS = ("density", "mammo_lesion", "tumor")  # what /analyze runs on a mammogram
SERVED = sorted(MODELS)  # tests.services.make_registry's, in name order


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session", autouse=True)
def _chromium_present() -> None:
    """Skip, or fail (see BROWSER_TESTS), without a browser.

    Session-scoped (autouse, this module only) so that it runs before the session's service
    is started for nothing.
    """
    if BROWSER_TESTS == "skip":
        pytest.skip("web UI NOT tested in a browser: skipped on purpose (make test BROWSER=skip)")
    if not CHROMIUM.exists():
        reason = (f"{CHROMIUM} is missing: the UI tests need Debian's chromium (as root: apt-get "
                  f"install --no-install-recommends chromium; `make test` installs it) or "
                  f"BREASTSCAN_CHROMIUM naming another")
        if BROWSER_TESTS == "require" or os.environ.get("CI"):
            pytest.fail(f"{reason}; `make test BROWSER=skip` to skip these tests", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium (Debian's: Playwright's own browsers cannot be downloaded here).

    Module-scoped on purpose: Playwright's sync API keeps an event loop marked as running on
    the main thread while it is open, which would break ``asyncio.run`` in later test modules.
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class UI:
    """A fresh page on the service, with what it logged and asked for."""

    page: Any
    service: Served
    console_errors: list[str] = field(default_factory=list)
    foreign_requests: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def record(self, request: Any) -> None:
        """Note a request the page made (and whether it left this machine)."""
        url = urlsplit(request.url)
        self.requests.append(f"{request.method} {url.path}")
        if url.scheme not in LOCAL_SCHEMES and url.hostname not in LOOPBACK_HOSTS:
            self.foreign_requests.append(request.url)

    def open(self) -> None:
        """Load ``/ui/`` and wait for the models table."""
        self.page.goto(f"{self.service.http_url}/ui/")
        self.page.locator("#models tbody tr[data-model]").first.wait_for()

    def choose_file(self, path: Path) -> None:
        """Pick a file and wait until its preview (or the error box) is shown."""
        self.page.set_input_files("#file", str(path))
        self.page.locator("#canvas:not([hidden]), #error:not([hidden])").first.wait_for()
        self.page.locator("#busy").wait_for(state="hidden")

    def analyze(self) -> None:
        """Click Analyze and wait until the answer (or an error) is shown."""
        self.page.click("#analyze")
        self.page.locator("#results .summary, #error:not([hidden])").first.wait_for()
        self.page.locator("#busy").wait_for(state="hidden")

    def card(self, model: str) -> Any:
        return self.page.locator(f'.model-card[data-model="{model}"]')

    def image_loaded(self, selector: str) -> bool:
        """Whether the <img> ``selector`` has finished loading a real image."""
        self.page.wait_for_function(
            "sel => { const i = document.querySelector(sel); return i && i.complete; }", arg=selector)
        return bool(self.page.eval_on_selector(selector, "i => i.naturalWidth > 0 && i.naturalHeight > 0"))

    def assert_clean(self, *, bad_requests_expected: bool = False) -> None:
        """No console error or page error; no request to any host but loopback."""
        errors = [e for e in self.console_errors if not (bad_requests_expected and HTTP_4XX_LOG.match(e))]
        assert errors == [], f"console errors: {errors}"
        assert self.foreign_requests == [], f"requests off this machine: {self.foreign_requests}"


_U = TypeVar("_U", bound="UI")


@contextlib.contextmanager
def open_page(browser: Any, make: Callable[[Any], _U]) -> Iterator[_U]:
    """A page in a fresh browser context, 1280x900, its console and requests recorded."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    handle = make(page)
    page.on("console", lambda m: handle.console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: handle.console_errors.append(f"page error: {exc}"))
    page.on("request", handle.record)
    try:
        yield handle
    finally:
        context.close()


@pytest.fixture
def ui(browser: Any, service: Served) -> Iterator[UI]:
    """A page on the session's service (:func:`open_page`)."""
    with open_page(browser, lambda page: UI(page, service)) as handle:
        yield handle


def api_analyze(service: Served, path: Path, **fields: str) -> httpx.Response:
    return httpx.post(f"{service.http_url}/analyze", files={"image": (path.name, path.read_bytes())},
                      data=fields, timeout=60)


def check_segmentation_card(ui: UI, name: str, expected: dict[str, Any], task: str = "segmentation") -> None:
    """The card of segmenter ``name`` (or of a multi-task model, ``task``) shows its answer
    ``expected``: area, box, mask overlay."""
    card = ui.card(name)
    assert card.get_attribute("data-task") == task
    assert card.locator("[data-testid=version]").inner_text() == "version 1"
    assert card.locator("[data-testid=stage]").inner_text() == "production"
    assert card.locator("[data-testid=size]").inner_text() == f"{expected['width']} × {expected['height']} px"
    area = card.locator("[data-testid=lesion-area]").inner_text()
    assert area == (f"{expected['lesion_area_px']:,} px" if expected["lesion_area_px"] else "No lesion found")
    bbox = expected["bbox"]
    assert card.locator("[data-testid=bbox]").inner_text() == (
        f"x {bbox[0]}, y {bbox[1]}, {bbox[2]}×{bbox[3]} px" if bbox else "none")
    assert ui.image_loaded(f'.model-card[data-model="{name}"] img[data-testid=mask-overlay]')


def percents(card: Any) -> dict[str, float]:
    """The class -> shown percent of a classifier's card, in the order shown."""
    shown = {}
    for row in card.locator(".prob").all():
        shown[row.get_attribute("data-class")] = float(
            row.locator("[data-testid=prob-value]").inner_text().replace("%", "").strip())
    return shown


@pytest.fixture
def mammogram_file(tmp_path: Path) -> Path:
    path = tmp_path / "mammogram.png"
    path.write_bytes(images.png(images.mammogram(1)))
    return path


# --------------------------------------------------------------------------- tests


def test_models_table_lists_the_production_versions(ui: UI) -> None:
    ui.open()
    page = ui.page
    rows = page.locator("#models tbody tr[data-model]")
    assert sorted(r.get_attribute("data-model") for r in rows.all()) == SERVED
    for name in SERVED:
        row = page.locator(f'#models tr[data-model="{name}"]')
        assert row.locator("[data-field=version]").inner_text().strip() == "1"
        assert row.locator("[data-field=stage]").inner_text().strip() == "production"
    assert page.locator('#models tr[data-model="density"] [data-field=classes]').inner_text() == "A, B, C, D"
    for name in ("lesion", "mammo_lesion", "us_mt"):
        task = page.locator(f'#models tr[data-model="{name}"] [data-field=task]')
        assert task.inner_text() == MODELS[name]["task"]
    assert "Research use only — not for diagnosis" in page.locator("#disclaimer").inner_text()
    assert page.locator("#disclaimer").is_visible()
    assert page.locator("#error").is_hidden()
    assert page.locator("#analyze").is_disabled()  # nothing chosen yet
    # the page's own assets and the API, nothing else
    assert {"GET /ui/", "GET /ui/app.js", "GET /ui/style.css", "POST /models"} <= set(ui.requests)
    ui.assert_clean()


def test_mammogram_with_gradcam_shows_the_apis_answer(ui: UI, mammogram_file: Path, tmp_path: Path) -> None:
    ui.open()
    page = ui.page
    ui.choose_file(mammogram_file)
    assert "128 × 160 px" in page.locator("#image-info").inner_text()
    # a PNG does not say its modality: on auto the page asks instead of sending the request
    assert page.input_value("#modality") == "auto"
    page.click("#analyze")
    assert "Choose the modality" in page.locator("#error-message").inner_text()
    assert "POST /analyze" not in ui.requests

    page.select_option("#modality", "mammography")
    page.check("#explain")
    ui.analyze()
    assert page.locator("#error").is_hidden()

    expected = api_analyze(ui.service, mammogram_file, modality="mammography", explain="true").json()
    assert sorted(expected["models"]) == list(MAMMOGRAPHY_MODELS)
    assert page.locator("[data-testid=result-modality]").inner_text() == "mammography"
    cards = [c.get_attribute("data-model") for c in page.locator(".model-card").all()]
    assert cards == list(MAMMOGRAPHY_MODELS)  # in name order, the segmenter's card among them
    check_segmentation_card(ui, "mammo_lesion", expected["models"]["mammo_lesion"])
    for name in CLASSIFIERS:
        card, answer = ui.card(name), expected["models"][name]
        assert card.is_visible()
        assert card.locator("[data-testid=version]").inner_text() == "version 1"
        assert card.locator("[data-testid=stage]").inner_text() == "production"
        assert card.locator("[data-testid=spec-id]").inner_text() == answer["spec_id"]
        assert card.locator("[data-testid=size]").inner_text() == "128 × 160 px"
        shown = percents(card)
        assert list(shown) == list(answer["probabilities"])  # every class, in the model's order
        assert sum(shown.values()) == pytest.approx(100.0, abs=0.3)
        for cls, p in answer["probabilities"].items():
            assert shown[cls] == pytest.approx(100 * p, abs=0.051)
            data_p = card.locator(f'.prob[data-class="{cls}"]').get_attribute("data-p")
            assert float(data_p) == pytest.approx(p, abs=1e-6)
        assert card.locator("[data-testid=predicted]").inner_text() == answer["predicted"]
        assert card.locator("[data-testid=decision]").count() == 0  # arg-max models state no rule
        assert card.locator(".prob.is-predicted").get_attribute("data-class") == answer["predicted"]
        assert ui.image_loaded(f'.model-card[data-model="{name}"] img[data-testid=gradcam]')

    eight = page.locator("#eight-category")
    assert eight.is_visible()
    view = expected["eight_category"]
    category = view["category"]
    # The card leads with the tumor model's finding; the category is given as conditional.
    headline = eight.locator("[data-testid=finding-headline]").inner_text()
    assert headline.startswith(f"Finding: {view['finding']}")
    finding_p = expected["models"]["tumor"]["probabilities"][view["finding"]]
    shown_p = float(headline.split(view["finding"], 1)[1].split("%", 1)[0])
    assert shown_p == pytest.approx(100 * finding_p, abs=0.051)  # the tumor model's own probability
    assert eight.locator("[data-testid=category]").inner_text() == category
    assert "conditional on a lesion" in eight.locator("[data-testid=conditional]").inner_text()
    assert eight.locator("td[data-category]").count() == 8
    assert eight.locator("td.is-predicted").get_attribute("data-category") == category
    assert "Research use only — not for diagnosis" in page.locator("#results").inner_text()

    page.screenshot(path=str(tmp_path / "results.png"), full_page=True)
    page.screenshot(path=str(RESULTS_SCREENSHOT), full_page=True)
    assert (tmp_path / "results.png").stat().st_size > 10_000
    ui.assert_clean()


def test_ultrasound_dicom_modality_from_its_header(ui: UI, tmp_path: Path) -> None:
    path = tmp_path / "ultrasound.dcm"
    path.write_bytes(images.dicom(images.ultrasound(3).astype("uint16") * 16, modality="US"))
    ui.open()
    page = ui.page
    ui.choose_file(path)  # a 16-bit DICOM: the browser shows it through /preview
    assert page.locator("#canvas").is_visible()
    assert "ultrasound" in page.locator("#modality-hint").inner_text()
    assert page.input_value("#modality") == "auto"
    ui.analyze()
    assert page.locator("#error").is_hidden()

    expected = api_analyze(ui.service, path, modality="").json()["models"]
    assert page.locator("[data-testid=result-modality]").inner_text() == "ultrasound"
    assert [c.get_attribute("data-model") for c in page.locator(".model-card").all()] == ["lesion", "us_mt"]
    assert page.locator("#eight-category").count() == 0
    check_segmentation_card(ui, "lesion", expected["lesion"])
    # the multi-task model's card: its classes (called by its decision rule) and its mask
    check_segmentation_card(ui, "us_mt", expected["us_mt"], task="multitask")
    card, answer = ui.card("us_mt"), expected["us_mt"]
    assert card.locator("[data-testid=predicted]").inner_text() == answer["predicted"]
    assert card.locator("[data-testid=decision]").inner_text().startswith("Decision rule: malignant is")
    shown = {c: 100 * p for c, p in answer["probabilities"].items()}
    assert percents(card) == pytest.approx(shown, abs=0.051)
    assert card.locator("img[data-testid=gradcam]").count() == 0
    ui.assert_clean()


def test_roi_dragged_on_the_canvas_crops_the_request(ui: UI, mammogram_file: Path) -> None:
    ui.open()
    page = ui.page
    ui.choose_file(mammogram_file)
    page.select_option("#modality", "mammography")
    box = page.locator("#canvas").bounding_box()
    assert box is not None and box["width"] > 100
    page.mouse.move(box["x"] + 0.25 * box["width"], box["y"] + 0.20 * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + 0.50 * box["width"], box["y"] + 0.40 * box["height"], steps=4)
    page.mouse.move(box["x"] + 0.75 * box["width"], box["y"] + 0.65 * box["height"], steps=4)
    page.mouse.up()
    x, y, w, h = (int(v) for v in page.input_value("#roi").split(","))
    # the canvas shows the 128 x 160 image scaled: the ROI is in the image's own pixels
    assert abs(x - 0.25 * 128) <= 1.5 and abs(y - 0.20 * 160) <= 1.5
    assert abs(w - 0.50 * 128) <= 2.5 and abs(h - 0.45 * 160) <= 2.5
    assert page.locator("#clear-roi").is_enabled()

    ui.analyze()
    assert page.locator("#error").is_hidden()
    # what the service answered: the roi it received (echoed in the answer) and the crop's size
    assert page.locator("[data-testid=result-roi]").get_attribute("data-roi") == f"{x},{y},{w},{h}"
    assert page.locator("[data-testid=result-roi]").inner_text() == f"x {x}, y {y}, {w}×{h} px"
    expected = api_analyze(ui.service, mammogram_file, modality="mammography", roi=f"{x},{y},{w},{h}").json()
    check_segmentation_card(ui, "mammo_lesion", expected["models"]["mammo_lesion"])  # the crop's mask
    for name in CLASSIFIERS:
        size = ui.card(name).locator("[data-testid=size]")
        assert size.inner_text() == f"{w} × {h} px"  # the answer is about (and sized as) the crop
        assert (size.get_attribute("data-width"), size.get_attribute("data-height")) == (str(w), str(h))
        assert percents(ui.card(name)) == pytest.approx(
            {c: 100 * p for c, p in expected["models"][name]["probabilities"].items()}, abs=0.051)

    page.click("#clear-roi")
    assert page.input_value("#roi") == ""
    ui.analyze()
    assert ui.card("tumor").locator("[data-testid=size]").inner_text() == "128 × 160 px"
    assert page.locator("[data-testid=result-roi]").inner_text() == "whole image"
    ui.assert_clean()


def test_an_api_error_is_shown_and_the_page_keeps_working(ui: UI, mammogram_file: Path,
                                                          tmp_path: Path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_bytes(b"this is a text file, not an image\n")
    refused = httpx.post(f"{ui.service.http_url}/preview", files={"image": (bad.name, bad.read_bytes())},
                         timeout=30)
    assert refused.status_code == 400
    ui.open()
    page = ui.page
    ui.choose_file(bad)
    assert page.locator("#error").is_visible()
    assert page.locator("#error-message").inner_text() == refused.json()["error"]
    assert refused.json()["code"] in page.locator("#error").inner_text()
    assert page.locator("#canvas").is_hidden()

    # analyzing it anyway: the /analyze error, shown the same way, and no stale results
    page.select_option("#modality", "mammography")
    ui.analyze()
    analyzed = api_analyze(ui.service, bad, modality="mammography")
    assert analyzed.status_code == 400
    assert page.locator("#error-message").inner_text() == analyzed.json()["error"]
    assert page.locator(".model-card").count() == 0
    assert page.locator("#results").is_visible()

    # a valid file afterwards works and clears the error
    ui.choose_file(mammogram_file)
    assert page.locator("#error").is_hidden()
    ui.analyze()
    assert page.locator("#error").is_hidden()
    assert ui.card("tumor").is_visible() and ui.card("density").is_visible()
    ui.assert_clean(bad_requests_expected=True)
    assert sum(bool(HTTP_4XX_LOG.match(e)) for e in ui.console_errors) <= 2


# --------------------------------------------------------------------------- API keys
# The service with API keys required (tests.services.auth_server), shared with test_auth.py.

pytest_plugins = ["tests.services.auth_server"]  # the auth_service fixture: one server a session

NEEDS_KEY = "This service needs an API key: enter it above."


@dataclass
class KeyedUI(UI):
    """A :class:`UI` that also records each request's path and ``X-API-Key`` (``None``: none)."""

    sent_keys: list[tuple[str, str | None]] = field(default_factory=list)

    def record(self, request: Any) -> None:
        """Note a request, and the key it carried."""
        super().record(request)
        self.sent_keys.append((urlsplit(request.url).path, request.headers.get("x-api-key")))


@pytest.fixture
def auth_ui(browser: Any, auth_service: Any) -> Iterator[KeyedUI]:
    """A page on the service that requires API keys (:func:`open_page`)."""
    with open_page(browser, lambda page: KeyedUI(page, auth_service.served)) as handle:
        yield handle


def test_the_page_asks_for_an_api_key_and_works_with_it(auth_ui: KeyedUI, auth_service: Any,
                                                        mammogram_file: Path) -> None:
    page, key = auth_ui.page, auth_service.file_key
    page.goto(f"{auth_service.http_url}/ui/")
    page.locator("#error:not([hidden])").wait_for()
    assert page.locator("#error-message").inner_text() == NEEDS_KEY
    assert "unauthorized" in page.locator("#error").inner_text()
    assert NEEDS_KEY in page.locator("#models tbody").inner_text()
    field = page.get_by_label("API key")  # shown once the service asked for a key
    assert field.is_visible() and field.get_attribute("type") == "password"
    assert field.input_value() == ""  # nothing prefilled

    field.fill("not-a-key")  # a wrong key: refused, and said so
    field.press("Enter")
    page.wait_for_function("() => document.querySelector('#error-message').textContent"
                           ".includes('not accepted')")
    assert field.get_attribute("aria-invalid") == "true"

    field.fill(key)
    field.press("Enter")
    page.locator("#models tbody tr[data-model]").first.wait_for()
    names = sorted(r.get_attribute("data-model") for r in page.locator("#models tbody tr[data-model]").all())
    assert names == SERVED
    assert page.locator("#error").is_hidden() and field.get_attribute("aria-invalid") is None
    # kept for this tab only: sessionStorage, never localStorage or a cookie
    assert page.evaluate("() => Object.values(sessionStorage)") == [key]
    assert page.evaluate("() => localStorage.length") == 0 and page.evaluate("() => document.cookie") == ""

    assert [k for p, k in auth_ui.sent_keys if p == "/models"] == [None, "not-a-key", key]
    page.reload()  # the tab keeps the key: the page works at once
    page.locator("#models tbody tr[data-model]").first.wait_for()
    assert field.input_value() == key and page.locator("#error").is_hidden()

    auth_ui.choose_file(mammogram_file)  # every call sends the key: /preview, /analyze
    page.select_option("#modality", "mammography")
    auth_ui.analyze()
    assert page.locator("#error").is_hidden() and auth_ui.card("tumor").is_visible()
    assert {k for p, k in auth_ui.sent_keys if p in ("/preview", "/analyze")} == {key}
    auth_ui.assert_clean(bad_requests_expected=True)
    assert sum(bool(HTTP_4XX_LOG.match(e)) for e in auth_ui.console_errors) == 2  # no key, the wrong key
