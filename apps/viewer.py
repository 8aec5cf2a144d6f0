"""cxrdebias viewer: a Streamlit page over an exported ONNX model (onnxruntime only, no torch).

Launch with ``cxrdebias view --model model.onnx [--data folder-or-manifest ...]``, or
``streamlit run apps/viewer.py -- --model model.onnx --data scans/`` (``--allow-outside``: a
manifest's symbolic links may lead out of its folder). The environment
variables ``CXRDEBIAS_VIEWER_MODEL`` and ``CXRDEBIAS_VIEWER_DATA`` (paths joined with
``os.pathsep``) take precedence over the script arguments (used by the tests).

The page logic lives in :mod:`cxrdebias.deploy.viewer_state` (and the PNG report in
:mod:`cxrdebias.deploy.viewer_report`); this file only lays it out.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

from cxrdebias.deploy.onnx_metadata import format_metric
from cxrdebias.deploy.runtime import CXRModel, InputImage, collect_inputs, load_model
from cxrdebias.deploy.viewer_report import report_png, with_colorbar
from cxrdebias.deploy.viewer_state import (
    DISAGREEMENT,
    NOT_FOR_CLINICAL_USE,
    analyse_with_source,
    apply_window,
    filter_table,
    gray_image,
    markdown_text,
    model_panel,
    overlay_image,
    predict_study,
    predictions_csv,
    save_upload,
)
from cxrdebias.deploy.viewer_worklist import (
    OOD_BADGE,
    SORTS,
    is_flagged,
    neighbour,
    order_digest,
    per_site_study_table,
    sort_options,
    sort_worklist,
    study_banners,
    summary_metrics,
    training_sites,
    worklist_view,
)
from cxrdebias.errors import CxrDebiasError

MODEL_ENV, DATA_ENV = "CXRDEBIAS_VIEWER_MODEL", "CXRDEBIAS_VIEWER_DATA"
UPLOAD_PREFIX = "upload/"


def settings() -> tuple[str | None, list[str], bool]:
    """The model path and data inputs (environment variables, else the script arguments) and
    whether a manifest's symbolic links may lead out of its folder (``--allow-outside``)."""
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--model")
    ap.add_argument("--data", action="append", default=[])
    ap.add_argument("--allow-outside", action="store_true")
    args, _ = ap.parse_known_args(sys.argv[1:])
    model = os.environ.get(MODEL_ENV) or args.model
    data = [d for d in os.environ.get(DATA_ENV, "").split(os.pathsep) if d] or args.data
    return model, data, args.allow_outside


@st.cache_resource(show_spinner="Loading the model…", max_entries=4)
def cached_model(path: str, mtime: float) -> CXRModel:
    return load_model(path)


@st.cache_resource(show_spinner="Loading the model…", max_entries=2)
def cached_model_bytes(digest: str, _data: bytes) -> CXRModel:
    return load_model(_data)


@st.cache_resource(show_spinner="Predicting the study…", max_entries=4)
def cached_study(model_key: str, data: tuple[str, ...], allow_outside: bool, _model: CXRModel):
    return predict_study(_model, collect_inputs(data, allow_links_outside=allow_outside))


@st.cache_resource(show_spinner="Predicting the uploads…", max_entries=4)
def cached_uploads(model_key: str, digests: tuple[str, ...], _images: list[InputImage], _model: CXRModel):
    """The uploads' table (keyed by their contents): a rerun does not predict them again."""
    return predict_study(_model, _images)


@st.cache_resource(max_entries=16)
def cached_analysis(model_key: str, name: str, stamp: float, _model: CXRModel, _image: InputImage):
    """Prediction + CAM and the window/level source of one image, keyed by the file's path and
    mtime (the DICOM is decoded once per selection; moving a slider or coming back reuses them)."""
    return analyse_with_source(_model, _image)


#: the sidebar's starting width (px): wide enough for the per-site tables' columns
SIDEBAR_WIDTH = 500
#: short headers of the sidebar's per-site tables (the full name is the column's tooltip)
SHORT_HEADERS = {"images": "n", "positive": "pos.", "labelled": "lab.", "balanced accuracy": "bal. acc.", "OOD flagged": "OOD"}
#: the page's warnings (a Material icon: the emoji fonts of a workstation may lack 🚫)
STOP_ICON = ":material/block:"


