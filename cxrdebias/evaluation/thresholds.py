"""Post-hoc per-site decision thresholds: the "recalibrate each hospital" baseline.

A trained CXR model carries one decision threshold, chosen on the pooled validation split with
Youden's J (:func:`~cxrdebias.evaluation.metrics.youden_threshold`). A model that learned the
hospital shifts its scores per hospital, and part of what a debiasing method fixes can also be
fixed after training by choosing one threshold per hospital. :func:`choose_site_thresholds` does
that with the same rule on each training site's own validation images; sites where it cannot
(an external site, never trained or validated on; a site without validation images of both
classes) keep the global threshold. What representation-level debiasing adds is then what it
gains *beyond* this baseline.

:func:`site_threshold_scores` turns the per-site decisions into one score that the per-site
report (:func:`~cxrdebias.evaluation.site_report.site_report`, a single ``threshold``) takes
unchanged: within a site, scores are mapped by the piecewise-linear, increasing map that sends
``0 → 0``, the site's threshold ``t → 0.5`` and ``1 → 1``::

    s < t:  s' = 0.5 · s / t
    s ≥ t:  s' = 0.5 + 0.5 · (s − t) / (1 − t)      (s' = 0.5 when t = 1)

so ``s' ≥ 0.5`` exactly when ``s ≥ t`` (no rounding can flip a decision: ``s/t < 1`` and
``s − t ≥ 0`` hold in floating point), and the order of a site's scores — hence its AUROC and
ROC curve — is unchanged (strictly increasing for the model's float32 probabilities). A shift
of the logit by ``logit(t)`` would do the same for ``0 < t < 1``, but is undefined at the
saturated probabilities (exactly 0 or 1 in float32) a confident model produces, and a Youden
threshold can be one of them. Only the pooled AUROC (the ``overall`` row) changes: it is that of
the per-site recalibrated scores.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from cxrdebias.evaluation.formatting import markdown_cell
from cxrdebias.evaluation.metrics import binary_labels, score_array, youden_threshold

#: the score at which every site's threshold lies after :func:`site_threshold_scores`
DECISION = 0.5

METHOD = "per site: Youden's J (max TPR - FPR) on each training site's validation images"


def choose_site_thresholds(
    y_val: Any,
    s_val: Any,
    val_sites: Any,
    *,
    sites: Iterable[str],
    training_sites: Iterable[str],
    global_threshold: float,
) -> dict[str, dict[str, Any]]:
    """One threshold for each of ``sites`` (the evaluated sites), chosen on the validation
    images ``(y_val, s_val)`` of that site (``val_sites``) with Youden's J.

    Returns ``{site: {"threshold", "source", "n_val", "n_val_positive"}}`` where ``source`` is
    ``"validation"`` (the site's own threshold) or ``"global: <why>"`` — an external site (not
    in ``training_sites``), or a training site without validation images of both classes —
    whose threshold is ``global_threshold``."""
    y = binary_labels(y_val, "y_val")
    s = score_array(s_val, y.shape[0])
    where = np.asarray(val_sites).astype(str).reshape(-1)
    if where.shape[0] != y.shape[0]:
        raise ValueError(f"val_sites: expected {y.shape[0]} sites (one per label), got {where.shape[0]}")
    trained = {str(t) for t in training_sites}
    out: dict[str, dict[str, Any]] = {}
    for site in sorted({str(x) for x in sites}):
        mask = where == site
        n, n_pos = int(mask.sum()), int(y[mask].sum())
        if site not in trained:
            source = "global: external site (not in training)"
        elif n == 0:
            source = "global: no validation images"
        elif n_pos in (0, n):
            source = f"global: validation images of one class only ({n} {'positive' if n_pos else 'negative'})"
        else:
            source = "validation"
        threshold = youden_threshold(y[mask], s[mask]) if source == "validation" else float(global_threshold)
        out[site] = {"threshold": threshold, "source": source, "n_val": n, "n_val_positive": n_pos}
    return out


def site_threshold_scores(scores: Any, sites: Any, thresholds: Mapping[str, float]) -> np.ndarray:
    """``scores`` (probabilities in [0, 1]) mapped within each site so that its threshold
    ``thresholds[site]`` lies at :data:`DECISION` (0.5) — module doc. Every site of ``sites``
    needs a threshold in [0, 1]."""
    where = np.asarray(sites).astype(str).reshape(-1)
    s = score_array(scores, where.shape[0])
    if ((s < 0) | (s > 1)).any():
        raise ValueError("scores: probabilities must lie in [0, 1]")
    t = np.empty_like(s)
    for site in np.unique(where).tolist():
        if site not in thresholds:
            raise ValueError(f"no threshold for site {site!r}")
        value = float(thresholds[site])
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"threshold of site {site!r}: {value} is not in [0, 1]")
        t[where == site] = value
    out = np.empty_like(s)
    low = s < t
    out[low] = DECISION * (s[low] / t[low])
    high = ~low
    span = 1.0 - t[high]
    with np.errstate(divide="ignore", invalid="ignore"):
        out[high] = np.where(span > 0, DECISION + (1.0 - DECISION) * (s[high] - t[high]) / span, DECISION)
    return out


def site_thresholds_markdown(section: Mapping[str, Any], digits: int = 3) -> list[str]:
    """The report section of ``report["site_thresholds"]`` as Markdown lines."""
    lines = [
        "## Per-site thresholds (post hoc)",
        "",
        f"{section['method']}; the model's global threshold ({section['global_threshold']:.{digits + 1}g}) where a site has no "
        "threshold of its own. Each site's scores are mapped so that its threshold lies at 0.5 (increasing within a site: "
        "per-site AUROC unchanged; the overall AUROC is that of the mapped scores).",
        "",
        "| site | threshold | chosen on | validation images (positive) |",
        "|---|---:|---|---:|",
    ]
    for site, entry in section["by_site"].items():
        lines.append(
            f"| {markdown_cell(site)} | {entry['threshold']:.{digits + 1}g} | {entry['source']} | "
            f"{entry['n_val']} ({entry['n_val_positive']}) |"
        )
    return lines
