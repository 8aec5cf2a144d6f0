"""Untrusted inputs (issue 22, findings 4–6): memory bombs, paths that leave the manifest
folder, FIFOs, and inputs that used to give silently wrong results.

The memory tests run ``cxrdebias predict`` / ``data check`` in a child process whose address
space is limited to 1 GiB (``RLIMIT_AS``). The child runs with ``MALLOC_ARENA_MAX=2``: glibc
reserves 64 MiB of address space for every thread's malloc arena, which is address space, not
memory, and would otherwise count four times in ``data check``'s decoding threads.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import onnx
import pydicom
import pytest
from onnx import TensorProto, helper
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info

from cxrdebias.data.images import MIN_IMAGE_SIDE, read_image, write_dicom
from cxrdebias.data.preprocess import PreprocessSpec
from cxrdebias.deploy.onnx_metadata import ModelMetadata, encode
from cxrdebias.errors import CheckpointError, ConfigError, DataError
from tests.conftest import REPO, run_cli, single_torch_thread, worklist

GIB = 1 << 30
SIDE = 7000  # 49 million pixels: under the default max_pixels, 196 MB as float32, 392 MB as float64


# -- inputs -------------------------------------------------------------------------------------
def _model(path: Path, size: int = 32) -> Path:
    """A tiny exported-model stand-in: probabilities from the image mean, CAM = the image."""
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["m"], axes=[2, 3], keepdims=0),
        helper.make_node("Sigmoid", ["m"], ["s"]),
        helper.make_node("Sub", ["one", "s"], ["ns"]),
        helper.make_node("Concat", ["ns", "s"], ["probabilities"], axis=1),
        helper.make_node("ReduceMean", ["image"], ["c"], axes=[1], keepdims=0),
        helper.make_node("Sigmoid", ["c"], ["cam"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, size, size])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2]),
         helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["N", size, size])],
        initializer=[helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    for key, value in encode(_metadata(size)).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


def _metadata(size: int = 32, **changes) -> dict:
    meta = {"cxrdebias_format": 1, "model_version": "t", "labels": ["negative", "positive"],
            "positive_label": "positive", "threshold": 0.5, "preprocessing": PreprocessSpec(image_size=size).model_dump()}
    return {**meta, **changes}


def _deflated_dicom_bomb(path: Path, rows: int, cols: int) -> Path:
    """A Deflated Explicit VR Little Endian DICOM of ``rows × cols`` 16-bit zeros (≈1000:1).

    The deflate stream is built from one compressed 16 MiB block of zeros repeated: each piece
    ends with a full flush (byte-aligned, no reference to earlier data), so pieces concatenate."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.ComputedRadiographyImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "1.2.3.4"
    ds.SOPClassUID = pydicom.uid.ComputedRadiographyImageStorage
    ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "CR", rows, cols, 1
    ds.PhotometricInterpretation, ds.PixelRepresentation = "MONOCHROME2", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    n = rows * cols * 2
    head = body.getvalue() + b"\xe0\x7f\x10\x00OW\x00\x00" + n.to_bytes(4, "little")
    meta = DicomBytesIO()
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)

    def piece(data: bytes) -> bytes:
        z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        return z.compress(data) + z.flush(zlib.Z_FULL_FLUSH)

    block = 1 << 24
    full = piece(bytes(block))
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM" + meta.getvalue() + piece(head))
        for _ in range(n // block):
            f.write(full)
        f.write(piece(bytes(n % block)))
        f.write(zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS).flush())  # the final (empty) block
    return path


def _gradient(offset: int) -> np.ndarray:
    """A 7000² image whose rows are constant (a PNG of it is ~60 KB), distinct per ``offset``."""
    return np.repeat(((np.arange(SIDE) + offset) % 251).astype(np.uint8)[:, None], SIDE, axis=1)


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bombs")
    Image.fromarray(np.zeros((SIDE, SIDE), np.uint8)).save(root / "zeros.png")
    for i in range(4):
        Image.fromarray(_gradient(i)).save(root / f"g{i}.png")
    _deflated_dicom_bomb(root / "bomb.dcm", 24500, 24500)  # 1.2 GB inflated, ~1.2 MB on disk
    (root / "gradients.csv").write_text(
        "path,label,site,patient_id\ng0.png,0,a,p0\ng1.png,1,a,p1\ng2.png,0,b,p2\ng3.png,1,b,p3\n"
    )
    (root / "bombs.csv").write_text("path,label,site,patient_id\nzeros.png,0,a,p0\nbomb.dcm,1,a,p1\n")
    _model(root / "model.onnx")
    return root


