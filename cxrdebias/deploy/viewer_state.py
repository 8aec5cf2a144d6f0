"""Page logic of the Streamlit viewer (``apps/viewer.py``), testable without Streamlit.

Torch-free (numpy, pandas, Pillow, pydicom, onnxruntime through :mod:`cxrdebias.deploy.runtime`):
the viewer must run where only the deployment dependencies are installed.

- :func:`study_table` / :func:`filter_table` / :func:`sort_table`: one row per image (file,
  patient, site, probability, predicted label, ground truth when known, disagreement);
- :func:`analyse`: what selecting an image computes (read → preprocess → onnxruntime →
  CAM on the original pixels), the step timed by ``benchmarks/bench_viewer.py``;
- :func:`analyse_with_source`: both, what the page computes once per selected image;
- :func:`display_source` / :func:`apply_window`: window/level on the raw DICOM values
  (modality-LUT output, e.g. Hounsfield-like units) or on the ``[0, 1]`` pixels of PNG/JPEG;
- :func:`model_panel`: the model's intended use, method and per-site validation table;
- :func:`report_png` (:mod:`cxrdebias.deploy.viewer_report`): a one-page PNG report of one image;
- :func:`save_upload`: an uploaded file → an image input, or a one-line error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from cxrdebias.data.images import (
    LoadedImage,
    read_dicom_modality_values,
    read_dicom_tag,
    read_image,
    window_level,
)
from cxrdebias.data.preprocess import ResizeGeometry
from cxrdebias.deploy.onnx_metadata import ModelMetadata, format_metric
from cxrdebias.deploy.overlay import ALPHA, MAX_OVERLAY_SIDE, cam_to_image, overlay
from cxrdebias.deploy.runtime import CXRModel, InputImage, RuntimePredictions
from cxrdebias.deploy.viewer_worklist import OOD_COLUMNS, ood_columns
from cxrdebias.errors import DataError
from cxrdebias.fileio import spreadsheet_safe

NOT_FOR_CLINICAL_USE = (
    "NOT FOR CLINICAL USE. Research software about shortcut learning (hospital site as a bias); "
    "its outputs must not be used for diagnosis or treatment decisions."
)
#: columns of the study table, in display order
TABLE_COLUMNS = ("file", "patient", "site", "probability", "predicted_label", "ground_truth", "disagrees")
#: values of the disagreement filter
DISAGREEMENT = ("all", "disagree", "agree")
UNKNOWN = ""
#: longest side of the pictures the page shows (window/level and the overlay work at this size)
MAX_DISPLAY_SIDE = 1024
_DICOM_SUFFIXES = (".dcm", ".dicom", ".dic", "")


# -- study table --------------------------------------------------------------------------------
def _dicom_fields(image: InputImage) -> dict[str, str]:
    """Site (InstitutionName) and patient (PatientID) of a DICOM file, read without pixels."""
    if image.path is None or image.path.suffix.lower() not in _DICOM_SUFFIXES:
        return {}
    out = {}
    for key, tag in (("site", "InstitutionName"), ("patient_id", "PatientID")):
        try:
            value = read_dicom_tag(image.path, tag)
        except DataError:
            return {}
        if value:
            out[key] = value
    return out


def ground_truth(label: str | None, labels: Sequence[str]) -> str:
    """A manifest's ``label`` (``0``/``1`` index, or a class name) as a class name; ``""`` if unknown."""
    text = (label or "").strip()
    if text in labels:
        return text
    if text.isdigit() and int(text) < len(labels):
        return labels[int(text)]
    return UNKNOWN


def study_table(images: Sequence[InputImage], predictions: RuntimePredictions, ood_threshold: float | None = None) -> pd.DataFrame:
    """One row per image: ``file, patient, site, probability, predicted_label, ground_truth,
    disagrees`` (``disagrees`` is ``None`` when the ground truth is unknown), then
    ``ood_score, in_distribution`` when the predictions carry OOD scores
    (:func:`cxrdebias.deploy.viewer_worklist.ood_columns`; ``ood_threshold``: the model's, used
    when they carry no ``in_distribution``).

    Site and patient come from the manifest, else from the DICOM tags (InstitutionName,
    PatientID), else are empty.
    """
    if len(images) != len(predictions.names):
        raise ValueError(f"{len(images)} images but {len(predictions.names)} predictions")
    rows = []
    for i, image in enumerate(images):
        fields = {**_dicom_fields(image), **{k: v for k, v in image.fields.items() if v}}
        truth = ground_truth(fields.get("label"), predictions.labels)
        predicted = predictions.predicted_labels[i]
        rows.append(
            {
                "file": image.name,
                "patient": fields.get("patient_id", UNKNOWN),
                "site": fields.get("site", UNKNOWN),
                "probability": float(predictions.positive_probability[i]),
                "predicted_label": predicted,
                "ground_truth": truth,
                "disagrees": (predicted != truth) if truth else None,
            }
        )
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    ood = ood_columns(predictions, ood_threshold)
    if ood is not None:
        for column in OOD_COLUMNS:
            table[column] = ood[column]
    return table


