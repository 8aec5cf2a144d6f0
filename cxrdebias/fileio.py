"""Files written whole or not at all, and content hashes: the one atomic writer of the package.

Every file cxrdebias writes goes through :func:`atomic_write` (temporary file in the same
folder, fsync, rename), so a process killed at any moment leaves either the old or the new
version of a file, never half of one. A write that fails (a full disk, a folder that became
read-only) raises :class:`~cxrdebias.errors.OutputError` (:class:`~cxrdebias.errors.DiskFullError`
for ENOSPC/EDQUOT) naming the file; the temporary file is removed and the previous version of
the file, if any, is left as it was. The file gets the permissions of a plain new file (0666
less the umask: 0644 under the usual umask 022), not the private 0600 of the temporary file
(:func:`new_file_mode`; folders: :func:`new_folder_mode`).

A leaf module (no torch import): the torch-free runtime and the data layer write through it too.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

from cxrdebias.errors import DataError, DiskFullError, OutputError

# the run-folder layout that a disk-full hint refers to (cxrdebias.training.runs uses the same names)
CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"

#: errno values that mean "the disk (or the user's quota) is full"
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def open_for_write(fd: int, path: Path, buffering: int = -1) -> BinaryIO:
    """The file object that every write of this module goes through (``path``: the file it
    becomes; the fault tests replace this with one that runs out of space)."""
    return os.fdopen(fd, "wb", buffering=buffering)


def _retry_hint(path: Path) -> str:
    """What to do once space is freed: resume a run that has a checkpoint, else start again."""
    root = path.parent.parent if path.parent.name == CHECKPOINT_DIR else path.parent
    if not (root / CONFIG_FILE).is_file():
        return "free some space and run the command again"
    if any((root / CHECKPOINT_DIR / name).is_file() for name in ("last.pt", "prev.pt")):
        return "free some space, then continue the run with --resume (from its last whole checkpoint)"
    return "free some space and start the run again with --force (no epoch was saved)"


def output_error(path: str | Path, exc: OSError) -> OutputError:
    """The one-line error for an ``OSError`` raised while writing ``path``."""
    path = Path(path)
    if exc.errno in DISK_FULL_ERRNOS:
        return DiskFullError(path, _retry_hint(path))
    return OutputError(f"{path}: cannot write ({exc.strerror or exc}); check the output folder")


def _umask() -> int:
    """The process's umask, read without setting it where the system tells it (Linux), since
    setting it is process-wide and a file another thread creates meanwhile would get mode 0666."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The permissions ``open()`` gives a new file: 0666 less the umask (0644 under umask 022)."""
    return 0o666 & ~_umask()


def new_folder_mode() -> int:
    """The permissions ``mkdir`` gives a new folder: 0777 less the umask (0755 under umask 022)."""
    return 0o777 & ~_umask()


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(file)`` atomically (module doc)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, new_file_mode())  # mkstemp's file is private (0600)
        with open_for_write(fd, path) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        os_error = _os_error_in(exc) if isinstance(exc, Exception) else None  # not KeyboardInterrupt
        if os_error is not None:
            raise output_error(path, os_error) from exc
        raise


def _os_error_in(exc: BaseException) -> OSError | None:
    """The ``OSError`` that ``exc`` is or was raised while handling (``torch.save`` turns a
    failed write into a ``RuntimeError`` raised from its ``__exit__``)."""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 10:
        if isinstance(e, OSError):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def check_writable(path: str | Path, *, folder: bool = False) -> None:
    """Fail early (before hours of work) when the file ``path`` (or, with ``folder``, files in
    the folder ``path``) could not be written: the nearest existing folder on the way must be a
    folder that takes a new file. Creates nothing that stays.

    Raises :class:`~cxrdebias.errors.OutputError` naming ``path`` (a file in the way of a
    folder, a read-only folder or file system).
    """
    path = Path(path)
    probe = path if folder else path.parent
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{probe} is not a folder")
        with tempfile.TemporaryFile(dir=probe, prefix=".cxrdebias-probe-"):
            pass
    except OSError as exc:
        raise output_error(path, exc) from None


#: first characters that make a spreadsheet read a text cell as a formula (CSV injection)
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> Any:
    """A CSV cell that no spreadsheet runs: text starting with ``= + - @``, a tab or a carriage
    return gets a leading ``'`` (OWASP's advice); numbers (``-0.5``) and other values stay."""
    if not isinstance(value, str) or not value.startswith(FORMULA_STARTS):
        return value
    if value == value.strip():
        try:
            float(value)
            return value  # a number in text form, e.g. -0.5
        except ValueError:
            pass
    return "'" + value


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    atomic_write(Path(path), lambda f: f.write(data))


def write_png_atomic(fig: Any, path: str | Path, dpi: int) -> Path:
    """A Matplotlib figure as a PNG file, written atomically (the figure is left open)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    write_bytes_atomic(path, buf.getvalue())
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


def json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if getattr(obj, "ndim", 0) and hasattr(obj, "tolist"):  # tensors and arrays (no torch import here)
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json_file(path: str | Path, max_bytes: int) -> Any:
    """The JSON document of a file handed to us, its size checked before it is read; a
    :class:`DataError` ``PATH: …`` (one line) when it cannot be read, is larger than ``max_bytes``
    or is not JSON."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise DataError(f"{path}: {size} bytes; at most {max_bytes} are read")
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None


def sha256_files(paths: Iterable[str | Path], chunk: int = 1 << 20) -> str:
    """SHA-256 over the names and bytes of ``paths`` (in the order given)."""
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def sha256_tensors(*tensors: Any) -> str:
    """SHA-256 of the raw bytes of CPU tensors (shape and dtype included)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def replace_marked_block(text: str, begin: str, end: str, body: str, where: str = "file") -> str:
    """``text`` with what lies between the first ``begin`` marker and the first ``end`` marker
    after it replaced by ``body``, which stands on lines of its own (``begin\\nbody\\nend``,
    ``body`` as given); everything before ``begin`` and after ``end`` is kept as it was.

    Raises ``ValueError`` (``"<where>: missing the <begin> … <end> markers"``) when ``begin`` is
    absent or no ``end`` follows it.
    """
    head, found, rest = text.partition(begin)
    if not found or end not in rest:
        raise ValueError(f"{where}: missing the {begin} … {end} markers")
    return f"{head}{begin}\n{body}\n{end}{rest.split(end, 1)[1]}"
