import pytest

from cxrdebias.errors import ConfigError
from cxrdebias.experiments.config import load_config
from tests.conftest import REPO


def test_shipped_configs_are_valid():
    import yaml

    from cxrdebias.experiments.benchmark import load_spec

    # configs/sweeps/ holds sweep grids, not training configs (tests/test_sweep.py checks them)
    paths = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "sweeps" not in p.relative_to(REPO / "configs").parts)
    assert paths
    specs = [p for p in paths if "recipes" in (yaml.safe_load(p.read_text()) or {})]
    assert {p.name for p in specs} >= {"benchmark.yaml", "benchmark-tuning.yaml"}
    for p in paths:
        if p in specs:  # a `cxrdebias benchmark` spec, and the training config it names
            load_config(load_spec(p).config_path())
        else:
            load_config(p)


def test_overrides_parse_yaml_values():
    cfg = load_config(None, ["train.epochs=3", "train.lr=5e-4", "method.name=end", "method.alpha=0.5", "train.lr_step=null"])
    assert cfg.train.epochs == 3 and cfg.train.lr == 5e-4 and cfg.train.lr_step is None
    assert cfg.method.options() == {"alpha": 0.5}


@pytest.mark.parametrize("bad,field", [("train.epochs=-1", "train.epochs"), ("data.rhoo=1", "data.rhoo"), ("nokey", "KEY=VALUE")])
def test_bad_overrides_name_the_field(bad, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [bad])


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_resume_check_ignores_options_added_later():
    from cxrdebias.errors import CheckpointError
    from cxrdebias.experiments.config import check_resumable

    cfg = load_config(None, ["train.epochs=3"])
    saved = cfg.model_dump(mode="json")
    del saved["train"]["class_balance"]  # a run started before this option existed
    check_resumable(saved, cfg, "run")
    with pytest.raises(CheckpointError, match="train.epochs"):
        check_resumable(saved, load_config(None, ["train.epochs=4"]), "run")
