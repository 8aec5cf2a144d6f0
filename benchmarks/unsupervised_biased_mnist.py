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
import functools
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks._common import DOCS
from cxrdebias.errors import ConfigError
from cxrdebias.evaluation.formatting import format_mean_std
from cxrdebias.experiments.dirty import check_dirty, legend, mark
from cxrdebias.experiments.tables import row_method, shipped_options, update_markdown

RESULTS = DOCS / "results" / "unsupervised" / "biased_mnist"
SUPERVISED = DOCS / "results" / "biased_mnist"
TABLE = DOCS / "unsupervised.md"
OTHER_SCHEDULE = re.compile(r"-\d+ep-")
"""The cell names of runs on another schedule than the shipped configs' (``rho0.997-end-paper-20ep-s42``)."""


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


@functools.cache
def shipped_end(rho: float) -> dict:
    """EnD's options in the shipped config of ``rho`` (configs/biased_mnist/rho{ρ}.yaml), read once per ρ."""
    return shipped_options(rho, "end")


def _is_reference(r: dict) -> str | None:
    """``"vanilla"`` for vanilla on EnD's normalised bottleneck, ``"end"`` for EnD with the
    shipped config's form, α and β; None for every other run (Bahng's raw-feature vanilla,
    EnD at another α/β or form, other methods)."""
    method = r["method"]
    if row_method(r) == "vanilla":
        return "vanilla"
    if method["name"] != "end":
        return None
    want = shipped_end(float(r["rho"]))
    same = method.get("form") == want["form"] and all(float(method.get(k, "nan")) == float(want[k]) for k in ("alpha", "beta"))
    return "end" if same else None


def _supervised_means() -> tuple[dict[tuple[str, float], float], dict[tuple[str, float], list[tuple[str, dict]]]]:
    """3-seed unbiased accuracy (%) of vanilla (normalised bottleneck) and of EnD at the shipped
    config's form, α and β per ρ on the shipped schedule (docs/results/biased_mnist; the
    ``-<N>ep-`` files of other schedules are left out), and the results files behind each mean."""
    acc: dict[tuple[str, float], list[float]] = {}
    files: dict[tuple[str, float], list[tuple[str, dict]]] = {}
    for p in sorted(SUPERVISED.glob("rho*-*-s*.json")):
        if OTHER_SCHEDULE.search(p.stem):
            continue
        r = json.loads(p.read_text())
        r = r.get("results", r)
        key = _is_reference(r)
        if key is None:
            continue
        acc.setdefault((key, float(r["rho"])), []).append(100 * r["metrics"]["unbiased_accuracy"])
        files.setdefault((key, float(r["rho"])), []).append((f"biased_mnist/{p.stem}", r))
    return {k: statistics.fmean(v) for k, v in acc.items()}, files


def build_table(allow_dirty: bool = False) -> str:
    """The acceptance table; results produced with uncommitted changes (the runs' or the
    supervised means') are refused unless ``allow_dirty``, then marked ◇."""
    groups: dict[tuple[float, str], list[tuple[str, dict]]] = {}
    for p in sorted(RESULTS.glob("*.json")):
        d = json.loads(p.read_text())
        groups.setdefault((float(d["results"]["rho"]), d["label"]), []).append((p.stem, d))
    sup, sup_files = _supervised_means()
    named = {n: d for ds in groups.values() for n, d in ds} | {n: r for fs in sup_files.values() for n, r in fs}
    dirty = check_dirty(named, allow_dirty=allow_dirty, where=f"{RESULTS} and {SUPERVISED}")
    lines = [
        "| ρ | configuration | seeds | biased acc (%) | unbiased acc (%) | share of EnD's gain | pseudo-bias NMI / minority acc. (last epoch) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (rho, name), named_ds in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        named_ds.sort(key=lambda nd: nd[1]["results"]["seed"])
        ds, names = [d for _, d in named_ds], [n for n, _ in named_ds]
        unb = [100 * d["results"]["metrics"]["unbiased_accuracy"] for d in ds]
        bia = [100 * d["results"]["metrics"]["biased_accuracy"] for d in ds]
        v, e = sup.get(("vanilla", rho)), sup.get(("end", rho))
        share = f"{(statistics.fmean(unb) - v) / (e - v):.0%}" if v is not None and e is not None and e > v else "–"
        refs = [n for k in (("vanilla", rho), ("end", rho)) for n, _ in sup_files.get(k, [])]
        last = [d["pseudo_bias_per_epoch"][-1] for d in ds if d["pseudo_bias_per_epoch"]]
        agree = (
            f"{statistics.fmean(x['nmi'] for x in last):.3f} / {statistics.fmean(x['minority_matched_accuracy'] for x in last):.3f}"
            if last and all(x.get("minority_matched_accuracy") is not None for x in last)
            else "–"
        )
        seeds = ", ".join(str(d["results"]["seed"]) for d in ds)
        share = mark(share, names + refs, dirty) if share != "–" else share
        lines.append(f"| {rho:g} | {name} | {seeds} | {mark(_ms(bia), names, dirty)} | {mark(_ms(unb), names, dirty)} | {share} | {agree} |")
    refs = "; ".join(
        f"{k} ρ {rho:g}: {mark(f'{val:.2f}', [n for n, _ in sup_files[(k, rho)]], dirty)}"
        for (k, rho), val in sorted(sup.items(), key=lambda kv: (-kv[0][1], kv[0][0]))
    )
    lines += ["", f"Reference 3-seed means of unbiased accuracy (docs/reproduction.md): {refs}.", *([""] + legend(dirty) if dirty else [])]
    return "\n".join(lines)


def write_table(allow_dirty: bool = False) -> str:
    table = build_table(allow_dirty)
    update_markdown(TABLE, "unsupervised", table)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--collect", type=Path, nargs="*", default=[], help="run folders' parents to copy finished runs from")
    ap.add_argument("--allow-dirty", action="store_true", help="tabulate results produced with uncommitted changes, marked ◇")
    args = ap.parse_args()
    if args.collect:
        print(f"collected {collect(args.collect)} runs into {RESULTS}")
    try:
        print(write_table(args.allow_dirty))
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None


if __name__ == "__main__":
    main()
