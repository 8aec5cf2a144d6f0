"""Reading user CSV files (the CXR manifest, the IMDB-Face split lists) with line numbers, and
resolving the image paths they hold.

Both produce one-line :class:`~cxrdebias.errors.DataError` messages that name the file and the
line, so that "line 7" is line 7 in a text editor (the header is line 1).
"""

from __future__ import annotations

import csv
import io
import os
import stat
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from cxrdebias.errors import DataError

#: one record of a CSV file: its first line number and its fields
Record = tuple[int, list[str]]


def read_csv_records(path: Path, *, columns: Sequence[str], what: str = "manifest") -> tuple[list[str], list[Record]]:
    """Header and ``(line number, fields)`` records of the UTF-8 CSV file ``path``.

    Blank lines are not records. ``columns`` are the required columns: the header must hold
    each of them. ``what`` (how the file is called: ``"manifest"``, ``"split list"``) only words
    the error messages.

    Raises:
        DataError: missing/unreadable file, non-UTF-8 text, malformed CSV, no header, a repeated
            or empty column name, a required column missing.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected a {what} CSV file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line} is not UTF-8 text; expected a UTF-8 CSV {what}") from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    records: list[Record] = []
    try:
        while True:
            start = reader.line_num + 1
            try:
                fields = next(reader)
            except StopIteration:
                break
            if not fields or all(not f.strip() for f in fields) and len(fields) == 1:
                continue  # a blank line is not a record
            if header is None:
                header = [f.strip() for f in fields]
            else:
                records.append((start, fields))
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num}: malformed CSV ({exc})") from None
    if header is None:
        raise DataError(f"{path}: empty {what}; expected a header row with columns {', '.join(columns)}")
    dupes = sorted(name for name, n in Counter(header).items() if n > 1)
    if dupes:
        raise DataError(f"{path}: header repeats column(s) {', '.join(map(repr, dupes))}")
    if "" in header:
        raise DataError(f"{path}: header has an empty column name (column {header.index('') + 1})")
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; the header has {', '.join(header)} "
            f"(required: {', '.join(columns)})"
        )
    return header, records


#: how a refusal of a link leaving the manifest folder names the option that allows it
ALLOW_OUTSIDE_HINT = "pass --allow-outside to follow links out of the manifest folder"


def resolve_relative_path(
    root: Path,
    rel: str,
    *,
    folder: str = "manifest folder",
    allow_links_outside: bool = False,
    hint: str | None = ALLOW_OUTSIDE_HINT,
) -> tuple[Path | None, str | None, str | None]:
    """Absolute path of the existing file ``rel`` under ``root``, or ``(None, kind, reason)``.

    ``rel`` must be relative and stay inside ``root`` (``folder`` names ``root`` in the
    reasons), also once symbolic links are resolved (a link ``images/x.png → /etc/passwd`` is
    refused, never opened), and name a regular file (not a FIFO, device or folder). ``kind``
    is one of ``missing_path``, ``bad_path``, ``path_outside``, ``missing_file``.

    ``allow_links_outside`` lets symbolic links lead out of ``root`` (images kept on a mounted
    share: ``images -> /mnt/pacs/export``); an absolute path, ``..`` in ``rel`` itself, a
    missing or non-regular file are refused all the same. ``hint`` (the option that allows
    such links; ``None`` when there is none) ends the refusal of a link leaving ``root``.
    """
    if not rel:
        return None, "missing_path", "missing (empty)"
    if "\x00" in rel:
        return None, "bad_path", "contains a NUL character"
    if os.path.isabs(rel) or Path(rel).drive:
        return None, "path_outside", f"{rel!r} is absolute; expected a path relative to the {folder}"
    norm = os.path.normpath(rel)
    if norm == ".." or norm.startswith(".." + os.sep) or norm == ".":
        return None, "path_outside", f"{rel!r} leaves the {folder}"
    full = root / norm
    try:
        mode = full.stat().st_mode  # follows links
        real, real_root = full.resolve(strict=True), root.resolve(strict=True)
    except FileNotFoundError:
        return None, "missing_file", f"file not found: {rel}"
    except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: a symbolic link loop
        return None, "missing_file", f"cannot access {rel!r} ({getattr(exc, 'strerror', None) or exc})"
    if not allow_links_outside and not real.is_relative_to(real_root):
        return None, "path_outside", f"{rel!r} leads outside the {folder} through a symbolic link" + (f" ({hint})" if hint else "")
    if not stat.S_ISREG(mode):
        return None, "missing_file", f"{rel!r} is not a regular file (a folder, FIFO or device)"
    return full, None, None
