"""Compressed DICOM transfer syntaxes: what decodes (and to what), what is refused and why.

Lossless syntaxes are checked pixel for pixel against the uncompressed original, on
mammography-like data (12-bit values in a 16-bit container, full 16-bit, MONOCHROME1 and
MONOCHROME2). RLE, JPEG-LS and JPEG 2000 files are encoded here with pydicom 3's own
encoders; JPEG lossless (Process 14) with the small encoder below (nothing installed
encodes it); JPEG baseline / extended (lossy, encoded by nobody here) come from the sample
files shipped inside pydicom (``pydicom/data/test_files``, no download).
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from pydicom import uid as U  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402

from breastscan.imaging import dicom as dicom_mod  # noqa: E402
from breastscan.imaging.dicom import load_dataset, read_dicom  # noqa: E402
from breastscan.imaging.preprocessing import ImageDecodeError, PreprocessSpec  # noqa: E402
from breastscan.serving.answer import ApiError  # noqa: E402
from breastscan.serving.request import decode_upload  # noqa: E402

MAX_BYTES = 10_000_000
TEST_FILES = Path(os.path.dirname(pydicom.data.__file__)) / "test_files"


def _local(name: str) -> Path:
    """A sample file shipped inside the pinned pydicom wheel (never downloaded)."""
    path = TEST_FILES / name
    if not path.is_file():  # the wheel ships it: a missing file is a broken install, not a skip
        pytest.fail(f"pydicom sample {name} is missing from {TEST_FILES} (reinstall pydicom)")
    return path


def _mammo(bits: int, shape: tuple[int, int] = (64, 48), seed: int = 0) -> np.ndarray:
    """Mammography-like uint16 data: a smooth breast-shaped ramp, noise, a bright lesion."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    top = (1 << bits) - 1
    base = top * 0.7 * np.exp(-(((xx - w) / (0.8 * w)) ** 2 + ((yy - h / 2) / (0.6 * h)) ** 2))
    base += rng.normal(0.0, top * 0.02, shape)
    base[(yy - h // 3) ** 2 + (xx - 2 * w // 3) ** 2 < 25] = top * 0.95
    arr = np.clip(np.rint(base), 0, top).astype(np.uint16)
    arr[0, 0], arr[-1, -1] = 0, top  # the full range, edge values included
    return arr


def _dataset(arr: np.ndarray, bits: int, photometric: str = "MONOCHROME2") -> Dataset:
    """An uncompressed single-frame MG dataset holding ``arr``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = U.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = U.DigitalMammographyXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPInstanceUID = U.generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "MG"
    ds.PatientID = "FAKE-PID-123"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.PixelData = arr.tobytes()
    return ds


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _raw_pixels(data: bytes) -> np.ndarray:
    """The stored values of frame 0, decoded by pydicom's pixel handlers (no LUTs)."""
    from pydicom.pixels import pixel_array

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(pixel_array(load_dataset(data), index=0))


# --------------------------------------------------------------------------- JPEG lossless


def _jpeg_lossless(arr: np.ndarray, precision: int, predictor: int = 1) -> bytes:
    """Encode ``arr`` as a JPEG lossless (ISO 10918-1 Process 14) codestream, one component.

    One Huffman table in which all 17 difference categories have 5-bit codes; point
    transform 0. ``predictor`` is the selection value (1 = left neighbour, SV1).
    """
    h, w = arr.shape
    x = arr.astype(np.int64)
    bits: list[int] = []

    def put(value: int, n: int) -> None:
        bits.extend((value >> (n - 1 - i)) & 1 for i in range(n))

    for r in range(h):
        for c in range(w):
            if r == 0 and c == 0:
                pred = 1 << (precision - 1)
            elif r == 0:
                pred = int(x[r, c - 1])
            elif c == 0:
                pred = int(x[r - 1, c])
            else:
                ra, rb, rc = int(x[r, c - 1]), int(x[r - 1, c]), int(x[r - 1, c - 1])
                pred = {1: ra, 2: rb, 3: rc, 4: ra + rb - rc, 5: ra + ((rb - rc) >> 1),
                        6: rb + ((ra - rc) >> 1), 7: (ra + rb) >> 1}[predictor]
            diff = (int(x[r, c]) - pred) & 0xFFFF
            if diff == 0x8000:
                put(16, 5)  # category 16: no additional bits
                continue
            if diff > 0x8000:
                diff -= 0x10000
            ssss = abs(diff).bit_length()
            put(ssss, 5)  # the code of category k is k in 5 bits (canonical table below)
            if ssss:
                put(diff if diff > 0 else diff + (1 << ssss) - 1, ssss)
    bits.extend([1] * (-len(bits) % 8))
    packed = np.packbits(np.asarray(bits, np.uint8)).tobytes()
    scan = packed.replace(b"\xff", b"\xff\x00")  # byte stuffing

    sof = struct.pack(">HHBHHBBBB", 0xFFC3, 11, precision, h, w, 1, 1, 0x11, 0)
    counts = bytes([0, 0, 0, 0, 17] + [0] * 11)
    dht = struct.pack(">HHB", 0xFFC4, 2 + 1 + 16 + 17, 0x00) + counts + bytes(range(17))
    sos = struct.pack(">HHBBBBBB", 0xFFDA, 8, 1, 1, 0x00, predictor, 0, 0)
    return b"\xff\xd8" + sof + dht + sos + scan + b"\xff\xd9"


def _encapsulated(ds: Dataset, syntax: str, frame: bytes) -> bytes:
    ds = ds.copy()
    ds.file_meta = ds.file_meta.copy()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    return _bytes(ds)


# --------------------------------------------------------------------------- lossless round trips


def _compressed(ds: Dataset, syntax: str, arr: np.ndarray, **kwargs: Any) -> bytes:
    ds = ds.copy()
    ds.file_meta = ds.file_meta.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.compress(syntax, arr, **kwargs)
    return _bytes(ds)


LOSSLESS: list[tuple[str, dict[str, Any]]] = [
    (U.RLELossless, {}),
    (U.JPEGLSLossless, {}),
    (U.JPEG2000Lossless, {}),
]


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("bits", [12, 16])
@pytest.mark.parametrize(("syntax", "kwargs"), LOSSLESS, ids=lambda v: getattr(v, "name", ""))
def test_lossless_syntaxes_decode_exactly(syntax: str, kwargs: dict[str, Any], bits: int,
                                          photometric: str) -> None:
    arr = _mammo(bits)
    original = _dataset(arr, bits, photometric)
    plain = _bytes(original)
    data = _compressed(original, syntax, arr, **kwargs)
    assert load_dataset(data).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(_raw_pixels(data), arr)

    img, ref = read_dicom(data), read_dicom(plain)
    assert img.photometric == photometric and img.bits_stored == bits
    assert img.modality == "mammography" and img.pixels.shape == arr.shape
    np.testing.assert_array_equal(img.pixels, ref.pixels)
    if photometric == "MONOCHROME1":  # stored 0 is white: brightest after inversion
        assert img.pixels[0, 0] == 1.0 and img.pixels[-1, -1] == 0.0
    np.testing.assert_array_equal(decode_upload(data, max_bytes=MAX_BYTES), ref.pixels)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("bits", [12, 16])
@pytest.mark.parametrize(("syntax", "predictor"),
                         [(U.JPEGLosslessSV1, 1), (U.JPEGLossless, 1), (U.JPEGLossless, 7)],
                         ids=["70-SV1", "57-SV1", "57-SV7"])
def test_jpeg_lossless_process14_decodes_exactly(syntax: str, predictor: int, bits: int,
                                                 photometric: str) -> None:
    arr = _mammo(bits, seed=bits)
    original = _dataset(arr, bits, photometric)
    data = _encapsulated(original, syntax, _jpeg_lossless(arr, bits, predictor))
    np.testing.assert_array_equal(_raw_pixels(data), arr)
    ref = read_dicom(_bytes(original)).pixels
    np.testing.assert_array_equal(read_dicom(data).pixels, ref)
    np.testing.assert_array_equal(decode_upload(data, max_bytes=MAX_BYTES), ref)


def test_deflated_explicit_vr_decodes_exactly() -> None:
    arr = _mammo(12)
    original = _dataset(arr, 12, "MONOCHROME1")
    deflated = original.copy()
    deflated.file_meta = original.file_meta.copy()
    deflated.file_meta.TransferSyntaxUID = U.DeflatedExplicitVRLittleEndian
    data = _bytes(deflated)
    assert len(data) < arr.nbytes  # really deflated
    np.testing.assert_array_equal(_raw_pixels(data), arr)
    ref = read_dicom(_bytes(original)).pixels
    np.testing.assert_array_equal(read_dicom(data).pixels, ref)
    np.testing.assert_array_equal(decode_upload(data, max_bytes=MAX_BYTES), ref)
    img = read_dicom(_local("image_dfl.dcm"))  # a deflated file written by another toolkit
    assert img.pixels.shape == (512, 512) and float(img.pixels.max()) == 1.0


# --------------------------------------------------------------------------- lossy, bounded error


def test_jpeg_ls_near_lossless_error_is_bounded() -> None:
    arr = _mammo(12)
    data = _compressed(_dataset(arr, 12), U.JPEGLSNearLossless, arr, jls_error=3)
    decoded = _raw_pixels(data).astype(np.int64)
    assert np.abs(decoded - arr).max() <= 3  # NEAR=3: every sample within 3
    img = read_dicom(data)
    assert img.pixels.shape == arr.shape


def test_jpeg2000_lossy_error_is_bounded() -> None:
    arr = _mammo(12, shape=(96, 80))
    data = _compressed(_dataset(arr, 12), U.JPEG2000, arr, j2k_cr=[8])
    decoded = _raw_pixels(data).astype(np.float64)
    err = np.abs(decoded - arr) / 4095.0
    assert err.mean() < 0.02 and err.max() < 0.2
    ref = read_dicom(_bytes(_dataset(arr, 12))).pixels
    assert np.abs(decode_upload(data, max_bytes=MAX_BYTES) - ref).mean() < 0.03


def test_jpeg_baseline_8bit_sample_is_close_to_its_lossless_copy() -> None:
    # The same 100x100 RGB test card as JPEG baseline (dcmtk, YBR_FULL) and as RLE.
    lossy = read_dicom(_local("SC_rgb_jpeg_dcmtk.dcm"))
    exact = read_dicom(_local("SC_rgb_rle.dcm"))
    assert lossy.pixels.shape == exact.pixels.shape == (100, 100)
    diff = np.abs(lossy.pixels - exact.pixels)
    assert diff.mean() < 0.01 and diff.max() < 0.05
    up = decode_upload(_local("SC_rgb_jpeg_dcmtk.dcm").read_bytes(), max_bytes=MAX_BYTES)
    np.testing.assert_array_equal(up, lossy.pixels)


def test_jpeg_lossless_sample_decodes_and_12bit_jpeg_extended_is_refused() -> None:
    # A JPEG lossless SV1 file written by GDCM: identical to the RLE copy of the same card.
    np.testing.assert_array_equal(read_dicom(_local("SC_rgb_jpeg_gdcm.dcm")).pixels,
                                  read_dicom(_local("SC_rgb_rle.dcm")).pixels)
    # JPEG Extended (Process 2 and 4), 12 bits stored: only the GPL-3.0 pylibjpeg-libjpeg
    # reads it, which is not shipped -- refused, saying so, before any decoder runs.
    path = _local("JPGExtended.dcm")
    assert load_dataset(path).file_meta.TransferSyntaxUID == U.JPEGExtended12Bit
    with pytest.raises(ImageDecodeError, match=r"transfer syntax .*12-bit samples has no decoder"):
        read_dicom(path)
    with pytest.raises(ApiError) as info:
        decode_upload(path.read_bytes(), max_bytes=2**25)
    assert info.value.code == "unsupported"


@pytest.mark.parametrize(("name", "reference"), [
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
    ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
    ("MR_small_RLE.dcm", "MR_small.dcm"),
])
def test_samples_from_other_encoders_match_their_original(name: str, reference: str) -> None:
    np.testing.assert_array_equal(read_dicom(_local(name)).pixels,
                                  read_dicom(_local(reference)).pixels)


def test_htj2k_syntaxes_route_to_openjpeg() -> None:
    """HTJ2K is decoded by pylibjpeg-openjpeg (OpenJPEG >= 2.5); nothing here encodes HT
    block coding, so this checks the routing (not refused, decoded) with a Part 1 codestream."""
    from pydicom.pixels import get_decoder

    assert get_decoder(U.HTJ2KLossless).is_available
    arr = _mammo(12)
    j2k = load_dataset(_compressed(_dataset(arr, 12), U.JPEG2000Lossless, arr))
    frame = next(pydicom.encaps.generate_frames(j2k.PixelData, number_of_frames=1))
    data = _encapsulated(_dataset(arr, 12), U.HTJ2KLossless, frame)
    np.testing.assert_array_equal(_raw_pixels(data), arr)


# --------------------------------------------------------------------------- refusals


def _code(data: bytes, **kwargs: Any) -> ApiError:
    with pytest.raises(ApiError) as info:
        decode_upload(data, max_bytes=MAX_BYTES, **kwargs)
    return info.value


def test_private_transfer_syntax_is_unsupported() -> None:
    data = _bytes(_dataset(_mammo(12), 12))
    private = "1.3.6.1.4.1.99999.42"  # same length as the Explicit VR LE UID + pad
    assert len(private) == len(U.ExplicitVRLittleEndian + "\0")
    data = data.replace((U.ExplicitVRLittleEndian + "\0").encode(), private.encode(), 1)
    with pytest.raises(ImageDecodeError, match=r"transfer syntax 1\.3\.6\.1\.4\.1\.99999\.42"):
        read_dicom(data)
    err = _code(data)
    assert err.code == "unsupported" and private in err.message and "private" in err.message
    assert "FAKE-PID" not in err.message


def test_compressed_syntax_without_any_decoder_is_unsupported() -> None:
    arr = _mammo(8, shape=(32, 32))
    data = _encapsulated(_dataset(arr, 12), U.MPEG2MPML, b"\x00\x00\x01\xb3" + b"\x00" * 60)
    err = _code(data)
    assert err.code == "unsupported" and "MPEG2" in err.message and "no decoder exists" in err.message


@pytest.mark.parametrize("syntax", [U.JPEGLosslessSV1, U.JPEGLSLossless, U.JPEG2000Lossless,
                                    U.JPEGBaseline8Bit])
def test_syntax_with_its_plugin_hidden_is_unsupported(syntax: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from pydicom.pixels import get_decoder

    decoder = get_decoder(syntax)
    monkeypatch.setattr(decoder, "_unavailable",
                        {label: ("a hidden plugin",) for label in decoder._available})
    monkeypatch.setattr(decoder, "_available", {})
    arr = _mammo(12, shape=(16, 16))
    data = _encapsulated(_dataset(arr, 12), syntax, _jpeg_lossless(arr, 12))
    with pytest.raises(ImageDecodeError, match="no decoder available") as info:
        read_dicom(data)
    assert syntax.name in str(info.value) and str(syntax) in str(info.value)
    err = _code(data)
    assert err.code == "unsupported" and syntax.name in err.message


def _no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pixel data must not be decoded")

    monkeypatch.setattr("pydicom.pixels.pixel_array", refuse)


def test_size_is_checked_from_the_header_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    arr = _mammo(12)
    data = _compressed(_dataset(arr, 12), U.JPEG2000Lossless, arr)
    _no_decoding(monkeypatch)
    err = _code(data, spec=PreprocessSpec(max_side=32))
    assert err.code == "too_large" and "48x64" in err.message
    assert _code(data, spec=PreprocessSpec(min_side=100)).code == "too_small"


@pytest.mark.parametrize("syntax", [U.JPEG2000Lossless, U.JPEGLSLossless, "jpeg-lossless"])
def test_codestream_larger_than_header_is_refused_before_decoding(
    syntax: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    arr = _mammo(12, shape=(64, 48))
    small = _dataset(arr[:16, :16], 12)
    if syntax == "jpeg-lossless":
        syntax, frame = U.JPEGLosslessSV1, _jpeg_lossless(arr, 12)
    else:
        big = load_dataset(_compressed(_dataset(arr, 12), syntax, arr))
        frame = next(pydicom.encaps.generate_frames(big.PixelData, number_of_frames=1))
    data = _encapsulated(small, syntax, frame)  # header 16x16, codestream 48x64
    _no_decoding(monkeypatch)
    with pytest.raises(ImageDecodeError, match="codestream is 48x64 pixels, the header says 16x16"):
        read_dicom(data)
    assert _code(data).code == "corrupt"


def test_deflate_bomb_and_broken_deflate_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    arr = np.zeros((256, 256), np.uint16)
    ds = _dataset(arr, 12)
    ds.file_meta.TransferSyntaxUID = U.DeflatedExplicitVRLittleEndian
    data = _bytes(ds)
    assert len(data) < 2000  # 128 KiB of zeros
    monkeypatch.setattr(dicom_mod, "_MAX_INFLATED_BYTES", 64 * 1024)
    with pytest.raises(ImageDecodeError, match="inflates past"):
        load_dataset(data, stop_before_pixels=True)
    assert _code(data).code == "corrupt"
    monkeypatch.undo()
    assert read_dicom(data).pixels.shape == (256, 256)
    cut = data[: len(data) - 40] + b"\xff" * 40
    with pytest.raises(ImageDecodeError):
        read_dicom(cut)


def test_undecodable_codestream_is_corrupt_and_names_the_syntax() -> None:
    arr = _mammo(12, shape=(16, 16))
    frame = _jpeg_lossless(arr, 12)
    data = _encapsulated(_dataset(arr, 12), U.JPEGLosslessSV1, frame[:60] + b"\xff\xd9")
    with pytest.raises(ImageDecodeError, match="could not be decoded") as info:
        read_dicom(data)
    assert U.JPEGLosslessSV1.name in str(info.value)
    assert _code(data).code == "corrupt"