def full_table(table: pd.DataFrame, key: str) -> None:
    """``table`` in the sidebar, every row and column visible (no inner scrolling)."""
    narrow = {c: st.column_config.Column(SHORT_HEADERS.get(c, c), help=c, width=90 if c == "site" else 50) for c in table.columns}
    st.dataframe(table, hide_index=True, key=key, height=38 + 35 * len(table), width="stretch", column_config=narrow)


st.set_page_config(page_title="cxrdebias viewer", layout="wide", initial_sidebar_state=SIDEBAR_WIDTH)
st.title("cxrdebias viewer")
st.warning(NOT_FOR_CLINICAL_USE, icon="⚠️")

model_path, data_inputs, allow_outside = settings()

# -- the model ----------------------------------------------------------------------------------
with st.sidebar:
    st.header("Model")
    model_upload = st.file_uploader("…or open another exported model (.onnx)", type=None, key="model_upload")
model: CXRModel | None = None
try:
    if model_upload is not None:
        blob = model_upload.getvalue()
        digest = hashlib.sha256(blob).hexdigest()
        model, model_key = cached_model_bytes(digest, blob), digest
    elif model_path:
        p = Path(model_path)
        model = cached_model(str(p.resolve()), p.stat().st_mtime if p.is_file() else 0.0)
        model_key = f"{p.resolve()}:{p.stat().st_mtime}"
except CxrDebiasError as exc:
    source = model_upload.name if model_upload is not None else model_path
    st.error(f"Cannot open the model {markdown_text(source)}: {markdown_text(exc)}")
except OSError as exc:
    st.error(f"Cannot open the model {markdown_text(model_path)}: {markdown_text(exc)}")
if model is None:
    if not model_path and model_upload is None:
        st.error("No model given: launch with `cxrdebias view --model model.onnx` or upload one in the sidebar.")
    st.stop()

meta = model.metadata
panel = model_panel(meta)
with st.sidebar:  # the model's metadata as plain text (st.text, st.dataframe): never Markdown
    st.text(f"Model version: {panel['model_version']} · provider {model.provider}")
    st.text(f"Intended use: {panel['intended_use']}")
    st.text(f"Debiasing method: {panel['method']} · bias: {panel['bias']}")
    st.text(f"Threshold: {panel['threshold']:.4f} ({panel['threshold_method']})")
    st.markdown("**Per-site validation** (exported model, validation split; optimistic: the threshold was chosen on it)")
    if panel["per_site"] is not None:
        full_table(panel["per_site"], "per_site")
    else:
        st.info(f"No per-site validation metrics in this model ({markdown_text(panel['validation_note'])}).")

# -- the study ----------------------------------------------------------------------------------
tables, images = [], {}


def add_predictions(predict, failure: str, skipped: str) -> None:
    """Run ``predict()`` → (table, kept images, per-image errors); show its errors, keep its rows."""
    try:
        table, kept, errors = predict()
    except CxrDebiasError as exc:
        st.error(f"{failure}: {markdown_text(exc)}")
        table, kept, errors = None, [], []
    for message in errors:
        st.error(f"{skipped}: {markdown_text(message)}")
    if table is not None:
        tables.append(table)
        images.update({x.name: x for x in kept})


if data_inputs:
    add_predictions(lambda: cached_study(model_key, tuple(data_inputs), allow_outside, model), "Cannot read the data", "Skipped")

uploads = st.sidebar.file_uploader("Add DICOM, PNG or JPEG images", accept_multiple_files=True, key="uploads")
if uploads:
    folder = st.session_state.setdefault("upload_dir", tempfile.mkdtemp(prefix="cxrdebias-viewer-"))
    saved = st.session_state.setdefault("saved_uploads", {})  # (name, digest) → image or error: checked once
    good, digests = [], []
    for up in uploads:
        blob = up.getvalue()
        digest = hashlib.sha256(blob).hexdigest()
        if (up.name, digest) not in saved:
            try:
                item, _ = save_upload(up.name, blob, Path(folder) / digest[:16])
                saved[up.name, digest] = InputImage(UPLOAD_PREFIX + item.name, item.path, fields=item.fields)
            except CxrDebiasError as exc:
                saved[up.name, digest] = f"Upload {markdown_text(up.name)}: {markdown_text(exc)}"
        entry = saved[up.name, digest]
        if isinstance(entry, str):
            st.error(entry)
            continue
        good.append(entry)
        digests.append(f"{up.name}:{digest}")
    if good:
        add_predictions(lambda: cached_uploads(model_key, tuple(digests), good, model), "Cannot predict the uploads", "Upload")

