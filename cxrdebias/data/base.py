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

from collections.abc import Iterator, Sequence
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
    boundary sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, seed: int, drop_last: bool):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._n = n
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)

    def __len__(self) -> int:
        return self._n // self.batch_size if self.drop_last else -(-self._n // self.batch_size)


class TensorBatchLoader(_EpochSeededLoader):
    """Batches of a :class:`TensorSamples` by tensor indexing (no per-sample Python calls)."""

    def __init__(self, samples: TensorSamples, batch_size: int, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False):
        super().__init__(len(samples), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.samples = samples

    def __iter__(self) -> Iterator[Batch]:
        n = len(self.samples)
        order = torch.randperm(n, generator=self.generator()) if self.shuffle else torch.arange(n)
        for b in range(len(self)):
            yield self.samples.batch(order[b * self.batch_size : (b + 1) * self.batch_size])


class EpochDataLoader(_EpochSeededLoader):
    """A :class:`torch.utils.data.DataLoader` with the same epoch-seeded shuffling — the
    streaming counterpart of :class:`TensorBatchLoader` for datasets too large for memory."""

    def __init__(self, dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0, num_workers: int = 0, collate_fn=None, drop_last: bool = False):
        super().__init__(len(dataset), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.dataset = dataset
        self.num_workers = num_workers
        self.collate_fn = collate_fn

    def __iter__(self) -> Iterator[Batch]:
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
) -> TensorBatchLoader | EpochDataLoader:
    """The loader that fits ``samples``: tensor indexing for an in-memory
    :class:`TensorSamples`, a streaming :class:`EpochDataLoader` (``num_workers`` processes,
    :func:`collate`) for any other dataset of the sample contract."""
    if isinstance(samples, TensorSamples):
        return TensorBatchLoader(samples, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
    return EpochDataLoader(
        samples, batch_size, shuffle=shuffle, seed=seed, num_workers=num_workers, collate_fn=collate, drop_last=drop_last
    )
