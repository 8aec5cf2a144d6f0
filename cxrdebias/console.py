"""The consoles of the package and the one escape for user-controlled text printed on them.

Paths, site names, file names, manifest cells, exception messages and model metadata come
from files a user was given (issue 22): printed through Rich, a ``[/x]`` in them would raise
a ``MarkupError`` (a traceback, sometimes after the output was written), a ``[v2]`` would
vanish as an unknown style and a ``:x:`` would become an emoji. So:

- every console is made by :func:`make_console` (emoji codes off);
- every such value interpolated into a line that also carries markup goes through
  :func:`esc`; a line that is user text as a whole is printed with ``markup=False``.

Long steps (export, evaluate, data synth, analyze-bias) show :func:`progress` on their console.

A leaf module (imports Rich only): the torch-free runtime may use it too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape


def make_console(*, stderr: bool = False, **options: Any) -> Console:
    """A Rich console that never turns ``:name:`` into an emoji (soft-wrapped unless told)."""
    options.setdefault("soft_wrap", True)
    return Console(stderr=stderr, emoji=False, **options)


def esc(value: Any) -> str:
    """``str(value)`` with Rich markup escaped: it prints literally on a :func:`make_console`."""
    return escape(str(value))


@contextlib.contextmanager
def progress(console: Console, description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
    """A transient progress line on ``console`` while a long step runs (drawn on a terminal only,
    so logs stay clean): a spinner, ``description`` (Rich markup: escape user text with
    :func:`esc`), with ``total`` a bar and ``done/total``, and the elapsed time. Yields
    ``update(completed=…, description=…)``; lines printed on ``console`` meanwhile appear above it."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    if not console.is_terminal:  # a log or a pipe: not even the blank line a stopped display leaves
        yield lambda **fields: None
        return
    columns: list[Any] = [SpinnerColumn(), TextColumn("{task.description}")]
    if total is not None:
        columns += [BarColumn(), MofNCompleteColumn()]
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda **fields: bar.update(task, **fields)
