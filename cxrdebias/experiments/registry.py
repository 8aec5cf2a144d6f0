"""The protocol registry: one entry per ``data.kind``, and what a protocol hands the runner.

A *protocol* is what a dataset contributes to an experiment: its data config (the ``data:``
section of a config file), the splits, the model's input, the validation metrics and what the
results file reports (:class:`Protocol`). Everything else — method, model, trainer, run
folder, provenance, the common part of ``results.json`` — belongs to the one runner
(:func:`cxrdebias.experiments.runner.run_experiment`).

Adding a dataset: its data module (``cxrdebias/data/…``), a protocol module that registers
its ``build`` function once (:func:`protocol`, or :func:`register` with a :class:`ProtocolSpec`), and one import line in :mod:`cxrdebias.experiments.protocols`
(docs/architecture.md). Code outside the package registers the same way
(``tests/test_architecture.py`` registers a toy dataset from outside).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from cxrdebias.errors import ConfigError

if TYPE_CHECKING:
    from rich.console import Console

    from cxrdebias.debias.base import Method
    from cxrdebias.training.inference import Predictions
    from cxrdebias.training.runs import RunDir
    from cxrdebias.training.trainer import Trainer, TrainResult


@dataclass
class Finished:
    """What a protocol's ``finish`` sees once training is over (rank 0, best model loaded)."""

    cfg: Any  #: the :class:`~cxrdebias.experiments.config.ExperimentConfig`
    method: Method
    trainer: Trainer
    result: TrainResult
    run: RunDir
    data: dict[str, Any]  #: the ``data`` record of ``run.json`` (hashes, sources)
    loader: Callable[[Any], Any]  #: ``loader(split)`` → an evaluation loader over ``split``
    val_loader: Any | None


@dataclass
class Protocol:
    """One experiment's data and reporting, built by a :class:`ProtocolSpec`'s ``build``.

    - ``train``/``val``: samples of the sample contract (in-memory
      :class:`~cxrdebias.data.base.TensorSamples` or a streaming dataset); ``val`` may be None;
    - ``validate(predictions)`` → the validation metrics logged every ``train.eval_every``
      epochs; ``val_metrics``: those that ``train.select_metric`` may name;
    - ``finish(Finished)`` → (the protocol's part of ``results.json``, the line printed when
      done); it tests the model and writes any extra files (the CXR model file);
    - ``data_info()`` → the ``data`` record of ``run.json`` (called once, when a run starts);
    - ``banner(method, precision)`` → the line printed before training;
    - ``class_names``: the classes' names, for messages (default: ``class 0``, …);
    - ``train_targets``: the training labels, for ``train.class_balance=weighted_loss``
      (None: this protocol does not support it);
    - ``train_biases``: the training bias labels, with ``train_targets`` for
      ``train.sampling=group_balanced`` (None: not supported, or the run has no bias labels);
    - ``on_created(run)``: writes protocol files into a new run folder (the CXR splits);
    - ``train_info``: extra keys of ``results["train"]`` (e.g. image loading time);
    - ``splits``: the other named splits (the test sets), each built on first use, for
      :meth:`split` (``cxrdebias analyze-bias --split``).
    """

    experiment: str
    train: Any
    val: Any | None
    num_classes: int
    num_biases: int | None
    eval_batch_size: int
    validate: Callable[[Predictions], dict[str, float]]
    val_metrics: tuple[str, ...]
    finish: Callable[[Finished], tuple[dict[str, Any], str]]
    data_info: Callable[[], dict[str, Any]]
    banner: Callable[[Method, str], str]
    in_channels: int = 3
    class_names: tuple[str, ...] = ()
    train_targets: Any | None = None
    train_biases: Any | None = None
    on_created: Callable[[RunDir], None] | None = None
    train_info: dict[str, Any] = field(default_factory=dict)
    splits: dict[str, Callable[[], Any]] = field(default_factory=dict)

    def split(self, name: str) -> Any:
        """The samples of split ``name`` (``train``, ``val`` or a test set), for analyses of a run."""
        have = [k for k, v in (("train", self.train), ("val", self.val)) if v is not None] + list(self.splits)
        if name not in have:
            raise ConfigError(f"split {name!r}: this run has {', '.join(have)}")
        return {"train": self.train, "val": self.val}[name] if name in ("train", "val") else self.splits[name]()


@dataclass(frozen=True)
class ProtocolSpec:
    """One registered dataset kind.

    - ``kind``: the value of ``data.kind`` (the data config's ``kind`` field defaults to it);
    - ``config``: the pydantic model of the ``data:`` section;
    - ``build(cfg, method, run, console)`` → :class:`Protocol`. ``method`` is the validated
      method (a protocol may refuse one it cannot serve); ``run`` is the run folder when
      resuming (a protocol may read back what it saved there), else None. Bad data must fail
      here, before anything is written;
    - ``run_tag(cfg)`` → the start of a default run-folder name (``biased-mnist-rho0.997``);
    - ``command``: the command that runs this kind (for error messages).
    """

    kind: str
    config: type[BaseModel]
    build: Callable[[Any, Method, RunDir | None, Console], Protocol]
    run_tag: Callable[[Any], str]
    command: str


_PROTOCOLS: dict[str, ProtocolSpec] = {}


def register(spec: ProtocolSpec) -> ProtocolSpec:
    """Add a dataset kind. Registering another protocol under a taken kind is an error."""
    kind_field = spec.config.model_fields.get("kind")
    if kind_field is None or kind_field.default != spec.kind:
        raise ValueError(f"protocol {spec.kind!r}: its data config {spec.config.__name__} needs a field `kind` defaulting to {spec.kind!r}")
    old = _PROTOCOLS.get(spec.kind)
    if old is not None and old != spec:
        raise ValueError(f"data.kind {spec.kind!r} is already registered (by {old.build.__module__})")
    _PROTOCOLS[spec.kind] = spec
    return spec


def protocol(kind: str, config: type[BaseModel], *, run_tag: Callable[[Any], str], command: str) -> Callable:
    """Decorator form of :func:`register` for a protocol's ``build`` function::

        @protocol("biased_mnist", BiasedMNISTConfig, run_tag=lambda cfg: "…", command="cxrdebias reproduce biased-mnist")
        def build(cfg, method, run, console) -> Protocol: ...
    """

    def decorate(build: Callable[[Any, Method, RunDir | None, Console], Protocol]) -> Callable:
        register(ProtocolSpec(kind=kind, config=config, build=build, run_tag=run_tag, command=command))
        return build

    return decorate


def unregister(kind: str) -> None:
    """Remove a kind (a test that registers a toy dataset cleans up with this)."""
    _PROTOCOLS.pop(kind, None)


def kinds() -> tuple[str, ...]:
    """The registered ``data.kind`` values, in registration order."""
    return tuple(_PROTOCOLS)


def get(kind: str) -> ProtocolSpec:
    """The protocol of ``data.kind`` = ``kind``; a :class:`ConfigError` naming the known kinds if none."""
    try:
        return _PROTOCOLS[kind]
    except KeyError:
        raise ConfigError(f"data.kind={kind!r}: unknown dataset kind (known: {', '.join(_PROTOCOLS)})") from None
