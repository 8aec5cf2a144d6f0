"""Out-of-distribution scores of a classifier's images: how far an image lies from the training data.

- ``mahalanobis`` (Lee et al., NeurIPS 2018): class-conditional Gaussians of a layer's
  features (the exported guard: a pooled intermediate layer, :mod:`cxrdebias.deploy.guard`) with one shared covariance, estimated on the training split —
  ``μ_k`` = mean feature of class ``k``, ``Σ`` = Ledoit–Wolf estimate (``sklearn.covariance.LedoitWolf``,
  ``assume_centered=True``) of the class-centred features; the score is
  ``min_k sqrt((z − μ_k)ᵀ Σ⁻¹ (z − μ_k))``.
- ``energy`` (Liu et al., NeurIPS 2020): ``−logsumexp(logits)`` of the unscaled logits.

Higher = further from the training data. The flagging threshold is a percentile of the scores of
held-out in-distribution (validation) images (:func:`percentile_threshold`, 99th by default):
about 1% of in-distribution images are flagged by construction. :class:`MahalanobisStats` also
carries the whitening matrix ``W`` (``W Wᵀ = Σ⁻¹``) that the exported graph uses
(:mod:`cxrdebias.deploy.guard`); :func:`mahalanobis_scores` is the sklearn reference it is
checked against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import logsumexp
from sklearn.covariance import LedoitWolf

METHODS = ("mahalanobis", "energy")
DEFAULT_METHOD = "mahalanobis"
DEFAULT_PERCENTILE = 99.0
DESCRIPTIONS = {
    "mahalanobis": "Mahalanobis distance of the features to the nearest class mean of the training split "
    "(shared Ledoit-Wolf covariance): min_k sqrt((f - mu_k)^T Sigma^-1 (f - mu_k))",
    "energy": "energy score -logsumexp(logits) of the unscaled logits",
}


@dataclass(frozen=True)
class MahalanobisStats:
    """Class means (K×D), the fitted shared-covariance estimator, the whitening ``W`` (D×D,
    ``W Wᵀ = Σ⁻¹``), the training counts per class and the Ledoit–Wolf shrinkage."""

    means: np.ndarray
    estimator: LedoitWolf
    whitening: np.ndarray
    counts: list[int]
    shrinkage: float


def fit_mahalanobis(features: Any, labels: Any) -> MahalanobisStats:
    """Class means and the shared Ledoit–Wolf covariance of ``features`` (N×D) by ``labels``."""
    z = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(int)
    classes = np.unique(y)
    if z.ndim != 2 or len(z) != len(y) or len(classes) < 1:
        raise ValueError(f"fit_mahalanobis: need N×D features and N labels, got {z.shape} and {y.shape}")
    k = int(classes.max()) + 1
    means = np.zeros((k, z.shape[1]))
    counts = [0] * k
    for c in classes:
        means[c] = z[y == c].mean(axis=0)
        counts[c] = int((y == c).sum())
    present = np.array([counts[c] > 0 for c in range(k)])
    lw = LedoitWolf(assume_centered=True).fit(z - means[y])
    w, v = np.linalg.eigh(lw.precision_)
    whitening = v * np.sqrt(np.clip(w, 0.0, None))  # (z W)·(z W) = z Σ⁻¹ zᵀ
    return MahalanobisStats(means[present], lw, whitening, [counts[c] for c in range(k) if present[c]], float(lw.shrinkage_))


def mahalanobis_scores(features: Any, stats: MahalanobisStats) -> np.ndarray:
    """``min_k`` Mahalanobis distance of each row of ``features`` to the class means (sklearn's
    ``EmpiricalCovariance.mahalanobis``: the reference the exported graph is checked against)."""
    z = np.asarray(features, dtype=np.float64)
    sq = np.stack([stats.estimator.mahalanobis(z - mu) for mu in stats.means], axis=1)
    return np.sqrt(np.clip(sq.min(axis=1), 0.0, None))


def energy_scores(logits: Any) -> np.ndarray:
    """``−logsumexp(logits)`` per row (higher = further from the training data)."""
    return -logsumexp(np.asarray(logits, dtype=np.float64), axis=1)


def percentile_threshold(scores: Any, percentile: float = DEFAULT_PERCENTILE) -> float:
    """The ``percentile``-th percentile of in-distribution ``scores`` (linear interpolation)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0 or not np.isfinite(s).all():
        raise ValueError("percentile_threshold: need finite scores")
    return float(np.percentile(s, percentile))


__all__ = [
    "DEFAULT_METHOD",
    "DEFAULT_PERCENTILE",
    "DESCRIPTIONS",
    "METHODS",
    "MahalanobisStats",
    "energy_scores",
    "fit_mahalanobis",
    "mahalanobis_scores",
    "percentile_threshold",
]
