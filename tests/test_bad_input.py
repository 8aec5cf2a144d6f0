"""Bad input through the command line (issue 7): every item is one ``error:`` line naming the
file (and row) and what was expected, exit code 2, no traceback, and nothing written or
overwritten. The parsers' own tests (every problem kind, every image defect) are in
test_cxr_manifest.py, test_cxr_images.py, test_runtime.py and test_fuzz.py; the table in
docs/robustness.md lists where each item is tested."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pydicom
import pytest
import torch
from PIL import Image

from cxrdebias.data.images import write_dicom
from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("torch_one_thread")

HEADER = "path,label,site,patient_id"


def _png(path: Path, seed: int, size: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)).save(path)
    return path


def _manifest(folder: Path, extra: list[str] = (), header: str = HEADER) -> Path:
    """Two sites × six patients (both labels per site), then the ``extra`` lines (CSV lines 14…)."""
    lines = []
    for s, site in enumerate("AB"):
        for p in range(6):
            _png(folder / f"img/{site}{p}.png", seed=100 * s + p)
            lines.append(f"img/{site}{p}.png,{p % 2},{site},{site}-{p}")
    path = folder / "manifest.csv"
    path.write_text("\n".join([header, *lines, *extra]) + "\n")
    return path


def _refused(args, monkeypatch, capsys, *expected: str) -> str:
    """Exit code 2, no traceback, exactly one ``error:`` line (the last one) containing ``expected``."""
    code, stdout, err = run_cli(args, monkeypatch, capsys)
    assert code == 2, err
    assert "Traceback" not in stdout + err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], err
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def _train_args(manifest: Path, out: Path, *extra: str) -> list:
    return ["train", "--data", manifest, "--bias", "site", "--method", "vanilla", "--out", out, "--epochs", "1",
            "--image-size", "32", "--set", "train.progress=false", "--set", "model.hidden_dim=16", *extra]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def old_run(tmp_path) -> tuple[Path, dict[str, bytes]]:
    """An existing output folder that ``train --force`` would replace: bad input must leave it."""
    out = tmp_path / "old-run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.yaml").write_text("name: old\n")
    (out / "checkpoints" / "last.pt").write_bytes(b"old weights")
    return out, _snapshot(out)


# -- manifests ------------------------------------------------------------------------------------

MANIFEST_DEFECTS = {
    # id: (extra lines, header, expected text in the one error line)
    "missing-column": ([], "path,label,site", "missing column(s) patient_id; the header has path, label, site"),
    "label-nan": (["img/A0.png,NaN,A,pX"], HEADER, "row 14 label: 'NaN'; expected 0 or 1"),
    "label-float": (["img/A1.png,1.0,A,pX"], HEADER, "row 14 label: '1.0'; expected 0 or 1"),
    "label-word": (["img/A2.png,positive,A,pX"], HEADER, "row 14 label: 'positive'; expected 0 or 1"),
    "label-empty": (["img/A3.png,,A,pX"], HEADER, "row 14 label: missing (empty)"),
    "split-type": (["img/A4.png,0,A,pX,7"], HEADER + ",split", "row 14 split: '7'; expected one of"),
    "duplicate-path": (["img/A0.png,0,A,A-0"], HEADER, "row 14 path: 'img/A0.png' is also listed in row 2"),
    "path-escapes": (["../outside.png,0,A,pX"], HEADER, "row 14 path: '../outside.png' leaves the manifest folder"),
    "path-absolute": (["/etc/hostname,0,A,pX"], HEADER, "row 14 path:"),
    "missing-file": (["img/nope.png,0,A,pX"], HEADER, "row 14 path: file not found"),
    "short-row": (["img/A5.png,0,A"], HEADER, "row 14 -: 3 fields, the header has 4"),
}


@pytest.mark.parametrize("defect", sorted(MANIFEST_DEFECTS))
def test_train_refuses_a_bad_manifest_and_keeps_the_old_run(defect, tmp_path, old_run, monkeypatch, capsys):
    extra, header, expected = MANIFEST_DEFECTS[defect]
    if defect == "split-type":  # every row needs the split column then
        manifest = _manifest(tmp_path, [], header)
        text = manifest.read_text().splitlines()
        manifest.write_text("\n".join([text[0], *(line + "," for line in text[1:]), *extra]) + "\n")
    else:
        manifest = _manifest(tmp_path, extra, header)
    out, before = old_run
    line = _refused(_train_args(manifest, out, "--force"), monkeypatch, capsys, f"error: {manifest}: ", expected)
    if defect == "path-absolute":
        assert "is absolute" in line
    assert _snapshot(out) == before  # --force did not delete the old run for a bad manifest
    fresh = tmp_path / "fresh"
    _refused(_train_args(manifest, fresh), monkeypatch, capsys, str(manifest))
    assert not fresh.exists()


def test_data_check_names_each_bad_row(tmp_path, monkeypatch, capsys):
    manifest = _manifest(tmp_path, ["img/A0.png,nan,A,pX", "../x.png,1,B,pY"])
    _refused(["data", "check", manifest], monkeypatch, capsys, f"{manifest}: 3 problem(s) in 2 of 14 rows",
             "row 14 label: 'nan'; expected 0 or 1", "row 15 path: '../x.png' leaves the manifest folder")


# -- images (as manifest rows: the line names the manifest, the row and the image) ----------------


def _truncated(path: Path) -> Path:
    """A 64×64 noise PNG or JPEG (by the suffix) cut in half."""
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (64, 64), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _dicom(path: Path, edit) -> Path:
    write_dicom(path, np.arange(256, dtype=np.uint8).reshape(16, 16))
    ds = pydicom.dcmread(path)
    edit(ds)
    ds.save_as(path)
    return path


IMAGE_DEFECTS = {
    "truncated-png": (lambda p: _truncated(p.with_suffix(".png")), "corrupt or truncated image"),
    "truncated-jpeg": (lambda p: _truncated(p.with_suffix(".jpg")), "corrupt or truncated image"),
    "dicom-no-pixels": (lambda p: _dicom(p, lambda ds: delattr(ds, "PixelData")), "DICOM has no Pixel Data"),
    "dicom-multiframe": (
        lambda p: _dicom(p, lambda ds: ds.set_pixel_data(np.zeros((2, 16, 16), np.uint8), "MONOCHROME2", 8)),
        "multi-frame DICOM (2 frames)",
    ),
    "dicom-rgb": (
        lambda p: _dicom(p, lambda ds: ds.set_pixel_data(np.zeros((16, 16, 3), np.uint8), "RGB", 8)),
        "colour DICOM (PhotometricInterpretation RGB, SamplesPerPixel 3)",
    ),
    "zero-bytes": (lambda p: (p.with_suffix(".png").write_bytes(b""), p.with_suffix(".png"))[1], "empty file (0 bytes)"),
    "text-as-png": (lambda p: (p.with_suffix(".png").write_text("id,x\n1,2\n"), p.with_suffix(".png"))[1], "not a PNG, JPEG or DICOM file"),
    "text-as-dcm": (lambda p: (p.write_text("hello, not dicom " * 10), p)[1], "not a DICOM image (no 'DICM' marker"),
    "huge": (lambda p: _png(p.with_suffix(".png"), seed=9, size=40), "40×40 = 1600 pixels exceeds the limit of 1500"),
}


@pytest.mark.parametrize("defect", sorted(IMAGE_DEFECTS))
def test_train_refuses_a_bad_image_naming_manifest_row_and_file(defect, tmp_path, old_run, monkeypatch, capsys):
    make, expected = IMAGE_DEFECTS[defect]
    (tmp_path / "img").mkdir()
    bad = make(tmp_path / "img" / "bad.dcm")
    manifest = _manifest(tmp_path, [f"img/{bad.name},1,A,pX"])
    out, before = old_run
    extra = ["--set", "data.max_pixels=1500"] if defect == "huge" else []
    _refused(_train_args(manifest, out, "--force", *extra), monkeypatch, capsys,
             f"error: {manifest}: 1 problem(s) in 1 of 13 rows: row 14 path: {bad.name}: {expected}")
    assert _snapshot(out) == before


# -- models ---------------------------------------------------------------------------------------


def test_predict_refuses_corrupt_and_foreign_onnx_models(tmp_path, monkeypatch, capsys):
    image = _png(tmp_path / "x.png", seed=1, size=32)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07 certainly not protobuf" * 20)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "foreign",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    foreign = tmp_path / "foreign.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(foreign))
    csv = tmp_path / "pred.csv"
    csv.write_text("old predictions\n")
    for model, expected in ((garbage, "not a readable ONNX model"), (foreign, "without cxrdebias metadata")):
        _refused(["predict", "--model", model, image, "--out", csv, "--force"], monkeypatch, capsys, f"error: {model}: ", expected)
        assert csv.read_text() == "old predictions\n"


def test_pretrained_weights_of_another_architecture_are_one_line(tmp_path, monkeypatch, capsys):
    from torchvision.models import resnet18

    weights = tmp_path / "r18.pt"
    torch.save(resnet18(weights=None).state_dict(), weights)
    out = tmp_path / "run"
    _refused(_train_args(_manifest(tmp_path), out, "--pretrained", weights), monkeypatch, capsys,
             f"error: {weights}: ", "features")
    assert not (out / "results.json").exists() and not list(out.glob("checkpoints/*.pt"))


def test_pretrained_weights_of_another_architecture_leave_the_old_run(tmp_path, old_run, monkeypatch, capsys):
    from torchvision.models import resnet18

    weights = tmp_path / "r18.pt"
    torch.save(resnet18(weights=None).state_dict(), weights)
    out, before = old_run
    _refused(_train_args(_manifest(tmp_path), out, "--force", "--pretrained", weights), monkeypatch, capsys, str(weights))
    assert _snapshot(out) == before


def _mnist_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["reproduce", "biased-mnist", "--data-root", str(data), "--rho", "0.99", "--epochs", "2", "--out", str(out),
            "--set", "train.batch_size=32", "--set", "train.progress=false", "--set", "train.num_threads=1", *extra]


def test_resume_with_a_checkpoint_of_another_architecture(fake_mnist, tmp_path, monkeypatch, capsys):
    """last.pt and prev.pt copied from a run with other convolutions: refused, not loaded."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli([*_mnist_args(fake_mnist, a, "--set", "model.kernel_size=3")], monkeypatch, capsys)[0] == 0
    assert run_cli([*_mnist_args(fake_mnist, b, "--set", "model.kernel_size=5")], monkeypatch, capsys)[0] == 0
    (a / "results.json").unlink()  # as if a was still training
    for name in ("last.pt", "prev.pt"):
        shutil.copy(b / "checkpoints" / name, a / "checkpoints" / name)
    before = _snapshot(a)
    _refused([*_mnist_args(fake_mnist, a, "--set", "model.kernel_size=3"), "--resume"], monkeypatch, capsys,
             f"error: {a / 'checkpoints' / 'last.pt'}: written by a run with a different config")
    assert _snapshot(a) == before


