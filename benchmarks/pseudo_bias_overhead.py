"""Step-time overhead of ``--bias auto`` over supervised EnD (issue 5 acceptance: ≤ 15%).

One optimisation step of SimpleConvNet (Biased-MNIST shape, 3×28×28, 10 classes) with EnD on
the true bias labels vs EnD fed by each pseudo-bias labeller, on the same random batch.
Configurations are interleaved round by round (a busy machine slows all of them alike) and the
median (and mean) step time of each is reported; the first ``--warmup`` rounds are not timed.
A cluster refresh (k-means every ``--refresh-every`` steps) is paid on few steps: the median
hides it, the mean over a short run over-weights it; the amortised cost is small either way.

    python benchmarks/pseudo_bias_overhead.py --batch 256 --rounds 6 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from cxrdebias.debias import build_method
from cxrdebias.debias.base import TrainContext
from cxrdebias.debias.unsupervised.options import PseudoBiasOptions
from cxrdebias.models import SimpleConvNet
from cxrdebias.training.device import make_autocast, resolve_precision

CONFIGS = {
    "end (true bias)": None,
    "end + attractor, first block (default)": {"labeller": "attractor"},
    "end + attractor, bottleneck": {"labeller": "attractor", "layer": None},
    "end + cluster k=2, first block": {"labeller": "cluster", "k": 2},
    "end + cluster k=auto, first block": {"labeller": "cluster", "k": "auto"},
    "end + gce_head, first block": {"labeller": "gce_head"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--refresh-every", type=int, default=PseudoBiasOptions().refresh_every)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precision = resolve_precision(args.precision, device)
    autocast = make_autocast(precision, device)
    g = torch.Generator().manual_seed(0)
    n = args.batch
    batch = {
        "image": torch.randn(n, 3, 28, 28, generator=g).to(device),
        "target": torch.randint(0, 10, (n,), generator=g).to(device),
        "bias": torch.randint(0, 10, (n,), generator=g).to(device),
        "index": torch.arange(n),
    }
    runs = {}
    for name, unsup in CONFIGS.items():
        torch.manual_seed(0)
        model = SimpleConvNet(10, last_activation="tanh").to(device)
        opts = None if unsup is None else PseudoBiasOptions(enabled=True, warmup_steps=0, refresh_every=args.refresh_every, **unsup)
        method = build_method("end", {"alpha": 0.1, "beta": 0.1}, opts).to(device)
        ctx = TrainContext(
            num_samples=n, num_classes=10, num_biases=10,
            make_optimizer=lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-4),
            make_scheduler=lambda o: None, device=device,
        )
        method.setup(model, ctx)
        method.to(device)
        runs[name] = (model, method, torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4), [])
    for r in range(args.warmup + args.rounds):
        for model, method, opt, times in runs.values():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            method.update(model, batch, opt, autocast)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r >= args.warmup:
                times.append(time.perf_counter() - t0)
    base = statistics.median(runs["end (true bias)"][3])
    result = {
        "batch": n, "rounds": args.rounds, "threads": torch.get_num_threads(), "precision": precision,
        "device": str(device), "refresh_every": args.refresh_every,
        "median_step_s": {k: statistics.median(v[3]) for k, v in runs.items()},
        "mean_step_s": {k: statistics.fmean(v[3]) for k, v in runs.items()},
    }
    result["overhead_vs_end"] = {k: v / base - 1 for k, v in result["median_step_s"].items()}
    print(json.dumps(result, indent=2))
    print("| configuration | median step (s) | overhead vs EnD (median) | mean step (s) |\n|---|---:|---:|---:|")
    for k, v in result["median_step_s"].items():
        print(f"| {k} | {v:.3f} | {100 * result['overhead_vs_end'][k]:+.1f}% | {result['mean_step_s'][k]:.3f} |")


if __name__ == "__main__":
    main()
