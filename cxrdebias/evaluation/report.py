"""Report writers for :func:`cxrdebias.evaluation.site_report.site_report`: Markdown, CSV, JSON and a PNG figure.

Size: over 450 lines — the writers of one report (Markdown, the side-by-side comparison, CSV,
JSON, PNG) share its row and cell helpers (sites, external marks, intervals, small-cell marks).

Everything here reads the report dict only (plus, for the ROC panel, the raw scores), so a
report loaded back from ``report.json`` — where undefined values are ``null`` — renders the
same as the in-memory one, where they are NaN.

The figure is drawn on a bare :class:`matplotlib.figure.Figure` with the Agg canvas: no
pyplot state, no display needed, safe to call from worker threads.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrdebias.evaluation.calibration import calibration_markdown
from cxrdebias.evaluation.formatting import format_value
from cxrdebias.evaluation.formatting import markdown_cell as _cell
from cxrdebias.evaluation.leakage import probe_compare_markdown, probe_markdown
from cxrdebias.evaluation.metrics import as_numpy, binary_labels, score_array
from cxrdebias.evaluation.proportions import (
    SMALL_CELL,
    SMALL_LEGEND,
    SMALL_MARK,
    WILSON_METRICS,
    class_sizes_text,
    fraction,
    interval_text,
    mark_small,
    small_cells,
    wilson_intervals,
)
from cxrdebias.evaluation.site_report import SITE_METRICS
from cxrdebias.evaluation.thresholds import site_thresholds_markdown
from cxrdebias.fileio import (
    spreadsheet_safe,
    write_json_atomic,
    write_png_atomic,
    write_text_atomic,
)

OVERALL = "overall"
"""Value of the ``site`` column on the row that pools every site."""

EXTERNAL_SUFFIX = " (external)"
"""Appended to the name of an external site (one the model was not trained on) in tables and plots."""

LABELS = {
    "prevalence": "prevalence",
    "tpr": "TPR",
    "tnr": "TNR",
    "balanced_accuracy": "BA",
    "auroc": "AUROC",
}

_COUNT_COLUMNS = ("n", "n_patients", "n_positive", "n_negative", "n_patients_positive", "n_patients_negative", "tp", "fp", "tn", "fn")

CSV_COLUMNS: tuple[str, ...] = (
    "site",
    *_COUNT_COLUMNS,
    *(f"{m}{suffix}" for m in SITE_METRICS for suffix in ("", "_ci_low", "_ci_high", "_n_valid_boot")),
    *(f"{m}_wilson_{end}" for m in WILSON_METRICS for end in ("low", "high")),
    *(f"{m}_small" for m in SITE_METRICS),
    "external",
)
"""Columns of :func:`to_csv_rows` / ``report.csv``, in order."""


# -- small helpers --------------------------------------------------------------------------


def none_to_nan(x: Any) -> float:
    """A report value as float; ``None`` (JSON null, as :func:`nan_to_none` writes NaN) → NaN."""
    return float("nan") if x is None else float(x)


def _fmt_ci(value: Any, ci: Sequence[Any] | None, digits: int = 3) -> str:
    text = format_value(none_to_nan(value), digits)
    if text == "n/a" or ci is None:
        return text
    lo, hi = (none_to_nan(c) for c in ci)
    if math.isnan(lo) or math.isnan(hi):
        return text
    return f"{text} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _fmt_diff(a: Any, b: Any, digits: int = 3) -> str:
    d = none_to_nan(b) - none_to_nan(a)
    return "n/a" if math.isnan(d) else f"{d:+.{digits}f}"


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _wilson(entry: Mapping[str, Any]) -> Mapping[str, Any]:
    """The Wilson intervals of an entry (computed from its counts for a report written before them)."""
    return entry.get("wilson") or wilson_intervals(entry)


def _site_cells(e: Mapping[str, Any], digits: int) -> list[str]:
    """The cells of one row of :func:`to_markdown` after the site name: n (patients), prevalence
    (k/n) [Wilson], then TPR and TNR each as value [bootstrap CI] k/n and its Wilson interval,
    then BA and AUROC with their bootstrap CI; values on small cells marked."""
    small, wilson = small_cells(e), _wilson(e)
    cells = [
        f"{e['n']} ({e.get('n_patients', 'n/a')})",
        mark_small(f"{format_value(none_to_nan(e['prevalence']), digits)} ({fraction(e, 'prevalence')}) "
                   f"{interval_text(wilson.get('prevalence'), digits)}", small["prevalence"]),
    ]
    for m in ("tpr", "tnr"):
        cells += [mark_small(f"{_fmt_ci(e[m], e['ci'].get(m), digits)} {fraction(e, m)}", small[m]),
                  interval_text(wilson.get(m), digits)]
    return cells + [mark_small(_fmt_ci(e[m], e["ci"].get(m), digits), small[m]) for m in ("balanced_accuracy", "auroc")]


def _ci_pct(report: Mapping[str, Any]) -> str:
    return f"{100 * none_to_nan(report['bootstrap']['ci']):g}%"


def external_sites(*reports: Mapping[str, Any]) -> set[str]:
    """The sites any of ``reports`` marks external (none for a report written before external
    sites existed)."""
    return {str(s) for r in reports for s in r.get("external_sites") or ()}


def site_label(site: str, external: set[str]) -> str:
    """``site`` as tables and plots show it: with :data:`EXTERNAL_SUFFIX` when external."""
    return site + EXTERNAL_SUFFIX if site in external else site


def _rows(report: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(site, entry) for every site in report order, then (``"overall"``, overall)."""
    return [(s, report["by_group"][s]) for s in report["sites"]] + [(OVERALL, report["overall"])]


