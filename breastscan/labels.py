"""The one place where modalities and class names are defined.

Every other module, the params file, the models' contracts and the service refer to these
tuples; nothing else spells a class name.
"""

from __future__ import annotations

from typing import Final

MODALITIES: Final = ("mammography", "ultrasound")
"""Imaging modalities of the manifest's ``modality`` column."""

PATHOLOGIES: Final = ("benign", "malignant", "normal")
"""Values of the manifest's ``pathology`` column (``normal`` = no lesion)."""

DENSITY_LEVELS: Final = (1, 2, 3, 4)
"""Values of the manifest's ``density`` column: BI-RADS A-D as 1-4.

Datasets with a coarser scale (mini-MIAS F/G/D) use 1-3 and declare their own class names.
"""

BIRADS_DENSITY: Final = ("A", "B", "C", "D")
"""BI-RADS breast-density categories, in the order of :data:`DENSITY_LEVELS`."""

MIAS_DENSITY: Final = ("F", "G", "D")
"""mini-MIAS background tissue: fatty, fatty-glandular, dense-glandular (density 1-3)."""
