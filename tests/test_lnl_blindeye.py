"""LNL and BlindEye: gradient reversal, entropy/confusion terms, the bias head, the two-step
updates (against a direct transcription of the algorithms), training, checkpoints, errors."""

import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from cxrdebias.debias.blindeye import BlindEye, BlindEyeOptions
from cxrdebias.debias.lnl import (
    LNL,
    BiasHead,
    LNLOptions,
    confusion_loss,
    grad_reverse,
    negative_entropy,
)
from cxrdebias.errors import ConfigError, DataError
from cxrdebias.models import SimpleConvNet
from cxrdebias.models.base import ModelOutput
from tests.conftest import adam_context, assert_same_tensors, resume_after_interrupt

NO_AUTOCAST = contextlib.nullcontext


#: tiny tensors: one thread is faster than two fighting over busy cores
pytestmark = pytest.mark.usefixtures("torch_one_thread_per_module")


# -- fixtures --------------------------------------------------------------------------------


class ToyNet(nn.Module):
    """A linear feature extractor + linear classifier (returns ModelOutput like every model)."""

    def __init__(self, d_in=8, d=6, num_classes=2):
        super().__init__()
        self.f = nn.Linear(d_in, d)
        self.g = nn.Linear(d, num_classes)
        self.feature_dim = d

    def forward(self, x):
        z = torch.tanh(self.f(x))
        return ModelOutput(self.g(z), z)


