"""DenseNet-121 (1-channel CXR) training throughput on this machine: vanilla vs EnD, at the
default image size and at 224, fp32 vs bf16 autocast (issue 3: docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks._common import section_markdown, time_call, write_section
from cxrdebias.debias import build_method
from cxrdebias.models.densenet import DenseNet121
from cxrdebias.training.device import cpu_has_native_bf16, make_autocast


def img_per_s(size: int, method: str, precision: str, batch: int, repeats: int) -> float:
    torch.manual_seed(0)
    model = DenseNet121(2, last_activation="tanh" if method == "end" else "relu")
    m = build_method(method, {"alpha": 1.0, "beta": 1.0} if method == "end" else {})
    opt = torch.optim.Adam(model.parameters(), 1e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    data = {
        "image": torch.randn(batch, 1, size, size, generator=g),
        "target": torch.randint(0, 2, (batch,), generator=g),
        "bias": torch.randint(0, 2, (batch,), generator=g),
        "index": torch.arange(batch),
    }
    autocast = make_autocast(precision, torch.device("cpu"))
    t = time_call(lambda: m.update(model, data, opt, autocast), repeats=repeats, warmup=1)
    return batch / t["median"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 224])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    precisions = ["fp32", "bf16"] if cpu_has_native_bf16() else ["fp32"]
    rows, data = [], {}
    for size in args.sizes:
        for precision in precisions:
            v = img_per_s(size, "vanilla", precision, args.batch, args.repeats)
            e = img_per_s(size, "end", precision, args.batch, args.repeats)
            data[f"{size}-{precision}"] = {"vanilla": v, "end": e}
            rows.append(f"| {size}² | {precision} | {v:.1f} | {e:.1f} | {v / e:.3f}× |")
            print(rows[-1], flush=True)
    md = section_markdown(
        "DenseNet-121 CXR training throughput (issue 3)",
        f"One training step (forward, backward, Adam) on a batch of {args.batch} one-channel images, median of "
        f"{args.repeats}; EnD with α = β = 1 and the site (2 values) as the bias.",
        [
            "| image size | precision | vanilla img/s | EnD img/s | EnD step / vanilla step |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    write_section("bench_densenet", md, {"batch": args.batch, "img_per_s": data})
    print(md)


if __name__ == "__main__":
    main()
