"""The sample contract shared by every dataset and every method.

A *sample* is a mapping with

- ``image``: float tensor ``C×H×W`` (already normalised),
- ``target``: int64 class label,
- ``bias``: int64 bias label (colour, site, gender …); :data:`UNKNOWN_BIAS` when unknown,
- ``index``: int64 position of the sample in its dataset (a stable id).

A *batch* is the same mapping with a leading batch dimension. Every dataset yields it, every
method consumes it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypedDict

import torch

UNKNOWN_BIAS = -1


class Batch(TypedDict):
    image: torch.Tensor
    target: torch.Tensor
    bias: torch.Tensor
    index: torch.Tensor


@dataclass
class TensorSamples(torch.utils.data.Dataset):
    """An in-memory dataset: every field is one tensor with the samples along dim 0.

    ``group_names`` optionally names the bias values (e.g. colour or site names).
    """

    images: torch.Tensor
    targets: torch.Tensor
    biases: torch.Tensor
    name: str = ""
    bias_names: list[str] | None = None
    class_names: list[str] | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.targets.shape != (n,) or self.biases.shape != (n,):
            raise ValueError(
                f"{self.name or 'dataset'}: images ({n}), targets {tuple(self.targets.shape)} and "
                f"biases {tuple(self.biases.shape)} must have one entry per sample"
            )
        self.targets = self.targets.long()
        self.biases = self.biases.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> Batch:
        return Batch(
            image=self.images[i],
            target=self.targets[i],
            bias=self.biases[i],
            index=torch.tensor(i, dtype=torch.long),
        )

    def batch(self, index: torch.Tensor) -> Batch:
        return Batch(
            image=self.images[index],
            target=self.targets[index],
            bias=self.biases[index],
            index=index,
        )


class _EpochSeededLoader:
    """Shared by the loaders below: batch size, epoch-seeded shuffling, ``len`` in batches.

    The order of epoch ``e`` depends only on ``(seed, e)``, so a run resumed at an epoch
    boundary sees exactly the batches an uninterrupted run would. With ``weights`` (one
    non-negative weight per sample, e.g. :func:`cxrdebias.data.sampling.group_balanced_weights`)
    an epoch is instead ``n`` indices drawn *with replacement*, sample ``i`` with probability
    ∝ ``weights[i]``, from the same ``(seed, e)`` generator (``shuffle`` is then irrelevant).
    ``weights`` may also be a function, asked once at the start of every epoch (before its first
    batch) for that epoch's weights; when it returns ``None`` the epoch is the unweighted one.
    Group-balanced sampling on ``--bias auto``'s pseudo labels uses it: the weights come from the
    labels of the epochs before (the caller keeps them in its checkpoints, so a resumed run draws
    the same epoch).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        drop_last: bool,
        rank: int = 0,
        world_size: int = 1,
        weights: torch.Tensor | Callable[[], torch.Tensor | None] | None = None,
    ):
        self._n = n
        self.weights_fn = weights if callable(weights) else None
        self.weights = None if weights is None or callable(weights) else self._checked(weights)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if batch_size % world_size:
            raise ValueError(f"the global batch_size {batch_size} must be divisible by world_size {world_size}")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def _checked(self, weights: torch.Tensor) -> torch.Tensor:
        weights = torch.as_tensor(weights, dtype=torch.float64)
        n = self._n
        if weights.shape != (n,) or not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights must be {n} finite non-negative values, not all 0")
        return weights

    def epoch_weights(self) -> torch.Tensor | None:
        """This epoch's sampling weights (``None``: unweighted): the fixed ones, or what the
        weights function answers now. Asked once per epoch, when its iteration starts."""
        if self.weights_fn is None:
            return self.weights
        w = self.weights_fn()
        return None if w is None else self._checked(w)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)

    @property
    def _n_total(self) -> int:
        """Samples per epoch over all ranks: padded to a multiple of ``world_size``."""
        return -(-self._n // self.world_size) * self.world_size

    def __len__(self) -> int:
        n = self._n_total
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """This epoch's sample order (same on every rank): a permutation, or with ``weights``
        (default: the fixed ones) ``n`` weighted draws with replacement."""
        weights = self.weights if weights is None else weights
        if weights is not None:
            order = torch.multinomial(weights, self._n, replacement=True, generator=self.generator())
        else:
            order = torch.randperm(self._n, generator=self.generator()) if self.shuffle else torch.arange(self._n)
        pad = self._n_total - self._n
        return torch.cat([order, order[:pad]]) if pad else order  # DistributedSampler's padding

    def batch_indices(self, weights: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """This rank's indices of each batch: the contiguous ``rank``-th share of every global
        batch of ``batch_size`` (the whole batch in a single process), so the ranks' batches
        concatenated in rank order are the one-process batch. With ``world_size > 1`` the
        epoch is padded by repeating its first samples until it divides evenly. ``weights``:
        this epoch's (:meth:`epoch_weights`; default: the fixed ones)."""
        order = self.order(weights)
        for b in range(len(self)):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            per_rank = batch.shape[0] // self.world_size
            yield batch[self.rank * per_rank : (self.rank + 1) * per_rank] if self.world_size > 1 else batch


class TensorBatchLoader(_EpochSeededLoader):
    """Batches of a :class:`TensorSamples` by tensor indexing (no per-sample Python calls)."""

    def __init__(
        self,
        samples: TensorSamples,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        weights: torch.Tensor | Callable[[], torch.Tensor | None] | None = None,
    ):
        super().__init__(
            len(samples), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, rank=rank, world_size=world_size,
            weights=weights,
        )
        self.samples = samples

    def __iter__(self) -> Iterator[Batch]:
        for index in self.batch_indices(self.epoch_weights()):
            yield self.samples.batch(index)


class EpochDataLoader(_EpochSeededLoader):
    """A :class:`torch.utils.data.DataLoader` with the same epoch-seeded shuffling — the
    streaming counterpart of :class:`TensorBatchLoader` for datasets too large for memory."""

    def __init__(
        self,
        dataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        collate_fn=None,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        weights: torch.Tensor | Callable[[], torch.Tensor | None] | None = None,
    ):
        super().__init__(
            len(dataset), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, rank=rank, world_size=world_size,
            weights=weights,
        )
        self.dataset = dataset
        self.num_workers = num_workers
        self.collate_fn = collate_fn

    def __iter__(self) -> Iterator[Batch]:
        # weighted draws, or this rank's share of each global batch: the batches of batch_indices
        weights = self.epoch_weights()
        if self.world_size > 1 or weights is not None:
            yield from torch.utils.data.DataLoader(
                self.dataset,
                batch_sampler=[b.tolist() for b in self.batch_indices(weights)],
                num_workers=self.num_workers,
                collate_fn=self.collate_fn,
                generator=self.generator(),
            )
            return
        yield from torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            generator=self.generator(),
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            drop_last=self.drop_last,
        )


def collate(samples: Sequence[Batch]) -> Batch:
    """Stack samples into a batch with the same keys (for ``torch.utils.data.DataLoader``)."""
    return Batch(
        image=torch.stack([s["image"] for s in samples]),
        target=torch.stack([s["target"] for s in samples]),
        bias=torch.stack([s["bias"] for s in samples]),
        index=torch.stack([s["index"] for s in samples]),
    )


def make_loader(
    samples: TensorSamples | torch.utils.data.Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    weights: torch.Tensor | Callable[[], torch.Tensor | None] | None = None,
) -> TensorBatchLoader | EpochDataLoader:
    """The loader that fits ``samples``: tensor indexing for an in-memory
    :class:`TensorSamples`, a streaming :class:`EpochDataLoader` (``num_workers`` processes,
    :func:`collate`) for any other dataset of the sample contract.

    Under data-parallel training (``world_size > 1``) ``batch_size`` is the global batch and
    the loader yields rank ``rank``'s contiguous share of each one. ``weights``: draw each epoch
    with replacement by these per-sample weights instead of shuffling, or a function that gives
    each epoch's weights (``None``: shuffle) at its start (:class:`_EpochSeededLoader`)."""
    if isinstance(samples, TensorSamples):
        return TensorBatchLoader(
            samples, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, rank=rank, world_size=world_size,
            weights=weights,
        )
    return EpochDataLoader(
        samples,
        batch_size,
        shuffle=shuffle,
        seed=seed,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
        weights=weights,
    )
