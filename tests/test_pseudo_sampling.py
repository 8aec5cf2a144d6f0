"""Group-balanced sampling on --bias auto's pseudo labels (train.sampling=group_balanced): each
epoch draws the (target, pseudo-bias) cells of the labels the labeller gave during the previous
epoch equally often; epoch 1, the warm-up and a closed shortcut gate keep the natural order;
resume draws what the uninterrupted run draws; with --bias auto the CLI trains in the natural order unless
`--set train.sampling=group_balanced` asks for it (unmeasured as a default)."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from cxrdebias.data.base import TensorBatchLoader, TensorSamples
from cxrdebias.data.sampling import cells
from cxrdebias.debias import build_method
from cxrdebias.debias.unsupervised import PseudoBiasOptions
from cxrdebias.experiments.runner import class_weights, pseudo_label_weights
from tests.conftest import REPO, adam_context, assert_same_tensors, resume_after_interrupt, run_cli
from tests.test_pseudo_bias import TinyNet

AUTOCAST = contextlib.nullcontext
pytestmark = pytest.mark.usefixtures("torch_one_thread")




def _auto(n: int, method: str = "vanilla", **kw):
    """A --bias auto method on :class:`TinyNet` (attractor on the bottleneck, no warm-up, gate off unless told)."""
    m = build_method(method, {}, PseudoBiasOptions(enabled=True, **{"layer": None, "warmup_steps": 0, "min_aligned": 0.0, **kw}))
    model = TinyNet(6)
    m.setup(model, adam_context(n, 2, None, lr=1e-2))
    return m, model, torch.optim.SGD(model.parameters(), lr=0.1)


def _hand_labels(m, labels: dict[str, torch.Tensor]):
    """The labeller answers ``labels["now"][index]``: hand-built pseudo labels per sample."""
    m.labeller.assign = lambda f, lg, t, step=0, index=None: labels["now"][index]


def _toy(n: int, seed: int = 0) -> TensorSamples:
    g = torch.Generator().manual_seed(seed)
    t = (torch.arange(n) % 2)[torch.randperm(n, generator=g)]
    return TensorSamples(torch.randn(n, 6, generator=g), t, torch.full((n,), -1), name="toy")  # no true bias at all


def _epoch(m, model, opt, loader, epoch: int) -> tuple[torch.Tensor, dict]:
    loader.set_epoch(epoch)
    drawn = []
    for batch in loader:
        m.update(model, batch, opt, AUTOCAST)
        drawn.append(batch["index"])
    return torch.cat(drawn), m.epoch_metrics()["pseudo_bias"]


def test_each_epoch_draws_the_cells_of_the_previous_epochs_pseudo_labels_equally_often():
    n, seed = 4000, 3
    data = _toy(n)
    t = data.targets
    g = torch.Generator().manual_seed(1)
    flip_a = torch.rand(n, generator=g) < torch.where(t == 0, 0.1, 0.05)  # 10% / 5% "conflicting"
    flip_b = torch.rand(n, generator=g) < 0.3  # epoch 2's labels differ: 30% conflicting
    labels = {"now": torch.where(flip_a, 1 - t, t)}
    first = labels["now"].clone()
    m, model, opt = _auto(n)
    _hand_labels(m, labels)
    loader = TensorBatchLoader(data, 500, shuffle=True, seed=seed, weights=pseudo_label_weights(m, t))

    # epoch 1: no labels yet, the natural order (the unweighted loader's permutation)
    idx1, pb1 = _epoch(m, model, opt, loader, 1)
    assert torch.equal(idx1, torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + 1)))
    assert pb1["sampled_cells"] is None

    # epoch 2 draws by epoch 1's labels: 4 cells of very different sizes, each ≈ n/4 of the draws
    labels["now"] = torch.where(flip_b, 1 - t, t)
    idx2, pb2 = _epoch(m, model, opt, loader, 2)
    assert pb2["sampled_cells"] == cells(t, first).describe()
    sizes = np.array(list(pb2["sampled_cells"].values()))
    assert sizes.max() > 8 * sizes.min()  # the cells really differ in size …
    drawn = np.array(list(cells(t[idx2], first[idx2]).describe().values()))
    assert len(drawn) == 4 and chisquare(drawn).pvalue > 1e-3  # … yet are drawn equally often
    assert np.all(np.abs(drawn - n / 4) < 5 * np.sqrt(n * 0.25 * 0.75))
    assert idx2.unique().numel() < n  # with replacement

    # epoch 3 draws by each sample's latest label: epoch 2's where epoch 2 drew it, else epoch 1's
    latest = first.clone()
    latest[idx2] = labels["now"][idx2]
    idx3, pb3 = _epoch(m, model, opt, loader, 3)
    expected = cells(t, latest)
    assert pb3["sampled_cells"] == expected.describe()
    g3 = torch.Generator().manual_seed(seed * 1_000_003 + 3)
    assert torch.equal(idx3, torch.multinomial(expected.weights(), n, replacement=True, generator=g3))


@pytest.mark.parametrize("why", ["warm-up", "gate closed"])
def test_natural_order_while_the_warmup_lasts_or_the_gate_is_closed(why):
    n = 64
    data = _toy(n)
    t = data.targets
    kw = {"warmup_steps": 100} if why == "warm-up" else {"min_aligned": 0.7}
    # warm-up: plausible labels; gate: groups unrelated to the classes (every sample "conflicting")
    labels = {"now": t.clone() if why == "warm-up" else 1 - t}
    m, model, opt = _auto(n, **kw)
    _hand_labels(m, labels)
    loader = TensorBatchLoader(data, 16, shuffle=True, seed=0, weights=pseudo_label_weights(m, t))
    for e in (1, 2):
        idx, pb = _epoch(m, model, opt, loader, e)
        assert torch.equal(idx, torch.randperm(n, generator=torch.Generator().manual_seed(e)))
        assert pb["sampled_cells"] is None
    assert (why == "gate closed") is (not m.gate_open())


def test_unlabelled_samples_count_as_aligned_and_a_repeated_sample_keeps_its_last_label():
    m, model, opt = _auto(10, method="groupdro")
    order = {"labels": None}
    m.labeller.assign = lambda f, lg, t, step=0, index=None: order["labels"]
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
    # one batch with sample 3 twice (draws with replacement): its later row wins; samples 7–9 never seen
    index = torch.tensor([3, 0, 1, 2, 3, 4, 5, 6])
    order["labels"] = torch.tensor([0, 1, 1, 0, 1, 0, 1, 0])
    batch = {"image": torch.randn(8, 6, generator=g), "target": t[index], "bias": torch.full((8,), -1), "index": index}
    m.update(model, batch, opt, AUTOCAST)
    found = m.sampling_cells(t)
    # per sample: 0→1, 1→1, 2→0, 3→1 (last row), 4→0, 5→1, 6→0; 7, 8, 9 unlabelled → their class ("aligned")
    assert found.describe() == cells(t, torch.tensor([1, 1, 0, 1, 0, 1, 0, 1, 0, 1])).describe()
    assert found.describe() == {"t=0,b=0": 4, "t=0,b=1": 1, "t=1,b=1": 5}
    with pytest.raises(ValueError, match="targets"):
        m.sampling_cells(t[:5])
    # the loss's class weights "as drawn" (train.class_balance=weighted_loss): 2 cells of class 0, 1 of class 1
    assert class_weights(found.keys[:, 0], ("a", "b")).tolist() == pytest.approx([0.75, 1.5])


def test_the_labels_travel_in_the_checkpoint_state():
    m, model, opt = _auto(12)
    labels = {"now": torch.arange(12) % 2}
    _hand_labels(m, labels)
    batch = {"image": torch.randn(12, 6), "target": torch.arange(12) % 2, "bias": torch.full((12,), -1), "index": torch.arange(12)}
    m.update(model, batch, opt, AUTOCAST)
    extra = m.extra_state()
    assert torch.equal(extra["sample_labels"], labels["now"])
    fresh, _, _ = _auto(12)
    assert fresh.sampling_cells(batch["target"]) is None  # nothing labelled, step 0
    fresh.load_state_dict(m.state_dict())
    fresh.load_extra_state(extra)
    assert fresh.sampling_cells(batch["target"]).describe() == m.sampling_cells(batch["target"]).describe()
    fresh.load_extra_state({"inner": {}, "labeller": {}})  # a checkpoint of an older version: no table, no error


def test_resumed_pseudo_label_sampling_equals_the_uninterrupted_run(tmp_path):
    """Through the real trainer, GroupDRO with --bias auto: crash after epoch 2's checkpoint,
    resume; epoch 3 draws from the restored labels exactly what the full run drew."""
    from cxrdebias.experiments.config import load_config
    from cxrdebias.models import SimpleConvNet
    from cxrdebias.training.runs import RunDir
    from cxrdebias.training.trainer import Trainer

    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 2, (48,), generator=g)
    b = torch.where(torch.rand(48, generator=g) < 0.85, t, 1 - t)
    x = torch.randn(48, 3, 8, 8, generator=g) * 0.3
    x[:, 1] += b.view(-1, 1, 1).float() * 2  # a strong colour cue of the bias, a weak one of the target
    x[:, 0] += t.view(-1, 1, 1).float() * 0.5
    data = TensorSamples(x, t, b, name="toy")
    cfg = load_config(None, [
        "train.epochs=3", "train.batch_size=8", "train.progress=false", "train.precision=fp32",
        "unsupervised.enabled=true", "unsupervised.warmup_steps=1", "unsupervised.min_aligned=0",
    ])

    def trainer(run):
        torch.manual_seed(0)
        method = build_method("groupdro", {"eta": 0.1}, cfg.unsupervised)
        loader = TensorBatchLoader(data, 8, shuffle=True, seed=1, weights=pseudo_label_weights(method, t))
        return Trainer(SimpleConvNet(2, kernel_size=3), method, loader, cfg.train, run=run, seed=0,
                       fingerprint={"pseudo": "sampling"}, num_classes=2, num_biases=2)

    ref = trainer(RunDir.create(tmp_path / "ref"))
    ref.fit()
    resumed, _ = resume_after_interrupt(trainer, tmp_path / "cut", epoch=2)
    assert_same_tensors(ref.model, resumed.model)
    for k, v in ref.method.state_dict().items():
        assert torch.equal(v, resumed.method.state_dict()[k]), k
    assert torch.equal(ref.method.extra_state()["sample_labels"], resumed.method.extra_state()["sample_labels"])
    full, cut = RunDir(tmp_path / "ref").read_metrics(), RunDir(tmp_path / "cut").read_metrics()
    assert [r["epoch"] for r in cut] == [1, 2, 3]
    assert full[0]["pseudo_bias"]["sampled_cells"] is None  # epoch 1: natural order
    for e in (1, 2):  # epochs 2 and 3 balanced on pseudo cells, the same in both runs
        assert sum(full[e]["pseudo_bias"]["sampled_cells"].values()) == 48
        assert cut[e]["pseudo_bias"] == full[e]["pseudo_bias"]


# --- the CLI and the runner -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_manifest(tmp_path_factory):
    from cxrdebias.data.synthetic import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("pseudo-sampling-data")
    synthesize(root, SynthConfig(seed=5, image_size=40, n_train_patients_per_site=8, n_val_patients_per_site=6, n_test_patients_per_site=4))
    return root / "manifest.csv"


@pytest.mark.parametrize(
    "bias,given,expected",
    [("none", [], "none"), ("auto", [], "none"), ("auto", ["--set", "train.sampling=group_balanced"], "group_balanced"), ("site", [], "group_balanced")],
)
def test_train_keeps_the_shipped_sampling_only_with_true_sites_unless_asked(monkeypatch, capsys, tmp_path, bias, given, expected):
    import cxrdebias.cli.experiments as cli

    got = {}

    def fake_run(cfg, out_dir, **kw):
        got["cfg"] = cfg
        return None, out_dir

    monkeypatch.setattr(cli, "_run", fake_run)
    args = ["train", "--data", tmp_path / "m.csv", "--config", REPO / "configs" / "cxr" / "synthetic.yaml", "--bias", bias, *given]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    assert got["cfg"].train.sampling == expected


def test_groupdro_with_bias_auto_and_pseudo_label_sampling_trains_end_to_end(synth_manifest, tmp_path, monkeypatch, capsys):
    """`train --bias auto --method groupdro --set train.sampling=group_balanced`: GroupDRO gets
    the labeller's groups, epoch 1 runs in the natural order, epoch 2 draws the pseudo cells."""
    out = tmp_path / "run"
    args = [
        "train", "--data", synth_manifest, "--config", REPO / "configs" / "cxr" / "synthetic.yaml", "--bias", "auto",
        "--method", "groupdro", "--out", out, "--epochs", "2", "--image-size", "32", "--set", "model.hidden_dim=8",
        "--set", "train.progress=false", "--set", "unsupervised.min_aligned=0", "--set", "train.sampling=group_balanced",
    ]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    assert "group-balanced sampling on pseudo labels" in err
    res = json.loads((out / "results.json").read_text())
    assert res["method"]["name"] == "groupdro" and res["method"]["bias"] == "auto" and res["method"]["num_groups"] == 4
    assert res["config"]["train"]["sampling"] == "group_balanced"
    sampling = res["train"]["sampling"]
    assert sampling["labels"].startswith("pseudo")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["pseudo_bias"]["sampled_cells"] is None
    assert records[1]["pseudo_bias"]["sampled_cells"] == sampling["cells"]
    n_train = res["data"]["splits"]["train"]
    assert sum(sampling["cells"].values()) == n_train
    # the weighted loss of synthetic.yaml weights the classes as the last epoch drew them
    keys = torch.tensor([[int(p.split("=")[1]) for p in k.split(",")] for k in sampling["cells"]])
    expected = class_weights(keys[:, 0], ("negative", "positive"))
    assert sampling["loss_class_weights"] == pytest.approx(expected.tolist())
