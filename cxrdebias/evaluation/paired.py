"""Paired differences between two runs scored on the same test images, with patient-level
bootstrap intervals (``cxrdebias compare``).

Two models evaluated on one test split make *paired* predictions: the same patients, the same
images. The difference Δ = B − A of a per-site metric (TPR, TNR, balanced accuracy at each
run's own threshold, and AUROC) is judged against the variation of Δ itself, not of each
metric alone: every bootstrap resample draws patients with replacement within each site
(all of a patient's images together) and computes both runs' metrics on the *same* draw. The
95% interval is the 2.5–97.5 percentile of the resampled Δ; a difference is called
significant when that interval excludes 0. ``overall`` resamples within each site too, so the
site mix stays that of the test split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cxrdebias.errors import DataError
from cxrdebias.evaluation.formatting import format_value
from cxrdebias.evaluation.metrics import auroc, balanced_accuracy, tnr, tpr
from cxrdebias.evaluation.report import LABELS, OVERALL, site_label

#: the metrics compared, in table order (their column names are report.LABELS')
PAIRED_METRICS = ("tpr", "tnr", "balanced_accuracy", "auroc")
#: the metrics computed from each run's decisions (AUROC uses the scores)
_DECISION_METRICS = {"tpr": tpr, "tnr": tnr, "balanced_accuracy": balanced_accuracy}
COLUMNS = ("path", "patient_id", "site", "label", "probability", "predicted")


@dataclass(frozen=True)
class PairedDelta:
    """Δ = B − A of one metric on one group: the point value, its 95% interval, and the number of
    resamples in which the metric was defined (a draw without positives has no TPR)."""

    delta: float
    low: float
    high: float
    n_valid: int

    @property
    def significant(self) -> bool:
        """The 95% interval excludes 0."""
        return bool(np.isfinite(self.low) and np.isfinite(self.high) and (self.low > 0 or self.high < 0))


def _metric(key: str, y: np.ndarray, decision: np.ndarray, score: np.ndarray) -> float:
    return auroc(y, score) if key == "auroc" else _DECISION_METRICS[key](y, decision)


def align_predictions(a: pd.DataFrame, b: pd.DataFrame, where: str = "predictions") -> pd.DataFrame:
    """One row per test image with both runs' decision and score (``*_a``, ``*_b``); a
    :class:`DataError` when the two runs were not scored on the same images with the same labels."""
    for name, df in (("A", a), ("B", b)):
        missing = [c for c in COLUMNS if c not in df.columns]
        if missing:
            raise DataError(f"{where} of run {name}: no column {', '.join(missing)} (expected {', '.join(COLUMNS)})")
    if set(a["path"]) != set(b["path"]) or len(a) != len(b) or a["path"].duplicated().any():
        raise DataError(f"{where}: the two runs were not scored on the same test images; paired differences need the same test split")
    m = a.merge(b[["path", "label", "probability", "predicted"]], on="path", suffixes=("_a", "_b"))
    if (m["label_a"] != m["label_b"]).any():
        raise DataError(f"{where}: the two runs give different labels to the same images")
    return m.rename(columns={"label_a": "label"}).drop(columns="label_b")


def paired_differences(
    a: pd.DataFrame, b: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0, where: str = "predictions"
) -> dict[str, dict[str, PairedDelta]]:
    """``{site or "overall": {metric: PairedDelta}}`` of run B minus run A (module doc).

    ``a``/``b``: the ``predictions.csv`` tables of two evaluations of the same test split
    (``predicted`` is each run's decision at its own threshold, ``probability`` its score)."""
    m = align_predictions(a, b, where).reset_index(drop=True)
    y = m["label"].to_numpy(int)
    dec = {"a": m["predicted_a"].to_numpy(int), "b": m["predicted_b"].to_numpy(int)}
    score = {"a": m["probability_a"].to_numpy(float), "b": m["probability_b"].to_numpy(float)}
    sites = sorted(m["site"].unique())
    rows_of = {s: m.index[m["site"] == s].to_numpy() for s in sites}

    def deltas(idx_by_group: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
        out = {}
        for group, idx in idx_by_group.items():
            out[group] = {
                key: _metric(key, y[idx], dec["b"][idx], score["b"][idx]) - _metric(key, y[idx], dec["a"][idx], score["a"][idx])
                for key in PAIRED_METRICS
            }
        return out

    point = deltas({**rows_of, OVERALL: m.index.to_numpy()})
    # per site, the rows of each patient (a patient's images are resampled together)
    patients = {s: [rows_of[s][r] for r in m.loc[rows_of[s]].groupby("patient_id", sort=True).indices.values()] for s in sites}
    rng = np.random.default_rng(seed)
    draws: dict[str, dict[str, list[float]]] = {g: {k: [] for k in PAIRED_METRICS} for g in [*sites, OVERALL]}
    for _ in range(n_boot):
        resampled = {}
        for s in sites:
            pick = rng.integers(0, len(patients[s]), len(patients[s]))
            resampled[s] = np.concatenate([patients[s][i] for i in pick])
        resampled[OVERALL] = np.concatenate([resampled[s] for s in sites])
        for group, values in deltas(resampled).items():
            for key, v in values.items():
                draws[group][key].append(v)
    result: dict[str, dict[str, PairedDelta]] = {}
    for group in [*sites, OVERALL]:
        result[group] = {}
        for key in PAIRED_METRICS:
            d = np.asarray(draws[group][key], dtype=float)
            d = d[np.isfinite(d)]
            low, high = (np.percentile(d, [2.5, 97.5]) if d.size else (np.nan, np.nan))
            result[group][key] = PairedDelta(float(point[group][key]), float(low), float(high), int(d.size))
    return result


def paired_markdown(
    result: dict[str, dict[str, PairedDelta]], name_a: str, name_b: str, *, n_boot: int, n: dict[str, Any] | None = None, digits: int = 3,
    external: set[str] | frozenset[str] = frozenset(),
) -> str:
    """The paired differences as a Markdown table: Δ [95% CI] per site and metric, ``*`` when
    significant; sites in ``external`` (not in training) are marked so."""
    header = ["site", *(["n"] if n else []), *(f"Δ{LABELS[key]} [95% CI]" for key in PAIRED_METRICS)]
    lines = [
        f"## Paired differences {name_b} − {name_a} (same test patients)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for group, values in result.items():
        cells = [site_label(group, set(external)), *([str(n.get(group, ""))] if n else [])]
        for key in PAIRED_METRICS:
            d = values[key]
            mark = " *" if d.significant else ""
            cells.append(f"{d.delta:+.{digits}f} [{format_value(d.low, digits)}, {format_value(d.high, digits)}]{mark}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"`*`: the 95% interval excludes 0. Intervals: 2.5–97.5 percentiles of {n_boot} paired bootstrap "
        "resamples of patients within each site (both runs on the same draw); TPR, TNR and BA at each run's own threshold.",
    ]
    return "\n".join(lines) + "\n"


def to_json(result: dict[str, dict[str, PairedDelta]]) -> dict[str, Any]:
    """The paired differences as plain data."""
    return {
        group: {key: {"delta": d.delta, "ci": [d.low, d.high], "significant": d.significant, "n_valid": d.n_valid} for key, d in values.items()}
        for group, values in result.items()
    }
