"""CelebA (Liu et al., ICCV 2015) with gender as the shortcut: learn ``Blond_Hair`` or
``Heavy_Makeup``, with ``Male`` as the bias (the protocol of Nam et al., NeurIPS 2020, used by
EnD's Table 3).

On-disk layout (torchvision's; read from the user's disk, never downloaded)::

    ROOT/celeba/list_attr_celeba.txt       (ROOT/list_attr_celeba.txt is accepted too)
    ROOT/celeba/list_eval_partition.txt
    ROOT/celeba/img_align_celeba/000001.jpg …

``list_attr_celeba.txt``: line 1 the number of images, line 2 the 40 attribute names, then one
line per image: file name and one value per attribute, ``1`` (present) or ``-1`` (absent),
separated by white space. ``list_eval_partition.txt``: one line per image, file name and
partition ``0`` (train), ``1`` (valid) or ``2`` (test).

Splits (EnD authors' follow-up code, ``shared/REFERENCE-FACTS.md``):

- **training**: the *train* partition minus the validation samples;
- **validation**: ``int(val_fraction × size of the smallest (target, bias) group)`` samples drawn
  from *every* group of the train partition (``val_fraction = 0.2``);
- **unbiased test**: the *valid* partition balanced to its smallest (target, bias) group
  (seeded with ``split_seed = 42``); its accuracy is the mean over the four groups;
- **bias-conflicting test**: the part of the unbiased test set whose target differs from its
  bias label (two of the four groups).

Bias label: ``1`` is the value of the bias attribute that goes *with* target ``1`` in the
training partition (``bias_label="auto"``), so that *target ≠ bias* is the bias-conflicting part.
Blond hair and heavy make-up go with women, so for both protocols bias ``1`` means "not
``Male``" (bias names ``["Male", "not Male"]``); ``bias_label="attribute"`` / ``"inverted"``
fix the encoding instead.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from cxrdebias.data.photos import (
    PhotoDataConfig,
    PhotoDataset,
    PhotoSplits,
    balanced_indices,
    check_files_exist,
    photo_transform,
    val_fraction_field,
    validation_split,
)
from cxrdebias.errors import ConfigError, DataError
from cxrdebias.fileio import sha256_files

ATTRIBUTE_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
IMAGE_FOLDER = "img_align_celeba"
#: partition codes of list_eval_partition.txt
TRAIN, VALID, TEST = 0, 1, 2
_VALUES = {"1": 1, "-1": 0}


class CelebAConfig(PhotoDataConfig):
    """Data options of a CelebA run."""

    kind: Literal["celeba"] = "celeba"
    target: str = Field("Blond_Hair", description="attribute to learn (a name of list_attr_celeba.txt, any case)")
    bias: str = Field("Male", description="attribute that is the bias")
    bias_label: Literal["auto", "attribute", "inverted"] = Field(
        "auto",
        description="bias 1 = 'auto': the bias value that goes with target 1 in training; "
        "'attribute': attribute present; 'inverted': attribute absent",
    )
    val_fraction: float = val_fraction_field(0.2)


@dataclass
class CelebAAttributes:
    """The attribute table: ``values[i, j]`` is 1 when image ``files[i]`` has attribute ``names[j]``."""

    path: Path
    names: list[str]
    files: list[str]
    values: np.ndarray  # N×A int8 in {0, 1}


# -- files ----------------------------------------------------------------------------------------
def find_celeba(root: str | Path) -> Path:
    """The folder holding the two list files and ``img_align_celeba/`` (``ROOT/celeba`` or ``ROOT``)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: CelebA folder not found (expected the torchvision layout ROOT/celeba/{ATTRIBUTE_FILE})")
    for folder in (root / "celeba", root):
        if (folder / ATTRIBUTE_FILE).is_file():
            return folder
    raise DataError(
        f"{root}: no {ATTRIBUTE_FILE}; expected ROOT/celeba/{ATTRIBUTE_FILE}, {PARTITION_FILE} and "
        f"{IMAGE_FOLDER}/ (torchvision layout) or the same directly in ROOT"
    )


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read as text ({exc.__class__.__name__}: {exc})") from None


def read_attributes(path: str | Path) -> CelebAAttributes:
    """Parse ``list_attr_celeba.txt`` (format in the module doc), validating every line."""
    path = Path(path)
    lines = _read_lines(path)
    if len(lines) < 2:
        raise DataError(f"{path}: {len(lines)} line(s); expected the image count, the attribute names, then one line per image")
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise DataError(f"{path}: line 1: {lines[0].strip()!r}; expected the number of images") from None
    names = lines[1].split()
    if not names:
        raise DataError(f"{path}: line 2 is empty; expected the attribute names")
    files: list[str] = []
    rows: list[list[int]] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        fname, raw = parts[0], parts[1:]
        if len(raw) != len(names):
            raise DataError(f"{path}: line {number}: {len(raw)} attribute values for {fname}, expected {len(names)} (one per name on line 2)")
        try:
            rows.append([_VALUES[v] for v in raw])
        except KeyError:
            j = next(j for j, v in enumerate(raw) if v not in _VALUES)
            raise DataError(f"{path}: line {number}, attribute {names[j]}: {raw[j]!r}; expected 1 or -1") from None
        if fname in first_line:
            raise DataError(f"{path}: line {number}: {fname} is listed twice (first on line {first_line[fname]})")
        first_line[fname] = number
        files.append(fname)
    if len(files) != count:
        raise DataError(f"{path}: line 1 says {count} images, the file lists {len(files)}")
    values = np.array(rows, dtype=np.int8).reshape(len(files), len(names))
    return CelebAAttributes(path=path, names=names, files=files, values=values)


