"""The one preprocessing definition shared by training, evaluation and serving.

``decode_image`` turns any supported file (PNG, JPEG, PGM, DICOM; 8- or 16-bit; gray, RGB
or RGBA) into a float32 gray image in [0, 1]. ``preprocess_image`` applies the optional
contrast steps (CLAHE, unsharp masking) and an aspect-preserving resize with zero padding
to the model's input size. Every knob lives in a :class:`PreprocessSpec`, which is saved
beside each trained model so that serving applies exactly what training used.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np

SPEC_FILENAME = "preprocess.json"
DICOM_MAGIC = b"DICM"


DECODE_REASONS: tuple[str, ...] = (
    "empty",  # no bytes at all
    "too_small",  # a side below ``min_side``
    "too_large",  # a side above ``max_side``
    "no_pixel_data",  # a DICOM file without an image
    "not_finite",  # NaN or infinite pixel values
    "unsupported",  # a known container with an encoding decoded nowhere here (a DICOM codec)
    "bad_shape",  # pixels that are not (H, W) or (H, W, C) with C in 1, 3, 4
    "corrupt",  # a supported format that does not decode
    "truncated",  # a file that ends early (a cut-off upload)
    "not_an_image",  # bytes of no supported format, or a path that names no file
)
"""Why an image does not decode: the ``reason`` of every :class:`ImageDecodeError`.

The words are the service's error codes (:data:`breastscan.serving.answer.ERRORS`), so the
service answers ``reason`` as it is; the message is for people and may be reworded freely.
"""


class ImageDecodeError(ValueError):
    """The input is not an image the platform can use.

    Attributes:
        reason: why, one of :data:`DECODE_REASONS` (stable, for programs to branch on);
            the message says it in words.
    """

    def __init__(self, message: str, *, reason: str = "corrupt") -> None:
        """Build the error; ``reason`` must be one of :data:`DECODE_REASONS` (else ValueError)."""
        if reason not in DECODE_REASONS:
            raise ValueError(f"unknown decode reason {reason!r}; expected one of {', '.join(DECODE_REASONS)}")
        super().__init__(message)
        self.reason = reason


LEGACY_CLAHE_BITS = 16
"""CLAHE depth of every spec written before ``clahe_bits`` existed (left out of their ``spec_id``)."""


@dataclass(frozen=True)
class PreprocessSpec:
    """Every parameter of preprocessing; saved with each model as ``preprocess.json``.

    Attributes:
        height: model input height in pixels.
        width: model input width in pixels.
        keep_aspect: resize keeping the aspect ratio and zero-pad to ``height x width``
            (``False`` stretches).
        clahe: apply contrast-limited adaptive histogram equalisation.
        clahe_clip_limit: CLAHE clip limit (OpenCV's ``clipLimit``).
        clahe_tile_grid: CLAHE tiles per side.
        clahe_bits: depth CLAHE runs at, 16 (the default, and what every spec saved
            before this field used) or 8. OpenCV's 16-bit CLAHE builds a 65,536-bin
            histogram and lookup table per tile: about 7 ms for a 160x128 input with 8x8
            tiles, whatever the image; 8 bits costs about 0.1 ms. They are different
            transforms, not one at two precisions: the clip limit is relative to the bin
            count, so at 16 bits an 8-bit image is barely equalised (mean change 0.02 of the
            range on a demo mammogram, 0.07 at 8 bits). Choose by measuring the model.
        unsharp: apply unsharp masking (sharpening).
        unsharp_sigma: Gaussian sigma of the unsharp blur, in output pixels.
        unsharp_amount: weight of the detail added back (0 = none).
        min_side: smallest accepted input side in pixels.
        max_side: largest accepted input side in pixels.
    """

    height: int = 128
    width: int = 128
    keep_aspect: bool = True
    clahe: bool = False
    clahe_clip_limit: float = 2.0
    clahe_tile_grid: int = 8
    clahe_bits: int = 16
    unsharp: bool = False
    unsharp_sigma: float = 1.0
    unsharp_amount: float = 0.5
    min_side: int = 16
    max_side: int = 16384

    def __post_init__(self) -> None:
        if self.height < 8 or self.width < 8:
            raise ValueError(f"input size must be at least 8x8, got {self.height}x{self.width}")
        if not 1 <= self.min_side <= self.max_side:
            raise ValueError("need 1 <= min_side <= max_side")
        if self.clahe_bits not in (8, 16):
            raise ValueError(f"clahe_bits must be 8 or 16, got {self.clahe_bits}")

    def to_dict(self) -> dict[str, Any]:
        """Return the spec as a plain JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessSpec:
        """Build a spec from a dict, rejecting unknown keys (a typo must not pass silently)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"spec_id"})
        if unknown:
            raise ValueError(f"unknown preprocessing keys: {', '.join(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    @functools.cached_property
    def spec_id(self) -> str:
        """A short stable id of the spec's content (12 hex digits; computed once per spec)."""
        content = self.to_dict()
        if content["clahe_bits"] == LEGACY_CLAHE_BITS:  # specs saved before the field keep their id
            del content["clahe_bits"]
        canonical = json.dumps(content, sort_keys=True).encode()
        return hashlib.sha256(canonical).hexdigest()[:12]

    def save(self, path: str | Path) -> Path:
        """Write the spec as JSON (with its ``spec_id``); ``path`` may be a directory."""
        path = Path(path)
        if path.is_dir():
            path = path / SPEC_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**self.to_dict(), "spec_id": self.spec_id}, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> PreprocessSpec:
        """Read a spec written by :meth:`save`; ``path`` may be the model directory."""
        path = Path(path)
        if path.is_dir():
            path = path / SPEC_FILENAME
        data = json.loads(path.read_text())
        spec = cls.from_dict(data)
        if "spec_id" in data and data["spec_id"] != spec.spec_id:
            raise ValueError(f"{path}: spec_id {data['spec_id']} does not match its content")
        return spec


