"""DenseNet-121 for single-channel chest X-rays with the EnD bottleneck and a two-layer head.

Backbone: torchvision's DenseNet-121 (``weights=None``: training from scratch is the offline
default), first convolution for 1 input channel. Forward path::

    x → features (… denseblock4 → norm5) → activation (ReLU; Tanh with EnD)
      → global average pool (1024-d) → [L2 normalisation] = bottleneck
      → Linear(1024, hidden) → ReLU → Dropout → Linear(hidden, num_classes)

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

FEATURE_DIM = 1024


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
        self.in_channels = in_channels

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (after the last activation): the Grad-CAM target layer."""
        return self.activation(self.features(x))

    def forward(self, x: torch.Tensor) -> ModelOutput:
        features = self.bottleneck(self.pool(self.feature_map(x)))
        return ModelOutput(self.head(features), features)


_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a DenseNet-121 state dict (torchvision, timm or torchxrayvision)")
    return obj


def normalize_densenet_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map torchvision/timm/torchxrayvision DenseNet-121 keys onto ``features.*``.

    Strips ``module.``/``model.`` prefixes, fixes the old ``norm.1`` style names of early
    torchvision checkpoints, and drops every classifier/head weight.
    """
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "model.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        m = _OLD_KEY.match(k)
        if m:
            k = m.group(1) + m.group(2)
        if k.startswith("features."):
            out[k] = v
    return out


def load_pretrained_backbone(model: DenseNet121, path: str | Path) -> dict[str, Any]:
    """Load local DenseNet-121 weights into ``model.features``; returns a short report."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: pretrained weights file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot load ({exc.__class__.__name__}: {exc})") from None
    state = normalize_densenet_keys(_unwrap_state_dict(obj, path))
    if not state:
        raise CheckpointError(f"{path}: no 'features.*' weights found; expected a DenseNet-121 checkpoint")
    conv = state.get("features.conv0.weight")
    adapted = False
    if conv is not None and conv.shape[1] != model.in_channels:
        if model.in_channels == 1:
            state["features.conv0.weight"] = conv.sum(dim=1, keepdim=True)
            adapted = True
        else:
            raise CheckpointError(f"{path}: first convolution has {conv.shape[1]} input channels, model has {model.in_channels}")
    target = {f"features.{k}": v for k, v in model.features.state_dict().items()}
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: not a DenseNet-121 backbone ({len(missing)} missing keys, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]})"
        )
    bad = [k for k in target if target[k].shape != state[k].shape]
    if bad:
        raise CheckpointError(f"{path}: shape mismatch for {bad[0]}: {tuple(state[bad[0]].shape)} vs {tuple(target[bad[0]].shape)}")
    model.features.load_state_dict({k[len("features.") :]: v for k, v in state.items()})
    return {"path": str(path), "tensors": len(state), "conv0_adapted_to_1_channel": adapted}
