"""Grad-CAM maps drawn on the original image (torch-free: numpy + Pillow).

A CAM from the exported model lives in model-input geometry (``S × S``, letterboxed or
cropped); :func:`cam_to_image` maps it back onto the original pixels with the
:class:`~cxrdebias.data.preprocess.ResizeGeometry` that preprocessing used, and
:func:`overlay` blends it, in a jet colour map, over the grayscale radiograph.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from cxrdebias.data.preprocess import ResizeGeometry
from cxrdebias.fileio import atomic_write

#: longest side of a written overlay in pixels (larger radiographs are shrunk for viewing)
MAX_OVERLAY_SIDE = 1024
#: weight of the CAM colour in the blend
ALPHA = 0.4


def cam_to_image(cam: np.ndarray, geometry: ResizeGeometry) -> np.ndarray:
    """A model-input CAM (S×S) as a map over the original image (H×W, 0 outside the input)."""
    left, top, right, bottom = geometry.target_box
    crop = np.ascontiguousarray(cam[top:bottom, left:right], dtype=np.float32)
    x0, y0, x1, y1 = (round(v) for v in geometry.source_box)
    resized = Image.fromarray(crop).resize((x1 - x0, y1 - y0), resample=Image.Resampling.BILINEAR)
    out = np.zeros(geometry.source_shape, dtype=np.float32)
    out[y0:y1, x0:x1] = np.asarray(resized, dtype=np.float32)
    return np.clip(out, 0.0, 1.0)


def jet(values: np.ndarray) -> np.ndarray:
    """The jet colour map (blue → cyan → yellow → red) of ``[0, 1]`` values: H×W×3 in [0, 1]."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    centres = np.array([3.0, 2.0, 1.0])  # red, green, blue peaks at 3/4, 1/2, 1/4
    return np.clip(1.5 - np.abs(4.0 * v - centres), 0.0, 1.0)


def overlay(image: np.ndarray, cam: np.ndarray, *, alpha: float = ALPHA, max_side: int = MAX_OVERLAY_SIDE) -> Image.Image:
    """RGB image: ``(1 − alpha)·gray + alpha·jet(cam)`` of a ``[0, 1]`` image and a same-size map.

    Computed in float32 one channel at a time, with :func:`jet`'s formula inlined (about 3× faster
    than the H×W×3 float64 expression on a 1024² picture, what the viewer redraws on every slider
    move; equal to it up to float rounding, and exactly the grayscale image at ``alpha`` 0).
    """
    if image.shape != cam.shape:
        raise ValueError(f"image {image.shape} and CAM {cam.shape} differ in shape")
    gray = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    base = gray * np.float32(1.0 - alpha) if alpha else gray
    v4 = np.clip(np.asarray(cam, dtype=np.float32), 0.0, 1.0) * np.float32(4.0)
    rgb = np.empty((*gray.shape, 3), dtype=np.uint8)
    channel = np.empty_like(gray)
    for i, peak in enumerate((3.0, 2.0, 1.0)):  # red, green, blue peaks of jet at 3/4, 1/2, 1/4
        np.subtract(v4, np.float32(peak), out=channel)
        np.abs(channel, out=channel)
        np.subtract(np.float32(1.5), channel, out=channel)
        np.clip(channel, 0.0, 1.0, out=channel)
        channel *= np.float32(alpha)
        channel += base
        channel *= np.float32(255.0)
        np.round(channel, out=channel)
        rgb[..., i] = channel
    out = Image.fromarray(rgb)  # H×W×3 uint8 → RGB
    scale = max_side / max(out.size)
    if scale < 1.0:
        out = out.resize((max(1, round(out.width * scale)), max(1, round(out.height * scale))), Image.Resampling.BOX)
    return out


def save_overlay(path: str | os.PathLike, image: np.ndarray, cam: np.ndarray, geometry: ResizeGeometry) -> Path:
    """Write the CAM overlay of one prediction as a PNG (folders created as needed), atomically
    (:func:`cxrdebias.fileio.atomic_write`: a killed ``predict --cams`` leaves whole PNGs only;
    a failed write is a one-line :class:`~cxrdebias.errors.OutputError`)."""
    path = Path(path)
    picture = overlay(image, cam_to_image(cam, geometry))
    atomic_write(path, lambda f: picture.save(f, format="PNG"))
    return path
