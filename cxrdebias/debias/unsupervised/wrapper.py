""":class:`UnsupervisedBias`: a debiasing method fed with online pseudo-bias labels instead of
the dataset's (``--bias auto``; the package docstring of :mod:`cxrdebias.debias.unsupervised`
says which methods it wraps and how)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from cxrdebias.data.base import Batch
from cxrdebias.data.sampling import Cells, cells
from cxrdebias.debias.base import Method, TrainContext
from cxrdebias.debias.unsupervised.agreement import label_agreement
from cxrdebias.debias.unsupervised.labellers import build_labeller
from cxrdebias.debias.unsupervised.options import PseudoBiasOptions
from cxrdebias.debias.unsupervised.taps import FeatureTap
from cxrdebias.distributed import gather, gather_rows
from cxrdebias.errors import ConfigError


def _own_step(method: Method) -> bool:
    return type(method).update is not Method.update


def check_wrappable(method: Method, options: PseudoBiasOptions | None = None) -> None:
    """:class:`ConfigError` unless pseudo-bias labels can feed ``method`` (see the package doc)."""
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
        # this step's (model right?, called conflicting?) of this rank's samples, set by _label for _record
        self._last_step: tuple[torch.Tensor, torch.Tensor] | None = None
        self._epoch: dict[str, list[torch.Tensor]] = {}
        self._tap: FeatureTap | None = None  # built by setup (a hook on the model, not state)
        # every training sample's latest pseudo label (-1: not labelled yet), for group-balanced
        # sampling on pseudo labels; in extra_state (checkpoints) — see sampling_cells
        self._sample_labels: torch.Tensor | None = None
        self._drawn: dict[str, int] | None | bool = False  # what this epoch's draw used (False: not asked)

    def needs_unused_parameter_search(self) -> bool:
        return self.inner.needs_unused_parameter_search()

    def set_class_weights(self, weights):
        super().set_class_weights(weights)
        self.inner.set_class_weights(weights)

    def setup(self, model, context: TrainContext) -> None:
        if self.unsupervised.layer is not None:
            self._tap = FeatureTap(model, self.unsupervised.layer, self.unsupervised.layer_pool, self.unsupervised.layer_grid)
        tap = self._tap
        self.labeller.setup(
            tap.width if tap is not None else getattr(model, "feature_dim", None),
            context.num_classes,
            context.num_samples,
            context.device,
            context.make_optimizer,
        )
        if context.num_samples > 0:
            self._sample_labels = torch.full((context.num_samples,), -1, dtype=torch.long, device=context.device)
        # a fixed grid of num_classes × num_labels groups whose members change between steps
        self.inner.setup(
            model,
            dataclasses.replace(
                context, num_biases=self.labeller.num_labels, bias_groups=self.labeller.possible_groups(), bias_changes=True
            ),
        )

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
        self._last_step = ((logits.argmax(1) == target_all)[own], conflicting[own])
        self._remember(index, pseudo_all)
        return pseudo_all[own], conflicting[own]

    @torch.no_grad()
    def _remember(self, index: torch.Tensor, labels: torch.Tensor) -> None:
        """Keep each sample's latest label (a sample drawn twice in the step: its last row, on any device)."""
        table = self._sample_labels
        if table is None:
            return
        index, labels = index.to(table.device).long(), labels.to(table.device)
        order = torch.argsort(index, stable=True)
        index, labels = index[order], labels[order]
        last = torch.ones_like(index, dtype=torch.bool)
        last[:-1] = index[1:] != index[:-1]
        table[index[last]] = labels[last]

    def sampling_cells(self, targets: torch.Tensor) -> Cells | None:
        """The (target, pseudo-bias) cells the coming epoch's group-balanced draw uses
        (``train.sampling=group_balanced`` with ``--bias auto``), or ``None``: the natural order.

        Asked by the loader at the start of each epoch, before its first step, so the labels are
        those the labeller gave during the *previous* epochs — each sample's latest one (a sample
        the draws left out keeps an older label; one never labelled gets the labeller's
        ``fallback``, "bias-aligned"). ``None`` (natural order) before any label exists (epoch 1),
        while the warm-up lasts, and while the shortcut gate is closed — the same evidence the
        method needs before it gets pseudo labels. ``targets``: the training split's, in index order.
        """
        table = self._sample_labels
        targets = torch.as_tensor(targets).long().reshape(-1).cpu()
        if table is None or targets.numel() != table.numel():
            raise ValueError(f"sampling on pseudo labels: {targets.numel()} targets for {0 if table is None else table.numel()} samples")
        ready = int(self.step) >= max(1, self.unsupervised.warmup_steps) and self.gate_open() and bool((table >= 0).any())
        if not ready:
            self._drawn = None
            return None
        labels = table.cpu()
        labels = torch.where(labels >= 0, labels, self.labeller.fallback(targets).cpu())
        found = cells(targets, labels)
        self._drawn = found.describe()
        return found

    def gate_open(self) -> bool:
        """Whether the pseudo labels describe a shortcut: the running aligned share ≥ ``min_aligned``.

        A bias is a shortcut only if it predicts the class. At ρ = 0.997 the attractor calls ≈ 99%
        of the samples aligned; with no colour–digit correlation (ρ = 0.1) ≈ 15%: the groups it
        finds are not the classes' biases, and feeding them to EnD fights the classifier.
        """
        share = float(self.aligned_share)
        return share != share or share >= self.unsupervised.min_aligned  # NaN (no statistics yet): open

    def _record(self, pseudo: torch.Tensor, true_bias: torch.Tensor, target: torch.Tensor) -> None:
        if self._last_step is None or self._last_step[0].shape != target.shape:
            raise RuntimeError("UnsupervisedBias: a step recorded without its labelling (_label was not called)")
        correct, conflicting = self._last_step
        self._last_step = None
        pairs = (("pseudo", pseudo), ("true", true_bias), ("target", target), ("correct", correct), ("conflicting", conflicting))
        for key, value in pairs:
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
        """The wrapped method's own update; it pulls the pseudo labels through
        :meth:`~cxrdebias.debias.base.Method.with_bias` from the source set here."""
        calls: list[torch.Tensor] = []

        def source(inner_batch: Batch, output) -> Batch:
            if calls:  # a second call in one step: the labels of the first (one labelling per step)
                return Batch(image=inner_batch["image"], target=inner_batch["target"], bias=calls[0], index=inner_batch["index"])
            pseudo, conflicting = self._label(inner_batch, output, step)
            calls.extend([pseudo, conflicting])
            given = pseudo if active else self._prior(inner_batch["target"])
            return Batch(image=inner_batch["image"], target=inner_batch["target"], bias=given, index=inner_batch["index"])

        hidden = Batch(image=batch["image"], target=batch["target"], bias=torch.full_like(batch["bias"], -1), index=batch["index"])
        self.inner.set_bias_source(source)
        try:
            logs = self.inner.update(model, hidden, optimizer, autocast)
        finally:
            self.inner.set_bias_source(None)
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
            **_accuracy_by_group(cat["correct"], cat["conflicting"]),  # each step's own call (the cluster labeller's changes)
            **self.labeller.summary(),
            **label_agreement(cat["true"], cat["pseudo"], cat["target"]),
        }
        if self._drawn is not False:  # group-balanced sampling on pseudo labels: this epoch's cells (None: natural order)
            out["sampled_cells"] = self._drawn
            self._drawn = False
        return {"pseudo_bias": out}

    def on_epoch_end(self, epoch: int) -> None:
        self.inner.on_epoch_end(epoch)

    def extra_state(self) -> dict[str, Any]:
        out = {"inner": self.inner.extra_state(), "labeller": self.labeller.extra_state()}
        if self._sample_labels is not None:
            out["sample_labels"] = self._sample_labels.cpu().clone()
        return out

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.inner.load_extra_state(state.get("inner", {}))
        self.labeller.load_extra_state(state.get("labeller", {}))
        saved = state.get("sample_labels")  # absent in checkpoints of older versions: nothing labelled yet
        if saved is not None and self._sample_labels is not None and saved.shape == self._sample_labels.shape:
            self._sample_labels.copy_(saved.to(self._sample_labels.device))

    def describe(self) -> dict[str, Any]:
        u = self.unsupervised.model_dump(exclude={"enabled"})
        return {**self.inner.describe(), "bias": "auto", "unsupervised": u}


def _accuracy_by_group(correct: torch.Tensor, conflicting: torch.Tensor) -> dict[str, float]:
    """The epoch's training accuracy of the model (at each step, before its update) on the samples
    the labeller called conflicting and on those it called aligned (NaN: none)."""
    correct, conflicting = correct.bool(), conflicting.bool().to(correct.device)
    out = {}
    for key, mask in (("model_accuracy_conflicting", conflicting), ("model_accuracy_aligned", ~conflicting)):
        out[key] = float(correct[mask].float().mean()) if bool(mask.any()) else float("nan")
    return out


__all__ = ["UnsupervisedBias", "check_wrappable"]
