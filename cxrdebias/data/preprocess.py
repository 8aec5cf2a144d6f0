"""The one preprocessing of a chest X-ray: ``[0, 1]`` image → normalised ``C×H×W`` model input.

Training, evaluation, ONNX export and the viewer all call :func:`preprocess` with the
:class:`PreprocessSpec` stored in the run (and later embedded in the ONNX metadata), so an
image is turned into the same numbers everywhere. Torch-free on purpose (numpy + Pillow).

Steps, in order:

1. check the input: a 2-D floating-point array with finite values in ``[0, 1]`` (what
   :func:`cxrdebias.data.images.read_image` returns). Anything else is a ``ValueError`` naming
   the observed dtype/range — a silently wrong range (0–255 images, already-normalised
   tensors) is the most common way to get a model that quietly sees garbage;
2. resize to ``image_size × image_size`` with Pillow in mode ``"F"`` (32-bit float, no
   quantisation) — ``letterbox`` keeps the aspect ratio and pads with 0 (black), centring the
   image (extra pixel of an odd padding at the bottom/right); ``center_crop`` scales the
   shorter side to ``image_size`` and keeps the central square (one resampling of the central
   square, no double rounding); ``stretch`` ignores the aspect ratio;
3. with ``equalize``, histogram equalisation of the resized image (the letterbox padding
   excluded and left at 0): each pixel becomes the empirical CDF of the image at its value,
   ``#{pixels ≤ x} / n``. Exact ranks, no bins: an image already at the model's size gives the
   same result under any strictly increasing change of its intensities — a scanner's contrast
   curve, gamma or brightness (the usual reason two hospitals' films look different); after
   downsizing nearly so (the resampling averages before the ranks are taken) — at the price of
   the absolute intensities. Off by default; not written into the spec when off, so specs, hashes and
   caches of runs without it are what they were;
4. normalise ``(x - mean) / std`` and repeat the channel ``channels`` times.

Interpolation ``"area"`` is Pillow's box filter (each output pixel is the mean of the input
area it covers: the right choice for shrinking a radiograph; when enlarging it repeats pixels);
``"bilinear"`` is Pillow's bilinear filter (antialiased when shrinking).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
)

from cxrdebias.data.images import DEFAULT_MAX_PIXELS, TagLike, read_image

#: bump when :func:`preprocess` changes the numbers it produces for the same spec
PREPROCESS_VERSION = 1

_RESAMPLE = {"area": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR}


class PreprocessSpec(BaseModel):
    """How a ``[0, 1]`` grayscale image becomes the model input (frozen, JSON-serialisable).

    Saved in every run folder and in the exported ONNX metadata; ``PreprocessSpec.model_validate_json``
    restores it. ``version`` is the :data:`PREPROCESS_VERSION` of the code that wrote it; a spec
    from another version is refused rather than silently reinterpreted.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(PREPROCESS_VERSION, description="preprocessing code version that wrote this spec")
    image_size: int = Field(128, ge=4, le=4096, description="output height = width in pixels")
    resize: Literal["letterbox", "center_crop", "stretch"] = Field(
        "letterbox",
        description="letterbox: keep aspect ratio, pad with 0; center_crop: shorter side to "
        "image_size then central square; stretch: ignore aspect ratio",
    )
    interpolation: Literal["area", "bilinear"] = Field("area", description="Pillow box filter or bilinear")
    mean: float = Field(0.5, description="subtracted after resizing (input range [0, 1])")
    std: float = Field(0.5, gt=0, description="divides after subtracting the mean")
    channels: int = Field(1, ge=1, le=3, description="the gray image repeated this many times (3 for ImageNet backbones)")
    equalize: bool = Field(
        False,
        description="histogram equalisation (the image's empirical CDF, padding excluded) before normalising: "
        "removes any monotone intensity difference between scanners (contrast curve, gamma, brightness)",
    )

    @model_serializer(mode="wrap")
    def _omit_equalize_when_off(self, handler: SerializerFunctionWrapHandler) -> dict:
        data = handler(self)
        if not self.equalize:  # specs (and the hashes and caches keyed by them) of runs without it stay as they were
            data.pop("equalize", None)
        return data

    @field_validator("version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != PREPROCESS_VERSION:
            raise ValueError(
                f"preprocessing version {v} is not supported by this cxrdebias "
                f"(it implements version {PREPROCESS_VERSION})"
            )
        return v

    @field_validator("mean", "std")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not np.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """``(channels, image_size, image_size)``."""
        return (self.channels, self.image_size, self.image_size)


@dataclass(frozen=True)
class ResizeGeometry:
    """Where an image of ``source_shape`` lands in the ``size × size`` model input.

    ``source_box`` = ``(left, top, right, bottom)`` of the region of the source that is
    resampled (float pixel coordinates; the whole image unless ``center_crop``), and
    ``target_box`` = ``(left, top, right, bottom)`` of the integer region of the output it
    fills (the rest is padding). Use it to map a saliency map back onto the original image.
    """

    source_shape: tuple[int, int]
    size: int
    source_box: tuple[float, float, float, float]
    target_box: tuple[int, int, int, int]

    def map_box(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """A box ``(x0, y0, x1, y1)`` of the source image (pixel edges, ``x1``/``y1`` exclusive) in
        model-input pixels (float edges), clipped to the part of the input the source fills."""
        sl, st, sr, sb = self.source_box
        tl, tt, tr, tb = self.target_box
        fx, fy = (tr - tl) / (sr - sl), (tb - tt) / (sb - st)
        x0, y0, x1, y1 = box
        return (
            min(max(tl + (x0 - sl) * fx, tl), tr),
            min(max(tt + (y0 - st) * fy, tt), tb),
            min(max(tl + (x1 - sl) * fx, tl), tr),
            min(max(tt + (y1 - st) * fy, tt), tb),
        )


def resize_geometry(source_shape: tuple[int, int], spec: PreprocessSpec) -> ResizeGeometry:
    """The crop/placement :func:`preprocess` uses for an image of ``(height, width)`` pixels."""
    h, w = int(source_shape[0]), int(source_shape[1])
    if h < 1 or w < 1:
        raise ValueError(f"image shape must be positive, got {source_shape}")
    s = spec.image_size
    if spec.resize == "stretch":
        return ResizeGeometry((h, w), s, (0.0, 0.0, float(w), float(h)), (0, 0, s, s))
    if spec.resize == "center_crop":
        side = min(h, w)
        left, top = (w - side) / 2.0, (h - side) / 2.0
        return ResizeGeometry((h, w), s, (left, top, left + side, top + side), (0, 0, s, s))
    # letterbox: the longer side becomes s, the shorter one round(side·scale) ≥ 1
    scale = s / max(h, w)
    new_w = min(s, max(1, round(w * scale)))
    new_h = min(s, max(1, round(h * scale)))
    left, top = (s - new_w) // 2, (s - new_h) // 2
    return ResizeGeometry((h, w), s, (0.0, 0.0, float(w), float(h)), (left, top, left + new_w, top + new_h))


def check_unit_image(pixels: np.ndarray) -> np.ndarray:
    """``pixels`` as a float32 2-D array after checking it is a finite image in ``[0, 1]``.

    Raises:
        ValueError: not a numpy array, not 2-D, not floating point, NaN/inf, or values
            outside ``[0, 1]`` — the message gives the observed dtype, shape and range.
    """
    if not isinstance(pixels, np.ndarray):
        raise ValueError(f"preprocess expects a numpy array from read_image, got {type(pixels).__name__}")
    if pixels.ndim != 2 or pixels.size == 0:
        raise ValueError(f"preprocess expects a 2-D grayscale image (H×W), got shape {pixels.shape}")
    if pixels.dtype.kind != "f":
        lo, hi = (pixels.min(), pixels.max())
        raise ValueError(
            f"preprocess expects floating-point pixels in [0, 1] (as read_image returns), got {pixels.dtype} "
            f"with range [{lo}, {hi}]; divide by the maximum of the stored range (e.g. 255) first"
        )
    lo, hi = float(np.min(pixels)), float(np.max(pixels))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"preprocess: image contains NaN or infinite values (observed range [{lo}, {hi}])")
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"preprocess expects pixel values in [0, 1], observed range [{lo:.6g}, {hi:.6g}]; "
            "is the image already normalised or still in 0–255 / 0–65535 units?"
        )
    return np.ascontiguousarray(pixels, dtype=np.float32)


