"""The web UI for trying the served models in a browser, mounted by the service at ``/ui``.

A static page (``static/index.html`` and its script) that calls the service's own public
HTTP API from the browser -- the same endpoints any client uses -- so nothing about the UI
is served by a second code path. No asset comes from a CDN: it works offline.
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
