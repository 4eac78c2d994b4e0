"""Request payloads for the service tests: phantom images as files, arrays, DICOM, broken files."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np

from breastscan.data.phantoms import mammography_phantom, ultrasound_phantom


def png(arr: np.ndarray) -> bytes:
    """PNG bytes of a gray/BGR(A) uint8 or uint16 array."""
    ok, buf = cv2.imencode(".png", arr)
    assert ok
    return buf.tobytes()


def jpeg(arr: np.ndarray) -> bytes:
    """JPEG bytes of a gray uint8 array."""
    ok, buf = cv2.imencode(".jpg", arr)
    assert ok
    return buf.tobytes()


def mammogram(seed: int = 1) -> np.ndarray:
    """A 160x128 uint8 mammography phantom."""
    img, _ = mammography_phantom(np.random.default_rng(seed), density=1 + seed % 4,
                                 pathology=("benign", "malignant", "normal")[seed % 3])
    return img


def ultrasound(seed: int = 2) -> np.ndarray:
    """A 112x144 uint8 ultrasound phantom."""
    img, _ = ultrasound_phantom(np.random.default_rng(seed), pathology=("benign", "malignant")[seed % 2])
    return img


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return struct.pack(">I", len(data)) + kind + data + crc


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels (a decompression bomb's shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _chunk(b"IEND", b""))


def dicom(pixels: np.ndarray | None, modality: str = "MG", *,
          size: tuple[int | None, int | None] | None = None) -> bytes:
    """A 12-bit-in-16 MONOCHROME2 DICOM file with a patient name and id (for leak checks).

    Args:
        pixels: ``(rows, cols)`` pixel values, or ``None`` for a file without pixel data.
        modality: the Modality tag (``MG``, ``US`` ...).
        size: ``(Rows, Columns)`` written to the header instead of the pixels' shape;
            ``(None, None)`` leaves both out. Default: the pixels' shape, else 64 x 64.
    """
    import pydicom

    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.Modality = modality
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "SECRET-1234"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    rows, cols = size if size is not None else (pixels.shape if pixels is not None else (64, 64))
    if rows is not None:
        ds.Rows, ds.Columns = rows, cols
    if pixels is not None:
        ds.PixelData = pixels.astype("<u2").tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def decode_png_b64(text: str) -> np.ndarray:
    """Decode a base64 PNG field of an answer (unchanged depth and channels)."""
    import base64

    arr = cv2.imdecode(np.frombuffer(base64.b64decode(text), np.uint8), cv2.IMREAD_UNCHANGED)
    assert arr is not None
    return arr
