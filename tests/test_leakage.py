"""Bias leakage (issue 21 item 3): the linear site probe on the frozen bottleneck, within each class."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cxrdebias.data.synthetic import SynthConfig
from cxrdebias.evaluation.leakage import (
    probe_compare_markdown,
    probe_markdown,
    site_probe,
    site_probe_by_layer,
)
from cxrdebias.evaluation.report import compare_markdown
from cxrdebias.evaluation.site_report import site_report
from cxrdebias.experiments.evaluate import evaluate_run
from tests.conftest import tiny_synthetic_cxr_run


def _data(rng, n_per_cell: int, sites=("a", "b"), dim: int = 8, shift: float = 0.0):
    """``n_per_cell`` samples per (class, site); feature 0 is ``shift`` × site index (+ noise)."""
    x, s, y = [], [], []
    for c in (0, 1):
        for k, site in enumerate(sites):
            f = rng.normal(size=(n_per_cell, dim))
            f[:, 0] = shift * k + 0.01 * f[:, 0]
            f[:, 1] += c  # the class is in the features too (the probe must not use it)
            x.append(f)
            s += [site] * n_per_cell
            y += [c] * n_per_cell
    return np.concatenate(x), np.array(s), np.array(y)


def test_site_linearly_separable_within_each_class_gives_auroc_1():
    rng = np.random.default_rng(0)
    probe = site_probe(*_data(rng, 40, shift=5.0), *_data(rng, 40, shift=5.0))
    for c in ("0", "1"):
        assert probe["by_class"][c]["auroc"] == 1.0
        assert probe["by_class"][c]["n_val"] == 80 and probe["by_class"][c]["n_test"] == 80
    assert probe["mean_auroc"] == 1.0
    # three sites: macro one-vs-rest AUROC
    three = ("a", "b", "c")
    probe3 = site_probe(*_data(rng, 40, three, shift=5.0), *_data(rng, 40, three, shift=5.0))
    assert probe3["mean_auroc"] == pytest.approx(1.0)


def test_features_independent_of_the_site_give_auroc_near_half():
    # The probe is fitted on validation only, so its test scores are independent of the test
    # sites: each class's AUROC follows the null Mann–Whitney distribution, sd =
    # sqrt((n0 + n1 + 1) / (12 n0 n1)) = 0.018 for 500 + 500 images; 0.07 is ~4 sd per class
    # (the mean of two classes has sd 0.013, so 0.05 is ~4 sd as well).
    rng = np.random.default_rng(1)
    probe = site_probe(*_data(rng, 300), *_data(rng, 500))
    for c in ("0", "1"):
        assert abs(probe["by_class"][c]["auroc"] - 0.5) < 0.07
    assert abs(probe["mean_auroc"] - 0.5) < 0.05


def test_a_class_with_a_single_site_is_nan_with_a_reason():
    rng = np.random.default_rng(2)
    xv, sv, yv = _data(rng, 30, shift=5.0)
    xt, st, yt = _data(rng, 30, shift=5.0)
    sv = np.where(yv == 1, "a", sv)  # class 1: site a only in validation
    probe = site_probe(xv, sv, yv, xt, st, yt)
    one = probe["by_class"]["1"]
    assert math.isnan(one["auroc"]) and "validation has 1 site" in one["reason"]
    assert probe["mean_auroc"] == probe["by_class"]["0"]["auroc"] == 1.0
    st = np.where(yt == 0, "b", st)  # class 0: site b only in test
    probe = site_probe(xv, sv, yv, xt, st, yt)
    assert math.isnan(probe["by_class"]["0"]["auroc"]) and "test has 1 site" in probe["by_class"]["0"]["reason"]
    assert math.isnan(probe["mean_auroc"])
    md = "\n".join(probe_markdown(probe))
    assert "n/a (validation has 1 site" in md and "**n/a**" in md


def test_external_test_sites_are_left_out_with_a_note():
    rng = np.random.default_rng(3)
    xv, sv, yv = _data(rng, 30, shift=5.0)
    xt, st, yt = _data(rng, 30, ("a", "b", "ext"), shift=5.0)
    probe = site_probe(xv, sv, yv, xt, st, yt)
    assert probe["excluded_sites"] == ["ext"] and "ext" in probe["note"] and "60 test image(s)" in probe["note"]
    assert probe["by_class"]["0"]["n_test"] == 60 and probe["mean_auroc"] == 1.0


def test_bad_shapes_are_refused():
    rng = np.random.default_rng(4)
    xv, sv, yv = _data(rng, 5)
    with pytest.raises(ValueError, match="features_test: expected 8 columns"):
        site_probe(xv, sv, yv, xv[:, :3], sv, yv)
    with pytest.raises(ValueError, match="sites_val: expected 20 values"):
        site_probe(xv, sv[:3], yv, xv, sv, yv)


def test_per_layer_probe_finds_the_site_only_in_the_layer_it_is_planted_in():
    # the site is linearly decodable in "mid" only; "early" and "late" are noise of other widths
    rng = np.random.default_rng(5)
    (xv, sv, yv), (xt, st, yt) = _data(rng, 300, shift=5.0), _data(rng, 500, shift=5.0)
    val = {"early": rng.normal(size=(len(sv), 4)), "mid": xv, "late": rng.normal(size=(len(sv), 16))}
    test = {"early": rng.normal(size=(len(st), 4)), "mid": xt, "late": rng.normal(size=(len(st), 16))}
    layers = site_probe_by_layer(val, sv, yv, test, st, yt, seed=0, modules={"early": "a.0", "mid": "a.1"})
    assert list(layers) == ["early", "mid", "late"]
    assert [e["dim"] for e in layers.values()] == [4, 8, 16]
    assert layers["early"]["module"] == "a.0" and "module" not in layers["late"]
    assert layers["mid"]["mean_auroc"] == 1.0 and all(layers["mid"]["by_class"][c]["auroc"] == 1.0 for c in ("0", "1"))
    for name in ("early", "late"):  # null AUROC: sd 0.013 for the mean of two classes of 500 + 500 (see above)
        assert abs(layers[name]["mean_auroc"] - 0.5) < 0.05
    # each layer's probe is site_probe on that layer (same rows, same seed)
    assert layers["late"]["mean_auroc"] == site_probe(val["late"], sv, yv, test["late"], st, yt, seed=0)["mean_auroc"]
    md = "\n".join(probe_markdown(dict(site_probe(xv, sv, yv, xt, st, yt), layers=layers)))
    assert "### Site leakage by layer" in md
    assert "| mid | a.1 | 8 | 1.000 | 1.000 | 1.000 |" in md
    assert f"| early | a.0 | 4 | {layers['early']['by_class']['0']['auroc']:.3f} |" in md
    with pytest.raises(ValueError, match="layer 'late': features_test: expected 16 columns"):
        site_probe_by_layer(val, sv, yv, dict(test, late=test["late"][:, :3]), st, yt)
    with pytest.raises(ValueError, match="expected the layers"):
        site_probe_by_layer(val, sv, yv, {"mid": xt}, st, yt)


def test_compare_shows_the_per_layer_probe_of_both_runs_side_by_side():
    def probe(**means):
        return {"mean_auroc": means["bottleneck"], "by_class": {}, "layers": {k: {"mean_auroc": v, "by_class": {}} for k, v in means.items()}}

    a = probe(block1=0.9, block2=0.8, bottleneck=0.7)
    b = probe(block1=0.95, block2=None, bottleneck=0.5)
    b["layers"]["layer9"] = {"mean_auroc": 0.6, "by_class": {}}
    lines = probe_compare_markdown(a, b, "A", "B")
    assert lines[2:4] == ["| layer | A | B | Δ |", "|---|---:|---:|---:|"]
    assert lines[4:8] == [
        "| block1 | 0.900 | 0.950 | +0.050 |",
        "| block2 | 0.800 | n/a | n/a |",
        "| bottleneck | 0.700 | 0.500 | -0.200 |",
        "| layer9 | n/a | 0.600 | n/a |",
    ]
    assert probe_compare_markdown({"absent": "why"}, {"mean_auroc": 0.5}, "A", "B") == []
    y, s, sites = np.array([1, 0, 1, 0]), np.array([0.9, 0.2, 0.6, 0.4]), np.array(["a", "a", "b", "b"])
    r = site_report(y, s, sites, threshold=0.5, n_boot=0)
    md = compare_markdown(dict(r, site_probe=a), dict(r, site_probe=b), "A", "B")
    assert "## Site probe by layer" in md and "| bottleneck | 0.700 | 0.500 | -0.200 |" in md and md.endswith("|\n")
    assert "Site probe by layer" not in compare_markdown(r, r, "A", "B")


# -- end to end: `cxrdebias evaluate` of a tiny synthetic run --------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("leakage")
    synth = SynthConfig(
        seed=3, image_size=48, bias_strength=0.5,
        n_train_patients_per_site=6, n_val_patients_per_site=10, n_test_patients_per_site=10,
    )
    return tiny_synthetic_cxr_run(root, synth)


def test_evaluate_writes_the_site_probe_into_the_report(tiny_run):
    report = evaluate_run(tiny_run, n_boot=10)
    saved = json.loads((tiny_run / "eval" / "report.json").read_text())
    probe = saved["site_probe"]
    assert set(probe["by_class"]) == {"0", "1"}
    for entry in probe["by_class"].values():
        assert entry["n_val"] > 0 and entry["n_test"] > 0
        assert entry["auroc"] is None or 0.0 <= entry["auroc"] <= 1.0
    assert probe["mean_auroc"] is not None and 0.0 <= probe["mean_auroc"] <= 1.0
    # the probe saw every test image of the evaluated split (no external site here)
    assert sum(e["n_test"] for e in probe["by_class"].values()) == saved["overall"]["n"]
    md = (tiny_run / "eval" / "report.md").read_text()
    assert "## Site leakage (linear probe on the bottleneck)" in md and "**mean**" in md
    assert report["site_probe"]["mean_auroc"] == pytest.approx(probe["mean_auroc"])
    # per layer: the DenseNet's four stages, then the bottleneck (the same probe as the top-level fields)
    layers = probe["layers"]
    assert list(layers) == ["block1", "block2", "block3", "block4", "bottleneck"]
    assert [e["module"] for e in layers.values()] == [
        "features.transition1", "features.transition2", "features.transition3", "activation", "bottleneck",
    ]
    assert [e["dim"] for e in layers.values()] == [128, 256, 512, 1024, 1024]
    assert layers["bottleneck"]["mean_auroc"] == probe["mean_auroc"]
    assert {c: e["auroc"] for c, e in layers["bottleneck"]["by_class"].items()} == {c: e["auroc"] for c, e in probe["by_class"].items()}
    for e in layers.values():
        assert set(e["by_class"]) == {"0", "1"} and 0.0 <= e["mean_auroc"] <= 1.0
    assert "### Site leakage by layer" in md
    assert all(f"| {name} | {e['module']} | {e['dim']} |" in md for name, e in layers.items())


def test_evaluate_on_the_validation_split_says_why_the_probe_is_absent(tiny_run, tmp_path):
    evaluate_run(tiny_run, split="val", out=tmp_path / "ev", n_boot=0)
    saved = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert "validation split the probe is fitted on" in saved["site_probe"]["absent"]
    assert "Not computed: the evaluated split is the validation split" in (tmp_path / "ev" / "report.md").read_text()


def test_compare_shows_the_probe_of_both_runs_only_when_both_have_it():
    y, s, sites = np.array([1, 0, 1, 0]), np.array([0.9, 0.2, 0.6, 0.4]), np.array(["a", "a", "b", "b"])
    a = site_report(y, s, sites, threshold=0.5, n_boot=0)
    b = dict(a, site_probe={"mean_auroc": 0.61, "by_class": {}})
    a_probed = dict(a, site_probe={"mean_auroc": 0.83, "by_class": {}})
    md = compare_markdown(a_probed, b, "A", "B")
    assert "- site-probe AUROC (mean over classes; 0.5 = no site left): A 0.830, B 0.610 (Δ -0.220)" in md
    assert "site-probe" not in compare_markdown(a, b, "A", "B")
    assert "site-probe" not in compare_markdown(dict(a, site_probe={"absent": "why"}), b, "A", "B")


def test_evaluate_data_fits_the_probe_on_the_runs_validation_split_or_says_why_not(tiny_run, tmp_path):
    import shutil

    manifest = Path(json.loads((tiny_run / "results.json").read_text())["config"]["data"]["manifest"])
    evaluate_run(tiny_run, manifest=manifest, out=tmp_path / "ev", n_boot=0)
    probe = json.loads((tmp_path / "ev" / "report.json").read_text())["site_probe"]
    assert probe["mean_auroc"] is not None and set(probe["by_class"]) == {"0", "1"}
    # the run's own manifest gone (only a copy evaluated): the report says why the probe is absent
    copy = tmp_path / "copy"
    shutil.copytree(manifest.parent, copy)
    moved = manifest.parent.with_name("moved")
    manifest.parent.rename(moved)
    try:
        evaluate_run(tiny_run, manifest=copy / manifest.name, out=tmp_path / "ev2", n_boot=0)
    finally:
        moved.rename(manifest.parent)
    saved = json.loads((tmp_path / "ev2" / "report.json").read_text())
    assert "the run's validation split could not be read" in saved["site_probe"]["absent"]
