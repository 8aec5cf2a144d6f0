"""IMDB Face (Rothe et al., IMDB-WIKI) with Kim et al.'s extreme-bias splits (LNL, CVPR 2019):
learn gender with age as the bias, or age with gender as the bias.

The split files (read from the user's disk, never downloaded)
-------------------------------------------------------------
Kim et al. distribute their cleaned lists as NumPy pickles; convert them once into one CSV per
split in a single folder::

    ROOT/eb1.csv   ROOT/eb2.csv   ROOT/test.csv   (+ the images, anywhere below ROOT)

Each is a UTF-8 CSV file with a header row and at least these columns (others are ignored):

- ``path``: the face image (JPEG), *relative to ROOT* (the CSV's folder); absolute paths and
  paths that leave ROOT are refused;
- ``age``: age in years when the photo was taken (IMDB-WIKI: year taken − year of birth), a
  number from 0 to 120;
- ``gender``: ``0``/``F``/``female`` for a woman, ``1``/``M``/``male`` for a man (IMDB-WIKI's own
  coding is 0 = female, 1 = male; case-insensitive, ``0.0``/``1.0`` accepted).

Lines are numbered as in a text editor (the header is line 1); a bad row is a one-line
:class:`~cxrdebias.errors.DataError` naming the file, line and column.

The splits (Kim et al.)
-----------------------
- **EB1** (extreme bias 1): women aged 0–29 and men aged 40 or more;
- **EB2** (extreme bias 2): women aged 40 or more and men aged 0–29;
- **test**: Kim et al.'s held-out test list (all ages and both genders, gender and age not
  confounded).

These definitions follow Kim et al.'s paper as we read it; the facts file of this project only
names the three splits, so check them against your copy of the lists (``run.json`` records the
(target, bias) group counts of every split). The lists are read as given, never filtered.

Labels
------
- ``target="gender"``: target 0 = female, 1 = male. The bias is the age group that EB1/EB2 are
  built from: ``age_bias="binary"`` (default) gives 0 = under 30, 1 = 30 or older — the only
  age information that is confounded with gender in EB1/EB2 (ages 30–39 occur in neither, so
  the cut at 30 or 40 makes no difference there; in the test split 30–39 counts as older).
  With it, EB1 is exactly the target = bias part and EB2 the target ≠ bias part.
  ``age_bias="bins12"`` uses the 12 age bins below instead (a 12-way bias head for LNL).
- ``target="age"``: 12 age bins (``0–19, 20–24, 25–29, …, 65–69, 70+``: 5-year bins between 20
  and 70; the facts file gives the count, the edges are our assumption); the bias is gender
  (0 = female, 1 = male).

Protocol: train on EB1 (or EB2); evaluate on the test split and on the *other* extreme-bias
split; no validation set unless ``val_fraction > 0`` (then drawn per (target, bias) group from
the training split, as for CelebA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from cxrdebias.data.csv_records import read_csv_records, resolve_relative_path
from cxrdebias.data.photos import (
    PhotoDataConfig,
    PhotoDataset,
    PhotoSplits,
    photo_transform,
    val_fraction_field,
    validation_split,
)
from cxrdebias.errors import DataError
from cxrdebias.fileio import sha256_files

SPLITS = ("eb1", "eb2", "test")
COLUMNS = ("path", "age", "gender")
GENDER_NAMES = ["female", "male"]
_GENDER_CODES = {"0": 0, "0.0": 0, "f": 0, "female": 0, "1": 1, "1.0": 1, "m": 1, "male": 1}
MAX_AGE = 120
#: lower edges of age bins 1…11 (bin 0 is under 20, bin 11 is 70 or older)
AGE_EDGES = (20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70)
AGE_BIN_NAMES = ["0-19"] + [f"{lo}-{hi - 1}" for lo, hi in zip(AGE_EDGES[:-1], AGE_EDGES[1:], strict=True)] + ["70+"]
#: the binary age bias: under this age is "young" (EB1/EB2 use 0–29 against 40+)
YOUNG_BELOW = 30
AGE_GROUP_NAMES = [f"under {YOUNG_BELOW}", f"{YOUNG_BELOW} or older"]


class IMDBFaceConfig(PhotoDataConfig):
    """Data options of an IMDB Face run."""

    kind: Literal["imdb_face"] = "imdb_face"
    target: Literal["gender", "age"] = Field("gender", description="what to learn; the other one is the bias")
    train_split: Literal["eb1", "eb2"] = Field("eb1", description="extreme-bias split to train on")
    age_bias: Literal["binary", "bins12"] = Field(
        "binary", description="gender target: age bias as 'binary' (under 30 / 30+) or the 12 age bins"
    )
    val_fraction: float = val_fraction_field(0.0)


@dataclass
class FaceList:
    """The rows of one split CSV: image paths, ages (years), genders (0 female, 1 male), CSV lines."""

    csv: Path
    paths: list[Path]
    ages: np.ndarray
    genders: np.ndarray
    lines: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)


def age_bins(ages: np.ndarray) -> np.ndarray:
    """Age in years → one of 12 bins (:data:`AGE_BIN_NAMES`): ``<20, 20–24, …, 65–69, ≥70``."""
    return np.searchsorted(np.asarray(AGE_EDGES), np.asarray(ages, dtype=np.float64), side="right").astype(np.int64)


def age_groups(ages: np.ndarray) -> np.ndarray:
    """Age in years → 0 (under 30) or 1 (30 or older)."""
    return (np.asarray(ages, dtype=np.float64) >= YOUNG_BELOW).astype(np.int64)


def _parse_age(raw: str) -> float | str:
    """The age, or the reason it is not one."""
    try:
        age = float(raw)
    except ValueError:
        age = math.nan
    if not math.isfinite(age) or not 0 <= age <= MAX_AGE:
        return f"{raw!r}; expected the age in years, a number from 0 to {MAX_AGE}"
    return age


def _parse_gender(raw: str) -> int | str:
    """0 (female) / 1 (male), or the reason the value is neither."""
    code = _GENDER_CODES.get(raw.strip().lower())
    return code if code is not None else f"{raw!r}; expected 0/F/female or 1/M/male"


def read_split_csv(path: str | Path) -> FaceList:
    """Read and validate one split CSV (format in the module doc); images are relative to its folder."""
    path = Path(path)
    header, records = read_csv_records(path, columns=COLUMNS, what="split list")
    col = {c: header.index(c) for c in COLUMNS}
    paths: list[Path] = []
    ages: list[float] = []
    genders: list[int] = []
    lines: list[int] = []
    problems: list[str] = []
    for line, fields in records:
        if len(fields) != len(header):
            problems.append(f"line {line}: {len(fields)} fields, the header has {len(header)}")
            continue
        full, _, reason = resolve_relative_path(path.parent, fields[col["path"]].strip(), folder="CSV's folder", hint=None)
        age, gender = _parse_age(fields[col["age"]]), _parse_gender(fields[col["gender"]])
        for column, bad in (("path", reason), ("age", age), ("gender", gender)):
            if isinstance(bad, str):
                problems.append(f"line {line}, column {column}: {bad}")
        if full is not None and not isinstance(age, str) and not isinstance(gender, str):
            paths.append(full)
            ages.append(age)
            genders.append(gender)
            lines.append(line)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise DataError(f"{path}: {problems[0]}{more}")
    if not paths:
        raise DataError(f"{path}: no rows; expected one line per face image after the header")
    return FaceList(path, paths, np.array(ages, dtype=np.float64), np.array(genders, dtype=np.int64), np.array(lines, dtype=np.int64))


def face_labels(faces: FaceList, cfg: IMDBFaceConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(targets, biases)`` of every row for the configured protocol (module doc, "Labels")."""
    if cfg.target == "age":
        return age_bins(faces.ages), faces.genders
    bias = age_groups(faces.ages) if cfg.age_bias == "binary" else age_bins(faces.ages)
    return faces.genders, bias


