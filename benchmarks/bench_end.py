"""EnD cost: the regulariser alone (256×128 features) and a SimpleConvNet training step with
and without it (batch 256, same model/batch, interleaved in one run).

Targets (issue 2): regulariser ≤ 2 ms; EnD step ≤ 1.05× vanilla step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks._common import time_call, write_section
from cxrdebias.debias import build_method
from cxrdebias.debias.end import FORMS, end_regularizer
from cxrdebias.models import SimpleConvNet
from cxrdebias.training.device import make_autocast, resolve_precision


def regulariser_times(n: int = 256, d: int = 128, repeats: int = 200) -> dict:
    g = torch.Generator().manual_seed(0)
    out = {}
    for form in FORMS:
        f = torch.randn(n, d, generator=g, requires_grad=True)
        t = torch.randint(0, 10, (n,), generator=g)
        b = torch.randint(0, 10, (n,), generator=g)

        def fwd(f=f, t=t, b=b, form=form):
            end_regularizer(f, t, b, 0.1, 0.1, form=form, return_terms=True)

        def fwd_bwd(f=f, t=t, b=b, form=form):
            f.grad = None
            end_regularizer(f, t, b, 0.1, 0.1, form=form, return_terms=True).total.backward()

        out[form] = {"forward_ms": time_call(fwd, repeats=repeats)["median"] * 1e3, "forward_backward_ms": time_call(fwd_bwd, repeats=repeats)["median"] * 1e3}
    return out


def step_times(batch: int = 256, rounds: int = 8, precision: str = "auto") -> dict:
    device = torch.device("cpu")
    precision = resolve_precision(precision, device)
    autocast = make_autocast(precision, device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 28, 28, generator=g)
    t = torch.randint(0, 10, (batch,), generator=g)
    b = torch.randint(0, 10, (batch,), generator=g)
    data = {"image": x, "target": t, "bias": b, "index": torch.arange(batch)}
    setups = {}
    for name, opts in (("vanilla", {}), ("end", {"alpha": 0.1, "beta": 0.1})):
        torch.manual_seed(0)
        model = SimpleConvNet(10, last_activation="tanh")  # same model for both
        method = build_method(name, opts)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
        setups[name] = (model, method, opt)
    times: dict[str, list[float]] = {k: [] for k in setups}
    for _ in range(rounds):  # interleave so drifts in machine speed hit both equally
        for name, (model, method, opt) in setups.items():
            r = time_call(lambda m=model, me=method, o=opt: me.update(m, data, o, autocast), repeats=2, warmup=1)
            times[name].append(r["median"])
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"precision": precision, "batch": batch, "vanilla_s": med["vanilla"], "end_s": med["end"], "ratio": med["end"] / med["vanilla"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    reg = regulariser_times()
    step = step_times(rounds=args.rounds)
    md = [
        "## EnD overhead (issue 2)",
        "",
        "Regulariser alone on a 256×128 feature batch (10 targets, 10 biases), median of 200 calls:",
        "",
        "| form | forward (ms) | forward + backward (ms) | target |",
        "|---|---|---|---|",
    ]
    for form, v in reg.items():
        md.append(f"| {form} | {v['forward_ms']:.2f} | {v['forward_backward_ms']:.2f} | ≤ 2 ms |")
    md += [
        "",
        f"SimpleConvNet training step, batch {step['batch']}, {step['precision']}, same model and batch, "
        f"vanilla and EnD interleaved (median of {args.rounds} rounds):",
        "",
        "| vanilla step (s) | EnD step (s) | EnD / vanilla | target |",
        "|---|---|---|---|",
        f"| {step['vanilla_s']:.3f} | {step['end_s']:.3f} | {step['ratio']:.3f}× | ≤ 1.05× |",
    ]
    write_section("bench_end", "\n".join(md), {"regulariser": reg, "step": step})
    print("\n".join(md))


if __name__ == "__main__":
    main()
