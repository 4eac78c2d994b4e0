"""Small fixtures in the ORIGINAL public layouts (BUSI, mini-MIAS, a DICOM folder).

Each ``make_*`` function writes a few tiny files into a given folder and returns the
folder an adapter takes as its source. The geometry is known exactly so that tests can
check pixels (mask unions, circle positions); the DICOM files carry recognisable fake
patient fields so that tests can assert those never leak into outputs or logs.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

# --------------------------------------------------------------------------- BUSI

BUSI_IMAGES: dict[str, list[tuple[int, tuple[int, int]]]] = {
    # class -> [(original number N, (height, width))]
    "benign": [(1, (40, 52)), (2, (44, 60)), (4, (36, 48))],
    "malignant": [(1, (48, 40)), (3, (40, 40))],
    "normal": [(1, (32, 44)), (2, (40, 50))],
}
"""The images :func:`make_busi_layout` writes (N is not contiguous, like the originals)."""

BUSI_TWO_MASKS = ("benign", 4)
"""The image with two mask files (``_mask.png`` and ``_mask_1.png``)."""

BUSI_MASK_RECTS: dict[tuple[str, int], list[tuple[int, int, int, int]]] = {
    # (class, N) -> one (row0, row1, col0, col1) rectangle per mask file
    ("benign", 1): [(5, 15, 10, 30)],
    ("benign", 2): [(20, 30, 5, 20)],
    ("benign", 4): [(2, 10, 2, 12), (20, 30, 30, 44)],
    ("malignant", 1): [(10, 30, 10, 30)],
    ("malignant", 3): [(0, 8, 0, 8)],
    ("normal", 1): [],
    ("normal", 2): [],
}
"""Lesion rectangles per mask file; normal images get one all-zero mask."""


def _busi_pixels(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    gray = rng.integers(20, 200, size=(h, w), dtype=np.uint8)
    return np.dstack([gray, gray, gray])  # 3-channel gray, like the original PNGs


def make_busi_layout(root: str | Path) -> Path:
    """Write a tiny ``Dataset_BUSI_with_GT/`` tree (RGB PNGs, masks, a stray file).

    Args:
        root: folder to write into (created if needed).

    Returns:
        The ``Dataset_BUSI_with_GT`` folder.
    """
    base = Path(root) / "Dataset_BUSI_with_GT"
    for cls, items in BUSI_IMAGES.items():
        folder = base / cls
        folder.mkdir(parents=True, exist_ok=True)
        for number, (h, w) in items:
            stem = f"{cls} ({number})"
            cv2.imwrite(str(folder / f"{stem}.png"), _busi_pixels(h, w, seed=number))
            rects = BUSI_MASK_RECTS[(cls, number)] or [None]
            for k, rect in enumerate(rects):
                mask = np.zeros((h, w, 3), np.uint8)
                if rect is not None:
                    r0, r1, c0, c1 = rect
                    mask[r0:r1, c0:c1] = 255
                suffix = "_mask" if k == 0 else f"_mask_{k}"
                cv2.imwrite(str(folder / f"{stem}{suffix}.png"), mask)
    (base / "benign" / "Thumbs.db").write_bytes(b"not an image")
    (base / "README.txt").write_text("BUSI test fixture\n")
    return base


# --------------------------------------------------------------------------- mini-MIAS

MIAS_SIZE = 128
"""Side of the fixture's square PGM films (the originals are 1024)."""

MIAS_INFO = """\
# Fixture in the layout of the MIAS Info.txt (coordinates: origin at the BOTTOM-LEFT)
REFNUM BG CLASS SEVERITY X Y RADIUS
mdb001 G CIRC B 40 100 10
mdb002 G NORM
mdb003 D NORM
mdb004 D SPIC M 90 30 8
mdb005 F CIRC B 30 40 5
mdb005 F CIRC B 80 90 6
mdb006 F CALC B *NOTE 3*
mdb007 F CALC B 20 20 4
mdb007 F MISC M 100 100 6

mdb008 F NORM
"""
"""Normal, benign with coords, malignant with coords, two lesions, CALC without coords,
benign + malignant on one film (→ malignant), a comment, a header and a blank line."""


