"""Reading chest X-rays (DICOM, PNG, JPEG) into one displayable ``[0, 1]`` grayscale image.

This is the *only* image reader of the package: training, evaluation, export, the ONNX runtime
and the viewer all go through :func:`read_image`, so a pixel means the same thing everywhere.
It imports only numpy, Pillow and pydicom (never torch or monai) so that the torch-free
runtime and viewer can use it.

What :func:`read_image` returns is the image *as a radiologist's screen would show it*:
``float32``, 2-D, values in ``[0, 1]``, ``1`` = bright (bone, or the label text), ``0`` = dark.

DICOM (PS3.3 C.11 "Look Up Tables and Presentation States"), in the standard's order:

1. stored values → *modality LUT*: the Modality LUT Sequence or Rescale Slope/Intercept
   (:func:`pydicom.pixels.apply_modality_lut`);
2. → *VOI LUT*: the VOI LUT Sequence if present, else the first Window Center/Width pair
   (:func:`pydicom.pixels.apply_voi_lut`); its output range is mapped linearly onto
   ``[0, 1]``. Without either, the min–max of the modality-LUT output is used (recorded as
   ``meta["window"]["type"] == "min-max"``);
3. MONOCHROME1 (low values are bright) is inverted so that 1 is always bright.

PNG/JPEG: 8-bit values are divided by 255, 16-bit values by 65535 (full scale: a 12-bit image
stored in a 16-bit PNG stays dark; ``meta["value_range"]`` shows the stored min/max so that
such a source can be spotted). Colour images become grayscale with the ITU-R BT.601 luminance
``0.299 R + 0.587 G + 0.114 B``; an alpha channel is dropped. The EXIF orientation of a JPEG
is applied.

Refused with a :class:`~cxrdebias.errors.DataError` naming the file: missing, empty,
truncated or corrupt files, files that are not PNG/JPEG/DICOM whatever their extension,
multi-frame DICOM, colour DICOM, DICOM without Pixel Data, bit depths other than 1–16 stored
in 8 or 16 allocated bits, and images with more than ``max_pixels`` pixels (checked from the
header, before decoding).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image, ImageOps
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi, apply_voi_lut
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import DSfloat

from cxrdebias.errors import ConfigError, DataError

#: default upper limit on rows × columns (a 50-megapixel image is ~7000 × 7000; CXRs are ≤ 4k²)
DEFAULT_MAX_PIXELS = 50_000_000
#: file suffixes read as DICOM even without the 128-byte preamble + ``DICM`` marker
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic", ""})
#: ITU-R BT.601 luma weights (what Pillow's ``convert("L")`` uses, kept in float here)
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_PIL_FORMATS = ("PNG", "JPEG", "MPO")  # MPO: multi-picture JPEG from cameras; its first image is read

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


# -- public API ---------------------------------------------------------------------------------
def read_image(
    path: str | os.PathLike,
    *,
    site_tag: TagLike | None = "InstitutionName",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> LoadedImage:
    """Read a DICOM, PNG or JPEG chest X-ray as a float32 ``[0, 1]`` image (1 = bright).

    The format is recognised from the file's content (the DICOM ``DICM`` marker, the PNG and
    JPEG signatures), not from its name; a file without a marker is tried as a preamble-less
    DICOM only when its suffix is ``.dcm``/``.dicom``/``.dic`` or empty.

    Args:
        path: the image file.
        site_tag: DICOM keyword (``"InstitutionName"``) or tag (``0x00080080`` / ``(0x0008,
            0x0080)``) whose value is returned as ``meta["site"]``; ``None``: do not read a site.
        max_pixels: refuse images with more than this many pixels (checked before decoding).

    Raises:
        DataError: one line naming the file and what is wrong with it (see the module doc).
        ConfigError: ``site_tag`` is not a DICOM keyword or tag.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    tag = resolve_tag(site_tag) if site_tag is not None else None
    path = Path(path)
    head = _read_head(path)
    if head[128:132] == b"DICM":
        return _read_dicom(path, tag, max_pixels, force=False)
    if head.startswith(_PNG_SIGNATURE) or head.startswith(_JPEG_SIGNATURE):
        return _read_pil(path, max_pixels)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return _read_dicom(path, tag, max_pixels, force=True)
    raise DataError(
        f"{path}: not a PNG, JPEG or DICOM file (starts with {head[:8]!r}); expected a chest X-ray image"
    )


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
    head = _read_head(path)
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
    head = _read_head(path)
    is_dicom = head[128:132] == b"DICM"
    if not is_dicom and (head.startswith(_PNG_SIGNATURE) or head.startswith(_JPEG_SIGNATURE) or path.suffix.lower() not in DICOM_SUFFIXES):
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
        raise DataError(f"{path}: cannot apply the DICOM modality LUT ({type(exc).__name__}: {_short(exc)})") from None
    if values.ndim != 2:
        raise DataError(f"{path}: DICOM pixels of shape {values.shape}; expected a single-frame grayscale image")
    photometric = (_tag_text(ds, Tag("PhotometricInterpretation")) or "").upper()
    return values, {"window": window, "inverted": photometric == "MONOCHROME1"}


