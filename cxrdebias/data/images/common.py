"""What every image reader of :mod:`cxrdebias.data.images` shares: the decoded image
(:class:`LoadedImage`), the pixel limit, the file signatures and one-line error helpers."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from cxrdebias.errors import DataError

#: default upper limit on rows × columns (a 50-megapixel image is ~7000 × 7000; CXRs are ≤ 4k²)
DEFAULT_MAX_PIXELS = 50_000_000
#: smallest accepted height and width in pixels: a smaller "radiograph" (a 1×1 PNG) is refused,
#: not silently upscaled and scored
MIN_IMAGE_SIDE = 32
#: bytes a DICOM file may hold beyond its pixels (2 bytes each at most) before it is refused
#: unread: tags, overlays, private elements
DICOM_EXTRA_BYTES = 64 << 20
#: the first bytes of a PNG and of a JPEG file
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"

#: a DICOM tag: keyword (``"InstitutionName"``), number (``0x00080080``) or (group, element)
TagLike = str | int | tuple[int, int]


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image: ``pixels`` (float32, H×W, in ``[0, 1]``, 1 = bright) and ``meta``.

    ``meta`` is JSON-serialisable. Keys always present: ``path``, ``format`` (``"DICOM"``,
    ``"PNG"`` or ``"JPEG"``), ``shape`` ([rows, columns] as stored), ``bits`` (bits stored per
    sample), ``photometric`` (DICOM Photometric Interpretation, or ``"MONOCHROME2"`` for
    PNG/JPEG), ``mode`` (Pillow mode; ``None`` for DICOM), ``window`` (how stored values were
    mapped to [0, 1]: ``{"type": "window", "center", "width", "function"}``,
    ``{"type": "voi_lut", ...}``, ``{"type": "min-max", "low", "high"}`` or
    ``{"type": "full-scale", "max"}``), ``inverted`` (MONOCHROME1 was inverted),
    ``value_range`` ([min, max] of the stored values), ``site`` and ``patient_id`` (from the
    DICOM tags, ``None`` otherwise). DICOM adds ``rescale`` ([slope, intercept] or ``None``),
    ``modality``, ``view_position``, ``transfer_syntax`` and ``site_tag``.
    """

    pixels: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def site(self) -> str | None:
        """The acquisition site read from the DICOM tag (``None`` for PNG/JPEG or when absent)."""
        return self.meta.get("site")


def open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading, after checking that it is a regular file (a FIFO, device or
    socket named ``x.png`` would block or never end); DataError for missing/unreadable/other files.

    Opened non-blocking (opening a FIFO does not wait for a writer), checked with ``fstat`` on
    the opened descriptor (no race with a file swapped in between), then switched to blocking.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected an image file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise DataError(f"{path}: is a folder, expected an image file")
        if not stat.S_ISREG(mode):
            raise DataError(f"{path}: not a regular file ({_file_kind(mode)}); expected an image file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a plain file"


def read_head(path: Path) -> bytes:
    """First 132 bytes of ``path`` (enough for the DICOM marker); DataError for missing/empty/
    unreadable files and for anything but a regular file (:func:`open_regular`)."""
    with open_regular(path) as f:
        try:
            head = f.read(132)
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not head:
        raise DataError(f"{path}: empty file (0 bytes); expected a PNG, JPEG or DICOM image")
    return head


def check_size(path: Path, rows: int, cols: int, max_pixels: int, min_side: int, *, what: str = "image") -> None:
    """Refuse (DataError) an image of ``rows × cols`` pixels before it is decoded: empty, smaller
    than ``min_side`` on a side, or more than ``max_pixels`` pixels."""
    if rows < 1 or cols < 1:
        raise DataError(f"{path}: {what} of {rows}×{cols} pixels; expected a non-empty image")
    if rows * cols > max_pixels:
        raise DataError(f"{path}: {rows}×{cols} = {rows * cols} pixels exceeds the limit of {max_pixels} (max_pixels)")
    if rows < min_side or cols < min_side:
        raise DataError(f"{path}: {what} of {rows}×{cols} pixels is too small; expected at least {min_side}×{min_side}")


def check_not_blank(path: Path, stored: np.ndarray, what: str = "pixel") -> None:
    """Refuse (DataError) an image whose every ``what`` has one value: nothing to classify (a
    wrong BitsStored that masks all data away, a window far outside the data, an empty file)."""
    if stored.size and stored.min() == stored.max():
        raise DataError(f"{path}: blank image (every {what} is {as_number(stored.flat[0])}); expected a radiograph")


class PixelBudget:
    """How many pixels the threads of this process decode at once (bounded memory of ``data
    check`` and of pre-loading, whatever their number of workers).

    :meth:`scope` opens a scope in the current thread; :meth:`reserve` (called by the readers
    once the header gave the image size) waits until the pixels fit the budget beside those of
    other threads, or until no other thread holds any (an image larger than the budget is
    decoded alone); the pixels are given back when the outermost scope of the thread ends. A
    thread that already holds pixels does not wait (two threads each waiting for the other's
    pixels would never finish).
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._used = 0
        self._cond = threading.Condition()
        self._local = threading.local()

    @contextmanager
    def scope(self) -> Iterator[None]:
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            self._local.held = 0
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0 and self._local.held:
                with self._cond:
                    self._used -= self._local.held
                    self._cond.notify_all()
                self._local.held = 0

    def reserve(self, pixels: int) -> None:
        if getattr(self._local, "depth", 0) == 0:
            return  # outside a scope: nothing would give the pixels back
        with self._cond:
            if not self._local.held:
                self._cond.wait_for(lambda: self._used == 0 or self._used + pixels <= self.limit)
            self._used += pixels
        self._local.held += pixels


#: the process-wide decoding budget :func:`~cxrdebias.data.images.read_image` reserves from
DECODE_BUDGET = PixelBudget(DEFAULT_MAX_PIXELS)


def short_error(exc: BaseException, limit: int = 160) -> str:
    """``exc`` as one line of at most ``limit`` characters (for error messages)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def as_number(x: Any) -> float | int:
    """A numpy or Python number as a JSON-friendly ``int`` (integers) or ``float``."""
    return int(x) if isinstance(x, np.integer | int) else float(x)
