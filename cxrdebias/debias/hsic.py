r"""Hilbert–Schmidt Independence Criterion (HSIC) between two sets of features.

HSIC measures the statistical dependence of two random variables ``U`` and ``V`` through
kernels ``k`` on ``U`` and ``l`` on ``V``: with characteristic kernels (the RBF kernel is one)
it is 0 if and only if ``U`` and ``V`` are independent. ReBias (Bahng et al., ICML 2020,
Sec. 3) uses it to make the main network's features independent of a biased network's
features. Given ``m`` paired samples (the rows of two ``m×D`` feature matrices) we compute the
kernel matrices ``K_ij = k(u_i, u_j)`` and ``L_ij = l(v_i, v_j)`` and then one of

* **HSIC₁**, the *unbiased* estimator of Song et al. (JMLR 2012), used by ReBias. With
  ``K̃``, ``L̃`` the kernel matrices with their diagonals set to zero::

      HSIC₁ = [ tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1) / ((m−1)(m−2)) − 2/(m−2) · 1ᵀK̃L̃1 ] / (m(m−3))

  It is a U-statistic: its expectation is the population HSIC, so it is ≈ 0 *on average* for
  independent inputs (a single draw can be slightly negative). It needs ``m ≥ 4``; for smaller
  batches :func:`unbiased_hsic` raises :class:`ValueError` (the estimator is undefined there,
  and silently returning a number would hide a configuration problem — callers that may see
  tiny last batches, like the ReBias method, skip the term explicitly). HSIC₁ is unchanged when
  a constant is added to every kernel entry.

* **HSIC₀**, the *biased* estimator of Gretton et al. (ALT 2005),
  ``HSIC₀ = tr(KHLH) / (m−1)²`` with ``H = I − 11ᵀ/m``, always ``≥ 0`` and biased upwards
  by ``O(1/m)`` (positive even for independent inputs). Exposed for comparison and tests.

The diagonals are zeroed by **masking** (``K̃_ij = K_ij`` for ``i ≠ j``, ``K̃_ii = 0``). The
authors' reference code (clovaai/rebias, ``criterions/hsic.py``) instead subtracts the
diagonal *vector* from every row (``K − diag(K)`` broadcasts to ``K_ij − K_jj``); that is only
harmless when every ``K_jj`` is the same constant (RBF: ``K_jj = 1``, and HSIC₁ ignores a
constant shift). For a kernel with a varying diagonal — the linear kernel ``K_jj = ‖u_j‖²`` —
it gives a different, wrong value. Our estimator is correct for any kernel.

Kernels (:func:`kernel_matrix`):

* ``"rbf"``: ``k(u, u') = exp(−‖u − u'‖² / (2σ²))`` — ``σ`` is the kernel *radius* (the
  standard deviation of the Gaussian), the same parametrisation as the reference code
  (``γ = 1/(2σ²)``). ``σ`` is either a fixed positive number (ReBias uses 1 on Biased MNIST)
  or ``"median"``: the **median heuristic**, ``σ = median_{i<j} ‖u_i − u_j‖₂``, the median of
  the ``m(m−1)/2`` Euclidean distances between *distinct* samples of the batch (the usual
  statistical median: the mean of the two middle values when the count is even), computed
  on *detached* features so no gradient flows through ``σ``. Two samples at the median
  distance then have kernel value ``exp(−1/2)``. See :func:`median_distance` for how this
  differs from the reference code's epoch-level estimate.
* ``"linear"``: ``k(u, u') = u·u'`` (HSIC₁ then estimates the squared Frobenius norm of the
  cross-covariance; it only detects linear dependence). ``σ`` is ignored.

Everything is computed in at least float32 (float64 inputs stay float64), outside any
autocast region: under bf16 autocast the distance and kernel matmuls would otherwise
silently run in bf16, and HSIC₁ subtracts nearly equal sums. The kernel matrix has an exact
unit diagonal (RBF) and is exactly symmetric. Cost: ``O(m²D)`` for the kernels and ``O(m²)``
for the estimator (``1ᵀK̃L̃1`` is a dot product of column sums, no ``m×m`` matrix product).
"""

from __future__ import annotations

from typing import Literal

import torch

Kernel = Literal["rbf", "linear"]
KERNELS: tuple[str, ...] = ("rbf", "linear")
Sigma = float | Literal["median"] | torch.Tensor
Estimator = Literal["unbiased", "biased"]


