"""Synthetic multi-site chest X-rays: the embedded, fully offline default data set.

Why it exists
-------------
The chest X-ray application (COVID-19 detection with the *acquisition site* as the bias, as in
the CORDA study) needs data that cannot ship with the package. This module writes a small,
deterministic stand-in with the same structure — DICOM files from several "hospitals", a
``manifest.csv`` and a patient-level train/val/test split — so that every command of the package
runs end to end without downloads.

Generative model
----------------
Every image is drawn in four stages, all vectorised numpy on a ``N×N`` grid of normalised
coordinates ``u`` (left→right) and ``v`` (top→bottom), both in ``[-1, 1]``:

1. **Patient anatomy** (one random draw per patient, shared by all of the patient's images): a
   soft-tissue body outline, two tapered lung fields with a flat medial and a convex lateral
   border, diaphragm domes (the right one higher), a left-leaning heart, the mediastinum with
   trachea, aortic knob and spine, posterior and anterior ribs (curved bands with cortical
   edges), clavicles, vessel markings radiating from the hila and, for female patients, faint
   breast shadows. A smooth random displacement field deforms the whole thorax, so no two
   patients are alike. Each structure adds to (bone, soft tissue) or removes from (air in the
   lungs and trachea) an *attenuation* map ``A``; the detector image is ``1 - exp(-μ·A)``.
2. **Acquisition of one image**: follow-up images of a patient (1–3 by default) change the pose
   (rotation, shift, scale), the depth of inspiration, the exposure ``μ`` and, for AP views,
   the magnification of the heart.
3. **Disease** (label 1 = COVID-19 positive): ground-glass opacities — soft, hazy increases of
   ``A`` inside both lungs, weighted towards the periphery (near the lateral pleura) and the
   lower zones, with patchy random shape and an extent drawn per patient from
   :attr:`SynthConfig.severity_range` (subtle to extensive). Negative images have none. A few
   patients of *either* class get a non-COVID finding (nodule, cardiomegaly, perihilar haze)
   so that "any abnormality" is not the same as "COVID".
4. **Site signature** (one per hospital, :class:`SiteStyle`): contrast curve (sigmoid LUT and
   gamma), global brightness, edge enhancement (unsharp masking), noise level and grain, a
   collimation frame of site-specific width and colour, a burned-in lead marker ("L"/"R") and a
   text label in site-specific corners, the share of AP (bedside) views, and the DICOM
   encoding (bit depth, MONOCHROME1/2, rescale slope/intercept, window).

Why a vanilla model takes the shortcut
--------------------------------------
The site signature is *global and deterministic*: a frame, text and grey-level curve present in
every image of a site, visible at any resolution. The disease is *local, patchy and of variable
extent* — sometimes subtle — and sits on top of anatomy that varies from patient to patient.
In the train/val pool the label is correlated with the site like in CORDA (by default
``hospital_a`` is ~88 % positive and ``hospital_b`` ~12 %), so predicting the site already gives
~88 % training accuracy with far less effort than reading the lungs. The test split is balanced
(50 % positive) within every site, so a shortcut model fails on the bias-conflicting groups
(positives of the mostly-negative site, negatives of the mostly-positive site) and a debiased
model (e.g. EnD with the site as bias label) should not. :attr:`SynthConfig.bias_strength`
moves the per-site prevalences towards their mean (0 = no site–label correlation) and
:attr:`SynthConfig.site_style_strength` fades the site signature out (0 = sites look alike).

Outputs of :func:`synthesize` (in ``out_dir``)
--------------------------------------------
- ``images/<site>/<patient_id>_<k>.dcm`` — one Computed Radiography DICOM per image,
- ``manifest.csv`` — ``path,label,site,patient_id,view,sex,age,split`` (``path`` relative to the
  manifest; every image of a patient shares its site, label and split),
- ``synth_config.json`` — the generator config, seed, generator version, resolved site styles,
  counts and SHA-256 hashes of the manifest and of the pixel data.

Everything is a function of ``(config, seed, GENERATOR_VERSION)``: the same inputs give
byte-identical files. The module does not import torch.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cxrdebias.errors import DataError, RunExistsError

#: bump whenever a change alters the generated pixels or the split (recorded in synth_config.json)
GENERATOR_VERSION = "1.0.0"
MANIFEST_COLUMNS: tuple[str, ...] = ("path", "label", "site", "patient_id", "view", "sex", "age", "split")
SPLITS: tuple[str, ...] = ("train", "val", "test")
MANIFEST_NAME = "manifest.csv"
CONFIG_NAME = "synth_config.json"
IMAGES_DIR = "images"

_DETECTOR_MM = 350.0  # field of view of the simulated detector (for ImagerPixelSpacing)


# ============================================================================================
# Configuration
# ============================================================================================
class SynthConfig(BaseModel):
    """Options of the synthetic multi-site chest X-ray generator (all have working defaults).

    The defaults give ~1,600 images (800 patients) in two sites, generated in a few seconds.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, ge=0, description="master seed; same seed + config → byte-identical files")
    image_size: int = Field(
        256, ge=32, le=2048, description="native width = height of the DICOM images, in pixels"
    )
    sites: list[str] = Field(
        default_factory=lambda: ["hospital_a", "hospital_b"],
        description="site (hospital) names, written to InstitutionName and the manifest; ≥ 2, "
        "letters/digits/'_'/'-' only",
    )
    site_prevalence: list[float] = Field(
        default_factory=lambda: [0.875, 0.125],
        description="share of COVID-positive patients per site in the train/val pool at "
        "bias_strength=1, one value in [0, 1] per site",
    )
    bias_strength: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="site–label correlation of the train/val pool: prevalence of site s is "
        "mean + bias_strength·(site_prevalence[s] − mean); 0 = same prevalence everywhere",
    )
    n_train_patients_per_site: int = Field(250, ge=1, description="training patients per site")
    n_val_patients_per_site: int = Field(
        100, ge=0, description="validation patients per site (biased pool, like train)"
    )
    n_test_patients_per_site: int = Field(
        100, ge=0, description="test patients per site; even: half positive, half negative"
    )
    images_per_patient: tuple[int, int] = Field(
        (1, 3), description="inclusive (min, max) images per patient (follow-ups)"
    )
    severity_range: tuple[float, float] = Field(
        (0.05, 0.5),
        description="range of the disease extent of positive patients, within [0, 1] "
        "(0 = invisible, 1 = extensive bilateral opacities); drawn uniformly. The default "
        "(subtle to moderate) keeps the disease harder to learn than the site, so that a vanilla "
        "model takes the site shortcut (docs/cxr.md); (0.15, 1.0) gave a disease so easy that "
        "the shortcut barely showed",
    )
    other_findings_rate: float = Field(
        0.15,
        ge=0.0,
        le=1.0,
        description="share of patients (either label) with a non-COVID finding "
        "(nodule, cardiomegaly, perihilar haze)",
    )
    site_style_strength: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="how different the sites look (contrast, noise, frame, markers, AP share); "
        "0 = identical appearance (the DICOM encodings still differ)",
    )

    @field_validator("sites")
    @classmethod
    def _check_sites(cls, v: list[str]) -> list[str]:
        if len(v) < 2:
            raise ValueError(f"need at least 2 sites, got {len(v)}")
        if len(set(v)) != len(v):
            raise ValueError(f"site names must be unique, got {v}")
        for s in v:
            if not s or len(s) > 64 or not all(c.isalnum() or c in "_-" for c in s):
                raise ValueError(
                    f"site name {s!r} must be 1-64 characters of letters, digits, '_' or '-'"
                )
        return v

    @field_validator("site_prevalence")
    @classmethod
    def _check_prevalence(cls, v: list[float]) -> list[float]:
        for p in v:
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"every site_prevalence must be in [0, 1], got {p}")
        return v

    @field_validator("images_per_patient")
    @classmethod
    def _check_images_per_patient(cls, v: tuple[int, int]) -> tuple[int, int]:
        lo, hi = v
        if not 1 <= lo <= hi <= 20:
            raise ValueError(f"images_per_patient must satisfy 1 <= min <= max <= 20, got {v}")
        return v

    @field_validator("severity_range")
    @classmethod
    def _check_severity(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"severity_range must satisfy 0 <= min <= max <= 1, got {v}")
        return v

    @field_validator("n_test_patients_per_site")
    @classmethod
    def _check_test_even(cls, v: int) -> int:
        if v % 2:
            raise ValueError(
                f"n_test_patients_per_site must be even (half positive, half negative), got {v}"
            )
        return v

    @model_validator(mode="after")
    def _check_lengths(self) -> SynthConfig:
        if len(self.site_prevalence) != len(self.sites):
            raise ValueError(
                f"site_prevalence has {len(self.site_prevalence)} values but there are "
                f"{len(self.sites)} sites"
            )
        return self

    def pool_prevalence(self) -> list[float]:
        """Positive share of each site's train/val patients after applying ``bias_strength``."""
        mean = float(np.mean(self.site_prevalence))
        return [mean + self.bias_strength * (p - mean) for p in self.site_prevalence]


