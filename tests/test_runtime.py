"""onnxruntime inference (`cxrdebias predict`, `cxrdebias.deploy.runtime`) with an exported model."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from PIL import Image

from cxrdebias.data.images import read_image, write_dicom
from cxrdebias.data.preprocess import PreprocessSpec, preprocess, resize_geometry
from cxrdebias.deploy.onnx_metadata import encode
from cxrdebias.deploy.overlay import cam_to_image, jet, overlay
from cxrdebias.deploy.runtime import CPU, collect_inputs, load_model
from cxrdebias.errors import CheckpointError, ConfigError, DataError
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.usefixtures("torch_one_thread")

CSV_COLUMNS = ["file", "probability", "predicted_label", "threshold", "provider"]


@pytest.fixture(scope="module")
def model_file(exported_cxr_model):
    return exported_cxr_model.model


@pytest.fixture
def inputs(tmp_path, cxr_manifest, real_pngs):
    """A folder (DICOM + JPEG made from real PNGs, and a link to a PNG) and a two-row manifest."""
    root = cxr_manifest.parent
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    src = [root / r["path"] for r in real_pngs]
    gray = np.asarray(Image.open(src[0]).convert("L"))
    write_dicom(folder / "sub" / "a.dcm", gray, institution_name="somewhere", patient_id="p1")
    Image.open(src[1]).convert("L").save(folder / "b.jpg", quality=95)
    (folder / "c.png").symlink_to(src[2])
    (folder / "notes.txt").write_text("not an image, not picked up\n")
    man_dir = tmp_path / "manifest"
    man_dir.mkdir()
    shutil.copy(src[2], man_dir / "x.png")  # copies: a manifest's links may not leave its folder
    shutil.copy(src[3], man_dir / "y.png")
    manifest = man_dir / "manifest.csv"
    manifest.write_text(
        "path,label,site,patient_id\n"
        f"x.png,{real_pngs[2]['label']},{real_pngs[2]['site']},{real_pngs[2]['patient_id']}\n"
        f"y.png,{real_pngs[3]['label']},{real_pngs[3]['site']},{real_pngs[3]['patient_id']}\n"
    )
    return folder, manifest


def test_runtime_imports_without_torch():
    code = (
        "import sys, cxrdebias.deploy.runtime, cxrdebias.deploy.overlay, cxrdebias.deploy.onnx_metadata, "
        "cxrdebias.deploy.viewer_state, cxrdebias.deploy.viewer_worklist, cxrdebias.deploy.viewer_report; "
        "bad = sorted(m for m in ('torch', 'torchvision', 'monai', 'timm') if m in sys.modules); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_collect_inputs_folder_and_manifest(inputs):
    folder, manifest = inputs
    found = collect_inputs([folder, manifest])
    names = [x.name.replace("\\", "/") for x in found]
    assert [n.rsplit("/", 1)[-1] for n in names] == ["b.jpg", "c.png", "a.dcm", "x.png", "y.png"]
    assert found[3].fields.keys() == {"site", "label", "patient_id"} and found[0].fields == {}
    with pytest.raises(DataError, match="not found"):
        collect_inputs([folder / "missing.png"])
    empty = folder.parent / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no PNG, JPEG or DICOM"):
        collect_inputs([empty])


def test_cli_predict_folder_manifest_dicom(model_file, inputs, tmp_path, monkeypatch, capsys):
    folder, manifest = inputs
    out_csv, cams = tmp_path / "pred.csv", tmp_path / "cams"
    code, stdout, err = run_cli(
        ["predict", "--model", model_file, folder, manifest, "--out", out_csv, "--cams", cams, "--batch-size", "2"],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    assert f"provider {CPU}" in stdout and "5 images" in stdout and CPU in err
    rows = list(csv.reader(out_csv.open()))
    assert rows[0] == [*CSV_COLUMNS, "site", "label", "patient_id", "ood_score", "in_distribution", "cam"]
    body = [dict(zip(rows[0], r, strict=True)) for r in rows[1:]]
    assert len(body) == 5
    meta = load_model(model_file).metadata
    for r in body:
        p = float(r["probability"])
        assert 0.0 <= p <= 1.0 and r["provider"] == CPU
        assert float(r["threshold"]) == pytest.approx(meta.threshold, abs=1e-6)
        assert r["predicted_label"] == ("positive" if p >= meta.threshold else "negative")
        overlay = Image.open(cams / r["cam"])
        assert overlay.mode == "RGB" and overlay.format == "PNG"
    assert body[2]["file"].endswith("a.dcm") and body[2]["site"] == ""
    assert body[3]["site"] != "" and body[3]["label"] in ("0", "1")
    # the overlay has the original image's geometry (shrunk to ≤ 1024 px on the long side)
    h, w = read_image(folder / "sub" / "a.dcm").pixels.shape
    ow, oh = Image.open(cams / body[2]["cam"]).size
    assert abs(ow / oh - w / h) < 0.02 and max(ow, oh) == min(1024, max(h, w))
    # the same image through a link in the folder and in the manifest: the same probability
    assert body[1]["probability"] == body[3]["probability"]


def test_predict_refuses_to_overwrite_and_bad_inputs(model_file, inputs, tmp_path, monkeypatch, capsys):
    folder, _ = inputs
    out_csv = tmp_path / "pred.csv"
    out_csv.write_text("keep\n")
    code, _, err = run_cli(["predict", "--model", model_file, folder, "--out", out_csv], monkeypatch, capsys)
    assert code == 2 and "--force" in err and out_csv.read_text() == "keep\n"
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n-- truncated")
    code, _, err = run_cli(["predict", "--model", model_file, bad, "--out", tmp_path / "p2.csv"], monkeypatch, capsys)
    assert code == 2 and "bad.png" in err and len(err.strip().splitlines()) == 2  # model line + error line
    assert not (tmp_path / "p2.csv").exists()


def test_api_batches_and_arrays_agree(model_file, inputs):
    folder, manifest = inputs
    model = load_model(model_file, device="cpu")
    assert model.provider == CPU
    images = collect_inputs([folder, manifest])
    one = model.predict(images, batch_size=1)
    four = model.predict(images, batch_size=4)
    np.testing.assert_allclose(one.probabilities, four.probabilities, atol=1e-6)
    np.testing.assert_allclose(one.cams, four.cams, atol=1e-5)
    assert one.cams.shape == (5, 64, 64) and one.probabilities.shape == (5, 2)
    np.testing.assert_allclose(one.probabilities.sum(axis=1), 1.0, atol=1e-6)
    assert one.predicted_labels == ["positive" if p else "negative" for p in one.predicted_positive]
    pixels = read_image(images[1].path).pixels
    arr = model.predict([pixels])
    np.testing.assert_allclose(arr.probabilities, one.probabilities[1:2], atol=1e-6)
    with pytest.raises(DataError, match="array"):
        model.predict([pixels * 255.0])  # 0–255 units: refused, not silently mis-scaled
    with pytest.raises(ConfigError, match="batch size"):
        model.predict(images, batch_size=0)


def test_preprocessing_is_read_from_the_metadata(model_file, inputs, tmp_path):
    """Change the stored spec: the runtime's inputs change with it (it never uses its own)."""
    folder, _ = inputs
    proto = onnx.load(str(model_file))
    props = {p.key: p.value for p in proto.metadata_props}
    changed = PreprocessSpec(image_size=64, resize="stretch", interpolation="bilinear", mean=0.4, std=0.3)
    props.update(encode({"preprocessing": changed.model_dump(mode="json")}))
    del proto.metadata_props[:]
    for k, v in props.items():
        e = proto.metadata_props.add()
        e.key, e.value = k, v
    model = load_model(proto.SerializeToString())
    assert model.metadata.preprocessing == changed
    image = collect_inputs([folder])[0]
    pixels = read_image(image.path).pixels
    expected, _ = model.run(preprocess(pixels, changed)[None])
    got = model.predict([image])
    np.testing.assert_allclose(got.probabilities, expected, atol=1e-6)
    assert got.geometries[0] == resize_geometry(pixels.shape, changed)
    original = load_model(model_file).predict([image])
    assert np.abs(original.probabilities - got.probabilities).max() > 1e-6


