"""``cxrdebias benchmark``: debiasing recipes × data seeds × training seeds → one table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cxrdebias.cli.app import app, err, out
from cxrdebias.console import esc


def int_list(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{option}: expected comma-separated integers such as 0,1,2, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise typer.BadParameter(f"{option}: expected one or more integers >= 0, got {text!r}")
    return values


@app.command("benchmark")
def benchmark_cmd(
    out_dir: Annotated[Path, typer.Option("--out", help="Benchmark folder (data, runs, logs, benchmark.json/.md/.png); rerun to resume.")],
    spec: Annotated[Path | None, typer.Option(help="Benchmark spec YAML (default: configs/cxr/benchmark.yaml).")] = None,
    data: Annotated[Path | None, typer.Option(help="Your own manifest instead of synthetic data (then --data-seeds are split seeds).")] = None,
    data_seeds: Annotated[str | None, typer.Option(help="Data seeds, e.g. 200,201,202 (default: the spec's).")] = None,
    train_seeds: Annotated[str | None, typer.Option(help="Training seeds, e.g. 0,1,2 (default: the spec's).")] = None,
    recipes: Annotated[str | None, typer.Option(help="Only these recipes, e.g. end,balanced (the baseline and reference are always kept).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Config override KEY=VALUE for every recipe (repeatable).")] = None,
    jobs: Annotated[int, typer.Option(help="Runs at a time (one thread each).")] = 2,
    table_only: Annotated[bool, typer.Option("--table-only", help="Only rebuild the table from the finished cells.")] = False,
    docs: Annotated[Path | None, typer.Option(help="Also write the table into this Markdown file (between <!-- benchmark:NAME:start/end -->, NAME = the spec's "
                                               "file name) and its JSON and plot under results/benchmark/ beside it.")] = None,
    allow_dirty: Annotated[bool, typer.Option("--allow-dirty", help="Run and tabulate from a checkout with uncommitted changes (marked).")] = False,
    name: Annotated[str | None, typer.Option(help="With --docs: the block's NAME and the JSON's file name (default: the spec's file name).")] = None,
    merge: Annotated[list[Path] | None, typer.Option(help="Add the cells of another benchmark.json (repeatable; e.g. cells run on another machine); "
                                                          "its spec must mean the same, a cell in both must agree.")] = None,
) -> None:
    """Train and evaluate every recipe of the spec on every data and training seed; a table with gap closed,
    paired differences against vanilla, the per-layer site probe and the external sites."""
    from cxrdebias.experiments.benchmark import DEFAULT_SPEC, load_spec, run_benchmark
    from cxrdebias.experiments.benchmark_table import build_table, publish

    the_spec = load_spec(
        spec,
        data_seeds=int_list(data_seeds, "--data-seeds"),
        train_seeds=int_list(train_seeds, "--train-seeds"),
        recipes=[r.strip() for r in recipes.split(",") if r.strip()] if recipes else None,
        manifest=data,
        set=set_,
    )
    failed = [] if table_only else run_benchmark(the_spec, out_dir, jobs=jobs, allow_dirty=allow_dirty, console=err)
    table = build_table(the_spec, out_dir, allow_dirty=allow_dirty, merge=merge)
    out.print(table["markdown"], markup=False, highlight=False)
    err.print(f"wrote {esc(out_dir / 'benchmark.json')}, benchmark.md and benchmark.png")
    if docs is not None:
        md, js = publish(table, docs, name or Path(spec or DEFAULT_SPEC).stem, plot=out_dir / "benchmark.png")
        err.print(f"wrote the table into {esc(md)} and {esc(js)} (+ .png)")
    if failed:
        err.print(f"[red]{len(failed)} cell(s) failed[/]: {esc(', '.join(c.name for c, _ in failed))}; their logs are in {esc(out_dir / 'logs')}; rerun to retry")
        raise typer.Exit(1)
