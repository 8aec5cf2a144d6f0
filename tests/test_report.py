"""Report writers: Markdown, CSV, JSON, PNG and the two-run comparison."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from cxrdebias.evaluation.report import (
    CSV_COLUMNS,
    compare_markdown,
    plot_site_report,
    to_csv,
    to_csv_rows,
    to_markdown,
    write_report,
)
from cxrdebias.evaluation.site_report import SITE_METRICS, site_report

# same hand-checked example as tests/test_site_metrics.py, plus a site C without positives
Y = np.array([1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0])
S = np.array([0.9, 0.3, 0.6, 0.2, 0.1, 0.8, 0.7, 0.6, 0.55, 0.05, 0.1, 0.7, 0.2])
SITES = np.array(["A"] * 5 + ["B"] * 5 + ["C"] * 3)


@pytest.fixture(scope="module")
def report():
    return site_report(Y, S, SITES, threshold=0.5, n_boot=100, seed=0)


def _reject_nan(token):
    raise ValueError(f"non-standard JSON constant {token}")


def test_markdown_table_and_summary(report):
    md = to_markdown(report, run_name="vanilla-covid", metadata={"method": "vanilla"})
    lines = md.splitlines()
    assert lines[0] == "# vanilla-covid"
    assert "- method: vanilla" in lines
    header = next(line for line in lines if line.startswith("| site"))
    assert header == (
        "| site | n (patients) | prevalence (pos/n) [Wilson] | TPR [95% CI] TP/pos | TPR Wilson 95% "
        "| TNR [95% CI] TN/neg | TNR Wilson 95% | BA [95% CI] | AUROC [95% CI] |"
    )
    rows = [line for line in lines if line.startswith("| ") and line != header]
    assert [r.split(" | ")[0] for r in rows] == ["| A", "| B", "| C", "| **overall**"]
    row_a = rows[0]
    lo, hi = report["by_group"]["A"]["ci"]["tpr"]
    # A: 2 positives (1 found), 3 negatives; Wilson of 1/2 is [0.095, 0.905], of 2/5 [0.118, 0.769]
    assert f"| 0.500 [{lo:.3f}, {hi:.3f}] 1/2 ‡ | [0.095, 0.905] |" in row_a
    assert "| 5 (5) | 0.400 (2/5) [0.118, 0.769] ‡ |" in row_a
    row_c = rows[2]
    assert row_c.count("n/a") == 4  # TPR (and its Wilson interval), BA, AUROC undefined without positives
    assert "worst site (lowest balanced accuracy): A" in md
    assert "equalized odds difference" in md and "BA gap" in md
    assert "100 image-level bootstrap" in md


def test_markdown_escapes_pipes_in_site_names():
    r = site_report(Y[:10], S[:10], ["a|b"] * 5 + ["c"] * 5, threshold=0.5, n_boot=0)
    md = to_markdown(r)
    assert "| a\\|b |" in md
    assert "# Per-site evaluation" in md


def test_csv_rows_and_text(report):
    rows = to_csv_rows(report)
    assert [r["site"] for r in rows] == ["A", "B", "C", "overall"]
    assert all(list(r) == list(CSV_COLUMNS) for r in rows)
    for m in SITE_METRICS:
        assert {f"{m}", f"{m}_ci_low", f"{m}_ci_high", f"{m}_n_valid_boot"} <= set(CSV_COLUMNS)
    a = rows[0]
    assert (a["tp"], a["fp"], a["tn"], a["fn"]) == (1, 1, 2, 1)
    assert a["tpr"] == 0.5 and a["tpr_ci_low"] == report["by_group"]["A"]["ci"]["tpr"][0]
    assert math.isnan(rows[2]["tpr"]) and rows[2]["tpr_n_valid_boot"] == 0
    parsed = list(csv.DictReader(to_csv(report).splitlines()))
    assert len(parsed) == 4 and parsed[2]["tpr"] == "" and parsed[2]["tnr"] != ""


def test_write_report_writes_three_files(tmp_path, report):
    paths = write_report(report, tmp_path / "out", run_name="end", metadata={"seed": 1})
    assert {p.name for p in paths.values()} == {"report.json", "report.csv", "report.md"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.csv", "report.json", "report.md"]

    doc = json.loads(paths["json"].read_text(), parse_constant=_reject_nan)  # strict JSON
    assert doc["run_name"] == "end" and doc["metadata"] == {"seed": 1}
    assert doc["by_group"]["C"]["tpr"] is None and doc["by_group"]["A"]["tpr"] == 0.5
    assert doc["by_group"]["C"]["ci"]["tpr"] == [None, None]
    # a report read back from JSON renders like the in-memory one
    assert to_markdown(doc, run_name="end", metadata={"seed": 1}) == paths["md"].read_text()
    assert to_csv(doc) == paths["csv"].read_text()

    with paths["csv"].open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        assert [r["site"] for r in reader] == ["A", "B", "C", "overall"]

    paths2 = write_report(report, tmp_path / "out", stem="val")
    assert paths2["md"].name == "val.md" and paths2["md"].read_text().startswith("# Per-site")


def _check_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.width > 300 and im.height > 200
        return im.size


def test_plot_site_report_with_and_without_roc(tmp_path, report):
    without = _check_png(plot_site_report(report, tmp_path / "bars.png"))
    with_roc = _check_png(
        plot_site_report(report, tmp_path / "roc.png", y_true=Y, y_score=S, sites=SITES, title="t")
    )
    assert with_roc[0] > without[0]  # second panel
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, no leftovers


def test_plot_site_report_from_json_report(tmp_path, report):
    paths = write_report(report, tmp_path)
    doc = json.loads(paths["json"].read_text())
    _check_png(plot_site_report(doc, tmp_path / "fig.png"))


def test_plot_site_report_needs_all_raw_arrays(tmp_path, report):
    with pytest.raises(ValueError, match="together"):
        plot_site_report(report, tmp_path / "x.png", y_true=Y, y_score=S)


def test_compare_markdown_side_by_side(report):
    # run B: a better classifier on the same data, without site C
    s_b = np.where(Y[:10] == 1, 0.9, 0.1)
    other = site_report(Y[:10], s_b, SITES[:10], threshold=0.5, n_boot=0)
    md = compare_markdown(report, other, "vanilla", "EnD")
    lines = md.splitlines()
    assert lines[0] == "# vanilla vs EnD"
    header = next(line for line in lines if line.startswith("| site"))
    for col in ("TPR vanilla", "TPR EnD", "ΔTPR", "TNR EnD", "ΔBA", "AUROC vanilla", "ΔAUROC"):
        assert f" {col} |" in header
    row_a = next(line for line in lines if line.startswith("| A |"))
    cells = [c.strip() for c in row_a.strip("|").split("|")]
    assert cells[:5] == ["A", "5 (2+ / 3−)", "0.500 ‡", "1.000 ‡", "+0.500"]  # TPR: 1/2 → 1; 2 positives
    assert cells[5:8] == ["0.667 ‡", "1.000 ‡", "+0.333"]  # TNR: 2/3 → 1
    row_c = next(line for line in lines if line.startswith("| C |"))
    assert "n/a" in row_c
    assert any(line.startswith("| **overall** |") for line in lines)
    assert "worst-site BA (vanilla: A, EnD: A)" in md
    assert "equalized odds difference: vanilla 0.500, EnD 0.000 (Δ -0.500)" in md


def test_format_value_and_mean_std():
    from cxrdebias.evaluation.formatting import format_mean_std, format_value

    assert format_value(0.12345) == "0.123" and format_value(np.float64(0.5), 2) == "0.50"
    assert format_value(float("nan")) == "n/a" and format_value(None) == "n/a"
    assert format_value(float("nan"), nan="nan") == "nan" and format_value(None, missing="–") == "–"
    assert format_value(7) == "7" and format_value("pseudo") == "pseudo"
    assert format_mean_std([]) == "–"
    assert format_mean_std([0.5]) == "0.50" and format_mean_std([0.5], scale=100, show_n=True) == "50.00 (n=1)"
    assert format_mean_std([1.0, 0.98], scale=100) == "99.00 ± 1.41"
    assert format_mean_std([0.1, 0.3], 3, show_n=True) == "0.200 ± 0.141 (n=2)"
