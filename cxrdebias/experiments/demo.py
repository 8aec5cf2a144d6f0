"""The README's main job: the whole CXR site-bias pipeline on the embedded synthetic data.

``cxrdebias demo`` is the default benchmark (``configs/cxr/benchmark.yaml``) cut to one data seed
(0) and one training seed (0) and three recipes: the baseline (vanilla), the reference (vanilla
on the same generator and seed without the site–label correlation: the ceiling) and the shipped
default recipe. It writes both synthetic sets, trains the three models at once (one thread
each), evaluates them per institution (the external hospital included), and prints

- the share of the vanilla → reference gap the default recipe closes (worst-site balanced
  accuracy and mean within-site AUROC; one seed, so no interval on the ratio);
- the site probe per layer;
- the per-site paired differences default − vanilla with their 95% bootstrap intervals.

Everything is offline; ``OUT/summary.md`` holds the same text. About 10 minutes on a 2-core CPU.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from cxrdebias.console import esc, make_console
from cxrdebias.data.synthetic import SynthConfig
from cxrdebias.data.synthetic.config import CUE_FIELDS
from cxrdebias.errors import ConfigError
from cxrdebias.experiments.benchmark import DEFAULT_SPEC, Cell, load_spec, run_benchmark
from cxrdebias.experiments.benchmark_table import build_table
from cxrdebias.experiments.evaluate import compare_runs
from cxrdebias.fileio import write_text_atomic

DATA_SEED = 0
TRAIN_SEED = 0


def default_out() -> Path:
    return Path("runs") / f"demo-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def run_demo(
    out: str | Path | None = None,
    *,
    spec: str | Path = DEFAULT_SPEC,
    overrides: list[str] | None = None,
    synth: SynthConfig | None = None,
    n_boot: int = 1000,
    jobs: int = 3,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the demo into ``out`` (module doc); ``overrides`` (``KEY=VALUE``) apply to every
    training run, ``synth`` replaces the spec's generator options (its seed is ignored: the data
    seed is 0). Returns the runs, the table and the comparison."""
    console = console or make_console(stderr=True)
    out = Path(out) if out is not None else default_out()
    t0 = time.perf_counter()
    full = load_spec(spec)
    if full.default is None or full.reference is None:
        raise ConfigError(f"{spec}: the demo needs a 'default' and a 'reference' recipe")
    names = [full.baseline, full.reference, full.default]
    the_spec = load_spec(spec, data_seeds=[DATA_SEED], train_seeds=[TRAIN_SEED], recipes=names, set=overrides)
    if synth is not None:
        unused = CUE_FIELDS if synth.cue is None else ()
        the_spec = the_spec.model_copy(
            # the cue options only when a cue is drawn: the spec.json of an earlier demo folder stays the same
            update={"data": the_spec.data.model_copy(update={"synth": synth.model_dump(mode="json", exclude={"seed", *unused})})}
        )
    console.rule(f"[bold]cxrdebias demo: {esc(', '.join(names))} on synthetic data seed {DATA_SEED}")
    # the demo is not a reported benchmark: a checkout with local changes may run it (the table says so)
    failed = run_benchmark(the_spec, out, jobs=jobs, allow_dirty=True, console=console)
    if failed:
        raise RuntimeError(f"demo: {len(failed)} run(s) failed; see {out / 'logs'}")
    table = build_table(the_spec, out, allow_dirty=True, title="cxrdebias demo: vanilla, reference and the default recipe")
    runs = {name: Cell(name, DATA_SEED, TRAIN_SEED).folder(out) for name in names}
    comparison = compare_runs(runs[full.baseline], runs[full.default], name_a="vanilla", name_b="default recipe", n_boot=n_boot)
    elapsed = time.perf_counter() - t0
    text = "\n\n".join([table["markdown"].rstrip(), comparison.rstrip(), f"Total time {elapsed / 60:.1f} min."])
    write_text_atomic(out / "summary.md", text + "\n")
    return {"out": out, "runs": runs, "table": table, "comparison": comparison, "text": text, "elapsed_s": elapsed}
