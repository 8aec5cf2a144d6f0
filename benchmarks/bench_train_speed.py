"""CPU training speed of SimpleConvNet (batch 256, 28×28 RGB): what helps on this machine.

Variants: plain fp32 eager (the baseline), channels_last, bf16 autocast, both, and
torch.compile of the fp32 / bf16 models. ``--accuracy`` also trains the same short
Biased-MNIST run in fp32 and in bf16 and compares test accuracies, because a faster precision
is only kept if it does not lose accuracy.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks._common import REPO, time_call, write_section
from cxrdebias.models import SimpleConvNet
from cxrdebias.train import cpu_has_native_bf16

VARIANTS = {
    "fp32 eager": dict(bf16=False, channels_last=False, compile=False),
    "fp32 channels_last": dict(bf16=False, channels_last=True, compile=False),
    "bf16 autocast": dict(bf16=True, channels_last=False, compile=False),
    "bf16 autocast + channels_last": dict(bf16=True, channels_last=True, compile=False),
    "fp32 torch.compile": dict(bf16=False, channels_last=False, compile=True),
    "bf16 autocast + torch.compile": dict(bf16=True, channels_last=False, compile=True),
}


def img_per_s(bf16: bool, channels_last: bool, compile: bool, batch: int = 256, repeats: int = 5) -> float:
    torch.manual_seed(0)
    model = SimpleConvNet(10)
    x = torch.randn(batch, 3, 28, 28)
    y = torch.randint(0, 10, (batch,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), 1e-3, weight_decay=1e-4)
    fwd = torch.compile(model) if compile else model
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step():
        with ctx():
            loss = F.cross_entropy(fwd(x).logits.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    t = time_call(step, repeats=repeats, warmup=3 if compile else 2)
    return batch / t["median"]


def accuracy_check(data_root: Path, epochs: int, rho: float) -> dict:
    from cxrdebias.config import load_config
    from cxrdebias.reproduce import run_biased_mnist

    out = {}
    for precision in ("fp32", "bf16"):
        cfg = load_config(
            REPO / "configs" / "biased_mnist" / "rho0.990.yaml",
            [f"data.root={data_root}", f"data.rho={rho}", f"train.epochs={epochs}", f"train.lr_step={max(1, epochs - 1)}", f"train.precision={precision}", "train.eval_every=100", "train.progress=false"],
        )
        cfg = load_config(None, None, base={**cfg.model_dump(mode="json"), "method": {"name": "vanilla"}})
        t0 = time.perf_counter()
        r = run_biased_mnist(cfg, Path("/tmp/cxrdebias-bench") / f"acc-{precision}", force=True)
        out[precision] = {**{k: r["metrics"][k] for k in ("biased_accuracy", "unbiased_accuracy")}, "time_s": time.perf_counter() - t0}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--accuracy", action="store_true", help="also compare fp32 vs bf16 accuracy (≈10 min)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rho", type=float, default=0.5, help="correlation of the accuracy check (shape must be learnable)")
    ap.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data" / "mnist15k")
    args = ap.parse_args()
    speeds = {}
    for name, v in VARIANTS.items():
        if v["bf16"] and not cpu_has_native_bf16():
            continue
        try:
            speeds[name] = img_per_s(**v)
        except Exception as exc:  # torch.compile may be unavailable (no compiler)
            speeds[name] = None
            print(f"{name}: failed ({exc.__class__.__name__}: {exc})")
        print(f"{name}: {speeds[name]}")
    base = speeds["fp32 eager"]
    md = [
        "## SimpleConvNet CPU training speed (issue 2)",
        "",
        f"Batch 256, 28×28 RGB, Adam step, median of 5 steps. CPU native bf16: {cpu_has_native_bf16()}.",
        "",
        "| variant | img/s | vs fp32 eager |",
        "|---|---|---|",
    ]
    for name, s in speeds.items():
        md.append(f"| {name} | {s:.0f} | {s / base:.2f}× |" if s else f"| {name} | failed | – |")
    data = {"img_per_s": speeds}
    if args.accuracy:
        acc = accuracy_check(args.data_root, args.epochs, args.rho)
        data["accuracy"] = acc
        md += [
            "",
            f"Accuracy check: vanilla, Biased MNIST ρ={args.rho}, MNIST-15k, {args.epochs} epochs, seed 42, same data and init:",
            "",
            "| precision | biased acc | unbiased acc | wall time (s) |",
            "|---|---|---|---|",
        ]
        for p, v in acc.items():
            md.append(f"| {p} | {v['biased_accuracy']:.4f} | {v['unbiased_accuracy']:.4f} | {v['time_s']:.0f} |")
    write_section("bench_train_speed", "\n".join(md), data)
    print("\n".join(md))


if __name__ == "__main__":
    main()
