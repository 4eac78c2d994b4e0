"""The errors the adapters raise for a source or options the user can fix.

Every adapter refuses input it cannot convert with an :class:`IngestError` whose message is
ONE line saying what was expected and what was found; the ``breastscan ingest`` command
turns it into a one-line ``Error: ...`` (no traceback). Any other exception escaping an
adapter is a bug and keeps its traceback.

:class:`LayoutError` is the common case: SOURCE is not in the layout its format expects
(missing or wrong folders, files or columns, a file the layout names that does not decode or
does not fit its image). Both subclass :class:`ValueError`, so callers catching that keep
working.
"""

from __future__ import annotations

from pathlib import Path

_SHOWN = 4
"""Names listed per kind (folders, files) when describing a folder."""


class IngestError(ValueError):
    """A conversion refused for a reason the user can fix (the message is one line)."""


class LayoutError(IngestError):
    """SOURCE (or a file it names) is not in the layout its format expects."""


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def describe(path: Path) -> str:
    """Say in a few words what is at ``path`` (the "found ..." part of a message).

    Args:
        path: any path.

    Returns:
        e.g. ``"nothing at /x"``, ``"a file, /x/a.csv"``, ``"an empty folder /x"`` or
        ``"/x holding folders images/, masks/ and files manifest.csv, README.md"``.
    """
    if not path.exists():
        return f"nothing at {path}"
    if not path.is_dir():
        return f"a file, {path}"
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    folders = [f"{p.name}/" for p in entries if p.is_dir()]
    files = [p.name for p in entries if not p.is_dir()]
    if not entries:
        return f"an empty folder {path}"
    parts = [f"folders {_names(folders)}" if folders else "no folder",
             f"files {_names(files)}" if files else "no file"]
    return f"{path} holding {' and '.join(parts)}"


def not_layout(kind: str, expected: str, source: Path, found: str | None = None) -> LayoutError:
    """Build the error for a source that is not in the ``kind`` layout.

    Args:
        kind: the layout's name, e.g. ``"BUSI"``.
        expected: what the layout needs, e.g. ``"a folder with sub-folders benign/ ..."``.
        source: the path given.
        found: what was found instead; by default :func:`describe` of ``source``.

    Returns:
        ``LayoutError("not a <kind> layout: expected <expected>; found <found>")``, with a
        hint when ``source`` is a folder holding a ``manifest.csv`` (format ``csv`` reads it).
    """
    message = f"not a {kind} layout: expected {expected}; found {found or describe(source)}"
    if kind != "CSV" and (source / "manifest.csv").is_file():
        message += " (a folder holding manifest.csv is read by format csv)"
    return LayoutError(message)