def toy_batch(n=64, d_in=8, seed=0):
    """Target = sign of input 0, bias = sign of input 1 (linearly decodable from the features)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    return {
        "image": x,
        "target": (x[:, 0] > 0).long(),
        "bias": (x[:, 1] > 0).long(),
        "index": torch.arange(n),
    }


def context(num_biases=2, lr=1e-2, step_lr=None):
    return adam_context(64, 2, num_biases, lr=lr, weight_decay=1e-4, lr_step=step_lr)


def set_up(method_cls, seed=0, model=None, ctx=None, **options):
    torch.manual_seed(seed)
    model = model if model is not None else ToyNet()
    method = method_cls(method_cls.Options(**options))
    ctx = ctx if ctx is not None else context()
    method.setup(model, ctx)
    optimizer = ctx.make_optimizer(model.parameters())
    return model, method, optimizer


METHODS = [LNL, BlindEye]


# -- gradient reversal -----------------------------------------------------------------------


def test_grad_reverse_is_identity_forward_and_scaled_negation_backward():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = grad_reverse(x, 0.1)
    assert torch.equal(y, x.detach())
    (y * torch.tensor([2.0, 3.0, -4.0])).sum().backward()
    # d/dx Σ w·x = w, reversed and scaled: −0.1·w
    assert torch.allclose(x.grad, torch.tensor([-0.2, -0.3, 0.4]))


@pytest.mark.parametrize("scale", [0.0, 0.1, 1.0, 2.5])
def test_grad_reverse_scales_any_upstream_gradient(scale):
    x = torch.randn(4, 3, requires_grad=True)
    (grad_reverse(x, scale) ** 2).sum().backward()
    assert torch.allclose(x.grad, -scale * 2 * x.detach())


def test_grad_reverse_gradcheck_float64():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    # with scale −1 the reversed gradient is the true gradient of the identity: gradcheck passes
    assert torch.autograd.gradcheck(lambda t: grad_reverse(t, -1.0), (x,))
    # with the reference scale the analytic gradient is −0.1 × the numerical one: gradcheck fails
    assert not torch.autograd.gradcheck(lambda t: grad_reverse(t, 0.1), (x,), raise_exception=False)
    # the backward is differentiable: double backward is exact where the layer is the identity
    assert torch.autograd.gradgradcheck(lambda t: grad_reverse(t, -1.0).sin(), (x,))
    # and linear in the incoming gradient for any scale
    w = torch.randn(3, 4, dtype=torch.float64)
    assert torch.autograd.gradgradcheck(lambda t: grad_reverse(t, 0.1) * w, (x,))


def test_grad_reverse_jacobian_is_minus_scale_times_true_jacobian():
    x = torch.randn(5, dtype=torch.float64)
    w = torch.randn(3, 5, dtype=torch.float64)

    def h(t):
        return torch.tanh(w @ t)

    true_jac = torch.autograd.functional.jacobian(h, x)
    reversed_jac = torch.autograd.functional.jacobian(lambda t: h(grad_reverse(t, 0.3)), x)
    assert torch.allclose(reversed_jac, -0.3 * true_jac)


# -- entropy and confusion terms -------------------------------------------------------------


def _logits(*rows):
    return torch.log(torch.tensor(rows, dtype=torch.float64))


def test_negative_entropy_hand_values():
    # uniform over 4: Σ q log q = log(1/4)  — the minimum (maximal entropy)
    assert negative_entropy(torch.zeros(3, 4)).item() == pytest.approx(-math.log(4), rel=1e-6)
    # q = (1/2, 1/4, 1/4): ½·log ½ + 2·¼·log ¼ = −1.5·log 2
    assert negative_entropy(_logits([0.5, 0.25, 0.25])).item() == pytest.approx(-1.5 * math.log(2), rel=1e-6)
    # one-hot: 0 — the maximum (no uncertainty), with 0·log 0 = 0 and a finite gradient
    one_hot = _logits([1.0, 0.0, 0.0]).float().requires_grad_()
    value = negative_entropy(one_hot)
    assert value.item() == 0.0
    value.backward()
    assert torch.isfinite(one_hot.grad).all()
    # batch mean of the rows
    both = torch.cat([_logits([0.5, 0.25, 0.25]), torch.zeros(1, 3, dtype=torch.float64)])
    assert negative_entropy(both).item() == pytest.approx((-1.5 * math.log(2) - math.log(3)) / 2, rel=1e-6)


def test_confusion_loss_hand_values():
    # uniform over 4: −(1/4)·4·log(1/4) = log 4  — the minimum
    assert confusion_loss(torch.zeros(2, 4)).item() == pytest.approx(math.log(4), rel=1e-6)
    # q = (1/2, 1/4, 1/4): −(1/3)(log ½ + 2 log ¼) = (5/3)·log 2
    assert confusion_loss(_logits([0.5, 0.25, 0.25])).item() == pytest.approx(5 / 3 * math.log(2), rel=1e-6)
    # one-hot: infinitely confident, infinitely far from uniform
    assert math.isinf(confusion_loss(_logits([1.0, 0.0, 0.0])).item())
    # and it grows with the margin of a nearly one-hot prediction: −(1/3)(≈0 − m − m) ≈ 2m/3
    values = [confusion_loss(torch.tensor([[m, 0.0, 0.0]])).item() for m in (1.0, 5.0, 30.0)]
    assert values[0] < values[1] < values[2] == pytest.approx(20.0, rel=1e-6)


def test_confusion_loss_gradient_is_q_minus_uniform_over_n():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]], dtype=torch.float64, requires_grad=True)
    confusion_loss(logits).backward()
    q = logits.detach().softmax(1)
    assert torch.allclose(logits.grad, (q - 1 / 3) / 2)
    assert torch.allclose(logits.grad[1], torch.zeros(3, dtype=torch.float64))  # uniform: stationary


def test_negative_entropy_gradient_hand_value():
    # d/dz_k Σ q log q = q_k (log q_k − Σ_j q_j log q_j); zero at the uniform distribution
    logits = torch.tensor([[1.0, -1.0, 0.5], [0.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    negative_entropy(logits).backward()
    q = logits.detach().softmax(1)
    log_q = q.log()
    expected = q * (log_q - (q * log_q).sum(1, keepdim=True)) / 2
    assert torch.allclose(logits.grad, expected)
    assert torch.allclose(logits.grad[1], torch.zeros(3, dtype=torch.float64))


def test_terms_reject_non_matrix_logits():
    with pytest.raises(ValueError, match="N×K"):
        negative_entropy(torch.zeros(4))
    with pytest.raises(ValueError, match="N×K"):
        confusion_loss(torch.zeros(2, 3, 4))


# -- the bias head ---------------------------------------------------------------------------


@pytest.mark.parametrize("hidden", [0, 16])
def test_bias_head_shapes_and_float32_under_autocast(hidden):
    head = BiasHead(6, 3, hidden)
    assert isinstance(head.net, nn.Linear) == (hidden == 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(torch.randn(5, 6).bfloat16())
    assert out.shape == (5, 3) and out.dtype == torch.float32


def test_bias_head_rejects_bad_sizes():
    with pytest.raises(ValueError, match="at least 2 bias classes"):
        BiasHead(6, 1)
    with pytest.raises(ValueError, match="hidden"):
        BiasHead(6, 2, -1)


def test_bias_head_learns_a_linearly_decodable_bias_through_the_reversal():
    """Behind the reversal layer the head still *learns* the bias (its own gradient is not
    reversed), while the features receive −s × the gradient they would get without it."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    features = torch.randn(128, 10, generator=g)
    bias = (features[:, 3] - 0.5 * features[:, 7] > 0).long()
    head = BiasHead(10, 2)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    accuracies = []
    for _ in range(40):
        logits = head(grad_reverse(features, 0.1))
        accuracies.append((logits.argmax(1) == bias).float().mean().item())
        opt.zero_grad()
        F.cross_entropy(logits, bias).backward()
        opt.step()
    assert accuracies[0] < 0.7 and accuracies[-1] > 0.95


