"""Reading DICOM images (mammography and ultrasound) into the platform's gray [0, 1] images.

:func:`read_dicom` applies the display pipeline a viewer would apply before a radiologist
sees the image: the Modality LUT (rescale slope/intercept or LUT), then the VOI LUT or
window centre/width, then MONOCHROME1 inversion (so that a higher value is always
brighter); colour images (RGB, YBR, palette) become gray and multi-frame files (cine
ultrasound) give their first frame.

:func:`pseudonymize` turns a PatientID into a keyed hash, the only form in which patient
identity may enter a manifest. Nothing in this module logs or raises with a header value:
error messages name the problem (and the transfer syntax), never a patient field.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from breastscan.imaging.preprocessing import ImageDecodeError, to_float_gray
from breastscan.labels import DICOM_MODALITY_CODES

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

MODALITY_CODES = DICOM_MODALITY_CODES
"""DICOM Modality (0008,0060) codes understood by the platform (:mod:`breastscan.labels`)."""

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_COLOR_PHOTOMETRIC = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")


@dataclass(frozen=True)
class DicomImage:
    """A decoded DICOM image and the few header facts the platform needs.

    Attributes:
        pixels: ``(H, W)`` float32 in [0, 1], higher = brighter.
        modality: ``"mammography"`` (MG), ``"ultrasound"`` (US), or ``None`` for any other
            or missing Modality tag.
        photometric: the PhotometricInterpretation as stored (e.g. ``"MONOCHROME1"``).
        bits_stored: BitsStored (BitsAllocated when absent).
        n_frames: NumberOfFrames (1 for a single-frame image); only frame 0 is decoded.
    """

    pixels: np.ndarray
    modality: str | None
    photometric: str
    bits_stored: int
    n_frames: int


def _open_bytes(source: bytes | bytearray | memoryview | str | Path) -> tuple[bytes, str]:
    """Return the raw bytes of ``source`` and a short description for messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "DICOM bytes"
    path = Path(source)
    if not path.is_file():
        raise ImageDecodeError(f"file not found: {path}", reason="not_an_image")
    return path.read_bytes(), path.name


