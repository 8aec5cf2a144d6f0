"""User-facing error types.

Everything a user can get wrong (a bad file, a bad option, an existing output folder) raises a
subclass of :class:`CxrDebiasError` with a one-line message that names the file/row/field and
says what was expected. The CLI prints that line and exits non-zero; it never shows a traceback
for these.
"""

from __future__ import annotations


class CxrDebiasError(Exception):
    """Base class of every error caused by user input (exit code 2 on the CLI)."""

    exit_code = 2


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
