"""Calibration (ECE, Brier, temperature scaling), the OOD scores, the guarded ONNX graph, old
two-output models and `predict` on labelled manifests (issue 24, items 1, 2 and 4)."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from cxrdebias.deploy.guard import Guard, GuardedModel, layer_module, torch_outputs
from cxrdebias.deploy.onnx_metadata import KEYS, LEGACY_OUTPUT_NAMES
from cxrdebias.deploy.predict import site_files
from cxrdebias.deploy.runtime import load_model
from cxrdebias.errors import ExportError
from cxrdebias.evaluation.calibration import (
    LOG_T_BOUND,
    brier_score,
    calibration_markdown,
    calibration_report,
    expected_calibration_error,
    fit_temperature,
    nll,
    temperature_warning,
    threshold_at_temperature,
)
from cxrdebias.evaluation.ood import (
    energy_scores,
    fit_mahalanobis,
    mahalanobis_scores,
    percentile_threshold,
)
from tests.conftest import run_cli, run_without_its_images


# -- calibration by hand ------------------------------------------------------------------------
def test_ece_by_hand():
    # bins (10 equal-width): 0.05, 0.15 → bins 0, 1; 0.95, 0.95 → bin 9; 1.0 → bin 9 (closed)
    y = [0, 1, 1, 0, 1]
    p = [0.05, 0.15, 0.95, 0.95, 1.0]
    # bin0: n=1 |0-0.05|=0.05; bin1: n=1 |1-0.15|=0.85; bin9: n=3 |2/3-(0.95+0.95+1)/3|=|0.6667-0.9667|=0.3
    expected = (1 * 0.05 + 1 * 0.85 + 3 * 0.3) / 5
    assert expected_calibration_error(y, p) == pytest.approx(expected)
    assert expected_calibration_error([1, 0], [1.0, 0.0]) == 0.0  # perfectly calibrated extremes
    assert expected_calibration_error([1, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert np.isnan(expected_calibration_error([], []))


def test_brier_by_hand():
    # ((0.1-0)^2 + (0.8-1)^2 + (0.6-0)^2) / 3 = (0.01 + 0.04 + 0.36) / 3
    assert brier_score([0, 1, 0], [0.1, 0.8, 0.6]) == pytest.approx(0.41 / 3)
    with pytest.raises(ValueError):
        brier_score([0, 1], [0.1, 1.5])


def test_temperature_of_overconfident_logits_is_above_one():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    # 75% correct but logit gap ±8 (probability ≈ 0.9997): over-confident
    correct = rng.random(400) < 0.75
    sign = np.where(correct, 1.0, -1.0) * np.where(y == 1, 1.0, -1.0)
    logits = np.stack([-4 * sign, 4 * sign], axis=1)
    t = fit_temperature(logits, y)
    assert t > 1.0
    assert nll(logits, y, t) < nll(logits, y, 1.0)
    # at the optimum the positive probability of a correct image is close to the accuracy 0.75
    p = 1 / (1 + np.exp(-8 / t))
    assert p == pytest.approx(0.75, abs=0.03)
    # under-confident logits (gap ±0.1, all correct) want T < 1
    assert fit_temperature(np.stack([-0.05 * np.where(y == 1, 1, -1), 0.05 * np.where(y == 1, 1, -1)], axis=1), y) < 1.0


def test_a_temperature_at_the_edge_of_the_search_is_a_warning_not_a_calibration():
    # regression: a model worse than chance on its validation split (the real-data export of
    # docs/deployment.md: 22 images) got T = e^5 = 148.4, every probability ≈ 0.5, and nothing said so
    y = np.array([0, 1] * 20)
    wrong = np.stack([4.0 * (2 * y - 1), -4.0 * (2 * y - 1)], axis=1)  # confidently wrong on every image
    t = fit_temperature(wrong, y)
    assert t == pytest.approx(np.exp(LOG_T_BOUND), rel=1e-3)
    msg = temperature_warning(t, 40)
    assert msg.startswith("T = 148.4 is at the edge of the search (e^+5): the validation split (40 images) gives no usable")
    assert "towards 0.5" in msg
    assert "to 0 or 1" in temperature_warning(np.exp(-LOG_T_BOUND), None)
    assert temperature_warning(3.8, 421) is None and temperature_warning(np.exp(LOG_T_BOUND - 0.01)) is None
    cal = calibration_report(y, wrong, ["a"] * 40, t, n_fit=40)
    assert cal["warning"] == msg and any("**warning**: T = 148.4" in line for line in calibration_markdown(cal))
    assert "warning" not in calibration_report(y, wrong, ["a"] * 40, 2.0, n_fit=40)


def test_threshold_at_temperature_keeps_decisions():
    rng = np.random.default_rng(1)
    d = rng.normal(0, 3, 500)
    for thr, t in ((0.3, 2.5), (0.9, 0.4), (0.5, 7.0)):
        before = 1 / (1 + np.exp(-d)) >= thr
        after = 1 / (1 + np.exp(-d / t)) >= threshold_at_temperature(thr, t)
        assert (before == after).mean() >= 0.998  # float ties at the boundary only
    assert threshold_at_temperature(0.5, 3.0) == pytest.approx(0.5)


# -- OOD scores ---------------------------------------------------------------------------------
def test_mahalanobis_and_energy_scores():
    rng = np.random.default_rng(0)
    z = np.concatenate([rng.normal(0, 1, (200, 3)), rng.normal(5, 1, (200, 3))])
    y = np.r_[np.zeros(200, int), np.ones(200, int)]
    stats = fit_mahalanobis(z, y)
    np.testing.assert_allclose(stats.means, [[0, 0, 0], [5, 5, 5]], atol=0.25)
    s = mahalanobis_scores(np.array([[0, 0, 0], [5, 5, 5], [20, -20, 0]], float), stats)
    assert s[0] < 0.5 and s[1] < 0.5 and s[2] > 20  # at a class mean ≈ 0; far away: large
    # the whitening the graph uses gives the same distances
    w = stats.whitening
    q = np.array([[1.0, 2.0, -1.0]])
    direct = min(float((((q - m) @ w) ** 2).sum()) for m in stats.means)
    assert np.sqrt(direct) == pytest.approx(float(mahalanobis_scores(q, stats)[0]))
    np.testing.assert_allclose(energy_scores([[0.0, 0.0], [1.0, 1.0]]), [-np.log(2), -1 - np.log(2)])
    assert percentile_threshold(np.arange(1, 101)) == pytest.approx(99.01)


class _Net(torch.nn.Module):
    """A pooled-feature classifier as export expects (tiny)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 6, 3, padding=1)
        self.activation = torch.nn.ReLU()
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.bottleneck = torch.nn.Flatten()
        self.head = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))

    def feature_map(self, x):
        return self.activation(self.conv(x))

    def forward(self, x):
        from cxrdebias.models.base import ModelOutput

        z = self.bottleneck(self.pool(self.feature_map(x)))
        return ModelOutput(self.head(z), z)


