"""Backbones + heads. Every model returns :class:`ModelOutput` (logits, bottleneck features)."""

from cxrdebias.models.base import L2Normalize, ModelOutput
from cxrdebias.models.simple_conv import SimpleConvNet

__all__ = ["L2Normalize", "ModelOutput", "SimpleConvNet"]


def build_model(cfg, num_classes: int, *, in_channels: int = 3, feature_activation: str | None = None):
    """Model from a :class:`cxrdebias.config.ModelConfig`.

    ``last_activation="auto"`` takes what the method asks for (``feature_activation``, Tanh for
    EnD) and ReLU otherwise.
    """
    act = cfg.last_activation
    if act == "auto":
        act = feature_activation or "relu"
    if cfg.arch == "simple_conv":
        return SimpleConvNet(
            num_classes,
            in_channels=in_channels,
            kernel_size=cfg.kernel_size,
            last_activation=act,
            normalize_features=cfg.normalize_features,
        )
    raise ValueError(f"unknown model arch {cfg.arch!r}")


__all__.append("build_model")
