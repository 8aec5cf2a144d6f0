"""What an exported model says about itself: its ``metadata_props``, ``MODEL_CARD.md`` and a
MONAI-style ``metadata.json``.

:func:`build_metadata` fills the ONNX metadata (keys: :data:`cxrdebias.deploy.onnx_metadata.KEYS`)
from the run's model artefact, the parity checks (:mod:`cxrdebias.deploy.parity`) and the per-site
validation numbers of the exported model (:func:`per_site_validation`); :func:`model_card` and
:func:`monai_metadata` are written from that metadata beside the model by
:func:`cxrdebias.deploy.export.export_run`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import cxrdebias
from cxrdebias.data.preprocess import PreprocessSpec
from cxrdebias.deploy.artefact import POSITIVE_INDEX
from cxrdebias.deploy.onnx_metadata import (
    CAM,
    FORMAT_KEY,
    FORMAT_VERSION,
    INPUT_NAME,
    OOD_SCORE,
    PROBABILITIES,
    encode,
    format_metric,
    json_safe,
)
from cxrdebias.deploy.parity import ParityReport
from cxrdebias.evaluation.calibration import threshold_at_temperature

if TYPE_CHECKING:
    from cxrdebias.deploy.guard import Guard
from cxrdebias.training.provenance import code_version

INTENDED_USE = (
    "Research on shortcut learning (hospital/site bias) in chest X-ray COVID-19 classifiers. "
    "NOT FOR CLINICAL USE: not a medical device, not validated for diagnosis or triage."
)


# -- metadata -----------------------------------------------------------------------------------
def per_site_validation(images: Sequence, positive: np.ndarray, threshold: float) -> dict[str, Any]:
    """Point estimates (no bootstrap) of the overall and per-site metrics at ``threshold``:
    ``images`` carry ``label``/``site``/``patient_id`` fields, ``positive`` is their positive-class
    probability."""
    from cxrdebias.evaluation.site_report import site_report

    y = np.array([int(x.fields["label"]) for x in images])
    sites = np.array([x.fields["site"] for x in images])
    patients = np.array([x.fields["patient_id"] for x in images])
    rep = site_report(y, positive, sites, threshold=threshold, patient_ids=patients, n_boot=0)

    def point(entry: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in entry.items() if k not in ("ci", "n_valid_boot")}

    return {
        "overall": point(rep["overall"]),
        "per_site": {s: point(e) for s, e in rep["by_group"].items()},
        "worst_site": rep["worst_site"],
        "difference": point(rep["difference"]),
    }


def build_metadata(
    art: dict[str, Any],
    run_dir: Path,
    *,
    model_version: str,
    parity: ParityReport,
    validation: dict[str, Any] | None,
    opset: int,
    feature_map_size: Sequence[int],
    guard: Guard | None = None,
    guard_note: str | None = None,
) -> dict[str, Any]:
    """The ``metadata_props`` of an exported run (keys: :data:`cxrdebias.deploy.onnx_metadata.KEYS`).

    ``validation.recorded_at_training`` are the numbers of the training run (computed with its
    ``training_precision``, e.g. bf16 autocast); the ``overall``/``per_site`` numbers are the
    exported float32 model's, which is what a deployment gets. With ``guard`` the probabilities
    are ``softmax(logits / T)`` and ``threshold`` is the saved one mapped onto them (same
    decisions); the guard's keys (``temperature``, ``ood_threshold``, ``ood_method``) are written,
    otherwise ``guard_note`` says why there is none.
    """
    import onnx
    import onnxruntime

    from cxrdebias.training.runs import RESULTS_FILE

    try:
        training_precision = json.loads((run_dir / RESULTS_FILE).read_text())["train"]["precision"]
    except (OSError, ValueError, KeyError, TypeError):
        training_precision = None

    spec = PreprocessSpec.model_validate(art["preprocess"])
    labels = list(art["class_names"])
    c, s = spec.channels, spec.image_size
    training_sites = sorted(art["site_to_index"], key=art["site_to_index"].get)
    threshold = float(art["threshold"]) if guard is None else threshold_at_temperature(float(art["threshold"]), guard.temperature)
    outputs: dict[str, Any] = {
        PROBABILITIES: {"shape": ["batch", len(labels)], "dtype": "float32",
                        "meaning": f"softmax(logits / temperature) over {labels}" if guard else f"softmax over {labels}"},
        CAM: {
            "shape": ["batch", s, s],
            "dtype": "float32",
            "meaning": f"Grad-CAM of {labels[POSITIVE_INDEX]!r} at the last feature map, bilinear to the input size, "
            "scaled to [0, 1] per image, in model-input geometry",
            "feature_map_size": list(feature_map_size),
        },
    }
    guard_keys: dict[str, Any] = {"temperature": 1.0, "training_sites": training_sites}
    if guard is not None:
        outputs[OOD_SCORE] = {"shape": ["batch"], "dtype": "float32", "meaning": guard.details["description"] +
                              "; out of distribution when above ood_threshold"}
        guard_keys |= {"temperature": guard.temperature, "ood_threshold": guard.threshold, "ood_method": guard.method}
    return {
        FORMAT_KEY: FORMAT_VERSION,
        "model_version": model_version,
        "labels": labels,
        "positive_label": labels[POSITIVE_INDEX],
        "threshold": threshold,
        "threshold_method": art["threshold_method"] + (
            f"; {float(art['threshold']):.6g} on softmax(logits), mapped to softmax(logits / T)" if guard is not None else ""
        ),
        "preprocessing": spec.model_dump(mode="json"),
        "method": art["method"],
        "bias": art["bias"],
        "sites": {
            "names": sorted(art["site_to_index"], key=art["site_to_index"].get),
            "site_to_index": art["site_to_index"],
            "source": art.get("site_source"),
        },
        "validation": {
            "selection": art.get("selection"),
            "selected_epoch": art.get("selected_epoch"),
            "recorded_at_training": art.get("val_metrics"),
            "training_precision": training_precision,
            "at_threshold": threshold,
            **(
                {"computed_with": "the exported ONNX model on the run's validation split", **validation}
                if validation is not None
                else {"per_site": None, "note": "export verified on other images; the run's validation images were not available"}
            ),
        },
        "data_hash": art.get("data_hash"),
        "code_version": {"training": art.get("code_version"), "export": code_version()},
        "export": {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source_run": str(run_dir),
            "trained": art.get("created"),
            "exporter": "torch.onnx.export (TorchScript-based, dynamo=False)",
            "opset": opset,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "checks": asdict(parity),
            "guard": guard.details if guard is not None else {"absent": guard_note},
        },
        "io": {
            "inputs": {INPUT_NAME: {"shape": ["batch", c, s, s], "dtype": "float32", "meaning": "preprocess(read_image(file), preprocessing)"}},
            "outputs": outputs,
        },
        "intended_use": INTENDED_USE,
        **guard_keys,
    }


def monai_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """A MONAI bundle ``metadata.json`` (MONAI Bundle specification) for the exported model."""
    import monai

    spec = PreprocessSpec.model_validate(meta["preprocessing"])
    s, labels = spec.image_size, meta["labels"]
    lo, hi = (0.0 - spec.mean) / spec.std, (1.0 - spec.mean) / spec.std
    val = meta["validation"]
    return json_safe(
        {
            "version": meta["model_version"],
            "changelog": {meta["model_version"]: f"exported from {meta['export']['source_run']}"},
            "monai_version": monai.__version__,
            "pytorch_version": torch.__version__.split("+")[0],
            "numpy_version": np.__version__,
            "optional_packages_version": {"onnxruntime": meta["export"]["onnxruntime"], "cxrdebias": cxrdebias.__version__},
            "task": "COVID-19 classification of chest X-rays, debiased against the acquisition site",
            "description": f"DenseNet-121 trained with method {meta['method']['name']!r} (bias: {meta['bias']}); "
            "ONNX graph with class probabilities and an in-graph Grad-CAM map",
            "authors": "cxrdebias developers",
            "copyright": "Copyright (c) cxrdebias developers",
            "data_source": f"training data sha256 {meta['data_hash']}; sites {', '.join(meta['sites']['names'])}",
            "data_type": "dicom, png, jpeg",
            "image_classes": f"single channel chest X-ray, [0, 1], {spec.resize} to {s}x{s}"
                            + (", histogram-equalised (empirical CDF)" if spec.equalize else "") + f", then (x - {spec.mean}) / {spec.std}",
            "label_classes": f"0 = {labels[0]}, 1 = {labels[1]}",
            "pred_classes": f"{len(labels)} probabilities: " + ", ".join(f"channel {i} is {x}" for i, x in enumerate(labels)),
            "eval_metrics": {k: v for k, v in (val.get("overall") or val.get("recorded_at_training") or {}).items() if isinstance(v, float)},
            "intended_use": meta["intended_use"],
            "references": [
                "Tartaglione E., Barbano C.A., Grangetto M. EnD: Entangling and Disentangling deep representations for bias correction. CVPR 2021.",
                "Selvaraju R.R. et al. Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization. ICCV 2017.",
            ],
            "network_data_format": {
                "inputs": {
                    INPUT_NAME: {
                        "type": "image",
                        "format": "magnitude",
                        "modality": "xray",
                        "num_channels": spec.channels,
                        "spatial_shape": [s, s],
                        "dtype": "float32",
                        "value_range": [lo, hi],
                        "is_patch_data": False,
                        "channel_def": {str(i): "image" for i in range(spec.channels)},
                    }
                },
                "outputs": {
                    PROBABILITIES: {
                        "type": "probabilities",
                        "format": "classes",
                        "num_channels": len(labels),
                        "spatial_shape": [1],
                        "dtype": "float32",
                        "value_range": [0, 1],
                        "is_patch_data": False,
                        "channel_def": {str(i): x for i, x in enumerate(labels)},
                    },
                    CAM: {
                        "type": "image",
                        "format": "gradient",
                        "modality": "xray",
                        "num_channels": 1,
                        "spatial_shape": [s, s],
                        "dtype": "float32",
                        "value_range": [0, 1],
                        "is_patch_data": False,
                        "channel_def": {"0": f"Grad-CAM of {meta['positive_label']}"},
                    },
                },
            },
            "cxrdebias": {"onnx_metadata_props": sorted(encode(meta)), "threshold": meta["threshold"]},
        }
    )


def _code(v: dict[str, Any] | None) -> str:
    if not v:
        return "unknown"
    commit = (v.get("git_commit") or "no git")[:12]
    return f"cxrdebias {v.get('package')} ({commit}{', local changes' if v.get('git_dirty') else ''})"


def _guard_lines(meta: dict[str, Any]) -> list[str]:
    """The model card's calibration and out-of-distribution section."""
    guard = meta["export"].get("guard") or {}
    if meta.get("ood_threshold") is None:
        return ["## Calibration and out-of-distribution guard", "", f"None in this model ({guard.get('absent')}).", ""]
    temp = guard["temperature"]
    return [
        "## Calibration and out-of-distribution guard",
        "",
        f"- Probabilities are `softmax(logits / T)` with **T = {meta['temperature']:.4f}** ({temp['fitted_on']}; "
        f"validation NLL {temp['nll_before']:.4f} → {temp['nll_after']:.4f})."
        + (f" **Warning: {temp['warning']}.**" if temp.get("warning") else ""),
        f"- `{OOD_SCORE}`: {guard['description']}; statistics from the {guard['statistics_from']}.",
        f"- An image is **out of distribution** when `{OOD_SCORE}` > **{meta['ood_threshold']:.4g}** ({guard['threshold_rule']}; "
        f"{guard['validation_flagged']:.1%} of the validation images are above it). Do not trust the prediction of a flagged image.",
        "",
    ]


