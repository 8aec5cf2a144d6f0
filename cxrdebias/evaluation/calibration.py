"""Calibration of a binary classifier: ECE, Brier score, temperature scaling, reliability diagram.

- :func:`expected_calibration_error`: the binary (positive-class) ECE over :data:`N_BINS`
  equal-width bins of the positive-class probability on ``[0, 1]`` (the last bin includes 1):
  ``ECE = Σ_b (n_b / N) · |mean(y)_b − mean(p)_b|`` over the non-empty bins (:data:`BINNING`).
- :func:`brier_score`: ``mean((p − y)²)`` (``sklearn.metrics.brier_score_loss``).
- :func:`fit_temperature`: the ``T > 0`` minimising the negative log-likelihood of
  ``softmax(logits / T)`` on labelled (validation) logits (Guo et al., ICML 2017), found by
  ``scipy.optimize.minimize_scalar`` on ``log T``.
- :func:`calibration_report`: ECE and Brier overall and per site, before (``T = 1``) and after
  temperature scaling; :func:`calibration_markdown` and :func:`plot_reliability` write it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.metrics import brier_score_loss

from cxrdebias.fileio import write_png_atomic

N_BINS = 10
BINNING = (
    f"{N_BINS} equal-width bins of the positive-class probability on [0, 1] (last bin closed); "
    "ECE = Σ_bins (n_bin / n) · |fraction positive − mean probability|"
)
#: ``log T`` is searched in ``[-LOG_T_BOUND, LOG_T_BOUND]``
LOG_T_BOUND = 5.0
OVERALL = "overall"
#: the reliability diagram's file name in an evaluation folder
CALIBRATION_PNG = "calibration.png"


def _arrays(y_true: Any, p_pos: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(int).reshape(-1)
    p = np.asarray(p_pos, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"labels and probabilities differ in length ({y.size} vs {p.size})")
    if p.size and (p.min() < 0 or p.max() > 1):
        raise ValueError("probabilities must lie in [0, 1]")
    return y, p


def reliability_bins(y_true: Any, p_pos: Any, n_bins: int = N_BINS) -> dict[str, np.ndarray]:
    """Per equal-width bin: ``count``, ``mean_probability``, ``fraction_positive`` (NaN when empty)."""
    y, p = _arrays(y_true, p_pos)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.searchsorted(edges[1:-1], p, side="right")  # p == 1 falls into the last bin
    count = np.bincount(idx, minlength=n_bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(idx, weights=p, minlength=n_bins) / count
        frac = np.bincount(idx, weights=y, minlength=n_bins) / count
    return {"edges": edges, "count": count, "mean_probability": mean_p, "fraction_positive": frac}


def expected_calibration_error(y_true: Any, p_pos: Any, n_bins: int = N_BINS) -> float:
    """Binary ECE of the positive-class probability (see the module doc); NaN for no samples."""
    bins = reliability_bins(y_true, p_pos, n_bins)
    n = bins["count"].sum()
    if n == 0:
        return float("nan")
    full = bins["count"] > 0
    gap = np.abs(bins["fraction_positive"][full] - bins["mean_probability"][full])
    return float((bins["count"][full] / n * gap).sum())


def brier_score(y_true: Any, p_pos: Any) -> float:
    """Mean squared difference between the positive-class probability and the 0/1 label."""
    y, p = _arrays(y_true, p_pos)
    if y.size == 0:
        return float("nan")
    return float(brier_score_loss(y, p, pos_label=1))


def nll(logits: Any, y_true: Any, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``softmax(logits / temperature)`` at the labels."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y_true).astype(int)
    return float(-log_softmax(z / temperature, axis=1)[np.arange(len(y)), y].mean())


def fit_temperature(logits: Any, y_true: Any) -> float:
    """Temperature scaling: ``argmin_T NLL(softmax(logits / T))`` over ``log T`` in
    ``[-LOG_T_BOUND, LOG_T_BOUND]`` (bounded Brent search). ``T > 1`` softens over-confident
    probabilities; the ranking (AUROC) and any threshold's decisions do not change."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y_true).astype(int)
    if z.ndim != 2 or len(z) != len(y) or len(y) == 0:
        raise ValueError(f"fit_temperature: need N×K logits and N labels, got {z.shape} and {y.shape}")
    res = minimize_scalar(lambda log_t: nll(z, y, float(np.exp(log_t))), bounds=(-LOG_T_BOUND, LOG_T_BOUND), method="bounded",
                          options={"xatol": 1e-6})
    return float(np.exp(res.x))


def temperature_warning(temperature: float, n: int | None = None) -> str | None:
    """Why a fitted ``temperature`` should not be trusted, or ``None``: at the edge of the search
    (``e^±LOG_T_BOUND``) the validation NLL kept falling all the way there, i.e. on those ``n``
    images the model's scores carry no usable likelihood (T → ∞ flattens every probability to
    1/K; T → 0 makes them 0 or 1)."""
    log_t = float(np.log(temperature))
    if abs(log_t) < LOG_T_BOUND - 1e-3:
        return None
    side = "flattens every probability towards 0.5" if log_t > 0 else "pushes every probability to 0 or 1"
    return (f"T = {temperature:.4g} is at the edge of the search (e^{'+' if log_t > 0 else '-'}{LOG_T_BOUND:g}): the validation "
            f"split{f' ({n} images)' if n else ''} gives no usable calibration and this T {side}; do not read the probabilities as confidences")