def read_partition(path: str | Path, files: list[str]) -> np.ndarray:
    """Partition code (0 train, 1 valid, 2 test) of every file of ``files``, in that order."""
    path = Path(path)
    code: dict[str, int] = {}
    for number, line in enumerate(_read_lines(path), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise DataError(f"{path}: line {number}: {line.strip()!r}; expected '<file name> <0|1|2>'")
        if parts[0] in code:
            raise DataError(f"{path}: line {number}: {parts[0]} is listed twice")
        code[parts[0]] = int(parts[1])
    missing = [f for f in files if f not in code]
    if missing:
        raise DataError(f"{path}: no partition for {missing[0]} ({len(missing)} image(s) of {ATTRIBUTE_FILE} missing)")
    if len(code) != len(files):
        extra = sorted(set(code) - set(files))
        raise DataError(f"{path}: lists {extra[0]} ({len(extra)} image(s) in all) that {ATTRIBUTE_FILE} does not")
    return np.array([code[f] for f in files], dtype=np.int8)


def resolve_attribute(name: str, attrs: CelebAAttributes, field: str) -> int:
    """Column of attribute ``name`` (case-insensitive); unknown names suggest the closest ones."""
    lower = [n.lower() for n in attrs.names]
    if name.lower() in lower:
        return lower.index(name.lower())
    close = difflib.get_close_matches(name, attrs.names, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(attrs.names)}"
    raise DataError(f"{field}={name!r}: not an attribute on line 2 of {attrs.path}; {hint}")


def orient_bias(
    targets: np.ndarray, attribute: np.ndarray, mode: str, name: str, train: np.ndarray
) -> tuple[np.ndarray, list[str], bool]:
    """Bias labels, bias names and whether the attribute was inverted (see ``bias_label``).

    ``"auto"`` inverts when target 1 is rarer among training samples *with* the attribute than
    among those without it.
    """
    if mode == "auto":
        t, a = targets[train], attribute[train]
        rate_with = t[a == 1].mean() if (a == 1).any() else 0.0
        rate_without = t[a == 0].mean() if (a == 0).any() else 0.0
        inverted = bool(rate_with < rate_without)
    else:
        inverted = mode == "inverted"
    if inverted:
        return 1 - attribute, [name, f"not {name}"], True
    return attribute.copy(), [f"not {name}", name], False


# -- the protocol --------------------------------------------------------------------------------
def build_celeba(cfg: CelebAConfig) -> PhotoSplits:
    """Training, validation and the unbiased test set (module doc) from the user's CelebA folder."""
    if cfg.root is None:
        raise DataError("no CelebA folder given: pass --data-root (torchvision layout ROOT/celeba/)")
    folder = find_celeba(cfg.root)
    attrs = read_attributes(folder / ATTRIBUTE_FILE)
    partition = read_partition(folder / PARTITION_FILE, attrs.files)
    t_col = resolve_attribute(cfg.target, attrs, "data.target")
    b_col = resolve_attribute(cfg.bias, attrs, "data.bias")
    if t_col == b_col:
        raise ConfigError(f"data.target and data.bias are the same attribute ({attrs.names[t_col]})")
    target_name, bias_name = attrs.names[t_col], attrs.names[b_col]
    targets = attrs.values[:, t_col].astype(np.int64)
    train_rows, valid_rows = np.flatnonzero(partition == TRAIN), np.flatnonzero(partition == VALID)
    if len(train_rows) == 0 or len(valid_rows) == 0:
        raise DataError(f"{folder / PARTITION_FILE}: the train (0) and valid (1) partitions must both hold images")
    biases, bias_names, inverted = orient_bias(
        targets, attrs.values[:, b_col].astype(np.int64), cfg.bias_label, bias_name, train_rows
    )
    fit_local, val_local = validation_split(targets[train_rows], biases[train_rows], cfg.val_fraction, cfg.split_seed)
    test_local = balanced_indices(
        targets[valid_rows], biases[valid_rows], 2, 2, cfg.split_seed, f"{folder / PARTITION_FILE} valid partition"
    )
    splits = {"train": train_rows[fit_local], "val": train_rows[val_local], "unbiased": valid_rows[test_local]}
    images = folder / IMAGE_FOLDER
    check_files_exist([images / attrs.files[i] for i in np.concatenate(list(splits.values()))], f"CelebA {IMAGE_FOLDER}")

    def dataset(name: str) -> PhotoDataset:
        rows = splits[name]
        return PhotoDataset(
            [images / attrs.files[i] for i in rows.tolist()],
            torch.from_numpy(targets[rows]),
            torch.from_numpy(biases[rows]),
            torch.from_numpy(rows),
            photo_transform(cfg.image_size, train=name == "train", hflip=cfg.hflip),
            name=name,
            class_names=[f"not {target_name}", target_name],
            bias_names=bias_names,
        )

    files = [folder / ATTRIBUTE_FILE, folder / PARTITION_FILE]
    return PhotoSplits(
        train=dataset("train"),
        val=dataset("val") if len(splits["val"]) else None,
        tests={"unbiased": dataset("unbiased")},
        num_classes=2,
        num_biases=2,
        source_files=[str(p) for p in files],
        source_sha256=sha256_files(files),
        info={
            "target": target_name,
            "bias": bias_name,
            "bias_inverted": inverted,
            "bias_names": bias_names,
            "transform": {"image_size": cfg.image_size, "hflip": cfg.hflip, "normalize": "imagenet"},
        },
    )
