"""Bias discovery for local cues (issue 23): the ``errors`` labeller (per-sample EMA of the early
model's correctness, JTT/LfF-style, online) and the grid/max pooling of the tapped layer."""

import contextlib

import pytest
import torch

from cxrdebias.debias import build_method
from cxrdebias.debias.unsupervised import ErrorsLabeller, FeatureTap
from cxrdebias.errors import ConfigError
from tests.test_pseudo_bias import TinyNet, _batch, _ctx, _opts, _spy_bias, _wrapped

AUTOCAST = contextlib.nullcontext
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _labeller(n=4, classes=2, **kw):
    lab = ErrorsLabeller(_opts(labeller="errors", **{"warmup_steps": 2, "ema": 0.5, **kw}))
    lab.setup(3, classes, n)
    return lab


def _logits_for(pred, classes=2):
    return torch.nn.functional.one_hot(torch.tensor(pred), classes).float()


def test_ema_of_correctness_hand_computed_and_frozen_after_warmup():
    lab = _labeller()
    t, idx, f = torch.tensor([0, 0, 1, 1]), torch.arange(4), torch.zeros(4, 3)
    # step 0: predictions 0,1,1,0 → correct 1,0,1,0 (the first visit sets the EMA)
    lab.assign(f, _logits_for([0, 1, 1, 0]), t, step=0, index=idx)
    assert lab.soft_votes[:, 0].tolist() == [1.0, 0.0, 0.0, 1.0]
    # step 1: predictions 1,1,1,1 → v ← 0.5·v + 0.5·onehot: P(class 0) = 0.5, 0, 0, 0.5
    labels = lab.assign(f, _logits_for([1, 1, 1, 1]), t, step=1, index=idx)
    assert lab.soft_votes[:, 0].tolist() == [0.5, 0.0, 0.0, 0.5]
    # correctness EMA (the target's column): 0.5, 0, 1, 0.5 ≥ 0.5 → aligned, except sample 1
    assert labels.tolist() == [0, 1, 1, 1]
    assert lab.conflicting(labels, t).tolist() == [False, True, False, False]
    # step 2 = end of warm-up: frozen, the same labels whatever the model now says
    frozen = lab.soft_votes.clone()
    assert lab.assign(f, _logits_for([0, 0, 0, 0]), t, step=2, index=idx).tolist() == [0, 1, 1, 1]
    assert torch.equal(lab.soft_votes, frozen)


def test_wrong_sample_gets_the_class_the_early_model_voted_for_most():
    lab = _labeller(n=2, classes=4, warmup_steps=5)
    t, idx, f = torch.tensor([0, 1]), torch.arange(2), torch.zeros(2, 3)
    for pred in ([2, 1], [3, 3], [3, 3]):  # sample 0 votes 2, 3, 3: EMA 0.25 on 2, 0.75 on 3
        labels = lab.assign(f, _logits_for(pred, 4), t, step=0, index=idx)
    torch.testing.assert_close(lab.soft_votes[0], torch.tensor([0.0, 0.0, 0.25, 0.75]))
    # sample 1: correct then wrong twice: P(1) = 0.25 < 0.5 → conflicting, attracted to 3
    assert labels.tolist() == [3, 3]


def test_unseen_sample_is_aligned_and_no_index_uses_current_errors():
    lab = _labeller()
    f = torch.zeros(2, 3)
    lab.assign(f, _logits_for([1, 1]), torch.tensor([0, 0]), step=0, index=torch.tensor([0, 1]))
    # samples 2 and 3 were never seen in warm-up: bias-aligned (their own class)
    assert lab.assign(f, _logits_for([0, 0]), torch.tensor([1, 1]), step=3, index=torch.tensor([2, 3])).tolist() == [1, 1]
    # another split (no index): the label is the current prediction where it is wrong
    assert lab.assign(f, _logits_for([1, 0]), torch.tensor([0, 0]), step=3).tolist() == [1, 0]


def test_threshold_and_bad_settings():
    lab = _labeller(easy_threshold=0.75)
    t, idx, f = torch.tensor([0, 0, 0, 0]), torch.arange(4), torch.zeros(4, 3)
    lab.assign(f, _logits_for([0, 0, 1, 1]), t, step=0, index=idx)
    labels = lab.assign(f, _logits_for([0, 1, 0, 1]), t, step=1, index=idx)  # correctness 1, .5, .5, 0
    assert labels.tolist() == [0, 1, 1, 1]
    with pytest.raises(ConfigError, match="warmup_steps"):
        _labeller(warmup_steps=0)
    with pytest.raises(ConfigError, match="source=live or frozen"):
        _labeller(source="ema")