def nan_to_none(obj: Any) -> Any:
    """Copy of ``obj`` with float NaN/±inf replaced by None (strict JSON has no NaN)."""
    if isinstance(obj, Mapping):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [nan_to_none(v) for v in obj]
    if isinstance(obj, float | np.floating) and not math.isfinite(float(obj)):
        return None
    return obj


# -- Markdown -------------------------------------------------------------------------------


def to_markdown(
    report: Mapping[str, Any],
    *,
    run_name: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    digits: int = 3,
) -> str:
    """Markdown summary of a site report.

    A heading (``run_name``), optional ``metadata`` as a bullet list, then the table
    ``site | n | prevalence | TPR [CI] | TNR [CI] | BA [CI] | AUROC [CI]`` with one row per site
    and a bold ``overall`` row, then the summary lines (worst site, max − min gaps,
    equalized odds difference) and how the intervals were obtained; with a ``site_probe`` entry
    (``cxrdebias evaluate``), the site-leakage section of :func:`~cxrdebias.evaluation.leakage.probe_markdown`.
    """
    pct = _ci_pct(report)
    lines: list[str] = []
    lines.append(f"# {run_name}" if run_name else "# Per-site evaluation")
    lines.append("")
    if metadata:
        lines += [f"- {_cell(k)}: {_cell(v)}" for k, v in metadata.items()]
        lines.append("")
    header = [
        "site", "n (patients)", "prevalence (pos/n) [Wilson]", f"TPR [{pct} CI] TP/pos", f"TPR Wilson {pct}",
        f"TNR [{pct} CI] TN/neg", f"TNR Wilson {pct}", f"BA [{pct} CI]", f"AUROC [{pct} CI]",
    ]
    lines.append(_row(header))
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    ext = external_sites(report) & set(report["sites"])
    rows = _rows(report)
    for site, e in rows:
        cells = [site_label(site, ext), *_site_cells(e, digits)]
        if site == OVERALL:
            cells = [f"**{c}**" for c in cells]
        lines.append(_row(cells))
    lines.append("")
    lines.append(
        f"- pos/neg: the site's positive/negative images; brackets after a value: {pct} patient-level bootstrap "
        f"interval; Wilson: the Wilson score {pct} interval of the proportion (images as independent trials)"
    )
    if any(any(small_cells(e).values()) for _, e in rows):
        lines.append(f"- {SMALL_LEGEND}")

    worst = report["worst_site"]
    gmin = report["group_min"]
    diff = report["difference"]
    eod = report["equalized_odds_difference"]
    if ext:
        lines.append(
            f"- external sites (not in training): {_cell(', '.join(sorted(ext)))} — in the overall row, "
            "not in the summaries across sites below" + ("" if len(ext) < len(report["sites"]) else " (all sites are external)")
        )
    lines.append(
        f"- worst site (lowest balanced accuracy): {_cell(worst['site'])} — BA "
        f"{format_value(none_to_nan(worst['balanced_accuracy']), digits)}; minimum BA over sites "
        f"{_fmt_ci(gmin['balanced_accuracy'], gmin['ci'].get('balanced_accuracy'), digits)}"
    )
    for m in ("balanced_accuracy", "tpr", "tnr", "auroc"):
        lines.append(
            f"- {LABELS[m]} gap (max − min across sites): "
            f"{_fmt_ci(diff[m], diff['ci'].get(m), digits)}"
        )
    lines.append(
        "- equalized odds difference (max of TPR and FPR gaps): "
        f"{_fmt_ci(eod['value'], eod['ci'], digits)}"
    )
    boot = report["bootstrap"]
    per_site = " on the per-site mapped scores, i.e. each site's own threshold below," if "site_thresholds" in report else ""
    lines.append(
        f"- threshold: {none_to_nan(report['threshold']):.6g}{per_site} (positive if {report['positive_if']}); "
        f"{pct} percentile intervals from {boot['n_boot']} {boot['unit']}-level bootstrap "
        f"resamples within each site (seed {boot['seed']})"
    )
    if "site_thresholds" in report:
        lines += ["", *site_thresholds_markdown(report["site_thresholds"], digits)]
    if "site_probe" in report:
        lines += ["", *probe_markdown(report["site_probe"], digits)]
    if "calibration" in report:
        lines += ["", *calibration_markdown(report["calibration"], ext)]
    return "\n".join(lines).rstrip("\n") + "\n"


