"""SimpleConvNet of the Biased-MNIST benchmark (Bahng et al., ICML 2020; used by EnD).

Four ``k×k`` convolutions (3→16→32→64→128 channels, stride 1, padding ``k//2``), each followed
by BatchNorm and an activation (ReLU; the last one Tanh when EnD is on), global average
pooling, an optional L2-normalised bottleneck, and a linear classifier. ``kernel_size=1`` gives
ReBias's intentionally biased network G (it can only see colour, not shape).
"""

from __future__ import annotations

import torch
from torch import nn

from cxrdebias.models.base import L2Normalize, ModelOutput, activation

CHANNELS = (16, 32, 64, 128)
#: the probe points (:mod:`cxrdebias.models.pooled`): the output of each conv → BN → activation block
PROBE_LAYERS = {f"block{i + 1}": f"extractor.{3 * i + 2}" for i in range(len(CHANNELS))}


class SimpleConvNet(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        *,
        in_channels: int = 3,
        kernel_size: int = 7,
        last_activation: str = "relu",
        normalize_features: bool = True,
    ):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        layers: list[nn.Module] = []
        c = in_channels
        for i, out in enumerate(CHANNELS):
            last = i == len(CHANNELS) - 1
            layers += [
                nn.Conv2d(c, out, kernel_size, stride=1, padding=kernel_size // 2),
                nn.BatchNorm2d(out),
                activation(last_activation if last else "relu"),
            ]
            c = out
        self.extractor = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.bottleneck = L2Normalize() if normalize_features else nn.Flatten(1)
        self.classifier = nn.Linear(CHANNELS[-1], num_classes)
        self.feature_dim = CHANNELS[-1]
        self.early_layer = "extractor.2"  # first block: what `unsupervised.layer: early` reads (docs/unsupervised.md)
        self.probe_layers = dict(PROBE_LAYERS)  # the per-layer site probe reads these (models/pooled.py)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        features = self.bottleneck(self.pool(self.extractor(x)))
        return ModelOutput(self.classifier(features), features)
