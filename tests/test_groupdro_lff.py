"""Group DRO and LfF: hand-computed maths, properties, training steps, checkpoint round trips."""

import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from cxrdebias.debias.groupdro import (
    GroupDRO,
    GroupDROOptions,
    group_ids,
    group_losses,
    update_group_weights,
)
from cxrdebias.debias.lff import (
    LfF,
    LfFOptions,
    class_max,
    generalized_cross_entropy,
    relative_difficulty,
)
from cxrdebias.models import SimpleConvNet
from cxrdebias.models.base import ModelOutput
from tests.conftest import adam_context

AUTOCAST = contextlib.nullcontext


def _ctx(num_samples=8, num_classes=2, num_biases=2, build_model=None, lr=1e-2, step=None):
    return adam_context(num_samples, num_classes, num_biases, lr=lr, lr_step=step, build_model=build_model)


def _image_batch(n=8, num_classes=2, num_biases=2, seed=0, size=12):
    g = torch.Generator().manual_seed(seed)
    target = torch.arange(n) % num_classes
    bias = (target + (torch.rand(n, generator=g) < 0.25).long()) % num_biases
    image = torch.randn(n, 3, size, size, generator=g)
    image[:, 0] += target.view(-1, 1, 1).float()
    return {"image": image, "target": target, "bias": bias, "index": torch.arange(n)}


class TinyNet(nn.Module):
    """A linear classifier returning ModelOutput (fast stand-in for a backbone)."""

    def __init__(self, dim, num_classes=2):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)
        self.feature_dim = dim

    def forward(self, x):
        f = x.flatten(1)
        return ModelOutput(self.fc(f), f)


#: tiny tensors: one thread is faster (and immune to a busy machine)
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


# ============================================================================ Group DRO


def test_group_ids_and_group_losses_hand_batch():
    assert group_ids(torch.tensor([0, 1, 1, 2]), torch.tensor([2, 0, 1, 2]), 3).tolist() == [2, 3, 4, 8]
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0])
    stats = group_losses(losses, torch.tensor([0, 0, 2, 2, 2]), 4)
    assert stats.count.tolist() == [2, 0, 3, 0]
    assert stats.loss.tolist() == pytest.approx([1.5, 0.0, 13 / 3, 0.0])


def test_group_losses_match_loop_and_are_differentiable():
    g = torch.Generator().manual_seed(1)
    losses = torch.rand(30, generator=g, dtype=torch.float64, requires_grad=True)
    groups = torch.randint(0, 6, (30,), generator=g)
    stats = group_losses(losses, groups, 7)
    for k in range(7):
        members = losses[groups == k]
        assert stats.count[k].item() == len(members)
        assert stats.loss[k].item() == pytest.approx(members.mean().item() if len(members) else 0.0)
    stats.loss.sum().backward()
    counts = torch.bincount(groups, minlength=7).double()
    assert torch.allclose(losses.grad, 1 / counts[groups])


def test_one_weight_step_hand_values_all_groups_present():
    q = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    new = update_group_weights(q, losses, torch.ones(4, dtype=torch.bool), eta=0.5)
    raw = [0.1 * math.exp(0.5), 0.2 * math.exp(1.0), 0.3 * math.exp(1.5), 0.4 * math.exp(2.0)]
    assert new.tolist() == pytest.approx([r / sum(raw) for r in raw], rel=1e-12)
    assert q.tolist() == [0.1, 0.2, 0.3, 0.4]  # input untouched


def test_one_weight_step_absent_groups_keep_their_weight():
    q = torch.full((4,), 0.25, dtype=torch.float64)
    losses = torch.tensor([1.5, 0.0, 13 / 3, 0.0], dtype=torch.float64)
    present = torch.tensor([True, False, True, False])
    new = update_group_weights(q, losses, present, eta=0.1)
    a, b = math.exp(0.15), math.exp(0.1 * 13 / 3)
    # the present groups share their previous mass 0.5 in proportion to q·exp(η ℓ)
    assert new.tolist() == pytest.approx([0.5 * a / (a + b), 0.25, 0.5 * b / (a + b), 0.25], rel=1e-12)