def _test_lines(test_report: dict[str, Any] | None, note: str | None) -> list[str]:
    """The test split's per-site results with intervals and calibration (``cxrdebias evaluate``'s
    report of this model), headings demoted under the card's."""
    from cxrdebias.evaluation.report import to_markdown

    lines = ["## Test split (`cxrdebias evaluate`)", ""]
    if test_report is None:
        return [*lines, f"Not included: {note or 'no test report'}.", ""]
    body = to_markdown(test_report).splitlines()[2:]  # without its own title
    lines += [f"From {note}: split `{test_report.get('split')}` of `{test_report.get('source')}`, the decision rule above "
              "(on the model's own scores before temperature scaling, which gives the same decisions).", ""]  # fmt: skip
    lines += [("##" + line[1:]) if line.startswith("#") else line for line in body]
    return [*lines, ""]


def _how_to_use(model_file: str) -> list[str]:
    return [
        "## How to use",
        "",
        "```bash",
        f"cxrdebias predict IMAGES_OR_FOLDER_OR_MANIFEST --model {model_file} --out predictions.csv",
        f"cxrdebias predict labelled_manifest.csv --model {model_file} --out predictions.csv   # + per-site metrics; sites not in training marked external",
        f"cxrdebias view --model {model_file} --data IMAGES_OR_FOLDER_OR_MANIFEST   # worklist, Grad-CAM overlay, out-of-distribution badges",
        "```",
        "",
        "Read a prediction only together with `in_distribution`: a flagged image is unlike the training data and its "
        "probability means nothing. The Grad-CAM shows where the evidence for the positive class lies, not a finding.",
        "",
    ]


