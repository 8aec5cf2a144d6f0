"""The chest X-ray application as a protocol: a COVID-19 classifier that does not learn the hospital.

``cxrdebias train`` runs it through the one runner (:func:`~cxrdebias.experiments.runner.run_experiment`):

1. validate the manifest and split it by patient (:mod:`cxrdebias.data.cxr`); the split table
   is saved in the run (``splits.csv``) so evaluation uses exactly the same patients, and a
   resumed run reads it back;
2. the runner builds DenseNet-121 (1 channel, two-layer head, EnD bottleneck) and the method
   (``vanilla``, ``end`` …) with the site as the bias label (``data.bias=none``: no bias labels;
   ``--bias auto``: pseudo labels, the true sites only for the agreement metrics);
3. it trains with the one trainer; class imbalance by a weighted loss
   (``train.class_balance``); model selection and early stopping on the **validation** split;
4. :func:`finish` chooses the decision threshold on the validation split (Youden's J) and saves
   the model file ``model.pt`` (:mod:`cxrdebias.deploy.artefact`) with everything needed to use
   it (preprocessing, threshold, labels, site mapping, method, validation metrics, provenance).

The test split is never touched here: ``cxrdebias evaluate RUN`` reports on it.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from cxrdebias.console import esc
from cxrdebias.data.base import UNKNOWN_BIAS
from cxrdebias.data.cxr import (
    CLASS_NAMES,
    CXRDataConfig,
    build_cxr,
    format_drop_summary,
    save_splits,
)
from cxrdebias.deploy.artefact import MODEL_FILE, MODEL_FORMAT, SPLITS_FILE
from cxrdebias.errors import ConfigError
from cxrdebias.evaluation.metrics import auroc, balanced_accuracy, youden_threshold
from cxrdebias.evaluation.proportions import threshold_sample_warning
from cxrdebias.experiments.registry import Finished, Protocol, protocol
from cxrdebias.models import build_model
from cxrdebias.training.inference import Predictions
from cxrdebias.training.provenance import code_version
from cxrdebias.training.runs import torch_save_atomic

#: validation (and, in ``evaluate``, test) batch size
EVAL_BATCH = 64


def positive_scores(p: Predictions) -> np.ndarray:
    """Probability of the positive class (index 1)."""
    return p.probabilities[:, 1].numpy()


def validation_metrics(p: Predictions) -> dict[str, float]:
    """Selection metrics on the validation split.

    - ``auroc``: overall AUROC (rewards the site shortcut when the validation split is biased);
    - ``site_mean_auroc``: mean of the within-site AUROCs — disease discrimination that the
      site cannot explain, the default selection metric;
    - ``balanced_accuracy`` / ``worst_site_balanced_accuracy`` at the validation Youden threshold;
    - ``loss``: cross-entropy.
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


#: what ``train.select_metric`` may name on a CXR run
VAL_METRICS = ("auroc", "site_mean_auroc", "balanced_accuracy", "worst_site_balanced_accuracy", "loss")


def materialise(dataset, data_cfg: CXRDataConfig, *, hide_bias: bool):
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


