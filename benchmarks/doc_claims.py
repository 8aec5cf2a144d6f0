"""The numbers that docs/reproduction.md, docs/unsupervised.md and docs/cxr.md interpret, recomputed
from the data and from docs/results/ (issue 25): every mean with its n and 95% Student-t interval
over seeds, paired differences by seed with their interval, shares of a gain with a bootstrap
interval and a flag when the gain itself is not distinguishable from 0.

    python benchmarks/doc_claims.py                 # all (the MNIST counts need ../shared/data/mnist15k)
    python benchmarks/doc_claims.py --skip-data     # only what docs/results/ holds

Nothing here is written to docs/; the docs quote its output.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks._common import DOCS, REPO
from cxrdebias.evaluation.benchmark_stats import gap_closed, mean_ci, paired_difference
from cxrdebias.experiments.dirty import is_dirty

RESULTS = DOCS / "results"
MNIST15K = REPO.parent / "shared" / "data" / "mnist15k"
#: the EnD runs the docs' Table 1 prose interprets (form, α 5, β 0.5: the configs' values until issue 25's sweep)
END_CELL = "end-partner_mean-a5-b0.5"


def conflicting_counts(rhos=(0.997, 0.990), seeds=(42, 43, 44), root: Path = MNIST15K) -> dict[tuple[float, int], dict[str, int]]:
    """Per (ρ, seed): the training digits, how many are bias-conflicting (colour ≠ digit) and how
    many (digit, colour) groups the training set fills, built by the shipped config's own code."""
    from cxrdebias.data.biased_mnist import build_biased_mnist
    from cxrdebias.experiments.config import load_config
    from cxrdebias.experiments.tables import rho_config

    out = {}
    for rho in rhos:
        cfg = load_config(rho_config(rho), [f"data.root={root}"])
        for seed in seeds:
            train = build_biased_mnist(cfg.data, seed).train
            pairs = {(int(t), int(b)) for t, b in zip(train.targets, train.biases, strict=True)}
            out[(rho, seed)] = {"train": len(train.targets), "conflicting": int((train.targets != train.biases).sum()), "groups": len(pairs)}
    return out


def _load(path: Path) -> dict:
    d = json.loads(path.read_text())
    return d.get("results", d) if "results" in d and "report" not in d else d


def _acc(name: str, key: str = "unbiased_accuracy", folder: str = "biased_mnist") -> tuple[float, bool]:
    r = _load(RESULTS / folder / f"{name}.json")
    return 100 * r["metrics"][key], is_dirty(r)


def fmt_ci(s: dict, digits: int = 2) -> str:
    lo, hi = s["ci"]
    ci = f" [{lo:.{digits}f}, {hi:.{digits}f}]" if math.isfinite(lo) else " (no interval: n = 1)"
    return f"{s['mean']:.{digits}f}{ci}, n = {s['n']}"


def fmt_delta(s: dict, digits: int = 2) -> str:
    sig = "significant" if s["significant"] else "not significant"
    return f"{s['mean']:+.{digits}f} [{s['ci'][0]:+.{digits}f}, {s['ci'][1]:+.{digits}f}], n = {s['n']} pairs, {sig}"


def fmt_share(g: dict) -> str:
    lo, hi = g["ci"]
    flag = f"; FLAG: {g['note']}" if g.get("note") else ""
    return f"{100 * g['value']:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}], n = {g['n']}{flag}"


def biased_mnist() -> list[str]:
    """Table 1 seed rows (10 epochs; 20 epochs split by precision), the shape ceiling, the ablation."""
    lines = []
    for rho in ("0.997", "0.990"):
        for m in ("vanilla", END_CELL):
            for key in ("biased_accuracy", "unbiased_accuracy"):
                vals = [_acc(f"rho{rho}-{m}-s{s}", key) for s in (42, 43, 44)]
                dirty = sum(d for _, d in vals)
                lines.append(f"ρ {rho} {m} 10 ep {key}: {fmt_ci(mean_ci([v for v, _ in vals]))} ({dirty} of 3 from a dirty tree)")
        for seeds, label in (((42,), "bf16") if rho == "0.997" else ((42, 43, 44), "bf16"), ((43, 44), "fp32") if rho == "0.997" else ((), "")):
            if not seeds:
                continue
            for key in ("biased_accuracy", "unbiased_accuracy"):
                vals = [_acc(f"rho{rho}-{END_CELL}-20ep-s{s}", key)[0] for s in seeds]
                lines.append(f"ρ {rho} {END_CELL} 20 ep {label} seeds {seeds} {key}: {fmt_ci(mean_ci(vals))}")
    ceiling = _load(RESULTS / "diagnostics" / "rho0.100-vanilla-20ep-s42.json")["metrics"]
    lines.append(f"shape ceiling (vanilla ρ 0.1, 20 ep, seed 42, n = 1): biased {100 * ceiling['biased_accuracy']:.2f}, unbiased {100 * ceiling['unbiased_accuracy']:.2f}")
    for rho, seeds in (("0.997", (42, 43, 44)), ("0.990", (42, 43, 44))):
        b10 = {s: _acc(f"rho{rho}-{END_CELL}-s{s}", "biased_accuracy")[0] for s in seeds}
        b20 = {s: _acc(f"rho{rho}-{END_CELL}-20ep-s{s}", "biased_accuracy")[0] for s in seeds}
        lines.append(f"ρ {rho} EnD biased acc 20 ep − 10 ep, paired by seed: {fmt_delta(paired_difference(b10, b20))}")
    return lines


