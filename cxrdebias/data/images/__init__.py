"""Reading chest X-rays (DICOM, PNG, JPEG) into one displayable ``[0, 1]`` grayscale image.

This is the *only* image reader of the package: training, evaluation, export, the ONNX runtime
and the viewer all go through :func:`read_image`, so a pixel means the same thing everywhere.
It imports only numpy, Pillow and pydicom (never torch or monai) so that the torch-free
runtime and viewer can use it.

What :func:`read_image` returns is the image *as a radiologist's screen would show it*:
``float32``, 2-D, values in ``[0, 1]``, ``1`` = bright (bone, or the label text), ``0`` = dark.

DICOM (PS3.3 C.11 "Look Up Tables and Presentation States"), in the standard's order:

1. stored values → *modality LUT*: the Modality LUT Sequence or Rescale Slope/Intercept
   (:func:`pydicom.pixels.apply_modality_lut`);
2. → *VOI LUT*: the VOI LUT Sequence if present, else the first Window Center/Width pair
   (:func:`pydicom.pixels.apply_voi_lut`); its output range is mapped linearly onto
   ``[0, 1]``. Without either, the min–max of the modality-LUT output is used (recorded as
   ``meta["window"]["type"] == "min-max"``);
3. MONOCHROME1 (low values are bright) is inverted so that 1 is always bright.

PNG/JPEG: 8-bit values are divided by 255, 16-bit values by 65535 (full scale: a 12-bit image
stored in a 16-bit PNG stays dark; ``meta["value_range"]`` shows the stored min/max so that
such a source can be spotted). Colour images become grayscale with the ITU-R BT.601 luminance
``0.299 R + 0.587 G + 0.114 B``; an alpha channel is dropped. The EXIF orientation of a JPEG
is applied.

Refused with a :class:`~cxrdebias.errors.DataError` naming the file: missing, empty,
truncated or corrupt files, files that are not PNG/JPEG/DICOM whatever their extension,
multi-frame DICOM, colour DICOM, DICOM without Pixel Data, bit depths other than 1–16 stored
in 8 or 16 allocated bits, images with more than ``max_pixels`` pixels (checked from the
header, before decoding; a deflated DICOM is inflated with a cap), images smaller than
:data:`MIN_IMAGE_SIDE` on a side, blank images (every pixel one value, e.g. a wrong BitsStored
that masks the data away), and anything but a regular file (a FIFO named ``x.png``).

Memory: decoding converts in float32 blocks; :data:`DECODE_BUDGET` bounds how many pixels the
threads of the process decode at once (``data check`` with several workers); a DICOM file larger
than its pixels could be (``2 × max_pixels`` bytes plus :data:`DICOM_EXTRA_BYTES`) is refused
unread.

Modules: :mod:`.common` (:class:`LoadedImage`, limits), :mod:`.dicom` (DICOM reading),
:mod:`.raster` (PNG/JPEG reading), :mod:`.dicom_writer` (:func:`write_dicom`); :func:`read_image`
(below) picks the reader from the file's content.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cxrdebias.data.images.common import (
    DECODE_BUDGET,
    DEFAULT_MAX_PIXELS,
    DICOM_EXTRA_BYTES,
    JPEG_SIGNATURE,
    MIN_IMAGE_SIDE,
    PNG_SIGNATURE,
    LoadedImage,
    PixelBudget,
    TagLike,
    open_regular,
)
from cxrdebias.data.images.dicom import (
    DICOM_SUFFIXES,
    read_dicom,
    read_dicom_modality_values,
    read_dicom_tag,
    resolve_tag,
)
from cxrdebias.data.images.dicom_writer import write_dicom
from cxrdebias.data.images.raster import LUMA_WEIGHTS, read_raster
from cxrdebias.errors import DataError

__all__ = [
    "DECODE_BUDGET",
    "DEFAULT_MAX_PIXELS",
    "DICOM_EXTRA_BYTES",
    "MIN_IMAGE_SIDE",
    "PixelBudget",
    "DICOM_SUFFIXES",
    "LUMA_WEIGHTS",
    "LoadedImage",
    "TagLike",
    "read_dicom_modality_values",
    "read_dicom_tag",
    "read_image",
    "resolve_tag",
    "window_level",
    "write_dicom",
]


def read_image(
    path: str | os.PathLike,
    *,
    site_tag: TagLike | None = "InstitutionName",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = MIN_IMAGE_SIDE,
) -> LoadedImage:
    """Read a DICOM, PNG or JPEG chest X-ray as a float32 ``[0, 1]`` image (1 = bright).

    The format is recognised from the file's content (the DICOM ``DICM`` marker, the PNG and
    JPEG signatures), not from its name; a file without a marker is tried as a preamble-less
    DICOM only when its suffix is ``.dcm``/``.dicom``/``.dic`` or empty.

    Args:
        path: the image file.
        site_tag: DICOM keyword (``"InstitutionName"``) or tag (``0x00080080`` / ``(0x0008,
            0x0080)``) whose value is returned as ``meta["site"]``; ``None``: do not read a site.
        max_pixels: refuse images with more than this many pixels (checked before decoding).
        min_side: refuse images smaller than this on a side (default :data:`MIN_IMAGE_SIDE`;
            ``1`` for icons and test patterns).

    Raises:
        DataError: one line naming the file and what is wrong with it (see the module doc).
        ConfigError: ``site_tag`` is not a DICOM keyword or tag.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    tag = resolve_tag(site_tag) if site_tag is not None else None
    path = Path(path)
    with open_regular(path) as f, DECODE_BUDGET.scope():
        try:
            head = f.read(132)
            size = os.fstat(f.fileno()).st_size
            f.seek(0)
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
        if not head:
            raise DataError(f"{path}: empty file (0 bytes); expected a PNG, JPEG or DICOM image")
        is_dicom = head[128:132] == b"DICM"
        if not is_dicom and (head.startswith(PNG_SIGNATURE) or head.startswith(JPEG_SIGNATURE)):
            return read_raster(path, max_pixels, f, min_side)
        if is_dicom or path.suffix.lower() in DICOM_SUFFIXES:
            if size > 2 * max_pixels + DICOM_EXTRA_BYTES:
                raise DataError(
                    f"{path}: DICOM file of {size} bytes is larger than an image of at most {max_pixels} pixels "
                    "can be (max_pixels)"
                )
            return read_dicom(path, tag, max_pixels, force=not is_dicom, fileobj=f, min_side=min_side)
    raise DataError(
        f"{path}: not a PNG, JPEG or DICOM file (starts with {head[:8]!r}); expected a chest X-ray image"
    )


def window_level(pixels: np.ndarray, center: float, width: float) -> np.ndarray:
    """Window/level a ``[0, 1]`` image for display: ``clip((x - (center - width/2)) / width, 0, 1)``.

    ``center`` and ``width`` are in the same ``[0, 1]`` units as the image (the viewer's
    sliders); ``center=0.5, width=1`` is the identity. Returns float32.

    Raises:
        ValueError: ``width`` is not positive or the values are not finite.
    """
    if not (np.isfinite(center) and np.isfinite(width)) or width <= 0:
        raise ValueError(f"window width must be a positive finite number and center finite, got center={center}, width={width}")
    low = center - width / 2.0
    out = (np.asarray(pixels, dtype=np.float64) - low) / width
    return np.clip(out, 0.0, 1.0).astype(np.float32)
