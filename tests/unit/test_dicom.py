"""breastscan.imaging.dicom: the display pipeline (LUTs, windowing, MONOCHROME1), errors, pseudonyms."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from breastscan.data.pseudonym_salt import SALT_ENV, SaltError, resolve_salt
from breastscan.imaging.dicom import DicomImage, pseudonymize, read_dicom
from breastscan.imaging.preprocessing import ImageDecodeError, decode_image
from tests.layouts import MONO1_BRIGHT, make_dicom_files


@pytest.fixture(scope="module")
def dicom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dicom_files(tmp_path_factory.mktemp("dicom"))


def test_monochrome1_is_inverted(dicom_dir: Path) -> None:
    img = read_dicom(dicom_dir / "mg_mono1.dcm")
    assert img.photometric == "MONOCHROME1"
    assert img.modality == "mammography"
    # The block stored LOW is bright in MONOCHROME1: it must come out as the brightest.
    assert np.all(img.pixels[MONO1_BRIGHT] == pytest.approx(1.0))
    outside = np.ones(img.pixels.shape, bool)
    outside[MONO1_BRIGHT] = False
    assert np.all(img.pixels[outside] == pytest.approx(0.0))


def test_voi_window_is_applied_and_clips(dicom_dir: Path) -> None:
    img = read_dicom(dicom_dir / "mg_mono2.dcm")
    assert isinstance(img, DicomImage)
    assert img.pixels.dtype == np.float32 and img.pixels.shape == (32, 48)
    assert img.bits_stored == 12 and img.n_frames == 1
    # Window 2000/1000: stored 500 (below) → 0, 3500 (above) → 1, the ramp in between.
    assert np.all(img.pixels[:, :16] == 0.0)
    assert np.all(img.pixels[:, 32:] == 1.0)
    ramp = img.pixels[0, 16:32]
    assert np.all(np.diff(ramp) >= 0) and 0.05 < ramp[0] < 0.2 and 0.8 < ramp[-1] < 0.95


def test_rgb_ultrasound_becomes_gray(dicom_dir: Path) -> None:
    img = read_dicom(dicom_dir / "us_rgb.dcm")
    assert img.modality == "ultrasound" and img.pixels.shape == (24, 30)
    assert img.pixels[0, 0] == pytest.approx(200 / 255, abs=1e-3)
    assert img.pixels[0, -1] == pytest.approx(50 / 255, abs=1e-3)


def test_multiframe_gives_first_frame_and_bare_dataset_reads(dicom_dir: Path) -> None:
    img = read_dicom(dicom_dir / "IM0004")  # no preamble, no file meta, 3 frames
    assert img.n_frames == 3 and img.pixels.shape == (20, 20)
    assert np.all(img.pixels[:10] == 1.0) and np.all(img.pixels[10:] == 0.0)


def test_other_modality_is_none(dicom_dir: Path) -> None:
    assert read_dicom(dicom_dir / "ot_other.dcm").modality is None


def test_no_pixel_data_is_a_clear_error(dicom_dir: Path) -> None:
    with pytest.raises(ImageDecodeError, match="DICOM file has no pixel data") as info:
        read_dicom(dicom_dir / "no_pixels.dcm")
    assert info.value.reason == "no_pixel_data"


def test_garbage_is_not_dicom(dicom_dir: Path) -> None:
    for source, message, reason in [
        (dicom_dir / "garbage.dcm", "not a DICOM file", "not_an_image"),
        (b"\x00" * 128 + b"DICM" + b"\xff" * 40, "corrupt DICOM", "corrupt"),
        (dicom_dir / "missing.dcm", "file not found", "not_an_image"),
        (b"", "empty input", "empty"),
    ]:
        with pytest.raises(ImageDecodeError, match=message) as info:
            read_dicom(source)
        assert info.value.reason == reason, message


def test_compressed_syntax_without_decoder_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    # The JPEG-LS plugins (pyjpegls, pylibjpeg) are installed: hide them, as on a host without.
    decoder = get_decoder(JPEGLSLossless)
    monkeypatch.setattr(decoder, "_unavailable", {"pyjpegls": ("numpy", "pyjpegls")})
    monkeypatch.setattr(decoder, "_available", {})
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "MG"
    ds.Rows, ds.Columns = 8, 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = encapsulate([b"\xff\xd8" + b"\x00" * 30])
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    with pytest.raises(ImageDecodeError, match="JPEG-LS") as info:
        read_dicom(buf.getvalue())
    assert "no decoder available" in str(info.value) and "pyjpegls" in str(info.value)
    assert info.value.reason == "unsupported"


def test_nan_float_pixels_are_refused() -> None:
    import pydicom

    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.Rows, ds.Columns = 4, 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = 32
    arr = np.zeros((4, 4), np.float32)
    arr[1, 1] = np.nan
    ds.FloatPixelData = arr.tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    with pytest.raises(ImageDecodeError, match="NaN") as info:
        read_dicom(buf.getvalue())
    assert info.value.reason == "not_finite"


def test_decode_image_reads_dicom_bytes(dicom_dir: Path) -> None:
    data = (dicom_dir / "mg_mono2.dcm").read_bytes()
    pixels = decode_image(data)
    np.testing.assert_array_equal(pixels, read_dicom(data).pixels)
    assert pixels.dtype == np.float32 and 0.0 <= pixels.min() <= pixels.max() <= 1.0
    with pytest.raises(ImageDecodeError, match="smallest side") as info:
        decode_image(data, min_side=64)
    assert info.value.reason == "too_small"


def test_pseudonymize_is_deterministic_and_keyed() -> None:
    a = pseudonymize("PID-1", "salt-a")
    assert a == pseudonymize("PID-1", "salt-a") == pseudonymize("  PID-1 ", "salt-a")
    assert len(a) == 12 and all(c in "0123456789abcdef" for c in a)
    assert a != pseudonymize("PID-1", "salt-b")
    assert a != pseudonymize("PID-2", "salt-a")
    assert "PID" not in a
    with pytest.raises(ValueError):
        pseudonymize("", "salt")
    with pytest.raises(ValueError):
        pseudonymize("PID-1", "")


def test_resolve_salt_order_and_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = tmp_path / "salts" / "pseudonym.salt"
    monkeypatch.delenv(SALT_ENV, raising=False)
    created = resolve_salt(default_file=default)  # created on first use, 0600, then reused
    assert len(created) == 64 and default.stat().st_mode & 0o777 == 0o600
    assert resolve_salt(default_file=default) == created
    assert resolve_salt("an-explicit-salt-0001", default_file=default) == "an-explicit-salt-0001"
    monkeypatch.setenv(SALT_ENV, "the-environment-salt-01")
    assert resolve_salt("an-explicit-salt-0001", default_file=default) == "the-environment-salt-01"
    assert resolve_salt(default_file=default) == "the-environment-salt-01"
    monkeypatch.delenv(SALT_ENV)
    for weak in ("breastscan", "fifteen-chars!!"):
        with pytest.raises(SaltError, match="could reverse"):
            resolve_salt(weak, default_file=default)
        assert resolve_salt(weak, allow_public=True, default_file=default) == weak
    assert resolve_salt(allow_public=True, default_file=default) == "breastscan"
    with pytest.raises(SaltError, match="not both"):
        resolve_salt("an-explicit-salt-0001", default, default_file=default)
    default.write_text("\n")
    with pytest.raises(SaltError, match="is empty"):
        resolve_salt(default_file=default)
