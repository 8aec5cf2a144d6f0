r"""LNL: Learning Not to Learn (Kim, Kim, Kim, Kim, Kim, CVPR 2019, arXiv:1812.10352).

LNL removes a known bias from the bottleneck features ``f(x)`` of a classifier ``g∘f`` by
minimising the mutual information ``I(b(X); f(X))`` between the features and the bias label.
A bias-prediction head ``h`` estimates ``q(b | f(x))``; the network and the head then play a
minimax game, trained by two alternating updates per batch (paper §3.2–3.3, the authors'
``trainer.py``):

1. **Main network** (``θ_f``, ``θ_g``): ``CE(g(f(x)), y) + λ · Σ_k q_k log q_k``, the
   classification loss plus λ times the *negative* entropy of the head's softmax — the entropy
   term of eq. 9. Minimising the negative entropy makes the head maximally uncertain about the
   bias. Only the main optimiser steps; the head's gradients from this step are discarded.
2. **Bias head through a gradient-reversal layer** (``θ_h`` and ``θ_f``):
   ``μ · CE(h(GRL(f(x))), b)``. The head learns to predict the bias; the reversal layer
   (identity forward, gradient × ``−s`` backward, ``s = 0.1`` in the reference) turns the same
   gradient into an *ascent* direction for the feature extractor, which learns to hide the bias.
   Both the head's and the main optimiser step (the classifier ``g`` gets no gradient here and
   is skipped).

The features are recomputed for step 2 (the network changed in step 1), as in the reference.

Besides :class:`LNL` this module holds the pieces the adversarial methods share:
:func:`grad_reverse`, :class:`BiasHead`, :func:`negative_entropy`, :func:`confusion_loss` and
:class:`BiasHeadMethod` (a method that owns a bias head, its optimiser and scheduler; BlindEye in
:mod:`cxrdebias.debias.blindeye` builds on it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import AliasChoices, Field
from torch import nn

from cxrdebias.data.base import Batch
from cxrdebias.debias.base import AutocastFactory, Method, MethodOptions, TrainContext
from cxrdebias.errors import ConfigError, DataError

# -- gradient reversal ---------------------------------------------------------------------


class GradReverse(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by ``−scale`` backward.

    The gradient-reversal layer of Ganin & Lempitsky (ICML 2015) used by LNL (scale 0.1 in the
    authors' code). The backward is itself differentiable (double backward works).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_output * (-ctx.scale), None


def grad_reverse(x: torch.Tensor, scale: float = 0.1) -> torch.Tensor:
    """``x`` unchanged; its gradient multiplied by ``−scale`` on the way back."""
    return GradReverse.apply(x, float(scale))


# -- the bias head and its losses ----------------------------------------------------------


class BiasHead(nn.Module):
    """Predicts the bias label from bottleneck features: ``Linear(D, K)``, or
    ``Linear(D, hidden) → ReLU → Linear(hidden, K)`` when ``hidden > 0``.

    Always runs in float32 (autocast disabled): it is tiny, and its softmax feeds entropy and
    confusion terms that lose precision in bf16. Returns logits.
    """

    def __init__(self, in_features: int, num_biases: int, hidden: int = 0):
        super().__init__()
        if in_features < 1:
            raise ValueError(f"in_features must be positive, got {in_features}")
        if num_biases < 2:
            raise ValueError(f"a bias head needs at least 2 bias classes, got {num_biases}")
        if hidden < 0:
            raise ValueError(f"hidden must be >= 0 (0 = linear head), got {hidden}")
        if hidden:
            self.net: nn.Module = nn.Sequential(
                nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_biases)
            )
        else:
            self.net = nn.Linear(in_features, num_biases)
        self.in_features = in_features
        self.num_biases = num_biases

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.net(features.flatten(1).float())


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    if logits.dim() != 2:
        raise ValueError(f"logits must be N×K (got shape {tuple(logits.shape)})")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # at least float32; float64 stays float64
    return F.log_softmax(logits, dim=1)


def negative_entropy(logits: torch.Tensor) -> torch.Tensor:
    r"""Batch mean of ``Σ_k q_k log q_k`` with ``q = softmax(logits)`` — minus the entropy.

    LNL's regulariser (entropy term of eq. 9). ``−log K`` (its minimum) for a uniform ``q``,
    0 (its maximum) for a one-hot ``q``. Log-probabilities are valid logits; a ``−inf`` logit
    (probability exactly 0) contributes ``0·log 0 = 0`` with a finite gradient.
    """
    log_q = _log_probs(logits)
    q = log_q.exp()
    # where q == 0 use log q := 0, so neither the value nor the gradient sees 0·(−inf)
    safe_log_q = torch.where(q > 0, log_q, torch.zeros_like(log_q))
    return (q * safe_log_q).sum(dim=1).mean()


def confusion_loss(logits: torch.Tensor) -> torch.Tensor:
    r"""Batch mean of ``−(1/K) Σ_k log q_k``: cross-entropy between the uniform distribution and
    ``q = softmax(logits)`` (BlindEye's confusion loss, Alvi et al. 2018, eq. 3).

    ``log K`` (its minimum) for a uniform ``q``; grows without bound as ``q`` approaches a
    one-hot vector (``+inf`` when some ``q_k = 0``). Its gradient with respect to the logits
    is ``(q − 1/K)/N``.
    """
    return -_log_probs(logits).mean(dim=1).mean()


# -- methods that own a bias head ----------------------------------------------------------


class BiasHeadOptions(MethodOptions):
    head_hidden: int = Field(
        0, ge=0, description="hidden units of the bias head (0 = a linear head on the features)"
    )


class BiasHeadMethod(Method):
    """A method that owns a :class:`BiasHead` on the model's bottleneck features.

    :meth:`setup` builds the head (``model.feature_dim`` → ``context.num_biases`` classes) and
    its optimiser and LR schedule with the run's settings (``context.make_optimizer`` /
    ``make_scheduler``); the head is a sub-module (in ``state_dict``), its optimiser and
    scheduler states go through :meth:`extra_state`; the scheduler steps in
    :meth:`on_epoch_end`, like the main one.
    """

    requires_bias = True
    Options = BiasHeadOptions

    def __init__(self, options: MethodOptions | None = None):
        super().__init__(options)
        self.bias_head: BiasHead | None = None
        self.head_optimizer: torch.optim.Optimizer | None = None
        self.head_scheduler: Any = None

    def setup(self, model: nn.Module, context: TrainContext) -> None:
        if context.num_biases is None:
            raise ConfigError(
                f"method {self.name!r} trains a bias-prediction head and needs the number of bias "
                "classes (num_biases), but the run does not know it: use a dataset with bias labels"
            )
        feature_dim = getattr(model, "feature_dim", None)
        if not isinstance(feature_dim, int) or feature_dim < 1:
            raise ConfigError(
                f"method {self.name!r} needs a model with an integer `feature_dim` "
                f"(its bottleneck size); {type(model).__name__} has {feature_dim!r}"
            )
        head = BiasHead(feature_dim, context.num_biases, self.options.head_hidden)
        self.bias_head = head.to(context.device)
        self.head_optimizer = context.make_optimizer(self.bias_head.parameters())
        self.head_scheduler = context.make_scheduler(self.head_optimizer)

    def _head(self) -> tuple[BiasHead, torch.optim.Optimizer]:
        if self.bias_head is None or self.head_optimizer is None:
            raise RuntimeError(f"method {self.name!r}: call setup(model, context) before update()")
        return self.bias_head, self.head_optimizer

    def check_batch(self, batch: Batch) -> None:
        super().check_batch(batch)
        k = self.bias_head.num_biases if self.bias_head is not None else None
        bias = batch["bias"]
        if k is not None and bool(((bias < 0) | (bias >= k)).any()):
            raise DataError(
                f"method {self.name!r}: bias labels must lie in [0, {k - 1}] (num_biases={k}); "
                f"the batch has values {sorted(set(bias.unique().tolist()))}"
            )

    def on_epoch_end(self, epoch: int) -> None:
        if self.head_scheduler is not None:
            self.head_scheduler.step()

    def extra_state(self) -> dict[str, Any]:
        return {
            "head_optimizer": None if self.head_optimizer is None else self.head_optimizer.state_dict(),
            "head_scheduler": None if self.head_scheduler is None else self.head_scheduler.state_dict(),
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "head_optimizer" not in state:
            raise ValueError(
                f"method {self.name!r}: the saved state has no bias-head optimiser "
                f"(keys: {sorted(state)}); was it written by another method?"
            )
        _, head_optimizer = self._head()
        if state["head_optimizer"] is not None:
            head_optimizer.load_state_dict(state["head_optimizer"])
        if self.head_scheduler is not None and state.get("head_scheduler") is not None:
            self.head_scheduler.load_state_dict(state["head_scheduler"])


def batch_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose arg-max equals the label (detached)."""
    return (logits.detach().argmax(1) == labels).float().mean()


