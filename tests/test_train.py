"""The trainer: a short run changes the model, logs, checkpoints, resumes exactly."""

import json
import os
import signal

import pytest
import torch

from cxrdebias.data.base import TensorBatchLoader, TensorSamples
from cxrdebias.debias import build_method
from cxrdebias.errors import CheckpointError, RunExistsError, TrainingInterrupted
from cxrdebias.experiments.config import load_config
from cxrdebias.models import SimpleConvNet
from cxrdebias.training.checkpoint import CHECKPOINT_FORMAT
from cxrdebias.training.device import resolve_precision, seed_everything
from cxrdebias.training.runs import RunDir
from cxrdebias.training.trainer import Trainer
from tests.conftest import assert_same_tensors, resume_after_interrupt


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 3, 12, 12, generator=g) * 0.5
    x[:, 0] += t.view(-1, 1, 1).float()  # the target is visible in channel 0
    b = (t + (torch.rand(n, generator=g) < 0.2).long()) % 3
    return TensorSamples(x, t, b, name="toy")


def _trainer(run, epochs=3, method="end", **train):
    cfg = load_config(None, [f"train.epochs={epochs}", "train.batch_size=32", "train.progress=false", "train.precision=fp32", "train.lr_step=2", *[f"train.{k}={v}" for k, v in train.items()]])
    seed_everything(0)
    model = SimpleConvNet(3, kernel_size=3, last_activation="tanh")
    m = build_method(method, {"alpha": 0.5, "beta": 0.5} if method == "end" else {})
    data = _data()
    loader = TensorBatchLoader(data, 32, shuffle=True, seed=1)

    def evaluate(predict):
        p = predict(TensorBatchLoader(data, 50))
        return {"accuracy": (p.predicted == p.targets).float().mean().item()}

    return Trainer(model, m, loader, cfg.train, run=run, evaluate=evaluate, select_metric="accuracy", seed=0, fingerprint={"epochs": epochs})


def test_training_changes_model_and_writes_log(tmp_path):
    run = RunDir.create(tmp_path / "run")
    tr = _trainer(run)
    before = [p.detach().clone() for p in tr.model.parameters()]
    res = tr.fit()
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.model.parameters(), strict=True))
    lines = run.read_metrics()
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert {"loss", "ce", "R_perp", "R_par", "accuracy", "img_per_s"} <= set(lines[0]["train"])
    assert lines[0]["lr"] == pytest.approx(1e-3) and lines[2]["lr"] == pytest.approx(1e-4)  # StepLR(2)
    assert res.history[-1]["train"]["loss"] < res.history[0]["train"]["loss"]
    assert (run.checkpoint_dir / "last.pt").is_file() and (run.checkpoint_dir / "best.pt").is_file()
    assert res.best["metric"] == "accuracy"


def test_resume_gives_identical_weights(tmp_path):
    ref = _trainer(RunDir.create(tmp_path / "ref"))
    ref.fit()

    resumed, res = resume_after_interrupt(_trainer, tmp_path / "interrupted")
    assert res.resumed_from_epoch == 1
    assert_same_tensors(ref.model, resumed.model)
    assert [r["epoch"] for r in resumed.run.read_metrics()] == [1, 2, 3]


def _signal_at_update(trainer, signum, n):
    """Send ``signum`` to this process during the ``n``-th optimisation step of ``trainer``."""
    update, calls = trainer.method.update, []

    def hooked(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signum)
        return update(*args, **kwargs)

    trainer.method.update = hooked
    return calls


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_at_a_batch_boundary_and_resume_is_exact(signum, code, tmp_path, torch_one_thread):
    ref = _trainer(RunDir.create(tmp_path / "ref"), epochs=2)
    ref.fit()

    before = signal.getsignal(signum)
    run = RunDir.create(tmp_path / "run")
    tr = _trainer(run, epochs=2)  # 96 samples, batch 32: 3 steps per epoch
    calls = _signal_at_update(tr, signum, 5)  # epoch 2, step 2
    with pytest.raises(TrainingInterrupted) as info:
        tr.fit()
    err = info.value
    assert (err.exit_code, err.epoch, err.step, err.saved_epoch) == (code, 2, 2, 1)
    assert len(calls) == 5  # the running step was finished, no further one started
    assert str(err).endswith("at epoch 2 step 2; epoch 1 is saved: resume with --resume")
    assert signal.getsignal(signum) is before  # the handlers of the caller are back
    assert torch.load(run.checkpoint_dir / "last.pt", weights_only=False)["epoch"] == 1
    assert [r["epoch"] for r in run.read_metrics()] == [1]

    resumed = _trainer(RunDir.create(tmp_path / "run", resume=True), epochs=2)
    assert resumed.fit(resume=True).resumed_from_epoch == 1
    assert_same_tensors(ref.model, resumed.model)
    assert [r["epoch"] for r in run.read_metrics()] == [1, 2]


def test_checkpoint_format_and_keys(tmp_path):
    run = RunDir.create(tmp_path / "run")
    _trainer(run, epochs=2).fit()
    state = torch.load(run.checkpoint_dir / "last.pt", weights_only=False)
    assert state["format"] == CHECKPOINT_FORMAT == 1 and state["epoch"] == 2 and state["world_size"] == 1
    assert list(state) == [
        "format", "epoch", "model", "method", "method_extra", "optimizer", "scheduler", "history", "best", "rng",
        "fingerprint", "world_size",
    ]
    assert torch.load(run.checkpoint_dir / "prev.pt", weights_only=False)["epoch"] == 1
    assert set(torch.load(run.checkpoint_dir / "best.pt", weights_only=False)) == {"epoch", "model", "best"}


