"""Shared fixtures. Real data lives in ../shared/data (never copied into the repo)."""

from __future__ import annotations

import contextlib
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_exec_of_the_test_process(monkeypatch):
    """`cxrdebias view` replaces its process by Streamlit's (os.execvp): called in-process by a test
    that did not mock it, it would replace pytest itself and the run would hang on a server. A
    test that means to exec mocks ``os.execvp`` itself (its monkeypatch wins over this one)."""
    import os

    def refuse(file, args):
        pytest.fail(f"os.execvp({file!r}, ...) called in the test process; mock os.execvp in this test")

    monkeypatch.setattr(os, "execvp", refuse)
SHARED_DATA = REPO.parent / "shared" / "data"
MNIST15K = SHARED_DATA / "mnist15k"
CXR_SOURCES = SHARED_DATA / "cxr-covid-sources"


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    """Write a uint8 array in IDX format (the MNIST file format)."""
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def make_fake_mnist(root: Path, n_train: int = 200, n_test: int = 100, seed: int = 0, gz: bool = False) -> Path:
    """A tiny MNIST-layout folder: digits are class-dependent blobs so a CNN can learn them."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    sfx = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        for i, c in enumerate(labels):
            r, col = divmod(int(c), 4)
            images[i, 4 + 6 * r : 9 + 6 * r, 4 + 5 * col : 9 + 5 * col] = rng.integers(100, 256)
        write_idx(raw / f"{prefix}-images-idx3-ubyte{sfx}", images, gz=gz)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte{sfx}", labels, gz=gz)
    return root


@pytest.fixture
def fake_mnist(tmp_path) -> Path:
    return make_fake_mnist(tmp_path / "mnist")


@pytest.fixture
def mnist15k() -> Path:
    if not (MNIST15K / "MNIST" / "raw").is_dir():
        pytest.skip(f"real MNIST-15k data not found at {MNIST15K} (see ../shared/data/README.md)")
    return MNIST15K


def run_cli(args, monkeypatch, capsys) -> tuple[int, str, str]:
    """Run ``cxrdebias ARGS`` in-process: exit code, stdout, stderr."""
    import sys

    from cxrdebias.cli import main

    monkeypatch.setattr(sys, "argv", ["cxrdebias", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def interrupt_after_epoch(trainer, epoch: int = 1) -> None:
    """Run ``trainer.fit()`` and crash (KeyboardInterrupt) right after the checkpoint of ``epoch``."""
    save = trainer.save_checkpoint

    def crash(e):
        save(e)
        if e == epoch:
            raise KeyboardInterrupt

    trainer.save_checkpoint = crash
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()


def adam_context(
    num_samples: int,
    num_classes: int,
    num_biases: int | None,
    *,
    lr: float,
    weight_decay: float = 0.0,
    lr_step: int | None = None,
    gamma: float = 0.5,
    build_model=None,
):
    """A :class:`~cxrdebias.debias.base.TrainContext` for a method's unit tests: the networks the
    method owns get ``Adam(lr, weight_decay)`` and ``StepLR(lr_step, gamma)`` (no schedule
    without ``lr_step``)."""
    import torch

    from cxrdebias.debias.base import TrainContext

    def make_scheduler(opt):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=lr_step, gamma=gamma) if lr_step else None

    return TrainContext(
        num_samples=num_samples,
        num_classes=num_classes,
        num_biases=num_biases,
        make_optimizer=lambda params: torch.optim.Adam(params, lr=lr, weight_decay=weight_decay),
        make_scheduler=make_scheduler,
        build_model=build_model,
    )


def resume_after_interrupt(make_trainer, run_dir: Path, epoch: int = 1):
    """Crash a run in ``run_dir`` after the checkpoint of ``epoch`` (:func:`interrupt_after_epoch`),
    then resume it; returns the resumed trainer and its ``fit(resume=True)`` result.

    ``make_trainer(run)`` builds a trainer on a :class:`~cxrdebias.training.runs.RunDir`; it is
    called twice (the interrupted run, then the resumed one on the same folder).
    """
    from cxrdebias.training.runs import RunDir

    interrupt_after_epoch(make_trainer(RunDir.create(run_dir)), epoch)
    resumed = make_trainer(RunDir.create(run_dir, resume=True))
    return resumed, resumed.fit(resume=True)


def assert_same_tensors(a, b) -> None:
    """Two modules (or objects with ``state_dict``) hold bit-identical tensors."""
    import torch

    for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
        else:
            assert x == y


@pytest.fixture(scope="session")
def cxr_manifest() -> Path:
    path = CXR_SOURCES / "manifest.csv"
    if not path.is_file():
        pytest.skip(f"real CXR set not found at {CXR_SOURCES} (see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def real_pngs(cxr_manifest):
    """Two real radiographs of each site: manifest rows (paths into the shared data, never copied)."""
    import csv

    rows = list(csv.DictReader(cxr_manifest.open()))
    by_site: dict[str, list[dict]] = {}
    for row in rows:
        by_site.setdefault(row["site"], []).append(row)
    return [r for site in sorted(by_site) for r in by_site[site][:2]]


#: a one-epoch DenseNet-121 run at the default 64 px (a 2×2 last feature map, so Grad-CAM is
#: not constant; at 32 px it would be 1×1)
TINY_CXR_TRAIN = [
    "--epochs", "1", "--image-size", "64", "--set", "train.progress=false", "--set", "train.batch_size=32",
    "--set", "model.hidden_dim=16", "--set", "data.workers=2",
]


@contextlib.contextmanager
def single_torch_thread():
    """torch on one CPU thread inside the block (small models on a busy machine are many times
    faster without OpenMP threads waiting on each other); the previous count is restored."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def torch_one_thread():
    with single_torch_thread():
        yield


