"""Logging set-up, called once by each entry point (never at import time)."""

from __future__ import annotations

import logging
import os

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def configure_logging(level: str | int | None = None) -> None:
    """Configure the root logger for a command-line entry point.

    Args:
        level: a logging level name or number; defaults to ``$BREASTSCAN_LOG_LEVEL`` or INFO.
    """
    chosen = level if level is not None else os.environ.get("BREASTSCAN_LOG_LEVEL", "INFO")
    logging.basicConfig(level=chosen, format=_FORMAT, datefmt="%H:%M:%S", force=True)
    # Third-party libraries are chatty at INFO; keep their warnings.
    for noisy in ("great_expectations", "PIL", "matplotlib", "urllib3", "h5py", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
