"""The chest X-ray manifest: its one schema (:data:`MANIFEST`) and the parsing of its rows.

The manifest contract
---------------------
A UTF-8 CSV file with a header row. Required columns (:attr:`ManifestSchema.required`):

- ``path``: image file (DICOM, PNG or JPEG), *relative to the manifest's folder* (a path that
  is absolute or leaves that folder is refused, also through a symbolic link unless links out
  of the folder are allowed: ``allow_links_outside``, ``--allow-outside``);
- ``label``: ``0`` (negative) or ``1`` (positive), exactly — or any strings mapped to 0/1 by
  a user-supplied ``label_map`` (``{"No finding": 0, "COVID-19": 1}``);
- ``site``: the acquisition site (hospital, source dataset) — the *bias* label. Not needed
  when the site is read from a DICOM tag (``site_source="dicom:InstitutionName"``); the
  DICOM value then wins and a ``site`` column, if any, is kept as ``site_manifest``;
- ``patient_id``: splits are made by patient, never by image.

Optional (:attr:`ManifestSchema.optional`): ``view``, ``sex``, ``age``, ``split``
(``train``/``val``/``test``, used by the ``"manifest"`` split protocol); any other columns are
kept as text.

Rows are numbered as the CSV file's lines (the header is row 1, the first record row 2), so
"row 7" is line 7 in a text editor or spreadsheet. A problem with a row is a
:class:`ManifestProblem` ``(row, column, kind, reason)``; :func:`parse_row` finds those of one
row, :func:`cxrdebias.data.cxr.loading.load_manifest` those of the whole file.

Every reader and writer of a manifest takes its column names from :data:`MANIFEST`: the
validating loader (:mod:`.loading`), the split table (:mod:`.splits`), the synthetic data writer
(:mod:`cxrdebias.data.synthetic`) and the torch-free prediction runtime
(:func:`read_manifest_images`). This module imports neither torch nor pandas.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.tag import BaseTag

from cxrdebias.data.csv_records import read_csv_records, resolve_relative_path
from cxrdebias.data.images import resolve_tag
from cxrdebias.errors import ConfigError, DataError

#: how many problems a DataError message lists before "… and N more"
MAX_LISTED_PROBLEMS = 8


@dataclass(frozen=True)
class ManifestSchema:
    """Column names of a chest X-ray manifest CSV and of the tables made from it (module doc).

    One instance, :data:`MANIFEST`; use its attributes instead of spelling column names.
    """

    path: str = "path"
    label: str = "label"
    site: str = "site"
    patient_id: str = "patient_id"
    split: str = "split"
    #: optional columns with a meaning (any other column is kept as text)
    optional: tuple[str, ...] = ("view", "sex", "age", "split")
    #: columns :func:`~cxrdebias.data.cxr.loading.load_manifest` adds; a manifest may not use these names
    added: tuple[str, ...] = ("row", "abs_path", "image_sha256", "image_format", "site_manifest")
    #: the values of the ``split`` column
    splits: tuple[str, ...] = ("train", "val", "test")
    #: the meaning of the labels 0 and 1
    class_names: tuple[str, ...] = ("negative", "positive")

    @property
    def required(self) -> tuple[str, ...]:
        """``path, label, site, patient_id``."""
        return (self.path, self.label, self.site, self.patient_id)

    @property
    def columns(self) -> tuple[str, ...]:
        """Required then optional columns: every column with a meaning, in the order the
        synthetic data set writes them."""
        return self.required + self.optional

    @property
    def sample_fields(self) -> tuple[str, ...]:
        """``site, label, patient_id``: the columns carried along with an image outside training
        (prediction CSVs, the export's check images)."""
        return (self.site, self.label, self.patient_id)

    @property
    def split_table(self) -> tuple[str, ...]:
        """Columns of the split table a run saves (:func:`~cxrdebias.data.cxr.splits.save_splits`)."""
        return (self.path, self.patient_id, self.site, self.label, self.split)

    def required_for(self, *, site_from_dicom: bool) -> tuple[str, ...]:
        """The required columns; without ``site`` when the site is read from a DICOM tag."""
        return tuple(c for c in self.required if not (c == self.site and site_from_dicom))


#: the manifest schema (the one object that names the manifest's columns)
MANIFEST = ManifestSchema()
#: the values of the ``split`` column
SPLITS = MANIFEST.splits
#: names of the labels 0 and 1
CLASS_NAMES = list(MANIFEST.class_names)


# -- site source ------------------------------------------------------------------------------
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


#: what the row checks call to report a problem: ``problem(row, column, kind, reason)``
ProblemSink = Callable[[int, str, str, str], None]


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


# -- one row ----------------------------------------------------------------------------------
def parse_label(value: str | None, label_map: Mapping[str, int] | None) -> tuple[int | None, str | None]:
    """A ``label`` cell → ``(0 or 1, None)``, or ``(None, reason)`` when it is unusable.

    Without ``label_map`` the cell must be exactly ``0`` or ``1``; with one, a key of the map.
    """
    if value is None:
        return None, "missing (empty)"
    if label_map is not None:
        if value in label_map:
            return int(label_map[value]), None
        return None, f"{value!r} is not in the label map ({', '.join(map(repr, label_map))})"
    if value in ("0", "1"):
        return int(value), None
    return None, f"{value!r}; expected 0 or 1 (or pass a label_map)"


def parse_row(
    line: int,
    header: Sequence[str],
    fields: Sequence[str],
    *,
    root: Path,
    label_map: Mapping[str, int] | None,
    site_from_dicom: bool,
    first_by_path: dict[str, int],
    problem: ProblemSink,
    allow_links_outside: bool = False,
) -> dict[str, Any] | None:
    """One manifest record (CSV ``line``) → its row dict, reporting its problems to ``problem``.

    The row holds every header column (stripped text, ``None`` when empty) plus ``row``
    (``line``), ``abs_path`` (``None`` when the path is unusable), ``label`` (0/1 or ``None``)
    and a lower-cased ``split``. Checks: field count, the path (relative, inside ``root``, an
    existing file, not listed before: ``first_by_path`` maps normalised paths to their first
    line and is updated), the label, a non-empty site (unless ``site_from_dicom``) and patient,
    the split value. A record with the wrong number of fields is reported and gives ``None``.
    ``allow_links_outside``: symbolic links may lead out of ``root``
    (:func:`~cxrdebias.data.csv_records.resolve_relative_path`).
    """
    m = MANIFEST
    if len(fields) != len(header):
        problem(line, "-", "bad_row", f"{len(fields)} fields, the header has {len(header)}")
        return None
    rec: dict[str, Any] = {name: (value.strip() or None) for name, value in zip(header, fields, strict=True)}
    rec["row"] = line
    rec.setdefault(m.site, None)
    rel = rec[m.path] or ""
    full, kind, reason = resolve_relative_path(root, rel, allow_links_outside=allow_links_outside)
    rec["abs_path"] = str(full) if full is not None else None
    if kind:
        problem(line, m.path, kind, reason)
    else:
        key = os.path.normpath(rel)
        if key in first_by_path:
            problem(line, m.path, "duplicate_path", f"{rel!r} is also listed in row {first_by_path[key]}")
            rec["abs_path"] = None
        else:
            first_by_path[key] = line
    rec[m.label], reason = parse_label(rec[m.label], label_map)
    if reason is not None:
        problem(line, m.label, "bad_label", reason)
    if not site_from_dicom and rec[m.site] is None:
        problem(line, m.site, "missing_site", "missing (empty)")
    if rec[m.patient_id] is None:
        problem(line, m.patient_id, "missing_patient", "missing (empty)")
    if m.split in rec and rec[m.split] is not None:
        split = rec[m.split].lower()
        if split not in m.splits:
            problem(line, m.split, "bad_split", f"{rec[m.split]!r}; expected one of {', '.join(m.splits)} or empty")
        rec[m.split] = split
    return rec


# -- the image list of a manifest (the torch-free prediction runtime) ---------------------------
def read_manifest_images(manifest: str | os.PathLike, *, allow_links_outside: bool = False) -> list[tuple[Path, dict[str, str]]]:
    """The images a manifest lists, without validating labels or decoding anything.

    Only ``path`` is required. Returns, per record, the absolute image path and the
    :attr:`ManifestSchema.sample_fields` (``site``, ``label``, ``patient_id``) the file has, as
    stripped text. What ``cxrdebias predict`` reads from a manifest. ``allow_links_outside``:
    symbolic links may lead out of the manifest's folder (``predict --allow-outside``).

    Raises:
        DataError: unreadable CSV, no ``path`` column, a record with the wrong number of fields,
            a path that is missing, absolute or outside the manifest's folder, or no records.
    """
    manifest = Path(manifest)
    m = MANIFEST
    header, records = read_csv_records(manifest, columns=(m.path,))
    col = {name: header.index(name) for name in (m.path, *m.sample_fields) if name in header}
    found = []
    for line, values in records:
        if len(values) != len(header):
            raise DataError(f"{manifest}: row {line} has {len(values)} fields, the header has {len(header)}")
        path, _, reason = resolve_relative_path(
            manifest.parent, values[col[m.path]].strip(), allow_links_outside=allow_links_outside
        )
        if path is None:
            raise DataError(f"{manifest}: row {line} column {m.path!r}: {reason}")
        found.append((path, {name: values[i].strip() for name, i in col.items() if name != m.path}))
    if not found:
        raise DataError(f"{manifest}: manifest has no rows")
    return found
