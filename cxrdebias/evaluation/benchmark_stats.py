"""Statistics of a benchmark across runs: means with intervals, paired differences, gap closed.

A benchmark *cell* is one trained run: one data seed × one training seed × one recipe. These
functions take one value per cell (NaN where undefined) and return JSON-serialisable dicts.

- :func:`mean_ci`: mean and the 95% Student-t interval over cells (``scipy.stats.t``);
- :func:`paired_difference`: B − A over the cells both have (same data and training seed),
  its t interval and the paired t-test's two-sided p-value (``scipy.stats.ttest_1samp``);
- :func:`gap_closed`: ``(method − vanilla) / (reference − vanilla)`` of the cell means, where the
  *reference* is vanilla trained without the shortcut; its interval is a percentile bootstrap
  over cells resampled jointly for the three recipes (paired), and the denominator is reported
  with its own interval so that a ratio over a gap that is not there can be recognised.

The intervals treat cells as independent draws. With few data seeds the variation between
data sets is estimated from few values: the intervals are then too narrow for "a new data set"
and honest for "this data set, another training seed".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

LEVEL = 0.95
"""Coverage of every interval."""


def _clean(values: Sequence[float]) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    return v[np.isfinite(v)]


def mean_ci(values: Sequence[float], level: float = LEVEL) -> dict[str, Any]:
    """``{"n", "mean", "sd", "ci"}`` of the finite values: the Student-t interval
    ``mean ± t_{(1+level)/2, n−1} · sd / √n`` (sd with ``ddof=1``). With one value the interval is
    ``[nan, nan]``; with none the mean is NaN too."""
    from scipy import stats

    v = _clean(values)
    n = int(v.size)
    if n == 0:
        return {"n": 0, "mean": math.nan, "sd": math.nan, "ci": [math.nan, math.nan]}
    mean = float(v.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "sd": math.nan, "ci": [math.nan, math.nan]}
    sd = float(v.std(ddof=1))
    if sd == 0.0:
        return {"n": n, "mean": mean, "sd": 0.0, "ci": [mean, mean]}
    lo, hi = stats.t.interval(level, n - 1, loc=mean, scale=sd / math.sqrt(n))
    return {"n": n, "mean": mean, "sd": sd, "ci": [float(lo), float(hi)]}


def paired_difference(a: Mapping[Any, float], b: Mapping[Any, float], level: float = LEVEL) -> dict[str, Any]:
    """B − A over the keys (cells) where both are finite: :func:`mean_ci` of the differences,
    the paired t-test's two-sided ``p`` (NaN below 2 pairs) and ``significant`` (the interval
    excludes 0)."""
    from scipy import stats

    keys = [k for k in a if k in b and math.isfinite(a[k]) and math.isfinite(b[k])]
    d = np.array([b[k] - a[k] for k in keys], dtype=np.float64)
    out = mean_ci(d, level)
    p = math.nan
    if d.size >= 2:
        p = 0.0 if out["sd"] == 0.0 and out["mean"] != 0.0 else float(stats.ttest_1samp(d, 0.0).pvalue)
    lo, hi = out["ci"]
    out["p"] = p
    out["significant"] = bool(math.isfinite(lo) and math.isfinite(hi) and (lo > 0 or hi < 0))
    return out


def gap_closed(
    method: Mapping[Any, float],
    vanilla: Mapping[Any, float],
    reference: Mapping[Any, float],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = LEVEL,
) -> dict[str, Any]:
    """Share of the vanilla → reference gap that ``method`` closes, over the cells all three have.

    ``value = (mean(method) − mean(vanilla)) / (mean(reference) − mean(vanilla))``: 0 = no better
    than vanilla, 1 = as good as the model trained without the shortcut, < 0 worse than vanilla.
    ``ci``: percentile interval of the same ratio over ``n_boot`` bootstrap resamples of the
    cells (the three recipes resampled together). ``gap``: :func:`paired_difference` of
    reference − vanilla; when its interval includes 0 there is no measurable gap to close and
    ``note`` says so (the ratio is then not interpretable).
    """
    keys = [
        k for k in method
        if k in vanilla and k in reference and all(math.isfinite(x[k]) for x in (method, vanilla, reference))
    ]  # fmt: skip
    m = np.array([method[k] for k in keys], dtype=np.float64)
    v = np.array([vanilla[k] for k in keys], dtype=np.float64)
    r = np.array([reference[k] for k in keys], dtype=np.float64)
    gap = paired_difference(dict(zip(keys, v, strict=True)), dict(zip(keys, r, strict=True)), level)
    out: dict[str, Any] = {"n": len(keys), "value": math.nan, "ci": [math.nan, math.nan], "gap": gap}
    if not keys:
        out["note"] = "no cell has the method, vanilla and the reference"
        return out
    denom = r.mean() - v.mean()
    if denom != 0.0:
        out["value"] = float((m.mean() - v.mean()) / denom)
    if len(keys) >= 2 and n_boot > 0:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(keys), size=(n_boot, len(keys)))
        num = m[idx].mean(axis=1) - v[idx].mean(axis=1)
        den = r[idx].mean(axis=1) - v[idx].mean(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(den != 0.0, num / den, np.nan)
        ratio = ratio[np.isfinite(ratio)]
        if ratio.size:
            alpha = (1.0 - level) / 2.0
            out["ci"] = [float(np.quantile(ratio, alpha)), float(np.quantile(ratio, 1.0 - alpha))]
    if gap["n"] >= 2 and not gap["significant"]:  # (one cell: no interval at all, nothing to flag)
        out["note"] = "the reference − vanilla gap is not significant: the ratio is not interpretable"
    return out
