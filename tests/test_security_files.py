"""Untrusted files (issue 22, findings 1, 2 and the ``--set train.lr=.inf`` case of 7).

1. A checkpoint, ``model.pt`` or ``--pretrained`` file is read with ``weights_only=True``: a
   pickle that would run code is refused with one line at every entry point (evaluate, export,
   analyze-bias, train --resume, train --pretrained) and its code never runs; the files
   cxrdebias writes (and wrote before: numpy random states in checkpoints, numpy-1 names)
   still load.
2. ``--force`` replaces only a folder cxrdebias wrote (its marker, or the layout of before the
   marker), never a folder holding ``.git``, the input data or the run being evaluated; a
   run folder another process writes is refused.
7. A non-finite float option is refused when the config is validated, before any folder exists.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrdebias.data.synthetic import SynthConfig, synthesize
from cxrdebias.errors import CheckpointError, RunExistsError
from cxrdebias.training.folders import LOCK_FILE, MARKERS
from cxrdebias.training.runs import RunDir, torch_load_checked
from tests.conftest import REPO, run_cli, single_torch_thread

pytestmark = pytest.mark.usefixtures("torch_one_thread_per_module")

TRAIN = [
    "--config", str(REPO / "configs" / "cxr" / "synthetic.yaml"), "--epochs", "2", "--image-size", "32",
    "--set", "model.hidden_dim=8", "--set", "train.progress=false", "--set", "train.num_threads=1", "--set", "data.workers=1",
    "--set", "train.select_metric=auroc",
]


def _main(args: list[str]) -> None:
    from cxrdebias.cli import main

    mp = pytest.MonkeyPatch()
    mp.setattr(sys, "argv", ["cxrdebias", *map(str, args)])
    try:
        with single_torch_thread():
            main()
    except SystemExit as exc:
        assert not exc.code, f"cxrdebias {' '.join(map(str, args))} exited with {exc.code}"
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A small synthetic two-site CXR set: its manifest."""
    root = tmp_path_factory.mktemp("sec-data") / "data"
    synthesize(root, SynthConfig(seed=3, image_size=48, n_train_patients_per_site=6, n_val_patients_per_site=4, n_test_patients_per_site=4))
    return root / "manifest.csv"


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    """A two-epoch run (model.pt, checkpoints/last.pt, prev.pt, best.pt) and its evaluation report."""
    out = tmp_path_factory.mktemp("sec-run") / "run"
    _main(["train", "--data", data, "--out", out, *TRAIN])
    _main(["evaluate", out, "--n-boot", "20"])
    return out


def _copy(run: Path, tmp_path: Path, name: str = "run") -> Path:
    dst = tmp_path / name
    shutil.copytree(run, dst)
    (dst / LOCK_FILE).unlink(missing_ok=True)
    return dst


