"""Backbones + heads. Every model returns :class:`ModelOutput` (logits, bottleneck features)."""

from cxrdebias.models.base import L2Normalize, ModelOutput, capture_pooled
from cxrdebias.models.simple_conv import SimpleConvNet

__all__ = ["L2Normalize", "ModelOutput", "SimpleConvNet", "capture_pooled"]


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
    if cfg.arch == "densenet121":
        from cxrdebias.models.densenet import DenseNet121, load_pretrained_backbone

        model = DenseNet121(
            num_classes,
            in_channels=in_channels,
            last_activation=act,
            normalize_features=cfg.normalize_features,
            hidden_dim=cfg.hidden_dim,
            dropout=cfg.dropout,
        )
        if cfg.pretrained:
            load_pretrained_backbone(model, cfg.pretrained)
        return model
    if cfg.arch == "resnet18":
        from cxrdebias.models.resnet import ResNet18, load_pretrained_resnet

        model = ResNet18(
            num_classes, in_channels=in_channels, last_activation=act, normalize_features=cfg.normalize_features
        )
        if cfg.pretrained:
            load_pretrained_resnet(model, cfg.pretrained)
        return model
    raise ValueError(f"unknown model arch {cfg.arch!r}")


def model_factory(cfg, num_classes: int, *, in_channels: int = 3, feature_activation: str | None = None):
    """``build(**overrides)`` → a fresh model of the same family with some config fields
    changed (ReBias's biased network: ``kernel_size=1``). Overrides are validated: a misspelt
    key is an error, not silently ignored."""
    from pydantic import ValidationError

    from cxrdebias.errors import ConfigError

    def build(**overrides):
        try:
            changed = type(cfg).model_validate({**cfg.model_dump(), **overrides})
        except ValidationError as exc:
            raise ConfigError(f"model overrides {overrides}: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}") from None
        return build_model(changed, num_classes, in_channels=in_channels, feature_activation=feature_activation)

    return build


__all__ += ["build_model", "model_factory"]
