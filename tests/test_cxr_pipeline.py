"""End to end on the real two-source CXR set: train → evaluate per institution → compare."""

import json
import sys

import pytest

from cxrdebias.cli import main
from tests.conftest import run_cli as cli


@pytest.fixture(scope="module")
def manifest(cxr_manifest):
    return cxr_manifest


FAST = ["--epochs", "1", "--image-size", "32", "--set", "train.progress=false", "--set", "train.batch_size=32", "--set", "model.hidden_dim=16"]


@pytest.fixture(scope="module")
def trained(manifest, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    runs = {}
    base = tmp_path_factory.mktemp("runs")
    for method in ("vanilla", "end"):
        out = base / method
        mp.setattr(sys, "argv", ["cxrdebias", "train", "--data", str(manifest), "--bias", "site", "--method", method, "--out", str(out), *FAST])
        main()
        mp.setattr(sys, "argv", ["cxrdebias", "evaluate", str(out), "--per-institution", "--n-boot", "100"])
        main()
        runs[method] = out
    mp.undo()
    return runs


def test_train_writes_model_and_provenance(trained):
    run = trained["end"]
    res = json.loads((run / "results.json").read_text())
    assert res["method"]["name"] == "end" and res["bias"] == "site"
    assert 0 < res["threshold"] < 1
    assert set(res["data"]["site_to_index"]) == {"actualmed", "ieee8023"}
    assert len(res["data"]["dataset_sha256"]) == 64 and res["code_version"]["package"]
    assert (run / "model.pt").is_file() and (run / "splits.csv").is_file()
    splits = (run / "splits.csv").read_text()
    assert "test" in splits and "val" in splits


def test_evaluate_per_institution_report(trained):
    ev = trained["vanilla"] / "eval"
    rep = json.loads((ev / "report.json").read_text())
    assert set(rep["by_group"]) == {"actualmed", "ieee8023"}
    for site in rep["by_group"].values():
        for k in ("tpr", "tnr", "balanced_accuracy", "auroc"):
            assert k in site and k in site["ci"]
    assert rep["split"] == "test" and rep["bootstrap"]["unit"] == "patient"
    for f in ("report.csv", "report.md", "report.png", "predictions.csv", "calibration.png"):
        assert (ev / f).stat().st_size > 0


def test_evaluate_reports_calibration_before_and_after_temperature(trained):
    import pandas as pd

    from cxrdebias.evaluation.calibration import brier_score, expected_calibration_error

    ev = trained["vanilla"] / "eval"
    cal = json.loads((ev / "report.json").read_text())["calibration"]
    assert cal["temperature"] > 0 and "10 equal-width bins" in cal["binning"]
    pred = pd.read_csv(ev / "predictions.csv", dtype={"site": str})
    assert set(cal["by_site"]) == set(pred["site"]) and cal["overall"]["n"] == len(pred)
    for site, entry in cal["by_site"].items():  # "before" = the unscaled probabilities evaluate wrote
        rows = pred[pred["site"] == site]
        assert entry["n"] == len(rows)
        assert entry["before"]["ece"] == pytest.approx(expected_calibration_error(rows["label"], rows["probability"]), abs=1e-6)
        assert entry["before"]["brier"] == pytest.approx(brier_score(rows["label"], rows["probability"]), abs=1e-6)
        assert 0 <= entry["after"]["ece"] <= 1 and 0 <= entry["after"]["brier"] <= 1
    md = (ev / "report.md").read_text()
    assert "## Calibration (temperature T = " in md and "ECE before" in md


def test_compare_prints_both_runs(trained, monkeypatch, capsys):
    code, out, _ = cli(["compare", str(trained["vanilla"]), str(trained["end"])], monkeypatch, capsys)
    assert code == 0
    assert "actualmed" in out and "ieee8023" in out and "vanilla" in out and "end" in out


def test_evaluate_refuses_to_overwrite(trained, monkeypatch, capsys):
    code, _, err = cli(["evaluate", str(trained["end"])], monkeypatch, capsys)
    assert code == 2 and "--force" in err


def test_train_refuses_bad_manifest(tmp_path, monkeypatch, capsys):
    m = tmp_path / "m.csv"
    m.write_text("path,label,site,patient_id\nmissing.png,1,a,p1\n")
    code, _, err = cli(["train", "--data", str(m), "--out", str(tmp_path / "run"), *FAST], monkeypatch, capsys)
    assert code == 2 and "row 2" in err and "missing.png" in err
    assert not (tmp_path / "run").exists()


def test_end_without_bias_labels_is_refused(manifest, tmp_path, monkeypatch, capsys):
    code, _, err = cli(["train", "--data", str(manifest), "--bias", "none", "--method", "end", "--out", str(tmp_path / "r"), *FAST], monkeypatch, capsys)
    assert code == 2 and "needs bias labels" in err


def test_export_puts_the_test_report_of_this_very_model_into_the_model_card(trained, tmp_path):
    from cxrdebias.deploy.export import export_run
    from cxrdebias.fileio import sha256_files

    run = trained["end"]
    rep = json.loads((run / "eval" / "report.json").read_text())
    assert rep["model_sha256"] == sha256_files([run / "model.pt"])
    card = export_run(run, tmp_path / "m" / "model.onnx", n_cam_images=4).model_card.read_text()
    test = card[card.index("## Test split (`cxrdebias evaluate`)"):card.index("## How to use")]
    assert "From eval/report.json of this model.pt: split `test`" in test
    for site in ("actualmed", "ieee8023"):  # per-site rows with the bootstrap and Wilson intervals
        row = next(line for line in test.splitlines() if line.startswith(f"| {site} |"))
        assert row.count("[") >= 5
    assert "### Calibration (temperature T = " in test and "ECE before" in test
    assert "\n# " not in test  # the report's headings are demoted under the card's
    how = card[card.index("## How to use"):]
    assert "cxrdebias predict IMAGES_OR_FOLDER_OR_MANIFEST --model model.onnx --out predictions.csv" in how
    assert "cxrdebias view --model model.onnx" in how


def test_the_model_card_leaves_out_a_missing_stale_or_unattributed_test_report(trained, tmp_path):
    import shutil

    from cxrdebias.deploy.export import run_test_report

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained["end"] / "model.pt", run / "model.pt")
    report, why = run_test_report(run)
    assert report is None and why.startswith("no eval/report.json in the run; run `cxrdebias evaluate")
    (run / "eval").mkdir()
    rep = json.loads((trained["end"] / "eval" / "report.json").read_text())
    (run / "eval" / "report.json").write_text(json.dumps(rep))
    assert run_test_report(run)[0] == rep
    with open(run / "model.pt", "ab") as f:  # trained again after the report
        f.write(b"\0")
    report, why = run_test_report(run)
    assert report is None and "is of another model.pt" in why
    (run / "eval" / "report.json").write_text(json.dumps({k: v for k, v in rep.items() if k != "model_sha256"}))
    assert "does not say which model it is of" in run_test_report(run)[1]
    (run / "eval" / "report.json").write_text("{not json")
    assert "cannot read" in run_test_report(run)[1]