def test_guarded_model_outputs_equal_references():
    net = _Net().eval()
    net.probe_layers = {"conv": "conv"}  # a probe layer: its pooled output can carry the score
    x = torch.randn(20, 1, 8, 8)
    logits, feats = torch_outputs(net, [x.numpy()])
    assert set(feats) == {"bottleneck", "conv"} and feats["conv"].shape == (20, 6)
    labels = (logits[:, 1] > logits[:, 0]).astype(int)
    for method, layer, module in (("mahalanobis", "bottleneck", None), ("mahalanobis", "conv", "conv"), ("energy", "bottleneck", None)):
        guard = Guard(2.0, method, 1.0, fit_mahalanobis(feats[layer], labels), layer=layer, module=module)
        with torch.no_grad():
            probs, cam, ood = GuardedModel(net, guard)(x)
        torch.testing.assert_close(probs, torch.from_numpy(logits / 2.0).float().softmax(dim=1))
        np.testing.assert_allclose(ood.numpy(), guard.reference_scores(logits, feats), rtol=1e-4, atol=1e-5)
        assert cam.shape == (20, 8, 8)
    # the conv layer's features differ from the bottleneck's after the ReLU: the two scores differ
    a = Guard(1.0, "mahalanobis", 1.0, fit_mahalanobis(feats["conv"], labels), layer="conv", module="conv")
    b = Guard(1.0, "mahalanobis", 1.0, fit_mahalanobis(feats["bottleneck"], labels))
    assert not np.allclose(a.reference_scores(logits, feats), b.reference_scores(logits, feats))
    with pytest.raises(ExportError, match="probe layers"):
        layer_module(net, "block9")


