"""Optional TensorBoard logging of the training curves (``--set train.tensorboard=true``).

Every epoch's record of ``metrics.jsonl`` (training loss and accuracy, learning rate, the
validation metrics, the method's own epoch metrics) is also written as TensorBoard scalars under
``RUN/tensorboard`` (``tensorboard --logdir RUN/tensorboard``), tagged ``section/name``
(``train/loss``, ``val/auroc``, ``lr`` …) with the epoch as the step. ``metrics.jsonl`` stays the
record; the event files are a view of it. Needs ``torch.utils.tensorboard``, i.e. the
``tensorboard`` package (the ``cxrdebias[tensorboard]`` extra): without it
:func:`require_tensorboard` refuses the option with a one-line error before the run starts.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cxrdebias.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"
"""The folder of the event files inside a run folder."""


def require_tensorboard() -> Any:
    """``torch.utils.tensorboard.SummaryWriter``, or a :class:`ConfigError` saying how to get it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch.utils.tensorboard imports the tensorboard package
        raise ConfigError(
            "train.tensorboard=true: TensorBoard is not installed here (torch.utils.tensorboard needs the "
            "tensorboard package: pip install 'cxrdebias[tensorboard]'); or leave train.tensorboard false"
        ) from None
    return SummaryWriter


def scalars(record: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """``(tag, value)`` for every finite number of an epoch record (nested sections joined by
    ``/``; the ``epoch`` itself is the step, not a scalar)."""
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from scalars(value, f"{tag}/")
        elif isinstance(value, int | float) and not isinstance(value, bool) and tag != "epoch" and math.isfinite(value):
            yield tag, float(value)


class CurveWriter:
    """Writes epoch records to ``RUN/tensorboard`` (module doc)."""

    def __init__(self, run_dir: str | Path, first_epoch: int = 1):
        summary_writer = require_tensorboard()
        # a resumed run drops the events of the epochs it trains again
        self.writer = summary_writer(log_dir=str(Path(run_dir) / TENSORBOARD_DIR), purge_step=first_epoch if first_epoch > 1 else None)

    def log(self, record: dict[str, Any]) -> None:
        for tag, value in scalars(record):
            self.writer.add_scalar(tag, value, global_step=int(record["epoch"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


@contextlib.contextmanager
def curve_writer(run_dir: str | Path | None, enabled: bool, first_epoch: int = 1) -> Iterator[CurveWriter | None]:
    """A :class:`CurveWriter` for the block when ``enabled`` and there is a run folder, else None."""
    if not enabled or run_dir is None:
        yield None
        return
    writer = CurveWriter(run_dir, first_epoch)
    try:
        yield writer
    finally:
        writer.close()
