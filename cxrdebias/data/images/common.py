"""What every image reader of :mod:`cxrdebias.data.images` shares: the decoded image
(:class:`LoadedImage`), the pixel limit, the file signatures and one-line error helpers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxrdebias.errors import DataError

#: default upper limit on rows × columns (a 50-megapixel image is ~7000 × 7000; CXRs are ≤ 4k²)
DEFAULT_MAX_PIXELS = 50_000_000
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


def read_head(path: Path) -> bytes:
    """First 132 bytes of ``path`` (enough for the DICOM marker); DataError for missing/empty/unreadable."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected an image file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not head:
        raise DataError(f"{path}: empty file (0 bytes); expected a PNG, JPEG or DICOM image")
    return head


def short_error(exc: BaseException, limit: int = 160) -> str:
    """``exc`` as one line of at most ``limit`` characters (for error messages)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def as_number(x: Any) -> float | int:
    """A numpy or Python number as a JSON-friendly ``int`` (integers) or ``float``."""
    return int(x) if isinstance(x, np.integer | int) else float(x)
