"""The README's main job, shrunk: synth → vanilla and EnD → per-site evaluation → compare."""

from cxrdebias.data.synthetic import SynthConfig
from cxrdebias.experiments.demo import run_demo


def test_demo_pipeline_end_to_end(tmp_path):
    synth = SynthConfig(image_size=64, n_train_patients_per_site=12, n_val_patients_per_site=6, n_test_patients_per_site=6)
    fast = ["train.epochs=1", "train.progress=false", "data.preprocess.image_size=32", "model.hidden_dim=16"]
    res = run_demo(tmp_path / "demo", overrides=fast, synth=synth, n_boot=50)
    assert set(res["runs"]) == {"vanilla", "end"}
    for method, run in res["runs"].items():
        rep = res["reports"][method]
        assert set(rep["by_group"]) == {"hospital_a", "hospital_b"}
        assert (run / "eval" / "report.png").is_file()
        # the test split of the synthetic set is balanced within each site
        for site in rep["by_group"].values():
            assert site["prevalence"] == 0.5
    assert "hospital_a" in res["table"] and "EnD" in res["table"]
    assert (tmp_path / "demo" / "summary.md").read_text().startswith("# cxrdebias demo")
