"""Biased-MNIST reproduction grid → docs/results/biased_mnist/*.json → docs/reproduction.md.

Each cell (ρ, method, seed) runs ``cxrdebias reproduce biased-mnist`` with the shipped config
``configs/biased_mnist/rho{ρ}.yaml``. Finished cells (a JSON in docs/results/biased_mnist/)
are skipped, and an interrupted cell resumes from its last checkpoint, so the table can be
built and extended over several sittings. ``--table-only`` just rebuilds the Markdown.

    python benchmarks/reproduce_biased_mnist.py --rhos 0.997 0.990 --methods vanilla end --seeds 42 43 44

``--epochs E --lr-step S`` runs another schedule than the shipped configs' (e.g. the issue's
20 epochs with the step at 10); those cells are named ``...-{E}ep-s{seed}`` and get their own
rows in the table, so they can be added a seed at a time next to the shipped-schedule rows.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks._common import DOCS, REPO
from cxrdebias.debias.end import DEFAULT_FORM
from cxrdebias.errors import ConfigError
from cxrdebias.evaluation.formatting import format_mean_std
from cxrdebias.experiments.benchmark import check_clean
from cxrdebias.experiments.dirty import check_dirty, legend, mark
from cxrdebias.experiments.tables import (
    CELL_OPTIONS,
    TABLE_VARIANTS,
    biased_mnist_cell_name,
    published_biased_mnist,
    row_method,
    shipped_options,
    update_markdown,
)

RESULTS = DOCS / "results" / "biased_mnist"
TABLE = DOCS / "reproduction.md"
#: the methods this table shows unless --methods asks for more (the results folder also holds
#: Table 1's one-seed cells of the other methods)
SEED_TABLE_METHODS = ("vanilla-raw", "vanilla", "end")
#: rows that are a method on a config of their own (the method run, tables.TABLE_VARIANTS' config)
VARIANT_CONFIGS = {"vanilla-raw": ("vanilla", TABLE_VARIANTS["vanilla-raw"][0])}


def cell_name(rho: float, method: str, seed: int, options: dict | None = None, epochs: int | None = None) -> str:
    """Table 1's naming (:func:`cxrdebias.experiments.tables.biased_mnist_cell_name`): the method's
    swept options (``rho0.997-end-partner_mean-a50-b5-s42``, ``rho0.997-lnl-l0.1-grl1-s42``);
    ``epochs`` (another schedule than the config's) adds ``-20ep``."""
    return biased_mnist_cell_name(rho, method, options or {}, seed, f"{epochs}ep" if epochs else "")


def method_sets(sets: list[str] | None) -> dict[str, str]:
    """``--set method.KEY=VALUE`` → {KEY: VALUE}; only method options (they are in the cell's name)."""
    out = {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("method.") or key == "method.name" or not value:
            raise SystemExit(f"--set {item!r}: expected method.KEY=VALUE (a method option, e.g. method.lambda_=0.1)")
        out[key.removeprefix("method.")] = value
    return out


def cell_options(rho: float, method: str, args) -> dict:
    """A cell's method options: the shipped config's when it is that method (EnD's), with
    ``--form``/``--alpha``/``--beta`` (EnD) and ``--set method.KEY=VALUE`` on top."""
    options = shipped_options(rho, method)
    if method == "end":
        options["form"] = args.form
        options.update({k: v for k, v in (("alpha", args.alpha), ("beta", args.beta)) if v is not None})
    return {**options, **method_sets(args.set)}


def schedule_overrides(epochs: int | None, lr_step: int | None) -> list[str]:
    """``--set`` overrides for another schedule; both or neither must be given."""
    if (epochs is None) != (lr_step is None):
        raise SystemExit("--epochs and --lr-step go together (e.g. --epochs 20 --lr-step 10)")
    if epochs is None:
        return []
    if epochs < 1 or not 0 < lr_step <= epochs:
        raise SystemExit(f"--epochs {epochs} --lr-step {lr_step}: expected epochs >= 1 and 0 < lr-step <= epochs")
    return [f"train.epochs={epochs}", f"train.lr_step={lr_step}"]


def check_schedule(results: dict, epochs: int | None, lr_step: int | None, source: Path) -> None:
    """A finished run may only be filed under a schedule it was trained with."""
    if epochs is None:
        return
    have = (results["epochs"], results["config"]["train"].get("lr_step"))
    if have != (epochs, lr_step):
        raise SystemExit(f"{source}: trained {have[0]} epochs with the LR step at {have[1]}, not {epochs} ({lr_step}) as asked")


def run_cell(rho: float, method: str, seed: int, args) -> None:
    options = cell_options(rho, method, args)
    name = cell_name(rho, method, seed, options, args.epochs)
    dest = RESULTS / f"{name}.json"
    if dest.exists():
        print(f"skip {name} (done)")
        return
    out = Path(args.runs) / name
    run_method, config = VARIANT_CONFIGS.get(method, (method, "rho{rho:.3f}.yaml"))
    cmd = [
        sys.executable, "-m", "cxrdebias.cli", "reproduce", "biased-mnist",
        "--config", str(REPO / "configs" / "biased_mnist" / config.format(rho=rho)),
        "--method", run_method, "--seed", str(seed), "--out", str(out), "--set", "train.progress=false",
    ]
    for key, value in options.items():
        cmd += ["--set", f"method.{key}={value}"]
    if args.threads:
        cmd += ["--set", f"train.num_threads={args.threads}"]
    for override in schedule_overrides(args.epochs, args.lr_step):
        cmd += ["--set", override]
    if (out / "checkpoints" / "last.pt").exists() and not (out / "results.json").exists():
        cmd.append("--resume")
    elif out.exists() and not (out / "results.json").exists():
        cmd.append("--force")
    if not (out / "results.json").exists():
        print("run", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=REPO)
    check_schedule(json.loads((out / "results.json").read_text()), args.epochs, args.lr_step, out / "results.json")
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "results.json", dest)


def options_text(options: tuple[tuple[str, object], ...]) -> str:
    """A row's options as the table shows them: ``form partner_mean, alpha 5, beta 0.5``."""
    return ", ".join(f"{k.rstrip('_')} {v:g}" if isinstance(v, float) else f"{k.rstrip('_')} {v}" for k, v in options) or "–"


def build_table(results_dir: Path = RESULTS, methods: tuple[str, ...] = SEED_TABLE_METHODS, allow_dirty: bool = False) -> str:
    """One row per (ρ, method, options, schedule, precision) with every seed's results under it,
    for ``methods`` only: seeds run in bf16 autocast and in fp32 (``train.precision``) are separate
    rows, never averaged together. Results produced with uncommitted changes are refused unless
    ``allow_dirty``, then marked (:mod:`cxrdebias.experiments.dirty`)."""
    rows: dict[tuple, list[tuple[str, dict]]] = {}
    for p in sorted(results_dir.glob("*.json")):
        r = json.loads(p.read_text())
        m = r["method"]
        if row_method(r) not in methods:
            continue
        precision = str((r.get("train") or {}).get("precision", "?"))
        options = tuple((k, m.get(k)) for k, _ in CELL_OPTIONS.get(m["name"], ()))
        key = (r["rho"], row_method(r), options, r["epochs"], r["config"]["train"].get("lr_step"), precision)
        rows.setdefault(key, []).append((p.stem, r))
    dirty = check_dirty({n: r for rs in rows.values() for n, r in rs}, allow_dirty=allow_dirty, where=str(results_dir))
    lines = [
        "| ρ | method | options | epochs (LR step) | seeds | precision | biased acc (%) | unbiased acc (%) | paper unbiased (%) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(rows, key=lambda k: (-k[0], methods.index(k[1]), str(k[2]), k[3], k[4] or 0, k[5])):
        rho, method, options, epochs, step, precision = key
        named = sorted(rows[key], key=lambda nr: nr[1]["seed"])
        rs = [r for _, r in named]
        paper = published_biased_mnist(method, rho)
        biased, unbiased = (
            mark(format_mean_std([r["metrics"][k] for r in rs], scale=100, show_n=True), [n for n, _ in named], dirty)
            for k in ("biased_accuracy", "unbiased_accuracy")
        )
        lines.append(
            f"| {rho} | {method} | {options_text(options)} "
            f"| {epochs} ({step}) | {', '.join(str(r['seed']) for r in rs)} | {precision} "
            f"| {biased} | {unbiased} "
            f"| {paper if paper is not None else '–'} |"
        )
    return "\n".join(lines + ([""] + legend(dirty) if dirty else []))


def write_table(methods: tuple[str, ...] = SEED_TABLE_METHODS, allow_dirty: bool = False) -> None:
    try:
        table = build_table(methods=methods, allow_dirty=allow_dirty)
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    update_markdown(TABLE, "biased_mnist", table)
    print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rhos", type=float, nargs="+", default=[0.997, 0.990])
    ap.add_argument("--methods", nargs="+", default=list(SEED_TABLE_METHODS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    ap.add_argument("--form", default=DEFAULT_FORM)
    ap.add_argument("--alpha", type=float)
    ap.add_argument("--beta", type=float)
    ap.add_argument("--set", action="append", metavar="method.KEY=VALUE", help="a method option (repeatable); it goes into the cell's name")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--epochs", type=int, help="another schedule than the configs' (with --lr-step)")
    ap.add_argument("--lr-step", type=int, help="epoch of the LR x0.1 step (with --epochs)")
    ap.add_argument("--runs", default=str(REPO / "runs" / "repro"))
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--allow-dirty", action="store_true", help="tabulate results produced with uncommitted changes, marked ◇")
    args = ap.parse_args()
    schedule_overrides(args.epochs, args.lr_step)  # fail before any run
    for rho in args.rhos:  # every cell's name (its options) before any run
        for method in args.methods:
            try:
                cell_name(rho, method, 0, cell_options(rho, method, args))
            except ConfigError as exc:
                raise SystemExit(f"--methods {method} at rho {rho}: {exc}") from None
    if not args.table_only:
        try:
            check_clean(args.allow_dirty)  # new cells from a commit only
        except ConfigError as exc:
            raise SystemExit(str(exc)) from None
    methods = tuple(dict.fromkeys([*SEED_TABLE_METHODS, *args.methods]))
    if not args.table_only:
        for seed in args.seeds:
            for rho in args.rhos:
                for method in args.methods:
                    run_cell(rho, method, seed, args)
                    write_table(methods, args.allow_dirty)
    write_table(methods, args.allow_dirty)


if __name__ == "__main__":
    main()
