"""One training loop for every method and dataset.

Adam + weight decay + StepLR, reproducible seeds, bf16 autocast where the hardware supports
it, rich progress, per-epoch metrics to ``metrics.jsonl``, atomic checkpoints every epoch
(``last.pt``; the previous one kept as ``prev.pt``), resume from the last good checkpoint, and
model selection on a *validation* metric only (``best.pt``). SIGINT/SIGTERM during :meth:`Trainer.fit`
stop training at the next batch boundary with :class:`~cxrdebias.errors.TrainingInterrupted`
(docs/robustness.md). Checkpoint files live in :mod:`cxrdebias.training.checkpoint`, the stop
signals in :mod:`cxrdebias.training.signals`.

Under ``torchrun`` (docs/scaling.md) the model is wrapped in DistributedDataParallel for the
training steps, the methods' own networks average their gradients, only rank 0 evaluates,
prints and writes files, and stop signals and early stopping are agreed by all ranks.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import nn

from cxrdebias import distributed as dist_utils
from cxrdebias.config import TrainConfig
from cxrdebias.console import esc, make_console
from cxrdebias.data.augment import augment_batch, augment_generator
from cxrdebias.data.base import Batch
from cxrdebias.debias.base import Method, TrainContext
from cxrdebias.errors import ConfigError, TrainingInterrupted
from cxrdebias.training import allocator
from cxrdebias.training.checkpoint import (
    load_best_weights,
    read_resumable,
    restore_training_state,
    rng_for_process,
    rng_state,
    save_best,
    save_rotating,
    set_rng_state,
    training_state,
)
from cxrdebias.training.curves import curve_writer
from cxrdebias.training.device import (
    make_autocast,
    resolve_device,
    resolve_precision,
    seed_everything,
)
from cxrdebias.training.inference import Predictions, predict, to_device
from cxrdebias.training.runs import RunDir
from cxrdebias.training.signals import StopRequest


def _merge_logs(parts: list[tuple[dict[str, float], dict[str, int], int]]) -> tuple[dict[str, float], dict[str, int], int]:
    """Per-rank (sums, counts, samples) of an epoch's logged values → the global ones."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for s, c, _ in parts:
        for k, v in s.items():
            sums[k] = sums.get(k, 0.0) + v
            counts[k] = counts.get(k, 0) + c[k]
    return sums, counts, sum(n for _, _, n in parts)


def _len_samples(loader: Any) -> int:
    for attr in ("samples", "dataset"):
        data = getattr(loader, attr, None)
        if data is not None:
            return len(data)
    return 0


