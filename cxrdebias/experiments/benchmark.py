"""``cxrdebias benchmark``: debiasing recipes × data seeds × training seeds, resumable, one table.

A :class:`BenchmarkSpec` (YAML, default ``configs/cxr/benchmark.yaml``) names the training
config, the data (synthetic data seeds, or a user's manifest whose split seeds play the data
seeds' role), the training seeds and the *recipes* (a method with its bias source, sampling and
overrides; or a post-hoc evaluation of another recipe's runs). :func:`run_benchmark`

1. refuses to start from a checkout with local changes (unless ``allow_dirty``) and refuses an
   output folder made with another spec;
2. writes each data seed's synthetic sets: the biased one and the *reference* one (the same
   generator and seed with ``bias_strength: 0``: no site–label correlation; the test patients and
   images are identical, so the reference is the ceiling on the same test set);
3. runs every cell (recipe × data seed × training seed) as its own ``cxrdebias train`` +
   ``cxrdebias evaluate`` process, ``jobs`` at a time with one thread each, a log per cell in
   ``OUT/logs/``; a finished cell is skipped, an interrupted one resumes from its checkpoint;
4. collects the cells' ``results.json`` / ``eval/report.json`` into ``OUT/benchmark.json``,
   ``benchmark.md`` and ``benchmark.png`` (:mod:`cxrdebias.experiments.benchmark_table`).

Layout: ``OUT/spec.json``, ``OUT/data/seed<D>/{biased,reference}/``,
``OUT/runs/seed<D>/<recipe>/train<T>/`` (a run folder; ``eval/`` inside),
``OUT/cells/<cell>.json`` (the exact commands of each cell), ``OUT/logs/<cell>.log``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from pydantic import ValidationError
from rich.console import Console

from cxrdebias.console import esc, make_console
from cxrdebias.errors import ConfigError, DataError
from cxrdebias.experiments.benchmark_spec import DEFAULT_SPEC, BenchmarkSpec, load_spec, problems
from cxrdebias.fileio import write_json_atomic
from cxrdebias.training.provenance import code_version

if TYPE_CHECKING:
    from cxrdebias.data.synthetic import SynthConfig

_PACKAGE = Path(__file__).resolve().parents[1]
"""The cxrdebias package this process runs; the cells' processes must run the same one."""
_SAFE_PATH = sys.version_info >= (3, 11)
"""Whether ``PYTHONSAFEPATH`` exists (Python 3.11+)."""


@dataclass(frozen=True)
class Cell:
    """One run of the benchmark."""

    recipe: str
    data_seed: int
    train_seed: int

    @property
    def name(self) -> str:
        return f"seed{self.data_seed}-{self.recipe}-train{self.train_seed}"

    def folder(self, out: Path) -> Path:
        return out / "runs" / f"seed{self.data_seed}" / self.recipe / f"train{self.train_seed}"


def cells(spec: BenchmarkSpec) -> list[Cell]:
    """Every cell, in running order: by data seed and training seed, the baseline and reference
    first (a partial benchmark is then already comparable)."""
    first = [r for r in (spec.baseline, spec.reference) if r is not None]
    order = first + [r for r in spec.recipes if r not in first]
    return [Cell(r, d, t) for d in spec.data.seeds for t in spec.train_seeds for r in order]


def data_paths(spec: BenchmarkSpec, out: Path, data_seed: int) -> dict[str, Path]:
    """The manifests of one data seed: ``{"biased": ..., "reference": ...}``."""
    if spec.data.manifest is not None:
        ref = spec.data.reference_manifest
        return {"biased": Path(spec.data.manifest), **({"reference": Path(ref)} if ref else {})}
    base = out / "data" / f"seed{data_seed}"
    return {"biased": base / "biased" / "manifest.csv", "reference": base / "reference" / "manifest.csv"}


def prepare_data(spec: BenchmarkSpec, out: Path, console: Console) -> None:
    """Write (or reuse, when the same options wrote it) each data seed's synthetic sets."""
    if spec.data.manifest is not None:
        return
    from cxrdebias.data.synthetic import SynthConfig, synthesize

    needs_ref = any(r.data == "reference" for r in spec.recipes.values())
    for d in spec.data.seeds:
        for kind, strength in (("biased", None), ("reference", 0.0)):
            if kind == "reference" and not needs_ref:
                continue
            options = {**spec.data.synth, "seed": d}
            if strength is not None:
                options |= reference_options(options) | {"bias_strength": strength}
            try:
                cfg = SynthConfig(**options)
            except ValidationError as exc:
                raise ConfigError(f"benchmark spec: {problems(exc, 'data.synth.')}") from None
            folder = data_paths(spec, out, d)[kind].parent
            written = folder / "synth_config.json"
            if (folder / "manifest.csv").exists() and written.exists():
                if _written_synth(written) == cfg:
                    continue
                raise DataError(f"{folder}: holds a synthetic set with other options than this benchmark's; use another --out")
            console.print(f"data seed {d}: writing the {kind} synthetic set → {esc(folder)}")
            synthesize(folder, cfg, force=folder.exists())


