"""Stopping training on SIGINT/SIGTERM at a batch boundary (docs/robustness.md).

While training, the signals only set a flag (:class:`StopRequest`); the loop polls it after
every batch and between epochs and stops with :class:`~cxrdebias.errors.TrainingInterrupted`.
Checkpoints are per epoch, so the newest one is that of the last completed epoch. Under
``torchrun`` the ranks agree on the flag, so that all stop at the same batch.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import torch

from cxrdebias import distributed as dist_utils


class StopRequest:
    """The stop signal received during training, if any (:attr:`signum`)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @contextlib.contextmanager
    def handling_signals(self) -> Iterator[None]:
        """Clear the flag; within the block SIGINT/SIGTERM set it instead of stopping the process.

        A second signal stops at once (KeyboardInterrupt). The previous handlers are restored
        afterwards. Only in the main thread (Python delivers signals there); elsewhere the block
        runs with the handlers as they are.
        """
        self.signum = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self.signum is not None:
                raise KeyboardInterrupt
            self.signum = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)

    def agree(self, world: dist_utils.World, device: torch.device) -> int | None:
        """The signal to stop for, agreed by all ranks under torchrun (one tiny all-reduce on
        ``device``): a rank that was not signalled itself stops for SIGTERM. ``None``: go on."""
        if world.distributed:
            if dist_utils.any_rank(self.signum is not None, device) and self.signum is None:
                self.signum = signal.SIGTERM  # another rank was signalled
        return self.signum


__all__ = ["StopRequest"]
