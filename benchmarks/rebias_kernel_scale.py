"""What ReBias's HSIC sees at the end of each point of its Biased-MNIST sweep (issue 25).

Every point of the recorded ReBias sweep ended as a colour-only classifier (validation accuracy
0.0986, no conflicting digit right). This reads each point's last checkpoint and measures, on a
fixed batch of training digits (the first ``--n`` of the training split, the run's own data seed):

- for the main network ``f`` and the biased network ``G``: the mean norm of the raw pooled
  features HSIC sees, the median squared distance between two samples' features, and the mean
  off-diagonal entry of the RBF kernel at the run's σ (1 on Biased MNIST) — near 0 the kernel is
  almost the identity matrix (every sample far from every other), near 1 almost constant; in
  both cases HSIC₁ is near 0 whatever the features encode;
- HSIC₁(f, g) at the run's σ and with the median heuristic (σ² = median squared distance, scale-free);
- what ``f``'s raw pooled features encode where colour and digit are independent: on the first
  ``--n`` digits of the validation split (ρ = 0.1 recolouring), the 5-fold cross-validated accuracy
  of a logistic regression reading the colour and one reading the digit (chance 0.1 each).

    python benchmarks/rebias_kernel_scale.py SWEEP_FOLDER --out docs/results/diagnostics/rebias-kernel-scale-0.997.json \
        --docs docs/reproduction.md     # the table between <!-- rebias-kernel-scale:start/end -->

``SWEEP_FOLDER`` is a ``cxrdebias sweep --method rebias`` folder (``runs/<point>/seed<S>/``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch

from cxrdebias.data.biased_mnist import build_biased_mnist
from cxrdebias.debias.hsic import hsic
from cxrdebias.experiments.config import load_config
from cxrdebias.fileio import replace_marked_block, write_json_atomic, write_text_atomic
from cxrdebias.models import build_model
from cxrdebias.models.base import capture_pooled
from cxrdebias.training.provenance import code_version
from cxrdebias.training.runs import torch_load_checked

BLOCK = ("<!-- rebias-kernel-scale:start -->", "<!-- rebias-kernel-scale:end -->")


def kernel_stats(z: torch.Tensor, sigma: float) -> dict[str, float]:
    """Mean feature norm, median squared pairwise distance, mean off-diagonal RBF entry at ``sigma``."""
    d2 = torch.cdist(z, z).pow(2)
    off = d2[~torch.eye(len(z), dtype=torch.bool)]
    return {
        "feature_norm_mean": float(z.norm(dim=1).mean()),
        "sq_distance_median": float(off.median()),
        "rbf_offdiag_mean": float(torch.exp(-off / (2 * sigma**2)).mean()),
    }


def probe(features: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> float:
    """5-fold cross-validated accuracy of a logistic regression reading ``labels`` (NaN when a
    label has fewer than 2 samples)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = labels.numpy()
    counts = torch.bincount(labels)
    folds = min(5, int(counts[counts > 0].min()))
    if folds < 2:
        return math.nan
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return float(cross_val_score(probe, features.numpy(), y, cv=StratifiedKFold(folds, shuffle=True, random_state=seed)).mean())


