"""Honest small samples: Wilson intervals of the proportions in a per-site report and the cell
sizes behind every value (issue 24).

A site with 5 test negatives reads ``TNR 1.000 [1.000, 1.000]`` under the bootstrap: every
resample of five correct negatives is again five correct negatives. The Wilson score interval
of 5/5 is [0.566, 1.000] — what 5 trials can and cannot say. :func:`wilson_intervals` gives it
(statsmodels' ``proportion_confint(method="wilson")``) for the proportions of a report entry:

- ``prevalence``: positives / images;
- ``tpr``: true positives / positives;
- ``tnr``: true negatives / negatives.

The Wilson interval treats the images as independent trials; with several images per patient
the patient-level bootstrap interval beside it is the one that accounts for the clustering.

:func:`cell_sizes` counts the patients behind each value (positives for TPR, negatives for
TNR, both classes for balanced accuracy and AUROC); :func:`small_cells` says which values rest
on fewer than :data:`SMALL_CELL` of them, which the report tables mark with :data:`SMALL_MARK`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from statsmodels.stats.proportion import proportion_confint

SMALL_CELL = 20
"""A value behind fewer patients than this (images when there are no patient ids) is marked."""

SMALL_MARK = "‡"
"""The mark of a small cell in tables and plots."""

SMALL_LEGEND = (
    f"{SMALL_MARK} n<{SMALL_CELL}: fewer than {SMALL_CELL} patients (images without patient ids) behind the "
    "value — positives for TPR, negatives for TNR, either class for BA and AUROC, all for prevalence; "
    "read it with its interval"
)
"""The legend line of :data:`SMALL_MARK`."""

WILSON_METRICS: dict[str, tuple[str, str]] = {
    "prevalence": ("n_positive", "n"),
    "tpr": ("tp", "n_positive"),
    "tnr": ("tn", "n_negative"),
}
"""The proportions of a report entry: ``metric → (successes key, trials key)``."""


def wilson_interval(successes: int, trials: int, ci: float = 0.95) -> list[float]:
    """The Wilson score interval ``[low, high]`` of ``successes / trials`` at level ``ci``;
    ``[NaN, NaN]`` when there are no trials."""
    if trials <= 0:
        return [math.nan, math.nan]
    low, high = proportion_confint(int(successes), int(trials), alpha=1.0 - ci, method="wilson")
    return [float(low), float(high)]


def cell_sizes(t: np.ndarray, patient_ids: np.ndarray | None) -> dict[str, int]:
    """``n_negative`` (images) and the patients among the positive and the negative images
    (``n_patients_positive``, ``n_patients_negative``; images when ``patient_ids`` is None) of
    one group (``t``: its labels, bool)."""
    t = np.asarray(t, dtype=bool)

    def patients(mask: np.ndarray) -> int:
        return int(mask.sum()) if patient_ids is None else int(np.unique(patient_ids[mask]).size)

    return {"n_negative": int((~t).sum()), "n_patients_positive": patients(t), "n_patients_negative": patients(~t)}


def _counts(entry: Mapping[str, Any]) -> dict[str, int]:
    """The counts of an entry, ``n_negative`` filled in for reports written before it existed."""
    counts = {k: int(entry[k]) for k in ("n", "n_positive", "tp", "tn")}
    counts["n_negative"] = int(entry.get("n_negative", counts["n"] - counts["n_positive"]))
    return counts


def wilson_intervals(entry: Mapping[str, Any], ci: float = 0.95) -> dict[str, list[float]]:
    """``{metric: [low, high]}`` for every proportion of :data:`WILSON_METRICS` of a report entry."""
    counts = _counts(entry)
    return {m: wilson_interval(counts[k], counts[n], ci) for m, (k, n) in WILSON_METRICS.items()}


def fraction(entry: Mapping[str, Any], metric: str) -> str:
    """``"k/n"`` behind a proportion of :data:`WILSON_METRICS` (e.g. ``"5/5"`` for TPR)."""
    counts = _counts(entry)
    k, n = WILSON_METRICS[metric]
    return f"{counts[k]}/{counts[n]}"


def small_cells(entry: Mapping[str, Any], limit: int = SMALL_CELL) -> dict[str, bool]:
    """Which values of a report entry rest on fewer than ``limit`` patients (see the module doc;
    a report written before the per-class patient counts existed falls back to image counts)."""
    counts = _counts(entry)
    pos = int(entry.get("n_patients_positive", counts["n_positive"]))
    neg = int(entry.get("n_patients_negative", counts["n_negative"]))
    both = min(pos, neg) < limit
    return {
        "prevalence": int(entry.get("n_patients", counts["n"])) < limit,
        "tpr": pos < limit,
        "tnr": neg < limit,
        "balanced_accuracy": both,
        "auroc": both,
    }


def mark_small(text: str, small: bool) -> str:
    """``text`` with :data:`SMALL_MARK` appended when ``small``."""
    return f"{text} {SMALL_MARK}" if small else text


def interval_text(interval: Any, digits: int = 3) -> str:
    """``[low, high]`` with ``digits`` decimals; ``n/a`` when missing or undefined (NaN/None)."""
    if interval is None or any(v is None or math.isnan(float(v)) for v in interval):
        return "n/a"
    low, high = (float(v) for v in interval)
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def class_sizes_text(entry: Mapping[str, Any]) -> str:
    """The class sizes of an entry as a table shows them: ``"<positives>+ / <negatives>−"``."""
    counts = _counts(entry)
    return f"{counts['n_positive']}+ / {counts['n_negative']}−"


MIN_THRESHOLD_IMAGES = 50
"""A decision threshold chosen on fewer validation images than this is warned about."""


def threshold_sample_warning(n_images: int, where: str = "validation") -> str | None:
    """The one-line warning for a decision threshold chosen on ``n_images`` images of ``where``
    (None from :data:`MIN_THRESHOLD_IMAGES` images on)."""
    if n_images >= MIN_THRESHOLD_IMAGES:
        return None
    return (
        f"warning: the decision threshold was chosen on only {n_images} {where} images (fewer than "
        f"{MIN_THRESHOLD_IMAGES}); it is uncertain and TPR/TNR at it may not hold on new data: add validation patients"
    )
