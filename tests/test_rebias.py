"""ReBias: the HSIC estimators (hand-computed values, properties, gradients) and the method."""

import copy
import io
import itertools
import math
from contextlib import nullcontext

import pytest
import torch
from pydantic import ValidationError

from cxrdebias.debias.hsic import (
    hsic,
    kernel_matrix,
    linear_kernel,
    median_distance,
    pairwise_squared_distances,
    rbf_kernel,
    unbiased_hsic,
)
from cxrdebias.debias.rebias import ReBias, ReBiasOptions
from cxrdebias.errors import CheckpointError
from cxrdebias.models import SimpleConvNet
from tests.conftest import adam_context, assert_same_tensors, resume_after_interrupt

#: tiny tensors: intra-op threads only add synchronisation (slow on a busy machine)
pytestmark = pytest.mark.usefixtures("torch_one_thread_per_module")


# -- independent implementations of the formulas (loops, float64) --------------------------------


def loop_unbiased_hsic(K, L):
    """HSIC₁ of Song et al. written out term by term with Python loops."""
    K, L = K.double().tolist(), L.double().tolist()
    m = len(K)
    Kt = [[0.0 if i == j else K[i][j] for j in range(m)] for i in range(m)]
    Lt = [[0.0 if i == j else L[i][j] for j in range(m)] for i in range(m)]
    trace = sum(Kt[i][j] * Lt[j][i] for i in range(m) for j in range(m))
    sum_k = sum(map(sum, Kt))
    sum_l = sum(map(sum, Lt))
    KL = [[sum(Kt[i][r] * Lt[r][j] for r in range(m)) for j in range(m)] for i in range(m)]
    ones_kl_ones = sum(map(sum, KL))
    return (trace + sum_k * sum_l / ((m - 1) * (m - 2)) - 2 / (m - 2) * ones_kl_ones) / (m * (m - 3))


def u_statistic_hsic(K, L):
    """The same estimator from its U-statistic definition: the mean over ordered 4-tuples of
    distinct indices of k_ij·l_ij + k_ij·l_qr − 2·k_ij·l_iq (an independent derivation)."""
    K, L = K.double().tolist(), L.double().tolist()
    m = len(K)
    total, count = 0.0, 0
    for i, j, q, r in itertools.permutations(range(m), 4):
        total += K[i][j] * L[i][j] + K[i][j] * L[q][r] - 2 * K[i][j] * L[i][q]
        count += 1
    return total / count


def reference_style_unbiased_hsic(K, L):
    """The authors' diagonal handling: subtract the diagonal *vector* (K_ij − K_jj)."""
    m = K.shape[0]
    tK = K - torch.diag(K)
    tL = L - torch.diag(L)
    return (
        torch.trace(tK @ tL) + tK.sum() * tL.sum() / ((m - 1) * (m - 2)) - 2 * tK.sum(0).dot(tL.sum(0)) / (m - 2)
    ) / (m * (m - 3))


def _features(m, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, d, generator=g, dtype=torch.float64)


# -- the estimator --------------------------------------------------------------------------------


def test_hand_worked_delta_kernel_m4():
    # k(a, b) = [a == b] on labels 0, 0, 1, 1: K̃ = L̃ has ones at (0,1), (1,0), (2,3), (3,2).
    # tr(K̃L̃) = 4; (1ᵀK̃1)(1ᵀL̃1)/((m−1)(m−2)) = 16/6; K̃L̃ = I so 2/(m−2)·1ᵀK̃L̃1 = 4;
    # HSIC₁ = (4 + 8/3 − 4) / (4·1) = 2/3.
    labels = torch.tensor([0, 0, 1, 1])
    K = (labels[:, None] == labels[None, :]).double()
    assert unbiased_hsic(K, K).item() == pytest.approx(2 / 3)
    assert u_statistic_hsic(K, K) == pytest.approx(2 / 3)


@pytest.mark.parametrize("kernel", ["rbf", "linear"])
def test_unbiased_hsic_equals_loop_formula_and_u_statistic_m5(kernel):
    x, y = _features(5, 3, 0), _features(5, 2, 1)
    y = y + 0.5 * x[:, :2]  # some dependence so the value is not ≈ 0
    K, L = kernel_matrix(x, kernel, 1.0), kernel_matrix(y, kernel, 1.0)
    value = unbiased_hsic(K, L).item()
    assert value == pytest.approx(loop_unbiased_hsic(K, L), rel=1e-12, abs=1e-14)
    assert value == pytest.approx(u_statistic_hsic(K, L), rel=1e-10, abs=1e-14)
    assert hsic(x, y, kernel=kernel, sigma=1.0).item() == pytest.approx(value, rel=1e-12)


