"""The EnD paper's tables, regenerated: cells → runs → results JSONs → Markdown.

``cxrdebias reproduce table NAME`` builds one of

- ``biased-mnist`` (EnD Table 1): every method at each ρ, unbiased and biased test accuracy;
- ``ablation`` (EnD Table 2): EnD with only R⊥, only R∥ and both, at one ρ;
- ``celeba`` (EnD Table 3): vanilla, Group DRO, LfF, EnD on BlondHair and HeavyMakeup;
- ``imdb`` (EnD Table 4): vanilla, LNL, EnD on IMDB Face, learning gender (age as bias) and
  age (gender as bias), trained on EB1 or EB2.

A *cell* is one run (table row × setting × seed). Its finished ``results.json`` is copied to
``RESULTS/<table>/<cell>.json`` (``results_dir`` of :func:`build_table`; the CLI's default is the
checkout's ``docs/results/``, committed), and a cell whose JSON
is there is skipped on the next invocation — so a table is built over several sittings (a cell
that is the same run as another table's, Table 2's α/β-both cell and Table 1's EnD cell, is
read from there rather than run twice). An
interrupted cell resumes from its last checkpoint. A JSON produced with other options than
the cell asks for is an error, never silently mixed into the mean.

Published numbers (``../shared/REFERENCE-FACTS.md``) are printed beside ours; "–" where the
paper has no number for that cell.

Size: just over 450 lines — the four tables' definitions, the published numbers they print and
the one cell runner / Markdown writer they share; split by table they would each re-import the
same runner for a few dozen lines.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from cxrdebias.config import CONFIGS_DIR
from cxrdebias.console import esc, make_console
from cxrdebias.debias import METHODS, method_options
from cxrdebias.errors import ConfigError
from cxrdebias.evaluation.formatting import format_mean_std
from cxrdebias.experiments.config import ExperimentConfig, load_config
from cxrdebias.experiments.dirty import check_dirty, legend, mark
from cxrdebias.fileio import replace_marked_block, write_json_atomic, write_text_atomic

#: the shipped configs the cells start from (``configs/`` of the source checkout)
CONFIGS = CONFIGS_DIR
DEFAULT_RUNS = Path("runs") / "tables"

#: train options that change how fast a run goes, not what it computes
_RUNTIME_KEYS = {"num_threads", "progress", "device", "num_workers", "precision", "channels_last", "keep_freed_memory", "tensorboard"}


@dataclass(frozen=True)
class Metric:
    header: str
    get: Callable[[dict[str, Any]], float | None]


@dataclass
class Cell:
    """One run of a table: ``row`` identifies the row (everything but the seed)."""

    name: str
    row: tuple[str, ...]
    seed: int
    config: ExperimentConfig
    #: other results files (``TABLE/CELL`` under the results folder) that may hold this very run,
    #: e.g. Table 2's full-EnD cell is Table 1's EnD cell; used only if their options match
    same_as: tuple[str, ...] = ()


@dataclass
class Table:
    name: str
    title: str
    row_headers: tuple[str, ...]
    metrics: list[Metric]
    cells: list[Cell]
    published: dict[tuple[str, ...], list[float | None]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def results_subdir(self) -> str:
        return self.name.replace("-", "_")

    @property
    def docs_key(self) -> str:
        """Its block in docs/reproduction.md: ``<!-- table:tableN:start/end -->`` (the paper's number)."""
        return f"table{TABLE_NAMES.index(self.name) + 1}"


# -- published numbers (REFERENCE-FACTS.md) -------------------------------------------------
#: unbiased accuracy on full MNIST, ρ → %, EnD paper Table 1 (vanilla and ReBias from ReBias)
PUBLISHED_BIASED_MNIST = {
    "vanilla": {0.999: 10.4, 0.997: 33.4, 0.995: 72.1, 0.990: 89.1},
    "rebias": {0.999: 22.7, 0.997: 64.2, 0.995: 76.0, 0.990: 88.1},
    "end": {0.999: 52.30, 0.997: 83.70, 0.995: 93.92, 0.990: 96.02},
}
#: (unbiased, bias-conflicting) %, EnD paper Table 3
PUBLISHED_CELEBA = {
    ("vanilla", "blond_hair"): (70.25, 52.52),
    ("groupdro", "blond_hair"): (85.43, 83.40),
    ("lff", "blond_hair"): (84.24, 81.24),
    ("end", "blond_hair"): (91.21, 87.45),
    ("vanilla", "heavy_makeup"): (62.00, 33.75),
    ("groupdro", "heavy_makeup"): (64.88, 50.24),
    ("lff", "heavy_makeup"): (66.20, 45.48),
    ("end", "heavy_makeup"): (75.93, 53.70),
}
#: (accuracy on the other extreme-bias split, on the test split), EnD paper Table 4 / LNL
PUBLISHED_IMDB = {
    ("vanilla", "gender", "eb1"): (59.86, 84.42),
    ("vanilla", "gender", "eb2"): (57.84, 69.75),
    ("lnl", "gender", "eb1"): (68.00, 86.66),
    ("lnl", "gender", "eb2"): (64.18, 74.50),
    ("end", "gender", "eb1"): (65.49, 87.15),
    ("end", "gender", "eb2"): (69.40, 78.19),
    ("end", "age", "eb1"): (76.04, 80.15),
    ("end", "age", "eb2"): (74.25, 78.80),
}

TABLE_METHODS = ("vanilla-raw", "vanilla", "end", "lnl", "blindeye", "rebias", "groupdro", "lff")
#: Table 1 rows that are a method on a config of their own rather than the ρ config: Bahng et al.'s
#: vanilla baseline (ReLU, raw pooled features; configs/biased_mnist/vanilla-raw-rho*.yaml)
TABLE_VARIANTS = {"vanilla-raw": ("vanilla-raw-rho{rho:.3f}.yaml", "vanilla (raw pooled features; Bahng et al.'s baseline)")}
TABLE_NAMES = ("biased-mnist", "ablation", "celeba", "imdb")


def _metric(*path: str) -> Callable[[dict[str, Any]], float | None]:
    def get(results: dict[str, Any]) -> float | None:
        node: Any = results
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return float(node) if node is not None else None

    return get


def _with(cfg: ExperimentConfig, method: dict[str, Any] | None = None, overrides: Iterable[str] = ()) -> ExperimentConfig:
    tree = cfg.model_dump(mode="json")
    if method is not None:
        tree["method"] = method
    return load_config(None, list(overrides), base=tree)


def _method_section(base: ExperimentConfig, method: str) -> dict[str, Any]:
    """The shipped config's options when it is that method (EnD's α, β), else the defaults."""
    return base.method.model_dump(mode="json") if base.method.name == method else {"name": method}


def shipped_options(rho: float, method: str) -> dict[str, Any]:
    """The options Table 1 runs ``method`` with at ``rho``: the shipped config's when it is that
    method (EnD's α, β, form), else none given (the package defaults)."""
    return {k: v for k, v in _method_section(load_config(rho_config(rho)), method).items() if k != "name"}


def _label(cfg: ExperimentConfig) -> str:
    opts = cfg.method.options()
    return cfg.method.name + (" (" + ", ".join(f"{k}={v}" for k, v in sorted(opts.items())) + ")" if opts else "")


# -- table definitions ---------------------------------------------------------------------
#: the options a Table 1 cell's name carries, per method, with the short tag each is written with
#: (``""``: the value alone): every key its validation sweep varies
#: (``configs/sweeps/biased_mnist/<method>.yaml``; tests/test_sweep.py keeps the two equal) and the
#: variant options that make it another method (EnD's form, ReBias's HSIC features)
CELL_OPTIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "end": (("form", ""), ("alpha", "a"), ("beta", "b")),
    "lnl": (("lambda_", "l"), ("grl_scale", "grl")),
    "blindeye": (("alpha", "a"), ("head_hidden", "h")),
    "groupdro": (("eta", "eta"), ("generalization_adjustment", "adj")),
    "lff": (("q", "q"), ("ema", "ema")),
    "rebias": (("hsic_features", ""), ("lambda_", "l"), ("lambda_g", "lg")),
}


