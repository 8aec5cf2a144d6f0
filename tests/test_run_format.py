"""The run folder and results files keep their format across the restructuring.

The key lists below are those of runs written before the package moved into sub-packages
(cxrdebias 0.1.0 at commit 65c945c): readers of ``results.json`` (the paper tables, the
benchmark scripts, users' notebooks) and of ``model.pt`` (evaluate, export, analyze-bias) depend
on them. ``model.pt`` holds tensors and plain data only (they load with
``weights_only=True``), so moving a module cannot make an old file unreadable; the committed
results JSONs of docs/results/ were written by the old code and are compared key by key with a
new run's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from cxrdebias.data.synthetic import SynthConfig
from cxrdebias.experiments.config import load_config
from cxrdebias.experiments.evaluate import evaluate_run
from cxrdebias.experiments.runner import run_experiment
from tests.conftest import tiny_synthetic_cxr_run

REPO = Path(__file__).resolve().parents[1]

CXR_RESULTS_KEYS = [
    "experiment", "name", "method", "bias", "seed", "epochs_trained", "selected_epoch", "selection",
    "stopped_early", "threshold", "val_metrics", "train", "config", "data", "code_version", "environment", "finished",
]
CXR_TRAIN_KEYS = [
    "precision", "device", "time_s", "time_s_this_invocation", "image_load_time_s", "sampling", "img_per_s_last_epoch",
    "resumed_from_epoch", "world_size",
]  # "sampling" (the cells and class weights of train.sampling=group_balanced): the CXR configs' default since issue 21
MODEL_FILE_KEYS = [
    "format", "arch", "model_config", "feature_activation", "num_classes", "class_names", "in_channels",
    "state_dict", "preprocess", "threshold", "threshold_method", "site_to_index", "site_source", "bias", "method",
    "selected_epoch", "selection", "val_metrics", "data_hash", "code_version", "created",
]
#: ``eval/report.json`` → ``site_probe`` (issue 21 item 3): the bottleneck probe's keys of before, then
#: ``layers`` (one entry per probe layer of the model and the bottleneck, earliest first)
SITE_PROBE_KEYS = ["probe", "seed", "by_class", "mean_auroc", "layers"]
SITE_PROBE_CLASS_KEYS = ["auroc", "n_val", "n_test", "sites", "n_test_by_site"]
SITE_PROBE_LAYER_KEYS = ["module", "dim", "mean_auroc", "by_class"]
RUN_FILES = {"config.yaml", "run.json", "metrics.jsonl", "results.json", "model.pt", "splits.csv", "checkpoints"}


@pytest.fixture(scope="module")
def cxr_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("format")
    synth = SynthConfig(seed=3, image_size=48, n_train_patients_per_site=6, n_val_patients_per_site=4, n_test_patients_per_site=4)
    return tiny_synthetic_cxr_run(root, synth)


def test_a_cxr_run_writes_the_files_and_keys_of_before(cxr_run):
    # plus the hidden files of issue 22 (the folder's marker and write lock), which readers of the files above ignore
    assert {p.name for p in cxr_run.iterdir()} == RUN_FILES | {".cxrdebias-run", ".cxrdebias.lock"}
    results = json.loads((cxr_run / "results.json").read_text())
    assert list(results) == CXR_RESULTS_KEYS
    assert list(results["train"]) == CXR_TRAIN_KEYS
    assert results["experiment"] == "cxr" and results["data"] == json.loads((cxr_run / "run.json").read_text())["data"]
    assert list(pd.read_csv(cxr_run / "splits.csv").columns) == ["path", "patient_id", "site", "label", "split"]


def test_the_model_file_holds_plain_data_with_the_keys_of_before(cxr_run):
    model = torch.load(cxr_run / "model.pt", weights_only=True)  # no pickled class: module moves cannot break it
    assert list(model) == MODEL_FILE_KEYS and model["format"] == 1


def test_the_evaluation_report_holds_the_site_probe_keys_of_before_and_its_layers(cxr_run, tmp_path):
    evaluate_run(cxr_run, out=tmp_path / "ev", n_boot=0)
    probe = json.loads((tmp_path / "ev" / "report.json").read_text())["site_probe"]
    assert list(probe) == SITE_PROBE_KEYS
    assert all(list(e)[: len(SITE_PROBE_CLASS_KEYS)] == SITE_PROBE_CLASS_KEYS for e in probe["by_class"].values())
    assert list(probe["layers"]) == ["block1", "block2", "block3", "block4", "bottleneck"]  # DenseNet-121
    assert all(list(e) == SITE_PROBE_LAYER_KEYS for e in probe["layers"].values())


def test_a_reproduction_writes_the_keys_of_the_committed_results(fake_mnist, tmp_path):
    committed = sorted((REPO / "docs" / "results" / "biased_mnist").glob("*.json"))
    if not committed:
        pytest.skip("no committed Biased MNIST results JSON in docs/results/biased_mnist")
    old = json.loads(committed[0].read_text())
    cfg = load_config(
        None,
        [
            f"data.root={fake_mnist}", "data.rho=0.99", "train.epochs=1", "train.batch_size=64", "train.progress=false",
            "train.num_threads=1", "model.kernel_size=3",
        ],
    )
    new = run_experiment(cfg, tmp_path / "run")
    assert list(new) == list(old)
    assert list(new["train"]) == list(old["train"])
    assert list(new["metrics"]) == list(old["metrics"]) and list(new["tests"]) == list(old["tests"])
