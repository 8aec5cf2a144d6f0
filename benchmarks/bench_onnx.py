"""Inference throughput of the exported DenseNet-121 (1-channel CXR): onnxruntime vs torch eager,
at the default image size (64) and at 224, batch 1 and 16 (issue 6: docs/benchmarks.md).

Columns: torch eager forward of the plain model (logits only), torch eager of the same
computation as the exported graph (:class:`cxrdebias.deploy.explain.GradCAMModel`: probabilities +
in-graph Grad-CAM), and onnxruntime (CPU provider) running the exported graph (probabilities +
Grad-CAM). The speed-up is onnxruntime over the plain eager forward, so the CAM is extra work
on the onnxruntime side only. Random weights (throughput does not depend on them); EnD model
(Tanh + L2-normalised bottleneck, the CXR default).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks._common import section_markdown, time_call, write_section
from cxrdebias.data.preprocess import PreprocessSpec
from cxrdebias.deploy.explain import GradCAMModel
from cxrdebias.deploy.export import to_onnx_bytes
from cxrdebias.models.densenet import DenseNet121


def measure(size: int, batches: list[int], repeats: int, threads: int) -> dict[str, dict[str, float]]:
    import onnxruntime as ort

    torch.manual_seed(0)
    model = DenseNet121(2, last_activation="tanh", normalize_features=True).eval()
    cam_model = GradCAMModel(model).eval()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(to_onnx_bytes(model, PreprocessSpec(image_size=size)), options, providers=["CPUExecutionProvider"])
    out: dict[str, dict[str, float]] = {}
    for batch in batches:
        x = torch.randn(batch, 1, size, size, generator=torch.Generator().manual_seed(batch))
        feed = {"image": x.numpy()}

        def eager(net=model, x=x):
            with torch.inference_mode():
                net(x)

        res = {
            "torch_eager_img_per_s": batch / time_call(eager, repeats=repeats, warmup=1)["median"],
            "torch_eager_cam_img_per_s": batch / time_call(lambda x=x: eager(cam_model, x), repeats=repeats, warmup=1)["median"],
            "onnxruntime_img_per_s": batch / time_call(lambda f=feed: session.run(None, f), repeats=repeats, warmup=1)["median"],
        }
        res["speedup"] = res["onnxruntime_img_per_s"] / res["torch_eager_img_per_s"]
        out[str(batch)] = res
        print(f"{size}px batch {batch}: {res}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[os.cpu_count() or 1], help="CPU threads for both torch and onnxruntime (one run per value)")
    ap.add_argument("--note", default="", help="a sentence added to the section (e.g. that the CPU was shared)")
    args = ap.parse_args()
    import onnxruntime as ort

    before = torch.get_num_threads()
    rows, data = [], {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for size in args.sizes:
            res = measure(size, args.batches, args.repeats, threads)
            data[f"{threads}t-{size}"] = res
            for batch, r in res.items():
                rows.append(
                    f"| {threads} | {size}² | {batch} | {r['torch_eager_img_per_s']:.1f} | {r['torch_eager_cam_img_per_s']:.1f} | "
                    f"{r['onnxruntime_img_per_s']:.1f} | {r['speedup']:.2f}× |"
                )
    torch.set_num_threads(before)
    md = section_markdown(
        "Exported model inference: onnxruntime vs torch eager (issue 6)",
        "DenseNet-121 (1 channel, EnD head), fp32 on the CPU, images per second (median of "
        f"{args.repeats} calls after one warm-up). *eager*: `model(x)` (logits only) under `torch.inference_mode()`; "
        "*eager + CAM*: the same computation as the exported graph (`GradCAMModel`: probabilities and Grad-CAM); "
        f"*onnxruntime*: the exported graph (probabilities and Grad-CAM), onnxruntime {ort.__version__}, CPU provider. "
        "Speed-up = onnxruntime / eager (the CAM is extra work for onnxruntime only).",
        [
            "| threads | image size | batch | eager img/s | eager + CAM img/s | onnxruntime img/s | speed-up |",
            "|---:|---|---:|---:|---:|---:|---:|",
            *rows,
        ],
        note=args.note,
    )
    write_section("bench_onnx", md, {"repeats": args.repeats, "note": args.note, "onnxruntime": ort.__version__, "img_per_s": data})
    print(md)


if __name__ == "__main__":
    main()
