"""Group-balanced sampling (train.sampling=group_balanced): cells and weights, the epoch draw
(frequencies, determinism, resume, data-parallel shards), the runner's refusals and a tiny
end-to-end CXR run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from cxrdebias.data.base import (
    EpochDataLoader,
    TensorBatchLoader,
    TensorSamples,
    collate,
    make_loader,
)
from cxrdebias.data.sampling import cells, group_balanced_weights
from cxrdebias.data.synthetic import SynthConfig
from cxrdebias.models import SimpleConvNet
from tests.conftest import (
    REPO,
    assert_same_tensors,
    resume_after_interrupt,
    run_cli,
    tiny_synthetic_cxr_run,
)


def _samples(sizes: dict[tuple[int, int], int], image: int = 1) -> TensorSamples:
    """``sizes[(target, bias)]`` samples per cell, in a fixed interleaved order."""
    t = torch.cat([torch.full((n,), k[0]) for k, n in sizes.items()])
    b = torch.cat([torch.full((n,), k[1]) for k, n in sizes.items()])
    perm = torch.randperm(t.numel(), generator=torch.Generator().manual_seed(0))
    return TensorSamples(torch.zeros(t.numel(), 1, image, image), t[perm], b[perm], name="cells")


def _drawn(loader) -> torch.Tensor:
    return torch.cat([batch["index"] for batch in loader])


def test_cells_and_weights_by_hand():
    targets = torch.tensor([0, 0, 0, 1, 1, 0])
    biases = torch.tensor([0, 0, 1, 1, 1, 0])
    c = cells(targets, biases)
    assert c.keys.tolist() == [[0, 0], [0, 1], [1, 1]]  # (1, 0) has no sample: absent
    assert c.counts.tolist() == [3, 1, 2]
    assert c.describe() == {"t=0,b=0": 3, "t=0,b=1": 1, "t=1,b=1": 2}
    w = group_balanced_weights(targets, biases)
    assert w.tolist() == pytest.approx([1 / 3, 1 / 3, 1.0, 1 / 2, 1 / 2, 1 / 3])
    assert w.dtype == torch.float64
    with pytest.raises(ValueError, match="bias label of every sample"):
        cells(targets, torch.tensor([0, 0, -1, 1, 1, 0]))
    with pytest.raises(ValueError, match="one entry per sample"):
        cells(targets, biases[:3])


@pytest.mark.parametrize("streaming", [False, True])
def test_an_epoch_draws_every_cell_equally_often(streaming):
    """4 cells of 14000/2000/1000/3000 samples (and one empty cell): over one epoch of 20000
    draws each non-empty cell is drawn ≈ 5000 times (χ² goodness of fit to uniform)."""
    sizes = {(0, 0): 14000, (0, 1): 2000, (1, 0): 1000, (1, 1): 3000}  # (0, 2), (1, 2): empty
    data = _samples(sizes)
    weights = group_balanced_weights(data.targets, data.biases)
    if streaming:
        loader = EpochDataLoader(data, 500, seed=7, collate_fn=collate, weights=weights)
    else:
        loader = make_loader(data, 500, seed=7, weights=weights)
    loader.set_epoch(2)
    idx = _drawn(loader)
    assert idx.numel() == len(data)  # len(train) draws per epoch
    drawn = cells(data.targets[idx], data.biases[idx]).describe()
    assert set(drawn) == {"t=0,b=0", "t=0,b=1", "t=1,b=0", "t=1,b=1"}
    counts = np.array(list(drawn.values()))
    assert chisquare(counts).pvalue > 1e-3
    assert np.all(np.abs(counts - 5000) < 5 * np.sqrt(20000 * 0.25 * 0.75))  # 5 binomial sd
    # with replacement: the 1000 samples of the smallest cell are drawn ≈ 5 times each
    small = (data.targets == 1) & (data.biases == 0)
    assert torch.bincount(idx, minlength=len(data))[small].float().mean() == pytest.approx(5.0, rel=0.1)
    # the classes come out balanced too (2 cells each)
    assert data.targets[idx].float().mean() == pytest.approx(0.5, abs=0.02)


def test_the_draw_depends_only_on_seed_and_epoch():
    data = _samples({(0, 0): 30, (0, 1): 5, (1, 0): 4, (1, 1): 21})
    weights = group_balanced_weights(data.targets, data.biases)

    def epoch(seed: int, e: int) -> torch.Tensor:
        loader = TensorBatchLoader(data, 8, shuffle=True, seed=seed, weights=weights)
        loader.set_epoch(e)
        return _drawn(loader)

    assert torch.equal(epoch(1, 3), epoch(1, 3))  # a fresh loader (a resumed run) at epoch 3: the same draws
    assert not torch.equal(epoch(1, 3), epoch(1, 4))
    assert not torch.equal(epoch(1, 3), epoch(2, 3))
    # not a permutation: samples repeat
    assert epoch(1, 3).unique().numel() < len(data)
    # the draw is the (seed, epoch) generator's multinomial
    g = torch.Generator().manual_seed(1 * 1_000_003 + 3)
    assert torch.equal(epoch(1, 3), torch.multinomial(weights, len(data), replacement=True, generator=g))


def test_without_weights_the_epoch_is_the_old_permutation():
    """sampling=none changes nothing: the epoch is still randperm of the (seed, epoch) generator."""
    data = _samples({(0, 0): 10, (1, 1): 7})
    loader = make_loader(data, 4, shuffle=True, seed=5)
    loader.set_epoch(2)
    assert torch.equal(_drawn(loader), torch.randperm(17, generator=torch.Generator().manual_seed(5 * 1_000_003 + 2)))


@pytest.mark.parametrize("streaming", [False, True])
def test_data_parallel_shards_concatenate_to_the_one_process_draw(streaming):
    data = _samples({(0, 0): 16, (0, 1): 3, (1, 0): 2, (1, 1): 11})
    weights = group_balanced_weights(data.targets, data.biases)

    def loader(rank: int = 0, world_size: int = 1):
        if streaming:
            return EpochDataLoader(data, 8, seed=3, collate_fn=collate, rank=rank, world_size=world_size, weights=weights)
        return TensorBatchLoader(data, 8, seed=3, rank=rank, world_size=world_size, weights=weights)

    one = [b["index"] for b in loader()]
    ranks = [[b["index"] for b in loader(r, 2)] for r in range(2)]
    for b, (a0, a1) in enumerate(zip(*ranks, strict=True)):
        assert torch.equal(torch.cat([a0, a1]), one[b])
    with pytest.raises(ValueError, match="finite non-negative"):
        TensorBatchLoader(data, 8, weights=torch.zeros(len(data)))


def test_resumed_group_balanced_training_equals_the_uninterrupted_one(tmp_path):
    """Through the real trainer: checkpoint after epoch 1, resume, same weights as a full run."""
    from cxrdebias.debias.vanilla import Vanilla
    from cxrdebias.experiments.config import load_config
    from cxrdebias.training.trainer import Trainer

    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 2, (40,), generator=g)
    b = torch.where(torch.rand(40, generator=g) < 0.85, t, 1 - t)
    x = torch.randn(40, 3, 8, 8, generator=g) + t.view(-1, 1, 1, 1).float()
    data = TensorSamples(x, t, b, name="toy")
    weights = group_balanced_weights(t, b)
    cfg = load_config(None, ["train.epochs=3", "train.batch_size=8", "train.progress=false", "train.precision=fp32"]).train

    def trainer(run):
        torch.manual_seed(0)
        loader = TensorBatchLoader(data, 8, shuffle=True, seed=1, weights=weights)
        return Trainer(SimpleConvNet(2, kernel_size=3), Vanilla(), loader, cfg, run=run, seed=0, num_biases=2)

    from cxrdebias.training.runs import RunDir

    ref = trainer(RunDir.create(tmp_path / "ref"))
    ref.fit()
    resumed, _ = resume_after_interrupt(trainer, tmp_path / "cut")
    assert_same_tensors(ref.model, resumed.model)


# --- the runner: refusals and a tiny end-to-end run -----------------------------------------------------

SYNTH = SynthConfig(  # 62.5% positive training patients: the plain weighted loss would not be uniform
    seed=5, image_size=40, site_prevalence=[0.75, 0.5],
    n_train_patients_per_site=8, n_val_patients_per_site=6, n_test_patients_per_site=4,
)


@pytest.fixture(scope="module")
def synth_manifest(tmp_path_factory):
    from cxrdebias.data.synthetic import synthesize

    root = tmp_path_factory.mktemp("sampling-data")
    synthesize(root, SYNTH)
    return root / "manifest.csv"


def test_group_balanced_without_bias_labels_is_refused(synth_manifest, tmp_path, monkeypatch, capsys):
    """--bias none: no labels to balance (--bias auto balances its pseudo labels: tests/test_pseudo_sampling.py)."""
    message = "train.sampling=group_balanced needs bias labels; this run has none; use --bias site"
    out = tmp_path / "run"
    args = [
        "train", "--data", synth_manifest, "--config", REPO / "configs" / "cxr" / "synthetic.yaml", "--bias", "none", "--method", "vanilla",
        "--out", out, "--epochs", "1", "--image-size", "32", "--set", "train.sampling=group_balanced",
        "--set", "train.progress=false",
    ]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code != 0 and message in err and "Traceback" not in err
    assert len([line for line in err.strip().splitlines() if "error" in line.lower()]) == 1
    assert not out.exists()  # refused before anything is written


def test_group_balanced_is_refused_where_the_protocol_has_no_training_labels(fake_mnist, tmp_path, monkeypatch, capsys):
    args = [
        "reproduce", "biased-mnist", "--data-root", fake_mnist, "--rho", "0.99", "--epochs", "1", "--out", tmp_path / "run",
        "--set", "train.sampling=group_balanced", "--set", "train.progress=false",
    ]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code != 0 and "train.sampling=group_balanced: not supported for data.kind='biased_mnist'" in err
    assert not (tmp_path / "run").exists()


def test_tiny_group_balanced_cxr_run(tmp_path, torch_one_thread):
    run = tiny_synthetic_cxr_run(tmp_path, SYNTH, "train.sampling=group_balanced")
    results = json.loads((run / "results.json").read_text())
    assert results["config"]["train"]["sampling"] == "group_balanced"
    sampling = results["train"]["sampling"]
    assert sampling["method"] == "group_balanced"
    assert set(sampling["cells"]) == {"t=0,b=0", "t=0,b=1", "t=1,b=0", "t=1,b=1"}  # 2 sites × 2 classes
    assert sum(sampling["cells"].values()) == results["data"]["splits"]["train"]
    # the training split has more positive than negative images, yet with every cell drawn
    # equally often the weighted loss of configs/cxr/synthetic.yaml weights the classes uniformly
    n = sampling["cells"]
    assert n["t=1,b=0"] + n["t=1,b=1"] > n["t=0,b=0"] + n["t=0,b=1"]
    assert sampling["loss_class_weights"] == [1.0, 1.0]
    assert (run / "model.pt").is_file()


def test_weighted_loss_weights_the_classes_as_drawn():
    """Three cells, two of class 0: the sampler draws class 0 twice as often as class 1, so the
    weighted loss (the runner passes one target per cell) weights them 0.75 / 1.5 — uniform
    exactly when every class has as many cells."""
    from cxrdebias.experiments.runner import class_weights

    data = _samples({(0, 0): 50, (0, 1): 5, (1, 1): 45})
    c = cells(data.targets, data.biases)
    weights = class_weights(c.keys[:, 0], ("negative", "positive"))
    assert weights.tolist() == pytest.approx([0.75, 1.5])
    loader = make_loader(data, 100, seed=0, weights=c.weights())
    drawn = []
    for epoch in range(50):
        loader.set_epoch(epoch)
        drawn.append(data.targets[_drawn(loader)])
    drawn = torch.cat(drawn)
    share = torch.bincount(drawn, minlength=2).double() / drawn.numel()
    assert share.tolist() == pytest.approx([2 / 3, 1 / 3], abs=0.02)
    assert (share * weights.double()).tolist() == pytest.approx([0.5, 0.5], abs=0.02)  # equal class mass in the loss


@pytest.mark.parametrize("streaming", [False, True])
def test_a_weights_function_is_asked_once_per_epoch_and_none_means_the_unweighted_order(streaming):
    """--bias auto's sampling gives the loader a function (its labels change every epoch): an
    epoch it answers None is exactly the unweighted loader's, one it answers weights is exactly
    the fixed-weights loader's."""
    data = _samples({(0, 0): 16, (0, 1): 3, (1, 0): 2, (1, 1): 11})
    weights = group_balanced_weights(data.targets, data.biases)
    answers = iter([None, weights])
    asked = []

    def fn():
        asked.append(1)
        return next(answers)

    def make(w):
        if streaming:
            return EpochDataLoader(data, 8, shuffle=True, seed=3, collate_fn=collate, weights=w)
        return TensorBatchLoader(data, 8, shuffle=True, seed=3, weights=w)

    dynamic = make(fn)
    for epoch, reference in ((1, make(None)), (2, make(weights))):
        dynamic.set_epoch(epoch)
        reference.set_epoch(epoch)
        assert torch.equal(_drawn(dynamic), _drawn(reference))
        assert len(asked) == epoch
    with pytest.raises(ValueError, match="finite non-negative"):
        bad = make(lambda: torch.zeros(len(data)))
        _drawn(bad)