def _tag(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def biased_mnist_cell_name(rho: float, method: str, options: dict[str, Any], seed: int, schedule: str = "") -> str:
    """Table 1's cell names (the committed docs/results/biased_mnist/ files). A method's cells carry
    the options of :data:`CELL_OPTIONS` (``rho0.997-end-partner_mean-a50-b5-s42``,
    ``rho0.997-lnl-l0.01-grl0.1-s42``), filled from the package defaults where ``options`` leaves
    them out, so runs at another point of a sweep keep their own files and never stand for the
    shipped config's cell; ``schedule`` (e.g. ``20ep``) marks another schedule than the config's."""
    tag = ""
    if method in CELL_OPTIONS:
        given = {k: v for k, v in options.items() if v is not None and k != "name"}
        try:
            o = method_options(method, given)  # the package defaults for what a config leaves out
        except ConfigError as exc:
            raise ConfigError(f"{method} options {given}: {exc}") from None
        tag = "".join(f"-{short}{_tag(getattr(o, key))}" for key, short in CELL_OPTIONS[method])
    return f"rho{rho:.3f}-{method}{tag}{'-' + schedule if schedule else ''}-s{seed}"


def row_method(results: dict[str, Any]) -> str:
    """The Table 1 row of a results JSON: ``vanilla-raw`` for vanilla on the raw pooled features
    (Bahng et al.'s baseline, ``model.normalize_features: false``), else the method's name."""
    name = results["method"]["name"]
    model = (results.get("config") or {}).get("model") or {}
    return "vanilla-raw" if name == "vanilla" and model.get("normalize_features") is False else name


def published_biased_mnist(method: str, rho: float) -> float | None:
    """The paper's unbiased accuracy for the Table 1 row ``method`` (a method name or a key of
    :data:`TABLE_VARIANTS`). The published vanilla is Bahng et al.'s baseline (raw pooled
    features): it belongs to the ``vanilla-raw`` row, not to vanilla on EnD's normalised bottleneck."""
    if method == "vanilla":
        return None
    return PUBLISHED_BIASED_MNIST.get("vanilla" if method == "vanilla-raw" else method, {}).get(round(rho, 3))


def biased_mnist_table(
    rhos: Iterable[float] = (0.997, 0.990),
    methods: Iterable[str] | None = None,
    seeds: Iterable[int] = (42,),
    overrides: Iterable[str] = (),
) -> Table:
    """Table 1. ``methods`` (default :data:`TABLE_METHODS`): a row of :data:`TABLE_VARIANTS` needs
    its own config for each ρ; by default a ρ without one leaves that row out, asked for by name
    it is an error naming the missing file."""
    asked = methods is not None
    cells, published = [], {}
    for rho in rhos:
        base = load_config(rho_config(rho), list(overrides))
        for method in TABLE_METHODS if methods is None else methods:
            if method in TABLE_VARIANTS:
                file, label = TABLE_VARIANTS[method]
                path = rho_config(rho).with_name(file.format(rho=rho))
                if not path.is_file() and not asked:
                    continue
                cfg = load_config(path, list(overrides))
            else:
                cfg = _with(base, _method_section(base, method))
                label = _label(cfg)
            row = (label, f"{rho:.3f}")
            published[row] = [None, published_biased_mnist(method, rho)]
            for seed in seeds:
                name = biased_mnist_cell_name(rho, method, cfg.method.options(), seed)
                cells.append(Cell(name, row, seed, _with(cfg, overrides=[f"seed={seed}"])))
    return Table(
        "biased-mnist",
        "EnD Table 1 — Biased MNIST (MNIST-15k protocol), last epoch",
        ("method", "ρ"),
        [Metric("biased acc (%)", _metric("metrics", "biased_accuracy")), Metric("unbiased acc (%)", _metric("metrics", "unbiased_accuracy"))],
        cells,
        published,
        ["Published numbers are on full MNIST (60k digits, 80 epochs); ours on MNIST-15k with the schedule of the shipped configs."],
    )


def ablation_table(rho: float = 0.997, seeds: Iterable[int] = (42,), overrides: Iterable[str] = ()) -> Table:
    """EnD with each term alone and both, at the shipped config's α and β."""
    base = load_config(rho_config(rho), list(overrides))
    end = _method_section(base, "end")
    alpha, beta = end.get("alpha", 1.0), end.get("beta", 1.0)
    cells = []
    for a, b in ((0.0, 0.0), (alpha, 0.0), (0.0, beta), (alpha, beta)):
        cfg = _with(base, {**end, "name": "end", "alpha": a, "beta": b})
        for seed in seeds:
            name = biased_mnist_cell_name(rho, "end", cfg.method.options(), seed)  # Table 1's name for the same run
            same = (f"biased_mnist/{name}",) if (a, b) == (alpha, beta) else ()
            cells.append(Cell(name, (f"{a:g}", f"{b:g}"), seed, _with(cfg, overrides=[f"seed={seed}"]), same))
    return Table(
        "ablation",
        f"EnD Table 2 — ablation of the two terms, Biased MNIST ρ = {rho} (MNIST-15k), last epoch",
        ("α (R⊥)", "β (R∥)"),
        [Metric("biased acc (%)", _metric("metrics", "biased_accuracy")), Metric("unbiased acc (%)", _metric("metrics", "unbiased_accuracy"))],
        cells,
        {},
        ["α = β = 0 is the EnD network (Tanh, normalised bottleneck) without either term.",
         "The paper's Table 2 numbers are not in REFERENCE-FACTS.md, so no published column is shown."],
    )


def _method_cells(
    base: ExperimentConfig, methods: Iterable[str], seeds: Iterable[int], prefix: str, row: tuple[str, ...]
) -> list[Cell]:
    """A cell per method × seed on the shipped config ``base`` (see :func:`_method_section`),
    named ``{prefix}-{method}-s{seed}``, in the row ``(method label, *row)``."""
    cells = []
    for method in methods:
        cfg = _with(base, _method_section(base, method))
        for seed in seeds:
            cells.append(Cell(f"{prefix}-{method}-s{seed}", (_label(cfg), *row), seed, _with(cfg, overrides=[f"seed={seed}"])))
    return cells


def celeba_table(
    targets: Iterable[str] = ("blond_hair", "heavy_makeup"),
    methods: Iterable[str] = ("vanilla", "groupdro", "lff", "end"),
    seeds: Iterable[int] = (42,),
    overrides: Iterable[str] = (),
) -> Table:
    cells = []
    for target in targets:
        base = load_config(CONFIGS / "celeba" / f"{target}.yaml", list(overrides))
        cells += _method_cells(base, methods, seeds, target, (target,))
    published = {c.row: list(PUBLISHED_CELEBA.get((c.config.method.name, c.row[1]), (None, None))) for c in cells}
    return Table(
        "celeba",
        "EnD Table 3 — CelebA (bias: Male), last epoch",
        ("method", "target"),
        [Metric("unbiased acc (%)", _metric("metrics", "unbiased_accuracy")), Metric("bias-conflicting acc (%)", _metric("metrics", "conflicting_accuracy"))],
        cells,
        published,
    )


def imdb_table(
    settings: Iterable[tuple[str, str]] = (("gender", "eb1"), ("gender", "eb2"), ("age", "eb1"), ("age", "eb2")),
    methods: Iterable[str] = ("vanilla", "lnl", "end"),
    seeds: Iterable[int] = (42,),
    overrides: Iterable[str] = (),
) -> Table:
    cells = []
    for target, split in settings:
        base = load_config(CONFIGS / "imdb_face" / f"{target}_{split}.yaml", list(overrides))
        cells += _method_cells(base, methods, seeds, f"{target}-{split}", (target, split))
    published = {c.row: list(PUBLISHED_IMDB.get((c.config.method.name, c.row[1], c.row[2]), (None, None))) for c in cells}
    return Table(
        "imdb",
        "EnD Table 4 — IMDB Face, last epoch",
        ("method", "target", "trained on"),
        [Metric("other EB split acc (%)", _metric("metrics", "other_split_accuracy")), Metric("test acc (%)", _metric("metrics", "test_accuracy"))],
        cells,
        published,
    )


def rho_config(rho: float) -> Path:
    """The shipped Biased-MNIST config of ``rho`` (one line naming the ones there are otherwise)."""
    path = CONFIGS / "biased_mnist" / f"rho{rho:.3f}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem.removeprefix("rho") for p in (CONFIGS / "biased_mnist").glob("rho*.yaml"))
        raise ConfigError(f"no shipped config for rho={rho} ({path}); available: {', '.join(shipped)}")
    return path


# -- running cells -------------------------------------------------------------------------
def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """What must match for two runs to be the same cell: everything but paths and speed knobs."""
    out = json.loads(json.dumps(config))
    out.pop("name", None)
    for key in ("root", "manifest", "csv_dir"):
        (out.get("data") or {}).pop(key, None)
    for key in _RUNTIME_KEYS:
        (out.get("train") or {}).pop(key, None)
    if not (out.get("unsupervised") or {}).get("enabled"):
        out.pop("unsupervised", None)  # its options do nothing unless --bias auto is on
    method = out.get("method") or {}
    if method.get("name") in METHODS:  # a default given explicitly (a sweep's centre point) is the default
        try:
            options = method_options(method["name"], {k: v for k, v in method.items() if k != "name"})
        except ConfigError:
            return out  # compared as written; the mismatch is reported
        out["method"] = {"name": method["name"], **options.model_dump(mode="json")}
    return out


def check_cell_result(cell: Cell, results: dict[str, Any], source: Path) -> None:
    """A results JSON may only stand for ``cell`` if it was run with the cell's options."""
    want = _comparable(cell.config.model_dump(mode="json"))
    have = _comparable(load_config(None, None, base=results["config"]).model_dump(mode="json"))
    if want != have:
        diff = sorted(_diff(want, have))
        raise ConfigError(
            f"{source}: was produced with other options than cell {cell.name} asks for ({', '.join(diff[:4])}); "
            "move it away or pass another --results folder"
        )


def _stored_result(cell: Cell, path: Path, results_dir: Path) -> dict[str, Any] | None:
    """The cell's finished results: its own file (an error if run with other options), else the
    first of ``cell.same_as`` that was run with exactly this cell's options, else None."""
    if path.is_file():
        results = json.loads(path.read_text())
        check_cell_result(cell, results, path)
        return results
    for other in cell.same_as:
        source = results_dir / f"{other}.json"
        if not source.is_file():
            continue
        results = json.loads(source.read_text())
        try:
            check_cell_result(cell, results, source)
        except ConfigError:
            continue  # another run under that name: this cell still needs its own
        return results
    return None


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [f"{prefix.rstrip('.')}: {b!r} ≠ {a!r}"]


def run_cell(cell: Cell, runs_dir: Path, console: Console, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Run (or resume) one cell into ``runs_dir/<cell>`` and return its results."""
    from cxrdebias.experiments.runner import run_experiment

    out = runs_dir / cell.name
    finished = out / "results.json"
    if finished.is_file():
        return json.loads(finished.read_text())
    resume = (out / "checkpoints" / "last.pt").is_file()
    force = out.exists() and not resume
    cfg = _with(cell.config, overrides=overrides)
    console.print(f"[bold]cell[/] {esc(cell.name)} → {esc(out)}" + (" (resuming)" if resume else ""))
    return run_experiment(cfg, out, force=force, resume=resume, console=console)


@dataclass
class TableResult:
    markdown: str
    done: list[str]
    missing: list[str]


def build_table(
    table: Table,
    *,
    results_dir: Path,
    runs_dir: Path = DEFAULT_RUNS,
    run: bool = False,
    runtime_overrides: Iterable[str] = (),
    console: Console | None = None,
    allow_dirty: bool = False,
) -> TableResult:
    """Collect finished cells (running the missing ones when ``run``) and render Markdown.
    Cells whose JSON records uncommitted changes are refused unless ``allow_dirty``, then marked
    (:mod:`cxrdebias.experiments.dirty`)."""
    console = console or make_console(stderr=True, soft_wrap=False)
    store = results_dir / table.results_subdir
    found: dict[str, dict[str, Any]] = {}
    missing = []
    for cell in table.cells:
        path = store / f"{cell.name}.json"
        results = _stored_result(cell, path, results_dir)
        if results is not None:
            found[cell.name] = results
            continue
        if not run:
            missing.append(cell.name)
            continue
        results = run_cell(cell, runs_dir, console, runtime_overrides)
        check_cell_result(cell, results, runs_dir / cell.name / "results.json")
        write_json_atomic(path, results)
        found[cell.name] = results
    dirty = check_dirty(found, allow_dirty=allow_dirty, where=f"table {table.name} ({store})")
    return TableResult(render(table, found, dirty), sorted(found), missing)


def render(table: Table, found: dict[str, dict[str, Any]], dirty: set[str] = frozenset()) -> str:
    """Markdown: one line per row, our mean ± std over the finished seeds beside the paper."""
    rows: dict[tuple[str, ...], list[Cell]] = {}
    for cell in table.cells:
        rows.setdefault(cell.row, []).append(cell)
    # a "paper" column for each metric the paper reports for at least one row
    with_paper = [i for i in range(len(table.metrics)) if any(v[i] is not None for v in table.published.values())]
    headers = [*table.row_headers, "seeds", *(m.header for m in table.metrics)]
    headers += [f"paper: {table.metrics[i].header}" for i in with_paper]
    lines = [f"**{table.title}**", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row, cells in rows.items():
        done = [found[c.name] for c in cells if c.name in found]
        seeds = ", ".join(str(r["seed"]) for r in done) or "not run"
        values = [format_mean_std([v for r in done if (v := m.get(r)) is not None], scale=100) for m in table.metrics]
        values = [mark(v, (c.name for c in cells), dirty) for v in values]
        line = [*row, seeds, *values]
        published = table.published.get(row, [None] * len(table.metrics))
        line += [f"{published[i]:.2f}" if published[i] is not None else "–" for i in with_paper]
        lines.append("| " + " | ".join(line) + " |")
    if table.notes or dirty:
        lines += [""] + [f"- {n}" for n in table.notes] + legend(dirty)
    n_done = sum(1 for c in table.cells if c.name in found)
    lines += ["", f"{n_done} of {len(table.cells)} cells finished; mean ± std over seeds where more than one."]
    return "\n".join(lines)


def update_markdown(path: Path, key: str, markdown: str) -> None:
    """Replace the block between ``<!-- table:KEY:start -->`` and ``<!-- table:KEY:end -->`` of
    the Markdown file ``path`` (written atomically); ``ConfigError`` when the markers are missing."""
    start, end = f"<!-- table:{key}:start -->", f"<!-- table:{key}:end -->"
    try:
        text = replace_marked_block(path.read_text(encoding="utf-8"), start, end, markdown, where=str(path))
    except ValueError as e:
        raise ConfigError(f"{e} for the table") from None
    write_text_atomic(path, text)


def get_table(name: str, **kwargs: Any) -> Table:
    builders: dict[str, Callable[..., Table]] = {
        "biased-mnist": biased_mnist_table,
        "1": biased_mnist_table,
        "ablation": ablation_table,
        "2": ablation_table,
        "celeba": celeba_table,
        "3": celeba_table,
        "imdb": imdb_table,
        "4": imdb_table,
    }
    if name not in builders:
        raise ConfigError(f"unknown table {name!r}; expected one of: {', '.join(TABLE_NAMES)} (or 1–4)")
    builder = builders[name]
    accepted = inspect.signature(builder).parameters
    return builder(**{k: v for k, v in kwargs.items() if v is not None and k in accepted})
