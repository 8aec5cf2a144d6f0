"""Typed run configuration: YAML files in ``configs/`` plus command-line overrides.

A config is validated as a whole before anything runs; a wrong key or value is a
:class:`ConfigError` naming the field (``train.epochs: Input should be greater than 0``).
The *resolved* config (every default filled in) is saved in each run folder.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cxrdebias.data.biased_mnist import BiasedMNISTConfig
from cxrdebias.data.celeba import CelebAConfig
from cxrdebias.data.cxr import CXRDataConfig
from cxrdebias.data.imdb_face import IMDBFaceConfig
from cxrdebias.debias.unsupervised.options import PseudoBiasOptions
from cxrdebias.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
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


class TrainConfig(_Strict):
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
    class_balance: Literal["none", "weighted_loss"] = Field(
        "none", description="weighted_loss: cross-entropy weighted by inverse class frequency of the training split"
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


class ExperimentConfig(_Strict):
    name: str = "experiment"
    seed: int = 42
    data: Annotated[
        BiasedMNISTConfig | CXRDataConfig | CelebAConfig | IMDBFaceConfig, Field(discriminator="kind")
    ] = Field(
        default_factory=BiasedMNISTConfig
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    unsupervised: PseudoBiasOptions = Field(
        default_factory=PseudoBiasOptions,
        description="online pseudo-bias labels instead of the dataset's (--bias auto; docs/unsupervised.md)",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_data_kind(cls, data: Any) -> Any:
        # a data section without `kind` is Biased MNIST (the configs of the first release)
        if isinstance(data, dict) and isinstance(data.get("data"), dict) and "kind" not in data["data"]:
            data = {**data, "data": {"kind": "biased_mnist", **data["data"]}}
        return data


DATA_KINDS = ("biased_mnist", "cxr", "celeba", "imdb_face")


def _format_validation_error(exc: ValidationError, source: str) -> str:
    parts = []
    for e in exc.errors():
        keys = [str(p) for p in e["loc"]]
        if len(keys) > 1 and keys[0] == "data" and keys[1] in DATA_KINDS:
            del keys[1]  # the discriminator tag pydantic inserts for the data union
        loc = ".".join(keys)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown option"
        parts.append(f"{loc}: {msg}" + (f" (got {e['input']!r})" if e["type"] != "extra_forbidden" and not isinstance(e.get("input"), dict) else ""))
    return f"{source}: " + "; ".join(parts)


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


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> ExperimentConfig:
    """Defaults ← ``base`` ← YAML file at ``path`` ← ``overrides`` (``KEY=VALUE`` strings)."""
    tree: dict[str, Any] = copy.deepcopy(base) if base else {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
        _merge(tree, loaded)
    for item in overrides or []:
        keys, value = parse_override(item)
        set_in(tree, keys, value)
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def _merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def check_resumable(saved: dict[str, Any], requested: ExperimentConfig, where: str) -> None:
    """Refuse to resume a run with other options than it was started with.

    The saved config is re-validated first, so options added to cxrdebias since the run
    started (with their defaults) do not count as a difference.
    """
    from cxrdebias.errors import CheckpointError

    try:
        normalised = load_config(None, None, base=saved).model_dump(mode="json")
    except ConfigError as exc:
        raise CheckpointError(f"{where}: the saved config is no longer valid ({exc})") from None
    current = requested.model_dump(mode="json")
    if normalised != current:
        diff = sorted(_diff_keys(normalised, current))
        raise CheckpointError(f"{where}: saved config differs from the requested one ({', '.join(diff[:5])}); resume with the same options")


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in set(a) | set(b):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]
