"""BUSI adapter: the original ``Dataset_BUSI_with_GT/`` folder → the manifest contract.

Source layout (Al-Dhabyani et al., Data in Brief 2020; Kaggle / original release)::

    Dataset_BUSI_with_GT/
        benign/     benign (1).png  benign (1)_mask.png  benign (4)_mask_1.png ...
        malignant/  malignant (1).png  malignant (1)_mask.png ...
        normal/     normal (1).png  normal (1)_mask.png (all zero) ...

Images are 3-channel gray PNGs of varying size; each has one or more mask files
``<class> (N)_mask.png``, ``<class> (N)_mask_1.png`` … of the same size. Files may also sit
in sub-folders of a class folder (e.g. ``benign/images/`` and ``benign/mask/``); anything
not named like an image or a mask is ignored.

Output (``out_dir``)::

    images/<class>/<class>_NNNN.png        8-bit gray
    masks/<class>/<class>_NNNN_mask.png    union of the image's mask files, 0/255
    manifest.csv                           modality ultrasound, pathology = class folder,
                                           group busi-<class>-NNNN, source_file, n_masks

Near-duplicate frames are NOT grouped here; deduplication happens later in the pipeline.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from breastscan.data.adapters.errors import LayoutError, not_layout
from breastscan.data.adapters.generic import finish_manifest, read_gray_u8
from breastscan.imaging.files import write_mask, write_png
from breastscan.labels import PATHOLOGIES

logger = logging.getLogger(__name__)

_NAME = re.compile(
    r"^(?P<cls>[a-z]+) \((?P<n>\d+)\)(?P<mask>_mask(?:_(?P<k>\d+))?)?\.png$", re.IGNORECASE
)


_EXPECTED = (
    "a folder with sub-folders benign/, malignant/, normal/ holding images '<class> (N).png' "
    "and masks '<class> (N)_mask.png'"
)
"""What :func:`convert_busi` needs, as its layout errors say."""

_Scan = tuple[dict[int, Path], dict[int, list[Path]]]
"""One class folder's images and mask files by original number N."""


def _scan(class_dir: Path, cls: str) -> _Scan:
    """Find a class folder's images and masks (any depth); other files are ignored.

    Raises:
        LayoutError: two image files carry the same number.
    """
    images: dict[int, Path] = {}
    masks: dict[int, list[Path]] = {}
    for path in sorted(class_dir.rglob("*")):
        if not path.is_file():
            continue
        m = _NAME.match(path.name)
        if m is None or m["cls"].lower() != cls:
            logger.debug("ignoring %s", path.name)
            continue
        n = int(m["n"])
        if m["mask"]:
            masks.setdefault(n, []).append(path)
        elif n in images:
            raise LayoutError(f"two image files numbered {n} in {class_dir}: {images[n]}, {path}")
        else:
            images[n] = path
    for n in masks:
        masks[n].sort(key=lambda p: int(_NAME.match(p.name)["k"] or 0))  # type: ignore[index]
    return images, masks


def _scan_source(source: Path) -> dict[str, _Scan]:
    """Scan every class folder of ``source``, refusing a source that is not a BUSI layout.

    Raises:
        LayoutError: ``source`` is not a folder, has no class folder, or its class folders
            hold no image named ``<class> (N).png``.
    """
    if not source.is_dir():
        raise not_layout("BUSI", _EXPECTED, source)
    class_dirs = {cls: source / cls for cls in PATHOLOGIES if (source / cls).is_dir()}
    if not class_dirs:
        raise not_layout("BUSI", _EXPECTED, source)
    scans = {cls: _scan(class_dir, cls) for cls, class_dir in class_dirs.items()}
    if not any(images for images, _ in scans.values()):
        folders = ", ".join(f"{cls}/" for cls in class_dirs)
        raise not_layout("BUSI", _EXPECTED, source,
                         found=f"{folders} in {source} but no image named '<class> (N).png' in them")
    return scans


def _union_mask(mask_files: list[Path], image: np.ndarray, img_path: Path) -> np.ndarray:
    """The union of an image's mask files, as bool.

    Raises:
        LayoutError: a mask does not decode or its size differs from the image's.
    """
    union = np.zeros(image.shape, bool)
    for mask_path in mask_files:
        mask = read_gray_u8(mask_path)
        if mask.shape != image.shape:
            raise LayoutError(
                f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image "
                f"{img_path.name} is {image.shape[1]}x{image.shape[0]}"
            )
        union |= mask > 127
    return union


def _convert_image(cls: str, n: int, img_path: Path, mask_files: list[Path],
                   out_dir: Path) -> dict[str, object]:
    """Write one image (and the union of its masks) under ``out_dir``; its manifest row."""
    image = read_gray_u8(img_path)
    stem = f"{cls}_{n:04d}"
    image_rel = f"images/{cls}/{stem}.png"
    write_png(out_dir / image_rel, image)
    mask_rel = ""
    if mask_files:
        mask_rel = f"masks/{cls}/{stem}_mask.png"
        write_mask(out_dir / mask_rel, _union_mask(mask_files, image, img_path))
    else:
        logger.warning("image without mask file: %s/%s", cls, img_path.name)
    return {
        "image": image_rel,
        "modality": "ultrasound",
        "density": "",
        "pathology": cls,
        "mask": mask_rel,
        "group": f"busi-{cls}-{n:04d}",
        "source_file": f"{cls}/{img_path.name}",
        "n_masks": len(mask_files),
    }


def convert_busi(source: str | Path, out_dir: str | Path) -> pd.DataFrame:
    """Convert the original BUSI folder into a dataset in the manifest contract.

    Args:
        source: the ``Dataset_BUSI_with_GT`` folder (class folders ``benign``,
            ``malignant``, ``normal``).
        out_dir: the output dataset folder (created).

    Returns:
        The manifest written, one row per image sorted by class then number, with the
        contract columns plus ``source_file`` (``<class>/<original name>``) and
        ``n_masks`` (number of mask files united).

    Raises:
        LayoutError: ``source`` is not a folder, has no class folder or no image; two
            images share a number; an image or mask does not decode; a mask's size differs
            from its image (the message names the file). Nothing is written before the
            layout is checked.
    """
    source, out_dir = Path(source), Path(out_dir)
    scans = _scan_source(source)
    rows: list[dict[str, object]] = []
    orphans = 0
    for cls, (images, masks) in scans.items():
        for n in sorted(set(masks) - set(images)):
            orphans += 1
            logger.warning("mask without image ignored: %s", masks[n][0].name)
        rows += [_convert_image(cls, n, images[n], masks.get(n, []), out_dir) for n in sorted(images)]
    df = finish_manifest(rows, out_dir)
    logger.info(
        "BUSI: %d images %s, %d without mask, %d orphan masks -> %s",
        len(df), df["pathology"].value_counts().to_dict(), int((df["n_masks"] == 0).sum()),
        orphans, out_dir,
    )
    return df