def _as_matrix(x: torch.Tensor) -> torch.Tensor:
    """``N×D`` in at least float32 (float64 stays float64; half precisions are promoted)."""
    if x.dim() < 1:
        raise ValueError("features must have a leading sample dimension")
    x = x.reshape(x.shape[0], -1)
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return x


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def pairwise_squared_distances(x: torch.Tensor) -> torch.Tensor:
    """``D_ij = ‖x_i − x_j‖²`` for the rows of ``x`` (``N×D`` → ``N×N``).

    Computed as ``‖x_i‖² + ‖x_j‖² − 2 x_i·x_j`` after centring the rows (distances are
    translation invariant; centring reduces cancellation), clamped at 0 against round-off,
    symmetrised, and with an exact zero diagonal. No square root: differentiable everywhere,
    also for duplicate samples.
    """
    x = _as_matrix(x)
    with _no_autocast(x.device):
        x = x - x.mean(dim=0, keepdim=True)
        sq = (x * x).sum(dim=1)
        d = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp(min=0.0)
        d = (d + d.T) / 2
        eye = torch.eye(d.shape[0], dtype=torch.bool, device=d.device)
        return d.masked_fill(eye, 0.0)


def median_distance(x: torch.Tensor) -> torch.Tensor:
    """Median heuristic for the RBF radius: ``median_{i<j} ‖x_i − x_j‖₂`` (detached scalar).

    The median is taken over the ``m(m−1)/2`` distances between distinct samples (the
    diagonal zeros are excluded) and is the usual one — the mean of the two middle values for
    an even count. Example: points ``0, 1, 3, 7`` on a line have distances
    ``1, 3, 7, 2, 6, 4`` → median ``(3 + 4)/2 = 3.5``.

    The reference code (clovaai/rebias, ``criterions/sigma_utils.py``) instead pools the
    *squared* distances of all ``m²`` ordered pairs — the ``m`` diagonal zeros included —
    over the first 25% of the training batches once per epoch, and takes the square root of
    their median; the zeros pull it down (on this example: ``√6.5 ≈ 2.55``). We use the batch
    at hand, which needs no extra pass over the data. A degenerate batch (all samples equal,
    or fewer than two samples) gives the smallest positive float instead of 0 so that the
    kernel stays finite.
    """
    x = _as_matrix(x.detach())
    m = x.shape[0]
    eps = torch.finfo(x.dtype).eps
    if m < 2:
        return torch.tensor(eps, dtype=x.dtype, device=x.device)
    d2 = pairwise_squared_distances(x)
    iu = torch.triu_indices(m, m, offset=1, device=x.device)
    d = d2[iu[0], iu[1]].sqrt().sort().values
    n = d.numel()
    med = (d[(n - 1) // 2] + d[n // 2]) / 2
    return med.clamp(min=eps)


def rbf_kernel(x: torch.Tensor, sigma: Sigma = 1.0) -> torch.Tensor:
    """Gaussian kernel matrix ``K_ij = exp(−‖x_i − x_j‖² / (2σ²))`` (``σ`` or ``"median"``)."""
    x = _as_matrix(x)
    if isinstance(sigma, str):
        if sigma != "median":
            raise ValueError(f"sigma must be a positive number or 'median', got {sigma!r}")
        s = median_distance(x)
    else:
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).detach()
        if not bool((s > 0).all()):
            raise ValueError(f"the RBF radius sigma must be > 0, got {float(s)}")
    with _no_autocast(x.device):
        return torch.exp(-pairwise_squared_distances(x) / (2.0 * s * s))


def linear_kernel(x: torch.Tensor) -> torch.Tensor:
    """Linear kernel matrix ``K_ij = x_i·x_j`` (symmetrised against round-off)."""
    x = _as_matrix(x)
    with _no_autocast(x.device):
        k = x @ x.T
        return (k + k.T) / 2


def kernel_matrix(x: torch.Tensor, kernel: Kernel = "rbf", sigma: Sigma = 1.0) -> torch.Tensor:
    """``N×N`` kernel matrix of the rows of ``x`` (``kernel="rbf"`` or ``"linear"``)."""
    if kernel == "rbf":
        return rbf_kernel(x, sigma)
    if kernel == "linear":
        return linear_kernel(x)
    raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")


def _check_kernels(K: torch.Tensor, L: torch.Tensor) -> int:
    if K.dim() != 2 or K.shape[0] != K.shape[1] or K.shape != L.shape:
        raise ValueError(
            f"kernel matrices must both be m×m with the same m, got {tuple(K.shape)} and {tuple(L.shape)}"
        )
    return K.shape[0]


def _promote(K: torch.Tensor, L: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both matrices in the wider of their dtypes, at least float32."""
    dtype = torch.promote_types(torch.promote_types(K.dtype, L.dtype), torch.float32)
    return K.to(dtype), L.to(dtype)


def unbiased_hsic(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """HSIC₁ of Song et al. (2012) from two ``m×m`` kernel matrices (``m ≥ 4``).

    ``[tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((m−1)(m−2)) − 2/(m−2)·1ᵀK̃L̃1] / (m(m−3))`` where ``K̃``,
    ``L̃`` are ``K``, ``L`` with the diagonal masked to zero (correct for any kernel, see the
    module doc). Raises :class:`ValueError` when ``m < 4`` (the estimator is undefined).
    """
    m = _check_kernels(K, L)
    if m < 4:
        raise ValueError(f"the unbiased HSIC estimator needs at least 4 samples, got {m}")
    K, L = _promote(K, L)
    with _no_autocast(K.device):
        eye = torch.eye(m, dtype=torch.bool, device=K.device)
        Kt = K.masked_fill(eye, 0.0)
        Lt = L.masked_fill(eye, 0.0)
        trace = (Kt * Lt.T).sum()  # tr(K̃L̃) = Σ_ij K̃_ij L̃_ji
        sums = Kt.sum() * Lt.sum() / ((m - 1) * (m - 2))
        cross = Kt.sum(dim=0) @ Lt.sum(dim=1)  # 1ᵀK̃L̃1 = (1ᵀK̃)·(L̃1)
        return (trace + sums - 2.0 * cross / (m - 2)) / (m * (m - 3))


def biased_hsic(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """HSIC₀ of Gretton et al. (2005): ``tr(KHLH)/(m−1)²`` with ``H = I − 11ᵀ/m`` (``m ≥ 2``)."""
    m = _check_kernels(K, L)
    if m < 2:
        raise ValueError(f"the biased HSIC estimator needs at least 2 samples, got {m}")
    K, L = _promote(K, L)
    with _no_autocast(K.device):
        Kc = K - K.mean(dim=0, keepdim=True)  # HK
        Lc = L - L.mean(dim=0, keepdim=True)  # HL
        return (Kc * Lc.T).sum() / (m - 1) ** 2  # tr(HK·HL) = tr(KHLH)


def hsic(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    kernel: Kernel = "rbf",
    sigma: Sigma = 1.0,
    sigma_y: Sigma | None = None,
    estimator: Estimator = "unbiased",
) -> torch.Tensor:
    """HSIC between the paired rows of ``x`` (``m×D₁``) and ``y`` (``m×D₂``).

    Args:
        kernel: ``"rbf"`` (default) or ``"linear"``, used for both inputs.
        sigma: RBF radius for ``x`` (a positive number or ``"median"``; see module doc).
        sigma_y: RBF radius for ``y``; defaults to ``sigma`` (with ``"median"`` the median is
            computed separately for each input).
        estimator: ``"unbiased"`` (HSIC₁, ReBias; needs ``m ≥ 4``) or ``"biased"`` (HSIC₀).

    Returns a scalar in float32 (float64 for float64 inputs), differentiable in ``x`` and
    ``y`` (never through a median-heuristic ``σ``).
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of samples, got {x.shape[0]} and {y.shape[0]}")
    K = kernel_matrix(x, kernel, sigma)
    L = kernel_matrix(y, kernel, sigma if sigma_y is None else sigma_y)
    if estimator == "unbiased":
        return unbiased_hsic(K, L)
    if estimator == "biased":
        return biased_hsic(K, L)
    raise ValueError(f"unknown HSIC estimator {estimator!r}; expected 'unbiased' or 'biased'")


__all__ = [
    "KERNELS",
    "biased_hsic",
    "hsic",
    "kernel_matrix",
    "linear_kernel",
    "median_distance",
    "pairwise_squared_distances",
    "rbf_kernel",
    "unbiased_hsic",
]
