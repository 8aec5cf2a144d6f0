"""A run is a folder: resolved config, provenance, metrics log, checkpoints and the report.

Files are always written atomically (temporary file in the same folder, fsync, rename), so a
run killed at any moment leaves either the old or the new version of a file, never half of one.
An existing run folder is never overwritten unless the caller says so (``force``), and then
only if it is recognisably a cxrdebias run (:mod:`cxrdebias.training.folders`); it is only
reused to continue the same run (``resume``). A process writing a run holds its lock, so a
second writer is refused.

A write that fails (a full disk, a folder that became read-only) raises :class:`OutputError`
(:class:`DiskFullError` for ENOSPC/EDQUOT) naming the file; the temporary file is removed and the
previous version of the file, if any, is left as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import yaml

from cxrdebias import distributed as dist_utils
from cxrdebias import fileio
from cxrdebias.errors import CheckpointError, OutputError, RunExistsError
from cxrdebias.fileio import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    atomic_write,
    json_default,
    output_error,
    write_json_atomic,
    write_text_atomic,
)
from cxrdebias.models.weights import load_torch_file
from cxrdebias.training.folders import (
    LOCK_FILE,
    acquire_lock,
    check_replaceable,
    clear_folder,
    is_marked,
    release_lock,
    write_marker,
)

RUN_INFO_FILE = "run.json"
#: the key of ``run.json`` → ``data`` that records where the manifest lies (:func:`manifest_location`)
MANIFEST_LOCATION = "manifest_location"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"


def torch_save_atomic(obj: Any, path: str | Path) -> None:
    atomic_write(Path(path), lambda f: torch.save(obj, f))


def torch_load_checked(path: str | Path) -> Any:
    """Load a checkpoint without running code from it (``weights_only``:
    :func:`cxrdebias.models.weights.load_torch_file`); a missing, truncated or corrupt file, or
    one holding pickled objects, is a :class:`CheckpointError`."""
    return load_torch_file(path, "checkpoint")


class RunDir:
    """The folder of one training run.

    Use :meth:`create` to start (or resume) a run. ``path`` may not exist yet.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -- life cycle -----------------------------------------------------------------------
    @classmethod
    def create(
        cls, path: str | Path, *, force: bool = False, resume: bool = False, protected: Iterable[str | Path] = ()
    ) -> RunDir:
        """Open ``path`` for a new run, holding its write lock (:func:`release_lock` or the
        process's exit releases it; a folder another process writes is a :class:`RunExistsError`).

        - new or empty folder: used as is;
        - existing run + ``resume``: reused (the caller checks the config matches);
        - existing non-empty folder + ``force``: its contents are deleted first, if it is a
          cxrdebias run folder and holds none of the ``protected`` paths (the input data;
          :func:`~cxrdebias.training.folders.check_replaceable`);
        - otherwise :class:`RunExistsError`.
        """
        run = cls(path)
        p = run.path
        if p.exists() and not p.is_dir():
            raise RunExistsError(f"{p}: exists and is not a folder; choose another --out")
        non_empty = p.is_dir() and any(e.name != LOCK_FILE for e in p.iterdir())
        if resume:
            if not non_empty:
                raise CheckpointError(f"{p}: nothing to resume (folder missing or empty); drop --resume to start a new run")
        elif non_empty:
            if not force:
                raise RunExistsError(
                    f"{p}: output folder already exists and is not empty; pass --force to overwrite it or --resume to continue it"
                )
            check_replaceable(p, "run", protected=protected)
        try:
            p.mkdir(parents=True, exist_ok=True)
            if dist_utils.world().is_main:  # under torchrun rank 0 writes the run; the other ranks only read it
                acquire_lock(p)
            if non_empty and not resume:
                clear_folder(p, keep=(LOCK_FILE,))
            (p / CHECKPOINT_DIR).mkdir(exist_ok=True)
            with tempfile.TemporaryFile(dir=p / CHECKPOINT_DIR):  # writable? (mkdir succeeds on an existing folder)
                pass
            if not is_marked(p, "run"):
                write_marker(p, "run")
        except OSError as exc:
            release_lock(p)
            where = f" at {exc.filename}" if exc.filename and str(exc.filename) != str(p) else ""
            raise OutputError(
                f"{p}: cannot create or write the output folder ({exc.strerror or exc}{where}); choose a writable --out"
            ) from None
        except BaseException:
            release_lock(p)
            raise
        return run

    def release(self) -> None:
        """Release this process's write lock of the run folder (see :meth:`create`)."""
        release_lock(self.path)

    # -- files ----------------------------------------------------------------------------
    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINT_DIR

    def write_config(self, config: dict[str, Any]) -> None:
        write_text_atomic(self.file(CONFIG_FILE), yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict[str, Any]:
        path = self.file(CONFIG_FILE)
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; {self.path} is not a cxrdebias run folder")
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{path}: expected the run's config (a mapping), got {type(config).__name__}")
        return config

    def read_config_located(self) -> dict[str, Any]:
        """:meth:`read_config` with ``data.manifest`` replaced by the manifest as found from here
        (:meth:`locate_manifest`), so a run is evaluated and exported from any folder and after
        the run folder was moved together with its data."""
        config = self.read_config()
        data = config.get("data")
        if isinstance(data, dict) and isinstance(data.get("manifest"), str) and data["manifest"]:
            data["manifest"] = str(self.locate_manifest(data["manifest"]))
        return config

    def locate_manifest(self, configured: str | Path) -> Path:
        """The run's manifest: the first existing of the path recorded relative to the run folder
        (``run.json`` → ``data.manifest_location``, :func:`manifest_location`), the absolute path
        recorded at training and ``configured`` itself (relative to the current folder: runs
        from before the record); ``configured`` when none exists (the reader names it)."""
        try:
            data = self.read_json(RUN_INFO_FILE).get("data") or {}
            where = data.get(MANIFEST_LOCATION) or {}
        except (OSError, ValueError, AttributeError):
            where = {}
        candidates = []
        if isinstance(where, dict):
            if isinstance(rel := where.get("relative_to_run"), str):
                candidates.append(self.path / rel)
            if isinstance(absolute := where.get("absolute"), str):
                candidates.append(Path(absolute))
        return next((p for p in candidates if p.is_file()), Path(configured))

    def write_json(self, name: str, obj: Any) -> None:
        write_json_atomic(self.file(name), obj)

    def read_json(self, name: str) -> Any:
        return json.loads(self.file(name).read_text())

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one line to ``metrics.jsonl`` (flushed and fsynced)."""
        path = self.file(METRICS_FILE)
        data = (json.dumps(record, default=json_default) + "\n").encode("utf-8")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as exc:
            raise output_error(path, exc) from None
        try:
            size = os.fstat(fd).st_size
            f = fileio.open_for_write(fd, path, buffering=0)  # unbuffered: nothing is left to flush after a failure
        except BaseException:
            os.close(fd)
            raise
        try:
            view = memoryview(data)
            while view:
                view = view[f.write(view) :]
            os.fsync(f.fileno())
        except OSError as exc:
            try:
                os.ftruncate(fd, size)  # drop a half-written line: the log stays whole lines
            except OSError:
                pass
            raise output_error(path, exc) from None
        finally:
            try:
                f.close()
            except OSError:
                pass

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.file(METRICS_FILE)
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, last_epoch: int) -> None:
        """Keep only the log lines of epochs ``<= last_epoch`` (used when resuming)."""
        kept = [r for r in self.read_metrics() if r.get("epoch", 0) <= last_epoch]
        write_text_atomic(self.file(METRICS_FILE), "".join(json.dumps(r) + "\n" for r in kept))


def manifest_location(manifest: str | Path, run_dir: str | Path) -> dict[str, str | None]:
    """Where a run's manifest lies, as ``run.json`` records it: ``absolute`` and
    ``relative_to_run`` (from the run folder; None when there is no relative path, e.g. another
    drive). Lexical (symbolic links are not followed), so moving the run folder together with
    its data keeps the relative path true."""
    absolute = os.path.abspath(manifest)
    try:
        relative: str | None = os.path.relpath(absolute, os.path.abspath(run_dir))
    except ValueError:
        relative = None
    return {"absolute": absolute, "relative_to_run": relative}


def staging_folder(final: str | Path) -> Path:
    """A new empty hidden folder beside ``final`` to write its files into before
    :func:`replace_folder` puts it in place (so a failure never leaves a half-written ``final``)."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        os.chmod(staging, fileio.new_folder_mode())  # mkdtemp's folder is private (0700)
        return staging
    except OSError as exc:
        raise output_error(final, exc) from None


def replace_folder(staging: str | Path, final: str | Path) -> None:
    """Put the finished folder ``staging`` at ``final`` (replacing an existing ``final``, whose
    old contents are deleted only after the new folder is in place)."""
    staging, final = Path(staging), Path(final)
    old = None
    try:
        if final.is_dir() and any(final.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
            os.replace(final, old)  # onto the empty folder just made
        os.replace(staging, final)  # a rename; onto a missing or empty folder
    except OSError as exc:
        if old is not None:
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)  # still the empty placeholder
            else:
                os.replace(old, final)  # put the previous folder back
        raise output_error(final, exc) from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
