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

from breastscan.data.adapters.generic import finish_manifest, read_gray_u8
from breastscan.imaging.files import write_mask, write_png
from breastscan.labels import PATHOLOGIES

logger = logging.getLogger(__name__)

_NAME = re.compile(
    r"^(?P<cls>[a-z]+) \((?P<n>\d+)\)(?P<mask>_mask(?:_(?P<k>\d+))?)?\.png$", re.IGNORECASE
)


def _scan(class_dir: Path, cls: str) -> tuple[dict[int, Path], dict[int, list[Path]]]:
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
            raise ValueError(f"two image files numbered {n} in {class_dir}: {images[n]}, {path}")
        else:
            images[n] = path
    for n in masks:
        masks[n].sort(key=lambda p: int(_NAME.match(p.name)["k"] or 0))  # type: ignore[index]
    return images, masks


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
        FileNotFoundError: ``source`` is not a folder.
        ValueError: no class folder or no image found; an image does not decode; a mask's
            size differs from its image (the message names the file).
    """
    source, out_dir = Path(source), Path(out_dir)
    if not source.is_dir():
        raise FileNotFoundError(f"BUSI source folder not found: {source}")
    class_dirs = {cls: source / cls for cls in PATHOLOGIES if (source / cls).is_dir()}
    if not class_dirs:
        raise ValueError(
            f"{source} has none of the BUSI class folders {', '.join(PATHOLOGIES)}"
        )

    rows: list[dict[str, object]] = []
    no_mask = orphans = 0
    for cls, class_dir in class_dirs.items():
        images, masks = _scan(class_dir, cls)
        for n in sorted(set(masks) - set(images)):
            orphans += 1
            logger.warning("mask without image ignored: %s", masks[n][0].name)
        for n in sorted(images):
            img_path = images[n]
            image = read_gray_u8(img_path)
            stem = f"{cls}_{n:04d}"
            image_rel = f"images/{cls}/{stem}.png"
            write_png(out_dir / image_rel, image)
            mask_files = masks.get(n, [])
            mask_rel = ""
            if mask_files:
                union = np.zeros(image.shape, bool)
                for mask_path in mask_files:
                    mask = read_gray_u8(mask_path)
                    if mask.shape != image.shape:
                        raise ValueError(
                            f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image "
                            f"{img_path.name} is {image.shape[1]}x{image.shape[0]}"
                        )
                    union |= mask > 127
                mask_rel = f"masks/{cls}/{stem}_mask.png"
                write_mask(out_dir / mask_rel, union)
            else:
                no_mask += 1
                logger.warning("image without mask file: %s/%s", cls, img_path.name)
            rows.append({
                "image": image_rel,
                "modality": "ultrasound",
                "density": "",
                "pathology": cls,
                "mask": mask_rel,
                "group": f"busi-{cls}-{n:04d}",
                "source_file": f"{cls}/{img_path.name}",
                "n_masks": len(mask_files),
            })
    if not rows:
        raise ValueError(f"no BUSI images ('<class> (N).png') found under {source}")
    df = finish_manifest(rows, out_dir)
    counts = df["pathology"].value_counts().to_dict()
    logger.info(
        "BUSI: %d images %s, %d without mask, %d orphan masks -> %s",
        len(df), counts, no_mask, orphans, out_dir,
    )
    return df
