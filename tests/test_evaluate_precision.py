"""`evaluate` scores in fp32 whatever precision the run trained in: its probabilities and its
temperature are those of the model as exported (ONNX runs fp32). It used the training precision
(bf16 autocast on CPUs with native bf16), so a released model's card showed two temperatures."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch

from cxrdebias.data.base import TensorBatchLoader
from cxrdebias.data.cxr import CXRDataset, load_manifest, load_splits
from cxrdebias.data.preprocess import PreprocessSpec
from cxrdebias.data.synthetic import SynthConfig
from cxrdebias.deploy.artefact import SPLITS_FILE, load_model_artefact
from cxrdebias.evaluation.calibration import fit_temperature
from cxrdebias.experiments.evaluate import evaluate_run
from cxrdebias.experiments.protocols.cxr import positive_scores
from cxrdebias.training.inference import predict
from tests.conftest import single_torch_thread, tiny_synthetic_cxr_run


def _predictions(run, split, autocast=None):
    model, art = load_model_artefact(run)
    table = load_splits(run / SPLITS_FILE, load_manifest(run.parent / "data" / "manifest.csv"))
    table = table[table["split"] == split]
    ds = CXRDataset(table, PreprocessSpec.model_validate(art["preprocess"]), art["site_to_index"], cache=False, name=split)
    p = predict(model, TensorBatchLoader(ds.to_tensor_samples(), 64), **({"autocast": autocast} if autocast else {}))
    return p, ds.table.iloc[p.indices.numpy()]["path"].to_numpy()


def test_a_bf16_run_is_evaluated_in_fp32(tmp_path):
    synth = SynthConfig(seed=5, image_size=48, n_train_patients_per_site=6, n_val_patients_per_site=10, n_test_patients_per_site=10)
    with single_torch_thread():
        run = tiny_synthetic_cxr_run(tmp_path, synth, "train.precision=bf16")
        assert json.loads((run / "results.json").read_text())["train"]["precision"] == "bf16"
        report = evaluate_run(run, n_boot=0)
        test, paths = _predictions(run, "test")
        val, _ = _predictions(run, "val")
    scored = pd.read_csv(run / "eval" / "predictions.csv").set_index("path")["probability"]
    mine = positive_scores(test)
    assert len(scored) == len(mine) > 0
    # the same float32 probabilities as the model's fp32 forward (bf16 autocast moves them by ~1e-3)
    np.testing.assert_allclose(scored.loc[paths].to_numpy(), mine, rtol=0, atol=2e-7)
    # and the temperature is the one fitted on the fp32 validation logits (the one the export fits)
    expected = fit_temperature(val.logits.double().numpy(), val.targets.numpy())
    assert report["calibration"]["temperature"] == expected
    assert report["inference_precision"] == "fp32"
    # the check can fail: this model's bf16 scores are not its fp32 ones
    bf16, _ = _predictions(run, "test", autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert np.abs(positive_scores(bf16) - mine).max() > 1e-5
