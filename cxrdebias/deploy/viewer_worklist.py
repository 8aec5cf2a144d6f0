"""The viewer's worklist logic (``apps/viewer.py``): pure functions on the study table, testable
without Streamlit, torch-free.

- :func:`ood_columns`: the out-of-distribution fields of a prediction (``ood_score``, higher =
  further from the training data; ``in_distribution``), when the model produces them;
- :func:`sort_options` / :func:`sort_worklist`: by probability, by uncertainty (closest to
  the decision threshold first, :func:`uncertainty`), by OOD score (only when present) or file;
- :func:`worklist_view`: the short columns the page lists (file name, patient, site …);
- :func:`neighbour`: the next / previous image of the worklist (keyboard N / P);
- :func:`study_banners`: the study-wide warnings (most images out of distribution, sites
  the model was not trained on); :data:`OOD_BADGE` marks one flagged image;
- :func:`summary_metrics` / :func:`per_site_study_table`: metrics of the loaded study where
  it has ground truth (overall at the top of the page, per site in the sidebar).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from cxrdebias.deploy.onnx_metadata import ModelMetadata, format_metric

#: the out-of-distribution fields of a prediction, as study-table columns (when the model has them)
OOD_COLUMNS = ("ood_score", "in_distribution")
#: shown on an image whose ``in_distribution`` is false
OOD_BADGE = "Out of distribution — do not trust"
#: sort keys of the worklist → what the page calls them (``ood`` only when OOD scores exist)
SORTS = {
    "probability": "probability (highest first)",
    "uncertainty": "uncertainty (closest to the threshold first)",
    "ood": "OOD score (furthest from the training data first)",
    "file": "file name",
}
#: share of flagged images above which the study gets a banner
MOSTLY_FLAGGED = 0.5


# -- OOD fields ---------------------------------------------------------------------------------
def ood_columns(predictions: Any, ood_threshold: float | None = None) -> dict[str, np.ndarray] | None:
    """``{"ood_score": float N, "in_distribution": bool N}`` of a prediction object, or ``None``
    when it has no ``ood_score``. ``in_distribution`` is the prediction's own when it has one,
    else ``ood_score <= ood_threshold`` (``None`` → not known: no image is flagged)."""
    score = getattr(predictions, "ood_score", None)
    if score is None:
        return None
    score = np.asarray(score, dtype=np.float64).reshape(-1)
    inside = getattr(predictions, "in_distribution", None)
    if inside is not None:
        inside = np.asarray(inside, dtype=bool).reshape(-1)
    elif ood_threshold is not None:
        inside = score <= float(ood_threshold)
    else:
        inside = np.ones(score.shape, dtype=bool)
    if inside.shape != score.shape:
        raise ValueError(f"{score.size} OOD scores but {inside.size} in_distribution values")
    return {"ood_score": score, "in_distribution": inside}


def has_ood(table: pd.DataFrame) -> bool:
    """Whether the study table carries OOD scores (some image has one)."""
    return "ood_score" in table.columns and bool(table["ood_score"].notna().any())


def ood_flags(table: pd.DataFrame) -> pd.Series:
    """Per row: the image is out of distribution (``in_distribution`` is false). Rows without
    the field (no OOD output, or an upload predicted by another model) are not flagged."""
    if "in_distribution" not in table.columns:
        return pd.Series(False, index=table.index)
    return table["in_distribution"].map(lambda v: v is not None and not pd.isna(v) and not bool(v)).astype(bool)


def is_flagged(row: Mapping[str, Any]) -> bool:
    """One study-table row (a dict) is out of distribution."""
    value = row.get("in_distribution")
    return value is not None and not pd.isna(value) and not bool(value)


def training_sites(metadata: ModelMetadata) -> list[str]:
    """The sites the model was trained on: the metadata's ``training_sites`` when present, else
    the site names recorded at training (``sites.names``); ``[]`` when neither is known."""
    raw = metadata.raw
    names = raw.get("training_sites")
    if names is None:
        names = (raw.get("sites") or {}).get("names")
    return [str(s) for s in names or []]


# -- sorting ------------------------------------------------------------------------------------
def uncertainty(probability: Any, threshold: float) -> np.ndarray:
    """``|p − threshold|``: how far a positive-class probability is from the decision; the
    smallest margins are the least certain decisions (ranked first by the *uncertainty* sort)."""
    return np.abs(np.asarray(probability, dtype=np.float64) - float(threshold))


def sort_options(table: pd.DataFrame) -> list[str]:
    """The worklist's sort keys (:data:`SORTS`); ``ood`` only when the table has OOD scores."""
    return [k for k in SORTS if k != "ood" or has_ood(table)]


