"""The paper reproductions' shape of protocol: group accuracy on validation and test sets.

Biased MNIST, CelebA and IMDB Face all validate with :func:`~cxrdebias.evaluation.metrics.group_accuracy`
(overall, per (class, bias) group, bias-aligned/conflicting), test every test set once with the
selected model, and report a few headline numbers (``summarise``) plus the full per-test-set
records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cxrdebias.evaluation.metrics import group_accuracy
from cxrdebias.experiments.registry import Finished, Protocol

TEST_SELECTION_NOTE = "test sets never used for selection"

#: (per-test-set :func:`group_accuracy` results, last epoch's record) → ``results["metrics"]``
Summariser = Callable[[dict[str, dict[str, Any]], dict[str, Any]], dict[str, Any]]


def selection_note(best: dict[str, Any] | None) -> str:
    """How the tested model was chosen, for ``results["selection"]``."""
    if best is None:
        return f"last epoch ({TEST_SELECTION_NOTE})"
    return f"best validation {best['metric']} (epoch {best['epoch']}; {TEST_SELECTION_NOTE})"


@dataclass
class AccuracyProtocol(Protocol):
    """A :class:`Protocol` of the reproductions, which also keeps what its results are made of:
    the test sets, ``summarise`` (→ ``results["metrics"]``), the ``headline`` keys printed when
    done and ``params`` (extra top-level keys of ``results.json``: ρ, the split trained on …)."""

    tests: dict[str, Any] = field(default_factory=dict)
    summarise: Summariser | None = None
    headline: tuple[str, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)


def accuracy_protocol(
    cfg: Any,
    *,
    experiment: str,
    title: str,
    train: Any,
    val: Any | None,
    tests: dict[str, Any],
    num_classes: int,
    num_biases: int,
    eval_batch_size: int,
    data_info: Callable[[], dict[str, Any]],
    val_metrics: tuple[str, ...],
    summarise: Summariser,
    headline: tuple[str, ...],
    params: dict[str, Any] | None = None,
) -> AccuracyProtocol:
    """An :class:`AccuracyProtocol` whose results are ``params``, ``epochs``, ``selection``,
    ``metrics`` (``summarise``'s) and ``tests`` (every test set's group accuracy)."""
    def validate(p) -> dict[str, float]:
        g = group_accuracy(p.targets, p.predicted, p.biases)
        return {k: g[k] for k in val_metrics}

    def finish(done: Finished) -> tuple[dict[str, Any], str]:
        results = {}
        for name, split in tests.items():
            p = done.trainer.predict(done.loader(split))
            results[name] = group_accuracy(p.targets, p.predicted, p.biases)
        last = done.result.history[-1]
        metrics = summarise(results, last)
        head = {
            **(params or {}),
            "seed": cfg.seed,
            "epochs": last["epoch"],
            "selection": selection_note(done.result.best),
            "metrics": metrics,
            "tests": results,
        }
        shown = "  ".join(f"{k.removesuffix('_accuracy').replace('_', ' ')} acc {metrics[k]:.4f}" for k in headline)
        return head, shown

    def banner(method, precision: str) -> str:
        return f"{title} method={method.name} {method.describe()} seed={cfg.seed} epochs={cfg.train.epochs} precision={precision}"

    return AccuracyProtocol(
        experiment=experiment,
        train=train,
        val=val,
        num_classes=num_classes,
        num_biases=num_biases,
        eval_batch_size=eval_batch_size,
        validate=validate,
        val_metrics=val_metrics,
        finish=finish,
        data_info=data_info,
        banner=banner,
        splits={name: (lambda s=s: s) for name, s in tests.items()},
        tests=tests,
        summarise=summarise,
        headline=headline,
        params=dict(params or {}),
    )
