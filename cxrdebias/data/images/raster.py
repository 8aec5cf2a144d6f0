"""Reading PNG and JPEG chest X-rays: 8-bit values / 255, 16-bit values / 65535, colour → BT.601
luma, alpha dropped, the JPEG EXIF orientation applied (module doc of :mod:`cxrdebias.data.images`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps

from cxrdebias.data.images.common import (
    DECODE_BUDGET,
    LoadedImage,
    as_number,
    check_not_blank,
    check_size,
    short_error,
)
from cxrdebias.errors import DataError

#: ITU-R BT.601 luma weights (what Pillow's ``convert("L")`` uses, kept in float here)
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
_PIL_FORMATS = ("PNG", "JPEG", "MPO")  # MPO: multi-picture JPEG from cameras; its first image is read
#: pixels converted to float at a time (bounded temporaries whatever the image size)
_BLOCK_PIXELS = 1 << 20


def read_raster(path: Path, max_pixels: int, fileobj: BinaryIO | None = None, min_side: int = 1) -> LoadedImage:
    """Decode the PNG or JPEG file ``path`` (read from ``fileobj`` when given) as a
    :class:`LoadedImage`; DataError for anything :func:`~cxrdebias.data.images.read_image` refuses.

    The size is checked from the header (``Image.open`` does not decode) before any pixel is
    decoded; the conversion to ``[0, 1]`` runs in float32 blocks (about 6 bytes per pixel at
    the peak for 8-bit images)."""
    try:
        with Image.open(fileobj if fileobj is not None else path) as im:
            fmt = im.format
            if fmt not in _PIL_FORMATS:
                raise DataError(f"{path}: {fmt} image; expected PNG, JPEG or DICOM")
            width, height = im.size
            check_size(path, height, width, max_pixels, min_side)
            DECODE_BUDGET.reserve(width * height)
            im.load()
            try:
                orientation = int(im.getexif().get(0x0112, 1) or 1)
            except Exception:  # a malformed EXIF block does not make the pixels wrong
                orientation = 1
            upright = ImageOps.exif_transpose(im) if orientation != 1 else im
            pixels, bits, stored_range = _pil_to_unit(path, upright)
            mode = im.mode
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: image too large to decode safely ({short_error(exc)})") from None
    except Exception as exc:  # truncated/corrupt files raise OSError, SyntaxError, ValueError …
        raise DataError(f"{path}: corrupt or truncated image ({type(exc).__name__}: {short_error(exc)})") from None
    meta: dict[str, Any] = {
        "path": str(path),
        "format": "JPEG" if fmt == "MPO" else fmt,
        "shape": [height, width],
        "bits": bits,
        "photometric": "MONOCHROME2",
        "mode": mode,
        "window": {"type": "full-scale", "max": 2**bits - 1 if bits > 1 else 1},
        "inverted": False,
        "value_range": stored_range,
        "exif_orientation": orientation,
        "site": None,
        "patient_id": None,
    }
    return LoadedImage(pixels=pixels, meta=meta)


def _pil_to_unit(path: Path, im: Image.Image) -> tuple[np.ndarray, int, list[float | int]]:
    """Pillow image → float32 [0, 1] grayscale, bits per sample, stored [min, max] (constant
    images refused)."""
    mode = im.mode
    if mode.startswith("I;16"):
        stored = np.asarray(im)
        stored = stored if stored.dtype == np.uint16 else stored.astype(np.uint16)
        scale, bits = 65535.0, 16
    elif mode == "I":  # 16-bit PNG grayscale on some Pillow versions: int32 holding 0…65535
        stored = np.asarray(im)
        if stored.size and (stored.min() < 0 or stored.max() > 65535):
            raise DataError(f"{path}: 32-bit integer image with values {stored.min()}…{stored.max()}; expected 8 or 16 bit")
        scale, bits = 65535.0, 16
    elif mode == "L":
        stored = np.asarray(im)
        scale, bits = 255.0, 8
    elif mode == "LA":
        stored = np.asarray(im)[..., 0]
        scale, bits = 255.0, 8
    elif mode == "1":
        stored = np.asarray(im.convert("L"))
        scale, bits = 255.0, 1
    elif mode in ("RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr"):
        rgb = np.asarray(im if mode == "RGB" else im.convert("RGB"))
        check_not_blank(path, rgb, "value")
        weights = np.asarray(LUMA_WEIGHTS)
        pixels = np.empty(rgb.shape[:2], dtype=np.float32)
        for r0, r1 in _row_blocks(rgb.shape):  # float64 luma, a block of rows at a time
            pixels[r0:r1] = np.clip(rgb[r0:r1].astype(np.float64) @ weights / 255.0, 0.0, 1.0)
        check_not_blank(path, pixels)
        return pixels, 8, [as_number(rgb.min()), as_number(rgb.max())]
    else:
        raise DataError(f"{path}: unsupported image mode {mode!r}; expected 8/16-bit grayscale or RGB")
    check_not_blank(path, stored)
    # float32 division is correctly rounded, so this equals float64 division rounded to float32
    pixels = stored.astype(np.float32)
    np.divide(pixels, np.float32(scale), out=pixels)
    np.clip(pixels, 0.0, 1.0, out=pixels)
    return pixels, bits, [as_number(stored.min()), as_number(stored.max())]


def _row_blocks(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """``(first, end)`` rows of consecutive blocks of about :data:`_BLOCK_PIXELS` pixels."""
    step = max(1, _BLOCK_PIXELS // max(1, shape[1]))
    return [(r, min(r + step, shape[0])) for r in range(0, shape[0], step)]