def predict_study(model: CXRModel, images: Sequence[InputImage], batch_size: int = 16) -> tuple[pd.DataFrame, list[InputImage], list[str]]:
    """Predict every image; unreadable ones are left out and reported instead of failing all.

    Returns the study table, the images in its rows (same order) and one message per image
    that could not be read.
    """
    ood_threshold = model.metadata.raw.get("ood_threshold")
    kept: list[InputImage] = []
    tables: list[pd.DataFrame] = []
    errors: list[str] = []
    for start in range(0, len(images), batch_size):
        chunk = list(images[start : start + batch_size])
        try:
            tables.append(study_table(chunk, model.predict(chunk, batch_size=batch_size), ood_threshold))
            kept += chunk
            continue
        except DataError:
            pass
        for image in chunk:  # a bad file in the batch: one at a time, to name it and keep the rest
            try:
                tables.append(study_table([image], model.predict([image]), ood_threshold))
                kept.append(image)
            except DataError as exc:
                errors.append(str(exc))
    if not tables:
        return pd.DataFrame(columns=list(TABLE_COLUMNS)), [], errors
    return (pd.concat(tables, ignore_index=True) if len(tables) > 1 else tables[0]), kept, errors


def filter_table(table: pd.DataFrame, *, sites: Sequence[str] | None = None, disagreement: str = "all") -> pd.DataFrame:
    """Rows of ``sites`` (all when ``None``/empty) and, with ``disagreement`` ``"disagree"`` or
    ``"agree"``, only images whose prediction differs from / matches a known ground truth."""
    if disagreement not in DISAGREEMENT:
        raise ValueError(f"disagreement must be one of {DISAGREEMENT}, got {disagreement!r}")
    keep = pd.Series(True, index=table.index)
    if sites:
        keep &= table["site"].isin(list(sites))
    if disagreement != "all":
        known = table["disagrees"].notna()
        keep &= known & (table["disagrees"] == (disagreement == "disagree"))
    return table[keep]


def sort_table(table: pd.DataFrame, by: str, *, descending: bool = False) -> pd.DataFrame:
    """``table`` sorted by one column (stable; unknown values last)."""
    if by not in table.columns:
        raise ValueError(f"no column {by!r}; columns: {', '.join(table.columns)}")
    return table.sort_values(by, ascending=not descending, kind="stable", na_position="last")


def predictions_csv(table: pd.DataFrame, threshold: float) -> bytes:
    """The study table as CSV bytes (UTF-8), with the threshold in every row; text cells that a
    spreadsheet would run as a formula get a leading ``'`` (:func:`cxrdebias.fileio.spreadsheet_safe`)."""
    out = table.assign(threshold=threshold)
    for column in out.columns:
        if pd.api.types.is_string_dtype(out[column]) or out[column].dtype == object:
            out[column] = out[column].map(spreadsheet_safe)
    return out.to_csv(index=False, float_format="%.6f").encode("utf-8")


# -- one image ----------------------------------------------------------------------------------
def display_shape(shape: Sequence[int], max_side: int = MAX_DISPLAY_SIDE) -> tuple[int, int]:
    """(height, width) of an image of ``shape`` on the page: long side ≤ ``max_side``."""
    h, w = int(shape[0]), int(shape[1])
    scale = min(1.0, max_side / max(h, w))
    return (max(1, round(h * scale)), max(1, round(w * scale))) if scale < 1.0 else (h, w)


