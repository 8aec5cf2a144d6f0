"""The online pseudo-bias labellers (``attractor``, ``cluster``, ``gce_head``, ``errors``) and their
vectorised helpers (spherical k-means, cosine silhouette).

A labeller turns the features and logits of the batch the model has just computed into
pseudo-bias labels; what each one does is in the package docstring of
:mod:`cxrdebias.debias.unsupervised`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cxrdebias.debias.lff import generalized_cross_entropy
from cxrdebias.debias.unsupervised.options import PseudoBiasOptions
from cxrdebias.errors import ConfigError

# -- small vectorised helpers --------------------------------------------------------------------


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.detach().flatten(1).float(), dim=1)


def spherical_kmeans(
    x: torch.Tensor, k: int, iters: int = 20, init: torch.Tensor | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine k-means of the rows of ``x`` (k-means++ seeding unless ``init``): (centres k×D, labels)."""
    x = _unit(x)
    n = x.shape[0]
    k = max(1, min(k, n))
    g = torch.Generator(device="cpu").manual_seed(seed)
    if init is not None and init.shape[0] == k:
        centres = _unit(init.to(x.device))
    else:
        idx = [int(torch.randint(n, (1,), generator=g))]
        for _ in range(1, k):
            d = (1 - x @ x[idx].T).min(dim=1).values.clamp(min=0).cpu()
            idx.append(int(torch.multinomial(d, 1, generator=g)) if float(d.sum()) > 0 else int(torch.randint(n, (1,), generator=g)))
        centres = x[idx].clone()
    labels = torch.zeros(n, dtype=torch.long, device=x.device)
    for _ in range(iters):
        sim = x @ centres.T
        labels = sim.argmax(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k)
        empty = counts == 0
        if bool(empty.any()):  # re-seed an empty cluster at the worst-fitting point
            far = sim.max(dim=1).values.argsort()[: int(empty.sum())]
            sums[empty] = x[far]
        new = _unit(sums)
        if torch.allclose(new, centres, atol=1e-6):
            break
        centres = new
    return centres, (x @ centres.T).argmax(dim=1)


