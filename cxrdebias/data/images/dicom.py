"""Reading DICOM radiographs: stored values → modality LUT → VOI LUT / window → ``[0, 1]``
(PS3.3 C.11; the steps are described in :mod:`cxrdebias.data.images`), single tags without the
pixels, and the modality-LUT values a window/level control acts on."""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pydicom
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi, apply_voi_lut
from pydicom.tag import BaseTag, Tag

from cxrdebias.data.images.common import (
    DECODE_BUDGET,
    DEFAULT_MAX_PIXELS,
    DICOM_EXTRA_BYTES,
    JPEG_SIGNATURE,
    PNG_SIGNATURE,
    LoadedImage,
    TagLike,
    as_number,
    check_not_blank,
    check_size,
    open_regular,
    read_head,
    short_error,
)
from cxrdebias.errors import ConfigError, DataError

#: file suffixes read as DICOM even without the 128-byte preamble + ``DICM`` marker
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic", ""})
#: the grayscale Photometric Interpretations (MONOCHROME1: low values are bright)
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
#: pixels mapped through the LUTs at a time (float64 temporaries stay small whatever the image size)
_BLOCK_PIXELS = 1 << 20


def read_dicom_tag(path: str | os.PathLike, tag: TagLike) -> str | None:
    """Value of one DICOM tag as a stripped string, without decoding the pixels.

    Multi-valued elements are joined with ``\\`` (as DICOM stores them). Returns ``None`` when
    the tag is absent or empty. Used to read the acquisition site (``InstitutionName`` by
    default) of a whole manifest cheaply.

    Raises:
        DataError: the file is missing or not a DICOM file.
        ConfigError: ``tag`` is not a DICOM keyword or tag.
    """
    path = Path(path)
    head = read_head(path)
    resolved = resolve_tag(tag)
    force = head[128:132] != b"DICM"
    if force and path.suffix.lower() not in DICOM_SUFFIXES:
        raise DataError(f"{path}: not a DICOM file (no 'DICM' marker at byte 128); cannot read tag {tag!r}")
    ds = _dcmread(path, force=force, stop_before_pixels=True)
    return _tag_text(ds, resolved)


def resolve_tag(tag: TagLike) -> BaseTag:
    """A DICOM keyword (``"InstitutionName"``), int (``0x00080080``) or (group, element) pair
    → :class:`pydicom.tag.BaseTag`.

    Raises:
        ConfigError: unknown keyword or malformed tag.
    """
    if isinstance(tag, str):
        number = tag_for_keyword(tag.strip())
        if number is None:
            raise ConfigError(f"DICOM tag {tag!r}: not a DICOM keyword (e.g. 'InstitutionName', 'StationName')")
        return Tag(number)
    try:
        return Tag(tag)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ConfigError(f"DICOM tag {tag!r}: {exc}") from None


