"""The method seam: a debiasing method turns (model, batch) into a parameter update.

The trainer never branches on a method's name. It calls :meth:`Method.update` once per batch
and :meth:`Method.on_epoch_end` once per epoch. Simple methods only implement
:meth:`Method.compute_loss` (a loss and a dict of logged values); methods with extra networks
or optimisers (LNL's bias head, ReBias's biased network, LfF's biased model) own them as
sub-modules and override :meth:`update`.

Two explicit hooks serve wrappers and the trainer: :meth:`Method.set_bias_source` (a wrapper that
computes bias labels online hands them to a method with its own update, which reads them through
:meth:`Method.with_bias`) and :meth:`Method.needs_unused_parameter_search` (what DDP must know).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from cxrdebias.data.base import UNKNOWN_BIAS, Batch
from cxrdebias.models.base import ModelOutput

AutocastFactory = Callable[[], AbstractContextManager]

#: ``source(batch, output) -> batch``: the batch with the bias labels a method must use, computed
#: from the model's output on it (see :meth:`Method.set_bias_source`)
BiasSource = Callable[[Batch, ModelOutput], Batch]


@dataclass
class TrainContext:
    """What a method may need to know about the run when it is set up.

    ``build_model(**overrides)`` returns a fresh model of the same family as the main one
    (overrides change its config, e.g. ``kernel_size=1`` for ReBias's biased network);
    ``make_optimizer``/``make_scheduler`` give the run's optimiser and LR schedule for the
    method's own networks.

    ``bias_groups`` (``num_classes × num_biases`` bool, ``None`` = all) are the (target, bias)
    pairs that can occur at all, and ``bias_changes`` says that a sample's bias label may change
    from one step to the next: both describe online pseudo-bias labels (``--bias auto``; the
    cluster labeller's labels are class-specific, ``class·k + cluster``), which GroupDRO uses to
    keep its group weights on the reachable groups and to recount its group sizes every epoch.
    """

    num_samples: int
    num_classes: int
    num_biases: int | None
    make_optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
    make_scheduler: Callable[[torch.optim.Optimizer], Any]
    build_model: Callable[..., nn.Module] | None = None
    device: torch.device = torch.device("cpu")
    bias_groups: torch.Tensor | None = None
    bias_changes: bool = False


class MethodOptions(BaseModel):
    """Options of a method; subclasses add fields. Unknown options are an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Method(nn.Module):
    """Base class of every debiasing method (``vanilla`` included)."""

    #: registry name (``--method NAME``)
    name: ClassVar[str] = ""
    #: one-line description for ``--help`` and the docs
    summary: ClassVar[str] = ""
    #: whether the method needs bias labels in the batch
    requires_bias: ClassVar[bool] = False
    #: the last activation the model should use before its bottleneck (``None`` = default)
    feature_activation: ClassVar[str | None] = None
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    #: whether some of the method's backward passes leave parts of the main model unused (LNL's
    #: second step uses the features only); DDP then has to look for unused parameters
    ddp_find_unused_parameters: ClassVar[bool] = False

    def __init__(self, options: MethodOptions | None = None):
        super().__init__()
        self.options = options if options is not None else self.Options()
        self.register_buffer("class_weights", None, persistent=False)
        self._bias_source: BiasSource | None = None  # see set_bias_source

    # -- configuration ------------------------------------------------------------------
    def set_class_weights(self, weights: torch.Tensor | None) -> None:
        """Per-class weights of the cross-entropy (class-imbalance handling)."""
        self.class_weights = None if weights is None else weights.float()

    def set_bias_source(self, source: BiasSource | None) -> None:
        """Take the bias labels of :meth:`with_bias` from ``source(batch, output)`` (``None``: from the batch).

        For a wrapper that computes bias labels from the model's own forward pass (``--bias auto``:
        :class:`~cxrdebias.debias.unsupervised.UnsupervisedBias`): it sets the source around one call of
        :meth:`update` and clears it afterwards. Methods whose step is :meth:`compute_loss` get their
        labels in the ``batch`` argument instead.
        """
        self._bias_source = source

    def needs_unused_parameter_search(self) -> bool:
        """Whether DDP must look for parameters of the main model that a backward pass left unused
        (:attr:`ddp_find_unused_parameters`; a wrapper answers for the method it wraps)."""
        return bool(self.ddp_find_unused_parameters)

    def setup(self, model: nn.Module, context: TrainContext) -> None:
        """Called once before training (and before a checkpoint is restored): methods with
        extra networks build them and their optimisers from ``context``."""

    # -- training ------------------------------------------------------------------------
    def classification_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = None if self.class_weights is None else self.class_weights.to(logits.device)
        return F.cross_entropy(logits.float(), target, weight=weight)

    def compute_loss(
        self, model: nn.Module, batch: Batch, output: ModelOutput
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss to minimise for the main model and the values to log (detached tensors)."""
        raise NotImplementedError

    def with_bias(self, batch: Batch, output: ModelOutput) -> Batch:
        """The batch whose ``bias`` the method must use, given the model's output on it.

        The batch itself, unless a wrapper has set a source of bias labels computed from that
        output (:meth:`set_bias_source`; ``--bias auto``). A method that overrides :meth:`update`
        and needs bias labels calls it right after its first forward pass and reads
        ``batch["bias"]`` only from the batch it returns.
        """
        source = self._bias_source
        return batch if source is None else source(batch, output)

    def forward_with_bias(
        self, model: nn.Module, batch: Batch, autocast: AutocastFactory
    ) -> tuple[ModelOutput, Batch]:
        """The first forward pass of a method that overrides :meth:`update`.

        Returns the model's output on ``batch["image"]`` (under ``autocast``) and the batch whose
        ``bias`` the method must use (:meth:`with_bias`: the pseudo-bias labels under
        ``--bias auto``), checked by :meth:`check_batch`.
        """
        with autocast():
            output = model(batch["image"])
        batch = self.with_bias(batch, output)
        self.check_batch(batch)
        return output, batch

    def check_batch(self, batch: Batch) -> None:
        if self.requires_bias and bool((batch["bias"] == UNKNOWN_BIAS).any()):
            raise ValueError(
                f"method {self.name!r} needs bias labels but the batch has samples with unknown bias"
            )

    def update(
        self,
        model: nn.Module,
        batch: Batch,
        optimizer: torch.optim.Optimizer,
        autocast: AutocastFactory,
    ) -> dict[str, torch.Tensor]:
        """One optimisation step on ``batch``; returns the logged values."""
        self.check_batch(batch)
        with autocast():
            output = model(batch["image"])
            loss, logs = self.compute_loss(model, batch, output)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        logs = {"loss": loss.detach(), **logs}
        logs["accuracy"] = (output.logits.detach().argmax(1) == batch["target"]).float().mean()
        return logs

    def on_epoch_end(self, epoch: int) -> None:
        """Called after each training epoch (e.g. to step the schedulers the method owns)."""

    def epoch_metrics(self) -> dict[str, Any]:
        """Per-epoch values that are not batch averages, merged into the epoch's record of
        ``metrics.jsonl`` (e.g. ``{"pseudo_bias": {...}}``); called once after each epoch."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """Optimiser/scheduler states the method owns (saved in checkpoints)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.options.model_dump()}
