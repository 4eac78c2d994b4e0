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


def configure_service_logging(level: str | int | None = None) -> None:
    """Give the ``breastscan`` loggers a handler inside a server that owns the root logger.

    BentoML configures its own loggers in each worker; this adds one stream handler to the
    ``breastscan`` logger only (not propagated, so nothing is logged twice), in BentoML's
    time format. Calling it again changes nothing.

    Args:
        level: a logging level name or number; defaults to ``$BREASTSCAN_LOG_LEVEL`` or INFO.
    """
    logger = logging.getLogger("breastscan")
    logger.setLevel(level if level is not None else os.environ.get("BREASTSCAN_LOG_LEVEL", "INFO"))
    if not any(getattr(h, "_breastscan", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] [%(name)s] %(message)s",
                                               datefmt="%Y-%m-%dT%H:%M:%S%z"))
        handler._breastscan = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False
