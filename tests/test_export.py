"""ONNX export: in-graph Grad-CAM maths, parity with torch and MONAI, metadata, refusals."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from cxrdebias.data.preprocess import PreprocessSpec
from cxrdebias.deploy import explain
from cxrdebias.deploy.artefact import load_model_artefact
from cxrdebias.deploy.explain import (
    GradCAMModel,
    bottleneck_forward_and_gradient,
    head_forward_and_gradient,
    monai_gradcam,
)
from cxrdebias.deploy.export import export_run, spread_over_sites, to_onnx_bytes
from cxrdebias.deploy.onnx_metadata import KEYS, ModelMetadata
from cxrdebias.deploy.parity import Tolerances, check_parity, load_model_bare
from cxrdebias.deploy.runtime import collect_inputs, load_model, prepare
from cxrdebias.errors import ExportError
from cxrdebias.evaluation.calibration import threshold_at_temperature
from cxrdebias.models.base import L2Normalize, ModelOutput, activation
from cxrdebias.models.densenet import DenseNet121
from tests.conftest import run_cli, run_without_its_images

SPEC64 = PreprocessSpec(image_size=64)
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel())[0, 1])


@pytest.fixture(scope="module")
def real_batch(cxr_manifest) -> np.ndarray:
    """Six real radiographs (three per site), preprocessed at 64 px like the runtime does."""
    images = collect_inputs([cxr_manifest])
    return prepare([images[i] for i in spread_over_sites(images, 6)], SPEC64)[0]


class TinyNet(nn.Module):
    """A few-kB stand-in with the DenseNet121 interface (8×8 last feature map at 64 px)."""

    def __init__(self, last_activation: str = "relu", normalize_features: bool = False):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, stride=4, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 12, 3, stride=2, padding=1)
        )
        self.activation = activation(last_activation)
        if isinstance(self.activation, nn.ReLU):
            self.activation.inplace = False
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.bottleneck = L2Normalize() if normalize_features else nn.Flatten(1)
        self.head = nn.Sequential(nn.Linear(12, 8), nn.ReLU(inplace=True), nn.Dropout(0.2), nn.Linear(8, 2))

    def feature_map(self, x):
        return self.activation(self.features(x))

    def forward(self, x):
        z = self.bottleneck(self.pool(self.feature_map(x)))
        return ModelOutput(self.head(z), z)


def informative_model(build, x: torch.Tensor) -> nn.Module:
    """The first seed whose positive-class Grad-CAM is non-constant on most of ``x``.

    A random network's Grad-CAM is often ReLU'd to zero everywhere; a test on such maps would
    pass for any implementation.
    """
    for seed in range(20):
        torch.manual_seed(seed)
        model = build().eval()
        with torch.no_grad():
            _, raw = GradCAMModel(model).raw_cam(x)
        if (raw.flatten(1).std(dim=1) > 0).float().mean() >= 0.5:
            return model
    raise AssertionError("no seed gives informative Grad-CAM maps")


# -- the maths ----------------------------------------------------------------------------------
def test_head_gradient_by_hand():
    """z=(1,1); W1=[[1,2],[-1,1]] → h=(3,0), ReLU mask (1,0); W2=[[1,0],[3,-2]] → logits (3,9);
    ∂y_1/∂z = (W2[1] ⊙ mask) W1 = (3,0) W1 = (3,6)."""
    l1, l2 = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        l1.weight.copy_(torch.tensor([[1.0, 2.0], [-1.0, 1.0]]))
        l2.weight.copy_(torch.tensor([[1.0, 0.0], [3.0, -2.0]]))
        l1.bias.zero_()
        l2.bias.zero_()
    layers = [l1, nn.ReLU(), nn.Dropout(0.5).eval(), l2]
    logits, v = head_forward_and_gradient(layers, torch.tensor([[1.0, 1.0]]), class_index=1)
    assert logits.tolist() == [[3.0, 9.0]]
    assert v.tolist() == [[3.0, 6.0]]
    _, v0 = head_forward_and_gradient(layers, torch.tensor([[1.0, 1.0]]), class_index=0)
    assert v0.tolist() == [[1.0, 2.0]]  # (1,0) ⊙ (1,0) = (1,0) → W1[0]


@pytest.mark.parametrize("bottleneck", [nn.Flatten(1), L2Normalize(), L2Normalize(eps=10.0)], ids=["flatten", "l2", "l2-below-eps"])
@pytest.mark.parametrize("class_index", [0, 1])
def test_head_and_bottleneck_gradient_equal_autograd(bottleneck, class_index):
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Dropout(0.3), nn.Linear(7, 4), nn.ReLU(), nn.Linear(4, 2)).double().eval()
    pooled = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    z_ref = bottleneck(pooled)
    logits_ref = head(z_ref)
    (g_ref,) = torch.autograd.grad(logits_ref[:, class_index].sum(), pooled)

    layers = explain._head_layers(head)
    z, _ = bottleneck_forward_and_gradient(bottleneck, pooled.detach())
    logits, v = head_forward_and_gradient(layers, z, class_index)
    _, g = bottleneck_forward_and_gradient(bottleneck, pooled.detach(), v)
    torch.testing.assert_close(logits, logits_ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    assert g.abs().sum() > 0


@pytest.mark.parametrize(
    ("last_activation", "normalize"), [("relu", False), ("tanh", True)], ids=["vanilla", "end-l2-tanh"]
)
def test_in_graph_cam_equals_monai_gradcam_densenet(real_batch, last_activation, normalize):
    x = torch.from_numpy(real_batch)
    model = informative_model(
        lambda: DenseNet121(2, last_activation=last_activation, normalize_features=normalize, hidden_dim=16), x
    )
    with torch.no_grad():
        probs, cams = GradCAMModel(model)(x)
        ref_probs = model(x).logits.softmax(dim=1)
    ref = monai_gradcam(model, x, class_index=1)
    assert cams.shape == ref.shape == (6, 64, 64)
    torch.testing.assert_close(probs, ref_probs, rtol=0, atol=1e-6)
    informative = [i for i in range(6) if ref[i].std() > 0]
    assert len(informative) >= 3
    for i in informative:
        assert correlation(cams[i], ref[i]) >= 0.99
    assert float((cams - ref).abs().max()) < 1e-3
    assert float(cams.min()) >= 0 and float(cams.max()) <= 1


def test_unsupported_heads_are_refused():
    model = TinyNet()
    model.head = nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    with pytest.raises(ExportError, match="BatchNorm1d"):
        GradCAMModel(model)
    model = TinyNet()
    model.pool = nn.AdaptiveMaxPool2d(1)
    with pytest.raises(ExportError, match="average-pooled"):
        GradCAMModel(model)


# -- the ONNX graph -----------------------------------------------------------------------------
def test_onnx_graph_vanilla_head_matches_torch_and_monai(real_batch):
    x = torch.from_numpy(real_batch)
    model = informative_model(TinyNet, x)
    run = load_model_bare(to_onnx_bytes(model, SPEC64))
    ref_cam = monai_gradcam(model, x).numpy()
    with torch.no_grad():
        ref_probs = model(x).logits.softmax(dim=1).numpy()
    p3, c3 = run(real_batch[:3])
    p1, c1 = run(real_batch[:1])
    assert p3.shape == (3, 2) and c3.shape == (3, 64, 64) and p1.shape == (1, 2) and c1.shape == (1, 64, 64)
    assert np.abs(p3 - ref_probs[:3]).max() <= 1e-4
    np.testing.assert_allclose(p1, p3[:1], atol=1e-6)
    np.testing.assert_allclose(c1, c3[:1], atol=1e-6)
    for i in range(3):
        if ref_cam[i].std() > 0:
            assert correlation(c3[i], ref_cam[i]) >= 0.99


def test_check_parity_reports_probability_mismatch(real_batch):
    model = TinyNet().eval()
    exact = GradCAMModel(model).eval()

    def off_by_1e3(batch):
        with torch.no_grad():
            p, c = exact(torch.from_numpy(batch))
        return p.numpy() + 1e-3, c.numpy()

    report, _ = check_parity(model, off_by_1e3, [real_batch], real_batch[:2])
    assert not report.passed
    assert report.probability_max_abs_diff == pytest.approx(1e-3, rel=1e-3)
    assert any("probabilities differ" in p for p in report.problems)
    def exact_run(batch):
        with torch.no_grad():
            return tuple(t.numpy() for t in exact(torch.from_numpy(batch)))

    ok, probs = check_parity(model, exact_run, [real_batch], real_batch[:2])
    assert ok.passed and probs.shape == (6, 2) and ok.probability_max_abs_diff <= 1e-6


def test_opset_below_17_is_refused():
    with pytest.raises(ExportError, match="opset"):
        to_onnx_bytes(TinyNet(), SPEC64, opset=16)


# -- export_run on a trained run ----------------------------------------------------------------
def test_exported_model_matches_torch_at_batch_1_and_3(exported_cxr_model, tiny_cxr_run, cxr_manifest):
    model, _ = load_model_artefact(tiny_cxr_run)
    deployed = load_model(exported_cxr_model.model, device="cpu")
    images = collect_inputs([cxr_manifest])
    batch = prepare([images[i] for i in spread_over_sites(images, 3)], deployed.metadata.preprocessing)[0]
    p3, c3, o3 = deployed.run_all(batch)
    p1, c1, o1 = deployed.run_all(batch[:1])
    t = deployed.metadata.temperature
    with torch.no_grad():
        out = model(torch.from_numpy(batch))
    ref = (out.logits / t).softmax(dim=1).numpy()
    guard = exported_cxr_model.metadata["export"]["guard"]
    assert deployed.metadata.ood_method == "mahalanobis" and guard["validation_flagged"] <= 0.05
    ref_cam = monai_gradcam(model, torch.from_numpy(batch)).numpy()
    assert p3.shape == (3, 2) and c3.shape == (3, 64, 64) and p1.shape == (1, 2) and o3.shape == (3,)
    assert np.abs(p3 - ref).max() <= 1e-4
    np.testing.assert_allclose(p1, p3[:1], atol=1e-6)
    np.testing.assert_allclose(o1, o3[:1], rtol=1e-5)
    np.testing.assert_allclose(c1, c3[:1], atol=1e-6)
    for i in range(3):
        assert ref_cam[i].std() > 0
        assert correlation(c3[i], ref_cam[i]) >= 0.99


def test_export_checks_are_recorded(exported_cxr_model):
    checks = exported_cxr_model.parity
    assert checks.passed and not checks.problems
    assert checks.probability_max_abs_diff <= 1e-4
    assert checks.n_ood_images == checks.n_probability_images and checks.ood_max_rel_diff <= 1e-3
    assert checks.cam_min_correlation >= 0.99
    assert checks.n_cam_images == 8 and checks.n_cam_constant < checks.n_cam_images
    assert checks.n_probability_images > checks.n_cam_images  # every validation image
    assert 1 in checks.batch_sizes and max(checks.batch_sizes) > 1
    assert "validation split" in checks.images


def test_metadata_round_trip(exported_cxr_model, tiny_cxr_run):
    _, art = load_model_artefact(tiny_cxr_run)
    results = json.loads((tiny_cxr_run / "results.json").read_text())
    proto = onnx.load(str(exported_cxr_model.model), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    assert set(props) == set(KEYS)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    meta = ModelMetadata.from_props(props, "model.onnx")
    assert meta.labels == ("negative", "positive") and meta.positive_label == "positive"
    assert meta.threshold == pytest.approx(threshold_at_temperature(art["threshold"], meta.temperature))
    assert meta.temperature > 0 and meta.ood_threshold is not None and meta.ood_method == "mahalanobis"
    assert meta.training_sites == ("actualmed", "ieee8023")
    assert meta.preprocessing == PreprocessSpec.model_validate(art["preprocess"])
    raw = meta.raw
    assert raw["method"]["name"] == "end" and raw["bias"] == "site"
    assert raw["sites"]["names"] == ["actualmed", "ieee8023"]
    assert raw["data_hash"] == results["data"]["dataset_sha256"]
    assert raw["code_version"]["training"]["package"] and "export" in raw["code_version"]
    assert "Youden" in raw["threshold_method"]
    val = raw["validation"]
    n_val = sum(1 for line in (tiny_cxr_run / "splits.csv").read_text().splitlines() if line.endswith(",val"))
    assert set(val["per_site"]) == {"actualmed", "ieee8023"}
    assert sum(m["n"] for m in val["per_site"].values()) == val["overall"]["n"] == n_val
    assert val["recorded_at_training"]["auroc"] == pytest.approx(art["val_metrics"]["auroc"])
    assert raw["export"]["checks"]["passed"] is True
    assert "NOT FOR CLINICAL USE" in raw["intended_use"]


def test_model_card_and_monai_metadata(exported_cxr_model):
    card = exported_cxr_model.model_card.read_text()
    assert exported_cxr_model.model_card.parent == exported_cxr_model.model.parent
    meta = exported_cxr_model.metadata
    assert "NOT FOR CLINICAL USE" in card and f"{meta['threshold']:.4f}" in card
    assert "| actualmed |" in card and "| ieee8023 |" in card and "MONAI" in card
    bundle = json.loads(exported_cxr_model.monai_metadata.read_text())
    for key in ("version", "monai_version", "pytorch_version", "numpy_version", "optional_packages_version", "task",
                "description", "authors", "copyright", "network_data_format", "intended_use"):
        assert key in bundle
    image = bundle["network_data_format"]["inputs"]["image"]
    assert image["spatial_shape"] == [64, 64] and image["num_channels"] == 1 and image["value_range"] == [-1.0, 1.0]
    assert bundle["network_data_format"]["outputs"]["probabilities"]["channel_def"] == {"0": "negative", "1": "positive"}
    assert exported_cxr_model.model.stat().st_mode & 0o044  # readable by others (umask permitting)


def test_failing_cam_check_refuses_to_write(tiny_cxr_run, cxr_manifest, tmp_path, monkeypatch):
    """A graph whose CAM is wrong (sign of the head gradient flipped) is not written."""
    real = explain.head_forward_and_gradient

    def flipped(layers, z, class_index):
        logits, v = real(layers, z, class_index)
        return logits, -v

    monkeypatch.setattr(explain, "head_forward_and_gradient", flipped)
    pngs = [p for p in sorted((cxr_manifest.parent / "images").rglob("*.png"))][:4]
    out = tmp_path / "m" / "model.onnx"
    with pytest.raises(ExportError, match="refusing to write .*Grad-CAM correlation"):
        export_run(tiny_cxr_run, out, check_images=pngs, n_cam_images=4)
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_impossible_tolerance_refuses_to_write(tiny_cxr_run, cxr_manifest, tmp_path):
    png = sorted((cxr_manifest.parent / "images").rglob("*.png"))[0]
    with pytest.raises(ExportError, match="probabilities differ"):
        export_run(tiny_cxr_run, tmp_path / "model.onnx", check_images=[png], n_cam_images=1,
                   tolerances=Tolerances(probability_max_abs_diff=-1.0))
    assert list(tmp_path.iterdir()) == []


def test_cli_export_on_given_images_and_refusals(tiny_cxr_run, cxr_manifest, tmp_path, monkeypatch, capsys):
    pngs = sorted((cxr_manifest.parent / "images").rglob("*.png"))[:2]
    out = tmp_path / "m.onnx"
    args = ["export", tiny_cxr_run, "--out", out, "--cam-images", "2", "--model-version", "tiny-v1"]
    code, stdout, err = run_cli([*args, *sum((["--check-images", p] for p in pngs), [])], monkeypatch, capsys)
    assert code == 0, err
    assert "wrote" in stdout and "correlation" in err and "verified on 2 user-given input(s)" in err
    meta = load_model(out).metadata
    assert meta.model_version == "tiny-v1" and meta.raw["validation"]["per_site"] is None
    before = out.read_bytes()
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 2 and "--force" in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == before


def test_export_without_reachable_validation_images(tiny_cxr_run, tmp_path, monkeypatch, capsys):
    run = run_without_its_images(tiny_cxr_run, tmp_path / "moved")
    code, _, err = run_cli(["export", run, "--out", tmp_path / "m.onnx"], monkeypatch, capsys)
    assert code == 2 and "--check-images" in err and "not reachable" in err
    assert not (tmp_path / "m.onnx").exists()
