"""Faults from outside: signals and kills during training, corrupt checkpoints, an output folder
that cannot be written. Each ends in a one-line error (or a clean resume), never a traceback."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
