"""EnD regulariser: hand-computed values, properties, gradients, edge cases."""

import math

import pytest
import torch

from cxrdebias.debias.end import (
    DEFAULT_FORM,
    EnDOptions,
    EnDTerms,
    disentangling_term,
    end_regularizer,
    entangling_term,
)

FORMS = ["partner_mean", "paper", "reference"]
S = 1 / math.sqrt(2)


def _hand_batch():
    # five 2-D unit vectors; Gram entries are 0, ±1 and ±1/√2 (worked out in docs/methods.md)
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [S, S], [-1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    t = torch.tensor([0, 0, 1, 1, 0])
    b = torch.tensor([0, 1, 0, 1, 0])
    return f, t, b


def test_hand_worked_batch_partner_mean_form():
    f, t, b = _hand_batch()
    # bias 0 = {0, 2, 4}: |g02| = |g24| = 1/√2, |g04| = 0 → mean √2/3; bias 1 = {1, 3}: g13 = 0
    assert disentangling_term(f, b, form="partner_mean").item() == pytest.approx(math.sqrt(2) / 6)
    # per-sample means over same-target/other-bias partners: 0, -1/2, -1/√2, -1/√2, -1
    assert entangling_term(f, t, b, form="partner_mean").item() == pytest.approx(1.3 + math.sqrt(2) / 5)
    total = end_regularizer(f, t, b, alpha=0.5, beta=2.0, form="partner_mean")
    assert total.item() == pytest.approx(0.5 * math.sqrt(2) / 6 + 2 * (1.3 + math.sqrt(2) / 5))


def _eq_batch():
    """4 samples, 2 targets, 2 biases; a bias class with one sample and two samples without partner.

    ỹ0 = (1, 0), ỹ1 = (0.6, 0.8), ỹ2 = (0, 1), ỹ3 = (-0.6, 0.8) (unit vectors), so
    g01 = 0.6, g02 = 0, g03 = -0.6, g12 = 0.8, g13 = -0.36 + 0.64 = 0.28, g23 = 0.8.
    t = (0, 0, 1, 1), b = (1, 0, 0, 0): bias 0 = {1, 2, 3}, bias 1 = {0} (no pair);
    partners J_i (same target, other bias): J_0 = {1}, J_1 = {0}, J_2 = J_3 = ∅.
    """
    f = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8]], dtype=torch.float64)
    return f, torch.tensor([0, 0, 1, 1]), torch.tensor([1, 0, 0, 0])


def test_eq7_on_a_hand_worked_batch():
    f, _, b = _eq_batch()
    # bias 0: mean over its 6 ordered pairs of |g| = 2·(0.8 + 0.28 + 0.8)/6 = 0.62667 (= 47/75);
    # bias 1 has no pair: its mean (0/0) reads 0. Eq. 7 averages over N_b = 2 classes: 47/150.
    assert disentangling_term(f, b, form="paper").item() == pytest.approx(47 / 150)
    # partner_mean averages over the one class with a pair: 47/75
    assert disentangling_term(f, b, form="partner_mean").item() == pytest.approx(47 / 75)
    # reference: |g21 + g31 + g32| / 3 pairs = |0.8 + 0.28 + 0.8| / 3 = 47/75 (all positive: nothing cancels)
    assert disentangling_term(f, b, form="reference").item() == pytest.approx(47 / 75)


def test_eq10_on_a_hand_worked_batch():
    f, t, b = _eq_batch()
    # mean similarity to the partners: i=0: g01 = 0.6; i=1: g10 = 0.6; i=2, i=3: no partner → 0.
    # Eq. 10 averages over all M = 4 samples: 1 − (0.6 + 0.6)/4 = 0.7
    assert entangling_term(f, t, b, form="paper").item() == pytest.approx(0.7)
    # partner_mean averages over the 2 samples with a partner: 1 − 1.2/2 = 0.4
    assert entangling_term(f, t, b, form="partner_mean").item() == pytest.approx(0.4)
    # reference: the one pair with i > j, t_i = t_j, b_i < b_j is (1, 0): (1 − 0.6)/2 = 0.2
    assert entangling_term(f, t, b, form="reference").item() == pytest.approx(0.2)
    total = end_regularizer(f, t, b, alpha=2.0, beta=3.0, form="paper")
    assert total.item() == pytest.approx(2 * 47 / 150 + 3 * 0.7)


