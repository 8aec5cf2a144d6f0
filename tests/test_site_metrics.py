"""Per-site binary metrics and the patient-level bootstrap of :func:`site_report`."""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from cxrdebias.evaluation.metrics import (
    BinaryCounts,
    auroc,
    balanced_accuracy,
    binary_counts,
    tnr,
    tpr,
    youden_threshold,
)
from cxrdebias.evaluation.site_report import (
    SITE_METRICS,
    SUMMARY_METRICS,
    score_levels,
    site_report,
    weighted_auroc,
)

# --- a 10-sample, 2-site example computed by hand (threshold 0.5) ------------------------------
# site A: y 1 1 0 0 0, score .9 .3 .6 .2 .1 → pred 1 0 1 0 0: TP1 FN1 FP1 TN2
#         TPR 1/2, TNR 2/3, FPR 1/3, BA 7/12; AUROC: .9 beats 3 negatives, .3 beats 2 → 5/6
# site B: y 1 1 1 0 0, score .8 .7 .6 .55 .05 → pred 1 1 1 1 0: TP3 FN0 FP1 TN1
#         TPR 1, TNR 1/2, FPR 1/2, BA 3/4; AUROC 1
# overall: TP4 FN1 FP2 TN3: TPR 4/5, TNR 3/5, BA 7/10, prevalence 1/2
Y = np.array([1, 1, 0, 0, 0, 1, 1, 1, 0, 0])
S = np.array([0.9, 0.3, 0.6, 0.2, 0.1, 0.8, 0.7, 0.6, 0.55, 0.05])
SITES = np.array(["A"] * 5 + ["B"] * 5)


