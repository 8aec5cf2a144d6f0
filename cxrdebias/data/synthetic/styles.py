"""Site acquisition styles: the per-hospital signature a shortcut model picks up (stage 4 of the
generative model, :mod:`cxrdebias.data.synthetic`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

Corner = Literal["tl", "tr", "bl", "br"]


@dataclass(frozen=True)
class SiteStyle:
    """Acquisition and processing of one site (the *bias* a shortcut model picks up).

    Grey levels are "display" values in [0, 1] (1 = white = dense) until encoding.
    """

    contrast: float  # slope of the sigmoid LUT
    gamma: float  # exponent applied after the LUT (>1 darker mid-tones)
    brightness: float  # additive offset
    unsharp: float  # edge-enhancement amount
    noise: float  # std of the acquisition noise
    grain: float  # spatial correlation of the noise, in pixels at 256 px
    border: float  # collimation frame width, as a fraction of the image size
    border_value: float  # 0 = black frame, 1 = white frame
    marker: str  # lead marker letter
    marker_corner: Corner
    marker_box: bool  # marker drawn inside a white box outline
    label_corner: Corner  # corner of the burned-in text label
    ap_fraction: float  # share of AP (bedside) views
    photometric: Literal["MONOCHROME1", "MONOCHROME2"]
    bits_stored: int
    rescale_slope: float
    rescale_intercept: float
    # rescaled (modality-LUT) values of presentation values 0 and 1 — black and white for
    # MONOCHROME2, white and black for MONOCHROME1; the VOI window spans exactly this range
    value_lo: float
    value_hi: float

    def faded(self, strength: float) -> SiteStyle:
        """This style moved towards :data:`NEUTRAL_STYLE` (``strength`` 1 = unchanged)."""
        if strength >= 1.0:
            return self
        n, s = NEUTRAL_STYLE, strength

        def mix(a: float, b: float) -> float:
            return b + s * (a - b)

        return replace(
            self,
            contrast=mix(self.contrast, n.contrast),
            gamma=mix(self.gamma, n.gamma),
            brightness=mix(self.brightness, n.brightness),
            unsharp=mix(self.unsharp, n.unsharp),
            noise=mix(self.noise, n.noise),
            grain=mix(self.grain, n.grain),
            border=s * self.border,
            ap_fraction=mix(self.ap_fraction, n.ap_fraction),
        )


#: the appearance every site fades towards when ``site_style_strength`` → 0
NEUTRAL_STYLE = SiteStyle(
    contrast=3.5, gamma=1.0, brightness=0.0, unsharp=0.4, noise=0.02, grain=1.0,
    border=0.0, border_value=0.0, marker="R", marker_corner="tl", marker_box=False,
    label_corner="bl", ap_fraction=0.4, photometric="MONOCHROME2", bits_stored=12,
    rescale_slope=1.0, rescale_intercept=0.0, value_lo=100.0, value_hi=4000.0,
)  # fmt: skip

#: hand-tuned styles of the first four sites (more are drawn by :func:`site_style`)
_BASE_STYLES: tuple[SiteStyle, ...] = (
    # a COVID ward: bedside AP films, crisp processing, thin black frame, 12-bit MONOCHROME2
    SiteStyle(
        contrast=4.5, gamma=0.85, brightness=0.04, unsharp=0.8, noise=0.012, grain=0.6,
        border=0.035, border_value=0.0, marker="R", marker_corner="tl", marker_box=True,
        label_corner="bl", ap_fraction=0.65, photometric="MONOCHROME2", bits_stored=12,
        rescale_slope=1.0, rescale_intercept=0.0, value_lo=80.0, value_hi=4000.0,
    ),
    # an outpatient clinic: PA films, soft grainy look, wide white shutter frame,
    # 14-bit MONOCHROME1 with a rescale slope/intercept
    SiteStyle(
        contrast=3.0, gamma=1.2, brightness=-0.04, unsharp=0.15, noise=0.03, grain=1.4,
        border=0.07, border_value=1.0, marker="L", marker_corner="tr", marker_box=False,
        label_corner="tl", ap_fraction=0.2, photometric="MONOCHROME1", bits_stored=14,
        rescale_slope=0.5, rescale_intercept=-1024.0, value_lo=-800.0, value_hi=7000.0,
    ),
    SiteStyle(
        contrast=4.0, gamma=1.0, brightness=0.0, unsharp=0.5, noise=0.02, grain=1.0,
        border=0.05, border_value=0.0, marker="R", marker_corner="br", marker_box=True,
        label_corner="tr", ap_fraction=0.4, photometric="MONOCHROME2", bits_stored=16,
        rescale_slope=1.0, rescale_intercept=-1000.0, value_lo=-500.0, value_hi=30000.0,
    ),
    SiteStyle(
        contrast=3.5, gamma=0.95, brightness=0.02, unsharp=0.3, noise=0.025, grain=0.8,
        border=0.02, border_value=1.0, marker="L", marker_corner="bl", marker_box=False,
        label_corner="br", ap_fraction=0.3, photometric="MONOCHROME1", bits_stored=12,
        rescale_slope=1.0, rescale_intercept=0.0, value_lo=100.0, value_hi=4000.0,
    ),
)  # fmt: skip


def site_style(index: int) -> SiteStyle:
    """The style of site number ``index`` (0-based); fixed, independent of the seed."""
    if index < len(_BASE_STYLES):
        return _BASE_STYLES[index]
    rng = np.random.default_rng([7919, index])
    base = _BASE_STYLES[index % len(_BASE_STYLES)]
    corners: list[Corner] = ["tl", "tr", "bl", "br"]
    mc = int(rng.integers(4))
    return replace(
        base,
        contrast=float(rng.uniform(2.5, 5.0)),
        gamma=float(rng.uniform(0.8, 1.25)),
        brightness=float(rng.uniform(-0.05, 0.05)),
        unsharp=float(rng.uniform(0.1, 0.9)),
        noise=float(rng.uniform(0.01, 0.035)),
        grain=float(rng.uniform(0.5, 1.6)),
        border=float(rng.uniform(0.015, 0.08)),
        border_value=float(rng.integers(2)),
        marker="LR"[int(rng.integers(2))],
        marker_corner=corners[mc],
        marker_box=bool(rng.integers(2)),
        label_corner=corners[(mc + 1 + int(rng.integers(3))) % 4],
        ap_fraction=float(rng.uniform(0.15, 0.7)),
    )