def read_dicom_modality_values(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The modality-LUT output of a DICOM file (stored values × RescaleSlope + RescaleIntercept,
    or the Modality LUT Sequence) as float32 H×W, and ``{"window", "inverted"}``: the file's
    first Window Center/Width (``{"type": "window", "center", "width"}``, modality-LUT units)
    or, without one, ``{"type": "min-max", "low", "high"}``, and whether it is MONOCHROME1.

    What a window/level control acts on (the viewer's sliders, in the file's own units).
    ``None`` for PNG/JPEG files. The file is expected to have passed :func:`read_image`.

    Raises:
        DataError: not a readable single-frame grayscale DICOM image.
    """
    path = Path(path)
    head = read_head(path)
    is_dicom = head[128:132] == b"DICM"
    if not is_dicom and (head.startswith(PNG_SIGNATURE) or head.startswith(JPEG_SIGNATURE) or path.suffix.lower() not in DICOM_SUFFIXES):
        return None
    ds = _dcmread(path, force=not is_dicom)
    if "PixelData" not in ds:
        raise DataError(f"{path}: DICOM has no Pixel Data; expected a radiograph")
    try:
        values = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
        if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
            center, width = ds.WindowCenter, ds.WindowWidth
            center = float(center[0] if isinstance(center, MultiValue) else center)
            width = float(width[0] if isinstance(width, MultiValue) else width)
            window: dict[str, Any] = {"type": "window", "center": center, "width": width}
        else:
            window = {"type": "min-max", "low": float(values.min()), "high": float(values.max())}
    except Exception as exc:  # decoder or LUT errors on a malformed file
        raise DataError(f"{path}: cannot apply the DICOM modality LUT ({type(exc).__name__}: {short_error(exc)})") from None
    if values.ndim != 2:
        raise DataError(f"{path}: DICOM pixels of shape {values.shape}; expected a single-frame grayscale image")
    photometric = (_tag_text(ds, Tag("PhotometricInterpretation")) or "").upper()
    return values, {"window": window, "inverted": photometric == "MONOCHROME1"}


def _dcmread(
    path: Path, *, force: bool, stop_before_pixels: bool = False, fileobj: BinaryIO | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Dataset:
    """The dataset of ``path`` (read from ``fileobj`` when given, else opened as a regular file);
    a deflated file is inflated with a cap (:func:`_inflate_capped`)."""
    if fileobj is None:
        with open_regular(path) as f:
            return _dcmread(path, force=force, stop_before_pixels=stop_before_pixels, fileobj=f, max_pixels=max_pixels)
    try:
        inflated = _inflate_capped(path, fileobj, force, max_pixels)
        ds = pydicom.dcmread(inflated or fileobj, force=force, stop_before_pixels=stop_before_pixels)
        if inflated is not None:  # what the file says (its pixels are native once inflated)
            ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    except DataError:
        raise
    except Exception as exc:  # pydicom raises many types on corrupt input; the parser is the boundary
        raise DataError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {short_error(exc)})") from None
    if force and len(ds) == 0:
        raise DataError(f"{path}: not a DICOM file (no 'DICM' marker and no readable data elements)")
    return ds


def _inflate_capped(path: Path, f: BinaryIO, force: bool, max_pixels: int) -> DicomBytesIO | None:
    """A Deflated Explicit VR Little Endian file as an inflated Explicit VR Little Endian one in
    memory, inflated in chunks and refused once it exceeds what an image of ``max_pixels``
    pixels can hold (pydicom would inflate it whole: a 3 MB file can hold 3 GB); ``None`` for
    any other file (``f`` rewound)."""
    try:
        f.seek(0)
        read_preamble(f, force)
        meta = FileMetaDataset(read_dataset(f, False, True, stop_when=lambda tag, vr, length: tag >> 16 != 2))
        deflated = meta.get("TransferSyntaxUID") == pydicom.uid.DeflatedExplicitVRLittleEndian
    except Exception:  # not readable as a file meta group: dcmread reports it
        deflated = False
    if not deflated:
        f.seek(0)
        return None
    start = f.tell()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    if "FileMetaInformationGroupLength" in meta:
        del meta.FileMetaInformationGroupLength
    head = DicomBytesIO()
    write_file_meta_info(head, meta, enforce_standard=False)
    prefix = b"\0" * 128 + b"DICM" + head.getvalue()
    cap = 2 * max_pixels + DICOM_EXTRA_BYTES
    out = bytearray(prefix)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    f.seek(start)
    try:
        while chunk := f.read(1 << 20):
            while chunk:
                out += inflater.decompress(chunk, cap + 1 - (len(out) - len(prefix)))
                if len(out) - len(prefix) > cap:
                    raise DataError(
                        f"{path}: deflated DICOM inflates to more than {cap} bytes, more than an image of at most "
                        f"{max_pixels} pixels can hold (max_pixels)"
                    )
                chunk = inflater.unconsumed_tail
    except zlib.error as exc:
        raise DataError(f"{path}: corrupt deflated DICOM ({short_error(exc)})") from None
    buffer = DicomBytesIO(bytes(out))
    buffer.name = str(path)
    return buffer


def _tag_text(ds: Dataset, tag: BaseTag) -> str | None:
    try:
        elem = ds.get(tag)
        if elem is None or elem.value is None:
            return None
        value = elem.value
    except Exception:  # a malformed element value (e.g. bad VR) is treated like a missing tag
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1", errors="replace")
    if isinstance(value, MultiValue | list | tuple):
        value = "\\".join(str(v) for v in value)
    text = str(value).strip().strip("\x00").strip()
    return text or None


def _int_tag(path: Path, ds: Dataset, keyword: str, default: int | None = None) -> int:
    try:
        value = ds.get(keyword, default)
        if value is None:
            raise DataError(f"{path}: DICOM tag {keyword} is missing; expected an integer")
        return int(value)
    except DataError:
        raise
    except Exception:
        raise DataError(f"{path}: DICOM tag {keyword} is not an integer") from None


def read_dicom(
    path: Path, site_tag: BaseTag | None, max_pixels: int, *, force: bool, fileobj: BinaryIO | None = None,
    min_side: int = 1,
) -> LoadedImage:
    """Decode the DICOM file ``path`` (``force``: it has no ``DICM`` marker; read from ``fileobj``
    when given) as a :class:`LoadedImage`, reading the site from ``site_tag``; DataError for
    anything :func:`~cxrdebias.data.images.read_image` refuses. Frames, samples, rows × columns
    and bits are checked from the header before the pixels are decoded."""
    ds = _dcmread(path, force=force, fileobj=fileobj, max_pixels=max_pixels)
    if "PixelData" not in ds:
        other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        if other:
            raise DataError(f"{path}: DICOM has {other[0]}; only integer Pixel Data (8–16 bit) is supported")
        if force:
            raise DataError(f"{path}: not a DICOM image (no 'DICM' marker at byte 128 and no Pixel Data)")
        raise DataError(f"{path}: DICOM has no Pixel Data (not an image, e.g. a report); expected a radiograph")
    frames = _int_tag(path, ds, "NumberOfFrames", 1)
    if frames > 1:
        raise DataError(f"{path}: multi-frame DICOM ({frames} frames); expected a single-frame radiograph")
    samples = _int_tag(path, ds, "SamplesPerPixel", 1)
    photometric = _tag_text(ds, Tag("PhotometricInterpretation")) or ""
    photometric = photometric.upper()
    if samples != 1 or photometric not in MONOCHROME:
        raise DataError(
            f"{path}: colour DICOM (PhotometricInterpretation {photometric or 'missing'}, "
            f"SamplesPerPixel {samples}); expected grayscale MONOCHROME1 or MONOCHROME2"
        )
    rows = _int_tag(path, ds, "Rows")
    cols = _int_tag(path, ds, "Columns")
    check_size(path, rows, cols, max_pixels, min_side, what="DICOM image")
    bits_allocated = _int_tag(path, ds, "BitsAllocated")
    bits_stored = _int_tag(path, ds, "BitsStored", bits_allocated)
    if bits_allocated not in (8, 16) or not 1 <= bits_stored <= bits_allocated:
        raise DataError(
            f"{path}: BitsAllocated {bits_allocated} / BitsStored {bits_stored}; expected 8–16 bit grayscale"
        )
    transfer_syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    DECODE_BUDGET.reserve(rows * cols)
    try:
        stored = ds.pixel_array
    except Exception as exc:  # decoder errors: truncated data, missing codec plugin, bad tags
        syntax = pydicom.uid.UID(transfer_syntax) if transfer_syntax else None
        try:  # a malformed Transfer Syntax UID is not a transfer syntax at all (is_compressed raises)
            compressed = syntax is not None and syntax.is_transfer_syntax and syntax.is_compressed
        except Exception:
            compressed = False
        hint = (
            "; compressed DICOM needs a decoder: pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg "
            "(or python-gdcm)"
            if compressed
            else ""
        )
        raise DataError(
            f"{path}: cannot decode DICOM Pixel Data (transfer syntax {syntax.name if syntax else 'unknown'}; "
            f"{type(exc).__name__}: {short_error(exc, 120)}){hint}"
        ) from None
    if stored.shape != (rows, cols):
        raise DataError(f"{path}: decoded pixels have shape {stored.shape}, header says {rows}×{cols}")
    check_not_blank(path, stored, f"stored value (BitsStored {bits_stored})")

    inverted = photometric == "MONOCHROME1"
    try:
        pixels, window = _dicom_to_unit(path, ds, stored, inverted)
    except DataError:
        raise
    except Exception as exc:  # malformed LUT/window/rescale elements
        raise DataError(f"{path}: cannot apply the DICOM modality/VOI LUT ({type(exc).__name__}: {short_error(exc)})") from None
    if pixels.min() == pixels.max():
        raise DataError(f"{path}: blank image after the DICOM rescale/window ({window}); expected a radiograph")

    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")  # valid: the LUT step used them
    meta: dict[str, Any] = {
        "path": str(path),
        "format": "DICOM",
        "shape": [rows, cols],
        "bits": bits_stored,
        "bits_allocated": bits_allocated,
        "photometric": photometric,
        "mode": None,
        "window": window,
        "inverted": inverted,
        "value_range": [as_number(stored.min()), as_number(stored.max())],
        "rescale": [float(slope), float(intercept)] if slope is not None and intercept is not None else None,
        "modality": _tag_text(ds, Tag("Modality")),
        "view_position": _tag_text(ds, Tag("ViewPosition")),
        "transfer_syntax": transfer_syntax or None,
        "site_tag": (keyword_for_tag(site_tag) or str(site_tag)) if site_tag is not None else None,
        "site": _tag_text(ds, site_tag) if site_tag is not None else None,
        "patient_id": _tag_text(ds, Tag("PatientID")),
    }
    return LoadedImage(pixels=pixels, meta=meta)



def _dicom_to_unit(path: Path, ds: Dataset, stored: np.ndarray, inverted: bool) -> tuple[np.ndarray, dict[str, Any]]:
    """Modality LUT then VOI LUT / window, mapped onto [0, 1], inverted for MONOCHROME1 and
    clipped: float32. Computed in float64 a block of rows at a time (the same numbers as for
    the whole image at once, with temporaries of :data:`_BLOCK_PIXELS` pixels)."""
    step = max(1, _BLOCK_PIXELS // max(1, stored.shape[1]))
    blocks = [stored[r : r + step] for r in range(0, stored.shape[0], step)]
    to_unit, window = _unit_mapping(path, ds, blocks)
    pixels = np.empty(stored.shape, dtype=np.float32)
    row = 0
    for block in blocks:
        values = to_unit(block)
        if not np.isfinite(values).all():
            raise DataError(f"{path}: the DICOM rescale/window values give non-finite pixels (window {window})")
        if inverted:
            values = 1.0 - values
        pixels[row : row + len(block)] = np.clip(values, 0.0, 1.0)
        row += len(block)
    return pixels, window


def _unit_mapping(path: Path, ds: Dataset, blocks: list[np.ndarray]) -> tuple[Any, dict[str, Any]]:
    """The function stored values → [0, 1] (float64, not yet inverted) and its window record."""
    voi_items = ds.get("VOILUTSequence")

    def modality(block: np.ndarray) -> np.ndarray:
        values = apply_modality_lut(block, ds)
        if values.dtype.kind == "f" and voi_items:
            values = np.rint(values).astype(np.int64)  # a VOI LUT indexes integer modality values
        return values

    has_lut = bool(voi_items) and all(voi_items[0].get(k) is not None for k in ("LUTDescriptor", "LUTData"))
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if has_lut:
        descriptor = [int(v) for v in voi_items[0].LUTDescriptor]
        entries = descriptor[0] or 2**16
        # the LUT's own output range: map every input it defines through pydicom's apply_voi
        lut_out = apply_voi(np.arange(descriptor[1], descriptor[1] + entries, dtype=np.int64), ds)
        low, high = float(lut_out.min()), float(lut_out.max())
        if high <= low:
            raise DataError(f"{path}: the VOI LUT maps every value to {low}; expected a non-constant LUT")
        window = {"type": "voi_lut", "entries": entries, "first_mapped": descriptor[1], "bits": descriptor[2],
                  "explanation": _tag_text(voi_items[0], Tag("LUTExplanation"))}
        return (lambda b: (apply_voi_lut(modality(b), ds, prefer_lut=True).astype(np.float64) - low) / (high - low)), window
    if has_window:
        # pydicom maps below-window to y_min and above-window to y_max (PS3.3 C.11.2.1.2);
        # probing with ±1e300 reads that output range from pydicom itself.
        with np.errstate(over="ignore"):
            ends = apply_voi_lut(np.array([-1e300, 1e300]), ds, prefer_lut=False)
        low, high = float(ends[0]), float(ends[1])
        center, width = ds.WindowCenter, ds.WindowWidth
        center = float(center[0] if isinstance(center, MultiValue) else center)
        width = float(width[0] if isinstance(width, MultiValue) else width)
        window = {"type": "window", "center": center, "width": width,
                  "function": str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()}

        def windowed(block: np.ndarray) -> np.ndarray:
            with np.errstate(over="ignore"):
                out = apply_voi_lut(modality(block), ds, prefer_lut=False)
            return (np.asarray(out, dtype=np.float64) - low) / (high - low)

        return windowed, window
    low, high = np.inf, -np.inf
    for block in blocks:
        values = np.asarray(modality(block), dtype=np.float64)
        low, high = min(low, float(values.min())), max(high, float(values.max()))
    window = {"type": "min-max", "low": low, "high": high}
    if high <= low:
        return (lambda b: np.zeros(b.shape, dtype=np.float64)), window
    return (lambda b: (np.asarray(modality(b), dtype=np.float64) - low) / (high - low)), window