def _limited(args: list[str], limit: int = GIB, timeout: float = 300) -> subprocess.CompletedProcess:
    """``cxrdebias ARGS`` in a child whose address space is limited to ``limit`` bytes."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = {**os.environ, "PYTHONPATH": str(REPO), "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1", "COLUMNS": "400"}
    return subprocess.run([sys.executable, "-m", "cxrdebias.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, preexec_fn=cap)


def _one_error_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and "MemoryError" not in res.stderr, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, res.stderr
    return lines[0]


# -- finding 4: memory bombs ----------------------------------------------------------------------
def test_png_bombs_stay_under_1_gib_in_predict_and_data_check(bombs, tmp_path):
    model = bombs / "model.onnx"
    # a 7000² PNG of zeros (~50 KB): refused as blank, no float64 copy on the way
    line = _one_error_line(_limited(["predict", "--model", model, bombs / "zeros.png", "--out", tmp_path / "z.csv"]))
    assert "zeros.png: blank image" in line
    # a valid 7000² image is decoded and scored within the limit (float32 conversion)
    res = _limited(["predict", "--model", model, bombs / "g0.png", "--out", tmp_path / "g.csv"])
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "g.csv").read_text().count("\n") == 2
    # data check decodes four of them with its four workers: the decode budget takes them in turn
    res = _limited(["data", "check", bombs / "gradients.csv"])
    assert res.returncode == 0, res.stderr
    assert "4 valid rows" in res.stdout
    # the measurement is the limit itself: a child that needed more than 1 GiB of address space
    # (resident memory included) would have failed with a MemoryError above. (RUSAGE_CHILDREN
    # would report the largest child this whole test session waited for, not these three.)


def test_deflated_dicom_bomb_is_refused_before_it_inflates(bombs, tmp_path):
    assert (bombs / "bomb.dcm").stat().st_size < 3_000_000
    res = _limited(["predict", "--model", bombs / "model.onnx", bombs / "bomb.dcm", "--out", tmp_path / "p.csv"])
    assert "bomb.dcm: deflated DICOM inflates to more than" in _one_error_line(res)
    line = _one_error_line(_limited(["data", "check", bombs / "bombs.csv"]))
    assert "row 2 path: zeros.png: blank image" in line and "row 3 path: bomb.dcm: deflated DICOM inflates" in line
    assert not (tmp_path / "p.csv").exists()


def test_a_small_deflated_dicom_is_still_read(tmp_path):
    ramp = (np.arange(64 * 64) % 4096).astype(np.uint16).reshape(64, 64)
    plain = write_dicom(tmp_path / "plain.dcm", ramp, bits_stored=12)
    ds = pydicom.dcmread(plain)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
    a, b = read_image(plain), read_image(tmp_path / "deflated.dcm")
    np.testing.assert_array_equal(a.pixels, b.pixels)
    assert b.meta["transfer_syntax"] == pydicom.uid.DeflatedExplicitVRLittleEndian
    with pytest.raises(DataError, match="64×64 = 4096 pixels exceeds the limit of 1024"):
        read_image(tmp_path / "deflated.dcm", max_pixels=32 * 32)


def test_a_dicom_file_larger_than_its_pixels_could_be_is_refused_unread(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", (np.arange(64 * 64) % 256).astype(np.uint8).reshape(64, 64))
    with open(path, "ab") as f:
        f.truncate(path.stat().st_size + (65 << 20))  # sparse: 65 MiB of trailing zeros
    with pytest.raises(DataError, match=r"DICOM file of \d+ bytes is larger than an image of at most 4096 pixels"):
        read_image(path, max_pixels=4096)


def test_float_conversion_is_float32_and_equals_the_float64_one(tmp_path):
    for dtype, scale in ((np.uint8, 255.0), (np.uint16, 65535.0)):
        stored = np.random.default_rng(0).integers(0, int(scale) + 1, (40, 50)).astype(dtype)
        Image.fromarray(stored).save(tmp_path / "x.png")
        pixels = read_image(tmp_path / "x.png").pixels
        assert pixels.dtype == np.float32
        np.testing.assert_array_equal(pixels, (stored.astype(np.float64) / scale).astype(np.float32))


# -- finding 5: paths ---------------------------------------------------------------------------
@pytest.fixture
def linked_out(tmp_path):
    """A manifest folder whose ``x.png`` links to a secret file outside it and ``y.png`` to an
    image outside it."""
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-CONTENT of a file outside the manifest folder\n")
    image = tmp_path / "outside.png"
    Image.fromarray(_gradient(0)[:64, :64]).save(image)
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "x.png").symlink_to(secret)
    (folder / "y.png").symlink_to(image)
    return folder


@pytest.mark.parametrize("name", ["x.png", "y.png"])
def test_symlinks_leaving_the_manifest_folder_are_refused_without_printing_the_file(linked_out, name, tmp_path, monkeypatch, capsys):
    manifest = linked_out / "manifest.csv"
    manifest.write_text(f"path,label,site,patient_id\n{name},0,a,p0\n")
    model = _model(tmp_path / "model.onnx")
    for args in (["predict", "--model", model, manifest, "--out", tmp_path / "p.csv"], ["data", "check", manifest]):
        code, out, err = run_cli(args, monkeypatch, capsys)
        assert code == 2, out + err
        assert f"'{name}' leads outside the manifest folder through a symbolic link" in err
        assert "SECRET" not in out + err and "Traceback" not in err
    assert not (tmp_path / "p.csv").exists()


def test_a_fifo_named_like_an_image_does_not_hang_predict(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    os.mkfifo(folder / "x.png")
    os.mkfifo(folder / "noext")
    (tmp_path / "manifest.csv").write_text("path,label,site,patient_id\nin/x.png,0,a,p0\n")
    model = _model(tmp_path / "model.onnx")
    for target, expected in ((folder, "x.png: not a regular file (a FIFO)"), (folder / "x.png", "x.png: not a regular file"),
                             (tmp_path / "manifest.csv", "'in/x.png' is not a regular file")):
        res = _limited(["predict", "--model", model, target, "--out", tmp_path / "p.csv"], limit=4 * GIB, timeout=60)
        assert expected in _one_error_line(res)


# -- finding 6: silent wrong results ------------------------------------------------------------
def test_an_image_below_the_minimum_size_is_refused(tmp_path, monkeypatch, capsys):
    Image.fromarray(np.array([[200]], np.uint8)).save(tmp_path / "one.png")
    Image.fromarray(np.arange(31 * 40, dtype=np.uint16).reshape(31, 40) % 255).convert("L").save(tmp_path / "thin.png")
    write_dicom(tmp_path / "one.dcm", np.array([[7, 9]], np.uint8))
    for name in ("one.png", "thin.png", "one.dcm"):
        with pytest.raises(DataError, match=rf"too small; expected at least {MIN_IMAGE_SIDE}×{MIN_IMAGE_SIDE}"):
            read_image(tmp_path / name)
    code, out, err = run_cli(["predict", "--model", _model(tmp_path / "m.onnx"), tmp_path / "one.png", "--out", tmp_path / "p.csv"],
                             monkeypatch, capsys)
    assert code == 2 and "one.png: image of 1×1 pixels is too small" in err and not (tmp_path / "p.csv").exists()


def test_a_dicom_whose_bits_stored_masks_the_data_is_refused_as_blank(tmp_path):
    data = ((np.arange(64 * 64) * 16) % 4096).astype(np.uint16).reshape(64, 64)  # every value a multiple of 16
    ds = pydicom.dcmread(write_dicom(tmp_path / "ok.dcm", data, bits_stored=12))
    ds.BitsStored, ds.HighBit = 4, 3  # the low 4 bits only: all zero
    ds.save_as(tmp_path / "bits.dcm")
    assert read_image(tmp_path / "ok.dcm").pixels.max() == 1.0
    with pytest.raises(DataError, match=r"bits.dcm: blank image \(every stored value \(BitsStored 4\) is 0\)"):
        read_image(tmp_path / "bits.dcm")
    ds = pydicom.dcmread(tmp_path / "ok.dcm")
    ds.WindowCenter, ds.WindowWidth = 30000, 100  # a window far above the data
    ds.save_as(tmp_path / "window.dcm")
    with pytest.raises(DataError, match="window.dcm: blank image after the DICOM rescale/window"):
        read_image(tmp_path / "window.dcm")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"labels": ["positive", "positive"]}, "repeats the class name 'positive'"),
        ({"labels": ["a", 3], "positive_label": "a"}, "two non-empty class names"),
        ({"threshold": True}, "'threshold' True; expected a number strictly between 0 and 1"),
        ({"threshold": 1}, "strictly between 0 and 1"),
        ({"threshold": 0.0}, "strictly between 0 and 1"),
        ({"threshold": "0.5"}, "strictly between 0 and 1"),
    ],
)
def test_model_metadata_is_validated_strictly(changes, message):
    with pytest.raises(CheckpointError, match=message):
        ModelMetadata.from_props(encode(_metadata(**changes)), "m.onnx")
    assert ModelMetadata.from_props(encode(_metadata()), "m.onnx").threshold == 0.5


@pytest.mark.parametrize("method", ["vanilla", "groupdro", "end"])
def test_an_unknown_method_option_is_refused_for_every_method(method, tmp_path, monkeypatch, capsys):
    from cxrdebias.debias import build_method
    from cxrdebias.experiments.config import build_config

    cfg = build_config(None, default_path=REPO / "configs" / "cxr" / "default.yaml", method=method, overrides=["method.bogus=1"])
    with pytest.raises(ConfigError, match=rf"method '{method}': bogus"):
        build_method(cfg.method.name, cfg.method.options())
    code, out, err = run_cli(["train", "--data", tmp_path / "missing.csv", "--method", method, "--set", "method.bogus=1",
                              "--out", tmp_path / "run"], monkeypatch, capsys)
    assert code == 2 and "bogus" in err and not (tmp_path / "run").exists(), err


def test_an_interrupted_overlay_write_leaves_no_partial_png(tmp_path, monkeypatch):
    from PIL import PngImagePlugin

    from cxrdebias.data.preprocess import resize_geometry
    from cxrdebias.deploy.overlay import save_overlay

    def killed(im, fp, filename, *args, **kwargs):
        fp.write(b"\x89PNG")
        raise KeyboardInterrupt  # what a kill in the middle of the write looks like to the writer

    monkeypatch.setitem(Image.SAVE, "PNG", killed)
    monkeypatch.setattr(PngImagePlugin, "_save", killed)
    image = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    with pytest.raises(KeyboardInterrupt):
        save_overlay(tmp_path / "cams" / "00001_a.png", image, np.zeros((32, 32), np.float32),
                     resize_geometry(image.shape, PreprocessSpec(image_size=32)))
    assert not (tmp_path / "cams" / "00001_a.png").exists()
    assert list((tmp_path / "cams").iterdir()) == []


# -- finding 5: --allow-outside (images kept on a mounted share, linked from the manifest folder) --
LINK_REFUSED = "leads outside the manifest folder through a symbolic link (pass --allow-outside to follow links out of the manifest folder)"


@pytest.fixture
def linked_share(tmp_path) -> tuple[Path, Path]:
    """``study/manifest.csv`` whose ``images`` folder is a link to ``share/`` outside ``study/``
    (``images -> /mnt/pacs/export``): two sites × eight patients, both labels per site.
    Returns the manifest and the share."""
    share, study = tmp_path / "share", tmp_path / "study"
    share.mkdir()
    study.mkdir()
    lines = []
    for s, site in enumerate("AB"):
        for p in range(8):
            pixels = np.random.default_rng(100 * s + p).integers(0, 256, (32, 32), dtype=np.uint8)
            Image.fromarray(pixels).save(share / f"{site}{p}.png")
            lines.append(f"images/{site}{p}.png,{p % 2},{site},{site}-{p}")
    (study / "images").symlink_to(share, target_is_directory=True)
    manifest = study / "manifest.csv"
    manifest.write_text("\n".join(["path,label,site,patient_id", *lines]) + "\n")
    return manifest, share


def test_allow_outside_follows_a_linked_images_folder_in_check_and_predict(linked_share, tmp_path, monkeypatch, capsys):
    from cxrdebias.data.cxr import load_manifest

    manifest, share = linked_share
    with pytest.raises(DataError, match=r"'images/A0\.png' " + LINK_REFUSED.replace("(", r"\(").replace(")", r"\)")):
        load_manifest(manifest)
    df = load_manifest(manifest, allow_links_outside=True)
    assert len(df) == 16 and {Path(p).resolve().parent for p in df["abs_path"]} == {share.resolve()}

    model = _model(tmp_path / "model.onnx")
    check = ["data", "check", manifest]
    predict = ["predict", "--model", model, manifest, "--out", tmp_path / "p.csv"]
    for args in (check, predict):  # refused without the option, and the refusal names it
        code, out, err = run_cli(args, monkeypatch, capsys)
        assert code == 2 and LINK_REFUSED in err and "Traceback" not in err, err
    assert not (tmp_path / "p.csv").exists()
    code, out, err = run_cli([*check, "--allow-outside"], monkeypatch, capsys)
    assert code == 0 and "16 valid rows, 16 patients" in out, err
    code, out, err = run_cli([*predict, "--allow-outside"], monkeypatch, capsys)
    assert code == 0, err
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert len(rows) == 17 and rows[1].startswith(str(manifest.parent / "images" / "A0.png"))


@pytest.mark.parametrize("row, expected", [
    ("../share/A0.png", "'../share/A0.png' leaves the manifest folder"),
    ("images/../../share/A0.png", "leaves the manifest folder"),
    ("ABSOLUTE", "is absolute; expected a path relative to the manifest folder"),
    ("images/fifo.png", "'images/fifo.png' is not a regular file"),
    ("images/nope.png", "file not found: images/nope.png"),
])
def test_allow_outside_still_refuses_dotdot_absolute_missing_and_non_regular_paths(row, expected, linked_share, tmp_path, monkeypatch, capsys):
    manifest, share = linked_share
    os.mkfifo(share / "fifo.png")
    row = str(share / "A0.png") if row == "ABSOLUTE" else row
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join([*lines, f"{row},0,A,A-extra"]) + "\n")
    model = _model(tmp_path / "model.onnx")
    for args in (["data", "check", manifest, "--allow-outside"],
                 ["predict", "--model", model, manifest, "--out", tmp_path / "p.csv", "--allow-outside"]):
        code, out, err = run_cli(args, monkeypatch, capsys)
        assert code == 2 and "row 18" in err and expected in err and "Traceback" not in err, err
    assert not (tmp_path / "p.csv").exists()


def test_train_with_allow_outside_records_it_and_evaluate_rereads_the_manifest_the_same_way(linked_share, tmp_path, monkeypatch, capsys):
    import yaml

    manifest, _ = linked_share
    train = ["train", "--data", manifest, "--bias", "site", "--method", "vanilla", "--epochs", "1", "--image-size", "32",
             "--set", "train.progress=false", "--set", "model.hidden_dim=16", "--set", "data.split_protocol=random",
             "--set", "data.workers=1"]
    code, out, err = run_cli([*train, "--out", tmp_path / "refused"], monkeypatch, capsys)
    assert code == 2 and LINK_REFUSED in err and not (tmp_path / "refused").exists(), err
    run = tmp_path / "run"
    with single_torch_thread():
        code, out, err = run_cli([*train, "--out", run, "--allow-outside"], monkeypatch, capsys)
        assert code == 0, err
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["data"]["allow_links_outside"] is True
        code, out, err = run_cli(["evaluate", run, "--n-boot", "10"], monkeypatch, capsys)  # the run's own manifest
        assert code == 0, err
        # another manifest given to evaluate follows links out of its folder only with --allow-outside
        code, out, err = run_cli(["evaluate", run, "--data", manifest, "--n-boot", "10", "--out", tmp_path / "e"], monkeypatch, capsys)
        assert code == 2 and LINK_REFUSED in err, err
        code, out, err = run_cli(["evaluate", run, "--data", manifest, "--n-boot", "10", "--out", tmp_path / "e", "--allow-outside"],
                                 monkeypatch, capsys)
        assert code == 0, err
    # export's check images: the run's validation split, read the way the run allowed
    from cxrdebias.deploy.export import validation_images

    images, source = validation_images(run, config)
    assert images and "validation split" in source, source
    images, source = validation_images(run, {**config, "data": {**config["data"], "allow_links_outside": False}})
    assert images is None and LINK_REFUSED in source


def test_view_with_allow_outside_shows_a_linked_images_folder(linked_share, tmp_path, monkeypatch, capsys):
    from streamlit.testing.v1 import AppTest

    manifest, _ = linked_share
    model = _model(tmp_path / "model.onnx")
    calls = []
    monkeypatch.setattr(os, "execvp", lambda file, cmd: calls.append(cmd))  # `view` execs Streamlit
    for extra in ([], ["--allow-outside"]):
        code, _, err = run_cli(["view", "--model", model, "--data", manifest, *extra], monkeypatch, capsys)
        assert code == 0, err
    assert "--allow-outside" not in calls[0] and calls[1][-1] == "--allow-outside"

    monkeypatch.setenv("CXRDEBIAS_VIEWER_MODEL", str(model))
    monkeypatch.setenv("CXRDEBIAS_VIEWER_DATA", str(manifest))
    for argv, rows in ((["viewer.py"], 0), (calls[1][calls[1].index("--"):], 16)):
        monkeypatch.setattr(sys, "argv", argv)
        at = AppTest.from_file(str(REPO / "apps" / "viewer.py"), default_timeout=120).run()
        assert not at.exception, at.exception
        if rows:
            assert len(worklist(at).value) == rows
        else:
            assert any(LINK_REFUSED in e.value.replace("\\", "") for e in at.error), [e.value for e in at.error]
