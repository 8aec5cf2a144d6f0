"""Reproduction experiments of the papers: Biased MNIST, CelebA and IMDB Face.

Every experiment runs the same way (:func:`run_protocol`): validate the method, build the data
(bad data fails before anything is written), create the run folder, train with the one
trainer (validation metrics every ``train.eval_every`` epochs), then evaluate the test sets
**once**, with the last epoch's model — or the best validation epoch when
``train.select_metric`` is set — and write ``results.json`` (metrics, resolved config, data
hashes, code version). The test sets are never used for selection.

- :func:`run_biased_mnist` (``cxrdebias reproduce biased-mnist``): train at ρ, validation =
  ρ=0.1 re-colouring of 30% of the training digits, biased (ρ=1) and unbiased (ρ=0.1) tests;
- :func:`run_celeba` (``cxrdebias reproduce celeba``): BlondHair or HeavyMakeup with Male as
  the bias; unbiased (group-averaged) and bias-conflicting accuracy on the balanced *valid*
  partition (:mod:`cxrdebias.data.celeba`);
- :func:`run_imdb_face` (``cxrdebias reproduce imdb-face``): gender (bias age) or age (bias
  gender), trained on EB1 or EB2; accuracy on the test split and on the other extreme-bias
  split (:mod:`cxrdebias.data.imdb_face`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console

from cxrdebias import distributed as dist_utils
from cxrdebias.config import ExperimentConfig, check_resumable, config_to_dict
from cxrdebias.data.base import make_loader
from cxrdebias.data.biased_mnist import NUM_CLASSES, build_biased_mnist
from cxrdebias.data.celeba import build_celeba
from cxrdebias.data.imdb_face import build_imdb_face
from cxrdebias.data.photos import PhotoSplits
from cxrdebias.debias import build_method
from cxrdebias.errors import ConfigError
from cxrdebias.evaluation.metrics import group_accuracy
from cxrdebias.models import build_model, model_factory
from cxrdebias.training.device import seed_everything
from cxrdebias.training.provenance import code_version, environment, run_info
from cxrdebias.training.runs import RESULTS_FILE, RUN_INFO_FILE, RunDir
from cxrdebias.training.trainer import Trainer

EVAL_BATCH = 1000
TEST_SELECTION_NOTE = "test sets never used for selection"

#: (per-test-set :func:`group_accuracy` results, last epoch's record) → ``results["metrics"]``
Summariser = Callable[[dict[str, dict[str, Any]], dict[str, Any]], dict[str, Any]]


@dataclass
class Protocol:
    """What one reproduction experiment contributes; :func:`run_protocol` does the rest.

    ``train``/``val``/``tests`` are in-memory :class:`~cxrdebias.data.base.TensorSamples` or
    streaming datasets of the sample contract. ``data_info`` is called once when a run starts
    (its result goes to ``run.json``). ``val_metrics`` are the keys of
    :func:`~cxrdebias.evaluation.metrics.group_accuracy` logged on the validation set; ``headline`` the
    keys of ``summarise``'s result printed at the end; ``params`` extra top-level keys of
    ``results.json`` (ρ, the split trained on …).
    """

    experiment: str
    title: str
    train: Any
    val: Any | None
    tests: dict[str, Any]
    num_classes: int
    num_biases: int
    eval_batch_size: int
    data_info: Callable[[], dict[str, Any]]
    val_metrics: tuple[str, ...]
    summarise: Summariser
    headline: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict)


def default_run_name(cfg: ExperimentConfig) -> str:
    """``<experiment tag>-<method>-seed<seed>-<time>`` (the tag names the protocol's setting)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    data = cfg.data
    if data.kind == "celeba":
        tag = f"celeba-{data.target.lower()}"
    elif data.kind == "imdb_face":
        tag = f"imdb-face-{data.target}-{data.train_split}"
    else:
        tag = f"biased-mnist-rho{getattr(data, 'rho', '')}"
    method = cfg.method.name + ("-auto" if cfg.unsupervised.enabled else "")  # --bias auto
    return f"{tag}-{method}-seed{cfg.seed}-{stamp}"


def _require_kind(cfg: ExperimentConfig, kind: str, command: str) -> None:
    if cfg.data.kind != kind:
        raise ConfigError(f"data.kind={cfg.data.kind!r}: `{command}` needs data.kind={kind!r}")


def _selection(result_best: dict[str, Any] | None) -> str:
    if result_best is None:
        return f"last epoch ({TEST_SELECTION_NOTE})"
    return f"best validation {result_best['metric']} (epoch {result_best['epoch']}; {TEST_SELECTION_NOTE})"


def _check_selection(cfg: ExperimentConfig, proto: Protocol) -> None:
    metric = cfg.train.select_metric
    if metric is None:
        return
    if proto.val is None:
        raise ConfigError(f"train.select_metric={metric!r} needs a validation set; this run has none (data.val_fraction)")
    if metric not in proto.val_metrics:
        raise ConfigError(f"train.select_metric={metric!r}: not a validation metric of this protocol ({', '.join(proto.val_metrics)})")


def run_protocol(
    cfg: ExperimentConfig,
    out: str | Path,
    make_protocol: Callable[[ExperimentConfig], Protocol],
    *,
    force: bool = False,
    resume: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """Train and test one reproduction experiment into the run folder ``out`` (module doc)."""
    console = console or Console(stderr=True, soft_wrap=True)
    resolved = config_to_dict(cfg)
    method = build_method(cfg.method.name, cfg.method.options(), cfg.unsupervised)  # validates before touching disk
    proto = make_protocol(cfg)  # fails on bad data before touching disk
    _check_selection(cfg, proto)
    world = dist_utils.world()  # under torchrun: rank 0 writes, every rank trains on its share
    dist_utils.check_batch_size(cfg.train.batch_size, world.world_size)

    def create_run() -> RunDir:
        new = RunDir.create(out, force=force, resume=resume)
        if not resume:
            new.write_config(resolved)
            new.write_json(RUN_INFO_FILE, run_info(proto.data_info()))
        return new

    run = dist_utils.run_on_main(create_run)
    if resume:
        saved = run.read_config()
        check_resumable(saved, cfg, str(run.path))
        resolved = saved  # what the checkpoints were written with

    seed_everything(cfg.seed)
    model = build_model(cfg.model, proto.num_classes, feature_activation=method.feature_activation)
    loader = make_loader(
        proto.train, cfg.train.batch_size, shuffle=True, seed=cfg.seed,
        num_workers=cfg.train.num_workers, drop_last=cfg.train.drop_last,
        rank=world.rank, world_size=world.world_size,
    )

    def evaluate(predict) -> dict[str, float]:
        p = predict(make_loader(proto.val, proto.eval_batch_size, num_workers=cfg.train.num_workers))
        g = group_accuracy(p.targets, p.predicted, p.biases)
        return {k: g[k] for k in proto.val_metrics}

    trainer = Trainer(
        model,
        method,
        loader,
        cfg.train,
        run=run,
        evaluate=evaluate if proto.val is not None else None,
        select_metric=cfg.train.select_metric,
        select_mode=cfg.train.select_mode,
        patience=cfg.train.patience,
        seed=cfg.seed,
        fingerprint=resolved,
        console=console,
        num_samples=len(proto.train),
        num_classes=proto.num_classes,
        num_biases=proto.num_biases,
        build_model=model_factory(cfg.model, proto.num_classes, feature_activation=method.feature_activation),
    )
    console.print(
        f"{proto.title} method={method.name} {method.describe()} "
        f"seed={cfg.seed} epochs={cfg.train.epochs} precision={trainer.precision} → {run.path}"
    )
    t0 = time.perf_counter()
    result = trainer.fit(resume=resume)
    train_time = time.perf_counter() - t0
    if not world.is_main:  # rank 0 tests and writes the results
        return {"rank": world.rank, "world_size": world.world_size}
    trainer.load_best()

    tests = {}
    for name, split in proto.tests.items():
        p = trainer.predict(make_loader(split, proto.eval_batch_size, num_workers=cfg.train.num_workers))
        tests[name] = group_accuracy(p.targets, p.predicted, p.biases)
    last = result.history[-1]
    results = {
        "experiment": proto.experiment,
        "name": cfg.name,
        "method": method.describe(),
        **proto.params,
        "seed": cfg.seed,
        "epochs": last["epoch"],
        "selection": _selection(result.best),
        "metrics": proto.summarise(tests, last),
        "tests": tests,
        "train": {
            "precision": result.precision,
            "device": result.device,
            "time_s": sum(h["train"]["time_s"] + h.get("eval_time_s", 0.0) for h in result.history),
            "time_s_this_invocation": train_time,
            "img_per_s_last_epoch": last["train"]["img_per_s"],
            "resumed_from_epoch": result.resumed_from_epoch,
            "world_size": world.world_size,
        },
        "config": resolved,
        "data": run.read_json(RUN_INFO_FILE)["data"],
        "code_version": code_version(),
        "environment": environment(),
        "finished": datetime.now(timezone.utc).isoformat(),
    }
    run.write_json(RESULTS_FILE, results)
    m = results["metrics"]
    shown = "  ".join(f"{k.removesuffix('_accuracy').replace('_', ' ')} acc {m[k]:.4f}" for k in proto.headline)
    console.print(f"[bold green]done[/] {shown}  ({train_time / 60:.1f} min) → {run.path / RESULTS_FILE}")
    return results


# -- Biased MNIST ------------------------------------------------------------------------------------
def biased_mnist_protocol(cfg: ExperimentConfig) -> Protocol:
    _require_kind(cfg, "biased_mnist", "cxrdebias reproduce biased-mnist")
    data = build_biased_mnist(cfg.data, cfg.seed)

    def summarise(tests: dict[str, dict[str, Any]], last: dict[str, Any]) -> dict[str, Any]:
        return {
            "biased_accuracy": tests["biased"]["accuracy"],
            "unbiased_accuracy": tests["unbiased"]["accuracy"],
            "unbiased_group_mean_accuracy": tests["unbiased"]["group_mean_accuracy"],
            "unbiased_conflicting_accuracy": tests["unbiased"]["conflicting_accuracy"],
            "val_accuracy": (last.get("val") or {}).get("accuracy"),
            "train_accuracy": last["train"].get("accuracy"),
        }

    return Protocol(
        experiment="biased_mnist",
        title=f"[bold]Biased MNIST[/] ρ={cfg.data.rho}",
        train=data.train,
        val=data.val,
        tests={"biased": data.test_biased, "unbiased": data.test_unbiased},
        num_classes=NUM_CLASSES,
        num_biases=NUM_CLASSES,
        eval_batch_size=EVAL_BATCH,
        data_info=lambda: {"source_files": data.source_files, "source_sha256": data.source_sha256, "dataset_sha256": data.data_hash()},
        val_metrics=("accuracy", "conflicting_accuracy"),
        summarise=summarise,
        headline=("biased_accuracy", "unbiased_accuracy"),
        params={"rho": cfg.data.rho},
    )


def run_biased_mnist(
    cfg: ExperimentConfig, out: str | Path, *, force: bool = False, resume: bool = False, console: Console | None = None
) -> dict[str, Any]:
    """Biased MNIST: biased/unbiased test accuracy of the last epoch (module doc)."""
    return run_protocol(cfg, out, biased_mnist_protocol, force=force, resume=resume, console=console)


# -- CelebA and IMDB Face (photos streamed from disk) -------------------------------------------
def _photo_protocol(cfg: ExperimentConfig, splits: PhotoSplits, **fields: Any) -> Protocol:
    """A :class:`Protocol` over :class:`PhotoSplits` (evaluated in training-size batches)."""

    def data_info() -> dict[str, Any]:
        return {
            "source_files": splits.source_files,
            "source_sha256": splits.source_sha256,
            "dataset_sha256": splits.data_hash(),
            "splits": splits.summary(),
            **splits.info,
        }

    return Protocol(
        train=splits.train,
        val=splits.val,
        tests=splits.tests,
        num_classes=splits.num_classes,
        num_biases=splits.num_biases,
        eval_batch_size=cfg.train.batch_size,
        data_info=data_info,
        **fields,
    )


def celeba_protocol(cfg: ExperimentConfig) -> Protocol:
    _require_kind(cfg, "celeba", "cxrdebias reproduce celeba")
    splits = build_celeba(cfg.data)

    def summarise(tests: dict[str, dict[str, Any]], last: dict[str, Any]) -> dict[str, Any]:
        unbiased = tests["unbiased"]
        return {
            "unbiased_accuracy": unbiased["group_mean_accuracy"],
            "bias_conflicting_accuracy": unbiased["conflicting_accuracy"],
            "worst_group_accuracy": unbiased["group_min"],
            "val_group_mean_accuracy": (last.get("val") or {}).get("group_mean_accuracy"),
            "train_accuracy": last["train"].get("accuracy"),
        }

    info = splits.info
    return _photo_protocol(
        cfg,
        splits,
        experiment="celeba",
        title=f"[bold]CelebA[/] target={info['target']} bias={info['bias']}",
        val_metrics=("accuracy", "group_mean_accuracy", "conflicting_accuracy"),
        summarise=summarise,
        headline=("unbiased_accuracy", "bias_conflicting_accuracy"),
        params={"target": info["target"], "bias": info["bias"]},
    )


def run_celeba(
    cfg: ExperimentConfig, out: str | Path, *, force: bool = False, resume: bool = False, console: Console | None = None
) -> dict[str, Any]:
    """CelebA: unbiased (group-averaged) and bias-conflicting accuracy (module doc)."""
    return run_protocol(cfg, out, celeba_protocol, force=force, resume=resume, console=console)


def imdb_face_protocol(cfg: ExperimentConfig) -> Protocol:
    _require_kind(cfg, "imdb_face", "cxrdebias reproduce imdb-face")
    splits = build_imdb_face(cfg.data)
    other = splits.info["other_split"]

    def summarise(tests: dict[str, dict[str, Any]], last: dict[str, Any]) -> dict[str, Any]:
        return {
            "test_accuracy": tests["test"]["accuracy"],
            "other_eb_accuracy": tests[other]["accuracy"],
            "val_accuracy": (last.get("val") or {}).get("accuracy"),
            "train_accuracy": last["train"].get("accuracy"),
        }

    d = cfg.data
    return _photo_protocol(
        cfg,
        splits,
        experiment="imdb_face",
        title=f"[bold]IMDB Face[/] target={d.target} train={d.train_split} (tests: test, {other})",
        val_metrics=("accuracy", "group_mean_accuracy"),
        summarise=summarise,
        headline=("test_accuracy", "other_eb_accuracy"),
        params={"target": d.target, "train_split": d.train_split, "other_split": other},
    )


def run_imdb_face(
    cfg: ExperimentConfig, out: str | Path, *, force: bool = False, resume: bool = False, console: Console | None = None
) -> dict[str, Any]:
    """IMDB Face: accuracy on the test split and on the other extreme-bias split (module doc)."""
    return run_protocol(cfg, out, imdb_face_protocol, force=force, resume=resume, console=console)
