"""Group metrics for debiasing: accuracy overall, per (target, bias) group, on the
bias-aligned and bias-conflicting samples, worst group and gaps.

Names follow fairlearn where a counterpart exists (``by_group``, ``group_min``,
``difference``). Everything takes plain arrays/tensors, so it is usable on its own.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from cxrdebias.debias.unsupervised.agreement import label_agreement as label_agreement


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def accuracy(y_true: Any, y_pred: Any) -> float:
    """Share of correct predictions (NaN for an empty input)."""
    y_true, y_pred = _np(y_true), _np(y_pred)
    if y_true.size == 0:
        return float("nan")
    return float((y_true == y_pred).mean())


def group_accuracy(y_true: Any, y_pred: Any, bias: Any) -> dict[str, Any]:
    """Accuracy per (target, bias) group and the summaries debiasing papers report.

    Returns a dict with

    - ``accuracy``: plain accuracy over all samples;
    - ``group_mean_accuracy``: mean of the per-(target, bias)-group accuracies ("unbiased"
      accuracy as Nam et al. average it; equals ``accuracy`` on a balanced set);
    - ``aligned_accuracy`` / ``conflicting_accuracy``: on samples whose bias label equals /
      differs from the target (meaningful when bias labels index the classes, as colours do);
    - ``by_group``: ``{"t=<target>,b=<bias>": {"n": …, "accuracy": …}}``;
    - ``group_min`` (worst group's accuracy) and ``difference`` (max − min over groups).
    """
    y_true, y_pred, bias = _np(y_true), _np(y_pred), _np(bias)
    correct = (y_true == y_pred).astype(np.float64)
    groups = np.stack([y_true, bias], axis=1) if y_true.size else np.empty((0, 2), dtype=np.int64)
    keys, inverse, counts = np.unique(groups, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    sums = np.bincount(inverse, weights=correct, minlength=len(keys))
    accs = sums / np.maximum(counts, 1)
    by_group = {
        f"t={int(t)},b={int(b)}": {"n": int(n), "accuracy": float(a)}
        for (t, b), n, a in zip(keys, counts, accs, strict=True)
    }
    aligned = y_true == bias
    return {
        "accuracy": accuracy(y_true, y_pred),
        "group_mean_accuracy": float(accs.mean()) if len(accs) else float("nan"),
        "aligned_accuracy": float(correct[aligned].mean()) if aligned.any() else float("nan"),
        "conflicting_accuracy": float(correct[~aligned].mean()) if (~aligned).any() else float("nan"),
        "group_min": float(accs.min()) if len(accs) else float("nan"),
        "difference": float(accs.max() - accs.min()) if len(accs) else float("nan"),
        "by_group": by_group,
    }


# ---------------------------------------------------------------------------------------------
# Binary classification per site (institution): the COVID-19 chest X-ray application, where the
# hospital a radiograph comes from is the bias. A positive prediction is ``score >= threshold``
# throughout (the convention of ``sklearn.metrics.roc_curve``).
# ---------------------------------------------------------------------------------------------

SITE_METRICS: tuple[str, ...] = ("prevalence", "tpr", "tnr", "balanced_accuracy", "auroc")
"""Metrics of a :func:`site_report` entry that carry a bootstrap interval."""

SUMMARY_METRICS: tuple[str, ...] = ("tpr", "tnr", "balanced_accuracy", "auroc")
"""Metrics summarised across sites (``group_min``, ``group_max``, ``difference``)."""

_J_TIE_TOL = 1e-12


class BinaryCounts(NamedTuple):
    """Confusion-matrix counts of a binary classifier (positive class = 1)."""

    tp: int
    fp: int
    tn: int
    fn: int


def _binary_labels(y: Any, name: str) -> np.ndarray:
    """``y`` as a 1-D bool array; raises ``ValueError`` unless every value is 0/1 (or bool)."""
    arr = _np(y)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.dtype == bool:
        return arr
    if arr.size and not np.isin(arr, (0, 1)).all():
        bad = np.unique(arr[~np.isin(arr, (0, 1))])[:5]
        raise ValueError(f"{name}: binary labels must be 0/1 (or bool); found {bad.tolist()}")
    return arr.astype(bool)


def _scores(y_score: Any, n: int) -> np.ndarray:
    s = _np(y_score).astype(np.float64).reshape(-1)
    if s.shape[0] != n:
        raise ValueError(f"y_score: expected {n} scores (one per label), got {s.shape[0]}")
    if not np.isfinite(s).all():
        raise ValueError("y_score: scores must be finite (found NaN or ±inf)")
    return s


def _safe_div(num: Any, den: Any) -> np.ndarray:
    """``num / den`` element-wise, NaN where ``den == 0`` (no warning)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    shape = np.broadcast_shapes(num.shape, den.shape)
    out = np.full(shape, np.nan)
    np.divide(num, den, out=out, where=np.broadcast_to(den > 0, shape))
    return out


def _rates(tp: Any, fp: Any, tn: Any, fn: Any) -> dict[str, np.ndarray]:
    """TPR, TNR, FPR, balanced accuracy and prevalence from counts (arrays broadcast).

    - TPR (sensitivity, recall) = TP / (TP + FN), undefined (NaN) without positives;
    - TNR (specificity) = TN / (TN + FP), FPR = FP / (FP + TN) = 1 − TNR, NaN without negatives;
    - balanced accuracy = (TPR + TNR) / 2 (Brodersen et al., 2010), NaN when either is;
    - prevalence = (TP + FN) / n, NaN for an empty set.
    """
    tp, fp, tn, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, tn, fn))
    pos, neg = tp + fn, tn + fp
    tpr_ = _safe_div(tp, pos)
    tnr_ = _safe_div(tn, neg)
    return {
        "prevalence": _safe_div(pos, pos + neg),
        "tpr": tpr_,
        "tnr": tnr_,
        "fpr": _safe_div(fp, neg),
        "balanced_accuracy": (tpr_ + tnr_) / 2.0,  # NaN propagates, no warning
    }