def sort_worklist(table: pd.DataFrame, by: str, threshold: float, *, reverse: bool = False) -> pd.DataFrame:
    """``table`` in worklist order: ``probability`` highest first, ``uncertainty`` smallest
    ``|p − threshold|`` first, ``ood`` highest OOD score first (images without a score last),
    ``file`` A→Z. Ties keep the file order; ``reverse`` turns the order around."""
    if by not in SORTS:
        raise ValueError(f"sort by one of {', '.join(SORTS)}, got {by!r}")
    if by == "ood" and not has_ood(table):
        raise ValueError("sort by OOD score: this study has no OOD scores (the model has no OOD output)")
    base = table.sort_values("file", kind="stable")
    if by == "file":
        key, ascending = base["file"], True
    elif by == "probability":
        key, ascending = base["probability"], False
    elif by == "uncertainty":
        key, ascending = pd.Series(uncertainty(base["probability"], threshold), index=base.index), True
    else:
        key, ascending = base["ood_score"].astype(float), False
    order = key.sort_values(ascending=ascending != reverse, kind="stable", na_position="last").index
    return base.loc[order]


def order_digest(files: Sequence[str]) -> str:
    """A short digest of the worklist order (the page keys its row selection by it)."""
    return hashlib.sha256("\n".join(files).encode()).hexdigest()[:12]


def neighbour(files: Sequence[str], current: str | None, step: int) -> str | None:
    """The image ``step`` rows from ``current`` in ``files``, clamped to the first/last row; the
    first (``step`` > 0) or last row when nothing (or an image no longer listed) is open."""
    if not files:
        return None
    if current not in files:
        return files[0] if step > 0 else files[-1]
    return files[min(max(list(files).index(current) + step, 0), len(files) - 1)]


# -- what the page lists ------------------------------------------------------------------------
def short_names(files: Sequence[str]) -> list[str]:
    """File names without their folders; a name shared by several files keeps its parent
    folder (``a/img.png``, ``b/img.png``)."""
    paths = [PurePath(f) for f in files]
    counts = pd.Series([p.name for p in paths]).value_counts()
    return [p.name if counts[p.name] == 1 else str(PurePath(p.parent.name, p.name)) for p in paths]


def worklist_view(table: pd.DataFrame) -> pd.DataFrame:
    """The worklist's columns: ``name`` (:func:`short_names`), ``probability``, ``prediction``,
    ``truth``, with OOD scores ``OOD`` (``do not trust`` on a flagged image, else empty), then
    ``site``, ``patient`` and, with OOD scores, ``ood_score``; same rows and order as ``table``."""
    view = pd.DataFrame(
        {
            "name": short_names(list(table["file"])),
            "probability": list(table["probability"]),
            "prediction": list(table["predicted_label"]),
            "truth": list(table["ground_truth"]),
        }
    )
    if has_ood(table):
        view["OOD"] = np.where(ood_flags(table).to_numpy(), "do not trust", "")
    view["site"], view["patient"] = list(table["site"]), list(table["patient"])
    if has_ood(table):
        view["ood_score"] = list(table["ood_score"])
    return view