def pooled(net: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The raw pooled features (what HSIC sees) of ``images``, in eval mode."""
    with torch.no_grad(), capture_pooled(net.eval()) as seen:
        net(images)
    return seen[-1].float()


def measure(run: Path, n: int) -> dict[str, Any]:
    """The numbers of the module doc for one run folder (``config.yaml``, ``checkpoints/last.pt``)."""
    cfg = load_config(run / "config.yaml")
    options = cfg.method.options()
    sigma = options.get("sigma", 1.0)
    if not isinstance(sigma, int | float):
        raise SystemExit(f"{run}: sigma {sigma!r}; this diagnostic reads runs with a fixed σ")
    state = torch_load_checked(run / "checkpoints" / "last.pt")
    data = build_biased_mnist(cfg.data, cfg.seed)
    if data.val is None:
        raise SystemExit(f"{run}: the run has no validation split (data.val_fraction 0)")
    f = build_model(cfg.model, 10)
    f.load_state_dict(state["model"])
    g = build_model(cfg.model.model_copy(update=dict(options.get("biased_model") or {"kernel_size": 1})), 10)
    g.load_state_dict({k.removeprefix("biased."): v for k, v in state["method"].items() if k.startswith("biased.")})
    zf, zg = (pooled(net, data.train.images[:n]) for net in (f, g))
    zv = pooled(f, data.val.images[:n])
    return {
        "run": run.parent.name + "/" + run.name,
        "options": {k: options.get(k) for k in ("lambda_", "lambda_g", "sigma", "hsic_features")},
        "epoch": state["epoch"],
        "code_version": json.loads((run / "run.json").read_text()).get("code_version"),
        "f": kernel_stats(zf, sigma),
        "g": kernel_stats(zg, sigma),
        "hsic_sigma": float(hsic(zf, zg, kernel="rbf", sigma=sigma)),
        "hsic_median": float(hsic(zf, zg, kernel="rbf", sigma="median")),
        "val_probe_f": {"colour": probe(zv, data.val.biases[:n]), "digit": probe(zv, data.val.targets[:n])},
    }


def markdown(rows: list[dict[str, Any]], n: int) -> str:
    lines = [
        f"ReBias sweep, last checkpoint of each point; {n} training digits, one batch (n = 1 run per point, no interval).",
        "",
        "| λ | λ_g | f: median sq. distance | f: mean RBF entry (σ 1) | G: median sq. distance | G: mean RBF entry | HSIC₁(f, g), σ 1 | HSIC₁, median σ | f on validation: colour probe | digit probe |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o = r["options"]
        lines.append(
            f"| {o['lambda_']:g} | {o['lambda_g']:g} | {r['f']['sq_distance_median']:.2f} | {r['f']['rbf_offdiag_mean']:.3f} "
            f"| {r['g']['sq_distance_median']:.2f} | {r['g']['rbf_offdiag_mean']:.3f} | {r['hsic_sigma']:.4f} | {r['hsic_median']:.4f} "
            f"| {r['val_probe_f']['colour']:.3f} | {r['val_probe_f']['digit']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--n", type=int, default=512, help="training digits in the batch (default 512)")
    ap.add_argument("--out", type=Path, help="results JSON (every number of the table, the runs' commits)")
    ap.add_argument("--docs", type=Path, help="also write the table into this Markdown file's rebias-kernel-scale block (needs --out)")
    args = ap.parse_args(argv)
    if args.docs and not args.out:
        raise SystemExit("--docs needs --out: a number in docs/ comes with the JSON it was read from")
    torch.set_num_threads(1)
    # finished runs only: an unfinished one's last.pt is an earlier epoch's
    runs = sorted(p for p in args.sweep.glob("runs/*/seed*") if (p / "results.json").is_file() and (p / "checkpoints" / "last.pt").is_file())
    if not runs:
        raise SystemExit(f"{args.sweep}: no finished run (runs/<point>/seed<S>/ with results.json and checkpoints/last.pt; a `cxrdebias sweep` folder?)")
    rows = [measure(run, args.n) for run in runs]
    text = markdown(rows, args.n)
    if args.out:
        write_json_atomic(args.out, {"sweep": str(args.sweep), "n": args.n, "rows": rows, "code_version": code_version(), "markdown": text})
    if args.docs:
        rel = os.path.relpath(args.out.resolve(), args.docs.resolve().parent)
        try:
            body = replace_marked_block(args.docs.read_text(encoding="utf-8"), BLOCK[0], BLOCK[1], f"{text}\n\nNumbers: `{rel}`.", where=str(args.docs))
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--docs {exc}") from None
        write_text_atomic(args.docs, body)
    print(text)


if __name__ == "__main__":
    main()
