"""The config sections every layer shares: model, method and training options, and the
``KEY=VALUE`` override syntax.

A leaf module: the data sections live with their datasets and the whole experiment config
(:class:`~cxrdebias.experiments.config.ExperimentConfig`, with ``load_config``) in the
experiments layer, where the dataset kinds are registered.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from cxrdebias.errors import ConfigError

#: the configs shipped in the source checkout (``configs/``: the defaults of the CXR and photo commands)
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


class StrictConfig(BaseModel):
    """A config section that refuses unknown keys (a misspelt option is an error, not ignored)
    and non-finite numbers (``.inf``/``.nan`` for a float option is an error, not a run that
    fails later)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelConfig(StrictConfig):
    arch: Literal["simple_conv", "densenet121", "resnet18"] = "simple_conv"
    kernel_size: int = Field(7, ge=1, description="simple_conv: convolution kernel size")
    last_activation: Literal["auto", "relu", "tanh"] = Field(
        "auto", description="'auto': what the method asks for (Tanh for EnD), else ReLU"
    )
    normalize_features: bool = Field(True, description="L2-normalise the bottleneck in the forward path")
    hidden_dim: int = Field(256, ge=1, description="densenet121: width of the two-layer classifier head")
    dropout: float = Field(0.2, ge=0, lt=1, description="densenet121: dropout between the head's layers")
    pretrained: str | None = Field(
        None,
        description="densenet121: local torchvision/timm/torchxrayvision DenseNet-121 weights; "
        "resnet18: local torchvision ResNet-18 weights (e.g. ImageNet resnet18-f37072fd.pth); never downloaded",
    )


class MethodConfig(BaseModel):
    """``name`` plus the method's own options (validated by the method, see ``cxrdebias.debias``)."""

    model_config = ConfigDict(extra="allow")
    name: str = "vanilla"

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class AugmentConfig(StrictConfig):
    """Random acquisition-style augmentation of training batches (:mod:`cxrdebias.data.augment`).

    Every option is a range a training image's parameter is drawn from, per image and per step;
    0 (the default of each) turns that transform off. Intensity options work on each image's own
    [min, max] range, so they do not depend on the input normalisation. Off by default, and left
    out of a config's JSON when off (the resolved configs of runs without it stay as they were).
    """

    gamma: float = Field(0.0, ge=0, le=4, description="gamma exponent log-uniform in [1/(1+g), 1+g]")
    contrast: float = Field(0.0, ge=0, lt=1, description="contrast factor uniform in [1-c, 1+c] about the image mean")
    brightness: float = Field(0.0, ge=0, le=1, description="offset uniform in [-b, b], in units of the image's range")
    noise: float = Field(0.0, ge=0, le=1, description="Gaussian noise, std uniform in [0, n], in units of the image's range")
    sharpness: float = Field(
        0.0, ge=0, le=4, description="unsharp amount uniform in [max(-1, -s), s] with a Gaussian of σ 1 pixel (below 0 blurs; -1 = the blurred image)"
    )
    crop: float = Field(0.0, ge=0, le=0.5, description="crop of side uniform in [1-c, 1] of the image at a random place, resized back")
    hflip: float = Field(0.0, ge=0, le=1, description="probability of a left-right flip")

    @property
    def enabled(self) -> bool:
        return any(getattr(self, name) > 0 for name in type(self).model_fields)


class TrainConfig(StrictConfig):
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    lr_step: int | None = Field(10, ge=1, description="StepLR period in epochs (None: constant LR)")
    lr_gamma: float = Field(0.1, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="'auto': bf16 autocast where the hardware has native bf16, else fp32"
    )
    channels_last: bool = False
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (None: all cores)")
    keep_freed_memory: bool = Field(
        True,
        description="on the CPU, glibc malloc keeps freed tensor memory for reuse instead of an mmap/munmap "
        "per large tensor every step (faster; the process holds its peak memory; cxrdebias.training.allocator)",
    )
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'")
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms(True)")
    drop_last: bool = False
    eval_every: int = Field(1, ge=1, description="evaluate the validation set every N epochs")
    progress: bool = True
    tensorboard: bool = Field(
        False, description="also write the training curves as TensorBoard scalars to RUN/tensorboard (needs tensorboard)"
    )
    class_balance: Literal["none", "weighted_loss"] = Field(
        "none",
        description="weighted_loss: cross-entropy weighted by inverse class frequency of the training split "
        "(with sampling=group_balanced: of the classes as sampled, uniform when every class has the same number of cells)",
    )
    sampling: Literal["none", "group_balanced"] = Field(
        "none",
        description="group_balanced: each epoch draws len(train) samples with replacement, every (target, bias) cell "
        "equally likely (needs the true bias labels; cxrdebias.data.sampling)",
    )
    select_metric: str | None = Field(
        None, description="validation metric used for model selection/early stopping (None: last epoch)"
    )
    select_mode: Literal["max", "min"] = "max"
    patience: int | None = Field(None, ge=1, description="early stopping after N evaluations without improvement")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes when images are not cached")
    sync_batchnorm: bool = Field(
        True, description="under torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)"
    )
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig,
        description="random acquisition-style augmentation of training batches (off by default; cxrdebias.data.augment)",
    )

    @model_serializer(mode="wrap")
    def _omit_augment_when_off(self, handler: SerializerFunctionWrapHandler) -> dict:
        data = handler(self)
        if not self.augment.enabled:  # resolved configs (and fingerprints) of runs without it stay as they were
            data.pop("augment", None)
        return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.epochs=3"`` → (``["train", "epochs"]``, ``3``); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.epochs=3")
    key, raw = item.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
    return keys, value


def set_in(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(keys)}: {k!r} is not a section")
        node = child
    node[keys[-1]] = value


def merge_tree(dst: dict[str, Any], src: dict[str, Any]) -> None:
    """Merge the nested mapping ``src`` into ``dst`` in place (``src`` wins; mappings merge key by key)."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            merge_tree(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)


def bias_options(bias: str | None, labeller: str | None, dataset_values: tuple[str, ...]) -> dict[str, Any]:
    """``--bias``/``--labeller`` as config options: ``auto`` switches on the online pseudo-bias
    labeller (the dataset's bias labels, when it has them, then only feed the agreement
    metrics); one of ``dataset_values`` uses the dataset's own bias labels."""
    if labeller is not None and bias != "auto":
        raise ConfigError("--labeller only applies with --bias auto")
    if bias is None:
        return {}
    if bias == "auto":
        return {"unsupervised.enabled": True, "unsupervised.labeller": labeller}
    if bias not in dataset_values:
        raise ConfigError(f"--bias {bias!r}: expected {', '.join(dataset_values)} or auto")
    return {"unsupervised.enabled": False}