def make_mias_layout(root: str | Path, *, size: int = MIAS_SIZE) -> Path:
    """Write ``Info.txt`` and ``mdb001.pgm`` … ``mdb008.pgm`` (8-bit binary PGM).

    Args:
        root: folder to write into (created if needed).
        size: side of the square films in pixels.

    Returns:
        The folder holding ``Info.txt`` and the PGM files.
    """
    base = Path(root) / "all-mias"
    base.mkdir(parents=True, exist_ok=True)
    (base / "Info.txt").write_text(MIAS_INFO)
    yy, xx = np.mgrid[0:size, 0:size]
    for n in range(1, 9):
        film = ((xx + yy * n) % 200 + 30).astype(np.uint8)
        assert cv2.imwrite(str(base / f"mdb{n:03d}.pgm"), film)
    return base


# --------------------------------------------------------------------------- DICOM

FAKE_PATIENT_NAME = "Zzyzxfake^Quintessa"
FAKE_PATIENT_ID = "PIDFAKE98765"
FAKE_BIRTH_DATE = "19010203"
FAKE_ACCESSION = "ACCFAKE4242"
FAKE_STRINGS = (FAKE_PATIENT_NAME, "Zzyzxfake", FAKE_PATIENT_ID, FAKE_BIRTH_DATE, FAKE_ACCESSION)
"""Patient fields written into the fixture files; none may appear in any output."""

MG_WINDOW = (2000.0, 1000.0)
"""(center, width) of the MONOCHROME2 mammogram: stored values < 1500 → 0, > 2500 → 1."""

DICOM_FILES = {
    "mg_mono2.dcm": "MG, MONOCHROME2, 16-bit (12 stored), window 2000/1000, left",
    "mg_mono1.dcm": "MG, MONOCHROME1, 16-bit, bright block stored LOW, right",
    "us_rgb.dcm": "US, RGB 8-bit",
    "IM0004": "US, 8-bit MONOCHROME2 cine (3 frames), no extension, no preamble",
    "ot_other.dcm": "OT (other modality): skipped unless overridden",
    "no_pixels.dcm": "MG header without PixelData",
    "garbage.dcm": "random bytes",
}
"""What :func:`make_dicom_files` writes."""


def _dataset(modality: str, patient_id: str, rows: int, cols: int) -> object:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = FAKE_PATIENT_NAME
    ds.PatientID = patient_id
    ds.PatientBirthDate = FAKE_BIRTH_DATE
    ds.AccessionNumber = FAKE_ACCESSION
    ds.Modality = modality
    ds.Rows = rows
    ds.Columns = cols
    return ds


def _set_mono(ds: object, arr: np.ndarray, photometric: str, bits_stored: int) -> None:
    ds.PhotometricInterpretation = photometric  # type: ignore[attr-defined]
    ds.SamplesPerPixel = 1  # type: ignore[attr-defined]
    ds.BitsAllocated = arr.dtype.itemsize * 8  # type: ignore[attr-defined]
    ds.BitsStored = bits_stored  # type: ignore[attr-defined]
    ds.HighBit = bits_stored - 1  # type: ignore[attr-defined]
    ds.PixelRepresentation = 0  # type: ignore[attr-defined]
    ds.PixelData = arr.tobytes()  # type: ignore[attr-defined]


def mg_mono2_pixels(rows: int = 32, cols: int = 48) -> np.ndarray:
    """Stored values of ``mg_mono2.dcm``: cols < 16 → 500, cols ≥ 32 → 3500, ramp between."""
    arr = np.empty((rows, cols), np.uint16)
    arr[:, :16] = 500
    arr[:, 32:] = 3500
    arr[:, 16:32] = np.linspace(1600, 2400, 16).astype(np.uint16)
    return arr


