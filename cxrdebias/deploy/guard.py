"""The exported graph's guard: calibrated probabilities and an out-of-distribution score.

:class:`GuardedModel` is :class:`~cxrdebias.deploy.explain.GradCAMModel` with three outputs:

- ``probabilities = softmax(logits / T)`` — temperature scaling folded into the graph (``T``
  fitted on the validation split, :func:`cxrdebias.evaluation.calibration.fit_temperature`);
- ``cam`` — the Grad-CAM of the positive class, unchanged (``T`` only rescales the logit, so
  the CAM's per-image [0, 1] scaling removes it; it is computed from the unscaled logits);
- ``ood_score`` — how far the image lies from the training data (:mod:`cxrdebias.evaluation.ood`):
  ``mahalanobis``: ``min_k ‖(f − μ_k) W‖`` with ``f`` the features of :data:`DEFAULT_LAYER` (the
  globally average-pooled output of one of the model's probe layers, read by a forward hook, or
  ``bottleneck``), the training-split class means ``μ_k`` and the whitening ``W Wᵀ = Σ⁻¹`` of the
  shared Ledoit–Wolf covariance; ``energy``: ``−logsumexp(logits)`` of the unscaled logits.

Why an intermediate layer by default: on the real two-source set the bottleneck's Mahalanobis
distance flagged none of the synthetic phantoms while the pooled ``block3`` output flagged all of
them (``benchmarks/ood_acceptance.py`` measures every candidate; ``docs/deployment.md``). The
bottleneck is trained to discard what does not predict the label (with EnD also the site), which
is exactly the acquisition appearance an OOD guard needs.

:func:`fit_guard` computes the statistics from torch features of the training and validation
images: ``T`` and the OOD threshold (the 99th percentile of the validation scores).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from cxrdebias.deploy.explain import GradCAMModel
from cxrdebias.errors import ExportError
from cxrdebias.evaluation.calibration import fit_temperature, nll, temperature_warning
from cxrdebias.evaluation.ood import (
    DEFAULT_PERCENTILE,
    DESCRIPTIONS,
    METHODS,
    MahalanobisStats,
    energy_scores,
    fit_mahalanobis,
    mahalanobis_scores,
    percentile_threshold,
)
from cxrdebias.models.pooled import capture_pooled, pool, probe_layers

#: the features of the default Mahalanobis score: a probe layer's name or ``bottleneck``
DEFAULT_LAYER = "block3"
BOTTLENECK = "bottleneck"


@dataclass
class Guard:
    """What the graph's guard needs and what the metadata record about it."""

    temperature: float
    method: str
    threshold: float
    stats: MahalanobisStats | None = None
    details: dict[str, Any] = field(default_factory=dict)
    layer: str = BOTTLENECK
    module: str | None = None  # the layer's module path (None: the bottleneck)

    def reference_scores(self, logits: np.ndarray, features: dict[str, np.ndarray]) -> np.ndarray:
        """The OOD score computed outside the graph (sklearn/scipy) from the torch model's logits
        and features (``{layer: N×D}``, :func:`torch_outputs`): what parity compares with."""
        if self.method == "mahalanobis":
            assert self.stats is not None
            return mahalanobis_scores(features[self.layer], self.stats)
        return energy_scores(logits)