def shrink(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``values`` (H×W) box-averaged to ``shape`` (float32; unchanged when already that size)."""
    values = np.asarray(values, dtype=np.float32)
    if values.shape == tuple(shape):
        return values
    im = Image.fromarray(np.ascontiguousarray(values), mode="F")
    return np.asarray(im.resize((shape[1], shape[0]), Image.Resampling.BOX), dtype=np.float32)


def _scaled_geometry(geometry: ResizeGeometry, shape: tuple[int, int]) -> ResizeGeometry:
    """``geometry`` for the same image shown at ``shape`` instead of its ``source_shape``."""
    fy, fx = shape[0] / geometry.source_shape[0], shape[1] / geometry.source_shape[1]
    x0, y0, x1, y1 = geometry.source_box
    return ResizeGeometry(tuple(shape), geometry.size, (x0 * fx, y0 * fy, x1 * fx, y1 * fy), geometry.target_box)


@dataclass
class ImageAnalysis:
    """What the page shows for one image: the ``[0, 1]`` original (``pixels``), the
    prediction, and the CAM mapped onto the image at display size (``heat``,
    :func:`display_shape` of the original)."""

    name: str
    pixels: np.ndarray
    probability: float
    predicted_label: str
    threshold: float
    positive_label: str
    heat: np.ndarray
    geometry: ResizeGeometry
    provider: str


def analyse(model: CXRModel, image: InputImage, *, max_side: int = MAX_DISPLAY_SIDE) -> ImageAnalysis:
    """Read, preprocess and predict one image, and map its Grad-CAM onto the image (at display
    size: long side ≤ ``max_side``).

    Raises:
        DataError: the image cannot be read.
    """
    part = next(model.iter_predict([image], batch_size=1))
    assert part.images is not None
    pixels, geometry = part.images[0], part.geometries[0]
    shown = display_shape(pixels.shape, max_side)
    return ImageAnalysis(
        name=image.name,
        pixels=pixels,
        probability=float(part.positive_probability[0]),
        predicted_label=part.predicted_labels[0],
        threshold=part.threshold,
        positive_label=part.labels[part.positive_index],
        heat=cam_to_image(part.cams[0], _scaled_geometry(geometry, shown)),
        geometry=geometry,
        provider=part.provider,
    )


@dataclass
class DisplaySource:
    """The values the window/level sliders act on.

    DICOM: the modality-LUT output (stored values × slope + intercept), with the file's own
    window (or its min–max) as the default and ``invert`` for MONOCHROME1; PNG/JPEG and arrays:
    the ``[0, 1]`` pixels, default window centre 0.5, width 1 (the identity).
    """

    values: np.ndarray
    center: float
    width: float
    low: float
    high: float
    invert: bool
    units: str


def _dicom_source(path: Path, max_side: int) -> DisplaySource | None:
    """The window/level source of a DICOM file (``None`` for PNG/JPEG): the modality-LUT values
    at display size, range and default window of the full image."""
    raw = read_dicom_modality_values(path)
    if raw is None:
        return None
    values, info = raw
    low, high = float(values.min()), float(values.max())
    window = info["window"]
    if window["type"] == "window":
        center, width = float(window["center"]), float(window["width"])
    else:
        center, width = (low + high) / 2.0, max(high - low, 1e-6)
    shape = display_shape(values.shape, max_side)
    return DisplaySource(shrink(values, shape), center, width, low, high, bool(info["inverted"]), "DICOM modality-LUT units")


def _pixel_source(pixels: np.ndarray, max_side: int) -> DisplaySource:
    return DisplaySource(shrink(pixels, display_shape(pixels.shape, max_side)), 0.5, 1.0, 0.0, 1.0, False, "display units [0, 1]")


def display_source(image: InputImage, pixels: np.ndarray, *, max_side: int = MAX_DISPLAY_SIDE) -> DisplaySource:
    """The window/level source of ``image`` at display size (``pixels``: its ``[0, 1]``
    reading, used for PNG/JPEG). Range and default window are those of the full image."""
    source = _dicom_source(image.path, max_side) if image.path is not None else None
    return source if source is not None else _pixel_source(pixels, max_side)


def analyse_with_source(model: CXRModel, image: InputImage, *, max_side: int = MAX_DISPLAY_SIDE) -> tuple[ImageAnalysis, DisplaySource]:
    """:func:`analyse` and :func:`display_source` of one image, what the page computes when an
    image is selected. For a DICOM file the modality-LUT values (a second read of the file:
    :func:`analyse` needs the VOI-windowed ``[0, 1]`` pixels, the sliders the raw values) are
    read in a worker thread while the model runs, so the second read costs little wall time.

    Raises:
        DataError: the image cannot be read.
    """
    if image.path is None or image.path.suffix.lower() not in _DICOM_SUFFIXES:
        result = analyse(model, image, max_side=max_side)
        return result, display_source(image, result.pixels, max_side=max_side)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_dicom_source, image.path, max_side)
        result = analyse(model, image, max_side=max_side)  # raises DataError first for a bad file
        source = pending.result()
    return result, source if source is not None else _pixel_source(result.pixels, max_side)


def apply_window(source: DisplaySource, center: float, width: float) -> np.ndarray:
    """``[0, 1]`` display image: linear window ``clip((v − (c − w/2)) / w, 0, 1)`` of the
    source values, inverted for MONOCHROME1 (so that 1 is always bright)."""
    shown = window_level(source.values, center, width)
    return 1.0 - shown if source.invert else shown


def overlay_image(display: np.ndarray, heat: np.ndarray, opacity: float = ALPHA) -> Image.Image:
    """The Grad-CAM overlay (jet, ``opacity`` in [0, 1]) over the windowed image (same shape):
    :func:`cxrdebias.deploy.overlay.overlay`."""
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    return overlay(display, heat, alpha=opacity)


def gray_image(display: np.ndarray, max_side: int = MAX_OVERLAY_SIDE) -> Image.Image:
    """The windowed radiograph as an 8-bit grayscale image (long side ≤ ``max_side``)."""
    out = Image.fromarray(np.round(np.clip(display, 0.0, 1.0) * 255.0).astype(np.uint8))
    scale = max_side / max(out.size)
    if scale < 1.0:
        out = out.resize((max(1, round(out.width * scale)), max(1, round(out.height * scale))), Image.Resampling.BOX)
    return out


# -- model panel --------------------------------------------------------------------------------
def model_panel(metadata: ModelMetadata) -> dict[str, Any]:
    """Model facts for the page: version, intended use, method, bias, threshold, sites and the
    per-site validation table (``None`` when the export recorded none)."""
    raw = metadata.raw
    method = dict(raw.get("method") or {})
    name = method.pop("name", "unknown")
    options = ", ".join(f"{k}={v}" for k, v in method.items())
    val = raw.get("validation") or {}
    table = None
    if val.get("per_site"):
        rows = [*val["per_site"].items()] + ([("all", val["overall"])] if val.get("overall") else [])
        table = pd.DataFrame(
            [
                {
                    "site": site,
                    "images": m.get("n"),
                    "positive": m.get("n_positive"),
                    "TPR": format_metric(m.get("tpr")),
                    "TNR": format_metric(m.get("tnr")),
                    "balanced accuracy": format_metric(m.get("balanced_accuracy")),
                    "AUROC": format_metric(m.get("auroc")),
                }
                for site, m in rows
            ]
        )
    return {
        "model_version": metadata.model_version,
        "intended_use": str(raw.get("intended_use") or NOT_FOR_CLINICAL_USE),
        "method": f"{name} ({options})" if options else name,
        "bias": str(raw.get("bias", "unknown")),
        "threshold": metadata.threshold,
        "threshold_method": str(raw.get("threshold_method", "")),
        "sites": list((raw.get("sites") or {}).get("names") or []),
        "per_site": table,
        "validation_note": val.get("note"),
    }


# -- text on the page -----------------------------------------------------------------------------
#: the characters that Streamlit's Markdown (st.markdown, st.error, labels, captions) acts on
_MARKDOWN_SPECIAL = frozenset("\\`*_{}[]()<>#+-!|~$:&")


def markdown_text(value: Any) -> str:
    """``str(value)`` backslash-escaped so that Streamlit's Markdown shows it as typed: a file
    name, manifest cell or model metadata in an error, label or caption can neither become an
    image (fetched by the browser), a link or HTML, nor change the page's styling."""
    return "".join("\\" + ch if ch in _MARKDOWN_SPECIAL else ch for ch in " ".join(str(value).split()))


# -- uploads ------------------------------------------------------------------------------------
def save_upload(name: str, data: bytes, folder: str | os.PathLike) -> tuple[InputImage, LoadedImage]:
    """Write an uploaded file into ``folder`` and check that it is a readable image.

    Returns the input for the model and its reading. Raises :class:`DataError` (message
    naming the upload, not the temporary file) for an empty, non-image or corrupt file.
    """
    safe = Path(name).name
    if safe in ("", ".", ".."):  # "..": the folder above, not a file name
        safe = "upload"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / safe
    try:
        path.write_bytes(data)
    except (OSError, ValueError) as exc:  # a name too long for the file system, a NUL in it
        raise DataError(f"{safe[:80]!r}: cannot store this upload ({getattr(exc, 'strerror', None) or exc}); rename the file") from None
    try:
        loaded = read_image(path)
    except DataError as exc:
        raise DataError(str(exc).replace(str(path), safe)) from None
    return InputImage(safe, path, fields={k: v for k, v in (("site", loaded.site), ("patient_id", loaded.meta.get("patient_id"))) if v}), loaded