def test_weights_stay_a_distribution_and_absent_groups_are_fixed():
    g = torch.Generator().manual_seed(0)
    q = torch.full((6,), 1 / 6)
    for _ in range(200):
        present = torch.rand(6, generator=g) < 0.5
        losses = torch.rand(6, generator=g) * 5
        new = update_group_weights(q, losses, present, eta=0.3)
        assert (new >= 0).all() and new.sum().item() == pytest.approx(1.0, abs=1e-5)
        assert torch.equal(new[~present], q[~present])
        q = new
    # nothing present: unchanged
    assert torch.equal(update_group_weights(q, losses, torch.zeros(6, dtype=torch.bool), 0.3), q)


def test_weights_move_to_the_highest_loss_group_without_overflow():
    q = torch.full((3,), 1 / 3)
    losses = torch.tensor([0.5, 2.0, 1.0])
    history = [q[1].item()]
    for _ in range(50):
        q = update_group_weights(q, losses, torch.ones(3, dtype=torch.bool), eta=0.1)
        history.append(q[1].item())
    assert all(b > a for a, b in zip(history, history[1:], strict=False))
    assert q.argmax().item() == 1 and q[1].item() > 0.95
    # a huge η·ℓ would overflow exp() in a naive implementation
    big = update_group_weights(torch.full((3,), 1 / 3), torch.tensor([500.0, 900.0, 0.0]), torch.ones(3, dtype=torch.bool), eta=10.0)
    assert torch.isfinite(big).all() and big.tolist() == pytest.approx([0.0, 1.0, 0.0])


def test_groupdro_compute_loss_hand_values():
    m = GroupDRO(GroupDROOptions(eta=0.2))
    m.setup(None, _ctx(num_classes=2, num_biases=2))
    assert m.q.tolist() == pytest.approx([0.25] * 4)
    # groups: (0,0)→0 twice, (1,0)→2 once; groups 1 and 3 absent
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    batch = {"target": torch.tensor([0, 0, 1]), "bias": torch.tensor([0, 0, 0]), "index": torch.arange(3)}
    loss, logs = m.compute_loss(None, batch, ModelOutput(logits, logits))
    l0 = (math.log(2) + math.log(1 + math.exp(-2))) / 2
    l2 = math.log(1 + math.exp(-1))
    a, b = 0.25 * math.exp(0.2 * l0), 0.25 * math.exp(0.2 * l2)
    q0, q2 = 0.5 * a / (a + b), 0.5 * b / (a + b)
    assert m.q.tolist() == pytest.approx([q0, 0.25, q2, 0.25], rel=1e-6)
    assert loss.item() == pytest.approx(q0 * l0 + q2 * l2, rel=1e-6)
    assert logs["worst_group_loss"].item() == pytest.approx(max(l0, l2), rel=1e-6)
    assert logs["max_q"].item() == pytest.approx(max(q0, q2, 0.25), rel=1e-6)
    assert logs["ce"].item() == pytest.approx((2 * l0 + l2) / 3, rel=1e-6)
    # eval mode: no update of q
    m.eval()
    before = m.q.clone()
    m.compute_loss(None, batch, ModelOutput(logits, logits))
    assert torch.equal(m.q, before)


def test_groupdro_generalization_adjustment_counts_lazily():
    c = 2.0
    m = GroupDRO(GroupDROOptions(generalization_adjustment=c, eta=0.01))
    m.setup(None, _ctx(num_samples=12, num_classes=2, num_biases=2))
    logits = torch.zeros(6, 2)  # every CE = log 2
    batch = {"target": torch.tensor([0, 0, 0, 0, 1, 1]), "bias": torch.tensor([0, 0, 0, 1, 1, 1]), "index": torch.arange(6)}
    loss, _ = m.compute_loss(None, batch, ModelOutput(logits, logits))
    assert m.group_counts.tolist() == [3, 1, 0, 2]
    n_hat = torch.tensor([3.0, 1.0, 1.0, 2.0]) * 12 / 6  # counts scaled to the training-set size
    assert m.group_sizes().tolist() == pytest.approx([6.0, 2.0, 0.0, 4.0])
    adjusted = math.log(2) + c / n_hat.sqrt()
    present = torch.tensor([1.0, 1.0, 0.0, 1.0])
    assert loss.item() == pytest.approx((m.q * present * adjusted).sum().item(), rel=1e-6)
    # the group with the fewest samples gets the largest adjustment, hence the largest weight
    assert m.q.argmax().item() == 1
    m.on_epoch_end(1)
    m.compute_loss(None, batch, ModelOutput(logits, logits))
    assert m.group_counts.tolist() == [3, 1, 0, 2]  # frozen after the first epoch


