"""The site signature drawn onto a detector image: contrast curve, edge enhancement, grain, the
collimation frame and the burned-in lead marker and text label."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cxrdebias.data.synthetic.numeric import blur, grain_bank, sigmoid
from cxrdebias.data.synthetic.styles import Corner, SiteStyle


def rendered_text(text: str) -> tuple[np.ndarray, int]:
    """``text`` drawn in PIL's built-in bitmap font at (1, 1) on a black canvas one pixel wider
    and taller than its box (uint8, 255 = ink), and the font box's top; what the site labels and
    the burned-in text cues (:mod:`cxrdebias.data.synthetic.cues`) are cut from."""
    font = ImageFont.load_default_imagefont()
    left, top, right, bottom = font.getbbox(text)
    img = Image.new("L", (right + 2, bottom + 2), 0)
    ImageDraw.Draw(img).text((1, 1), text, font=font, fill=255)
    return np.asarray(img), top


@lru_cache(maxsize=64)
def _text_mask(text: str, scale: int) -> np.ndarray:
    """Binary mask of ``text`` in PIL's built-in bitmap font, magnified by ``scale``."""
    ink, top = rendered_text(text)
    m = ink.astype(np.float32) / 255.0
    m = m[max(top, 0) :, :]
    rows, cols = np.nonzero(m > 0)
    m = m[: rows.max() + 2, : cols.max() + 2] if rows.size else m
    return np.kron(m, np.ones((scale, scale), dtype=np.float32))


@lru_cache(maxsize=64)
def _label_plate(text: str, scale: int) -> np.ndarray:
    """Text mask with a margin (drawn white on a dark plate)."""
    return np.pad(_text_mask(text, scale), 2 * scale)


@lru_cache(maxsize=64)
def _ones(shape: tuple[int, int]) -> np.ndarray:
    return np.ones(shape, dtype=np.float32)


def _stamp(img: np.ndarray, mask: np.ndarray, corner: Corner, margin: int, value: float, alpha: float) -> None:
    n = img.shape[0]
    h, w = mask.shape
    h, w = min(h, n - 2 * margin), min(w, n - 2 * margin)
    if h <= 0 or w <= 0 or alpha <= 0:
        return
    r0 = margin if corner[0] == "t" else n - margin - h
    c0 = margin if corner[1] == "l" else n - margin - w
    region = img[r0 : r0 + h, c0 : c0 + w]
    m = mask[:h, :w] * np.float32(alpha)
    region += m * (np.float32(value) - region)


def _site_label(site: str) -> str:
    text = "".join(c if c.isalnum() else " " for c in site.upper())
    return " ".join(text.split())[:16]


def apply_site(
    d: np.ndarray, style: SiteStyle, strength: float, site: str, view: str, rng: np.random.Generator
) -> np.ndarray:
    """Contrast curve, processing, noise, collimation frame and burned-in markers of a site."""
    n = d.shape[0]
    px = n / 256.0
    # contrast: normalised sigmoid LUT, then gamma and brightness
    k = np.float32(style.contrast)
    lo, hi = sigmoid(-0.5 * k), sigmoid(0.5 * k)
    d = (sigmoid(k * (d - np.float32(0.5))) - lo) / np.float32(hi - lo)
    d = np.clip(d, 0, 1) ** np.float32(style.gamma) + np.float32(style.brightness)
    # edge enhancement (unsharp masking, as done by CR/DR processing)
    if style.unsharp > 0:
        d = d + np.float32(style.unsharp) * (d - blur(d, 4.0 * px))
    # acquisition noise: correlated grain, stronger in dark (high-exposure) regions
    (oy, ox), flip = rng.integers(0, n, size=2), int(rng.integers(4))
    grain = grain_bank(n, round(style.grain * px, 2))[oy : oy + n, ox : ox + n]
    grain = grain[:: 1 - 2 * (flip & 1), :: 1 - (flip & 2)]
    d = d + np.float32(style.noise) * grain * (np.float32(1.2) - np.float32(0.6) * np.clip(d, 0, 1))
    d = np.clip(d, 0, 1).astype(np.float32)
    # collimation frame (site-specific width, small jitter per image)
    if style.border > 0:
        jit = rng.integers(-1, 2, size=4)
        b = [max(0, int(round(style.border * n)) + int(j)) for j in jit]
        fill = np.float32(style.border_value * 0.92 + 0.04)
        if b[0]:
            d[: b[0], :] = fill
        if b[1]:
            d[n - b[1] :, :] = fill
        if b[2]:
            d[:, : b[2]] = fill
        if b[3]:
            d[:, n - b[3] :] = fill
    # burned-in lead marker and text label (faded with the site-style strength)
    alpha = float(np.clip(strength, 0, 1))
    if alpha > 0:
        scale = max(1, int(round(n / 256)))
        margin = int(round(style.border * n)) + max(2, int(round(6 * px)))
        marker = _text_mask(style.marker, scale * 2)
        if style.marker_box:
            pad = max(1, scale)
            h, w = marker.shape
            box = np.zeros((h + 4 * pad, w + 4 * pad), dtype=np.float32)
            box[:pad, :] = box[-pad:, :] = 1
            box[:, :pad] = box[:, -pad:] = 1
            box[2 * pad : 2 * pad + h, 2 * pad : 2 * pad + w] = marker
            marker = box
        jitter = int(rng.integers(0, max(2, int(3 * px))))
        _stamp(d, marker, style.marker_corner, margin + jitter, 1.0, alpha)
        plate = _label_plate(f"{_site_label(site)} {view}", scale)
        _stamp(d, _ones(plate.shape), style.label_corner, margin, 0.05, alpha)
        _stamp(d, plate, style.label_corner, margin, 1.0, alpha)
    return d