def label_names(cfg: IMDBFaceConfig) -> tuple[list[str], list[str]]:
    """``(class names, bias names)`` for the configured protocol."""
    if cfg.target == "age":
        return list(AGE_BIN_NAMES), list(GENDER_NAMES)
    return list(GENDER_NAMES), list(AGE_GROUP_NAMES if cfg.age_bias == "binary" else AGE_BIN_NAMES)


def build_imdb_face(cfg: IMDBFaceConfig) -> PhotoSplits:
    """Train on ``cfg.train_split``; test on the test split and on the other extreme-bias split."""
    if cfg.root is None:
        raise DataError("no IMDB Face folder given: pass --data-root (a folder with eb1.csv, eb2.csv and test.csv)")
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(f"{root}: IMDB Face folder not found (expected eb1.csv, eb2.csv and test.csv in it)")
    lists = {name: read_split_csv(root / f"{name}.csv") for name in SPLITS}
    class_names, bias_names = label_names(cfg)

    def dataset(name: str, faces: FaceList, index: np.ndarray, *, train: bool) -> PhotoDataset:
        targets, biases = face_labels(faces, cfg)
        return PhotoDataset(
            [faces.paths[i] for i in index.tolist()],
            torch.from_numpy(targets[index]),
            torch.from_numpy(biases[index]),
            torch.from_numpy(faces.lines[index]),
            photo_transform(cfg.image_size, train=train, hflip=cfg.hflip),
            name=name,
            class_names=class_names,
            bias_names=bias_names,
        )

    train_list = lists[cfg.train_split]
    fit, val = validation_split(*face_labels(train_list, cfg), cfg.val_fraction, cfg.split_seed)
    other = "eb2" if cfg.train_split == "eb1" else "eb1"
    files = [lists[name].csv for name in SPLITS]
    return PhotoSplits(
        train=dataset("train", train_list, fit, train=True),
        val=dataset("val", train_list, val, train=False) if len(val) else None,
        tests={
            name: dataset(name, lists[name], np.arange(len(lists[name])), train=False) for name in ("test", other)
        },
        num_classes=len(class_names),
        num_biases=len(bias_names),
        source_files=[str(p) for p in files],
        source_sha256=sha256_files(files),
        info={
            "target": cfg.target,
            "train_split": cfg.train_split,
            "other_split": other,
            "class_names": class_names,
            "bias_names": bias_names,
            "transform": {"image_size": cfg.image_size, "hflip": cfg.hflip, "normalize": "imagenet"},
        },
    )