def equalize(image: np.ndarray) -> np.ndarray:
    """Histogram equalisation by exact ranks: each pixel → ``#{pixels ≤ its value} / n`` (float32,
    in ``(0, 1]``; equal values stay equal, a constant image becomes all 1)."""
    flat = image.ravel()
    ranks = np.searchsorted(np.sort(flat), flat, side="right")
    return (ranks / np.float64(flat.size)).astype(np.float32).reshape(image.shape)


def preprocess(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """A ``[0, 1]`` H×W image → float32 model input of shape ``spec.output_shape``.

    Deterministic (same input and spec → the same bytes); see the module doc for the steps.

    Raises:
        ValueError: the input is not a 2-D float image in ``[0, 1]`` (observed range named).
    """
    image = check_unit_image(pixels)
    geo = resize_geometry(image.shape, spec)
    resample = _RESAMPLE[spec.interpolation]
    src = Image.fromarray(image)  # float32 → mode "F"
    left, top, right, bottom = geo.target_box
    resized = src.resize((right - left, bottom - top), resample=resample, box=geo.source_box)
    out = np.zeros((spec.image_size, spec.image_size), dtype=np.float32)
    out[top:bottom, left:right] = np.asarray(resized, dtype=np.float32)
    # resampling filters with negative lobes cannot leave [0, 1] for box/bilinear, but a float
    # round-off must not either
    np.clip(out, 0.0, 1.0, out=out)
    if spec.equalize:
        out[top:bottom, left:right] = equalize(out[top:bottom, left:right])
    out = (out - np.float32(spec.mean)) / np.float32(spec.std)
    return np.repeat(out[None], spec.channels, axis=0)  # a new, writable C-contiguous array


def preprocess_file(
    path: str | os.PathLike,
    spec: PreprocessSpec,
    *,
    site_tag: TagLike | None = "InstitutionName",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """:func:`~cxrdebias.data.images.read_image` then :func:`preprocess` (raises DataError for bad files)."""
    return preprocess(read_image(path, site_tag=site_tag, max_pixels=max_pixels).pixels, spec)
