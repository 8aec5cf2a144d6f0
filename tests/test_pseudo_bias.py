"""Unsupervised online debiasing (--bias auto): labellers, agreement metrics, wrapper, CLI."""

import contextlib
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import silhouette_score

from cxrdebias.debias import build_method
from cxrdebias.debias.unsupervised import (
    AttractorLabeller,
    ClusterLabeller,
    FeatureTap,
    GCEHeadLabeller,
    PseudoBiasOptions,
    UnsupervisedBias,
    cosine_silhouette,
    label_agreement,
)
from cxrdebias.errors import ConfigError
from cxrdebias.models.base import ModelOutput
from tests.conftest import adam_context, assert_same_tensors, resume_after_interrupt, run_cli

AUTOCAST = contextlib.nullcontext


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _opts(**kw):
    # the unit tests' TinyNet has no early layer and the warm-up tests want plain CE unless told
    return PseudoBiasOptions(enabled=True, **{"layer": None, "warmup_labels": "none", **kw})


def _ctx(num_samples=8, num_classes=2, num_biases=None):
    return adam_context(num_samples, num_classes, num_biases, lr=1e-2)


class TinyNet(torch.nn.Module):
    def __init__(self, dim, num_classes=2):
        super().__init__()
        self.fc = torch.nn.Linear(dim, num_classes)
        self.feature_dim = dim

    def forward(self, x):
        f = F.normalize(x.flatten(1), dim=1)
        return ModelOutput(self.fc(f), f)


