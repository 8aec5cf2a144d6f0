"""Faults from outside: signals and kills during training, corrupt checkpoints, an output folder
that cannot be written, a disk that fills up. Each ends in a one-line error (or a clean resume),
never a traceback."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cxrdebias import fileio
from tests.conftest import REPO, run_cli


def _tiny_args(data: Path, out: Path, epochs: int) -> list[str]:
    return [
        "reproduce", "biased-mnist", "--data-root", str(data), "--rho", "0.99", "--epochs", str(epochs),
        "--out", str(out), "--set", "train.batch_size=32", "--set", "train.progress=false",
        "--set", "model.kernel_size=3", "--set", "train.num_threads=1",
    ]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    f = log.open("w")
    return subprocess.Popen([sys.executable, "-m", "cxrdebias.cli", *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT)


def _wait_for_epoch(proc: subprocess.Popen, run: Path, epoch: int, log: Path, timeout: float = 90) -> None:
    metrics = run / "metrics.jsonl"
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if metrics.is_file() and any(json.loads(line)["epoch"] >= epoch for line in metrics.read_text().splitlines() if line.strip()):
            return
        assert proc.poll() is None, f"the run ended before epoch {epoch}:\n{log.read_text()}"
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no epoch {epoch} line in {metrics} after {timeout} s:\n{log.read_text()}")


@pytest.mark.slow
def test_sigterm_then_sigkill_then_resume_completes(fake_mnist, tmp_path):
    """SIGTERM: a one-line message and exit code 143; --resume continues; a SIGKILL of that
    resumed run (no chance to clean up) is resumed as well, to a complete run."""
    out, log = tmp_path / "run", tmp_path / "log.txt"
    args = _tiny_args(fake_mnist, out, epochs=4)

    proc = _start(args, log)
    _wait_for_epoch(proc, out, 1, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, log.read_text()
    text = log.read_text()
    assert "Traceback" not in text
    lines = [line for line in text.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and re.search(
        r"error: interrupted \(SIGTERM\) (at epoch \d step \d+|after epoch \d); epoch \d is saved: resume with --resume", lines[0]
    ), text
    assert not (out / "results.json").exists()

    proc = _start([*args, "--resume"], log)
    _wait_for_epoch(proc, out, 2, log)
    proc.kill()  # SIGKILL
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (out / "results.json").exists()

    proc = _start([*args, "--resume"], log)
    assert proc.wait(timeout=90) == 0, log.read_text()
    assert "resuming after epoch" in log.read_text()
    res = json.loads((out / "results.json").read_text())
    assert res["epochs"] == 4 and res["train"]["resumed_from_epoch"] >= 1  # 1 if killed before the epoch-2 checkpoint
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


@pytest.mark.parametrize("case", ["file-in-the-way", "read-only-folder"])
def test_unwritable_output_folder_is_one_line_error(case, fake_mnist, tmp_path, monkeypatch, capsys):
    if case == "file-in-the-way":  # fails for root too
        (tmp_path / "file.txt").write_text("x")
        out = tmp_path / "file.txt" / "run"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into a chmod 0o500 folder; the file-in-the-way case covers root")
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        out = ro / "run"
    try:
        code, stdout, err = run_cli(_tiny_args(fake_mnist, out, epochs=1), monkeypatch, capsys)
    finally:
        if case == "read-only-folder":
            (tmp_path / "ro").chmod(0o700)
    assert code == 2, err
    assert "Traceback" not in err + stdout
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and str(out) in lines[-1] and "cannot create or write the output folder" in lines[-1]
    assert not out.exists()



# -- a disk that fills up ---------------------------------------------------------------------


class _FullDisk:
    """A file that takes ``room`` more bytes and then fails like a full disk (ENOSPC); the bytes
    that fitted are on disk, as after a real short write."""

    def __init__(self, f, room: int):
        self._f, self.room = f, room

    def write(self, b) -> int:
        b = bytes(b)
        if len(b) > self.room:
            if self.room:
                self._f.write(b[: self.room])
                self._f.flush()
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self._f.write(b)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.fixture
def disk_full(monkeypatch):
    """``disk_full(name, call=k, room=n)``: the k-th write of a file called ``name`` (through
    :mod:`cxrdebias.fileio`, which every run/report file goes through) runs out of space after
    ``n`` bytes. ``disk_full(None)``: space again."""
    real = fileio.open_for_write

    def arm(name: str | None, *, call: int = 1, room: int = 100) -> list[Path]:
        seen: list[Path] = []

        def open_write(fd, path, buffering=-1):
            f = real(fd, path, buffering)
            if Path(path).name != name:
                return f
            seen.append(Path(path))
            return _FullDisk(f, room) if len(seen) == call else f

        monkeypatch.setattr(fileio, "open_for_write", real if name is None else open_write)
        return seen

    return arm


def _one_line_disk_full_error(code: int, stdout: str, err: str, path: Path) -> str:
    assert code == 2, err
    assert "Traceback" not in err + stdout
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith(f"error: {path}: cannot write, the disk is full"), err
    return lines[-1]


def _no_temp_files(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")], sorted(folder.rglob("*"))


def _epochs(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_disk_full_while_writing_a_checkpoint(fake_mnist, tmp_path, monkeypatch, capsys, disk_full, torch_one_thread):
    """The epoch-2 checkpoint cannot be written: one line naming last.pt, the epoch-1 checkpoint
    (rotated to prev.pt) intact, no temp file, no results.json; --resume completes the run."""
    out = tmp_path / "run"
    args = _tiny_args(fake_mnist, out, epochs=3)
    seen = disk_full("last.pt", call=2, room=1000)
    line = _one_line_disk_full_error(*run_cli(args, monkeypatch, capsys), out / "checkpoints" / "last.pt")
    assert len(seen) == 2 and "--resume" in line
    assert not (out / "results.json").exists() and not (out / "checkpoints" / "last.pt").exists()
    _no_temp_files(out)
    assert torch.load(out / "checkpoints" / "prev.pt", weights_only=False)["epoch"] == 1
    assert _epochs(out) == [1, 2]  # epoch 2's line was logged before its checkpoint; resume drops it

    disk_full(None)
    code, stdout, err = run_cli([*args, "--resume"], monkeypatch, capsys)
    assert code == 0, err
    assert "resumed from prev.pt" in err
    res = json.loads((out / "results.json").read_text())
    assert res["epochs"] == 3 and res["train"]["resumed_from_epoch"] == 1
    assert _epochs(out) == [1, 2, 3]


def test_disk_full_while_appending_to_the_metrics_log(fake_mnist, tmp_path, monkeypatch, capsys, disk_full, torch_one_thread):
    """Epoch 2's log line is cut short by a full disk: the half line is removed (the log stays
    readable), the epoch-1 checkpoint is the newest, --resume completes."""
    out = tmp_path / "run"
    args = _tiny_args(fake_mnist, out, epochs=3)
    before = None

    seen = disk_full("metrics.jsonl", call=2, room=10)
    line = _one_line_disk_full_error(*run_cli(args, monkeypatch, capsys), out / "metrics.jsonl")
    assert len(seen) == 2 and "--resume" in line
    before = (out / "metrics.jsonl").read_text()
    assert before.endswith("\n") and _epochs(out) == [1]
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=False)["epoch"] == 1
    assert not (out / "results.json").exists()
    _no_temp_files(out)

    disk_full(None)
    code, stdout, err = run_cli([*args, "--resume"], monkeypatch, capsys)
    assert code == 0, err
    assert json.loads((out / "results.json").read_text())["train"]["resumed_from_epoch"] == 1
    assert _epochs(out) == [1, 2, 3]


def test_disk_full_while_writing_results_leaves_no_results(fake_mnist, tmp_path, monkeypatch, capsys, disk_full, torch_one_thread):
    """All epochs trained, results.json cannot be written: no results.json (the run does not look
    finished); --resume trains nothing more and writes it."""
    out = tmp_path / "run"
    args = _tiny_args(fake_mnist, out, epochs=2)
    disk_full("results.json", room=50)
    line = _one_line_disk_full_error(*run_cli(args, monkeypatch, capsys), out / "results.json")
    assert "--resume" in line
    assert not (out / "results.json").exists()
    _no_temp_files(out)

    disk_full(None)
    code, stdout, err = run_cli([*args, "--resume"], monkeypatch, capsys)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["epochs"] == 2 and res["train"]["resumed_from_epoch"] == 2
    assert _epochs(out) == [1, 2]


def test_disk_full_in_the_first_epoch_says_start_again(fake_mnist, tmp_path, monkeypatch, capsys, disk_full, torch_one_thread):
    """No checkpoint was saved yet: the line says to start again with --force, not to resume."""
    out = tmp_path / "run"
    disk_full("last.pt", call=1, room=0)
    line = _one_line_disk_full_error(*run_cli(_tiny_args(fake_mnist, out, epochs=2), monkeypatch, capsys), out / "checkpoints" / "last.pt")
    assert "--force" in line and "--resume" not in line
    _no_temp_files(out)


CXR_FAST = [
    "--epochs", "1", "--image-size", "32", "--set", "train.progress=false", "--set", "train.batch_size=32",
    "--set", "model.hidden_dim=16", "--set", "data.workers=1",
]


#: the hidden files a run folder keeps (its marker and write lock, issue 22), not left-overs
OWN_HIDDEN = {".cxrdebias-run", ".cxrdebias.lock"}


@pytest.mark.slow
def test_disk_full_in_cxr_train_and_evaluate(cxr_manifest, tmp_path, monkeypatch, capsys, disk_full, torch_one_thread):
    """`cxrdebias train`: a full disk at results.json leaves no results.json; --resume finishes.
    `cxrdebias evaluate`: a full disk at any report file leaves no report folder (the files are
    written beside it and moved in place when complete), and with --force the previous report
    stays byte for byte."""
    out = tmp_path / "run"
    args = ["train", "--data", cxr_manifest, "--bias", "site", "--method", "vanilla", "--out", out, *CXR_FAST]
    disk_full("results.json", room=100)
    line = _one_line_disk_full_error(*run_cli(args, monkeypatch, capsys), out / "results.json")
    assert "--resume" in line and not (out / "results.json").exists()
    _no_temp_files(out)
    disk_full(None)
    code, _, err = run_cli([*args, "--resume"], monkeypatch, capsys)
    assert code == 0, err
    assert json.loads((out / "results.json").read_text())["epochs_trained"] == 1

    evaluate = ["evaluate", out, "--n-boot", "20"]
    disk_full("report.png", room=2000)  # the 4th of the 5 files
    _one_line_disk_full_error(*run_cli(evaluate, monkeypatch, capsys), out / "eval" / "report.png")
    assert not (out / "eval").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name not in OWN_HIDDEN]  # no staging folder left

    disk_full(None)
    code, _, err = run_cli(evaluate, monkeypatch, capsys)
    assert code == 0, err
    files = {p.name: p.read_bytes() for p in (out / "eval").iterdir()}
    assert set(files) == {"report.json", "report.csv", "report.md", "report.png", "calibration.png", "predictions.csv", ".cxrdebias-report"}

    disk_full("predictions.csv", room=10)
    line = _one_line_disk_full_error(*run_cli([*evaluate, "--force", "--n-boot", "30"], monkeypatch, capsys), out / "eval" / "predictions.csv")
    assert "evaluate` again" in line
    assert {p.name: p.read_bytes() for p in (out / "eval").iterdir()} == files
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name not in OWN_HIDDEN]
