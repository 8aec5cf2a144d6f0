"""Biased MNIST (Bahng et al., ICML 2020): colour as a shortcut for the digit class.

Every digit pixel that is not 0 becomes white; the background takes one of ten colours. In the
training set, digit class ``c`` gets colour ``c`` with correlation ``ρ``: per class, the first
``int(ρ·n)`` samples (in a seeded random order) take the class colour and the rest are spread
evenly over the other nine colours. ``ρ = 1.0`` gives the fully *biased* test set; ``ρ = 0.1``
gives the *unbiased* one (every colour equally likely for every digit).

**Patch variant** (``bias_kind: patch``, the local-shortcut benchmark of issue 23): the digit
stays white on a *black* background and the bias label ``b`` (the same ρ mechanics,
:func:`assign_colours`) decides a small square *patch*: with ``patch_by: position`` (default) a
white patch at anchor ``b`` of :func:`patch_anchors` (ten places in the empty margin around the
digit: four along the top edge, four along the bottom edge, the middle of the left and of the
right edge); with ``patch_by: colour`` a patch of colour ``b`` near the top-left corner. Each
image moves its patch by up to ``patch_jitter`` pixels in each direction (kept inside the image).

Sources (never downloaded):

- the standard torchvision layout: ``ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``
  (``ROOT/raw/…`` and ``ROOT/…`` are accepted too) — full MNIST when the user has it;
- the offline **MNIST-15k** protocol (``shared/data/mnist15k``: 12,000 train / 3,000 test digits
  in that same layout);
- any other IDX pair given by its prefix (``train_prefix="train5k"``).
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cxrdebias.data.base import TensorSamples
from cxrdebias.errors import DataError
from cxrdebias.fileio import sha256_files, sha256_tensors

#: background colours (RGB) of classes 0…9, as published
COLOURS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (225, 225, 0),
    (225, 0, 225),
    (0, 255, 255),
    (255, 128, 0),
    (255, 0, 128),
    (128, 0, 255),
    (128, 128, 128),
)
COLOUR_NAMES = ["red", "green", "blue", "yellow", "magenta", "cyan", "orange", "pink", "purple", "grey"]
#: the places of the patch of bias labels 0…9 (``patch_by: position``), see :func:`patch_anchors`
PATCH_POSITION_NAMES = [
    "top-left", "top-centre-left", "top-centre-right", "top-right",
    "bottom-left", "bottom-centre-left", "bottom-centre-right", "bottom-right", "left", "right",
]  # fmt: skip
NUM_CLASSES = 10
#: rho of the unbiased test set (every colour equally likely)
UNBIASED_RHO = 0.1

_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049


class BiasedMNISTConfig(BaseModel):
    """Data options of a Biased-MNIST run."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["biased_mnist"] = "biased_mnist"
    root: str | None = Field(None, description="folder with the MNIST IDX files (see module doc)")
    rho: float = Field(0.997, description="colour–digit correlation of the training set, in (0, 1]")
    train_prefix: str = "train"
    test_prefix: str = "t10k"
    val_fraction: float = Field(
        0.3,
        ge=0,
        lt=1,
        description="share of the training digits re-coloured with rho=0.1 as a validation set "
        "(EnD's protocol; the digits stay in the training set)",
    )
    limit_train: int | None = Field(None, ge=1, description="use only the first N training digits (tests)")
    limit_test: int | None = Field(None, ge=1, description="use only the first N test digits (tests)")
    bias_kind: Literal["colour", "patch"] = Field(
        "colour",
        description="colour: the published protocol (background colour = bias label); patch: a small "
        "square patch whose place (or colour, patch_by) is the bias label, on a black background",
    )
    patch_by: Literal["position", "colour"] = Field(
        "position", description="what the bias label decides with bias_kind=patch: the patch's place or its colour"
    )
    patch_size: int = Field(4, ge=1, le=9, description="side of the patch in pixels (bias_kind=patch)")
    patch_jitter: int = Field(
        1, ge=0, le=4, description="largest random offset of the patch per direction, in pixels (bias_kind=patch)"
    )

    @model_validator(mode="after")
    def _check_patch_options(self) -> BiasedMNISTConfig:
        if self.bias_kind == "colour":
            unused = [f for f in _PATCH_FIELDS if getattr(self, f) != type(self).model_fields[f].default]
            if unused:
                raise ValueError(f"{', '.join(unused)} given but bias_kind is colour: set data.bias_kind=patch")
        return self


_PATCH_FIELDS = ("patch_by", "patch_size", "patch_jitter")


