"""Paired differences of two runs on the same test patients (``cxrdebias compare``)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cxrdebias.errors import DataError
from cxrdebias.evaluation.paired import PairedDelta, paired_differences, paired_markdown
from cxrdebias.evaluation.site_report import site_report
from cxrdebias.experiments.evaluate import compare_runs


def _predictions(labels, probability, predicted, sites, patients=None) -> pd.DataFrame:
    n = len(labels)
    return pd.DataFrame(
        {
            "path": [f"img{i}.png" for i in range(n)],
            "patient_id": patients if patients is not None else [f"p{i}" for i in range(n)],
            "site": sites,
            "label": labels,
            "probability": probability,
            "predicted": predicted,
        }
    )


def _random_run(seed: int, n: int = 80) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    labels = np.tile([0, 1], n // 2)
    score = np.clip(0.5 * labels + rng.normal(0.25, 0.25, n), 0, 1)
    return _predictions(labels, score, (score >= 0.5).astype(int), ["a"] * (n // 2) + ["b"] * (n // 2))


def test_a_run_compared_with_itself_differs_by_exactly_zero():
    a = _random_run(0)
    res = paired_differences(a, a.sample(frac=1, random_state=1), n_boot=200)  # row order does not matter
    assert set(res) == {"a", "b", "overall"}
    for values in res.values():
        for d in values.values():
            assert d.delta == 0 and d.low == 0 and d.high == 0 and not d.significant


def test_hand_computed_differences_and_their_intervals():
    # site a: B finds both positives that A missed; the negatives are right in both runs
    labels = [1, 1, 0, 0, 1, 1, 0, 0]
    sites = ["a"] * 4 + ["b"] * 4
    a = _predictions(labels, [0.4, 0.3, 0.2, 0.1, 0.9, 0.8, 0.2, 0.1], [0, 0, 0, 0, 1, 1, 0, 0], sites)
    b = _predictions(labels, [0.9, 0.8, 0.2, 0.1, 0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0, 1, 1, 0, 0], sites)
    res = paired_differences(a, b, n_boot=300)
    assert res["a"]["tpr"].delta == 1.0 and res["a"]["tnr"].delta == 0.0 and res["a"]["balanced_accuracy"].delta == 0.5
    assert res["a"]["auroc"].delta == 0.0  # both rank every positive above every negative
    # every resample that holds a positive gives ΔTPR = 1 (those without one have no TPR and are left out)
    assert res["a"]["tpr"].low == res["a"]["tpr"].high == 1.0 and res["a"]["tpr"].significant
    assert all(d.delta == 0 and d.low == d.high == 0 for d in res["b"].values())  # site b: the same predictions
    assert res["overall"]["tpr"].delta == 0.5  # 2 of the 4 positives


def test_a_difference_carried_by_one_patient_is_not_significant():
    # one patient with 3 images that only B gets right, among 5 patients with one image each: the
    # patient is drawn as a whole, so about a third of the draws hold none of its images (Δ = 0).
    # Resampling images instead would almost always keep one of its 3 images: "significant".
    labels = [1, 1, 1, 1, 0, 0, 1, 0]
    patients = ["p0", "p0", "p0", "p1", "p2", "p3", "p4", "p5"]
    sites = ["a"] * 8
    a = _predictions(labels, [0.1] * 3 + [0.9, 0.1, 0.1, 0.9, 0.1], [0, 0, 0, 1, 0, 0, 1, 0], sites, patients)
    b = _predictions(labels, [0.9] * 3 + [0.9, 0.1, 0.1, 0.9, 0.1], [1, 1, 1, 1, 0, 0, 1, 0], sites, patients)
    res = paired_differences(a, b, n_boot=400, seed=3)
    d = res["a"]["tpr"]
    assert d.delta == pytest.approx(3 / 5)
    assert d.low == 0.0 and not d.significant  # draws without p0 change nothing
    assert d.high <= 1.0 and 0 < d.n_valid <= 400


def test_the_runs_must_share_their_test_images_and_labels():
    a = _random_run(0)
    with pytest.raises(DataError, match="not scored on the same test images"):
        paired_differences(a, a.iloc[:-1])
    other = a.copy()
    other.loc[0, "label"] = 1 - other.loc[0, "label"]
    with pytest.raises(DataError, match="different labels"):
        paired_differences(a, other)
    with pytest.raises(DataError, match="no column probability"):
        paired_differences(a, a.drop(columns="probability"))


def test_markdown_marks_the_significant_differences():
    res = {"a": {k: PairedDelta(0.1, 0.02, 0.2, 100) for k in ("tpr", "tnr", "balanced_accuracy")} | {"auroc": PairedDelta(0.0, -0.1, 0.1, 100)}}
    text = paired_markdown(res, "vanilla", "EnD", n_boot=100, n={"a": 40})
    assert "| a | 40 | +0.100 [0.020, 0.200] * | +0.100 [0.020, 0.200] * | +0.100 [0.020, 0.200] * | +0.000 [-0.100, 0.100] |" in text
    assert "EnD − vanilla" in text and "100 paired bootstrap" in text


def _evaluated_run(root, name: str, preds: pd.DataFrame) -> None:
    folder = root / name / "eval"
    folder.mkdir(parents=True)
    report = site_report(
        preds["label"].to_numpy(), preds["probability"].to_numpy(), preds["site"].to_numpy(), threshold=0.5,
        patient_ids=preds["patient_id"].to_numpy(), n_boot=0,
    )
    report["method"] = {"name": name}
    (folder / "report.json").write_text(json.dumps(report, default=float))
    preds.to_csv(folder / "predictions.csv", index=False)


def test_compare_adds_the_paired_table_for_runs_on_the_same_test_split(tmp_path):
    a, b = _random_run(0), _random_run(0)
    b["probability"] = np.clip(b["probability"] + 0.2 * (b["label"] * 2 - 1), 0, 1)  # B separates the classes better
    b["predicted"] = (b["probability"] >= 0.5).astype(int)
    _evaluated_run(tmp_path, "vanilla", a)
    _evaluated_run(tmp_path, "end", b)
    text = compare_runs(tmp_path / "vanilla", tmp_path / "end", n_boot=200)
    assert "## Paired differences end (end) − vanilla (vanilla) (same test patients)" in text
    n_pos = int(a["label"].sum())
    rows = [line for line in text.splitlines() if line.startswith(f"| overall | 80 ({n_pos}+ / {80 - n_pos}−) |")]
    assert len(rows) == 1 and rows[0].count("*") >= 1  # a consistent improvement is significant overall
    assert compare_runs(tmp_path / "vanilla", tmp_path / "end", n_boot=200) == text  # seeded: the same intervals
    assert "Paired differences" not in compare_runs(tmp_path / "vanilla", tmp_path / "end", n_boot=0)