# ---------------------------------------------------------------------------------- attractor
def test_attractor_label_is_nearest_centroid_hand_computed():
    lab = AttractorLabeller(_opts(momentum=0.0))
    lab.setup(2, 3)
    # class means (after L2 normalisation of each sample): (1,0), (0,1), (-1,0)
    feats = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [-1.0, 0.0]])
    targets = torch.tensor([0, 0, 1, 1, 2])
    lab.update(feats, torch.zeros(5, 3), targets, step=0)
    assert torch.allclose(lab.centroids, torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    # cosines to (1,0),(0,1),(-1,0): (0.8,0.6)->0 ; (-0.6,0.8)->1 ; (-0.8,-0.6)->2 ; (0.1,-1)->0
    x = torch.tensor([[0.8, 0.6], [-0.6, 0.8], [-0.8, -0.6], [0.1, -1.0]])
    assert lab.assign(x, torch.zeros(4, 3), torch.tensor([1, 2, 0, 1])).tolist() == [0, 1, 2, 0]


def test_conflicting_sample_near_other_class_centroid_gets_that_class():
    lab = AttractorLabeller(_opts(momentum=0.5))
    lab.setup(3, 2)
    g = torch.Generator().manual_seed(0)
    red = torch.tensor([1.0, 0.0, 0.0])  # the bias direction of class 0
    green = torch.tensor([0.0, 1.0, 0.0])  # the bias direction of class 1
    for step in range(5):
        feats = torch.cat([red + 0.1 * torch.randn(8, 3, generator=g), green + 0.1 * torch.randn(8, 3, generator=g)])
        lab.update(feats, torch.zeros(16, 2), torch.tensor([0] * 8 + [1] * 8), step)
    # a class-1 sample carrying class 0's bias: pseudo-bias 0, flagged as conflicting
    conflicting = (red + torch.tensor([0.0, 0.2, 0.1]))[None]
    label = lab.assign(conflicting, torch.zeros(1, 2), torch.tensor([1]))
    assert label.tolist() == [0]
    assert lab.conflicting(label, torch.tensor([1])).tolist() == [True]


# ---------------------------------------------------------------------------------- cluster
def _two_blobs(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.tensor([1.0, 0.0, 0.0, 0.0]) + 0.05 * torch.randn(n, 4, generator=g)
    b = torch.tensor([0.0, 0.0, 1.0, 0.0]) + 0.05 * torch.randn(n, 4, generator=g)
    return torch.cat([a, b]), torch.tensor([0] * n + [1] * n)


@pytest.mark.parametrize("k", [2, "auto"])
def test_cluster_recovers_two_blobs_within_a_class(k):
    feats, blob = _two_blobs()
    lab = ClusterLabeller(_opts(labeller="cluster", k=k, k_max=4, bank_size=256, refresh_every=1))
    lab.setup(4, 2)
    targets = torch.zeros(len(blob), dtype=torch.long)  # every sample in class 0
    lab.update(feats, torch.zeros(len(blob), 2), targets, step=0)
    labels = lab.assign(feats, torch.zeros(len(blob), 2), targets)
    assert label_agreement(blob, labels)["ari"] == pytest.approx(1.0)
    assert set(labels.tolist()) <= {0, 1, 2, 3} and lab.summary()["k_per_class"][0] == 2
    # the other class has no sample: its labels are c·k + 0 (fallback)
    assert lab.assign(feats[:2], torch.zeros(2, 2), torch.ones(2, dtype=torch.long)).tolist() == [lab.k, lab.k]


def test_cluster_auto_keeps_one_cluster_for_structureless_class():
    g = torch.Generator().manual_seed(1)
    feats = torch.tensor([1.0, 1.0, 1.0]) + 0.01 * torch.randn(60, 3, generator=g)
    lab = ClusterLabeller(_opts(labeller="cluster", k="auto", min_silhouette=0.9))
    lab.setup(3, 2)
    lab.update(feats, torch.zeros(60, 2), torch.zeros(60, dtype=torch.long), 0)
    assert lab.summary()["k_per_class"] == [1, 0]


def test_cosine_silhouette_matches_sklearn():
    feats, blob = _two_blobs(n=15, seed=3)
    labels = blob.clone()
    labels[:3] = 1  # a few wrong ones, so the value is not trivial
    ours = cosine_silhouette(feats, labels)
    assert ours == pytest.approx(silhouette_score(feats.numpy(), labels.numpy(), metric="cosine"), abs=1e-5)


# ---------------------------------------------------------------------------------- GCE head
def test_gce_head_learns_the_easy_bias_feature():
    g = torch.Generator().manual_seed(0)
    n = 400
    bias = torch.randint(0, 2, (n,), generator=g)
    target = torch.where(torch.rand(n, generator=g) < 0.9, bias, 1 - bias)  # 10% conflicting
    x = torch.zeros(n, 3)
    x[:, 0] = (2.0 * bias - 1) * 3  # the bias: easy, linearly separable with a large margin
    x[:, 1] = (2.0 * target - 1) * 0.3 + 0.5 * torch.randn(n, generator=g)  # the target: weak, noisy
    x[:, 2] = 1.0
    conflicting = target != bias

    def bias_share(q):  # share of the conflicting samples on which the head predicts the bias
        torch.manual_seed(0)
        lab = GCEHeadLabeller(_opts(labeller="gce_head", refresh_every=1, q=q))
        lab.setup(3, 2, make_optimizer=lambda p: torch.optim.Adam(p, lr=5e-2))
        order = torch.Generator().manual_seed(1)
        for step in range(100):
            idx = torch.randint(0, n, (64,), generator=order)
            lab.update(x[idx], torch.zeros(64, 2), target[idx], step)
        pred = lab.assign(x, torch.zeros(n, 2), target)
        return float((pred[conflicting] == bias[conflicting]).float().mean())

    gce, ce = bias_share(0.7), bias_share(1e-4)  # q -> 0 is the cross-entropy
    assert gce > 0.9 and gce > ce + 0.1  # GCE sticks to the easy cue longer than CE


# ---------------------------------------------------------------------------------- agreement
def test_agreement_metrics_on_hand_made_labels():
    true = torch.tensor([0, 0, 1, 1, 2, 2, -1])  # -1 = unknown: ignored
    perfect = label_agreement(true, torch.tensor([0, 0, 1, 1, 2, 2, 0]))
    assert perfect["n"] == 6 and perfect["nmi"] == pytest.approx(1) and perfect["ari"] == pytest.approx(1)
    assert perfect["matched_accuracy"] == 1
    permuted = label_agreement(true, torch.tensor([7, 7, 3, 3, 5, 5, 1]))
    assert permuted["nmi"] == pytest.approx(1) and permuted["ari"] == pytest.approx(1) and permuted["matched_accuracy"] == 1
    # hand-computed: pseudo [0,0,1,1,1,2] vs true [0,0,1,1,2,2] -> best matching 0-0,1-1,2-2 = 5/6
    assert label_agreement(true[:6], torch.tensor([0, 0, 1, 1, 1, 2]))["matched_accuracy"] == pytest.approx(5 / 6)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 10, 5000), rng.integers(0, 10, 5000)
    indep = label_agreement(a, b)
    assert indep["nmi"] < 0.01 and abs(indep["ari"]) < 0.01 and indep["matched_accuracy"] < 0.15
    assert label_agreement([-1, -1], [0, 1]) == {"n": 0}


def test_minority_matched_accuracy_looks_at_conflicting_samples():
    targets = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    true = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0])  # one conflicting sample per class
    pseudo = targets.clone()  # "pseudo-bias = target": right on the majority, wrong on both minorities
    res = label_agreement(true, pseudo, targets)
    assert res["matched_accuracy"] == pytest.approx(0.75) and res["n_minority"] == 2
    assert res["minority_matched_accuracy"] == 0


