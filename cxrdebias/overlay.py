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
    """RGB image: ``(1 − alpha)·gray + alpha·jet(cam)`` of a ``[0, 1]`` image and a same-size map."""
    if image.shape != cam.shape:
        raise ValueError(f"image {image.shape} and CAM {cam.shape} differ in shape")
    rgb = (1.0 - alpha) * np.clip(image, 0.0, 1.0)[..., None] + alpha * jet(cam)
    out = Image.fromarray(np.round(rgb * 255.0).astype(np.uint8))  # H×W×3 uint8 → RGB
    scale = max_side / max(out.size)
    if scale < 1.0:
        out = out.resize((max(1, round(out.width * scale)), max(1, round(out.height * scale))), Image.Resampling.BOX)
    return out


def save_overlay(path: str | os.PathLike, image: np.ndarray, cam: np.ndarray, geometry: ResizeGeometry) -> Path:
    """Write the CAM overlay of one prediction as a PNG (folders created as needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    overlay(image, cam_to_image(cam, geometry)).save(path, format="PNG")
    return path