def test_groupdro_uses_context_group_counts():
    ctx = _ctx(num_classes=2, num_biases=2)
    ctx.group_counts = [100, 4, 9, 25]
    m = GroupDRO(GroupDROOptions(generalization_adjustment=1.0))
    m.setup(None, ctx)
    assert m.group_sizes().tolist() == [100, 4, 9, 25]
    ctx.group_counts = [1, 2, 3]
    with pytest.raises(ValueError, match="group_counts"):
        GroupDRO().setup(None, ctx)


def test_groupdro_keeps_its_weights_on_the_groups_that_can_occur():
    """--bias auto with the cluster labeller (k = 2): labels are class·2 + cluster, so of the 2 × 4
    grid only (0, 0), (0, 1), (1, 2), (1, 3) can occur; q starts uniform over those and the other
    cells keep weight 0 (today's q over all 8 cells would leave half the mass on groups that never
    occur, halving the loss)."""
    ctx = _ctx(num_classes=2, num_biases=4)
    ctx.bias_groups = torch.tensor([[True, True, False, False], [False, False, True, True]])
    m = GroupDRO(GroupDROOptions(eta=0.5))
    m.setup(None, ctx)
    assert m.q.tolist() == [0.25, 0.25, 0, 0, 0, 0, 0.25, 0.25]
    assert "allowed" not in m.state_dict()  # from the context, not state: older checkpoints still load
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [1.0, 0.0]])
    batch = {"target": torch.tensor([0, 0, 1, 1]), "bias": torch.tensor([0, 1, 2, 3]), "index": torch.arange(4)}
    loss, _ = m.compute_loss(None, batch, ModelOutput(logits, logits))
    ce = F.cross_entropy(logits, batch["target"], reduction="none")
    q = torch.softmax(0.5 * ce, 0)  # all four reachable groups present: one softmax step from uniform
    assert m.q[[0, 1, 6, 7]].tolist() == pytest.approx(q.tolist(), rel=1e-6)
    assert m.q[[2, 3, 4, 5]].tolist() == [0, 0, 0, 0] and m.q.sum().item() == pytest.approx(1.0)
    assert loss.item() == pytest.approx(float((q * ce).sum()), rel=1e-6)  # the full mass on the reachable groups
    batch["bias"] = torch.tensor([0, 2, 2, 3])  # (0, 2) cannot occur
    with pytest.raises(ValueError, match="outside TrainContext.bias_groups"):
        m.compute_loss(None, batch, ModelOutput(logits, logits))
    ctx.bias_groups = torch.zeros(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="bias_groups"):
        GroupDRO().setup(None, ctx)


def test_groupdro_recounts_group_sizes_every_epoch_when_labels_change():
    """Pseudo labels (TrainContext.bias_changes): n_g of epoch e are the counts of epoch e − 1,
    not those of the first epoch forever."""
    c = 2.0
    ctx = _ctx(num_samples=6, num_classes=2, num_biases=2)
    ctx.bias_changes = True
    m = GroupDRO(GroupDROOptions(generalization_adjustment=c))
    m.setup(None, ctx)
    logits = torch.zeros(6, 2)
    target = torch.tensor([0, 0, 0, 0, 1, 1])
    first = {"target": target, "bias": torch.tensor([0, 0, 0, 1, 1, 1]), "index": torch.arange(6)}
    second = {"target": target, "bias": torch.tensor([0, 1, 1, 1, 0, 1]), "index": torch.arange(6)}  # labels moved
    m.compute_loss(None, first, ModelOutput(logits, logits))
    assert m.group_sizes().tolist() == [3, 1, 0, 2]  # epoch 1: its running counts
    m.on_epoch_end(1)
    m.compute_loss(None, second, ModelOutput(logits, logits))
    assert m.group_sizes().tolist() == [3, 1, 0, 2]  # epoch 2 uses epoch 1's counts …
    m.on_epoch_end(2)
    assert m.group_sizes().tolist() == [1, 3, 1, 1]  # … and epoch 3 epoch 2's
    saved = m.state_dict()
    assert {"epoch_counts", "epoch_seen"} <= set(saved)
    # fixed (true) labels: counted once, in the first epoch, as before (no new state)
    fixed = GroupDRO(GroupDROOptions(generalization_adjustment=c))
    fixed.setup(None, _ctx(num_samples=6, num_classes=2, num_biases=2))
    for e, batch in enumerate((first, second), start=1):
        fixed.compute_loss(None, batch, ModelOutput(logits, logits))
        fixed.on_epoch_end(e)
    assert fixed.group_sizes().tolist() == [3, 1, 0, 2] and "epoch_counts" not in fixed.state_dict()


