"""ResNet-18 with the EnD bottleneck and a linear classifier (CelebA, IMDB Face).

Backbone: torchvision's ``resnet18(weights=None)`` — never downloaded; ImageNet weights come
from a local file (``ModelConfig.pretrained``, :func:`load_pretrained_resnet`). Forward path::

    x → conv1 → bn1 → ReLU → maxpool → layer1 … layer4 (last activation: ReLU; Tanh with EnD)
      → global average pool (512-d) → [L2 normalisation] = bottleneck → Linear(512, num_classes)

The bottleneck (pooled, L2-normalised features that the classifier also sees) is what EnD
regularises. Probe points (``PROBE_LAYERS``, read by the per-layer site probe): the outputs of
``layer1``–``layer4``.

**The Tanh swap.** EnD's reference replaces ``layer4[1].relu`` by a Tanh. torchvision's
``BasicBlock`` calls that one ``relu`` module twice (after ``bn1`` *and* after the residual
sum), so the reference also turns the block's inner activation into a Tanh. Here
:class:`FinalActivationBlock` re-implements the block's forward with its own modules and
changes only the activation after the residual sum — the one that produces the features. Its
parameter names are torchvision's, so ImageNet weights load unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models.resnet import BasicBlock

from cxrdebias.errors import CheckpointError
from cxrdebias.models.base import L2Normalize, ModelOutput, activation
from cxrdebias.models.weights import (
    adapt_first_conv,
    check_state_matches,
    read_state_dict,
    strip_wrapper_prefixes,
)

FEATURE_DIM = 512
#: the torchvision modules of the backbone, in forward order (their names are kept)
BACKBONE_MODULES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
#: the probe points (:mod:`cxrdebias.models.pooled`): the output of each residual stage (64, 128, 256,
#: 512 channels); layer4's pooled output is the bottleneck before L2 normalisation
PROBE_LAYERS = {"layer1": "layer1", "layer2": "layer2", "layer3": "layer3", "layer4": "layer4"}


class FinalActivationBlock(nn.Module):
    """A torchvision :class:`BasicBlock` whose activation *after the residual sum* is
    ``final_activation``; the inner activation (after ``bn1``) stays the block's ReLU.

    Holds the block's own modules under the same names (``conv1``, ``bn1``, ``conv2``, ``bn2``,
    ``downsample``), so its state dict keys are those of the wrapped block.
    """

    def __init__(self, block: BasicBlock, final_activation: nn.Module):
        super().__init__()
        self.conv1, self.bn1, self.relu = block.conv1, block.bn1, block.relu
        self.conv2, self.bn2 = block.conv2, block.bn2
        self.downsample = block.downsample
        self.final_activation = final_activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.final_activation(out + identity)


class ResNet18(nn.Module):
    """ResNet-18 returning :class:`ModelOutput` (logits, pooled 512-d bottleneck)."""

    def __init__(
        self,
        num_classes: int = 2,
        *,
        in_channels: int = 3,
        last_activation: str = "relu",
        normalize_features: bool = True,
    ):
        super().__init__()
        backbone = resnet18(weights=None)
        if in_channels != 3:
            backbone.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(backbone.conv1.weight, mode="fan_out", nonlinearity="relu")
        final = activation(last_activation)
        if isinstance(final, nn.ReLU):
            final.inplace = False  # the feature map is kept for Grad-CAM
        backbone.layer4[1] = FinalActivationBlock(backbone.layer4[1], final)
        for name in BACKBONE_MODULES:
            setattr(self, name, getattr(backbone, name))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.bottleneck = L2Normalize() if normalize_features else nn.Flatten(1)
        self.classifier = nn.Linear(FEATURE_DIM, num_classes)
        self.feature_dim = FEATURE_DIM
        self.early_layer = "maxpool"  # first block: what `unsupervised.layer: early` reads (docs/unsupervised.md)
        self.probe_layers = dict(PROBE_LAYERS)  # the per-layer site probe reads these (models/pooled.py)
        self.in_channels = in_channels

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone's tensors under torchvision's names (everything but the classifier)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("classifier.")}

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """``layer4``'s output (after the last activation): the Grad-CAM target layer."""
        for name in BACKBONE_MODULES:
            x = getattr(self, name)(x)
        return x

    def forward(self, x: torch.Tensor) -> ModelOutput:
        features = self.bottleneck(self.pool(self.feature_map(x)))
        return ModelOutput(self.classifier(features), features)


def load_pretrained_resnet(model: ResNet18, path: str | Path) -> dict[str, Any]:
    """Load a local ResNet-18 checkpoint (e.g. torchvision's ``resnet18-f37072fd.pth``) into the
    backbone; its ``fc.*`` classifier is dropped. Returns a short report."""
    raw = read_state_dict(path, "a ResNet-18 state dict (torchvision key names)")
    state = {strip_wrapper_prefixes(k): v for k, v in raw.items()}
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}
    if "conv1.weight" not in state:
        raise CheckpointError(f"{path}: no 'conv1.weight' found; expected a torchvision ResNet-18 checkpoint")
    adapted = adapt_first_conv(state, "conv1.weight", model.in_channels, path)
    check_state_matches(model.backbone_state_dict(), state, path, "ResNet-18 backbone")
    missing = model.load_state_dict(state, strict=False).missing_keys
    assert all(k.startswith("classifier.") for k in missing), missing
    return {"path": str(path), "tensors": len(state), "conv1_adapted_to_1_channel": adapted}