def test_signal_in_the_first_epoch_says_there_is_nothing_to_resume(tmp_path, torch_one_thread):
    tr = _trainer(RunDir.create(tmp_path / "run"), epochs=2)
    _signal_at_update(tr, signal.SIGTERM, 1)
    with pytest.raises(TrainingInterrupted, match="at epoch 1 step 1; no epoch was completed") as info:
        tr.fit()
    assert info.value.saved_epoch is None and not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_truncated_checkpoint_falls_back_to_previous(tmp_path):
    run = RunDir.create(tmp_path / "run")
    _trainer(run, epochs=2).fit()
    last = run.checkpoint_dir / "last.pt"
    last.write_bytes(last.read_bytes()[:100])
    tr = _trainer(RunDir.create(tmp_path / "run", resume=True), epochs=2)
    assert tr.load_checkpoint() == 1  # prev.pt holds epoch 1


def test_resume_after_a_truncated_last_checkpoint_continues_from_prev_with_a_warning(tmp_path, torch_one_thread):
    import io

    from rich.console import Console

    ref = _trainer(RunDir.create(tmp_path / "ref"), epochs=2)
    ref.fit()
    run = RunDir.create(tmp_path / "run")
    _trainer(run, epochs=2).fit()
    last = run.checkpoint_dir / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # a disk-full or killed copy
    tr = _trainer(RunDir.create(tmp_path / "run", resume=True), epochs=2)
    tr.console = Console(file=(log := io.StringIO()), soft_wrap=True)
    assert tr.fit(resume=True).resumed_from_epoch == 1
    warning = [line for line in log.getvalue().splitlines() if "last.pt unusable" in line]
    assert len(warning) == 1 and "truncated" in warning[0] and "resumed from prev.pt" in warning[0]
    assert_same_tensors(ref.model, tr.model)  # epoch 2 trained again from epoch 1: the same weights
    assert [r["epoch"] for r in run.read_metrics()] == [1, 2]


def test_both_checkpoints_corrupt_is_one_line_error(tmp_path, torch_one_thread):
    run = RunDir.create(tmp_path / "run")
    _trainer(run, epochs=2).fit()
    for name in ("last.pt", "prev.pt"):
        path = run.checkpoint_dir / name
        path.write_bytes(path.read_bytes()[:500])
    tr = _trainer(RunDir.create(tmp_path / "run", resume=True), epochs=2)
    with pytest.raises(CheckpointError, match="no usable checkpoint to resume") as info:
        tr.fit(resume=True)
    msg = str(info.value)
    assert "\n" not in msg and "last.pt" in msg and "prev.pt" in msg


def test_resume_with_other_config_is_refused(tmp_path):
    run = RunDir.create(tmp_path / "run")
    _trainer(run, epochs=1).fit()
    tr = _trainer(RunDir.create(tmp_path / "run", resume=True), epochs=2)
    with pytest.raises(CheckpointError, match="different config"):
        tr.fit(resume=True)


def test_run_dir_refuses_to_overwrite(tmp_path):
    run = RunDir.create(tmp_path / "run")
    (run.path / "results.json").write_text("{}")
    with pytest.raises(RunExistsError, match="--force"):
        RunDir.create(tmp_path / "run")
    assert (run.path / "results.json").exists()
    RunDir.create(tmp_path / "run", force=True)
    assert not (run.path / "results.json").exists()
    with pytest.raises(CheckpointError, match="nothing to resume"):
        RunDir.create(tmp_path / "new", resume=True)


def test_method_needing_bias_refuses_unknown_bias(tmp_path):
    tr = _trainer(None, epochs=1)
    tr.train_loader.samples.biases[:] = -1
    with pytest.raises(ValueError, match="unknown bias"):
        tr.fit()


def test_precision_resolution():
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert resolve_precision("auto", torch.device("cpu")) in ("fp32", "bf16")


def test_metrics_log_is_json_lines(tmp_path):
    run = RunDir.create(tmp_path / "run")
    _trainer(run, epochs=1, method="vanilla").fit()
    for line in (run.path / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


def test_loaders_shuffle_by_seed_and_epoch_only():
    from cxrdebias.data.base import EpochDataLoader
    from cxrdebias.data.cxr import collate

    data = _data(n=50)
    for make in (
        lambda: TensorBatchLoader(data, 8, shuffle=True, seed=3),
        lambda: EpochDataLoader(data, 8, shuffle=True, seed=3, collate_fn=collate),
    ):
        orders = {}
        for epoch in (0, 1):
            runs = []
            for _ in range(2):  # a fresh loader (a resumed run) sees the same order
                loader = make()
                loader.set_epoch(epoch)
                runs.append(torch.cat([b["index"] for b in loader]))
            assert torch.equal(runs[0], runs[1]) and sorted(runs[0].tolist()) == list(range(50))
            orders[epoch] = runs[0]
        assert not torch.equal(orders[0], orders[1])
        assert len(make()) == 7