def test_joint_permutation_invariance():
    x, y = _features(9, 4, 2), _features(9, 3, 3)
    y[:, 0] += x[:, 0] ** 2
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    for estimator in ("unbiased", "biased"):
        a = hsic(x, y, estimator=estimator).item()
        b = hsic(x[perm], y[perm], estimator=estimator).item()
        assert a == pytest.approx(b, rel=1e-10)


def test_diagonal_masking_is_correct_for_linear_kernel():
    """The linear kernel has a varying diagonal ‖x_j‖²: vector subtraction gives a wrong value."""
    x, y = _features(6, 3, 4), _features(6, 3, 5)
    y = y + x
    K, L = linear_kernel(x), linear_kernel(y)
    ours = unbiased_hsic(K, L).item()
    assert ours == pytest.approx(loop_unbiased_hsic(K, L), rel=1e-12)
    assert ours == pytest.approx(u_statistic_hsic(K, L), rel=1e-10)
    assert abs(reference_style_unbiased_hsic(K, L).item() - ours) > 1e-3
    # for the RBF kernel (unit diagonal) the reference's shortcut happens to agree
    K, L = rbf_kernel(x, 2.0), rbf_kernel(y, 2.0)
    assert reference_style_unbiased_hsic(K, L).item() == pytest.approx(unbiased_hsic(K, L).item(), rel=1e-9)


def test_unbiased_hsic_ignores_a_constant_added_to_the_kernel():
    x, y = _features(7, 2, 6), _features(7, 2, 7) + _features(7, 2, 6)
    K, L = rbf_kernel(x), rbf_kernel(y)
    assert unbiased_hsic(K + 3.0, L - 0.5).item() == pytest.approx(unbiased_hsic(K, L).item(), rel=1e-9, abs=1e-14)


def test_independent_inputs_average_to_zero_dependent_inputs_do_not():
    draws, m = 64, 32
    indep, dep, biased_indep = [], [], []
    for s in range(draws):
        x, y = _features(m, 3, 100 + s), _features(m, 2, 1000 + s)
        indep.append(hsic(x, y).item())
        biased_indep.append(hsic(x, y, estimator="biased").item())
        dep.append(hsic(x, torch.cat([x[:, :1] ** 2, torch.tanh(x[:, 1:2])], dim=1)).item())
    indep, dep, biased_indep = map(lambda v: torch.tensor(v, dtype=torch.float64), (indep, dep, biased_indep))
    se = indep.std() / math.sqrt(draws)
    # unbiased: the mean over draws is within noise of 0 (≈ 4.5σ would be a 1-in-10⁵ event)
    assert abs(indep.mean().item()) < 4.5 * se.item()
    assert indep.min() < 0 < indep.max()  # single draws scatter on both sides of 0
    # strongly dependent inputs: far above that noise, every draw
    assert dep.mean() > 8 * indep.std() and bool((dep > indep.abs().max()).all())
    # the biased HSIC₀ is positive even for independent inputs (its O(1/m) bias)
    assert biased_indep.mean() > 10 * biased_indep.std() / math.sqrt(draws)
    assert bool((biased_indep > 0).all())


def test_identical_inputs_give_clearly_positive_hsic():
    x = _features(16, 4, 8)
    noise = abs(hsic(x, _features(16, 4, 9)).item())  # an independent draw: ≈ 0.002
    assert hsic(x, x).item() > max(0.01, 5 * noise)
    assert hsic(x, x, sigma="median").item() > max(0.01, 5 * noise)
    assert hsic(x, 2 * x + 1, kernel="linear").item() > 1.0


def test_small_batches_and_bad_shapes_are_refused():
    x = _features(3, 2, 0)
    with pytest.raises(ValueError, match="at least 4 samples"):
        hsic(x, x)
    assert hsic(x, x, estimator="biased").item() >= 0
    with pytest.raises(ValueError, match="same number of samples"):
        hsic(_features(5, 2, 0), _features(6, 2, 0))
    with pytest.raises(ValueError, match="m×m"):
        unbiased_hsic(torch.ones(4, 4), torch.ones(5, 5))
    with pytest.raises(ValueError, match="unknown kernel"):
        kernel_matrix(x, "poly")
    with pytest.raises(ValueError, match="sigma"):
        rbf_kernel(x, 0.0)
    with pytest.raises(ValueError, match="sigma"):
        rbf_kernel(x, "mean")


# -- kernels and the median heuristic --------------------------------------------------------------