def test_corrupted_and_foreign_models_are_refused(model_file, tmp_path, monkeypatch, capsys):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(model_file.read_bytes()[:4096])
    with pytest.raises(CheckpointError, match="not a readable ONNX model"):
        load_model(truncated)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing.onnx")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "foreign",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    foreign = tmp_path / "foreign.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(foreign))
    with pytest.raises(CheckpointError, match="without cxrdebias metadata"):
        load_model(foreign)
    code, _, err = run_cli(["predict", "--model", truncated, tmp_path, "--out", tmp_path / "p.csv"], monkeypatch, capsys)
    assert code == 2 and "truncated.onnx" in err and "Traceback" not in err


def test_cuda_without_onnxruntime_gpu_is_a_config_error(model_file):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(ConfigError, match="install-gpu"):
        load_model(model_file, device="cuda")
    with pytest.raises(ConfigError, match="device"):
        load_model(model_file, device="tpu")


def test_gpu_provider_is_requested_first_when_onnxruntime_gpu_offers_it(model_file, monkeypatch):
    """The provider seam without a GPU: with CUDA offered, auto/cuda ask for it before the CPU,
    and CXRModel.provider reports what onnxruntime actually took (CPU on this machine)."""
    import cxrdebias.deploy.runtime as rt

    real = rt.ort.get_available_providers()
    monkeypatch.setattr(rt.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real])
    assert rt._providers("auto") == ["CUDAExecutionProvider", CPU]
    assert rt._providers("cuda") == ["CUDAExecutionProvider", CPU]
    assert rt._providers("cpu") == [CPU]
    asked = []
    session = rt.ort.InferenceSession

    def spy(model, options, providers):
        asked.append(providers)
        return session(model, options, providers=[p for p in providers if p in real])

    monkeypatch.setattr(rt.ort, "InferenceSession", spy)
    model = load_model(model_file, device="auto")
    assert asked == [["CUDAExecutionProvider", CPU]] and model.provider == CPU


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_overlay_is_the_jet_blend(alpha):
    g = np.random.default_rng(0)
    image, cam = g.uniform(-0.1, 1.1, (37, 53)), g.uniform(-0.1, 1.1, (37, 53))
    reference = np.round(255.0 * ((1 - alpha) * np.clip(image, 0, 1)[..., None] + alpha * jet(cam)))
    got = np.asarray(overlay(image, cam, alpha=alpha)).astype(float)
    assert np.abs(got - reference).max() <= 1.0  # float32 vs float64 rounding
    if alpha == 0.0:
        np.testing.assert_array_equal(got, np.repeat(np.round(255.0 * np.clip(image, 0, 1).astype(np.float32))[..., None], 3, axis=2))
    with pytest.raises(ValueError, match="differ in shape"):
        overlay(image, cam[:, :-1])


def test_cam_to_image_letterbox_geometry():
    spec = PreprocessSpec(image_size=8, resize="letterbox")
    geo = resize_geometry((10, 20), spec)  # wide image: rows 2..6 of the model input hold it
    assert geo.target_box == (0, 2, 8, 6)
    cam = np.zeros((8, 8), np.float32)
    cam[2:6, :] = 1.0
    cam[0:2, :] = 0.7  # padding: must not leak onto the image
    mapped = cam_to_image(cam, geo)
    assert mapped.shape == (10, 20)
    np.testing.assert_allclose(mapped, 1.0, atol=1e-6)