MONO1_BRIGHT = (slice(8, 16), slice(8, 24))
"""Region of ``mg_mono1.dcm`` stored LOW (100, i.e. bright in MONOCHROME1); the rest is 3000."""


def make_dicom_files(root: str | Path) -> Path:
    """Write the DICOM fixture files listed in :data:`DICOM_FILES`.

    Args:
        root: folder to write into (created if needed).

    Returns:
        The ``dicom`` folder holding the files.
    """
    import pydicom

    base = Path(root) / "dicom"
    base.mkdir(parents=True, exist_ok=True)

    ds = _dataset("MG", FAKE_PATIENT_ID, 32, 48)
    _set_mono(ds, mg_mono2_pixels(), "MONOCHROME2", 12)
    ds.WindowCenter, ds.WindowWidth = MG_WINDOW  # type: ignore[attr-defined]
    ds.ImageLaterality = "L"  # type: ignore[attr-defined]
    pydicom.dcmwrite(base / "mg_mono2.dcm", ds, enforce_file_format=True)

    mono1 = np.full((32, 40), 3000, np.uint16)
    mono1[MONO1_BRIGHT] = 100
    ds = _dataset("MG", FAKE_PATIENT_ID, 32, 40)
    _set_mono(ds, mono1, "MONOCHROME1", 12)
    ds.ImageLaterality = "R"  # type: ignore[attr-defined]
    pydicom.dcmwrite(base / "mg_mono1.dcm", ds, enforce_file_format=True)

    rgb = np.zeros((24, 30, 3), np.uint8)
    rgb[:, :15] = (200, 200, 200)
    rgb[:, 15:] = (50, 50, 50)
    ds = _dataset("US", FAKE_PATIENT_ID + "B", 24, 30)
    ds.PhotometricInterpretation = "RGB"  # type: ignore[attr-defined]
    ds.SamplesPerPixel = 3  # type: ignore[attr-defined]
    ds.PlanarConfiguration = 0  # type: ignore[attr-defined]
    ds.BitsAllocated = ds.BitsStored = 8  # type: ignore[attr-defined]
    ds.HighBit = 7  # type: ignore[attr-defined]
    ds.PixelRepresentation = 0  # type: ignore[attr-defined]
    ds.PixelData = rgb.tobytes()  # type: ignore[attr-defined]
    pydicom.dcmwrite(base / "us_rgb.dcm", ds, enforce_file_format=True)

    cine = np.zeros((3, 20, 20), np.uint8)
    cine[0, :10] = 255  # first frame: top half white
    cine[1:, 10:] = 255
    ds = _dataset("US", FAKE_PATIENT_ID + "C", 20, 20)
    _set_mono(ds, cine, "MONOCHROME2", 8)
    ds.NumberOfFrames = 3  # type: ignore[attr-defined]
    ds.preamble = None  # type: ignore[attr-defined]
    # No preamble and no file meta: a bare dataset, as some archives export.
    del ds.file_meta  # type: ignore[attr-defined]
    pydicom.dcmwrite(base / "IM0004", ds, implicit_vr=True, little_endian=True)

    ds = _dataset("OT", FAKE_PATIENT_ID + "D", 16, 16)
    _set_mono(ds, np.arange(256, dtype=np.uint16).reshape(16, 16), "MONOCHROME2", 16)
    pydicom.dcmwrite(base / "ot_other.dcm", ds, enforce_file_format=True)

    ds = _dataset("MG", FAKE_PATIENT_ID, 16, 16)
    ds.PhotometricInterpretation = "MONOCHROME2"  # type: ignore[attr-defined]
    pydicom.dcmwrite(base / "no_pixels.dcm", ds, enforce_file_format=True)

    rng = np.random.default_rng(0)
    (base / "garbage.dcm").write_bytes(rng.integers(0, 256, 600, dtype=np.uint8).tobytes())
    return base