class LNLOptions(BiasHeadOptions):
    lambda_: float = Field(
        0.01,
        ge=0,
        validation_alias=AliasChoices("lambda_", "lambda"),
        description="λ: weight of the head's negative entropy in the main loss (eq. 9)",
    )
    mu: float = Field(1.0, gt=0, description="μ: weight of the adversarial bias-prediction loss")
    grl_scale: float = Field(
        0.1, ge=0, description="gradient-reversal factor s (features get −s × the head's gradient)"
    )


class LNL(BiasHeadMethod):
    """Learning Not to Learn: entropy-regularised classifier vs a bias head behind a
    gradient-reversal layer, two alternating updates per batch (see the module docstring)."""

    ddp_find_unused_parameters = True  # step 2 back-propagates through the features only

    name = "lnl"
    summary = "LNL: unlearn the bias with a bias head behind gradient reversal + entropy term"
    Options = LNLOptions

    def update(
        self, model: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer, autocast: AutocastFactory
    ) -> dict[str, torch.Tensor]:
        head, head_optimizer = self._head()
        o = self.options

        # step 1: main network, CE + λ·(negative entropy of the head's prediction)
        output, batch = self.forward_with_bias(model, batch, autocast)  # pseudo-bias under --bias auto
        image, target, bias = batch["image"], batch["target"], batch["bias"]
        ce = self.classification_loss(output.logits, target)
        neg_entropy = negative_entropy(head(output.features))
        loss = ce + o.lambda_ * neg_entropy if o.lambda_ else ce
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        # step 2: bias head (and, reversed, the feature extractor) on μ·CE(bias)
        optimizer.zero_grad(set_to_none=True)
        head_optimizer.zero_grad(set_to_none=True)  # drop the head's gradients from step 1
        with autocast():
            features = model(image).features
        bias_logits = head(grad_reverse(features, o.grl_scale))
        bias_ce = F.cross_entropy(bias_logits, bias)
        (o.mu * bias_ce).backward()
        optimizer.step()
        head_optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        head_optimizer.zero_grad(set_to_none=True)

        return {
            "loss": loss.detach(),
            "ce": ce.detach(),
            "neg_entropy": neg_entropy.detach(),
            "bias_ce": bias_ce.detach(),
            "bias_accuracy": batch_accuracy(bias_logits, bias),
            "accuracy": batch_accuracy(output.logits, target),
        }


__all__ = [
    "LNL",
    "BiasHead",
    "BiasHeadMethod",
    "BiasHeadOptions",
    "GradReverse",
    "batch_accuracy",
    "LNLOptions",
    "confusion_loss",
    "grad_reverse",
    "negative_entropy",
]
