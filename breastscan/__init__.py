"""breastscan: versioned breast-imaging data, validated datasets, tracked models, served predictions.

Subpackages:
    data         synthetic phantoms and adapters from public dataset layouts to the manifest contract
    validation   Great Expectations suites and image-level checks that stop bad data
"""

from __future__ import annotations

__version__ = "0.1.0"
