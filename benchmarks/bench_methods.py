"""Training-step time of every method relative to vanilla (issue 4), SimpleConvNet at batch 256.

Every method gets the same model architecture, the same batch and its default options (EnD
with the Biased-MNIST α, β), is set up exactly as the trainer does (``Method.setup`` with a
:class:`TrainContext`), and the methods are timed interleaved in one run so that drifts in
machine speed hit all of them equally. Alongside the measured ratio the script states what the
method's extra networks cost: the multiply-adds of one forward pass of the extra networks
relative to the main model's (``torch.utils.flop_counter``), since a training step costs about
3× its forward pass for each network trained.

    python benchmarks/bench_methods.py [--rounds 5] [--batch 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks._common import time_call, write_section
from cxrdebias.config import ModelConfig
from cxrdebias.debias import METHODS, TrainContext, build_method
from cxrdebias.models import build_model, model_factory
from cxrdebias.training.device import make_autocast, resolve_precision

OPTIONS = {"end": {"alpha": 5.0, "beta": 0.5}}


def _forward_flops(module: torch.nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops()


def setups(batch: int, precision: str):
    device = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 28, 28, generator=g)
    data = {
        "image": x,
        "target": torch.randint(0, 10, (batch,), generator=g),
        "bias": torch.randint(0, 10, (batch,), generator=g),
        "index": torch.arange(batch),
    }
    out = {}
    for name in sorted(METHODS, key=lambda n: (n != "vanilla", n)):
        method = build_method(name, OPTIONS.get(name))
        cfg = ModelConfig()
        torch.manual_seed(0)
        model = build_model(cfg, 10, feature_activation=method.feature_activation)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
        method.setup(
            model,
            TrainContext(
                num_samples=batch,
                num_classes=10,
                num_biases=10,
                make_optimizer=lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-4),
                make_scheduler=lambda o: None,
                build_model=model_factory(cfg, 10, feature_activation=method.feature_activation),
                device=device,
            ),
        )
        main_flops = _forward_flops(model.eval(), x[:8])
        extra_params = sum(p.numel() for p in method.parameters())
        extra_flops = 0
        for sub in method.children():  # the method's own networks (bias head, G, biased model)
            try:
                extra_flops += _forward_flops(sub.eval(), x[:8])
            except (RuntimeError, TypeError):  # heads that take features, not images
                feats = model(x[:8]).features
                extra_flops += _forward_flops(sub.eval(), feats)
        model.train()
        method.train()
        out[name] = (model, method, opt, {"extra_params": extra_params, "extra_forward_flops_ratio": extra_flops / main_flops})
    return data, out, make_autocast(resolve_precision(precision, device), device), resolve_precision(precision, device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data, runs, autocast, precision = setups(args.batch, args.precision)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(args.rounds):  # interleaved
        for name, (model, method, opt, _) in runs.items():
            t = time_call(lambda m=model, me=method, o=opt: me.update(m, data, o, autocast), repeats=1, warmup=1 if r == 0 else 0)
            times[name].append(t["median"])
        print(f"round {r + 1}/{args.rounds}: " + "  ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    rows = {}
    for name, (_, _, _, cost) in runs.items():
        rows[name] = {"step_s": med[name], "ratio": med[name] / med["vanilla"], **cost}
    md = [
        "## Step time of every method (issue 4)",
        "",
        f"SimpleConvNet, batch {args.batch}, {precision}, 28×28 inputs, each method with its default options "
        f"(EnD α=5, β=0.5), set up as the trainer does; methods interleaved in one run, median of {args.rounds} rounds. "
        "*Extra forward cost* is the multiply-adds of one forward pass of the method's own networks relative to the "
        "main model — what an extra network should add to the step.",
        "",
        "| method | step (s) | / vanilla | extra parameters | extra forward cost | what the extra cost is |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in rows.items():
        md.append(
            f"| {name} | {v['step_s']:.3f} | {v['ratio']:.2f}× | {v['extra_params']:,} | {v['extra_forward_flops_ratio']:.2f}× | {EXPLAIN.get(name, '')} |"
        )
    write_section("bench_methods", "\n".join(md), {"batch": args.batch, "precision": precision, "rounds": args.rounds, "times_s": times, "methods": rows})
    print("\n".join(md))


EXPLAIN = {
    "vanilla": "—",
    "end": "the batch Gram matrix (target ≤ 1.05×)",
    "lnl": "the paper's two alternating updates: two forward + backward passes of the main network (≈ 2× by construction) + a linear bias head",
    "blindeye": "a linear bias head on detached features; one forward pass of the network",
    "rebias": "biased network G (1×1 kernels, ≈ 2% of the main forward) trained alongside + two HSIC terms",
    "groupdro": "per-group losses only",
    "lff": "a second full model (the biased one) trained with GCE: ≈ 2× by construction",
}


if __name__ == "__main__":
    main()
