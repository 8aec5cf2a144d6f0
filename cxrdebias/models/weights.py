"""Loading *local* pretrained backbone weights (nothing is ever downloaded).

Shared by the backbones that accept ``ModelConfig.pretrained``: read a checkpoint file into a
flat state dict (whatever wraps it), normalise key prefixes, adapt the first convolution to the
model's input channels, and check that every backbone tensor is there with the right shape
before anything is loaded. Every failure is a one-line :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxrdebias.errors import CheckpointError

#: wrappers that training scripts put around the model's own key names
WRAPPER_PREFIXES = ("module.", "model.", "backbone.")


def read_state_dict(path: str | Path, expected: str) -> dict[str, torch.Tensor]:
    """Tensors of the checkpoint at ``path``: a state dict, a dict holding one under
    ``state_dict``/``model``/``model_state_dict``, or a pickled module. ``expected`` words the
    error ("a ResNet-18 state dict")."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: pretrained weights file not found")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot load ({exc.__class__.__name__}: {exc})") from None
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected {expected}")
    return obj


def strip_wrapper_prefixes(key: str) -> str:
    """``module.model.features.x`` → ``features.x`` (each of :data:`WRAPPER_PREFIXES` once, in order)."""
    for prefix in WRAPPER_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def adapt_first_conv(state: dict[str, torch.Tensor], key: str, in_channels: int, path: str | Path) -> bool:
    """Make ``state[key]`` (a first convolution's weight) take ``in_channels`` inputs.

    RGB weights for a 1-channel model are summed over the colour channels (a grey image
    replicated to RGB then gives the same response). Returns whether the weight was adapted.
    """
    conv = state.get(key)
    if conv is None or conv.shape[1] == in_channels:
        return False
    if in_channels == 1:
        state[key] = conv.sum(dim=1, keepdim=True)
        return True
    raise CheckpointError(f"{path}: first convolution has {conv.shape[1]} input channels, model has {in_channels}")


def check_state_matches(target: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], path: str | Path, what: str) -> None:
    """Refuse ``state`` unless it has exactly ``target``'s keys with the same shapes."""
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: not a {what} ({len(missing)} missing keys, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]})"
        )
    bad = [k for k in target if target[k].shape != state[k].shape]
    if bad:
        raise CheckpointError(f"{path}: shape mismatch for {bad[0]}: {tuple(state[bad[0]].shape)} vs {tuple(target[bad[0]].shape)}")