def unsupervised() -> list[str]:
    """The acceptance rows: --bias auto against vanilla and supervised EnD (10 epochs), paired by seed."""
    lines = []
    for rho in ("0.997", "0.990"):
        seeds = (42, 43, 44)
        auto = {s: _acc(f"end-auto-early-{rho}-s{s}", folder="unsupervised/biased_mnist")[0] for s in seeds}
        end = {s: _acc(f"rho{rho}-{END_CELL}-s{s}")[0] for s in seeds}
        van = {s: _acc(f"rho{rho}-vanilla-s{s}")[0] for s in seeds}
        labels = {json.loads((RESULTS / "unsupervised" / "biased_mnist" / f"end-auto-early-{rho}-s{s}.json").read_text())["label"] for s in seeds}
        lines.append(f"ρ {rho} auto unbiased: {fmt_ci(mean_ci(list(auto.values())))}; configurations: {len(labels)}")
        lines.append(f"ρ {rho} auto − EnD (unbiased, paired by seed): {fmt_delta(paired_difference(end, auto))}")
        lines.append(f"ρ {rho} auto − vanilla: {fmt_delta(paired_difference(van, auto))}; EnD − vanilla: {fmt_delta(paired_difference(van, end))}")
        lines.append(f"ρ {rho} share of EnD's gain: {fmt_share(gap_closed(auto, van, end))}")
    return lines


def cxr() -> list[str]:
    """Worst-site BA of the synthetic CXR runs: paired differences by seed, shares of site-EnD's gain."""
    def worst(variant: str, seeds) -> dict[int, float]:
        out = {}
        for s in seeds:
            p = RESULTS / "cxr" / f"{variant}-s{s}.json"
            if p.exists():
                out[s] = json.loads(p.read_text())["report"]["group_min"]["balanced_accuracy"]
        return out

    lines = []
    for label, seeds in (("seeds 0–4", range(5)), ("seeds 5–7", range(5, 8)), ("seeds 0–7", range(8))):
        v, e, w0 = worst("vanilla", seeds), worst("end", seeds), worst("end-auto-w0", seeds)
        lines.append(f"CXR {label}: vanilla {fmt_ci(mean_ci(list(v.values())), 3)}; site-EnD {fmt_ci(mean_ci(list(e.values())), 3)}; "
                     f"auto-w0 {fmt_ci(mean_ci(list(w0.values())), 3)}")  # fmt: skip
        lines.append(f"CXR {label}: site-EnD − vanilla {fmt_delta(paired_difference(v, e), 3)}; auto-w0 − vanilla {fmt_delta(paired_difference(v, w0), 3)}")
        lines.append(f"CXR {label}: auto-w0 share of site-EnD's gain {fmt_share(gap_closed(w0, v, e))}")
    v, a = worst("vanilla", range(5)), worst("end-auto", range(5))
    lines.append(f"CXR seeds 0–4: end-auto (warm-up 10) {fmt_ci(mean_ci(list(a.values())), 3)}; − vanilla {fmt_delta(paired_difference(v, a), 3)}; "
                 f"share {fmt_share(gap_closed(a, v, worst('end', range(5))))}")  # fmt: skip
    hashes = {json.loads(p.read_text())["results"]["data"]["manifest_sha256"] for p in (RESULTS / "cxr").glob("*.json")}
    dirty = sum(is_dirty(json.loads(p.read_text())) for p in (RESULTS / "cxr").glob("*.json"))
    lines.append(f"CXR results JSONs: {len(list((RESULTS / 'cxr').glob('*.json')))}, {dirty} from a dirty tree; manifest_sha256 recorded: {sorted(hashes)}")
    return lines


def compute_budget() -> list[str]:
    """Core-hours spent on the Biased-MNIST tables (issue 25's budget: about 12 CPU-hours for the
    whole Table 1): the runs behind docs/results/biased_mnist/ (``train.time_s``, by schedule) and
    the recorded sweeps (``seconds`` per run; sweeps collected before it was recorded count as unknown)."""
    by_schedule: dict[str, list[float]] = {}
    for path in sorted((RESULTS / "biased_mnist").glob("*.json")):
        r = _load(path)
        threads = int((r.get("environment") or {}).get("torch_threads") or 1)  # wall time × the threads it ran with
        by_schedule.setdefault(f"{r['epochs']} epochs", []).append(threads * float((r.get("train") or {}).get("time_s") or 0.0))
    lines = [f"Biased MNIST cells, {k}: {len(v)} runs, {sum(v) / 3600:.1f} core-hours (wall time × threads)" for k, v in sorted(by_schedule.items())]
    for path in sorted((RESULTS / "sweep").glob("*.json")):
        seconds = [s.get("seconds") for p in json.loads(path.read_text())["points"] for s in p["seeds"].values()]
        known = [x for x in seconds if x is not None]
        lines.append(f"sweep {path.stem}: {len(seconds)} runs, {sum(known) / 3600:.1f} core-hours recorded (1 thread a run)" + (f", {len(seconds) - len(known)} runs without a recorded time" if len(known) < len(seconds) else ""))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-data", action="store_true", help="skip the counts that need the MNIST-15k data")
    args = ap.parse_args()
    if not args.skip_data:
        for (rho, seed), c in conflicting_counts().items():
            print(f"MNIST-15k ρ {rho} seed {seed}: {c['conflicting']} bias-conflicting of {c['train']} training digits, {c['groups']} (digit, colour) groups filled")
    for line in [*biased_mnist(), *unsupervised(), *cxr(), *compute_budget()]:
        print(line)


if __name__ == "__main__":
    main()
