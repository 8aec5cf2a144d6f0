"""Vanilla empirical risk minimisation: cross-entropy only (the baseline of every table)."""

from __future__ import annotations

from cxrdebias.debias.base import Method


class Vanilla(Method):
    name = "vanilla"
    summary = "cross-entropy only (no debiasing)"

    def compute_loss(self, model, batch, output):
        ce = self.classification_loss(output.logits, batch["target"])
        return ce, {"ce": ce.detach()}
