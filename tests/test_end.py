"""EnD regulariser: hand-computed values, properties, gradients, edge cases."""

import math

import pytest
import torch

from cxrdebias.debias.end import EnDTerms, disentangling_term, end_regularizer, entangling_term

FORMS = ["paper", "reference"]
S = 1 / math.sqrt(2)


def _hand_batch():
    # five 2-D unit vectors; Gram entries are 0, ±1 and ±1/√2 (worked out in docs/methods.md)
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [S, S], [-1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    t = torch.tensor([0, 0, 1, 1, 0])
    b = torch.tensor([0, 1, 0, 1, 0])
    return f, t, b


def test_hand_worked_batch_paper_form():
    f, t, b = _hand_batch()
    # bias 0 = {0, 2, 4}: |g02| = |g24| = 1/√2, |g04| = 0 → mean √2/3; bias 1 = {1, 3}: g13 = 0
    assert disentangling_term(f, b, form="paper").item() == pytest.approx(math.sqrt(2) / 6)
    # per-sample means over same-target/other-bias partners: 0, -1/2, -1/√2, -1/√2, -1
    assert entangling_term(f, t, b, form="paper").item() == pytest.approx(1.3 + math.sqrt(2) / 5)
    total = end_regularizer(f, t, b, alpha=0.5, beta=2.0, form="paper")
    assert total.item() == pytest.approx(0.5 * math.sqrt(2) / 6 + 2 * (1.3 + math.sqrt(2) / 5))


def test_hand_worked_batch_reference_form():
    f, t, b = _hand_batch()
    # the signed sum of bias class 0 cancels: 1/√2 + 0 - 1/√2 = 0 (paper form: √2/6)
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


@pytest.mark.parametrize("form,maximum", [("paper", 2.0), ("reference", 1.0)])
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
    # the paper form does not depend on the order
    assert entangling_term(f, t, torch.tensor([1, 0]), form="paper").item() == pytest.approx(2.0)
    assert entangling_term(f, t, torch.tensor([0, 1]), form="paper").item() == pytest.approx(2.0)


def _random_batch(n=64, d=16, k_t=4, k_b=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, d, generator=g, dtype=dtype)
    t = torch.randint(0, k_t, (n,), generator=g)
    b = torch.randint(0, k_b, (n,), generator=g)
    return f, t, b


@pytest.mark.parametrize("form", FORMS)
def test_matches_loop_over_classes_and_pairs(form):
    """The vectorised terms equal a direct transcription of the definitions."""
    f, t, b = _random_batch(n=40, k_t=3, k_b=4, seed=3)
    fn = torch.nn.functional.normalize(f, dim=1)
    G = fn @ fn.T
    n = len(t)
    if form == "paper":
        per_class = []
        for c in b.unique():
            idx = [i for i in range(n) if b[i] == c]
            pairs = [abs(G[i, j].item()) for i in idx for j in idx if i != j]
            if pairs:
                per_class.append(sum(pairs) / len(pairs))
        r_perp = sum(per_class) / len(per_class)
        means = []
        for i in range(n):
            js = [j for j in range(n) if t[j] == t[i] and b[j] != b[i]]
            if js:
                means.append(sum(G[i, j].item() for j in js) / len(js))
        r_par = 1 - sum(means) / len(means)
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
    if form == "paper":
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
        assert terms.entangle.item() == 0.0


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
