r"""LfF: Learning from Failure (Nam, Cha, Ahn, Lee, Shin, NeurIPS 2020).

Two models of the same architecture are trained side by side on every batch:

* a **biased** model ``f_B`` (owned by the method, built with ``TrainContext.build_model``)
  trained with the generalised cross-entropy of Zhang & Sabuncu (2018) (eq. 1)

      ``GCE(p(x; θ), y) = (1 − p_y(x; θ)^q) / q``,   ``∂GCE/∂θ = p_y^q · ∂CE/∂θ`` (eq. 2),

  which up-weights the samples the model already finds easy, so ``f_B`` amplifies whatever
  shortcut (the *bias*) is easiest to learn; ``q → 0`` recovers the cross-entropy;
* the **debiased** (main) model ``f_D``, trained with the cross-entropy of each sample weighted
  by its *relative difficulty* (eq. 3)

      ``W(x) = L_B(x) / (L_B(x) + L_D(x))  ∈ [0, 1]``,

  large on the samples the biased model fails on (the bias-conflicting ones).

As in Algorithm 1 of the paper, ``L_B``, ``L_D`` are not the raw per-batch losses but, per
training sample, exponential moving averages of the cross-entropies of both models
(``ema_i ← α·ema_i + (1 − α)·CE_i``, the first visit stores ``CE_i``; ``α = 0.7``), each
divided by the maximum of its EMA over the samples of the same class seen so far. The weight is
detached (no gradient flows into ``W``) and an ``eps`` keeps it finite.

Everything is vectorised: the EMA buffers are indexed by ``batch["index"]`` and the class-wise
maxima are one ``scatter_reduce`` over the buffer — no Python loop over classes or samples.

Differences from the authors' code (alinlab/LfF ``train.py``, ``module/loss.py``):

* their ``GeneralizedCELoss`` is the surrogate ``CE · q·p_y^q`` (``p_y`` detached), whose
  gradient is ``q`` times the gradient of eq. 1; ours is eq. 1 itself
  (``−expm1(q·log p_y)/q``, stable for small ``q`` and exactly the CE in the limit). With Adam
  the constant factor barely matters; the logged ``gce_b`` is the real GCE value.
* they divide by the class maximum over *all* samples of the class (unseen ones hold 0 — the
  same maximum, since losses are ≥ 0) and a class whose EMAs are all 0 gives ``0/0 = NaN``;
  here the maximum is taken over the seen samples and a zero maximum gives weight 0.
* the main model's cross-entropy honours the run's class weights (``Σ c_{y_i} W_i CE_i /
  Σ c_{y_i}``; with no class weights: the mean of ``W_i · CE_i`` as in the reference).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from cxrdebias.data.base import UNKNOWN_BIAS
from cxrdebias.debias.base import Method, MethodOptions, TrainContext
from cxrdebias.distributed import gather_rows


def generalized_cross_entropy(logits: torch.Tensor, target: torch.Tensor, q: float = 0.7) -> torch.Tensor:
    """Per-sample generalised cross-entropy ``(1 − p_y^q)/q`` (LfF eq. 1; Zhang & Sabuncu 2018).

    Computed as ``−expm1(q·log_softmax(logits)_y)/q`` in at least float32: accurate for small
    ``q`` (→ the cross-entropy ``−log p_y`` as ``q → 0``) and for ``p_y`` near 1. Its gradient is
    ``p_y^q`` times the gradient of the cross-entropy (eq. 2). Values lie in ``[0, 1/q]``.
    """
    if q <= 0:
        raise ValueError(f"GCE needs q > 0, got {q} (q → 0 is the cross-entropy)")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    log_p = F.log_softmax(logits, dim=1).gather(1, target.long().unsqueeze(1)).squeeze(1)
    return -torch.expm1(q * log_p) / q


def relative_difficulty(loss_b: torch.Tensor, loss_d: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``W = L_B / (L_B + L_D + eps)`` (LfF eq. 3): in ``[0, 1]`` for non-negative losses."""
    return loss_b / (loss_b + loss_d + eps)