def test_reversed_feature_gradient_pushes_features_against_the_head():
    torch.manual_seed(0)
    head = BiasHead(6, 3, hidden=8)
    features = torch.randn(32, 6)
    bias = torch.randint(0, 3, (32,))

    def grads(scale):
        f = features.clone().requires_grad_()
        head.zero_grad()
        inp = f if scale is None else grad_reverse(f, scale)
        F.cross_entropy(head(inp), bias).backward()
        return f.grad, [p.grad.clone() for p in head.parameters()]

    plain_f, plain_head = grads(None)
    rev_f, rev_head = grads(0.1)
    assert torch.allclose(rev_f, -0.1 * plain_f)  # opposite sign, scaled
    assert (rev_f * plain_f).sum() < 0
    for a, b in zip(plain_head, rev_head, strict=True):  # the head's own gradient is unchanged
        assert torch.equal(a, b)
    # a gradient-descent step on the features (as the optimiser takes) *raises* the head's loss
    with torch.no_grad():
        before = F.cross_entropy(head(features), bias)
        after = F.cross_entropy(head(features - 1.0 * rev_f), bias)
        without_reversal = F.cross_entropy(head(features - 0.1 * plain_f), bias)
    assert after > before > without_reversal


# -- the updates match a direct transcription of the algorithms ------------------------------


def _lnl_transcription(model, head, opt, head_opt, batch, lam, mu, scale):
    """The authors' two steps (trainer.py), written out with plain autograd."""
    x, t, b = batch["image"], batch["target"], batch["bias"]
    opt.zero_grad()
    head_opt.zero_grad()
    out = model(x)
    q = head(out.features).softmax(1)
    loss = F.cross_entropy(out.logits, t) + lam * (q * q.log()).sum(1).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    head_opt.zero_grad(set_to_none=True)
    feat = model(x).features
    (mu * F.cross_entropy(head(grad_reverse(feat, scale)), b)).backward()
    opt.step()
    head_opt.step()


def _blindeye_transcription(model, head, opt, head_opt, batch, alpha):
    x, t, b = batch["image"], batch["target"], batch["bias"]
    out = model(x)
    head_opt.zero_grad(set_to_none=True)
    F.cross_entropy(head(out.features.detach()), b).backward()
    head_opt.step()
    opt.zero_grad(set_to_none=True)
    log_q = head(out.features).log_softmax(1)
    (F.cross_entropy(out.logits, t) - alpha * log_q.mean(1).mean()).backward()
    opt.step()


