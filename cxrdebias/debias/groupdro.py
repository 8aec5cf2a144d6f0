r"""Group DRO: distributionally robust optimisation over (target, bias) groups.

Sagawa, Koh, Hashimoto, Liang, *Distributionally Robust Neural Networks for Group Shifts*,
ICLR 2020. Groups are the ``(target, bias)`` pairs, ``g = t·|B| + b`` (``|B|`` =
``num_biases``), so ``|G| = num_classes · num_biases``. The objective is the worst expected
group loss (the group-DRO objective of §2), here with the generalisation adjustment of §3.3
(eq. 5 in the arXiv version)

    ``min_θ max_{q ∈ Δ_G} Σ_g q_g (L_g(θ) + C/√n_g)``,

solved by the online algorithm of the paper (Algorithm 1, exponentiated-gradient ascent on the
group weights ``q``, SGD on ``θ``). Per batch:

1. ``ℓ_g`` = mean cross-entropy of the batch samples of group ``g`` (only groups present);
2. ``q_g ← q_g · exp(η · (ℓ_g + C/√n_g))`` for the present groups, renormalised so that
   the present groups keep their previous total mass — absent groups keep their weight and
   ``q`` stays a distribution;
3. the loss minimised by the model is ``Σ_{g present} q_g (ℓ_g + C/√n_g)`` with the *updated*
   ``q`` (the adjustment is a constant: it changes the value, not the gradient).

The update is done in log space (``softmax(log q + η ℓ)``), so a large ``η·ℓ`` cannot
overflow. Everything is vectorised (``index_add`` over group ids); no Python loop over groups.

Differences from the authors' code (kohpangwei/group_DRO ``loss.py``): there, groups absent
from a batch get ``ℓ_g = 0`` and take part in the renormalisation over *all* groups, so their
weight shrinks whenever another group's loss is positive; here they keep their weight (with
every group present the two are identical). ``n_g`` comes from the dataset up front there; here
it comes from the optional context field ``group_counts`` or is counted from the batches of
the first epoch (see :class:`GroupDRO`).

With online pseudo-bias labels (``--bias auto``, :mod:`cxrdebias.debias.unsupervised`) the grid
of groups stays fixed — ``num_classes × num_labels`` of the labeller — while a sample's group
may change from step to step: ``q`` is a weight per *cell of that grid*, so a group keeps its
weight while samples move in and out of it. Cells that can never occur (the cluster labeller's
labels are class-specific, ``TrainContext.bias_groups``) start with ``q = 0`` and stay there,
so the mass sits on the reachable groups; and the group sizes of the adjustment are recounted
every epoch (``TrainContext.bias_changes``: the counts of epoch ``e − 1`` are ``n_g`` in epoch
``e``; during the first epoch, its running counts).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field

from cxrdebias.debias.base import Method, MethodOptions, TrainContext
from cxrdebias.distributed import gather_many


class GroupLosses(NamedTuple):
    """``loss[g]`` = mean of the per-sample losses of group ``g`` (0 when ``count[g] = 0``)."""

    loss: torch.Tensor
    count: torch.Tensor


def group_ids(target: torch.Tensor, bias: torch.Tensor, num_biases: int) -> torch.Tensor:
    """``g = target · num_biases + bias`` — one id per ``(target, bias)`` pair."""
    return target.long() * num_biases + bias.long()


def group_losses(losses: torch.Tensor, groups: torch.Tensor, num_groups: int) -> GroupLosses:
    """Per-group mean of per-sample ``losses`` (``ℓ_g`` of Algorithm 1), vectorised.

    Differentiable in ``losses``; groups with no sample get loss 0 and count 0.
    """
    count = torch.zeros(num_groups, dtype=losses.dtype, device=losses.device)
    count = count.index_add(0, groups, torch.ones_like(losses))
    total = torch.zeros(num_groups, dtype=losses.dtype, device=losses.device).index_add(0, groups, losses)
    return GroupLosses(total / count.clamp(min=1), count)


@torch.no_grad()
def update_group_weights(
    q: torch.Tensor, group_loss: torch.Tensor, present: torch.Tensor, eta: float
) -> torch.Tensor:
    """One exponentiated-gradient step on the group weights (Algorithm 1, line 5).

    ``q_g ← q_g exp(η ℓ_g)`` for the ``present`` groups, renormalised to the mass those groups
    had before; absent groups are unchanged. Returns the new weights (``q`` is not modified).
    Computed in log space in at least float32.
    """
    if not bool(present.any()):
        return q.clone()
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(device_type=q.device.type, enabled=False):
        q32, loss32 = q.to(dtype), group_loss.detach().to(dtype)
        mass = (q32 * present).sum()
        logits = torch.where(present, q32.log() + eta * loss32, torch.full_like(q32, -torch.inf))
        new = torch.softmax(logits, dim=0) * mass
        return torch.where(present, new, q32).to(q.dtype)


class GroupDROOptions(MethodOptions):
    eta: float = Field(0.01, gt=0, description="step size η of the group-weight update (Algorithm 1)")
    generalization_adjustment: float = Field(
        0.0, ge=0, description="C of eq. 5: adds C/√n_g to the loss of group g (0 = off)"
    )


class GroupDRO(Method):
    r"""Online Group DRO (Sagawa et al., ICLR 2020, Algorithm 1) over ``(target, bias)`` groups.

    Buffers (checkpointed with ``state_dict``): ``q`` (the group weights, uniform at start over
    the groups that can occur, ``TrainContext.bias_groups``), and for the generalisation
    adjustment ``group_counts`` / ``samples_counted`` / ``counting`` (see below), plus
    ``epoch_counts`` / ``epoch_seen`` when the labels change between steps
    (``TrainContext.bias_changes``: ``n_g`` is then recounted every epoch, module doc).

    Group sizes ``n_g`` for the adjustment ``C/√n_g`` (eq. 5): if the context has a
    ``group_counts`` attribute (a length-``|G|`` sequence of training counts) it is used;
    otherwise the groups are counted from the batches of the first training epoch (frozen at
    its end) and ``n_g`` is the estimate ``c_g · num_samples / seen`` — unbiased under
    shuffling while the first epoch runs, exact once it has visited every sample.
    """

    name = "groupdro"
    summary = "Group DRO: minimise the worst (target, bias) group loss (Sagawa et al. 2020)"
    requires_bias = True
    Options = GroupDROOptions

    num_groups: int
    num_biases: int
    num_classes: int

    def setup(self, model, context: TrainContext) -> None:
        if context.num_biases is None:
            raise ValueError(
                "GroupDRO needs the number of bias labels (TrainContext.num_biases) to form "
                "the (target, bias) groups; the dataset does not provide it"
            )
        self.num_classes = int(context.num_classes)
        self.num_biases = int(context.num_biases)
        self.num_groups = self.num_classes * self.num_biases
        self.num_samples = int(context.num_samples)
        dev = context.device
        allowed = torch.ones(self.num_classes, self.num_biases, dtype=torch.bool, device=dev)
        if context.bias_groups is not None:
            given = torch.as_tensor(context.bias_groups, dtype=torch.bool, device=dev)
            if given.shape != allowed.shape or not bool(given.any()):
                raise ValueError(
                    f"TrainContext.bias_groups must be a {self.num_classes}×{self.num_biases} bool grid "
                    f"(num_classes × num_biases) with at least one True, got shape {tuple(given.shape)}"
                )
            allowed = given
        # derived from the context at every setup, not state (a checkpoint of old code still loads)
        self.register_buffer("allowed", allowed.flatten(), persistent=False)
        self.register_buffer("q", self.allowed.float() / self.allowed.sum())
        counts = getattr(context, "group_counts", None)
        if counts is not None:
            counts = torch.as_tensor(counts, dtype=torch.float32, device=dev).flatten()
            if counts.shape != (self.num_groups,):
                raise ValueError(
                    f"TrainContext.group_counts must have {self.num_groups} entries "
                    f"(num_classes × num_biases), got {tuple(counts.shape)}"
                )
        self.register_buffer(
            "group_counts", counts if counts is not None else torch.zeros(self.num_groups, device=dev)
        )
        self.register_buffer("samples_counted", torch.zeros((), dtype=torch.float32, device=dev))
        self.register_buffer("counting", torch.tensor(counts is None, device=dev))
        # pseudo labels change between steps: n_g of epoch e = the counts of epoch e − 1
        self.recount = bool(context.bias_changes) and counts is None and self.options.generalization_adjustment > 0
        if self.recount:
            self.register_buffer("epoch_counts", torch.zeros(self.num_groups, device=dev))
            self.register_buffer("epoch_seen", torch.zeros((), dtype=torch.float32, device=dev))

    # -- helpers -----------------------------------------------------------------------------
    def _check_labels(self, target: torch.Tensor, bias: torch.Tensor) -> None:
        bad = (target < 0) | (target >= self.num_classes) | (bias < 0) | (bias >= self.num_biases)
        if bool(bad.any()):
            raise ValueError(
                f"GroupDRO: target must be in [0, {self.num_classes}) and bias in "
                f"[0, {self.num_biases}); the batch has labels outside"
            )
        if not bool(self.allowed[group_ids(target, bias, self.num_biases)].all()):
            raise ValueError("GroupDRO: the batch has a (target, bias) pair outside TrainContext.bias_groups")

    def group_sizes(self) -> torch.Tensor:
        """``n_g`` of the generalisation adjustment.

        The context's counts when given; otherwise the counts of the batches seen in the first
        epoch scaled to the training-set size, ``c_g · num_samples / seen`` (an unbiased
        estimate while the first epoch runs; it also corrects a loader that drops its last
        batch).
        """
        seen = float(self.samples_counted)
        if seen > 0 and self.num_samples > 0:
            return self.group_counts * (self.num_samples / seen)
        return self.group_counts

    def compute_loss(self, model, batch, output):
        if not hasattr(self, "q"):
            raise RuntimeError("GroupDRO.setup(model, context) must be called before training")
        target, bias = batch["target"], batch["bias"]
        self._check_labels(target, bias)
        per_sample = F.cross_entropy(output.logits.float(), target, reduction="none")
        # under torchrun: group losses and weights from the global batch (same q on every rank)
        per_sample, target_all, bias_all = gather_many(per_sample, target, bias)
        g = group_ids(target_all, bias_all, self.num_biases)
        stats = group_losses(per_sample, g, self.num_groups)
        present = stats.count > 0
        adjusted = stats.loss
        if self.options.generalization_adjustment > 0:
            if self.training:
                with torch.no_grad():
                    batch_counts = stats.count.detach().to(self.group_counts.dtype)
                    if bool(self.counting):
                        self.group_counts += batch_counts
                        self.samples_counted += target_all.shape[0]
                    if self.recount:
                        self.epoch_counts += batch_counts
                        self.epoch_seen += target_all.shape[0]
            n_g = self.group_sizes().clamp(min=1)
            adjusted = adjusted + self.options.generalization_adjustment / n_g.sqrt()
        if self.training:
            self.q.copy_(update_group_weights(self.q, adjusted, present, self.options.eta))
        loss = (self.q * present * adjusted).sum()
        with torch.no_grad():
            worst = torch.where(present, stats.loss, torch.full_like(stats.loss, -torch.inf)).max()
            ce = self.classification_loss(output.logits, target)
        logs = {"ce": ce.detach(), "worst_group_loss": worst.detach(), "max_q": self.q.max().detach()}
        return loss, logs

    def on_epoch_end(self, epoch: int) -> None:
        if bool(self.counting) and float(self.samples_counted) > 0:
            self.counting.fill_(False)
        if self.recount and float(self.epoch_seen) > 0:  # this epoch's counts are n_g of the next
            self.group_counts.copy_(self.epoch_counts)
            self.samples_counted.copy_(self.epoch_seen)
            self.epoch_counts.zero_()
            self.epoch_seen.zero_()

    def describe(self):
        return {**super().describe(), "num_groups": getattr(self, "num_groups", None)}