def test_rbf_kernel_is_symmetric_with_unit_diagonal_and_matches_definition():
    x = _features(10, 5, 9) * 3 + 100.0  # a large offset: the distances must stay accurate
    x[3] = x[7]  # a duplicate sample
    K = rbf_kernel(x, 2.5)
    assert torch.equal(K, K.T)
    assert torch.equal(torch.diagonal(K), torch.ones(10, dtype=torch.float64))
    direct = torch.exp(-torch.cdist(x, x) ** 2 / (2 * 2.5**2))
    torch.testing.assert_close(K, direct, rtol=1e-10, atol=1e-12)
    assert K[3, 7].item() == 1.0
    assert bool(((K > 0) & (K <= 1)).all())
    d = pairwise_squared_distances(x.float())
    assert d.dtype == torch.float32 and bool((d >= 0).all()) and torch.equal(d, d.T)


def test_median_heuristic_hand_example():
    # distances between 0, 1, 3, 7: 1, 3, 7, 2, 6, 4 → sorted 1 2 3 4 6 7 → median (3 + 4)/2
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]], requires_grad=True)
    sigma = median_distance(x)
    assert sigma.item() == pytest.approx(3.5)
    assert not sigma.requires_grad
    # odd count: 0, 1, 3 → distances 1, 3, 2 → median 2; the kernel is exp(−d²/(2·2²))
    x3 = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    assert median_distance(x3).item() == pytest.approx(2.0)
    K = rbf_kernel(x3, "median")
    assert K[0, 1].item() == pytest.approx(math.exp(-1 / 8))
    assert K[0, 2].item() == pytest.approx(math.exp(-9 / 8))
    assert K[1, 2].item() == pytest.approx(math.exp(-1 / 2))  # at the median distance: e^(−1/2)
    # several dimensions: Euclidean distance; degenerate batches give a tiny positive radius
    assert median_distance(torch.tensor([[0.0, 0.0], [3.0, 4.0]])).item() == pytest.approx(5.0)
    assert 0 < median_distance(torch.ones(5, 3)).item() < 1e-6
    assert torch.isfinite(rbf_kernel(torch.ones(5, 3), "median")).all()


# -- gradients and precision ---------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["rbf", "linear"])
def test_gradcheck_float64(kernel):
    x = _features(6, 3, 10).requires_grad_()
    y = (_features(6, 2, 11) + x[:, :2].detach()).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: hsic(a, b, kernel=kernel, sigma=1.5), (x, y))
    assert torch.autograd.gradcheck(lambda a, b: hsic(a, b, kernel=kernel, estimator="biased"), (x, y))


def test_gradients_finite_with_median_heuristic_and_duplicates():
    x = _features(8, 4, 12).float()
    x[1] = x[0]
    x.requires_grad_()
    y = torch.tanh(x.detach()[:, :2]).requires_grad_()
    value = hsic(x, y, sigma="median")
    value.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    assert x.grad.abs().sum() > 0


def test_computed_in_float32_under_bf16_autocast():
    x = _features(12, 8, 13).float()
    y = x[:, :4] ** 2
    expected = hsic(x, y).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = hsic(x, y)
        low = hsic(x.bfloat16(), y.bfloat16())
    assert value.dtype == torch.float32 and low.dtype == torch.float32
    assert value.item() == pytest.approx(expected, rel=1e-5)
    assert low.item() == pytest.approx(expected, rel=0.05)


# -- the method ------------------------------------------------------------------------------------------


def test_options_defaults_and_validation():
    o = ReBiasOptions()
    assert (o.lambda_, o.lambda_g, o.kernel, o.sigma, o.update_g) == (1.0, 1.0, "rbf", 1.0, True)
    assert o.hsic_features == "raw"  # the reference's: pooled features before any L2 normalisation
    assert o.biased_model == {"kernel_size": 1}
    assert ReBiasOptions(sigma="median").sigma == "median"
    for bad in ({"sigma": 0}, {"sigma": "mean"}, {"lambda_": -1}, {"kernel": "poly"}, {"alpha": 1}, {"hsic_features": "l2"}):
        with pytest.raises(ValidationError):
            ReBiasOptions(**bad)
    assert ReBias.requires_bias is False and ReBias.name == "rebias"


def _context(build=True, lr_step=None):
    build_model = (lambda **overrides: SimpleConvNet(3, **overrides)) if build else None
    return adam_context(32, 3, None, lr=1e-3, weight_decay=1e-4, lr_step=lr_step, gamma=0.1, build_model=build_model)