@pytest.mark.parametrize("method_cls", METHODS)
def test_update_matches_transcription_of_the_algorithm(method_cls):
    options = {"lambda_": 0.5, "mu": 2.0, "grl_scale": 0.3} if method_cls is LNL else {"alpha": 0.7}
    model, method, optimizer = set_up(method_cls, **options)
    initial = model.f.weight.detach().clone()
    ref_model = copy.deepcopy(model)
    ref_head = copy.deepcopy(method.bias_head)
    ctx = context()
    ref_opt = ctx.make_optimizer(ref_model.parameters())
    ref_head_opt = ctx.make_optimizer(ref_head.parameters())
    for seed in range(3):
        batch = toy_batch(seed=seed)
        method.update(model, batch, optimizer, NO_AUTOCAST)
        if method_cls is LNL:
            _lnl_transcription(ref_model, ref_head, ref_opt, ref_head_opt, batch, 0.5, 2.0, 0.3)
        else:
            _blindeye_transcription(ref_model, ref_head, ref_opt, ref_head_opt, batch, 0.7)
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    for a, b in zip(method.bias_head.parameters(), ref_head.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    # and not trivially: the parameters moved
    assert not torch.allclose(model.f.weight, initial)


def test_blindeye_head_ignores_the_confusion_step():
    """The head's update is the CE step on detached features only, whatever α is."""
    heads = []
    for alpha in (0.0, 5.0):
        model, method, optimizer = set_up(BlindEye, alpha=alpha)
        method.update(model, toy_batch(), optimizer, NO_AUTOCAST)
        heads.append([p.detach().clone() for p in method.bias_head.parameters()])
        assert all(p.grad is None for p in method.bias_head.parameters())
    for a, b in zip(*heads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method_cls", METHODS)
def test_bias_accuracy_rises_when_the_features_are_frozen(method_cls):
    """The logged bias accuracy of the head rises when the bias is linearly decodable."""
    torch.manual_seed(3)
    model = ToyNet(d_in=8, d=8)
    with torch.no_grad():
        model.f.weight.copy_(torch.eye(8))
        model.f.bias.zero_()
    ctx = context(lr=0.05)
    method = method_cls()
    method.setup(model, ctx)
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)
    batch = toy_batch(n=128)
    accs = [method.update(model, batch, frozen, NO_AUTOCAST)["bias_accuracy"].item() for _ in range(30)]
    assert accs[-1] > 0.9 and accs[-1] > accs[0] + 0.2


# -- training on images, logs, checkpoints ---------------------------------------------------


def _image_batch(seed, n=8):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 3, 12, 12, generator=g)
    x[:, 0] += t.view(-1, 1, 1).float()
    return {"image": x, "target": t, "bias": (t + seed) % 2, "index": torch.arange(n)}


def _conv_setup(method_cls, seed=0, **options):
    torch.manual_seed(seed)
    model = SimpleConvNet(3, kernel_size=3)
    return set_up(method_cls, model=model, ctx=context(lr=1e-3, step_lr=1), **options)


EXPECTED_LOGS = {
    LNL: {"loss", "ce", "neg_entropy", "bias_ce", "bias_accuracy", "accuracy"},
    BlindEye: {"loss", "ce", "confusion", "bias_ce", "bias_accuracy", "accuracy"},
}


@pytest.mark.parametrize("method_cls", METHODS)
@pytest.mark.parametrize("hidden", [0, 8])
def test_short_training_run_changes_model_and_logs_are_finite(method_cls, hidden):
    model, method, optimizer = _conv_setup(method_cls, head_hidden=hidden)
    model.train()
    before = copy.deepcopy(model.state_dict())
    head_before = copy.deepcopy(method.bias_head.state_dict())
    for step in range(3):
        logs = method.update(model, _image_batch(step), optimizer, NO_AUTOCAST)
        assert set(logs) == EXPECTED_LOGS[method_cls]
        for k, v in logs.items():
            assert v.dim() == 0 and not v.requires_grad and torch.isfinite(v), k
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(not torch.equal(head_before[k], v) for k, v in method.bias_head.state_dict().items())
    assert "bias_head.net.weight" in method.state_dict() or "bias_head.net.0.weight" in method.state_dict()


