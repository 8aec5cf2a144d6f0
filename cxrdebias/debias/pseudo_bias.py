r"""Unsupervised online bias discovery: pseudo-bias labels from the model's own bottleneck.

Most deployments do not know their bias. The observation this module builds on: in a vanilla
model's bottleneck, each class centroid carries the dominant bias of that class, and the
bias-*conflicting* samples (a red "3" when red means "0") sit near the centroid of the class
whose bias they share — the centroids are *attractors*. Early in training, while the model
relies on the shortcut, "which class is this sample attracted to" is a proxy for its bias
label; so are the clusters within a class.

A :class:`PseudoBiasLabeller` turns the features and logits of the batch the model has just
computed (no extra pass over the data, no second training run) into pseudo-bias labels:

``attractor``
    running cosine centroids per class (EMA with ``momentum``); the label of a sample is the
    index of the nearest class centroid, ``argmax_c cos(ỹ, μ_c)``. Labels live in the class
    space: a sample with ``label ≠ target`` is *likely conflicting*.
``cluster``
    per-class spherical k-means on a bounded memory bank of recent bottleneck features,
    re-run every ``refresh_every`` steps (warm-started from the previous centres); ``k``
    given, or ``"auto"``: the ``k ∈ {2…k_max}`` with the best cosine silhouette, or 1 when no
    ``k`` reaches ``min_silhouette``. Label ``= class·k + cluster`` (``k = k_max`` as the
    stride when automatic); likely conflicting = not in the largest cluster of its class.
``gce_head``
    a linear head on the *detached* bottleneck trained with the generalised cross-entropy
    (``q = 0.7``, :func:`~cxrdebias.debias.lff.generalized_cross_entropy`, LfF eq. 1), which
    amplifies the easiest cue — the bias; its arg-max is the label (class space).

Common options (:class:`PseudoBiasOptions`): ``warmup_steps`` (before it, with
``warmup_labels: none``, the wrapped method gets no bias labels and takes a plain cross-entropy
step — EnD's terms are 0; with ``warmup_labels: target`` it already runs, with pseudo-bias =
target, i.e. every sample assumed bias-aligned), ``refresh_every``
(period of the snapshot the labels are computed from: centroids, clusters, head weights),
``source`` (``live``: statistics keep following the model; ``frozen``: statistics stop at the
end of warm-up, when the model still relies on the shortcut; ``ema``: per-sample EMA of the soft
assignment, the label is its arg-max — temporal ensembling indexed by ``batch["index"]``) and
``reweight`` (the cross-entropy weight of likely-conflicting samples; 1 = off).

:class:`UnsupervisedBias` wraps any method that uses bias labels: one whose step is one forward
pass + ``compute_loss`` (``end``, ``groupdro``; also ``vanilla`` — then the labeller only
observes, or re-weights), or one with its own update that takes its bias labels through
:meth:`~cxrdebias.debias.base.Method.with_bias` after its first forward pass (``lnl``,
``blindeye``). Methods that never use bias labels (``lff``, ``rebias``) are refused. It
replaces ``batch["bias"]`` by the pseudo labels before the wrapped method sees them; the
dataset's true bias labels (when it has them) are used for the agreement metrics only
(:func:`cxrdebias.evaluation.metrics.label_agreement`, logged per epoch under ``pseudo_bias``), never by
the method. Everything (running statistics, memory bank, head, its optimiser, per-sample EMAs,
the step counter) is in ``state_dict``/``extra_state``, so checkpoints and resume keep it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from cxrdebias.data.base import Batch
from cxrdebias.debias.base import Method, TrainContext
from cxrdebias.debias.lff import generalized_cross_entropy
from cxrdebias.distributed import gather, gather_rows
from cxrdebias.errors import ConfigError

LABELLERS: tuple[str, ...] = ("attractor", "cluster", "gce_head")
SOURCES: tuple[str, ...] = ("live", "frozen", "ema")


class PseudoBiasOptions(BaseModel):
    """The ``unsupervised`` section of a run config (``--bias auto`` sets ``enabled``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(False, description="replace the dataset's bias labels by online pseudo-bias labels")
    labeller: Literal["attractor", "cluster", "gce_head"] = "attractor"
    warmup_steps: int = Field(10, ge=0, description="optimiser steps before the labeller's pseudo labels are used")
    warmup_labels: Literal["none", "target"] = Field(
        "target",
        description="during warm-up: 'none' = plain CE; 'target' = the method already runs, with pseudo-bias = target "
        "(every sample assumed bias-aligned, the shortcut prior)",
    )
    refresh_every: int = Field(10, ge=1, description="steps between snapshots (centroids, clusters, head weights)")
    source: Literal["live", "frozen", "ema"] = Field(
        "live", description="live statistics; frozen at the end of warm-up; or per-sample EMA of assignments"
    )
    reweight: float = Field(1.0, ge=1, description="CE weight of likely bias-conflicting samples (1 = off)")
    momentum: float = Field(0.9, ge=0, lt=1, description="attractor: EMA weight of the past centroid")
    ema: float = Field(0.7, ge=0, lt=1, description="source=ema: EMA weight of a sample's past soft assignment")
    temperature: float = Field(0.1, gt=0, description="soft assignment softmax(cos/τ) (attractor, cluster)")
    k: int | Literal["auto"] = Field(2, description="cluster: clusters per class, or 'auto' (silhouette)")
    k_max: int = Field(4, ge=2, description="cluster, k=auto: largest k tried")
    min_silhouette: float = Field(0.1, description="cluster, k=auto: below this best silhouette a class keeps 1 cluster")
    bank_size: int = Field(4096, ge=2, description="cluster: memory bank of recent features")
    kmeans_iters: int = Field(20, ge=1)
    q: float = Field(0.7, gt=0, le=1, description="gce_head: GCE exponent")
    min_aligned: float = Field(
        0.7,
        ge=0,
        le=1,
        description="shortcut gate: the method gets the pseudo labels only while the running share of samples the "
        "labeller calls bias-aligned is at least this (0 = always); below it there is no class-correlated bias to "
        "remove and the step is plain CE",
    )
    gate_momentum: float = Field(0.9, ge=0, lt=1, description="EMA weight of the past aligned share (per step)")
    layer: str | None = Field(
        "early",
        description="features the labeller reads: null = the bottleneck; 'early' = the model's first block; "
        "a module name of the model (e.g. extractor.2) = that module's output, averaged over space (docs/unsupervised.md)",
    )

    @field_validator("k")
    @classmethod
    def _k_positive(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 1:
            raise ValueError("k must be >= 1 or 'auto'")
        return v


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


LABELLER_CLASSES: dict[str, type[PseudoBiasLabeller]] = {
    cls.name: cls for cls in (AttractorLabeller, ClusterLabeller, GCEHeadLabeller)
}


def build_labeller(options: PseudoBiasOptions | dict[str, Any] | None = None) -> PseudoBiasLabeller:
    opts = options if isinstance(options, PseudoBiasOptions) else PseudoBiasOptions(**(options or {}))
    return LABELLER_CLASSES[opts.labeller](opts)


# -- the method wrapper --------------------------------------------------------------------------


def _own_step(method: Method) -> bool:
    return type(method).update is not Method.update


def check_wrappable(method: Method, options: PseudoBiasOptions | None = None) -> None:
    """:class:`ConfigError` unless pseudo-bias labels can feed ``method`` (see module doc)."""
    if not _own_step(method):
        return
    if not method.requires_bias:
        raise ConfigError(
            f"--bias auto does not apply to method {method.name!r}: it never uses bias labels (it finds the bias "
            "itself); drop --bias auto"
        )
    if options is not None and options.reweight > 1:
        raise ConfigError(
            f"unsupervised.reweight={options.reweight}: method {method.name!r} runs its own update, so the "
            "re-weighted cross-entropy cannot be added to its loss; use reweight=1 or --method end/groupdro/vanilla"
        )


def _width(module: nn.Module) -> int | None:
    for sub in reversed(list(module.modules())):
        for attr in ("out_channels", "num_features", "out_features"):
            if isinstance(getattr(sub, attr, None), int):
                return int(getattr(sub, attr))
    return None


class FeatureTap:
    """The output of one named module of a model, averaged over its spatial axes, at every forward.

    The labeller can read an earlier layer than the bottleneck (``unsupervised.layer``): the
    bottleneck is what the debiasing method acts on, so the better the method works the less
    bias it carries (the labels drift to the targets); an early layer keeps the low-level cue
    (colour, acquisition signature) that the shortcut is made of. A forward hook, so no extra
    pass. ``width`` is the channel count, read from the module (or, for an activation, from
    the module before it in its parent).
    """

    def __init__(self, model: nn.Module, name: str):
        if name == "early":  # the model's own choice of its first block
            early = getattr(model, "early_layer", None)
            if not isinstance(early, str):
                raise ConfigError(f"unsupervised.layer='early': {type(model).__name__} does not name an early layer; give a module name")
            name = early
        modules = dict(model.named_modules())
        if name not in modules or not name:
            some = ", ".join(n for n in list(modules)[1:12])
            raise ConfigError(f"unsupervised.layer={name!r}: the model has no module of that name (its first modules: {some}, …)")
        self.name = name
        width = _width(modules[name])
        if width is None:  # an activation or pooling: the width of what comes before it
            parent_name, _, child = name.rpartition(".")
            children = list(modules[parent_name].named_children())
            before = [m for n, m in children[: [n for n, _ in children].index(child)]]
            width = next((w for w in (_width(m) for m in reversed(before)) if w is not None), None)
        if width is None:
            raise ConfigError(f"unsupervised.layer={name!r}: cannot tell the number of channels of that module")
        self.width = width
        self.value: torch.Tensor | None = None
        self.kept: list[torch.Tensor] | None = None  # set to [] to keep every forward pass's value
        self._handle = modules[name].register_forward_hook(self._capture)

    def _capture(self, module, inputs, output) -> None:
        out = output.detach().float()
        self.value = out.flatten(2).mean(dim=2) if out.dim() > 2 else out
        if self.value.shape[1] != self.width:
            raise ConfigError(f"unsupervised.layer={self.name!r}: output has {self.value.shape[1]} channels, expected {self.width}")
        if self.kept is not None:
            self.kept.append(self.value)

    def take(self) -> torch.Tensor:
        if self.value is None:
            raise RuntimeError(f"unsupervised.layer={self.name!r}: the module did not run in this forward pass")
        value, self.value = self.value, None
        return value

    def remove(self) -> None:
        self._handle.remove()


class UnsupervisedBias(Method):
    """A method fed with online pseudo-bias labels instead of the dataset's.

    Per step: forward once → ``labeller.update`` → ``labeller.assign`` → (after warm-up) the
    wrapped method's ``compute_loss`` on the batch whose ``bias`` is the pseudo labels, plus
    ``(reweight − 1)·Σ c_y·1[conflicting]·CE / Σ c_y`` (the likely-conflicting samples counted
    ``reweight`` times in the cross-entropy); before warm-up: the plain cross-entropy.

    A wrapped method with its own multi-pass ``update`` (LNL, BlindEye) gets a batch whose
    ``bias`` is unknown (``-1``) and receives the pseudo labels from :meth:`Method.with_bias`,
    which it calls right after its first forward pass — still one labelling per step and no
    extra pass. The true labels never reach the wrapped method.
    """

    summary = "online pseudo-bias labels (no bias labels needed) feeding another method"
    requires_bias = False

    def __init__(self, inner: Method, options: PseudoBiasOptions):
        check_wrappable(inner, options)
        super().__init__(inner.options)
        self.name = inner.name
        self.feature_activation = inner.feature_activation
        self.inner = inner
        self.unsupervised = options
        self.labeller = build_labeller(options)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("aligned_share", torch.full((), float("nan")))  # EMA over steps, global batch
        self._epoch: dict[str, list[torch.Tensor]] = {}
        self._tap: FeatureTap | None = None  # built by setup (a hook on the model, not state)

    def set_class_weights(self, weights):
        super().set_class_weights(weights)
        self.inner.set_class_weights(weights)

    def setup(self, model, context: TrainContext) -> None:
        if self.unsupervised.layer is not None:
            self._tap = FeatureTap(model, self.unsupervised.layer)
        tap = self._tap
        self.labeller.setup(
            tap.width if tap is not None else getattr(model, "feature_dim", None),
            context.num_classes,
            context.num_samples,
            context.device,
            context.make_optimizer,
        )
        self.inner.setup(model, dataclasses.replace(context, num_biases=self.labeller.num_labels))

    def _label(self, batch: Batch, output, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Update the labeller with this forward pass; (pseudo labels, likely conflicting)."""
        target = batch["target"]
        mine = self._tap.take() if self._tap is not None else output.features.detach()
        # under torchrun the statistics follow the global batch, identically on every rank
        (features, logits, target_all, index), own = gather_rows(mine, output.logits.detach(), target, batch["index"])
        self.labeller.update(features, logits, target_all, step)
        pseudo_all = self.labeller.assign(features, logits, target_all, step, index=index)
        conflicting = self.labeller.conflicting(pseudo_all, target_all)
        share = 1.0 - conflicting.float().mean()
        m = self.unsupervised.gate_momentum
        self.aligned_share.copy_(share if bool(torch.isnan(self.aligned_share)) else m * self.aligned_share + (1 - m) * share)
        return pseudo_all[own], conflicting[own]

    def gate_open(self) -> bool:
        """Whether the pseudo labels describe a shortcut: the running aligned share ≥ ``min_aligned``.

        A bias is a shortcut only if it predicts the class. At ρ = 0.997 the attractor calls ≈ 99%
        of the samples aligned; with no colour–digit correlation (ρ = 0.1) ≈ 15%: the groups it
        finds are not the classes' biases, and feeding them to EnD fights the classifier.
        """
        share = float(self.aligned_share)
        return share != share or share >= self.unsupervised.min_aligned  # NaN (no statistics yet): open

    def _record(self, pseudo: torch.Tensor, true_bias: torch.Tensor, target: torch.Tensor) -> None:
        for key, value in (("pseudo", pseudo), ("true", true_bias), ("target", target)):
            self._epoch.setdefault(key, []).append(value.detach())

    def _prior(self, target: torch.Tensor) -> torch.Tensor:
        """Warm-up labels with ``warmup_labels: target``: one group per class (cluster: its cluster 0)."""
        return target * max(1, self.labeller.num_labels // max(1, self.labeller.num_classes))

    def update(self, model, batch: Batch, optimizer, autocast):
        step = int(self.step)
        o = self.unsupervised
        warm = step < o.warmup_steps
        gate = self.gate_open()  # reads the steps before this one
        active = not warm and gate
        # the target prior is a shortcut hypothesis too: it needs the same evidence
        runs_method = active or (warm and gate and o.warmup_labels == "target")
        if runs_method and _own_step(self.inner):
            return self._delegated_update(model, batch, optimizer, autocast, step, active)
        target = batch["target"]
        with autocast():
            output = model(batch["image"])
        pseudo, conflicting = self._label(batch, output, step)
        if runs_method:
            given = pseudo if active else self._prior(target)
            pseudo_batch = Batch(image=batch["image"], target=target, bias=given, index=batch["index"])
            with autocast():
                loss, logs = self.inner.compute_loss(model, pseudo_batch, output)
            if active and o.reweight > 1:
                ce = F.cross_entropy(output.logits.float(), target, reduction="none")
                cw = torch.ones_like(ce) if self.class_weights is None else self.class_weights.to(ce.device)[target]
                loss = loss + (o.reweight - 1) * (cw * conflicting * ce).sum() / cw.sum()
        else:
            loss = self.classification_loss(output.logits, target)
            logs = {"ce": loss.detach()}
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        self.step += 1
        with torch.no_grad():
            self._record(pseudo, batch["bias"], target)
            logs = {
                "loss": loss.detach(),
                **logs,
                "accuracy": (output.logits.detach().argmax(1) == target).float().mean(),
                "pseudo_active": torch.tensor(float(active)),
                "pseudo_conflicting": conflicting.float().mean(),
                "aligned_share": self.aligned_share.detach().clone(),
            }
        return logs

    def _delegated_update(self, model, batch: Batch, optimizer, autocast, step: int, active: bool = True):
        """The wrapped method's own update; it pulls the pseudo labels through ``with_bias``."""
        calls: list[torch.Tensor] = []

        def source(inner_batch: Batch, output) -> Batch:
            if calls:  # a second call in one step: the labels of the first (one labelling per step)
                return Batch(image=inner_batch["image"], target=inner_batch["target"], bias=calls[0], index=inner_batch["index"])
            pseudo, conflicting = self._label(inner_batch, output, step)
            calls.extend([pseudo, conflicting])
            given = pseudo if active else self._prior(inner_batch["target"])
            return Batch(image=inner_batch["image"], target=inner_batch["target"], bias=given, index=inner_batch["index"])

        hidden = Batch(image=batch["image"], target=batch["target"], bias=torch.full_like(batch["bias"], -1), index=batch["index"])
        self.inner.__dict__["_bias_source"] = source
        try:
            logs = self.inner.update(model, hidden, optimizer, autocast)
        finally:
            self.inner.__dict__.pop("_bias_source", None)
        if not calls:
            raise RuntimeError(
                f"method {self.inner.name!r} overrides update() but never called with_bias(batch, output): "
                "it cannot be used with --bias auto"
            )
        self.step += 1
        with torch.no_grad():
            self._record(calls[0], batch["bias"], batch["target"])
            return {
                **logs,
                "pseudo_active": torch.tensor(float(active)),
                "pseudo_conflicting": calls[1].float().mean(),
                "aligned_share": self.aligned_share.detach().clone(),
            }

    def epoch_metrics(self) -> dict[str, Any]:
        """Agreement of this epoch's pseudo labels with the true ones (where known)."""
        from cxrdebias.evaluation.metrics import label_agreement

        if not self._epoch:
            return {}
        cat = {k: gather(torch.cat(v)).cpu() for k, v in self._epoch.items()}  # all ranks' samples
        self._epoch = {}
        out: dict[str, Any] = {
            "labeller": self.labeller.name,
            "step": int(self.step),
            "n": int(cat["pseudo"].numel()),
            "labels_used": int(self.step) > self.unsupervised.warmup_steps,
            "aligned_share": float(self.aligned_share),
            "gate_open": self.gate_open(),
            **self.labeller.summary(),
            **label_agreement(cat["true"], cat["pseudo"], cat["target"]),
        }
        return {"pseudo_bias": out}

    def on_epoch_end(self, epoch: int) -> None:
        self.inner.on_epoch_end(epoch)

    def extra_state(self) -> dict[str, Any]:
        return {"inner": self.inner.extra_state(), "labeller": self.labeller.extra_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.inner.load_extra_state(state.get("inner", {}))
        self.labeller.load_extra_state(state.get("labeller", {}))

    def describe(self) -> dict[str, Any]:
        u = self.unsupervised.model_dump(exclude={"enabled"})
        return {**self.inner.describe(), "bias": "auto", "unsupervised": u}


__all__ = [
    "LABELLERS",
    "SOURCES",
    "AttractorLabeller",
    "ClusterLabeller",
    "FeatureTap",
    "GCEHeadLabeller",
    "PseudoBiasLabeller",
    "PseudoBiasOptions",
    "UnsupervisedBias",
    "build_labeller",
    "check_wrappable",
    "cosine_silhouette",
    "spherical_kmeans",
]