if not tables or sum(len(t) for t in tables) == 0:
    st.info("No images yet: launch with `--data FOLDER_OR_MANIFEST` or add images in the sidebar.")
    st.stop()

full = pd.concat(tables, ignore_index=True) if len(tables) > 1 else tables[0]
for message in study_banners(full, training_sites(meta)):  # study-wide warnings first
    st.error(markdown_text(message), icon=STOP_ICON)
summary = summary_metrics(full, meta.positive_label)
if summary is not None:
    cols = st.columns(6)
    cols[0].metric("Images (labelled)", f"{summary['n_images']} ({summary['n']})")
    for col, (name, key) in zip(cols[1:], (("Accuracy", "accuracy"), ("TPR", "tpr"), ("TNR", "tnr"), ("Balanced accuracy", "balanced_accuracy"), ("AUROC", "auroc")), strict=True):
        col.metric(name, format_metric(summary[key]))
    st.caption(
        f"On the {summary['n']} loaded images with ground truth ({summary['n_positive']} {markdown_text(meta.positive_label)}), "
        f"at the model's threshold {meta.threshold:.3f}; a small study gives wide uncertainty. Per site: sidebar."
        + (f" {summary['n_flagged']} of {summary['n_images']} images are out of distribution." if "n_flagged" in summary else "")
    )

with st.sidebar:
    st.header("Worklist")
    site_options = sorted(s for s in full["site"].unique() if s)
    chosen_sites = st.multiselect("Sites", site_options, key="sites")
    disagreement = st.radio(
        "Prediction vs ground truth", DISAGREEMENT, key="disagreement",
        format_func={"all": "all images", "disagree": "disagrees with ground truth", "agree": "agrees with ground truth"}.get,
    )
    sorts = sort_options(full)
    sort_by = st.selectbox("Sort by", sorts, format_func=SORTS.get, key="sort_by")
    if "ood" not in sorts:
        st.caption("Sort by OOD score: not available (this model gives no out-of-distribution score).")
    reverse = st.checkbox("Reverse order", value=False, key="reverse")
    site_table = per_site_study_table(full, meta.positive_label)
    if site_table is not None:
        st.markdown("**Per site, this study** (images with ground truth, at the model's threshold)")
        full_table(site_table, "study_per_site")

shown = sort_worklist(filter_table(full, sites=chosen_sites, disagreement=disagreement), sort_by, meta.threshold, reverse=reverse)
st.download_button("Download predictions CSV", predictions_csv(full, meta.threshold), "predictions.csv", "text/csv", key="csv", on_click="ignore")


# -- worklist + one image -----------------------------------------------------------------------
def step(files: list[str], by: int) -> None:
    """Previous / Next (keys P / N): open the neighbouring row; a new worklist key shows it selected."""
    st.session_state["current"] = neighbour(files, st.session_state.get("current"), by)
    st.session_state["nav"] = st.session_state.get("nav", 0) + 1


