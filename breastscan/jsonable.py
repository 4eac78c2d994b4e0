"""JSON-safe numbers: finite floats or ``None``, numpy scalars to Python (reports, tags, cards)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def finite_float(value: Any) -> float | None:
    """``float(value)`` when that is a finite number (numbers, numeric text such as MLflow
    tag values, 0-d arrays); ``None`` for anything else, booleans included."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def json_clean(value: Any) -> Any:
    """A JSON-safe copy: numpy scalars to Python, NaN / inf to ``None``, tuples to lists."""
    if isinstance(value, dict):
        return {str(k): json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_clean(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return value


def fmt_number(value: Any, digits: int = 3) -> str:
    """A number for people: ``0.812`` (``digits`` decimals), or ``n/a`` for ``None``."""
    return "n/a" if value is None else f"{float(value):.{digits}f}"
