"""User-facing error types.

Everything a user can get wrong (a bad file, a bad option, an existing output folder) raises a
subclass of :class:`CxrDebiasError` with a one-line message that names the file/row/field and
says what was expected. The CLI prints that line and exits non-zero; it never shows a traceback
for these.
"""

from __future__ import annotations


class CxrDebiasError(Exception):
    """Base class of every error caused by user input (exit code 2 on the CLI).

    The message is always one line: line breaks (as in an embedded ``load_state_dict`` or
    decoder message) are joined with spaces.
    """

    exit_code = 2

    def __str__(self) -> str:
        return " ".join(line.strip() for line in super().__str__().splitlines() if line.strip())


class ConfigError(CxrDebiasError):
    """An option or configuration value is invalid."""


class DataError(CxrDebiasError):
    """A data file is missing, unreadable or malformed."""


class RunExistsError(CxrDebiasError):
    """The output folder already holds a run and neither ``--force`` nor ``--resume`` was given."""


class CheckpointError(CxrDebiasError):
    """A checkpoint is missing, truncated or belongs to a different model/config."""


class ExportError(CxrDebiasError):
    """A model cannot be exported, or the exported model failed its parity checks."""


class TrainingInterrupted(CxrDebiasError):
    """Training was stopped by SIGINT (Ctrl-C) or SIGTERM at a batch boundary.

    ``exit_code`` is the shell convention 128 + signal number (130 for SIGINT, 143 for SIGTERM);
    ``epoch``/``step`` say where training stopped (``step`` batches of ``epoch`` were done;
    ``step=None``: right after ``epoch`` was completed) and ``saved_epoch`` is the last completed
    epoch with a checkpoint (``None``: nothing to resume).
    """

    def __init__(self, signum: int, epoch: int, step: int | None, saved_epoch: int | None):
        import signal

        self.signum = signum
        self.exit_code = 128 + int(signum)
        self.epoch, self.step, self.saved_epoch = epoch, step, saved_epoch
        name = signal.Signals(signum).name
        where = f"interrupted ({name}) " + (f"after epoch {epoch}" if step is None else f"at epoch {epoch} step {step}")
        if saved_epoch is None:
            super().__init__(f"{where}; no epoch was completed and saved, so there is nothing to resume")
        else:
            super().__init__(f"{where}; epoch {saved_epoch} is saved: resume with --resume")


class OutputError(CxrDebiasError):
    """The output folder cannot be created or written (read-only, a file in the way, ...)."""


class DiskFullError(OutputError):
    """A file could not be written because its disk (or the user's quota) is full.

    The file is left as it was (writes are atomic: the temporary file is removed); ``path`` is
    the file that was being written.
    """

    def __init__(self, path, hint: str = "free some space and run the command again"):
        self.path = path
        super().__init__(f"{path}: cannot write, the disk is full (no space left on device); {hint}")