def test_groupdro_refuses_bad_setups_and_labels():
    with pytest.raises(ValueError, match="num_biases"):
        GroupDRO().setup(None, _ctx(num_biases=None))
    with pytest.raises(ValidationError):
        GroupDROOptions(eta=0.0)
    with pytest.raises(ValidationError):
        GroupDROOptions(step_size=0.1)
    m = GroupDRO()
    m.setup(None, _ctx(num_classes=2, num_biases=2))
    model = SimpleConvNet(2, kernel_size=3)
    opt = torch.optim.Adam(model.parameters())
    batch = _image_batch(n=4)
    batch["bias"] = torch.tensor([0, -1, 1, 0])
    with pytest.raises(ValueError, match="unknown bias"):
        m.update(model, batch, opt, AUTOCAST)
    batch["bias"] = torch.tensor([0, 2, 1, 0])
    with pytest.raises(ValueError, match="bias in"):
        m.update(model, batch, opt, AUTOCAST)


def test_groupdro_short_training_run_and_checkpoint_round_trip():
    torch.manual_seed(0)
    model = SimpleConvNet(2, kernel_size=3)
    m = GroupDRO(GroupDROOptions(eta=0.5))
    m.setup(model, _ctx())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = _image_batch()
    before = _params(model)
    for _ in range(3):
        logs = m.update(model, batch, opt, AUTOCAST)
    assert {"loss", "ce", "worst_group_loss", "max_q", "accuracy"} <= set(logs)
    assert all(torch.isfinite(v) and v.dim() == 0 and not v.requires_grad for v in logs.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert not torch.allclose(m.q, torch.full_like(m.q, 0.25))
    assert m.q.sum().item() == pytest.approx(1.0, abs=1e-6)

    saved = copy.deepcopy((model.state_dict(), m.state_dict(), opt.state_dict()))
    ref_logs = m.update(model, batch, opt, AUTOCAST)
    model2 = SimpleConvNet(2, kernel_size=3)
    m2 = GroupDRO(GroupDROOptions(eta=0.5))
    m2.setup(model2, _ctx())
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
    model2.load_state_dict(saved[0])
    m2.load_state_dict(saved[1])
    opt2.load_state_dict(saved[2])
    logs2 = m2.update(model2, batch, opt2, AUTOCAST)
    assert torch.equal(m2.q, m.q)
    for k in ref_logs:
        assert torch.equal(ref_logs[k], logs2[k]), k
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


# ============================================================================ LfF


def test_gce_hand_values():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [math.log(3.0), 0.0]])
    target = torch.tensor([0, 0, 1])
    q = 0.7
    expected = [(1 - p**q) / q for p in (0.5, 0.75, 0.25)]
    assert generalized_cross_entropy(logits, target, q).tolist() == pytest.approx(expected, rel=1e-6)
    # q = 1: 1 − p_y (the MAE up to a factor 2)
    assert generalized_cross_entropy(logits, target, 1.0).tolist() == pytest.approx([0.5, 0.25, 0.75], rel=1e-6)


def test_gce_tends_to_cross_entropy_as_q_goes_to_zero():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5, generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, 5, (8,), generator=g)
    ce = F.cross_entropy(logits, target, reduction="none")
    for q, tol in ((1e-3, 1e-2), (1e-6, 1e-5), (1e-9, 1e-8)):
        assert torch.allclose(generalized_cross_entropy(logits, target, q), ce, rtol=tol)
    with pytest.raises(ValueError, match="q > 0"):
        generalized_cross_entropy(logits, target, 0.0)