# -- exported models: new, old, labelled manifests ---------------------------------------------
def test_old_two_output_model_still_predicts(legacy_model_file, cxr_manifest, tmp_path, monkeypatch, capsys):
    old = legacy_model_file
    model = load_model(old)
    assert [o.name for o in model.session.get_outputs()] == list(LEGACY_OUTPUT_NAMES)
    assert model.metadata.temperature == 1.0 and model.metadata.ood_threshold is None and not model.has_ood
    pngs = sorted((cxr_manifest.parent / "images").rglob("*.png"))[:3]
    res = model.predict(pngs)
    assert res.ood_score is None and res.in_distribution is None
    code, stdout, err = run_cli(["predict", "--model", old, *pngs, "--out", tmp_path / "p.csv"], monkeypatch, capsys)
    assert code == 0, err
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(rows) == 3 and all(r["ood_score"] == "" and r["in_distribution"] == "" for r in rows)
    assert "exported before the OOD guard" in stdout


def test_predict_writes_ood_columns_and_counts_flagged(exported_cxr_model, cxr_manifest, tmp_path, monkeypatch, capsys):
    pngs = sorted((cxr_manifest.parent / "images").rglob("*.png"))[:4]
    noise = tmp_path / "noise.png"
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)).save(noise)
    code, stdout, err = run_cli(["predict", "--model", exported_cxr_model.model, *pngs, noise, "--out", tmp_path / "p.csv"],
                                monkeypatch, capsys)
    assert code == 0, err
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    thr = exported_cxr_model.metadata["ood_threshold"]
    for r in rows:
        assert r["in_distribution"] == ("true" if float(r["ood_score"]) <= thr else "false")
    flagged = sum(r["in_distribution"] == "false" for r in rows)
    assert f"{flagged} of 5 images flagged out of distribution" in stdout
    assert rows[-1]["in_distribution"] == "false"  # uniform noise is not a chest X-ray
    assert set(KEYS) >= {"temperature", "ood_threshold", "ood_method", "training_sites"}


