"""The README's main job, shrunk: synth → vanilla, reference and the default recipe → gap closed, probe, paired CIs."""

from cxrdebias.data.synthetic import SynthConfig
from cxrdebias.experiments.benchmark import load_spec
from cxrdebias.experiments.demo import run_demo


def test_demo_pipeline_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[1])  # subprocesses import this checkout
    synth = SynthConfig(image_size=64, n_train_patients_per_site=12, n_val_patients_per_site=6, n_test_patients_per_site=6, external_sites=1)
    fast = ["train.epochs=1", "data.preprocess.image_size=32", "model.hidden_dim=16"]
    res = run_demo(tmp_path / "demo", overrides=fast, synth=synth, n_boot=50)
    default = load_spec().default
    assert set(res["runs"]) == {"vanilla", "reference", default}
    for run in res["runs"].values():
        assert (run / "eval" / "report.png").is_file()
    summary = res["table"]["summary"]["recipes"]
    assert summary[default]["n_cells"] == 1 and "gap_closed" in summary[default]
    assert "worst_site_ba" in summary[default]["gap_closed"]
    text = (tmp_path / "demo" / "summary.md").read_text()
    assert text.startswith("# cxrdebias demo")
    assert "gap closed" in text and "Site probe per layer" in text and "Paired differences" in text
    assert "external_1" in text  # the external hospital is evaluated


def test_demo_spec_records_the_generator_options_as_before(tmp_path, monkeypatch):
    """The demo's spec.json lists the generator options as it always did (the cue options only
    when a cue is drawn), so a demo folder written before they existed can be rerun."""
    from cxrdebias.experiments import demo

    seen = {}

    def stop(spec, out, **kwargs):
        seen["synth"] = spec.data.synth
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_benchmark", stop)
    for synth, cue_keys in ((SynthConfig(external_sites=1), False), (SynthConfig(cue="tube", bias_strength=0.0), True)):
        try:
            run_demo(tmp_path / "demo", synth=synth)
        except KeyboardInterrupt:
            pass
        assert ("cue" in seen["synth"]) == cue_keys
        assert "external_sites" in seen["synth"] and "seed" not in seen["synth"]
        assert SynthConfig(**seen["synth"]) == synth
