"""Colour photographs read lazily from disk (CelebA, IMDB Face): the dataset, the ImageNet
transforms and the (target, bias)-group sampling both protocols use.

Unlike the chest X-rays (:mod:`cxrdebias.data.images`, one grey ``[0, 1]`` reader shared with
the ONNX runtime), these are RGB JPEGs for an ImageNet ResNet: Pillow decodes them, torchvision
resizes to ``image_size × image_size``, flips horizontally at random (training only) and
normalises with the ImageNet mean/std. Nothing is held in memory but the file list and the
labels; images are decoded per batch (``train.num_workers`` processes).

Groups: a sample's group is its ``(target, bias)`` pair, named ``"t=<target>,b=<bias>"`` as in
:func:`cxrdebias.evaluation.metrics.group_accuracy`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field
from torchvision import transforms as T

from cxrdebias.data.base import Batch
from cxrdebias.errors import DataError
from cxrdebias.fileio import sha256_tensors

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PhotoDataConfig(BaseModel):
    """Options shared by the photo datasets (each adds its ``kind`` and its own fields)."""

    model_config = ConfigDict(extra="forbid")

    root: str | None = Field(None, description="dataset folder on the user's disk (never downloaded)")
    image_size: int = Field(224, ge=8, description="images are resized to image_size × image_size (published: 224)")
    hflip: bool = Field(True, description="random horizontal flip of training images (never of evaluation images)")
    split_seed: int = Field(42, description="seed of the validation sampling and of the test-set balancing")


def val_fraction_field(default: float) -> Any:
    """The ``val_fraction`` option of a photo dataset's config: the share that
    :func:`validation_split` takes from every (target, bias) group (the default differs by dataset)."""
    return Field(
        default, ge=0, lt=1, description="validation = this share of the smallest training group, drawn from every group"
    )


def photo_transform(image_size: int, *, train: bool, hflip: bool = True) -> T.Compose:
    """PIL RGB image → normalised ``3×S×S`` float tensor (flip only when ``train and hflip``)."""
    steps: list[Any] = [T.Resize((image_size, image_size))]
    if train and hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)


def read_photo(path: Path) -> Image.Image:
    """Decode ``path`` as an RGB image; a missing or undecodable file is a :class:`DataError`."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc.__class__.__name__}: {exc})") from None