def _batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 3, 8, 8, generator=g) * 0.5
    x[:, 0] += t.view(-1, 1, 1).float()  # colour-like cue a 1×1 network can see
    return {"image": x, "target": t, "bias": torch.full((n,), -1), "index": torch.arange(n)}


def _setup(lr_step=None, **options):
    torch.manual_seed(0)
    model = SimpleConvNet(3, kernel_size=3)
    method = ReBias(ReBiasOptions(**options))
    method.setup(model, _context(lr_step=lr_step))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    return model, method, optimizer


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _changed(before, module):
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


def test_setup_needs_a_model_factory_and_builds_a_1x1_network():
    method = ReBias()
    with pytest.raises(ValueError, match="build_model"):
        method.setup(SimpleConvNet(3, kernel_size=3), _context(build=False))
    model, method, _ = _setup()
    convs = [m for m in method.biased.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.kernel_size == (1, 1) for c in convs)
    assert any(k.startswith("biased.") for k in method.state_dict())


def test_short_training_run_updates_both_networks_with_finite_logs():
    model, method, optimizer = _setup()
    f_before, g_before = _params(model), _params(method.biased)
    for step in range(2):
        logs = method.update(model, _batch(seed=step), optimizer, nullcontext)
        assert set(logs) == {"loss", "ce", "hsic", "ce_g", "accuracy_g", "accuracy"}
        assert all(torch.isfinite(v) and v.dim() == 0 and not v.requires_grad for v in logs.values())
        assert logs["loss"].item() == pytest.approx(logs["ce"].item() + logs["hsic"].item(), rel=1e-5)
    assert _changed(f_before, model) and _changed(g_before, method.biased)


def test_frozen_g_and_tiny_batches():
    model, method, optimizer = _setup(update_g=False, sigma="median")
    f_before, g_before = _params(model), copy.deepcopy(method.biased.state_dict())
    logs = method.update(model, _batch(), optimizer, nullcontext)
    assert _changed(f_before, model)
    assert all(torch.equal(p, g_before[k]) for k, p in method.biased.named_parameters())
    assert torch.isfinite(logs["hsic"]) and logs["hsic"].item() != 0
    # fewer than 4 samples: the HSIC term is skipped, training goes on
    model, method, optimizer = _setup()
    logs = method.update(model, _batch(n=3), optimizer, nullcontext)
    assert logs["hsic"].item() == 0 and torch.isfinite(logs["loss"])
    # λ = 0: HSIC is still logged, the loss is the cross-entropy
    model, method, optimizer = _setup(lambda_=0.0)
    logs = method.update(model, _batch(), optimizer, nullcontext)
    assert logs["loss"].item() == logs["ce"].item() and logs["hsic"].item() != 0


@pytest.mark.parametrize("which", ["raw", "bottleneck"])
def test_hsic_sees_raw_pooled_features_or_the_bottleneck(which):
    """Frozen G and λ = 0: the logged HSIC is HSIC₁ of the features F and G had before the step."""
    model, method, optimizer = _setup(update_g=False, lambda_=0.0, hsic_features=which)
    x = _batch()["image"]
    with torch.no_grad():  # train mode: BatchNorm uses the batch statistics, as in the update
        pooled_f = model.pool(model.extractor(x)).flatten(1)
        pooled_g = method.biased.pool(method.biased.extractor(x)).flatten(1)
    normed_f, normed_g = torch.nn.functional.normalize(pooled_f, dim=1), torch.nn.functional.normalize(pooled_g, dim=1)
    assert not torch.allclose(pooled_f, normed_f)  # the model normalises its bottleneck
    logs = method.update(model, _batch(), optimizer, nullcontext)
    raw, bottleneck = hsic(pooled_f, pooled_g).item(), hsic(normed_f, normed_g).item()
    assert raw != pytest.approx(bottleneck, rel=1e-3)  # the two are different kernels
    assert logs["hsic"].item() == pytest.approx(raw if which == "raw" else bottleneck, rel=1e-5)


def test_raw_hsic_trains_f_through_the_pooled_features():
    model, method, optimizer = _setup(update_g=False)
    before = _params(model)
    logs = method.update(model, _batch(), optimizer, nullcontext)
    assert logs["hsic"].item() != 0 and _changed(before, model)
    # the hook is removed after the step: later forward passes are not captured
    assert not model.bottleneck._forward_hooks