@protocol("cxr", CXRDataConfig, run_tag=lambda cfg: "cxr", command="cxrdebias train")
def build(cfg: Any, method: Any, run: Any, console: Any) -> Protocol:
    """The CXR protocol of ``cfg`` (``run``: the run folder when resuming, whose splits are reused)."""
    if cfg.model.arch != "densenet121":
        raise ConfigError(f"model.arch={cfg.model.arch!r}: the CXR application trains densenet121")
    if method.requires_bias and cfg.data.bias == "none":
        raise ConfigError(f"method {method.name!r} needs bias labels; use --bias site")
    bias = "auto" if cfg.unsupervised.enabled else cfg.data.bias  # auto: true sites only for the agreement metrics
    spec = cfg.data.preprocess
    if run is not None:
        data = build_cxr(cfg.data, splits_file=run.file(SPLITS_FILE))
    else:
        data = build_cxr(cfg.data)  # validates the manifest before anything is written
        if cfg.model.pretrained:  # bad weights must fail before --force empties the old run
            build_model(cfg.model, len(CLASS_NAMES), in_channels=spec.channels)
    if data.dropped:
        console.print(f"[yellow]{esc(format_drop_summary(data.dropped, len(data.table) + len(data.dropped)))}[/]")
    if data.val is None:
        raise ConfigError("the split has no validation patients; set data.val_fraction > 0 (model selection needs it)")

    hide = cfg.data.bias == "none"
    t0 = time.perf_counter()
    train_samples = materialise(data.train, cfg.data, hide_bias=hide)
    val_samples = materialise(data.val, cfg.data, hide_bias=False)
    load_time = time.perf_counter() - t0

    def data_info() -> dict[str, Any]:
        return {
            "manifest": str(cfg.data.manifest),
            "manifest_sha256": data.manifest_sha256,
            "dataset_sha256": data.data_hash(),
            "site_to_index": data.site_to_index,
            "splits": {s: int((data.table["split"] == s).sum()) for s in ("train", "val", "test")},
            "dropped_rows": len(data.dropped),
        }

    def banner(method, precision: str) -> str:
        sites = esc(", ".join(f"{s}={i}" for s, i in data.site_to_index.items()))
        return (
            f"[bold]CXR[/] method={method.name} bias={bias} ({sites}) train={len(data.train)} "
            f"val={len(data.val)} test={len(data.test)} images, {spec.image_size}px, precision={precision}"
        )

    def finish(done: Finished) -> tuple[dict[str, Any], str]:
        result, method = done.result, done.method
        selected_epoch = result.best["epoch"] if result.best else result.history[-1]["epoch"]
        p_val = done.trainer.predict(done.val_loader)
        val = validation_metrics(p_val)
        y_val, s_val = p_val.targets.numpy(), positive_scores(p_val)
        if len(np.unique(y_val)) < 2:
            raise ConfigError("the validation split holds a single class: no decision threshold can be chosen; add patients of both classes")
        threshold = youden_threshold(y_val, s_val)
        if (warning := threshold_sample_warning(len(y_val))) is not None:
            console.print(f"[yellow]{esc(warning)}[/]")
        selection = f"validation {cfg.train.select_metric}" if cfg.train.select_metric else "last epoch"
        artefact = {
            "format": MODEL_FORMAT,
            "arch": cfg.model.arch,
            "model_config": cfg.model.model_dump(mode="json"),
            "feature_activation": method.feature_activation,
            "num_classes": len(CLASS_NAMES),
            "class_names": list(CLASS_NAMES),
            "in_channels": spec.channels,
            "state_dict": done.trainer.model.state_dict(),
            "preprocess": spec.model_dump(mode="json"),
            "threshold": threshold,
            "threshold_method": "Youden's J (max TPR - FPR) on the validation split",
            "site_to_index": data.site_to_index,
            "site_source": cfg.data.site_source,
            "bias": bias,
            "method": method.describe(),
            "selected_epoch": selected_epoch,
            "selection": selection,
            "val_metrics": val,
            "data_hash": done.data["dataset_sha256"],
            "code_version": code_version(),
            "created": datetime.now(timezone.utc).isoformat(),
        }
        torch_save_atomic(artefact, done.run.file(MODEL_FILE))
        head = {
            "bias": bias,
            "seed": cfg.seed,
            "epochs_trained": result.history[-1]["epoch"],
            "selected_epoch": selected_epoch,
            "selection": selection,
            "stopped_early": result.stopped_early,
            "threshold": threshold,
            "val_metrics": val,
        }
        line = (
            f"epoch {selected_epoch} selected ({selection}); validation AUROC {val['auroc']:.3f}, "
            f"site-mean AUROC {val['site_mean_auroc']:.3f}, threshold {threshold:.3f}; model {done.run.file(MODEL_FILE)}"
        )
        return head, line

    return Protocol(
        experiment="cxr",
        train=train_samples,
        val=val_samples,
        num_classes=len(CLASS_NAMES),
        num_biases=None if hide else len(data.site_to_index),
        eval_batch_size=EVAL_BATCH,
        validate=validation_metrics,
        val_metrics=VAL_METRICS,
        finish=finish,
        data_info=data_info,
        banner=banner,
        in_channels=spec.channels,
        class_names=tuple(CLASS_NAMES),
        train_targets=data.train.targets,
        train_biases=None if hide else data.train.biases,  # with --bias auto: true sites (the runner refuses them)
        on_created=lambda new: save_splits(data.table, new.file(SPLITS_FILE)),
        train_info={"image_load_time_s": load_time},
        splits={"test": lambda: materialise(data.test, cfg.data, hide_bias=hide)},
    )

