"""Acceptance benchmark of the CXR application (issue 3) → docs/results/cxr/ → docs/cxr.md.

On the embedded synthetic two-site set (default generator settings, one data seed), train
vanilla and EnD (site as the bias) with several training seeds using
``configs/cxr/synthetic.yaml``, evaluate each per institution on the balanced test split, and
tabulate per-site TPR/TNR/BA and the worst-site balanced accuracy (mean ± std over seeds).
Finished cells are skipped; ``--table-only`` rebuilds the Markdown.

    python benchmarks/cxr_synthetic.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks._common import DOCS, REPO
from cxrdebias.data.synthetic import SynthConfig, synthesize
from cxrdebias.errors import ConfigError
from cxrdebias.evaluation.formatting import format_mean_std
from cxrdebias.experiments.benchmark import check_clean
from cxrdebias.experiments.config import load_config
from cxrdebias.experiments.dirty import check_dirty, is_dirty, legend, mark
from cxrdebias.experiments.evaluate import evaluate_run
from cxrdebias.experiments.runner import run_experiment
from cxrdebias.experiments.tables import update_markdown

RESULTS = DOCS / "results" / "cxr"
TABLE = DOCS / "cxr.md"
CONFIG = REPO / "configs" / "cxr" / "synthetic.yaml"
METHODS = ("vanilla", "end")
# issue 5: EnD fed by online pseudo-bias labels; the site is never given to the method (it is
# still read for the agreement metrics and, as for every row, for validation model selection)
AUTO: dict[str, dict] = {
    # the package defaults (chosen on Biased-MNIST validation, docs/unsupervised.md): attractor on
    # the first block, 10 warm-up steps with the target as the bias
    "end-auto": {"warmup_steps": 10},
    # per-class k-means of the bottleneck, with the package-default 10-step warm-up as when it was added
    "end-auto-cluster": {"labeller": "cluster", "warmup_steps": 10},
    # configs/cxr/*.yaml's setting: pseudo labels from the first step. The 10-step warm-up is the
    # one thing that separates end-auto from site-EnD when the labeller is perfect
    # (test_a_perfect_labeller_makes_bias_auto_exactly_supervised_end)
    "end-auto-w0": {"warmup_steps": 0},
}
VARIANTS = METHODS + tuple(AUTO)


def run_cell(method: str, seed: int, data: Path, runs: Path, overrides: list[str]) -> None:
    dest = RESULTS / f"{method}-s{seed}.json"
    if dest.exists():
        print(f"skip {dest.name} (done)")
        return
    out = runs / f"{method}-s{seed}"
    base = load_config(CONFIG, [f"data.manifest={data / 'manifest.csv'}", f"seed={seed}", "train.progress=false", *overrides]).model_dump(mode="json")
    if method == "vanilla":
        base["method"] = {"name": "vanilla"}
    elif method in AUTO:
        base["unsupervised"] = {**base.get("unsupervised", {}), "enabled": True, **AUTO[method]}
    # every row of this (superseded, docs/cxr.md) table was measured in the natural order, before the
    # config's default became site × label-balanced sampling
    base["train"] = {**base["train"], "sampling": "none"}
    cfg = load_config(None, None, base=base)
    if not (out / "model.pt").exists():
        run_experiment(cfg, out, force=out.exists())
    report = evaluate_run(out, force=True)
    results = json.loads((out / "results.json").read_text())
    RESULTS.mkdir(parents=True, exist_ok=True)
    report.pop("markdown", None)
    dest.write_text(json.dumps({"variant": method, "results": results, "report": report}, indent=2, default=str) + "\n")
    shutil.copyfile(out / "eval" / "report.png", RESULTS / f"{method}-s{seed}.png")


def _ms(vals: list[float]) -> str:
    return format_mean_std([v for v in vals if v is not None], 3)


def build_table(allow_dirty: bool = False) -> str:
    """The per-site and worst-site tables; results produced with uncommitted changes are refused
    unless ``allow_dirty``, then the method's rows are marked ◇."""
    cells: dict[str, list[dict]] = {m: [] for m in VARIANTS}
    named = {}
    for p in sorted(RESULTS.glob("*.json")):
        d = json.loads(p.read_text())
        cells[d.get("variant", d["results"]["method"]["name"])].append(d)
        named[p.stem] = d
    dirty_files = check_dirty(named, allow_dirty=allow_dirty, where=str(RESULTS))
    dirty = {m for m, ds in cells.items() if any(is_dirty(d) for d in ds)} if dirty_files else set()
    sites = sorted({s for ds in cells.values() for d in ds for s in d["report"]["by_group"]})
    lines = [
        "| method | seeds | site | TPR | TNR | balanced accuracy | AUROC |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in VARIANTS:
        ds = cells[m]
        if not ds:
            continue
        seeds = ", ".join(str(d["results"]["seed"]) for d in ds)
        for s in sites:
            g = [d["report"]["by_group"][s] for d in ds]
            lines.append(
                f"| {mark(m, [m], dirty)} | {seeds} | {s} | {_ms([x['tpr'] for x in g])} | {_ms([x['tnr'] for x in g])} "
                f"| {_ms([x['balanced_accuracy'] for x in g])} | {_ms([x['auroc'] for x in g])} |"
            )
    lines += ["", "| method | worst-site BA (mean ± std) | per seed: worst-site BA [95% CI] | equalized-odds difference |", "|---|---|---|---|"]
    for m in VARIANTS:
        ds = cells[m]
        if not ds:
            continue
        worst = [d["report"]["group_min"]["balanced_accuracy"] for d in ds]
        per_seed = "; ".join(
            f"s{d['results']['seed']}: {d['report']['group_min']['balanced_accuracy']:.3f} "
            f"[{d['report']['group_min']['ci']['balanced_accuracy'][0]:.3f}, {d['report']['group_min']['ci']['balanced_accuracy'][1]:.3f}]"
            for d in ds
        )
        eod = [d["report"]["equalized_odds_difference"]["value"] for d in ds]
        lines.append(f"| {mark(m, [m], dirty)} | {_ms(worst)} | {per_seed} | {_ms(eod)} |")
    return "\n".join(lines + ([""] + legend(dirty) if dirty else []))


def write_table(allow_dirty: bool = False) -> None:
    try:
        table = build_table(allow_dirty)
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    update_markdown(TABLE, "cxr", table)
    print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--runs", type=Path, default=REPO / "runs" / "cxr-benchmark")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override for every run")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(VARIANTS), help="rows to run (end-auto-*: issue 5, no site labels)")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--allow-dirty", action="store_true", help="run and tabulate with uncommitted changes (marked ◇)")
    args = ap.parse_args()
    if not args.table_only:
        try:
            check_clean(args.allow_dirty)
        except ConfigError as exc:
            raise SystemExit(str(exc)) from None
    if not args.table_only:
        data = args.runs / f"data-s{args.data_seed}"
        if not (data / "manifest.csv").exists():
            synthesize(data, SynthConfig(seed=args.data_seed), force=data.exists())
        for seed in args.seeds:
            for method in args.methods:
                run_cell(method, seed, data, args.runs, args.overrides)
                write_table(args.allow_dirty)
    write_table(args.allow_dirty)


if __name__ == "__main__":
    main()
