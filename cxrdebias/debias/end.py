r"""EnD: Entangling and Disentangling deep representations (Tartaglione et al., CVPR 2021).

EnD regularises the bottleneck ``ỹ`` (L2-normalised features, eq. 2) of a classifier through
the Gram matrix of cosine similarities ``G = ỹ ỹᵀ`` (eq. 3), ``g_ij = ỹ_i · ỹ_j``:

* the **disentangling** term ``R⊥`` (eqs. 4–7) pushes towards orthogonality the samples that
  share a *bias* label, so the bias cannot become a direction of the representation;
* the **entangling** term ``R∥`` (eqs. 8–10) pulls together the samples that share the *target*
  but have *different* bias labels, so the class direction is shared across biases;
* the loss is ``L = CE + α·R⊥ + β·R∥`` (eq. 11).

Three forms, named for what they are (``docs/methods.md`` has the derivation, a worked example
and why the default is ours). ``B`` = bias classes present in the batch, ``N_b`` their number,
``n_b`` the samples of class ``b``, ``M`` the batch size, ``J_i = {j : t_j = t_i, b_j ≠ b_i}``:

``form="partner_mean"`` (default) — **this project's normalisation**, not the paper's:
    ``R⊥ = 1/|B*| Σ_{b∈B*} mean_{i≠j: b_i=b_j=b} |g_ij|`` over the classes ``B*`` with ≥ 2
    samples; ``R∥ = 1 − 1/|I*| Σ_{i∈I*} mean_{j∈J_i} g_ij`` over the samples ``I*`` that have
    a partner (``J_i ≠ ∅``). At high ρ few samples have a partner, and averaging over them
    only keeps the conflicting pairs' weight from shrinking with the batch's aligned majority.

``form="paper"`` — eq. 7 and eq. 10 as the paper writes them:
    ``R⊥ = 1/N_b Σ_{b∈B} mean_{i≠j: b_i=b_j=b} |g_ij|`` (a class with one sample has no pair:
    its mean, 0/0, is read as 0 but the class still counts in ``N_b``);
    ``R∥ = 1 − 1/M Σ_{i=1..M} mean_{j∈J_i} g_ij`` (a sample without partner contributes 0 and
    still counts in ``M``; a batch with no partner at all gives the constant 1, zero gradient).

``form="reference"`` — what the authors' public code computes
(EIDOSLAB/entangling-disentangling-bias, ``EnD.py``), on the strictly lower triangle of ``G``
clamped to ``[-1, 1]``:
    ``R⊥ = Σ_b |Σ_{i>j: b_i=b_j=b} g_ij| / Σ_b M_b`` (``|·|`` of each class's *sum*, so positive
    and negative similarities cancel; ``M_b`` = number of pairs of class ``b``);
    ``R∥ = mean over pairs (i > j, t_i = t_j, b_i < b_j) of (1 − g_ij)/2`` — the mask is
    asymmetric, so only the pairs whose smaller-bias member has the larger batch index count.

``R⊥ ∈ [0, 1]`` in every form; ``R∥ ∈ [0, 2]`` (paper, partner_mean) or ``[0, 1]`` (reference).
All are fully vectorised (no Python loop over classes or pairs), accept any integer target and
bias labels, and never give NaN in value or gradient. Without any pair a term is exactly 0 —
except the paper form's ``R∥``, which is then the constant 1 (eq. 10 with every inner mean 0).
The diagonal ``g_ii = 1`` never enters a term, so an orthonormal set of same-bias features
reaches the minimum ``R⊥ = 0``.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field

from cxrdebias.debias.base import Method, MethodOptions
from cxrdebias.distributed import gather_many

Form = Literal["partner_mean", "paper", "reference"]
FORMS: tuple[str, ...] = ("partner_mean", "paper", "reference")
#: the form used when a config says nothing (this project's normalisation, see the module doc)
DEFAULT_FORM: Form = "partner_mean"


class EnDTerms(NamedTuple):
    """``total = α·disentangle + β·entangle``; the two terms are unweighted."""

    total: torch.Tensor
    disentangle: torch.Tensor
    entangle: torch.Tensor


def gram_matrix(features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Cosine-similarity Gram matrix ``G = ỹ ỹᵀ`` (eq. 3), computed in at least float32."""
    f = features.flatten(1)
    if f.dtype in (torch.float16, torch.bfloat16):
        f = f.float()
    # outside autocast: under bf16 autocast the matmul would silently run in bf16
    with torch.autocast(device_type=f.device.type, enabled=False):
        if normalize:
            f = F.normalize(f, p=2, dim=1)
        return f @ f.T


