"""Feature taps: the labeller reads an earlier layer of the model than its bottleneck
(``unsupervised.layer``) through a forward hook, so without an extra pass."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cxrdebias.errors import ConfigError


def _width(module: nn.Module) -> int | None:
    for sub in reversed(list(module.modules())):
        for attr in ("out_channels", "num_features", "out_features"):
            if isinstance(getattr(sub, attr, None), int):
                return int(getattr(sub, attr))
    return None


def resolve_layer(model: nn.Module, name: str, option: str = "unsupervised.layer") -> str:
    """The module path ``name`` stands for: ``"early"`` is the model's first block
    (``model.early_layer``), anything else must be a module of ``model`` (:class:`ConfigError`
    naming ``option`` otherwise)."""
    if name == "early":  # the model's own choice of its first block
        early = getattr(model, "early_layer", None)
        if not isinstance(early, str):
            raise ConfigError(f"{option}='early': {type(model).__name__} does not name an early layer; give a module name")
        name = early
    modules = dict(model.named_modules())
    if name not in modules or not name:
        some = ", ".join(n for n in list(modules)[1:12])
        raise ConfigError(f"{option}={name!r}: the model has no module of that name (its first modules: {some}, …)")
    return name


class FeatureTap:
    """The output of one named module of a model, pooled over space, at every forward.

    ``pool``: ``mean`` (default) or ``max`` over space; ``grid = g > 1`` pools each of a
    ``g × g`` grid of regions separately (``adaptive_{avg,max}_pool2d``), so the features
    (``channels·g²``) keep *where* a local cue is, which a global pool loses.

    The labeller can read an earlier layer than the bottleneck (``unsupervised.layer``): the
    bottleneck is what the debiasing method acts on, so the better the method works the less
    bias it carries (the labels drift to the targets); an early layer keeps the low-level cue
    (colour, acquisition signature) that the shortcut is made of. A forward hook, so no extra
    pass. ``width`` is the channel count, read from the module (or, for an activation, from
    the module before it in its parent).
    """

    def __init__(self, model: nn.Module, name: str, pool: str = "mean", grid: int = 1):
        name = resolve_layer(model, name)
        if pool not in ("mean", "max") or grid < 1:
            raise ConfigError(f"unsupervised.layer_pool={pool!r}, layer_grid={grid!r}: expected 'mean' or 'max' and a grid ≥ 1")
        self.pool, self.grid = pool, int(grid)
        modules = dict(model.named_modules())
        self.name = name
        width = _width(modules[name])
        if width is None:  # an activation or pooling: the width of what comes before it
            parent_name, _, child = name.rpartition(".")
            children = list(modules[parent_name].named_children())
            before = [m for n, m in children[: [n for n, _ in children].index(child)]]
            width = next((w for w in (_width(m) for m in reversed(before)) if w is not None), None)
        if width is None:
            raise ConfigError(f"unsupervised.layer={name!r}: cannot tell the number of channels of that module")
        self.channels = width
        self.width = width * self.grid**2
        self.value: torch.Tensor | None = None
        self.kept: list[torch.Tensor] | None = None  # set to [] to keep every forward pass's value
        self._handle = modules[name].register_forward_hook(self._capture)

    def _capture(self, module, inputs, output) -> None:
        out = output.detach().float()
        if out.dim() > 2 and out.shape[1] != self.channels:
            raise ConfigError(f"unsupervised.layer={self.name!r}: output has {out.shape[1]} channels, expected {self.channels}")
        if out.dim() == 4 and (self.grid > 1 or self.pool == "max"):
            pool = F.adaptive_max_pool2d if self.pool == "max" else F.adaptive_avg_pool2d
            self.value = pool(out, self.grid).flatten(1)  # channel-major: c·g² + row·g + col
        elif out.dim() > 2:
            self.value = out.flatten(2).amax(dim=2) if self.pool == "max" else out.flatten(2).mean(dim=2)
        else:
            self.value = out
        if self.value.shape[1] != self.width:
            raise ConfigError(f"unsupervised.layer={self.name!r}: output has {self.value.shape[1]} features, expected {self.width}")
        if self.kept is not None:
            self.kept.append(self.value)

    def take(self) -> torch.Tensor:
        if self.value is None:
            raise RuntimeError(f"unsupervised.layer={self.name!r}: the module did not run in this forward pass")
        value, self.value = self.value, None
        return value

    def remove(self) -> None:
        self._handle.remove()


__all__ = ["FeatureTap", "resolve_layer"]
