"""Biased-MNIST reproduction grid → docs/results/biased_mnist/*.json → docs/reproduction.md.

Each cell (ρ, method, seed) runs ``cxrdebias reproduce biased-mnist`` with the shipped config
``configs/biased_mnist/rho{ρ}.yaml``. Finished cells (a JSON in docs/results/biased_mnist/)
are skipped, and an interrupted cell resumes from its last checkpoint, so the table can be
built and extended over several sittings. ``--table-only`` just rebuilds the Markdown.

    python benchmarks/reproduce_biased_mnist.py --rhos 0.997 0.990 --methods vanilla end --seeds 42 43 44
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks._common import DOCS, REPO

RESULTS = DOCS / "results" / "biased_mnist"
TABLE = DOCS / "reproduction.md"
#: published unbiased accuracy on full MNIST (EnD paper Table 1; vanilla from ReBias)
PAPER = {
    "vanilla": {0.999: 10.4, 0.997: 33.4, 0.995: 72.1, 0.990: 89.1},
    "end": {0.999: 52.30, 0.997: 83.70, 0.995: 93.92, 0.990: 96.02},
}


def cell_name(rho: float, method: str, seed: int, form: str | None) -> str:
    return f"rho{rho:.3f}-{method}{'-' + form if form else ''}-s{seed}"


def run_cell(rho: float, method: str, seed: int, args) -> None:
    name = cell_name(rho, method, seed, args.form if method == "end" else None)
    dest = RESULTS / f"{name}.json"
    if dest.exists():
        print(f"skip {name} (done)")
        return
    out = Path(args.runs) / name
    cmd = [
        sys.executable, "-m", "cxrdebias.cli", "reproduce", "biased-mnist",
        "--config", str(REPO / "configs" / "biased_mnist" / f"rho{rho:.3f}.yaml"),
        "--method", method, "--seed", str(seed), "--out", str(out), "--set", "train.progress=false",
    ]
    if method == "end":
        cmd += ["--form", args.form]
        if args.alpha is not None:
            cmd += ["--alpha", str(args.alpha)]
        if args.beta is not None:
            cmd += ["--beta", str(args.beta)]
    if args.threads:
        cmd += ["--set", f"train.num_threads={args.threads}"]
    if (out / "checkpoints" / "last.pt").exists() and not (out / "results.json").exists():
        cmd.append("--resume")
    elif out.exists() and not (out / "results.json").exists():
        cmd.append("--force")
    if not (out / "results.json").exists():
        print("run", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=REPO)
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "results.json", dest)


def _fmt(vals: list[float]) -> str:
    if not vals:
        return "–"
    m = statistics.fmean(vals) * 100
    if len(vals) == 1:
        return f"{m:.2f} (n=1)"
    return f"{m:.2f} ± {statistics.stdev(vals) * 100:.2f} (n={len(vals)})"


def build_table() -> str:
    rows: dict[tuple, list[dict]] = {}
    for p in sorted(RESULTS.glob("*.json")):
        r = json.loads(p.read_text())
        m = r["method"]
        key = (r["rho"], m["name"], m.get("form"), m.get("alpha"), m.get("beta"), r["epochs"], r["config"]["train"].get("lr_step"))
        rows.setdefault(key, []).append(r)
    lines = [
        "| ρ | method | α | β | form | epochs (LR step) | seeds | biased acc (%) | unbiased acc (%) | paper unbiased (%) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(rows, key=lambda k: (-k[0], k[1] != "vanilla", str(k[2]), k[3] or 0, k[4] or 0)):
        rho, method, form, alpha, beta, epochs, step = key
        rs = rows[key]
        paper = PAPER.get(method, {}).get(round(rho, 3))
        lines.append(
            f"| {rho} | {method} | {alpha if alpha is not None else '–'} | {beta if beta is not None else '–'} | {form or '–'} "
            f"| {epochs} ({step}) | {', '.join(str(r['seed']) for r in sorted(rs, key=lambda r: r['seed']))} "
            f"| {_fmt([r['metrics']['biased_accuracy'] for r in rs])} | {_fmt([r['metrics']['unbiased_accuracy'] for r in rs])} "
            f"| {paper if paper is not None else '–'} |"
        )
    return "\n".join(lines)


def write_table() -> None:
    start, end = "<!-- table:biased_mnist:start -->", "<!-- table:biased_mnist:end -->"
    block = f"{start}\n{build_table()}\n{end}"
    text = TABLE.read_text()
    if start not in text:
        raise SystemExit(f"{TABLE}: missing the {start} marker")
    head, rest = text.split(start, 1)
    TABLE.write_text(head + block + rest.split(end, 1)[1])
    print(build_table())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rhos", type=float, nargs="+", default=[0.997, 0.990])
    ap.add_argument("--methods", nargs="+", default=["vanilla", "end"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    ap.add_argument("--form", default="paper")
    ap.add_argument("--alpha", type=float)
    ap.add_argument("--beta", type=float)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--runs", default=str(REPO / "runs" / "repro"))
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    if not args.table_only:
        for seed in args.seeds:
            for rho in args.rhos:
                for method in args.methods:
                    run_cell(rho, method, seed, args)
                    write_table()
    write_table()


if __name__ == "__main__":
    main()