@pytest.fixture(scope="module")
def torch_one_thread_per_module():
    """:func:`single_torch_thread` for a whole test module, its module-scoped fixtures included
    (``pytestmark = pytest.mark.usefixtures("torch_one_thread_per_module")``)."""
    with single_torch_thread():
        yield


@pytest.fixture(scope="session")
def tiny_cxr_run(cxr_manifest, tmp_path_factory) -> Path:
    """An EnD (L2-normalised bottleneck + Tanh) CXR run on the real two-site set, site as the bias."""
    import sys

    from cxrdebias.cli import main

    out = tmp_path_factory.mktemp("cxr-run") / "end"
    mp = pytest.MonkeyPatch()
    mp.setattr(sys, "argv", ["cxrdebias", "train", "--data", str(cxr_manifest), "--bias", "site", "--method", "end", "--out", str(out), *TINY_CXR_TRAIN])
    try:
        with single_torch_thread():
            main()
    finally:
        mp.undo()
    return out


def run_without_its_images(run: Path, dest: Path) -> Path:
    """A copy of ``run`` (model, splits, config) whose recorded manifest points nowhere: a run
    moved to a machine without its training images."""
    import shutil

    dest.mkdir(parents=True)
    for name in ("model.pt", "splits.csv"):
        shutil.copy(run / name, dest / name)
    config = (run / "config.yaml").read_text()
    (dest / "config.yaml").write_text(config.replace("manifest: ", "manifest: /nonexistent/", 1))
    return dest


@pytest.fixture(scope="session")
def exported_cxr_model(tiny_cxr_run, tmp_path_factory):
    """``export_run`` of :func:`tiny_cxr_run`, verified on its validation split (an ``ExportResult``)."""
    from cxrdebias.deploy.export import export_run

    with single_torch_thread():
        return export_run(tiny_cxr_run, tmp_path_factory.mktemp("exported") / "model.onnx", n_cam_images=8)


@pytest.fixture(scope="module")
def model_file(exported_cxr_model):
    """The exported tiny CXR model (the viewer's tests)."""
    return exported_cxr_model.model


