"""The second selection stage of a Table 1 sweep (docs/reproduction.md, "The same budget for
every Table 1 method"; issue 25).

A sweep (one training seed, ρ = 0.997) whose pick is not the grid's centre is checked before the
pick replaces the centre: both points are run at 3 training seeds at both ρ as Table 1 cells
(``benchmarks/reproduce_biased_mnist.py --methods METHOD [--set method.KEY=VALUE …]``), and the
pick is **adopted only if its mean validation accuracy is higher than the centre's at every ρ**.
This script reads those cells' JSONs from docs/results/biased_mnist/, applies the rule to the
validation accuracy only, and writes the decision with every paired difference (n and 95%
Student-t interval, paired by seed) to docs/results/second-stage/NAME.json (``--name``, default
the method) and a Markdown table (stdout, and with ``--docs FILE`` between
``<!-- second-stage:NAME:start/end -->``).
The test accuracies are recorded beside it for the reader, after the decision; they never enter it.

    python benchmarks/second_stage.py --method end            # the pick: docs/results/sweep/end-0.997.json
    python benchmarks/second_stage.py --method lnl --pick lambda_=0.1 --pick grl_scale=1
    # the same rule for another EnD form against the shipped one, under its own name
    python benchmarks/second_stage.py --method end --pick form=reference --name end-form-reference
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks._common import DOCS
from cxrdebias.errors import ConfigError
from cxrdebias.evaluation.benchmark_stats import mean_ci, paired_difference
from cxrdebias.experiments.benchmark_table import check_block_name, publish
from cxrdebias.experiments.dirty import is_dirty
from cxrdebias.experiments.tables import biased_mnist_cell_name, shipped_options
from cxrdebias.fileio import write_json_atomic

RESULTS = DOCS / "results" / "biased_mnist"
SWEEPS = DOCS / "results" / "sweep"
DECISIONS = DOCS / "results" / "second-stage"
RULE = "adopt the pick only if its mean validation accuracy is higher than the centre's at every rho (n seeds each, paired by seed)"
#: what the decision reads, then what is recorded beside it (read after the decision)
DECIDES = "val_accuracy"
AFTER = ("unbiased_accuracy", "biased_accuracy")


def parse_point(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.removeprefix("method.")
        if not sep or not key or not value:
            raise SystemExit(f"{item!r}: expected KEY=VALUE (a method option, e.g. lambda_=0.1)")
        out[key] = value
    return out


def sweep_pick(method: str, rho: float = 0.997, sweeps: Path = SWEEPS) -> dict[str, str]:
    """The recorded sweep's pick (``best_point``) without the ``method.`` prefix."""
    path = sweeps / f"{method}-{rho:.3f}.json"
    if not path.is_file():
        raise SystemExit(f"{path}: no recorded sweep of {method!r}; give the pick with --pick KEY=VALUE")
    best = json.loads(path.read_text()).get("best_point")
    if not isinstance(best, dict) or not best:
        raise SystemExit(f"{path}: no 'best_point' (an incomplete sweep?)")
    return {k.removeprefix("method."): str(v) for k, v in best.items()}


def _value(results: dict, key: str) -> float:
    v = (results.get("metrics") or {}).get(key)
    return 100 * float(v) if isinstance(v, int | float) else math.nan


