"""Local-shortcut benchmarks (issue 23, first part): label-correlated cues drawn into the
synthetic chest X-rays (``data synth --cue …``) and the class-correlated patch of Biased MNIST
(``data.bias_kind: patch``). Off by default: the default outputs stay byte for byte the same."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from cxrdebias.data.biased_mnist import (
    COLOURS,
    PATCH_POSITION_NAMES,
    BiasedMNISTConfig,
    assign_colours,
    build_biased_mnist,
    patch_anchors,
    patch_images,
)
from cxrdebias.data.synthetic import SynthConfig, synthesize
from cxrdebias.data.synthetic.config import CUE_KINDS
from cxrdebias.data.synthetic.cues import PHYSICAL, draw_cue
from cxrdebias.experiments import registry
from cxrdebias.experiments.config import load_config
from tests.conftest import REPO, make_fake_mnist, run_cli

TINY = {"image_size": 48, "n_train_patients_per_site": 6, "n_val_patients_per_site": 4, "n_test_patients_per_site": 4}

#: hashes of two small sets written by the generator before the cue options existed (commit
#: 8cf43df); the defaults must keep producing exactly these bytes (GENERATOR_VERSION 1.0.0).
#: Only the manifest hash (seed and study design) is pinned: the pixel hash depends on float32
#: arithmetic (numpy/BLAS builds differ between CPUs: AVX2 vs AVX-512), so the pixels are pinned
#: relative to the set without cues instead (test_the_cue_changes_only_the_images_that_carry_it).
GOLDEN = [
    (
        SynthConfig(seed=7, **TINY),
        55,
        "77f7fdedd17569348915245c44390a23251f8aab1c5ae4663fc24ff6a6d7163f",
        "0395640bde1b1616c4cc1206cfb8eb28b2a8f51da5480c86d9aeaaddaeb9bc51",
    ),
    (
        SynthConfig(seed=8, external_sites=1, bias_strength=0.0, **TINY),
        62,
        "3b1084d29869e08dc667096f90f86398f523fc8029eb68e028f724b827d3f970",
        "a9d88193003dd1d9f9518b1fef232314f79bb83bd4b9d9dcee7463882eb7dd84",
    ),
]
#: the keys synth_config.json's "config" has always had (external_sites only when used)
CONFIG_KEYS = {
    "bias_strength", "image_size", "images_per_patient", "n_test_patients_per_site", "n_train_patients_per_site",
    "n_val_patients_per_site", "other_findings_rate", "seed", "severity_range", "site_prevalence",
    "site_style_strength", "sites",
}  # fmt: skip
RECORD_KEYS = {
    "config", "counts", "generator", "generator_version", "manifest_sha256", "n_images", "n_patients",
    "package_version", "pixel_sha256", "pool_prevalence", "seed", "site_styles",
}  # fmt: skip


# -- defaults unchanged ----------------------------------------------------------------------
@pytest.mark.parametrize(("cfg", "n_images", "manifest_sha", "pixel_sha"), GOLDEN)
def test_default_synthetic_output_is_unchanged(tmp_path, cfg, n_images, manifest_sha, pixel_sha):
    summary = synthesize(tmp_path / "d", cfg)
    assert (summary.n_images, summary.manifest_sha256) == (n_images, manifest_sha)
    del pixel_sha  # recorded above for the record, not asserted (CPU-dependent float32 arithmetic)
    record = json.loads((tmp_path / "d" / "synth_config.json").read_text())
    external = {"external_sites"} if cfg.external_sites else set()
    assert set(record) == RECORD_KEYS | external
    assert set(record["config"]) == CONFIG_KEYS | external
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["images", "manifest.csv", "synth_config.json"]


def test_default_biased_mnist_is_unchanged(tmp_path):
    """The colour protocol's tensors, hashed before the patch option existed (commit 8cf43df)."""
    root = make_fake_mnist(tmp_path / "m", n_train=60, n_test=30)
    data = build_biased_mnist(BiasedMNISTConfig(root=str(root), rho=0.9), seed=3)
    assert data.data_hash() == "4dc98cc8b3d78a4c6398dd42e208c325c027b54b75f253a3175495b561721afe"


# -- the cue of data synth ---------------------------------------------------------------------
def _cues(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "cues.csv", dtype={"kind": str})


