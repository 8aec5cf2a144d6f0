"""The viewer's one-page PNG report of one image (the page's "Download one-page report").

Torch-free, like :mod:`cxrdebias.deploy.viewer_state`, whose analysis and model panel it draws.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from cxrdebias.deploy.onnx_metadata import ModelMetadata
from cxrdebias.deploy.viewer_state import ImageAnalysis, model_panel


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed-size bitmap font
        return ImageFont.load_default()


def _fit(im: Image.Image, box: int) -> Image.Image:
    im = im.convert("RGB")
    scale = box / max(im.size)
    return im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.LANCZOS)


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
