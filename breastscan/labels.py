"""The one place where modalities and class names are defined.

Every other module, the params file, the models' contracts and the service refer to these
tuples; nothing else spells a class name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

MODALITIES: Final = ("mammography", "ultrasound")
"""Imaging modalities of the manifest's ``modality`` column."""

DICOM_MODALITY_CODES: Final = {"MG": "mammography", "US": "ultrasound"}
"""DICOM Modality (0008,0060) codes of the platform's modalities, and their names."""

PATHOLOGIES: Final = ("benign", "malignant", "normal")
"""Values of the manifest's ``pathology`` column (``normal`` = no lesion)."""

LABEL_COLUMNS: Final[tuple[str, ...]] = ("density", "pathology")
"""Manifest columns that hold labels a model can learn (see :mod:`breastscan.data.manifest`)."""

DENSITY_LEVELS: Final = (1, 2, 3, 4)
"""Values of the manifest's ``density`` column: BI-RADS A-D as 1-4.

Datasets with a coarser scale (mini-MIAS F/G/D) use 1-3 and declare their own class names.
"""

BIRADS_DENSITY: Final = ("A", "B", "C", "D")
"""BI-RADS breast-density categories, in the order of :data:`DENSITY_LEVELS`."""

MIAS_DENSITY: Final = ("F", "G", "D")
"""mini-MIAS background tissue: fatty, fatty-glandular, dense-glandular (density 1-3)."""


def class_display_names(label: str, classes: Sequence[Any]) -> tuple[str, ...]:
    """Display names of a model's classes, in the order of ``classes``.

    Density levels 1-4 are shown as BI-RADS A-D; every other value as its own text.

    Args:
        label: the manifest column the classes come from (``density``, ``pathology``).
        classes: the manifest values, e.g. ``[1, 2, 3, 4]`` or ``["benign", "malignant"]``.
    """
    if label == "density":
        names = dict(zip((str(d) for d in DENSITY_LEVELS), BIRADS_DENSITY, strict=True))
        return tuple(names.get(str(c), str(c)) for c in classes)
    return tuple(str(c) for c in classes)