def _stored(path: Path) -> np.ndarray:
    """The stored pixel values of one DICOM image."""
    return pydicom.dcmread(path).pixel_array.astype(np.int64)


def test_cue_off_by_default_and_its_options_need_a_cue():
    assert SynthConfig().cue is None
    with pytest.raises(ValidationError, match="cue_positive_rate given but no cue is drawn"):
        SynthConfig(cue_positive_rate=0.9)
    with pytest.raises(ValidationError, match="Input should be 'tag', 'text', 'marker', 'electrodes' or 'tube'"):
        SynthConfig(cue="badge")
    assert set(CUE_KINDS) == {"tag", "text", "marker", "electrodes", "tube"}


def test_same_seed_same_files_with_a_cue(tmp_path):
    cfg = SynthConfig(seed=3, cue="electrodes", bias_strength=0.0, **TINY)
    synthesize(tmp_path / "a", cfg)
    synthesize(tmp_path / "b", cfg)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert Path("cues.csv") in files and len(files) > 40
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_the_cue_changes_only_the_images_that_carry_it(tmp_path):
    """Its own random streams: the manifest is the same, an image without the cue is byte for byte
    the image of the set without cues, an image with it differs."""
    synthesize(tmp_path / "plain", SynthConfig(seed=4, bias_strength=0.0, **TINY))
    synthesize(tmp_path / "cue", SynthConfig(seed=4, bias_strength=0.0, cue="tag", **TINY))
    plain = pd.read_csv(tmp_path / "plain" / "manifest.csv", dtype=str)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "cue" / "manifest.csv", dtype=str), plain)
    cues = _cues(tmp_path / "cue")
    assert list(cues.columns) == ["path", "cue", "kind", "x0", "y0", "x1", "y1"]
    assert cues["path"].tolist() == plain["path"].tolist() and set(cues["kind"]) == {"tag"}
    assert cues.loc[cues["cue"] == 0, ["x0", "y0", "x1", "y1"]].isna().all().all()  # no box without the cue
    for path, cue in zip(cues["path"], cues["cue"], strict=True):
        same = (tmp_path / "plain" / path).read_bytes() == (tmp_path / "cue" / path).read_bytes()
        assert same == (cue == 0), path
    record = json.loads((tmp_path / "cue" / "synth_config.json").read_text())
    assert record["config"]["cue"] == "tag" and record["config"]["cue_positive_rate"] == 0.95
    assert record["cues"]["file"] == "cues.csv" and record["cues"]["size_px"] == 3  # 0.06 × 48
    assert "burned in" in record["cues"]["placement"]
    assert SynthConfig(**record["config"]) == SynthConfig(seed=4, bias_strength=0.0, cue="tag", **TINY)


def test_cue_rates_give_exact_counts_per_site_split_and_label(tmp_path):
    rates = {"cue_positive_rate": 0.8, "cue_negative_rate": 0.25, "cue_test_positive_rate": 0.3, "cue_test_negative_rate": 0.6}
    cfg = SynthConfig(seed=5, cue="text", external_sites=1, image_size=32, n_train_patients_per_site=20,
                      n_val_patients_per_site=10, n_test_patients_per_site=10, **rates)  # fmt: skip
    summary = synthesize(tmp_path, cfg)
    m = pd.read_csv(tmp_path / "manifest.csv").merge(_cues(tmp_path), on="path")
    for (site, split, label), g in m.groupby(["site", "split", "label"]):
        test = "test_" if split == "test" else ""
        rate = rates[f"cue_{test}{'positive' if label == 1 else 'negative'}_rate"]
        assert g["cue"].sum() == int(round(rate * len(g))), (site, split, label)
    # the summary and synth_config.json count the same, per (split, label)
    for c in summary.cue_counts:
        g = m[(m["split"] == c.split) & (m["label"] == c.label)]
        assert (c.images, c.with_cue) == (len(g), g["cue"].sum())
    assert json.loads((tmp_path / "synth_config.json").read_text())["cues"]["counts"] == [c.model_dump() for c in summary.cue_counts]


