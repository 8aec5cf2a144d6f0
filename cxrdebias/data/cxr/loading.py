"""Loading a chest X-ray manifest: every row, image and cross-row check before anything trains.

:func:`load_manifest` reads the CSV (columns: :data:`~cxrdebias.data.cxr.manifest.MANIFEST`),
checks each row (:func:`~cxrdebias.data.cxr.manifest.parse_row`), decodes every image, and checks
across rows: missing columns, missing files, images that cannot be decoded, missing/unknown
labels, missing site or patient, duplicate paths, paths leaving the manifest folder, the same
pixels under different patients or splits, and sites with a single class are each reported as
``(row, column, reason)``. Default policy: one :class:`~cxrdebias.errors.DataError` listing the
first problems and the total count. With ``allow_drop=True`` those rows are dropped instead and
listed in ``df.attrs["dropped"]`` (print :func:`~cxrdebias.data.cxr.manifest.format_drop_summary`).
Nothing is skipped silently.

No torch import (pandas, numpy, pydicom, Pillow only).
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydicom.datadict import keyword_for_tag
from pydicom.tag import BaseTag

from cxrdebias.data.cache import InspectionCache
from cxrdebias.data.csv_records import read_csv_records
from cxrdebias.data.cxr.manifest import (
    MANIFEST,
    ManifestProblem,
    ProblemSink,
    format_problems,
    parse_row,
    parse_site_source,
)
from cxrdebias.data.images import DECODE_BUDGET, DEFAULT_MAX_PIXELS, read_dicom_tag, read_image
from cxrdebias.errors import ConfigError, DataError
from cxrdebias.fileio import sha256_files


# -- image checks ------------------------------------------------------------------------------
def _pixel_hash(pixels: np.ndarray) -> str:
    h = hashlib.sha256(f"{pixels.shape}:{pixels.dtype}".encode())
    h.update(memoryview(np.ascontiguousarray(pixels)).cast("B"))  # the bytes, not a copy of them
    return h.hexdigest()


def _inspect_image(path: Path, site_tag: BaseTag | None, max_pixels: int) -> tuple[str | None, dict[str, Any] | None]:
    """Decode one image → (error message or None, {sha256, format, site}).

    The decoded pixels count against :data:`DECODE_BUDGET` until they are hashed, so that the
    decoding threads of ``data check`` hold a bounded number of pixels whatever their number.
    """
    with DECODE_BUDGET.scope():
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
    allow_links_outside: bool = False,
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
        allow_links_outside: let symbolic links lead out of the manifest's folder
            (``data.allow_links_outside``, ``--allow-outside``); absolute paths and ``..`` in a
            path stay refused.

    Raises:
        DataError: the file is unreadable, a required column is missing, or (without
            ``allow_drop``) any row has a problem — one line with the first problems by row.
    """
    path = Path(path)
    tag = parse_site_source(site_source)
    if label_map is not None and any(v not in (0, 1) for v in label_map.values()):
        raise ConfigError(f"label_map {dict(label_map)}: values must be 0 or 1")
    header, records = read_csv_records(path, columns=MANIFEST.required_for(site_from_dicom=tag is not None))
    reserved = [c for c in MANIFEST.added if c in header]
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
        rec = parse_row(
            line, header, fields, root=root, label_map=label_map, site_from_dicom=tag is not None,
            first_by_path=first_by_path, problem=problem, allow_links_outside=allow_links_outside,
        )
        if rec is None:
            continue
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
                problem(rec["row"], MANIFEST.path, "unreadable_image", error)
                continue
            assert info is not None
            rec["image_sha256"] = info["sha256"]
            rec["image_format"] = info["format"]
            if tag is not None:
                kw = keyword_for_tag(tag) or str(tag)
                rec["site_manifest"] = rec.get(MANIFEST.site)
                if info["format"] != "DICOM":
                    problem(rec["row"], MANIFEST.site, "missing_site", f"{info['format']} file has no DICOM tag {kw} (site_source dicom:{kw})")
                elif info["site"] is None:
                    problem(rec["row"], MANIFEST.site, "missing_site", f"DICOM tag {kw} is missing or empty")
                rec[MANIFEST.site] = info["site"]

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


def _check_duplicate_pixels(rows: list[dict[str, Any]], bad: set[int], problem: ProblemSink) -> None:
    """Identical decoded pixels under two patients (or two manifest splits) leak test images into
    training: every such row after the first of its group is a problem."""
    m = MANIFEST
    first: dict[str, dict[str, Any]] = {}
    for rec in rows:
        digest = rec.get("image_sha256")
        if digest is None or rec["row"] in bad:
            continue
        if digest not in first:
            first[digest] = rec
            continue
        ref = first[digest]
        if rec[m.patient_id] != ref[m.patient_id]:
            problem(
                rec["row"], m.path, "duplicate_image",
                f"same pixels as row {ref['row']} (patient {ref[m.patient_id]!r}) under patient {rec[m.patient_id]!r}",
            )
        elif rec.get(m.split) != ref.get(m.split):
            problem(
                rec["row"], m.path, "duplicate_image",
                f"same pixels as row {ref['row']} (split {ref.get(m.split)!r}) in split {rec.get(m.split)!r}",
            )


def _check_single_class_sites(rows: list[dict[str, Any]], bad: set[int], problem: ProblemSink) -> None:
    """A site with one class makes site ≡ label: per-site metrics and debiasing are undefined."""
    m = MANIFEST
    labels: dict[str, set[int]] = defaultdict(set)
    members: dict[str, list[int]] = defaultdict(list)
    for rec in rows:
        if rec["row"] in bad or rec[m.site] is None or rec[m.label] is None:
            continue
        labels[rec[m.site]].add(rec[m.label])
        members[rec[m.site]].append(rec["row"])
    for site in sorted(labels):
        if len(labels[site]) < 2:
            (only,) = labels[site]
            n = len(members[site])
            for line in members[site]:
                problem(
                    line, m.label, "single_class_site",
                    f"site {site!r} has only label {only} ({n} rows); every site needs both classes",
                )


def _to_frame(rows: list[dict[str, Any]], header: list[str], dicom_site: bool, check_images: bool) -> pd.DataFrame:
    m = MANIFEST
    front = ["row", m.path, "abs_path", m.label, m.site, m.patient_id]
    extra = [c for c in header if c not in front]
    added = (["site_manifest"] if dicom_site else []) + (["image_sha256", "image_format"] if check_images else [])
    columns = front + [c for c in extra if c not in added] + added
    df = pd.DataFrame([{c: r.get(c) for c in columns} for r in rows], columns=columns)
    df["row"] = df["row"].astype("int64")
    df[m.label] = df[m.label].astype("int64")
    for c in columns:
        if c not in ("row", m.label):
            df[c] = df[c].astype(object)
    return df.reset_index(drop=True)


def manifest_hash(df: pd.DataFrame) -> str:
    """SHA-256 of what a run uses from the manifest: path, label, site, patient, split, pixels."""
    cols = [c for c in (*MANIFEST.required, MANIFEST.split, "image_sha256") if c in df.columns]
    h = hashlib.sha256(",".join(cols).encode())
    for values in df[cols].itertuples(index=False, name=None):
        h.update(("\x1f".join("" if v is None else str(v) for v in values) + "\n").encode())
    return h.hexdigest()