@st.fragment
def study_panel(shown: pd.DataFrame, n_total: int, images: dict[str, InputImage], full: pd.DataFrame, model: CXRModel, model_key: str) -> None:
    """The worklist (click a row, or N / P) and the open image.

    A fragment: opening an image or moving a slider reruns only this function (with the
    arguments of the last full run), not the filters, summary or model panel.
    """
    files = list(shown["file"])
    current = st.session_state.get("current")
    current = current if current in files else None
    left, right = st.columns([4, 5])
    with left:
        st.subheader(f"Worklist: {len(files)} of {n_total} images")
        b1, b2 = st.columns(2)
        b1.button("Previous", key="previous", shortcut="P", on_click=step, args=(files, -1), width="stretch")
        b2.button("Next", key="next", shortcut="N", on_click=step, args=(files, 1), width="stretch")
        # the key changes with the order and with Previous/Next: the new table starts with the open row selected
        event = st.dataframe(
            worklist_view(shown), hide_index=True, width="stretch", key=f"worklist:{order_digest(files)}:{st.session_state.get('nav', 0)}",
            on_select="rerun", selection_mode="single-row",
            selection_default={"selection": {"rows": [files.index(current)]}} if current else None,
            column_config={"probability": st.column_config.NumberColumn(format="%.3f"), "ood_score": st.column_config.NumberColumn("OOD score", format="%.3g")},
        )
        rows = event.selection.rows
        if rows and files[rows[0]] != current:  # a click on another row
            current = st.session_state["current"] = files[rows[0]]
    with right:
        if current is None:
            st.info("Click a row of the worklist to open an image (keys N / P: next / previous).")
            return
        image_view(current, images[current], full[full["file"] == current].iloc[0].to_dict(), model, model_key)


def image_view(selected: str, image: InputImage, row: dict, model: CXRModel, model_key: str) -> None:
    """One image: OOD badge, prediction, window/level, Grad-CAM overlay with its colour bar, report."""
    try:
        stamp = image.path.stat().st_mtime if image.path is not None else 0.0
        result, source = cached_analysis(model_key, selected, stamp, model, image)
    except (CxrDebiasError, OSError) as exc:
        st.error(f"Cannot show {markdown_text(selected)}: {markdown_text(exc)}")
        return
    if is_flagged(row):
        st.error(f"**{OOD_BADGE}**: this image is unlike the model's training images (OOD score {float(row['ood_score']):.3g}).", icon=STOP_ICON)
    (c1, c2), (c3, c4) = st.columns(2), st.columns(2)
    c1.metric(f"P({markdown_text(result.positive_label)})", f"{result.probability:.3f}")  # labels and values are Markdown
    c2.metric("Threshold", f"{result.threshold:.3f}")
    c3.metric("Prediction", markdown_text(result.predicted_label))
    c4.metric("Ground truth", markdown_text(row["ground_truth"]) or "unknown")

    span = max(source.high - source.low, 1e-6)
    w1, w2, w3 = st.columns(3)
    center = w1.slider(f"Window level ({source.units})", float(source.low - span / 2), float(source.high + span / 2), float(source.center), key=f"center:{selected}")
    width = w2.slider(f"Window width ({source.units})", float(span / 100), float(2 * span), float(min(max(source.width, span / 100), 2 * span)), key=f"width:{selected}")
    opacity = w3.slider("Grad-CAM opacity", 0.0, 1.0, 0.4, 0.05, key="opacity")
    side_by_side = st.toggle("Side by side", value=True, key="side_by_side")

    display = apply_window(source, center, width)
    cam = overlay_image(display, result.heat, opacity)
    shown_cam = with_colorbar(cam, result.probability, result.threshold, result.positive_label, result.predicted_label)
    gray = gray_image(display)
    overlay_caption = f"Grad-CAM overlay of '{markdown_text(result.positive_label)}' (opacity {opacity:.2f}), colour bar and probability on the right"  # captions are Markdown
    # JPEG (what st.image picks for these pictures anyway), at display size (long side ≤ 1024)
    if side_by_side:
        left, right = st.columns([1, 1.2])
        left.image(gray, caption=f"{markdown_text(selected)} (level {center:.3g}, width {width:.3g})", width="stretch", output_format="JPEG")
        right.image(shown_cam, caption=overlay_caption, width="stretch", output_format="JPEG")
    else:
        st.image(shown_cam, caption=overlay_caption, width="stretch", output_format="JPEG")

    st.download_button(  # rendered only when clicked (Streamlit's deferred download)
        "Download one-page report (PNG)", lambda: report_png(result, gray, shown_cam, model.metadata, row=row),
        f"{Path(selected).stem}_report.png", "image/png", key="report", on_click="ignore",
    )


study_panel(shown, len(full), images, full, model, model_key)
