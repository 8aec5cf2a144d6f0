"""cxrdebias.evaluation.benchmark_stats: the benchmark's intervals, paired differences and gap
closed, against values computed by hand (scipy only for the t quantile and the reference t-test)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from cxrdebias.evaluation.benchmark_stats import gap_closed, mean_ci, paired_difference


def nan_pair(ci) -> bool:
    return all(math.isnan(x) for x in ci)


# -- mean_ci ---------------------------------------------------------------------------------


def test_mean_ci_is_the_student_t_interval_by_hand():
    # [1, 2, 3, 4]: mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5 → sd = √(5/3)
    sd = math.sqrt(5 / 3)
    half = stats.t.ppf(0.975, df=3) * sd / math.sqrt(4)  # t_{0.975, 3} ≈ 3.182 → half ≈ 2.054
    out = mean_ci([1, 2, 3, 4])
    assert out["n"] == 4
    assert out["mean"] == 2.5
    assert out["sd"] == pytest.approx(sd, rel=1e-12)
    assert out["ci"] == pytest.approx([2.5 - half, 2.5 + half], rel=1e-12)
    assert out["ci"] == pytest.approx([0.4458, 4.5542], abs=1e-4)


def test_mean_ci_other_level_is_wider_or_narrower_as_it_should():
    half90 = stats.t.ppf(0.95, df=3) * math.sqrt(5 / 3) / 2
    assert mean_ci([1, 2, 3, 4], level=0.9)["ci"] == pytest.approx([2.5 - half90, 2.5 + half90], rel=1e-12)


def test_mean_ci_drops_nan_and_inf():
    assert mean_ci([1, float("nan"), 2, 3, float("inf"), 4, -float("inf")]) == mean_ci([1, 2, 3, 4])


def test_mean_ci_one_value_has_no_interval():
    out = mean_ci([0.7, float("nan")])
    assert out["n"] == 1 and out["mean"] == 0.7
    assert math.isnan(out["sd"]) and nan_pair(out["ci"])


def test_mean_ci_no_value():
    for values in ([], [float("nan")]):
        out = mean_ci(values)
        assert out["n"] == 0 and math.isnan(out["mean"]) and math.isnan(out["sd"]) and nan_pair(out["ci"])


def test_mean_ci_zero_spread_is_a_point_interval():
    assert mean_ci([0.25, 0.25, 0.25]) == {"n": 3, "mean": 0.25, "sd": 0.0, "ci": [0.25, 0.25]}


# -- paired_difference -------------------------------------------------------------------------


def test_paired_difference_matches_cells_and_drops_nan():
    # common finite cells: c1, c2, c3 (c4 is NaN in A, c5 only in A, c6 only in B)
    a = {"c1": 1.0, "c2": 2.0, "c3": 3.0, "c4": float("nan"), "c5": 7.0}
    b = {"c6": 1.0, "c3": 3.5, "c1": 2.0, "c2": 4.0, "c4": 9.0}
    out = paired_difference(a, b)
    d = [1.0, 2.0, 0.5]  # B − A on c1, c2, c3
    # mean 7/6; deviations −1/6, 5/6, −2/3 → Σ² = 7/6 → sd = √(7/12)
    sd = math.sqrt(7 / 12)
    half = stats.t.ppf(0.975, df=2) * sd / math.sqrt(3)
    assert out["n"] == 3
    assert out["mean"] == pytest.approx(7 / 6, rel=1e-12)
    assert out["sd"] == pytest.approx(sd, rel=1e-12)
    assert out["ci"] == pytest.approx([7 / 6 - half, 7 / 6 + half], rel=1e-12)
    assert out["p"] == pytest.approx(stats.ttest_rel([2.0, 4.0, 3.5], [1.0, 2.0, 3.0]).pvalue, rel=1e-12)
    assert out["mean"] == pytest.approx(np.mean(d))
    assert out["significant"] is False  # interval ≈ [−0.73, 3.06] contains 0
    assert out["p"] > 0.05


def test_paired_difference_is_b_minus_a_and_flags_significance():
    a = {k: 0.5 for k in range(4)}
    b = {0: 1.5, 1: 1.6, 2: 1.4, 3: 1.5}
    out = paired_difference(a, b)
    assert out["mean"] == pytest.approx(1.0)
    assert out["significant"] is True and out["ci"][0] > 0
    assert out["p"] == pytest.approx(stats.ttest_rel(list(b.values()), list(a.values())).pvalue, rel=1e-12)
    assert out["p"] < 0.001
    back = paired_difference(b, a)
    assert back["mean"] == pytest.approx(-1.0) and back["significant"] is True and back["ci"][1] < 0
    assert back["p"] == pytest.approx(out["p"])


def test_paired_difference_constant_differences():
    out = paired_difference({0: 1.0, 1: 2.0}, {0: 1.5, 1: 2.5})
    assert out["sd"] == 0.0 and out["ci"] == [0.5, 0.5] and out["p"] == 0.0 and out["significant"] is True
    same = paired_difference({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})
    assert same["mean"] == 0.0 and same["ci"] == [0.0, 0.0] and same["significant"] is False


def test_paired_difference_too_few_pairs():
    one = paired_difference({0: 1.0, 1: float("nan")}, {0: 2.0, 1: 3.0})
    assert one["n"] == 1 and one["mean"] == 1.0 and math.isnan(one["p"]) and one["significant"] is False
    none = paired_difference({0: 1.0}, {1: 2.0})
    assert none["n"] == 0 and math.isnan(none["mean"]) and math.isnan(none["p"]) and none["significant"] is False


# -- gap_closed --------------------------------------------------------------------------------

#: four cells: vanilla 0.60 on average, the reference 0.80, the method 0.70 → half the gap
VANILLA = {0: 0.60, 1: 0.62, 2: 0.58, 3: 0.60}
REFERENCE = {0: 0.80, 1: 0.81, 2: 0.79, 3: 0.80}
METHOD = {0: 0.70, 1: 0.72, 2: 0.68, 3: 0.70}


def test_gap_closed_is_the_ratio_of_the_means():
    out = gap_closed(METHOD, VANILLA, REFERENCE)
    assert out["n"] == 4
    assert out["value"] == pytest.approx((0.70 - 0.60) / (0.80 - 0.60), rel=1e-12)  # 0.5
    # tiny exact example: vanilla 0, 0; reference 2, 4 (mean 3); method 1, 0.5 (mean 0.75) → 0.25
    assert gap_closed({"a": 1.0, "b": 0.5}, {"a": 0.0, "b": 0.0}, {"a": 2.0, "b": 4.0})["value"] == 0.25


def test_gap_closed_bootstrap_interval_brackets_the_point():
    out = gap_closed(METHOD, VANILLA, REFERENCE)
    lo, hi = out["ci"]
    assert lo <= out["value"] <= hi
    # in every resample method − vanilla is 0.1 per cell and reference − vanilla 0.19 … 0.21 per
    # cell, so every resampled ratio lies in [0.1/0.21, 0.1/0.19]
    assert 0.1 / 0.21 - 1e-9 <= lo and hi <= 0.1 / 0.19 + 1e-9
    # the gap itself (reference − vanilla) is clearly there: no note
    assert out["gap"]["significant"] is True and out["gap"]["mean"] == pytest.approx(0.2)
    assert "note" not in out
    # seeded: the same call gives the same interval
    assert gap_closed(METHOD, VANILLA, REFERENCE)["ci"] == out["ci"]


def test_gap_closed_uses_only_cells_all_three_have():
    method = {**METHOD, 4: 0.99}  # no vanilla/reference cell 4
    vanilla = {**VANILLA, 5: 0.1}
    reference = {**REFERENCE, 3: float("nan")}  # cell 3 unusable
    out = gap_closed(method, vanilla, reference)
    assert out["n"] == 3
    assert out["value"] == pytest.approx((2.10 / 3 - 1.80 / 3) / (2.40 / 3 - 1.80 / 3), rel=1e-12)


def test_gap_closed_notes_a_gap_that_is_not_significant():
    vanilla = {0: 0.60, 1: 0.70, 2: 0.50}
    reference = {0: 0.65, 1: 0.62, 2: 0.55}  # differences +0.05, −0.08, +0.05: no measurable gap
    method = {0: 0.63, 1: 0.68, 2: 0.53}
    out = gap_closed(method, vanilla, reference)
    assert out["gap"]["significant"] is False
    assert "not significant" in out["note"]
    assert math.isfinite(out["value"])  # still reported, with the note


def test_gap_closed_without_common_cells():
    out = gap_closed({0: 0.7}, {1: 0.6}, {2: 0.8})
    assert out["n"] == 0 and math.isnan(out["value"]) and nan_pair(out["ci"])
    assert out["note"].startswith("no cell has")


def test_gap_closed_one_cell_has_no_interval():
    out = gap_closed({0: 0.7}, {0: 0.6}, {0: 0.8})
    assert out["value"] == pytest.approx(0.5) and nan_pair(out["ci"])
    assert "note" not in out  # one cell: no interval at all (the table shows the bare ratio), nothing flagged as "not significant"


def test_gap_closed_equal_reference_and_vanilla_has_no_value():
    out = gap_closed({0: 0.7, 1: 0.8}, {0: 0.6, 1: 0.6}, {0: 0.6, 1: 0.6})
    assert math.isnan(out["value"]) and nan_pair(out["ci"]) and "note" in out