def window_level(pixels: np.ndarray, center: float, width: float) -> np.ndarray:
    """Window/level a ``[0, 1]`` image for display: ``clip((x - (center - width/2)) / width, 0, 1)``.

    ``center`` and ``width`` are in the same ``[0, 1]`` units as the image (the viewer's
    sliders); ``center=0.5, width=1`` is the identity. Returns float32.

    Raises:
        ValueError: ``width`` is not positive or the values are not finite.
    """
    if not (np.isfinite(center) and np.isfinite(width)) or width <= 0:
        raise ValueError(f"window width must be a positive finite number and center finite, got center={center}, width={width}")
    low = center - width / 2.0
    out = (np.asarray(pixels, dtype=np.float64) - low) / width
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def write_dicom(
    path: str | os.PathLike,
    array: np.ndarray,
    *,
    institution_name: str | None = None,
    patient_id: str | None = None,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    modality: str = "CR",
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a 2-D ``uint8``/``uint16`` array as a minimal valid single-frame DICOM file.

    The file is a CR image (Explicit VR Little Endian, with preamble and file meta) that
    :func:`read_image` and any DICOM viewer read back. It is *deterministic*: the study,
    series and instance UIDs are derived from the pixels and the given tags, so writing the
    same inputs twice gives byte-identical files (reproducible data hashes).

    Args:
        path: output file (parent folders are created; an existing file is replaced).
        array: H×W ``uint8`` or ``uint16`` stored values.
        institution_name: (0008,0080) InstitutionName, the default site tag.
        patient_id: (0010,0020) PatientID.
        photometric: ``"MONOCHROME2"`` (high = bright) or ``"MONOCHROME1"`` (high = dark).
        bits_stored: BitsStored (default: 8 for uint8, 16 for uint16); every value must fit.
        rescale: ``(slope, intercept)`` → RescaleSlope/RescaleIntercept (modality LUT).
        window: ``(center, width)`` → WindowCenter/WindowWidth, in modality-LUT units.
        modality: (0008,0060) Modality, ``"CR"`` or ``"DX"`` (sets the matching SOP class).
        extra: more elements by DICOM keyword, e.g. ``{"ViewPosition": "PA", "PatientSex": "F"}``;
            applied last, so it may also override the generated UIDs (``SOPInstanceUID`` …).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: wrong array shape/dtype, values above ``bits_stored``, unknown keyword.
    """
    arr = np.asarray(array)
    if arr.ndim != 2 or arr.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"write_dicom: expected a 2-D uint8 or uint16 array, got shape {arr.shape} dtype {arr.dtype}")
    if photometric not in _MONOCHROME:
        raise ValueError(f"write_dicom: photometric must be one of {_MONOCHROME}, got {photometric!r}")
    itembits = arr.dtype.itemsize * 8
    bits = itembits if bits_stored is None else int(bits_stored)
    if not 1 <= bits <= itembits:
        raise ValueError(f"write_dicom: bits_stored={bits} does not fit a {arr.dtype} array (1–{itembits})")
    if arr.size and int(arr.max()) >= 2**bits:
        raise ValueError(f"write_dicom: max value {int(arr.max())} does not fit bits_stored={bits}")
    sop_class = {
        "CR": pydicom.uid.ComputedRadiographyImageStorage,
        "DX": pydicom.uid.DigitalXRayImageStorageForPresentation,
    }.get(modality)
    if sop_class is None:
        raise ValueError(f"write_dicom: modality must be 'CR' or 'DX', got {modality!r}")

    arr = np.ascontiguousarray(arr)
    digest = hashlib.sha256(arr.tobytes()).hexdigest()
    seed = [digest, str(arr.shape), photometric, str(bits), str(institution_name), str(patient_id)]

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.Modality = modality
    ds.StudyInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[*seed, "study"])
    ds.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[*seed, "series"])
    ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[*seed, "instance"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if institution_name is not None:
        ds.InstitutionName = institution_name
    if patient_id is not None:
        ds.PatientID = patient_id
    ds.set_pixel_data(arr, photometric, bits, generate_instance_uid=False)
    if rescale is not None:
        ds.RescaleSlope = DSfloat(float(rescale[0]), auto_format=True)
        ds.RescaleIntercept = DSfloat(float(rescale[1]), auto_format=True)
        ds.RescaleType = "US"
    if window is not None:
        ds.WindowCenter = DSfloat(float(window[0]), auto_format=True)
        ds.WindowWidth = DSfloat(float(window[1]), auto_format=True)
    for keyword, value in (extra or {}).items():
        if tag_for_keyword(keyword) is None:
            raise ValueError(f"write_dicom: {keyword!r} is not a DICOM keyword")
        setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID  # ``extra`` may set its own UIDs

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# -- helpers ------------------------------------------------------------------------------------
def _read_head(path: Path) -> bytes:
    """First 132 bytes (enough for the DICOM marker); DataError for missing/empty/unreadable."""
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


def _dcmread(path: Path, *, force: bool, stop_before_pixels: bool = False) -> Dataset:
    try:
        ds = pydicom.dcmread(path, force=force, stop_before_pixels=stop_before_pixels)
    except Exception as exc:  # pydicom raises many types on corrupt input; the parser is the boundary
        raise DataError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {_short(exc)})") from None
    if force and len(ds) == 0:
        raise DataError(f"{path}: not a DICOM file (no 'DICM' marker and no readable data elements)")
    return ds


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


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


def _read_dicom(path: Path, site_tag: BaseTag | None, max_pixels: int, *, force: bool) -> LoadedImage:
    ds = _dcmread(path, force=force)
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
    if samples != 1 or photometric not in _MONOCHROME:
        raise DataError(
            f"{path}: colour DICOM (PhotometricInterpretation {photometric or 'missing'}, "
            f"SamplesPerPixel {samples}); expected grayscale MONOCHROME1 or MONOCHROME2"
        )
    rows = _int_tag(path, ds, "Rows")
    cols = _int_tag(path, ds, "Columns")
    if rows < 1 or cols < 1:
        raise DataError(f"{path}: DICOM image of {rows}×{cols} pixels; expected a non-empty image")
    if rows * cols > max_pixels:
        raise DataError(f"{path}: {rows}×{cols} = {rows * cols} pixels exceeds the limit of {max_pixels} (max_pixels)")
    bits_allocated = _int_tag(path, ds, "BitsAllocated")
    bits_stored = _int_tag(path, ds, "BitsStored", bits_allocated)
    if bits_allocated not in (8, 16) or not 1 <= bits_stored <= bits_allocated:
        raise DataError(
            f"{path}: BitsAllocated {bits_allocated} / BitsStored {bits_stored}; expected 8–16 bit grayscale"
        )
    transfer_syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
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
            f"{type(exc).__name__}: {_short(exc, 120)}){hint}"
        ) from None
    if stored.shape != (rows, cols):
        raise DataError(f"{path}: decoded pixels have shape {stored.shape}, header says {rows}×{cols}")

    try:
        values, window = _dicom_to_unit(ds, stored)
    except DataError:
        raise
    except Exception as exc:  # malformed LUT/window/rescale elements
        raise DataError(f"{path}: cannot apply the DICOM modality/VOI LUT ({type(exc).__name__}: {_short(exc)})") from None
    if not np.isfinite(values).all():
        raise DataError(f"{path}: the DICOM rescale/window values give non-finite pixels (window {window})")
    inverted = photometric == "MONOCHROME1"
    if inverted:
        values = 1.0 - values
    pixels = np.clip(values, 0.0, 1.0).astype(np.float32)

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
        "value_range": [_num(stored.min()), _num(stored.max())],
        "rescale": [float(slope), float(intercept)] if slope is not None and intercept is not None else None,
        "modality": _tag_text(ds, Tag("Modality")),
        "view_position": _tag_text(ds, Tag("ViewPosition")),
        "transfer_syntax": transfer_syntax or None,
        "site_tag": (keyword_for_tag(site_tag) or str(site_tag)) if site_tag is not None else None,
        "site": _tag_text(ds, site_tag) if site_tag is not None else None,
        "patient_id": _tag_text(ds, Tag("PatientID")),
    }
    return LoadedImage(pixels=pixels, meta=meta)


def _num(x: Any) -> float | int:
    return int(x) if isinstance(x, np.integer | int) else float(x)


def _dicom_to_unit(ds: Dataset, stored: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Modality LUT then VOI LUT / window, mapped onto [0, 1] (float64, not yet inverted)."""
    values = apply_modality_lut(stored, ds)
    if values.dtype.kind == "f" and ds.get("VOILUTSequence"):
        values = np.rint(values).astype(np.int64)  # a VOI LUT indexes integer modality values
    voi_items = ds.get("VOILUTSequence")
    has_lut = bool(voi_items) and all(voi_items[0].get(k) is not None for k in ("LUTDescriptor", "LUTData"))
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if has_lut:
        descriptor = [int(v) for v in voi_items[0].LUTDescriptor]
        entries = descriptor[0] or 2**16
        # the LUT's own output range: map every input it defines through pydicom's apply_voi
        lut_out = apply_voi(np.arange(descriptor[1], descriptor[1] + entries, dtype=np.int64), ds)
        low, high = float(lut_out.min()), float(lut_out.max())
        if high <= low:
            raise DataError(f"{ds.filename}: the VOI LUT maps every value to {low}; expected a non-constant LUT")
        out = apply_voi_lut(values, ds, prefer_lut=True).astype(np.float64)
        window = {"type": "voi_lut", "entries": entries, "first_mapped": descriptor[1], "bits": descriptor[2],
                  "explanation": _tag_text(voi_items[0], Tag("LUTExplanation"))}
        return (out - low) / (high - low), window
    if has_window:
        # pydicom maps below-window to y_min and above-window to y_max (PS3.3 C.11.2.1.2);
        # probing with ±1e300 reads that output range from pydicom itself.
        with np.errstate(over="ignore"):
            ends = apply_voi_lut(np.array([-1e300, 1e300]), ds, prefer_lut=False)
            out = apply_voi_lut(values, ds, prefer_lut=False)
        low, high = float(ends[0]), float(ends[1])
        center, width = ds.WindowCenter, ds.WindowWidth
        center = float(center[0] if isinstance(center, MultiValue) else center)
        width = float(width[0] if isinstance(width, MultiValue) else width)
        window = {"type": "window", "center": center, "width": width,
                  "function": str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()}
        return (np.asarray(out, dtype=np.float64) - low) / (high - low), window
    values = np.asarray(values, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    window = {"type": "min-max", "low": low, "high": high}
    if high <= low:
        return np.zeros_like(values), window
    return (values - low) / (high - low), window


def _read_pil(path: Path, max_pixels: int) -> LoadedImage:
    try:
        with Image.open(path) as im:
            fmt = im.format
            if fmt not in _PIL_FORMATS:
                raise DataError(f"{path}: {fmt} image; expected PNG, JPEG or DICOM")
            width, height = im.size
            if width < 1 or height < 1:
                raise DataError(f"{path}: image of {height}×{width} pixels; expected a non-empty image")
            if width * height > max_pixels:
                raise DataError(
                    f"{path}: {height}×{width} = {width * height} pixels exceeds the limit of {max_pixels} (max_pixels)"
                )
            im.load()
            try:
                orientation = int(im.getexif().get(0x0112, 1) or 1)
            except Exception:  # a malformed EXIF block does not make the pixels wrong
                orientation = 1
            upright = ImageOps.exif_transpose(im) if orientation != 1 else im
            pixels, bits, stored_range = _pil_to_unit(path, upright)
            mode = im.mode
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: image too large to decode safely ({_short(exc)})") from None
    except Exception as exc:  # truncated/corrupt files raise OSError, SyntaxError, ValueError …
        raise DataError(f"{path}: corrupt or truncated image ({type(exc).__name__}: {_short(exc)})") from None
    meta: dict[str, Any] = {
        "path": str(path),
        "format": "JPEG" if fmt == "MPO" else fmt,
        "shape": [height, width],
        "bits": bits,
        "photometric": "MONOCHROME2",
        "mode": mode,
        "window": {"type": "full-scale", "max": 2**bits - 1 if bits > 1 else 1},
        "inverted": False,
        "value_range": stored_range,
        "exif_orientation": orientation,
        "site": None,
        "patient_id": None,
    }
    return LoadedImage(pixels=pixels, meta=meta)


def _pil_to_unit(path: Path, im: Image.Image) -> tuple[np.ndarray, int, list[float | int]]:
    """Pillow image → float32 [0, 1] grayscale, bits per sample, stored [min, max]."""
    mode = im.mode
    if mode.startswith("I;16"):
        stored = np.asarray(im).astype(np.uint16)
        scale, bits = 65535.0, 16
    elif mode == "I":  # 16-bit PNG grayscale on some Pillow versions: int32 holding 0…65535
        stored = np.asarray(im)
        if stored.size and (stored.min() < 0 or stored.max() > 65535):
            raise DataError(f"{path}: 32-bit integer image with values {stored.min()}…{stored.max()}; expected 8 or 16 bit")
        scale, bits = 65535.0, 16
    elif mode == "L":
        stored = np.asarray(im)
        scale, bits = 255.0, 8
    elif mode == "LA":
        stored = np.asarray(im)[..., 0]
        scale, bits = 255.0, 8
    elif mode == "1":
        stored = np.asarray(im.convert("L"))
        scale, bits = 255.0, 1
    elif mode in ("RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr"):
        rgb = np.asarray(im.convert("RGB"), dtype=np.float64)
        stored = rgb
        gray = rgb @ np.asarray(LUMA_WEIGHTS)
        pixels = np.clip(gray / 255.0, 0.0, 1.0).astype(np.float32)
        return pixels, 8, [_num(rgb.min()), _num(rgb.max())]
    else:
        raise DataError(f"{path}: unsupported image mode {mode!r}; expected 8/16-bit grayscale or RGB")
    pixels = np.clip(stored.astype(np.float64) / scale, 0.0, 1.0).astype(np.float32)
    return pixels, bits, [_num(stored.min()), _num(stored.max())]
