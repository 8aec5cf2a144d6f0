"""Local-shortcut benchmarks (issue 23, first part): label-correlated cues drawn into the
synthetic chest X-rays (``data synth --cue …``) and the class-correlated patch of Biased MNIST
(``data.bias_kind: patch``). Off by default: the default outputs stay byte for byte the same."""

from __future__ import annotations

import json

import pytest

from cxrdebias.data.biased_mnist import BiasedMNISTConfig, build_biased_mnist
from cxrdebias.data.synthetic import SynthConfig, synthesize
from tests.conftest import make_fake_mnist

TINY = {"image_size": 48, "n_train_patients_per_site": 6, "n_val_patients_per_site": 4, "n_test_patients_per_site": 4}

#: hashes of two small sets written by the generator before the cue options existed (commit
#: 8cf43df); the defaults must keep producing exactly these bytes (GENERATOR_VERSION 1.0.0).
#: The pixel hash depends on float32 arithmetic (numpy/BLAS), the manifest hash only on the seed.
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
    assert (summary.n_images, summary.manifest_sha256, summary.pixel_sha256) == (n_images, manifest_sha, pixel_sha)
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
