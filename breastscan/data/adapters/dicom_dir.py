"""DICOM folder adapter: a folder of DICOM files (MG / US) → the manifest contract.

Source layout: any folder tree of DICOM files, with any extension or none (``.dcm``,
``IM0001`` …); a file is taken as DICOM when it carries the ``DICM`` preamble or when
pydicom can parse it as a bare dataset. Optionally a labels CSV keyed by file name::

    file,density,pathology,mask
    IM0001.dcm,3,benign,masks/IM0001_mask.png     (mask relative to the CSV's folder)

Output (``out_dir``)::

    images/<sub folders>/<stem>.png   16-bit gray (the decoded [0, 1] image × 65535)
    manifest.csv                      modality from the Modality tag (MG/US) or the
                                      override; group = HMAC of PatientID (pseudonymised);
                                      laterality (L/R), source_file

Privacy: patient names, IDs, birth dates, accession numbers and every other header field
stay out of the manifest and of the log; only counts and file names are logged. The only
header facts kept are the modality and the laterality.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from breastscan.data.adapters.errors import IngestError, LayoutError, describe, not_layout
from breastscan.data.adapters.generic import finish_manifest, image_size, read_table
from breastscan.imaging.files import write_png
from breastscan.imaging.preprocessing import DICOM_MAGIC, ImageDecodeError
from breastscan.labels import MODALITIES

if TYPE_CHECKING:
    from breastscan.imaging.dicom import DicomImage

logger = logging.getLogger(__name__)

SKIP_SUFFIXES = frozenset({
    ".csv", ".txt", ".md", ".json", ".yaml", ".yml", ".xml", ".html", ".pdf",
    ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".zip", ".gz", ".py",
})
"""Extensions never tried as DICOM (a folder often holds reports and previews too)."""

LABEL_COLUMNS = ("density", "pathology", "mask")
"""Columns a labels CSV may provide (anything else in it is ignored)."""

_EXPECTED = "a folder of DICOM files (MG or US; any extension, sub-folders allowed)"
"""What :func:`convert_dicom` needs, as its layout errors say."""


def _candidates(source: Path, exclude: set[Path]) -> list[Path]:
    out = []
    for path in sorted(source.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.suffix.lower() in SKIP_SUFFIXES or path.resolve() in exclude:
            continue
        if path.name.upper() == "DICOMDIR":
            continue
        out.append(path)
    return out


def _has_preamble(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:132] == DICOM_MAGIC


def _read_labels(labels_csv: Path) -> dict[str, dict[str, str]]:
    """The labels CSV's rows by file key.

    Raises:
        LayoutError: the CSV is missing, does not parse, has no ``file`` column or lists a
            file twice.
    """
    expected = "a labels CSV with a 'file' column and any of density, pathology, mask"
    if not labels_csv.is_file():
        raise not_layout("labels CSV", expected, labels_csv)
    table = read_table(labels_csv)
    if "file" not in table.columns:
        raise not_layout("labels CSV", expected, labels_csv,
                         found=f"{labels_csv} with columns {', '.join(table.columns)}")
    keys = table["file"].str.strip()
    dups = sorted(set(keys[keys.duplicated()]))
    if dups:
        raise LayoutError(f"labels CSV {labels_csv} lists files more than once: {', '.join(dups[:5])}")
    cols = [c for c in LABEL_COLUMNS if c in table.columns]
    return {
        key: {c: str(row[c]).strip() for c in cols}
        for key, (_, row) in zip(keys, table.iterrows(), strict=True)
    }


@dataclass
class _Conversion:
    """The settings and running state of one :func:`convert_dicom` call.

    Attributes:
        source_dir: the folder walked.
        out_dir: the output dataset folder, as given.
        out_abs: ``out_dir`` made absolute (mask paths are written relative to it).
        salt: the HMAC key of the ``group`` ids.
        modality: the modality override, or ``None`` to use the Modality tag.
        labels: labels CSV rows by file key (empty without a labels CSV).
        labels_dir: the folder the labels' mask paths are relative to.
        used_labels: label keys matched by a converted file so far.
        seen_outputs: image paths (relative to ``out_dir``) written so far.
        not_dicom: files that are not DICOM at all (no preamble, do not parse), by path
            under ``source_dir``.
        unreadable: DICOM files (with the preamble) that did not decode as an image.
        skipped_modality: files skipped for a modality other than MG / US.
    """

    source_dir: Path
    out_dir: Path
    out_abs: Path
    salt: str
    modality: str | None
    labels: dict[str, dict[str, str]]
    labels_dir: Path
    used_labels: set[str] = field(default_factory=set)
    seen_outputs: set[str] = field(default_factory=set)
    not_dicom: list[str] = field(default_factory=list)
    unreadable: int = 0
    skipped_modality: int = 0


def _check_arguments(source_dir: Path, modality: str | None, salt: str) -> None:
    """Refuse a missing source folder, an unknown modality override or an empty salt.

    Raises:
        LayoutError: ``source_dir`` is not a folder.
        IngestError: an unknown ``modality`` or an empty ``salt``.
    """
    if not source_dir.is_dir():
        raise not_layout("DICOM", _EXPECTED, source_dir)
    if modality is not None and modality not in MODALITIES:
        raise IngestError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    if not salt:
        raise IngestError("salt must be a non-empty string")


def _load_labels(
    labels_csv: str | Path | None,
) -> tuple[dict[str, dict[str, str]], set[Path], Path]:
    """The labels by file key, the files never tried as DICOM (the labels CSV itself) and
    the folder the labels' mask paths are relative to; all empty / ``.`` without a CSV."""
    labels: dict[str, dict[str, str]] = {}
    exclude: set[Path] = set()
    labels_dir = Path(".")
    if labels_csv is not None:
        labels_csv = Path(labels_csv)
        labels = _read_labels(labels_csv)
        exclude.add(labels_csv.resolve())
        labels_dir = Path(os.path.abspath(labels_csv.parent))
    return labels, exclude, labels_dir


