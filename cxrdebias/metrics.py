"""Group metrics for debiasing: accuracy overall, per (target, bias) group, on the
bias-aligned and bias-conflicting samples, worst group and gaps.

Names follow fairlearn where a counterpart exists (``by_group``, ``group_min``,
``difference``). Everything takes plain arrays/tensors, so it is usable on its own.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


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
