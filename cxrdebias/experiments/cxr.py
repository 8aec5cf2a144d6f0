"""The chest X-ray application: train a COVID-19 classifier that does not learn the hospital.

``train_cxr`` is what ``cxrdebias train`` calls:

1. validate the manifest and split it by patient (``cxrdebias.data.cxr``); the split table is
   saved in the run (``splits.csv``) so evaluation uses exactly the same patients;
2. build DenseNet-121 (1 channel, two-layer head, EnD bottleneck) and the method
   (``vanilla``, ``end`` …) with the site as the bias label;
3. train with the one trainer; class imbalance by a weighted loss; model selection and early
   stopping on the **validation** split only;
4. choose the decision threshold on the validation split (Youden's J) and save the model
   artefact ``model.pt`` with everything needed to use it (preprocessing, threshold, labels,
   site mapping, method, validation metrics, provenance).

The test split is never touched here: ``cxrdebias evaluate RUN`` reports on it.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from cxrdebias import distributed as dist_utils
from cxrdebias.config import ExperimentConfig, check_resumable, config_to_dict
from cxrdebias.data.base import UNKNOWN_BIAS, make_loader
from cxrdebias.data.cxr import (
    CLASS_NAMES,
    CXRData,
    CXRDataConfig,
    build_cxr,
    format_drop_summary,
    save_splits,
)
from cxrdebias.debias import build_method
from cxrdebias.deploy.artefact import MODEL_FILE, MODEL_FORMAT, SPLITS_FILE
from cxrdebias.errors import ConfigError
from cxrdebias.evaluation.metrics import auroc, balanced_accuracy, youden_threshold
from cxrdebias.models import build_model, model_factory
from cxrdebias.training.device import seed_everything
from cxrdebias.training.inference import Predictions
from cxrdebias.training.provenance import code_version, environment, run_info
from cxrdebias.training.runs import (
    RESULTS_FILE,
    RUN_INFO_FILE,
    RunDir,
    torch_save_atomic,
)
from cxrdebias.training.trainer import Trainer

EVAL_BATCH = 64


def positive_scores(p: Predictions) -> np.ndarray:
    """Probability of the positive class (index 1)."""
    return p.probabilities[:, 1].numpy()


def validation_metrics(p: Predictions) -> dict[str, float]:
    """Selection metrics on the validation split.

    - ``auroc``: overall AUROC (rewards the site shortcut when the validation split is biased);
    - ``site_mean_auroc``: mean of the within-site AUROCs — disease discrimination that the
      site cannot explain, the default selection metric;
    - ``balanced_accuracy`` / ``worst_site_balanced_accuracy`` at the validation Youden threshold.
    """
    y, s, site = p.targets.numpy(), positive_scores(p), p.biases.numpy()
    out: dict[str, float] = {"auroc": auroc(y, s)}
    per_site = [auroc(y[site == k], s[site == k]) for k in np.unique(site)]
    per_site = [a for a in per_site if not np.isnan(a)]
    out["site_mean_auroc"] = float(np.mean(per_site)) if per_site else float("nan")
    if len(np.unique(y)) == 2:
        thr = youden_threshold(y, s)
        pred = (s >= thr).astype(int)
        out["threshold"] = thr
        out["balanced_accuracy"] = balanced_accuracy(y, pred)
        bas = [balanced_accuracy(y[site == k], pred[site == k]) for k in np.unique(site)]
        bas = [b for b in bas if not np.isnan(b)]
        out["worst_site_balanced_accuracy"] = float(min(bas)) if bas else float("nan")
    out["loss"] = float(torch.nn.functional.cross_entropy(p.logits, p.targets).item())
    return out


def _loader(samples, cfg: ExperimentConfig, *, train: bool):
    world = dist_utils.world() if train else dist_utils.World()  # validation runs on rank 0, whole
    return make_loader(
        samples,
        cfg.train.batch_size if train else EVAL_BATCH,
        shuffle=train,
        seed=cfg.seed,
        num_workers=cfg.train.num_workers,
        drop_last=train and cfg.train.drop_last,
        rank=world.rank,
        world_size=world.world_size,
    )


def _materialise(dataset, data_cfg: CXRDataConfig, *, hide_bias: bool):
    """In-memory samples when caching (the default), else the streaming dataset. With
    ``data.cache_dir`` the disk cache is filled first (only missing images are decoded), so
    both read pre-decoded images."""
    dataset.fill_disk_cache(workers=data_cfg.workers)
    if data_cfg.cache:
        samples = dataset.to_tensor_samples(workers=data_cfg.workers)
        if hide_bias:
            samples.biases = torch.full_like(samples.biases, UNKNOWN_BIAS)
        return samples
    if hide_bias:
        raise ConfigError("data.bias=none needs data.cache=true")
    return dataset


def class_weights(targets: torch.Tensor, num_classes: int = 2) -> torch.Tensor:
    """Inverse class frequency, normalised so that a balanced set gets weight 1 per class."""
    counts = torch.bincount(targets, minlength=num_classes).float()
    if (counts == 0).any():
        missing = [CLASS_NAMES[i] for i in range(num_classes) if counts[i] == 0]
        raise ConfigError(f"the training split has no {', '.join(missing)} images; cannot train a classifier")
    return counts.sum() / (num_classes * counts)


def train_cxr(
    cfg: ExperimentConfig,
    out: str | Path,
    *,
    force: bool = False,
    resume: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """Train a CXR classifier with ``cfg.method`` and the site as the bias; see module doc."""
    console = console or Console(stderr=True, soft_wrap=True)
    if not isinstance(cfg.data, CXRDataConfig):
        raise ConfigError("data.kind must be 'cxr' for `cxrdebias train` (use `cxrdebias reproduce` for Biased MNIST)")
    if cfg.model.arch != "densenet121":
        raise ConfigError(f"model.arch={cfg.model.arch!r}: the CXR application trains densenet121")
    resolved = config_to_dict(cfg)
    method = build_method(cfg.method.name, cfg.method.options(), cfg.unsupervised)
    bias = "auto" if cfg.unsupervised.enabled else cfg.data.bias  # auto: true sites only for the agreement metrics
    if method.requires_bias and cfg.data.bias == "none":
        raise ConfigError(f"method {method.name!r} needs bias labels; use --bias site")
    world = dist_utils.world()  # under torchrun: rank 0 writes, every rank trains on its share
    dist_utils.check_batch_size(cfg.train.batch_size, world.world_size)
    if resume:
        run = dist_utils.run_on_main(lambda: RunDir.create(out, resume=True))
        resolved = run.read_config()
        check_resumable(resolved, cfg, str(run.path))
        splits = run.file(SPLITS_FILE)
        data: CXRData = build_cxr(cfg.data, splits_file=splits)
    else:
        data = build_cxr(cfg.data)  # validates the manifest before anything is written
        if cfg.model.pretrained:  # bad weights must fail before --force empties the old run
            build_model(cfg.model, len(CLASS_NAMES), in_channels=cfg.data.preprocess.channels)

        def create_run() -> RunDir:
            new = RunDir.create(out, force=force)
            new.write_config(resolved)
            save_splits(data.table, new.file(SPLITS_FILE))
            return new

        run = dist_utils.run_on_main(create_run)
    if data.dropped:
        console.print(f"[yellow]{format_drop_summary(data.dropped, len(data.table) + len(data.dropped))}[/]")
    if data.val is None:
        raise ConfigError("the split has no validation patients; set data.val_fraction > 0 (model selection needs it)")
    info = run_info(
        {
            "manifest": str(cfg.data.manifest),
            "manifest_sha256": data.manifest_sha256,
            "dataset_sha256": data.data_hash(),
            "site_to_index": data.site_to_index,
            "splits": {s: int((data.table["split"] == s).sum()) for s in ("train", "val", "test")},
            "dropped_rows": len(data.dropped),
        }
    )
    if not resume and world.is_main:
        run.write_json(RUN_INFO_FILE, info)

    hide = cfg.data.bias == "none"
    t0 = time.perf_counter()
    train_samples = _materialise(data.train, cfg.data, hide_bias=hide)
    val_samples = _materialise(data.val, cfg.data, hide_bias=False)
    load_time = time.perf_counter() - t0

    seed_everything(cfg.seed)
    spec = cfg.data.preprocess
    model = build_model(cfg.model, len(CLASS_NAMES), in_channels=spec.channels, feature_activation=method.feature_activation)
    if cfg.train.class_balance == "weighted_loss":
        method.set_class_weights(class_weights(data.train.targets))
    val_loader = _loader(val_samples, cfg, train=False)

    def evaluate(predict) -> dict[str, float]:
        return validation_metrics(predict(val_loader))

    trainer = Trainer(
        model,
        method,
        _loader(train_samples, cfg, train=True),
        cfg.train,
        run=run,
        evaluate=evaluate,
        select_metric=cfg.train.select_metric,
        select_mode=cfg.train.select_mode,
        patience=cfg.train.patience,
        seed=cfg.seed,
        fingerprint=resolved,
        console=console,
        num_samples=len(data.train),
        num_classes=len(CLASS_NAMES),
        num_biases=None if hide else len(data.site_to_index),
        build_model=model_factory(
            cfg.model, len(CLASS_NAMES), in_channels=spec.channels, feature_activation=method.feature_activation
        ),
    )
    sites = ", ".join(f"{s}={i}" for s, i in data.site_to_index.items())
    console.print(
        f"[bold]CXR[/] method={method.name} bias={bias} ({sites}) train={len(data.train)} "
        f"val={len(data.val)} test={len(data.test)} images, {spec.image_size}px, precision={trainer.precision} → {run.path}"
    )
    t1 = time.perf_counter()
    result = trainer.fit(resume=resume)
    train_time = time.perf_counter() - t1
    if not world.is_main:  # rank 0 selects, evaluates and writes the model and results
        return {"rank": world.rank, "world_size": world.world_size}
    trainer.load_best()
    selected_epoch = result.best["epoch"] if result.best else result.history[-1]["epoch"]

    p_val = trainer.predict(val_loader)
    val = validation_metrics(p_val)
    y_val, s_val = p_val.targets.numpy(), positive_scores(p_val)
    if len(np.unique(y_val)) < 2:
        raise ConfigError("the validation split holds a single class: no decision threshold can be chosen; add patients of both classes")
    threshold = youden_threshold(y_val, s_val)
    artefact = {
        "format": MODEL_FORMAT,
        "arch": cfg.model.arch,
        "model_config": cfg.model.model_dump(mode="json"),
        "feature_activation": method.feature_activation,
        "num_classes": len(CLASS_NAMES),
        "class_names": list(CLASS_NAMES),
        "in_channels": spec.channels,
        "state_dict": trainer.model.state_dict(),
        "preprocess": spec.model_dump(mode="json"),
        "threshold": threshold,
        "threshold_method": "Youden's J (max TPR - FPR) on the validation split",
        "site_to_index": data.site_to_index,
        "site_source": cfg.data.site_source,
        "bias": bias,
        "method": method.describe(),
        "selected_epoch": selected_epoch,
        "selection": f"validation {cfg.train.select_metric}" if cfg.train.select_metric else "last epoch",
        "val_metrics": val,
        "data_hash": info["data"]["dataset_sha256"],
        "code_version": code_version(),
        "created": datetime.now(timezone.utc).isoformat(),
    }
    torch_save_atomic(artefact, run.file(MODEL_FILE))
    results = {
        "experiment": "cxr",
        "name": cfg.name,
        "method": method.describe(),
        "bias": bias,
        "seed": cfg.seed,
        "epochs_trained": result.history[-1]["epoch"],
        "selected_epoch": selected_epoch,
        "selection": artefact["selection"],
        "stopped_early": result.stopped_early,
        "threshold": threshold,
        "val_metrics": val,
        "train": {
            "precision": result.precision,
            "device": result.device,
            "time_s": sum(h["train"]["time_s"] + h.get("eval_time_s", 0.0) for h in result.history),
            "time_s_this_invocation": train_time,
            "image_load_time_s": load_time,
            "img_per_s_last_epoch": result.history[-1]["train"]["img_per_s"],
            "resumed_from_epoch": result.resumed_from_epoch,
            "world_size": world.world_size,
        },
        "config": resolved,
        "data": info["data"],
        "code_version": code_version(),
        "environment": environment(),
        "finished": datetime.now(timezone.utc).isoformat(),
    }
    run.write_json(RESULTS_FILE, results)
    console.print(
        f"[bold green]done[/] epoch {selected_epoch} selected ({artefact['selection']}); validation AUROC "
        f"{val['auroc']:.3f}, site-mean AUROC {val['site_mean_auroc']:.3f}, threshold {threshold:.3f} "
        f"({train_time / 60:.1f} min) → {run.path / MODEL_FILE}"
    )
    return results