def class_max(values: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class maximum of non-negative ``values`` over the entries with ``labels >= 0``.

    Entries labelled ``< 0`` (unseen samples) are ignored; a class with no entry gets 0.
    """
    known = labels >= 0
    out = torch.zeros(num_classes, dtype=values.dtype, device=values.device)
    return out.scatter_reduce(
        0, labels.clamp(min=0), torch.where(known, values, torch.zeros_like(values)), "amax", include_self=True
    )


class LfFOptions(MethodOptions):
    q: float = Field(0.7, gt=0, le=1, description="GCE exponent q of the biased model (eq. 1)")
    ema: float = Field(0.7, ge=0, lt=1, description="EMA coefficient α of the per-sample losses (weight of the past)")
    eps: float = Field(1e-8, gt=0, description="added to the denominator of the relative difficulty W (eq. 3)")


class LfF(Method):
    """Learning from Failure: a GCE-trained biased model re-weights the main model's CE.

    Sub-module ``biased_model`` (``f_B``) and buffers ``loss_ema_b``, ``loss_ema_d`` (per-sample
    loss EMAs) and ``sample_target`` (the class of each sample seen so far, ``-1`` = not yet
    seen) are checkpointed with ``state_dict``; ``f_B``'s optimiser and scheduler go through
    :meth:`extra_state`.

    Logged: ``loss`` (weighted CE of ``f_D`` + GCE of ``f_B``, the quantity minimised),
    ``ce`` (the main model's plain CE), ``weighted_ce``, ``gce_b``, ``mean_weight``,
    ``accuracy`` / ``accuracy_b`` of both models and — only for batches whose samples have known
    bias labels — ``weight_conflicting`` / ``weight_aligned``: the mean ``W`` over the samples
    with ``target != bias`` / ``target == bias``. That split assumes bias labels name classes
    (Biased MNIST colours, binary CelebA attributes); for other bias labels (acquisition sites)
    it has no meaning. A key is logged only when its group is in the batch.
    """

    name = "lff"
    summary = "LfF: a GCE-trained biased model re-weights the CE of the main model (Nam et al. 2020)"
    requires_bias = False
    Options = LfFOptions

    def setup(self, model, context: TrainContext) -> None:
        if context.build_model is None:
            raise ValueError(
                "LfF needs TrainContext.build_model to create its biased model (a second model of "
                "the same architecture); the context has none"
            )
        if context.num_samples <= 0:
            raise ValueError(
                "LfF needs TrainContext.num_samples (the training-set size) for its per-sample "
                f"loss averages, got {context.num_samples}"
            )
        self.num_classes = int(context.num_classes)
        self.num_samples = int(context.num_samples)
        dev = context.device
        self.biased_model = context.build_model().to(dev)
        self.optimizer_b = context.make_optimizer(self.biased_model.parameters())
        self.scheduler_b = context.make_scheduler(self.optimizer_b)
        self.register_buffer("loss_ema_b", torch.zeros(self.num_samples, device=dev))
        self.register_buffer("loss_ema_d", torch.zeros(self.num_samples, device=dev))
        self.register_buffer("sample_target", torch.full((self.num_samples,), -1, dtype=torch.long, device=dev))

    # -- the weights (Algorithm 1) ------------------------------------------------------------
    @torch.no_grad()
    def sample_weights(
        self, index: torch.Tensor, target: torch.Tensor, ce_b: torch.Tensor, ce_d: torch.Tensor
    ) -> torch.Tensor:
        """Update the loss EMAs of the samples ``index`` and return their weights ``W``.

        ``ce_b``/``ce_d`` are the per-sample cross-entropies of the biased/main model. Only the
        entries ``index`` of the buffers change (an index repeated within one batch keeps one
        of its values).
        """
        a = self.options.ema
        seen = self.sample_target[index] >= 0
        ce_b, ce_d = ce_b.to(self.loss_ema_b.dtype), ce_d.to(self.loss_ema_d.dtype)
        ema_b = torch.where(seen, a * self.loss_ema_b[index] + (1 - a) * ce_b, ce_b)
        ema_d = torch.where(seen, a * self.loss_ema_d[index] + (1 - a) * ce_d, ce_d)
        self.loss_ema_b[index] = ema_b
        self.loss_ema_d[index] = ema_d
        self.sample_target[index] = target
        tiny = torch.finfo(ema_b.dtype).tiny
        max_b = class_max(self.loss_ema_b, self.sample_target, self.num_classes)[target].clamp(min=tiny)
        max_d = class_max(self.loss_ema_d, self.sample_target, self.num_classes)[target].clamp(min=tiny)
        return relative_difficulty(ema_b / max_b, ema_d / max_d, self.options.eps)

    def _check(self, batch) -> None:
        index, target = batch["index"], batch["target"]
        bad = (index < 0) | (index >= self.num_samples) | (target < 0) | (target >= self.num_classes)
        if bool(bad.any()):
            raise ValueError(
                f"LfF: batch['index'] must be in [0, {self.num_samples}) and targets in "
                f"[0, {self.num_classes}); the batch has values outside"
            )

    # -- training -----------------------------------------------------------------------------
    def update(self, model, batch, optimizer, autocast):
        if not hasattr(self, "biased_model"):
            raise RuntimeError("LfF.setup(model, context) must be called before training")
        self._check(batch)
        x, target = batch["image"], batch["target"]
        with autocast():
            logits_d = model(x).logits
            logits_b = self.biased_model(x).logits
        logits_d, logits_b = logits_d.float(), logits_b.float()
        ce_d = F.cross_entropy(logits_d, target, reduction="none")
        ce_b = F.cross_entropy(logits_b, target, reduction="none")
        # under torchrun every rank updates the loss EMAs of the global batch (identical buffers)
        gathered, own = gather_rows(batch["index"], target, ce_b.detach(), ce_d.detach())
        weight = self.sample_weights(*gathered)[own]
        gce_b = generalized_cross_entropy(logits_b, target, self.options.q).mean()
        cw = (
            torch.ones_like(ce_d)
            if self.class_weights is None
            else self.class_weights.to(ce_d.device)[target]
        )
        weighted_ce = (cw * weight * ce_d).sum() / cw.sum()
        loss = weighted_ce + gce_b
        optimizer.zero_grad(set_to_none=True)
        self.optimizer_b.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        self.optimizer_b.step()
        with torch.no_grad():
            logs = {
                "loss": loss.detach(),
                "ce": (cw * ce_d.detach()).sum() / cw.sum(),
                "weighted_ce": weighted_ce.detach(),
                "gce_b": gce_b.detach(),
                "mean_weight": weight.mean(),
                "accuracy": (logits_d.detach().argmax(1) == target).float().mean(),
                "accuracy_b": (logits_b.detach().argmax(1) == target).float().mean(),
            }
            logs.update(self._bias_diagnostics(weight, target, batch.get("bias")))
        return logs

    @staticmethod
    def _bias_diagnostics(weight, target, bias) -> dict[str, torch.Tensor]:
        """Mean ``W`` on bias-conflicting (``target != bias``) vs aligned samples of known bias.

        Assumes bias labels index classes (Biased MNIST: colour ``c`` goes with digit ``c``).
        """
        if bias is None:
            return {}
        known = bias != UNKNOWN_BIAS
        out = {}
        for key, mask in (("weight_conflicting", known & (target != bias)), ("weight_aligned", known & (target == bias))):
            n = mask.sum()
            if bool(n > 0):
                out[key] = (weight * mask).sum() / n
        return out

    def on_epoch_end(self, epoch: int) -> None:
        if getattr(self, "scheduler_b", None) is not None:
            self.scheduler_b.step()

    def extra_state(self) -> dict[str, Any]:
        if not hasattr(self, "optimizer_b"):
            return {}
        return {
            "optimizer_b": self.optimizer_b.state_dict(),
            "scheduler_b": self.scheduler_b.state_dict() if self.scheduler_b is not None else None,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.optimizer_b.load_state_dict(state["optimizer_b"])
        if self.scheduler_b is not None and state.get("scheduler_b") is not None:
            self.scheduler_b.load_state_dict(state["scheduler_b"])
