"""Running a model over a dataset: :func:`predict` → :class:`Predictions`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from cxrdebias.data.base import Batch
from cxrdebias.models.pooled import capture_pooled


@dataclass
class Predictions:
    """Model outputs over a dataset, in dataset order of ``index``."""

    logits: torch.Tensor  # N×K float32
    targets: torch.Tensor  # N
    biases: torch.Tensor  # N
    indices: torch.Tensor  # N
    features: torch.Tensor | None = None  # N×D (when requested)
    layers: dict[str, torch.Tensor] | None = None  # name → N×C pooled layer outputs (when requested)

    @property
    def predicted(self) -> torch.Tensor:
        return self.logits.argmax(dim=1)

    @property
    def probabilities(self) -> torch.Tensor:
        return self.logits.softmax(dim=1)


def to_device(batch: Batch, device: torch.device, channels_last: bool = False) -> Batch:
    image = batch["image"].to(device, non_blocking=True)
    if channels_last and image.dim() == 4:
        image = image.contiguous(memory_format=torch.channels_last)
    return Batch(
        image=image,
        target=batch["target"].to(device, non_blocking=True),
        bias=batch["bias"].to(device, non_blocking=True),
        index=batch["index"],
    )


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: Iterable[Batch],
    *,
    device: torch.device | str = "cpu",
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    channels_last: bool = False,
    keep_features: bool = False,
    layers: Mapping[str, str] | None = None,
) -> Predictions:
    """Evaluate ``model`` (in eval mode, restored afterwards) over every batch of ``loader``.

    ``keep_features`` keeps the bottleneck; ``layers`` (``{name: module path}``, e.g. the model's
    :func:`cxrdebias.models.pooled.probe_layers`) keeps the globally average-pooled output of
    each of those modules, read by forward hooks in the same pass (``Predictions.layers``)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    logits, targets, biases, indices, feats = [], [], [], [], []
    try:
        with capture_pooled(model, layers or {}) as captured:
            for batch in loader:
                batch = to_device(batch, device, channels_last)
                with autocast():
                    out = model(batch["image"])
                logits.append(out.logits.float().cpu())
                if keep_features:
                    feats.append(out.features.float().cpu())
                targets.append(batch["target"].cpu())
                biases.append(batch["bias"].cpu())
                indices.append(batch["index"].cpu())
    finally:
        model.train(was_training)
    if not logits:
        raise ValueError("predict: the loader yielded no batch")
    return Predictions(
        logits=torch.cat(logits),
        targets=torch.cat(targets),
        biases=torch.cat(biases),
        indices=torch.cat(indices),
        features=torch.cat(feats) if keep_features else None,
        layers={name: torch.cat(values) for name, values in captured.items()} if layers else None,
    )