# -- evaluation of a trained CXR run (real two-site set) ------------------------------------------


@pytest.fixture(scope="module")
def cxr_run(cxr_manifest, tmp_path_factory):
    """A one-epoch 32 px run on the real set, evaluated once (its eval/ is what must survive)."""
    import sys

    from cxrdebias.cli import main
    from tests.conftest import single_torch_thread

    out = tmp_path_factory.mktemp("bad-input") / "run"
    mp = pytest.MonkeyPatch()
    try:
        with single_torch_thread():
            for argv in (_train_args(cxr_manifest, out, "--set", "train.batch_size=32", "--set", "data.workers=1"),
                         ["evaluate", out, "--n-boot", "20"]):
                mp.setattr(sys, "argv", ["cxrdebias", *map(str, argv)])
                main()
    finally:
        mp.undo()
    return out


def _real_rows(cxr_manifest: Path) -> tuple[str, list[str]]:
    """The header and, for each site, two rows of each label (site A label 0: CSV lines 2–3,
    label 1: lines 4–5, then site B)."""
    lines = cxr_manifest.read_text().splitlines()
    cols = lines[0].split(",")
    site, label = cols.index("site"), cols.index("label")
    picked = []
    for s in sorted({r.split(",")[site] for r in lines[1:]}):
        for y in ("0", "1"):
            picked += [r for r in lines[1:] if r.split(",")[site] == s and r.split(",")[label] == y][:2]
    return lines[0], picked