def model_card(meta: dict[str, Any], model_file: str, *, test_report: dict[str, Any] | None = None, test_note: str | None = None) -> str:
    """``MODEL_CARD.md``: what the model is, how it was trained, validated and checked; with
    ``test_report`` (the run's ``eval/report.json`` of this model) its test-split results, else
    ``test_note`` says why they are missing."""
    val, checks, spec = meta["validation"], meta["export"]["checks"], meta["preprocessing"]
    fh, fw = meta["io"]["outputs"][CAM]["feature_map_size"]
    method = ", ".join(f"{k}={v}" for k, v in meta["method"].items() if k != "name") or "no options"
    lines = [
        f"# Model card: {meta['model_version']}",
        "",
        f"**{meta['intended_use']}**",
        "",
        "## Model",
        "",
        f"- File: `{model_file}` (ONNX opset {meta['export']['opset']}, dynamic batch); input `{INPUT_NAME}`, "
        f"outputs `{PROBABILITIES}` ({', '.join(meta['labels'])}), `{CAM}` (Grad-CAM of `{meta['positive_label']}`)"
        + (f" and `{OOD_SCORE}` (distance from the training data)." if OOD_SCORE in meta["io"]["outputs"] else "."),
        f"- Architecture: DenseNet-121, one input channel, {spec['image_size']}×{spec['image_size']} input.",
        f"- Debiasing method: `{meta['method']['name']}` ({method}); bias label given to the method: `{meta['bias']}`.",
        f"- Sites seen in training: {', '.join(meta['sites']['names'])} (site read from: {meta['sites']['source']}).",
        f"- Training data SHA-256: `{meta['data_hash']}`.",
        f"- Code: trained with {_code(meta['code_version']['training'])}, exported with {_code(meta['code_version']['export'])}.",
        "",
        "## Decision rule",
        "",
        f"`{meta['positive_label']}` when its probability ≥ **{meta['threshold']:.4f}** ({meta['threshold_method']}).",
        "",
        *_guard_lines(meta),
        "## Preprocessing (stored in the model; `cxrdebias predict` applies it)",
        "",
        "```json",
        json.dumps(spec, indent=2),
        "```",
        "",
        "## Validation",
        "",
        f"Model selection: {val.get('selection')} (epoch {val.get('selected_epoch')}). The threshold was chosen on the "
        "same validation split, so these numbers are optimistic; the test-split report is `cxrdebias evaluate RUN`.",
        "",
    ]
    if val.get("per_site"):
        lines += ["| site | images | positive | TPR | TNR | balanced accuracy | AUROC |", "|---|---:|---:|---:|---:|---:|---:|"]
        rows = [*val["per_site"].items(), ("all", val["overall"])]
        for site, m in rows:
            lines.append(
                f"| {site} | {m['n']} | {m['n_positive']} | {format_metric(m['tpr'])} | {format_metric(m['tnr'])} | {format_metric(m['balanced_accuracy'])} | {format_metric(m['auroc'])} |"
            )
    else:
        lines.append(f"Per-site validation metrics: not available ({val.get('note')}).")
    rec = val.get("recorded_at_training") or {}
    lines += [
        "",
        "Recorded at training (precision " + str(val.get("training_precision")) + "; the table above is the exported "
        "float32 model): " + ", ".join(f"{k} {format_metric(v)}" for k, v in rec.items()) + ".",
        "",
        *_test_lines(test_report, test_note),
        *_how_to_use(model_file),
        "## Export checks (passed before this file was written)",
        "",
        f"- Images: {checks['images']}.",
        f"- Probabilities vs torch: max |Δ| = {checks['probability_max_abs_diff']:.2e} on {checks['n_probability_images']} images "
        f"(limit {checks['tolerances']['probability_max_abs_diff']:g}).",
        f"- Grad-CAM vs MONAI `GradCAM` on the torch model: pixel correlation min {checks['cam_min_correlation']:.5f}, "
        f"mean {checks['cam_mean_correlation']:.5f} on {checks['n_cam_images']} images ({checks['n_cam_constant']} constant maps; "
        f"limit {checks['tolerances']['cam_min_correlation']:g}); max |Δ| {checks['cam_max_abs_diff']:.2e}.",
        f"- Dynamic batch: batch sizes {checks['batch_sizes']} checked.",
        *(
            [f"- `{OOD_SCORE}` vs the reference computed outside the graph: max relative |Δ| = {checks['ood_max_rel_diff']:.2e} "
             f"on {checks['n_ood_images']} images (limit {checks['tolerances']['ood_max_rel_diff']:g})."]
            if checks.get("ood_max_rel_diff") is not None
            else []
        ),
        "",
        "## Limitations",
        "",
        "- Trained on the sites above only; performance at other hospitals, scanners or views is unknown.",
        f"- The Grad-CAM is computed at the last feature map ({fh}×{fw} for this input size) "
        "and upsampled: it is coarse, shows where the evidence for the positive class lies, and is not a segmentation.",
        "- Inputs are read with `cxrdebias.data.images.read_image` (DICOM windowing, MONOCHROME1 inversion); other readers "
        "may give different pixels.",
        "",
    ]
    return "\n".join(lines)



__all__ = ["INTENDED_USE", "build_metadata", "model_card", "monai_metadata", "per_site_validation"]
