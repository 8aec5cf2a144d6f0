"""Helpers shared by the benchmark scripts: timing and writing results into docs/."""

from __future__ import annotations

import json
import re
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cxrdebias.training.provenance import code_version, environment

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
BENCH_MD = DOCS / "benchmarks.md"
BENCH_JSON = DOCS / "results" / "benchmarks"


def time_call(fn: Callable[[], Any], *, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median/min/mean wall time (seconds) of ``fn`` over ``repeats`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "mean": statistics.fmean(times), "n": repeats}


def section_markdown(title: str, text: str, table: list[str], *, note: str = "") -> str:
    """A section of docs/benchmarks.md: ``## title``, the paragraph ``text``, ``note`` (when given)
    as a paragraph of its own, then the ``table`` lines (header, alignment row, rows, anything after)."""
    return "\n".join([f"## {title}", "", text, *(["", note] if note else []), "", *table])


def write_section(key: str, markdown: str, data: dict[str, Any], script: str | None = None) -> None:
    """Replace the ``key`` section of docs/benchmarks.md and write the raw numbers as JSON.

    ``script``: the benchmark that writes it, when not ``benchmarks/{key}.py``."""
    BENCH_JSON.mkdir(parents=True, exist_ok=True)
    meta = {"measured": datetime.now(timezone.utc).isoformat(timespec="seconds"), "code_version": code_version(), "environment": environment()}
    (BENCH_JSON / f"{key}.json").write_text(json.dumps({**meta, **data}, indent=2) + "\n")
    env = meta["environment"]
    stamp = (
        f"\n_Measured {meta['measured'][:10]} on {env['cpu_count']} CPU cores ({env.get('cpu_model') or env['processor']}), "
        f"torch {env['torch']}, {env['torch_threads']} threads; raw numbers: "
        f"`docs/results/benchmarks/{key}.json`; regenerate with `python benchmarks/{script or key + '.py'}`._\n"
    )
    start, end = f"<!-- bench:{key}:start -->", f"<!-- bench:{key}:end -->"
    block = f"{start}\n{markdown.strip()}\n{stamp}{end}"
    text = BENCH_MD.read_text() if BENCH_MD.exists() else "# Benchmarks\n\nEvery section is written by a script in `benchmarks/`.\n"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCH_MD.write_text(text)