def test_issue_example_tag_on_95_percent_of_positives(tmp_path):
    """The case of issue 23: a tag on 95% of positive and 5% of negative training images,
    hospitals uncorrelated with the label, the test set balanced in label × tag."""
    cfg = SynthConfig(seed=6, cue="tag", bias_strength=0.0, image_size=32, n_train_patients_per_site=40,
                      n_val_patients_per_site=0, n_test_patients_per_site=20)  # fmt: skip
    synthesize(tmp_path, cfg)
    m = pd.read_csv(tmp_path / "manifest.csv").merge(_cues(tmp_path), on="path")
    train, test = m[m["split"] == "train"], m[m["split"] == "test"]
    share = train.groupby("label")["cue"].mean()
    assert share[1] == pytest.approx(0.95, abs=0.02) and share[0] == pytest.approx(0.05, abs=0.02)
    assert train.groupby("site")["label"].mean().to_dict() == pytest.approx({"hospital_a": 0.5, "hospital_b": 0.5}, abs=0.1)
    groups = test.groupby(["site", "label", "cue"]).size().unstack("label")
    assert groups.shape == (4, 2) and (groups[0] == groups[1]).all()  # per site and tag: as many positives as negatives
    assert (groups.groupby("site").max() - groups.groupby("site").min()).max().max() <= 1  # about half tagged (rounding)


@pytest.mark.parametrize("kind", CUE_KINDS)
def test_each_cue_lies_inside_its_box(tmp_path, kind):
    """Against the same images without the cue: a burned-in cue changes pixels inside its box
    only; a device also changes the neighbourhood that the site's edge enhancement reaches (3σ,
    σ = 4 px at 256 px). Without the site's own annotations (site_style_strength 0; at 64 px its
    marker covers a third of the image), the box is tight: the cue reaches each of its edges."""
    n = 64
    every = {"cue_positive_rate": 1.0, "cue_negative_rate": 1.0, "cue_test_positive_rate": 1.0, "cue_test_negative_rate": 1.0}
    base = {"image_size": n, "n_train_patients_per_site": 3, "n_val_patients_per_site": 0, "n_test_patients_per_site": 2}
    reach = int(np.ceil(3 * 4 * n / 256)) + 1 if kind in PHYSICAL else 0
    for strength in (1.0, 0.0):
        plain, cued = tmp_path / f"plain{strength}", tmp_path / f"cue{strength}"
        synthesize(plain, SynthConfig(seed=9, site_style_strength=strength, **base))
        synthesize(cued, SynthConfig(seed=9, site_style_strength=strength, cue=kind, **base, **every))
        cues = _cues(cued)
        assert (cues["cue"] == 1).all() and len(cues) >= 10
        for r in cues.itertuples():
            diff = _stored(cued / r.path) != _stored(plain / r.path)
            x0, y0, x1, y1 = int(r.x0), int(r.y0), int(r.x1), int(r.y1)
            assert 0 <= x0 < x1 <= n and 0 <= y0 < y1 <= n
            inside = np.zeros_like(diff)
            inside[max(y0 - reach, 0) : y1 + reach, max(x0 - reach, 0) : x1 + reach] = True
            assert diff[y0:y1, x0:x1].any() and not (diff & ~inside).any(), r.path
            if strength == 0.0 and kind not in PHYSICAL:
                rows, cols = np.flatnonzero(diff.any(1)), np.flatnonzero(diff.any(0))
                assert (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1) == (x0, y0, x1, y1), r.path


@pytest.mark.parametrize("kind", CUE_KINDS)
def test_drawn_cue_mask_fills_its_box(kind):
    cue = draw_cue(kind, 128, None, 0.05, np.random.default_rng(0))
    x0, y0, x1, y1 = cue.box
    assert cue.mask[y0:y1, x0:x1].sum() == pytest.approx(cue.mask.sum())
    assert cue.mask[y0, x0:x1].any() and cue.mask[y1 - 1, x0:x1].any()
    assert cue.mask[y0:y1, x0].any() and cue.mask[y0:y1, x1 - 1].any()
    assert cue.physical == (kind in {"electrodes", "tube"})


