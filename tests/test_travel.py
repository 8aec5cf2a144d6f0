"""Runs that travel (issue 24, item 7): file modes, the recorded manifest path, `view` exec,
progress of long steps, TensorBoard curves."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from cxrdebias import fileio
from cxrdebias.console import make_console, progress
from cxrdebias.training.runs import RunDir, staging_folder
from tests.conftest import run_cli, single_torch_thread, tiny_synthetic_cxr_run


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_give_plain_file_modes(tmp_path, umask_022):
    """mkstemp makes 0600 files and mkdtemp 0700 folders; what cxrdebias writes is 0644 / 0755."""
    fileio.write_text_atomic(tmp_path / "a.txt", "x")
    fileio.write_json_atomic(tmp_path / "sub" / "b.json", {"a": 1})
    assert _mode(tmp_path / "a.txt") == 0o644
    assert _mode(tmp_path / "sub" / "b.json") == 0o644
    assert _mode(tmp_path / "sub") == 0o755
    assert _mode(staging_folder(tmp_path / "report")) == 0o755


def test_file_modes_follow_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        fileio.write_text_atomic(tmp_path / "private.txt", "x")
        assert _mode(tmp_path / "private.txt") == 0o600
    finally:
        os.umask(old)


# -- a run folder moved with its data, used from another folder --------------------------------

TRAVEL_SYNTH = dict(seed=3, image_size=32, n_train_patients_per_site=8, n_val_patients_per_site=15,
                    n_test_patients_per_site=4, images_per_patient=(1, 1))


@pytest.fixture(scope="module")
def travelled_run(tmp_path_factory):
    """A tiny run trained with a manifest path relative to the folder it was trained in, then
    moved (run and data together) elsewhere; returns (the moved run, what training printed on stderr)."""
    from cxrdebias.data.synthetic import SynthConfig

    base = tmp_path_factory.mktemp("travel")
    root = base / "project"
    root.mkdir()
    err = io.StringIO()
    mp = pytest.MonkeyPatch()
    try:
        mp.chdir(root)  # the manifest is given relative to this folder, as a user would
        with single_torch_thread(), contextlib.redirect_stderr(err):
            run = tiny_synthetic_cxr_run(root, SynthConfig(**TRAVEL_SYNTH), "data.manifest=data/manifest.csv")
    finally:
        mp.undo()
    assert run == root / "run"
    moved = base / "elsewhere" / "moved-project"
    moved.parent.mkdir()
    shutil.move(str(root), str(moved))
    return moved / "run", err.getvalue()


def test_the_run_records_where_its_manifest_lies(travelled_run):
    run, _ = travelled_run
    info = json.loads((run / "run.json").read_text())["data"]["manifest_location"]
    assert info["relative_to_run"] == os.path.join("..", "data", "manifest.csv")
    assert Path(info["absolute"]).is_absolute() and not Path(info["absolute"]).exists()  # moved away
    assert RunDir(run).locate_manifest("data/manifest.csv") == run / ".." / "data" / "manifest.csv"


def test_evaluate_export_compare_work_after_moving_from_another_folder(travelled_run, tmp_path, monkeypatch):
    from cxrdebias.deploy.export import validation_images
    from cxrdebias.experiments.evaluate import compare_runs, evaluate_run

    run, _ = travelled_run
    monkeypatch.chdir(tmp_path)  # neither the training folder (gone) nor the run's
    with single_torch_thread():
        report = evaluate_run(run, n_boot=10, console=make_console(stderr=True))
    assert report["overall"]["n"] == 2 * TRAVEL_SYNTH["n_test_patients_per_site"]
    assert (run / "eval" / "report.md").is_file()
    images, source = validation_images(run, RunDir(run).read_config_located())
    assert images is not None and len(images) == 2 * TRAVEL_SYNTH["n_val_patients_per_site"], source
    assert "# run (end) vs run (end)" in compare_runs(run, run, n_boot=0)


def _threshold_warnings(printed: str) -> list[str]:
    return [line for line in printed.splitlines() if "decision threshold was chosen on only" in line]


def test_a_threshold_chosen_on_few_validation_images_is_warned_about(travelled_run):
    _, printed = travelled_run  # 2 sites × 15 validation patients, one image each
    (warning,) = _threshold_warnings(printed)
    assert "30 validation images" in warning


def test_no_threshold_warning_for_200_validation_images(tmp_path):
    from cxrdebias.data.synthetic import SynthConfig

    synth = SynthConfig(**(TRAVEL_SYNTH | {"n_train_patients_per_site": 4, "n_val_patients_per_site": 100, "n_test_patients_per_site": 2}))
    err = io.StringIO()
    with single_torch_thread(), contextlib.redirect_stderr(err):
        run = tiny_synthetic_cxr_run(tmp_path, synth)
    assert json.loads((run / "run.json").read_text())["data"]["splits"]["val"] == 200
    assert "CXR method=end" in err.getvalue() and _threshold_warnings(err.getvalue()) == []


# -- progress of long steps ---------------------------------------------------------------------


def _terminal() -> tuple[io.StringIO, object]:
    buf = io.StringIO()
    return buf, make_console(stderr=True, file=buf, force_terminal=True, width=200, color_system=None)


def test_progress_draws_a_counted_bar_on_a_terminal_only():
    buf, console = _terminal()
    with progress(console, "writing [x]", total=5) as update:
        update(completed=3)
    text = buf.getvalue()
    assert "writing" in text and "3/5" in text
    quiet = io.StringIO()
    with progress(make_console(file=quiet), "writing", total=5) as update:  # a log file: nothing drawn
        update(completed=5)
    assert quiet.getvalue() == ""


def test_synth_and_evaluate_show_progress(travelled_run, tmp_path, monkeypatch, capsys):
    import cxrdebias.cli.data as cli_data
    import cxrdebias.cli.experiments as cli_experiments

    buf, console = _terminal()
    monkeypatch.setattr(cli_data, "err", console)
    monkeypatch.setattr(cli_experiments, "err", console)
    code, _, _ = run_cli(["data", "synth", "--out", tmp_path / "d", "--image-size", 32, "--train-patients", 2,
                          "--val-patients", 1, "--test-patients", 2], monkeypatch, capsys)
    assert code == 0
    text = buf.getvalue()
    assert "writing the synthetic set" in text and "10/10" in text  # 2 sites × 5 patients, per patient
    run, _ = travelled_run
    with single_torch_thread():
        code, _, _ = run_cli(["evaluate", run, "--out", tmp_path / "eval", "--n-boot", 5], monkeypatch, capsys)
    assert code == 0 and f"evaluating {run}" in buf.getvalue().replace("\n", "")


# -- TensorBoard curves -------------------------------------------------------------------------


def test_tensorboard_scalars_are_the_epoch_records_numbers():
    from cxrdebias.training.curves import scalars

    record = {"epoch": 3, "lr": 0.001, "train": {"loss": 0.5, "img_per_s": 10, "ok": True}, "val": {"auroc": float("nan"), "ba": 0.7}}
    assert dict(scalars(record)) == {"lr": 0.001, "train/loss": 0.5, "train/img_per_s": 10.0, "val/ba": 0.7}


def test_tensorboard_logging_writes_event_files(tmp_path):
    pytest.importorskip("torch.utils.tensorboard", reason="TensorBoard is not installed (pip install 'cxrdebias[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.test_train import _trainer

    run = RunDir.create(tmp_path / "run")
    with single_torch_thread():
        _trainer(run, epochs=2, tensorboard="true").fit()
    events = list((run.path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and _mode(events[0]) & 0o044
    acc = EventAccumulator(str(run.path / "tensorboard"))
    acc.Reload()
    logged = run.read_metrics()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([r["train"]["loss"] for r in logged], rel=1e-6)
    assert [e.value for e in acc.Scalars("val/accuracy")] == pytest.approx([r["val"]["accuracy"] for r in logged], rel=1e-6)


def test_tensorboard_without_the_package_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    code, _, err = run_cli(["train", "--data", tmp_path / "manifest.csv", "--out", tmp_path / "run",
                            "--set", "train.tensorboard=true"], monkeypatch, capsys)
    assert code == 2 and "TensorBoard is not installed" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