def _random_data(n=300, n_sites=3, n_patients=120, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = np.round(np.clip(0.35 * y + rng.random(n) * 0.7, 0, 1), 2)  # rounded: score ties occur
    sites = rng.choice([f"site{k}" for k in range(n_sites)], n)
    pids = np.array([f"{site}-p{rng.integers(n_patients)}" for site in sites])
    return y, s, sites, pids


def _assert_same(a, b, path="report", rtol=0.0, atol=0.0):
    """Deep equality of two reports, NaN equal to NaN, floats to a tolerance."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}[{k!r}]", rtol, atol)
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}[{i}]", rtol, atol)
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rtol, abs_tol=atol), (
            f"{path}: {a} != {b}"
        )
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _numbers(entry):
    """The point estimates of a report entry (no intervals)."""
    return {k: v for k, v in entry.items() if k not in ("ci", "n_valid_boot")}


# --- elementary metrics -------------------------------------------------------------------------


def test_binary_counts_and_rates_by_hand():
    pred = S >= 0.5
    assert binary_counts(Y[:5], pred[:5]) == BinaryCounts(tp=1, fp=1, tn=2, fn=1)
    tp, fp, tn, fn = binary_counts(Y, pred)
    assert (tp, fp, tn, fn) == (4, 2, 3, 1)
    assert tpr(Y[:5], pred[:5]) == pytest.approx(1 / 2)
    assert tnr(Y[:5], pred[:5]) == pytest.approx(2 / 3)
    assert balanced_accuracy(Y[:5], pred[:5]) == pytest.approx(7 / 12)
    assert balanced_accuracy(Y, pred) == pytest.approx(0.7)
    assert auroc(Y[:5], S[:5]) == pytest.approx(5 / 6)
    assert auroc(Y[5:], S[5:]) == pytest.approx(1.0)


def test_rates_undefined_are_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert binary_counts([], []) == BinaryCounts(0, 0, 0, 0)
        assert math.isnan(tpr([0, 0], [1, 0]))
        assert tnr([0, 0], [1, 0]) == 0.5
        assert math.isnan(balanced_accuracy([0, 0], [1, 0]))
        assert math.isnan(tnr([1, 1], [1, 0]))
        assert math.isnan(tpr([], []))
        assert math.isnan(auroc([1, 1, 1], [0.1, 0.5, 0.9]))
        assert math.isnan(auroc([], []))


def test_inputs_accept_tensors_and_bools_and_reject_non_binary():
    pred = S >= 0.5
    assert binary_counts(torch.tensor(Y), torch.tensor(pred)) == binary_counts(Y.astype(bool), pred)
    assert auroc(torch.tensor(Y), torch.tensor(S)) == pytest.approx(auroc(Y, S))
    with pytest.raises(ValueError, match="0/1"):
        binary_counts([0, 2], [0, 1])
    with pytest.raises(ValueError, match="length"):
        binary_counts([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="finite"):
        auroc([0, 1], [0.2, float("nan")])


# --- Youden threshold ---------------------------------------------------------------------------


def test_youden_threshold_by_hand():
    # thresholds (score >= t): .9 → TPR 1/3 FPR 0 (J 1/3); .7 → 2/3, 0 (J 2/3, the maximum);
    # .6 → 2/3, 1/2; .5 → 1, 1/2; .2 → 1, 1
    y = [0, 0, 1, 1, 1]
    s = [0.2, 0.6, 0.5, 0.7, 0.9]
    assert youden_threshold(y, s) == 0.7


def test_youden_threshold_ties_take_the_largest_threshold():
    # t = .8: TPR 1/2, FPR 0 (J 1/2); t = .35: TPR 1, FPR 1/2 (J 1/2) → tie, .8 is returned
    y = [0, 0, 1, 1]
    s = [0.1, 0.4, 0.35, 0.8]
    assert youden_threshold(y, s) == 0.8
    # order of samples does not matter
    assert youden_threshold(y[::-1], s[::-1]) == 0.8


def test_youden_threshold_returns_an_observed_score_and_separates_perfectly():
    y = np.array([0, 0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.7, 0.9])
    t = youden_threshold(y, s)
    assert t == 0.7 and np.array_equal(s >= t, y.astype(bool))


def test_youden_threshold_single_class_raises():
    with pytest.raises(ValueError, match="both classes"):
        youden_threshold([1, 1, 1], [0.2, 0.5, 0.9])
    with pytest.raises(ValueError, match="both classes"):
        youden_threshold([], [])


# --- site_report: point estimates ---------------------------------------------------------------


def test_site_report_by_hand():
    r = site_report(Y, S, SITES, threshold=0.5, n_boot=50)
    a, b, o = r["by_group"]["A"], r["by_group"]["B"], r["overall"]
    assert r["sites"] == ["A", "B"]
    assert (a["tp"], a["fp"], a["tn"], a["fn"]) == (1, 1, 2, 1)
    assert (b["tp"], b["fp"], b["tn"], b["fn"]) == (3, 1, 1, 0)
    assert (o["tp"], o["fp"], o["tn"], o["fn"]) == (4, 2, 3, 1)
    assert a["n"] == a["n_patients"] == 5 and o["n"] == 10
    assert a["prevalence"] == pytest.approx(0.4) and b["prevalence"] == pytest.approx(0.6)
    assert a["tpr"] == pytest.approx(0.5) and a["tnr"] == pytest.approx(2 / 3)
    assert a["balanced_accuracy"] == pytest.approx(7 / 12) and a["auroc"] == pytest.approx(5 / 6)
    assert b["tpr"] == 1.0 and b["tnr"] == 0.5 and b["balanced_accuracy"] == 0.75
    assert b["auroc"] == 1.0
    assert o["tpr"] == pytest.approx(0.8) and o["tnr"] == pytest.approx(0.6)
    assert o["balanced_accuracy"] == pytest.approx(0.7) and o["prevalence"] == 0.5
    assert o["auroc"] == pytest.approx(roc_auc_score(Y, S))
    assert r["worst_site"] == {"site": "A", "balanced_accuracy": pytest.approx(7 / 12)}
    assert r["group_min"]["balanced_accuracy"] == pytest.approx(7 / 12)
    assert r["group_max"]["tpr"] == 1.0
    assert r["difference"]["balanced_accuracy"] == pytest.approx(0.75 - 7 / 12)
    assert r["difference"]["tpr"] == pytest.approx(0.5)
    assert r["difference"]["tnr"] == pytest.approx(2 / 3 - 1 / 2)
    eod = r["equalized_odds_difference"]
    assert eod["tpr_difference"] == pytest.approx(0.5)
    assert eod["fpr_difference"] == pytest.approx(1 / 2 - 1 / 3)
    assert eod["value"] == pytest.approx(0.5)
    assert r["threshold"] == 0.5 and r["positive_if"] == "score >= threshold"


def _from_counts(counts):
    """Labels, scores (1 = predicted positive) and sites realising given (tp, fp, tn, fn) per site."""
    ys, ss, sites = [], [], []
    for k, (tp, fp, tn, fn) in enumerate(counts):
        for label, score, m in ((1, 1.0, tp), (0, 1.0, fp), (0, 0.0, tn), (1, 0.0, fn)):
            ys += [label] * m
            ss += [score] * m
            sites += [k] * m
    return np.array(ys), np.array(ss), np.array(sites)


def test_equalized_odds_difference_by_hand_fpr_dominates():
    # TPR 1/2, 3/4, 3/5 → gap 1/4;  FPR 1/10, 2/5, 1/5 → gap 3/10;  EOD = max = 0.3
    y, s, sites = _from_counts([(1, 1, 9, 1), (3, 2, 3, 1), (3, 1, 4, 2)])
    r = site_report(y, s, sites, threshold=0.5, n_boot=0)
    assert r["sites"] == ["0", "1", "2"]
    eod = r["equalized_odds_difference"]
    assert eod["tpr_difference"] == pytest.approx(0.25)
    assert eod["fpr_difference"] == pytest.approx(0.3)
    assert eod["value"] == pytest.approx(0.3)
    assert eod["n_valid_boot"] == 0 and all(math.isnan(c) for c in eod["ci"])


def test_equalized_odds_difference_matches_fairlearn():
    fairlearn_metrics = pytest.importorskip("fairlearn.metrics")
    y, s, sites, _ = _random_data(n=400, n_sites=4)
    r = site_report(y, s, sites, threshold=0.5, n_boot=0)
    expected = fairlearn_metrics.equalized_odds_difference(y, s >= 0.5, sensitive_features=sites)
    assert r["equalized_odds_difference"]["value"] == pytest.approx(expected)


def test_single_class_site_gives_nan_and_is_left_out_of_summaries():
    y = np.r_[Y, [0, 0, 0, 0]]
    s = np.r_[S, [0.1, 0.7, 0.2, 0.3]]
    sites = np.r_[SITES, ["C"] * 4]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = site_report(y, s, sites, threshold=0.5, n_boot=200)
    c = r["by_group"]["C"]
    assert c["n_positive"] == 0 and c["prevalence"] == 0.0
    assert math.isnan(c["tpr"]) and math.isnan(c["balanced_accuracy"]) and math.isnan(c["auroc"])
    assert c["tnr"] == pytest.approx(0.75)
    for m in ("tpr", "balanced_accuracy", "auroc"):
        assert c["n_valid_boot"][m] == 0 and all(math.isnan(v) for v in c["ci"][m])
    assert c["n_valid_boot"]["tnr"] == 200
    # summaries over the sites where each metric is defined
    assert r["worst_site"]["site"] == "A"
    assert r["difference"]["tpr"] == pytest.approx(0.5)  # A and B only
    assert r["difference"]["tnr"] == pytest.approx(0.75 - 0.5)  # A, B and C
    eod = r["equalized_odds_difference"]
    assert eod["fpr_difference"] == pytest.approx(0.5 - 0.25)
    assert eod["value"] == pytest.approx(0.5)
    assert 0 < eod["n_valid_boot"] <= 200


def test_input_validation():
    with pytest.raises(ValueError, match="no samples"):
        site_report([], [], [], threshold=0.5)
    with pytest.raises(ValueError, match="site labels"):
        site_report(Y, S, SITES[:-1], threshold=0.5)
    with pytest.raises(ValueError, match="patient_ids"):
        site_report(Y, S, SITES, threshold=0.5, patient_ids=np.arange(3))
    with pytest.raises(ValueError, match="ci"):
        site_report(Y, S, SITES, threshold=0.5, ci=95)
    with pytest.raises(ValueError, match="n_boot"):
        site_report(Y, S, SITES, threshold=0.5, n_boot=-1)


# --- site_report: bootstrap ---------------------------------------------------------------------


def test_weighted_auroc_equals_sklearn_on_unit_and_integer_weights():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60).astype(bool)
    s = np.round(rng.random(60), 1)  # many ties
    order = np.argsort(s, kind="stable")
    levels = score_levels(s[order])
    w = np.vstack([np.ones(60), rng.integers(0, 4, 60)]).astype(float)
    got = weighted_auroc(y[order], levels, w[:, order])
    assert got[0] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    rep = w[1].astype(int)
    assert got[1] == pytest.approx(roc_auc_score(np.repeat(y, rep), np.repeat(s, rep)), abs=1e-12)


def _reference_bootstrap(y, s, sites, pids, threshold, n_boot, seed):
    """Loop implementation of the documented scheme: per site (sorted), its own
    ``SeedSequence(seed).spawn`` stream draws patients (sorted ids) with replacement; every image
    of a drawn patient comes along. Returns {site or "overall": {metric: samples}}."""
    names = np.unique(sites)
    rngs = [np.random.default_rng(q) for q in np.random.SeedSequence(seed).spawn(len(names))]
    draws = {}
    for name, rng in zip(names, rngs, strict=True):
        ids = np.unique(pids[sites == name])
        draws[name] = (ids, rng.integers(0, ids.size, size=(n_boot, ids.size)))
    out = {str(k): {m: [] for m in SITE_METRICS} for k in [*names, "overall"]}
    for i in range(n_boot):
        pooled = []
        for name in names:
            ids, idx = draws[name]
            take = np.concatenate([np.flatnonzero((sites == name) & (pids == ids[j])) for j in idx[i]])
            pooled.append(take)
            for key, t in ((str(name), take),):
                _append_metrics(out[key], y[t], s[t], threshold)
        t = np.concatenate(pooled)
        _append_metrics(out["overall"], y[t], s[t], threshold)
    return out


def _append_metrics(acc, y, s, threshold):
    pred = s >= threshold
    acc["prevalence"].append(y.mean())
    acc["tpr"].append(tpr(y, pred))
    acc["tnr"].append(tnr(y, pred))
    acc["balanced_accuracy"].append(balanced_accuracy(y, pred))
    acc["auroc"].append(auroc(y, s))


def test_vectorised_bootstrap_matches_a_loop_over_resamples():
    y, s, sites, pids = _random_data(n=90, n_sites=2, n_patients=12, seed=5)
    n_boot = 60
    r = site_report(y, s, sites, threshold=0.5, patient_ids=pids, n_boot=n_boot, seed=11)
    ref = _reference_bootstrap(y, s, sites, pids, 0.5, n_boot, 11)
    for key, samples in ref.items():
        entry = r["overall"] if key == "overall" else r["by_group"][key]
        for m in SITE_METRICS:
            v = np.array(samples[m], dtype=float)
            assert entry["n_valid_boot"][m] == np.count_nonzero(~np.isnan(v)), (key, m)
            expected = np.nanpercentile(v, [2.5, 97.5])
            np.testing.assert_allclose(entry["ci"][m], expected, rtol=1e-12, err_msg=f"{key} {m}")


def test_report_does_not_depend_on_sample_order():
    y, s, sites, pids = _random_data()
    perm = np.random.default_rng(1).permutation(y.size)
    for patient_ids in (pids, None):
        r1 = site_report(y, s, sites, threshold=0.5, patient_ids=patient_ids, n_boot=200)
        p2 = None if patient_ids is None else patient_ids[perm]
        r2 = site_report(y[perm], s[perm], sites[perm], threshold=0.5, patient_ids=p2, n_boot=200)
        _assert_same(r1, r2, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_report_invariant_to_permutation_property(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(8, 40))
    y = rng.integers(0, 2, n)
    s = np.round(rng.random(n), 1)
    sites = rng.integers(0, 3, n)
    pids = rng.integers(0, 10, n)
    perm = rng.permutation(n)
    r1 = site_report(y, s, sites, threshold=0.5, patient_ids=pids, n_boot=30, seed=seed)
    r2 = site_report(y[perm], s[perm], sites[perm], threshold=0.5, patient_ids=pids[perm], n_boot=30, seed=seed)
    _assert_same(r1, r2, atol=1e-12)


def test_relabelling_sites_does_not_change_the_numbers():
    y, s, sites, pids = _random_data()
    mapping = {"site0": "Zeta hospital", "site1": "alpha", "site2": "Mid"}
    relabelled = np.array([mapping[v] for v in sites])
    r1 = site_report(y, s, sites, threshold=0.5, patient_ids=pids, n_boot=100)
    r2 = site_report(y, s, relabelled, threshold=0.5, patient_ids=pids, n_boot=100)
    for old, new in mapping.items():
        _assert_same(_numbers(r1["by_group"][old]), _numbers(r2["by_group"][new]))
    _assert_same(_numbers(r1["overall"]), _numbers(r2["overall"]))
    for key in ("group_min", "group_max", "difference"):
        _assert_same({m: r1[key][m] for m in SUMMARY_METRICS}, {m: r2[key][m] for m in SUMMARY_METRICS})
    assert mapping[r1["worst_site"]["site"]] == r2["worst_site"]["site"]
    assert r1["equalized_odds_difference"]["value"] == r2["equalized_odds_difference"]["value"]
    # the random stream of a site follows its sorted position, so a relabelling that keeps the
    # sorted order keeps the intervals too
    ordered = np.array([v.replace("site", "hospital_") for v in sites])
    r3 = site_report(y, s, ordered, threshold=0.5, patient_ids=pids, n_boot=100)
    for k in range(3):
        _assert_same(r1["by_group"][f"site{k}"], r3["by_group"][f"hospital_{k}"])
    _assert_same(r1["overall"], r3["overall"])
    _assert_same(r1["equalized_odds_difference"], r3["equalized_odds_difference"])


def test_perfect_classifier_has_ba_one_with_degenerate_interval():
    y, _, sites, pids = _random_data()
    s = y * 0.8 + 0.1
    r = site_report(y, s, sites, threshold=0.5, patient_ids=pids, n_boot=200)
    for e in [r["overall"], *r["by_group"].values()]:
        for m in ("tpr", "tnr", "balanced_accuracy", "auroc"):
            assert e[m] == 1.0 and e["ci"][m] == [1.0, 1.0]
    assert r["difference"]["balanced_accuracy"] == 0.0
    assert r["equalized_odds_difference"]["value"] == 0.0
    assert r["equalized_odds_difference"]["ci"] == [0.0, 0.0]


def test_patient_level_bootstrap_keeps_a_patients_images_together():
    rng = np.random.default_rng(2)
    n_pat, k = 30, 10
    y1 = rng.integers(0, 2, n_pat)
    s1 = np.round(np.clip(0.3 * y1 + rng.random(n_pat) * 0.7, 0, 1), 3)
    site1 = np.where(np.arange(n_pat) < 15, "A", "B")
    pid1 = np.array([f"p{i:02d}" for i in range(n_pat)])
    # every patient has k identical images
    y, s, sites, pids = (np.repeat(a, k) for a in (y1, s1, site1, pid1))
    single = site_report(y1, s1, site1, threshold=0.5, patient_ids=pid1, n_boot=300)
    patient = site_report(y, s, sites, threshold=0.5, patient_ids=pids, n_boot=300)
    image = site_report(y, s, sites, threshold=0.5, n_boot=300)
    assert patient["overall"]["n"] == 300 and patient["overall"]["n_patients"] == 30
    assert image["overall"]["n_patients"] == 300
    # resampling patients of k identical images is resampling one image per patient
    for key in ("A", "B"):
        for m in SITE_METRICS:
            np.testing.assert_allclose(patient["by_group"][key]["ci"][m], single["by_group"][key]["ci"][m], rtol=1e-12)
    # … whereas treating the k copies as independent images gives narrower intervals
    for m in ("tpr", "tnr", "balanced_accuracy", "auroc"):
        width_patient = np.diff(patient["overall"]["ci"][m])[0]
        width_image = np.diff(image["overall"]["ci"][m])[0]
        assert width_image < 0.6 * width_patient, m
    assert patient["bootstrap"]["unit"] == "patient" and image["bootstrap"]["unit"] == "image"


def test_bootstrap_is_deterministic_given_the_seed():
    y, s, sites, pids = _random_data()
    r1 = site_report(y, s, sites, threshold=0.5, patient_ids=pids, n_boot=200, seed=7)
    r2 = site_report(y, s, sites, threshold=0.5, patient_ids=pids, n_boot=200, seed=7)
    r3 = site_report(y, s, sites, threshold=0.5, patient_ids=pids, n_boot=200, seed=8)
    _assert_same(r1, r2)
    assert r1["overall"]["ci"]["balanced_accuracy"] != r3["overall"]["ci"]["balanced_accuracy"]
    _assert_same(_numbers(r1["overall"]), _numbers(r3["overall"]))


def test_intervals_bracket_the_estimates_and_degenerate_resamples_are_counted():
    y, s, sites, pids = _random_data(n=400)
    r = site_report(y, s, sites, threshold=0.5, patient_ids=pids, n_boot=300, ci=0.9)
    for e in [r["overall"], *r["by_group"].values()]:
        for m in SITE_METRICS:
            lo, hi = e["ci"][m]
            assert lo <= hi and lo - 0.05 <= e[m] <= hi + 0.05
            assert e["n_valid_boot"][m] == 300
    assert r["bootstrap"]["ci"] == 0.9
    # a site with a single positive image: many resamples lack a positive
    y2 = np.r_[np.zeros(19, int), 1]
    s2 = np.r_[np.linspace(0, 0.4, 19), 0.9]
    r2 = site_report(y2, s2, ["A"] * 20, threshold=0.5, n_boot=500)
    valid = r2["by_group"]["A"]["n_valid_boot"]
    assert 0 < valid["tpr"] < 500 and valid["tpr"] == valid["auroc"] == valid["balanced_accuracy"]
    assert valid["tnr"] == valid["prevalence"] == 500
    assert r2["by_group"]["A"]["ci"]["tpr"] == [1.0, 1.0]


def test_bootstrap_is_fast():
    y, s, sites, pids = _random_data(n=1000, n_sites=4, n_patients=200)
    start = time.perf_counter()
    site_report(y, s, sites, threshold=0.5, patient_ids=pids, n_boot=1000)
    assert time.perf_counter() - start < 2.0


def test_accepts_tensors():
    r1 = site_report(Y, S, np.array([0] * 5 + [1] * 5), threshold=0.5, n_boot=50)
    r2 = site_report(torch.tensor(Y), torch.tensor(S), torch.tensor([0] * 5 + [1] * 5), threshold=0.5, n_boot=50)
    _assert_same(r1, r2)
    assert r1["sites"] == ["0", "1"]
