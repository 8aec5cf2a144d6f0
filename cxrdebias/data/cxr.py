"""Chest X-ray data from a manifest CSV: validation, patient-level splits, the torch dataset.

The manifest contract
---------------------
A UTF-8 CSV file with a header row. Required columns:

- ``path``: image file (DICOM, PNG or JPEG), *relative to the manifest's folder* (a path that
  is absolute or leaves that folder is refused);
- ``label``: ``0`` (negative) or ``1`` (positive), exactly — or any strings mapped to 0/1 by
  a user-supplied ``label_map`` (``{"No finding": 0, "COVID-19": 1}``);
- ``site``: the acquisition site (hospital, source dataset) — the *bias* label. Not needed
  when the site is read from a DICOM tag (``site_source="dicom:InstitutionName"``); the
  DICOM value then wins and a ``site`` column, if any, is kept as ``site_manifest``;
- ``patient_id``: splits are made by patient, never by image.

Optional: ``view``, ``sex``, ``age``, ``split`` (``train``/``val``/``test``, used by the
``"manifest"`` split protocol); any other columns are kept as text.

Rows are numbered as the CSV file's lines (the header is row 1, the first record row 2), so
"row 7" is line 7 in a text editor or spreadsheet.

Validation happens before anything trains (:func:`load_manifest`): missing columns, missing
files, images that cannot be decoded (every image is read), missing/unknown labels, missing
site or patient, duplicate paths, paths leaving the manifest folder, the same pixels under
different patients or splits, and sites with a single class are each reported as
``(row, column, reason)``. Default policy: one :class:`~cxrdebias.errors.DataError` listing
the first problems and the total count. With ``allow_drop=True`` those rows are dropped
instead and listed in ``df.attrs["dropped"]`` (print :func:`format_drop_summary`). Nothing
is skipped silently.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydicom.datadict import keyword_for_tag
from pydicom.tag import BaseTag

from cxrdebias.data.base import Batch, TensorSamples
from cxrdebias.data.base import collate as collate  # re-exported: the collate of CXRDataset batches
from cxrdebias.data.cache import DecodedCache, InspectionCache, file_sha256
from cxrdebias.data.csv_records import read_csv_records, resolve_relative_path
from cxrdebias.data.images import DEFAULT_MAX_PIXELS, read_dicom_tag, read_image, resolve_tag
from cxrdebias.data.preprocess import PreprocessSpec, preprocess
from cxrdebias.errors import ConfigError, DataError
from cxrdebias.fileio import sha256_files, write_text_atomic

REQUIRED_COLUMNS = ("path", "label", "site", "patient_id")
OPTIONAL_COLUMNS = ("view", "sex", "age", "split")
#: columns :func:`load_manifest` adds; a manifest may not use these names
ADDED_COLUMNS = ("row", "abs_path", "image_sha256", "image_format", "site_manifest")
SPLITS = ("train", "val", "test")
#: share of each site's patients held out as test in the CORDA protocol
CORDA_TEST_FRACTION = 0.3
#: default test share of the ``"random"`` protocol
RANDOM_TEST_FRACTION = 0.2
CLASS_NAMES = ["negative", "positive"]
#: how many problems a DataError message lists before "… and N more"
MAX_LISTED_PROBLEMS = 8

SplitProtocol = Literal["corda", "random", "manifest"]


# -- configuration --------------------------------------------------------------------------
def parse_site_source(site_source: str) -> BaseTag | None:
    """``"column"`` → ``None``; ``"dicom:<Keyword>"`` → the DICOM tag to read the site from.

    Raises:
        ConfigError: anything else, or an unknown DICOM keyword.
    """
    text = site_source.strip()
    if text == "column":
        return None
    if text.startswith("dicom:") and text[len("dicom:") :].strip():
        try:
            return resolve_tag(text[len("dicom:") :].strip())
        except ConfigError as exc:
            raise ConfigError(f"site_source={site_source!r}: {exc}") from None
    raise ConfigError(
        f"site_source={site_source!r}: expected 'column' or 'dicom:<DICOM keyword>' (e.g. 'dicom:InstitutionName')"
    )


class CXRDataConfig(BaseModel):
    """Data options of a chest X-ray run (manifest CSV, see the module doc)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["cxr"] = "cxr"
    manifest: str | None = Field(None, description="manifest CSV; image paths are relative to its folder")
    site_source: str = Field(
        "column", description="'column' (the manifest's site column) or 'dicom:<keyword>' (e.g. 'dicom:InstitutionName')"
    )
    bias: Literal["site", "none"] = Field(
        "site", description="the bias label given to debiasing methods: the site, or none (bias-label-free methods only)"
    )
    label_map: dict[str, int] | None = Field(
        None, description="maps label strings to 0/1 (default: the label column must hold 0 or 1)"
    )
    split_protocol: SplitProtocol = Field(
        "corda",
        description="corda: 30% of each site's patients as test, stratified by site and label; "
        "random: the same with test_fraction; manifest: the manifest's split column",
    )
    val_fraction: float = Field(0.2, ge=0, lt=1, description="share of the non-test patients used for validation")
    test_fraction: float | None = Field(
        None, gt=0, lt=1, description="share of patients held out as test (random protocol; default 0.2)"
    )
    seed: int = Field(0, description="seed of the patient split (independent of the training seed)")
    allow_drop_bad_rows: bool = Field(False, description="drop invalid manifest rows (listed) instead of failing")
    check_duplicates: bool = Field(True, description="refuse identical pixels under different patients/splits")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="refuse larger images")
    workers: int = Field(4, ge=1, le=64, description="threads used to read images for validation and caching")
    preprocess: PreprocessSpec = Field(default_factory=PreprocessSpec)
    cache: bool = Field(True, description="keep preprocessed images in memory (each image decoded once)")
    cache_dir: str | None = Field(
        None,
        description="pre-decoding cache folder: each image decoded + preprocessed once and stored on disk "
        "(keyed by file content, preprocessing and code versions), read by every later epoch, worker and run",
    )

    @field_validator("site_source")
    @classmethod
    def _site_source(cls, v: str) -> str:
        try:
            parse_site_source(v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return v.strip()

    @field_validator("label_map")
    @classmethod
    def _label_map(cls, v: dict[str, int] | None) -> dict[str, int] | None:
        if v is not None:
            bad = {k: x for k, x in v.items() if x not in (0, 1)}
            if bad:
                raise ValueError(f"label_map values must be 0 or 1, got {bad}")
            if not v:
                raise ValueError("label_map is empty")
        return v


# -- problems ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ManifestProblem:
    """One problem with one manifest row: ``row`` (CSV line), ``column``, ``reason`` and a
    short ``kind`` used to group the drop summary (``missing_file``, ``bad_label`` …)."""

    row: int
    column: str
    kind: str
    reason: str

    def __str__(self) -> str:
        return f"row {self.row} {self.column}: {self.reason}"


def format_problems(problems: Sequence[ManifestProblem], limit: int = MAX_LISTED_PROBLEMS) -> str:
    """One line: the first ``limit`` distinct problems (rows sharing a reason are merged)."""
    groups: dict[tuple[str, str], list[int]] = {}
    for p in sorted(problems, key=lambda p: p.row):
        groups.setdefault((p.column, p.reason), []).append(p.row)
    parts = []
    for (column, reason), rows in list(groups.items())[:limit]:
        shown = ", ".join(str(r) for r in rows[:3]) + (f" (+{len(rows) - 3} more)" if len(rows) > 3 else "")
        parts.append(f"{'row' if len(rows) == 1 else 'rows'} {shown} {column}: {reason}")
    more = len(groups) - limit
    return "; ".join(parts) + (f"; … and {more} more" if more > 0 else "")


def format_drop_summary(dropped: Sequence[ManifestProblem | Mapping[str, Any]], n_rows: int | None = None) -> str:
    """What ``load_manifest(..., allow_drop=True)`` dropped: counts of rows per kind of problem.

    ``dropped`` is ``df.attrs["dropped"]`` (dicts) or a list of :class:`ManifestProblem`.
    """
    items = [p if isinstance(p, ManifestProblem) else ManifestProblem(**p) for p in dropped]
    if not items:
        return "no manifest rows dropped"
    rows_by_kind: dict[str, set[int]] = defaultdict(set)
    for p in items:
        rows_by_kind[p.kind].add(p.row)
    n_dropped = len({p.row for p in items})
    of = f" of {n_rows}" if n_rows is not None else ""
    kinds = ", ".join(f"{kind}: {len(rows)}" for kind, rows in sorted(rows_by_kind.items(), key=lambda kv: -len(kv[1])))
    return f"dropped {n_dropped}{of} manifest rows ({kinds}); first: {format_problems(items, 3)}"


# -- CSV reading ------------------------------------------------------------------------------
def _pixel_hash(pixels: np.ndarray) -> str:
    h = hashlib.sha256(f"{pixels.shape}:{pixels.dtype}".encode())
    h.update(np.ascontiguousarray(pixels).tobytes())
    return h.hexdigest()


def _inspect_image(path: Path, site_tag: BaseTag | None, max_pixels: int) -> tuple[str | None, dict[str, Any] | None]:
    """Decode one image → (error message or None, {sha256, format, site})."""
    try:
        loaded = read_image(path, site_tag=site_tag, max_pixels=max_pixels)
    except DataError as exc:
        msg = str(exc)
        prefix = f"{path}: "
        return (f"{path.name}: {msg[len(prefix):]}" if msg.startswith(prefix) else msg), None
    return None, {"sha256": _pixel_hash(loaded.pixels), "format": loaded.meta["format"], "site": loaded.meta.get("site")}


def _read_site_tag(path: Path, tag: BaseTag) -> tuple[str | None, dict[str, Any] | None]:
    try:
        return None, {"site": read_dicom_tag(path, tag), "format": "DICOM", "sha256": None}
    except DataError as exc:
        return str(exc), None


# -- manifest loading -------------------------------------------------------------------------
def load_manifest(
    path: str | os.PathLike,
    *,
    site_source: str = "column",
    label_map: Mapping[str, int] | None = None,
    allow_drop: bool = False,
    check_images: bool = True,
    check_duplicates: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int = 4,
    cache_dir: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Read and validate a manifest CSV (see the module doc) → one row per usable image.

    Columns of the result: ``row`` (CSV line), ``path`` (as written), ``abs_path``, ``label``
    (int64 0/1), ``site``, ``patient_id``, the optional and extra columns present in the file
    (text, ``None`` when empty), and — when ``check_images`` — ``image_sha256`` (hash of the
    decoded pixels) and ``image_format``. ``df.attrs`` holds ``"manifest"`` (path, SHA-256 of
    the file, site source, number of records) and ``"dropped"`` (list of problem dicts; empty
    unless ``allow_drop``).

    Args:
        path: the manifest CSV.
        site_source: ``"column"`` or ``"dicom:<keyword>"`` (see :func:`parse_site_source`).
        label_map: strings → 0/1; default: labels must be exactly ``0`` or ``1``.
        allow_drop: drop invalid rows (listed in ``df.attrs["dropped"]``) instead of raising.
        check_images: decode every image (slow for large sets, but nothing fails mid-training);
            needed for the duplicate-pixel check.
        check_duplicates: refuse identical pixels under different patients or splits.
        max_pixels: refuse larger images.
        workers: threads decoding images.
        cache_dir: the pre-decoding cache folder (``data.cache_dir``): images whose bytes were
            already validated (same SHA-256, site tag, pixel limit and code versions) are not
            decoded again (:class:`~cxrdebias.data.cache.InspectionCache`).

    Raises:
        DataError: the file is unreadable, a required column is missing, or (without
            ``allow_drop``) any row has a problem — one line with the first problems by row.
    """
    path = Path(path)
    tag = parse_site_source(site_source)
    if label_map is not None and any(v not in (0, 1) for v in label_map.values()):
        raise ConfigError(f"label_map {dict(label_map)}: values must be 0 or 1")
    header, records = read_csv_records(path, columns=REQUIRED_COLUMNS)
    required = [c for c in REQUIRED_COLUMNS if not (c == "site" and tag is not None)]
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; the header has {', '.join(header) or 'nothing'} "
            f"(required: {', '.join(required)})"
        )
    reserved = [c for c in ADDED_COLUMNS if c in header]
    if reserved:
        raise DataError(f"{path}: column name(s) {', '.join(reserved)} are reserved; rename them")
    root = path.resolve().parent
    problems: list[ManifestProblem] = []

    def problem(row: int, column: str, kind: str, reason: str) -> None:
        problems.append(ManifestProblem(row, column, kind, reason))

    rows: list[dict[str, Any]] = []
    first_by_path: dict[str, int] = {}
    to_read: list[int] = []  # indices into rows whose image must be read
    for line, fields in records:
        if len(fields) != len(header):
            problem(line, "-", "bad_row", f"{len(fields)} fields, the header has {len(header)}")
            continue
        rec: dict[str, Any] = {name: (value.strip() or None) for name, value in zip(header, fields, strict=True)}
        rec["row"] = line
        rec.setdefault("site", None)
        rel = rec["path"] or ""
        full, kind, reason = resolve_relative_path(root, rel)
        rec["abs_path"] = str(full) if full is not None else None
        if kind:
            problem(line, "path", kind, reason)
        else:
            key = os.path.normpath(rel)
            if key in first_by_path:
                problem(line, "path", "duplicate_path", f"{rel!r} is also listed in row {first_by_path[key]}")
                rec["abs_path"] = None
            else:
                first_by_path[key] = line
        rec["label"] = _parse_label(rec["label"], label_map, line, problem)
        if tag is None and rec["site"] is None:
            problem(line, "site", "missing_site", "missing (empty)")
        if rec["patient_id"] is None:
            problem(line, "patient_id", "missing_patient", "missing (empty)")
        if "split" in rec and rec["split"] is not None:
            split = rec["split"].lower()
            if split not in SPLITS:
                problem(line, "split", "bad_split", f"{rec['split']!r}; expected one of {', '.join(SPLITS)} or empty")
            rec["split"] = split
        if rec["abs_path"] is not None and (check_images or tag is not None):
            to_read.append(len(rows))
        rows.append(rec)

    # decode images (and read the site tag) — in threads, results kept in row order
    if to_read:
        paths = [Path(rows[i]["abs_path"]) for i in to_read]
        if check_images and cache_dir is not None:
            inspections = InspectionCache(cache_dir, site_tag=tag, max_pixels=max_pixels)

            def job(p: Path) -> tuple[str | None, dict[str, Any] | None]:
                return inspections.inspect(p, lambda: _inspect_image(p, tag, max_pixels))
        elif check_images:
            def job(p: Path) -> tuple[str | None, dict[str, Any] | None]:
                return _inspect_image(p, tag, max_pixels)
        else:
            def job(p: Path) -> tuple[str | None, dict[str, Any] | None]:
                return _read_site_tag(p, tag)  # type: ignore[arg-type]
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            results = list(pool.map(job, paths))
        for i, (error, info) in zip(to_read, results, strict=True):
            rec = rows[i]
            if error is not None:
                problem(rec["row"], "path", "unreadable_image", error)
                continue
            assert info is not None
            rec["image_sha256"] = info["sha256"]
            rec["image_format"] = info["format"]
            if tag is not None:
                kw = keyword_for_tag(tag) or str(tag)
                rec["site_manifest"] = rec.get("site")
                if info["format"] != "DICOM":
                    problem(rec["row"], "site", "missing_site", f"{info['format']} file has no DICOM tag {kw} (site_source dicom:{kw})")
                elif info["site"] is None:
                    problem(rec["row"], "site", "missing_site", f"DICOM tag {kw} is missing or empty")
                rec["site"] = info["site"]

    if check_images and check_duplicates:
        _check_duplicate_pixels(rows, {p.row for p in problems}, problem)
    _check_single_class_sites(rows, {p.row for p in problems}, problem)

    n_records = len(records)
    if problems and not allow_drop:
        bad_rows = len({p.row for p in problems})
        raise DataError(
            f"{path}: {len(problems)} problem(s) in {bad_rows} of {n_records} rows: {format_problems(problems)} "
            "(fix the manifest, or allow dropping bad rows with allow_drop_bad_rows)"
        )
    bad = {p.row for p in problems}
    good = [r for r in rows if r["row"] not in bad]
    if not good:
        raise DataError(
            f"{path}: no usable rows ({n_records} records"
            + (f"; all dropped: {format_problems(problems, 3)}" if problems else "")
            + ")"
        )
    df = _to_frame(good, header, tag is not None, check_images)
    df.attrs["manifest"] = {
        "path": str(path),
        "sha256": sha256_files([path]),
        "site_source": site_source,
        "records": n_records,
    }
    df.attrs["dropped"] = [asdict(p) for p in sorted(problems, key=lambda p: (p.row, p.column))]
    return df


def _parse_label(value: str | None, label_map: Mapping[str, int] | None, line: int, problem) -> int | None:
    if value is None:
        problem(line, "label", "bad_label", "missing (empty)")
        return None
    if label_map is not None:
        if value in label_map:
            return int(label_map[value])
        problem(line, "label", "bad_label", f"{value!r} is not in the label map ({', '.join(map(repr, label_map))})")
        return None
    if value in ("0", "1"):
        return int(value)
    problem(line, "label", "bad_label", f"{value!r}; expected 0 or 1 (or pass a label_map)")
    return None


def _check_duplicate_pixels(rows: list[dict[str, Any]], bad: set[int], problem) -> None:
    """Identical decoded pixels under two patients (or two manifest splits) leak test images into
    training: every such row after the first of its group is a problem."""
    first: dict[str, dict[str, Any]] = {}
    for rec in rows:
        digest = rec.get("image_sha256")
        if digest is None or rec["row"] in bad:
            continue
        if digest not in first:
            first[digest] = rec
            continue
        ref = first[digest]
        if rec["patient_id"] != ref["patient_id"]:
            problem(
                rec["row"], "path", "duplicate_image",
                f"same pixels as row {ref['row']} (patient {ref['patient_id']!r}) under patient {rec['patient_id']!r}",
            )
        elif rec.get("split") != ref.get("split"):
            problem(
                rec["row"], "path", "duplicate_image",
                f"same pixels as row {ref['row']} (split {ref.get('split')!r}) in split {rec.get('split')!r}",
            )


def _check_single_class_sites(rows: list[dict[str, Any]], bad: set[int], problem) -> None:
    """A site with one class makes site ≡ label: per-site metrics and debiasing are undefined."""
    labels: dict[str, set[int]] = defaultdict(set)
    members: dict[str, list[int]] = defaultdict(list)
    for rec in rows:
        if rec["row"] in bad or rec["site"] is None or rec["label"] is None:
            continue
        labels[rec["site"]].add(rec["label"])
        members[rec["site"]].append(rec["row"])
    for site in sorted(labels):
        if len(labels[site]) < 2:
            (only,) = labels[site]
            n = len(members[site])
            for line in members[site]:
                problem(
                    line, "label", "single_class_site",
                    f"site {site!r} has only label {only} ({n} rows); every site needs both classes",
                )


def _to_frame(rows: list[dict[str, Any]], header: list[str], dicom_site: bool, check_images: bool) -> pd.DataFrame:
    front = ["row", "path", "abs_path", "label", "site", "patient_id"]
    extra = [c for c in header if c not in front]
    added = (["site_manifest"] if dicom_site else []) + (["image_sha256", "image_format"] if check_images else [])
    columns = front + [c for c in extra if c not in added] + added
    df = pd.DataFrame([{c: r.get(c) for c in columns} for r in rows], columns=columns)
    df["row"] = df["row"].astype("int64")
    df["label"] = df["label"].astype("int64")
    for c in columns:
        if c not in ("row", "label"):
            df[c] = df[c].astype(object)
    return df.reset_index(drop=True)


def manifest_hash(df: pd.DataFrame) -> str:
    """SHA-256 of what a run uses from the manifest: path, label, site, patient, split, pixels."""
    cols = [c for c in ("path", "label", "site", "patient_id", "split", "image_sha256") if c in df.columns]
    h = hashlib.sha256(",".join(cols).encode())
    for values in df[cols].itertuples(index=False, name=None):
        h.update(("\x1f".join("" if v is None else str(v) for v in values) + "\n").encode())
    return h.hexdigest()


# -- patient-level splits ---------------------------------------------------------------------
def _stable_rng(seed: int, *keys: str) -> np.random.Generator:
    """A generator that depends only on ``seed`` and ``keys`` (not on Python's hash seed)."""
    digest = hashlib.sha256("\x1f".join(keys).encode()).digest()
    return np.random.default_rng([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, int.from_bytes(digest[:8], "little")])


def _patients(df: pd.DataFrame) -> pd.DataFrame:
    """One row per patient: its site (most frequent; ties → first by name) and majority label
    (ties → 1), i.e. its stratum."""
    counts = df.groupby(["patient_id", "site"]).size().reset_index(name="n")
    counts = counts.sort_values(["patient_id", "n", "site"], ascending=[True, False, True])
    site = counts.drop_duplicates("patient_id").set_index("patient_id")["site"]
    pos = df.groupby("patient_id")["label"].agg(["sum", "size"])
    label = (2 * pos["sum"] >= pos["size"]).astype("int64")
    return pd.DataFrame({"site": site, "label": label}).sort_index()


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def make_splits(
    df: pd.DataFrame,
    protocol: SplitProtocol = "corda",
    val_fraction: float = 0.2,
    test_fraction: float | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """A copy of ``df`` with a ``split`` column (``train``/``val``/``test``), by patient.

    Every image of a patient is in one split. ``corda`` and ``random`` stratify patients by
    (site, majority label): in each stratum ``round(n · test_fraction)`` patients go to test,
    then ``round(rest · val_fraction)`` to validation, the rest to training. Each site then gets
    at least one patient in every split with a non-zero fraction (moved from its training
    patients); a site too small for that is a :class:`DataError`. ``corda`` is the CORDA
    protocol: 30% of each site's patients held out as test. ``manifest`` uses the manifest's own
    ``split`` column (every row set, no patient in two splits). The assignment depends only on
    ``seed`` and the table's content (not on row order or Python's hash seed).

    Raises:
        ConfigError: unknown protocol or fractions out of range.
        DataError: a site has too few patients, or the manifest's split column is unusable.
    """
    if protocol == "manifest":
        return _manifest_splits(df)
    if protocol == "corda":
        if test_fraction is not None and not math.isclose(test_fraction, CORDA_TEST_FRACTION):
            raise ConfigError(
                f"test_fraction={test_fraction}: the corda protocol holds out {CORDA_TEST_FRACTION:.0%} of each "
                "site's patients; use split_protocol 'random' for another test fraction"
            )
        test_fraction = CORDA_TEST_FRACTION
    elif protocol == "random":
        test_fraction = RANDOM_TEST_FRACTION if test_fraction is None else test_fraction
    else:
        raise ConfigError(f"split protocol {protocol!r}: expected 'corda', 'random' or 'manifest'")
    if not 0 <= test_fraction < 1 or not 0 <= val_fraction < 1:
        raise ConfigError(f"test_fraction={test_fraction}, val_fraction={val_fraction}: each must be in [0, 1)")
    if df.empty:
        raise DataError("cannot split an empty manifest")

    patients = _patients(df)
    assignment: dict[str, str] = {}
    wanted = [s for s, f in (("test", test_fraction), ("val", val_fraction)) if f > 0]
    for site, site_patients in patients.groupby("site", sort=True):
        split_of: dict[str, list[str]] = {"train": [], "val": [], "test": []}
        strata = []
        for label, group in site_patients.groupby("label", sort=True):
            ids = sorted(group.index)
            order = _stable_rng(seed, str(site), str(label)).permutation(len(ids))
            ids = [ids[i] for i in order]
            n_test = _round_half_up(len(ids) * test_fraction)
            n_val = _round_half_up((len(ids) - n_test) * val_fraction)
            strata.append({"test": ids[:n_test], "val": ids[n_test : n_test + n_val], "train": ids[n_test + n_val :]})
        needed = 1 + len(wanted)
        if len(site_patients) < needed:
            raise DataError(
                f"site {site!r} has {len(site_patients)} patient(s); a patient-level "
                f"{'/'.join(['train', *reversed(wanted)])} split needs at least {needed} per site"
            )
        for split in wanted:  # every site in every split: move one training patient if needed
            if not any(s[split] for s in strata):
                donor = max(strata, key=lambda s: len(s["train"]))
                donor[split].append(donor["train"].pop())
        if not any(s["train"] for s in strata):  # cannot happen with n ≥ needed, kept as a guard
            donor = max(strata, key=lambda s: len(s["val"]) + len(s["test"]))
            donor["train"].append((donor["val"] or donor["test"]).pop())
        for s in strata:
            for split, ids in s.items():
                split_of[split].extend(ids)
        for split, ids in split_of.items():
            assignment.update(dict.fromkeys(ids, split))
    out = df.copy()
    out["split"] = out["patient_id"].map(assignment).astype(object)
    return out


def _manifest_splits(df: pd.DataFrame) -> pd.DataFrame:
    if "split" not in df.columns:
        raise DataError("split protocol 'manifest' needs a 'split' column (train/val/test) in the manifest")
    rows = df["row"] if "row" in df.columns else pd.Series(range(len(df)), index=df.index)
    bad = df["split"].isna() | ~df["split"].isin(SPLITS)
    if bad.any():
        listed = ", ".join(str(r) for r in rows[bad].head(MAX_LISTED_PROBLEMS))
        raise DataError(
            f"split protocol 'manifest': {int(bad.sum())} row(s) without a train/val/test split (rows {listed})"
        )
    per_patient = df.groupby("patient_id")["split"].nunique()
    leaky = sorted(per_patient[per_patient > 1].index)
    if leaky:
        pid = leaky[0]
        where = ", ".join(f"row {r}: {s}" for r, s in zip(rows[df["patient_id"] == pid], df.loc[df["patient_id"] == pid, "split"], strict=True))
        raise DataError(
            f"split protocol 'manifest': {len(leaky)} patient(s) in more than one split, e.g. {pid!r} ({where}); "
            "a patient's images must share one split"
        )
    return df.copy()


def split_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Images and patients per (split, site, label) — to print and to save with a run."""
    g = df.groupby(["split", "site", "label"])
    return pd.DataFrame({"images": g.size(), "patients": g["patient_id"].nunique()}).reset_index()


SPLIT_TABLE_COLUMNS = ("path", "patient_id", "site", "label", "split")


def save_splits(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the split table (``path, patient_id, site, label, split``) as CSV, atomically."""
    missing = [c for c in SPLIT_TABLE_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"save_splits: table lacks column(s) {missing}; call make_splits first")
    buf = io.StringIO()
    df.loc[:, list(SPLIT_TABLE_COLUMNS)].to_csv(buf, index=False, lineterminator="\n")
    path = Path(path)
    write_text_atomic(path, buf.getvalue())
    return path


def load_splits(path: str | os.PathLike, df: pd.DataFrame | None = None) -> pd.DataFrame:
    """Read a split table written by :func:`save_splits`.

    Without ``df``: the table itself. With ``df`` (a loaded manifest): a copy of ``df`` with the
    saved ``split`` column, after checking that both list exactly the same image paths with the
    same patient, site and label (so an evaluation uses the training run's split).

    Raises:
        DataError: unreadable table, bad split values, or a table that does not match ``df``.
    """
    path = Path(path)
    header, records = read_csv_records(path, columns=REQUIRED_COLUMNS)
    missing = [c for c in SPLIT_TABLE_COLUMNS if c not in header]
    if missing:
        raise DataError(f"{path}: split table lacks column(s) {', '.join(missing)}; expected {', '.join(SPLIT_TABLE_COLUMNS)}")
    for line, fields in records:
        if len(fields) != len(header):
            raise DataError(f"{path}: row {line} has {len(fields)} fields, the header has {len(header)}")
    table = pd.DataFrame([fields for _, fields in records], columns=header, dtype=object)
    bad = ~table["split"].isin(SPLITS)
    if bad.any():
        line = records[int(np.flatnonzero(bad.to_numpy())[0])][0]
        raise DataError(f"{path}: row {line} split {table['split'][bad].iloc[0]!r}; expected train, val or test")
    if df is None:
        return table
    saved = table.set_index("path")
    if saved.index.has_duplicates:
        raise DataError(f"{path}: split table lists an image twice ({saved.index[saved.index.duplicated()][0]!r})")
    current = set(df["path"])
    extra, absent = sorted(set(saved.index) - current), sorted(current - set(saved.index))
    if extra or absent:
        raise DataError(
            f"{path}: split table does not match the manifest ({len(absent)} manifest image(s) not in it, e.g. "
            f"{absent[:1]}; {len(extra)} listed image(s) not in the manifest, e.g. {extra[:1]})"
        )
    aligned = saved.loc[df["path"]]
    for col in ("patient_id", "site", "label"):
        mismatch = aligned[col].astype(str).to_numpy() != df[col].astype(str).to_numpy()
        if mismatch.any():
            i = int(np.flatnonzero(mismatch)[0])
            raise DataError(
                f"{path}: image {df['path'].iloc[i]!r} has {col} {aligned[col].iloc[i]!r} in the split table "
                f"but {df[col].iloc[i]!r} in the manifest"
            )
    out = df.copy()
    out["split"] = aligned["split"].to_numpy()
    return out


# -- the torch dataset ------------------------------------------------------------------------
def site_index_map(sites: Iterable[str]) -> dict[str, int]:
    """Site name → bias index, by sorted name. Build it once from the *training* table and pass
    it (saved with the run) to every evaluation dataset."""
    names = sorted({str(s) for s in sites})
    return {name: i for i, name in enumerate(names)}


class CXRDataset(torch.utils.data.Dataset):
    """Rows of a validated manifest as samples of the :mod:`cxrdebias.data.base` contract.

    ``image`` is :func:`~cxrdebias.data.preprocess.preprocess` of the decoded image (``C×H×W``
    float32), ``target`` the label, ``bias`` the site index from ``site_to_index`` (a site not in
    the mapping is a :class:`DataError`: a model cannot be evaluated on a site it has no index
    for), ``index`` the position in this dataset (``table.iloc[index]`` is its manifest row).

    With ``cache=True`` each image is decoded once and its preprocessed array kept in memory;
    :meth:`preload` fills the cache with a few threads. A cache filled inside DataLoader worker
    processes is lost when they exit: preload first, or use ``num_workers=0``.

    With ``cache_dir`` the preprocessed images are also kept on disk
    (:class:`~cxrdebias.data.cache.DecodedCache`): an image is decoded only when its entry is
    missing, in any process, epoch or run. :meth:`fill_disk_cache` hashes the source files and
    fills missing entries with threads — call it before creating DataLoader workers.
    """

    def __init__(
        self,
        table: pd.DataFrame,
        spec: PreprocessSpec,
        site_to_index: Mapping[str, int],
        *,
        split: str | None = None,
        cache: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        name: str = "",
        cache_dir: str | os.PathLike | None = None,
    ):
        if split is not None:
            if "split" not in table.columns:
                raise DataError(f"{name or 'dataset'}: the table has no split column; call make_splits first")
            table = table[table["split"] == split]
        self.table = table.reset_index(drop=True)
        self.spec = spec
        self.site_to_index = dict(site_to_index)
        self.name = name or (split or "cxr")
        self.max_pixels = max_pixels
        unknown = sorted(set(self.table["site"]) - set(self.site_to_index))
        if unknown:
            raise DataError(
                f"{self.name}: site(s) {', '.join(map(repr, unknown))} not in the site mapping "
                f"({', '.join(map(repr, self.site_to_index))}); a model can only be evaluated on the sites it was trained with"
            )
        self.paths = [Path(p) for p in self.table["abs_path"]]
        self.targets = torch.tensor(self.table["label"].to_numpy(dtype=np.int64))
        self.biases = torch.tensor(np.array([self.site_to_index[s] for s in self.table["site"]], dtype=np.int64))
        self._cache: dict[int, np.ndarray] | None = {} if cache else None
        self.disk_cache = DecodedCache(cache_dir, spec) if cache_dir is not None else None
        self._source_sha256: list[str | None] = [None] * len(self.paths)

    @property
    def bias_names(self) -> list[str]:
        """Site names in index order."""
        return [s for s, _ in sorted(self.site_to_index.items(), key=lambda kv: kv[1])]

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> np.ndarray:
        """The preprocessed image of sample ``i`` (from the cache when present)."""
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        if self.disk_cache is not None:
            array = self.disk_cache.load(self.paths[i], lambda: self._decode(i), self._source_sha256[i])
        else:
            array = self._decode(i)
        if self._cache is not None:
            self._cache[i] = array
        return array

    def _decode(self, i: int) -> np.ndarray:
        return preprocess(read_image(self.paths[i], site_tag=None, max_pixels=self.max_pixels).pixels, self.spec)

    def fill_disk_cache(self, workers: int = 4) -> int:
        """Hash every source file and decode those without a disk-cache entry (threads).

        Returns the number of images decoded. A no-op without ``cache_dir``.
        """
        if self.disk_cache is None:
            return 0
        cache = self.disk_cache
        todo = [i for i in range(len(self)) if self._source_sha256[i] is None]

        def fill(i: int) -> bool:
            digest = file_sha256(self.paths[i])
            self._source_sha256[i] = digest
            if cache.get(cache.key(digest)) is not None:
                return False
            cache.load(self.paths[i], lambda: self._decode(i), digest)
            return True

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            return sum(pool.map(fill, todo))

    def __getitem__(self, i: int) -> Batch:
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.name}: index {i} out of range for {len(self)} samples")
        i = i % len(self)
        return Batch(
            image=torch.from_numpy(self.load(i)),
            target=self.targets[i],
            bias=self.biases[i],
            index=torch.tensor(i, dtype=torch.long),
        )

    def preload(self, workers: int = 4) -> None:
        """Decode and preprocess every image into the cache (threads; turns the cache on)."""
        if self._cache is None:
            self._cache = {}
        todo = [i for i in range(len(self)) if i not in self._cache]
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for i, array in zip(todo, pool.map(self.load, todo), strict=True):
                self._cache[i] = array

    def to_tensor_samples(self, workers: int = 4) -> TensorSamples:
        """All samples as one in-memory :class:`~cxrdebias.data.base.TensorSamples` (for the
        trainer's :class:`~cxrdebias.data.base.TensorBatchLoader`)."""
        self.preload(workers)
        images = (
            torch.from_numpy(np.stack([self._cache[i] for i in range(len(self))]))
            if len(self)
            else torch.empty((0, *self.spec.output_shape))
        )
        return TensorSamples(
            images=images,
            targets=self.targets.clone(),
            biases=self.biases.clone(),
            name=self.name,
            bias_names=self.bias_names,
            class_names=list(CLASS_NAMES),
            info={"rows": self.table["row"].tolist() if "row" in self.table.columns else None},
        )


# -- everything from a config -------------------------------------------------------------------
@dataclass
class CXRData:
    """The three splits of a chest X-ray run, the split table and its provenance."""

    table: pd.DataFrame
    train: CXRDataset
    val: CXRDataset | None
    test: CXRDataset
    site_to_index: dict[str, int]
    dropped: list[dict[str, Any]] = field(default_factory=list)
    manifest_sha256: str = ""

    def data_hash(self) -> str:
        """Hash of the manifest rows the run uses (paths, labels, sites, patients, splits, pixels)
        and of the preprocessing."""
        h = hashlib.sha256(manifest_hash(self.table).encode())
        h.update(self.train.spec.model_dump_json().encode())
        return h.hexdigest()


def build_cxr(cfg: CXRDataConfig, *, splits_file: str | os.PathLike | None = None) -> CXRData:
    """Validate the manifest, split by patient (or re-use ``splits_file``), build the datasets.

    The site→index mapping comes from the training split (sorted names); every site must be
    in training. Print ``format_drop_summary(data.dropped)`` when rows were dropped.
    """
    if cfg.manifest is None:
        raise ConfigError("data.manifest: no manifest CSV given (columns path, label, site, patient_id)")
    df = load_manifest(
        cfg.manifest,
        site_source=cfg.site_source,
        label_map=cfg.label_map,
        allow_drop=cfg.allow_drop_bad_rows,
        check_duplicates=cfg.check_duplicates,
        max_pixels=cfg.max_pixels,
        workers=cfg.workers,
        cache_dir=cfg.cache_dir,
    )
    attrs = dict(df.attrs)
    if splits_file is not None:
        df = load_splits(splits_file, df)
    else:
        df = make_splits(df, cfg.split_protocol, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    site_to_index = site_index_map(df.loc[df["split"] == "train", "site"])
    common = {
        "spec": cfg.preprocess,
        "site_to_index": site_to_index,
        "cache": cfg.cache,
        "max_pixels": cfg.max_pixels,
        "cache_dir": cfg.cache_dir,
    }
    has_val = bool((df["split"] == "val").any())
    return CXRData(
        table=df,
        train=CXRDataset(df, split="train", name="train", **common),
        val=CXRDataset(df, split="val", name="val", **common) if has_val else None,
        test=CXRDataset(df, split="test", name="test", **common),
        site_to_index=site_to_index,
        dropped=attrs.get("dropped", []),
        manifest_sha256=attrs.get("manifest", {}).get("sha256", ""),
    )