def reference_options(options: dict[str, Any]) -> dict[str, Any]:
    """What the reference set changes besides ``bias_strength: 0`` (no site–label correlation):
    with a label-correlated cue, its train/val rates become the test rates (the cue no longer
    predicts the label, and the test images are the same as the biased set's)."""
    from cxrdebias.data.synthetic import SynthConfig

    if options.get("cue") is None:
        return {}
    test = SynthConfig(**{k: v for k, v in options.items() if k != "bias_strength"})
    return {"cue_positive_rate": test.cue_test_positive_rate, "cue_negative_rate": test.cue_test_negative_rate}


def _written_synth(path: Path) -> SynthConfig | None:
    """The options a synth_config.json was written with, re-validated (it records only the
    options in use, e.g. no cue options without a cue); None when they are not valid options."""
    from cxrdebias.data.synthetic import SynthConfig

    try:
        return SynthConfig(**json.loads(path.read_text(encoding="utf-8")).get("config", {}))
    except (ValidationError, TypeError, ValueError):
        return None


def cli_command() -> list[str]:
    """``python -m cxrdebias.cli`` with this interpreter (the cells' processes run it, :func:`child_env`)."""
    return [sys.executable, "-m", "cxrdebias.cli"]


def child_env() -> dict[str, str]:
    """The environment of the cells' processes: one thread, and the cxrdebias package this
    process runs. ``python -m`` would put the current folder first on ``sys.path``, so a
    ``cxrdebias/`` folder there (another checkout) would be run instead of the one whose
    cleanliness :func:`check_clean` checked; ``PYTHONSAFEPATH`` drops that entry and the
    package's parent folder goes first on ``PYTHONPATH``."""
    path = [str(_PACKAGE.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONSAFEPATH": "1", "PYTHONPATH": os.pathsep.join(path)}


def check_cwd_package() -> None:
    """Before Python 3.11 (no ``PYTHONSAFEPATH``) refuse to start where ``python -m`` would import
    another cxrdebias checkout from the current folder (:func:`child_env`)."""
    local = Path.cwd() / "cxrdebias"
    if not _SAFE_PATH and (local / "__init__.py").is_file() and local.resolve() != _PACKAGE:
        raise ConfigError(
            f"{local} is another cxrdebias than the one running ({_PACKAGE}); the cells' processes would import it: "
            "run the benchmark from another folder"
        )


def commands(spec: BenchmarkSpec, out: Path, cell: Cell) -> list[list[str]]:
    """The ``cxrdebias`` commands of one cell (train then evaluate; evaluate only, post-hoc)."""
    recipe = spec.recipes[cell.recipe]
    folder = cell.folder(out)
    evaluate = ["evaluate", "--per-institution", "--force", "--n-boot", str(spec.n_boot), *recipe.evaluate]
    if recipe.from_ is not None:
        source = Cell(recipe.from_, cell.data_seed, cell.train_seed).folder(out)
        return [[*cli_command(), *evaluate, str(source), "--out", str(folder / "eval")]]
    manifest = data_paths(spec, out, cell.data_seed)[recipe.data]
    train = [
        *cli_command(), "train", "--data", str(manifest), "--config", str(spec.config_path()), "--method", recipe.method,
        "--bias", recipe.bias, "--seed", str(cell.train_seed), "--out", str(folder),
        "--set", "train.num_threads=1", "--set", "train.progress=false",
    ]  # fmt: skip
    if spec.data.manifest is not None:
        train += ["--set", f"data.seed={cell.data_seed}"]
    for item in [*spec.set, *recipe.set]:
        train += ["--set", item]
    return [train, [*cli_command(), *evaluate, str(folder)]]


def cell_done(spec: BenchmarkSpec, out: Path, cell: Cell) -> bool:
    """Whether the cell's evaluation exists and is not older than the run it evaluated (a run
    trained again, e.g. a post-hoc recipe's source whose folder was deleted, is evaluated again)."""
    recipe = spec.recipes[cell.recipe]
    run = Cell(recipe.from_, cell.data_seed, cell.train_seed).folder(out) if recipe.from_ else cell.folder(out)
    results, report = run / "results.json", cell.folder(out) / "eval" / "report.json"
    return results.exists() and report.exists() and report.stat().st_mtime_ns >= results.stat().st_mtime_ns


class Children:
    """The cells' running processes, so that an interrupt reaches them (each checkpoints and
    stops) and no further process starts."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: set[subprocess.Popen] = set()
        self.stopping = False

    def run(self, cmd: list[str], log: TextIO, env: dict[str, str]) -> int:
        with self.lock:
            if self.stopping:
                return INTERRUPTED
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            self.running.add(proc)
        try:
            return proc.wait()
        finally:
            with self.lock:
                self.running.discard(proc)

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            for proc in self.running:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)


INTERRUPTED = 130
"""Exit status of a cell stopped by an interrupt (as a shell reports SIGINT)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler, a session ending) during :func:`run_jobs`: handled as
    Ctrl-C is (the running cells checkpoint and stop), the process then exits with 143."""

    signum = signal.SIGTERM


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Terminated` in the main thread, so that it stops
    the cells like an interrupt rather than killing this process and leaving them running
    (orphans that a rerun would then train beside, into the same folders)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def resume_option(train: list[str], folder: Path) -> list[list[str]]:
    """The training command for a run folder: none when it is finished (``results.json``), with
    ``--resume`` when it has a checkpoint, with ``--force`` when a start left no checkpoint."""
    if (folder / "results.json").exists():
        return []
    if folder.exists():
        has_ckpt = any((folder / "checkpoints").glob("*")) if (folder / "checkpoints").is_dir() else False
        return [[*train, "--resume" if has_ckpt else "--force"]]
    return [train]


def run_logged(cmds: list[list[str]], log: Path, children: Children) -> int:
    """Run ``cmds`` one after the other (``cxrdebias`` commands, :func:`child_env`), their output
    appended to ``log``; the first non-zero exit status, or 0."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = child_env()
    with log.open("a", encoding="utf-8") as fh:
        for cmd in cmds:
            fh.write("$ " + " ".join(cmd[2:]) + "\n")
            fh.flush()
            rc = children.run(cmd, fh, env)
            if rc != 0:
                return rc
    return 0


def _run_cell(spec: BenchmarkSpec, out: Path, cell: Cell, children: Children | None = None) -> tuple[Cell, int, float]:
    """Run (or finish) one cell in subprocesses; its output goes to ``OUT/logs/<cell>.log``."""
    children = children or Children()
    t0 = time.perf_counter()
    folder = cell.folder(out)
    cmds = commands(spec, out, cell)
    record = out / "cells" / f"{cell.name}.json"
    if record.exists() and json.loads(record.read_text(encoding="utf-8"))["commands"] != cmds:
        raise ConfigError(f"{record}: this cell was started with other commands; use another --out")
    write_json_atomic(record, {"cell": cell.__dict__, "commands": cmds})
    if spec.recipes[cell.recipe].from_ is None:
        cmds = [*resume_option(cmds[0], folder), *cmds[1:]]
    else:
        folder.mkdir(parents=True, exist_ok=True)
    rc = run_logged(cmds, out / "logs" / f"{cell.name}.log", children)
    return cell, rc, time.perf_counter() - t0


_EPOCH = re.compile(r"^epoch\s+(\d+)")


def _progress(log: Path, name: str) -> str:
    """``<name> epoch N`` from the last epoch line of a cell's log (``starting`` before the first)."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return f"{name} starting"
    epochs = [m.group(1) for m in map(_EPOCH.match, lines) if m]
    if any(line.startswith("$ evaluate") for line in lines):
        return f"{name} evaluating"
    return f"{name} epoch {epochs[-1]} done" if epochs else f"{name} starting"


def check_clean(allow_dirty: bool) -> dict[str, Any]:
    """The code version; refuses a checkout with local changes unless ``allow_dirty``."""
    version = code_version()
    if version.get("git_dirty") and not allow_dirty:
        raise ConfigError(
            "the cxrdebias checkout has uncommitted changes: benchmark and sweep numbers must come from a commit "
            "(commit, or run from a `git worktree` of one); --allow-dirty runs anyway and marks the table"
        )
    return version


def _runs(recipe: dict[str, Any]) -> dict[str, Any]:
    """What of a recipe decides its runs (everything but the label shown in the table)."""
    return {k: v for k, v in recipe.items() if k != "label"}


def check_spec_folder(spec: BenchmarkSpec, out: Path) -> None:
    """``OUT/spec.json`` records the recipes and data options; a rerun must use the same (seeds
    and recipes may be added)."""
    path = out / "spec.json"
    now = spec.model_dump(mode="json", by_alias=True)
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        fixed = ("config", "baseline", "reference", "n_boot", "set")
        changed = [k for k in fixed if old.get(k) != now.get(k)]
        changed += [f"data.{k}" for k in ("synth", "manifest", "reference_manifest") if old["data"].get(k) != now["data"].get(k)]
        changed += [f"recipes.{k}" for k in now["recipes"] if k in old["recipes"] and _runs(old["recipes"][k]) != _runs(now["recipes"][k])]
        if changed:
            raise ConfigError(f"{out}: was made with another spec ({', '.join(changed)} differ); use another --out")
        now["data"]["seeds"] = sorted(set(old["data"]["seeds"]) | set(now["data"]["seeds"]))
        now["train_seeds"] = sorted(set(old["train_seeds"]) | set(now["train_seeds"]))
        now["recipes"] = {**old["recipes"], **now["recipes"]}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, now)


def run_benchmark(
    spec: BenchmarkSpec,
    out: str | Path,
    *,
    jobs: int = 2,
    allow_dirty: bool = False,
    heartbeat_s: float = 60.0,
    console: Console | None = None,
) -> list[tuple[Cell, int]]:
    """Run every unfinished cell of ``spec`` into ``out`` (module doc); returns the failed cells
    with their exit codes (empty when all finished)."""
    console = console or make_console(stderr=True)
    out = Path(out)
    if jobs < 1:
        raise ConfigError(f"--jobs: expected 1 or more, got {jobs}")
    check_clean(allow_dirty)
    check_cwd_package()
    check_spec_folder(spec, out)
    prepare_data(spec, out, console)
    todo = [c for c in cells(spec) if not cell_done(spec, out, c)]
    total = len(cells(spec))
    console.print(f"benchmark → {esc(out)}: {total} cells, {total - len(todo)} done, {len(todo)} to run, {jobs} at a time")
    trained = [c for c in todo if spec.recipes[c.recipe].from_ is None]
    posthoc = [c for c in todo if spec.recipes[c.recipe].from_ is not None]
    children = Children()
    failed: list[tuple[Cell, int]] = []
    progress = Progress(len(todo), console)
    for batch in (trained, posthoc):
        failed += run_jobs(
            batch, lambda c: _run_cell(spec, out, c, children), jobs=jobs, children=children, progress=progress,
            name=lambda c: c.name, log=lambda c: out / "logs" / f"{c.name}.log", heartbeat_s=heartbeat_s,
        )  # fmt: skip
    return failed


class Progress:
    """Counts finished jobs over several :func:`run_jobs` calls, for the "[done/total] … min left" lines."""

    def __init__(self, total: int, console: Console) -> None:
        self.total, self.done, self.t0, self.console = total, 0, time.perf_counter(), console

    def finished(self, name: str, rc: int, seconds: float, log: Path) -> None:
        self.done += 1
        eta = (time.perf_counter() - self.t0) / self.done * (self.total - self.done)
        status = "[green]done[/]" if rc == 0 else f"[red]failed (exit {rc})[/], see {esc(log)}"
        self.console.print(f"[{self.done}/{self.total}] {esc(name)} {status} in {seconds / 60:.1f} min; about {eta / 60:.0f} min left")


def run_jobs(
    todo: list[Any],
    run_one: Callable[[Any], tuple[Any, int, float]],
    *,
    jobs: int,
    children: Children,
    progress: Progress,
    name: Callable[[Any], str],
    log: Callable[[Any], Path],
    heartbeat_s: float = 60.0,
) -> list[tuple[Any, int]]:
    """Run ``run_one(job)`` → ``(job, exit status, seconds)`` for every job, ``jobs`` at a time
    (their subprocesses started through ``children``), a progress line per finished job and a
    heartbeat of the running ones; the failed jobs with their exit status. On an interrupt
    (SIGINT, or SIGTERM as :class:`Terminated`) the running jobs checkpoint and stop, no new one
    starts, and the interrupt is re-raised."""
    failed: list[tuple[Any, int]] = []
    with _sigterm_as_interrupt(), ThreadPoolExecutor(max_workers=jobs) as pool:
        pending = {pool.submit(run_one, job): job for job in todo}
        while pending:
            try:
                finished, _ = wait(pending, timeout=heartbeat_s, return_when=FIRST_COMPLETED)
            except KeyboardInterrupt:  # stop: the running cells checkpoint, no new one starts
                children.stop()
                for fut in pending:
                    fut.cancel()
                wait(pending)
                progress.console.print(f"interrupted: {progress.done} of {progress.total} finished; run the same command again to resume")
                raise
            if not finished:
                # the jobs started, not the queued ones (whose logs may hold an earlier attempt's lines)
                running = [_progress(log(j), name(j)) for f, j in pending.items() if f.running()]
                progress.console.print("running: " + "; ".join(esc(r) for r in running))
            for fut in finished:
                pending.pop(fut)
                job, rc, seconds = fut.result()
                progress.finished(name(job), rc, seconds, log(job))
                if rc != 0:
                    failed.append((job, rc))
    return failed


__all__ = ["DEFAULT_SPEC", "BenchmarkSpec", "Cell", "cells", "load_spec", "run_benchmark"]