def decide(
    method: str,
    pick: dict[str, Any],
    rhos: tuple[float, ...] = (0.997, 0.990),
    seeds: tuple[int, ...] = (42, 43, 44),
    results: Path = RESULTS,
) -> dict[str, Any]:
    """The decision record: per ρ the centre's and the pick's cells, each metric's mean [CI] and
    the paired pick − centre difference, and ``decision``: ``adopt``, ``keep the centre`` or
    ``incomplete`` (a cell missing: nothing is decided)."""
    per_rho, missing, dirty = {}, [], []
    centres = {f"{rho:.3f}": shipped_options(rho, method) for rho in rhos}  # what Table 1 runs now
    for rho in rhos:
        points = {"centre": centres[f"{rho:.3f}"]}
        points["pick"] = {**points["centre"], **pick}
        names = {p: {s: biased_mnist_cell_name(rho, method, opts, s) for s in seeds} for p, opts in points.items()}
        if names["centre"] == names["pick"]:
            raise SystemExit(f"the pick {pick} is the centre itself at rho {rho}: there is nothing to decide")
        runs: dict[str, dict[int, dict]] = {"centre": {}, "pick": {}}
        for p, by_seed in names.items():
            for s, name in by_seed.items():
                path = results / f"{name}.json"
                if not path.is_file():
                    missing.append(name)
                    continue
                runs[p][s] = json.loads(path.read_text())
                if is_dirty(runs[p][s]):
                    dirty.append(name)
        row: dict[str, Any] = {"cells": names}
        for key in (DECIDES, *AFTER):
            c = {s: _value(r, key) for s, r in runs["centre"].items()}
            k = {s: _value(r, key) for s, r in runs["pick"].items()}
            row[key] = {"centre": mean_ci(list(c.values())), "pick": mean_ci(list(k.values())), "pick_minus_centre": paired_difference(c, k)}
        per_rho[f"{rho:.3f}"] = row
    if missing:
        decision = "incomplete"
    else:
        higher = all(row[DECIDES]["pick_minus_centre"]["mean"] > 0 for row in per_rho.values())
        decision = "adopt" if higher else "keep the centre"
    return {
        "method": method,
        "centre": centres,
        "pick": pick,
        "seeds": list(seeds),
        "rule": RULE,
        "decision": decision,
        "missing": missing,
        "dirty": sorted(dirty),
        "rhos": per_rho,
    }


def _ci(s: dict) -> str:
    lo, hi = s["ci"]
    return f"{s['mean']:.2f} [{lo:.2f}, {hi:.2f}]" if math.isfinite(lo) else f"{s['mean']:.2f} (n = {s['n']})"


def _delta(s: dict) -> str:
    lo, hi = s["ci"]
    return f"{s['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}]" if math.isfinite(lo) else f"{s['mean']:+.2f} (n = {s['n']})"


def markdown(record: dict[str, Any]) -> str:
    pick = ", ".join(f"{k} {v}" for k, v in record["pick"].items())
    lines = [
        f"Second stage of the {record['method']} sweep: the pick ({pick}) against the centre, "
        f"seeds {', '.join(map(str, record['seeds']))} (n = {len(record['seeds'])} per point and ρ; mean [95% interval], "
        "differences paired by seed). Rule: " + record["rule"] + ".",
        "",
        "| ρ | validation acc, centre | validation acc, pick | paired Δ validation (pick − centre) | unbiased test Δ | biased test Δ |",
        "|---|---|---|---|---|---|",
    ]
    for rho, row in record["rhos"].items():
        v = row[DECIDES]
        lines.append(
            f"| {rho} | {_ci(v['centre'])} | {_ci(v['pick'])} | {_delta(v['pick_minus_centre'])} "
            f"| {_delta(row['unbiased_accuracy']['pick_minus_centre'])} | {_delta(row['biased_accuracy']['pick_minus_centre'])} |"
        )
    lines += ["", f"**Decision: {record['decision']}** (validation only; the test columns were not read for it)."]
    if record["missing"]:
        lines.append(f"Missing cells: {', '.join(record['missing'])}.")
    if record["dirty"]:
        lines.append(f"◇ cells from a dirty tree: {', '.join(record['dirty'])}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True)
    ap.add_argument("--pick", action="append", metavar="KEY=VALUE", help="the pick's options (default: the recorded sweep's best point)")
    ap.add_argument("--rhos", type=float, nargs="+", default=[0.997, 0.990])
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    ap.add_argument("--name", help="the decision's name: its JSON file and docs block (default: the method)")
    ap.add_argument("--docs", type=Path, help="also write the table into this Markdown file's second-stage:NAME block "
                    "(the JSON then goes to results/second-stage/ beside that file)")
    args = ap.parse_args(argv)
    name = args.name or args.method
    try:
        check_block_name(name)  # also without --docs: it names the JSON file
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    pick = parse_point(args.pick) if args.pick else sweep_pick(args.method)
    try:
        record = decide(args.method, pick, tuple(args.rhos), tuple(args.seeds))
        text = markdown(record)
        if args.docs:
            publish({"markdown": text, "json": record}, args.docs, name, kind="second-stage")
        else:
            write_json_atomic(DECISIONS / f"{name}.json", record)
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    print(text)


if __name__ == "__main__":
    main()