# -- IDX reading ----------------------------------------------------------------------------
def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | Path, *, expect_magic: int | None = None) -> np.ndarray:
    """Read an IDX file (``.gz`` or not) into a ``uint8`` array, validating its header."""
    path = Path(path)
    try:
        with _open(path) as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read ({exc}); expected an IDX file, optionally gzip-compressed") from None
    if len(raw) < 8:
        raise DataError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    magic = struct.unpack(">I", raw[:4])[0]
    if expect_magic is not None and magic != expect_magic:
        raise DataError(f"{path}: IDX magic number {magic}, expected {expect_magic}")
    dtype_code, ndim = raw[2], raw[3]
    if raw[0] != 0 or raw[1] != 0 or dtype_code != 0x08 or ndim < 1:
        raise DataError(f"{path}: not an unsigned-byte IDX file (header {raw[:4].hex()})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DataError(f"{path}: holds {len(raw) - header} data bytes, header says {expected} (shape {shape}); file truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def find_mnist_files(root: str | Path, prefix: str) -> tuple[Path, Path]:
    """Locate ``{prefix}-images-idx3-ubyte[.gz]`` and the labels file under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: MNIST folder not found (expected the torchvision layout ROOT/MNIST/raw/)")
    tried = []
    for folder in (root / "MNIST" / "raw", root / "raw", root):
        for suffix in ("", ".gz"):
            images = folder / f"{prefix}-images-idx3-ubyte{suffix}"
            labels = folder / f"{prefix}-labels-idx1-ubyte{suffix}"
            tried.append(str(images))
            if images.is_file() and labels.is_file():
                return images, labels
    raise DataError(
        f"{root}: no MNIST files with prefix {prefix!r}; expected {prefix}-images-idx3-ubyte[.gz] and "
        f"{prefix}-labels-idx1-ubyte[.gz] in ROOT/MNIST/raw, ROOT/raw or ROOT"
    )


def load_mnist(root: str | Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor, list[Path]]:
    """Digits (``N×28×28`` uint8), labels (``N`` int64) and the files they came from."""
    images_path, labels_path = find_mnist_files(root, prefix)
    images = read_idx(images_path, expect_magic=_IMAGES_MAGIC)
    labels = read_idx(labels_path, expect_magic=_LABELS_MAGIC)
    if images.ndim != 3:
        raise DataError(f"{images_path}: expected N×rows×cols images, got shape {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"{labels_path}: {labels.shape[0]} labels for {images.shape[0]} images in {images_path.name}")
    if labels.size and labels.max() >= NUM_CLASSES:
        row = int(np.argmax(labels >= NUM_CLASSES))
        raise DataError(f"{labels_path}: label {labels[row]} at row {row}; expected digits 0–9")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)), [images_path, labels_path]


# -- colouring ----------------------------------------------------------------------------------
def check_rho(rho: float) -> float:
    if not (0.0 < rho <= 1.0):
        raise DataError(f"rho={rho}: the colour–digit correlation must be in (0, 1]")
    return float(rho)


def assign_colours(labels: torch.Tensor, rho: float, seed: int) -> torch.Tensor:
    """Colour (bias) label of every sample for correlation ``rho`` (reproducible from ``seed``).

    Per class ``c`` (``n`` samples in a seeded random order): the first ``int(rho·n)`` get colour
    ``c``; the remaining samples are split into nine near-equal parts, one per other colour (the
    order of the other colours is also seeded).
    """
    check_rho(rho)
    rng = np.random.default_rng(seed)
    labels_np = labels.numpy()
    colours = np.empty_like(labels_np)
    for c in range(NUM_CLASSES):  # 10 classes: a fixed, tiny loop over the protocol's classes
        idx = np.flatnonzero(labels_np == c)
        rng.shuffle(idx)
        n_corr = int(rho * len(idx))
        colours[idx[:n_corr]] = c
        others = [(c + k) % NUM_CLASSES for k in range(1, NUM_CLASSES)]
        rng.shuffle(others)
        for part, colour in zip(np.array_split(idx[n_corr:], NUM_CLASSES - 1), others, strict=True):
            colours[part] = colour
    return torch.from_numpy(colours)


def colourise(digits: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """``N×28×28`` uint8 digits + colour labels → ``N×3×28×28`` uint8 RGB images.

    Digit pixels (any non-zero value) become white; background pixels take the colour.
    """
    palette = torch.tensor(COLOURS, dtype=torch.uint8)  # 10×3
    fg = (digits != 0).unsqueeze(1)  # N×1×H×W
    bg = palette[colours].view(-1, 3, 1, 1).expand(-1, -1, *digits.shape[1:])
    return torch.where(fg, torch.full_like(bg, 255), bg)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB → float normalised with mean 0.5 / std 0.5 (values in [-1, 1])."""
    return images.float().div_(255.0).sub_(0.5).div_(0.5)


def patch_anchors(height: int, width: int, size: int) -> np.ndarray:
    """Top-left corners ``(row, col)`` of the patch of bias labels 0…9 (``patch_by: position``),
    ``10×2``: four evenly spaced along the top edge, the same four along the bottom edge, then the
    middle of the left and of the right edge (:data:`PATCH_POSITION_NAMES`)."""
    cols = [int(round(k * (width - size) / 3)) for k in range(4)]
    mid = int(round((height - size) / 2))
    corners = [(0, c) for c in cols] + [(height - size, c) for c in cols] + [(mid, 0), (mid, width - size)]
    return np.array(corners, dtype=np.int64)


def patch_images(
    digits: torch.Tensor, biases: torch.Tensor, *, by: str, size: int, jitter: int, seed: int
) -> torch.Tensor:
    """``N×28×28`` uint8 digits + bias labels → ``N×3×28×28`` uint8 RGB images: white digit on
    black, plus a ``size``-pixel square patch (white at anchor ``b`` with ``by="position"``, colour
    ``b`` at the top-left anchor with ``by="colour"``), moved by up to ``jitter`` pixels per
    direction (seeded by ``[seed, 23]``) and kept inside the image; it covers the digit there."""
    n, h, w = digits.shape
    b = biases.numpy()
    anchors = patch_anchors(h, w, size)
    corner = anchors[b] if by == "position" else np.repeat(anchors[:1], n, axis=0)
    offset = np.random.default_rng([seed, 23]).integers(-jitter, jitter + 1, size=(n, 2))
    yx = torch.from_numpy(np.clip(corner + offset, 0, [h - size, w - size]))
    rows, cols = torch.arange(h), torch.arange(w)
    in_rows = (rows >= yx[:, :1]) & (rows < yx[:, :1] + size)  # N×H
    in_cols = (cols >= yx[:, 1:]) & (cols < yx[:, 1:] + size)  # N×W
    patch = (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)  # N×1×H×W
    palette = torch.tensor(COLOURS, dtype=torch.uint8)
    colour = palette[biases] if by == "colour" else torch.full((n, 3), 255, dtype=torch.uint8)
    digit = ((digits != 0).to(torch.uint8) * 255).unsqueeze(1).expand(-1, 3, -1, -1)
    return torch.where(patch, colour.view(n, 3, 1, 1), digit)


def make_split(
    digits: torch.Tensor,
    labels: torch.Tensor,
    rho: float,
    seed: int,
    name: str,
    cfg: BiasedMNISTConfig | None = None,
) -> TensorSamples:
    """One split: bias labels at correlation ``rho`` (:func:`assign_colours`), drawn as the
    background colour or, with ``cfg.bias_kind == "patch"``, as a patch."""
    colours = assign_colours(labels, rho, seed)
    info: dict[str, object] = {"rho": rho, "seed": seed}
    if cfg is not None and cfg.bias_kind == "patch":
        images = patch_images(digits, colours, by=cfg.patch_by, size=cfg.patch_size, jitter=cfg.patch_jitter, seed=seed)
        names = PATCH_POSITION_NAMES if cfg.patch_by == "position" else COLOUR_NAMES
        info |= {"bias_kind": "patch", "patch_by": cfg.patch_by}
    else:
        images, names = colourise(digits, colours), COLOUR_NAMES
    return TensorSamples(
        images=to_float(images),
        targets=labels,
        biases=colours,
        name=name,
        bias_names=names,
        class_names=[str(i) for i in range(NUM_CLASSES)],
        info=info,
    )


@dataclass
class BiasedMNIST:
    """The four splits of a Biased-MNIST experiment and their provenance."""

    train: TensorSamples
    val: TensorSamples | None
    test_biased: TensorSamples
    test_unbiased: TensorSamples
    source_sha256: str
    source_files: list[str]

    def data_hash(self) -> str:
        """Hash of the source files and of the exact tensors the run trains and tests on."""
        parts = [self.train, self.val, self.test_biased, self.test_unbiased]
        return sha256_tensors(*[t for s in parts if s is not None for t in (s.images, s.targets, s.biases)])


def build_biased_mnist(cfg: BiasedMNISTConfig, seed: int) -> BiasedMNIST:
    """Build train (ρ), validation (ρ=0.1 re-colouring of a fixed share of the training digits),
    biased test (ρ=1) and unbiased test (ρ=0.1) sets.

    The test digits are never seen in training. Colours are a deterministic function of
    ``seed`` (and of ρ), so a run is reproducible from its config.
    """
    if cfg.root is None:
        raise DataError("no MNIST folder given: pass --data-root (torchvision layout ROOT/MNIST/raw/)")
    rho = check_rho(cfg.rho)
    train_digits, train_labels, train_files = load_mnist(cfg.root, cfg.train_prefix)
    test_digits, test_labels, test_files = load_mnist(cfg.root, cfg.test_prefix)
    if cfg.limit_train:
        train_digits, train_labels = train_digits[: cfg.limit_train], train_labels[: cfg.limit_train]
    if cfg.limit_test:
        test_digits, test_labels = test_digits[: cfg.limit_test], test_labels[: cfg.limit_test]
    files = train_files + test_files
    train = make_split(train_digits, train_labels, rho, seed, "train", cfg)
    val = None
    if cfg.val_fraction > 0:
        g = torch.Generator().manual_seed(seed + 1)
        n_val = int(cfg.val_fraction * len(train_labels))
        idx = torch.randperm(len(train_labels), generator=g)[:n_val].sort().values
        val = make_split(train_digits[idx], train_labels[idx], UNBIASED_RHO, seed + 2, "val", cfg)
    return BiasedMNIST(
        train=train,
        val=val,
        test_biased=make_split(test_digits, test_labels, 1.0, seed + 3, "test_biased", cfg),
        test_unbiased=make_split(test_digits, test_labels, UNBIASED_RHO, seed + 4, "test_unbiased", cfg),
        source_sha256=sha256_files(files),
        source_files=[str(p) for p in files],
    )