def test_predict_on_labelled_manifest_writes_per_site_metrics(exported_cxr_model, cxr_manifest, tmp_path, monkeypatch, capsys):
    rows = list(csv.DictReader(cxr_manifest.open()))
    chosen = [r for r in rows if r["site"] == "actualmed"][:6] + [r for r in rows if r["site"] == "ieee8023"][:6]
    (tmp_path / "img").mkdir()
    lines = ["path,label,site,patient_id"]
    for i, r in enumerate(chosen):
        shutil.copy(cxr_manifest.parent / r["path"], tmp_path / "img" / f"{i}.png")
        site = r["site"] if i % 2 else "hospital_x"  # half of the images from a hospital never seen in training
        lines.append(f"img/{i}.png,{r['label']},{site},{r['patient_id']}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "pred.csv"
    code, stdout, err = run_cli(["predict", "--model", exported_cxr_model.model, tmp_path / "m.csv", "--out", out], monkeypatch, capsys)
    assert code == 0, err
    js, md = site_files(out)
    report = json.loads(js.read_text())
    assert report["external_sites"] == ["hospital_x"] and report["by_group"]["hospital_x"]["external"] is True
    assert set(report["by_group"]) == {"actualmed", "ieee8023", "hospital_x"}
    assert report["by_group"]["hospital_x"]["n"] == 6 and report["overall"]["n"] == 12
    assert report["training_sites"] == ["actualmed", "ieee8023"]
    assert "hospital_x (external)" in md.read_text() and "hospital_x (external)" in stdout
    # refused without --force the second time (the metrics files too), replaced with it
    code, _, err = run_cli(["predict", "--model", exported_cxr_model.model, tmp_path / "m.csv", "--out", out], monkeypatch, capsys)
    assert code == 2 and "--force" in err
    out.unlink()
    code, _, err = run_cli(["predict", "--model", exported_cxr_model.model, tmp_path / "m.csv", "--out", out], monkeypatch, capsys)
    assert code == 2 and "_sites.json" in err
    # unlabelled inputs: no metrics files
    out2 = tmp_path / "unlabelled.csv"
    code, _, _ = run_cli(["predict", "--model", exported_cxr_model.model, tmp_path / "img", "--out", out2], monkeypatch, capsys)
    assert code == 0 and not any(p.exists() for p in site_files(out2))


def test_export_with_energy_score(tiny_cxr_run, tmp_path):
    from cxrdebias.deploy.export import export_run

    res = export_run(tiny_cxr_run, tmp_path / "e.onnx", n_cam_images=2, ood_method="energy")
    meta = load_model(res.model).metadata
    assert meta.ood_method == "energy" and "layer" not in res.metadata["export"]["guard"]
    assert res.parity.passed and res.parity.ood_max_rel_diff <= 1e-3
    with pytest.raises(ExportError, match="probe layers"):
        export_run(tiny_cxr_run, tmp_path / "other" / "x.onnx", n_cam_images=2, ood_layer="block9")


def test_export_without_training_images_writes_no_guard(tiny_cxr_run, cxr_manifest, tmp_path, monkeypatch, capsys):
    run = run_without_its_images(tiny_cxr_run, tmp_path / "moved")
    pngs = sorted((cxr_manifest.parent / "images").rglob("*.png"))[:2]
    out = tmp_path / "m.onnx"
    code, _, err = run_cli(["export", run, "--out", out, "--cam-images", "2", *sum((["--check-images", p] for p in pngs), [])],
                           monkeypatch, capsys)
    assert code == 0, err
    assert "no OOD guard and no temperature" in err
    model = load_model(out)
    assert not model.has_ood and model.metadata.temperature == 1.0 and model.metadata.ood_threshold is None
    assert "not reachable" in model.metadata.raw["export"]["guard"]["absent"]
    assert model.predict(pngs).in_distribution is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"cxrdebias_format": 3}, "reads formats 1, 2"),
        ({"cxrdebias_format": True}, "reads formats"),
        ({"temperature": 0}, "'temperature' 0; expected a finite positive number"),
        ({"temperature": "2"}, "'temperature'"),
        ({"ood_threshold": True}, "'ood_threshold' True"),
        ({"ood_method": 3}, "'ood_method' 3"),
        ({"training_sites": "a,b"}, "'training_sites'"),
    ],
)
def test_metadata_guard_keys_are_checked(changes, message):
    from cxrdebias.data.preprocess import PreprocessSpec
    from cxrdebias.deploy.onnx_metadata import ModelMetadata, encode
    from cxrdebias.errors import CheckpointError

    meta = {"cxrdebias_format": 2, "model_version": "t", "labels": ["negative", "positive"], "positive_label": "positive",
            "threshold": 0.5, "preprocessing": PreprocessSpec(image_size=32).model_dump(mode="json")}
    ok = ModelMetadata.from_props(encode({**meta, "temperature": 2.5, "ood_threshold": 7.0, "training_sites": ["a"]}), "m.onnx")
    assert (ok.temperature, ok.ood_threshold, ok.training_sites) == (2.5, 7.0, ("a",))
    plain = ModelMetadata.from_props(encode(meta), "m.onnx")
    assert (plain.temperature, plain.ood_threshold, plain.training_sites) == (1.0, None, None)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(")):
        ModelMetadata.from_props(encode({**meta, **changes}), "m.onnx")


def test_the_model_card_repeats_a_temperature_warning():
    from cxrdebias.deploy.model_card import _guard_lines

    temp = {"value": 148.4, "fitted_on": "validation split (22 images), minimum NLL", "nll_before": 2.0, "nll_after": 0.69}
    guard = {"temperature": temp, "description": "d", "statistics_from": "s", "threshold_rule": "r", "validation_flagged": 0.05}
    meta = {"temperature": 148.4, "ood_threshold": 29.2, "export": {"guard": guard}}
    assert "Warning" not in "\n".join(_guard_lines(meta))
    temp["warning"] = temperature_warning(148.4131591025766, 22)
    assert f"**Warning: {temp['warning']}.**" in "\n".join(_guard_lines(meta))