def test_gce_gradient_is_p_to_the_q_times_ce_gradient():
    """Eq. 2: ∂GCE/∂z = p_y^q · ∂CE/∂z = p_y^q (softmax(z) − onehot(y))."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 4, (6,), generator=g)
    q = 0.7
    generalized_cross_entropy(logits, target, q).sum().backward()
    p = torch.softmax(logits.detach(), 1)
    p_y = p.gather(1, target[:, None])
    expected = p_y**q * (p - F.one_hot(target, 4).double())
    assert torch.allclose(logits.grad, expected, atol=1e-12)
    # easy samples (large p_y) get a larger share of the gradient than with the CE
    assert torch.autograd.gradcheck(lambda z: generalized_cross_entropy(z, target, q), (logits.detach().requires_grad_(),))


def test_gce_in_float32_under_bf16_autocast():
    logits = torch.randn(4, 3).bfloat16()
    out = generalized_cross_entropy(logits, torch.tensor([0, 1, 2, 0]))
    assert out.dtype == torch.float32 and ((out >= 0) & (out <= 1 / 0.7 + 1e-6)).all()


def test_relative_difficulty_and_class_max():
    assert relative_difficulty(torch.tensor([1.0, 0.0, 3.0]), torch.tensor([1.0, 2.0, 1.0]), eps=0).tolist() == [0.5, 0.0, 0.75]
    g = torch.Generator().manual_seed(0)
    w = relative_difficulty(torch.rand(100, generator=g) * 5, torch.rand(100, generator=g) * 5)
    assert ((w >= 0) & (w <= 1)).all()
    assert relative_difficulty(torch.zeros(2), torch.zeros(2)).tolist() == [0.0, 0.0]  # no NaN
    values = torch.tensor([0.5, 9.0, 2.0, 3.0, 1.0])
    labels = torch.tensor([0, -1, 0, 2, 2])  # sample 1 unseen: its 9.0 must not count
    assert class_max(values, labels, 4).tolist() == [2.0, 0.0, 3.0, 0.0]


def _lff(num_samples=10, num_classes=2, dim=4, **options):
    m = LfF(LfFOptions(**options))
    m.setup(TinyNet(dim, num_classes), _ctx(num_samples=num_samples, num_classes=num_classes, build_model=lambda **kw: TinyNet(dim, num_classes)))
    return m


def test_lff_ema_updates_only_the_indexed_samples_hand_values():
    m = _lff(num_samples=10)
    w = m.sample_weights(torch.tensor([2, 5]), torch.tensor([0, 0]), torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.0]))
    # first visit stores the loss; class-0 maxima 2 and 2 → L_b = (0.5, 1), L_d = (1, 1)
    assert w.tolist() == pytest.approx([1 / 3, 1 / 2])
    expected_b = torch.zeros(10)
    expected_b[[2, 5]] = torch.tensor([1.0, 2.0])
    assert torch.equal(m.loss_ema_b, expected_b)
    assert m.sample_target.tolist() == [-1, -1, 0, -1, -1, 0, -1, -1, -1, -1]
    # second visit of sample 5: ema ← 0.7·old + 0.3·new
    w = m.sample_weights(torch.tensor([5]), torch.tensor([0]), torch.tensor([0.0]), torch.tensor([1.0]))
    assert m.loss_ema_b[5].item() == pytest.approx(1.4)
    assert m.loss_ema_d[5].item() == pytest.approx(1.7)
    assert m.loss_ema_b[2].item() == 1.0 and m.loss_ema_d[2].item() == 2.0  # untouched
    # class-0 maxima over seen samples: b = max(1, 1.4), d = max(2, 1.7)
    assert w.item() == pytest.approx(1.0 / (1.0 + 1.7 / 2))
    # a class-1 sample is normalised by its own class maximum
    w = m.sample_weights(torch.tensor([7]), torch.tensor([1]), torch.tensor([0.3]), torch.tensor([0.1]))
    assert w.item() == pytest.approx(0.5)


def _bias_toy(n=100, n_conflict=10, seed=0):
    """Two classes; feature 0 is a large, clean 'colour' (the bias: learnt first), features 1–4
    a small 'shape' (the target: separable but slow to learn); the last ``n_conflict``
    samples have the other colour."""
    g = torch.Generator().manual_seed(seed)
    target = torch.arange(n) % 2
    bias = target.clone()
    bias[-n_conflict:] = 1 - bias[-n_conflict:]
    x = torch.empty(n, 5)
    x[:, 0] = (2 * bias - 1).float() * 2 + 0.1 * torch.randn(n, generator=g)
    x[:, 1:] = (2 * target - 1).float()[:, None] * 0.1 + 0.05 * torch.randn(n, 4, generator=g)
    return {"image": x, "target": target, "bias": bias, "index": torch.arange(n)}


@pytest.mark.parametrize("seed", [0, 1])
def test_lff_upweights_bias_conflicting_samples(seed):
    torch.manual_seed(seed)
    batch = _bias_toy(seed=seed)
    model = TinyNet(5)
    m = LfF()
    m.setup(model, _ctx(num_samples=100, build_model=lambda **kw: TinyNet(5)))
    opt = torch.optim.Adam(model.parameters(), lr=5e-2)
    for _ in range(200):
        logs = m.update(model, batch, opt, AUTOCAST)
    # the biased model has learnt the colour: right on the aligned, wrong on the conflicting
    right_b = m.biased_model(batch["image"]).logits.argmax(1) == batch["target"]
    assert right_b[:90].all() and not right_b[90:].any()
    assert logs["weight_conflicting"].item() > logs["weight_aligned"].item() + 0.3
    with torch.no_grad():
        w = m.sample_weights(batch["index"], batch["target"], torch.zeros(100), torch.zeros(100))
    assert ((w >= 0) & (w <= 1)).all()


def test_lff_training_run_logs_and_changes_both_models():
    torch.manual_seed(0)
    model = SimpleConvNet(2, kernel_size=3)
    m = LfF()
    m.setup(model, _ctx(build_model=lambda **kw: SimpleConvNet(2, kernel_size=3, **kw)))
    assert m.biased_model is not model
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = _image_batch()
    before_d, before_b = _params(model), _params(m.biased_model)
    for _ in range(2):
        logs = m.update(model, batch, opt, AUTOCAST)
    expected = {"loss", "ce", "weighted_ce", "gce_b", "mean_weight", "accuracy", "accuracy_b", "weight_conflicting", "weight_aligned"}
    assert expected <= set(logs)
    assert all(torch.isfinite(v) and v.dim() == 0 and not v.requires_grad for v in logs.values())
    assert 0 <= logs["mean_weight"].item() <= 1
    assert logs["loss"].item() == pytest.approx(logs["weighted_ce"].item() + logs["gce_b"].item(), rel=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(before_d, model.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(before_b, m.biased_model.parameters(), strict=True))
    # the biased model is a sub-module: checkpointed with the method
    assert any(k.startswith("biased_model.") for k in m.state_dict())
    assert {"loss_ema_b", "loss_ema_d", "sample_target"} <= set(m.state_dict())
    # unknown bias labels: no diagnostic (the method itself does not need bias labels)
    batch["bias"] = torch.full_like(batch["bias"], -1)
    logs = m.update(model, batch, opt, AUTOCAST)
    assert "weight_conflicting" not in logs and "weight_aligned" not in logs


def test_lff_uses_class_weights_for_the_main_ce():
    m = _lff(num_samples=8, dim=5)
    batch = _bias_toy(n=8, n_conflict=2)
    m.set_class_weights(torch.tensor([1.0, 3.0]))
    model = TinyNet(5)
    logs = m.update(model, batch, torch.optim.SGD(model.parameters(), lr=0.0), AUTOCAST)
    with torch.no_grad():
        ce = F.cross_entropy(model(batch["image"]).logits, batch["target"], weight=torch.tensor([1.0, 3.0]))
    assert logs["ce"].item() == pytest.approx(ce.item(), rel=1e-6)


def test_lff_checkpoint_round_trip_reproduces_the_next_step():
    def build(**kw):
        return TinyNet(5)

    torch.manual_seed(3)
    batch = _bias_toy(n=20, n_conflict=4)
    model = TinyNet(5)
    m = LfF(LfFOptions(ema=0.5))
    m.setup(model, _ctx(num_samples=20, build_model=build, step=1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for i in range(3):
        m.update(model, {k: v[i * 5 : i * 5 + 10] for k, v in batch.items()}, opt, AUTOCAST)
    m.on_epoch_end(1)
    assert m.optimizer_b.param_groups[0]["lr"] == pytest.approx(5e-3)  # B's own StepLR stepped
    saved = copy.deepcopy((model.state_dict(), m.state_dict(), m.extra_state(), opt.state_dict()))
    ref = m.update(model, batch, opt, AUTOCAST)

    torch.manual_seed(99)  # fresh weights everywhere: everything must come from the checkpoint
    model2 = TinyNet(5)
    m2 = LfF(LfFOptions(ema=0.5))
    m2.setup(model2, _ctx(num_samples=20, build_model=build, step=1))
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
    model2.load_state_dict(saved[0])
    m2.load_state_dict(saved[1])
    m2.load_extra_state(saved[2])
    opt2.load_state_dict(saved[3])
    assert m2.optimizer_b.param_groups[0]["lr"] == pytest.approx(5e-3)
    got = m2.update(model2, batch, opt2, AUTOCAST)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    for a, b in zip([*model.parameters(), *m.biased_model.parameters()], [*model2.parameters(), *m2.biased_model.parameters()], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(m.loss_ema_b, m2.loss_ema_b) and torch.equal(m.loss_ema_d, m2.loss_ema_d)


def test_lff_refuses_bad_setups_and_batches():
    with pytest.raises(ValueError, match="build_model"):
        LfF().setup(TinyNet(4), _ctx(build_model=None))
    with pytest.raises(ValueError, match="num_samples"):
        LfF().setup(TinyNet(4), _ctx(num_samples=0, build_model=lambda **kw: TinyNet(4)))
    for bad in ({"q": 0.0}, {"q": 1.5}, {"ema": 1.0}, {"eps": 0.0}, {"lambda": 1.0}):
        with pytest.raises(ValidationError):
            LfFOptions(**bad)
    assert LfF.requires_bias is False
    m = _lff(num_samples=4, dim=5)
    model = TinyNet(5)
    batch = _bias_toy(n=6, n_conflict=1)  # indices 4 and 5 do not exist in a 4-sample set
    with pytest.raises(ValueError, match="index"):
        m.update(model, batch, torch.optim.Adam(model.parameters()), AUTOCAST)


# ============================================================================ both, through the trainer


def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("method", ["groupdro", "lff"])
def test_bf16_autocast_keeps_state_in_float32(method):
    torch.manual_seed(0)
    batch = _bias_toy(n=12, n_conflict=3)
    model = TinyNet(5)
    m = GroupDRO() if method == "groupdro" else LfF()
    m.setup(model, _ctx(num_samples=12, build_model=lambda **kw: TinyNet(5)))
    logs = m.update(model, batch, torch.optim.Adam(model.parameters()), _bf16)
    assert all(torch.isfinite(v) for v in logs.values())
    for name, buf in m.named_buffers():
        if buf.is_floating_point():
            assert buf.dtype == torch.float32, name


@pytest.mark.parametrize("method", ["groupdro", "lff"])
def test_trainer_resume_continues_exactly(tmp_path, method):
    from cxrdebias.data.base import TensorBatchLoader, TensorSamples
    from cxrdebias.experiments.config import load_config
    from cxrdebias.training.device import seed_everything
    from cxrdebias.training.runs import RunDir
    from cxrdebias.training.trainer import Trainer

    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 2, (32,), generator=g)
    x = torch.randn(32, 3, 8, 8, generator=g) * 0.5
    x[:, 0] += t.view(-1, 1, 1).float()
    data = TensorSamples(x, t, (t + (torch.rand(32, generator=g) < 0.2).long()) % 2, name="toy")

    def trainer(run, epochs):
        cfg = load_config(None, [f"train.epochs={epochs}", "train.batch_size=16", "train.progress=false", "train.precision=fp32", "train.lr_step=1"])
        seed_everything(0)
        m = GroupDRO(GroupDROOptions(generalization_adjustment=1.0)) if method == "groupdro" else LfF()
        return Trainer(
            SimpleConvNet(2, kernel_size=3), m, TensorBatchLoader(data, 16, shuffle=True, seed=1), cfg.train,
            run=run, seed=0, fingerprint={"e": 3}, num_classes=2, num_biases=2,
            build_model=lambda **kw: SimpleConvNet(2, kernel_size=3, **kw),
        )

    ref = trainer(RunDir.create(tmp_path / "ref"), 3)
    ref.fit()
    run = RunDir.create(tmp_path / "interrupted")
    trainer(run, 2).fit()
    resumed = trainer(run, 3)
    resumed.fit(resume=True)
    for (k, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    for (k, a), b in zip(ref.method.state_dict().items(), resumed.method.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert ref.history[-1]["train"]["loss"] == resumed.history[-1]["train"]["loss"]