def binary_counts(y_true: Any, y_pred: Any) -> BinaryCounts:
    """TP, FP, TN, FN of binary predictions (labels 0/1 or bool; 1 = positive).

    Returns a :class:`BinaryCounts` named tuple, so ``tp, fp, tn, fn = binary_counts(...)``.
    """
    t = _binary_labels(y_true, "y_true")
    p = _binary_labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length ({t.shape[0]} vs {p.shape[0]})")
    return BinaryCounts(
        tp=int(np.count_nonzero(t & p)),
        fp=int(np.count_nonzero(~t & p)),
        tn=int(np.count_nonzero(~t & ~p)),
        fn=int(np.count_nonzero(t & ~p)),
    )


def tpr(y_true: Any, y_pred: Any) -> float:
    """True-positive rate (sensitivity) TP / (TP + FN); NaN when there is no positive."""
    return float(_rates(*binary_counts(y_true, y_pred))["tpr"])


def tnr(y_true: Any, y_pred: Any) -> float:
    """True-negative rate (specificity) TN / (TN + FP); NaN when there is no negative."""
    return float(_rates(*binary_counts(y_true, y_pred))["tnr"])


def balanced_accuracy(y_true: Any, y_pred: Any) -> float:
    """Balanced accuracy (TPR + TNR) / 2 (Brodersen et al., 2010).

    NaN when either class is absent (where ``sklearn.metrics.balanced_accuracy_score`` would
    warn and return the recall of the one class present).
    """
    return float(_rates(*binary_counts(y_true, y_pred))["balanced_accuracy"])


def auroc(y_true: Any, y_score: Any) -> float:
    """Area under the ROC curve (``sklearn.metrics.roc_auc_score``); NaN unless both classes occur.

    Equals the probability that a random positive scores above a random negative, ties
    counting one half (Mann–Whitney U / (n_pos · n_neg)).
    """
    t = _binary_labels(y_true, "y_true")
    s = _scores(y_score, t.shape[0])
    if t.all() or not t.any():
        return float("nan")
    return float(roc_auc_score(t, s))