def test_groupdro_gets_target_during_warmup_then_the_frozen_error_groups():
    m, model, opt = _wrapped("groupdro", labeller="errors", warmup_steps=2, warmup_labels="target", min_aligned=0.0)
    assert m.inner.q.numel() == 4  # (target × pseudo-bias) in class space
    seen = _spy_bias(m)
    for s in range(2):
        m.update(model, _batch(seed=s), opt, AUTOCAST)
    votes = m.labeller.soft_votes.clone()
    b = _batch(seed=5)
    m.update(model, b, opt, AUTOCAST)
    assert torch.equal(seen[0], _batch(seed=0)["target"])  # warm-up prior
    correct = votes.gather(1, b["target"][:, None]).squeeze(1) >= 0.5
    assert torch.equal(seen[-1], torch.where(correct, b["target"], 1 - b["target"]))
    assert torch.equal(m.labeller.soft_votes, votes)  # frozen after warm-up


def test_state_round_trip_keeps_the_votes():
    kw = {"labeller": "errors", "warmup_steps": 3, "ema": 0.6}
    m, model, opt = _wrapped(**kw)
    for s in range(2):
        m.update(model, _batch(seed=s), opt, AUTOCAST)
    state, extra = m.state_dict(), m.extra_state()
    assert bool(m.labeller.soft_voted.all()) and "labeller.soft_votes" in state
    m2, _, _ = _wrapped(**kw)
    m2.load_state_dict(state)
    m2.load_extra_state(extra)
    for k, v in state.items():
        assert torch.equal(v, m2.state_dict()[k]), k
    b = _batch(seed=7)
    out = model(b["image"])
    args = (out.features, out.logits, b["target"], 5)
    assert torch.equal(m.labeller.assign(*args, index=b["index"]), m2.labeller.assign(*args, index=b["index"]))


def test_errors_labeller_builds_through_build_method():
    m = build_method("end", {"alpha": 1.0, "beta": 1.0}, _opts(labeller="errors"))
    m.setup(TinyNet(6), _ctx(num_samples=16))
    assert isinstance(m.labeller, ErrorsLabeller) and m.labeller.soft_votes.shape == (16, 2)


def test_grid_max_pool_keeps_where_a_local_cue_is():
    from cxrdebias.models.simple_conv import SimpleConvNet

    net = SimpleConvNet(10, kernel_size=3)
    tap = FeatureTap(net, "extractor.2", pool="max", grid=2)
    assert tap.width == 16 * 4
    x = torch.randn(2, 3, 8, 8)
    net(x)
    got = tap.take()
    with torch.no_grad():
        e = net.extractor[:3](x)
    # channel c, region (row, col) = max over that quarter of the map
    assert got.shape == (2, 64)
    torch.testing.assert_close(got[:, 0 * 4 + 1], e[:, 0, :4, 4:].amax(dim=(1, 2)))
    torch.testing.assert_close(got[:, 5 * 4 + 2], e[:, 5, 4:, :4].amax(dim=(1, 2)))
    tap.remove()
    flat = FeatureTap(net, "extractor.2", pool="max")
    net(x)
    torch.testing.assert_close(flat.take(), e.amax(dim=(2, 3)))
    with pytest.raises(ConfigError, match="layer_pool"):
        FeatureTap(net, "extractor.2", pool="median")


@pytest.mark.parametrize("extra,name", [
    (("--labeller", "errors", "--set", "unsupervised.warmup_steps=2"), "errors"),
    (("--labeller", "gce_head", "--set", "unsupervised.layer_pool=max", "--set", "unsupervised.layer_grid=2"), "gce_head"),
])
def test_local_cue_labellers_train_on_the_patch_benchmark_and_analyze_bias(fake_mnist, tmp_path, monkeypatch, capsys, extra, name):
    import json

    from tests.conftest import run_cli
    from tests.test_pseudo_bias import _tiny

    out = tmp_path / name
    args = _tiny(fake_mnist, out, "--method", "groupdro", "--bias", "auto", "--set", "data.bias_kind=patch", *extra)
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["pseudo_bias"]["labeller"] == name and r["pseudo_bias"]["n"] > 0 for r in records)
    code, _, err = run_cli(["analyze-bias", str(out)], monkeypatch, capsys)
    assert code == 0, err
    report = json.loads((out / "analysis" / "agreement.json").read_text())
    assert f"{name} labeller" in report["pseudo_labels_from"] and report["split_agreement"]["n"] > 0
