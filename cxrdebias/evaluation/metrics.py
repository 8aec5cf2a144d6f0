"""Group metrics for debiasing: accuracy overall, per (target, bias) group, on the
bias-aligned and bias-conflicting samples, worst group and gaps; and the binary metrics
(TPR, TNR, balanced accuracy, AUROC, Youden threshold) that the per-site report
(:mod:`cxrdebias.evaluation.site_report`) is built from.

Names follow fairlearn where a counterpart exists (``by_group``, ``group_min``,
``difference``). Everything takes plain arrays/tensors, so it is usable on its own.
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


def as_numpy(x: Any) -> np.ndarray:
    """``x`` as a NumPy array: a tensor is detached and copied to the CPU, anything else goes
    through ``np.asarray`` (no copy when it already is an array). Torch is not imported here (the
    per-site report also serves the torch-free ``cxrdebias predict``): a tensor can only exist
    when torch is already loaded."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)

def accuracy(y_true: Any, y_pred: Any) -> float:
    """Share of correct predictions (NaN for an empty input)."""
    y_true, y_pred = as_numpy(y_true), as_numpy(y_pred)
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
    y_true, y_pred, bias = as_numpy(y_true), as_numpy(y_pred), as_numpy(bias)
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
# Binary classification: the COVID-19 chest X-ray application, evaluated per site (institution)
# in cxrdebias.evaluation.site_report. A positive prediction is ``score >= threshold``
# throughout (the convention of ``sklearn.metrics.roc_curve``).
# ---------------------------------------------------------------------------------------------

_J_TIE_TOL = 1e-12

class BinaryCounts(NamedTuple):
    """Confusion-matrix counts of a binary classifier (positive class = 1)."""

    tp: int
    fp: int
    tn: int
    fn: int

def binary_labels(y: Any, name: str) -> np.ndarray:
    """``y`` as a 1-D bool array; raises ``ValueError`` unless every value is 0/1 (or bool).

    ``name`` (e.g. ``"y_true"``) starts the error message."""
    arr = as_numpy(y)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.dtype == bool:
        return arr
    if arr.size and not np.isin(arr, (0, 1)).all():
        bad = np.unique(arr[~np.isin(arr, (0, 1))])[:5]
        raise ValueError(f"{name}: binary labels must be 0/1 (or bool); found {bad.tolist()}")
    return arr.astype(bool)

def score_array(y_score: Any, n: int) -> np.ndarray:
    """``y_score`` as a 1-D float64 array of ``n`` scores (one per label); raises ``ValueError``
    when the count differs or a score is NaN or ±inf."""
    s = as_numpy(y_score).astype(np.float64).reshape(-1)
    if s.shape[0] != n:
        raise ValueError(f"y_score: expected {n} scores (one per label), got {s.shape[0]}")
    if not np.isfinite(s).all():
        raise ValueError("y_score: scores must be finite (found NaN or ±inf)")
    return s

def safe_divide(num: Any, den: Any) -> np.ndarray:
    """``num / den`` element-wise, NaN where ``den == 0`` (no warning)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    shape = np.broadcast_shapes(num.shape, den.shape)
    out = np.full(shape, np.nan)
    np.divide(num, den, out=out, where=np.broadcast_to(den > 0, shape))
    return out

def binary_rates(tp: Any, fp: Any, tn: Any, fn: Any) -> dict[str, np.ndarray]:
    """TPR, TNR, FPR, balanced accuracy and prevalence from counts (arrays broadcast).

    - TPR (sensitivity, recall) = TP / (TP + FN), undefined (NaN) without positives;
    - TNR (specificity) = TN / (TN + FP), FPR = FP / (FP + TN) = 1 − TNR, NaN without negatives;
    - balanced accuracy = (TPR + TNR) / 2 (Brodersen et al., 2010), NaN when either is;
    - prevalence = (TP + FN) / n, NaN for an empty set.
    """
    tp, fp, tn, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, tn, fn))
    pos, neg = tp + fn, tn + fp
    tpr_ = safe_divide(tp, pos)
    tnr_ = safe_divide(tn, neg)
    return {
        "prevalence": safe_divide(pos, pos + neg),
        "tpr": tpr_,
        "tnr": tnr_,
        "fpr": safe_divide(fp, neg),
        "balanced_accuracy": (tpr_ + tnr_) / 2.0,  # NaN propagates, no warning
    }

def binary_counts(y_true: Any, y_pred: Any) -> BinaryCounts:
    """TP, FP, TN, FN of binary predictions (labels 0/1 or bool; 1 = positive).

    Returns a :class:`BinaryCounts` named tuple, so ``tp, fp, tn, fn = binary_counts(...)``.
    """
    t = binary_labels(y_true, "y_true")
    p = binary_labels(y_pred, "y_pred")
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
    return float(binary_rates(*binary_counts(y_true, y_pred))["tpr"])

def tnr(y_true: Any, y_pred: Any) -> float:
    """True-negative rate (specificity) TN / (TN + FP); NaN when there is no negative."""
    return float(binary_rates(*binary_counts(y_true, y_pred))["tnr"])

def balanced_accuracy(y_true: Any, y_pred: Any) -> float:
    """Balanced accuracy (TPR + TNR) / 2 (Brodersen et al., 2010).

    NaN when either class is absent (where ``sklearn.metrics.balanced_accuracy_score`` would
    warn and return the recall of the one class present).
    """
    return float(binary_rates(*binary_counts(y_true, y_pred))["balanced_accuracy"])

def auroc(y_true: Any, y_score: Any) -> float:
    """Area under the ROC curve (``sklearn.metrics.roc_auc_score``); NaN unless both classes occur.

    Equals the probability that a random positive scores above a random negative, ties
    counting one half (Mann–Whitney U / (n_pos · n_neg)).
    """
    t = binary_labels(y_true, "y_true")
    s = score_array(y_score, t.shape[0])
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
    t = binary_labels(y_true, "y_true")
    s = score_array(y_score, t.shape[0])
    if t.all() or not t.any():
        present = "no samples" if t.size == 0 else f"only class {int(t[0])}"
        raise ValueError(f"youden_threshold needs both classes in y_true; found {present}")
    fpr_, tpr_, thresholds = roc_curve(t, s, drop_intermediate=False)
    finite = np.isfinite(thresholds)  # sklearn prepends +inf (no positive prediction)
    j = (tpr_ - fpr_)[finite]
    thr = thresholds[finite]
    best = j >= j.max() - _J_TIE_TOL
    return float(thr[best].max())