def _decode(path: Path, rel: Path) -> tuple[DicomImage, str, str] | str:
    """Decode one candidate file: its image, PatientID and laterality (upper case); or why
    not: ``"unreadable"`` (a DICOM file that does not decode; a warning logged, naming the
    file only) or ``"not DICOM"`` (logged at DEBUG: folders often hold other files)."""
    import pydicom  # noqa: F401  (imported first: its import sets its logger's level)

    from breastscan.imaging.dicom import dataset_to_image, load_dataset

    pydicom_log = logging.getLogger("pydicom")
    level = pydicom_log.level
    # pydicom logs what it makes of a file that is not DICOM (and may quote element values):
    # keep it out of the log; this function says what it needs to.
    pydicom_log.setLevel(logging.ERROR)
    try:
        ds = load_dataset(path)
        image = dataset_to_image(ds)
        patient_id = str(ds.get("PatientID", "") or "").strip()
        laterality = str(
            ds.get("ImageLaterality", "") or ds.get("Laterality", "") or ""
        ).strip().upper()
    except ImageDecodeError as exc:
        if _has_preamble(path):
            logger.warning("unreadable DICOM %s: %s", rel.as_posix(), exc)
            return "unreadable"
        logger.debug("not a readable DICOM file, skipped: %s", rel.as_posix())
        return "not DICOM"
    finally:
        pydicom_log.setLevel(level)
    return image, patient_id, laterality


def _output_name(rel: Path, seen_outputs: set[str]) -> str:
    """``images/<folders>/<stem>.png`` for a source file, ``<name>.png`` when that stem is
    taken already; recorded in ``seen_outputs``."""
    image_rel = (Path("images") / rel.parent / f"{rel.stem}.png").as_posix()
    if image_rel in seen_outputs:  # a.dcm and a.DCM, or a and a.dcm, in one folder
        image_rel = (Path("images") / rel.parent / f"{rel.name}.png").as_posix()
    seen_outputs.add(image_rel)
    return image_rel


def _match_label(conv: _Conversion, rel: Path, path: Path) -> dict[str, str]:
    """A file's labels row (keyed by its path under the source, else by its name; ``{}`` if
    none); the key matched is recorded in ``conv.used_labels``."""
    labels = conv.labels
    label = labels.get(rel.as_posix()) or labels.get(path.name)
    if label is not None:
        conv.used_labels.add(rel.as_posix() if rel.as_posix() in labels else path.name)
    return label or {}


def _label_mask(conv: _Conversion, label: dict[str, str], rel: Path, shape: tuple[int, ...]) -> str:
    """The path of a file's labels mask relative to ``conv.out_abs`` (``""`` when none).

    Raises:
        LayoutError: the mask does not exist or its ``(H, W)`` differs from the image's
            ``shape``.
    """
    if not label.get("mask"):
        return ""
    mask_path = Path(label["mask"])
    mask_path = mask_path if mask_path.is_absolute() else conv.labels_dir / mask_path
    if not mask_path.is_file():
        raise LayoutError(f"mask for {rel.as_posix()} not found: {mask_path}")
    if image_size(mask_path) != shape:
        h, w = image_size(mask_path)
        raise LayoutError(
            f"mask {mask_path} is {w}x{h} but image {rel.as_posix()} is "
            f"{shape[1]}x{shape[0]}"
        )
    return Path(os.path.relpath(mask_path, conv.out_abs)).as_posix()


