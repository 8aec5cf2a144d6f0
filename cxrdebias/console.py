"""The consoles of the package and the one escape for user-controlled text printed on them.

Paths, site names, file names, manifest cells, exception messages and model metadata come
from files a user was given (issue 22): printed through Rich, a ``[/x]`` in them would raise
a ``MarkupError`` (a traceback, sometimes after the output was written), a ``[v2]`` would
vanish as an unknown style and a ``:x:`` would become an emoji. So:

- every console is made by :func:`make_console` (emoji codes off);
- every such value interpolated into a line that also carries markup goes through
  :func:`esc`; a line that is user text as a whole is printed with ``markup=False``.

A leaf module (imports Rich only): the torch-free runtime may use it too.
"""

from __future__ import annotations

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
