"""Results produced from a checkout with uncommitted changes ("dirty tree"), for every results table.

A run records ``code_version`` (``git_commit``, ``git_dirty``) in its ``results.json``; collected
copies keep it (``docs/results/**``: at the top, or under ``results`` where a benchmark script
wrapped the run's results). A table refuses such results unless asked (``--allow-dirty``), and
then marks each value that includes one with :data:`DIRTY_MARK` and adds :data:`DIRTY_LEGEND`:
numbers from code nobody can check out again are never shown as if they came from a commit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from cxrdebias.errors import ConfigError

DIRTY_MARK = "◇"
DIRTY_LEGEND = (
    f"{DIRTY_MARK} from a dirty tree: at least one run of this value was produced with uncommitted local changes "
    "(its JSON records `code_version.git_dirty: true`), so no commit reproduces it exactly; rerun it from a commit to drop the mark."
)


def code_version_of(results: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``code_version`` a results JSON records (a run's, or a collected copy's under ``results``); {} when none."""
    for node in (results, results.get("results")):
        if isinstance(node, Mapping) and isinstance(node.get("code_version"), Mapping):
            return node["code_version"]
    return {}


def is_dirty(results: Mapping[str, Any]) -> bool:
    """Whether the results JSON records uncommitted changes (``git_dirty: true``)."""
    return code_version_of(results).get("git_dirty") is True


def check_dirty(named: Mapping[str, Mapping[str, Any]], *, allow_dirty: bool, where: str) -> set[str]:
    """The names of the dirty results among ``named`` (name → results JSON); a one-line
    :class:`ConfigError` naming them when there are any and ``allow_dirty`` is false."""
    dirty = sorted(n for n, r in named.items() if is_dirty(r))
    if dirty and not allow_dirty:
        more = f" and {len(dirty) - 3} more" if len(dirty) > 3 else ""
        raise ConfigError(
            f"{where}: {len(dirty)} result(s) were produced with uncommitted changes ({', '.join(dirty[:3])}{more}); "
            f"rerun them from a commit, or pass --allow-dirty to tabulate them marked {DIRTY_MARK}"
        )
    return set(dirty)


def mark(text: str, names: Iterable[str], dirty: set[str]) -> str:
    """``text`` with :data:`DIRTY_MARK` appended when any of ``names`` is dirty."""
    return f"{text} {DIRTY_MARK}" if dirty.intersection(names) else text


def legend(dirty: set[str]) -> list[str]:
    """The legend line(s) for a table: :data:`DIRTY_LEGEND` when something is marked, else nothing."""
    return [f"- {DIRTY_LEGEND}"] if dirty else []
