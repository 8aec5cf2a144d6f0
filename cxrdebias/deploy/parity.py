"""The export's parity checks: an ONNX graph against the torch model it was traced from.

:func:`check_parity` runs the graph in onnxruntime (:func:`load_model_bare`: CPU, no metadata
needed) and compares, on real preprocessed images:

- probabilities vs the torch model (``softmax(model(x).logits)``) on every check image: max
  absolute difference ≤ :data:`PROBABILITY_TOLERANCE`;
- the in-graph CAM vs MONAI's autograd ``GradCAM`` on the torch model
  (:func:`~cxrdebias.deploy.explain.monai_gradcam`): per-image Pearson correlation of the pixels
  ≥ :data:`CAM_MIN_CORRELATION` (two constant maps agree when they are equal);
- the dynamic batch axis: batch 1 gives the same outputs as the full batch (≤ :data:`RELOAD_TOLERANCE`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from cxrdebias.deploy.artefact import POSITIVE_INDEX
from cxrdebias.deploy.explain import monai_gradcam
from cxrdebias.deploy.onnx_metadata import INPUT_NAME, OUTPUT_NAMES
from cxrdebias.errors import ExportError

#: max |p_onnx − p_torch| over every check image and class
PROBABILITY_TOLERANCE = 1e-4
#: min per-image pixel correlation between the ONNX CAM and MONAI's GradCAM
CAM_MIN_CORRELATION = 0.99
#: the final bytes (with metadata) must reproduce the verified outputs this closely
RELOAD_TOLERANCE = 1e-5


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
    "PROBABILITY_TOLERANCE",
    "RELOAD_TOLERANCE",
    "ParityReport",
    "Tolerances",
    "check_parity",
    "load_model_bare",
]
