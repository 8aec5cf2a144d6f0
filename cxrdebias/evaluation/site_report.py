"""Per-site (per-institution) evaluation of a binary classifier with a patient-level bootstrap.

The COVID-19 chest X-ray application: the hospital a radiograph comes from is the bias, so a
model is judged site by site. :func:`site_report` is assembled from

- the per-site data in canonical order (:class:`SiteSample`, :func:`split_by_site`);
- the point estimates of one group of samples (:func:`point_entry`: counts, rates, AUROC);
- the summaries across sites (:func:`site_summaries`, :func:`worst_site`,
  :func:`equalized_odds_gap`);
- the bootstrap (:func:`bootstrap_samples`) and its percentile intervals (:func:`attach_ci`).

The metric definitions (TPR, TNR, balanced accuracy, AUROC) are in
:mod:`cxrdebias.evaluation.metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cxrdebias.evaluation.metrics import (
    as_numpy,
    auroc,
    binary_counts,
    binary_labels,
    binary_rates,
    safe_divide,
    score_array,
)
from cxrdebias.evaluation.proportions import cell_sizes, wilson_intervals

SITE_METRICS: tuple[str, ...] = ("prevalence", "tpr", "tnr", "balanced_accuracy", "auroc")
"""Metrics of a :func:`site_report` entry that carry a bootstrap interval."""

SUMMARY_METRICS: tuple[str, ...] = ("tpr", "tnr", "balanced_accuracy", "auroc")
"""Metrics summarised across sites (``group_min``, ``group_max``, ``difference``)."""

SUMMARIES: tuple[str, ...] = ("group_min", "group_max", "difference")
"""The summaries across sites, each a ``{metric: value}`` for :data:`SUMMARY_METRICS`."""

_RATE_METRICS = ("prevalence", "tpr", "tnr", "balanced_accuracy")
"""The metrics of :data:`SITE_METRICS` that follow from the confusion counts alone."""

_MAX_BOOT_CELLS = 4_000_000
"""Bootstrap resamples are drawn in chunks of at most this many (resample × sample) weights."""


# -- AUROC on weighted (resampled) data ---------------------------------------------------------


def weighted_auroc(y_sorted: np.ndarray, level_starts: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUROC for each row of sample weights ``w`` (B × N), samples sorted by ascending score.

    ``level_starts`` are the indices where a new distinct score begins. With integer weights
    (bootstrap multiplicities) this is exactly ``roc_auc_score`` on the resampled data:
    Σ_levels pos_k · (neg_below_k + ½ neg_k) / (Σ pos · Σ neg). NaN when a row lacks a class.
    """
    pos = np.add.reduceat(w * y_sorted, level_starts, axis=1)
    neg = np.add.reduceat(w * ~y_sorted, level_starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    num = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    return safe_divide(num, pos.sum(axis=1) * neg.sum(axis=1))


def score_levels(score_sorted: np.ndarray) -> np.ndarray:
    """Indices where a new distinct score begins in the ascending ``score_sorted`` (the
    ``level_starts`` of :func:`weighted_auroc`); empty for an empty input."""
    if score_sorted.size == 0:
        return np.zeros(0, dtype=np.intp)
    return np.flatnonzero(np.r_[True, score_sorted[1:] != score_sorted[:-1]])


# -- the per-site data ---------------------------------------------------------------------------


class SiteSample:
    """One site's data in canonical order, reduced to what the bootstrap needs.

    ``t``, ``s``, ``pred``: the site's labels (bool), scores and predictions; ``pid``: its
    patient ids, or None when every image is its own patient.
    """

    def __init__(self, t: np.ndarray, s: np.ndarray, pred: np.ndarray, pid: np.ndarray | None):
        if pid is None:
            # Each image is its own patient; order images by (label, score) so the patient
            # numbering — hence the resamples — does not depend on the input order.
            order = np.lexsort((s, t))
            patient = np.empty(t.size, dtype=np.intp)
            patient[order] = np.arange(t.size)
            n_patients = t.size
        else:
            _, patient = np.unique(pid, return_inverse=True)  # sorted ids: order-free
            patient = patient.reshape(-1)
            n_patients = int(patient.max()) + 1
        self.n_patients = n_patients
        # per-patient confusion counts (P × 4: tp, fp, tn, fn)
        cols = (t & pred, ~t & pred, ~t & ~pred, t & ~pred)
        self.patient_counts = np.stack(
            [np.bincount(patient, weights=c, minlength=n_patients) for c in cols], axis=1
        )
        by_score = np.argsort(s, kind="stable")
        self.t_sorted = t[by_score]
        self.s_sorted = s[by_score]
        self.patient_sorted = patient[by_score]
        self.levels = score_levels(self.s_sorted)

    def multiplicities(self, rng: np.random.Generator, b: int) -> np.ndarray:
        """B × P counts of how often each patient is drawn (P draws with replacement)."""
        p = self.n_patients
        idx = rng.integers(0, p, size=(b, p))
        flat = (idx + (np.arange(b) * p)[:, None]).ravel()
        return np.bincount(flat, minlength=b * p).reshape(b, p).astype(np.float64)


@dataclass
class _Inputs:
    """The validated arguments of :func:`site_report`."""

    t: np.ndarray  # labels, bool
    s: np.ndarray  # scores, float64
    sites: np.ndarray
    patient_ids: np.ndarray | None
    threshold: float
    n_boot: int


def _validate(
    y_true: Any, y_score: Any, sites: Any, patient_ids: Any, threshold: float, n_boot: int, ci: float
) -> _Inputs:
    t = binary_labels(y_true, "y_true")
    n = t.shape[0]
    if n == 0:
        raise ValueError("site_report: no samples")
    s = score_array(y_score, n)
    if (site_arr := as_numpy(sites).reshape(-1)).shape[0] != n:
        raise ValueError(f"sites: expected {n} site labels, got {site_arr.shape[0]}")
    pid_arr = None
    if patient_ids is not None:
        if (pid_arr := as_numpy(patient_ids).reshape(-1)).shape[0] != n:
            raise ValueError(f"patient_ids: expected {n} ids, got {pid_arr.shape[0]}")
    threshold = float(threshold)
    if np.isnan(threshold):
        raise ValueError("threshold is NaN")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must lie in (0, 1), got {ci}")
    n_boot = int(n_boot)
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    return _Inputs(t, s, site_arr, pid_arr, threshold, n_boot)


def split_by_site(
    t: np.ndarray, s: np.ndarray, pred: np.ndarray, sites: np.ndarray, patient_ids: np.ndarray | None
) -> tuple[list[str], list[np.ndarray], list[SiteSample]]:
    """Site names (``str`` of the sorted distinct labels), each site's sample indices and its
    :class:`SiteSample`; raises ``ValueError`` when two distinct labels print the same."""
    site_values, site_index = np.unique(sites, return_inverse=True)
    site_index = site_index.reshape(-1)
    names = [str(v.item() if hasattr(v, "item") else v) for v in site_values]
    if len(set(names)) != len(names):
        raise ValueError(f"sites: distinct site labels print the same: {names}")
    members = [np.flatnonzero(site_index == k) for k in range(len(names))]
    site_data = [
        SiteSample(t[m], s[m], pred[m], None if patient_ids is None else patient_ids[m]) for m in members
    ]
    return names, members, site_data


# -- point estimates -----------------------------------------------------------------------------


def point_entry(t: np.ndarray, s: np.ndarray, pred: np.ndarray, pid: np.ndarray | None, ci: float = 0.95) -> dict[str, Any]:
    """Counts, rates, AUROC, cell sizes and Wilson intervals of one group of samples (a site, or
    all; ``pid``: their patient ids or None) (:mod:`cxrdebias.evaluation.proportions`)."""
    c = binary_counts(t, pred)
    r = binary_rates(*c)
    entry = {
        "n": int(t.size),
        "n_patients": int(t.size if pid is None else np.unique(pid).size),
        "n_positive": c.tp + c.fn,
        **cell_sizes(t, pid),
        "prevalence": float(r["prevalence"]),
        "tp": c.tp,
        "fp": c.fp,
        "tn": c.tn,
        "fn": c.fn,
        "tpr": float(r["tpr"]),
        "tnr": float(r["tnr"]),
        "balanced_accuracy": float(r["balanced_accuracy"]),
        "auroc": auroc(t, s),
    }
    return entry | {"wilson": wilson_intervals(entry, ci)}


# -- summaries across sites ----------------------------------------------------------------------


def _gap(values: np.ndarray, defined: np.ndarray) -> np.ndarray:
    """max − min over the columns ``defined`` of ``values`` (… × S); NaN where any is NaN."""
    if not defined.any():
        return np.full(values.shape[:-1], np.nan)
    v = values[..., defined]
    return v.max(axis=-1) - v.min(axis=-1)  # NaN propagates through max/min


def _group_min_max(values: np.ndarray, defined: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not defined.any():
        return np.full(values.shape[:-1], np.nan), np.full(values.shape[:-1], np.nan)
    v = values[..., defined]
    return v.min(axis=-1), v.max(axis=-1)


def site_summaries(
    values: dict[str, np.ndarray], defined: dict[str, np.ndarray]
) -> dict[str, dict[str, np.ndarray]]:
    """``group_min``, ``group_max`` and ``difference`` of every metric of :data:`SUMMARY_METRICS`
    over the sites where its point estimate is defined; ``values[m]`` is … × S (one column per
    site: the point estimates, or B × S bootstrap resamples)."""
    out: dict[str, dict[str, np.ndarray]] = {key: {} for key in SUMMARIES}
    for m in SUMMARY_METRICS:
        lo, hi = _group_min_max(values[m], defined[m])
        out["group_min"][m], out["group_max"][m] = lo, hi
        out["difference"][m] = _gap(values[m], defined[m])
    return out


def worst_site(names: list[str], balanced_acc: np.ndarray, defined: np.ndarray) -> dict[str, Any]:
    """The defined site with the lowest balanced accuracy (ties → first site in sorted order)."""
    if not defined.any():
        return {"site": None, "balanced_accuracy": float("nan")}
    ba = np.where(defined, balanced_acc, np.inf)
    k = int(np.argmin(ba))  # first minimum
    return {"site": names[k], "balanced_accuracy": float(balanced_acc[k])}


def equalized_odds_gap(
    tpr: np.ndarray, fpr: np.ndarray, defined: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """The TPR and FPR gaps across sites (max − min over the sites where each rate's point
    estimate is defined) of ``tpr``/``fpr`` (… × S)."""
    return _gap(tpr, defined["tpr"]), _gap(fpr, defined["fpr"])


# -- bootstrap -----------------------------------------------------------------------------------


def bootstrap_samples(
    site_data: list[SiteSample], n_boot: int, seed: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``n_boot`` site-stratified, patient-clustered resamples (see :func:`site_report`).

    Returns ``(by_site, overall)``: ``by_site[m]`` is B × S for every metric of
    :data:`SITE_METRICS` and ``"fpr"``, ``overall[m]`` has B values for :data:`SITE_METRICS`;
    NaN where a resample leaves the metric undefined. One independent random stream per site
    (spawned from ``seed`` in site order); resamples are drawn in chunks to bound memory.
    """
    n_sites = len(site_data)
    by_site = {m: np.full((n_boot, n_sites), np.nan) for m in (*SITE_METRICS, "fpr")}
    overall = {m: np.full(n_boot, np.nan) for m in SITE_METRICS}
    if not n_boot:
        return by_site, overall
    rngs = [np.random.default_rng(ss) for ss in np.random.SeedSequence(seed).spawn(n_sites)]
    all_t = np.concatenate([sd.t_sorted for sd in site_data])
    all_s = np.concatenate([sd.s_sorted for sd in site_data])
    overall_order = np.argsort(all_s, kind="stable")
    all_t_sorted = all_t[overall_order]
    overall_levels = score_levels(all_s[overall_order])
    n = all_t.size
    chunk = max(1, min(n_boot, _MAX_BOOT_CELLS // max(n, 1)))  # bounds memory to ~B·N floats
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        rows = slice(start, start + b)
        counts = np.zeros((b, n_sites, 4))
        weights = []
        for k, (sd, rng) in enumerate(zip(site_data, rngs, strict=True)):
            mult = sd.multiplicities(rng, b)
            counts[:, k] = mult @ sd.patient_counts
            w = mult[:, sd.patient_sorted]
            weights.append(w)
            by_site["auroc"][rows, k] = weighted_auroc(sd.t_sorted, sd.levels, w)
        r = binary_rates(*np.moveaxis(counts, -1, 0))
        for m in (*_RATE_METRICS, "fpr"):
            by_site[m][rows] = r[m]
        ro = binary_rates(*np.moveaxis(counts.sum(axis=1), -1, 0))
        for m in _RATE_METRICS:
            overall[m][rows] = ro[m]
        w_all = np.concatenate(weights, axis=1)[:, overall_order]
        overall["auroc"][rows] = weighted_auroc(all_t_sorted, overall_levels, w_all)
    return by_site, overall


def percentile_ci(samples: np.ndarray, ci: float) -> tuple[list[float], int]:
    """Percentile interval ``[(1−ci)/2, (1+ci)/2]`` of the non-NaN ``samples`` and how many
    there were (``[NaN, NaN]``, 0 when none)."""
    n_valid = int(np.count_nonzero(~np.isnan(samples)))
    if n_valid == 0:
        return [float("nan"), float("nan")], 0
    lo, hi = np.nanpercentile(samples, [50.0 * (1.0 - ci), 50.0 * (1.0 + ci)])
    return [float(lo), float(hi)], n_valid


def attach_ci(
    target: dict[str, Any], samples: dict[str, np.ndarray], metrics: tuple[str, ...], ci: float
) -> None:
    """Add ``ci`` (``{metric: [low, high]}``) and ``n_valid_boot`` (``{metric: int}``) to ``target``."""
    target["ci"], target["n_valid_boot"] = {}, {}
    for m in metrics:
        target["ci"][m], target["n_valid_boot"][m] = percentile_ci(samples[m], ci)


def _bootstrap_description(n_boot: int, ci: float, seed: int, unit: str) -> dict[str, Any]:
    return {
        "n_boot": n_boot,
        "ci": float(ci),
        "seed": int(seed),
        "unit": unit,
        "method": "percentile",
        "resampling": (
            f"{unit}s resampled with replacement within each site (stratified by site"
            + (", all images of a drawn patient kept together" if unit == "patient" else "")
            + "); scores and threshold fixed; undefined resamples excluded"
        ),
    }


# -- the report ----------------------------------------------------------------------------------


def site_report(
    y_true: Any,
    y_score: Any,
    sites: Any,
    *,
    threshold: float,
    patient_ids: Any = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    external: Any = (),
) -> dict[str, Any]:
    """Per-site (per-institution) and overall evaluation of a binary classifier with bootstrap CIs.

    Predictions are ``y_score >= threshold`` (choose ``threshold`` on validation data, e.g. with
    :func:`~cxrdebias.evaluation.metrics.youden_threshold`). For every site and for all samples
    together the report gives ``n`` (images), ``n_patients``, ``n_positive``, ``prevalence``,
    ``tp/fp/tn/fn``, ``tpr`` (sensitivity), ``tnr`` (specificity), ``balanced_accuracy``
    ((TPR + TNR)/2), ``auroc``, ``n_negative``, ``n_patients_positive/negative`` and ``wilson``
    (prevalence, TPR, TNR: :mod:`cxrdebias.evaluation.proportions`); see :func:`~cxrdebias.evaluation.metrics.binary_rates` and
    :func:`~cxrdebias.evaluation.metrics.auroc` for the definitions and when they are NaN.

    **Bootstrap (what is resampled).** Stratified by site, clustered by patient: in each of the
    ``n_boot`` resamples, every site's patients are drawn with replacement, as many draws as the
    site has patients, and every image of a drawn patient enters the resample once per draw.
    Site sizes in patients are thus fixed, and the overall resample is the union of the site
    resamples (the site mix is held fixed). When ``patient_ids`` is None every image is its
    own patient (ordinary image-level bootstrap). A patient whose images span two sites is
    resampled separately in each (and counted once in the overall ``n_patients``). Scores and the threshold are fixed (the threshold is not
    re-estimated). Intervals are percentile intervals ``[(1−ci)/2, (1+ci)/2]`` of the
    resampled statistic; resamples where a statistic is undefined (e.g. a site drawn without
    positives for TPR/AUROC) are NaN and excluded (``nanpercentile``), and ``n_valid_boot``
    says how many remained. A summary across sites is computed in a resample only if every
    site entering its point estimate is defined there. The resamples are fully determined by
    ``seed`` (one independent stream per site, in sorted site order) and do not depend on the
    order of the samples.

    **Summaries** (fairlearn ``MetricFrame`` names): ``group_min``, ``group_max`` and
    ``difference`` (max − min across sites) of TPR, TNR, balanced accuracy and AUROC, over the
    sites where the metric is defined; ``worst_site`` (lowest balanced accuracy, ties → first
    site in sorted order); ``equalized_odds_difference`` as in
    ``fairlearn.metrics.equalized_odds_difference``: max(difference of TPR, difference of FPR)
    across sites (Hardt et al., 2016 for equalized odds), each difference over the sites where
    that rate is defined. **External sites** (``external``: not in training) are listed in
    ``external_sites``, flagged ``"external": true`` in ``by_group``, pooled in ``overall`` but
    left out of the summaries (unless every site is external).

    Returns a JSON-serialisable dict (NaN for undefined values) with keys ``threshold``,
    ``positive_if``, ``bootstrap``, ``sites``, ``metrics``, ``overall``, ``by_group``,
    ``group_min``, ``group_max``, ``difference``, ``worst_site`` and
    ``equalized_odds_difference``. Each ``overall``/``by_group[site]`` entry holds the values,
    ``ci`` (``{metric: [low, high]}``) and ``n_valid_boot`` (``{metric: int}``) for the metrics
    in :data:`SITE_METRICS`; ``group_min``/``group_max``/``difference`` hold the same for
    :data:`SUMMARY_METRICS`. Site keys are ``str(site)``.
    """
    x = _validate(y_true, y_score, sites, patient_ids, threshold, n_boot, ci)
    t, s, pid_arr = x.t, x.s, x.patient_ids
    pred = s >= x.threshold
    names, members, site_data = split_by_site(t, s, pred, x.sites, pid_arr)

    # ---- point estimates ------------------------------------------------------------------
    overall = point_entry(t, s, pred, pid_arr, ci)
    ext = {str(e) for e in external}
    by_group = {
        name: point_entry(t[m], s[m], pred[m], None if pid_arr is None else pid_arr[m], ci) | {"external": name in ext}
        for name, m in zip(names, members, strict=True)
    }
    fpr_point = np.array(
        [float(binary_rates(*(by_group[k][c] for c in ("tp", "fp", "tn", "fn")))["fpr"]) for k in names]
    )
    point = {m: np.array([by_group[k][m] for k in names]) for m in SUMMARY_METRICS}
    defined = {m: ~np.isnan(v) for m, v in point.items()}
    defined["fpr"] = ~np.isnan(fpr_point)
    internal = np.array([name not in ext for name in names])
    if internal.any():  # summaries across the training sites only
        defined = {m: d & internal for m, d in defined.items()}
    summaries: dict[str, dict[str, Any]] = {
        key: {m: float(v) for m, v in values.items()} for key, values in site_summaries(point, defined).items()
    }
    tpr_gap, fpr_gap = equalized_odds_gap(point["tpr"], fpr_point, defined)
    both_nan = np.isnan(tpr_gap) and np.isnan(fpr_gap)
    eod_point = float("nan") if both_nan else float(np.nanmax([tpr_gap, fpr_gap]))

    # ---- bootstrap --------------------------------------------------------------------------
    boot_sites, boot_overall = bootstrap_samples(site_data, x.n_boot, seed)
    attach_ci(overall, boot_overall, SITE_METRICS, ci)
    for k, name in enumerate(names):
        attach_ci(by_group[name], {m: v[:, k] for m, v in boot_sites.items()}, SITE_METRICS, ci)
    for key, samples in site_summaries(boot_sites, defined).items():
        attach_ci(summaries[key], samples, SUMMARY_METRICS, ci)
    boot_tpr_gap, boot_fpr_gap = equalized_odds_gap(boot_sites["tpr"], boot_sites["fpr"], defined)
    if np.isnan(tpr_gap):
        boot_eod = boot_fpr_gap
    elif np.isnan(fpr_gap):
        boot_eod = boot_tpr_gap
    else:
        boot_eod = np.maximum(boot_tpr_gap, boot_fpr_gap)  # NaN if either is NaN
    eod_ci, eod_valid = percentile_ci(boot_eod, ci)

    return {
        "threshold": x.threshold,
        "positive_if": "score >= threshold",
        "bootstrap": _bootstrap_description(x.n_boot, ci, seed, "image" if pid_arr is None else "patient"),
        "sites": names,
        "external_sites": [name for name in names if name in ext],
        "metrics": list(SITE_METRICS),
        "overall": overall,
        "by_group": by_group,
        "group_min": summaries["group_min"],
        "group_max": summaries["group_max"],
        "difference": summaries["difference"],
        "worst_site": worst_site(names, point["balanced_accuracy"], defined["balanced_accuracy"]),
        "equalized_odds_difference": {
            "value": eod_point,
            "ci": eod_ci,
            "n_valid_boot": eod_valid,
            "tpr_difference": float(tpr_gap),
            "fpr_difference": float(fpr_gap),
        },
    }
