"""Agreement of pseudo-bias labels with the true ones (where known): NMI, ARI and accuracy after
the best one-to-one matching of label names. Logged per epoch by
:class:`~cxrdebias.debias.unsupervised.UnsupervisedBias` and used by ``cxrdebias analyze-bias``;
re-exported by :mod:`cxrdebias.evaluation.metrics`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def label_agreement(true_bias: Any, pseudo_bias: Any, targets: Any | None = None) -> dict[str, Any]:
    """How well pseudo-bias labels agree with the true ones (label names do not matter).

    Samples with an unknown true bias (``< 0``) are left out. Returns ``n`` (samples compared),
    ``nmi`` (normalised mutual information, arithmetic mean), ``ari`` (adjusted Rand index),
    ``matched_accuracy`` (accuracy after the one-to-one matching of pseudo to true labels that
    maximises it: Hungarian algorithm on the contingency table, ``linear_sum_assignment``) and,
    with ``targets``, ``minority_matched_accuracy``: the matched accuracy on the samples whose
    true bias is not the most frequent bias of their class (the bias-conflicting ones when
    the bias indexes the classes) — the part the aligned majority cannot hide. ``n = 0``: only
    ``{"n": 0}``.
    """
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    t, p = _as_numpy(true_bias).astype(np.int64).ravel(), _as_numpy(pseudo_bias).astype(np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"true and pseudo labels differ in length ({t.size} vs {p.size})")
    known = t >= 0
    t, p = t[known], p[known]
    if t.size == 0:
        return {"n": 0}
    tv, ti = np.unique(t, return_inverse=True)
    pv, pi = np.unique(p, return_inverse=True)
    table = np.zeros((len(pv), len(tv)), dtype=np.int64)
    np.add.at(table, (pi.ravel(), ti.ravel()), 1)
    rows, cols = linear_sum_assignment(-table)
    mapped = np.full(len(pv), -1, dtype=np.int64)
    mapped[rows] = cols
    hit = mapped[pi.ravel()] == ti.ravel()
    out: dict[str, Any] = {
        "n": int(t.size),
        "nmi": float(normalized_mutual_info_score(t, p)),
        "ari": float(adjusted_rand_score(t, p)),
        "matched_accuracy": float(hit.mean()),
    }
    if targets is not None:
        y = _as_numpy(targets).astype(np.int64).ravel()[known]
        yv, yi = np.unique(y, return_inverse=True)
        by_class = np.zeros((len(yv), len(tv)), dtype=np.int64)
        np.add.at(by_class, (yi.ravel(), ti.ravel()), 1)
        minority = by_class.argmax(axis=1)[yi.ravel()] != ti.ravel()
        out["n_minority"] = int(minority.sum())
        out["minority_matched_accuracy"] = float(hit[minority].mean()) if minority.any() else float("nan")
    return out


__all__ = ["label_agreement"]
