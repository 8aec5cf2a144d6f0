"""Group-balanced sampling: the (target, bias) cells of a training split and the per-sample
weights that make every cell equally likely (``train.sampling=group_balanced``).

This is the "SUBG/RWG"-style baseline of Idrissi et al. (2022, "Simple data balancing achieves
competitive worst-group-accuracy"), in its sampling form: each epoch draws ``len(train)``
indices *with replacement*, sample ``i`` with probability ∝ ``1 / n(cell(i))``, where
``n(cell)`` is the number of training samples with the same target and bias label — so each
non-empty cell (site × label on the CXR set) is drawn with probability ``1 / #cells``. A cell
with no sample is simply absent. The draw itself is the loaders' (:mod:`cxrdebias.data.base`):
seeded by ``(seed, epoch)`` like their shuffling, so a resumed run sees the same batches.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from cxrdebias.data.base import UNKNOWN_BIAS


class Cells(NamedTuple):
    """The non-empty (target, bias) cells of a split."""

    keys: torch.Tensor  #: K×2 (target, bias) of each cell, sorted
    counts: torch.Tensor  #: K samples per cell
    index: torch.Tensor  #: N: the cell of each sample (a row of ``keys``)

    def weights(self) -> torch.Tensor:
        """Per-sample sampling weights ``1 / n(cell)`` (float64): every cell's total is 1."""
        return 1.0 / self.counts.double()[self.index]

    def describe(self) -> dict[str, int]:
        """``{"t=<target>,b=<bias>": n}`` per cell (the keys of :func:`~cxrdebias.evaluation.metrics.group_accuracy`)."""
        return {f"t={int(t)},b={int(b)}": int(n) for (t, b), n in zip(self.keys.tolist(), self.counts.tolist(), strict=True)}


def cells(targets: torch.Tensor, biases: torch.Tensor) -> Cells:
    """The (target, bias) cells of ``targets``/``biases`` (one label each per sample).

    Raises ``ValueError`` for an empty split, mismatched lengths or an unknown bias label
    (:data:`~cxrdebias.data.base.UNKNOWN_BIAS`): cells need the true bias of every sample."""
    targets, biases = torch.as_tensor(targets).long().reshape(-1), torch.as_tensor(biases).long().reshape(-1)
    if targets.shape != biases.shape:
        raise ValueError(f"targets ({targets.numel()}) and biases ({biases.numel()}) must have one entry per sample")
    if targets.numel() == 0:
        raise ValueError("no samples to balance")
    if (biases == UNKNOWN_BIAS).any():
        raise ValueError("group-balanced sampling needs the bias label of every sample (found unknown ones)")
    keys, index, counts = torch.unique(torch.stack([targets, biases], dim=1), dim=0, return_inverse=True, return_counts=True)
    return Cells(keys, counts, index)


def group_balanced_weights(targets: torch.Tensor, biases: torch.Tensor) -> torch.Tensor:
    """Per-sample sampling weights ``1 / n(cell)`` (float64): every non-empty (target, bias)
    cell gets the same total weight, 1. Draw with ``torch.multinomial(w, n, replacement=True)``."""
    return cells(targets, biases).weights()
