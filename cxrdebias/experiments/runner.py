"""The one experiment runner: every ``train`` and ``reproduce`` command goes through
:func:`run_experiment`.

For any registered ``data.kind`` (:mod:`cxrdebias.experiments.registry`) it does the same
steps: validate the method, build the protocol's data (bad data fails before anything is
written), create the run folder (resolved config, ``run.json`` with the data hashes, the
protocol's own files), train with the one trainer (validation metrics every
``train.eval_every`` epochs, model selection on validation only), then hand the last — or the
best validation — model to the protocol's ``finish``, which tests it **once**, and write
``results.json``: the protocol's part, then the training record, resolved config, data
record, code version and environment. Test sets are never used for selection.

Under ``torchrun`` every rank trains on its share of each global batch; rank 0 creates the
run, validates, tests and writes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from cxrdebias import distributed as dist_utils
from cxrdebias.console import esc, make_console
from cxrdebias.data.base import make_loader
from cxrdebias.data.sampling import Cells, cells
from cxrdebias.debias import build_method
from cxrdebias.errors import ConfigError
from cxrdebias.experiments import protocols
from cxrdebias.experiments.config import ExperimentConfig, check_resumable, config_to_dict
from cxrdebias.experiments.registry import Finished, Protocol
from cxrdebias.models import build_model, model_factory
from cxrdebias.training.curves import require_tensorboard
from cxrdebias.training.device import seed_everything
from cxrdebias.training.folders import release_lock
from cxrdebias.training.provenance import code_version, environment, run_info
from cxrdebias.training.runs import (
    MANIFEST_LOCATION,
    RESULTS_FILE,
    RUN_INFO_FILE,
    RunDir,
    manifest_location,
)
from cxrdebias.training.trainer import Trainer


def default_run_name(cfg: ExperimentConfig) -> str:
    """``<protocol tag>-<method>[-auto]-seed<seed>-<time>`` (the tag names the protocol's setting)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    tag = protocols.get(cfg.data.kind).run_tag(cfg)
    method = cfg.method.name + ("-auto" if cfg.unsupervised.enabled else "")  # --bias auto
    return f"{tag}-{method}-seed{cfg.seed}-{stamp}"


def require_kind(cfg: ExperimentConfig, kind: str) -> None:
    """A :class:`ConfigError` when ``cfg`` is not of ``data.kind`` = ``kind`` (a command runs one kind)."""
    if cfg.data.kind != kind:
        command = protocols.get(kind).command
        raise ConfigError(f"data.kind={cfg.data.kind!r}: `{command}` needs data.kind={kind!r}")


def _check_selection(cfg: ExperimentConfig, proto: Protocol) -> None:
    metric = cfg.train.select_metric
    if metric is None:
        return
    if proto.val is None:
        raise ConfigError(f"train.select_metric={metric!r} needs a validation set; this run has none (data.val_fraction)")
    if metric not in proto.val_metrics:
        raise ConfigError(f"train.select_metric={metric!r}: not a validation metric of this protocol ({', '.join(proto.val_metrics)})")


def sampling_cells(cfg: ExperimentConfig, proto: Protocol) -> Cells | None:
    """The training split's (target, bias) cells for ``train.sampling=group_balanced`` (None for
    ``none``, and for ``--bias auto``, whose cells come from the pseudo labels every epoch:
    :func:`pseudo_label_weights`); a :class:`ConfigError` when the run has no bias labels to
    balance (``data.bias=none`` without ``--bias auto``) or the protocol does not provide the
    training labels. Works under data parallelism: every rank draws the same epoch and takes its
    share of each global batch."""
    if cfg.train.sampling == "none":
        return None
    what = "train.sampling=group_balanced"
    if cfg.unsupervised.enabled:  # pseudo labels: only the targets are needed here
        if proto.train_targets is None:
            raise ConfigError(f"{what} with --bias auto: not supported for data.kind={cfg.data.kind!r}")
        return None
    if proto.num_biases is None:
        hint = "; use --bias site" if getattr(cfg.data, "bias", None) == "none" else ""
        raise ConfigError(f"{what} needs bias labels; this run has none{hint}")
    if proto.train_targets is None or proto.train_biases is None:
        raise ConfigError(f"{what}: not supported for data.kind={cfg.data.kind!r}")
    try:
        return cells(proto.train_targets, proto.train_biases)
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def pseudo_label_weights(
    method: Any, targets: torch.Tensor, on_cells: Callable[[Cells | None], None] | None = None
) -> Callable[[], torch.Tensor | None]:
    """The loader's weights function for ``train.sampling=group_balanced`` with ``--bias auto``.

    Asked at the start of every epoch (:class:`~cxrdebias.data.base._EpochSeededLoader`): the
    (target, pseudo-bias) cells of the labels the labeller gave during the previous epochs
    (``method.sampling_cells``, :class:`~cxrdebias.debias.unsupervised.UnsupervisedBias`) and
    their group-balanced weights, or ``None`` — the natural order — in epoch 1, during the
    warm-up and while the shortcut gate is closed. ``on_cells(cells or None)`` is told every
    epoch's choice (the runner re-weights the loss's classes as drawn). The labels are in the
    method's checkpoints, so a resumed run draws what the uninterrupted one would."""

    def weights() -> torch.Tensor | None:
        found = method.sampling_cells(targets)
        if on_cells is not None:
            on_cells(found)
        return None if found is None else found.weights()

    return weights


def class_weights(targets: torch.Tensor, class_names: tuple[str, ...]) -> torch.Tensor:
    """Inverse class frequency, normalised so that a balanced set gets weight 1 per class."""
    num_classes = len(class_names)
    counts = torch.bincount(torch.as_tensor(targets), minlength=num_classes).float()
    if (counts == 0).any():
        missing = [class_names[i] for i in range(num_classes) if counts[i] == 0]
        raise ConfigError(f"the training split has no {', '.join(missing)} images; cannot train a classifier")
    return counts.sum() / (num_classes * counts)


def run_experiment(
    cfg: ExperimentConfig,
    out: str | Path,
    *,
    force: bool = False,
    resume: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """Train and test one experiment of any registered kind into the run folder ``out`` (module doc).

    Returns the ``results.json`` record (on ranks other than 0 under torchrun: their rank). The
    run folder is locked while this runs (a second writer is refused); ``force`` replaces only a
    cxrdebias run folder that holds none of the input data (:mod:`cxrdebias.training.folders`)."""
    try:
        return _run_experiment(cfg, out, force=force, resume=resume, console=console)
    finally:
        release_lock(out)  # a no-op where this process holds no lock (other ranks, a refused folder)


def _sampling_record(group: Cells | None, method: Any, pseudo: bool = False) -> dict[str, Any]:
    """``results["train"]["sampling"]`` of a group-balanced run: the cells and the loss's class
    weights (``--bias auto``: ``labels: pseudo``, the cells of the last epoch's draw — ``None``
    for the natural order — and per epoch in ``metrics.jsonl`` → ``pseudo_bias.sampled_cells``)."""
    weights = getattr(method, "class_weights", None)
    return {
        "method": "group_balanced",
        **({"labels": "pseudo (the labeller's, of the previous epoch)"} if pseudo else {}),
        "cells": None if group is None else group.describe(),
        "loss_class_weights": None if weights is None else [float(w) for w in weights],
    }


def input_paths(cfg: ExperimentConfig) -> list[str]:
    """The data paths a run reads (the manifest, the data root): ``--force`` never replaces a folder holding them."""
    return [v for key in ("manifest", "root") if isinstance(v := getattr(cfg.data, key, None), str) and v]


def _run_experiment(
    cfg: ExperimentConfig, out: str | Path, *, force: bool, resume: bool, console: Console | None
) -> dict[str, Any]:
    console = console or make_console(stderr=True)
    spec = protocols.get(cfg.data.kind)
    resolved = config_to_dict(cfg)
    method = build_method(cfg.method.name, cfg.method.options(), cfg.unsupervised)  # validates before touching disk
    if cfg.train.tensorboard:
        require_tensorboard()  # a one-line error now, not after the data are read
    world = dist_utils.world()  # under torchrun: rank 0 writes, every rank trains on its share
    dist_utils.check_batch_size(cfg.train.batch_size, world.world_size)

    if resume:
        run = dist_utils.run_on_main(lambda: RunDir.create(out, resume=True))
        saved = run.read_config()
        check_resumable(saved, cfg, str(run.path))
        resolved = saved  # what the checkpoints were written with
        proto = spec.build(cfg, method, run, console)
    else:
        proto = spec.build(cfg, method, None, console)  # fails on bad data before touching disk
    _check_selection(cfg, proto)
    group = sampling_cells(cfg, proto)
    if not resume:

        def create_run() -> RunDir:
            new = RunDir.create(out, force=force, protected=input_paths(cfg))
            new.write_config(resolved)
            data = proto.data_info()
            if isinstance(manifest := getattr(cfg.data, "manifest", None), str) and manifest:
                data[MANIFEST_LOCATION] = manifest_location(manifest, new.path)
            new.write_json(RUN_INFO_FILE, run_info(data))
            if proto.on_created is not None:
                proto.on_created(new)
            return new

        run = dist_utils.run_on_main(create_run)

    seed_everything(cfg.seed)
    activation = method.feature_activation
    model = build_model(cfg.model, proto.num_classes, in_channels=proto.in_channels, feature_activation=activation)
    weighted = cfg.train.class_balance == "weighted_loss"
    if weighted:
        if proto.train_targets is None:
            raise ConfigError(f"train.class_balance=weighted_loss: not supported for data.kind={cfg.data.kind!r}")
        names = proto.class_names or tuple(f"class {i}" for i in range(proto.num_classes))
        # group-balanced sampling draws each cell equally often: weight the classes as drawn
        # (one entry per cell; uniform when every class has as many cells), not a second time
        method.set_class_weights(class_weights(proto.train_targets if group is None else group.keys[:, 0], names))
    weights: Any = None if group is None else group.weights()
    pseudo = group is None and cfg.train.sampling == "group_balanced"  # --bias auto: cells of the pseudo labels
    drawn: list[Cells | None] = [None]
    if pseudo:

        def on_cells(found: Cells | None) -> None:  # every epoch: the classes as this epoch draws them
            drawn[0] = found
            if weighted:
                method.set_class_weights(class_weights(proto.train_targets if found is None else found.keys[:, 0], names))

        weights = pseudo_label_weights(method, proto.train_targets, on_cells)

    def loader(split: Any) -> Any:  # evaluation: rank 0, the whole split, in order
        return make_loader(split, proto.eval_batch_size, seed=cfg.seed, num_workers=cfg.train.num_workers)

    val_loader = loader(proto.val) if proto.val is not None else None

    def evaluate(predict) -> dict[str, float]:
        return proto.validate(predict(val_loader))

    trainer = Trainer(
        model,
        method,
        make_loader(
            proto.train, cfg.train.batch_size, shuffle=True, seed=cfg.seed,
            num_workers=cfg.train.num_workers, drop_last=cfg.train.drop_last,
            rank=world.rank, world_size=world.world_size, weights=weights,
        ),
        cfg.train,
        run=run,
        evaluate=evaluate if val_loader is not None else None,
        select_metric=cfg.train.select_metric,
        select_mode=cfg.train.select_mode,
        patience=cfg.train.patience,
        seed=cfg.seed,
        fingerprint=resolved,
        console=console,
        num_samples=len(proto.train),
        num_classes=proto.num_classes,
        num_biases=proto.num_biases,
        build_model=model_factory(cfg.model, proto.num_classes, in_channels=proto.in_channels, feature_activation=activation),
    )
    console.print(f"{proto.banner(method, trainer.precision)} → {esc(run.path)}")
    as_drawn = "; the weighted loss weights the classes as drawn" if weighted else ""
    if group is not None:
        console.print(f"group-balanced sampling: {len(group.counts)} (target, bias) cells, each drawn equally often{as_drawn}")
    elif pseudo:
        console.print(
            "group-balanced sampling on pseudo labels: each epoch's (target, pseudo-bias) cells from the labeller's "
            f"labels of the previous epoch, each drawn equally often (epoch 1, warm-up, gate closed: natural order){as_drawn}"
        )
    t0 = time.perf_counter()
    result = trainer.fit(resume=resume)
    train_time = time.perf_counter() - t0
    if not world.is_main:  # rank 0 tests and writes the results
        return {"rank": world.rank, "world_size": world.world_size}
    trainer.load_best()

    data = run.read_json(RUN_INFO_FILE)["data"]
    head, done = proto.finish(Finished(cfg, method, trainer, result, run, data, loader, val_loader))
    last = result.history[-1]
    results = {
        "experiment": proto.experiment,
        "name": cfg.name,
        "method": method.describe(),
        **head,
        "train": {
            "precision": result.precision,
            "device": result.device,
            "time_s": sum(h["train"]["time_s"] + h.get("eval_time_s", 0.0) for h in result.history),
            "time_s_this_invocation": train_time,
            **proto.train_info,
            **({"sampling": _sampling_record(drawn[0] if pseudo else group, method, pseudo)} if group is not None or pseudo else {}),
            "img_per_s_last_epoch": last["train"]["img_per_s"],
            "resumed_from_epoch": result.resumed_from_epoch,
            "world_size": world.world_size,
        },
        "config": resolved,
        "data": data,
        "code_version": code_version(),
        "environment": environment(),
        "finished": datetime.now(timezone.utc).isoformat(),
    }
    run.write_json(RESULTS_FILE, results)
    console.print(f"[bold green]done[/] {esc(done)} ({train_time / 60:.1f} min) → {esc(run.path / RESULTS_FILE)}")
    return results
