"""Bias leakage: how much site the trained features still carry (a linear probe).

:func:`site_probe` fits, **within each class**, a linear classifier of the site from the frozen
bottleneck features on the validation split and scores it on the test split (AUROC). Within a
class the label cannot explain the site, so an AUROC above 0.5 is site information left in the
representation. :func:`site_probe_by_layer` runs the same probe on the pooled output of each
stage of the network (where along the network the site is dropped). :func:`probe_markdown`
renders the result for ``report.md``, :func:`probe_compare_markdown` two runs' side by side.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

CLASSES: tuple[int, ...] = (0, 1)
"""The classes the probe is run within (binary labels)."""

MAX_ITER = 2000
"""Iterations of the logistic regression's solver (lbfgs)."""


def _probe_pipeline(seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=MAX_ITER, random_state=seed))


def _as_2d(features: Any, name: str) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected an N×D array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: holds NaN or infinite values")
    return x


def _as_1d(values: Any, n: int, name: str) -> np.ndarray:
    v = np.asarray(values).reshape(-1)
    if v.shape[0] != n:
        raise ValueError(f"{name}: expected {n} values, got {v.shape[0]}")
    return v


def _class_probe(
    x_val: np.ndarray, s_val: np.ndarray, x_test: np.ndarray, s_test: np.ndarray, seed: int
) -> dict[str, Any]:
    """One class: fit on (x_val, s_val), AUROC on (x_test, s_test); NaN with a reason when undefined."""
    from sklearn.metrics import roc_auc_score

    val_sites = sorted(set(s_val.tolist()))
    unseen = sorted(set(s_test.tolist()) - set(val_sites))
    if unseen:  # a site with validation images of the other class only: the probe has no such class
        keep = ~np.isin(s_test, unseen)
        s_dropped = int(np.count_nonzero(~keep))
        x_test, s_test = x_test[keep], s_test[keep]
    test_sites = sorted(set(s_test.tolist()))
    entry: dict[str, Any] = {
        "auroc": float("nan"),
        "n_val": int(s_val.size),
        "n_test": int(s_test.size),
        "sites": [str(s) for s in val_sites],
        "n_test_by_site": {str(s): int(np.count_nonzero(s_test == s)) for s in test_sites},
    }
    if unseen:
        entry["note"] = f"{s_dropped} test image(s) of site(s) {', '.join(unseen)} without validation images of this class left out"
    if len(val_sites) < 2:
        entry["reason"] = f"validation has {len(val_sites)} site(s) in this class; the probe needs 2 or more to fit"
        return entry
    if len(test_sites) < 2:
        entry["reason"] = f"test has {len(test_sites)} site(s) in this class; AUROC needs 2 or more"
        return entry
    probe = _probe_pipeline(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a slow-converging solver still gives a usable probe
        probe.fit(x_val, s_val)
        proba = probe.predict_proba(x_test)
    classes = list(probe.classes_)
    # score over the sites present in test (renormalised probabilities when the probe knows more)
    present = [k for k, c in enumerate(classes) if c in set(test_sites)]
    p = proba[:, present]
    p = p / p.sum(axis=1, keepdims=True)
    if len(present) == 2:
        auroc = roc_auc_score(s_test == classes[present[1]], p[:, 1])
    else:
        auroc = roc_auc_score(s_test, p, multi_class="ovr", average="macro", labels=[classes[k] for k in present])
    entry["auroc"] = float(auroc)
    return entry


def site_probe(
    features_val: Any,
    sites_val: Any,
    labels_val: Any,
    features_test: Any,
    sites_test: Any,
    labels_test: Any,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """Linear probe of the site from frozen features, within each class (fitted on validation,
    scored on test).

    For each class (label 0 and label 1) separately, a standardised logistic regression
    (``StandardScaler`` → ``LogisticRegression(C=1.0)``) is fitted on that class's validation
    features to predict the site, then scored on that class's test features: binary AUROC with
    two sites, macro one-vs-rest AUROC with more. **0.5 means no site is linearly decodable**
    from the features within the class (the representation carries no site beyond what the
    label explains); 1.0 means the site is perfectly separable. It is a *linear* probe: a
    lower bound on the site information in the features (a non-linear classifier may find more).

    Sites present in test but not in validation (external sites, never seen by the model or the
    probe) are left out of the probe, and ``note`` names them. A class with fewer than two sites in
    validation or in test has ``auroc`` NaN and a ``reason``.

    Returns a JSON-serialisable dict: ``by_class`` (``{"0": {...}, "1": {...}}``, each with
    ``auroc``, ``n_val``, ``n_test``, ``sites``, ``n_test_by_site`` and, when undefined,
    ``reason``), ``mean_auroc`` (mean over the classes where it is defined; NaN when none),
    ``probe`` (a description), ``seed`` and, when external sites were dropped, ``excluded_sites``
    and ``note``.
    """
    x_val = _as_2d(features_val, "features_val")
    x_test = _as_2d(features_test, "features_test")
    if x_val.shape[1] != x_test.shape[1]:
        raise ValueError(f"features_test: expected {x_val.shape[1]} columns like features_val, got {x_test.shape[1]}")
    s_val = _as_1d(sites_val, x_val.shape[0], "sites_val").astype(str)
    y_val = _as_1d(labels_val, x_val.shape[0], "labels_val").astype(np.int64)
    s_test = _as_1d(sites_test, x_test.shape[0], "sites_test").astype(str)
    y_test = _as_1d(labels_test, x_test.shape[0], "labels_test").astype(np.int64)

    result: dict[str, Any] = {
        "probe": "within each class: StandardScaler + LogisticRegression(C=1.0) of the site from the "
        "bottleneck features, fitted on validation, AUROC on test (0.5 = no site left; linear: a lower bound)",
        "seed": int(seed),
    }
    external = sorted(set(s_test.tolist()) - set(s_val.tolist()))
    if external:
        keep = ~np.isin(s_test, external)
        x_test, s_test, y_test = x_test[keep], s_test[keep], y_test[keep]
        result["excluded_sites"] = external
        result["note"] = (
            f"site(s) {', '.join(external)} absent from validation (external) are left out of the probe "
            f"({int(np.count_nonzero(~keep))} test image(s))"
        )
    by_class = {}
    for c in CLASSES:
        by_class[str(c)] = _class_probe(x_val[y_val == c], s_val[y_val == c], x_test[y_test == c], s_test[y_test == c], seed)
    result["by_class"] = by_class
    defined = [e["auroc"] for e in by_class.values() if not math.isnan(e["auroc"])]
    result["mean_auroc"] = float(np.mean(defined)) if defined else float("nan")
    return result


def site_probe_by_layer(
    features_val: Mapping[str, Any],
    sites_val: Any,
    labels_val: Any,
    features_test: Mapping[str, Any],
    sites_test: Any,
    labels_test: Any,
    *,
    seed: int = 0,
    modules: Mapping[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """:func:`site_probe` on each layer's features: the same rows, classes and seed, one probe
    per layer (``features_val[name]``: the validation images' ``N×C`` pooled output of that layer).

    Returns ``{name: entry}`` in the order of ``features_val``; each entry holds ``module`` (its
    path in the model, when ``modules`` names it), ``dim`` (C), ``mean_auroc`` and ``by_class``
    (``{"0": {"auroc": …}, "1": …}``, with the ``reason`` of an undefined AUROC). The counts and
    sites per class are those of :func:`site_probe` for the same rows.
    """
    if list(features_val) != list(features_test):
        raise ValueError(f"features_test: expected the layers {list(features_val)}, got {list(features_test)}")
    layers: dict[str, dict[str, Any]] = {}
    for name, x_val in features_val.items():
        try:
            full = site_probe(x_val, sites_val, labels_val, features_test[name], sites_test, labels_test, seed=seed)
        except ValueError as exc:
            raise ValueError(f"layer {name!r}: {exc}") from None
        entry: dict[str, Any] = {"module": modules[name]} if modules and name in modules else {}
        entry["dim"] = int(np.asarray(x_val).shape[1])
        entry["mean_auroc"] = full["mean_auroc"]
        entry["by_class"] = {
            c: {"auroc": e["auroc"], **({"reason": e["reason"]} if "reason" in e else {})} for c, e in full["by_class"].items()
        }
        layers[name] = entry
    return layers


def _fmt(v: Any, digits: int) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.{digits}f}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def probe_markdown(probe: dict[str, Any], digits: int = 3) -> list[str]:
    """The "Site leakage" section of ``report.md``: per-class AUROC and n, the mean; or why the
    probe is absent (``{"absent": reason}``)."""

    def fmt(v: Any) -> str:
        return _fmt(v, digits)

    lines = ["## Site leakage (linear probe on the bottleneck)", ""]
    if "absent" in probe:
        return [*lines, f"Not computed: {probe['absent']}.", ""]
    lines += ["| class | n (val) | n (test) | site AUROC |", "|---|---:|---:|---:|"]
    for c, e in probe["by_class"].items():
        cell = fmt(e["auroc"]) + (f" ({e['reason']})" if e.get("reason") else "")
        lines.append(f"| {c} | {e['n_val']} | {e['n_test']} | {cell} |")
    lines.append(f"| **mean** | | | **{fmt(probe['mean_auroc'])}** |")
    lines.append("")
    lines.append(
        "- a logistic regression of the site from the frozen bottleneck, within each class, fitted on "
        "validation and scored on test: 0.5 = no site left in the features, 1.0 = site fully decodable; "
        "a linear probe is a lower bound on the site information"
    )
    if probe.get("note"):
        lines.append(f"- {probe['note']}")
    lines.append("")
    if probe.get("layers"):
        lines += _layers_markdown(probe["layers"], digits)
    return lines


def _layers_markdown(layers: Mapping[str, Any], digits: int) -> list[str]:
    """The per-layer table of ``report.md``: one row per layer, earliest first."""
    classes = [str(c) for c in CLASSES]
    lines = ["### Site leakage by layer", ""]
    lines.append("| layer | module | dim | " + " | ".join(f"class {c}" for c in classes) + " | mean site AUROC |")
    lines.append("|---|---|---:|" + "---:|" * len(classes) + "---:|")
    for name, e in layers.items():
        cells = [_cell(name), _cell(e.get("module", "")), str(e.get("dim", ""))]
        cells += [_fmt(e["by_class"].get(c, {}).get("auroc"), digits) for c in classes]
        cells.append(_fmt(e["mean_auroc"], digits))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "- the same probe (same validation and test images, same seed) on each stage's globally "
        "average-pooled output, earliest first: the layer where the AUROC falls to 0.5 is where the "
        "site is dropped; a method that cleans only the bottleneck leaves it high in the stages before"
    )
    lines.append("")
    return lines


def probe_compare_markdown(probe_a: Any, probe_b: Any, name_a: str, name_b: str, digits: int = 3) -> list[str]:
    """The per-layer probe of two runs side by side (``cxrdebias compare``): mean site AUROC of A,
    of B and Δ = B − A per layer (A's layers first, then B's others; ``n/a`` where a run has no
    such layer); ``[]`` when neither report has per-layer results."""
    layers = [(p or {}).get("layers") or {} for p in (probe_a, probe_b)]
    if not any(layers):
        return []
    names = list(layers[0]) + [n for n in layers[1] if n not in layers[0]]
    lines = [
        "## Site probe by layer (mean site AUROC over classes; 0.5 = no site left)",
        "",
        f"| layer | {_cell(name_a)} | {_cell(name_b)} | Δ |",
        "|---|---:|---:|---:|",
    ]
    for name in names:
        a, b = (layers[k].get(name, {}).get("mean_auroc") for k in (0, 1))
        da, db = (float("nan") if v is None else float(v) for v in (a, b))
        diff = "n/a" if math.isnan(db - da) else f"{db - da:+.{digits}f}"
        lines.append(f"| {_cell(name)} | {_fmt(a, digits)} | {_fmt(b, digits)} | {diff} |")
    lines.append("")
    return lines