def youden_threshold(y_true: Any, y_score: Any) -> float:
    """Score threshold maximising Youden's J = TPR − FPR (Youden, 1950) on ``(y_true, y_score)``.

    Candidates are the distinct scores (the finite thresholds of
    ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``), predicting positive when
    ``score >= threshold``; the returned value is one of the observed scores. When several
    thresholds reach the maximum J (within 1e-12), the **largest** is returned — the most
    specific of the equally good operating points — so the result does not depend on the
    order of the samples.

    Raises ``ValueError`` when ``y_true`` holds only one class (or is empty): TPR or FPR is then
    undefined and no threshold can be chosen from the data; choose it on a set with both
    classes (e.g. the pooled validation set rather than one site).
    """
    t = _binary_labels(y_true, "y_true")
    s = _scores(y_score, t.shape[0])
    if t.all() or not t.any():
        present = "no samples" if t.size == 0 else f"only class {int(t[0])}"
        raise ValueError(f"youden_threshold needs both classes in y_true; found {present}")
    fpr_, tpr_, thresholds = roc_curve(t, s, drop_intermediate=False)
    finite = np.isfinite(thresholds)  # sklearn prepends +inf (no positive prediction)
    j = (tpr_ - fpr_)[finite]
    thr = thresholds[finite]
    best = j >= j.max() - _J_TIE_TOL
    return float(thr[best].max())


# -- site report with patient-level bootstrap ---------------------------------------------------