def _one_line(code: int, _out: str, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# -- 1. no code from checkpoints -------------------------------------------------------------------
class Payload:
    """Pickles as a call of ``os.system`` that creates ``marker`` (what a hostile file does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _poison(path: Path, marker: Path, *, key: str | None = None) -> None:
    """Rewrite the torch file ``path`` with the payload inside (beside its real contents)."""
    obj = torch.load(path, weights_only=False) if path.is_file() else {}
    if isinstance(obj, dict):
        obj = {**obj, key or "created": Payload(marker)}
    torch.save(obj, path)


ENTRY_POINTS = ["evaluate", "export", "analyze-bias", "train --resume", "train --pretrained"]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_pickle_that_runs_code_is_refused_and_never_runs(entry, run, data, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "PWNED"
    copy = _copy(run, tmp_path)
    if entry == "evaluate":
        _poison(copy / "model.pt", marker)
        args = ["evaluate", copy, "--out", tmp_path / "report", "--n-boot", "20"]
    elif entry == "export":
        _poison(copy / "model.pt", marker)
        args = ["export", copy, "--out", tmp_path / "model.onnx"]
    elif entry == "analyze-bias":
        _poison(copy / "checkpoints" / "last.pt", marker)
        args = ["analyze-bias", copy, "--out", tmp_path / "analysis"]
    elif entry == "train --resume":
        for name in ("last.pt", "prev.pt"):
            _poison(copy / "checkpoints" / name, marker)
        args = ["train", "--data", data, "--out", copy, *TRAIN, "--resume"]
    else:
        weights = tmp_path / "densenet121.pth"
        from cxrdebias.models.densenet import DenseNet121

        torch.save({"state_dict": DenseNet121(2).state_dict()}, weights)
        _poison(weights, marker, key="epoch")
        args = ["train", "--data", data, "--out", tmp_path / "new", *TRAIN, "--pretrained", weights]
    line = _one_line(*run_cli(args, monkeypatch, capsys))
    assert not marker.exists(), f"{entry}: the pickled code ran"
    assert "refused" in line and "posix.system" in line, line


@pytest.mark.parametrize("writer", ["torch-zip", "torch-legacy", "plain-pickle"])
def test_a_payload_is_refused_in_every_file_format_torch_reads(writer, tmp_path):
    """The zip format of torch >= 1.6, the legacy format and a bare pickle: refused, not run."""
    import pickle

    marker, path = tmp_path / "PWNED", tmp_path / "weights.pt"
    obj = {"conv.weight": torch.zeros(1), "meta": Payload(marker)}
    if writer == "plain-pickle":
        path.write_bytes(pickle.dumps(obj))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=writer == "torch-zip")
    with pytest.raises(CheckpointError) as info:
        torch_load_checked(path)
    assert not marker.exists()
    assert str(info.value).count("\n") == 0 and str(path) in str(info.value)
    if writer != "plain-pickle":
        assert "refused" in str(info.value) and "posix.system" in str(info.value)


def test_the_files_cxrdebias_writes_load_with_their_numpy_random_state(run):
    """A run written by this code has the checkpoint format of before (numpy's random state
    as an ndarray in ``rng``): every file of it loads and the random state restores."""
    from cxrdebias.training.checkpoint import set_rng_state

    for name in ("checkpoints/last.pt", "checkpoints/prev.pt", "checkpoints/best.pt", "model.pt"):
        assert isinstance(torch_load_checked(run / name), dict), name
    rng = torch_load_checked(run / "checkpoints" / "last.pt")["rng"]
    assert isinstance(rng["numpy"][1], np.ndarray) and rng["numpy"][1].dtype == np.uint32
    set_rng_state(rng)


def test_a_checkpoint_written_under_numpy_1_loads(tmp_path):
    """numpy 1 pickles arrays as ``numpy.core.multiarray._reconstruct`` (numpy 2: ``numpy._core``)."""
    new, old = tmp_path / "np2.pt", tmp_path / "np1.pt"
    state = np.random.RandomState(7).get_state()
    torch.save({"rng": {"numpy": state}, "w": torch.ones(2)}, new)
    with zipfile.ZipFile(new) as zin, zipfile.ZipFile(old, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            blob = zin.read(info)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in blob
                blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(info, blob)
    loaded = torch_load_checked(old)["rng"]["numpy"]
    assert np.array_equal(loaded[1], state[1]) and loaded[2] == state[2]


def test_only_numpy_random_states_are_allowed_and_only_while_reading(tmp_path):
    """The numpy allow-list is scoped to the read: torch's global list is left as it was, and
    other pickled objects (here a ``Path``) are still refused."""
    torch.save({"where": Path("/x")}, tmp_path / "path.pt")
    with pytest.raises(CheckpointError, match="refused.*PosixPath"):
        torch_load_checked(tmp_path / "path.pt")
    torch.save({"rng": np.random.get_state()}, tmp_path / "rng.pt")
    assert isinstance(torch_load_checked(tmp_path / "rng.pt")["rng"][1], np.ndarray)
    assert np.ndarray not in torch.serialization.get_safe_globals()
    with pytest.raises(Exception, match="numpy"):  # torch's own weights-only load still refuses numpy afterwards
        torch.load(tmp_path / "rng.pt", weights_only=True)


def test_an_old_run_still_evaluates_exports_analyses_and_resumes(run, data, tmp_path, monkeypatch, capsys):
    """A run of the format of before (its files as the old code wrote them) at each entry point."""
    copy = _copy(run, tmp_path)
    for marker in MARKERS.values():
        (copy / marker).unlink(missing_ok=True)  # a run from before the markers
    assert run_cli(["evaluate", copy, "--out", tmp_path / "rep", "--n-boot", "20"], monkeypatch, capsys)[0] == 0
    assert run_cli(["analyze-bias", copy, "--out", tmp_path / "an"], monkeypatch, capsys)[0] == 0
    assert run_cli(["export", copy, "--out", tmp_path / "model.onnx"], monkeypatch, capsys)[0] == 0
    code, _, err = run_cli(["train", "--data", data, "--out", copy, *TRAIN, "--resume"], monkeypatch, capsys)
    assert code == 0, err
    assert json.loads((copy / "results.json").read_text())["train"]["resumed_from_epoch"] == 2


# -- 2. --force replaces only what cxrdebias wrote -------------------------------------------------
def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _thesis(folder: Path) -> Path:
    (folder / ".git").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / "thesis.tex").write_text("\\chapter{Results}\n")
    (folder / "config.yaml").write_text("name: thesis\n")  # even with a run's files beside it
    (folder / "run.json").write_text("{}\n")
    return folder


def test_train_force_refuses_a_folder_holding_git(data, tmp_path, monkeypatch, capsys):
    folder = _thesis(tmp_path / "thesis")
    before = _snapshot(folder)
    line = _one_line(*run_cli(["train", "--data", data, "--out", folder, *TRAIN, "--force"], monkeypatch, capsys))
    assert ".git" in line and str(folder) in line, line
    assert _snapshot(folder) == before


def test_train_force_refuses_the_dataset_folder_and_a_folder_above_it(data, tmp_path, monkeypatch, capsys):
    """The data may look like anything; the folder holding the manifest is never replaced."""
    copy = tmp_path / "sets" / "cxr"
    shutil.copytree(data.parent, copy)
    (copy / "config.yaml").write_text("x: 1\n")  # a data folder that happens to look like an old run
    (copy / "run.json").write_text("{}\n")
    before = _snapshot(tmp_path / "sets")
    for out in (copy, copy.parent):
        line = _one_line(*run_cli(["train", "--data", copy / "manifest.csv", "--out", out, *TRAIN, "--force"], monkeypatch, capsys))
        assert "manifest.csv" in line and "reads" in line, line
    assert _snapshot(tmp_path / "sets") == before


def test_train_force_refuses_a_folder_cxrdebias_did_not_write(data, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"\xff\xd8 not much of a photo")
    line = _one_line(*run_cli(["train", "--data", data, "--out", folder, *TRAIN, "--force"], monkeypatch, capsys))
    assert "not a cxrdebias run folder" in line and MARKERS["run"] in line, line
    assert (folder / "holiday.jpg").is_file() and sorted(p.name for p in folder.iterdir()) == ["holiday.jpg"]


def test_train_force_replaces_a_run_with_its_marker_and_one_from_before_the_marker(run, data, tmp_path, monkeypatch, capsys):
    marked = _copy(run, tmp_path, "marked")
    old = _copy(run, tmp_path, "old")
    (old / MARKERS["run"]).unlink()  # written before the markers: config.yaml + run.json
    for folder in (marked, old):
        (folder / "stale.txt").write_text("from the old run\n")
        code, _, err = run_cli(["train", "--data", data, "--out", folder, *TRAIN, "--epochs", "1", "--force"], monkeypatch, capsys)
        assert code == 0, err
        assert not (folder / "stale.txt").exists() and not (folder / "eval").exists()
        assert json.loads((folder / MARKERS["run"]).read_text())["cxrdebias"] == "run"
        assert json.loads((folder / "results.json").read_text())["epochs_trained"] == 1


def test_evaluate_force_never_replaces_the_run_it_evaluates(run, tmp_path, monkeypatch, capsys):
    copy = _copy(run, tmp_path)
    before = _snapshot(copy)
    for out in (copy, copy.parent):
        line = _one_line(*run_cli(["evaluate", copy, "--out", out, "--force", "--n-boot", "20"], monkeypatch, capsys))
        assert "reads" in line, line
    assert _snapshot(copy) == before and (copy / "model.pt").is_file()


def test_evaluate_force_refuses_git_data_and_foreign_folders(run, data, tmp_path, monkeypatch, capsys):
    thesis = _thesis(tmp_path / "thesis")
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me\n")
    data_copy = tmp_path / "data"
    shutil.copytree(data.parent, data_copy)
    outs = {thesis: ".git", foreign: "not a cxrdebias report folder", data_copy: "reads"}
    for out, why in outs.items():
        before = _snapshot(out)
        args = ["evaluate", run, "--out", out, "--force", "--n-boot", "20"]
        if out == data_copy:
            args += ["--data", data_copy / "manifest.csv"]
        line = _one_line(*run_cli(args, monkeypatch, capsys))
        assert why in line, line
        assert _snapshot(out) == before


def test_evaluate_force_replaces_its_own_report_and_one_from_before_the_marker(run, tmp_path, monkeypatch, capsys):
    copy = _copy(run, tmp_path)
    assert json.loads((copy / "eval" / MARKERS["report"]).read_text())["cxrdebias"] == "report"
    old = tmp_path / "old-report"
    shutil.copytree(copy / "eval", old)
    (old / MARKERS["report"]).unlink()  # a report written before the marker (report.json + report.md)
    for out in (copy / "eval", old):
        (out / "stale.txt").write_text("x\n")
        code, _, err = run_cli(["evaluate", copy, "--out", out, "--force", "--n-boot", "20"], monkeypatch, capsys)
        assert code == 0, err
        assert not (out / "stale.txt").exists() and (out / "report.json").is_file() and (out / MARKERS["report"]).is_file()


HOLD_LOCK = """
import fcntl, os, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
f.seek(0); f.truncate(); f.write(str(os.getpid())); f.flush()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_writer_of_a_run_folder_is_refused_and_a_dead_ones_lock_does_not_block(run, data, tmp_path, monkeypatch, capsys):
    """Another process writing the run (it holds the run's lock, as a running `train` does):
    `train --force` and `train --resume` are refused and change nothing; once that process is
    gone, its lock file left behind blocks nothing."""
    copy = _copy(run, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(copy / LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _snapshot(copy)
        for extra in (["--force"], ["--resume"]):
            line = _one_line(*run_cli(["train", "--data", data, "--out", copy, *TRAIN, *extra], monkeypatch, capsys))
            assert f"another cxrdebias process (pid {holder.pid}) is writing this run" in line, line
        with pytest.raises(RunExistsError, match="another cxrdebias process"):
            RunDir.create(copy, force=True)
        assert _snapshot(copy) == before
    finally:
        holder.kill()
        holder.wait()
    assert (copy / LOCK_FILE).is_file()  # left behind by the dead process
    code, _, err = run_cli(["train", "--data", data, "--out", copy, *TRAIN, "--epochs", "1", "--force"], monkeypatch, capsys)
    assert code == 0, err


@pytest.mark.slow
def test_a_run_holds_its_lock_while_it_trains_and_releases_it_after(data, tmp_path, monkeypatch, capsys):
    """While `train` runs in one process, a second process cannot lock the folder; after it ends it can."""
    out = tmp_path / "run"
    log = tmp_path / "log.txt"
    args = [sys.executable, "-m", "cxrdebias.cli", "train", "--data", str(data), "--out", str(out), *map(str, TRAIN), "--epochs", "3"]
    with log.open("w") as f:
        proc = subprocess.Popen(args, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    try:
        t0 = time.monotonic()
        while not (out / "metrics.jsonl").is_file():
            assert proc.poll() is None and time.monotonic() - t0 < 120, log.read_text()
            time.sleep(0.05)
        probe = subprocess.run([sys.executable, "-c", HOLD_LOCK.replace("time.sleep(120)", ""), str(out / LOCK_FILE)], capture_output=True, text=True)
        assert probe.returncode != 0 and "BlockingIOError" in probe.stderr, probe
    finally:
        assert proc.wait(timeout=300) == 0, log.read_text()
    probe = subprocess.run([sys.executable, "-c", HOLD_LOCK.replace("time.sleep(120)", ""), str(out / LOCK_FILE)], capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr


# -- 7. non-finite float options -------------------------------------------------------------------
@pytest.mark.parametrize("option", ["train.lr=.inf", "train.weight_decay=.inf", "train.lr_gamma=.inf"])
def test_a_non_finite_float_option_is_refused_before_any_folder_exists(option, data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    line = _one_line(*run_cli(["train", "--data", data, "--out", out, *TRAIN, "--epochs", "1", "--set", option], monkeypatch, capsys))
    assert option.split("=")[0] in line and "finite" in line, line
    assert not out.exists()


def test_a_json_file_is_size_checked_before_it_is_read(tmp_path, monkeypatch):
    from cxrdebias.errors import DataError
    from cxrdebias.fileio import read_json_file

    path = tmp_path / "table.json"
    path.write_text('{"cells": [1, 2]}')
    assert read_json_file(path, 100) == {"cells": [1, 2]}
    read = []
    monkeypatch.setattr(type(path), "read_text", lambda self, **kw: read.append(self) or "")
    with pytest.raises(DataError, match=r"table\.json: 17 bytes; at most 10 are read"):
        read_json_file(path, 10)
    assert read == []  # refused on its size, never read
    monkeypatch.undo()
    path.write_text("{not json")
    with pytest.raises(DataError, match=r"table\.json: cannot read \(Expecting"):
        read_json_file(path, 100)
    with pytest.raises(DataError, match=r"missing\.json: cannot read \(No such file or directory\)"):
        read_json_file(tmp_path / "missing.json", 100)