def load_dataset(
    source: bytes | bytearray | memoryview | str | Path, *, stop_before_pixels: bool = False
) -> Dataset:
    """Parse a DICOM file (Part 10 with preamble, or a bare dataset without one).

    A file with the ``DICM`` preamble is read normally; a file without it is read with
    ``force=True`` and accepted only when it yields recognisable image attributes (so that
    arbitrary bytes are not mistaken for a dataset).

    Args:
        source: the file's bytes or its path.
        stop_before_pixels: parse the header only (faster; no pixel data is read).

    Returns:
        The parsed :class:`pydicom.dataset.Dataset`.

    Raises:
        ImageDecodeError: the file is missing, not DICOM, or its header is corrupt.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    data, what = _open_bytes(source)
    if not data:
        raise ImageDecodeError(f"{what}: empty input, no bytes to decode", reason="empty")
    _check_inflated_size(data, what)
    with warnings.catch_warnings():
        # pydicom warnings can quote element values (names, dates): keep them out of logs.
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=stop_before_pixels)
        except InvalidDicomError:
            try:
                ds = pydicom.dcmread(
                    io.BytesIO(data), force=True, stop_before_pixels=stop_before_pixels
                )
                # Touch every element now: a forced read of garbage fails lazily otherwise.
                keywords = {elem.keyword for elem in ds}
            except Exception as exc:  # pydicom raises many types on garbage
                raise ImageDecodeError(
                    f"{what}: not a DICOM file or corrupt header ({type(exc).__name__})",
                    reason="not_an_image",
                ) from None
            needed = {"Rows", "Columns", "SOPClassUID", *_PIXEL_KEYWORDS}
            if not keywords & needed:
                raise ImageDecodeError(f"{what}: not a DICOM file (no DICM preamble, no image "
                                       "attributes)", reason="not_an_image") from None
        except Exception as exc:  # the DICM preamble is there: a DICOM file that does not parse
            raise ImageDecodeError(
                f"{what}: not a DICOM file or corrupt header ({type(exc).__name__})", reason="corrupt"
            ) from None
    if len(ds) == 0:
        raise ImageDecodeError(f"{what}: corrupt DICOM file, no data elements could be read",
                               reason="corrupt")
    _ensure_transfer_syntax(ds)
    return ds


def _check_inflated_size(data: bytes, what: str) -> None:
    """Refuse a Deflated Explicit VR file that inflates past :data:`_MAX_INFLATED_BYTES`.

    pydicom inflates a deflated dataset in one piece (header only or not), so a small
    upload could otherwise expand to many gigabytes before any size check runs.
    """
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    if DeflatedExplicitVRLittleEndian.encode("ascii") not in data[:4096]:
        return
    fp = io.BytesIO(data)
    try:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
    except Exception:
        return  # not a Part 10 file meta: dcmread decides what it is
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    begin, total, step = fp.tell(), 0, 1 << 20
    try:
        for start in range(begin, len(data), step):
            chunk = data[start:start + step]
            while chunk:
                total += len(inflater.decompress(chunk, step))
                if total > _MAX_INFLATED_BYTES:
                    raise ImageDecodeError(
                        f"{what}: Deflated Explicit VR Little Endian dataset inflates past "
                        f"{_MAX_INFLATED_BYTES >> 20} MiB; refused (a deflate bomb?)",
                        reason="corrupt",
                    )
                chunk = inflater.unconsumed_tail
    except zlib.error:
        raise ImageDecodeError(
            f"{what}: corrupt DICOM file, its deflated dataset does not inflate", reason="corrupt"
        ) from None


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Give a bare dataset (no file meta) the transfer syntax it was actually read with."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID") is not None:
        return
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if implicit is None:
        implicit, little = True, True
    if implicit:
        uid = ImplicitVRLittleEndian
    else:
        uid = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    if meta is None:
        meta = FileMetaDataset()
        ds.file_meta = meta
    meta.TransferSyntaxUID = uid


def _transfer_syntax(ds: Dataset) -> Any:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return uid


_MAX_INFLATED_BYTES = 1 << 30
"""Largest inflated size of a Deflated Explicit VR dataset (a deflate bomb is refused)."""


def _syntax_label(uid: Any) -> str:
    name = str(getattr(uid, "name", "") or "")
    return f"{name} ({uid})" if name and name != str(uid) else str(uid)


def _check_decodable(ds: Dataset) -> None:
    """Refuse a transfer syntax whose pixel data cannot be decoded here, naming it and why.

    Refused: a UID that is not a known DICOM transfer syntax (private or unknown: its
    encoding is undefined), a compressed syntax pydicom has no decoder for, one whose
    decoder plugin (python-gdcm, pylibjpeg-openjpeg, pyjpegls) is not installed, and
    12-bit JPEG Extended (:func:`_check_precision`), each with reason ``unsupported`` (the
    service's code for it); the messages say "transfer syntax".
    """
    from pydicom.pixels import get_decoder

    uid = _transfer_syntax(ds)
    if uid is None or "PixelData" not in ds:
        return
    if not uid.is_transfer_syntax:
        kind = "private" if uid.is_private else "unknown"
        raise ImageDecodeError(
            f"transfer syntax {uid} is not supported: an {kind} transfer syntax, its pixel "
            "encoding is not defined by the DICOM standard",
            reason="unsupported",
        )
    if not uid.is_compressed:
        return
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise ImageDecodeError(
            f"compressed transfer syntax {_syntax_label(uid)} is not supported: no decoder "
            "exists for it",
            reason="unsupported",
        ) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        raise ImageDecodeError(
            f"compressed transfer syntax {_syntax_label(uid)} has no decoder available "
            f"(install one of: {missing})",
            reason="unsupported",
        )
    _check_precision(ds, uid, decoder)
    _check_codestream_size(ds, uid)


def _check_precision(ds: Dataset, uid: Any, decoder: Any) -> None:
    """Refuse 12-bit JPEG Extended (.4.51) without a decoder that reads it.

    GDCM and Pillow (the permissively licensed plugins shipped) decode it only at 8 bits;
    the one that reads 12-bit samples, pylibjpeg-libjpeg, is GPL-3.0 and not shipped.
    """
    from pydicom.uid import JPEGExtended12Bit

    bits = int(ds.get("BitsStored", 8) or 8)
    if uid == JPEGExtended12Bit and bits > 8 and "pylibjpeg" not in decoder.available_plugins:
        raise ImageDecodeError(
            f"compressed transfer syntax {_syntax_label(uid)} with {bits}-bit samples has no decoder "
            "available (only pylibjpeg-libjpeg reads it; it is GPL-3.0 and not shipped)",
            reason="unsupported",
        )


def _check_codestream_size(ds: Dataset, uid: Any) -> None:
    """Refuse a first frame whose JPEG / JPEG-LS / JPEG 2000 header is larger than Rows/Columns.

    The decoder plugins allocate what the codestream says, not what the DICOM header says:
    without this check a small upload with honest Rows/Columns (checked by the service)
    could carry a codestream that decodes to gigabytes.
    """
    from pydicom.encaps import generate_fragments
    from pydicom.pixels.utils import _get_jpg_parameters
    from pydicom.uid import JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

    jpeg = uid in JPEGTransferSyntaxes or uid in JPEGLSTransferSyntaxes
    if not (jpeg or uid in JPEG2000TransferSyntaxes):
        return  # RLE: pydicom sizes the output from Rows/Columns itself
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        data = ds.PixelData
        # Skip the Basic Offset Table item (8-byte item header + its length); BytesIO
        # shares the bytes, so a large PixelData is not copied.
        stream = io.BytesIO(data)
        stream.seek(8 + int.from_bytes(data[4:8], "little"))
        first = next(generate_fragments(stream), b"")
    except Exception as exc:
        raise ImageDecodeError(
            f"corrupt encapsulated DICOM pixel data ({uid.name}): {type(exc).__name__}", reason="corrupt"
        ) from None
    if jpeg:
        info = _get_jpg_parameters(first)
        height, width = int(info.get("height", 0)), int(info.get("width", 0))
    else:
        height, width = _j2k_size(first)
    if height > rows or width > cols:
        raise ImageDecodeError(
            f"corrupt DICOM pixel data ({uid.name}): the codestream is {width}x{height} "
            f"pixels, the header says {cols}x{rows}",
            reason="corrupt",
        )


def _j2k_size(codestream: bytes) -> tuple[int, int]:
    """``(height, width)`` of a JPEG 2000 codestream's image area, ``(0, 0)`` if unreadable."""
    offset = 0
    if codestream.startswith(b"\x00\x00\x00\x0cjP  "):  # JP2 file format: find jp2c
        offset = 12
        while offset + 8 <= len(codestream):
            length = int.from_bytes(codestream[offset:offset + 4], "big")
            if codestream[offset + 4:offset + 8] == b"jp2c":
                offset += 8
                break
            if length < 8:
                return 0, 0
            offset += length
    siz = codestream[offset:offset + 28]
    if len(siz) < 28 or siz[0:4] != b"\xff\x4f\xff\x51":
        return 0, 0
    xsiz, ysiz, x0, y0 = (int.from_bytes(siz[i:i + 4], "big") for i in (8, 12, 16, 20))
    return max(ysiz - y0, 0), max(xsiz - x0, 0)


def _first_frame(ds: Dataset) -> np.ndarray:
    from pydicom.pixels import pixel_array

    try:
        arr = pixel_array(ds, index=0)
    except ImageDecodeError:
        raise
    except Exception as exc:
        uid = _transfer_syntax(ds)
        syntax = f" ({uid.name})" if uid is not None else ""
        raise ImageDecodeError(
            f"DICOM pixel data could not be decoded{syntax}: {type(exc).__name__}", reason="corrupt"
        ) from None
    return np.asarray(arr)


def _voi_range(ds: Dataset) -> tuple[float, float] | None:
    """Return the output range of the dataset's VOI transform, or None when it has none."""
    from pydicom.pixels import apply_voi_lut

    seq = ds.get("VOILUTSequence")
    if seq:
        bits = int(seq[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center = ds.WindowCenter
        width = ds.WindowWidth
        center = float(center[0] if _is_multi(center) else center)
        width = abs(float(width[0] if _is_multi(width) else width))
        # Values far below / above the window map to the extremes of the output range.
        probe = np.array([center - 100.0 * width - 1.0, center + 100.0 * width + 1.0])
        out = apply_voi_lut(probe, ds)
        return float(np.min(out)), float(np.max(out))
    return None


def _is_multi(value: Any) -> bool:
    return not isinstance(value, (str, bytes)) and hasattr(value, "__len__")


def _color_to_unit(arr: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` RGB → ``(H, W)`` float32 gray in [0, 1] (uint8 / 255, else min-max)."""
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ImageDecodeError(f"colour DICOM with unexpected pixel shape {tuple(arr.shape)}",
                               reason="bad_shape")
    if arr.dtype == np.uint8:
        return to_float_gray(np.ascontiguousarray(arr[:, :, ::-1]))  # to_float_gray wants BGR
    return to_float_gray(arr.astype(np.float64) @ np.array([0.299, 0.587, 0.114]))


def dataset_to_image(ds: Dataset) -> DicomImage:
    """Decode a parsed dataset's first frame through the display pipeline.

    Args:
        ds: a dataset from :func:`load_dataset` (read with its pixel data).

    Returns:
        The :class:`DicomImage`; ``pixels`` is ``(H, W)`` float32 in [0, 1]. Windowed
        images are scaled to the window's output range (values outside the window clip to
        0 or 1); 8-bit images without a VOI transform are divided by 255; anything else is
        min-max scaled.

    Raises:
        ImageDecodeError: no pixel data, an unavailable decoder, NaN/inf values, an
            unsupported shape.
    """
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not any(k in ds for k in _PIXEL_KEYWORDS):
            raise ImageDecodeError("DICOM file has no pixel data", reason="no_pixel_data")
        _check_decodable(ds)
        try:
            photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
            n_frames = int(ds.get("NumberOfFrames", 1) or 1)
            bits_stored = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
            samples = int(ds.get("SamplesPerPixel", 1) or 1)
            code = str(ds.get("Modality", "") or "").strip().upper()
        except Exception as exc:
            raise ImageDecodeError(f"corrupt DICOM image attributes ({type(exc).__name__})",
                                  reason="corrupt") from None

        arr = _first_frame(ds)
        if arr.ndim == 3 and samples == 1 and arr.shape[0] == n_frames:
            arr = arr[0]  # a decoder that ignored ``index``
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ImageDecodeError("DICOM pixel data contains NaN or infinite values", reason="not_finite")

        try:
            if photometric == "PALETTE COLOR":
                pixels = _color_to_unit(np.asarray(apply_color_lut(arr, ds)))
            elif samples == 3 or photometric in _COLOR_PHOTOMETRIC:
                pixels = _color_to_unit(arr)
            else:
                if arr.ndim != 2:
                    raise ImageDecodeError(
                        f"expected a 2-D monochrome frame, got shape {tuple(arr.shape)}",
                        reason="bad_shape",
                    )
                pixels = _monochrome(arr, ds, photometric, apply_modality_lut, apply_voi_lut)
        except ImageDecodeError:
            raise
        except Exception as exc:
            raise ImageDecodeError(
                f"DICOM LUT/windowing could not be applied ({type(exc).__name__})", reason="corrupt"
            ) from None

    pixels = np.asarray(pixels, dtype=np.float32)
    if not np.isfinite(pixels).all():
        raise ImageDecodeError("DICOM pixel data contains NaN or infinite values", reason="not_finite")
    return DicomImage(
        pixels=pixels,
        modality=MODALITY_CODES.get(code),
        photometric=photometric,
        bits_stored=bits_stored,
        n_frames=n_frames,
    )


def _monochrome(
    arr: np.ndarray, ds: Dataset, photometric: str, modality_lut: Any, voi_lut: Any
) -> np.ndarray:
    """Modality LUT → VOI LUT/window → MONOCHROME1 inversion → float32 [0, 1]."""
    out = np.asarray(modality_lut(arr, ds))
    if out.dtype.kind == "f" and not np.isfinite(out).all():
        raise ImageDecodeError("DICOM pixel data contains NaN or infinite values", reason="not_finite")
    voi = _voi_range(ds)
    if voi is not None:
        out = np.asarray(voi_lut(out, ds), dtype=np.float64)
        lo, hi = voi
        if hi > lo:
            scaled = np.clip((out - lo) / (hi - lo), 0.0, 1.0)
            if photometric == "MONOCHROME1":
                scaled = 1.0 - scaled
            return scaled.astype(np.float32)
    if photometric == "MONOCHROME1":
        out = 255 - out if out.dtype == np.uint8 else -out.astype(np.float64)
    return to_float_gray(out)


def read_dicom(source: bytes | bytearray | memoryview | str | Path) -> DicomImage:
    """Read a DICOM file into a gray image ready for :mod:`breastscan.imaging.preprocessing`.

    Args:
        source: the file's bytes (with or without the 128-byte preamble) or its path.

    Returns:
        A :class:`DicomImage` whose ``pixels`` are ``(H, W)`` float32 in [0, 1], higher =
        brighter (MONOCHROME1 inverted), Modality LUT then VOI LUT/window applied, colour
        converted to gray, first frame of a multi-frame file.

    Raises:
        ImageDecodeError: its ``reason`` says why: ``not_an_image`` (not DICOM),
            ``corrupt`` (a DICOM file that does not parse or decode, a codestream larger
            than Rows/Columns, a deflated dataset past ``_MAX_INFLATED_BYTES``),
            ``no_pixel_data``, ``unsupported`` (a transfer syntax that cannot be decoded
            here -- private/unknown, compressed without a decoder in pydicom (MPEG, HEVC
            ...) or without its plugin installed; the message names the syntax),
            ``not_finite`` (NaN/inf values), ``bad_shape``.

    Compressed syntaxes decoded (pydicom's pixel handlers with pylibjpeg-libjpeg,
    pylibjpeg-openjpeg and pyjpegls): JPEG baseline / extended / lossless (.50, .51, .57,
    .70), JPEG-LS (.80, .81), JPEG 2000 and HTJ2K (.90, .91, .201-.203), RLE Lossless (.5);
    Deflated Explicit VR Little Endian (1.2.840.10008.1.2.1.99) is inflated by pydicom.
    """
    return dataset_to_image(load_dataset(source))


def pseudonymize(value: str, salt: str) -> str:
    """Turn an identifier (a PatientID) into a keyed, non-reversible group id.

    Args:
        value: the identifier; surrounding whitespace is ignored.
        salt: the secret key of the HMAC; the same key gives the same ids across runs,
            another key gives unrelated ids.

    Returns:
        12 lowercase hex characters of HMAC-SHA256(salt, value).

    Raises:
        ValueError: on an empty value or an empty salt.
    """
    value = str(value).strip()
    if not value:
        raise ValueError("cannot pseudonymize an empty value")
    if not salt:
        raise ValueError("pseudonymize needs a non-empty salt (the HMAC key)")
    return hmac.new(salt.encode("utf-8"), value.encode("utf-8"), hashlib.sha256).hexdigest()[:12]
