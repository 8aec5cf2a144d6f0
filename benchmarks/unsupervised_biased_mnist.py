"""Acceptance table of unsupervised online debiasing on Biased MNIST (issue 5) → docs/unsupervised.md.

Collects finished ``cxrdebias reproduce biased-mnist`` runs (``--bias auto`` ones and their
baselines) into ``docs/results/unsupervised/biased_mnist/`` — results.json plus the per-epoch
pseudo-bias agreement from metrics.jsonl — and rebuilds the table between
``<!-- table:unsupervised:start -->`` and ``<!-- table:unsupervised:end -->``. Rows are grouped
by configuration (read from each run's own config, not from folder names) and ρ; the share of
supervised EnD's gain is ``(auto − vanilla) / (EnD − vanilla)`` on unbiased accuracy with the
3-seed vanilla and EnD means of docs/results/biased_mnist/ (the foundation issue's table).

    python benchmarks/unsupervised_biased_mnist.py --collect runs/unsup runs/tables
    python benchmarks/unsupervised_biased_mnist.py            # table only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks._common import DOCS
from cxrdebias.evaluation.formatting import format_mean_std
from cxrdebias.experiments.tables import update_markdown

RESULTS = DOCS / "results" / "unsupervised" / "biased_mnist"
SUPERVISED = DOCS / "results" / "biased_mnist"
TABLE = DOCS / "unsupervised.md"


def label(results: dict) -> str:
    """A configuration's row name, from the run's recorded method (never from its folder name)."""
    m = results["method"]
    if m.get("bias") != "auto":
        return m["name"] if m["name"] != "end" else f"end, true colour (α {m['alpha']:g}, β {m['beta']:g})"
    u = m["unsupervised"]
    layer = {"extractor.2": "early", None: "bottleneck"}.get(u.get("layer"), u.get("layer"))
    if u["warmup_steps"] >= 10**6 and u.get("warmup_labels") == "target":
        return "end, pseudo-bias = target throughout (no labeller)"
    warm = f"warm-up {u['warmup_steps']} steps" + (" with target labels" if u.get("warmup_labels") == "target" else " of CE")
    gate = f", shortcut gate {u['min_aligned']:g}" if u.get("min_aligned") else ""  # runs before the gate have none
    labeller = u["labeller"] + (f" (k {u['k']})" if u["labeller"] == "cluster" else "")
    extra = f", labels from the {u['source']} statistics" if u.get("source", "live") != "live" else ""
    extra += f", conflicting samples ×{u['reweight']:g}" if u.get("reweight", 1) > 1 else ""
    return f"end + {labeller} on the {layer} layer, {warm}, refresh {u['refresh_every']}{gate}{extra}"


def collect(dirs: list[Path]) -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    n = 0
    for d in dirs:
        for res in sorted(d.glob("*/results.json")):
            r = json.loads(res.read_text())
            if r.get("experiment") != "biased_mnist":
                continue
            per_epoch = []
            metrics = res.parent / "metrics.jsonl"
            if metrics.exists():
                for line in metrics.read_text().splitlines():
                    rec = json.loads(line)
                    if "pseudo_bias" in rec:
                        pb = rec["pseudo_bias"]
                        per_epoch.append({"epoch": rec["epoch"], **{k: pb.get(k) for k in ("nmi", "ari", "matched_accuracy", "minority_matched_accuracy", "n_minority")}})
            name = f"{res.parent.name}.json"
            (RESULTS / name).write_text(json.dumps({"label": label(r), "run": res.parent.name, "results": r, "pseudo_bias_per_epoch": per_epoch}, indent=2) + "\n")
            n += 1
    return n


def _ms(vals: list[float]) -> str:
    return format_mean_std(vals)


def _supervised_means() -> dict[tuple[str, float], float]:
    """3-seed unbiased accuracy (%) of vanilla and partner_mean-form EnD (the shipped default) per ρ (docs/results/biased_mnist)."""
    acc: dict[tuple[str, float], list[float]] = {}
    for p in SUPERVISED.glob("rho*-*-s*.json"):
        r = json.loads(p.read_text())
        r = r.get("results", r)
        key = r["method"]["name"]
        if key not in ("vanilla", "end") or (key == "end" and r["method"].get("form") != "partner_mean"):
            continue
        acc.setdefault((key, float(r["rho"])), []).append(100 * r["metrics"]["unbiased_accuracy"])
    return {k: statistics.fmean(v) for k, v in acc.items()}


def build_table() -> str:
    groups: dict[tuple[float, str], list[dict]] = {}
    for p in sorted(RESULTS.glob("*.json")):
        d = json.loads(p.read_text())
        groups.setdefault((float(d["results"]["rho"]), d["label"]), []).append(d)
    sup = _supervised_means()
    lines = [
        "| ρ | configuration | seeds | biased acc (%) | unbiased acc (%) | share of EnD's gain | pseudo-bias NMI / minority acc. (last epoch) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (rho, name), ds in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        ds.sort(key=lambda d: d["results"]["seed"])
        unb = [100 * d["results"]["metrics"]["unbiased_accuracy"] for d in ds]
        bia = [100 * d["results"]["metrics"]["biased_accuracy"] for d in ds]
        v, e = sup.get(("vanilla", rho)), sup.get(("end", rho))
        share = f"{(statistics.fmean(unb) - v) / (e - v):.0%}" if v is not None and e is not None and e > v else "–"
        last = [d["pseudo_bias_per_epoch"][-1] for d in ds if d["pseudo_bias_per_epoch"]]
        agree = (
            f"{statistics.fmean(x['nmi'] for x in last):.3f} / {statistics.fmean(x['minority_matched_accuracy'] for x in last):.3f}"
            if last and all(x.get("minority_matched_accuracy") is not None for x in last)
            else "–"
        )
        seeds = ", ".join(str(d["results"]["seed"]) for d in ds)
        lines.append(f"| {rho:g} | {name} | {seeds} | {_ms(bia)} | {_ms(unb)} | {share} | {agree} |")
    refs = "; ".join(f"{k} ρ {rho:g}: {val:.2f}" for (k, rho), val in sorted(sup.items(), key=lambda kv: (-kv[0][1], kv[0][0])))
    lines += ["", f"Reference 3-seed means of unbiased accuracy (docs/reproduction.md): {refs}."]
    return "\n".join(lines)


def write_table() -> str:
    table = build_table()
    update_markdown(TABLE, "unsupervised", table)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--collect", type=Path, nargs="*", default=[], help="run folders' parents to copy finished runs from")
    args = ap.parse_args()
    if args.collect:
        print(f"collected {collect(args.collect)} runs into {RESULTS}")
    print(write_table())


if __name__ == "__main__":
    main()