def cosine_silhouette(x: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean silhouette with cosine distance (matches ``sklearn.metrics.silhouette_score(metric='cosine')``)."""
    x = _unit(x)
    _, labels = torch.unique(labels, return_inverse=True)
    k = int(labels.max()) + 1 if labels.numel() else 0
    if k < 2 or k >= x.shape[0]:
        return float("nan")
    dist = (1 - x @ x.T).clamp(min=0)
    onehot = F.one_hot(labels, k).to(dist.dtype)
    sums = dist @ onehot  # n×k: summed distance to each cluster
    counts = onehot.sum(0)
    own = counts[labels]
    a = sums.gather(1, labels[:, None]).squeeze(1) / (own - 1).clamp(min=1)
    mean_other = (sums / counts.clamp(min=1)).scatter(1, labels[:, None], float("inf"))
    b = mean_other.min(dim=1).values
    s = torch.where(own > 1, (b - a) / torch.maximum(a, b).clamp(min=1e-12), torch.zeros_like(a))
    return float(s.mean())


# -- the labellers -------------------------------------------------------------------------------


class PseudoBiasLabeller(nn.Module):
    """Pseudo-bias labels for a batch from the batch's own forward features.

    Call order per optimisation step: :meth:`update` (running statistics, and a refresh of the
    snapshot when one is due), then :meth:`assign`. Subclasses implement :meth:`_update`,
    :meth:`_refresh` and :meth:`scores` (``N × num_labels``; ``-inf`` = impossible label).
    """

    name: ClassVar[str] = ""

    def __init__(self, options: PseudoBiasOptions):
        super().__init__()
        self.options = options
        self.num_classes = 0
        self.feature_dim = 0

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self, feature_dim: int, num_classes: int, num_samples: int = 0, device: torch.device | str = "cpu", make_optimizer=None) -> None:
        if not isinstance(feature_dim, int) or feature_dim < 1:
            raise ConfigError(f"pseudo-bias labeller {self.name!r} needs the model's integer feature_dim, got {feature_dim!r}")
        if num_classes < 2:
            raise ConfigError(f"pseudo-bias labeller {self.name!r} needs at least 2 classes, got {num_classes}")
        self.feature_dim, self.num_classes = int(feature_dim), int(num_classes)
        dev = torch.device(device)
        self.register_buffer("last_refresh", torch.tensor(-1, dtype=torch.long, device=dev))
        self._setup(dev, make_optimizer)
        if self.options.source == "ema":
            if num_samples <= 0:
                raise ConfigError("unsupervised.source=ema needs the training-set size (per-sample EMAs)")
            self.register_buffer("soft_ema", torch.zeros(num_samples, self.num_labels, device=dev))
            self.register_buffer("soft_seen", torch.zeros(num_samples, dtype=torch.bool, device=dev))

    def _setup(self, device: torch.device, make_optimizer) -> None:
        raise NotImplementedError

    @property
    def num_labels(self) -> int:
        """Number of distinct pseudo-bias values (the ``num_biases`` the wrapped method sees)."""
        return self.num_classes

    # -- statistics -----------------------------------------------------------------------------
    def learning(self, step: int) -> bool:
        """Whether the statistics still follow the model at ``step`` (``source=frozen`` stops at warm-up)."""
        return self.options.source != "frozen" or step < self.options.warmup_steps

    def update(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, step: int) -> None:
        """Running statistics from the batch; refresh the snapshot every ``refresh_every`` steps."""
        if not self.learning(step):
            return
        self._update(features.detach().flatten(1).float(), logits.detach().float(), targets)
        if int(self.last_refresh) < 0 or step - int(self.last_refresh) >= self.options.refresh_every:
            with torch.no_grad():
                self._refresh(step)
            self.last_refresh.fill_(step)

    def _update(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        raise NotImplementedError

    def _refresh(self, step: int) -> None:
        raise NotImplementedError

    # -- labels ---------------------------------------------------------------------------------
    def scores(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def soft(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores / self.options.temperature).softmax(dim=1)

    def fallback(self, targets: torch.Tensor) -> torch.Tensor:
        """Label of a sample no statistic covers yet: its own class (i.e. "bias-aligned")."""
        return targets.long()

    @torch.no_grad()
    def assign(
        self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, step: int = 0, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Pseudo-bias labels (``LongTensor`` in ``[0, num_labels)``) of the batch."""
        s = self.scores(features.detach().flatten(1).float(), logits.detach().float(), targets)
        valid = torch.isfinite(s).any(dim=1)
        if self.options.source == "ema" and index is not None and hasattr(self, "soft_ema"):
            index = index.to(s.device)
            p = torch.where(valid[:, None], self.soft(torch.where(valid[:, None], s, torch.zeros_like(s))), torch.zeros_like(s))
            a = self.options.ema
            seen = self.soft_seen[index]
            ema = torch.where(seen[:, None], a * self.soft_ema[index] + (1 - a) * p, p)
            self.soft_ema[index] = ema
            self.soft_seen[index] = seen | valid
            s = torch.where(valid[:, None], ema, s)
        labels = s.argmax(dim=1)
        return torch.where(valid, labels, self.fallback(targets).to(labels.device))

    def conflicting(self, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Samples the labeller believes bias-conflicting (class-space labels: ``label ≠ target``)."""
        return labels != targets

    def possible_groups(self) -> torch.Tensor:
        """``num_classes × num_labels`` bool: the (target, label) pairs this labeller can produce
        (class-space labels: all of them)."""
        return torch.ones(self.num_classes, self.num_labels, dtype=torch.bool)

    def summary(self) -> dict[str, Any]:
        """Small per-epoch facts worth logging (e.g. the chosen k per class)."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass


class AttractorLabeller(PseudoBiasLabeller):
    """Nearest running class centroid (cosine) — the class a sample is *attracted* to."""

    name = "attractor"

    def _setup(self, device, make_optimizer) -> None:
        C, D = self.num_classes, self.feature_dim
        self.register_buffer("centroids", torch.zeros(C, D, device=device))
        self.register_buffer("seen", torch.zeros(C, dtype=torch.bool, device=device))
        self.register_buffer("snapshot", torch.zeros(C, D, device=device))
        self.register_buffer("snapshot_valid", torch.zeros(C, dtype=torch.bool, device=device))

    @torch.no_grad()
    def _update(self, features, logits, targets) -> None:
        f = _unit(features)
        t = targets.to(f.device).long()
        sums = torch.zeros_like(self.centroids).index_add_(0, t, f)
        counts = torch.bincount(t, minlength=self.num_classes).to(f.dtype)
        present = counts > 0
        mean = sums / counts.clamp(min=1)[:, None]
        m = self.options.momentum
        blended = torch.where(self.seen[:, None], m * self.centroids + (1 - m) * mean, mean)
        self.centroids.copy_(torch.where(present[:, None], blended, self.centroids))
        self.seen |= present

    def _refresh(self, step) -> None:
        self.snapshot.copy_(_unit(self.centroids))
        self.snapshot_valid.copy_(self.seen)

    def scores(self, features, logits, targets):
        s = _unit(features) @ self.snapshot.T
        return s.masked_fill(~self.snapshot_valid[None, :], float("-inf"))


class ClusterLabeller(PseudoBiasLabeller):
    """Per-class spherical k-means on a memory bank of recent features (label = class·k + cluster)."""

    name = "cluster"

    @property
    def k(self) -> int:
        return self.options.k_max if self.options.k == "auto" else int(self.options.k)

    @property
    def num_labels(self) -> int:
        return self.num_classes * self.k

    def _setup(self, device, make_optimizer) -> None:
        C, D, M, k = self.num_classes, self.feature_dim, self.options.bank_size, self.k
        self.register_buffer("bank", torch.zeros(M, D, device=device))
        self.register_buffer("bank_target", torch.full((M,), -1, dtype=torch.long, device=device))
        self.register_buffer("bank_ptr", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("centres", torch.zeros(C, k, D, device=device))
        self.register_buffer("centre_valid", torch.zeros(C, k, dtype=torch.bool, device=device))
        self.register_buffer("majority", torch.zeros(C, dtype=torch.long, device=device))

    @torch.no_grad()
    def _update(self, features, logits, targets) -> None:
        f, t = _unit(features), targets.to(features.device).long()
        M = self.bank.shape[0]
        if f.shape[0] > M:
            f, t = f[-M:], t[-M:]
        pos = (int(self.bank_ptr) + torch.arange(f.shape[0], device=f.device)) % M
        self.bank[pos] = f
        self.bank_target[pos] = t
        self.bank_ptr.fill_((int(self.bank_ptr) + f.shape[0]) % M)

    def _refresh(self, step) -> None:
        o = self.options
        for c in range(self.num_classes):  # once per refresh, not per step
            x = self.bank[self.bank_target == c]
            if x.shape[0] < 2 * self.k:
                continue
            previous = self.centres[c][self.centre_valid[c]]
            if o.k == "auto":
                best_k, best_s = 1, o.min_silhouette
                for kk in range(2, o.k_max + 1):
                    _, lab = spherical_kmeans(x, kk, o.kmeans_iters, init=previous, seed=step + kk)
                    s = cosine_silhouette(x, lab)
                    if s == s and s > best_s:
                        best_k, best_s = kk, s
                kk = best_k
            else:
                kk = self.k
            centres, lab = spherical_kmeans(x, kk, o.kmeans_iters, init=previous, seed=step)
            self.centres[c].zero_()
            self.centres[c, :kk] = centres
            self.centre_valid[c] = torch.arange(self.k, device=x.device) < kk
            self.majority[c] = torch.bincount(lab, minlength=kk).argmax()

    def scores(self, features, logits, targets):
        f, t = _unit(features), targets.to(features.device).long()
        sim = torch.einsum("nd,nkd->nk", f, self.centres[t]).masked_fill(~self.centre_valid[t], float("-inf"))
        out = torch.full((f.shape[0], self.num_labels), float("-inf"), device=f.device)
        cols = t[:, None] * self.k + torch.arange(self.k, device=f.device)[None, :]
        return out.scatter(1, cols, sim)

    def fallback(self, targets):
        return targets.long() * self.k

    def possible_groups(self) -> torch.Tensor:
        """Labels are class-specific: class ``c`` only ever gets ``c·k … c·k + k − 1``."""
        return torch.arange(self.num_labels)[None, :] // self.k == torch.arange(self.num_classes)[:, None]

    def conflicting(self, labels, targets):
        c = labels // self.k
        return (labels % self.k) != self.majority.to(labels.device)[c]

    def summary(self) -> dict[str, Any]:
        return {"k_per_class": self.centre_valid.sum(dim=1).tolist()}


class GCEHeadLabeller(PseudoBiasLabeller):
    """A linear head on the detached bottleneck trained with GCE (LfF eq. 1): it learns the easy cue."""

    name = "gce_head"

    def _setup(self, device, make_optimizer) -> None:
        self.head = nn.Linear(self.feature_dim, self.num_classes).to(device)
        self.optimizer = (make_optimizer or (lambda p: torch.optim.Adam(p, lr=1e-3)))(self.head.parameters())
        self.register_buffer("snapshot_weight", torch.zeros(self.num_classes, self.feature_dim, device=device))
        self.register_buffer("snapshot_bias", torch.zeros(self.num_classes, device=device))
        self.register_buffer("trained", torch.zeros((), dtype=torch.bool, device=device))

    def _update(self, features, logits, targets) -> None:
        with torch.enable_grad(), torch.autocast(device_type=features.device.type, enabled=False):
            loss = generalized_cross_entropy(self.head(features), targets.to(features.device), self.options.q).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        self.trained.fill_(True)

    def _refresh(self, step) -> None:
        self.snapshot_weight.copy_(self.head.weight.detach())
        self.snapshot_bias.copy_(self.head.bias.detach())

    def scores(self, features, logits, targets):
        s = F.linear(features, self.snapshot_weight, self.snapshot_bias)
        return s if bool(self.trained) else torch.full_like(s, float("-inf"))

    def soft(self, scores):
        return scores.softmax(dim=1)

    def extra_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])


class ErrorsLabeller(PseudoBiasLabeller):
    """JTT/LfF-style, online: which training samples the *early* model gets wrong.

    Per training sample (indexed by ``batch["index"]``) an EMA of the one-hot prediction,
    ``v_i ← a·v_i + (1 − a)·onehot(argmax logits_i)`` (``a = ema``; the first visit sets it), kept
    while ``step < warmup_steps`` (the shortcut phase) and frozen after. ``v_i[t_i]`` is the EMA
    of "classified correctly". Label: ``t_i`` (bias-aligned, "easy") when
    ``v_i[t_i] ≥ easy_threshold``, else the class the early model voted for most among the
    others (likely conflicting: the class whose shortcut it carries; binary: the other class).
    Class space, like ``attractor``. A sample the warm-up never saw is bias-aligned
    (:meth:`fallback`); without an index (``analyze-bias`` on another split) the label is the
    model's current prediction when it is wrong, the target otherwise.
    """

    name = "errors"

    def _setup(self, device, make_optimizer) -> None:
        self.register_buffer("trained", torch.zeros((), dtype=torch.bool, device=device))

    def setup(self, feature_dim, num_classes, num_samples=0, device="cpu", make_optimizer=None) -> None:
        if self.options.warmup_steps < 1:
            raise ConfigError("unsupervised.labeller=errors learns during the warm-up: set unsupervised.warmup_steps ≥ 1 (e.g. one or two epochs of steps)")
        if self.options.source == "ema":
            raise ConfigError("unsupervised.labeller=errors keeps its own per-sample EMA: use source=live or frozen")
        super().setup(feature_dim, num_classes, num_samples, device, make_optimizer)
        # "soft_" tables are per training sample (left out when another split is labelled)
        self.register_buffer("soft_votes", torch.zeros(max(1, num_samples), num_classes, device=torch.device(device)))
        self.register_buffer("soft_voted", torch.zeros(max(1, num_samples), dtype=torch.bool, device=torch.device(device)))

    def learning(self, step: int) -> bool:
        return step < self.options.warmup_steps  # frozen at the end of warm-up, whatever ``source``

    def _update(self, features, logits, targets) -> None:
        pass

    def _refresh(self, step) -> None:
        pass

    @torch.no_grad()
    def vote(self, logits: torch.Tensor, index: torch.Tensor) -> None:
        """Fold this batch's predictions into the per-sample EMA of votes."""
        index = index.to(self.soft_votes.device).long()
        pred = F.one_hot(logits.argmax(dim=1), self.num_classes).to(self.soft_votes.dtype).to(self.soft_votes.device)
        seen = self.soft_voted[index]
        a = self.options.ema
        self.soft_votes[index] = torch.where(seen[:, None], a * self.soft_votes[index] + (1 - a) * pred, pred)
        self.soft_voted[index] = True
        self.trained.fill_(True)

    def label_from_votes(self, votes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``target`` where its vote share ≥ ``easy_threshold``, else the most-voted other class."""
        t = targets.to(votes.device).long()
        easy = votes.gather(1, t[:, None]).squeeze(1) >= self.options.easy_threshold
        other = votes.scatter(1, t[:, None], float("-inf")).argmax(dim=1)
        return torch.where(easy, t, other)

    @torch.no_grad()
    def assign(self, features, logits, targets, step=0, index=None):
        t = targets.long()
        if index is None or self.soft_votes.shape[0] <= 1:  # no per-sample table: the current errors
            return self.label_from_votes(F.one_hot(logits.argmax(dim=1), self.num_classes).float(), t)
        if self.learning(step):
            self.vote(logits, index)
        index = index.to(self.soft_votes.device).long()
        labels = self.label_from_votes(self.soft_votes[index], t)
        return torch.where(self.soft_voted[index], labels, self.fallback(t).to(labels.device))

    def summary(self) -> dict[str, Any]:
        voted = self.soft_voted
        if not bool(voted.any()):
            return {}
        return {"voted_samples": int(voted.sum())}


LABELLER_CLASSES: dict[str, type[PseudoBiasLabeller]] = {
    cls.name: cls for cls in (AttractorLabeller, ClusterLabeller, GCEHeadLabeller, ErrorsLabeller)
}


def build_labeller(options: PseudoBiasOptions | dict[str, Any] | None = None) -> PseudoBiasLabeller:
    """The labeller named by ``options.labeller`` (options or a dict of them; defaults if ``None``)."""
    opts = options if isinstance(options, PseudoBiasOptions) else PseudoBiasOptions(**(options or {}))
    return LABELLER_CLASSES[opts.labeller](opts)


__all__ = [
    "LABELLER_CLASSES",
    "AttractorLabeller",
    "ClusterLabeller",
    "ErrorsLabeller",
    "GCEHeadLabeller",
    "PseudoBiasLabeller",
    "build_labeller",
    "cosine_silhouette",
    "spherical_kmeans",
]