def scaled_positive(logits: Any, temperature: float, positive_index: int = 1) -> np.ndarray:
    """Positive-class probability of ``softmax(logits / temperature)``."""
    return softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)[:, positive_index]


def threshold_at_temperature(threshold: float, temperature: float) -> float:
    """The threshold on ``softmax(logits / T)`` (two classes) that makes the same decisions as
    ``threshold`` on ``softmax(logits)``: ``p = σ(d)`` ↦ ``σ(d / T)`` with ``d = logit(p)``."""
    d = np.log(threshold) - np.log1p(-threshold)
    return float(1.0 / (1.0 + np.exp(-d / temperature)))


def _entry(y: np.ndarray, before: np.ndarray, after: np.ndarray) -> dict[str, Any]:
    return {
        "n": int(y.size),
        "before": {"ece": expected_calibration_error(y, before), "brier": brier_score(y, before)},
        "after": {"ece": expected_calibration_error(y, after), "brier": brier_score(y, after)},
    }


def calibration_report(
    y_true: Any, logits: Any, sites: Any, temperature: float, *, fitted_on: str = "validation split", n_fit: int | None = None
) -> dict[str, Any]:
    """ECE and Brier score overall and per site, before (``T = 1``) and after temperature scaling."""
    y = np.asarray(y_true).astype(int)
    site = np.array([str(s) for s in np.asarray(sites).reshape(-1)])
    before, after = scaled_positive(logits, 1.0), scaled_positive(logits, temperature)
    by_site = {s: _entry(y[site == s], before[site == s], after[site == s]) for s in sorted(set(site.tolist()))}
    return {
        "temperature": float(temperature),
        **({"warning": warning} if (warning := temperature_warning(temperature, n_fit)) else {}),
        "fitted_on": fitted_on,
        "binning": BINNING,
        "by_site": by_site,
        OVERALL: _entry(y, before, after),
    }


def _fmt(x: Any) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.3f}"


def calibration_markdown(cal: Mapping[str, Any], external: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """The report's calibration section (lines of Markdown)."""
    if "absent" in cal:
        return ["## Calibration", "", f"- not computed: {cal['absent']}"]
    lines = [
        f"## Calibration (temperature T = {cal['temperature']:.3f}, fitted on the {cal['fitted_on']})",
        "",
        "| site | n | ECE before | ECE after | Brier before | Brier after |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    rows = [*cal["by_site"].items(), (OVERALL, cal[OVERALL])]
    for site, e in rows:
        name = f"{site} (external)" if site in external else site
        cells = [name, str(e["n"]), _fmt(e["before"]["ece"]), _fmt(e["after"]["ece"]), _fmt(e["before"]["brier"]), _fmt(e["after"]["brier"])]
        if site == OVERALL:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"- ECE binning: {cal['binning']}; reliability diagram: {CALIBRATION_PNG}"]
    if cal.get("warning"):
        lines.append(f"- **warning**: {cal['warning']}")
    return lines


def plot_reliability(y_true: Any, logits: Any, sites: Any, temperature: float, path_png: str | Path, *, title: str | None = None,
                     dpi: int = 110) -> Path:
    """Reliability diagrams (fraction positive vs mean probability per bin, marker size ~ count),
    one panel per site and one for all images, before and after temperature scaling."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    y = np.asarray(y_true).astype(int)
    site = np.array([str(s) for s in np.asarray(sites).reshape(-1)])
    before, after = scaled_positive(logits, 1.0), scaled_positive(logits, temperature)
    panels = [*sorted(set(site.tolist())), OVERALL]
    fig = Figure(figsize=(3.4 * len(panels), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    for k, name in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        mask = np.ones_like(y, dtype=bool) if name == OVERALL else site == name
        ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--")
        for p, label, color in ((before, "before", "tab:red"), (after, f"after (T={temperature:.2f})", "tab:blue")):
            b = reliability_bins(y[mask], p[mask])
            full = b["count"] > 0
            ece = expected_calibration_error(y[mask], p[mask])
            ax.plot(b["mean_probability"][full], b["fraction_positive"][full], "-o", color=color, lw=1.2,
                    ms=3, label=f"{label}: ECE {_fmt(ece)}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("mean predicted probability")
        if k == 0:
            ax.set_ylabel("fraction positive")
        ax.set_title(f"{name} (n={int(mask.sum())})")
        ax.legend(loc="upper left", fontsize="x-small")
    if title:
        fig.suptitle(title)
    return write_png_atomic(fig, path_png, dpi)


__all__ = [
    "BINNING",
    "CALIBRATION_PNG",
    "N_BINS",
    "brier_score",
    "calibration_markdown",
    "calibration_report",
    "expected_calibration_error",
    "fit_temperature",
    "temperature_warning",
    "nll",
    "plot_reliability",
    "reliability_bins",
    "scaled_positive",
    "threshold_at_temperature",
]
