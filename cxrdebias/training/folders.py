"""Which folders ``--force`` may replace, and the lock of a run folder while it is written.

``--force`` deletes a folder's contents, so it only ever does so for a folder that cxrdebias
itself wrote:

- a folder cxrdebias creates gets a marker file (:data:`MARKERS`: ``.cxrdebias-run`` for a
  training run, ``.cxrdebias-report`` for an evaluation report; a small JSON saying what wrote
  it and when);
- a folder written before the markers existed is recognised by its layout
  (:data:`LEGACY_LAYOUTS`: ``config.yaml`` + ``run.json`` for a run, ``report.json`` +
  ``report.md`` for a report);
- never a folder holding ``.git``, nor the folder of the input data (the manifest's folder, the
  data root) or one above it, nor a folder the command reads (the run being evaluated) or one
  above it, whatever it holds.

Anything else is refused with a :class:`RunExistsError` that says why; nothing is deleted.

A process writing a run holds an exclusive ``flock`` on the run's :data:`LOCK_FILE` until
:func:`release_lock` or its exit, so a second ``train --force``/``--resume`` on the same folder is
refused instead of replacing the first one's files under it. The lock file itself stays in the
folder; a lock left by a process that died is not held by anyone (the kernel drops ``flock``
locks with the process), so it never blocks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Literal

from cxrdebias.errors import OutputError, RunExistsError
from cxrdebias.fileio import CONFIG_FILE, write_json_atomic

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking
    fcntl = None  # type: ignore[assignment]

Kind = Literal["run", "report"]
MARKERS: dict[str, str] = {"run": ".cxrdebias-run", "report": ".cxrdebias-report"}
#: the files by which a folder written before the markers existed is recognised
LEGACY_LAYOUTS: dict[str, tuple[str, ...]] = {"run": (CONFIG_FILE, "run.json"), "report": ("report.json", "report.md")}
LOCK_FILE = ".cxrdebias.lock"
WHAT = {"run": "run folder", "report": "report folder"}

#: the run locks this process holds: resolved folder → open lock file
_held: dict[Path, IO[str]] = {}


def write_marker(folder: str | Path, kind: Kind) -> None:
    """Mark ``folder`` as written by cxrdebias (a ``kind`` folder)."""
    from cxrdebias import __version__

    record = {"cxrdebias": kind, "version": __version__, "created": datetime.now(timezone.utc).isoformat()}
    write_json_atomic(Path(folder) / MARKERS[kind], record)


def is_marked(folder: Path, kind: Kind) -> bool:
    """``folder`` holds the marker of a ``kind`` folder."""
    try:
        return json.loads((folder / MARKERS[kind]).read_text()).get("cxrdebias") == kind
    except (OSError, ValueError, AttributeError):
        return False


def looks_like(folder: Path, kind: Kind) -> bool:
    """``folder`` was written by cxrdebias: its marker, or the layout of before the markers."""
    return is_marked(folder, kind) or all((folder / name).is_file() for name in LEGACY_LAYOUTS[kind])


def _encloses(folder: Path, other: Path) -> bool:
    return folder == other or folder in other.parents


def check_replaceable(folder: str | Path, kind: Kind, *, protected: Iterable[str | Path] = ()) -> None:
    """Raise :class:`RunExistsError` unless ``--force`` may delete the existing folder
    ``folder`` (module doc). ``protected``: the paths the command reads (input data files or
    folders, the run being evaluated); the folder holding any of them is never replaced."""
    folder = Path(folder)
    real = folder.resolve()
    refuse = f"{folder}: --force does not replace this folder"
    hint = "; choose another --out (or delete the folder yourself)"
    if (folder / ".git").exists():
        raise RunExistsError(f"{refuse}: it holds a .git repository{hint}")
    for p in protected:
        p = Path(p)
        try:
            target = p.resolve()
        except OSError:
            continue
        where = target if target.is_dir() else target.parent
        if _encloses(real, where):
            raise RunExistsError(f"{refuse}: it holds {p}, which this command reads{hint}")
    if folder.is_symlink():
        raise RunExistsError(f"{refuse}: it is a symbolic link{hint}")
    if not looks_like(folder, kind):
        raise RunExistsError(
            f"{refuse}: it is not a cxrdebias {WHAT[kind]} (no {MARKERS[kind]} marker, and not "
            f"{' + '.join(LEGACY_LAYOUTS[kind])}){hint}"
        )


def clear_folder(folder: Path, keep: Iterable[str] = ()) -> None:
    """Delete the contents of ``folder`` except the entries named in ``keep``."""
    import shutil

    keep = set(keep)
    try:
        for entry in folder.iterdir():
            if entry.name in keep:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    except OSError as exc:
        raise OutputError(f"{folder}: --force cannot delete the old contents ({exc.strerror or exc} at {exc.filename})") from None


def acquire_lock(folder: Path) -> None:
    """Hold the write lock of the run ``folder`` (an existing folder) for this process (module doc);
    :class:`RunExistsError` when another process holds it. Re-entrant within a process."""
    if fcntl is None:  # pragma: no cover
        return
    key = folder.resolve()
    path = folder / LOCK_FILE
    held = _held.get(key)
    if held is not None:
        try:
            if os.path.samestat(os.fstat(held.fileno()), os.stat(path)):
                return  # this process holds it already (a resume in the same process)
        except OSError:
            pass
        release_lock(folder)
    f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open until release_lock / exit (OSError: the caller's)
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip()[:20]
        f.close()
        by = f" (pid {pid})" if pid.isdigit() else ""
        raise RunExistsError(
            f"{folder}: another cxrdebias process{by} is writing this run (it holds {LOCK_FILE}); "
            "wait for it to finish or choose another --out"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _held[key] = f


def release_lock(folder: str | Path) -> None:
    """Release this process's write lock of ``folder`` (no-op if it holds none)."""
    f = _held.pop(Path(folder).resolve(), None)
    if f is not None:
        f.close()  # closing the file drops the flock


__all__ = [
    "LEGACY_LAYOUTS",
    "LOCK_FILE",
    "MARKERS",
    "acquire_lock",
    "check_replaceable",
    "clear_folder",
    "is_marked",
    "looks_like",
    "release_lock",
    "write_marker",
]
