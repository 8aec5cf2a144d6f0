"""DenseNet-121 for single-channel chest X-rays with the EnD bottleneck and a two-layer head.

Backbone: torchvision's DenseNet-121 (``weights=None``: training from scratch is the offline
default), first convolution for 1 input channel. Forward path::

    x → features (… denseblock4 → norm5) → activation (ReLU; Tanh with EnD)
      → global average pool (1024-d) → [L2 normalisation] = bottleneck
      → Linear(1024, hidden) → ReLU → Dropout → Linear(hidden, num_classes)

Probe points (``PROBE_LAYERS``, read by the per-layer site probe): ``block1``–``block3`` are the
outputs of ``features.transition1``–``3`` (what each dense stage hands on), ``block4`` the last
feature map (after norm5 and the activation).

The bottleneck is what EnD regularises (the reference places the normalisation — and a Tanh
as last activation — in the forward path for ResNet; we do the same here). The head is the
two-layer fully connected classifier of the EnD paper's COVID experiment.

``load_pretrained_backbone`` takes a *local* torchvision, timm or torchxrayvision DenseNet-121
checkpoint (nothing is downloaded) and adapts a 3-channel first convolution to one channel by
summing over the colour channels (a grey image replicated to RGB gives the same response).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import densenet121

from cxrdebias.errors import CheckpointError
from cxrdebias.models.base import L2Normalize, ModelOutput, activation
from cxrdebias.models.weights import (
    adapt_first_conv,
    check_state_matches,
    read_state_dict,
    strip_wrapper_prefixes,
)

FEATURE_DIM = 1024
#: the probe points (:mod:`cxrdebias.models.pooled`): the output of each of the four dense stages as
#: the next stage receives it — after the transition (BN, ReLU, 1×1 conv halving the channels,
#: 2×2 average pool) for stages 1–3 (128, 256, 512 channels), the last feature map after norm5 and
#: the last activation for stage 4 (1024; its pooled output is the bottleneck before L2 normalisation)
PROBE_LAYERS = {
    "block1": "features.transition1",
    "block2": "features.transition2",
    "block3": "features.transition3",
    "block4": "activation",
}


class DenseNet121(nn.Module):
    def __init__(
        self,
        num_classes: int = 2,
        *,
        in_channels: int = 1,
        last_activation: str = "relu",
        normalize_features: bool = True,
        hidden_dim: int = 256,
        dropout: float = 0.2,
    ):
        super().__init__()
        backbone = densenet121(weights=None)
        if in_channels != 3:
            old = backbone.features.conv0
            backbone.features.conv0 = nn.Conv2d(in_channels, old.out_channels, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(backbone.features.conv0.weight)
        self.features = backbone.features
        self.activation = activation(last_activation)
        if isinstance(self.activation, nn.ReLU):
            self.activation.inplace = False  # the feature map is kept for Grad-CAM
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.bottleneck = L2Normalize() if normalize_features else nn.Flatten(1)
        self.head = nn.Sequential(
            nn.Linear(FEATURE_DIM, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, num_classes),
        )
        self.feature_dim = FEATURE_DIM
        self.early_layer = "features.pool0"  # first block: what `unsupervised.layer: early` reads (docs/unsupervised.md)
        self.probe_layers = dict(PROBE_LAYERS)  # the per-layer site probe reads these (models/pooled.py)
        self.in_channels = in_channels

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (after the last activation): the Grad-CAM target layer."""
        return self.activation(self.features(x))

    def forward(self, x: torch.Tensor) -> ModelOutput:
        features = self.bottleneck(self.pool(self.feature_map(x)))
        return ModelOutput(self.head(features), features)


_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def normalize_densenet_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map torchvision/timm/torchxrayvision DenseNet-121 keys onto ``features.*``.

    Strips ``module.``/``model.`` prefixes, fixes the old ``norm.1`` style names of early
    torchvision checkpoints, and drops every classifier/head weight.
    """
    out = {}
    for k, v in state.items():
        k = strip_wrapper_prefixes(k)
        m = _OLD_KEY.match(k)
        if m:
            k = m.group(1) + m.group(2)
        if k.startswith("features."):
            out[k] = v
    return out


def load_pretrained_backbone(model: DenseNet121, path: str | Path) -> dict[str, Any]:
    """Load local DenseNet-121 weights into ``model.features``; returns a short report."""
    state = normalize_densenet_keys(
        read_state_dict(path, "a DenseNet-121 state dict (torchvision, timm or torchxrayvision)")
    )
    if not state:
        raise CheckpointError(f"{path}: no 'features.*' weights found; expected a DenseNet-121 checkpoint")
    adapted = adapt_first_conv(state, "features.conv0.weight", model.in_channels, path)
    target = {f"features.{k}": v for k, v in model.features.state_dict().items()}
    check_state_matches(target, state, path, "DenseNet-121 backbone")
    model.features.load_state_dict({k[len("features.") :]: v for k, v in state.items()})
    return {"path": str(path), "tensors": len(state), "conv0_adapted_to_1_channel": adapted}