class GuardedModel(GradCAMModel):
    """``x → (softmax(logits / T), Grad-CAM, ood_score)``; see the module doc."""

    def __init__(self, model: nn.Module, guard: Guard, class_index: int = 1):
        super().__init__(model, class_index=class_index)
        if guard.method not in METHODS:
            raise ExportError(f"OOD method {guard.method!r}; expected one of {', '.join(METHODS)}")
        self.method = guard.method
        self.module = guard.module if guard.method == "mahalanobis" else None
        self.register_buffer("inv_temperature", torch.tensor(1.0 / guard.temperature, dtype=torch.float32))
        if guard.method == "mahalanobis":
            assert guard.stats is not None
            w = torch.as_tensor(guard.stats.whitening, dtype=torch.float32)
            self.register_buffer("whitening", w)
            self.register_buffer("centres", torch.as_tensor(guard.stats.means @ guard.stats.whitening, dtype=torch.float32))

    def ood(self, logits: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        if self.method == "energy":
            return -torch.logsumexp(logits, dim=1)
        y = f @ self.whitening  # N×D whitened features
        sq = (y.unsqueeze(1) - self.centres.unsqueeze(0)).pow(2).sum(dim=2)  # N×K
        return sq.min(dim=1).values.clamp_min(0.0).sqrt()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[override]
        captured: list[torch.Tensor] = []
        handle = None
        if self.module is not None:  # the layer's output, globally average-pooled (as the probe reads it)
            handle = self.model.get_submodule(self.module).register_forward_hook(lambda _m, _i, out: captured.append(pool(out)))
        try:
            logits, cam, z = self.parts(x)
        finally:
            if handle is not None:
                handle.remove()
        f = captured[-1] if captured else z
        return (logits * self.inv_temperature).softmax(dim=1), self.finish_cam(cam, x), self.ood(logits, f)


def layer_module(model: nn.Module, layer: str) -> str | None:
    """The module path of probe layer ``layer`` (``None`` for the bottleneck); ``ExportError`` if unknown."""
    if layer == BOTTLENECK:
        return None
    layers = probe_layers(model)
    if layer not in layers:
        raise ExportError(f"OOD layer {layer!r}: the model's probe layers are {', '.join([*layers, BOTTLENECK])}")
    return layers[layer]


@torch.no_grad()
def torch_outputs(model: nn.Module, batches: Iterable[np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits and features (float64; ``{"bottleneck": N×D, <probe layer>: N×C, …}``, the probe
    layers globally average-pooled) of preprocessed batches through the torch model."""
    model = model.cpu().float().eval()
    logits, feats = [], []
    with capture_pooled(model, probe_layers(model)) as captured:
        for batch in batches:
            out = model(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
            logits.append(out.logits.double().numpy())
            feats.append(out.features.double().numpy())
    if not logits:
        raise ExportError("no images to fit the OOD statistics on")
    layers = {name: torch.cat(parts).double().numpy() for name, parts in captured.items()}
    return np.concatenate(logits), {BOTTLENECK: np.concatenate(feats), **layers}


def fit_guard(
    train: tuple[np.ndarray, dict[str, np.ndarray], np.ndarray],
    val: tuple[np.ndarray, dict[str, np.ndarray], np.ndarray],
    *,
    method: str = "mahalanobis",
    layer: str = DEFAULT_LAYER,
    module: str | None = None,
    percentile: float = DEFAULT_PERCENTILE,
) -> Guard:
    """Temperature (validation NLL), OOD statistics (training split) and OOD threshold
    (``percentile`` of the validation scores). ``train``/``val``: ``(logits, features, labels)``
    with ``features`` as :func:`torch_outputs` returns them; ``layer`` (``module``: its path)
    the features of the Mahalanobis score."""
    if method not in METHODS:
        raise ExportError(f"OOD method {method!r}; expected one of {', '.join(METHODS)}")
    (_, f_tr, y_tr), (l_va, f_va, y_va) = train, val
    if method == "mahalanobis" and layer not in f_tr:
        raise ExportError(f"OOD layer {layer!r}: features available for {', '.join(f_tr)}")
    temperature = fit_temperature(l_va, y_va)
    stats = fit_mahalanobis(f_tr[layer], y_tr) if method == "mahalanobis" else None
    guard = Guard(temperature, method, 0.0, stats, layer=layer if stats else BOTTLENECK, module=module if stats else None)
    val_scores = guard.reference_scores(l_va, f_va)
    guard.threshold = percentile_threshold(val_scores, percentile)
    guard.details = {
        "description": DESCRIPTIONS[method] + (f"; features: {layer}" + (f" ({module}, globally average-pooled)" if module else "")
                                               if stats else ""),
        **({"layer": layer, "module": module} if stats else {}),
        "statistics_from": f"training split ({len(y_tr)} images)" if method == "mahalanobis" else "none (no fitted statistics)",
        "threshold_rule": f"{percentile:g}th percentile of the validation split's scores ({len(y_va)} images)",
        "validation_flagged": float((val_scores > guard.threshold).mean()),
        **({"class_counts": stats.counts, "ledoit_wolf_shrinkage": stats.shrinkage, "feature_dim": int(f_tr[layer].shape[1])} if stats else {}),
        "temperature": {"value": temperature, "fitted_on": f"validation split ({len(y_va)} images), minimum NLL",
                        "nll_before": nll(l_va, y_va), "nll_after": nll(l_va, y_va, temperature),
                        **({"warning": w} if (w := temperature_warning(temperature, len(y_va))) else {})},
    }
    return guard


__all__ = ["BOTTLENECK", "DEFAULT_LAYER", "Guard", "GuardedModel", "fit_guard", "layer_module", "torch_outputs"]
