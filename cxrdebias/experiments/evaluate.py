"""Evaluation runs → report files: per-institution reports of trained CXR runs, comparisons.

``evaluate_run`` is ``cxrdebias evaluate RUN --per-institution``; ``compare_runs`` is
``cxrdebias compare RUN_A RUN_B``. The metrics themselves live in :mod:`cxrdebias.evaluation.metrics`,
the writers (JSON, CSV, Markdown, PNG) in :mod:`cxrdebias.evaluation.report`.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console

from cxrdebias.console import esc, make_console
from cxrdebias.data.base import TensorBatchLoader
from cxrdebias.data.cxr import CXRDataset, load_manifest, load_splits
from cxrdebias.data.preprocess import PreprocessSpec
from cxrdebias.deploy.artefact import MODEL_FILE, SPLITS_FILE, load_model_artefact
from cxrdebias.errors import ConfigError, DataError, DiskFullError, OutputError, RunExistsError
from cxrdebias.evaluation.calibration import (
    CALIBRATION_PNG,
    calibration_report,
    fit_temperature,
    plot_reliability,
)
from cxrdebias.evaluation.leakage import site_probe, site_probe_by_layer
from cxrdebias.evaluation.paired import OVERALL, paired_differences, paired_markdown
from cxrdebias.evaluation.proportions import class_sizes_text
from cxrdebias.evaluation.report import (
    compare_markdown,
    external_sites,
    plot_site_report,
    to_markdown,
    write_report,
)
from cxrdebias.evaluation.site_report import site_report
from cxrdebias.evaluation.thresholds import DECISION, choose_site_thresholds, site_threshold_scores
from cxrdebias.evaluation.thresholds import METHOD as SITE_THRESHOLD_METHOD
from cxrdebias.experiments.config import load_config
from cxrdebias.experiments.protocols.cxr import positive_scores
from cxrdebias.fileio import sha256_files, spreadsheet_safe, write_text_atomic
from cxrdebias.models.pooled import probe_layers
from cxrdebias.training.device import resolve_device
from cxrdebias.training.folders import check_replaceable, write_marker
from cxrdebias.training.inference import Predictions, predict
from cxrdebias.training.runs import RunDir, replace_folder, staging_folder

__all__ = ["EVAL_DIR", "SITE_THRESHOLDS_DIR", "Predictions", "compare_runs", "evaluate_run", "predict", "write_predictions"]

EVAL_DIR = "eval"
#: the default report folder of ``evaluate --site-thresholds`` (beside ``eval``, never over it)
SITE_THRESHOLDS_DIR = "eval_site_thresholds"
INFERENCE_PRECISION = "fp32"  # evaluate scores in the precision the exported (ONNX) model runs in


def evaluate_run(
    run_dir: str | Path,
    *,
    manifest: str | Path | None = None,
    split: str = "test",
    out: str | Path | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    force: bool = False,
    console: Console | None = None,
    allow_links_outside: bool = False,
    site_source: str | None = None,
    site_thresholds: bool = False,
) -> dict[str, Any]:
    """Per-site report of a trained run (``cxrdebias evaluate RUN --per-institution``).

    Without ``manifest`` the run's own split table is used (``split``, default the test
    patients). With ``manifest`` every row of that manifest is evaluated (a manifest with a
    ``split`` column is restricted to ``split``), its sites read by ``site_source`` (``column`` or
    ``dicom:<Keyword>``; default the run's ``data.site_source``). Sites the model was not trained
    on (absent from the model's ``site_to_index``) are *external*: scored, marked ``external``
    in every table and the plot, and kept out of the summaries across sites. Uses the threshold chosen on validation and
    saved with the model, or with ``site_thresholds`` one threshold per training site chosen on
    its own validation images (:mod:`cxrdebias.evaluation.thresholds`; the global one for the
    others). The calibration section (per-site ECE and Brier score before and after temperature
    scaling fitted on the run's validation split, :mod:`cxrdebias.evaluation.calibration`) goes
    into the report and its reliability diagram into calibration.png. Writes report.json/.csv/.md and report.png to ``out`` (default ``RUN/eval``,
    ``RUN/eval_site_thresholds`` with ``site_thresholds``), which must not exist unless ``force``; ``force`` replaces only a cxrdebias
    report folder, never the run, the data or a folder holding them (:mod:`cxrdebias.training.folders`).
    Symbolic links of the manifest may lead out of its folder with ``allow_links_outside``
    (``--allow-outside``) and, for the run's own manifest, when the run allowed it
    (``data.allow_links_outside``).
    """
    console = console or make_console(stderr=True)
    if site_source is not None and manifest is None:
        raise ConfigError("--site-source: reads the sites of --data; without --data the run's own sites are used")
    if site_thresholds and split == "val":
        raise ConfigError("--site-thresholds: the thresholds are chosen on the validation split; evaluate another split (--split test)")
    run = RunDir(run_dir)
    console.print(f"evaluating {esc(run.path)} on the {esc(split)} split" + (f" of {esc(manifest)}" if manifest else ""))
    cfg = load_config(None, None, base=run.read_config_located())
    model, art = load_model_artefact(run.path)
    out = Path(out) if out is not None else run.file(SITE_THRESHOLDS_DIR if site_thresholds else EVAL_DIR)
    if out.exists() and not out.is_dir():
        raise RunExistsError(f"{out}: exists and is not a folder; choose another --out")
    data_cfg = cfg.data
    if out.exists() and any(out.iterdir()):
        if not force:
            raise RunExistsError(f"{out}: an evaluation report already exists; pass --force to overwrite it or --out elsewhere")
        # --force replaces a report folder only: never the run itself, the data or a foreign folder
        inputs = [run.path, *(p for p in (manifest, data_cfg.manifest) if p is not None)]
        check_replaceable(out, "report", protected=inputs)
    table = load_manifest(
        data_cfg.manifest if manifest is None else manifest,
        site_source=data_cfg.site_source if manifest is None or site_source is None else site_source,
        label_map=data_cfg.label_map,
        check_duplicates=False,
        max_pixels=data_cfg.max_pixels,
        workers=data_cfg.workers,
        allow_links_outside=allow_links_outside or (manifest is None and data_cfg.allow_links_outside),
    )
    full: pd.DataFrame | None = None  # the run's own table with its splits (the probe's validation rows)
    if manifest is None:
        table = load_splits(run.file(SPLITS_FILE), table)
        full = table
        source = f"{data_cfg.manifest} ({split} split of the run)"
    else:
        if "split" not in table.columns or not table["split"].isin(["train", "val", "test"]).any():
            table = table.assign(split=split)  # a manifest without splits is evaluated whole
        source = str(manifest)
    table = table[table["split"] == split]
    if table.empty:
        raise DataError(f"{source}: no rows in split {split!r} to evaluate")
    site_index, external = report_site_index(art["site_to_index"], table["site"])
    spec = PreprocessSpec.model_validate(art["preprocess"])
    ds = CXRDataset(table, spec, site_index, cache=False, name=split)
    samples = ds.to_tensor_samples(workers=data_cfg.workers)

    device = resolve_device(cfg.train.device)
    model = model.to(device)
    # scored in fp32 whatever the training precision: the precision the exported model runs in,
    # so that this report, its temperature and the ONNX graph's agree (bf16 logits differ by ~1e-2)
    layers = probe_layers(model)  # the per-layer site probe reads them in the same pass
    p = predict(model, TensorBatchLoader(samples, 64), device=device, keep_features=True, layers=layers)
    y, score = p.targets.numpy(), positive_scores(p)
    sites = np.array(ds.bias_names)[p.biases.numpy()]
    patients = ds.table["patient_id"].to_numpy()[p.indices.numpy()]
    val_table, why = (full, None) if manifest is None else _run_validation_table(run, data_cfg)
    if val_table is not None:
        val_table = val_table[val_table["split"] == "val"]

    @functools.cache
    def validation() -> tuple[Predictions, np.ndarray]:  # the run's validation split through the model, once
        val_ds = CXRDataset(val_table, spec, art["site_to_index"], cache=False, name="val")
        loader = TensorBatchLoader(val_ds.to_tensor_samples(workers=data_cfg.workers), 64)
        pv = predict(model, loader, device=device, keep_features=True, layers=layers)
        return pv, np.array(val_ds.bias_names)[pv.biases.numpy()]

    threshold, report_score, chosen = art["threshold"], score, None
    if site_thresholds:  # one threshold per training site; the report's scores mapped so each lies at 0.5
        if val_table is None or val_table.empty:
            raise DataError(f"--site-thresholds: {why or 'the run has no validation split to choose the thresholds on'}")
        pv, val_sites = validation()
        chosen = choose_site_thresholds(
            pv.targets.numpy(), positive_scores(pv), val_sites, sites=sites.tolist(),
            training_sites=art["site_to_index"], global_threshold=art["threshold"],
        )
        threshold = np.array([chosen[s]["threshold"] for s in sites])  # per image, for predictions.csv
        report_score = site_threshold_scores(score, sites, {k: v["threshold"] for k, v in chosen.items()})
    report = site_report(
        y, report_score, sites, threshold=art["threshold"] if chosen is None else DECISION, patient_ids=patients,
        n_boot=n_boot, seed=seed, external=external,
    )
    report["run"] = str(run.path)
    report["model_sha256"] = sha256_files([run.path / MODEL_FILE])  # which model this report is of (export checks it)
    report["method"] = art["method"]
    report["split"] = split
    report["inference_precision"] = INFERENCE_PRECISION
    report["source"] = source
    report["threshold_method"] = art["threshold_method"] if chosen is None else SITE_THRESHOLD_METHOD
    if chosen is not None:
        report["site_thresholds"] = {"method": SITE_THRESHOLD_METHOD, "global_threshold": art["threshold"], "by_site": chosen}
        console.print("per-site thresholds: " + esc(", ".join(f"{k} {v['threshold']:.4g} ({v['source']})" for k, v in chosen.items())))
    report["site_probe"] = _probe_report(validation, p, sites, val_table, why, split, seed, layers)
    if val_table is not None and not val_table.empty:  # temperature scaling fitted on the validation split
        pv, _ = validation()
        temperature = fit_temperature(pv.logits.double().numpy(), pv.targets.numpy())
        report["calibration"] = calibration_report(y, p.logits.double().numpy(), sites, temperature,
                                                   fitted_on=f"validation split ({len(pv.targets)} images)", n_fit=len(pv.targets))
    else:
        report["calibration"] = {"absent": why or "the run has no validation split to fit the temperature on"}
    if external:
        console.print(f"external site(s), not in training: {esc(', '.join(external))}")
    name = f"{run.path.name} ({art['method']['name']})"
    # all files go into a hidden folder beside ``out`` that replaces it once complete: a failure
    # (a full disk) leaves no half report and the previous report (--force) as it was
    staging = staging_folder(out)
    try:
        write_marker(staging, "report")
        write_report(report, staging, run_name=name, metadata={"source": source, "split": split, "method": art["method"]})
        plot_site_report(report, staging / "report.png", y_true=y, y_score=report_score, sites=sites, title=name)
        if "temperature" in report["calibration"]:
            plot_reliability(y, p.logits.double().numpy(), sites, report["calibration"]["temperature"], staging / CALIBRATION_PNG,
                             title=f"{name}: reliability on the {split} split")
        write_predictions(staging / "predictions.csv", ds.table.iloc[p.indices.numpy()], score, threshold)
        replace_folder(staging, out)
    except OutputError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, DiskFullError) and Path(exc.path).parent == staging:
            raise DiskFullError(out / Path(exc.path).name, "free some space and run `cxrdebias evaluate` again") from None
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report["markdown"] = to_markdown(report, run_name=name)
    return report


def _run_validation_table(run: RunDir, data_cfg: Any) -> tuple[pd.DataFrame | None, str | None]:
    """The run's own manifest with its splits (for the site probe of ``evaluate --data``), or why
    it cannot be read."""
    try:
        table = load_manifest(
            data_cfg.manifest,
            site_source=data_cfg.site_source,
            label_map=data_cfg.label_map,
            check_duplicates=False,
            max_pixels=data_cfg.max_pixels,
            workers=data_cfg.workers,
            allow_links_outside=data_cfg.allow_links_outside,
        )
        return load_splits(run.file(SPLITS_FILE), table), None
    except DataError as exc:
        return None, f"the run's validation split could not be read ({exc})"


def _probe_report(
    validation: Any,
    p: Predictions,
    sites: np.ndarray,
    val_table: pd.DataFrame | None,
    why: str | None,
    split: str,
    seed: int,
    layers: dict[str, str],
) -> dict[str, Any]:
    """``report["site_probe"]``: the linear site probe on the bottleneck (fitted on the run's
    validation split, ``validation()`` → its predictions and sites; scored on the evaluated rows)
    and, under ``layers``, the same probe on each of the model's probe layers (``layers``:
    ``{name: module path}``, read into ``p.layers``) and the bottleneck, earliest first; or
    ``{"absent": reason}``."""
    if why is not None:
        return {"absent": why}
    if split == "val":
        return {"absent": "the evaluated split is the validation split the probe is fitted on; evaluate the test split"}
    if val_table is None or val_table.empty:
        return {"absent": "the run has no validation split to fit the probe on"}
    n_val_sites, n_test_sites = val_table["site"].nunique(), len(set(sites.tolist()))
    if n_val_sites < 2 or n_test_sites < 2:
        return {"absent": f"the probe needs 2 or more sites in validation and in the evaluated split (found {n_val_sites} and {n_test_sites})"}
    pv, val_sites = validation()
    yv, yt = pv.targets.numpy(), p.targets.numpy()
    probe = site_probe(pv.features.numpy(), val_sites, yv, p.features.numpy(), sites, yt, seed=seed)
    by_layer = [{name: x.numpy() for name, x in (q.layers or {}).items()} | {"bottleneck": q.features.numpy()} for q in (pv, p)]
    modules = layers | {"bottleneck": "bottleneck"}
    probe["layers"] = site_probe_by_layer(by_layer[0], val_sites, yv, by_layer[1], sites, yt, seed=seed, modules=modules)
    return probe


def report_site_index(trained: dict[str, int], sites: pd.Series) -> tuple[dict[str, int], list[str]]:
    """The site → index mapping of an evaluation and its external sites (sorted).

    The model's training sites keep their indices; every other site of ``sites`` (an external
    site) gets the next free index, after all of them. The indices only group the report: the
    model never sees them."""
    index = {str(k): int(v) for k, v in trained.items()}
    external = sorted({str(s) for s in sites} - set(index))
    start = max(index.values(), default=-1) + 1
    return index | {s: start + k for k, s in enumerate(external)}, external


def write_predictions(path: str | Path, table: pd.DataFrame, score: np.ndarray, threshold: float | np.ndarray) -> None:
    """One row per image: file, patient, site, label, probability, predicted label; with one
    threshold per image (``evaluate --site-thresholds``) also that ``threshold``."""
    df = pd.DataFrame(
        {
            "path": table["path"].to_numpy(),
            "patient_id": table["patient_id"].to_numpy(),
            "site": table["site"].to_numpy(),
            "label": table["label"].to_numpy(),
            "probability": score,
            "predicted": (score >= threshold).astype(int),
        }
    )
    if np.ndim(threshold):
        df["threshold"] = threshold
    for column in ("path", "patient_id", "site"):  # manifest text: no live spreadsheet formula
        df[column] = df[column].map(spreadsheet_safe)
    write_text_atomic(path, df.to_csv(index=False))


def _read_predictions(run: str | Path) -> pd.DataFrame | None:
    """The ``predictions.csv`` of an evaluated run (None when the evaluation wrote none)."""
    path = Path(run) / EVAL_DIR / "predictions.csv"
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path, dtype={"path": str, "patient_id": str, "site": str}, keep_default_na=False)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: not a readable predictions table ({exc}); run `cxrdebias evaluate {run} --force` again") from None


def compare_runs(
    run_a: str | Path,
    run_b: str | Path,
    *,
    name_a: str | None = None,
    name_b: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> str:
    """Per-site table of two evaluated runs side by side (EnD paper, Table 5), then the paired
    differences B − A with patient-level bootstrap intervals when both were evaluated on the
    same test images (:mod:`cxrdebias.evaluation.paired`)."""
    reports = []
    for run in (run_a, run_b):
        path = Path(run) / EVAL_DIR / "report.json"
        if not path.is_file():
            raise DataError(f"{path}: no evaluation report; run `cxrdebias evaluate {run} --per-institution` first")
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: not a readable evaluation report ({exc}); run `cxrdebias evaluate {run} --force` again") from None
        reports.append(report)
    try:
        name_a = name_a or f"{Path(run_a).name} ({reports[0]['method']['name']})"
        name_b = name_b or f"{Path(run_b).name} ({reports[1]['method']['name']})"
        table = compare_markdown(reports[0], reports[1], name_a, name_b)
        entries = reports[0]["by_group"] | {OVERALL: reports[0]["overall"]}
        counts = {site: f"{entry['n']} ({class_sizes_text(entry)})" for site, entry in entries.items()}
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as exc:
        raise DataError(
            f"{Path(run_a) / EVAL_DIR / 'report.json'} or {Path(run_b) / EVAL_DIR / 'report.json'}: not an evaluation report "
            f"of this cxrdebias ({type(exc).__name__}: {exc}); evaluate the runs again"
        ) from None
    preds = [_read_predictions(run_a), _read_predictions(run_b)]
    if any(p is None for p in preds) or n_boot <= 0:
        return table
    where = f"{Path(run_a) / EVAL_DIR / 'predictions.csv'} and {Path(run_b) / EVAL_DIR / 'predictions.csv'}"
    paired = paired_differences(preds[0], preds[1], n_boot=n_boot, seed=seed, where=where)
    external = external_sites(*reports)
    return table.rstrip("\n") + "\n\n" + paired_markdown(paired, name_a, name_b, n_boot=n_boot, n=counts, external=external)