def _eval_manifest(cxr_manifest: Path, folder: Path, header: str, rows: list[str]) -> Path:
    """``rows`` of the real manifest in ``folder``/eval.csv (the images copied: links may not leave the folder)."""
    if not (folder / "data").exists():
        shutil.copytree(cxr_manifest.parent, folder / "data")
    i = header.split(",").index("path")
    relinked = [",".join(f[:i] + ["data/" + f[i]] + f[i + 1 :]) for f in (r.split(",") for r in rows)]
    path = folder / "eval.csv"
    path.write_text("\n".join([header, *relinked]) + "\n")
    return path


def _with(rows: list[str], header: str, column: str, value: str, at: tuple[int, ...]) -> list[str]:
    """``rows`` with ``column`` set to ``value`` in the rows at the indices ``at``."""
    i = header.split(",").index(column)
    return [",".join(f[:i] + [value] + f[i + 1 :]) if k in at else r for k, (r, f) in enumerate((r, r.split(",")) for r in rows)]


@pytest.mark.slow
def test_evaluate_scores_unknown_sites_as_external_refuses_bad_rows_and_keeps_the_report(cxr_run, cxr_manifest, tmp_path, monkeypatch, capsys):
    report = _snapshot(cxr_run / "eval")
    assert "report.json" in report
    header, rows = _real_rows(cxr_manifest)
    manifest = _eval_manifest(cxr_manifest, tmp_path, header, _with(rows, header, "site", "hospital-z", (0, 2)))
    # a site the model was not trained on is scored and marked external (issue 21), not refused
    code, _, err = run_cli(["evaluate", cxr_run, "--data", manifest, "--out", tmp_path / "ext-eval"], monkeypatch, capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "ext-eval" / "report.json").read_text())["external_sites"] == ["hospital-z"]
    assert _snapshot(cxr_run / "eval") == report

    for column, value, expected in (("label", "nan", "row 2 label: 'nan'; expected 0 or 1"),
                                    ("path", "../../escape.png", "row 2 path: 'data/../../escape.png' leaves the manifest folder")):
        manifest = _eval_manifest(cxr_manifest, tmp_path, header, _with(rows, header, column, value, (0,)))
        _refused(["evaluate", cxr_run, "--data", manifest, "--force"], monkeypatch, capsys, f"error: {manifest}: ", expected)
        assert _snapshot(cxr_run / "eval") == report
    other = tmp_path / "other-eval"
    _refused(["evaluate", cxr_run, "--data", manifest, "--out", other], monkeypatch, capsys, "row 2 path")
    assert not other.exists()


@pytest.mark.slow
def test_evaluate_refuses_a_model_of_another_architecture(cxr_run, tmp_path, monkeypatch, capsys):
    """model.pt whose weights are those of another head width: one line naming model.pt."""
    run = tmp_path / "run"
    shutil.copytree(cxr_run, run)
    art = torch.load(run / "model.pt", weights_only=False)
    art["model_config"] = {**art["model_config"], "hidden_dim": 32}  # the weights have 16
    torch.save(art, run / "model.pt")
    report = _snapshot(run / "eval")
    line = _refused(["evaluate", run, "--force"], monkeypatch, capsys,
                    f"error: {run / 'model.pt'}: weights do not fit the recorded architecture")
    assert "size mismatch" in line
    assert _snapshot(run / "eval") == report


def test_error_text_with_brackets_is_printed_verbatim(tmp_path, monkeypatch, capsys):
    manifest = _manifest(tmp_path, ["img/A0.png,[/x],A,pX"])
    _refused(["data", "check", manifest], monkeypatch, capsys, "row 14 label: '[/x]'; expected 0 or 1")
