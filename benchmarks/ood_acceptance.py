"""The OOD guard's acceptance (issue 24): how many images the exported models flag as out of
distribution, with Wilson 95% intervals (statsmodels, :func:`cxrdebias.evaluation.proportions.wilson_interval`) — written to docs/results/ood.json and the table of
docs/deployment.md ("Out-of-distribution guard: measured").

Two scenarios, each an exported model (``cxrdebias export``, the guard inside the ONNX graph)
and the run it was exported from:

(a) ``--synthetic-run/--synthetic-model``: trained on the synthetic phantoms (``make release-model``'s
    recipe); flagged share of the real chest X-rays (``--real-data``, every image) — target ≥ 95% —
    and of its own synthetic test split — target ≤ 5%;
(b) ``--real-run/--real-model``: trained on the real two-source set; flagged share of the
    synthetic test images of (a) — target ≥ 95% — and of its own real test split — target ≤ 10%.

With ``SYNTHETIC_RUN/eval/report.json`` (``cxrdebias evaluate``), its per-site calibration table
(ECE and Brier before/after temperature scaling, test split) is copied next to them.

The headline numbers are the deployed ONNX models' (``cxrdebias.deploy.runtime``). For the choice of
the score, every candidate — the Mahalanobis score on the bottleneck and on each probe layer's
pooled output, and the energy score — is also fitted on the same run (training statistics,
99th-percentile threshold on validation; torch features) and scored on the same images.

    python benchmarks/ood_acceptance.py --synthetic-run R1 --synthetic-model M1.onnx \\
        --real-data ../shared/data/cxr-covid-sources/manifest.csv [--real-run R2 --real-model M2.onnx]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks._common import DOCS
from cxrdebias.deploy.artefact import load_model_artefact
from cxrdebias.deploy.export import CHECK_BATCH, validation_images
from cxrdebias.deploy.guard import BOTTLENECK, fit_guard, torch_outputs
from cxrdebias.deploy.runtime import collect_inputs, load_model, prepare
from cxrdebias.evaluation.ood import METHODS
from cxrdebias.evaluation.proportions import wilson_interval
from cxrdebias.training.provenance import code_version
from cxrdebias.training.runs import RunDir

OUT_JSON = DOCS / "results" / "ood.json"
DEPLOYMENT_MD = DOCS / "deployment.md"
START, END = "<!-- ood:start -->", "<!-- ood:end -->"


def share(flags: np.ndarray) -> dict[str, Any]:
    k, n = int(flags.sum()), int(flags.size)
    return {"flagged": k, "n": n, "share": k / n, "wilson95": wilson_interval(k, n)}


def run_images(run: Path, split: str) -> list:
    images, why = validation_images(run, RunDir(run).read_config_located(), split=split)
    if images is None:
        raise SystemExit(f"{run}: {why}")
    return images


def batches(images: list, spec):
    for start in range(0, len(images), CHECK_BATCH):
        yield prepare(images[start : start + CHECK_BATCH], spec)[0]


def scenario(run: Path, model_path: Path, own: list, other: list, other_name: str, targets: dict[str, float]) -> dict[str, Any]:
    model = load_model(model_path, device="cpu")
    if not model.has_ood:
        raise SystemExit(f"{model_path}: exported without the OOD guard; export it again with this cxrdebias")
    res: dict[str, Any] = {
        "run": str(run),
        "model": str(model_path),
        "model_version": model.metadata.model_version,
        "ood_method": model.metadata.ood_method,
        "ood_features": model.metadata.raw["export"]["guard"].get("layer"),
        "ood_threshold": model.metadata.ood_threshold,
        "temperature": model.metadata.temperature,
        "training_sites": list(model.metadata.training_sites or ()),
        "targets": targets,
    }
    for key, images in (("own_test", own), (other_name, other)):
        pred = model.predict(images, batch_size=CHECK_BATCH)
        assert pred.in_distribution is not None
        res[key] = share(~pred.in_distribution)
    res["met"] = {
        "own_test": res["own_test"]["share"] <= targets["own_test_max"],
        other_name: res[other_name]["share"] >= targets["other_min"],
    }
    # the candidate scores, fitted on the same run (torch features; the ONNX graph computes the chosen one)
    torch_model, art = load_model_artefact(run)
    from cxrdebias.data.preprocess import PreprocessSpec

    spec = PreprocessSpec.model_validate(art["preprocess"])

    def outputs(images: list) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        logits, feats = torch_outputs(torch_model, batches(images, spec))
        labels = np.array([int(x.fields.get("label") or 0) for x in images])
        return logits, feats, labels

    train, val = outputs(run_images(run, "train")), outputs(run_images(run, "val"))
    own_out, other_out = outputs(own), outputs(other)
    res["candidates"] = {}
    candidates = [("mahalanobis", layer) for layer in train[1]] + [(m, BOTTLENECK) for m in METHODS if m != "mahalanobis"]
    for method, layer in candidates:
        guard = fit_guard(train, val, method=method, layer=layer)
        name = f"{method} ({layer})" if method == "mahalanobis" else method
        res["candidates"][name] = {
            "threshold": guard.threshold,
            "own_test": share(guard.reference_scores(own_out[0], own_out[1]) > guard.threshold),
            other_name: share(guard.reference_scores(other_out[0], other_out[1]) > guard.threshold),
        }
    print(json.dumps({k: v for k, v in res.items() if k != "candidates"}, indent=1), flush=True)
    return res


def pct(entry: dict[str, Any]) -> str:
    lo, hi = entry["wilson95"]
    return f"{entry['flagged']}/{entry['n']} = {entry['share']:.1%} [{lo:.1%}, {hi:.1%}]"


def table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| model | images | n | flagged (Wilson 95% CI) | target | met |",
        "|---|---|---:|---|---|---|",
    ]
    names = {"real_cxr": "real CXRs (cxr-covid-sources, all)", "synthetic_test": "synthetic test split of (a)"}
    for key, title in (("synthetic", "(a) synthetic-trained"), ("real", "(b) real-trained")):
        r = results.get(key)
        if r is None:
            lines.append(f"| {title} | — | — | not measured | | |")
            continue
        other = "real_cxr" if key == "synthetic" else "synthetic_test"
        t = r["targets"]
        lines.append(f"| {title} | own test split | {r['own_test']['n']} | {pct(r['own_test'])} | ≤ {t['own_test_max']:.0%} | "
                     f"{'yes' if r['met']['own_test'] else 'no'} |")
        lines.append(f"| {title} | {names[other]} | {r[other]['n']} | {pct(r[other])} | ≥ {t['other_min']:.0%} | "
                     f"{'yes' if r['met'][other] else 'no'} |")
    lines += ["", "Candidate scores fitted on the same runs (training statistics, 99th-percentile validation threshold):", "",
              "| model | score | own test flagged | other set flagged |", "|---|---|---|---|"]
    for key, title in (("synthetic", "(a)"), ("real", "(b)")):
        r = results.get(key)
        if r is None:
            continue
        other = "real_cxr" if key == "synthetic" else "synthetic_test"
        for method, c in r["candidates"].items():
            lines.append(f"| {title} | {method} | {pct(c['own_test'])} | {pct(c[other])} |")
    return lines


def calibration_table(results: dict[str, Any]) -> list[str]:
    """Per-site ECE / Brier before and after temperature scaling of run (a) on its test split
    (from its ``cxrdebias evaluate`` report, when there is one)."""
    cal = results.get("synthetic_calibration")
    if not cal or "by_site" not in cal:
        return []
    from cxrdebias.evaluation.calibration import calibration_markdown

    lines = calibration_markdown(cal)
    lines[0] = f"Calibration of (a) on its synthetic test split (`cxrdebias evaluate`; T = {cal['temperature']:.3f}, {cal['fitted_on']}):"
    return ["", *lines[:-1], "", lines[-1].removeprefix("- ")]


def write_docs(results: dict[str, Any]) -> None:
    cv = results["code_version"]
    stamp = (f"_Written by `python benchmarks/ood_acceptance.py` on {results['measured'][:10]} (cxrdebias {cv.get('package')}, "
             f"commit {(cv.get('git_commit') or 'none')[:12]}{', local changes' if cv.get('git_dirty') else ''}); "
             "raw numbers: `docs/results/ood.json`._")
    block = "\n".join([START, *table(results), *calibration_table(results), "", stamp, END])
    text = DEPLOYMENT_MD.read_text()
    if START in text:
        text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DEPLOYMENT_MD.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--synthetic-run", type=Path, required=True)
    ap.add_argument("--synthetic-model", type=Path, required=True)
    ap.add_argument("--real-data", type=Path, required=True, help="manifest of the real CXRs (every image is scored)")
    ap.add_argument("--real-run", type=Path)
    ap.add_argument("--real-model", type=Path)
    ap.add_argument("--out", type=Path, default=OUT_JSON)
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite the table in docs/deployment.md")
    args = ap.parse_args()
    real_all = collect_inputs([args.real_data])
    synthetic_test = run_images(args.synthetic_run, "test")
    results: dict[str, Any] = {"measured": datetime.now(timezone.utc).isoformat(timespec="seconds"), "code_version": code_version()}
    report = args.synthetic_run / "eval" / "report.json"
    if report.is_file():
        results["synthetic_calibration"] = json.loads(report.read_text()).get("calibration")
    results["synthetic"] = scenario(args.synthetic_run, args.synthetic_model, synthetic_test, real_all, "real_cxr",
                                    {"other_min": 0.95, "own_test_max": 0.05})
    if args.real_run and args.real_model:
        results["real"] = scenario(args.real_run, args.real_model, run_images(args.real_run, "test"), synthetic_test, "synthetic_test",
                                   {"other_min": 0.95, "own_test_max": 0.10})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    if not args.no_docs:
        write_docs(results)
    print("\n".join([*table(results), *calibration_table(results)]))


if __name__ == "__main__":
    main()
