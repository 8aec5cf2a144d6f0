"""What every model of the package returns: logits and its bottleneck features."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class ModelOutput(NamedTuple):
    """``logits``: ``N×K`` class scores. ``features``: ``N×D`` bottleneck the regularisers act on.

    When the model normalises its bottleneck (EnD's information bottleneck), ``features`` are
    the L2-normalised vectors that the classifier also sees.
    """

    logits: torch.Tensor
    features: torch.Tensor


class L2Normalize(nn.Module):
    """Per-sample L2 normalisation in the forward path (EnD's ``pattern_norm``)."""

    def __init__(self, eps: float = 1e-12):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.flatten(1), p=2, dim=1, eps=self.eps)


def activation(name: str) -> nn.Module:
    """``relu`` or ``tanh`` (EnD puts a Tanh last so features can be negative/orthogonal)."""
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "tanh":
        return nn.Tanh()
    raise ValueError(f"unknown activation {name!r}; expected 'relu' or 'tanh'")


@contextmanager
def capture_pooled(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the *raw* pooled features (``N×D``, before any L2 normalisation) of each forward
    pass of ``model`` inside the block: the input of its ``bottleneck`` module, which every model
    of the package has (``L2Normalize`` or ``Flatten``). A DDP wrapper is looked through. The
    tensors stay in the autograd graph, so a loss on them trains the network."""
    inner = getattr(model, "module", model)
    bottleneck = getattr(inner, "bottleneck", None)
    if not isinstance(bottleneck, nn.Module):
        raise ValueError(f"{type(inner).__name__} has no 'bottleneck' module, so its raw pooled features cannot be read")
    seen: list[torch.Tensor] = []
    handle = bottleneck.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].flatten(1)))
    try:
        yield seen
    finally:
        handle.remove()
