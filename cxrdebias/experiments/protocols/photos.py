"""The photo reproductions: CelebA (Nam et al. protocol) and IMDB Face (Kim et al. splits).

- ``cxrdebias reproduce celeba``: BlondHair or HeavyMakeup with Male as the bias; unbiased
  (group-averaged) and bias-conflicting accuracy on the balanced *valid* partition
  (:mod:`cxrdebias.data.celeba`);
- ``cxrdebias reproduce imdb-face``: gender (bias age) or age (bias gender), trained on EB1 or
  EB2; accuracy on the test split and on the other extreme-bias split
  (:mod:`cxrdebias.data.imdb_face`).

Photos are streamed from disk and evaluated in training-size batches.
"""

from __future__ import annotations

from typing import Any

from cxrdebias.data.celeba import CelebAConfig, build_celeba
from cxrdebias.data.imdb_face import IMDBFaceConfig, build_imdb_face
from cxrdebias.data.photos import PhotoSplits
from cxrdebias.experiments.protocols.accuracy import accuracy_protocol
from cxrdebias.experiments.registry import Protocol, protocol


def _photo_protocol(cfg: Any, splits: PhotoSplits, **fields: Any) -> Protocol:
    def data_info() -> dict[str, Any]:
        return {
            "source_files": splits.source_files,
            "source_sha256": splits.source_sha256,
            "dataset_sha256": splits.data_hash(),
            "splits": splits.summary(),
            **splits.info,
        }

    return accuracy_protocol(
        cfg,
        train=splits.train,
        val=splits.val,
        tests=splits.tests,
        num_classes=splits.num_classes,
        num_biases=splits.num_biases,
        eval_batch_size=cfg.train.batch_size,
        data_info=data_info,
        **fields,
    )


@protocol("celeba", CelebAConfig, run_tag=lambda cfg: f"celeba-{cfg.data.target.lower()}", command="cxrdebias reproduce celeba")
def build_celeba_protocol(cfg: Any, method: Any = None, run: Any = None, console: Any = None) -> Protocol:
    splits = build_celeba(cfg.data)

    def summarise(tests: dict[str, dict[str, Any]], last: dict[str, Any]) -> dict[str, Any]:
        unbiased = tests["unbiased"]
        return {
            "unbiased_accuracy": unbiased["group_mean_accuracy"],
            "bias_conflicting_accuracy": unbiased["conflicting_accuracy"],
            "worst_group_accuracy": unbiased["group_min"],
            "val_group_mean_accuracy": (last.get("val") or {}).get("group_mean_accuracy"),
            "train_accuracy": last["train"].get("accuracy"),
        }

    info = splits.info
    return _photo_protocol(
        cfg,
        splits,
        experiment="celeba",
        title=f"[bold]CelebA[/] target={info['target']} bias={info['bias']}",
        val_metrics=("accuracy", "group_mean_accuracy", "conflicting_accuracy"),
        summarise=summarise,
        headline=("unbiased_accuracy", "bias_conflicting_accuracy"),
        params={"target": info["target"], "bias": info["bias"]},
    )


@protocol(
    "imdb_face",
    IMDBFaceConfig,
    run_tag=lambda cfg: f"imdb-face-{cfg.data.target}-{cfg.data.train_split}",
    command="cxrdebias reproduce imdb-face",
)
def build_imdb_face_protocol(cfg: Any, method: Any = None, run: Any = None, console: Any = None) -> Protocol:
    splits = build_imdb_face(cfg.data)
    other = splits.info["other_split"]

    def summarise(tests: dict[str, dict[str, Any]], last: dict[str, Any]) -> dict[str, Any]:
        return {
            "test_accuracy": tests["test"]["accuracy"],
            "other_eb_accuracy": tests[other]["accuracy"],
            "val_accuracy": (last.get("val") or {}).get("accuracy"),
            "train_accuracy": last["train"].get("accuracy"),
        }

    d = cfg.data
    return _photo_protocol(
        cfg,
        splits,
        experiment="imdb_face",
        title=f"[bold]IMDB Face[/] target={d.target} train={d.train_split} (tests: test, {other})",
        val_metrics=("accuracy", "group_mean_accuracy"),
        summarise=summarise,
        headline=("test_accuracy", "other_eb_accuracy"),
        params={"target": d.target, "train_split": d.train_split, "other_split": other},
    )

