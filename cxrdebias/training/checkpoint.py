"""Training checkpoints: what they hold, how they rotate and how a run resumes from them.

A run folder's ``checkpoints/`` holds ``last.pt`` (the newest epoch; written atomically),
``prev.pt`` (the one before: ``last.pt`` is renamed to it before a new one is written, so a
crash or a full disk while writing leaves a readable checkpoint) and ``best.pt`` (the weights
of the epoch selected on the validation metric). Resume reads ``last.pt``, or ``prev.pt``
when ``last.pt`` is unreadable or of another format.

A training checkpoint (format :data:`CHECKPOINT_FORMAT`) is a dict with the keys ``format``,
``epoch``, ``model``, ``method``, ``method_extra``, ``optimizer``, ``scheduler``, ``history``,
``best``, ``rng``, ``fingerprint``, ``world_size`` and, under ``torchrun``, ``rng_per_rank``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cxrdebias.console import esc
from cxrdebias.debias.base import Method
from cxrdebias.distributed import World
from cxrdebias.errors import CheckpointError
from cxrdebias.training.runs import torch_load_checked, torch_save_atomic

CHECKPOINT_FORMAT = 1
#: resume candidates, newest first
RESUME_ORDER: tuple[str, ...] = ("last.pt", "prev.pt")


def rng_state() -> dict[str, Any]:
    """The random states of torch (CPU), numpy and Python of this process."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(rng: dict[str, Any]) -> None:
    """Restore the random states saved by :func:`rng_state`."""
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])


def training_state(
    epoch: int,
    *,
    model: nn.Module,
    method: Method,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    history: list[dict[str, Any]],
    best: dict[str, Any] | None,
    fingerprint: Any,
    world_size: int,
) -> dict[str, Any]:
    """The checkpoint of the end of ``epoch`` (without ``rng_per_rank``, which the caller adds)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "model": model.state_dict(),
        "method": method.state_dict(),
        "method_extra": method.extra_state(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler else None,
        "history": history,
        "best": best,
        "rng": rng_state(),
        "fingerprint": fingerprint,
        "world_size": world_size,
    }


def save_rotating(state: dict[str, Any], checkpoint_dir: Path) -> None:
    """Write ``state`` as ``last.pt`` (atomically), the previous ``last.pt`` kept as ``prev.pt``."""
    last = checkpoint_dir / "last.pt"
    if last.exists():
        last.replace(checkpoint_dir / "prev.pt")
    torch_save_atomic(state, last)


def read_resumable(checkpoint_dir: Path, fingerprint: Any) -> tuple[str, dict[str, Any], list[str]]:
    """The newest usable checkpoint: (file name, its state, why newer files were skipped).

    A file that cannot be read or has another format is skipped. Raises
    :class:`CheckpointError` when none is usable, or when the newest readable one was written
    by a run whose ``fingerprint`` differs (``None``: not compared).
    """
    errors = []
    for name in RESUME_ORDER:
        try:
            state = torch_load_checked(checkpoint_dir / name)
        except CheckpointError as exc:
            errors.append(str(exc))
            continue
        if state.get("format") != CHECKPOINT_FORMAT:
            errors.append(f"{name}: checkpoint format {state.get('format')}, expected {CHECKPOINT_FORMAT}")
            continue
        if fingerprint is not None and state.get("fingerprint") != fingerprint:
            raise CheckpointError(
                f"{checkpoint_dir / name}: written by a run with a different config; "
                "resume with the same options or start a new run"
            )
        return name, state, errors
    raise CheckpointError("no usable checkpoint to resume: " + "; ".join(errors))


def restore_training_state(
    state: dict[str, Any],
    path: Path,
    *,
    model: nn.Module,
    method: Method,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> None:
    """Load the weights and optimiser/scheduler states of ``state`` (read from ``path``) in place;
    :class:`CheckpointError` if the weights do not fit ``model``/``method``."""
    try:
        model.load_state_dict(state["model"])
        method.load_state_dict(state["method"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: does not fit this model ({exc})") from None
    method.load_extra_state(state["method_extra"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler and state["scheduler"]:
        scheduler.load_state_dict(state["scheduler"])


def rng_for_process(state: dict[str, Any], world: World, name: str) -> tuple[dict[str, Any], str | None]:
    """The random states this process resumes with, and a warning when the run cannot continue
    bit-identically (the checkpoint was written by another number of processes)."""
    per_rank = state.get("rng_per_rank")
    if world.distributed and per_rank is not None and len(per_rank) == world.world_size:
        return per_rank[world.rank], None
    if state.get("world_size", 1) != world.world_size:
        return state["rng"], (
            f"[yellow]{esc(name)} was written by {esc(state.get('world_size', 1))} process(es), this run has "
            f"{world.world_size}: training continues, but not bit-identically to an uninterrupted run[/]"
        )
    return state["rng"], None


def save_best(checkpoint_dir: Path, epoch: int, model: nn.Module, best: dict[str, Any]) -> None:
    """Write ``best.pt``: the weights of the selected epoch and the selection record."""
    torch_save_atomic({"epoch": epoch, "model": model.state_dict(), "best": best}, checkpoint_dir / "best.pt")


def load_best_weights(checkpoint_dir: Path, model: nn.Module) -> None:
    """Load the weights of ``best.pt`` into ``model``."""
    state = torch_load_checked(checkpoint_dir / "best.pt")
    model.load_state_dict(state["model"])


__all__ = [
    "CHECKPOINT_FORMAT",
    "RESUME_ORDER",
    "load_best_weights",
    "read_resumable",
    "restore_training_state",
    "rng_for_process",
    "rng_state",
    "save_best",
    "save_rotating",
    "set_rng_state",
    "training_state",
]
