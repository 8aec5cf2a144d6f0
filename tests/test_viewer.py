"""The Streamlit viewer (apps/viewer.py): page logic, AppTest runs of the page, `cxrdebias view`."""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cxrdebias.data.images import read_image, write_dicom
from cxrdebias.deploy.runtime import collect_inputs, load_model
from cxrdebias.deploy.viewer_report import report_png
from cxrdebias.deploy.viewer_state import (
    NOT_FOR_CLINICAL_USE,
    TABLE_COLUMNS,
    analyse,
    apply_window,
    display_source,
    filter_table,
    gray_image,
    overlay_image,
    predict_study,
    predictions_csv,
    save_upload,
    sort_table,
)
from cxrdebias.errors import DataError
from tests.conftest import REPO, open_row, run_cli, worklist

pytestmark = pytest.mark.usefixtures("torch_one_thread")

VIEWER = REPO / "apps" / "viewer.py"


@pytest.fixture
def app(model_file, study_data, monkeypatch):
    """An AppTest of the page with the model and the study given through the environment."""
    from streamlit.testing.v1 import AppTest

    manifest, folder = study_data
    monkeypatch.setenv("CXRDEBIAS_VIEWER_MODEL", str(model_file))
    monkeypatch.setenv("CXRDEBIAS_VIEWER_DATA", f"{manifest}{os.pathsep}{folder}")
    at = AppTest.from_file(str(VIEWER), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def _table(at):
    return worklist(at).value


def _captions(at):
    return [c for im in at.image for c in im.captions]


# -- AppTest: the page --------------------------------------------------------------------------
def test_worklist_columns_sort_filters_summary_and_banner(app, model_file):
    df = _table(app)
    # the exported model has the OOD output (issue 24): its flag and score are columns
    assert list(df.columns) == ["name", "probability", "prediction", "truth", "OOD", "site", "patient", "ood_score"]
    assert len(df) == 5 and set(df["name"]) == {"img0.png", "img1.png", "img2.png", "img3.png", "a.dcm"}  # short names
    dicom = df[df["name"] == "a.dcm"].iloc[0]
    assert dicom["site"] == "tag-site" and dicom["patient"] == "tag-patient" and dicom["truth"] == ""
    assert (df["probability"].diff().dropna() <= 0).all()  # default: probability, highest first
    known = df[df["truth"] != ""]
    wrong = int((known["prediction"] != known["truth"]).sum())

    # summary metrics of the labelled images at the top; the per-site table of the study in the sidebar
    metrics = {m.label: m.value for m in app.main.metric}
    assert metrics["Images (labelled)"] == "5 (4)" and float(metrics["Accuracy"]) == pytest.approx(1 - wrong / 4, abs=1e-3)
    per_site = next(d.value for d in app.sidebar.dataframe if "labelled" in d.value.columns)  # this study's
    assert list(per_site["site"]) == sorted(set(df["site"])) + ["all"] and per_site["labelled"].tolist()[-1] == 4
    # the DICOM's site (from its tags) is not one the model was trained on: a banner names it
    assert any("1 of 5 images come from sites the model was not trained on" in e.value and "tag\\-site" in e.value for e in app.error)

    site = sorted(s for s in df["site"].unique() if s != "tag-site")[0]
    app.multiselect(key="sites").set_value([site]).run()
    only = _table(app)
    assert len(only) == 2 and set(only["site"]) == {site}
    app.multiselect(key="sites").set_value([]).run()
    app.radio(key="disagreement").set_value("disagree").run()
    assert len(_table(app)) == wrong and (_table(app)["prediction"] != _table(app)["truth"]).all()
    app.radio(key="disagreement").set_value("agree").run()
    assert len(_table(app)) == len(known) - wrong
    app.radio(key="disagreement").set_value("all").run()

    assert app.selectbox(key="sort_by").options == [
        "probability (highest first)", "uncertainty (closest to the threshold first)", "OOD score (furthest from the training data first)", "file name"
    ]
    assert not any("Sort by OOD score: not available" in c.value for c in app.sidebar.caption)
    app.selectbox(key="sort_by").set_value("uncertainty").run()
    threshold = load_model(model_file).metadata.threshold
    margins = (_table(app)["probability"] - threshold).abs()
    assert (margins.diff().dropna() >= 0).all()  # closest to the threshold first
    app.selectbox(key="sort_by").set_value("file").run()
    assert list(_table(app)["name"]) == ["a.dcm", "img0.png", "img1.png", "img2.png", "img3.png"]  # by full path: folder dicom/ < manifest/
    app.checkbox(key="reverse").check().run()
    assert list(_table(app)["name"]) == ["img3.png", "img2.png", "img1.png", "img0.png", "a.dcm"]
    assert not app.exception


def test_open_a_row_shows_prediction_threshold_and_overlay(app, model_file):
    df = _table(app)
    name = df["name"].iloc[0]
    assert not app.image and any("Click a row" in i.value for i in app.info)  # nothing open yet
    open_row(app, name)
    assert not app.exception
    model = load_model(model_file)
    path = app.session_state["current"]
    assert path.endswith("/" + name)
    expected = model.predict([path]).positive_probability[0]
    metrics = {m.label: m.value for m in app.metric}
    assert float(metrics["P(positive)"]) == pytest.approx(expected, abs=1e-3)
    assert float(metrics["Threshold"]) == pytest.approx(model.metadata.threshold, abs=1e-3)
    assert metrics["Prediction"] == ("positive" if expected >= model.metadata.threshold else "negative")
    captions = _captions(app)
    assert len(captions) == 2 and any(c.startswith("Grad-CAM overlay") and "opacity 0.40" in c and "colour bar" in c for c in captions)
    app.slider(key="opacity").set_value(0.8).run()
    assert any("opacity 0.80" in c for c in _captions(app))
    app.toggle(key="side_by_side").set_value(False).run()
    assert len(_captions(app)) == 1 and _captions(app)[0].startswith("Grad-CAM overlay of 'positive' (opacity 0.80)")
    assert {b.label for b in app.get("download_button")} == {"Download predictions CSV", "Download one-page report (PNG)"}


def test_next_and_previous_walk_theworklist(app):
    names = list(_table(app)["name"])

    def shown():
        return next(c for c in _captions(app) if not c.startswith("Grad-CAM")).split(" (level")[0].rsplit("/", 1)[1]

    app.button(key="next").click().run()  # nothing open: the first row
    assert shown() == names[0]
    app.button(key="next").click().run()
    assert shown() == names[1]
    app.button(key="previous").click().run()
    assert shown() == names[0]
    open_row(app, names[-1])
    app.button(key="next").click().run()  # the last row stays
    assert shown() == names[-1]
    key = worklist(app).key
    app.button(key="previous").click().run()  # a new table (key), made with the open row selected
    assert worklist(app).key != key and shown() == names[-2]
    assert {b.proto.shortcut.upper() for b in app.button if b.key in ("next", "previous")} == {"N", "P"}


def test_ood_badge_sort_and_banner(model_file, study_data, tmp_path, monkeypatch):
    """Predictions with OOD fields (the model's OOD output): the worklist flags them, sorts by the
    score, the open image carries the badge, and a study mostly out of distribution a banner."""
    from streamlit.testing.v1 import AppTest

    from cxrdebias.deploy.runtime import CXRModel
    from cxrdebias.deploy.viewer_worklist import OOD_BADGE
    from tests.viewer_ood import with_ood

    manifest, _ = study_data
    study = tmp_path / "study"  # another path: not the study the other tests cached
    shutil.copytree(manifest.parent, study)
    monkeypatch.setattr(CXRModel, "predict", with_ood(CXRModel.predict, ["img1", "img2", "img3"]))
    monkeypatch.setenv("CXRDEBIAS_VIEWER_MODEL", str(model_file))
    monkeypatch.setenv("CXRDEBIAS_VIEWER_DATA", str(study / "manifest.csv"))
    at = AppTest.from_file(str(VIEWER), default_timeout=120).run()
    assert not at.exception
    df = _table(at)
    assert list(df.columns) == ["name", "probability", "prediction", "truth", "OOD", "site", "patient", "ood_score"]
    assert dict(zip(df["name"], df["OOD"], strict=True)) == {"img0.png": "", "img1.png": "do not trust", "img2.png": "do not trust", "img3.png": "do not trust"}
    assert any("3 of 4 images" in e.value and "75%" in e.value and "are out of distribution" in e.value for e in at.error)  # > 50%: the banner
    at.selectbox(key="sort_by").set_value("ood").run()
    assert list(_table(at)["name"])[-1] == "img0.png"  # highest OOD score first
    open_row(at, "img2.png")
    assert any(OOD_BADGE in e.value for e in at.main.error)
    open_row(at, "img0.png")
    assert not any(OOD_BADGE in e.value for e in at.main.error)
    assert not at.exception


def test_bad_uploads_are_messages_not_tracebacks(app, real_pngs, cxr_manifest):
    good = (cxr_manifest.parent / real_pngs[1]["path"]).read_bytes()
    corrupt_dicom = b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage"
    app.file_uploader(key="uploads").set_value(
        [("notes.txt", b"just text", "text/plain"), ("broken.dcm", corrupt_dicom, "application/dicom"), ("good.png", good, "image/png")]
    ).run()
    assert not app.exception
    errors = [e.value for e in app.error]
    assert any("notes.txt" in e and "not a PNG, JPEG or DICOM" in e for e in errors), errors
    assert any("broken.dcm" in e for e in errors), errors
    assert not any("/tmp" in e or "Traceback" in e for e in errors)
    df = _table(app)
    assert "good.png" in set(df["name"]) and len(df) == 6
    open_row(app, "good.png")
    assert not app.exception and len(app.image) == 2


def test_opening_an_image_does_not_recompute_the_study(app, real_pngs, cxr_manifest, monkeypatch):
    """Only the opened image is analysed: the study and the uploads are predicted once, not on
    every rerun (the worklist + image panel is a fragment; uploads are cached by their contents)."""
    from cxrdebias.deploy import viewer_state as viewer_logic

    real = viewer_logic.predict_study
    study_calls, analysed = [], []
    monkeypatch.setattr(viewer_logic, "predict_study", lambda model, images, **kw: study_calls.append(len(images)) or real(model, images, **kw))
    real_analyse = viewer_logic.analyse_with_source
    monkeypatch.setattr(viewer_logic, "analyse_with_source", lambda model, image, **kw: analysed.append(image.name) or real_analyse(model, image, **kw))
    blob = (cxr_manifest.parent / real_pngs[2]["path"]).read_bytes() + b"\0" * 7  # unique bytes: not cached by another test
    app.file_uploader(key="uploads").set_value([("fresh.png", blob, "image/png")]).run()
    assert not app.exception and study_calls == [1]
    open_row(app, "fresh.png")
    app.slider(key="opacity").set_value(0.6).run()
    app.toggle(key="side_by_side").set_value(False).run()
    open_row(app, _table(app)["name"].iloc[0] if _table(app)["name"].iloc[0] != "fresh.png" else _table(app)["name"].iloc[1])
    open_row(app, "fresh.png")  # back: cached
    assert not app.exception and len(app.image) == 1
    assert study_calls == [1], study_calls
    assert analysed.count("upload/fresh.png") == 1, analysed


def test_worklist_and_image_are_a_fragment():
    """Opening an image reruns only the worklist + image panel in the browser (Streamlit fragment)."""
    source = VIEWER.read_text()
    assert "@st.fragment\ndef study_panel(" in source and 'key=f"worklist:' in source.split("def study_panel(", 1)[1]


def test_notice_and_model_panel(app, model_file):
    assert any(w.value == NOT_FOR_CLINICAL_USE for w in app.warning)
    side = " ".join(m.value for m in app.sidebar.text)  # metadata as plain text (issue 22)
    meta = load_model(model_file).metadata
    assert "NOT FOR CLINICAL USE" in side and meta.raw["method"]["name"] in side and "site" in side
    per_site = app.sidebar.dataframe[0].value  # the model's (validation)
    assert set(meta.raw["sites"]["names"]) | {"all"} == set(per_site["site"])
    assert list(per_site.columns) == ["site", "images", "positive", "TPR", "TNR", "balanced accuracy", "AUROC"]


def test_wrong_model_file_is_a_message(model_file, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(model_file.read_bytes()[:4096])
    monkeypatch.setenv("CXRDEBIAS_VIEWER_MODEL", str(truncated))
    monkeypatch.delenv("CXRDEBIAS_VIEWER_DATA", raising=False)
    at = AppTest.from_file(str(VIEWER), default_timeout=60).run()
    assert not at.exception
    assert any("Cannot open the model" in e.value and "not a readable ONNX model" in e.value for e in at.error)
    assert any(w.value == NOT_FOR_CLINICAL_USE for w in at.warning)  # the notice comes first
    # an uploaded non-ONNX "model": a message as well
    at.file_uploader(key="model_upload").set_value(("model.onnx", b"not a model", "application/octet-stream")).run()
    assert not at.exception and any("model.onnx" in e.value for e in at.error)
    monkeypatch.setenv("CXRDEBIAS_VIEWER_MODEL", str(tmp_path / "missing.onnx"))
    at = AppTest.from_file(str(VIEWER), default_timeout=60).run()
    assert not at.exception and any("not found" in e.value for e in at.error)


def test_viewer_page_does_not_import_torch(model_file, study_data):
    manifest, _ = study_data
    code = (
        "import os, sys\n"
        "from streamlit.testing.v1 import AppTest\n"
        f"os.environ['CXRDEBIAS_VIEWER_MODEL'] = {str(model_file)!r}\n"
        f"os.environ['CXRDEBIAS_VIEWER_DATA'] = {str(manifest)!r}\n"
        f"at = AppTest.from_file({str(VIEWER)!r}, default_timeout=120).run()\n"
        "wl = next(d for d in at.dataframe if d.key and d.key.startswith('worklist:'))\n"
        "at.session_state[wl.key] = {'selection': {'rows': [0], 'columns': [], 'cells': []}}\n"
        "at.run()\n"
        "assert not at.exception and len(at.image) == 2, at.exception\n"
        "bad = sorted(m for m in ('torch', 'torchvision', 'monai', 'timm') if m in sys.modules)\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]


# -- page logic ---------------------------------------------------------------------------------
def test_predict_study_skips_unreadable_images(model_file, legacy_model_file, study_data, tmp_path):
    manifest, _ = study_data
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n-- truncated")
    images = collect_inputs([manifest, bad])
    table, kept, errors = predict_study(load_model(model_file), images, batch_size=4)
    assert len(table) == 4 and len(kept) == 4 and len(errors) == 1 and "bad.png" in errors[0]
    assert list(filter_table(table, sites=["nowhere"])["file"]) == []
    assert list(sort_table(table, "probability")["probability"]) == sorted(table["probability"])
    rows = list(csv.DictReader(io.StringIO(predictions_csv(table, 0.5).decode())))
    assert list(rows[0]) == [*TABLE_COLUMNS, "ood_score", "in_distribution", "threshold"] and len(rows) == 4
    # a model exported before the OOD guard: no OOD columns
    old, _, _ = predict_study(load_model(legacy_model_file), images[:4], batch_size=4)
    assert list(csv.DictReader(io.StringIO(predictions_csv(old, 0.5).decode())))[0].keys() == {*TABLE_COLUMNS, "threshold"}
    with pytest.raises(ValueError, match="disagreement"):
        filter_table(table, disagreement="maybe")


def test_dicom_window_level_acts_on_raw_values(tmp_path):
    stored = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096).astype(np.uint16)
    path = write_dicom(tmp_path / "x.dcm", stored, bits_stored=12, rescale=(2.0, -1000.0), window=(1000.0, 2000.0))
    image = collect_inputs([path])[0]
    reading = read_image(path)
    src = display_source(image, reading.pixels)
    np.testing.assert_allclose(src.values, stored * 2.0 - 1000.0)
    assert (src.center, src.width, src.low, src.high) == (1000.0, 2000.0, -1000.0, 2.0 * 4095 - 1000.0)
    shown = apply_window(src, src.center, src.width)
    np.testing.assert_allclose(shown, reading.pixels, atol=2e-3)  # the file's own window ≈ read_image
    narrow = apply_window(src, 0.0, 10.0)
    assert set(np.unique(narrow[src.values <= -5])) == {0.0} and set(np.unique(narrow[src.values >= 5])) == {1.0}
    # MONOCHROME1: the same window, inverted so that 1 stays bright
    m1 = write_dicom(tmp_path / "m1.dcm", stored, bits_stored=12, photometric="MONOCHROME1")
    src1 = display_source(collect_inputs([m1])[0], read_image(m1).pixels)
    assert src1.invert and src1.units.startswith("DICOM")
    np.testing.assert_allclose(apply_window(src1, src1.center, src1.width), read_image(m1).pixels, atol=1e-3)
    # PNG: the [0, 1] pixels, identity window by default
    png = tmp_path / "x.png"
    Image.fromarray((stored // 16).astype(np.uint8)).save(png)
    p = read_image(png).pixels
    src2 = display_source(collect_inputs([png])[0], p)
    assert (src2.center, src2.width, src2.invert) == (0.5, 1.0, False)
    np.testing.assert_allclose(apply_window(src2, 0.5, 1.0), p, atol=1e-6)


def test_overlay_opacity_and_report_png(model_file, study_data):
    manifest, _ = study_data
    model = load_model(model_file)
    image = collect_inputs([manifest])[0]
    res = analyse(model, image)
    assert res.heat.shape == res.pixels.shape and 0.0 <= res.probability <= 1.0
    src = display_source(image, res.pixels)
    display = apply_window(src, src.center, src.width)
    none, full = np.asarray(overlay_image(display, res.heat, 0.0)), np.asarray(overlay_image(display, res.heat, 1.0))
    np.testing.assert_array_equal(none[..., 0], np.asarray(gray_image(display)))  # opacity 0: the radiograph
    assert np.abs(full.astype(int) - none.astype(int)).max() > 50
    with pytest.raises(ValueError, match="opacity"):
        overlay_image(display, res.heat, 1.5)
    png = report_png(res, gray_image(display), overlay_image(display, res.heat), model.metadata, row={"site": "s", "ground_truth": "negative"})
    page = Image.open(io.BytesIO(png))
    assert page.format == "PNG" and page.size == (1240, 1754)
    # the red notice banner is on the page
    assert (np.asarray(page.convert("RGB"))[150:200, 100:1100] == (178, 34, 34)).all(axis=-1).mean() > 0.5


def test_save_upload_names_the_upload(tmp_path):
    with pytest.raises(DataError, match=r"^notes\.txt: not a PNG, JPEG or DICOM"):
        save_upload("notes.txt", b"plain text", tmp_path / "u")
    with pytest.raises(DataError, match="empty"):
        save_upload("../../empty.png", b"", tmp_path / "u")
    assert not (tmp_path / "empty.png").exists()  # the name cannot leave the upload folder


# -- cxrdebias view -----------------------------------------------------------------------------
def test_cli_view_launches_streamlit_on_localhost(model_file, study_data, monkeypatch, capsys):
    manifest, folder = study_data
    calls = []  # `view` replaces its own process by Streamlit's (exec): stopping it stops the server
    monkeypatch.setattr(os, "execvp", lambda file, args: calls.append((file, args)))
    monkeypatch.setattr(subprocess, "call", lambda cmd: pytest.fail("view must exec Streamlit, not run it as a child"))
    code, _, err = run_cli(["view", "--model", model_file, "--data", manifest, "--data", folder, "--port", "8765"], monkeypatch, capsys)
    assert code == 0, err
    ((file, cmd),) = calls
    assert file == cmd[0] == sys.executable
    assert cmd[:4] == [sys.executable, "-m", "streamlit", "run"] and cmd[4] == str(VIEWER) and VIEWER.is_file()
    head = cmd[: cmd.index("--")]
    assert head[head.index("--server.address") + 1] == "127.0.0.1" and head[head.index("--server.headless") + 1] == "true"
    assert head[head.index("--server.port") + 1] == "8765"
    assert head[head.index("--client.toolbarMode") + 1] == "viewer"  # no Deploy button
    assert cmd[cmd.index("--") + 1 :] == ["--model", str(model_file.resolve()), "--data", str(manifest.resolve()), "--data", str(folder.resolve())]
    assert "NOT FOR CLINICAL USE" in err
    code, _, err = run_cli(["view", "--model", model_file.parent / "missing.onnx"], monkeypatch, capsys)
    assert code == 2 and "not found" in err and len(calls) == 1

    def cannot_exec(file, args):
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(os, "execvp", cannot_exec)
    code, _, err = run_cli(["view", "--model", model_file], monkeypatch, capsys)
    assert code == 2 and "cannot start Streamlit (No such file or directory)" in err and "Traceback" not in err


def test_large_images_are_shown_at_display_size(model_file, study_data):
    from cxrdebias.deploy.overlay import cam_to_image
    from cxrdebias.deploy.runtime import InputImage
    from cxrdebias.deploy.viewer_state import display_shape, shrink

    manifest, _ = study_data
    small = read_image(collect_inputs([manifest])[0].path).pixels
    big = np.asarray(Image.fromarray(small).resize((1500, 2100), Image.Resampling.BILINEAR))  # a 2100×1500 radiograph
    model = load_model(model_file)
    image = InputImage("big", pixels=np.clip(big, 0.0, 1.0))
    res = analyse(model, image)
    assert display_shape(big.shape) == (1024, 731) and res.heat.shape == (1024, 731)
    src = display_source(image, res.pixels)
    assert src.values.shape == (1024, 731)
    overlay_image(apply_window(src, 0.5, 1.0), res.heat)  # same shapes: no error
    part = model.predict([image])
    full = cam_to_image(part.cams[0], part.geometries[0])
    assert np.abs(shrink(full, (1024, 731)) - res.heat).mean() < 0.01  # the same map, computed at display size