def test_update_under_bf16_autocast_has_finite_logs():
    model, method, optimizer = _setup()
    logs = method.update(model, _batch(), optimizer, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert all(torch.isfinite(v) for v in logs.values())
    assert logs["hsic"].dtype == torch.float32


def _snapshot(model, method, optimizer):
    buf = io.BytesIO()
    state = {
        "model": model.state_dict(),
        "method": method.state_dict(),
        "extra": method.extra_state(),
        "optimizer": optimizer.state_dict(),
    }
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_save_restore_reproduces_the_next_step():
    model, method, optimizer = _setup(lr_step=1)
    for step in range(2):
        method.update(model, _batch(seed=step), optimizer, nullcontext)
    method.on_epoch_end(1)  # G's own StepLR(1): its lr drops to 1e-4
    assert method.g_optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    state = _snapshot(model, method, optimizer)
    logs = method.update(model, _batch(seed=5), optimizer, nullcontext)

    torch.manual_seed(123)  # fresh, differently initialised networks
    model2 = SimpleConvNet(3, kernel_size=3)
    method2 = ReBias(ReBiasOptions())
    method2.setup(model2, _context(lr_step=1))
    optimizer2 = torch.optim.Adam(model2.parameters(), lr=1e-3, weight_decay=1e-4)
    model2.load_state_dict(state["model"])
    method2.load_state_dict(state["method"])
    method2.load_extra_state(state["extra"])
    optimizer2.load_state_dict(state["optimizer"])
    assert method2.g_optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    logs2 = method2.update(model2, _batch(seed=5), optimizer2, nullcontext)

    for k in logs:
        assert torch.equal(logs[k], logs2[k]), k
    assert_same_tensors(model, model2)
    assert_same_tensors(method, method2)
    with pytest.raises(CheckpointError):
        method2.load_extra_state({})


def test_trainer_resume_continues_exactly(tmp_path):
    """Through the real Trainer: G, its optimiser and its StepLR survive an interruption."""
    from cxrdebias.data.base import TensorBatchLoader, TensorSamples
    from cxrdebias.experiments.config import load_config
    from cxrdebias.training.device import seed_everything
    from cxrdebias.training.runs import RunDir
    from cxrdebias.training.trainer import Trainer

    b = _batch(n=32)
    data = TensorSamples(b["image"], b["target"], b["bias"], name="toy")

    def trainer(run):
        overrides = ["train.epochs=3", "train.batch_size=16", "train.progress=false", "train.precision=fp32", "train.lr_step=2"]
        cfg = load_config(None, overrides)
        seed_everything(0)
        return Trainer(
            SimpleConvNet(3, kernel_size=3),
            ReBias(ReBiasOptions(sigma="median")),
            TensorBatchLoader(data, 16, shuffle=True, seed=1),
            cfg.train,
            run=run,
            seed=0,
            fingerprint={"test": 1},
            build_model=lambda **overrides: SimpleConvNet(3, **overrides),
        )

    ref = trainer(RunDir.create(tmp_path / "ref"))
    history = ref.fit().history
    assert {"loss", "ce", "hsic", "ce_g", "accuracy_g", "accuracy"} <= set(history[0]["train"])
    assert ref.method.g_optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)  # G's StepLR(2) stepped

    resumed, _ = resume_after_interrupt(trainer, tmp_path / "run")
    assert_same_tensors(ref.model, resumed.model)
    assert_same_tensors(ref.method, resumed.method)


def test_capture_pooled_needs_a_bottleneck_module():
    from cxrdebias.models import capture_pooled

    with pytest.raises(ValueError, match="Linear has no 'bottleneck'"):
        with capture_pooled(torch.nn.Linear(2, 2)):
            pass


def test_a_model_without_a_bottleneck_module_gives_its_features_to_hsic():
    from cxrdebias.models import ModelOutput

    class Plain(torch.nn.Module):  # a user's model: no `bottleneck` module to read raw features from
        def __init__(self, **_overrides):
            super().__init__()
            self.fc = torch.nn.Linear(3 * 8 * 8, 3)

        def forward(self, x):
            f = x.flatten(1)
            return ModelOutput(self.fc(f), f)

    torch.manual_seed(0)
    model = Plain()
    method = ReBias(ReBiasOptions(update_g=False, lambda_=0.0))
    method.setup(model, adam_context(32, 3, None, lr=1e-3, weight_decay=1e-4, lr_step=None, gamma=0.1, build_model=Plain))
    x = _batch()["image"]
    expected = hsic(x.flatten(1), x.flatten(1)).item()  # F and G both see the flattened image
    logs = method.update(model, _batch(), torch.optim.Adam(model.parameters()), nullcontext)
    assert logs["hsic"].item() == pytest.approx(expected, rel=1e-5)
