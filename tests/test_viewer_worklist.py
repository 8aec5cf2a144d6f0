"""The viewer's worklist logic (cxrdebias/deploy/viewer_worklist.py) and its colour bar: pure
functions on hand-made tables, no model, no Streamlit."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrdebias.deploy.onnx_metadata import ModelMetadata
from cxrdebias.deploy.overlay import jet
from cxrdebias.deploy.viewer_report import with_colorbar
from cxrdebias.deploy.viewer_worklist import (
    is_flagged,
    neighbour,
    ood_columns,
    ood_flags,
    per_site_study_table,
    short_names,
    sort_options,
    sort_worklist,
    study_banners,
    summary_metrics,
    training_sites,
    uncertainty,
    worklist_view,
)


def study(ood: bool = False) -> pd.DataFrame:
    """Five images at threshold 0.5: two sites, one without a site, one without ground truth."""
    table = pd.DataFrame(
        {
            "file": ["s/a/x.png", "s/b/x.png", "s/c.png", "s/d.png", "s/e.png"],
            "patient": ["p1", "p2", "p3", "p4", ""],
            "site": ["A", "A", "B", "B", ""],
            "probability": [0.875, 0.375, 0.625, 0.125, 0.75],  # exact in binary: |p − 0.5| ties are ties
            "predicted_label": ["positive", "negative", "positive", "negative", "positive"],
            "ground_truth": ["positive", "positive", "negative", "negative", ""],
            "disagrees": [False, True, True, False, None],
        }
    )
    if ood:
        table["ood_score"] = [1.0, 9.0, 3.0, np.nan, 7.0]
        table["in_distribution"] = [True, False, True, None, False]
    return table


def test_uncertainty_and_sort_orders():
    t = study(ood=True)
    np.testing.assert_allclose(uncertainty([0.875, 0.375, 0.625], 0.5), [0.375, 0.125, 0.125])
    names = lambda df: list(df["file"])  # noqa: E731
    assert names(sort_worklist(t, "probability", 0.5)) == ["s/a/x.png", "s/e.png", "s/c.png", "s/b/x.png", "s/d.png"]
    # |p − 0.5|: b 0.125, c 0.125 (tie: file order), e 0.25, a 0.375, d 0.375
    assert names(sort_worklist(t, "uncertainty", 0.5)) == ["s/b/x.png", "s/c.png", "s/e.png", "s/a/x.png", "s/d.png"]
    assert names(sort_worklist(t, "ood", 0.5)) == ["s/b/x.png", "s/e.png", "s/c.png", "s/a/x.png", "s/d.png"]  # no score: last
    assert names(sort_worklist(t, "file", 0.5)) == sorted(t["file"])
    assert names(sort_worklist(t, "uncertainty", 0.5, reverse=True)) == ["s/a/x.png", "s/d.png", "s/e.png", "s/b/x.png", "s/c.png"]
    assert sort_options(t) == ["probability", "uncertainty", "ood", "file"]
    assert sort_options(study()) == ["probability", "uncertainty", "file"]  # no OOD scores: no OOD sort
    with pytest.raises(ValueError, match="no OOD scores"):
        sort_worklist(study(), "ood", 0.5)
    with pytest.raises(ValueError, match="sort by one of"):
        sort_worklist(t, "size", 0.5)


def test_neighbour_clamps_and_starts_at_an_end():
    files = ["a", "b", "c"]
    assert [neighbour(files, "b", 1), neighbour(files, "b", -1)] == ["c", "a"]
    assert [neighbour(files, "c", 1), neighbour(files, "a", -1)] == ["c", "a"]  # clamped
    assert [neighbour(files, None, 1), neighbour(files, "gone", -1)] == ["a", "c"]
    assert neighbour([], None, 1) is None


def test_short_names_and_worklist_view():
    assert short_names(["/d/a/x.png", "/d/b/x.png", "/d/c.dcm", "upload/y.png"]) == ["a/x.png", "b/x.png", "c.dcm", "y.png"]
    view = worklist_view(study())
    assert list(view.columns) == ["name", "probability", "prediction", "truth", "site", "patient"]
    assert list(view["name"]) == ["a/x.png", "b/x.png", "c.png", "d.png", "e.png"]
    ood = worklist_view(study(ood=True))
    assert list(ood.columns) == ["name", "probability", "prediction", "truth", "OOD", "site", "patient", "ood_score"]
    assert list(ood["OOD"]) == ["", "do not trust", "", "", "do not trust"]


def test_ood_fields_of_predictions():
    assert ood_columns(SimpleNamespace()) is None  # a model without an OOD output
    both = ood_columns(SimpleNamespace(ood_score=[1.0, 5.0], in_distribution=[True, False]))
    assert both["ood_score"].tolist() == [1.0, 5.0] and both["in_distribution"].tolist() == [True, False]
    by_threshold = ood_columns(SimpleNamespace(ood_score=np.array([1.0, 5.0, 3.0])), ood_threshold=3.0)
    assert by_threshold["in_distribution"].tolist() == [True, False, True]  # score ≤ threshold: inside
    assert ood_columns(SimpleNamespace(ood_score=[9.0]))["in_distribution"].tolist() == [True]  # no threshold: not flagged
    with pytest.raises(ValueError, match="2 OOD scores but 1"):
        ood_columns(SimpleNamespace(ood_score=[1.0, 2.0], in_distribution=[True]))
    assert ood_flags(study(ood=True)).tolist() == [False, True, False, False, True]  # None: not flagged
    assert ood_flags(study()).tolist() == [False] * 5
    assert is_flagged({"in_distribution": False}) and not is_flagged({"in_distribution": None}) and not is_flagged({})


def test_study_table_takes_ood_fields_from_the_predictions(tmp_path):
    from cxrdebias.deploy.runtime import InputImage
    from cxrdebias.deploy.viewer_state import TABLE_COLUMNS, study_table

    images = [InputImage(f"im{i}", pixels=np.zeros((4, 4), np.float32), fields={"site": "A", "label": "1"}) for i in range(3)]
    preds = SimpleNamespace(
        names=[x.name for x in images], labels=("negative", "positive"), positive_index=1,
        positive_probability=np.array([0.2, 0.7, 0.9]), predicted_labels=["negative", "positive", "positive"],
    )
    plain = study_table(images, preds)
    assert list(plain.columns) == list(TABLE_COLUMNS)
    preds.ood_score = np.array([0.5, 4.0, 8.0])
    table = study_table(images, preds, ood_threshold=3.0)
    assert list(table.columns) == [*TABLE_COLUMNS, "ood_score", "in_distribution"]
    assert table["in_distribution"].tolist() == [True, False, False] and table["ood_score"].tolist() == [0.5, 4.0, 8.0]


def test_study_banners():
    t = study(ood=True)  # 2 of 5 flagged: no OOD banner; site "" is not a site
    assert study_banners(t, ["A", "B"]) == []
    assert study_banners(t, []) == []  # training sites unknown: no site banner
    (site_banner,) = study_banners(t, ["A"])
    assert site_banner.startswith("2 of 5 images come from sites the model was not trained on (B)")
    t.loc[2, "in_distribution"] = False  # 3 of 5 = 60% > 50%
    (ood_banner,) = study_banners(t, ["A", "B"])
    assert ood_banner.startswith("3 of 5 images (60%) are out of distribution")
    half = study(ood=True).iloc[:4]  # 1 of 4: no banner; exactly half is not "most"
    half.loc[2, "in_distribution"] = False
    assert study_banners(half, ["A", "B"]) == []
    assert study_banners(study().iloc[:0], ["A"]) == []
    many = pd.DataFrame({"site": [f"s{i}" for i in range(7)], "in_distribution": [True] * 7})
    assert "(s0, s1, s2, s3, s4 and 2 more)" in study_banners(many, ["A"])[0]


def test_summary_and_per_site_metrics_by_hand():
    t = study(ood=True)
    m = summary_metrics(t, "positive")
    # labelled: a (pos, p .875 → pos), b (pos, .375 → neg), c (neg, .625 → pos), d (neg, .125 → neg)
    assert (m["n"], m["n_positive"], m["n_images"], m["n_flagged"]) == (4, 2, 5, 2)
    assert (m["accuracy"], m["tpr"], m["tnr"], m["balanced_accuracy"]) == (0.5, 0.5, 0.5, 0.5)
    assert m["auroc"] == pytest.approx(0.75)  # pairs (pos, neg): a>c, a>d, b<c, b>d → 3/4
    assert summary_metrics(t.assign(ground_truth=""), "positive") is None
    one_class = summary_metrics(t.iloc[:2], "positive")
    assert one_class["tpr"] == 0.5 and np.isnan(one_class["tnr"]) and np.isnan(one_class["auroc"])
    sites = per_site_study_table(t, "positive")
    assert list(sites["site"]) == ["(none)", "A", "B", "all"]
    assert sites.set_index("site").loc["A", ["images", "labelled", "positive", "TPR", "TNR", "OOD flagged"]].tolist() == [2, 2, 2, "0.500", "n/a", 1]
    assert sites.set_index("site").loc["(none)", ["images", "labelled", "TPR"]].tolist() == [1, 0, "n/a"]
    assert sites.set_index("site").loc["all", "AUROC"] == "0.750"
    assert per_site_study_table(t.assign(ground_truth=""), "positive") is None
    assert "OOD flagged" not in per_site_study_table(study(), "positive").columns


def test_training_sites_from_metadata():
    def meta(raw):
        return ModelMetadata("v", ("negative", "positive"), "positive", 0.5, None, raw)  # type: ignore[arg-type]

    assert training_sites(meta({"training_sites": ["A"], "sites": {"names": ["A", "B"]}})) == ["A"]
    assert training_sites(meta({"sites": {"names": ["A", "B"]}})) == ["A", "B"]  # recorded at training
    assert training_sites(meta({})) == []


def test_colorbar_panel_beside_the_overlay():
    cam = Image.new("RGB", (300, 600), (10, 20, 30))
    out = with_colorbar(cam, 0.873, 0.41, "positive", "positive")
    width = max(120, round(0.17 * 600))
    assert out.size == (300 + width, 600)
    px = np.asarray(out)
    assert (px[:, :300] == (10, 20, 30)).all()  # the overlay unchanged
    bar = px[:, 300 + max(4, width // 16) + 2]  # a column inside the colour bar
    colored = np.flatnonzero(bar.max(axis=1).astype(int) - bar.min(axis=1) > 60)  # jet, not the gray text
    top, bottom = bar[colored[0] + 1], bar[colored[-1] - 1]
    np.testing.assert_allclose(top, np.round(jet(np.array(1.0)) * 255), atol=12)  # dark red at the top: CAM 1
    np.testing.assert_allclose(bottom, np.round(jet(np.array(0.0)) * 255), atol=12)  # dark blue at the bottom: CAM 0
    assert with_colorbar(Image.new("RGB", (64, 64)), 0.5, 0.5, "positive", "negative").size == (64 + 120, 64)


def test_report_names_an_ood_image():
    from cxrdebias.deploy.viewer_report import report_png

    analysis = SimpleNamespace(name="x.png", probability=0.9, threshold=0.5, predicted_label="positive", positive_label="positive", provider="cpu")
    metadata = ModelMetadata("v", ("negative", "positive"), "positive", 0.5, None, {})  # type: ignore[arg-type]
    pic = Image.new("L", (64, 64), 128)
    plain = report_png(analysis, pic, pic, metadata, row={"in_distribution": True, "ood_score": 1.0})
    flagged = report_png(analysis, pic, pic, metadata, row={"in_distribution": False, "ood_score": 40.0})
    diff = np.abs(np.asarray(Image.open(io.BytesIO(plain)).convert("L"), int) - np.asarray(Image.open(io.BytesIO(flagged)).convert("L"), int))
    rows = np.flatnonzero(diff.max(axis=1) > 0)
    assert rows.size  # the flagged report has one more text line (below the probability lines)
    assert rows.min() > 700
