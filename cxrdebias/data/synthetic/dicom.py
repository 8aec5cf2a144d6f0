"""Encoding a synthetic image with its site's DICOM encoding and writing it (through the package's
one DICOM writer, :func:`cxrdebias.data.images.write_dicom`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cxrdebias.data.synthetic.styles import SiteStyle

_DETECTOR_MM = 350.0  # field of view of the simulated detector (for ImagerPixelSpacing)


def encode(d: np.ndarray, style: SiteStyle) -> np.ndarray:
    """Display values in [0, 1] → stored pixel values (uint16) of the site's DICOM encoding."""
    if not np.isfinite(d).all():  # a generator bug, never silently encode garbage
        raise RuntimeError("data.synthetic: non-finite pixel values")
    p = d if style.photometric == "MONOCHROME2" else 1 - d
    rescaled = style.value_lo + p.astype(np.float64) * (style.value_hi - style.value_lo)
    stored = np.rint((rescaled - style.rescale_intercept) / style.rescale_slope)
    return np.clip(stored, 0, 2**style.bits_stored - 1).astype(np.uint16)


def write_image(
    path: Path,
    stored: np.ndarray,
    style: SiteStyle,
    *,
    site: str,
    patient_id: str,
    sex: str,
    age: int,
    view: str,
    image_number: int,
    study_date: str,
) -> None:
    """Write one CR DICOM with the site's encoding (via :func:`cxrdebias.data.images.write_dicom`)."""
    from cxrdebias.data.images import write_dicom

    n = stored.shape[0]
    spacing = round(_DETECTOR_MM / n, 4)
    rescale = None
    if (style.rescale_slope, style.rescale_intercept) != (1.0, 0.0):
        rescale = (style.rescale_slope, style.rescale_intercept)
    write_dicom(
        path,
        stored,
        institution_name=site,
        patient_id=patient_id,
        photometric=style.photometric,
        bits_stored=style.bits_stored,
        rescale=rescale,
        window=((style.value_lo + style.value_hi) / 2, style.value_hi - style.value_lo),
        modality="CR",
        extra={
            "PatientName": f"SYNTHETIC^{patient_id}",
            "PatientSex": sex,
            "PatientAge": f"{age:03d}Y",
            "ViewPosition": view,
            "BodyPartExamined": "CHEST",
            "Manufacturer": "cxrdebias synthetic",
            "StudyDate": study_date,
            "ContentDate": study_date,
            "SeriesNumber": 1,
            "InstanceNumber": image_number,
            "ImagerPixelSpacing": [spacing, spacing],
            "BurnedInAnnotation": "YES",
            "ImageComments": "SYNTHETIC IMAGE - NOT A REAL PATIENT",
        },
    )