def compare_markdown(
    report_a: Mapping[str, Any],
    report_b: Mapping[str, Any],
    name_a: str = "A",
    name_b: str = "B",
    *,
    digits: int = 3,
) -> str:
    """Two runs side by side per site, as in EnD's Table 5 (Tartaglione et al., CVPR 2021:
    vanilla vs EnD per hospital).

    For TPR, TNR, balanced accuracy and AUROC: the value of run A, of run B and Δ = B − A,
    per site (union of both reports' sites; a site missing from one run shows ``n/a``), the
    pooled ``overall`` row, then worst-site BA, BA gap and equalized odds difference, the
    site probe's mean AUROC when both reports have one and, when either has them, the per-layer
    probe of both side by side (:mod:`cxrdebias.evaluation.leakage`).
    """
    metrics = ("tpr", "tnr", "balanced_accuracy", "auroc")
    header = ["site", "n (pos / neg)"]
    for m in metrics:
        header += [f"{LABELS[m]} {name_a}", f"{LABELS[m]} {name_b}", f"Δ{LABELS[m]}"]
    lines = [f"# {name_a} vs {name_b}", "", _row(header)]
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")

    sites = list(report_a["sites"]) + [s for s in report_b["sites"] if s not in report_a["sites"]]
    ext = external_sites(report_a, report_b)
    empty: dict[str, Any] = {}
    any_small = False
    for site in [*sites, OVERALL]:
        ea = report_a["overall"] if site == OVERALL else report_a["by_group"].get(site, empty)
        eb = report_b["overall"] if site == OVERALL else report_b["by_group"].get(site, empty)
        na, nb = (f"{e['n']} ({class_sizes_text(e)})" if e else None for e in (ea, eb))
        n = str(na if na is not None else nb) if na == nb or None in (na, nb) else f"{na} vs {nb}"
        cells = [site_label(site, ext), n]
        small_a, small_b = (small_cells(e) if e else {} for e in (ea, eb))
        for m in metrics:
            a, b = ea.get(m), eb.get(m)
            cells += [mark_small(format_value(none_to_nan(a), digits), small_a.get(m, False)),
                      mark_small(format_value(none_to_nan(b), digits), small_b.get(m, False)), _fmt_diff(a, b, digits)]
        any_small = any_small or any(small_a.values()) or any(small_b.values())
        if site == OVERALL:
            cells = [f"**{c}**" for c in cells]
        lines.append(_row(cells))
    lines.append("")
    if any_small:
        lines.append(f"- {SMALL_LEGEND}")
    if ext:
        lines.append(f"- external sites (not in training): {_cell(', '.join(sorted(ext)))}; not in the summaries below")

    def summary(label: str, a: Any, b: Any) -> str:
        return f"- {label}: {name_a} {format_value(none_to_nan(a), digits)}, {name_b} {format_value(none_to_nan(b), digits)} (Δ {_fmt_diff(a, b, digits)})"

    wa, wb = report_a["worst_site"], report_b["worst_site"]
    lines.append(
        summary(
            f"worst-site BA ({name_a}: {wa['site']}, {name_b}: {wb['site']})",
            wa["balanced_accuracy"],
            wb["balanced_accuracy"],
        )
    )
    for m in ("balanced_accuracy", "tpr", "tnr"):
        lines.append(
            summary(f"{LABELS[m]} gap (max − min)", report_a["difference"][m], report_b["difference"][m])
        )
    lines.append(
        summary(
            "equalized odds difference",
            report_a["equalized_odds_difference"]["value"],
            report_b["equalized_odds_difference"]["value"],
        )
    )
    probes = [r.get("site_probe") or {} for r in (report_a, report_b)]
    if all("mean_auroc" in p for p in probes):
        lines.append(summary("site-probe AUROC (mean over classes; 0.5 = no site left)", *(p["mean_auroc"] for p in probes)))
    lines += ["", *probe_compare_markdown(*probes, name_a, name_b, digits)]
    return "\n".join(lines).rstrip("\n") + "\n"