def _check(features: torch.Tensor, targets: torch.Tensor | None, biases: torch.Tensor) -> None:
    n = features.shape[0]
    if features.dim() < 2:
        raise ValueError(f"features must be N×D (got shape {tuple(features.shape)})")
    for name, labels in (("targets", targets), ("biases", biases)):
        if labels is not None and labels.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},) to match features, got {tuple(labels.shape)}")


def _same(labels: torch.Tensor) -> torch.Tensor:
    return labels[:, None] == labels[None, :]


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num/den`` where ``den > 0``, else 0 — without a NaN in either value or gradient."""
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))


def disentangling_term(
    features: torch.Tensor,
    biases: torch.Tensor,
    *,
    form: Form = DEFAULT_FORM,
    normalize: bool = True,
    gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """``R⊥`` (paper eqs. 4–7): similarity between samples that share a bias label.

    1 when all same-bias features are identical, 0 when they are pairwise orthogonal.
    """
    _check(features, None, biases)
    G = gram_matrix(features, normalize) if gram is None else gram
    n = G.shape[0]
    if n < 2:
        return G.sum() * 0.0  # no pair: zero, still attached to the graph
    _, bias_idx = torch.unique(biases, return_inverse=True)
    k = int(bias_idx.max()) + 1
    counts = torch.bincount(bias_idx, minlength=k).to(G.dtype)
    same = _same(bias_idx)
    if form in ("paper", "partner_mean"):
        off_diagonal = ~torch.eye(n, dtype=torch.bool, device=G.device)
        pair_sums = (G.abs() * (same & off_diagonal)).sum(dim=1)
        class_sums = torch.zeros(k, dtype=G.dtype, device=G.device).index_add(0, bias_idx, pair_sums)
        pairs = counts * (counts - 1)
        per_class = _safe_ratio(class_sums, pairs)  # mean |g_ij| of each class; 0 without a pair
        if form == "paper":  # eq. 7: the mean over all N_b bias classes of the batch
            return per_class.sum() / k
        return _safe_ratio(per_class.sum(), (pairs > 0).sum().to(G.dtype))
    if form == "reference":
        G = G.clamp(-1.0, 1.0)
        lower = torch.ones(n, n, dtype=torch.bool, device=G.device).tril(-1)
        pair_sums = (G * (same & lower)).sum(dim=1)
        class_sums = torch.zeros(k, dtype=G.dtype, device=G.device).index_add(0, bias_idx, pair_sums)
        pairs = counts * (counts - 1) / 2
        return _safe_ratio(class_sums.abs().sum(), pairs.sum())
    raise ValueError(f"unknown EnD form {form!r}; expected one of {FORMS}")


def entangling_term(
    features: torch.Tensor,
    targets: torch.Tensor,
    biases: torch.Tensor,
    *,
    form: Form = DEFAULT_FORM,
    normalize: bool = True,
    gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """``R∥`` (paper eqs. 8–10): dissimilarity of same-target samples with different biases.

    0 when those features are identical (for the paper form: when every sample has a partner);
    the maximum (2 for the paper and partner_mean forms, 1 for the reference form) when they
    are opposite.
    """
    _check(features, targets, biases)
    G = gram_matrix(features, normalize) if gram is None else gram
    n = G.shape[0]
    same_target = _same(targets)
    if form in ("paper", "partner_mean"):
        mask = same_target & ~_same(biases)
        partners = mask.sum(dim=1).to(G.dtype)
        mean_similarity = _safe_ratio((G * mask).sum(dim=1), partners)  # 0 without a partner
        if form == "paper":  # eq. 10: the mean over all M samples of the batch
            return 1.0 - mean_similarity.sum() / n
        n_valid = (partners > 0).sum().to(G.dtype)
        mean_over_i = _safe_ratio(mean_similarity.sum(), n_valid)
        return torch.where(n_valid > 0, 1.0 - mean_over_i, torch.zeros_like(mean_over_i))
    if form == "reference":
        G = G.clamp(-1.0, 1.0)
        lower = torch.ones(n, n, dtype=torch.bool, device=G.device).tril(-1)
        mask = same_target & (biases[:, None] < biases[None, :]) & lower
        return _safe_ratio(((1.0 - G) / 2 * mask).sum(), mask.sum().to(G.dtype))
    raise ValueError(f"unknown EnD form {form!r}; expected one of {FORMS}")


def end_regularizer(
    features: torch.Tensor,
    targets: torch.Tensor,
    biases: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 1.0,
    *,
    form: Form = DEFAULT_FORM,
    normalize: bool = True,
    return_terms: bool = False,
) -> torch.Tensor | EnDTerms:
    """EnD regulariser ``R = α·R⊥ + β·R∥`` (eq. 11 without the cross-entropy).

    Args:
        features: ``N×D`` bottleneck features (any float dtype; computed in ≥ float32).
        targets: ``N`` integer class labels.
        biases: ``N`` integer bias labels (any values: colours, site ids …).
        alpha: weight of the disentangling term ``R⊥``; the term is skipped when 0.
        beta: weight of the entangling term ``R∥``; the term is skipped when 0.
        form: ``"partner_mean"`` (default, this project's normalisation), ``"paper"`` (eqs. 7
            and 10 as written) or ``"reference"`` (the authors' code), see the module doc.
        normalize: L2-normalise the features first (idempotent on normalised features).
        return_terms: return :class:`EnDTerms` (total and both unweighted terms, both always
            computed) instead of the scalar ``R``.
    """
    if form not in FORMS:
        raise ValueError(f"unknown EnD form {form!r}; expected one of {FORMS}")
    _check(features, targets, biases)
    G = gram_matrix(features, normalize)
    zero = G.new_zeros(())
    r_perp = disentangling_term(features, biases, form=form, gram=G) if (alpha or return_terms) else zero
    r_par = entangling_term(features, targets, biases, form=form, gram=G) if (beta or return_terms) else zero
    total = (alpha * r_perp if alpha else zero) + (beta * r_par if beta else zero)
    if return_terms:
        return EnDTerms(total, r_perp, r_par)
    return total


# -- the method (plugs into the trainer) ----------------------------------------------------


class EnDOptions(MethodOptions):
    alpha: float = Field(0.1, ge=0, description="weight of the disentangling term R⊥")
    beta: float = Field(0.1, ge=0, description="weight of the entangling term R∥")
    form: Form = Field(
        DEFAULT_FORM,
        description="'partner_mean' (this project's normalisation), 'paper' (eqs. 7 and 10 as written) "
        "or 'reference' (the authors' code)",
    )


class EnD(Method):
    """``CE + α·R⊥ + β·R∥`` on the model's bottleneck features (eq. 11)."""

    name = "end"
    summary = "EnD: disentangle same-bias, entangle same-target/different-bias features"
    requires_bias = True
    feature_activation = "tanh"
    Options = EnDOptions

    def compute_loss(self, model, batch, output):
        o = self.options
        ce = self.classification_loss(output.logits, batch["target"])
        # under torchrun the Gram matrix spans the global batch (gradients reach each rank's rows)
        features, target, bias = gather_many(output.features, batch["target"], batch["bias"])
        terms = end_regularizer(features, target, bias, o.alpha, o.beta, form=o.form, return_terms=True)
        logs = {"ce": ce.detach(), "R_perp": terms.disentangle.detach(), "R_par": terms.entangle.detach()}
        return ce + terms.total, logs
