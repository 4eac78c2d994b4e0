"""Adapters from public dataset layouts to the manifest contract (:mod:`breastscan.data.manifest`).

=========  =========================================  ==========================================
format     source                                     function
=========  =========================================  ==========================================
``busi``   original ``Dataset_BUSI_with_GT/`` folder  :func:`.busi.convert_busi`
``mias``   original mini-MIAS ``Info.txt`` + PGMs     :func:`.mias.convert_mias`
``csv``    any CSV of image paths and labels          :func:`.generic.convert_csv`
``dicom``  a folder of DICOM files (MG / US)          :func:`.dicom_dir.convert_dicom`
=========  =========================================  ==========================================

Each writes ``out_dir/manifest.csv`` (paths relative to ``out_dir``) and returns it as a
DataFrame. Modules are imported on first use, so importing this package is cheap.

Input the user can fix (a source not in the expected layout, a missing column, an invalid
option) is refused with an :class:`~.errors.IngestError` -- usually its subclass
:class:`~.errors.LayoutError` -- whose message is one line saying what was expected and what
was found; ``breastscan ingest`` prints it as one ``Error:`` line.
"""

from __future__ import annotations

import inspect
from importlib import import_module
from pathlib import Path
from typing import Any

import pandas as pd

from breastscan.data.adapters.errors import IngestError, LayoutError

FORMATS: tuple[str, ...] = ("busi", "mias", "csv", "dicom")
"""Source formats :func:`ingest` understands."""

_DISPATCH: dict[str, tuple[str, str]] = {
    "busi": ("breastscan.data.adapters.busi", "convert_busi"),
    "mias": ("breastscan.data.adapters.mias", "convert_mias"),
    "csv": ("breastscan.data.adapters.generic", "convert_csv"),
    "dicom": ("breastscan.data.adapters.dicom_dir", "convert_dicom"),
}


def ingest(fmt: str, source: str | Path, out_dir: str | Path, **options: Any) -> pd.DataFrame:
    """Convert ``source`` in layout ``fmt`` into a dataset in the manifest contract.

    Args:
        fmt: one of :data:`FORMATS` (case-insensitive).
        source: the source folder (``busi``, ``mias``, ``dicom``) or CSV file (``csv``).
        out_dir: the output dataset folder.
        **options: keyword options of the format's converter (e.g. ``columns``, ``roi``,
            ``copy`` for ``csv``; ``labels_csv``, ``salt``, ``modality`` for ``dicom``).
            Options that are ``None`` are dropped, so callers may pass every option.

    Returns:
        The manifest written.

    Raises:
        IngestError: an unknown format, or an option the converter does not take; or the
            converter's own refusal (:class:`LayoutError` for a source not in the layout).
    """
    key = str(fmt).strip().lower()
    if key not in _DISPATCH:
        raise IngestError(f"unknown dataset format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    module, name = _DISPATCH[key]
    convert = getattr(import_module(module), name)
    options = {k: v for k, v in options.items() if v is not None}
    accepted = set(inspect.signature(convert).parameters) - {"source", "source_csv",
                                                              "source_dir", "out_dir"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise IngestError(
            f"format {key!r} does not take option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(sorted(accepted)) or 'no options'}"
        )
    return convert(Path(source), Path(out_dir), **options)


def __getattr__(name: str) -> Any:
    """Expose ``convert_busi`` … lazily as attributes of the package."""
    for module, func in _DISPATCH.values():
        if func == name:
            return getattr(import_module(module), func)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FORMATS", "IngestError", "LayoutError", "ingest", "convert_busi", "convert_mias",
           "convert_csv", "convert_dicom"]