@dataclass(frozen=True)
class Letterbox:
    """Geometry of an aspect-preserving resize with padding (to map outputs back).

    A source pixel ``(y, x)`` lands at ``(y * scale_y + pad_top, x * scale_x + pad_left)``.
    """

    src_height: int
    src_width: int
    scale_y: float
    scale_x: float
    pad_top: int
    pad_left: int
    out_height: int
    out_width: int

    def unletterbox(self, array: np.ndarray, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
        """Map an ``(out_height, out_width[, C])`` model output back to the source image size."""
        inner_h = round(self.src_height * self.scale_y)
        inner_w = round(self.src_width * self.scale_x)
        crop = array[self.pad_top : self.pad_top + inner_h, self.pad_left : self.pad_left + inner_w]
        return cv2.resize(crop, (self.src_width, self.src_height), interpolation=interpolation)


# --------------------------------------------------------------------------- decoding


def _read_source(source: bytes | bytearray | memoryview | str | Path) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    path = Path(source)
    if not path.is_file():
        raise ImageDecodeError(f"file not found: {path}", reason="not_an_image")
    return path.read_bytes()


def is_dicom(data: bytes) -> bool:
    """True when ``data`` carries the DICOM Part 10 preamble and ``DICM`` magic."""
    return len(data) >= 132 and data[128:132] == DICOM_MAGIC


def to_float_gray(array: np.ndarray) -> np.ndarray:
    """Convert a decoded pixel array to float32 gray in [0, 1].

    Args:
        array: ``(H, W)``, ``(H, W, 3)`` (BGR) or ``(H, W, 4)`` (BGRA, alpha dropped);
            uint8 is scaled by 1/255; every other dtype (uint16, int, float) is min-max
            scaled, because 16-bit files usually hold 10-14 bit data.

    Returns:
        ``(H, W)`` float32 in [0, 1]. A constant image maps to zeros.

    Raises:
        ImageDecodeError: on an unsupported shape or non-finite values.
    """
    arr = np.asarray(array)
    if arr.ndim == 3:
        if arr.shape[2] == 4:
            arr = arr[:, :, :3]
        if arr.shape[2] == 3:
            arr = cv2.cvtColor(arr, cv2.COLOR_BGR2GRAY)
        elif arr.shape[2] == 1:
            arr = arr[:, :, 0]
        else:
            raise ImageDecodeError(f"unsupported channel count {arr.shape[2]} (need 1, 3 or 4)",
                                   reason="bad_shape")
    if arr.ndim != 2:
        raise ImageDecodeError(f"expected a 2-D image, got shape {tuple(arr.shape)}", reason="bad_shape")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == bool:
        return arr.astype(np.float32)
    out = arr.astype(np.float64)
    if not np.isfinite(out).all():
        raise ImageDecodeError("image contains NaN or infinite values", reason="not_finite")
    lo, hi = float(out.min()), float(out.max())
    if hi <= lo:
        return np.zeros(out.shape, np.float32)
    return ((out - lo) / (hi - lo)).astype(np.float32)


def _check_size(height: int, width: int, min_side: int, max_side: int) -> None:
    if min(height, width) < min_side:
        raise ImageDecodeError(
            f"image is {width}x{height} pixels; the smallest side must be at least {min_side}",
            reason="too_small",
        )
    if max(height, width) > max_side:
        raise ImageDecodeError(
            f"image is {width}x{height} pixels; the largest side may be at most {max_side}",
            reason="too_large",
        )


def decode_image(
    source: bytes | bytearray | memoryview | str | Path,
    *,
    min_side: int = 16,
    max_side: int = 16384,
) -> np.ndarray:
    """Decode an image file into float32 gray in [0, 1].

    Supports PNG, JPEG, PGM/PPM, TIFF and BMP (via OpenCV) and DICOM (via pydicom, with
    modality and VOI LUT applied and MONOCHROME1 inverted). The size is checked from the
    header before any pixel is decoded, so a huge file is refused without using memory.

    Args:
        source: the file's bytes or its path.
        min_side: smallest accepted side in pixels.
        max_side: largest accepted side in pixels.

    Returns:
        ``(H, W)`` float32 in [0, 1].

    Raises:
        ImageDecodeError: empty input, unknown format, truncated or corrupt file, size out
            of range, DICOM without pixel data; its ``reason`` says which.
    """
    data = _read_source(source)
    if not data:
        raise ImageDecodeError("empty input: no bytes to decode", reason="empty")
    if is_dicom(data):
        from breastscan.imaging.dicom import read_dicom  # pydicom is imported only when needed

        pixels = read_dicom(data).pixels
        _check_size(pixels.shape[0], pixels.shape[1], min_side, max_side)
        return pixels

    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # the size check below replaces Pillow's bomb guard
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            fmt = probe.format
    except UnidentifiedImageError:
        raise ImageDecodeError(
            "not an image: the bytes are not PNG, JPEG, PGM, TIFF, BMP or DICOM", reason="not_an_image"
        ) from None
    except Exception as exc:  # Pillow raises many types on corrupt headers
        raise ImageDecodeError(f"corrupt image header: {exc}", reason="corrupt") from None
    _check_size(height, width, min_side, max_side)
    if fmt == "JPEG" and b"\xff\xd9" not in data[-64:]:
        raise ImageDecodeError("truncated JPEG: the end-of-image marker is missing", reason="truncated")
    if fmt == "PNG":
        _check_png_complete(data)
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ImageDecodeError(f"corrupt or truncated {fmt or 'image'} file: it does not decode",
                               reason="corrupt")
    return to_float_gray(arr)


def _check_png_complete(data: bytes) -> None:
    """Require the IEND chunk: a cut PNG is named truncated (OpenCV may even decode one cut late)."""
    if b"IEND" not in data[-32:]:
        raise ImageDecodeError("truncated PNG: the IEND chunk is missing", reason="truncated")


# --------------------------------------------------------------------------- geometry


def letterbox(
    image: np.ndarray,
    height: int,
    width: int,
    *,
    keep_aspect: bool = True,
    interpolation: int = cv2.INTER_AREA,
    transform: Any = None,
) -> tuple[np.ndarray, Letterbox]:
    """Resize ``image`` into ``height x width``, keeping its aspect ratio and zero-padding.

    Args:
        image: ``(H, W)`` array.
        height: output height.
        width: output width.
        keep_aspect: when ``False`` the image is stretched and no padding is added.
        interpolation: OpenCV interpolation flag (``INTER_NEAREST`` for masks).
        transform: optional callable applied to the resized content before padding, so that
            filters do not see the padding border.

    Returns:
        The ``(height, width)`` output (same dtype) and its :class:`Letterbox` geometry.
    """
    src_h, src_w = image.shape[:2]
    if keep_aspect:
        scale = min(height / src_h, width / src_w)
        new_h = max(1, min(height, round(src_h * scale)))
        new_w = max(1, min(width, round(src_w * scale)))
    else:
        new_h, new_w = height, width
    resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    if transform is not None:
        resized = transform(resized)
    out = np.zeros((height, width), dtype=resized.dtype)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resized
    geom = Letterbox(src_h, src_w, new_h / src_h, new_w / src_w, top, left, height, width)
    return out, geom


def enhance(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Apply the spec's optional contrast steps (CLAHE, then unsharp masking).

    Args:
        image: ``(H, W)`` float32 in [0, 1].
        spec: which steps to run and with which parameters.

    Returns:
        ``(H, W)`` float32 in [0, 1].
    """
    out = image.astype(np.float32, copy=False)
    if spec.clahe:
        top = 255 if spec.clahe_bits == 8 else 65535
        levels = np.clip(np.rint(out * float(top)), 0, top).astype(np.uint8 if top == 255 else np.uint16)
        grid = max(1, int(spec.clahe_tile_grid))
        clahe = cv2.createCLAHE(clipLimit=float(spec.clahe_clip_limit), tileGridSize=(grid, grid))
        out = np.asarray(clahe.apply(levels), dtype=np.float32) / np.float32(top)
    if spec.unsharp and spec.unsharp_amount > 0:
        blurred = cv2.GaussianBlur(out, (0, 0), sigmaX=float(spec.unsharp_sigma))
        out = np.asarray(cv2.addWeighted(out, 1.0 + spec.unsharp_amount, blurred, -spec.unsharp_amount, 0.0),
                         dtype=np.float32)
        out = np.clip(out, 0.0, 1.0)
    return out


def preprocess_image(image: np.ndarray, spec: PreprocessSpec) -> tuple[np.ndarray, Letterbox]:
    """Turn a decoded gray image into the model's input tensor.

    Args:
        image: ``(H, W)`` float32 in [0, 1], as returned by :func:`decode_image`.
        spec: the model's preprocessing spec.

    Returns:
        ``(spec.height, spec.width, 1)`` float32 in [0, 1] and the geometry used.

    Raises:
        ImageDecodeError: when the image is not 2-D or holds NaN/inf.
    """
    img = np.asarray(image)
    if img.ndim != 2:
        raise ImageDecodeError(f"expected a 2-D gray image, got shape {tuple(img.shape)}", reason="bad_shape")
    img = img.astype(np.float32, copy=False)
    if not np.isfinite(img).all():
        raise ImageDecodeError("image contains NaN or infinite values", reason="not_finite")
    out, geom = letterbox(
        img,
        spec.height,
        spec.width,
        keep_aspect=spec.keep_aspect,
        interpolation=cv2.INTER_AREA,
        transform=lambda x: enhance(x, spec),
    )
    return out[:, :, None], geom


def preprocess_mask(mask: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Apply the image's geometry to its mask (nearest-neighbour, no contrast steps).

    Args:
        mask: ``(H, W)`` bool or {0, 1} array of the source image's size.
        spec: the model's preprocessing spec.

    Returns:
        ``(spec.height, spec.width, 1)`` float32 in {0, 1}.
    """
    m = (np.asarray(mask) > 0).astype(np.uint8)
    # INTER_AREA then threshold keeps thin structures better than INTER_NEAREST.
    area, _ = letterbox(
        m.astype(np.float32), spec.height, spec.width,
        keep_aspect=spec.keep_aspect, interpolation=cv2.INTER_AREA,
    )
    return (area >= 0.5).astype(np.float32)[:, :, None]

