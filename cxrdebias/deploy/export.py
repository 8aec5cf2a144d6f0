"""ONNX export of a trained CXR run: one graph with probabilities and Grad-CAM, verified.

``export_run`` is ``cxrdebias export RUN --out model.onnx``:

1. load ``RUN/model.pt`` (:func:`cxrdebias.deploy.artefact.load_model_artefact`) and wrap it in
   :class:`cxrdebias.deploy.explain.GradCAMModel`, whose forward pass computes the class
   probabilities *and* the Grad-CAM of the positive class with plain tensor operations (no
   autograd: see :mod:`cxrdebias.deploy.explain` for the maths);
2. trace it with ``torch.onnx.export`` (TorchScript-based exporter, ``dynamo=False``; opset
   :data:`DEFAULT_OPSET`; dynamic batch axis) — input ``image``, outputs ``probabilities`` and
   ``cam`` (:mod:`cxrdebias.deploy.onnx_metadata`);
3. verify the graph in onnxruntime on real images (:mod:`cxrdebias.deploy.parity`) — the run's
   own **validation** images by default (read and preprocessed with the code and spec the
   runtime uses), or the images given with ``check_images``:

   - probabilities vs the torch model (``softmax(model(x).logits)``) on every check image:
     max absolute difference ≤ :data:`PROBABILITY_TOLERANCE`;
   - CAM vs MONAI's autograd ``GradCAM`` on the torch model (:func:`~cxrdebias.deploy.explain.monai_gradcam`)
     on up to ``n_cam_images`` images spread over the sites: per-image Pearson correlation of
     the pixels ≥ :data:`CAM_MIN_CORRELATION` (two constant maps agree when they are equal);
   - the batch axis is dynamic: batch 1 gives the same outputs as the full batch;

4. compute per-site validation metrics from the ONNX probabilities at the saved threshold
   (when the check images are the validation split), fill ``metadata_props``
   (:data:`cxrdebias.deploy.onnx_metadata.KEYS`; :mod:`cxrdebias.deploy.model_card`), reload the final bytes with
   :func:`cxrdebias.deploy.runtime.load_model` (the metadata must parse and the outputs must not move)
   and only then write ``model.onnx``, ``MODEL_CARD.md`` and a MONAI-style ``metadata.json``
   beside it.

A failing check raises :class:`~cxrdebias.errors.ExportError` naming the numbers, and nothing
is written. Existing files are never replaced without ``force``.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import cxrdebias
from cxrdebias.data.csv_records import resolve_relative_path
from cxrdebias.data.preprocess import PreprocessSpec
from cxrdebias.deploy.artefact import MODEL_FILE, POSITIVE_INDEX, SPLITS_FILE, load_model_artefact
from cxrdebias.deploy.explain import GradCAMModel
from cxrdebias.deploy.guard import (
    DEFAULT_LAYER,
    Guard,
    GuardedModel,
    fit_guard,
    layer_module,
    torch_outputs,
)
from cxrdebias.deploy.model_card import (
    INTENDED_USE,
    build_metadata,
    model_card,
    monai_metadata,
    per_site_validation,
)
from cxrdebias.deploy.onnx_metadata import INPUT_NAME, LEGACY_OUTPUT_NAMES, OUTPUT_NAMES, encode
from cxrdebias.deploy.parity import (
    RELOAD_TOLERANCE,
    ParityReport,
    Tolerances,
    check_parity,
    load_model_bare,
)
from cxrdebias.errors import CxrDebiasError, DataError, ExportError, RunExistsError
from cxrdebias.evaluation.calibration import threshold_at_temperature
from cxrdebias.evaluation.ood import DEFAULT_METHOD, DEFAULT_PERCENTILE
from cxrdebias.fileio import (
    read_json_file,
    sha256_files,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)

DEFAULT_OPSET = 17
DEFAULT_CAM_IMAGES = 16
CHECK_BATCH = 16
MODEL_CARD = "MODEL_CARD.md"
MONAI_METADATA = "metadata.json"


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
def to_onnx_bytes(
    model: torch.nn.Module, spec: PreprocessSpec, *, class_index: int = POSITIVE_INDEX, opset: int = DEFAULT_OPSET, guard: Guard | None = None
) -> bytes:
    """The ONNX graph (no metadata) of ``GradCAMModel(model, class_index)`` for ``spec``'s input;
    with ``guard``, of :class:`~cxrdebias.deploy.guard.GuardedModel` (temperature-scaled
    probabilities and the third output ``ood_score``).

    Raises:
        ExportError: the model is not a pooled-feature classifier with a supported head, or
            ``opset`` < 17.
    """
    if opset < 17:
        raise ExportError(f"opset {opset}: the export needs opset >= 17")
    model = model.cpu().float().eval()
    wrapped = (GradCAMModel(model, class_index=class_index) if guard is None else GuardedModel(model, guard, class_index=class_index)).eval()
    names = list(OUTPUT_NAMES if guard is not None else LEGACY_OUTPUT_NAMES)
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
            output_names=names,
            dynamic_axes={INPUT_NAME: batch, **dict.fromkeys(names, batch)},
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


# -- the check images ---------------------------------------------------------------------------
def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def validation_images(run_dir: Path, config: dict[str, Any], split: str = "val") -> tuple[list | None, str]:
    """The run's validation images (or those of another ``split``: ``train``) as
    ``runtime.InputImage`` with site/label/patient fields, and where they came from, or
    ``(None, why not)``. The manifest path is the config's (pass
    :meth:`~cxrdebias.training.runs.RunDir.read_config_located`: found from any folder and
    after the run moved with its data, as for ``evaluate``); its
    symbolic links may lead out of the manifest's folder when the run allowed it
    (``data.allow_links_outside``)."""
    from cxrdebias.deploy.runtime import InputImage

    splits = run_dir / SPLITS_FILE
    data = config.get("data")
    manifest = data.get("manifest") if isinstance(data, dict) else None
    allow_outside = isinstance(data, dict) and data.get("allow_links_outside") is True
    if not splits.is_file():
        return None, f"{splits} is missing"
    if not manifest or not isinstance(manifest, str):
        return None, "the run's config names no manifest"
    manifest = Path(manifest)
    if not manifest.is_file():
        return None, f"the training manifest {manifest} is not reachable from here"
    from cxrdebias.data.cxr.manifest import MANIFEST
    from cxrdebias.data.cxr.splits import load_splits

    table = load_splits(splits)
    table = table[table[MANIFEST.split] == split]
    what = {"val": "validation", "train": "training"}.get(split, split)
    found = []
    for row in table.itertuples(index=False):
        rel = getattr(row, MANIFEST.path)
        path, _, reason = resolve_relative_path(manifest.parent, rel, allow_links_outside=allow_outside)
        if path is None:
            return None, f"{what} image {rel}: {reason}"
        found.append(InputImage(rel, path, fields={c: getattr(row, c) for c in MANIFEST.sample_fields}))
    if not found:
        return None, f"{splits} has no {what} images"
    return found, f"{what} split of {run_dir} ({len(found)} images from {manifest})"


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
    ood_method: str = DEFAULT_METHOD,
    ood_layer: str = DEFAULT_LAYER,
    ood_percentile: float = DEFAULT_PERCENTILE,
) -> ExportResult:
    """Export ``RUN/model.pt`` to a verified single-file ONNX model (see the module doc).

    ``check_images``: folders/manifests/files to verify on instead of the run's validation
    split (needed when the training data is not reachable; no per-site validation metrics
    then). ``model_version`` defaults to the run folder's name. The guard (temperature and
    ``ood_score``, :mod:`cxrdebias.deploy.guard`) is fitted on the run's training and validation
    splits (``ood_method``; ``ood_layer``: the probe layer whose pooled output the Mahalanobis
    score reads, or ``bottleneck``; threshold: the ``ood_percentile``-th percentile of the validation
    scores); when they are not reachable the model is written without it (two outputs,
    temperature 1) and the metadata say why.

    Raises:
        ExportError: a parity check failed (nothing written), the model cannot be exported, or
            no check images are available.
        RunExistsError: the model, ``MODEL_CARD.md`` or ``metadata.json`` exists and not ``force``.
        CheckpointError / DataError: unreadable run or check images.
    """
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
    try:
        config: dict[str, Any] | None = RunDir(run_path).read_config_located()
    except CxrDebiasError as exc:
        config, why = None, f"cannot find the run's images ({exc})"
    val_images, val_source = validation_images(run_path, config) if config is not None else (None, why)
    if check_images:
        images, source, is_val = collect_inputs(check_images), f"{len(check_images)} user-given input(s)", False
    else:
        if val_images is None:
            raise ExportError(f"{run_path}: cannot verify the export on the validation images: {val_source}; pass --check-images FOLDER_OR_MANIFEST")
        images, source, is_val = val_images, val_source, True
    cam_batch = prepare([images[i] for i in spread_over_sites(images, n_cam_images)], spec)[0]
    guard, guard_note = _fit_guard(model, spec, run_path, config, val_images, val_source, ood_method, ood_layer, ood_percentile)

    graph = to_onnx_bytes(model, spec, class_index=POSITIVE_INDEX, opset=opset, guard=guard)
    bare = load_model_bare(graph)
    parity, probs = check_parity(
        model, bare, _prepared_batches(images, spec, CHECK_BATCH), cam_batch, tolerances=tolerances, images=source, guard=guard
    )
    if not parity.passed:
        raise ExportError(f"refusing to write {targets[0]}: " + "; ".join(parity.problems))
    # T rescales the logit: the threshold on softmax(logits / T) that makes the same decisions
    threshold = float(art["threshold"]) if guard is None else threshold_at_temperature(float(art["threshold"]), guard.temperature)
    validation = per_site_validation(images, probs[:, POSITIVE_INDEX], threshold) if is_val else None
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
        guard=guard,
        guard_note=guard_note,
    )
    final = with_metadata(graph, meta)
    # the bytes that are written must load in the runtime and reproduce the verified outputs
    deployed = load_model(final, device="cpu")
    got, want = deployed.run_all(cam_batch), bare(cam_batch)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(got, want, strict=False) if a is not None)
    if moved > RELOAD_TOLERANCE or (got[2] is None) != (guard is None):
        raise ExportError(f"refusing to write {targets[0]}: the model with metadata gives outputs {moved:.3g} away from the verified ones")
    test_report, test_note = run_test_report(run_path)
    write_bytes_atomic(targets[0], final)
    write_text_atomic(targets[1], model_card(meta, targets[0].name, test_report=test_report, test_note=test_note))
    write_json_atomic(targets[2], monai_metadata(meta))
    return ExportResult(targets[0], targets[1], targets[2], meta, parity, len(final))


#: the report ``cxrdebias evaluate RUN`` writes by default
TEST_REPORT = Path("eval") / "report.json"
TEST_REPORT_MAX_BYTES = 32 * 1024 * 1024


def run_test_report(run_path: Path) -> tuple[dict[str, Any] | None, str]:
    """The run's ``eval/report.json`` when it is a report of this very ``model.pt`` (its
    ``model_sha256``), for the model card; otherwise ``None`` and why it is left out."""
    path = run_path / TEST_REPORT
    hint = f"run `cxrdebias evaluate {run_path} --per-institution` before exporting"
    if not path.is_file():
        return None, f"no {TEST_REPORT.as_posix()} in the run; {hint}"
    try:
        report = read_json_file(path, TEST_REPORT_MAX_BYTES)
    except DataError as exc:
        return None, str(exc)
    if not isinstance(report, dict) or "by_group" not in report or "sites" not in report:
        return None, f"{path}: not a report of `cxrdebias evaluate`"
    recorded = report.get("model_sha256")
    if recorded is None:
        return None, f"{path} does not say which model it is of (written by an older cxrdebias); {hint}"
    if recorded != sha256_files([run_path / MODEL_FILE]):
        return None, f"{path} is of another model.pt (the run was trained again after it); {hint}"
    return report, f"{TEST_REPORT.as_posix()} of this model.pt"


def _fit_guard(
    model: torch.nn.Module,
    spec: PreprocessSpec,
    run_path: Path,
    config: dict[str, Any] | None,
    val_images: list | None,
    val_source: str,
    method: str,
    layer: str,
    percentile: float,
) -> tuple[Guard | None, str | None]:
    """The guard fitted on the run's training/validation images, or ``(None, why not)``."""
    module = layer_module(model, layer) if method == "mahalanobis" else None
    if val_images is None:
        return None, f"no OOD score and no temperature: {val_source}"
    assert config is not None
    train_images, train_source = validation_images(run_path, config, split="train")
    if train_images is None:
        return None, f"no OOD score and no temperature: {train_source}"

    def outputs(images: list) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        logits, feats = torch_outputs(model, _prepared_batches(images, spec, CHECK_BATCH))
        return logits, feats, np.array([int(x.fields["label"]) for x in images])

    return fit_guard(outputs(train_images), outputs(val_images), method=method, layer=layer, module=module, percentile=percentile), None


__all__ = [
    "CHECK_BATCH",
    "DEFAULT_CAM_IMAGES",
    "DEFAULT_OPSET",
    "MODEL_CARD",
    "MONAI_METADATA",
    "ExportResult",
    "Tolerances",  # defined in deploy.parity; export_run takes it
    "export_run",
    "output_paths",
    "spread_over_sites",
    "to_onnx_bytes",
    "validation_images",
    "with_metadata",
]