@pytest.mark.parametrize("method_cls", METHODS)
def test_bf16_autocast_update_is_finite(method_cls):
    model, method, optimizer = _conv_setup(method_cls)
    logs = method.update(model, _image_batch(0), optimizer, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert all(torch.isfinite(v) for v in logs.values())


@pytest.mark.parametrize("method_cls", METHODS)
def test_save_restore_reproduces_next_step_exactly(method_cls):
    model, method, optimizer = _conv_setup(method_cls)
    for step in range(2):
        method.update(model, _image_batch(step), optimizer, NO_AUTOCAST)
    method.on_epoch_end(1)  # the head's StepLR(1) halves its lr: restored from extra_state
    saved = copy.deepcopy(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "method": method.state_dict(),
            "extra": method.extra_state(),
        }
    )
    logs = method.update(model, _image_batch(5), optimizer, NO_AUTOCAST)

    model2, method2, optimizer2 = _conv_setup(method_cls, seed=123)  # different initial weights
    model2.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["optimizer"])
    method2.load_state_dict(saved["method"])
    method2.load_extra_state(saved["extra"])
    assert method2.head_optimizer.param_groups[0]["lr"] == pytest.approx(0.5e-3)
    logs2 = method2.update(model2, _image_batch(5), optimizer2, NO_AUTOCAST)

    for k in logs:
        assert torch.equal(logs[k], logs2[k]), k
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    for (k, a), b in zip(method.state_dict().items(), method2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_load_extra_state_rejects_foreign_state():
    _, method, _ = set_up(LNL)
    with pytest.raises(ValueError, match="bias-head optimiser"):
        method.load_extra_state({})


# -- errors and options ----------------------------------------------------------------------


@pytest.mark.parametrize("method_cls", METHODS)
def test_num_biases_none_is_a_clear_error(method_cls):
    with pytest.raises(ConfigError, match="num_biases"):
        method_cls().setup(ToyNet(), context(num_biases=None))


@pytest.mark.parametrize("method_cls", METHODS)
def test_model_without_feature_dim_is_a_clear_error(method_cls):
    model = ToyNet()
    del model.feature_dim
    with pytest.raises(ConfigError, match="feature_dim"):
        method_cls().setup(model, context())


@pytest.mark.parametrize("method_cls", METHODS)
def test_unknown_bias_labels_are_refused(method_cls):
    model, method, optimizer = set_up(method_cls)
    batch = toy_batch()
    batch["bias"][3] = -1
    with pytest.raises(ValueError, match="unknown bias"):
        method.update(model, batch, optimizer, NO_AUTOCAST)


@pytest.mark.parametrize("method_cls", METHODS)
def test_bias_labels_out_of_range_are_refused(method_cls):
    model, method, optimizer = set_up(method_cls)
    batch = toy_batch()
    batch["bias"][0] = 2  # num_biases = 2
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        method.update(model, batch, optimizer, NO_AUTOCAST)


@pytest.mark.parametrize("method_cls", METHODS)
def test_update_before_setup_is_a_clear_error(method_cls):
    model = ToyNet()
    with pytest.raises(RuntimeError, match="setup"):
        method_cls().update(model, toy_batch(), torch.optim.SGD(model.parameters(), lr=0.1), NO_AUTOCAST)


def test_options_defaults_validation_and_alias():
    o = LNLOptions()
    assert (o.lambda_, o.mu, o.grl_scale, o.head_hidden) == (0.01, 1.0, 0.1, 0)
    assert LNLOptions(**{"lambda": 0.2}).lambda_ == 0.2
    assert BlindEyeOptions().alpha == 1.0 and BlindEyeOptions().head_hidden == 0
    for bad in ({"lambda_": -1}, {"mu": 0}, {"grl_scale": -0.1}, {"head_hidden": -2}, {"beta": 1}):
        with pytest.raises(ValidationError):
            LNLOptions(**bad)
    with pytest.raises(ValidationError):
        BlindEyeOptions(alpha=-1)
    assert LNL.requires_bias and BlindEye.requires_bias
    assert LNL().describe()["name"] == "lnl" and BlindEye().describe()["alpha"] == 1.0


@pytest.mark.parametrize("method_cls", METHODS)
def test_trainer_resume_continues_exactly(method_cls, tmp_path):
    """Through the real trainer: checkpoint after epoch 1, resume, same weights as a full run."""
    from cxrdebias.data.base import TensorBatchLoader, TensorSamples
    from cxrdebias.experiments.config import load_config
    from cxrdebias.training.runs import RunDir
    from cxrdebias.training.trainer import Trainer

    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 3, (48,), generator=g)
    x = torch.randn(48, 3, 8, 8, generator=g)
    x[:, 0] += t.view(-1, 1, 1).float()
    data = TensorSamples(x, t, (t + (torch.rand(48, generator=g) < 0.2).long()) % 2, name="toy")
    overrides = ["train.epochs=2", "train.batch_size=16", "train.progress=false"]
    cfg = load_config(None, [*overrides, "train.precision=fp32", "train.lr_step=1"]).train

    def trainer(run):
        torch.manual_seed(0)
        loader = TensorBatchLoader(data, 16, shuffle=True, seed=1)
        return Trainer(SimpleConvNet(3, kernel_size=3), method_cls(), loader, cfg, run=run, seed=0, num_biases=2)

    ref = trainer(RunDir.create(tmp_path / "ref"))
    ref.fit()
    resumed, _ = resume_after_interrupt(trainer, tmp_path / "cut")
    assert_same_tensors(ref.model, resumed.model)
    assert_same_tensors(ref.method, resumed.method)
    assert resumed.method.head_optimizer.param_groups[0]["lr"] == pytest.approx(ref.method.head_optimizer.param_groups[0]["lr"])
    assert {"bias_ce", "bias_accuracy"} <= set(ref.history[-1]["train"])