# -- CSV / JSON -----------------------------------------------------------------------------


def to_csv_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One dict per site (report order) plus one for ``overall``, keyed by :data:`CSV_COLUMNS`.

    Undefined values are NaN (written as empty cells by :func:`to_csv`).
    """
    rows = []
    for site, e in _rows(report):
        row: dict[str, Any] = {"site": site}
        for c in _COUNT_COLUMNS:  # a report from before the per-class counts: empty cells
            row[c] = int(e[c]) if e.get(c) is not None else math.nan
        for m in SITE_METRICS:
            lo, hi = e["ci"].get(m, (None, None))
            row[m] = none_to_nan(e[m])
            row[f"{m}_ci_low"] = none_to_nan(lo)
            row[f"{m}_ci_high"] = none_to_nan(hi)
            row[f"{m}_n_valid_boot"] = int(e["n_valid_boot"].get(m, 0))
        for m, (lo, hi) in _wilson(e).items():
            row[f"{m}_wilson_low"], row[f"{m}_wilson_high"] = none_to_nan(lo), none_to_nan(hi)
        row.update({f"{m}_small": int(v) for m, v in small_cells(e).items()})
        row["external"] = int(bool(e.get("external", False)))
        rows.append(row)
    return rows


def to_csv(report: Mapping[str, Any]) -> str:
    """The rows of :func:`to_csv_rows` as CSV text (header first; NaN → empty cell)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in to_csv_rows(report):
        writer.writerow(  # site names are manifest text: no live spreadsheet formula
            {k: ("" if isinstance(v, float) and math.isnan(v) else spreadsheet_safe(v)) for k, v in row.items()}
        )
    return buf.getvalue()


def write_csv(report: Mapping[str, Any], path: str | Path) -> Path:
    """Write :func:`to_csv` to ``path`` atomically; returns the path."""
    path = Path(path)
    write_text_atomic(path, to_csv(report))
    return path