def test_eq10_weighs_a_partnered_sample_by_one_over_the_batch():
    """Gradient of eq. 10 w.r.t. a partner's similarity is 1/M per direction; partner_mean's is 1/|I*|."""
    f, t, b = _eq_batch()
    g = torch.nn.functional.normalize(f, dim=1) @ torch.nn.functional.normalize(f, dim=1).T
    G = g.clone().requires_grad_(True)
    entangling_term(f, t, b, form="paper", gram=G).backward()
    assert G.grad[0, 1].item() == pytest.approx(-1 / 4) and G.grad[2, 3].item() == 0.0
    G.grad = None
    entangling_term(f, t, b, form="partner_mean", gram=G).backward()
    assert G.grad[0, 1].item() == pytest.approx(-1 / 2)


def test_hand_worked_batch_reference_form():
    f, t, b = _hand_batch()
    # the signed sum of bias class 0 cancels: 1/√2 + 0 - 1/√2 = 0 (partner_mean form: √2/6)
    assert disentangling_term(f, b, form="reference").item() == pytest.approx(0.0, abs=1e-12)
    # only pair (i=4, j=1) satisfies i > j, t_i = t_j, b_i < b_j: g41 = -1 → (1 - (-1))/2 = 1
    assert entangling_term(f, t, b, form="reference").item() == pytest.approx(1.0)
    terms = end_regularizer(f, t, b, alpha=0.5, beta=2.0, form="reference", return_terms=True)
    assert isinstance(terms, EnDTerms)
    assert terms.total.item() == pytest.approx(2.0)


@pytest.mark.parametrize("form", FORMS)
def test_identical_same_bias_features_give_one(form):
    f = torch.tensor([[0.6, 0.8]] * 4)
    b = torch.zeros(4, dtype=torch.long)
    assert disentangling_term(f, b, form=form).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("form", FORMS)
def test_orthonormal_same_bias_features_give_zero(form):
    f = torch.eye(5)
    b = torch.tensor([3, 3, 3, 7, 7])
    assert disentangling_term(f, b, form=form).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("form", FORMS)
def test_identical_same_target_different_bias_gives_zero(form):
    f = torch.tensor([[1.0, 2.0, 2.0]] * 4)
    t = torch.tensor([0, 0, 1, 1])
    b = torch.tensor([0, 1, 0, 1])
    assert entangling_term(f, t, b, form=form).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("form,maximum", [("partner_mean", 2.0), ("paper", 2.0), ("reference", 1.0)])
def test_opposite_same_target_different_bias_gives_maximum(form, maximum):
    v = torch.tensor([0.3, -0.4, 0.5])
    # sample 0 has the larger bias label, so the reference form's mask (i > j, b_i < b_j) counts the pair
    f = torch.stack([v, -v])
    t = torch.tensor([2, 2])
    b = torch.tensor([1, 0])
    assert entangling_term(f, t, b, form=form).item() == pytest.approx(maximum)


def test_reference_entangling_term_counts_one_order_only():
    """The authors' mask is asymmetric: swapping the two samples drops the only pair."""
    v = torch.tensor([1.0, 0.0])
    f = torch.stack([v, -v])
    t = torch.tensor([0, 0])
    assert entangling_term(f, t, torch.tensor([1, 0]), form="reference").item() == pytest.approx(1.0)
    assert entangling_term(f, t, torch.tensor([0, 1]), form="reference").item() == 0.0
    # the paper and partner_mean forms do not depend on the order
    for form in ("paper", "partner_mean"):
        assert entangling_term(f, t, torch.tensor([1, 0]), form=form).item() == pytest.approx(2.0)
        assert entangling_term(f, t, torch.tensor([0, 1]), form=form).item() == pytest.approx(2.0)


def _random_batch(n=64, d=16, k_t=4, k_b=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, d, generator=g, dtype=dtype)
    t = torch.randint(0, k_t, (n,), generator=g)
    b = torch.randint(0, k_b, (n,), generator=g)
    return f, t, b