@pytest.fixture(scope="session")
def legacy_model_file(exported_cxr_model, tmp_path_factory):
    """The tiny model as exported before the OOD guard (metadata format 1): the same weights, two
    outputs (probabilities, cam), no temperature / OOD / training-site keys."""
    from cxrdebias.data.preprocess import PreprocessSpec
    from cxrdebias.deploy.artefact import load_model_artefact
    from cxrdebias.deploy.export import to_onnx_bytes, with_metadata

    meta = dict(exported_cxr_model.metadata)
    model, art = load_model_artefact(meta["export"]["source_run"])
    graph = to_onnx_bytes(model, PreprocessSpec.model_validate(art["preprocess"]))
    for key in ("temperature", "ood_threshold", "ood_method", "training_sites"):
        meta.pop(key)
    meta["cxrdebias_format"] = 1
    meta["threshold"] = float(art["threshold"])  # the unscaled model's threshold
    path = tmp_path_factory.mktemp("legacy") / "old.onnx"
    path.write_bytes(with_metadata(graph, meta))
    return path


@pytest.fixture(scope="module")
def study_data(cxr_manifest, real_pngs, tmp_path_factory):
    """A manifest of the four real radiographs (links) and a folder with one DICOM made from one
    of them (site and patient only in its tags): the viewer's study."""
    import shutil

    from PIL import Image

    from cxrdebias.data.images import write_dicom

    root = tmp_path_factory.mktemp("viewer-data")
    man = root / "manifest"
    man.mkdir()
    lines = ["path,label,site,patient_id"]
    for i, r in enumerate(real_pngs):
        shutil.copy(cxr_manifest.parent / r["path"], man / f"img{i}.png")  # links may not leave the folder
        lines.append(f"img{i}.png,{r['label']},{r['site']},{r['patient_id']}")
    (man / "manifest.csv").write_text("\n".join(lines) + "\n")
    folder = root / "dicom"
    gray = np.asarray(Image.open(cxr_manifest.parent / real_pngs[0]["path"]).convert("L"))
    write_dicom(folder / "a.dcm", gray, institution_name="tag-site", patient_id="tag-patient")
    return man / "manifest.csv", folder


def worklist(at):
    """The viewer page's worklist (an ``st.dataframe`` whose key starts with ``worklist:``) in an AppTest."""
    return next(d for d in at.dataframe if d.key and d.key.startswith("worklist:"))


def open_row(at, name: str):
    """Click the viewer's worklist row of ``name`` (its short name) in an AppTest, as the browser does."""
    rows = list(worklist(at).value["name"])
    at.session_state[worklist(at).key] = {"selection": {"rows": [rows.index(name)], "columns": [], "cells": []}}
    return at.run()


@contextlib.contextmanager
def viewer_server(model: Path, data: list[Path], log_dir: Path, script: Path | None = None):
    """`cxrdebias view`'s Streamlit server on a free local port, up and healthy; yields the port
    and stops the server (its whole process group) afterwards. ``script``: serve this page
    instead of ``apps/viewer.py`` (with the same command line)."""
    import os
    import signal
    import socket
    import subprocess
    import time
    import urllib.request

    from cxrdebias.cli.deploy import viewer_command

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_file = log_dir / "server.log"
    log = log_file.open("w")
    cmd = viewer_command(model, data, port)
    if script is not None:
        cmd[cmd.index("run") + 1] = str(script)
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("the Streamlit server did not start:\n" + log_file.read_text()[-3000:])
                time.sleep(0.5)
        yield port
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def tiny_synthetic_cxr_run(root: Path, synth, *overrides: str) -> Path:
    """A 1-epoch EnD run (site as the bias, 32 px, a tiny head) on the synthetic set ``synth``
    written under ``root``; no ../shared data needed. Returns the run folder."""
    from cxrdebias.data.synthetic import synthesize
    from cxrdebias.experiments.config import load_config
    from cxrdebias.experiments.runner import run_experiment

    synthesize(root / "data", synth)
    cfg = load_config(
        REPO / "configs" / "cxr" / "synthetic.yaml",
        [
            f"data.manifest={root / 'data' / 'manifest.csv'}", "data.preprocess.image_size=32", "model.hidden_dim=8",
            "method.name=end", "train.epochs=1", "train.progress=false", "train.num_threads=1", *overrides,
        ],
    )
    run_experiment(cfg, root / "run")
    return root / "run"
