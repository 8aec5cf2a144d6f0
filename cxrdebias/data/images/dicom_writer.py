"""Writing a minimal, deterministic single-frame DICOM file: the package's one DICOM writer (tests,
the synthetic data set, benchmarks)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.valuerep import DSfloat

from cxrdebias.data.images.dicom import MONOCHROME


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
    if photometric not in MONOCHROME:
        raise ValueError(f"write_dicom: photometric must be one of {MONOCHROME}, got {photometric!r}")
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
