"""Data validation: Great Expectations suites and image-level checks that stop bad data.

:func:`validate_dataset` is the entry point: it reads a dataset's manifest, inspects every
image and mask, runs the suites and returns a :class:`ValidationReport` whose JSON is the
artefact of record and whose :meth:`~ValidationReport.summary` names each defect.
"""

from __future__ import annotations

from breastscan.data.validation.runner import ValidationReport, validate_dataset, validate_pool

__all__ = ["ValidationReport", "validate_dataset", "validate_pool"]
