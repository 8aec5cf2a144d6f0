"""Probe points: the named stages of a model and their globally average-pooled outputs.

Every backbone names its stages in ``probe_layers``, an ordered mapping of a short name
(``block1`` …) to a module path (``features.transition1`` …), earliest first. The site-leakage
probe of ``cxrdebias evaluate`` reads them (docs/cxr.md, "Site leakage by layer").

:func:`capture_pooled` attaches forward hooks to those modules for the span of a ``with`` block
and collects, at every forward pass, each module's output averaged over its spatial axes
(``N×C``, float32, on the CPU): :func:`cxrdebias.training.inference.predict` uses it to read the
layers in the pass it makes anyway. :func:`pooled_outputs` runs a model once over one batch and
returns the same vectors.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn


def probe_layers(model: nn.Module) -> dict[str, str]:
    """The model's probe points (``{name: module path}``, earliest first); ``{}`` for a model that
    names none. Every path must be a module of ``model``."""
    layers = dict(getattr(model, "probe_layers", None) or {})
    modules = dict(model.named_modules())
    for name, path in layers.items():
        if not path or path not in modules:
            raise ValueError(f"{type(model).__name__}.probe_layers[{name!r}] = {path!r}: the model has no module of that name")
    return layers


def pool(output: torch.Tensor) -> torch.Tensor:
    """A module output averaged over its spatial axes: ``N×C×…`` → ``N×C`` (``N×C`` stays), float32."""
    out = output.detach()
    if out.dim() > 2:
        return out.flatten(2).mean(dim=2, dtype=torch.float32)
    return out.float().reshape(out.shape[0], -1)


@contextmanager
def capture_pooled(model: nn.Module, layers: Mapping[str, str]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Within the block, every forward pass of ``model`` appends each layer's pooled output
    (:func:`pool`, on the CPU) to ``captured[name]``; the hooks are removed on leaving the block,
    also on an error. ``layers``: ``{name: module path}`` (:func:`probe_layers`)."""
    modules = dict(model.named_modules())
    missing = [path for path in layers.values() if path not in modules]
    if missing:
        raise ValueError(f"{type(model).__name__}: no module named {missing[0]!r}")
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    handles = []

    def hook(name: str):
        def capture(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
            captured[name].append(pool(output).cpu())

        return capture

    try:
        for name, path in layers.items():
            handles.append(modules[path].register_forward_hook(hook(name)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def pooled_outputs(model: nn.Module, x: torch.Tensor, layers: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Run ``model`` once over the batch ``x`` (eval mode, no gradients; the mode is restored and
    the hooks removed afterwards, also on an error) and return ``{name: N×C}``: the globally
    average-pooled output of each layer of ``layers`` (default: the model's :func:`probe_layers`),
    in that order."""
    layers = probe_layers(model) if layers is None else dict(layers)
    was_training = model.training
    model.eval()
    try:
        with capture_pooled(model, layers) as captured:
            model(x)
    finally:
        model.train(was_training)
    out = {}
    for name, values in captured.items():
        if len(values) != 1:
            raise RuntimeError(f"layer {name!r} ({layers[name]}) ran {len(values)} times in one forward pass; expected once")
        out[name] = values[0]
    return out


__all__ = ["capture_pooled", "pool", "pooled_outputs", "probe_layers"]