# -- study-wide warnings --------------------------------------------------------------------------
def study_banners(table: pd.DataFrame, sites_trained: Sequence[str]) -> list[str]:
    """Warnings about the whole loaded study (plain text): more than half of its images out of
    distribution; images from sites that are not among ``sites_trained`` (named, with their
    count). ``[]`` when neither applies (or the table is empty)."""
    n = len(table)
    out: list[str] = []
    if n == 0:
        return out
    flagged = int(ood_flags(table).sum())
    if flagged / n > MOSTLY_FLAGGED:
        out.append(
            f"{flagged} of {n} images ({flagged / n:.0%}) are out of distribution: unlike the images this model "
            "was trained on. Do not trust its predictions on this study."
        )
    if sites_trained:
        known = set(sites_trained)
        external = table["site"].map(lambda s: bool(s) and s not in known)
        if external.any():
            names = sorted(table.loc[external, "site"].unique())
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            out.append(
                f"{int(external.sum())} of {n} images come from sites the model was not trained on ({shown}); "
                f"it was trained on {', '.join(sites_trained)}. Its performance there is unknown."
            )
    return out


# -- metrics of the loaded study ------------------------------------------------------------------
def _metrics(truth: np.ndarray, score: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
    """Point estimates on labelled images (``truth``, ``predicted``: 1 = positive)."""
    pos, neg = truth == 1, truth == 0
    tpr = float((predicted[pos] == 1).mean()) if pos.any() else float("nan")
    tnr = float((predicted[neg] == 0).mean()) if neg.any() else float("nan")
    both = pos.any() and neg.any()
    return {
        "n": int(truth.size),
        "n_positive": int(pos.sum()),
        "accuracy": float((predicted == truth).mean()),
        "tpr": tpr,
        "tnr": tnr,
        "balanced_accuracy": (tpr + tnr) / 2 if both else float("nan"),
        "auroc": float(roc_auc_score(truth, score)) if both else float("nan"),
    }


def _labelled(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["ground_truth"].map(bool)] if len(table) else table


def summary_metrics(table: pd.DataFrame, positive_label: str) -> dict[str, Any] | None:
    """Accuracy, TPR, TNR, balanced accuracy and AUROC of the images with ground truth (at the
    model's threshold: ``predicted_label``), with their counts; ``None`` when no image has a
    label. A metric that needs both classes is NaN when one is missing."""
    known = _labelled(table)
    if known.empty:
        return None
    truth = (known["ground_truth"] == positive_label).to_numpy(int)
    predicted = (known["predicted_label"] == positive_label).to_numpy(int)
    out = _metrics(truth, known["probability"].to_numpy(float), predicted)
    out["n_images"] = len(table)
    if has_ood(table):
        out["n_flagged"] = int(ood_flags(table).sum())
    return out


def per_site_study_table(table: pd.DataFrame, positive_label: str) -> pd.DataFrame | None:
    """One row per site (``(none)`` for images without one), then ``all``: images, labelled,
    positives, TPR, TNR, balanced accuracy, AUROC (formatted like the model panel) and, with OOD
    scores, how many are out of distribution. ``None`` when no image has a label."""
    if _labelled(table).empty:
        return None
    sites = table["site"].map(lambda s: s or "(none)")
    groups = [(site, table[sites == site]) for site in sorted(sites.unique())] + [("all", table)]
    rows = []
    for site, part in groups:
        m = summary_metrics(part, positive_label)
        row = {
            "site": site, "images": len(part), "labelled": m["n"] if m else 0, "positive": m["n_positive"] if m else 0,
            **{name: format_metric(m[key] if m else None) for name, key in
               (("TPR", "tpr"), ("TNR", "tnr"), ("balanced accuracy", "balanced_accuracy"), ("AUROC", "auroc"))},
        }
        if has_ood(table):
            row["OOD flagged"] = int(ood_flags(part).sum())
        rows.append(row)
    return pd.DataFrame(rows)