# ---------------------------------------------------------------------------------- wrapper
def _batch(n=16, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.arange(n) % 2
    bias = (target + (torch.rand(n, generator=g) < 0.25).long()) % 2
    return {"image": torch.randn(n, dim, generator=g), "target": target, "bias": bias, "index": torch.arange(n)}


def _wrapped(method="end", **kw):
    m = build_method(method, {"alpha": 1.0, "beta": 1.0} if method == "end" else {}, _opts(**kw))
    model = TinyNet(6)
    m.setup(model, _ctx(num_samples=16))
    return m, model, torch.optim.SGD(model.parameters(), lr=0.1)


def _spy_bias(m):
    """The bias labels the wrapped method's compute_loss receives, one tensor per call."""
    seen = []
    original = m.inner.compute_loss

    def spy(model_, batch, output):
        seen.append(batch["bias"].clone())
        return original(model_, batch, output)

    m.inner.compute_loss = spy
    return seen


def test_warmup_gives_no_bias_labels_then_end_terms_switch_on():
    m, model, opt = _wrapped(warmup_steps=2, refresh_every=1)
    assert isinstance(m, UnsupervisedBias) and m.name == "end" and not m.requires_bias
    logs = [m.update(model, _batch(seed=s), opt, AUTOCAST) for s in range(4)]
    for warm in logs[:2]:  # plain CE: no regulariser, loss == CE
        assert float(warm["pseudo_active"]) == 0 and "R_perp" not in warm
        assert float(warm["loss"]) == pytest.approx(float(warm["ce"]))
    for active in logs[2:]:
        assert float(active["pseudo_active"]) == 1 and float(active["loss"]) > float(active["ce"])


@pytest.mark.parametrize("labeller,stride", [("attractor", 1), ("cluster", 2)])
def test_target_warmup_runs_the_method_with_pseudo_bias_equal_to_target(labeller, stride):
    m, model, opt = _wrapped(labeller=labeller, k=2, bank_size=32, warmup_steps=2, refresh_every=1, warmup_labels="target")
    seen = _spy_bias(m)
    batches = [_batch(seed=s) for s in range(3)]
    logs = [m.update(model, b, opt, AUTOCAST) for b in batches]
    assert len(seen) == 3  # the method runs from the first step
    for b, given in zip(batches[:2], seen[:2], strict=True):  # warm-up: one group per class (the class's first label)
        assert torch.equal(given, b["target"] * stride)
    assert [float(x["pseudo_active"]) for x in logs] == [0.0, 0.0, 1.0]
    assert float(logs[0]["loss"]) > float(logs[0]["ce"])  # EnD's terms already on during warm-up
    # with pseudo-bias = target, R_par has no same-target/different-bias pair
    assert float(logs[0]["R_par"]) == 0.0


def test_own_update_method_gets_target_labels_during_target_warmup():
    m = build_method("lnl", {}, _opts(warmup_steps=5, refresh_every=1, warmup_labels="target"))
    model = TinyNet(6)
    m.setup(model, _ctx(num_samples=16))
    seen = []
    original = m.inner.check_batch
    m.inner.check_batch = lambda batch: (seen.append(batch["bias"].clone()), original(batch))
    b = _batch(seed=0)
    logs = m.update(model, b, torch.optim.SGD(model.parameters(), lr=0.1), AUTOCAST)
    assert float(logs["pseudo_active"]) == 0 and "bias_ce" in logs
    assert len(seen) == 1 and torch.equal(seen[0], b["target"])


@pytest.mark.parametrize("min_aligned,expect_active", [(0.7, [1.0, 0.0, 0.0]), (0.0, [1.0, 1.0, 1.0])])
def test_shortcut_gate_steps_aside_when_the_groups_are_not_the_classes(min_aligned, expect_active):
    m, model, opt = _wrapped(warmup_steps=0, refresh_every=1, min_aligned=min_aligned, gate_momentum=0.5)
    # a labeller that finds groups unrelated to the classes: every sample "attracted elsewhere"
    m.labeller.assign = lambda f, lg, t, step=0, index=None: (t + 1) % 2
    logs = [m.update(model, _batch(seed=s), opt, AUTOCAST) for s in range(3)]
    assert [float(x["pseudo_active"]) for x in logs] == expect_active
    assert float(logs[0]["aligned_share"]) == 0.0  # first statistic taken as is, then EMA
    for x, active in zip(logs, expect_active, strict=True):
        if not active:  # gate closed: a plain cross-entropy step, nothing of EnD
            assert "R_perp" not in x and float(x["loss"]) == pytest.approx(float(x["ce"]))
    pb = m.epoch_metrics()["pseudo_bias"]
    assert pb["aligned_share"] == 0.0 and pb["gate_open"] is (min_aligned == 0.0)


def test_shortcut_gate_also_stops_the_target_warmup():
    m, model, opt = _wrapped(warmup_steps=5, refresh_every=1, warmup_labels="target", gate_momentum=0.5)
    m.labeller.assign = lambda f, lg, t, step=0, index=None: (t + 1) % 2  # groups unrelated to the classes
    logs = [m.update(model, _batch(seed=s), opt, AUTOCAST) for s in range(3)]
    assert "R_perp" in logs[0]  # step 0: no evidence yet, the prior runs
    for x in logs[1:]:  # evidence against a class-correlated bias: plain CE even in warm-up
        assert "R_perp" not in x and float(x["loss"]) == pytest.approx(float(x["ce"]))


def test_shortcut_gate_stays_open_for_aligned_groups_and_reopens():
    m, model, opt = _wrapped(warmup_steps=0, refresh_every=1, min_aligned=0.7, gate_momentum=0.5)
    flip = {"on": True}
    m.labeller.assign = lambda f, lg, t, step=0, index=None: (t + 1) % 2 if flip["on"] else t
    m.update(model, _batch(seed=0), opt, AUTOCAST)  # share 0 → closed
    assert not m.gate_open()
    flip["on"] = False
    shares = [float(m.update(model, _batch(seed=s), opt, AUTOCAST)["aligned_share"]) for s in range(1, 4)]
    assert shares == pytest.approx([0.5, 0.75, 0.875])  # EMA with momentum 0.5 of 0, 1, 1, 1
    assert m.gate_open()


def test_model_accuracy_on_the_samples_called_conflicting_and_aligned_is_logged():
    m, model, opt = _wrapped(warmup_steps=0, refresh_every=1, min_aligned=0.0)
    flagged = {"mask": None}

    def assign(f, lg, t, step=0, index=None):  # the odd-indexed samples called conflicting
        flagged["mask"] = index % 2 == 1
        return torch.where(flagged["mask"], (t + 1) % 2, t)

    m.labeller.assign = assign
    hits = {True: [], False: []}
    original = model.forward

    def spy(x):
        out = original(x)
        right = out.logits.argmax(1) == current["target"]
        hits[True].append(right[current["index"] % 2 == 1])
        hits[False].append(right[current["index"] % 2 == 0])
        return out

    model.forward = spy
    current = {}
    for s in range(3):
        b = _batch(seed=s)
        current.update(target=b["target"], index=b["index"])
        m.update(model, b, opt, AUTOCAST)
    pb = m.epoch_metrics()["pseudo_bias"]
    # the accuracy of each step's forward pass (before its update) on each group, pooled over the epoch
    assert pb["model_accuracy_conflicting"] == pytest.approx(float(torch.cat(hits[True]).float().mean()))
    assert pb["model_accuracy_aligned"] == pytest.approx(float(torch.cat(hits[False]).float().mean()))
    m.labeller.assign = lambda f, lg, t, step=0, index=None: t  # nothing called conflicting
    m.update(model, _batch(seed=5), opt, AUTOCAST)
    pb = m.epoch_metrics()["pseudo_bias"]
    assert math.isnan(pb["model_accuracy_conflicting"]) and 0 <= pb["model_accuracy_aligned"] <= 1


def test_the_accuracies_use_each_step_own_conflicting_call():
    # the cluster labeller's "conflicting" depends on its current majority cluster, which moves
    # between steps: the epoch's numbers must use what each step decided, not a later recomputation
    m, model, opt = _wrapped(warmup_steps=0, refresh_every=1, min_aligned=0.0)
    calls = {"n": 0}

    def conflicting(labels, targets):
        calls["n"] += 1
        return torch.full_like(targets, calls["n"] == 1, dtype=torch.bool)  # step 1: all; later: none

    m.labeller.conflicting = conflicting
    logs = [m.update(model, _batch(seed=s), opt, AUTOCAST) for s in range(2)]
    pb = m.epoch_metrics()["pseudo_bias"]
    assert pb["model_accuracy_conflicting"] == pytest.approx(float(logs[0]["accuracy"]))
    assert pb["model_accuracy_aligned"] == pytest.approx(float(logs[1]["accuracy"]))


def test_a_perfect_labeller_makes_bias_auto_exactly_supervised_end():
    """With labels equal to the true bias up to a renaming, --bias auto is supervised EnD, step for step."""
    torch.manual_seed(0)
    auto, model_auto, opt_auto = _wrapped(warmup_steps=0, refresh_every=1, min_aligned=0.0)
    sup = build_method("end", {"alpha": 1.0, "beta": 1.0})
    model_sup = TinyNet(6)
    model_sup.load_state_dict(model_auto.state_dict())
    sup.setup(model_sup, _ctx(num_samples=16, num_biases=2))
    opt_sup = torch.optim.SGD(model_sup.parameters(), lr=0.1)
    current = {}
    auto.labeller.assign = lambda f, lg, t, step=0, index=None: 1 - current["bias"]  # bias names swapped
    for s in range(5):
        b = _batch(seed=s)
        current["bias"] = b["bias"]
        la = auto.update(model_auto, b, opt_auto, AUTOCAST)
        ls = sup.update(model_sup, b, opt_sup, AUTOCAST)
        assert float(la["pseudo_active"]) == 1.0
        for key in ("loss", "R_perp", "R_par"):
            assert float(la[key]) == pytest.approx(float(ls[key]), abs=1e-6), (s, key)
    for pa, ps in zip(model_auto.parameters(), model_sup.parameters(), strict=True):
        torch.testing.assert_close(pa, ps, rtol=0, atol=1e-6)


def test_true_bias_never_reaches_the_method():
    m, model, opt = _wrapped(warmup_steps=0)
    seen = _spy_bias(m)
    b = _batch()
    b["bias"] = torch.full_like(b["bias"], -1)  # unknown bias: fine with --bias auto
    m.update(model, b, opt, AUTOCAST)
    assert len(seen) == 1 and bool((seen[0] >= 0).all()) and bool((seen[0] < m.labeller.num_labels).all())
    assert m.epoch_metrics()["pseudo_bias"]["n"] == 0  # no true label to compare with


def test_reweight_adds_the_conflicting_cross_entropy():
    m, model, opt = _wrapped(method="vanilla", warmup_steps=0, reweight=3.0)
    torch.manual_seed(0)
    b = _batch()
    out = model(b["image"])
    m.labeller.update(out.features, out.logits, b["target"], 0)
    pseudo = m.labeller.assign(out.features, out.logits, b["target"])
    conflict = m.labeller.conflicting(pseudo, b["target"]).float()
    ce = F.cross_entropy(out.logits, b["target"], reduction="none")
    assert 0 < conflict.sum() < len(conflict)
    expected = (ce.mean() + 2.0 * (conflict * ce).mean()).detach()
    m.labeller.last_refresh.fill_(-1)  # recompute the same snapshot inside update
    m.labeller.seen.zero_()
    logs = m.update(model, b, opt, AUTOCAST)
    assert float(logs["loss"]) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("labeller,source", [("attractor", "ema"), ("cluster", "live"), ("gce_head", "frozen")])
def test_state_dict_round_trip(labeller, source):
    kw = {"labeller": labeller, "source": source, "warmup_steps": 1, "refresh_every": 1, "bank_size": 32}
    m, model, opt = _wrapped(**kw)
    for s in range(3):
        m.update(model, _batch(seed=s), opt, AUTOCAST)
    state, extra = m.state_dict(), m.extra_state()
    assert int(state["step"]) == 3 and any(k.startswith("labeller.") for k in state)
    m2, _, _ = _wrapped(**kw)
    m2.load_state_dict(state)
    m2.load_extra_state(extra)
    b = _batch(seed=9)
    out = model(b["image"])
    args = (out.features, out.logits, b["target"], 3)
    assert torch.equal(m.labeller.assign(*args), m2.labeller.assign(*args))
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k


def test_methods_that_cannot_take_pseudo_labels_are_refused_clearly():
    for name in ("lff", "rebias"):
        with pytest.raises(ConfigError, match="never uses bias labels"):
            build_method(name, {}, _opts())
    with pytest.raises(ConfigError, match="reweight"):
        build_method("lnl", {}, _opts(reweight=2.0))
    assert isinstance(build_method("lnl", {}, _opts()), UnsupervisedBias)
    assert isinstance(build_method("groupdro", {}, _opts()), UnsupervisedBias)
    assert isinstance(build_method("vanilla", {}, _opts()), UnsupervisedBias)  # observes / re-weights
    assert not isinstance(build_method("end", {}, PseudoBiasOptions()), UnsupervisedBias)  # not enabled


@pytest.mark.parametrize("method", ["lnl", "blindeye"])
def test_own_update_methods_get_pseudo_labels_through_with_bias(method):
    m = build_method(method, {}, _opts(warmup_steps=1, refresh_every=1))
    model = TinyNet(6)
    m.setup(model, _ctx(num_samples=16, num_biases=7))  # the dataset's count is replaced
    assert m.inner.bias_head.num_biases == m.labeller.num_labels == 2
    seen = []
    original = m.inner.check_batch
    m.inner.check_batch = lambda batch: (seen.append(batch["bias"].clone()), original(batch))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    warm = m.update(model, _batch(seed=0), opt, AUTOCAST)
    assert float(warm["pseudo_active"]) == 0 and "bias_ce" not in warm and seen == []  # warm-up: plain CE
    logs = m.update(model, _batch(seed=1), opt, AUTOCAST)
    assert float(logs["pseudo_active"]) == 1 and "bias_ce" in logs and int(m.step) == 2
    assert len(seen) == 1 and bool(((seen[0] >= 0) & (seen[0] < 2)).all())  # pseudo labels, never -1/true
    assert m.epoch_metrics()["pseudo_bias"]["n"] == 32  # one labelling per step
    batch = _batch(seed=2)
    assert m.inner.with_bias(batch, model(batch["image"])) is batch  # the source is cleared after the step


def test_wrapper_answers_the_ddp_question_for_its_method():
    assert build_method("lnl", {}, _opts()).needs_unused_parameter_search()  # LNL's second step
    assert not build_method("end", {}, _opts()).needs_unused_parameter_search()
    assert build_method("lnl").needs_unused_parameter_search() and not build_method("end").needs_unused_parameter_search()


def test_groupdro_sees_pseudo_bias_groups():
    m, model, opt = _wrapped(method="groupdro", labeller="cluster", k=2, warmup_steps=0, bank_size=64)
    assert m.inner.num_biases == m.labeller.num_labels == 4
    # class-specific cluster labels: q lives on the 4 reachable (target, label) cells of the 2 × 4 grid
    assert torch.equal(m.inner.allowed.view(2, 4), m.labeller.possible_groups())
    assert m.inner.q.view(2, 4)[~m.labeller.possible_groups()].sum() == 0
    seen = _spy_bias(m)
    m.update(model, _batch(), opt, AUTOCAST)
    assert len(seen) == 1 and bool((seen[0] // 2 == _batch()["target"]).all())  # class·k + cluster
    assert float(m.inner.q.sum()) == pytest.approx(1.0) and m.inner.q.view(2, 4)[~m.labeller.possible_groups()].sum() == 0


def test_groupdro_with_bias_auto_gets_the_pseudo_labels_not_the_true_ones():
    """--bias auto --method groupdro: the groups are (target, pseudo bias); the true labels, given
    in the batch, never reach GroupDRO, and its q follows the pseudo groups' losses."""
    m = build_method("groupdro", {"eta": 1.0}, _opts(warmup_steps=0, min_aligned=0.0))
    model = TinyNet(6)
    m.setup(model, _ctx(num_samples=16, num_biases=5))  # the dataset's count is replaced by the labeller's
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert m.inner.num_biases == m.labeller.num_labels == 2 and m.inner.q.numel() == 4
    seen = _spy_bias(m)
    made = []

    def pseudo(f, lg, t, step=0, index=None):  # hand-made: every 4th sample "conflicting", unlike the true bias
        made.append(torch.where(index % 4 == 0, 1 - t, t))
        return made[-1]

    m.labeller.assign = pseudo
    for s in range(3):
        b = _batch(seed=s)
        logs = m.update(model, b, opt, AUTOCAST)
        assert torch.equal(seen[-1], made[-1]) and not torch.equal(seen[-1], b["bias"])
        assert float(logs["pseudo_active"]) == 1 and "worst_group_loss" in logs
    # q moved on the pseudo groups only: all four (target, pseudo) cells are present in every batch
    assert not torch.allclose(m.inner.q, torch.full((4,), 0.25)) and float(m.inner.q.sum()) == pytest.approx(1.0)


class TwoStageNet(torch.nn.Module):
    """An 'early' layer that sees the bias cue and a bottleneck that sees only the target cue."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(4, 4, 1, bias=False)
        with torch.no_grad():
            self.stem.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
        self.body = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
        self.fc = torch.nn.Linear(2, 2)
        self.feature_dim = 2

    def forward(self, x):
        e = self.stem(x)  # N × 4 × 1 × 1: channels 0-1 the bias, 2-3 the target
        self.body(e.flatten(1))  # a module after the tap (unused by the output)
        f = F.normalize(e.flatten(1)[:, 2:], dim=1)
        return ModelOutput(self.fc(f), f)


def test_feature_tap_reads_the_named_layer_pooled_and_finds_its_width():
    from cxrdebias.models.simple_conv import SimpleConvNet

    net = SimpleConvNet(10, kernel_size=3)
    for name, width in (("extractor.0", 16), ("extractor.2", 16), ("extractor.5", 32), ("extractor", 128)):
        tap = FeatureTap(net, name)
        x = torch.randn(3, 3, 8, 8)
        with torch.no_grad():
            expected = net.extractor[: int(name.split(".")[1]) + 1](x) if "." in name else net.extractor(x)
        net(x)  # the last forward pass is the one the tap holds
        got = tap.take()
        assert tap.width == width and got.shape == (3, width)
        torch.testing.assert_close(got, expected.float().mean(dim=(2, 3)))
        with pytest.raises(RuntimeError, match="did not run"):
            tap.take()  # one value per forward pass
        tap.remove()
    with pytest.raises(ConfigError, match="no module of that name.*extractor"):
        FeatureTap(net, "encoder.3")
    with pytest.raises(ConfigError, match="does not name an early layer"):
        FeatureTap(TinyNet(4), "early")


@pytest.mark.parametrize("arch,in_channels,width", [("simple_conv", 3, 16), ("densenet121", 1, 64), ("resnet18", 3, 64)])
def test_every_model_names_an_early_layer_for_the_labeller(arch, in_channels, width):
    from cxrdebias.config import ModelConfig
    from cxrdebias.models import build_model

    net = build_model(ModelConfig(arch=arch), 2, in_channels=in_channels)
    tap = FeatureTap(net, "early")
    net.eval()(torch.randn(2, in_channels, 32, 32))
    assert tap.name == net.early_layer and tap.width == width and tap.take().shape == (2, width)


def test_labeller_on_an_early_layer_sees_a_bias_the_bottleneck_does_not():
    g = torch.Generator().manual_seed(0)
    n = 64
    target = torch.arange(n) % 2
    bias = target.clone()
    bias[:6] = 1 - bias[:6]  # 6 conflicting samples
    x = torch.zeros(n, 4, 1, 1)
    x[torch.arange(n), bias, 0, 0] = 2.0  # the bias cue, one-hot and the stronger one (as colour is)
    x[torch.arange(n), 2 + target, 0, 0] = 1.0  # the target cue
    x = x + 0.05 * torch.randn(x.shape, generator=g)
    batch = {"image": x, "target": target, "bias": bias, "index": torch.arange(n)}
    found = {}
    for layer in (None, "stem"):
        m = build_method("end", {"alpha": 1.0, "beta": 1.0}, _opts(warmup_steps=0, refresh_every=1, layer=layer, momentum=0.0))
        model = TwoStageNet()
        m.setup(model, _ctx(num_samples=n))
        assert m.labeller.feature_dim == (2 if layer is None else 4)
        m.update(model, batch, torch.optim.SGD(model.parameters(), lr=0.0), AUTOCAST)
        m.update(model, batch, torch.optim.SGD(model.parameters(), lr=0.0), AUTOCAST)  # second step: refreshed centroids
        m.epoch_metrics()
        out = model(x)
        feats = m._tap.take() if layer else out.features
        found[layer] = m.labeller.assign(feats, out.logits, target)
    assert torch.equal(found[None], target)  # the bottleneck has no bias: every sample looks aligned
    assert torch.equal(found["stem"], bias)  # the early layer recovers it, conflicting samples included


# ---------------------------------------------------------------------------------- end to end
def _tiny(fake_mnist, out, *extra):
    return [
        "reproduce", "biased-mnist", "--data-root", str(fake_mnist), "--rho", "0.99", "--epochs", "2",
        "--out", str(out), "--set", "train.batch_size=64", "--set", "train.progress=false",
        "--set", "model.kernel_size=3", "--set", "data.limit_train=128", "--set", "data.limit_test=64",
        "--set", "unsupervised.warmup_steps=1", "--set", "unsupervised.refresh_every=1", *extra,
    ]


def test_bias_auto_run_logs_agreement_every_epoch_and_analyze_bias(fake_mnist, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(_tiny(fake_mnist, out, "--method", "end", "--bias", "auto", "--labeller", "cluster"), monkeypatch, capsys)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["method"]["bias"] == "auto" and res["method"]["unsupervised"]["labeller"] == "cluster"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert "pseudo_bias nmi" in err  # shown in the epoch line too
    for r in records:
        pb = r["pseudo_bias"]
        assert pb["n"] > 0 and {"nmi", "ari", "matched_accuracy", "minority_matched_accuracy"} <= set(pb)

    code, stdout, err = run_cli(["analyze-bias", str(out)], monkeypatch, capsys)
    assert code == 0, err
    png = out / "analysis" / "bottleneck.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "analysis" / "agreement.json").read_text())
    assert [r["epoch"] for r in report["per_epoch"]] == [1, 2] and "cluster labeller" in report["pseudo_labels_from"]
    assert report["split_agreement"]["n"] > 0
    md = (out / "analysis" / "agreement.md").read_text()
    assert "| NMI |" in md and md.count("\n| ") >= 4
    assert "NMI" in stdout
    # nothing is overwritten without --force
    code, _, err = run_cli(["analyze-bias", str(out)], monkeypatch, capsys)
    assert code == 2 and "--force" in err


def test_bias_auto_on_an_early_layer_trains_and_analyze_bias_uses_that_layer(fake_mnist, tmp_path, monkeypatch, capsys):
    out = tmp_path / "early"
    extra = ("--method", "end", "--bias", "auto", "--set", "unsupervised.layer=early", "--set", "unsupervised.warmup_labels=target")
    code, _, err = run_cli(_tiny(fake_mnist, out, *extra), monkeypatch, capsys)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["method"]["unsupervised"]["layer"] == "early"
    assert all(json.loads(line)["pseudo_bias"]["n"] > 0 for line in (out / "metrics.jsonl").read_text().splitlines())
    code, _, err = run_cli(["analyze-bias", str(out)], monkeypatch, capsys)
    assert code == 0, err
    report = json.loads((out / "analysis" / "agreement.json").read_text())
    assert "attractor labeller" in report["pseudo_labels_from"] and report["split_agreement"]["n"] > 0
    code, _, err = run_cli(_tiny(fake_mnist, tmp_path / "bad", "--method", "end", "--bias", "auto", "--set", "unsupervised.layer=nope"), monkeypatch, capsys)
    assert code == 2 and "unsupervised.layer='nope'" in err and "Traceback" not in err


def test_analyze_bias_on_a_supervised_run_fits_an_attractor(fake_mnist, tmp_path, monkeypatch, capsys):
    out = tmp_path / "vanilla"
    code, _, err = run_cli(_tiny(fake_mnist, out, "--method", "vanilla", "--epochs", "1"), monkeypatch, capsys)
    assert code == 0, err
    code, stdout, err = run_cli(["analyze-bias", str(out), "--split", "unbiased"], monkeypatch, capsys)
    assert code == 0, err
    report = json.loads((out / "analysis" / "agreement.json").read_text())
    assert report["per_epoch"] == [] and "attractor fitted" in report["pseudo_labels_from"]


def test_default_run_name_marks_bias_auto():
    from cxrdebias.experiments.config import load_config
    from cxrdebias.experiments.runner import default_run_name

    assert "-end-auto-seed42-" in default_run_name(load_config(None, ["method.name=end", "unsupervised.enabled=true"]))
    assert "-end-seed42-" in default_run_name(load_config(None, ["method.name=end"]))


def test_labeller_without_bias_auto_is_refused(fake_mnist, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(_tiny(fake_mnist, tmp_path / "r", "--method", "end", "--labeller", "cluster"), monkeypatch, capsys)
    assert code == 2 and "--bias auto" in err and "Traceback" not in err
    code, _, err = run_cli(_tiny(fake_mnist, tmp_path / "r", "--bias", "auto", "--labeller", "kmeans"), monkeypatch, capsys)
    assert code == 2 and "unsupervised.labeller" in err
    code, _, err = run_cli(_tiny(fake_mnist, tmp_path / "r", "--bias", "gender"), monkeypatch, capsys)
    assert code == 2 and "expected colour or auto" in err


def test_bias_auto_with_lff_is_a_one_line_error(fake_mnist, tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    code, _, err = run_cli(_tiny(fake_mnist, out, "--method", "lff", "--bias", "auto"), monkeypatch, capsys)
    assert code == 2 and "never uses bias labels" in err and "Traceback" not in err
    assert not out.exists()


def test_cxr_train_with_bias_auto(cxr_manifest, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cxr"
    args = [
        "train", "--data", str(cxr_manifest), "--bias", "auto", "--method", "end", "--out", str(out),
        "--epochs", "1", "--image-size", "32", "--set", "train.progress=false", "--set", "train.batch_size=32",
        "--set", "model.hidden_dim=16",
    ]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["bias"] == "auto" and res["config"]["data"]["bias"] == "site"  # true sites: agreement metrics only
    # configs/cxr/default.yaml: no target-label warm-up on CXR (the package default is 10 steps)
    assert res["config"]["unsupervised"]["warmup_steps"] == 0
    assert PseudoBiasOptions().warmup_steps == 10
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["pseudo_bias"]["n"] == res["data"]["splits"]["train"] and "nmi" in record["pseudo_bias"]
    assert record["pseudo_bias"]["labels_used"] == 1  # pseudo labels in use within the first epoch


@pytest.mark.parametrize("labeller", ["cluster", "gce_head"])
def test_resume_of_a_bias_auto_run_is_exact(labeller, tmp_path):
    from cxrdebias.data.base import TensorBatchLoader
    from cxrdebias.experiments.config import load_config
    from cxrdebias.models import SimpleConvNet
    from cxrdebias.training.device import seed_everything
    from cxrdebias.training.runs import RunDir
    from cxrdebias.training.trainer import Trainer
    from tests.test_train import _data

    def trainer(run):
        cfg = load_config(None, [
            "train.epochs=2", "train.batch_size=32", "train.progress=false", "train.precision=fp32",
            "unsupervised.enabled=true", f"unsupervised.labeller={labeller}", "unsupervised.warmup_steps=2",
            "unsupervised.refresh_every=2", "unsupervised.source=ema", "unsupervised.bank_size=64",
        ])
        seed_everything(0)
        model = SimpleConvNet(3, kernel_size=3, last_activation="tanh")
        method = build_method("end", {"alpha": 0.5, "beta": 0.5}, cfg.unsupervised)
        loader = TensorBatchLoader(_data(), 32, shuffle=True, seed=1)
        return Trainer(model, method, loader, cfg.train, run=run, seed=0,
                       fingerprint={"labeller": labeller}, num_classes=3, num_biases=3)

    ref = trainer(RunDir.create(tmp_path / "ref"))
    ref.fit()
    resumed, _ = resume_after_interrupt(trainer, tmp_path / "cut")
    assert_same_tensors(ref.model, resumed.model)
    for k, v in ref.method.state_dict().items():
        assert torch.equal(v, resumed.method.state_dict()[k]), k
    epochs = RunDir(tmp_path / "cut").read_metrics()
    assert [r["epoch"] for r in epochs] == [1, 2] and all("pseudo_bias" in r for r in epochs)
    assert epochs[1]["pseudo_bias"] == RunDir(tmp_path / "ref").read_metrics()[1]["pseudo_bias"]


def test_configs_saved_with_the_retired_gate_option_at_its_off_value_still_load():
    from pydantic import ValidationError

    assert PseudoBiasOptions.model_validate({"max_conflict_accuracy": 1.0, "labeller": "gce_head"}) == PseudoBiasOptions(labeller="gce_head")
    with pytest.raises(ValidationError, match="max_conflict_accuracy=0.5: this gate condition was removed"):
        PseudoBiasOptions.model_validate({"max_conflict_accuracy": 0.5})