def write_report(
    report: Mapping[str, Any],
    out_dir: str | Path,
    stem: str = "report",
    *,
    run_name: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.csv`` and ``<stem>.md`` into ``out_dir``, each atomically.

    The JSON is the report with NaN written as ``null`` (strict JSON), plus ``run_name`` and
    ``metadata`` when given. Returns ``{"json": path, "csv": path, "md": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "csv": out / f"{stem}.csv", "md": out / f"{stem}.md"}
    doc: dict[str, Any] = {}
    if run_name is not None:
        doc["run_name"] = run_name
    if metadata:
        doc["metadata"] = dict(metadata)
    doc.update(report)
    write_json_atomic(paths["json"], nan_to_none(doc))
    write_csv(report, paths["csv"])
    write_text_atomic(paths["md"], to_markdown(report, run_name=run_name, metadata=metadata))
    return paths


# -- figure ---------------------------------------------------------------------------------


def plot_site_report(
    report: Mapping[str, Any],
    path_png: str | Path,
    *,
    y_true: Any = None,
    y_score: Any = None,
    sites: Any = None,
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """Save a PNG of the report: per-site TPR/TNR bars with their bootstrap intervals, and —
    when ``y_true``, ``y_score`` and ``sites`` are given (the arrays the report was computed
    from) — the ROC curve of every site and of all sites pooled, each with its operating point
    at the report's threshold. Written atomically; returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    raw = (y_true, y_score, sites)
    if any(a is not None for a in raw) and not all(a is not None for a in raw):
        raise ValueError("plot_site_report: pass y_true, y_score and sites together (or none)")
    with_roc = y_true is not None

    fig = Figure(figsize=(11 if with_roc else 6.5, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_bar = fig.add_subplot(1, 2 if with_roc else 1, 1)
    rows = _rows(report)
    ext = external_sites(report)
    x = np.arange(len(rows))
    width = 0.38
    for offset, m, color in ((-width / 2, "tpr", "tab:red"), (width / 2, "tnr", "tab:blue")):
        wilson = np.array([[none_to_nan(c) for c in _wilson(e)[m]] for _, e in rows])  # beside the bar
        ax_bar.vlines(x + offset + 0.3 * width, wilson[:, 0], wilson[:, 1], color="0.25", lw=2,
                      label="Wilson" if m == "tpr" else None)
        vals = np.array([none_to_nan(e[m]) for _, e in rows])
        cis = np.array([[none_to_nan(c) for c in e["ci"].get(m, (None, None))] for _, e in rows])
        # error bars only where both the value and its interval are defined
        err = np.vstack([vals - cis[:, 0], cis[:, 1] - vals])
        err = np.where(np.isfinite(err), np.clip(err, 0, None), 0.0)
        bars = ax_bar.bar(x + offset, np.nan_to_num(vals), width, color=color, label=LABELS[m],
                          yerr=err, capsize=3, error_kw={"elinewidth": 1})
        for bar, (site, e) in zip(bars, rows, strict=True):
            if site in ext:  # external sites: hatched bars
                bar.set_hatch("//")
                bar.set_edgecolor("white")
            if small_cells(e)[m]:
                ax_bar.text(bar.get_x() + bar.get_width() / 2, 1.03, SMALL_MARK, ha="center", fontsize=9)
    ax_bar.set_xticks(x, [f"{site_label(s, ext)}\n{class_sizes_text(e)}" for s, e in rows], rotation=30, ha="right")
    ax_bar.set_ylim(0, 1.18)
    ax_bar.set_yticks(np.linspace(0, 1, 6))
    ax_bar.set_ylabel("rate")
    small = any(any(small_cells(e).values()) for _, e in rows)
    ax_bar.set_title(f"TPR / TNR per site ({_ci_pct(report)} bootstrap CI, grey: Wilson)" + ("; hatched: external" if ext else "")
                     + (f"\n{SMALL_MARK}: fewer than {SMALL_CELL} patients" if small else ""), fontsize="medium")
    ax_bar.legend(loc="upper center", ncols=3, frameon=False)
    ax_bar.grid(axis="y", alpha=0.3)

    if with_roc:
        from sklearn.metrics import roc_curve

        t = binary_labels(y_true, "y_true")
        s = score_array(y_score, t.shape[0])
        site_str = np.array([str(v) for v in as_numpy(sites).reshape(-1).tolist()])
        if site_str.shape[0] != t.shape[0]:
            raise ValueError(f"sites: expected {t.shape[0]} labels, got {site_str.shape[0]}")
        ax_roc = fig.add_subplot(1, 2, 2)
        ax_roc.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--")
        for site, e in rows:
            mask = slice(None) if site == OVERALL else site_str == site
            ts, ss = t[mask], s[mask]
            if ts.all() or not ts.any():
                continue  # ROC undefined with one class
            fpr, tpr, _ = roc_curve(ts, ss)
            kw = {"color": "black", "lw": 2} if site == OVERALL else {"lw": 1.3, "ls": "--" if site in ext else "-"}
            (line,) = ax_roc.plot(fpr, tpr, label=f"{site_label(site, ext)} (AUROC {format_value(none_to_nan(e['auroc']))})", **kw)
            ax_roc.plot(1 - none_to_nan(e["tnr"]), none_to_nan(e["tpr"]), "o", color=line.get_color(), ms=5)
        ax_roc.set_xlim(0, 1)
        ax_roc.set_ylim(0, 1.02)
        ax_roc.set_xlabel("1 − specificity (FPR)")
        ax_roc.set_ylabel("sensitivity (TPR)")
        ax_roc.set_title(f"ROC per site (dots: threshold {none_to_nan(report['threshold']):.3g})")
        ax_roc.legend(loc="lower right", fontsize="small")
    if title:
        fig.suptitle(title)

    return write_png_atomic(fig, path_png, dpi)
