"""The viewer's pictures: the Grad-CAM overlay with its colour bar and the probability beside it
(:func:`with_colorbar`), and the one-page PNG report of one image (:func:`report_png`, the page's
"Download one-page report").

Torch-free, like :mod:`cxrdebias.deploy.viewer_state`, whose analysis and model panel it draws.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cxrdebias.deploy.onnx_metadata import ModelMetadata
from cxrdebias.deploy.overlay import jet
from cxrdebias.deploy.viewer_state import ImageAnalysis, model_panel
from cxrdebias.deploy.viewer_worklist import OOD_BADGE, is_flagged


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed-size bitmap font
        return ImageFont.load_default()


def _fit(im: Image.Image, box: int) -> Image.Image:
    im = im.convert("RGB")
    scale = box / max(im.size)
    return im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.LANCZOS)


def with_colorbar(cam_overlay: Image.Image, probability: float, threshold: float, positive_label: str, decision: str) -> Image.Image:
    """``cam_overlay`` with a panel on its right: the probability of ``positive_label``, the
    threshold and the decision, and the jet colour bar of the Grad-CAM (1 = the regions that
    raise that probability most, top; 0 = none, bottom; the map is scaled per image).

    The panel is as tall as the overlay and about a sixth of its height wide (at least 120 px).
    """
    h = cam_overlay.height
    width = max(120, round(0.17 * h))
    big, small = _font(max(12, round(width * 0.2))), _font(max(10, round(width * 0.11)))
    panel = Image.new("RGB", (width, h), "white")
    draw = ImageDraw.Draw(panel)
    pad = max(4, width // 16)
    y = pad
    for text, font in ((f"P({positive_label})", small), (f"{probability:.3f}", big), (f"threshold {threshold:.3f}", small), (f"= {decision}", small)):
        draw.text((pad, y), text, font=font, fill="black")
        y += round(font.size * 1.25) if hasattr(font, "size") else 14
    y += pad
    draw.text((pad, y), "Grad-CAM", font=small, fill="black")
    y += round(small.size * 2.0) if hasattr(small, "size") else 20
    top, bottom = y, h - pad - (small.size if hasattr(small, "size") else 12) // 2
    bar_w = max(10, width // 5)
    if bottom - top >= 8:
        ramp = np.linspace(1.0, 0.0, bottom - top)[:, None].repeat(bar_w, axis=1)  # 1 at the top
        panel.paste(Image.fromarray(np.round(jet(ramp) * 255).astype(np.uint8)), (pad, top))
        for value, where in ((1.0, top), (0.5, (top + bottom) // 2), (0.0, bottom)):
            label = {1.0: "1 high", 0.5: "0.5", 0.0: "0 low"}[value]
            draw.line((pad + bar_w, where, pad + bar_w + 4, where), fill="black")
            draw.text((pad + bar_w + 7, where), label, font=small, fill="black", anchor="lm")
    out = Image.new("RGB", (cam_overlay.width + width, h), "white")
    out.paste(cam_overlay.convert("RGB"), (0, 0))
    out.paste(panel, (cam_overlay.width, 0))
    return out


def report_png(analysis: ImageAnalysis, display: Image.Image, cam_overlay: Image.Image, metadata: ModelMetadata, *, row: Mapping[str, Any] | None = None) -> bytes:
    """A one-page (A4 proportions, 1240×1754 px) PNG report of one image: the notice, the
    image and its Grad-CAM overlay side by side, probability, threshold, decision, ground truth
    when known, and the model's version, method and intended use."""
    width, height, margin = 1240, 1754, 60
    page = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(page)
    title, body, small = _font(40), _font(26), _font(20)
    y = margin
    draw.text((margin, y), "cxrdebias viewer: single-image report", font=title, fill="black")
    y += 64
    draw.rectangle((margin, y, width - margin, y + 60), fill=(178, 34, 34))
    draw.text((margin + 16, y + 14), "NOT FOR CLINICAL USE (research software)", font=body, fill="white")
    y += 90
    box = (width - 3 * margin) // 2
    left, right = _fit(display, box), _fit(cam_overlay, box)
    page.paste(left, (margin, y))
    page.paste(right, (2 * margin + box, y))
    y += max(left.height, right.height) + 10
    draw.text((margin, y), "image (windowed)", font=small, fill="black")
    draw.text((2 * margin + box, y), f"Grad-CAM of '{analysis.positive_label}'", font=small, fill="black")
    y += 50
    panel = model_panel(metadata)
    lines = [
        f"file: {analysis.name}",
        f"probability of '{analysis.positive_label}': {analysis.probability:.4f}",
        f"threshold: {analysis.threshold:.4f}   decision: {analysis.predicted_label}",
    ]
    if row and is_flagged(row):
        lines.append(f"{OOD_BADGE.upper()} (OOD score {float(row['ood_score']):.3g})")
    if row:
        lines.append(f"site: {row.get('site') or 'unknown'}   patient: {row.get('patient') or 'unknown'}   "
                     f"ground truth: {row.get('ground_truth') or 'unknown'}")
    lines += [
        "",
        f"model: {panel['model_version']}   method: {panel['method']}   bias: {panel['bias']}",
        f"provider: {analysis.provider}",
    ]
    for line in lines:
        draw.text((margin, y), line, font=body, fill="black")
        y += 38
    y += 20
    for line in _wrap(panel["intended_use"], 95):
        draw.text((margin, y), line, font=small, fill=(80, 80, 80))
        y += 28
    buf = io.BytesIO()
    page.save(buf, format="PNG")
    return buf.getvalue()


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line] if line else lines