@pytest.mark.parametrize("form", FORMS)
def test_matches_loop_over_classes_and_pairs(form):
    """The vectorised terms equal a direct transcription of the definitions."""
    f, t, b = _random_batch(n=40, k_t=3, k_b=8, seed=3)
    b[b == 7] = 6  # bias 6 and 7 merged; bias 5 …: make one class a singleton below
    b[(b == 5).nonzero()[1:]] = 4
    assert (b == 5).sum() == 1  # a class with no pair: eq. 7 and partner_mean differ
    fn = torch.nn.functional.normalize(f, dim=1)
    G = fn @ fn.T
    n = len(t)
    if form in ("paper", "partner_mean"):
        per_class = []  # (mean |g_ij| of the class's pairs, or None without a pair)
        for c in b.unique():
            idx = [i for i in range(n) if b[i] == c]
            pairs = [abs(G[i, j].item()) for i in idx for j in idx if i != j]
            per_class.append(sum(pairs) / len(pairs) if pairs else None)
        means = []  # per sample: mean g_ij over its partners, or None without a partner
        for i in range(n):
            js = [j for j in range(n) if t[j] == t[i] and b[j] != b[i]]
            means.append(sum(G[i, j].item() for j in js) / len(js) if js else None)
        if form == "paper":  # eq. 7: 1/N_b Σ_b; eq. 10: 1 − 1/M Σ_i (an empty mean counts as 0)
            r_perp = sum(m or 0.0 for m in per_class) / len(per_class)
            r_par = 1 - sum(m or 0.0 for m in means) / n
        else:
            has = [m for m in per_class if m is not None]
            r_perp = sum(has) / len(has)
            partnered = [m for m in means if m is not None]
            r_par = 1 - sum(partnered) / len(partnered)
    else:
        total, m_tot = 0.0, 0
        for c in b.unique():
            pairs = [G[i, j].item() for i in range(n) for j in range(i) if b[i] == c and b[j] == c]
            total += abs(sum(pairs))
            m_tot += len(pairs)
        r_perp = total / m_tot
        vals = [
            (1 - G[i, j].item()) / 2
            for i in range(n)
            for j in range(i)
            if t[i] == t[j] and b[i] < b[j]
        ]
        r_par = sum(vals) / len(vals)
    terms = end_regularizer(f, t, b, return_terms=True, form=form)
    assert terms.disentangle.item() == pytest.approx(r_perp, rel=1e-10)
    assert terms.entangle.item() == pytest.approx(r_par, rel=1e-10)


@pytest.mark.parametrize("form", FORMS)
def test_permutation_invariance(form):
    f, t, b = _random_batch(seed=1)
    perm = torch.randperm(len(t), generator=torch.Generator().manual_seed(5))
    a = end_regularizer(f, t, b, return_terms=True, form=form)
    p = end_regularizer(f[perm], t[perm], b[perm], return_terms=True, form=form)
    assert p.disentangle.item() == pytest.approx(a.disentangle.item(), rel=1e-10)
    if form != "reference":
        assert p.entangle.item() == pytest.approx(a.entangle.item(), rel=1e-10)


@pytest.mark.parametrize("form", FORMS)
def test_label_values_do_not_matter(form):
    f, t, b = _random_batch(seed=2)
    # any integer ids: relabel with an order-preserving map (the reference form's R∥ uses the order)
    a = end_regularizer(f, t, b, return_terms=True, form=form)
    c = end_regularizer(f, t * 10 - 3, b * 7 + 100, return_terms=True, form=form)
    assert torch.allclose(torch.stack(a), torch.stack(c))


@pytest.mark.parametrize("form", FORMS)
def test_gradcheck_float64(form):
    f, t, b = _random_batch(n=12, d=5, k_t=2, k_b=3, seed=4)
    f.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: end_regularizer(x, t, b, alpha=0.7, beta=1.3, form=form), (f,), eps=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(
    "t,b",
    [
        ([0], [0]),  # one sample
        ([0, 1, 2], [0, 1, 2]),  # no pair shares a bias or a target
        ([0, 0, 0], [1, 1, 1]),  # one bias: no same-target/different-bias pair
        ([0, 1, 0, 1], [0, 1, 1, 0]),  # unique biases per target... both terms defined
    ],
)
def test_empty_groups_are_zero_without_nan(form, t, b):
    t, b = torch.tensor(t), torch.tensor(b)
    f = torch.randn(len(t), 3, dtype=torch.float64, requires_grad=True)
    terms = end_regularizer(f, t, b, return_terms=True, form=form)
    for v in terms:
        assert torch.isfinite(v)
    terms.total.backward()
    assert torch.isfinite(f.grad).all()
    if len(set(b.tolist())) == len(b):
        assert terms.disentangle.item() == 0.0
    if not any(t[i] == t[j] and b[i] != b[j] for i in range(len(t)) for j in range(len(t))):
        # eq. 10 with every inner mean 0 is the constant 1 (zero gradient); the others read 0
        assert terms.entangle.item() == (1.0 if form == "paper" else 0.0)