def _num_outputs(model: nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features if last else 0


Evaluator = Callable[[Callable[[Iterable[Batch]], Predictions]], dict[str, float]]


@dataclass
class TrainResult:
    history: list[dict[str, Any]]
    best: dict[str, Any] | None
    precision: str
    device: str
    stopped_early: bool = False
    resumed_from_epoch: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """Trains ``model`` with ``method`` on ``train_loader``.

    Args:
        evaluate: called after an epoch with a ``predict(loader) -> Predictions`` function;
            returns validation metrics (flat ``name -> float``), logged under ``val``.
        select_metric: a key of those metrics used for model selection (``best.pt``) and
            early stopping; ``None`` keeps only the last epoch (Biased-MNIST protocol).
        select_mode: ``"max"`` or ``"min"``.
        patience: stop after this many evaluations without improvement (``None``: never).
        fingerprint: anything that must be identical for a run to be resumed (the resolved
            config); stored in checkpoints and compared on resume.
    """

    def __init__(
        self,
        model: nn.Module,
        method: Method,
        train_loader: Iterable[Batch],
        config: TrainConfig,
        *,
        run: RunDir | None = None,
        evaluate: Evaluator | None = None,
        select_metric: str | None = None,
        select_mode: str = "max",
        patience: int | None = None,
        seed: int = 0,
        fingerprint: Any = None,
        console: Console | None = None,
        num_samples: int | None = None,
        num_classes: int | None = None,
        num_biases: int | None = None,
        build_model: Callable[..., nn.Module] | None = None,
    ):
        if select_mode not in ("max", "min"):
            raise ValueError(f"select_mode must be 'max' or 'min', got {select_mode!r}")
        self.cfg = config
        self.world = dist_utils.world()
        self.device = resolve_device(dist_utils.device_for(self.world, config.device))
        self.precision = resolve_precision(config.precision, self.device)
        self.autocast = make_autocast(self.precision, self.device)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        if config.keep_freed_memory and self.device.type == "cpu":
            allocator.keep_freed_memory()
        if config.deterministic:
            torch.use_deterministic_algorithms(True)
        self.model = model.to(self.device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.train_model: nn.Module = self.model  # what the training steps call (DDP under torchrun)
        if self.world.distributed:
            if config.sync_batchnorm and self.device.type == "cuda":
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=method.needs_unused_parameter_search(),
            )
        self.method = method.to(self.device)
        self.train_loader = train_loader
        self.run = run
        self.evaluate = evaluate
        self.select_metric = select_metric
        self.select_mode = select_mode
        self.patience = patience
        self.seed = seed
        self.fingerprint = fingerprint
        self.console = console or make_console(stderr=True, quiet=not self.world.is_main)
        self.optimizer = self._make_optimizer(self.model.parameters())
        self.scheduler = self._make_scheduler(self.optimizer)
        self.method.setup(
            self.model,
            TrainContext(
                num_samples=num_samples if num_samples is not None else _len_samples(train_loader),
                num_classes=num_classes if num_classes is not None else _num_outputs(self.model),
                num_biases=num_biases,
                make_optimizer=self._make_method_optimizer,
                make_scheduler=self._make_scheduler,
                build_model=build_model,
                device=self.device,
            ),
        )
        self.method.to(self.device)
        if self.world.distributed:  # the method's own networks start from rank 0's weights
            for t in self.method.state_dict().values():
                torch.distributed.broadcast(t, src=0)
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.start_epoch = 1
        self.stop = StopRequest()  # set by SIGINT/SIGTERM during fit()
        self._saved_epoch: int | None = None  # the newest epoch with a checkpoint

    def _make_optimizer(self, params) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def _make_method_optimizer(self, params) -> torch.optim.Optimizer:
        """Optimiser of a network the method owns: DDP does not wrap it, so under torchrun its
        step first averages the gradients over ranks."""
        return dist_utils.average_gradients_before_step(self._make_optimizer(params))

    @property
    def writes(self) -> bool:
        """Whether this process writes the run's files (rank 0 only)."""
        return self.run is not None and self.world.is_main

    def _make_scheduler(self, optimizer: torch.optim.Optimizer):
        if not self.cfg.lr_step:
            return None
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.cfg.lr_step, gamma=self.cfg.lr_gamma)

    # -- prediction ---------------------------------------------------------------------------
    def predict(self, loader: Iterable[Batch], keep_features: bool = False) -> Predictions:
        return predict(
            self.model,
            loader,
            device=self.device,
            autocast=self.autocast,
            channels_last=self.cfg.channels_last,
            keep_features=keep_features,
        )

    # -- checkpoints (the files: cxrdebias.training.checkpoint) ------------------------------------
    def _checkpointed(self) -> dict[str, Any]:
        """The objects a checkpoint saves and restores in place (the keyword arguments that
        ``training_state`` and ``restore_training_state`` share)."""
        return {"model": self.model, "method": self.method, "optimizer": self.optimizer, "scheduler": self.scheduler}

    def save_checkpoint(self, epoch: int) -> None:
        """Checkpoint the end of ``epoch`` (``last.pt``, the previous one kept as ``prev.pt``)."""
        if self.run is None:
            return
        rng_per_rank = dist_utils.all_gather_object(rng_state()) if self.world.distributed else None
        if not self.world.is_main:
            return
        state = training_state(
            epoch,
            **self._checkpointed(),
            history=self.history,
            best=self.best,
            fingerprint=self.fingerprint,
            world_size=self.world.world_size,
        )
        if rng_per_rank is not None:
            state["rng_per_rank"] = rng_per_rank
        save_rotating(state, self.run.checkpoint_dir)

    def load_checkpoint(self) -> int:
        """Restore the newest readable checkpoint; returns its epoch."""
        assert self.run is not None
        name, state, errors = read_resumable(self.run.checkpoint_dir, self.fingerprint)
        restore_training_state(state, self.run.checkpoint_dir / name, **self._checkpointed())
        self.history = state["history"]
        self.best = state["best"]
        rng, warning = rng_for_process(state, self.world, name)
        if warning is not None:
            self.console.print(warning)  # markup, user values escaped (checkpoint.rng_for_process)
        set_rng_state(rng)
        if name != "last.pt":
            self.console.print(f"[yellow]last.pt unusable ({esc(errors[-1])}); resumed from {esc(name)}[/]")
        return int(state["epoch"])

    # -- training -------------------------------------------------------------------------------
    def _improved(self, value: float) -> bool:
        if self.best is None or math.isnan(self.best["value"]):
            return not math.isnan(value)
        return value > self.best["value"] if self.select_mode == "max" else value < self.best["value"]

    def train_epoch(self, epoch: int, progress: Progress | None) -> dict[str, float]:
        self.model.train()
        self.method.train()
        if hasattr(self.train_loader, "set_epoch"):
            self.train_loader.set_epoch(epoch)
        total = len(self.train_loader) if hasattr(self.train_loader, "__len__") else None
        task = progress.add_task(f"epoch {epoch}/{self.cfg.epochs}", total=total, stats="") if progress else None
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}  # per key: a value logged only in some batches is averaged over those
        n_seen = 0
        t0 = time.perf_counter()
        step = 0
        augment = self.cfg.augment
        gen = augment_generator(self.seed, epoch, self.world.rank) if augment.enabled else None
        try:
            for batch in self.train_loader:
                batch = to_device(batch, self.device, self.cfg.channels_last)
                if gen is not None:  # train.augment (cxrdebias.data.augment): training batches only
                    image = augment_batch(batch["image"], augment, gen)
                    if self.cfg.channels_last:
                        image = image.contiguous(memory_format=torch.channels_last)
                    batch["image"] = image
                logs = self.method.update(self.train_model, batch, self.optimizer, self.autocast)
                step += 1
                n = batch["target"].shape[0]
                n_seen += n
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * n
                    counts[k] = counts.get(k, 0) + n
                if progress is not None:
                    progress.update(task, advance=1, stats=f"loss {sums['loss'] / counts['loss']:.4f}  {n_seen / (time.perf_counter() - t0):.0f} img/s")
                self._check_stop(epoch, step)
        except Exception as exc:
            # Ctrl-C also reaches DataLoader workers, which then exit: their loader's error is the interrupt
            if self.stop.signum is None or isinstance(exc, TrainingInterrupted):
                raise
            raise self._interrupted(epoch, step) from exc
        elapsed = time.perf_counter() - t0
        if progress is not None:
            progress.remove_task(task)
        if self.world.distributed:  # epoch averages over the global batches
            sums, counts, n_seen = _merge_logs(dist_utils.all_gather_object((sums, counts, n_seen)))
        if n_seen == 0:
            raise ValueError("the training loader yielded no batch")
        out = {k: v / counts[k] for k, v in sums.items()}
        out["img_per_s"] = n_seen / elapsed
        out["time_s"] = elapsed
        return out

    # -- stopping on SIGINT / SIGTERM (cxrdebias.training.signals) ----------------------------------
    def _interrupted(self, epoch: int, step: int | None) -> TrainingInterrupted:
        assert self.stop.signum is not None
        return TrainingInterrupted(self.stop.signum, epoch, step, self._saved_epoch)

    def _check_stop(self, epoch: int, step: int | None) -> None:
        """Raise :class:`TrainingInterrupted` if a stop signal came (on any rank)."""
        flag_device = self.device if self.world.backend == "nccl" else torch.device("cpu")
        if self.stop.agree(self.world, flag_device) is not None:
            raise self._interrupted(epoch, step)

    def fit(self, resume: bool = False) -> TrainResult:
        """Train (or, with ``resume``, continue from the newest checkpoint) to ``cfg.epochs``.

        Raises:
            TrainingInterrupted: SIGINT or SIGTERM arrived; raised at the next batch boundary.
        """
        with self.stop.handling_signals():
            return self._fit(resume)

    def _fit(self, resume: bool) -> TrainResult:
        resumed_from = None
        if resume:
            resumed_from = self.load_checkpoint()
            self.start_epoch = resumed_from + 1
            if self.writes:
                self.run.truncate_metrics(resumed_from)
            self._saved_epoch = resumed_from
            self.console.print(f"resuming after epoch {resumed_from}")
        else:  # per-rank streams (augmentation, dropout); rank 0's is the one-process stream
            seed_everything(self.seed + 1_000_003 * self.world.rank)
        stopped_early = False
        since_best = 0
        progress = (
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[stats]}"),
                console=self.console,
                transient=True,
            )
            if self.cfg.progress and self.world.is_main
            else None
        )
        run_dir = self.run.path if self.writes and self.run is not None else None
        with progress or contextlib.nullcontext(), curve_writer(run_dir, self.cfg.tensorboard, self.start_epoch) as curves:
            for epoch in range(self.start_epoch, self.cfg.epochs + 1):
                self._check_stop(epoch - 1, None)  # a signal during the last evaluation/checkpoint
                lr = self.optimizer.param_groups[0]["lr"]
                train_stats = self.train_epoch(epoch, progress)
                if self.scheduler:
                    self.scheduler.step()
                record: dict[str, Any] = {"epoch": epoch, "lr": lr, "train": train_stats, **self.method.epoch_metrics()}
                self.method.on_epoch_end(epoch)
                last = epoch == self.cfg.epochs
                if self.evaluate and (epoch % self.cfg.eval_every == 0 or last):
                    val, eval_time, improved = dist_utils.run_on_main(functools.partial(self._validate, epoch))
                    self.best = dist_utils.broadcast_object(self.best)
                    record["val"], record["eval_time_s"] = val, eval_time
                    if improved is not None:
                        since_best = 0 if improved else since_best + 1
                self.history.append(record)
                if self.writes:
                    self.run.append_metrics(record)
                if curves is not None:  # --set train.tensorboard=true (cxrdebias.training.curves)
                    curves.log(record)
                self.save_checkpoint(epoch)
                if self.run is not None:
                    self._saved_epoch = epoch
                self._print_epoch(record)
                if self.patience is not None and since_best >= self.patience and not last:
                    stopped_early = True
                    self.console.print(f"early stopping: no improvement of {self.select_metric} for {since_best} evaluations")
                    break
        if self.history:
            self._check_stop(self.history[-1]["epoch"], None)  # honour a signal that came during the last epoch's end
        return TrainResult(
            history=self.history,
            best=self.best,
            precision=self.precision,
            device=str(self.device),
            stopped_early=stopped_early,
            resumed_from_epoch=resumed_from,
        )

    def _validate(self, epoch: int) -> tuple[dict[str, float], float, bool | None]:
        """Validation metrics, their time and whether the selection metric improved (``None``:
        no selection); saves ``best.pt``. Runs on rank 0 only under torchrun."""
        t0 = time.perf_counter()
        val = self.evaluate(self.predict)
        elapsed = time.perf_counter() - t0
        if not self.select_metric:
            return val, elapsed, None
        if self.select_metric not in val:
            raise ConfigError(f"selection metric {self.select_metric!r} not among validation metrics {sorted(val)}")
        value = float(val[self.select_metric])
        if not self._improved(value):
            return val, elapsed, False
        self.best = {"epoch": epoch, "metric": self.select_metric, "value": value}
        if self.run is not None:
            save_best(self.run.checkpoint_dir, epoch, self.model, self.best)
        return val, elapsed, True

    def _print_epoch(self, record: dict[str, Any]) -> None:
        tr = record["train"]
        parts = [f"epoch {record['epoch']:>3}", f"loss {tr['loss']:.4f}", f"train acc {tr.get('accuracy', float('nan')):.4f}"]
        skip = {"loss", "accuracy", "img_per_s", "time_s"}
        parts += [f"{k} {v:.4f}" for k, v in tr.items() if k not in skip]
        parts.append(f"{tr['img_per_s']:.0f} img/s")
        for k, v in (record.get("val") or {}).items():
            if isinstance(v, float):
                parts.append(f"val {k} {v:.4f}")
        for section, values in record.items():  # the method's epoch_metrics() sections
            if section not in ("train", "val") and isinstance(values, dict):
                parts += [f"{section} {k} {v:.3f}" for k, v in values.items() if isinstance(v, float) and not k.startswith("n_")]
        self.console.print("  ".join(parts), markup=False)

    def load_best(self) -> None:
        """Load the weights of the selected (best validation) epoch, if any."""
        if self.run is None or self.best is None:
            return
        load_best_weights(self.run.checkpoint_dir, self.model)