def _weighted_auroc(y_sorted: np.ndarray, level_starts: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUROC for each row of sample weights ``w`` (B × N), samples sorted by ascending score.

    ``level_starts`` are the indices where a new distinct score begins. With integer weights
    (bootstrap multiplicities) this is exactly ``roc_auc_score`` on the resampled data:
    Σ_levels pos_k · (neg_below_k + ½ neg_k) / (Σ pos · Σ neg). NaN when a row lacks a class.
    """
    pos = np.add.reduceat(w * y_sorted, level_starts, axis=1)
    neg = np.add.reduceat(w * ~y_sorted, level_starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    num = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    return _safe_div(num, pos.sum(axis=1) * neg.sum(axis=1))


def _score_levels(score_sorted: np.ndarray) -> np.ndarray:
    if score_sorted.size == 0:
        return np.zeros(0, dtype=np.intp)
    return np.flatnonzero(np.r_[True, score_sorted[1:] != score_sorted[:-1]])


def _percentile_ci(samples: np.ndarray, ci: float) -> tuple[list[float], int]:
    """Percentile interval of the non-NaN ``samples`` and how many there were."""
    n_valid = int(np.count_nonzero(~np.isnan(samples)))
    if n_valid == 0:
        return [float("nan"), float("nan")], 0
    lo, hi = np.nanpercentile(samples, [50.0 * (1.0 - ci), 50.0 * (1.0 + ci)])
    return [float(lo), float(hi)], n_valid


def _gap(values: np.ndarray, defined: np.ndarray) -> np.ndarray:
    """max − min over the columns ``defined`` of ``values`` (… × S); NaN where any is NaN."""
    if not defined.any():
        return np.full(values.shape[:-1], np.nan)
    v = values[..., defined]
    return v.max(axis=-1) - v.min(axis=-1)  # NaN propagates through max/min


def _group_min_max(values: np.ndarray, defined: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not defined.any():
        nan = np.full(values.shape[:-1], np.nan)
        return nan, nan
    v = values[..., defined]
    return v.min(axis=-1), v.max(axis=-1)


class _Site:
    """One site's data in canonical order, reduced to what the bootstrap needs."""

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
        self.levels = _score_levels(self.s_sorted)

    def multiplicities(self, rng: np.random.Generator, b: int) -> np.ndarray:
        """B × P counts of how often each patient is drawn (P draws with replacement)."""
        p = self.n_patients
        idx = rng.integers(0, p, size=(b, p))
        flat = (idx + (np.arange(b) * p)[:, None]).ravel()
        return np.bincount(flat, minlength=b * p).reshape(b, p).astype(np.float64)


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
) -> dict[str, Any]:
    """Per-site (per-institution) and overall evaluation of a binary classifier with bootstrap CIs.

    Predictions are ``y_score >= threshold`` (choose ``threshold`` on validation data, e.g. with
    :func:`youden_threshold`). For every site and for all samples together the report gives
    ``n`` (images), ``n_patients``, ``n_positive``, ``prevalence``, ``tp/fp/tn/fn``, ``tpr``
    (sensitivity), ``tnr`` (specificity), ``balanced_accuracy`` ((TPR + TNR)/2) and ``auroc``;
    see :func:`_rates` and :func:`auroc` for the definitions and when they are NaN.

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
    that rate is defined.

    Returns a JSON-serialisable dict (NaN for undefined values) with keys ``threshold``,
    ``positive_if``, ``bootstrap``, ``sites``, ``metrics``, ``overall``, ``by_group``,
    ``group_min``, ``group_max``, ``difference``, ``worst_site`` and
    ``equalized_odds_difference``. Each ``overall``/``by_group[site]`` entry holds the values,
    ``ci`` (``{metric: [low, high]}``) and ``n_valid_boot`` (``{metric: int}``) for the metrics
    in :data:`SITE_METRICS`; ``group_min``/``group_max``/``difference`` hold the same for
    :data:`SUMMARY_METRICS`. Site keys are ``str(site)``.
    """
    t = _binary_labels(y_true, "y_true")
    n = t.shape[0]
    if n == 0:
        raise ValueError("site_report: no samples")
    s = _scores(y_score, n)
    site_arr = _np(sites).reshape(-1)
    if site_arr.shape[0] != n:
        raise ValueError(f"sites: expected {n} site labels, got {site_arr.shape[0]}")
    pid_arr = None
    if patient_ids is not None:
        pid_arr = _np(patient_ids).reshape(-1)
        if pid_arr.shape[0] != n:
            raise ValueError(f"patient_ids: expected {n} ids, got {pid_arr.shape[0]}")
    threshold = float(threshold)
    if np.isnan(threshold):
        raise ValueError("threshold is NaN")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must lie in (0, 1), got {ci}")
    n_boot = int(n_boot)
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")

    pred = s >= threshold
    site_values, site_index = np.unique(site_arr, return_inverse=True)
    site_index = site_index.reshape(-1)
    names = [str(v.item() if hasattr(v, "item") else v) for v in site_values]
    if len(set(names)) != len(names):
        raise ValueError(f"sites: distinct site labels print the same: {names}")
    n_sites = len(names)
    members = [np.flatnonzero(site_index == k) for k in range(n_sites)]
    site_data = [
        _Site(t[m], s[m], pred[m], None if pid_arr is None else pid_arr[m]) for m in members
    ]

    # ---- point estimates ------------------------------------------------------------------
    def entry(mask: np.ndarray, n_patients: int) -> dict[str, Any]:
        c = binary_counts(t[mask], pred[mask])
        r = _rates(*c)
        out: dict[str, Any] = {
            "n": int(mask.size),
            "n_patients": int(n_patients),
            "n_positive": c.tp + c.fn,
            "prevalence": float(r["prevalence"]),
            "tp": c.tp,
            "fp": c.fp,
            "tn": c.tn,
            "fn": c.fn,
            "tpr": float(r["tpr"]),
            "tnr": float(r["tnr"]),
            "balanced_accuracy": float(r["balanced_accuracy"]),
            "auroc": auroc(t[mask], s[mask]),
        }
        return out

    n_patients_all = n if pid_arr is None else int(np.unique(pid_arr).size)
    overall = entry(np.arange(n), n_patients_all)
    by_group = {
        name: entry(m, sd.n_patients) for name, m, sd in zip(names, members, site_data, strict=True)
    }
    fpr_point = np.array(
        [float(_rates(*(by_group[k][c] for c in ("tp", "fp", "tn", "fn")))["fpr"]) for k in names]
    )
    point = {m: np.array([by_group[k][m] for k in names]) for m in SUMMARY_METRICS}
    defined = {m: ~np.isnan(v) for m, v in point.items()}
    defined["fpr"] = ~np.isnan(fpr_point)

    summaries: dict[str, dict[str, Any]] = {"group_min": {}, "group_max": {}, "difference": {}}
    for m in SUMMARY_METRICS:
        lo, hi = _group_min_max(point[m], defined[m])
        summaries["group_min"][m] = float(lo)
        summaries["group_max"][m] = float(hi)
        summaries["difference"][m] = float(_gap(point[m], defined[m]))
    tpr_gap = _gap(point["tpr"], defined["tpr"])
    fpr_gap = _gap(fpr_point, defined["fpr"])
    both_nan = np.isnan(tpr_gap) and np.isnan(fpr_gap)
    eod_point = float("nan") if both_nan else float(np.nanmax([tpr_gap, fpr_gap]))
    if defined["balanced_accuracy"].any():
        ba = np.where(defined["balanced_accuracy"], point["balanced_accuracy"], np.inf)
        k = int(np.argmin(ba))  # first minimum: ties → first site in sorted order
        worst = {"site": names[k], "balanced_accuracy": float(point["balanced_accuracy"][k])}
    else:
        worst = {"site": None, "balanced_accuracy": float("nan")}

    # ---- bootstrap --------------------------------------------------------------------------
    boot_sites = {m: np.full((n_boot, n_sites), np.nan) for m in (*SITE_METRICS, "fpr")}
    boot_overall = {m: np.full(n_boot, np.nan) for m in SITE_METRICS}
    if n_boot:
        rngs = [np.random.default_rng(ss) for ss in np.random.SeedSequence(seed).spawn(n_sites)]
        all_t = np.concatenate([sd.t_sorted for sd in site_data])
        all_s = np.concatenate([sd.s_sorted for sd in site_data])
        overall_order = np.argsort(all_s, kind="stable")
        all_t_sorted = all_t[overall_order]
        overall_levels = _score_levels(all_s[overall_order])
        chunk = max(1, min(n_boot, 4_000_000 // max(n, 1)))  # bounds memory to ~B·N floats
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
                boot_sites["auroc"][rows, k] = _weighted_auroc(sd.t_sorted, sd.levels, w)
            r = _rates(*np.moveaxis(counts, -1, 0))
            for m in ("prevalence", "tpr", "tnr", "fpr", "balanced_accuracy"):
                boot_sites[m][rows] = r[m]
            ro = _rates(*np.moveaxis(counts.sum(axis=1), -1, 0))
            for m in ("prevalence", "tpr", "tnr", "balanced_accuracy"):
                boot_overall[m][rows] = ro[m]
            w_all = np.concatenate(weights, axis=1)[:, overall_order]
            boot_overall["auroc"][rows] = _weighted_auroc(all_t_sorted, overall_levels, w_all)

    def attach_ci(target: dict[str, Any], samples: dict[str, np.ndarray], metrics: tuple[str, ...]):
        target["ci"], target["n_valid_boot"] = {}, {}
        for m in metrics:
            target["ci"][m], target["n_valid_boot"][m] = _percentile_ci(samples[m], ci)

    attach_ci(overall, boot_overall, SITE_METRICS)
    for k, name in enumerate(names):
        attach_ci(by_group[name], {m: v[:, k] for m, v in boot_sites.items()}, SITE_METRICS)
    boot_summ: dict[str, dict[str, np.ndarray]] = {"group_min": {}, "group_max": {}, "difference": {}}
    for m in SUMMARY_METRICS:
        lo, hi = _group_min_max(boot_sites[m], defined[m])
        boot_summ["group_min"][m], boot_summ["group_max"][m] = lo, hi
        boot_summ["difference"][m] = _gap(boot_sites[m], defined[m])
    for key, samples in boot_summ.items():
        attach_ci(summaries[key], samples, SUMMARY_METRICS)
    boot_tpr_gap = _gap(boot_sites["tpr"], defined["tpr"])
    boot_fpr_gap = _gap(boot_sites["fpr"], defined["fpr"])
    if np.isnan(tpr_gap):
        boot_eod = boot_fpr_gap
    elif np.isnan(fpr_gap):
        boot_eod = boot_tpr_gap
    else:
        boot_eod = np.maximum(boot_tpr_gap, boot_fpr_gap)  # NaN if either is NaN
    eod_ci, eod_valid = _percentile_ci(boot_eod, ci)

    unit = "image" if pid_arr is None else "patient"
    return {
        "threshold": threshold,
        "positive_if": "score >= threshold",
        "bootstrap": {
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
        },
        "sites": names,
        "metrics": list(SITE_METRICS),
        "overall": overall,
        "by_group": by_group,
        "group_min": summaries["group_min"],
        "group_max": summaries["group_max"],
        "difference": summaries["difference"],
        "worst_site": worst,
        "equalized_odds_difference": {
            "value": eod_point,
            "ci": eod_ci,
            "n_valid_boot": eod_valid,
            "tpr_difference": float(tpr_gap),
            "fpr_difference": float(fpr_gap),
        },
    }
