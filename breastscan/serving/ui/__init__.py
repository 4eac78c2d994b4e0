"""The web UI for trying the served models in a browser, mounted by the service at ``/ui``.

A static page -- ``static/index.html``, ``app.js`` and ``style.css``, plain HTML/CSS/JS with
no framework -- that calls the service's own public HTTP API from the browser, the same
endpoints any client uses, so nothing about the UI is served by a second code path:

* ``POST /models`` fills the table of served models (name, version, stage, task, classes);
* ``POST /preview`` shows the chosen file (DICOM and 16-bit files too) on a canvas, where a
  dragged rectangle becomes the ``roi`` (in the image's own pixels), and reads a DICOM
  file's modality for the "auto" choice;
* ``POST /analyze`` answers: a card per model (registry version and stage, spec id, class
  probabilities, Grad-CAM or lesion-mask overlay) and the 8-category view of a mammogram.

API errors (``{"error", "code"}``) are shown in the page's error box. No asset comes from a
CDN and a Content-Security-Policy keeps it that way (``'self'`` only): it works offline.
Tested in a real browser by ``tests/services/test_ui_browser.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

STATIC_DIR = Path(__file__).with_name("static")


def make_ui_app() -> Any:
    """A Starlette app serving the page (``/`` -> ``index.html``) and its assets."""
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.staticfiles import StaticFiles

    return Starlette(routes=[Mount("/", app=StaticFiles(directory=STATIC_DIR, html=True), name="static")])
