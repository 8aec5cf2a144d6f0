"""Small numeric helpers of the generator (float32, vectorised): soft edges, smooth random
fields, Gaussian blur, correlated grain and the normalised image grid."""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic sigmoid as ``0.5 + 0.5·tanh(x/2)`` (float32 in, float32 out)."""
    y = np.tanh(x * np.float32(0.5))
    y *= np.float32(0.5)
    y += np.float32(0.5)
    return y


def ramp(x: np.ndarray) -> np.ndarray:
    """Piecewise-linear sigmoid (same slope at 0): a cheap soft edge."""
    y = x * np.float32(0.25)
    y += np.float32(0.5)
    return np.clip(y, 0, 1, out=y)


def sq(x: np.ndarray) -> np.ndarray:
    """``x²``."""
    return x * x


@lru_cache(maxsize=64)
def coarse_basis(n: int, cells: int) -> np.ndarray:
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
def grain_bank(n: int, sigma_px: float) -> np.ndarray:
    """A fixed ``2n × 2n`` unit-variance correlated noise field; images use random crops of it.

    Cropping (plus flips) is much cheaper than drawing and blurring fresh noise per image and
    statistically the same for a classifier. Fixed seed: the bank is part of the generator.
    """
    white = np.random.default_rng(20200301).standard_normal((2 * n, 2 * n), dtype=np.float32)
    bank = blur(white, sigma_px)
    bank /= np.float32(bank.std())
    bank.flags.writeable = False
    return bank


def blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur of a square image (reflected borders); ``sigma_px < 0.3`` returns ``img``."""
    if sigma_px < 0.3:
        return img
    k = _blur_matrix(img.shape[0], round(float(sigma_px), 2))
    return k @ img @ k.T


@lru_cache(maxsize=8)
def base_grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Read-only ``n×n`` normalised coordinates ``(u, v)`` of the pixel centres, both in ``[-1, 1]``."""
    c = ((np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1).astype(np.float32)
    u = np.broadcast_to(c[None, :], (n, n))
    v = np.broadcast_to(c[:, None], (n, n))
    return u, v


def segment_distance(u, v, p0, p1) -> np.ndarray:
    """Distance of the points ``(u, v)`` to the segment ``p0``–``p1``."""
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((u - x0) * dx + (v - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return np.sqrt((u - x0 - t * dx) ** 2 + (v - y0 - t * dy) ** 2)