def _labels_where_all_have_partners(n=24, seed=0):
    """Every (target, bias) cell has ≥ 2 samples: every sample has a partner, every class a pair."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) % 3
    b = (torch.arange(n) // 3) % 2
    f = torch.randn(n, 6, generator=g, dtype=torch.float64)
    return f, t, b


def test_paper_and_partner_mean_agree_when_every_sample_has_a_partner():
    f, t, b = _labels_where_all_have_partners()
    p = end_regularizer(f, t, b, return_terms=True, form="paper")
    q = end_regularizer(f, t, b, return_terms=True, form="partner_mean")
    assert torch.allclose(torch.stack(p), torch.stack(q), rtol=1e-12)


def test_paper_is_partner_mean_scaled_by_the_share_with_pairs():
    """1 − R∥_paper = |I*|/M · (1 − R∥_partner_mean); R⊥_paper = |B*|/N_b · R⊥_partner_mean."""
    f, t, b = _random_batch(n=30, k_t=3, k_b=4, seed=9)
    b[t == 2] = 0  # target 2 has one bias only: its samples have no partner
    b[(t == 0).nonzero()[0]] = 99  # a bias class with one sample
    p = end_regularizer(f, t, b, return_terms=True, form="paper")
    q = end_regularizer(f, t, b, return_terms=True, form="partner_mean")
    partnered = ((t[:, None] == t[None, :]) & (b[:, None] != b[None, :])).any(dim=1).sum().item()
    counts = torch.bincount(b)[b.unique()]
    with_pairs, n_b = (counts >= 2).sum().item(), len(counts)
    assert 0 < partnered < 30 and with_pairs < n_b  # the batch has both kinds
    assert 1 - p.entangle.item() == pytest.approx(partnered / 30 * (1 - q.entangle.item()), rel=1e-10)
    assert p.disentangle.item() == pytest.approx(with_pairs / n_b * q.disentangle.item(), rel=1e-10)


def test_default_form_is_partner_mean_everywhere():
    f, t, b = _eq_batch()
    assert DEFAULT_FORM == "partner_mean" and EnDOptions().form == "partner_mean"
    assert end_regularizer(f, t, b).item() == end_regularizer(f, t, b, form="partner_mean").item()


def test_zero_weight_skips_term():
    f, t, b = _random_batch(seed=6)
    r_par = entangling_term(f, t, b)
    r_perp = disentangling_term(f, b)
    assert end_regularizer(f, t, b, alpha=0.0, beta=2.0).item() == pytest.approx(2 * r_par.item())
    assert end_regularizer(f, t, b, alpha=3.0, beta=0.0).item() == pytest.approx(3 * r_perp.item())
    assert end_regularizer(f, t, b, alpha=0.0, beta=0.0).item() == 0.0


def test_normalisation_makes_scale_irrelevant():
    f, t, b = _random_batch(seed=7)
    scale = torch.rand(len(t), 1, dtype=f.dtype) * 10 + 0.1
    assert end_regularizer(f * scale, t, b).item() == pytest.approx(end_regularizer(f, t, b).item(), rel=1e-10)


def test_computed_in_float32_under_bf16_autocast():
    f, t, b = _random_batch(seed=8, dtype=torch.float32)
    ref = end_regularizer(f, t, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = end_regularizer(f, t, b)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)


def test_gradient_pushes_same_bias_features_apart():
    """One gradient step on R⊥ lowers the similarity of two same-bias features."""
    f = torch.tensor([[1.0, 0.2], [0.9, 0.4]], requires_grad=True)
    b = torch.tensor([0, 0])
    before = torch.nn.functional.cosine_similarity(f[0:1], f[1:2]).item()
    disentangling_term(f, b).backward()
    with torch.no_grad():
        g = f - 0.1 * f.grad
    after = torch.nn.functional.cosine_similarity(g[0:1], g[1:2]).item()
    assert after < before


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="targets"):
        end_regularizer(torch.randn(4, 3), torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="form"):
        end_regularizer(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), form="nope")


@pytest.mark.parametrize("form", FORMS)
def test_the_method_trains_with_every_form_and_logs_that_forms_terms(form):
    from cxrdebias.debias import build_method
    from cxrdebias.models import SimpleConvNet

    torch.manual_seed(0)
    model = SimpleConvNet(2, kernel_size=3, last_activation="tanh")
    method = build_method("end", {"alpha": 0.5, "beta": 2.0, "form": form})
    batch = {"image": torch.randn(6, 3, 8, 8), "target": torch.tensor([0, 0, 0, 1, 1, 1]), "bias": torch.tensor([0, 1, 0, 0, 0, 0])}
    output = model(batch["image"])
    loss, logs = method.compute_loss(model, batch, output)
    terms = end_regularizer(output.features.detach(), batch["target"], batch["bias"], 0.5, 2.0, form=form, return_terms=True)
    assert logs["R_perp"].item() == pytest.approx(terms.disentangle.item())
    assert logs["R_par"].item() == pytest.approx(terms.entangle.item())
    assert loss.item() == pytest.approx(logs["ce"].item() + terms.total.item(), rel=1e-6)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_an_unknown_form_in_a_config_is_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="partner_mean"):
        EnDOptions(form="ours")
