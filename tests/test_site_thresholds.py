"""Post-hoc per-site thresholds (cxrdebias evaluate --site-thresholds): the thresholds by hand,
the score map (decisions and within-site AUROC exactly kept), and evaluate end to end on a tiny
synthetic run with an external site."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import rankdata

from cxrdebias.data.synthetic import SynthConfig
from cxrdebias.errors import ConfigError
from cxrdebias.evaluation.metrics import auroc, binary_counts, youden_threshold
from cxrdebias.evaluation.site_report import site_report
from cxrdebias.evaluation.thresholds import DECISION, choose_site_thresholds, site_threshold_scores
from cxrdebias.experiments.evaluate import evaluate_run
from tests.conftest import run_cli, single_torch_thread, tiny_synthetic_cxr_run


def test_per_site_thresholds_by_hand():
    # a: separable, J = 1 only at 0.3. b: J = 0.5 (0.95), 0.167 (0.75), 0.667 (0.7), 0.333 (0.6), 0 (0.5) → 0.7.
    # c: negatives only. d: a training site without validation images. ext: not a training site.
    y = [0, 0, 1, 1, 0, 0, 0, 1, 1, 0, 0]
    s = [0.1, 0.2, 0.3, 0.9, 0.5, 0.6, 0.75, 0.7, 0.95, 0.2, 0.8]
    site = ["a"] * 4 + ["b"] * 5 + ["c"] * 2
    chosen = choose_site_thresholds(
        y, s, site, sites=["b", "a", "c", "d", "ext", "a"], training_sites={"a": 0, "b": 1, "c": 2, "d": 3}, global_threshold=0.45
    )
    assert list(chosen) == ["a", "b", "c", "d", "ext"]
    assert chosen["a"] == {"threshold": 0.3, "source": "validation", "n_val": 4, "n_val_positive": 2}
    assert chosen["b"] == {"threshold": 0.7, "source": "validation", "n_val": 5, "n_val_positive": 2}
    assert chosen["c"] == {"threshold": 0.45, "source": "global: validation images of one class only (2 negative)", "n_val": 2, "n_val_positive": 0}
    assert chosen["d"] == {"threshold": 0.45, "source": "global: no validation images", "n_val": 0, "n_val_positive": 0}
    assert chosen["ext"] == {"threshold": 0.45, "source": "global: external site (not in training)", "n_val": 0, "n_val_positive": 0}
    # the same rule as the model's global threshold, per site
    assert chosen["b"]["threshold"] == youden_threshold(y[4:9], s[4:9])


def test_the_score_map_by_hand():
    scores = [0.0, 0.15, 0.3, 0.65, 1.0, 0.2, 1.0, 0.4]
    sites = ["a"] * 5 + ["u"] * 2 + ["z"]
    mapped = site_threshold_scores(scores, sites, {"a": 0.3, "u": 1.0, "z": 0.0})
    # a: 0 → 0, 0.15 → 0.25, t → 0.5, 0.65 → 0.75, 1 → 1; u (t = 1): below → s/2, 1 → 0.5; z (t = 0): 0.5 + s/2
    assert mapped.tolist() == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 0.1, 0.5, 0.7])
    with pytest.raises(ValueError, match="no threshold for site 'u'"):
        site_threshold_scores(scores, sites, {"a": 0.3, "z": 0.0})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        site_threshold_scores([1.5], ["a"], {"a": 0.3})


def test_the_map_keeps_every_decision_and_the_within_site_auroc_exactly():
    """float32 probabilities as the model gives them, with saturated 0/1 scores, scores equal to
    the threshold and their float32 neighbours: s' ≥ 0.5 ⇔ s ≥ t, and the ranks within a site
    (hence AUROC) are the same."""
    rng = np.random.default_rng(0)
    thresholds = {"a": np.float32(0.3), "b": np.float32(0.9999), "c": np.float32(1.0), "d": np.float32(1e-6), "e": np.float32(0.5)}
    s_parts, site_parts, y_parts = [], [], []
    for site, t in thresholds.items():
        t = np.float32(t)
        near = [t, np.nextafter(t, np.float32(0)), np.nextafter(t, np.float32(1)), np.float32(0), np.float32(1)]
        s = np.concatenate([rng.random(300).astype(np.float32), np.array(near * 3, dtype=np.float32)])
        s_parts.append(s)
        site_parts += [site] * s.size
        y_parts.append((rng.random(s.size) < np.clip(s, 0.05, 0.95)).astype(int))
    s, sites, y = np.concatenate(s_parts).astype(np.float64), np.array(site_parts), np.concatenate(y_parts)
    t = np.array([float(thresholds[k]) for k in sites])
    mapped = site_threshold_scores(s, sites, {k: float(v) for k, v in thresholds.items()})
    assert np.array_equal(mapped >= DECISION, s >= t)
    for site in thresholds:
        m = sites == site
        assert np.array_equal(rankdata(mapped[m]), rankdata(s[m]))
        assert auroc(y[m], mapped[m]) == auroc(y[m], s[m])
    # the per-site report on the mapped scores at 0.5 = each site at its own threshold
    report = site_report(y, mapped, sites, threshold=DECISION, n_boot=0)
    for site in thresholds:
        m = sites == site
        tp, fp, tn, fn = binary_counts(y[m], s[m] >= t[m])
        entry = report["by_group"][site]
        assert (entry["tp"], entry["fp"], entry["tn"], entry["fn"]) == (tp, fp, tn, fn)
        assert entry["auroc"] == auroc(y[m], s[m])


# --- evaluate --site-thresholds on a tiny synthetic run -------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("site-thresholds")
    synth = SynthConfig(
        seed=3, image_size=48, bias_strength=0.5, external_sites=1,
        n_train_patients_per_site=6, n_val_patients_per_site=10, n_test_patients_per_site=10,
    )
    with single_torch_thread():
        return tiny_synthetic_cxr_run(root, synth)


def test_evaluate_with_site_thresholds(tiny_run, monkeypatch, capsys):
    with single_torch_thread():
        plain = evaluate_run(tiny_run, n_boot=10)
        code, stdout, err = run_cli(["evaluate", tiny_run, "--site-thresholds", "--n-boot", "10"], monkeypatch, capsys)
        assert code == 0, err
        evaluate_run(tiny_run, split="val", out=tiny_run / "eval_val", n_boot=0)  # the validation scores, for checking
    out = tiny_run / "eval_site_thresholds"
    assert "eval_site_thresholds" in err and (tiny_run / "eval" / "report.json").is_file()  # side by side
    report = json.loads((out / "report.json").read_text())
    model_threshold = json.loads((tiny_run / "results.json").read_text())["threshold"]
    section = report["site_thresholds"]
    assert report["threshold"] == 0.5 and section["global_threshold"] == model_threshold
    assert report["threshold_method"].startswith("per site: Youden's J") and section["method"] == report["threshold_method"]
    # each training site's threshold is Youden's J on its own validation images (from the plain val evaluation)
    val = pd.read_csv(tiny_run / "eval_val" / "predictions.csv", dtype={"site": str})
    assert set(section["by_site"]) == {"hospital_a", "hospital_b", "external_1"}
    for site in ("hospital_a", "hospital_b"):
        rows = val[val["site"] == site]
        entry = section["by_site"][site]
        assert entry["source"] == "validation" and entry["n_val"] == len(rows) and entry["n_val_positive"] == rows["label"].sum()
        # (the CSV holds the float32 probabilities in their shortest float32 form)
        assert entry["threshold"] == youden_threshold(rows["label"], rows["probability"].to_numpy(np.float32))
    # the external site falls back to the model's global threshold
    ext = section["by_site"]["external_1"]
    assert ext["threshold"] == model_threshold and ext["source"] == "global: external site (not in training)"
    # within-site AUROC unchanged; the decisions are each site's own threshold
    for site in ("hospital_a", "hospital_b", "external_1"):
        assert report["by_group"][site]["auroc"] == pytest.approx(plain["by_group"][site]["auroc"], abs=0)
    preds = pd.read_csv(out / "predictions.csv", dtype={"site": str})
    assert (preds["threshold"] == preds["site"].map({k: v["threshold"] for k, v in section["by_site"].items()})).all()
    # the probabilities are float32 (written in their shortest float32 form): compared as such, a
    # probability equal to a threshold (frequent with bf16 scores) stays equal
    probability = preds["probability"].to_numpy(np.float32).astype(np.float64)
    assert (preds["predicted"] == (probability >= preds["threshold"]).astype(int)).all()
    for site, rows in preds.groupby("site"):
        entry = report["by_group"][site]
        assert (entry["tp"], entry["fp"]) == (int(((rows.predicted == 1) & (rows.label == 1)).sum()), int(((rows.predicted == 1) & (rows.label == 0)).sum()))
    md = (out / "report.md").read_text()
    assert "## Per-site thresholds (post hoc)" in md and "global: external site (not in training)" in md
    assert "## Per-site thresholds" in stdout
    # the site probe is still there (it shares the validation predictions)
    assert report["site_probe"]["mean_auroc"] is not None


def test_site_thresholds_are_refused_on_the_validation_split(tiny_run, tmp_path):
    with pytest.raises(ConfigError, match="--site-thresholds: the thresholds are chosen on the validation split"):
        evaluate_run(tiny_run, split="val", out=tmp_path / "x", site_thresholds=True)
    assert not (tmp_path / "x").exists()
