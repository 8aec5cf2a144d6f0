"""The papers' baselines (issue 25): Bahng et al.'s vanilla on raw pooled features, shipped as
configs/biased_mnist/vanilla-raw-rho*.yaml, and what a run of them trains."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from cxrdebias.experiments.config import load_config
from cxrdebias.models import SimpleConvNet, build_model, capture_pooled
from tests.conftest import REPO, run_cli

RHOS = ("0.997", "0.990")


def _config(name: str) -> dict:
    return yaml.safe_load((REPO / "configs" / "biased_mnist" / name).read_text())


@pytest.mark.parametrize("rho", RHOS)
def test_vanilla_raw_config_differs_from_the_end_config_only_in_the_bottleneck_and_method(rho):
    raw, end = _config(f"vanilla-raw-rho{rho}.yaml"), _config(f"rho{rho}.yaml")
    assert raw["model"].pop("normalize_features") is False and end["model"].pop("normalize_features") is True
    assert raw["model"].pop("last_activation") == "relu" and end["model"].pop("last_activation") == "auto"
    assert raw.pop("method") == {"name": "vanilla"} and end.pop("method")["name"] == "end"
    assert raw.pop("name") == f"biased-mnist-rho{rho}-vanilla-raw"
    end.pop("name")
    assert raw == end  # data, seed, schedule: the same cell of the protocol


def test_vanilla_raw_model_feeds_the_raw_pooled_features_to_the_classifier():
    cfg = load_config(REPO / "configs" / "biased_mnist" / "vanilla-raw-rho0.997.yaml", ["model.kernel_size=3"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 10)
    x = torch.randn(6, 3, 28, 28)
    with capture_pooled(model) as seen:
        out = model(x)
    assert torch.equal(out.features, seen[0])  # no normalisation between pooling and classifier
    assert not torch.allclose(out.features.norm(dim=1), torch.ones(6))
    assert (out.features >= 0).all()  # ReLU last: the pooled features are non-negative
    assert torch.allclose(out.logits, model.classifier(seen[0]))
    # the EnD config's model normalises (the bottleneck a vanilla of Table 1 used before issue 25)
    end = build_model(load_config(REPO / "configs" / "biased_mnist" / "rho0.997.yaml", ["model.kernel_size=3"]).model, 10)
    assert torch.allclose(end(x).features.norm(dim=1), torch.ones(6))
    assert isinstance(model, SimpleConvNet)


def test_a_vanilla_raw_run_records_the_raw_bottleneck(fake_mnist, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = [
        "reproduce", "biased-mnist", "--config", REPO / "configs" / "biased_mnist" / "vanilla-raw-rho0.997.yaml",
        "--data-root", fake_mnist, "--rho", "0.99", "--epochs", "1", "--out", out, "--set", "train.batch_size=64",
        "--set", "train.progress=false", "--set", "model.kernel_size=3", "--set", "train.num_threads=1",
    ]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == {"name": "vanilla"}
    assert res["config"]["model"]["normalize_features"] is False and res["config"]["model"]["last_activation"] == "relu"
