"""ONNX export of a trained CXR run: one graph with probabilities and Grad-CAM, verified.

``export_run`` is ``cxrdebias export RUN --out model.onnx``:

1. load ``RUN/model.pt`` (:func:`cxrdebias.experiments.cxr.load_model_artefact`) and wrap it in
   :class:`cxrdebias.deploy.explain.GradCAMModel`, whose forward pass computes the class
   probabilities *and* the Grad-CAM of the positive class with plain tensor operations (no
   autograd: see :mod:`cxrdebias.deploy.explain` for the maths);
2. trace it with ``torch.onnx.export`` (TorchScript-based exporter, ``dynamo=False``; opset
   :data:`DEFAULT_OPSET`; dynamic batch axis) — input ``image``, outputs ``probabilities`` and
   ``cam`` (:mod:`cxrdebias.deploy.onnx_metadata`);
3. verify the graph in onnxruntime on real images — the run's own **validation** images by
   default (read and preprocessed with the code and spec the runtime uses), or the images given
   with ``check_images``:

   - probabilities vs the torch model (``softmax(model(x).logits)``) on every check image:
     max absolute difference ≤ :data:`PROBABILITY_TOLERANCE`;
   - CAM vs MONAI's autograd ``GradCAM`` on the torch model (:func:`~cxrdebias.deploy.explain.monai_gradcam`)
     on up to ``n_cam_images`` images spread over the sites: per-image Pearson correlation of
     the pixels ≥ :data:`CAM_MIN_CORRELATION` (two constant maps agree when they are equal);
   - the batch axis is dynamic: batch 1 gives the same outputs as the full batch;

4. compute per-site validation metrics from the ONNX probabilities at the saved threshold
   (when the check images are the validation split), fill ``metadata_props``
   (:data:`cxrdebias.deploy.onnx_metadata.KEYS`), reload the final bytes with
   :func:`cxrdebias.deploy.runtime.load_model` (the metadata must parse and the outputs must not move)
   and only then write ``model.onnx``, ``MODEL_CARD.md`` and a MONAI-style ``metadata.json``
   beside it.

A failing check raises :class:`~cxrdebias.errors.ExportError` naming the numbers, and nothing
is written. Existing files are never replaced without ``force``.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

import cxrdebias
from cxrdebias.data.csv_records import resolve_relative_path
from cxrdebias.data.preprocess import PreprocessSpec
from cxrdebias.deploy.explain import GradCAMModel, monai_gradcam
from cxrdebias.deploy.onnx_metadata import (
    CAM,
    FORMAT_KEY,
    FORMAT_VERSION,
    INPUT_NAME,
    OUTPUT_NAMES,
    PROBABILITIES,
    encode,
    json_safe,
)
from cxrdebias.errors import CxrDebiasError, ExportError, RunExistsError
from cxrdebias.fileio import write_bytes_atomic, write_json_atomic, write_text_atomic
from cxrdebias.training.provenance import code_version

DEFAULT_OPSET = 17
#: max |p_onnx − p_torch| over every check image and class
PROBABILITY_TOLERANCE = 1e-4
#: min per-image pixel correlation between the ONNX CAM and MONAI's GradCAM
CAM_MIN_CORRELATION = 0.99
#: the final bytes (with metadata) must reproduce the verified outputs this closely
RELOAD_TOLERANCE = 1e-5
DEFAULT_CAM_IMAGES = 16
CHECK_BATCH = 16
MODEL_CARD = "MODEL_CARD.md"
MONAI_METADATA = "metadata.json"
POSITIVE_INDEX = 1  # the pipeline's class order: negative, positive
INTENDED_USE = (
    "Research on shortcut learning (hospital/site bias) in chest X-ray COVID-19 classifiers. "
    "NOT FOR CLINICAL USE: not a medical device, not validated for diagnosis or triage."
)


@dataclass(frozen=True)
class Tolerances:
    """What the parity checks accept (defaults: the deployment issue's numbers)."""

    probability_max_abs_diff: float = PROBABILITY_TOLERANCE
    cam_min_correlation: float = CAM_MIN_CORRELATION


@dataclass
class ParityReport:
    """Numbers of the export-time checks (written into the ``export`` metadata key)."""

    images: str
    n_probability_images: int
    probability_max_abs_diff: float
    n_cam_images: int
    n_cam_constant: int
    cam_min_correlation: float
    cam_mean_correlation: float
    cam_max_abs_diff: float
    batch_sizes: list[int]
    batch1_max_abs_diff: float
    tolerances: dict[str, float]
    passed: bool = True
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_run` wrote and verified."""

    model: Path
    model_card: Path
    monai_metadata: Path
    metadata: dict[str, Any]
    parity: ParityReport
    size_bytes: int


# -- the graph ----------------------------------------------------------------------------------
def to_onnx_bytes(model: torch.nn.Module, spec: PreprocessSpec, *, class_index: int = POSITIVE_INDEX, opset: int = DEFAULT_OPSET) -> bytes:
    """The ONNX graph (no metadata) of ``GradCAMModel(model, class_index)`` for ``spec``'s input.

    Raises:
        ExportError: the model is not a pooled-feature classifier with a supported head, or
            ``opset`` < 17.
    """
    if opset < 17:
        raise ExportError(f"opset {opset}: the export needs opset >= 17")
    wrapped = GradCAMModel(model.cpu().float().eval(), class_index=class_index).eval()
    example = torch.zeros(2, *spec.output_shape)
    buf = io.BytesIO()
    batch = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        # the TorchScript-based exporter announces its deprecation; its output is verified below
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        torch.onnx.export(
            wrapped,
            (example,),
            buf,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={INPUT_NAME: batch, PROBABILITIES: batch, CAM: batch},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return buf.getvalue()


def with_metadata(graph: bytes, metadata: dict[str, Any]) -> bytes:
    """``graph`` with ``metadata_props`` set from ``metadata`` (checked by ``onnx.checker``)."""
    import onnx

    proto = onnx.load_from_string(graph)
    del proto.metadata_props[:]
    for key, value in encode(metadata).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "cxrdebias"
    proto.producer_version = cxrdebias.__version__
    proto.doc_string = f"cxrdebias chest X-ray classifier with in-graph Grad-CAM. {INTENDED_USE}"
    onnx.checker.check_model(proto)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    if not dims or not dims[0].dim_param:
        raise ExportError("the exported graph has a fixed batch size; expected a dynamic batch axis")
    return proto.SerializeToString()


# -- the checks ---------------------------------------------------------------------------------
def _correlation(a: np.ndarray, b: np.ndarray) -> tuple[float, bool]:
    """Pearson correlation of two maps and whether both are constant (then: 1 iff equal)."""
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    da, db = a - a.mean(), b - b.mean()
    na, nb = float(np.linalg.norm(da)), float(np.linalg.norm(db))
    if na < 1e-12 and nb < 1e-12:
        return (1.0 if float(np.abs(a - b).max()) <= 1e-6 else 0.0), True
    if na < 1e-12 or nb < 1e-12:
        return 0.0, False
    return float(da @ db / (na * nb)), False


def _torch_probabilities(model: torch.nn.Module, batch: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(batch)).logits.float().softmax(dim=1).numpy()


def check_parity(
    model: torch.nn.Module,
    session_run,
    batches: Iterable[np.ndarray],
    cam_batch: np.ndarray,
    *,
    class_index: int = POSITIVE_INDEX,
    tolerances: Tolerances = Tolerances(),
    images: str = "",
) -> tuple[ParityReport, np.ndarray]:
    """Compare an ONNX graph (``session_run(batch) → (probabilities, cams)``) with the torch model.

    ``batches``: preprocessed check images (probabilities, every image); ``cam_batch``: the
    images of the CAM check. Returns the report (``passed`` False with ``problems`` when a
    check fails) and the ONNX probabilities of ``batches`` concatenated.
    """
    model = model.cpu().float().eval()
    onnx_probs, worst, n_prob, sizes = [], 0.0, 0, set()
    for batch in batches:
        p_onnx, _ = session_run(batch)
        worst = max(worst, float(np.abs(p_onnx - _torch_probabilities(model, batch)).max()))
        onnx_probs.append(p_onnx)
        n_prob += len(batch)
        sizes.add(len(batch))
    if n_prob == 0:
        raise ExportError("no images to verify the export on")
    p_cam, cam_onnx = session_run(cam_batch)
    cam_ref = monai_gradcam(model, torch.from_numpy(cam_batch), class_index=class_index).numpy()
    pairs = [_correlation(a, b) for a, b in zip(cam_onnx, cam_ref, strict=True)]
    corrs = np.array([c for c, _ in pairs])
    p1, cam1 = session_run(cam_batch[:1])
    sizes.update({1, len(cam_batch)})
    batch1 = max(float(np.abs(p1 - p_cam[:1]).max()), float(np.abs(cam1 - cam_onnx[:1]).max()))
    report = ParityReport(
        images=images,
        n_probability_images=n_prob,
        probability_max_abs_diff=worst,
        n_cam_images=len(cam_batch),
        n_cam_constant=sum(const for _, const in pairs),
        cam_min_correlation=float(corrs.min()),
        cam_mean_correlation=float(corrs.mean()),
        cam_max_abs_diff=float(np.abs(cam_onnx - cam_ref).max()),
        batch_sizes=sorted(sizes),
        batch1_max_abs_diff=batch1,
        tolerances=asdict(tolerances),
    )
    if not worst <= tolerances.probability_max_abs_diff:
        report.problems.append(
            f"probabilities differ from torch by up to {worst:.3g} (> {tolerances.probability_max_abs_diff:g}) on {n_prob} images"
        )
    if not report.cam_min_correlation >= tolerances.cam_min_correlation:
        bad = int((corrs < tolerances.cam_min_correlation).sum())
        report.problems.append(
            f"Grad-CAM correlation with MONAI GradCAM is {report.cam_min_correlation:.4f} (< {tolerances.cam_min_correlation:g}) "
            f"on {bad} of {len(cam_batch)} images"
        )
    if not batch1 <= RELOAD_TOLERANCE:
        report.problems.append(f"batch 1 and batch {len(cam_batch)} outputs differ by {batch1:.3g}")
    report.passed = not report.problems
    return report, np.concatenate(onnx_probs)


# -- the check images ---------------------------------------------------------------------------
def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def validation_images(run_dir: Path, config: dict[str, Any]) -> tuple[list | None, str]:
    """The run's validation images (``runtime.InputImage`` with site/label/patient fields) and
    where they came from, or ``(None, why not)``. The manifest path is the one the run was
    trained with (relative paths: relative to the current folder, as for ``evaluate``)."""
    from cxrdebias.deploy.artefact import SPLITS_FILE
    from cxrdebias.deploy.runtime import InputImage

    splits = run_dir / SPLITS_FILE
    manifest = (config.get("data") or {}).get("manifest")
    if not splits.is_file():
        return None, f"{splits} is missing"
    if not manifest:
        return None, "the run's config names no manifest"
    manifest = Path(manifest)
    if not manifest.is_file():
        return None, f"the training manifest {manifest} is not reachable from here"
    from cxrdebias.data.cxr import load_splits

    table = load_splits(splits)
    table = table[table["split"] == "val"]
    found = []
    for row in table.itertuples(index=False):
        path, _, reason = resolve_relative_path(manifest.parent, row.path)
        if path is None:
            return None, f"validation image {row.path}: {reason}"
        found.append(InputImage(row.path, path, fields={"site": row.site, "label": row.label, "patient_id": row.patient_id}))
    if not found:
        return None, f"{splits} has no validation images"
    return found, f"validation split of {run_dir} ({len(found)} images from {manifest})"


def spread_over_sites(images: Sequence, n: int) -> list[int]:
    """Indices of up to ``n`` images taken in turn from each site (sorted), in input order."""
    by_site: dict[str, list[int]] = {}
    for i, image in enumerate(images):
        by_site.setdefault(image.fields.get("site", ""), []).append(i)
    queues = [by_site[s] for s in sorted(by_site)]
    chosen: list[int] = []
    while len(chosen) < n and any(queues):
        for q in queues:
            if q and len(chosen) < n:
                chosen.append(q.pop(0))
    return sorted(chosen)


def _prepared_batches(images: Sequence, spec: PreprocessSpec, size: int) -> Iterable[np.ndarray]:
    from cxrdebias.deploy.runtime import prepare

    for chunk in _chunks(images, size):
        yield prepare(chunk, spec)[0]  # the originals are dropped: large radiographs stay out of memory


# -- metadata -----------------------------------------------------------------------------------
def _per_site_validation(images: Sequence, positive: np.ndarray, threshold: float) -> dict[str, Any]:
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
) -> dict[str, Any]:
    """The ``metadata_props`` of an exported run (keys: :data:`cxrdebias.deploy.onnx_metadata.KEYS`).

    ``validation.recorded_at_training`` are the numbers of the training run (computed with its
    ``training_precision``, e.g. bf16 autocast); the ``overall``/``per_site`` numbers are the
    exported float32 model's, which is what a deployment gets.
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
    return {
        FORMAT_KEY: FORMAT_VERSION,
        "model_version": model_version,
        "labels": labels,
        "positive_label": labels[POSITIVE_INDEX],
        "threshold": float(art["threshold"]),
        "threshold_method": art["threshold_method"],
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
            "at_threshold": float(art["threshold"]),
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
        },
        "io": {
            "inputs": {INPUT_NAME: {"shape": ["batch", c, s, s], "dtype": "float32", "meaning": "preprocess(read_image(file), preprocessing)"}},
            "outputs": {
                PROBABILITIES: {"shape": ["batch", len(labels)], "dtype": "float32", "meaning": f"softmax over {labels}"},
                CAM: {
                    "shape": ["batch", s, s],
                    "dtype": "float32",
                    "meaning": f"Grad-CAM of {labels[POSITIVE_INDEX]!r} at the last feature map, bilinear to the input size, "
                    "scaled to [0, 1] per image, in model-input geometry",
                    "feature_map_size": list(feature_map_size),
                },
            },
        },
        "intended_use": INTENDED_USE,
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
            "image_classes": f"single channel chest X-ray, [0, 1] then (x - {spec.mean}) / {spec.std}, {spec.resize} to {s}x{s}",
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


def _fmt(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}" if isinstance(v, float) else str(v)


def model_card(meta: dict[str, Any], model_file: str) -> str:
    """``MODEL_CARD.md``: what the model is, how it was trained, validated and checked."""
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
        f"outputs `{PROBABILITIES}` ({', '.join(meta['labels'])}) and `{CAM}` (Grad-CAM of `{meta['positive_label']}`).",
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
                f"| {site} | {m['n']} | {m['n_positive']} | {_fmt(m['tpr'])} | {_fmt(m['tnr'])} | {_fmt(m['balanced_accuracy'])} | {_fmt(m['auroc'])} |"
            )
    else:
        lines.append(f"Per-site validation metrics: not available ({val.get('note')}).")
    rec = val.get("recorded_at_training") or {}
    lines += [
        "",
        "Recorded at training (precision " + str(val.get("training_precision")) + "; the table above is the exported "
        "float32 model): " + ", ".join(f"{k} {_fmt(v)}" for k, v in rec.items()) + ".",
        "",
        "## Export checks (passed before this file was written)",
        "",
        f"- Images: {checks['images']}.",
        f"- Probabilities vs torch: max |Δ| = {checks['probability_max_abs_diff']:.2e} on {checks['n_probability_images']} images "
        f"(limit {checks['tolerances']['probability_max_abs_diff']:g}).",
        f"- Grad-CAM vs MONAI `GradCAM` on the torch model: pixel correlation min {checks['cam_min_correlation']:.5f}, "
        f"mean {checks['cam_mean_correlation']:.5f} on {checks['n_cam_images']} images ({checks['n_cam_constant']} constant maps; "
        f"limit {checks['tolerances']['cam_min_correlation']:g}); max |Δ| {checks['cam_max_abs_diff']:.2e}.",
        f"- Dynamic batch: batch sizes {checks['batch_sizes']} checked.",
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


# -- the command --------------------------------------------------------------------------------
def output_paths(out: str | os.PathLike) -> tuple[Path, Path, Path]:
    """The model file and the model card and MONAI metadata written beside it."""
    out = Path(out)
    return out, out.parent / MODEL_CARD, out.parent / MONAI_METADATA


def export_run(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    check_images: Sequence[str | os.PathLike] | None = None,
    n_cam_images: int = DEFAULT_CAM_IMAGES,
    model_version: str | None = None,
    opset: int = DEFAULT_OPSET,
    tolerances: Tolerances = Tolerances(),
    force: bool = False,
) -> ExportResult:
    """Export ``RUN/model.pt`` to a verified single-file ONNX model (see the module doc).

    ``check_images``: folders/manifests/files to verify on instead of the run's validation
    split (needed when the training data is not reachable; no per-site validation metrics
    then). ``model_version`` defaults to the run folder's name.

    Raises:
        ExportError: a parity check failed (nothing written), the model cannot be exported, or
            no check images are available.
        RunExistsError: the model, ``MODEL_CARD.md`` or ``metadata.json`` exists and not ``force``.
        CheckpointError / DataError: unreadable run or check images.
    """
    from cxrdebias.deploy.artefact import load_model_artefact
    from cxrdebias.deploy.runtime import collect_inputs, load_model, prepare
    from cxrdebias.training.runs import RunDir

    run_path = Path(run_dir)
    targets = output_paths(out)
    if targets[0].is_dir():
        raise ExportError(f"{targets[0]}: is a folder; --out takes the model file name (e.g. model.onnx)")
    existing = [str(p) for p in targets if p.exists()]
    if existing and not force:
        raise RunExistsError(f"{', '.join(existing)}: already exist(s); pass --force to overwrite")
    if n_cam_images < 1:
        raise ExportError(f"n_cam_images must be >= 1, got {n_cam_images}")
    model, art = load_model_artefact(run_path)
    spec = PreprocessSpec.model_validate(art["preprocess"])
    if check_images:
        images, source, is_val = collect_inputs(check_images), f"{len(check_images)} user-given input(s)", False
    else:
        try:
            config = RunDir(run_path).read_config()
        except CxrDebiasError as exc:
            raise ExportError(f"{run_path}: cannot find the validation images to verify the export ({exc})") from None
        images, source = validation_images(run_path, config)
        if images is None:
            raise ExportError(f"{run_path}: cannot verify the export on the validation images: {source}; pass --check-images FOLDER_OR_MANIFEST")
        is_val = True
    cam_batch = prepare([images[i] for i in spread_over_sites(images, n_cam_images)], spec)[0]

    graph = to_onnx_bytes(model, spec, class_index=POSITIVE_INDEX, opset=opset)
    bare = load_model_bare(graph)
    parity, probs = check_parity(
        model, bare, _prepared_batches(images, spec, CHECK_BATCH), cam_batch, tolerances=tolerances, images=source
    )
    if not parity.passed:
        raise ExportError(f"refusing to write {targets[0]}: " + "; ".join(parity.problems))
    validation = _per_site_validation(images, probs[:, POSITIVE_INDEX], float(art["threshold"])) if is_val else None
    with torch.no_grad():
        fmap = tuple(model.feature_map(torch.zeros(1, *spec.output_shape)).shape[-2:])
    meta = build_metadata(
        art,
        run_path,
        model_version=model_version or run_path.resolve().name,
        parity=parity,
        validation=validation,
        opset=opset,
        feature_map_size=fmap,
    )
    final = with_metadata(graph, meta)
    # the bytes that are written must load in the runtime and reproduce the verified outputs
    deployed = load_model(final, device="cpu")
    p_final, cam_final = deployed.run(cam_batch)
    p_ref, cam_ref = bare(cam_batch)
    moved = max(float(np.abs(p_final - p_ref).max()), float(np.abs(cam_final - cam_ref).max()))
    if moved > RELOAD_TOLERANCE:
        raise ExportError(f"refusing to write {targets[0]}: the model with metadata gives outputs {moved:.3g} away from the verified ones")
    write_bytes_atomic(targets[0], final)
    write_text_atomic(targets[1], model_card(meta, targets[0].name))
    write_json_atomic(targets[2], monai_metadata(meta))
    _shareable(targets)
    return ExportResult(targets[0], targets[1], targets[2], meta, parity, len(final))


def _shareable(paths: Iterable[Path]) -> None:
    """Give the written files the permissions of a normal new file (the atomic writer's
    temporary files are private, 0600): a deployed model is meant to be read by others."""
    mask = os.umask(0)
    os.umask(mask)
    for path in paths:
        os.chmod(path, 0o666 & ~mask)


def load_model_bare(graph: bytes):
    """``batch → (probabilities, cams)`` of an ONNX graph without metadata (CPU onnxruntime)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own pybind error types
        raise ExportError(f"onnxruntime cannot load the exported graph ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, cams = session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})
        return probs, cams

    return run


__all__ = [
    "CAM_MIN_CORRELATION",
    "DEFAULT_OPSET",
    "PROBABILITY_TOLERANCE",
    "ExportResult",
    "ParityReport",
    "Tolerances",
    "check_parity",
    "export_run",
    "model_card",
    "monai_metadata",
    "to_onnx_bytes",
    "with_metadata",
]
