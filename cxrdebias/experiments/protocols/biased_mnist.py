"""Biased MNIST (Bahng et al., ICML 2020) — ``cxrdebias reproduce biased-mnist``.

Train at colour–digit correlation ρ; validation = a ρ=0.1 re-colouring of 30% of the training
digits; tests: biased (ρ=1) and unbiased (ρ=0.1) colourings of the MNIST test digits
(:mod:`cxrdebias.data.biased_mnist`). Reports the biased/unbiased test accuracy of the last (or
best-validation) epoch. With ``data.bias_kind: patch`` the bias label is a small patch instead
of the background colour (the local-shortcut variant; run tag ``…-patch``).
"""

from __future__ import annotations

from typing import Any

from cxrdebias.data.biased_mnist import NUM_CLASSES, BiasedMNISTConfig, build_biased_mnist
from cxrdebias.experiments.protocols.accuracy import accuracy_protocol
from cxrdebias.experiments.registry import Protocol, protocol

EVAL_BATCH = 1000


def _run_tag(cfg: Any) -> str:
    return f"biased-mnist-rho{cfg.data.rho}" + ("-patch" if cfg.data.bias_kind == "patch" else "")


@protocol("biased_mnist", BiasedMNISTConfig, run_tag=_run_tag, command="cxrdebias reproduce biased-mnist")
def build(cfg: Any, method: Any = None, run: Any = None, console: Any = None) -> Protocol:
    data = build_biased_mnist(cfg.data, cfg.seed)
    patch = cfg.data.bias_kind == "patch"

    def summarise(tests: dict[str, dict[str, Any]], last: dict[str, Any]) -> dict[str, Any]:
        return {
            "biased_accuracy": tests["biased"]["accuracy"],
            "unbiased_accuracy": tests["unbiased"]["accuracy"],
            "unbiased_group_mean_accuracy": tests["unbiased"]["group_mean_accuracy"],
            "unbiased_conflicting_accuracy": tests["unbiased"]["conflicting_accuracy"],
            "val_accuracy": (last.get("val") or {}).get("accuracy"),
            "train_accuracy": last["train"].get("accuracy"),
        }

    return accuracy_protocol(
        cfg,
        experiment="biased_mnist",
        title=f"[bold]Biased MNIST[/] ρ={cfg.data.rho}" + (f" (patch by {cfg.data.patch_by})" if patch else ""),
        train=data.train,
        val=data.val,
        tests={"biased": data.test_biased, "unbiased": data.test_unbiased},
        num_classes=NUM_CLASSES,
        num_biases=NUM_CLASSES,
        eval_batch_size=EVAL_BATCH,
        data_info=lambda: {"source_files": data.source_files, "source_sha256": data.source_sha256, "dataset_sha256": data.data_hash()},
        val_metrics=("accuracy", "conflicting_accuracy"),
        summarise=summarise,
        headline=("biased_accuracy", "unbiased_accuracy"),
        params={"rho": cfg.data.rho, **({"bias_kind": "patch", "patch_by": cfg.data.patch_by} if patch else {})},
    )

