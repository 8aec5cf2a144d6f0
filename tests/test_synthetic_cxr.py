"""The embedded synthetic multi-site chest X-ray set (cxrdebias.data.synthetic)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydantic import ValidationError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cxrdebias.data.cxr.manifest import MANIFEST
from cxrdebias.data.images import read_image
from cxrdebias.data.synthetic import (
    GENERATOR_VERSION,
    SynthConfig,
    preview,
    synthesize,
)
from cxrdebias.errors import CxrDebiasError, DataError, RunExistsError


def _synth(seed: int, image_size: int, patients: tuple[int, int, int], **options) -> SynthConfig:
    """A :class:`SynthConfig` with (train, val, test) patients per site."""
    train, val, test = patients
    return SynthConfig(
        seed=seed, image_size=image_size, n_train_patients_per_site=train, n_val_patients_per_site=val,
        n_test_patients_per_site=test, **options,
    )


SMALL = _synth(1, 64, (60, 20, 40))
#: no site–label correlation: what the pixels say about site and disease, separately
UNBIASED = _synth(2, 64, (100, 0, 0), bias_strength=0.0)
TINY = _synth(5, 32, (4, 2, 2))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    out = tmp_path_factory.mktemp("synth") / "small"
    synthesize(out, SMALL)
    return out, pd.read_csv(out / "manifest.csv", dtype={"patient_id": str})


@pytest.fixture(scope="module")
def unbiased(tmp_path_factory) -> tuple[pd.DataFrame, np.ndarray]:
    """Manifest and display images (N×64×64 in [0, 1], read with the package's reader)."""
    out = tmp_path_factory.mktemp("synth") / "unbiased"
    synthesize(out, UNBIASED)
    df = pd.read_csv(out / "manifest.csv")
    images = np.stack([read_image(out / p).pixels for p in df["path"]])
    return df, images


def _pool(images: np.ndarray, k: int) -> np.ndarray:
    n, h, w = images.shape
    return images.reshape(n, h // k, k, w // k, k).mean(axis=(2, 4))


def _cv_accuracy(x: np.ndarray, y: pd.Series, patients: pd.Series) -> float:
    """5-fold accuracy of a logistic regression; folds split by patient (follow-up images of a
    patient share the anatomy, so image-level folds would let the model recognise patients)."""
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    cv = StratifiedGroupKFold(5, shuffle=True, random_state=0)
    return float(cross_val_score(model, x, y, groups=patients, cv=cv).mean())


# -- manifest and split ---------------------------------------------------------------------
def test_manifest_columns_and_types(small):
    out, df = small
    assert tuple(df.columns) == MANIFEST.columns
    assert len(df) >= 2 * (60 + 20 + 40)
    assert df["label"].dtype.kind == "i" and set(df["label"]) == {0, 1}
    assert df["age"].dtype.kind == "i" and df["age"].between(18, 95).all()
    assert set(df["site"]) == {"hospital_a", "hospital_b"}
    assert set(df["split"]) == {"train", "val", "test"}
    assert set(df["view"]) <= {"AP", "PA"} and set(df["sex"]) <= {"F", "M"}
    assert df["path"].is_unique
    for p in df["path"]:
        assert not Path(p).is_absolute() and (out / p).is_file()
    assert not df.isna().any().any()


def test_prevalence_follows_config_and_test_is_balanced(small):
    _, df = small
    pool = df[df["split"] != "test"].groupby("site")["label"].mean()
    assert pool["hospital_a"] > 0.75  # configured 0.875 at the patient level
    assert pool["hospital_b"] < 0.25  # configured 0.125
    patients = df[df["split"] == "train"].drop_duplicates("patient_id")
    by_site = patients.groupby("site")["label"].agg(["sum", "count"])
    assert by_site.loc["hospital_a", "sum"] == round(0.875 * 60)
    assert by_site.loc["hospital_b", "sum"] == round(0.125 * 60)
    test = df[df["split"] == "test"].groupby("site")["label"].agg(["mean", "count"])
    assert (test["mean"] == 0.5).all()  # exactly balanced per site, in images
    test_patients = df[df["split"] == "test"].drop_duplicates("patient_id").groupby("site").size()
    assert (test_patients == 40).all()


def test_patients_are_consistent_and_never_span_splits(small):
    _, df = small
    per_patient = df.groupby("patient_id")[["site", "label", "split", "sex", "age"]].nunique()
    assert (per_patient == 1).all().all()
    counts = df.groupby("patient_id").size()
    assert counts.min() >= 1 and counts.max() <= 3 and counts.max() > 1  # follow-ups exist


def test_bias_strength_zero_gives_equal_prevalence(tmp_path):
    cfg = TINY.model_copy(update={"bias_strength": 0.0, "n_train_patients_per_site": 10})
    assert cfg.pool_prevalence() == pytest.approx([0.5, 0.5])
    synthesize(tmp_path / "d", cfg)
    df = pd.read_csv(tmp_path / "d" / "manifest.csv")
    patients = df[df["split"] == "train"].drop_duplicates("patient_id")
    assert patients.groupby("site")["label"].sum().tolist() == [5, 5]
    half = SynthConfig(bias_strength=0.5)
    assert half.pool_prevalence() == pytest.approx([0.6875, 0.3125])


def test_more_than_two_sites_with_per_site_prevalence(tmp_path):
    cfg = TINY.model_copy(
        update={"sites": ["north", "south", "east"], "site_prevalence": [0.75, 0.5, 0.0],
                "n_train_patients_per_site": 8}
    )  # fmt: skip
    synthesize(tmp_path / "d", cfg)
    df = pd.read_csv(tmp_path / "d" / "manifest.csv")
    patients = df[df["split"] == "train"].drop_duplicates("patient_id")
    assert patients.groupby("site")["label"].sum().to_dict() == {"east": 0, "north": 6, "south": 4}


# -- DICOM files ----------------------------------------------------------------------------
def test_dicoms_are_readable_and_carry_the_site(small):
    out, df = small
    encodings = set()
    for site in ("hospital_a", "hospital_b"):
        for _, row in df[df["site"] == site].head(3).iterrows():
            ds = pydicom.dcmread(out / row["path"])
            px = ds.pixel_array
            assert px.shape == (64, 64) and px.dtype == np.uint16
            assert ds.InstitutionName == row["site"] == site
            assert ds.PatientID == row["patient_id"]
            assert ds.PatientSex == row["sex"] and ds.PatientAge == f"{row['age']:03d}Y"
            assert ds.ViewPosition == row["view"]
            assert 12 <= ds.BitsStored <= 16 and px.max() < 2**ds.BitsStored
            assert "WindowCenter" in ds and "WindowWidth" in ds
            encodings.add((ds.PhotometricInterpretation, "RescaleSlope" in ds))
            img = read_image(out / row["path"])
            assert img.site == site and 0.0 <= img.pixels.min() and img.pixels.max() <= 1.0
    # realistic mix: at least one site stores MONOCHROME1 and/or a rescale slope/intercept
    assert any(pm == "MONOCHROME1" or rescaled for pm, rescaled in encodings)
    assert len(encodings) == 2


def test_config_record(small):
    out, _ = small
    record = json.loads((out / "synth_config.json").read_text())
    assert record["generator_version"] == GENERATOR_VERSION
    assert record["seed"] == SMALL.seed
    assert SynthConfig(**record["config"]) == SMALL
    assert set(record["site_styles"]) == {"hospital_a", "hospital_b"}


def test_deterministic_same_seed_same_bytes(tmp_path):
    a = synthesize(tmp_path / "a", TINY)
    b = synthesize(tmp_path / "b", TINY)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 10
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert a.pixel_sha256 == b.pixel_sha256
    c = synthesize(tmp_path / "c", TINY.model_copy(update={"seed": 6}))
    assert c.pixel_sha256 != a.pixel_sha256


def test_refuses_to_overwrite(tmp_path):
    out = tmp_path / "d"
    synthesize(out, TINY)
    with pytest.raises(RunExistsError, match="not empty"):
        synthesize(out, TINY)
    (out / "images" / "stale.dcm").write_bytes(b"x")
    summary = synthesize(out, TINY, force=True)  # replaces the previous synthetic set
    assert not (out / "images" / "stale.dcm").exists()
    assert summary.n_images == len(pd.read_csv(out / "manifest.csv"))

    foreign = tmp_path / "foreign"
    (foreign / "images").mkdir(parents=True)
    with pytest.raises(DataError, match="does not look like a synthetic data set"):
        synthesize(foreign, TINY, force=True)
    with pytest.raises(CxrDebiasError):
        synthesize(foreign, TINY)


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"sites": ["only"], "site_prevalence": [0.5]}, "at least 2 sites"),
        ({"site_prevalence": [0.5]}, "site_prevalence has 1 values but there are 2 sites"),
        ({"site_prevalence": [1.5, 0.1]}, "must be in \\[0, 1\\]"),
        ({"sites": ["a/b", "c"]}, "letters, digits"),
        ({"n_test_patients_per_site": 3}, "must be even"),
        ({"images_per_patient": (3, 1)}, "images_per_patient"),
        ({"bias_strength": 1.2}, "less than or equal to 1"),
        ({"severity_range": (0.5, 1.5)}, "severity_range"),
        ({"unknown_option": 1}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_config_gives_clear_error(update, message):
    with pytest.raises(ValidationError, match=message):
        SynthConfig(**{**SynthConfig().model_dump(), **update})


# -- image content --------------------------------------------------------------------------
def test_site_is_easier_to_detect_than_disease(unbiased):
    """Logistic regression on 16×16 pixel vectors: the site is (near) perfectly separable, the
    disease above chance but clearly less — the shortcut a vanilla model takes."""
    df, images = unbiased
    x = _pool(images, 4).reshape(len(images), -1)
    site_acc = _cv_accuracy(x, df["site"], df["patient_id"])
    disease_acc = _cv_accuracy(x, df["label"], df["patient_id"])
    assert site_acc > 0.97
    assert 0.6 < disease_acc < site_acc - 0.1


def _zone_effects(df: pd.DataFrame, images: np.ndarray) -> dict[str, tuple[float, float, float]]:
    """Per site: (positive − negative mean brightness in the lower lateral lung zones, the same
    in the upper central zones, pooled SD of the lower lateral brightness)."""
    g = _pool(images, 4)  # 16×16 grid; rows/cols in lung-zone coordinates of the phantom
    lower_peripheral = g[:, 9:12, [2, 3, 12, 13]].mean(axis=(1, 2))
    upper_central = g[:, 3:6, [5, 10]].mean(axis=(1, 2))
    out = {}
    for site in ("hospital_a", "hospital_b"):
        sel = (df["site"] == site).to_numpy()
        pos, neg = sel & (df["label"] == 1).to_numpy(), sel & (df["label"] == 0).to_numpy()
        diff_lp = lower_peripheral[pos].mean() - lower_peripheral[neg].mean()
        diff_uc = upper_central[pos].mean() - upper_central[neg].mean()
        pooled_sd = np.sqrt((lower_peripheral[pos].var() + lower_peripheral[neg].var()) / 2)
        out[site] = (float(diff_lp), float(diff_uc), float(pooled_sd))
    return out


def test_disease_is_lower_peripheral_opacity(tmp_path):
    """With extensive disease, positives are brighter than negatives in the lower lateral lung
    zones, within each site, and the difference there is larger than in the upper central
    zones (where the opacities are, not only that they exist)."""
    out = tmp_path / "extensive"
    synthesize(out, UNBIASED.model_copy(update={"severity_range": (0.3, 1.0)}))
    df = pd.read_csv(out / "manifest.csv")
    images = np.stack([read_image(out / p).pixels for p in df["path"]])
    for site, (diff_lp, diff_uc, pooled_sd) in _zone_effects(df, images).items():
        assert diff_lp > 0.5 * pooled_sd, (site, diff_lp, pooled_sd)
        assert diff_lp > 2 * abs(diff_uc), (site, diff_lp, diff_uc)


def test_default_disease_is_subtle_but_present(unbiased):
    """The default severity is subtle (the shortcut must be easier than the disease) yet the
    opacities are still there, in the lower lateral zones, at every site."""
    df, images = unbiased
    for site, (diff_lp, diff_uc, pooled_sd) in _zone_effects(df, images).items():
        assert 0.1 * pooled_sd < diff_lp < 1.0 * pooled_sd, (site, diff_lp, pooled_sd)
        assert diff_lp > abs(diff_uc), (site, diff_lp, diff_uc)


def test_site_style_strength_zero_removes_the_site_signature(tmp_path):
    cfg = UNBIASED.model_copy(update={"site_style_strength": 0.0, "n_train_patients_per_site": 40})
    synthesize(tmp_path / "d", cfg)
    df = pd.read_csv(tmp_path / "d" / "manifest.csv")
    x = np.stack([read_image(tmp_path / "d" / p).pixels for p in df["path"]])
    x = _pool(x, 4).reshape(len(x), -1)
    assert _cv_accuracy(x, df["site"], df["patient_id"]) < 0.7


def test_preview_contact_sheet(small, tmp_path):
    out, _ = small
    png = preview(out, tmp_path / "sheet.png", per_group=3, tile=48)
    with Image.open(png) as im:
        assert im.mode == "L"
        assert im.width >= 3 * 48 and im.height >= 4 * 48  # 2 sites × 2 labels rows
    with pytest.raises(DataError, match="manifest.csv not found"):
        preview(tmp_path / "nowhere", tmp_path / "x.png")


def test_summary_counts(tmp_path):
    s = synthesize(tmp_path / "d", TINY)
    assert s.n_patients == 2 * (4 + 2 + 2)
    assert sum(c.images for c in s.counts) == s.n_images
    assert s.images_per_second > 0 and "| split | site |" in s.table()