class SplitSiteCount(BaseModel):
    """Counts of one (split, site) cell of the generated set."""

    split: str
    site: str
    patients: int
    images: int
    positive_images: int
    prevalence: float


class SynthSummary(BaseModel):
    """What :func:`synthesize` wrote."""

    out_dir: str
    manifest: str
    config_file: str
    n_patients: int
    n_images: int
    counts: list[SplitSiteCount]
    seconds: float
    images_per_second: float
    manifest_sha256: str
    pixel_sha256: str

    def table(self) -> str:
        """The counts as a small Markdown table."""
        lines = [
            "| split | site | patients | images | positive | prevalence |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for c in self.counts:
            lines.append(
                f"| {c.split} | {c.site} | {c.patients} | {c.images} | {c.positive_images} "
                f"| {c.prevalence:.3f} |"
            )
        return "\n".join(lines)


# ============================================================================================
# Site styles
# ============================================================================================
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


# ============================================================================================
# Small numeric helpers (float32, vectorised)
# ============================================================================================
def _sigmoid(x: np.ndarray) -> np.ndarray:
    y = np.tanh(x * np.float32(0.5))
    y *= np.float32(0.5)
    y += np.float32(0.5)
    return y


def _ramp(x: np.ndarray) -> np.ndarray:
    """Piecewise-linear sigmoid (same slope at 0): a cheap soft edge."""
    y = x * np.float32(0.25)
    y += np.float32(0.5)
    return np.clip(y, 0, 1, out=y)


def _sq(x: np.ndarray) -> np.ndarray:
    return x * x


@lru_cache(maxsize=64)
def _coarse_basis(n: int, cells: int) -> np.ndarray:
    """``n × (cells+2)`` Gaussian interpolation weights with unit row norm (unit-variance noise)."""
    x = (np.arange(n) + 0.5) / n
    c = (np.arange(-1, cells + 1) + 0.5) / cells
    w = np.exp(-0.5 * ((x[:, None] - c[None, :]) * cells / 0.75) ** 2)
    w /= np.sqrt((w**2).sum(axis=1, keepdims=True))
    w = w.astype(np.float32)
    w.flags.writeable = False
    return w


@lru_cache(maxsize=32)
def _blur_matrix(n: int, sigma_px: float) -> np.ndarray:
    """Row-normalised Gaussian blur matrix with reflected borders: ``K @ img @ K.T`` blurs."""
    i = np.arange(n)
    radius = max(1, int(np.ceil(3 * sigma_px)))
    k = np.zeros((n, n), dtype=np.float64)
    for off in range(-radius, radius + 1):
        j = i + off
        j = np.where(j < 0, -j - 1, j)
        j = np.where(j >= n, 2 * n - j - 1, j)
        np.add.at(k, (i, np.clip(j, 0, n - 1)), np.exp(-0.5 * (off / sigma_px) ** 2))
    k /= k.sum(axis=1, keepdims=True)
    k = k.astype(np.float32)
    k.flags.writeable = False
    return k


@lru_cache(maxsize=8)
def _grain_bank(n: int, sigma_px: float) -> np.ndarray:
    """A fixed ``2n × 2n`` unit-variance correlated noise field; images use random crops of it.

    Cropping (plus flips) is much cheaper than drawing and blurring fresh noise per image and
    statistically the same for a classifier. Fixed seed: the bank is part of the generator.
    """
    white = np.random.default_rng(20200301).standard_normal((2 * n, 2 * n), dtype=np.float32)
    bank = _blur(white, sigma_px)
    bank /= np.float32(bank.std())
    bank.flags.writeable = False
    return bank


def _blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    if sigma_px < 0.3:
        return img
    k = _blur_matrix(img.shape[0], round(float(sigma_px), 2))
    return k @ img @ k.T


@lru_cache(maxsize=8)
def _base_grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    c = ((np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1).astype(np.float32)
    u = np.broadcast_to(c[None, :], (n, n))
    v = np.broadcast_to(c[:, None], (n, n))
    return u, v


def _segment_distance(u, v, p0, p1) -> np.ndarray:
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((u - x0) * dx + (v - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return np.sqrt((u - x0 - t * dx) ** 2 + (v - y0 - t * dy) ** 2)


# ============================================================================================
# Anatomy, pose and disease
# ============================================================================================
@dataclass
class _Anatomy:
    """Per-patient anatomy (normalised coordinates)."""

    body_w: float
    lung_cx: float
    lung_cy: float
    lung_a: tuple[float, float]  # half-widths (image-left = patient right, image-right)
    lung_b: float
    dome_top: tuple[float, float]
    dome_h: float
    heart: tuple[float, float, float, float, float]  # cx, cy, ax, ay, angle
    med_w: float
    rib_space: float
    rib_start: float
    rib_curve: float
    clav_y: float
    vessel_phase: np.ndarray  # per-lung 1-D angular profile of vessel markings
    deform: tuple[np.ndarray, np.ndarray]  # coarse displacement fields (cells+2 square)
    texture: np.ndarray  # coarse lung texture (cells+2 square)
    female: bool
    finding: str | None  # non-COVID finding
    finding_pos: tuple[float, float]
    severity: float  # 0 for negatives
    ggo_seed: np.ndarray  # coarse disease field
    ggo_sides: tuple[float, float]


def _circular_smooth(x: np.ndarray) -> np.ndarray:
    """Smooth the last axis with a circular [1, 2, 1]/4 kernel (wider vessel streaks)."""
    return ((np.roll(x, 1, -1) + 2 * x + np.roll(x, -1, -1)) / 2).astype(np.float32)


def _sample_anatomy(
    rng: np.random.Generator, *, female: bool, severity: float, other_rate: float
) -> _Anatomy:
    u = rng.uniform
    finding = None
    if rng.random() < other_rate:
        finding = ("nodule", "cardiomegaly", "perihilar_haze")[int(rng.integers(3))]
    cy = u(-0.16, -0.10)
    b = u(0.58, 0.66)
    dome_r = cy + b * u(0.74, 0.82)
    return _Anatomy(
        body_w=u(0.86, 0.95),
        lung_cx=u(0.38, 0.42),
        lung_a=(u(0.31, 0.35), u(0.29, 0.33)),
        lung_cy=cy,
        lung_b=b,
        dome_top=(dome_r, dome_r + u(0.02, 0.07)),
        dome_h=u(0.07, 0.12),
        heart=(u(0.1, 0.15), u(0.28, 0.34), u(0.33, 0.39), u(0.2, 0.24), u(0.55, 0.8)),
        med_w=u(0.10, 0.13),
        rib_space=u(0.105, 0.12),
        rib_start=u(-0.88, -0.80),
        rib_curve=u(0.8, 1.0),
        clav_y=u(-0.72, -0.64),
        vessel_phase=_circular_smooth(rng.standard_normal((2, 64))),
        deform=(
            rng.standard_normal((6, 6)).astype(np.float32),
            rng.standard_normal((6, 6)).astype(np.float32),
        ),
        texture=rng.standard_normal((18, 18)).astype(np.float32),
        female=female,
        finding=finding,
        finding_pos=(float(rng.choice([-1.0, 1.0]) * u(0.3, 0.5)), u(-0.5, 0.1)),
        severity=severity,
        ggo_seed=rng.standard_normal((11, 11)).astype(np.float32),
        ggo_sides=(u(0.6, 1.0), u(0.6, 1.0)),
    )


@dataclass
class _Pose:
    """Per-image acquisition of a patient."""

    angle: float
    shift: tuple[float, float]
    scale: float
    inspiration: float  # lung height factor
    dome_shift: float
    exposure: float  # μ factor
    ap: bool
    severity_factor: float  # follow-up change of the disease extent


def _sample_pose(rng: np.random.Generator, *, ap: bool) -> _Pose:
    u = rng.uniform
    return _Pose(
        angle=u(-0.04, 0.04),
        shift=(u(-0.03, 0.03), u(-0.03, 0.03)),
        scale=u(0.95, 1.05),
        inspiration=u(0.95, 1.04),
        dome_shift=u(-0.03, 0.03),
        exposure=u(0.92, 1.08),
        ap=ap,
        severity_factor=u(0.75, 1.25),
    )


def _f32(x: float) -> np.float32:
    return np.float32(x)


def _box(pose: _Pose, n: int, u: tuple[float, float], v: tuple[float, float]) -> tuple[slice, slice]:
    """Pixel rows/columns that can hold anatomy coordinates ``u × v`` under ``pose``.

    Inverts the pose's similarity transform at the four corners and pads for the deformation
    field (|δ| < 0.1), so structures can be drawn on a sub-array only.
    """
    ca, sa, s = np.cos(pose.angle), np.sin(pose.angle), pose.scale
    uu = np.array([u[0], u[0], u[1], u[1]])
    vv = np.array([v[0], v[1], v[0], v[1]])
    x = pose.shift[0] + s * (ca * uu - sa * vv)
    y = pose.shift[1] + s * (sa * uu + ca * vv)
    pad = 0.12 * s

    def idx(lo: float, hi: float) -> slice:
        i0 = int(np.floor((lo - pad + 1) / 2 * n))
        i1 = int(np.ceil((hi + pad + 1) / 2 * n)) + 1
        return slice(min(max(i0, 0), n), min(max(i1, 0), n))

    return idx(float(y.min()), float(y.max())), idx(float(x.min()), float(x.max()))


def _render_attenuation(an: _Anatomy, pose: _Pose, n: int) -> np.ndarray:
    """Attenuation map ``A`` (``n×n`` float32) of one image of a patient.

    Soft tissue contributes ~0.3–0.5, aerated lung removes ~0.35, mediastinum/heart/abdomen add
    ~0.4, bones 0.05–0.2 (arbitrary units; :func:`_detector` maps them to grey levels). Sharp
    borders use linear ramps, wide transitions sigmoids; small structures are drawn only inside
    their bounding box (:func:`_box`).
    """
    f = _f32
    u0, v0 = _base_grid(n)
    ca, sa = f(np.cos(pose.angle)), f(np.sin(pose.angle))
    x = u0 - f(pose.shift[0])
    y = v0 - f(pose.shift[1])
    inv_s = f(1.0 / pose.scale)
    b6 = _coarse_basis(n, 4)
    U = (ca * x + sa * y) * inv_s + f(0.025) * (b6 @ an.deform[0] @ b6.T)
    V = (ca * y - sa * x) * inv_s + f(0.025) * (b6 @ an.deform[1] @ b6.T)
    abs_u = np.abs(U)
    ap = pose.ap

    # ---- body: torso, shoulders, neck; soft tissue thicker in the middle ----------------------
    bx = abs_u / f(an.body_w)
    bx2 = bx * bx
    by = np.abs(V - f(0.3)) / f(1.35)
    body = _ramp((1 - bx2 * bx2 - by * by * by) / f(0.04))
    r, c = _box(pose, n, (-1.1, 1.1), (-1.2, -0.6))
    Ub, Vb = abs_u[r, c], V[r, c]
    sh = _sq((Ub - f(0.72)) / f(0.34)) + _sq((Vb + f(0.86)) / f(0.22))
    neck = _ramp((f(0.24) - Ub) / f(0.02)) * _ramp((f(-0.55) - Vb) / f(0.05))
    body[r, c] = np.maximum(np.maximum(body[r, c], _ramp((1 - sh) / f(0.12))), neck)
    A = body * (f(0.3) + f(0.2) * np.sqrt(np.maximum(1 - bx2, 0)))
    head = _sq((Ub - f(0.96)) / f(0.15)) + _sq((Vb + f(0.72)) / f(0.15))  # humeral heads
    A[r, c] += f(0.2) * _ramp((1 - head) / f(0.1))

    # ---- lungs (s = -1: image left = patient right) and diaphragm domes -------------------------
    lung_b = an.lung_b * pose.inspiration * (0.95 if ap else 1.0)
    lung = np.zeros_like(A)
    lung_depth = np.zeros_like(A)
    ggo_zone = np.zeros_like(A) if an.severity > 0 else None
    ves = np.zeros_like(A)
    # diaphragm: one dome per side, highest about mid-lung, flat beyond the costophrenic angle
    q = (abs_u - f(0.26)) / f(0.3)
    dome_v = f(an.dome_h) * np.minimum(q * q, f(2.0))
    dome_v += np.where(U < 0, f(an.dome_top[0]), f(an.dome_top[1]))
    dome_v += f(pose.dome_shift + (1 - pose.inspiration))
    for side, s in enumerate((-1.0, 1.0)):
        a = an.lung_a[side]
        lo, hi = an.lung_cx - 1.1 * a, an.lung_cx + 1.1 * a
        r, c = _box(pose, n, (min(s * lo, s * hi), max(s * lo, s * hi)),
                    (an.lung_cy - 1.1 * lung_b, an.lung_cy + 1.45 * lung_b))  # fmt: skip
        Ub, Vb = U[r, c], V[r, c]
        lx = (f(s) * Ub - f(an.lung_cx)) / f(a)  # + = lateral
        ly = (Vb - f(an.lung_cy)) / f(lung_b)  # -1 apex … +1 base
        taper = f(0.3) + f(0.7) * np.sqrt(np.clip((ly + 1) * f(0.8), 0, 1))
        xl2 = _sq(lx / taper)
        ly2 = ly * ly
        # convex lateral border (x²), flat medial border (x⁴); round apex (y²), flat base (y⁶)
        fl = xl2 * np.maximum(xl2, lx > 0) + ly2 * np.maximum(ly2 * ly2 * f(0.165), ly < 0)
        m = _ramp((1 - fl) / f(0.06)) * _ramp((dome_v[r, c] - Vb) / f(0.012))
        lung[r, c] += m
        lung_depth[r, c] += m * (f(0.5) + f(0.5) * np.sqrt(np.maximum(1 - fl, 0)))
        if ggo_zone is not None:
            # COVID-19 zone: periphery (lateral/basal pleura) and lower zones
            periph = f(0.3) + f(0.7) * np.clip((np.sqrt(fl) - f(0.3)) / f(0.6), 0, 1)
            lateral = f(0.55) + f(0.45) * _sigmoid(f(4) * lx)
            lower = f(0.2) + f(0.8) * _sigmoid((ly - f(0.05)) / f(0.2))
            ggo_zone[r, c] += m * periph * lateral * lower * f(an.ggo_sides[side])
        # vessel markings: streaks radiating from the hilum
        du = f(s) * Ub - f(0.15)
        dv_ = Vb + f(0.04)
        r2 = du * du + dv_ * dv_
        th = (np.arctan2(dv_, du) + f(np.pi)) * f(64 / (2 * np.pi))
        i0 = th.astype(np.int32)
        w = th - i0
        prof = an.vessel_phase[side]
        streak = np.take(prof, i0, mode="wrap") * (1 - w) + np.take(prof, i0 + 1, mode="wrap") * w
        ves[r, c] += np.maximum(streak, 0) * np.exp(f(-3.0) * np.sqrt(r2)) * (1 - np.exp(f(-150) * r2))
        ves[r, c] += f(1.2) * np.exp(f(-120) * r2)  # hilum
    # heart (left-leaning, magnified on AP films): in front of the lungs, hides most of them
    hcx, hcy, hax, hay, hang = an.heart
    hscale = (1.12 if ap else 1.0) * (1.22 if an.finding == "cardiomegaly" else 1.0)
    ext = 1.2 * max(hax, hay) * hscale
    r, c = _box(pose, n, (hcx - ext, hcx + ext), (hcy - ext, hcy + ext))
    cs, sn = f(np.cos(hang)), f(np.sin(hang))
    du, dv_ = U[r, c] - f(hcx), V[r, c] - f(hcy)
    fh = _sq((cs * du + sn * dv_) / f(hax * hscale)) + _sq((cs * dv_ - sn * du) / f(hay * hscale))
    heart = _ramp((1 - fh) / f(0.1))
    A[r, c] += f(0.3) * heart * np.sqrt(np.clip(f(1.3) - fh, 0, 1))
    keep = 1 - f(0.75) * heart
    lung[r, c] *= keep
    lung_depth[r, c] *= keep
    if ggo_zone is not None:
        ggo_zone[r, c] *= keep

    b18 = _coarse_basis(n, 16)
    tex = b18 @ an.texture @ b18.T
    A -= f(0.36) * lung_depth
    A += lung * (f(0.045) * ves + f(0.015) * tex)

    # ---- mediastinum, trachea, aortic knob, spine ---------------------------------------------
    r, c = _box(pose, n, (-0.25, 0.25), (-1.2, 1.2))
    Ub, Vb, Ab = U[r, c], V[r, c], A[r, c]
    aub = np.abs(Ub)
    mw = f(an.med_w) + f(0.05) * np.clip((Vb + f(0.4)) / f(0.6), 0, 1)
    Ab += f(0.38) * _ramp((mw - np.abs(Ub - f(0.01))) / f(0.015)) * body[r, c]
    Ab -= f(0.14) * _ramp((f(0.032) - aub) / f(0.008)) * _ramp((f(-0.3) - Vb) / f(0.03))
    knob = _sq(Ub - f(0.12)) + _sq(Vb + f(0.3))
    Ab += f(0.1) * _ramp((f(0.0045) - knob) / f(0.0015))
    spine = _ramp((f(0.075) - aub) / f(0.01))
    Ab += f(0.1) * spine * (f(0.8) + f(0.2) * np.cos(Vb * f(2 * np.pi / 0.095)))

    # ---- abdomen below the domes; gastric bubble ----------------------------------------------
    below = _ramp((V - dome_v) / f(0.012))
    A += f(0.36) * below * body
    bcy = an.dome_top[1] + 0.13
    r, c = _box(pose, n, (0.2, 0.52), (bcy - 0.12, bcy + 0.12))
    bubble = _sq((U[r, c] - f(0.36)) / f(0.09)) + _sq((V[r, c] - f(bcy)) / f(0.05))
    A[r, c] -= f(0.12) * _ramp((1 - bubble) / f(0.15)) * below[r, c]

    # ---- ribs: posterior (curving down laterally) and fainter anterior -------------------------
    tw = an.lung_cx + an.lung_a[0] + 0.06
    th_ = lung_b + 0.1
    r, c = _box(pose, n, (-tw - 0.1, tw + 0.1), (an.lung_cy - th_ - 0.1, an.lung_cy + th_ + 0.1))
    Ub, Vb = U[r, c], V[r, c]
    t = abs_u[r, c]
    thorax = _ramp((1 - _sq(Ub / f(tw)) - _sq((Vb - f(an.lung_cy)) / f(th_))) / f(0.08)) * body[r, c]
    eta = Vb - (f(-0.12) + f(an.rib_curve) * t) * t - f(an.rib_start)
    gam = f(0.035)
    k = (np.sqrt(np.maximum(1 + (4 * gam / f(an.rib_space)) * eta, 0)) - 1) / (2 * gam)
    d = np.abs(k - np.round(k))
    rib = _ramp((f(0.21) - d) / f(0.03)) + f(0.7) * np.exp(-_sq((d - f(0.19)) / f(0.03)))
    rib *= ((k > -0.3) & (k < 10.5)) * _ramp((t - f(0.09)) / f(0.02))
    k2 = (Vb + f(0.45) * t - f(an.rib_start + 0.15)) / f(an.rib_space * 1.25)
    d2 = np.abs(k2 - np.round(k2))
    rib2 = _ramp((f(0.2) - d2) / f(0.04)) * ((k2 > -0.3) & (k2 < 6.5))
    rib2 *= _ramp((t - f(0.28)) / f(0.05))
    A[r, c] += thorax * (f(0.045) * rib + f(0.022) * rib2)

    # ---- clavicles ----------------------------------------------------------------------------
    cy0 = an.clav_y - (0.07 if ap else 0.0)
    r, c = _box(pose, n, (-0.72, 0.72), (cy0 - 0.16, cy0 + 0.08))
    dist = _segment_distance(abs_u[r, c], V[r, c], (0.08, cy0 + 0.03), (0.66, cy0 - 0.07))
    A[r, c] += f(0.12) * _ramp((f(0.032) - dist) / f(0.008))

    # ---- breast shadows -----------------------------------------------------------------------
    if an.female:
        r, c = _box(pose, n, (-1.0, 1.0), (0.05, 0.8))
        br = _sq((abs_u[r, c] - f(0.48)) / f(0.4)) + _sq((V[r, c] - f(0.42)) / f(0.3))
        A[r, c] += f(0.05) * _sigmoid((1 - br) / f(0.12)) * body[r, c]

    # ---- non-COVID findings (either label) ----------------------------------------------------
    if an.finding == "nodule":
        fx_, fy_ = an.finding_pos
        rr = np.sqrt(_sq(U - f(fx_)) + _sq(V - f(fy_)))
        A += f(0.18) * _ramp((f(0.04) - rr) / f(0.008)) * lung
    elif an.finding == "perihilar_haze":
        rr = _sq((abs_u - f(0.22)) / f(0.2)) + _sq((V + f(0.02)) / f(0.25))
        A += f(0.1) * np.exp(-rr) * lung

    # ---- COVID-19 ground-glass opacities ------------------------------------------------------
    if ggo_zone is not None:
        e = float(np.clip(an.severity * pose.severity_factor, 0.05, 1.0))
        b11 = _coarse_basis(n, 9)
        patches = b11 @ an.ggo_seed @ b11.T
        cover = _sigmoid((patches - f(1.0 - 2.2 * e)) / f(0.35))
        amp = f(0.12 + 0.38 * e)
        A += amp * ggo_zone * cover * (f(0.85) + f(0.15) * tex)
    return A


def _detector(A: np.ndarray, pose: _Pose) -> np.ndarray:
    """Detector response in [0, 1] (1 = white): ``1 - exp(-μ·A)``, normalised."""
    mu = np.float32(1.5 * pose.exposure)
    return (1 - np.exp(-mu * np.maximum(A, 0))) / np.float32(1 - np.exp(-1.5 * 1.25))


# ============================================================================================
# Site signature
# ============================================================================================
@lru_cache(maxsize=64)
def _text_mask(text: str, scale: int) -> np.ndarray:
    """Binary mask of ``text`` in PIL's built-in bitmap font, magnified by ``scale``."""
    font = ImageFont.load_default_imagefont()
    left, top, right, bottom = font.getbbox(text)
    img = Image.new("L", (right + 2, bottom + 2), 0)
    ImageDraw.Draw(img).text((1, 1), text, font=font, fill=255)
    m = np.asarray(img, dtype=np.float32) / 255.0
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


def _apply_site(
    d: np.ndarray, style: SiteStyle, strength: float, site: str, view: str, rng: np.random.Generator
) -> np.ndarray:
    """Contrast curve, processing, noise, collimation frame and burned-in markers of a site."""
    n = d.shape[0]
    px = n / 256.0
    # contrast: normalised sigmoid LUT, then gamma and brightness
    k = np.float32(style.contrast)
    lo, hi = _sigmoid(-0.5 * k), _sigmoid(0.5 * k)
    d = (_sigmoid(k * (d - np.float32(0.5))) - lo) / np.float32(hi - lo)
    d = np.clip(d, 0, 1) ** np.float32(style.gamma) + np.float32(style.brightness)
    # edge enhancement (unsharp masking, as done by CR/DR processing)
    if style.unsharp > 0:
        d = d + np.float32(style.unsharp) * (d - _blur(d, 4.0 * px))
    # acquisition noise: correlated grain, stronger in dark (high-exposure) regions
    (oy, ox), flip = rng.integers(0, n, size=2), int(rng.integers(4))
    grain = _grain_bank(n, round(style.grain * px, 2))[oy : oy + n, ox : ox + n]
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


def _encode(d: np.ndarray, style: SiteStyle) -> np.ndarray:
    """Display values in [0, 1] → stored pixel values (uint16) of the site's DICOM encoding."""
    if not np.isfinite(d).all():  # a generator bug, never silently encode garbage
        raise RuntimeError("synthetic_cxr: non-finite pixel values")
    p = d if style.photometric == "MONOCHROME2" else 1 - d
    rescaled = style.value_lo + p.astype(np.float64) * (style.value_hi - style.value_lo)
    stored = np.rint((rescaled - style.rescale_intercept) / style.rescale_slope)
    return np.clip(stored, 0, 2**style.bits_stored - 1).astype(np.uint16)


# ============================================================================================
# DICOM writing (the package's one DICOM writer: cxrdebias.data.images)
# ============================================================================================
def _write_image(
    path: Path,
    stored: np.ndarray,
    style: SiteStyle,
    *,
    site: str,
    patient_id: str,
    sex: str,
    age: int,
    view: str,
    image_number: int,
    study_date: str,
) -> None:
    """Write one CR DICOM with the site's encoding (via :func:`cxrdebias.data.images.write_dicom`)."""
    from cxrdebias.data.images import write_dicom

    n = stored.shape[0]
    spacing = round(_DETECTOR_MM / n, 4)
    rescale = None
    if (style.rescale_slope, style.rescale_intercept) != (1.0, 0.0):
        rescale = (style.rescale_slope, style.rescale_intercept)
    write_dicom(
        path,
        stored,
        institution_name=site,
        patient_id=patient_id,
        photometric=style.photometric,
        bits_stored=style.bits_stored,
        rescale=rescale,
        window=((style.value_lo + style.value_hi) / 2, style.value_hi - style.value_lo),
        modality="CR",
        extra={
            "PatientName": f"SYNTHETIC^{patient_id}",
            "PatientSex": sex,
            "PatientAge": f"{age:03d}Y",
            "ViewPosition": view,
            "BodyPartExamined": "CHEST",
            "Manufacturer": "cxrdebias synthetic",
            "StudyDate": study_date,
            "ContentDate": study_date,
            "SeriesNumber": 1,
            "InstanceNumber": image_number,
            "ImagerPixelSpacing": [spacing, spacing],
            "BurnedInAnnotation": "YES",
            "ImageComments": "SYNTHETIC IMAGE - NOT A REAL PATIENT",
        },
    )


# ============================================================================================
# Study design (who is in which site/split with which label)
# ============================================================================================
@dataclass
class _Patient:
    site: int
    split: str
    index: int  # within (site, split)
    label: int
    n_images: int
    sex: str
    age: int
    patient_id: str = ""


_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}


def _plan(cfg: SynthConfig) -> list[_Patient]:
    """Patients with site, split, label, image count and demographics (deterministic)."""
    rng = np.random.default_rng([cfg.seed, 0])
    lo, hi = cfg.images_per_patient
    prev = cfg.pool_prevalence()
    patients: list[_Patient] = []
    for s in range(len(cfg.sites)):
        for split, n in (("train", cfg.n_train_patients_per_site), ("val", cfg.n_val_patients_per_site)):
            n_pos = int(round(prev[s] * n))
            labels = np.zeros(n, dtype=int)
            labels[:n_pos] = 1
            labels = rng.permutation(labels)
            counts = rng.integers(lo, hi + 1, size=n)
            for i in range(n):
                patients.append(_Patient(s, split, i, int(labels[i]), int(counts[i]), "", 0))
        # test: pairs (one positive, one negative) share the image count → exactly 50/50 images
        half = cfg.n_test_patients_per_site // 2
        counts = rng.integers(lo, hi + 1, size=half)
        labels = np.concatenate([np.ones(half, dtype=int), np.zeros(half, dtype=int)])
        order = rng.permutation(2 * half)
        for i, j in enumerate(order):
            patients.append(_Patient(s, "test", i, int(labels[j]), int(counts[j % half]), "", 0))
    ids = rng.permutation(len(patients))
    for p, pid in zip(patients, ids, strict=True):
        p.patient_id = f"SYN{pid + 1:05d}"
        p.sex = "F" if rng.random() < 0.45 else "M"
        p.age = int(np.clip(np.rint(rng.normal(58, 16)), 18, 95))
    return patients


def _render_patient(cfg: SynthConfig, p: _Patient, style: SiteStyle) -> list[tuple[np.ndarray, str]]:
    """Display images (``n×n`` float32 in [0, 1]) and view of every image of one patient."""
    key = [cfg.seed, 1, p.site, _SPLIT_CODE[p.split], p.index]
    prng = np.random.default_rng(key)
    lo, hi = cfg.severity_range
    severity = float(prng.uniform(lo, hi)) if p.label == 1 else 0.0
    anatomy = _sample_anatomy(prng, female=p.sex == "F", severity=severity, other_rate=cfg.other_findings_rate)
    out = []
    for k in range(p.n_images):
        irng = np.random.default_rng([*key, 2 + k])
        view = "AP" if irng.random() < style.ap_fraction else "PA"
        pose = _sample_pose(irng, ap=view == "AP")
        A = _render_attenuation(anatomy, pose, cfg.image_size)
        d = _apply_site(_detector(A, pose), style, cfg.site_style_strength, cfg.sites[p.site], view, irng)
        out.append((d, view))
    return out


# ============================================================================================
# Public API
# ============================================================================================
@contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """Run the small matrix products on one BLAS thread.

    The products are tiny; a multi-threaded BLAS only adds synchronisation, and on a machine
    whose cores are busy (e.g. a training run) it slows generation down by an order of
    magnitude. ``threadpoolctl`` ships with scikit-learn; without it this is a no-op.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _prepare_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise RunExistsError(
                f"{out_dir} is not empty; choose another folder or pass force=True (--force) to "
                "replace a previous synthetic data set there"
            )
        if (out_dir / IMAGES_DIR).exists() and not (out_dir / CONFIG_NAME).exists():
            raise DataError(
                f"{out_dir} has an '{IMAGES_DIR}' folder but no {CONFIG_NAME}: it does not look "
                "like a synthetic data set, refusing to delete it even with force=True"
            )
        for name in (MANIFEST_NAME, CONFIG_NAME):
            (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(out_dir / IMAGES_DIR, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _generate(
    cfg: SynthConfig,
    out: Path,
    patients: list[_Patient],
    styles: list[SiteStyle],
    rows: list[dict],
    pixel_hash,
    progress: Callable[[int, int], None] | None,
) -> None:
    """Render, encode and write every image; append manifest rows; hash the pixel data."""
    for i, p in enumerate(patients):
        style = styles[p.site]
        site = cfg.sites[p.site]
        for k, (d, view) in enumerate(_render_patient(cfg, p, style)):
            stored = _encode(d, style)
            pixel_hash.update(stored.tobytes())
            rel = f"{IMAGES_DIR}/{site}/{p.patient_id}_{k}.dcm"
            day = 1 + (p.index * 7 + k * 3) % 28
            _write_image(
                out / rel, stored, style, site=site, patient_id=p.patient_id, sex=p.sex,
                age=p.age, view=view, image_number=k + 1, study_date=f"2020{3 + k:02d}{day:02d}",
            )  # fmt: skip
            rows.append(
                {"path": rel, "label": p.label, "site": site, "patient_id": p.patient_id,
                 "view": view, "sex": p.sex, "age": p.age, "split": p.split}
            )  # fmt: skip
        if progress is not None:
            progress(i + 1, len(patients))


def synthesize(
    out_dir: str | Path,
    cfg: SynthConfig | None = None,
    *,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> SynthSummary:
    """Generate the synthetic multi-site chest X-ray set in ``out_dir``.

    Writes the DICOM images, ``manifest.csv`` (last, atomically: its presence means the set is
    complete) and ``synth_config.json``. Refuses a non-empty ``out_dir`` unless ``force`` (which
    replaces a previous synthetic set there). ``progress(done, total)`` is called per patient.
    """
    cfg = cfg or SynthConfig()
    out = Path(out_dir)
    _prepare_out_dir(out, force)
    t0 = time.perf_counter()
    patients = _plan(cfg)
    styles = [site_style(i).faded(cfg.site_style_strength) for i in range(len(cfg.sites))]
    for name in cfg.sites:
        (out / IMAGES_DIR / name).mkdir(parents=True, exist_ok=True)

    rows: list[dict] = []
    pixel_hash = hashlib.sha256()
    with _single_threaded_blas():
        _generate(cfg, out, patients, styles, rows, pixel_hash, progress)

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(MANIFEST_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    manifest_bytes = buf.getvalue().encode()
    manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()

    counts = []
    for split in SPLITS:
        for s, name in enumerate(cfg.sites):
            sel = [r for r in rows if r["split"] == split and r["site"] == name]
            n_pat = sum(1 for p in patients if p.split == split and p.site == s)
            pos = sum(r["label"] for r in sel)
            counts.append(
                SplitSiteCount(split=split, site=name, patients=n_pat, images=len(sel),
                               positive_images=pos, prevalence=pos / len(sel) if sel else 0.0)
            )  # fmt: skip
    from cxrdebias import __version__

    record = {
        "generator": "cxrdebias.data.synthetic_cxr",
        "generator_version": GENERATOR_VERSION,
        "package_version": __version__,
        "seed": cfg.seed,
        "config": cfg.model_dump(mode="json"),
        "pool_prevalence": cfg.pool_prevalence(),
        "site_styles": {name: asdict(st) for name, st in zip(cfg.sites, styles, strict=True)},
        "n_patients": len(patients),
        "n_images": len(rows),
        "counts": [c.model_dump() for c in counts],
        "manifest_sha256": manifest_sha,
        "pixel_sha256": pixel_hash.hexdigest(),
    }
    _atomic_write(out / CONFIG_NAME, (json.dumps(record, indent=2) + "\n").encode())
    _atomic_write(out / MANIFEST_NAME, manifest_bytes)
    seconds = time.perf_counter() - t0
    return SynthSummary(
        out_dir=str(out),
        manifest=str(out / MANIFEST_NAME),
        config_file=str(out / CONFIG_NAME),
        n_patients=len(patients),
        n_images=len(rows),
        counts=counts,
        seconds=round(seconds, 3),
        images_per_second=round(len(rows) / max(seconds, 1e-9), 1),
        manifest_sha256=manifest_sha,
        pixel_sha256=pixel_hash.hexdigest(),
    )


def preview(
    out_dir: str | Path,
    path_png: str | Path,
    *,
    per_group: int = 4,
    tile: int = 128,
    split: str | None = "test",
) -> Path:
    """Write a contact sheet: one row per (site, label), ``per_group`` images of each.

    Images come from ``split`` (all splits when ``None`` or when the split has too few), the
    first ones in manifest order, one per patient. Returns the PNG path.
    """
    from cxrdebias.data.images import read_image

    root = Path(out_dir)
    manifest = root / MANIFEST_NAME
    if not manifest.is_file():
        raise DataError(f"{manifest} not found: run synthesize() first")
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    sites = list(dict.fromkeys(r["site"] for r in rows))
    groups: list[tuple[str, list[dict]]] = []
    for site in sites:
        for label in ("0", "1"):
            chosen: list[dict] = []
            seen: set[str] = set()
            pools = [r for r in rows if split is None or r["split"] == split] + rows
            for r in pools:
                if r["site"] == site and r["label"] == label and r["patient_id"] not in seen:
                    chosen.append(r)
                    seen.add(r["patient_id"])
                if len(chosen) == per_group:
                    break
            groups.append((f"{site} {'COVID+' if label == '1' else 'negative'}", chosen))
    font = ImageFont.load_default_imagefont()
    label_w, gap = 16, 4
    sheet = Image.new("L", (label_w + per_group * (tile + gap) + gap, len(groups) * (tile + 16 + gap)), 40)
    draw = ImageDraw.Draw(sheet)
    for g, (title, chosen) in enumerate(groups):
        y = g * (tile + 16 + gap)
        draw.text((label_w + gap, y + 2), title, font=font, fill=230)
        for c, r in enumerate(chosen):
            d = read_image(root / r["path"]).pixels
            im = Image.fromarray(np.rint(d * 255).astype(np.uint8)).resize((tile, tile), Image.BILINEAR)
            sheet.paste(im, (label_w + gap + c * (tile + gap), y + 14))
    path_png = Path(path_png)
    path_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path_png)
    return path_png


__all__ = [
    "GENERATOR_VERSION",
    "MANIFEST_COLUMNS",
    "SiteStyle",
    "SplitSiteCount",
    "SynthConfig",
    "SynthSummary",
    "preview",
    "site_style",
    "synthesize",
]