def test_jitter_moves_the_cue_within_its_range(tmp_path):
    n, jitter = 64, 0.1
    sizes = {"image_size": n, "n_train_patients_per_site": 10, "n_val_patients_per_site": 0, "n_test_patients_per_site": 10}
    synthesize(tmp_path / "j", SynthConfig(seed=2, cue="tag", cue_jitter=jitter, cue_size=0.1, **sizes))
    synthesize(tmp_path / "fixed", SynthConfig(seed=2, cue="tag", cue_jitter=0.0, cue_size=0.1, **sizes))
    moved = _cues(tmp_path / "j").dropna()
    fixed = _cues(tmp_path / "fixed").dropna()
    assert len(fixed[["x0", "y0"]].drop_duplicates()) == 1 and len(fixed) > 5
    assert len(moved[["x0", "y0"]].drop_duplicates()) > 5
    # tag: 6 px square centred at (0.70, 0.16)·64 → top-left (42, 7) without jitter, ±6 px with it
    assert fixed[["x0", "y0", "x1", "y1"]].iloc[0].tolist() == [42, 7, 48, 13]
    assert moved["x0"].between(36, 48).all() and moved["y0"].between(1, 13).all()
    assert (moved["x1"] - moved["x0"] == 6).all() and (moved["y1"] - moved["y0"] == 6).all()


def test_force_without_a_cue_removes_the_old_cues_file(tmp_path):
    synthesize(tmp_path, SynthConfig(seed=1, cue="tube", **TINY))
    assert (tmp_path / "cues.csv").is_file()
    synthesize(tmp_path, SynthConfig(seed=1, **TINY), force=True)
    assert not (tmp_path / "cues.csv").exists()


def test_data_synth_cue_options_and_preview(tmp_path, monkeypatch, capsys):
    args = ["data", "synth", "--out", tmp_path / "d", "--image-size", 32, "--train-patients", 8, "--val-patients", 0,
            "--test-patients", 4, "--bias-strength", 0, "--cue", "marker", "--cue-positive-rate", 1, "--cue-negative-rate", 0,
            "--cue-size", 0.25, "--preview", tmp_path / "p.png"]  # fmt: skip
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    assert "cues.csv" in err and "with the cue" in out
    m = pd.read_csv(tmp_path / "d" / "manifest.csv").merge(_cues(tmp_path / "d"), on="path")
    train = m[m["split"] == "train"]
    assert (train["cue"] == train["label"]).all()
    assert (m["y1"] - m["y0"]).dropna().eq(8).all()  # 0.25 × 32
    record = json.loads((tmp_path / "d" / "synth_config.json").read_text())
    assert record["config"]["cue"] == "marker" and record["config"]["cue_size"] == 0.25
    # the contact sheet: 2 sites × 2 labels × (with, without the marker) rows of 128 + 20 px
    assert Image.open(tmp_path / "p.png").size[1] == 8 * (128 + 20)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--cue", "badge"], "--cue: Input should be 'tag', 'text', 'marker', 'electrodes' or 'tube'"),
        (["--cue", "tag", "--cue-positive-rate", 1.5], "--cue-positive-rate: Input should be less than or equal to 1"),
        (["--cue", "tag", "--cue-negative-rate", -0.1], "--cue-negative-rate: Input should be greater than or equal to 0"),
        (["--cue", "tag", "--cue-test-positive-rate", 2], "--cue-test-positive-rate: Input should be less than or equal to 1"),
        (["--cue", "tag", "--cue-test-negative-rate", -1], "--cue-test-negative-rate: Input should be greater than or equal to 0"),
        (["--cue", "tag", "--cue-size", 0], "--cue-size: Input should be greater than 0"),
        (["--cue-positive-rate", 0.5], "cue_positive_rate given but no cue is drawn"),
    ],
)
def test_data_synth_refuses_bad_cue_options_in_one_line(tmp_path, monkeypatch, capsys, extra, expected):
    code, _, err = run_cli(["data", "synth", "--out", tmp_path / "d", *extra], monkeypatch, capsys)
    assert code != 0 and expected in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()


# -- Biased MNIST: the class-correlated patch ----------------------------------------------------
def test_patch_anchors_lie_in_the_margin_around_the_digit():
    assert patch_anchors(28, 28, 4).tolist() == [
        [0, 0], [0, 8], [0, 16], [0, 24], [24, 0], [24, 8], [24, 16], [24, 24], [12, 0], [12, 24],
    ]  # fmt: skip
    assert len(PATCH_POSITION_NAMES) == 10


def test_patch_position_marks_the_bias_label_on_black():
    digits = torch.zeros(10, 28, 28, dtype=torch.uint8)
    digits[:, 10:18, 12:16] = 90  # the digit: any non-zero pixel becomes white
    img = patch_images(digits, torch.arange(10), by="position", size=4, jitter=0, seed=0)
    assert img.shape == (10, 3, 28, 28) and img.dtype == torch.uint8
    for b, (y, x) in enumerate(patch_anchors(28, 28, 4).tolist()):
        white = (img[b] == 255).all(0)
        expected = torch.zeros(28, 28, dtype=torch.bool)
        expected[10:18, 12:16] = True
        expected[y : y + 4, x : x + 4] = True
        assert torch.equal(white, expected), b
        assert (img[b][:, ~white] == 0).all()  # the background stays black


