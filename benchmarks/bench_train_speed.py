"""CPU training speed of SimpleConvNet (batch 256, 28×28 RGB): what helps on this machine.

Variants: plain fp32 eager (the baseline), channels_last, bf16 autocast, both, torch.compile
of the fp32 / bf16 models, and glibc malloc keeping freed memory (``cxrdebias.training.allocator``,
what the trainer does on the CPU by default). Each variant runs in its own process, because
the allocator setting holds for the whole process. bf16 variants run only on CPUs with native
bf16 (elsewhere autocast is emulated and many times slower). The section is written per CPU
kind: ``bench_train_speed`` on CPUs with native bf16, ``bench_train_speed_no_bf16`` on the
others, so one machine's numbers do not replace the other's.

``--accuracy`` also trains the same short Biased-MNIST run in fp32 and in bf16 and compares
test accuracies, because a faster precision is only kept if it does not lose accuracy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks._common import REPO, time_call, write_section
from cxrdebias.models import SimpleConvNet
from cxrdebias.training.device import cpu_has_native_bf16

_PLAIN = dict(bf16=False, channels_last=False, compile=False, keep_memory=False)
VARIANTS = {
    "fp32 eager": _PLAIN,
    "fp32 channels_last": {**_PLAIN, "channels_last": True},
    "fp32 + kept malloc memory": {**_PLAIN, "keep_memory": True},
    "bf16 autocast": {**_PLAIN, "bf16": True},
    "bf16 autocast + channels_last": {**_PLAIN, "bf16": True, "channels_last": True},
    "bf16 autocast + kept malloc memory": {**_PLAIN, "bf16": True, "keep_memory": True},
    "fp32 torch.compile": {**_PLAIN, "compile": True},
    "fp32 torch.compile + kept malloc memory": {**_PLAIN, "compile": True, "keep_memory": True},
    "bf16 autocast + torch.compile": {**_PLAIN, "bf16": True, "compile": True},
}


def measure(bf16: bool, channels_last: bool, compile: bool, keep_memory: bool, batch: int = 256, repeats: int = 5) -> dict:
    """img/s of one variant, with the system time and minor page faults of the timed steps."""
    if keep_memory:
        from cxrdebias.training import allocator

        if not allocator.keep_freed_memory():
            raise RuntimeError("this C library has no glibc mallopt")
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

    for _ in range(3 if compile else 2):
        step()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t = time_call(step, repeats=repeats, warmup=0)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "img_per_s": batch / t["median"],
        "sys_s_per_step": (r1.ru_stime - r0.ru_stime) / repeats,
        "minor_faults_per_step": (r1.ru_minflt - r0.ru_minflt) / repeats,
        "max_rss_mib": r1.ru_maxrss / 1024,
    }


def measure_in_subprocess(name: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def accuracy_check(data_root: Path, epochs: int, rho: float) -> dict:
    from cxrdebias.experiments.config import load_config
    from cxrdebias.experiments.runner import run_experiment

    out = {}
    for precision in ("fp32", "bf16"):
        cfg = load_config(
            REPO / "configs" / "biased_mnist" / "rho0.990.yaml",
            [f"data.root={data_root}", f"data.rho={rho}", f"train.epochs={epochs}", f"train.lr_step={max(1, epochs - 1)}", f"train.precision={precision}", "train.eval_every=100", "train.progress=false"],
        )
        cfg = load_config(None, None, base={**cfg.model_dump(mode="json"), "method": {"name": "vanilla"}})
        t0 = time.perf_counter()
        r = run_experiment(cfg, Path("/tmp/cxrdebias-bench") / f"acc-{precision}", force=True)
        out[precision] = {**{k: r["metrics"][k] for k in ("biased_accuracy", "unbiased_accuracy")}, "time_s": time.perf_counter() - t0}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--accuracy", action="store_true", help="also compare fp32 vs bf16 accuracy (≈10 min)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rho", type=float, default=0.5, help="correlation of the accuracy check (shape must be learnable)")
    ap.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data" / "mnist15k")
    ap.add_argument("--one", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # internal: one variant, JSON out
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(**VARIANTS[args.one])))
        return
    native = cpu_has_native_bf16()
    found = {}
    for name, v in VARIANTS.items():
        if v["bf16"] and not native:
            continue
        try:
            found[name] = measure_in_subprocess(name)
        except Exception as exc:  # torch.compile may be unavailable (no compiler)
            found[name] = None
            print(f"{name}: failed ({exc.__class__.__name__}: {exc})")
        print(f"{name}: {found[name]}")
    base = found["fp32 eager"]["img_per_s"]
    md = [
        "## SimpleConvNet CPU training speed (issue 2)" + ("" if native else ": CPU without native bf16"),
        "",
        f"Batch 256, 28×28 RGB, Adam step, median of 5 steps, each variant in its own process. CPU native bf16: {native}"
        + ("." if native else " (bf16 autocast is emulated on such CPUs and was not timed; `precision: auto` picks fp32)."),
        "*Kept malloc memory*: glibc keeps freed blocks for reuse (`cxrdebias.training.allocator`, the trainer's CPU default"
        " `train.keep_freed_memory: true`) instead of handing them back and faulting them in again every step.",
        "",
        "| variant | img/s | vs fp32 eager | system time per step (s) | page faults per step | peak RSS (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in found.items():
        md.append(
            f"| {name} | {r['img_per_s']:.1f} | {r['img_per_s'] / base:.2f}× | {r['sys_s_per_step']:.2f} | "
            f"{r['minor_faults_per_step']:,.0f} | {r['max_rss_mib']:,.0f} |"
            if r else f"| {name} | failed | – | – | – | – |"
        )
    data = {"variants": found}
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
    write_section("bench_train_speed" if native else "bench_train_speed_no_bf16", "\n".join(md), data, script="bench_train_speed.py")
    print("\n".join(md))


if __name__ == "__main__":
    main()
