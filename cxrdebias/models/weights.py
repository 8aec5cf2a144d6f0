"""Loading *local* pretrained backbone weights (nothing is ever downloaded), and the one safe
reader of torch files.

Every ``.pt``/``.pth`` file cxrdebias reads (pretrained weights, ``model.pt``, training
checkpoints) goes through :func:`load_torch_file`: ``torch.load(weights_only=True)``, so a file
can hold tensors and plain data (numbers, strings, lists, tuples, dicts) but no pickled code. The
only other objects allowed are the numpy ones that the random state in a training checkpoint is
made of (:data:`NUMPY_RNG_GLOBALS`), and only while such a file is being read. A file that
holds anything else is refused with a :class:`CheckpointError` naming what it holds; nothing in
it is run.

Shared by the backbones that accept ``ModelConfig.pretrained``: read a checkpoint file into a
flat state dict (whatever wraps it), normalise key prefixes, adapt the first convolution to the
model's input channels, and check that every backbone tensor is there with the right shape
before anything is loaded. Every failure is a one-line :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrdebias.errors import CheckpointError

#: wrappers that training scripts put around the model's own key names
WRAPPER_PREFIXES = ("module.", "model.", "backbone.")


#: numpy's array reconstructor (``numpy._core.multiarray._reconstruct``; ``numpy.core`` before numpy 2)
_np_reconstruct = np.zeros(1).__reduce__()[0]
#: what ``np.random.get_state()`` pickles as (an ``ndarray`` of ``uint32``), under the names of
#: numpy 2 and of numpy 1 (files written before numpy 2)
NUMPY_RNG_GLOBALS: list[Any] = [
    (_np_reconstruct, "numpy._core.multiarray._reconstruct"),
    (_np_reconstruct, "numpy.core.multiarray._reconstruct"),
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
]


def load_torch_file(path: str | Path, what: str = "checkpoint") -> Any:
    """The contents of the torch file ``path``, read without running any code from it (module
    doc). :class:`CheckpointError` (one line, naming the file) when it is missing, holds pickled
    objects other than tensors and plain data (refused, not run), or is truncated/corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found")
    try:
        with torch.serialization.safe_globals(NUMPY_RNG_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. "Detected pickle protocol 4": the error says it all
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = _unsafe_globals(path) or re.findall(r"GLOBAL ([\w.]+)", str(exc))  # the latter: legacy (non-zip) files
        if unsafe:
            raise CheckpointError(
                f"{path}: refused: the {what} holds pickled Python objects ({', '.join(unsafe[:3])}), not only tensors "
                "and plain data; loading it could run code from the file, so it was not loaded. Use a file written by "
                "cxrdebias, or re-save the weights as a state dict of tensors (torch.save(model.state_dict(), ...))"
            ) from None
        raise CheckpointError(f"{path}: cannot load the {what}: unreadable, truncated or not a torch file ({_detail(exc)})") from None
    except Exception as exc:  # torch raises RuntimeError/EOFError/ValueError/... on truncated or corrupt files
        raise CheckpointError(f"{path}: cannot load the {what}: unreadable, truncated or not a torch file ({_detail(exc)})") from None


def _unsafe_globals(path: Path) -> list[str]:
    """The globals (classes/functions) a torch file names that :func:`load_torch_file` does not
    allow (read from the pickle opcodes; nothing is run)."""
    try:
        allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__name__}" for g in NUMPY_RNG_GLOBALS}
        return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
    except Exception:
        return []


def _detail(exc: BaseException) -> str:
    """torch's reason on one line (for a refused unpickling: its cause without the advice around it)."""
    text = " ".join(str(exc).split())
    for preamble in ("WeightsUnpickler error:", "from a trusted source."):
        if preamble in text:
            text = text.split(preamble, 1)[1]
            break
    text = text.split(" Check the documentation", 1)[0].strip()
    return f"{exc.__class__.__name__}: {text[:200]}"


def read_state_dict(path: str | Path, expected: str) -> dict[str, torch.Tensor]:
    """Tensors of the checkpoint at ``path``: a state dict, or a dict holding one under
    ``state_dict``/``model``/``model_state_dict`` (read by :func:`load_torch_file`: a pickled
    module is refused). ``expected`` words the error ("a ResNet-18 state dict")."""
    obj: Any = load_torch_file(path, "pretrained weights file")
    path = Path(path)
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
