"""The export's parity checks: an ONNX graph against the torch model it was traced from.

:func:`check_parity` runs the graph in onnxruntime (:func:`load_model_bare`: CPU, no metadata
needed) and compares, on real preprocessed images:

- probabilities vs the torch model (``softmax(model(x).logits)``) on every check image: max
  absolute difference ≤ :data:`PROBABILITY_TOLERANCE`;
- the in-graph CAM vs MONAI's autograd ``GradCAM`` on the torch model
  (:func:`~cxrdebias.deploy.explain.monai_gradcam`): per-image Pearson correlation of the pixels
  ≥ :data:`CAM_MIN_CORRELATION` (two constant maps agree when they are equal);
- with a guard (:mod:`cxrdebias.deploy.guard`): the probabilities are compared with
  ``softmax(logits / T)`` and the ``ood_score`` output with the score computed outside the graph
  from the torch model's logits and pooled features (sklearn's Mahalanobis distance, or scipy's
  ``logsumexp`` for the energy): max ``|Δ| / max(1, |score|)`` ≤ :data:`OOD_TOLERANCE`;
- the dynamic batch axis: batch 1 gives the same outputs as the full batch (≤ :data:`RELOAD_TOLERANCE`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from cxrdebias.deploy.artefact import POSITIVE_INDEX
from cxrdebias.deploy.explain import monai_gradcam
from cxrdebias.deploy.onnx_metadata import INPUT_NAME, LEGACY_OUTPUT_NAMES, OUTPUT_NAMES
from cxrdebias.errors import ExportError

if TYPE_CHECKING:
    from cxrdebias.deploy.guard import Guard

#: max |p_onnx − p_torch| over every check image and class
PROBABILITY_TOLERANCE = 1e-4
#: min per-image pixel correlation between the ONNX CAM and MONAI's GradCAM
CAM_MIN_CORRELATION = 0.99
#: the final bytes (with metadata) must reproduce the verified outputs this closely
RELOAD_TOLERANCE = 1e-5
#: max |ood_onnx − ood_reference| / max(1, |ood_reference|) (float32 graph vs float64 reference)
OOD_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Tolerances:
    """What the parity checks accept (defaults: the deployment issue's numbers)."""

    probability_max_abs_diff: float = PROBABILITY_TOLERANCE
    cam_min_correlation: float = CAM_MIN_CORRELATION
    ood_max_rel_diff: float = OOD_TOLERANCE


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
    n_ood_images: int = 0
    ood_max_rel_diff: float | None = None
    temperature: float = 1.0
    passed: bool = True
    problems: list[str] = field(default_factory=list)


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


def _torch_reference(model: torch.nn.Module, batch: np.ndarray, guard: Guard | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities (``softmax(logits / T)``) and, with a guard, the OOD scores of the torch model."""
    if guard is None:
        with torch.no_grad():
            return model(torch.from_numpy(batch)).logits.float().softmax(dim=1).numpy(), None
    from cxrdebias.deploy.guard import torch_outputs

    logits, feats = torch_outputs(model, [batch])
    probs = torch.from_numpy(logits).float().div(guard.temperature).softmax(dim=1).numpy()
    return probs, guard.reference_scores(logits, feats)


def check_parity(
    model: torch.nn.Module,
    session_run,
    batches: Iterable[np.ndarray],
    cam_batch: np.ndarray,
    *,
    class_index: int = POSITIVE_INDEX,
    tolerances: Tolerances = Tolerances(),
    images: str = "",
    guard: Guard | None = None,
) -> tuple[ParityReport, np.ndarray]:
    """Compare an ONNX graph (``session_run(batch) → (probabilities, cams[, ood_scores])``) with
    the torch model (and, with ``guard``, its temperature and OOD score).

    ``batches``: preprocessed check images (probabilities and OOD scores, every image);
    ``cam_batch``: the images of the CAM check. Returns the report (``passed`` False with
    ``problems`` when a check fails) and the ONNX probabilities of ``batches`` concatenated.
    """
    model = model.cpu().float().eval()
    onnx_probs, worst, worst_ood, n_prob, sizes = [], 0.0, 0.0, 0, set()
    for batch in batches:
        p_onnx, *rest = session_run(batch)
        p_ref, ood_ref = _torch_reference(model, batch, guard)
        worst = max(worst, float(np.abs(p_onnx - p_ref).max()))
        if guard is not None:
            if not rest[1:]:
                raise ExportError("the exported graph has no ood_score output")
            ood = np.asarray(rest[1], dtype=np.float64)
            worst_ood = max(worst_ood, float((np.abs(ood - ood_ref) / np.maximum(1.0, np.abs(ood_ref))).max()))
        onnx_probs.append(p_onnx)
        n_prob += len(batch)
        sizes.add(len(batch))
    if n_prob == 0:
        raise ExportError("no images to verify the export on")
    p_cam, cam_onnx, *ood_cam = session_run(cam_batch)
    cam_ref = monai_gradcam(model, torch.from_numpy(cam_batch), class_index=class_index).numpy()
    pairs = [_correlation(a, b) for a, b in zip(cam_onnx, cam_ref, strict=True)]
    corrs = np.array([c for c, _ in pairs])
    p1, cam1, *ood1 = session_run(cam_batch[:1])
    sizes.update({1, len(cam_batch)})
    batch1 = max(float(np.abs(p1 - p_cam[:1]).max()), float(np.abs(cam1 - cam_onnx[:1]).max()),
                 *(float(np.abs(a - b[:1]).max()) for a, b in zip(ood1, ood_cam, strict=True)))
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
        n_ood_images=n_prob if guard is not None else 0,
        ood_max_rel_diff=worst_ood if guard is not None else None,
        temperature=guard.temperature if guard is not None else 1.0,
    )
    if not worst <= tolerances.probability_max_abs_diff:
        report.problems.append(
            f"probabilities differ from torch by up to {worst:.3g} (> {tolerances.probability_max_abs_diff:g}) on {n_prob} images"
        )
    if guard is not None and not worst_ood <= tolerances.ood_max_rel_diff:
        report.problems.append(
            f"ood_score differs from the reference by up to {worst_ood:.3g} relative (> {tolerances.ood_max_rel_diff:g}) on {n_prob} images"
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


def load_model_bare(graph: bytes):
    """``batch → (probabilities, cams[, ood_scores])`` of an ONNX graph without metadata (CPU
    onnxruntime; the OOD scores when the graph has that output)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own pybind error types
        raise ExportError(f"onnxruntime cannot load the exported graph ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None

    outputs = [o.name for o in session.get_outputs()]
    names = list(OUTPUT_NAMES) if outputs == list(OUTPUT_NAMES) else list(LEGACY_OUTPUT_NAMES)

    def run(batch: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(session.run(names, {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)}))

    return run


__all__ = [
    "CAM_MIN_CORRELATION",
    "OOD_TOLERANCE",
    "PROBABILITY_TOLERANCE",
    "RELOAD_TOLERANCE",
    "ParityReport",
    "Tolerances",
    "check_parity",
    "load_model_bare",
]
