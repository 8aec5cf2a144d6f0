r"""BlindEye: Turning a Blind Eye (Alvi, Zisserman, Nellåker, ECCV Workshops 2018).

A bias ("spurious variation") classifier ``h`` sits on the bottleneck features ``f(x)`` of the
main network. Two updates per batch, from one forward pass of the network:

1. **Bias head** (``θ_s``), representation fixed: ``L_s = CE(h(f(x)), b)`` (eq. 2) on
   *detached* features — the head becomes the best bias predictor it can be on the current
   features; the network receives no gradient from this step.
2. **Main network** (``θ_repr``, ``θ_p``), head fixed: ``L_p + α·L_conf`` (eqs. 1, 3, 4) where
   ``L_p`` is the classification cross-entropy and
   ``L_conf = −1/N Σ_n (1/K) Σ_k log q_nk`` the cross-entropy between the (just updated) head's
   softmax ``q`` and the uniform distribution over the ``K`` bias classes
   (:func:`~cxrdebias.debias.lnl.confusion_loss`). Minimising it drives the features towards
   making the head maximally confused; the head's parameters are not updated here.

Unlike LNL there is no gradient reversal: the feature extractor *minimises* a loss whose
minimum (``log K``) is reached exactly when the head outputs the uniform distribution, rather
than maximising the head's cross-entropy (which would push the head towards *wrong* confident
predictions — still bias information). The head, its optimiser, scheduler and checkpoint state
come from :class:`~cxrdebias.debias.lnl.BiasHeadMethod`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from cxrdebias.data.base import Batch
from cxrdebias.debias.base import AutocastFactory
from cxrdebias.debias.lnl import BiasHeadMethod, BiasHeadOptions, batch_accuracy, confusion_loss


class BlindEyeOptions(BiasHeadOptions):
    alpha: float = Field(1.0, ge=0, description="α: weight of the confusion loss (eq. 4)")


class BlindEye(BiasHeadMethod):
    """``CE + α·L_conf`` for the network; ``CE(bias)`` on detached features for the head."""

    name = "blindeye"
    summary = "BlindEye: make a bias classifier on the features maximally confused"
    Options = BlindEyeOptions

    def update(
        self, model: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer, autocast: AutocastFactory
    ) -> dict[str, torch.Tensor]:
        head, head_optimizer = self._head()
        output, batch = self.forward_with_bias(model, batch, autocast)  # pseudo-bias under --bias auto
        target, bias = batch["target"], batch["bias"]

        # step 1: the bias head learns the bias from the current (detached) features
        bias_logits = head(output.features.detach())
        bias_ce = F.cross_entropy(bias_logits, bias)
        head_optimizer.zero_grad(set_to_none=True)
        bias_ce.backward()
        head_optimizer.step()

        # step 2: the network classifies and confuses the updated head
        ce = self.classification_loss(output.logits, target)
        alpha = self.options.alpha
        confusion = confusion_loss(head(output.features))
        loss = ce + alpha * confusion if alpha else ce
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        head_optimizer.zero_grad(set_to_none=True)  # the confusion step never moves the head

        return {
            "loss": loss.detach(),
            "ce": ce.detach(),
            "confusion": confusion.detach(),
            "bias_ce": bias_ce.detach(),
            "bias_accuracy": batch_accuracy(bias_logits, bias),
            "accuracy": batch_accuracy(output.logits, target),
        }


__all__ = ["BlindEye", "BlindEyeOptions"]