def _convert_file(conv: _Conversion, path: Path) -> dict[str, object] | None:
    """Convert one candidate file: write its 16-bit PNG and return its manifest row, or
    ``None`` (counted in ``conv``) when it is unreadable or of another modality."""
    from breastscan.imaging.dicom import pseudonymize

    rel = path.relative_to(conv.source_dir)
    decoded = _decode(path, rel)
    if decoded == "not DICOM":
        conv.not_dicom.append(rel.as_posix())
        return None
    if isinstance(decoded, str):
        conv.unreadable += 1
        return None
    image, patient_id, laterality = decoded
    row_modality = conv.modality or image.modality
    if row_modality is None:
        conv.skipped_modality += 1
        logger.warning("skipped %s: modality is neither MG nor US (pass modality= to "
                       "override)", rel.as_posix())
        return None

    image_rel = _output_name(rel, conv.seen_outputs)
    u16 = np.clip(np.rint(image.pixels * 65535.0), 0, 65535).astype(np.uint16)
    write_png(conv.out_dir / image_rel, u16)
    label = _match_label(conv, rel, path)
    mask_rel = _label_mask(conv, label, rel, u16.shape)
    group = pseudonymize(patient_id, conv.salt) if patient_id else (
        "file-" + pseudonymize(rel.as_posix(), conv.salt)
    )
    return {
        "image": image_rel,
        "modality": row_modality,
        "density": label.get("density", ""),
        "pathology": label.get("pathology", ""),
        "mask": mask_rel,
        "group": group,
        "laterality": laterality if laterality in ("L", "R") else "",
        "source_file": rel.as_posix(),
    }


def convert_dicom(
    source_dir: str | Path,
    out_dir: str | Path,
    *,
    labels_csv: str | Path | None = None,
    salt: str | None = None,
    modality: str | None = None,
) -> pd.DataFrame:
    """Convert a folder of DICOM files into a dataset in the manifest contract.

    Args:
        source_dir: the folder to walk (recursively).
        out_dir: the output dataset folder (created).
        labels_csv: optional CSV with a ``file`` column (the DICOM file's path relative to
            ``source_dir``, or just its name) and any of ``density``, ``pathology``,
            ``mask`` (mask paths relative to the labels CSV's folder; referenced in place).
        salt: the HMAC key that turns PatientID into the ``group`` id
            (:func:`breastscan.imaging.dicom.pseudonymize`); ``None`` (the default) takes
            the project's secret from :func:`breastscan.data.pseudonym_salt.resolve_salt`
            (``$BREASTSCAN_PSEUDONYM_SALT``, else ``.breastscan/pseudonym.salt``, created on
            first use); a public or short salt is refused there.
        modality: ``mammography`` or ``ultrasound`` for every file, overriding the
            Modality tag. Without it, files whose tag is neither MG nor US are skipped.

    Returns:
        The manifest written, one row per converted file (contract columns plus
        ``laterality`` and ``source_file``).

    Raises:
        LayoutError: ``source_dir`` is not a folder or no file in it converts; the labels
            CSV is missing, has no ``file`` column or duplicate keys; a labels mask is
            missing or its size differs from its image.
        IngestError: an unknown ``modality`` or an empty ``salt``.
    """
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    if salt is None:
        from breastscan.data.pseudonym_salt import resolve_salt

        salt = resolve_salt()
    _check_arguments(source_dir, modality, salt)
    labels, exclude, labels_dir = _load_labels(labels_csv)
    conv = _Conversion(source_dir, out_dir, Path(os.path.abspath(out_dir)), salt, modality,
                       labels, labels_dir)
    rows: list[dict[str, object]] = []
    for path in _candidates(source_dir, exclude):
        row = _convert_file(conv, path)
        if row is not None:
            rows.append(row)

    if not rows:
        raise _nothing_converted(conv)
    unused = len(labels) - len(conv.used_labels)
    if unused:
        logger.warning("%d label rows name no converted DICOM file", unused)
    if conv.not_dicom:
        logger.warning("%d files are not DICOM and were skipped (e.g. %s)",
                       len(conv.not_dicom), ", ".join(conv.not_dicom[:3]))
    df = finish_manifest(rows, out_dir)
    logger.info(
        "DICOM: %d images converted (%s), %d unreadable, %d skipped (modality not MG/US), "
        "%d not DICOM, %d distinct groups -> %s",
        len(df), df["modality"].value_counts().to_dict(), conv.unreadable, conv.skipped_modality,
        len(conv.not_dicom), df["group"].nunique(), out_dir,
    )
    return df


def _nothing_converted(conv: _Conversion) -> LayoutError:
    """The error for a folder from which no file converted, saying what it holds."""
    if not (conv.not_dicom or conv.unreadable or conv.skipped_modality):
        return not_layout("DICOM", _EXPECTED, conv.source_dir,
                          found=f"no candidate file (images, text and CSV files are never tried) "
                                f"in {describe(conv.source_dir)}")
    found = (f"no convertible DICOM image in {conv.source_dir}: {len(conv.not_dicom)} files not "
             f"DICOM{' (e.g. ' + ', '.join(conv.not_dicom[:3]) + ')' if conv.not_dicom else ''}, "
             f"{conv.unreadable} unreadable DICOM, {conv.skipped_modality} of a modality other "
             f"than MG/US (a modality override converts those)")
    return not_layout("DICOM", _EXPECTED, conv.source_dir, found=found)
