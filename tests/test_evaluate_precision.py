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


def test_an_equalized_run_exports_and_predicts_what_evaluate_scored(tmp_path):
    """``data.preprocess.equalize=true`` travels with the model: the run's spec, the ONNX metadata
    (the model card says so) and onnxruntime's preprocessing; the deployed probabilities are
    evaluate's, at the graph's temperature."""
    from cxrdebias.deploy.export import export_run
    from cxrdebias.deploy.runtime import collect_inputs, load_model, prepare

    synth = SynthConfig(seed=6, image_size=48, n_train_patients_per_site=6, n_val_patients_per_site=8, n_test_patients_per_site=4)
    with single_torch_thread():
        run = tiny_synthetic_cxr_run(tmp_path, synth, "data.preprocess.equalize=true")
        evaluate_run(run, n_boot=0)
        exported = export_run(run, tmp_path / "model.onnx", n_cam_images=2)
    _, art = load_model_artefact(run)
    assert art["preprocess"]["equalize"] is True
    deployed = load_model(exported.model, device="cpu")
    assert deployed.metadata.preprocessing.equalize is True
    assert "histogram-equalised" in exported.monai_metadata.read_text()
    scored = pd.read_csv(run / "eval" / "predictions.csv")
    paths = [run.parent / "data" / p for p in scored["path"]]  # relative to the manifest (an absolute path stays as it is)
    batch, _ = prepare(collect_inputs(paths), deployed.metadata.preprocessing)
    probabilities = deployed.run_all(batch)[0][:, 1]
    s = scored["probability"].to_numpy(np.float64)
    at_t = 1.0 / (1.0 + np.exp(-np.log(s / (1.0 - s)) / deployed.metadata.temperature))
    np.testing.assert_allclose(probabilities, at_t, atol=1e-4)
