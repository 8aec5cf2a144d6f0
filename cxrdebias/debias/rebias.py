r"""ReBias: learning de-biased representations with biased representations (Bahng et al., ICML 2020).

ReBias needs no bias labels. Instead it builds a network ``G`` that is *biased by design* — for
Biased MNIST a SimpleConvNet with 1×1 kernels, which can see colour but not shape — and trains
the main network ``F`` to be statistically independent of it, measured by the unbiased HSIC
estimator HSIC₁ (Song et al. 2012; :mod:`cxrdebias.debias.hsic`) between the pooled bottleneck
features ``f = F(x)`` and ``g = G(x)``. The min–max problem (eq. 3) — ``F`` minimises its
dependence on the *worst-case* (most dependent) member of the biased family, which itself
keeps fitting the labels — is solved per player as

    G:  min_G  L(G) − λ_g · HSIC₁(g, f)      (fit the labels and become as dependent on F as
                                              the biased family allows)
    F:  min_F  L(F) + λ   · HSIC₁(f, g)      (fit the labels while being independent of that g)

with ``L`` the cross-entropy. The two problems are solved by alternating updates on every
batch: first one step of ``G`` (``f`` treated as a constant), then one step of ``F`` against the
*updated* ``G`` (``g`` treated as a constant). This G-then-F order is the reference code's
(clovaai/rebias ``trainer.py``: ``_train_epoch`` runs ``_update_g`` ``n_g_update`` times, then
``_update_f``); the paper's Algorithm 1 lists the ``f`` update first. With one step per player
per batch the two orders differ only in which network meets the other's freshly updated state.

HSIC sees, by default (``hsic_features="raw"``), the **raw pooled features** of both networks,
as the reference does (its SimpleConvNet has no normalisation): when the model L2-normalises its
bottleneck in the forward path (``model.normalize_features``, EnD's information bottleneck), the
features *before* that normalisation (``cxrdebias.models.capture_pooled``). With
``hsic_features="bottleneck"`` — and for a model without a ``bottleneck`` module (not built by
this package) — HSIC sees the model's ``features`` output instead (normalised when
the model normalises; every distance then lies in ``[0, 2]``, so ``σ = 1`` is another kernel
scale than the reference's) — the behaviour before issue 25, kept as an option.

Implementation (what differs from the reference code, clovaai/rebias ``trainer.py``):

* ``F`` runs **one** forward pass per batch. Its (detached) features serve ``G``'s step — ``F``
  has not changed yet, and in train mode BatchNorm uses the batch statistics, so they equal
  what a second forward pass would give — and its graph is reused for ``F``'s own step. The
  reference runs ``F`` twice per batch, so its BatchNorm running statistics move twice per
  batch; ours move once, like every other method's. ``G`` runs twice (before and after its
  step, as in the reference; its running statistics are never used by ReBias).
* Cross-features are explicitly detached, so no gradient is computed into the network that is
  not being updated (the reference computes and then discards them).
* The HSIC₁ diagonal is zeroed by masking, correct for any kernel (see
  :mod:`cxrdebias.debias.hsic`); the median-heuristic radius is computed on each batch.
* Batches with fewer than 4 samples (HSIC₁ undefined) train both networks with the
  cross-entropy only and log ``hsic = 0``.
* ``G`` is built by the run's own model factory (``TrainContext.build_model``) with the
  ``biased_model`` overrides, and has its own optimiser and LR schedule of the same kind as the
  main model's (Adam + StepLR in the paper), both checkpointed (``extra_state``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import nn

from cxrdebias.debias.base import Method, MethodOptions
from cxrdebias.debias.hsic import hsic
from cxrdebias.distributed import gather, gather_many
from cxrdebias.errors import CheckpointError
from cxrdebias.models import capture_pooled

MIN_HSIC_BATCH = 4


def _default_biased_model() -> dict[str, Any]:
    return {"kernel_size": 1}


class ReBiasOptions(MethodOptions):
    lambda_: float = Field(1.0, ge=0, description="weight λ of HSIC₁(f, g) in the main network's loss")
    lambda_g: float = Field(
        1.0, ge=0, description="weight λ_g of −HSIC₁(g, f) in the biased network's loss (0: G fits labels only)"
    )
    kernel: Literal["rbf", "linear"] = Field("rbf", description="HSIC kernel on the pooled features")
    sigma: Annotated[float, Field(gt=0)] | Literal["median"] = Field(
        1.0,
        description="RBF radius σ in exp(−‖u−u'‖²/(2σ²)): a number (1 for Biased MNIST) or 'median' "
        "(median pairwise distance of each batch's features, per network)",
    )
    update_g: bool = Field(True, description="train the biased network G (False: G stays as initialised)")
    hsic_features: Literal["raw", "bottleneck"] = Field(
        "raw",
        description="what HSIC sees: 'raw' pooled features before any L2 normalisation (the reference's) "
        "or the model's 'bottleneck' output (normalised when model.normalize_features)",
    )
    biased_model: dict[str, Any] = Field(
        default_factory=_default_biased_model,
        description="model-config overrides for the biased network G (default: 1×1 kernels, "
        "SimpleConvNet only; other families need their own overrides)",
    )


class ReBias(Method):
    """Alternating min–max updates of ``G`` (``CE_g − λ_g·HSIC₁``) and ``F`` (``CE + λ·HSIC₁``), eq. 3."""

    name = "rebias"
    summary = "ReBias: make the features independent (HSIC) of a network biased by design"
    requires_bias = False
    Options = ReBiasOptions

    def __init__(self, options: MethodOptions | None = None):
        super().__init__(options)
        self.biased: nn.Module | None = None
        self.g_optimizer: torch.optim.Optimizer | None = None
        self.g_scheduler: Any = None

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self, model, context) -> None:
        if context.build_model is None:
            raise ValueError(
                "ReBias needs TrainContext.build_model to build its biased network G "
                "(a model of the same family with the 'biased_model' overrides); none was given"
            )
        biased = context.build_model(**dict(self.options.biased_model))
        if not isinstance(biased, nn.Module):
            raise TypeError(f"TrainContext.build_model returned {type(biased).__name__}, expected an nn.Module")
        self.biased = biased.to(context.device)
        self.g_optimizer = context.make_optimizer(self.biased.parameters())
        self.g_scheduler = context.make_scheduler(self.g_optimizer)

    def _require_setup(self) -> nn.Module:
        if self.biased is None or self.g_optimizer is None:
            raise RuntimeError("ReBias.setup(model, context) must be called before training")
        return self.biased

    def _forward(self, net: nn.Module, x: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """``(output, the features HSIC sees)``: raw pooled features or the bottleneck output."""
        if self.options.hsic_features == "bottleneck" or not hasattr(getattr(net, "module", net), "bottleneck"):
            out = net(x)  # a model of its own without a bottleneck module: its features as they are
            return out, out.features
        with capture_pooled(net) as seen:
            out = net(x)
        return out, seen[-1]

    def _hsic(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """HSIC over the global batch under torchrun (the kernels span every rank's samples)."""
        return hsic(*gather_many(a, b), kernel=self.options.kernel, sigma=self.options.sigma)

    # -- training -------------------------------------------------------------------------------
    def update(self, model, batch, optimizer, autocast):
        """One alternating step (eq. 3): ``G`` first, then ``F`` against the updated ``G`` (the
        reference code's order; the paper's Algorithm 1 lists ``f`` first)."""
        biased = self._require_setup()
        self.check_batch(batch)
        o = self.options
        x, target = batch["image"], batch["target"]
        use_hsic = gather(target).shape[0] >= MIN_HSIC_BATCH  # the global batch

        with autocast():
            out_f, f_feat = self._forward(model, x)
        f_const = f_feat.detach()

        # -- G: min CE_g − λ_g·HSIC₁(g, f), f fixed --------------------------------------------
        if o.update_g:
            with autocast():
                out_g, g_feat = self._forward(biased, x)
            ce_g = self.classification_loss(out_g.logits, target)
            loss_g = ce_g
            if o.lambda_g > 0 and use_hsic:
                loss_g = ce_g - o.lambda_g * self._hsic(g_feat, f_const)
            self.g_optimizer.zero_grad(set_to_none=True)
            loss_g.backward()
            self.g_optimizer.step()
            with torch.no_grad(), autocast():
                g_const = self._forward(biased, x)[1]  # the updated G
        else:
            with torch.no_grad(), autocast():
                out_g, g_const = self._forward(biased, x)
            ce_g = self.classification_loss(out_g.logits, target)
        g_const = g_const.detach()

        # -- F: min CE + λ·HSIC₁(f, g), g fixed ---------------------------------------------------
        ce = self.classification_loss(out_f.logits, target)
        if not use_hsic:
            dependence = ce.new_zeros(())
        elif o.lambda_ > 0:
            dependence = self._hsic(f_feat, g_const)
        else:
            with torch.no_grad():
                dependence = self._hsic(f_const, g_const)
        loss = ce + o.lambda_ * dependence if o.lambda_ > 0 else ce
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        return {
            "loss": loss.detach(),
            "ce": ce.detach(),
            "hsic": dependence.detach(),
            "ce_g": ce_g.detach(),
            "accuracy_g": (out_g.logits.detach().argmax(1) == target).float().mean(),
            "accuracy": (out_f.logits.detach().argmax(1) == target).float().mean(),
        }

    def on_epoch_end(self, epoch: int) -> None:
        if self.g_scheduler is not None:
            self.g_scheduler.step()

    # -- checkpoints ----------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {
            "g_optimizer": self.g_optimizer.state_dict() if self.g_optimizer is not None else None,
            "g_scheduler": self.g_scheduler.state_dict() if self.g_scheduler is not None else None,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._require_setup()
        if state.get("g_optimizer") is None:
            raise CheckpointError("ReBias checkpoint lacks the biased network's optimiser state")
        self.g_optimizer.load_state_dict(state["g_optimizer"])
        if self.g_scheduler is not None and state.get("g_scheduler") is not None:
            self.g_scheduler.load_state_dict(state["g_scheduler"])


__all__ = ["ReBias", "ReBiasOptions"]