def check_files_exist(paths: list[Path], what: str) -> None:
    """Refuse a dataset whose image files are not all there (before anything trains)."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{missing[0]}: image not found{more}; expected the {what} images there")


class PhotoDataset(torch.utils.data.Dataset):
    """Image files + labels as samples of the :mod:`cxrdebias.data.base` contract.

    ``rows`` are the samples' positions in the source list (the CelebA attribute file, the
    IMDB split CSV), kept for provenance; ``index`` is the position in this dataset.
    """

    def __init__(
        self,
        paths: list[Path],
        targets: torch.Tensor,
        biases: torch.Tensor,
        rows: torch.Tensor,
        transform: T.Compose,
        *,
        name: str,
        class_names: list[str],
        bias_names: list[str],
    ):
        n = len(paths)
        if targets.shape != (n,) or biases.shape != (n,) or rows.shape != (n,):
            raise ValueError(f"{name}: paths ({n}), targets, biases and rows must have one entry per sample")
        self.paths = paths
        self.targets = targets.long()
        self.biases = biases.long()
        self.rows = rows.long()
        self.transform = transform
        self.name = name
        self.class_names = class_names
        self.bias_names = bias_names

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Batch:
        return Batch(
            image=self.transform(read_photo(self.paths[i])),
            target=self.targets[i],
            bias=self.biases[i],
            index=torch.tensor(i, dtype=torch.long),
        )

    def subset(self, index: np.ndarray, *, name: str, transform: T.Compose | None = None) -> PhotoDataset:
        """The samples at ``index`` (in that order) as a new dataset."""
        idx = torch.as_tensor(index, dtype=torch.long)
        return PhotoDataset(
            [self.paths[i] for i in index.tolist()],
            self.targets[idx],
            self.biases[idx],
            self.rows[idx],
            transform or self.transform,
            name=name,
            class_names=self.class_names,
            bias_names=self.bias_names,
        )

    def group_counts(self) -> dict[str, int]:
        """Number of samples per ``(target, bias)`` group present."""
        return group_counts(self.targets.numpy(), self.biases.numpy())


def group_counts(targets: np.ndarray, biases: np.ndarray) -> dict[str, int]:
    """``{"t=<target>,b=<bias>": n}`` for every group present, in sorted order."""
    if len(targets) == 0:
        return {}
    keys, counts = np.unique(np.stack([targets, biases], axis=1), axis=0, return_counts=True)
    return {f"t={int(t)},b={int(b)}": int(n) for (t, b), n in zip(keys, counts, strict=True)}


def _group_members(targets: np.ndarray, biases: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    pairs = sorted({(int(t), int(b)) for t, b in zip(targets.tolist(), biases.tolist(), strict=True)})
    return {(t, b): np.flatnonzero((targets == t) & (biases == b)) for t, b in pairs}


def sample_per_group(
    targets: np.ndarray, biases: np.ndarray, n_per_group: int, rng: np.random.Generator
) -> np.ndarray:
    """Sorted indices of ``n_per_group`` samples drawn without replacement from every group present."""
    chosen = [rng.choice(idx, size=n_per_group, replace=False) for idx in _group_members(targets, biases).values()]
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)


def validation_split(
    targets: np.ndarray, biases: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(train, val)`` indices: ``int(fraction × smallest group)`` samples per present group go
    to validation (EnD's CelebA protocol with ``fraction = 0.2``), the rest stay in training."""
    counts = group_counts(targets, biases)
    n_val = int(fraction * min(counts.values())) if counts else 0
    if n_val == 0:
        return np.arange(len(targets)), np.empty(0, dtype=np.int64)
    val = sample_per_group(targets, biases, n_val, np.random.default_rng(seed))
    return np.setdiff1d(np.arange(len(targets)), val), val


def balanced_indices(
    targets: np.ndarray, biases: np.ndarray, num_classes: int, num_biases: int, seed: int, what: str
) -> np.ndarray:
    """Sorted indices of a subset with the same number of samples in every ``(target, bias)``
    group — the size of the smallest group (every group must occur)."""
    counts = group_counts(targets, biases)
    absent = [f"t={t},b={b}" for t in range(num_classes) for b in range(num_biases) if f"t={t},b={b}" not in counts]
    if absent:
        raise DataError(f"{what}: no sample in group(s) {', '.join(absent)}; cannot build a balanced (unbiased) set")
    return sample_per_group(targets, biases, min(counts.values()), np.random.default_rng(seed))


@dataclass
class PhotoSplits:
    """Training, validation and test sets of a photo protocol, and their provenance."""

    train: PhotoDataset
    val: PhotoDataset | None
    tests: dict[str, PhotoDataset]
    num_classes: int
    num_biases: int
    source_files: list[str]
    source_sha256: str
    info: dict[str, Any] = field(default_factory=dict)

    def datasets(self) -> dict[str, PhotoDataset]:
        out = {"train": self.train, **({"val": self.val} if self.val is not None else {})}
        return {**out, **self.tests}

    def data_hash(self) -> str:
        """Hash of the source lists, the image transform and the exact samples of every split
        (source rows, targets, biases); the image bytes are not read."""
        h = hashlib.sha256(self.source_sha256.encode())
        h.update(json.dumps(self.info.get("transform", {}), sort_keys=True).encode())
        for name, ds in self.datasets().items():
            h.update(name.encode())
            h.update(sha256_tensors(ds.rows, ds.targets, ds.biases).encode())
        return h.hexdigest()

    def summary(self) -> dict[str, Any]:
        """Sizes and group counts per split (recorded in ``run.json``)."""
        return {name: {"n": len(ds), "groups": ds.group_counts()} for name, ds in self.datasets().items()}
