"""Honest small samples (issue 24, item 3): Wilson intervals beside the bootstrap, n per cell,
small cells marked, a warning for a threshold chosen on few validation images."""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest

from cxrdebias.evaluation.proportions import (
    SMALL_MARK,
    cell_sizes,
    small_cells,
    threshold_sample_warning,
    wilson_interval,
)
from cxrdebias.evaluation.report import compare_markdown, plot_site_report, to_csv, to_markdown
from cxrdebias.evaluation.site_report import site_report


def _wilson_by_hand(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson (1927): (p + z²/2n ± z·sqrt(p(1−p)/n + z²/4n²)) / (1 + z²/n)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


@pytest.mark.parametrize(
    "k,n,expected",
    [(5, 5, (0.5655, 1.0)), (0, 5, (0.0, 0.4345)), (1, 2, (0.0945, 0.9055)), (18, 20, (0.6990, 0.9721))],
)
def test_wilson_intervals_match_the_hand_computed_ones(k, n, expected):
    low, high = wilson_interval(k, n)
    assert (low, high) == pytest.approx(expected, abs=1e-4)
    assert (low, high) == pytest.approx(_wilson_by_hand(k, n), abs=1e-9)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_five_correct_negatives_are_not_a_certain_tnr():
    """The issue's case: a site with 5 test negatives all correct reads TNR 1.000 [1.000, 1.000]
    under the bootstrap; its Wilson interval is [0.566, 1.000] and the cell is marked small."""
    y = np.array([0] * 5 + [1] * 5)
    s = np.array([0.1] * 5 + [0.9] * 5)
    r = site_report(y, s, ["a"] * 10, threshold=0.5, n_boot=200, seed=0)
    e = r["by_group"]["a"]
    assert e["ci"]["tnr"] == [1.0, 1.0]
    assert e["wilson"]["tnr"] == pytest.approx([0.5655, 1.0], abs=1e-4)
    assert e["n_negative"] == 5 and e["n_patients_negative"] == 5
    row = next(line for line in to_markdown(r).splitlines() if line.startswith("| a |"))
    assert f"| 1.000 [1.000, 1.000] 5/5 {SMALL_MARK} | [0.566, 1.000] |" in row


def test_cell_sizes_count_patients_per_class():
    t = np.array([True, True, True, False, False])
    pid = np.array(["p1", "p1", "p2", "p3", "p3"])  # two images of p1 and of p3
    assert cell_sizes(t, pid) == {"n_negative": 2, "n_patients_positive": 2, "n_patients_negative": 1}
    assert cell_sizes(t, None) == {"n_negative": 2, "n_patients_positive": 3, "n_patients_negative": 2}


def _report(n_pos: int, n_neg: int, images_per_patient: int = 1):
    rng = np.random.default_rng(0)
    rows = []
    for site in ("a", "b"):
        for label, n in ((1, n_pos), (0, n_neg)):
            for p in range(n):
                for _ in range(images_per_patient):
                    rows.append((site, label, f"{site}{label}-{p}", rng.uniform(0.4, 1.0) if label else rng.uniform(0.0, 0.6)))
    sites, y, pid, s = (np.array(c) for c in zip(*rows, strict=True))
    return site_report(y.astype(int), s.astype(float), sites, threshold=0.5, patient_ids=pid, n_boot=20, seed=0)


def test_small_cells_are_marked_and_large_ones_are_not():
    large = _report(25, 30)  # per site: 25 positive and 30 negative patients, one image each
    for text in (to_markdown(large), compare_markdown(large, large)):
        assert SMALL_MARK not in text  # neither marks nor the legend
    assert "| a | 55 (55) |" in to_markdown(large)
    rows = list(csv.DictReader(io.StringIO(to_csv(large))))
    assert {r["tpr_small"] for r in rows} == {"0"} and rows[0]["n_patients_positive"] == "25"

    # 30 positive images but only 15 positive patients per site: TPR, BA, AUROC marked, TNR not
    mixed = _report_mixed()
    e = mixed["by_group"]["a"]
    assert e["n_positive"] == 30 and e["n_patients_positive"] == 15
    assert small_cells(e) == {"prevalence": False, "tpr": True, "tnr": False, "balanced_accuracy": True, "auroc": True}
    md = to_markdown(mixed)
    cells = next(line for line in md.splitlines() if line.startswith("| a |")).split(" | ")
    assert cells[3].endswith(f"{e['tp']}/30 {SMALL_MARK}")  # TPR: TP / positives
    assert cells[5].endswith(f"{e['tn']}/30")  # TNR: TN / negatives, 30 patients: not marked
    assert md.count(f"{SMALL_MARK} n<20") == 1  # the legend line
    compare = compare_markdown(mixed, mixed, "x", "y")
    assert f"{SMALL_MARK} n<20" in compare and "| a | 60 (30+ / 30−) |" in compare
    rows = list(csv.DictReader(io.StringIO(to_csv(mixed))))
    assert (rows[0]["tpr_small"], rows[0]["tnr_small"]) == ("1", "0")


def _report_mixed():
    """Per site: 15 positive patients with two images each, 30 negative patients with one."""
    rng = np.random.default_rng(1)
    rows = []
    for site in ("a", "b"):
        rows += [(site, 1, f"{site}p{p}", rng.uniform(0.4, 1.0)) for p in range(15) for _ in range(2)]
        rows += [(site, 0, f"{site}n{p}", rng.uniform(0.0, 0.6)) for p in range(30)]
    sites, y, pid, s = (np.array(c) for c in zip(*rows, strict=True))
    return site_report(y.astype(int), s.astype(float), sites, threshold=0.5, patient_ids=pid, n_boot=20, seed=0)


def test_reports_from_before_the_new_counts_still_render(tmp_path):
    """compare reads report.json files written by older versions: no wilson, no per-class patients."""
    r = _report_mixed()
    for e in [r["overall"], *r["by_group"].values()]:
        for key in ("wilson", "n_negative", "n_patients_positive", "n_patients_negative"):
            del e[key]
    md = to_markdown(r)
    row = next(line for line in md.splitlines() if line.startswith("| a |"))
    assert "/30 |" in row  # TP/positives from the confusion counts
    assert "| a | 60 (30+ / 30−) |" in compare_markdown(r, r)
    plot_site_report(r, tmp_path / "old.png")


def test_the_plot_shows_small_cells(tmp_path):
    """report.png draws with small cells (marks, Wilson bars, class sizes under the sites)."""
    from PIL import Image

    path = plot_site_report(_report_mixed(), tmp_path / "r.png")
    assert Image.open(path).size[0] > 100


def test_threshold_warning_fires_below_50_validation_images():
    assert threshold_sample_warning(200) is None
    assert threshold_sample_warning(50) is None
    warning = threshold_sample_warning(30)
    assert warning is not None and "30 validation images" in warning and "\n" not in warning
