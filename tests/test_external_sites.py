"""Unseen hospitals (issue 21, item 1): ``data synth --sites/--prevalence/--external-sites`` writes
test-only sites, splits keep them out of training, and ``evaluate`` scores sites the model was not
trained on as *external* in report.json, report.csv, report.md, the plot and ``compare``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrdebias.data.cxr.splits import make_splits
from cxrdebias.data.synthetic import SynthConfig, synthesize
from cxrdebias.errors import ConfigError
from cxrdebias.evaluation.site_report import site_report
from cxrdebias.experiments.config import load_config
from cxrdebias.experiments.evaluate import compare_runs, evaluate_run
from cxrdebias.experiments.runner import run_experiment
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parents[1]
TINY = {"image_size": 32, "n_train_patients_per_site": 6, "n_val_patients_per_site": 4, "n_test_patients_per_site": 4}


def _manifest(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "manifest.csv", dtype=str, keep_default_na=False)


# -- data synth ------------------------------------------------------------------------------


def test_external_sites_are_test_only_balanced_and_have_their_own_style(tmp_path):
    synthesize(tmp_path, SynthConfig(seed=1, external_sites=2, **TINY))
    m = _manifest(tmp_path)
    ext = m[m["site"].str.startswith("external_")]
    assert sorted(ext["site"].unique()) == ["external_1", "external_2"]
    assert set(ext["split"]) == {"test"}
    for _, rows in ext.groupby("site"):
        assert rows["patient_id"].nunique() == 4
        assert (rows["label"] == "1").sum() == (rows["label"] == "0").sum()  # balanced images
    assert not set(ext["patient_id"]) & set(m.loc[~m.index.isin(ext.index), "patient_id"])
    record = json.loads((tmp_path / "synth_config.json").read_text())
    styles = record["site_styles"]
    assert list(styles) == ["hospital_a", "hospital_b", "external_1", "external_2"]
    assert len({json.dumps(s, sort_keys=True) for s in styles.values()}) == 4  # each site its own style
    assert record["external_sites"] == ["external_1", "external_2"]


def test_adding_external_sites_leaves_the_training_sites_unchanged(tmp_path):
    synthesize(tmp_path / "plain", SynthConfig(seed=2, **TINY))
    synthesize(tmp_path / "ext", SynthConfig(seed=2, external_sites=1, **TINY))
    plain, ext = _manifest(tmp_path / "plain"), _manifest(tmp_path / "ext")
    pd.testing.assert_frame_equal(ext.iloc[: len(plain)].reset_index(drop=True), plain)
    for path in plain["path"]:
        assert (tmp_path / "plain" / path).read_bytes() == (tmp_path / "ext" / path).read_bytes()
    # without external sites the generator's record is the one of before (no new key)
    assert "external_sites" not in json.loads((tmp_path / "plain" / "synth_config.json").read_text())["config"]


def test_data_synth_takes_the_number_of_sites_prevalences_and_external_sites(tmp_path, monkeypatch, capsys):
    args = ["data", "synth", "--out", tmp_path / "d", "--image-size", 32, "--train-patients", 8, "--val-patients", 0,
            "--test-patients", 2, "--sites", 3, "--prevalence", 1, "--prevalence", 0, "--prevalence", 0.5,
            "--external-sites", 1]  # fmt: skip
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    m = _manifest(tmp_path / "d")
    assert sorted(m["site"].unique()) == ["external_1", "hospital_a", "hospital_b", "hospital_c"]
    train = m[m["split"] == "train"].drop_duplicates("patient_id")
    share = train.groupby("site")["label"].apply(lambda s: (s == "1").mean()).to_dict()
    assert share == {"hospital_a": 1.0, "hospital_b": 0.0, "hospital_c": 0.5}
    assert "external_1" in out


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--sites", 3, "--prevalence", 0.5], "--prevalence: given 1 time(s); expected one value per site (3)"),
        (["--sites", 1], "--sites: the number of sites must be between 2 and 26, got 1"),
        (["--external-sites", -1], "external_sites"),
    ],
)
def test_data_synth_refuses_bad_site_options_in_one_line(tmp_path, monkeypatch, capsys, extra, expected):
    code, _, err = run_cli(["data", "synth", "--out", tmp_path / "d", *extra], monkeypatch, capsys)
    assert code != 0 and expected in err and "Traceback" not in err
    assert not (tmp_path / "d" / "manifest.csv").exists()


# -- splits ----------------------------------------------------------------------------------


def test_corda_and_random_splits_keep_a_test_only_site_out_of_training():
    rows = []
    for site, split in (("a", "train"), ("b", "val"), ("x", "test")):
        for p in range(20):
            rows.append({"path": f"{site}{p}.dcm", "patient_id": f"{site}{p}", "site": site, "label": p % 2, "split": split})
    df = pd.DataFrame(rows)
    for protocol in ("corda", "random"):
        out = make_splits(df, protocol)
        assert set(out.loc[out["site"] == "x", "split"]) == {"test"}
        assert {"train", "val", "test"} <= set(out.loc[out["site"] == "a", "split"])
    # every site marked test: nothing to keep out, the protocol splits as before
    everything_test = make_splits(df.assign(split="test"), "corda")
    assert "train" in set(everything_test.loc[everything_test["site"] == "x", "split"])


# -- the report ------------------------------------------------------------------------------


def test_report_site_index_gives_external_sites_free_indices():
    from cxrdebias.experiments.evaluate import report_site_index

    index, external = report_site_index({"hospital_b": 1, "hospital_a": 0}, pd.Series(["z", "hospital_a", "y", "z"]))
    assert external == ["y", "z"]
    assert index == {"hospital_a": 0, "hospital_b": 1, "y": 2, "z": 3}


def test_external_sites_are_marked_and_left_out_of_the_summaries_across_sites():
    rng = np.random.default_rng(0)
    y = np.tile([0, 1], 60)
    sites = np.repeat(["a", "b", "ext"], 40)
    score = np.clip(0.5 * y + 0.5 * rng.random(120), 0, 1)
    score[sites == "ext"] = 1 - score[sites == "ext"]  # the external site is the worst by far
    r = site_report(y, score, sites, threshold=0.5, n_boot=20, external=["ext"])
    assert r["external_sites"] == ["ext"]
    assert r["by_group"]["ext"]["external"] is True and r["by_group"]["a"]["external"] is False
    assert r["worst_site"]["site"] in {"a", "b"}
    ba = {s: r["by_group"][s]["balanced_accuracy"] for s in ("a", "b")}
    assert r["group_min"]["balanced_accuracy"] == min(ba.values())
    assert r["difference"]["balanced_accuracy"] == pytest.approx(max(ba.values()) - min(ba.values()))
    assert r["overall"]["n"] == 120  # the pooled row has every site
    # all sites external (a foreign hospital's manifest): summaries over all of them
    every = site_report(y, score, sites, threshold=0.5, n_boot=0, external=["a", "b", "ext"])
    assert every["worst_site"]["site"] == "ext"


# -- end to end: synth → train → evaluate → compare --------------------------------------------


@pytest.fixture(scope="module")
def external_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("external")
    synthesize(root / "data", SynthConfig(seed=3, external_sites=1, **TINY))
    cfg = load_config(
        REPO / "configs" / "cxr" / "synthetic.yaml",
        [
            f"data.manifest={root / 'data' / 'manifest.csv'}", "data.preprocess.image_size=32", "model.hidden_dim=8",
            "method.name=end", "train.epochs=1", "train.progress=false", "train.num_threads=1",
        ],
    )  # fmt: skip
    run_experiment(cfg, root / "run")
    return root / "run"


def test_a_run_on_data_with_an_external_site_never_trains_on_it(external_run):
    splits = pd.read_csv(external_run / "splits.csv", dtype=str)
    assert set(splits.loc[splits["site"] == "external_1", "split"]) == {"test"}
    results = json.loads((external_run / "results.json").read_text())
    assert results["data"]["site_to_index"] == {"hospital_a": 0, "hospital_b": 1}


def test_evaluate_scores_the_external_site_and_marks_it_everywhere(external_run, tmp_path):
    out = tmp_path / "eval"
    report = evaluate_run(external_run, out=out, n_boot=20)
    assert report["sites"] == ["external_1", "hospital_a", "hospital_b"]
    assert report["external_sites"] == ["external_1"]
    saved = json.loads((out / "report.json").read_text())
    assert saved["external_sites"] == ["external_1"] and saved["by_group"]["external_1"]["external"] is True
    assert saved["by_group"]["external_1"]["n"] > 0
    assert saved["worst_site"]["site"] in {"hospital_a", "hospital_b"}
    md = (out / "report.md").read_text()
    assert "| external_1 (external) |" in md and "| hospital_a |" in md
    assert "external sites (not in training): external_1" in md
    csv = pd.read_csv(out / "report.csv", dtype={"site": str})
    assert dict(zip(csv["site"], csv["external"], strict=True)) == {
        "external_1": 1, "hospital_a": 0, "hospital_b": 0, "overall": 0,
    }  # fmt: skip
    assert (out / "report.png").stat().st_size > 0
    assert "external_1" in set(pd.read_csv(out / "predictions.csv")["site"])


def test_evaluate_data_scores_an_unseen_manifest_with_site_source(external_run, tmp_path, monkeypatch, capsys):
    data = external_run.parent / "data"
    m = _manifest(data)
    ext = m[m["site"] == "external_1"].drop(columns="split").rename(columns={"site": "hospital"})
    ext.insert(2, "site", "ignored")
    ext.to_csv(data / "foreign.csv", index=False)
    # the site column says "ignored"; the DICOM tag names the hospital
    code, out, err = run_cli(
        ["evaluate", external_run, "--data", data / "foreign.csv", "--site-source", "dicom:InstitutionName",
         "--out", tmp_path / "foreign", "--n-boot", 10], monkeypatch, capsys,
    )  # fmt: skip
    assert code == 0, err
    saved = json.loads((tmp_path / "foreign" / "report.json").read_text())
    assert saved["sites"] == ["external_1"] and saved["external_sites"] == ["external_1"]
    assert "external_1 (external)" in out
    code, _, err = run_cli(["evaluate", external_run, "--site-source", "column", "--out", tmp_path / "x"], monkeypatch, capsys)
    assert code != 0 and "--site-source" in err and "Traceback" not in err


def test_evaluate_site_source_without_data_is_refused(external_run, tmp_path):
    with pytest.raises(ConfigError, match="--site-source"):
        evaluate_run(external_run, out=tmp_path / "e", site_source="column")


def test_compare_marks_the_external_site(external_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(external_run, other)
    evaluate_run(external_run, n_boot=10, force=True)
    evaluate_run(other, n_boot=10, force=True)
    table = compare_runs(external_run, other, n_boot=10)
    assert "| external_1 (external) |" in table
    paired = table.split("## Paired differences")[1]
    assert "| external_1 (external) |" in paired
    assert "external sites (not in training): external_1" in table
