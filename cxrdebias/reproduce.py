"""Reproduction experiments of the papers (Biased MNIST first).

``run_biased_mnist`` is what ``cxrdebias reproduce biased-mnist`` calls: it builds the data
(train at ρ, validation = ρ=0.1 re-colouring of 30% of the training digits, biased test ρ=1,
unbiased test ρ=0.1), trains with the chosen method for the configured epochs and reports the
**last epoch** on both test sets. The test sets are never used for selection.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console

from cxrdebias.config import ExperimentConfig, check_resumable, config_to_dict
from cxrdebias.data.base import TensorBatchLoader
from cxrdebias.data.biased_mnist import NUM_CLASSES, build_biased_mnist
from cxrdebias.debias import build_method
from cxrdebias.metrics import group_accuracy
from cxrdebias.models import build_model, model_factory
from cxrdebias.provenance import code_version, environment, run_info
from cxrdebias.runs import RESULTS_FILE, RUN_INFO_FILE, RunDir
from cxrdebias.train import Trainer, seed_everything

EVAL_BATCH = 1000


def default_run_name(cfg: ExperimentConfig) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"biased-mnist-rho{cfg.data.rho}-{cfg.method.name}-seed{cfg.seed}-{stamp}"


def run_biased_mnist(
    cfg: ExperimentConfig,
    out: str | Path,
    *,
    force: bool = False,
    resume: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    console = console or Console(stderr=True, soft_wrap=True)
    resolved = config_to_dict(cfg)
    method = build_method(cfg.method.name, cfg.method.options())  # validates before touching disk
    data = build_biased_mnist(cfg.data, cfg.seed)  # fails on bad data before touching disk
    run = RunDir.create(out, force=force, resume=resume)
    if resume:
        saved = run.read_config()
        check_resumable(saved, cfg, str(run.path))
        resolved = saved  # what the checkpoints were written with
    else:
        run.write_config(resolved)
        data_info = {"source_files": data.source_files, "source_sha256": data.source_sha256, "dataset_sha256": data.data_hash()}
        run.write_json(RUN_INFO_FILE, run_info(data_info))

    seed_everything(cfg.seed)
    model = build_model(cfg.model, NUM_CLASSES, feature_activation=method.feature_activation)
    loader = TensorBatchLoader(
        data.train, cfg.train.batch_size, shuffle=True, seed=cfg.seed, drop_last=cfg.train.drop_last
    )

    def evaluate(predict) -> dict[str, float]:
        if data.val is None:
            return {}
        p = predict(TensorBatchLoader(data.val, EVAL_BATCH))
        g = group_accuracy(p.targets, p.predicted, p.biases)
        return {"accuracy": g["accuracy"], "conflicting_accuracy": g["conflicting_accuracy"]}

    trainer = Trainer(
        model,
        method,
        loader,
        cfg.train,
        run=run,
        evaluate=evaluate if data.val is not None else None,
        seed=cfg.seed,
        fingerprint=resolved,
        console=console,
        num_samples=len(data.train),
        num_classes=NUM_CLASSES,
        num_biases=NUM_CLASSES,
        build_model=model_factory(cfg.model, NUM_CLASSES, feature_activation=method.feature_activation),
    )
    console.print(
        f"[bold]Biased MNIST[/] ρ={cfg.data.rho} method={method.name} {method.describe()} "
        f"seed={cfg.seed} epochs={cfg.train.epochs} precision={trainer.precision} → {run.path}"
    )
    t0 = time.perf_counter()
    result = trainer.fit(resume=resume)
    train_time = time.perf_counter() - t0

    tests = {}
    for name, split in (("biased", data.test_biased), ("unbiased", data.test_unbiased)):
        p = trainer.predict(TensorBatchLoader(split, EVAL_BATCH))
        tests[name] = group_accuracy(p.targets, p.predicted, p.biases)
    last = result.history[-1]
    results = {
        "experiment": "biased_mnist",
        "name": cfg.name,
        "method": method.describe(),
        "rho": cfg.data.rho,
        "seed": cfg.seed,
        "epochs": last["epoch"],
        "selection": "last epoch (test sets never used for selection)",
        "metrics": {
            "biased_accuracy": tests["biased"]["accuracy"],
            "unbiased_accuracy": tests["unbiased"]["accuracy"],
            "unbiased_group_mean_accuracy": tests["unbiased"]["group_mean_accuracy"],
            "unbiased_conflicting_accuracy": tests["unbiased"]["conflicting_accuracy"],
            "val_accuracy": (last.get("val") or {}).get("accuracy"),
            "train_accuracy": last["train"].get("accuracy"),
        },
        "tests": tests,
        "train": {
            "precision": result.precision,
            "device": result.device,
            "time_s": sum(h["train"]["time_s"] + h.get("eval_time_s", 0.0) for h in result.history),
            "time_s_this_invocation": train_time,
            "img_per_s_last_epoch": last["train"]["img_per_s"],
            "resumed_from_epoch": result.resumed_from_epoch,
        },
        "config": resolved,
        "data": run.read_json(RUN_INFO_FILE)["data"],
        "code_version": code_version(),
        "environment": environment(),
        "finished": datetime.now(timezone.utc).isoformat(),
    }
    run.write_json(RESULTS_FILE, results)
    m = results["metrics"]
    console.print(
        f"[bold green]done[/] biased acc {m['biased_accuracy']:.4f}  unbiased acc {m['unbiased_accuracy']:.4f}  "
        f"({train_time / 60:.1f} min) → {run.path / RESULTS_FILE}"
    )
    return results