def test_patch_colour_is_the_bias_colour_near_the_top_left_corner():
    digits = torch.zeros(10, 28, 28, dtype=torch.uint8)
    img = patch_images(digits, torch.arange(10), by="colour", size=3, jitter=0, seed=0)
    for b in range(10):
        assert img[b, :, 0:3, 0:3].reshape(3, -1).T.tolist() == [list(COLOURS[b])] * 9
        assert (img[b, :, 3:, :] == 0).all() and (img[b, :, :, 3:] == 0).all()


def test_patch_jitter_moves_the_patch_by_at_most_its_range():
    digits = torch.zeros(200, 28, 28, dtype=torch.uint8)
    biases = torch.full((200,), 9)  # the right edge's middle: anchor (12, 24)
    img = patch_images(digits, biases, by="position", size=4, jitter=2, seed=1)
    corners = set()
    for im in img:
        rows, cols = torch.nonzero((im == 255).all(0), as_tuple=True)
        assert rows.max() - rows.min() == 3 and cols.max() - cols.min() == 3  # a 4×4 square
        corners.add((int(rows.min()), int(cols.min())))
    assert {y for y, _ in corners} == set(range(10, 15))  # 12 ± 2
    assert {x for _, x in corners} == {22, 23, 24}  # 24 − 2 … 24 (kept inside the image)
    same = patch_images(digits, biases, by="position", size=4, jitter=2, seed=1)
    assert torch.equal(img, same)


def test_biased_mnist_patch_follows_rho_and_the_bias_label(tmp_path):
    root = make_fake_mnist(tmp_path / "m", n_train=200, n_test=100)
    cfg = BiasedMNISTConfig(root=str(root), rho=0.9, bias_kind="patch", patch_jitter=0)
    data = build_biased_mnist(cfg, seed=3)
    anchors = patch_anchors(28, 28, 4).tolist()
    for split, rho, seed in ((data.train, 0.9, 3), (data.test_biased, 1.0, 6), (data.test_unbiased, 0.1, 7)):
        assert torch.equal(split.biases, assign_colours(split.targets, rho, seed))  # the same ρ mechanics
        assert split.bias_names == PATCH_POSITION_NAMES
        for image, b in zip(split.images, split.biases.tolist(), strict=True):
            assert set(image.unique().tolist()) <= {-1.0, 1.0}  # black and white only
            full = [k for k, (y, x) in enumerate(anchors) if (image[:, y : y + 4, x : x + 4] == 1).all()]
            assert full == [b]
    per_class = [(data.train.biases[data.train.targets == c] == c).sum().item() for c in range(10)]
    assert per_class == [int(0.9 * (data.train.targets == c).sum().item()) for c in range(10)]
    assert data.train.info["bias_kind"] == "patch"


def test_biased_mnist_colour_is_the_default_and_patch_options_need_a_patch(tmp_path):
    root = make_fake_mnist(tmp_path / "m", n_train=60, n_test=30)
    explicit = build_biased_mnist(BiasedMNISTConfig(root=str(root), rho=0.9, bias_kind="colour"), seed=3)
    assert explicit.data_hash() == build_biased_mnist(BiasedMNISTConfig(root=str(root), rho=0.9), seed=3).data_hash()
    with pytest.raises(ValidationError, match="patch_size given but bias_kind is colour"):
        BiasedMNISTConfig(patch_size=3)
    with pytest.raises(ValidationError, match="bias_kind"):
        BiasedMNISTConfig(bias_kind="texture")
    cfg = load_config(REPO / "configs/biased_mnist/rho0.997.yaml", ["data.bias_kind=patch", "data.patch_by=colour"])
    assert (cfg.data.bias_kind, cfg.data.patch_by) == ("patch", "colour")
    assert registry.get("biased_mnist").run_tag(cfg) == "biased-mnist-rho0.997-patch"
    assert registry.get("biased_mnist").run_tag(load_config(REPO / "configs/biased_mnist/rho0.997.yaml")) == "biased-mnist-rho0.997"
