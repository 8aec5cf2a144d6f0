"""``cxrdebias sweep``: one method's hyperparameter grid, every point's validation metric, the best by validation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cxrdebias.cli.app import SetOpt, app, err, out
from cxrdebias.cli.benchmark import int_list
from cxrdebias.console import esc


@app.command("sweep")
def sweep_cmd(
    config: Annotated[Path, typer.Option(help="Base YAML config, e.g. configs/biased_mnist/rho0.997.yaml.")],
    method: Annotated[str, typer.Option(help="The method swept (see `cxrdebias methods`).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Sweep folder (runs, logs, sweep.json, sweep.md); rerun to resume.")],
    grid: Annotated[list[str] | None, typer.Option("--grid", help="KEY=V1,V2,… (repeatable; every combination is a point), "
                                                   "e.g. method.alpha=0.1,1,5 (or end.alpha=…).")] = None,
    grid_file: Annotated[Path | None, typer.Option(help="YAML grid file: a mapping of config keys to lists of values, e.g. method.alpha: (0.1, 1, 5) as a YAML list (instead of or with --grid).")] = None,
    seeds: Annotated[str, typer.Option(help="Training seeds, e.g. 42 or 42,43,44 (the value picked is their mean).")] = "42",
    data_seed: Annotated[int | None, typer.Option(help="data.seed of every run (data kinds with a seed of their own, e.g. the CXR "
                                                  "patient split; Biased MNIST draws its colours from the training seed).")] = None,
    metric: Annotated[str, typer.Option(help="Validation metric that picks the point (Biased MNIST: accuracy or conflicting_accuracy).")] = "accuracy",
    mode: Annotated[str, typer.Option(help="max or min: which end of the metric is best.")] = "max",
    set_: SetOpt = None,
    jobs: Annotated[int, typer.Option(help="Runs at a time (one thread each).")] = 2,
    allow_dirty: Annotated[bool, typer.Option("--allow-dirty", help="Run from a checkout with uncommitted changes (recorded, marked).")] = False,
    docs: Annotated[Path | None, typer.Option(help="Also write the table into this Markdown file (between <!-- sweep:NAME:start/end -->) "
                                               "and the sweep JSON to results/sweep/NAME.json beside it.")] = None,
    name: Annotated[str | None, typer.Option(help="NAME of the --docs block and JSON (default: the --out folder's name).")] = None,
) -> None:
    """Train every point of a grid (× training seeds), write each point's validation metric to
    OUT/sweep.json and OUT/sweep.md and pick the best point by validation only (test metrics are not read)."""
    from cxrdebias.errors import ConfigError
    from cxrdebias.experiments.sweep import (
        make_spec,
        parse_grid,
        read_grid_file,
        run_sweep,
        to_markdown,
    )

    the_grid = read_grid_file(grid_file, method) if grid_file is not None else {}
    for key, values in parse_grid(grid or [], method).items():
        if key in the_grid:
            raise ConfigError(f"--grid {key}: also in {grid_file}")
        the_grid[key] = values
    if not the_grid:
        raise ConfigError("no grid: give --grid KEY=V1,V2 or --grid-file")
    spec = make_spec(config=str(config), method=method, grid=the_grid, train_seeds=int_list(seeds, "--seeds"), data_seed=data_seed,
                     metric=metric, mode=mode, set=set_ or [])  # fmt: skip
    record, failed = run_sweep(spec, out_dir, jobs=jobs, allow_dirty=allow_dirty, console=err)
    out.print((out_dir / "sweep.md").read_text(encoding="utf-8"), markup=False, highlight=False)
    err.print(f"wrote {esc(out_dir / 'sweep.json')} and sweep.md")
    if docs is not None:
        from cxrdebias.experiments.benchmark_table import publish

        md, js = publish({"markdown": to_markdown(record), "json": record}, docs, name or out_dir.resolve().name, kind="sweep")
        err.print(f"wrote the table into {esc(md)} and {esc(js)}")
    if failed:
        names = ", ".join(f"{r[0]}-seed{r[2]}" for r, _ in failed)
        err.print(f"[red]{len(failed)} run(s) failed[/]: {esc(names)}; their logs are in {esc(out_dir / 'logs')}; rerun to retry")
        raise typer.Exit(1)
