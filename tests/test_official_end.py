"""benchmarks/official_end.py: the EnD authors' script run on this project's splits. Their code is
not in the repository, so a stand-in with the same interface (seeds 42, StepLR at 20 with
``verbose``, train/test called per epoch, ``colour_mnist`` loaders) checks what the runner changes."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from tests.conftest import REPO

sys.path.insert(0, str(REPO))

from benchmarks import official_end as oe  # noqa: E402
from cxrdebias.data.biased_mnist import build_biased_mnist  # noqa: E402
from cxrdebias.errors import ConfigError  # noqa: E402
from cxrdebias.experiments.config import load_config  # noqa: E402

_STAND_IN = {
    "configs.py": """
        import argparse
        parser = argparse.ArgumentParser()
        for name, kind in (("device", str), ("lr", float), ("alpha", float), ("beta", float), ("weight_decay", float),
                           ("batch_size", int), ("epochs", int), ("rho", float)):
            parser.add_argument("--" + name, type=kind)
        parser.add_argument("--local", action="store_true")
        config = parser.parse_args()
    """,
    "EnD.py": "",
    "src/models.py": """
        import torch
        def simple_convnet():
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 28 * 28, 10))
    """,
    "EnD_rebias_mnist_sweep.py": """
        import random
        import numpy as np
        import torch
        import torch.nn.functional as F
        import wandb, albumentations, albumentations.pytorch, pandas, matplotlib  # unused, as in theirs
        from configs import *
        import colour_mnist
        import models
        LOG = {}
        def train(model, loader, optimizer):
            model.train()
            correct = n = 0
            for x, y, b in loader:
                optimizer.zero_grad()
                out = model(x)
                loss = F.cross_entropy(out, y)
                loss.backward()
                optimizer.step()
                correct += (out.argmax(1) == y).sum().item(); n += len(y)
            return correct / n, loss.item(), loss.item(), 0.0
        def test(model, loader, criterion, weights):
            LOG.setdefault("scored", []).append(loader.split)
            model.eval()
            with torch.no_grad():
                correct = sum((model(x).argmax(1) == y).sum().item() for x, y, b in loader)
            return correct / len(loader.dataset), 0.0
        def main(config):
            random.seed(42); np.random.seed(42); torch.manual_seed(42)
            LOG["draw"] = torch.rand(1).item()
            train_loader, valid_loader = colour_mnist.get_biased_mnist_dataloader("~/data", config.batch_size, config.rho, train=True)
            biased = colour_mnist.get_biased_mnist_dataloader("~/data", config.batch_size, 1.0, train=False)
            unbiased = colour_mnist.get_biased_mnist_dataloader("~/data", config.batch_size, 0.1, train=False)
            model = models.simple_convnet()
            optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=20, gamma=0.1, verbose=True)
            LOG["lr"] = []
            for i in range(config.epochs):
                train(model, train_loader, optimizer)
                scheduler.step()
                LOG["lr"].append(optimizer.param_groups[0]["lr"])
                test(model, valid_loader, None, None); test(model, biased, None, None); test(model, unbiased, None, None)
    """,
}


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    code = tmp_path / "their"
    for name, text in _STAND_IN.items():
        (code / name).parent.mkdir(parents=True, exist_ok=True)
        (code / name).write_text(textwrap.dedent(text))
    for name in ("EnD_rebias_mnist_sweep", "configs", "models", "EnD", "colour_mnist"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return code


def test_their_script_runs_on_our_splits_with_our_schedule_seed_and_last_epoch_tests(stand_in, fake_mnist):
    result = oe.run(stand_in, rho=0.99, seed=7, alpha=5, beta=0.5, epochs=3, lr_step=2, data_root=fake_mnist, their_commit="abc")
    log = sys.modules["EnD_rebias_mnist_sweep"].LOG
    torch.manual_seed(7)
    assert log["draw"] == torch.rand(1).item()  # their seed 42 became --seed 7
    assert log["lr"] == pytest.approx([1e-3, 1e-4, 1e-4])  # StepLR at --lr-step 2, not their 20; `verbose` accepted
    assert log["scored"] == ["val", "val", "val", "test_biased", "test_unbiased"]  # test sets after the last epoch only
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3] and all("accuracy" in h["val"] for h in result["history"])
    m = result["metrics"]
    assert 0 <= m["biased_accuracy"] <= 1 and 0 <= m["unbiased_accuracy"] <= 1
    assert result["their_code"]["git_commit"] == "abc" and result["method"]["form"] == "authors' code"
    cfg = load_config(REPO / "configs" / "biased_mnist" / "rho0.990.yaml", [f"data.root={fake_mnist}"])
    assert result["data_hash"] == build_biased_mnist(cfg.data, 7).data_hash()  # the digits of `reproduce --seed 7`


def test_the_loaders_serve_exactly_the_reproduce_splits(fake_mnist):
    cfg = load_config(REPO / "configs" / "biased_mnist" / "rho0.997.yaml", [f"data.root={fake_mnist}"])
    data = build_biased_mnist(cfg.data, 3)
    module = oe.colour_mnist_module(data, 3)
    train, val = module.get_biased_mnist_dataloader("root", 64, 0.997, train=True)
    assert (train.split, val.split) == ("train", "val")
    x, y, b = (torch.cat(t) for t in zip(*train, strict=True))
    # shuffled: the same (digit, colour) pairs and the same pixels, in another order
    assert sorted(zip(y.tolist(), b.tolist(), strict=True)) == sorted(zip(data.train.targets.tolist(), data.train.biases.tolist(), strict=True))
    assert torch.allclose(x.sum(0), data.train.images.sum(0), atol=1e-3)
    for rho, split in ((1.0, "test_biased"), (0.1, "test_unbiased")):
        loader = module.get_biased_mnist_dataloader("root", 64, rho, train=False)
        x, y, b = (torch.cat(t) for t in zip(*loader, strict=True))
        s = getattr(data, split)
        assert loader.split == split and torch.equal(x, s.images) and torch.equal(y, s.targets) and torch.equal(b, s.biases)
    with pytest.raises(ConfigError, match="rho 0.5"):
        module.get_biased_mnist_dataloader("root", 64, 0.5, train=False)


def test_a_folder_without_their_files_is_one_line_naming_them(tmp_path):
    (tmp_path / "EnD.py").write_text("")
    with pytest.raises(ConfigError, match=r"EnD_rebias_mnist_sweep.py, configs.py, models.py not found"):
        oe.find_code(tmp_path)
