"""``cxrdebias predict``: predictions CSV, Grad-CAM overlays and, on a labelled manifest, per-site metrics.

Torch-free like :mod:`cxrdebias.deploy.runtime`. :func:`predict_to_csv` writes one row per image
with the positive-class probability, the decision, the out-of-distribution score and whether the
image is in distribution (empty for models exported before the guard). When every image comes
with a ``label`` and a ``site`` (a labelled manifest), it also writes the per-site metrics of
:func:`cxrdebias.evaluation.site_report.site_report` next to the CSV (``<stem>_sites.json`` and
``<stem>_sites.md``): sites not in the model's ``training_sites`` are marked external.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxrdebias.data.cxr.manifest import MANIFEST, parse_label
from cxrdebias.deploy.overlay import save_overlay
from cxrdebias.deploy.runtime import CXRModel, InputImage, collect_inputs
from cxrdebias.errors import DataError, OutputError, RunExistsError
from cxrdebias.evaluation.report import nan_to_none, to_markdown
from cxrdebias.evaluation.site_report import site_report
from cxrdebias.fileio import check_writable, spreadsheet_safe, write_json_atomic, write_text_atomic

#: bootstrap resamples of the per-site intervals of a labelled manifest
N_BOOT = 1000

@dataclass(frozen=True)
class PredictSummary:
    """What :func:`predict_to_csv` wrote."""

    csv: Path
    images: int
    positive: int
    provider: str
    cam_dir: Path | None
    flagged: int | None = None
    site_report: dict[str, Any] | None = None
    site_files: tuple[Path, Path] | None = None


def _check_outputs(out_csv: Path, cam_dir: Path | None, force: bool) -> None:
    """Every way the outputs could not be written, checked before any inference."""
    if out_csv.is_dir():
        raise OutputError(f"{out_csv}: is a folder; --out takes the predictions CSV file (e.g. predictions.csv)")
    if out_csv.exists() and not force:
        raise RunExistsError(f"{out_csv}: already exists; pass --force to overwrite it")
    check_writable(out_csv)
    taken = [str(p) for p in site_files(out_csv) if p.exists()]
    if taken and not force:
        raise RunExistsError(f"{', '.join(taken)}: already exist(s); pass --force to overwrite")
    if cam_dir is None:
        return
    if cam_dir.exists() and not cam_dir.is_dir():
        raise OutputError(f"{cam_dir}: is a file; --cams takes the folder for the overlay PNGs")
    if cam_dir.is_dir() and any(cam_dir.iterdir()) and not force:
        raise RunExistsError(f"{cam_dir}: CAM folder is not empty; pass --force to write into it")
    check_writable(cam_dir, folder=True)


def predict_to_csv(
    model: CXRModel,
    inputs: Iterable[str | os.PathLike],
    out_csv: str | os.PathLike,
    *,
    cam_dir: str | os.PathLike | None = None,
    batch_size: int = 16,
    force: bool = False,
    allow_links_outside: bool = False,
) -> PredictSummary:
    """``cxrdebias predict``: one CSV row per image, optional CAM overlay PNGs.

    Columns: ``file``, ``probability`` (of the positive class), ``predicted_label``,
    ``threshold``, ``provider``, then ``site``, ``label``, ``patient_id`` when any input came
    from a manifest, ``ood_score`` and ``in_distribution`` (``true``/``false``; both empty for
    a model without the OOD guard), and ``cam`` (overlay file name) with ``cam_dir``. With
    labelled images (every image has ``label`` and ``site``) the per-site metrics are written
    next to the CSV (:func:`site_files`). Overlays are named
    ``<row number>_<file stem>.png``. Nothing is written over an existing CSV or into a
    non-empty CAM folder without ``force``; that both can be written is checked before any
    inference; the CSV is written last, in one piece. Text cells that a spreadsheet would run
    as a formula (``=``, ``+``, ``-``, ``@`` first) get a leading ``'``
    (:func:`cxrdebias.fileio.spreadsheet_safe`). ``allow_links_outside``: see :func:`collect_inputs`.
    """
    out_csv = Path(out_csv)
    cams = Path(cam_dir) if cam_dir is not None else None
    _check_outputs(out_csv, cams, force)
    items = collect_inputs(inputs, allow_links_outside=allow_links_outside)
    extra = [c for c in MANIFEST.sample_fields if any(c in x.fields for x in items)]
    header = ["file", "probability", "predicted_label", "threshold", "provider", *extra, "ood_score", "in_distribution"] + (
        ["cam"] if cams else []
    )
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    n_positive, row, flagged = 0, 0, None if not model.has_ood else 0
    scores: list[float] = []
    for part in model.iter_predict(items, batch_size):
        inside = part.in_distribution
        for i, name in enumerate(part.names):
            row += 1
            values = [name, f"{part.positive_probability[i]:.6f}", part.predicted_labels[i], f"{part.threshold:.6f}", part.provider]
            values += [part.fields[i].get(c, "") for c in extra]
            values += ["", ""] if inside is None else [f"{part.ood_score[i]:.6f}", "true" if inside[i] else "false"]
            if cams is not None:
                overlay = f"{row:05d}_{Path(name).stem}.png"
                assert part.images is not None
                save_overlay(cams / overlay, part.images[i], part.cams[i], part.geometries[i])
                values.append(overlay)
            writer.writerow([spreadsheet_safe(v) for v in values])
        n_positive += int(part.predicted_positive.sum())
        scores += part.positive_probability.tolist()
        if inside is not None:
            flagged += int((~inside).sum())
    report = labelled_site_report(model, items, np.array(scores))
    write_text_atomic(out_csv, buf.getvalue())
    files = write_site_report(report, out_csv, model) if report is not None else None
    return PredictSummary(out_csv, row, n_positive, model.provider, cams, flagged, report, files)


def site_files(out_csv: Path) -> tuple[Path, Path]:
    """The per-site metrics written next to the predictions CSV (JSON, Markdown)."""
    return out_csv.with_name(f"{out_csv.stem}_sites.json"), out_csv.with_name(f"{out_csv.stem}_sites.md")


def training_sites(model: CXRModel) -> list[str]:
    """The sites the model saw in training (metadata ``training_sites``; older models: ``sites.names``)."""
    if model.metadata.training_sites is not None:
        return list(model.metadata.training_sites)
    sites = model.metadata.raw.get("sites")
    names = sites.get("names") if isinstance(sites, dict) else None
    return [str(x) for x in names] if isinstance(names, list) else []


def labelled_site_report(model: CXRModel, items: Sequence[InputImage], score: np.ndarray, *, n_boot: int = N_BOOT,
                         seed: int = 0) -> dict[str, Any] | None:
    """Per-site metrics of images that all carry a ``label`` (0/1) and a ``site``; ``None`` otherwise.

    Patients are the ``patient_id`` field (else each image is its own patient); sites not among
    the model's training sites are external (kept out of the summaries across sites).

    Raises:
        DataError: a label that is not 0 or 1 (naming the image).
    """
    m = MANIFEST
    if not items or not all(x.fields.get(m.label) and x.fields.get(m.site) for x in items):
        return None
    y = []
    for x in items:
        value, why = parse_label(x.fields[m.label], None)
        if value is None:
            raise DataError(f"{x.name}: label {why}")
        y.append(value)
    sites = np.array([x.fields[m.site] for x in items])
    patients = np.array([x.fields.get(m.patient_id) or x.name for x in items])
    trained = training_sites(model)
    external = sorted(set(sites.tolist()) - set(trained))
    report = site_report(np.array(y), score, sites, threshold=model.metadata.threshold, patient_ids=patients, n_boot=n_boot,
                         seed=seed, external=external)
    report["training_sites"] = trained
    report["model_version"] = model.metadata.model_version
    return report


def write_site_report(report: dict[str, Any], out_csv: Path, model: CXRModel) -> tuple[Path, Path]:
    """``<stem>_sites.json`` and ``<stem>_sites.md`` next to ``out_csv``."""
    json_path, md_path = site_files(out_csv)
    meta = {"model": model.metadata.model_version, "source": model.source, "predictions": out_csv.name}
    write_json_atomic(json_path, nan_to_none({"metadata": meta, **report}))
    write_text_atomic(md_path, to_markdown(report, run_name=f"Per-site metrics of {model.metadata.model_version}", metadata=meta))
    return json_path, md_path


__all__ = ["PredictSummary", "labelled_site_report", "predict_to_csv", "site_files", "training_sites"]
