"""The CXR method settings agree: configs/cxr/default.yaml (`cxrdebias train`) and
configs/cxr/synthetic.yaml (the demo, the benchmark) give every method the same options, and
`cxrdebias methods` prints the values the CXR configs set (its per-method lines are the
dataset-independent package defaults, which a CXR run of any other method starts from)."""

from __future__ import annotations

import pytest

from cxrdebias.debias import METHODS, build_method
from cxrdebias.experiments.config import build_config, shipped_method_settings
from tests.conftest import REPO, run_cli

CXR_CONFIGS = (REPO / "configs" / "cxr" / "default.yaml", REPO / "configs" / "cxr" / "synthetic.yaml")


def _options(path, method: str | None = None) -> dict:
    """The method options a `cxrdebias train --config PATH [--method METHOD]` run gets."""
    cfg = build_config(None, default_path=path, method=method)
    built = build_method(cfg.method.name, cfg.method.options(), cfg.unsupervised)
    return {"name": built.name, **built.options.model_dump()}


def test_the_two_cxr_configs_set_the_same_method_options():
    default, synthetic = (_options(path) for path in CXR_CONFIGS)
    assert default == synthetic


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_gets_the_same_options_from_both_cxr_configs(method):
    default, synthetic = (_options(path, method) for path in CXR_CONFIGS)
    assert default == synthetic
    if method != build_config(None, default_path=CXR_CONFIGS[0]).method.name:
        # --method naming another method starts from the package defaults `cxrdebias methods` lists
        assert default == {"name": method, **METHODS[method].Options().model_dump()}


def test_methods_prints_the_cxr_configs_values(monkeypatch, capsys):
    expected = _options(CXR_CONFIGS[0])
    settings = [s for s in shipped_method_settings() if s[0] == "cxr"]
    assert settings == [("cxr", ["default.yaml", "synthetic.yaml"], expected["name"], {k: v for k, v in expected.items() if k != "name"})]
    code, out, _ = run_cli(["methods"], monkeypatch, capsys)
    assert code == 0
    values = ", ".join(f"{k}={v!r}" for k, v in expected.items() if k != "name")
    assert f"cxr (default.yaml, synthetic.yaml): {expected['name']} {values}" in out
    assert "package defaults, the same for every dataset" in out


def test_shipped_settings_group_the_configs_of_a_dataset(tmp_path):
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "a.yaml").write_text("method:\n  name: end\n  alpha: 0.5\n")
    (tmp_path / "toy" / "b.yaml").write_text("method:\n  name: end\n  alpha: 0.5\n  form: partner_mean\n")  # the same, resolved
    (tmp_path / "toy" / "c.yaml").write_text("method:\n  name: end\n  alpha: 2.0\n")
    (tmp_path / "toy" / "d.yaml").write_text("seed: 1\n")  # no method section: vanilla
    (tmp_path / "toy" / "e.yaml").write_text("recipes:\n  vanilla: {method: vanilla}\n")  # a benchmark spec: not a training config
    assert shipped_method_settings(tmp_path) == [
        ("toy", ["a.yaml", "b.yaml"], "end", {"alpha": 0.5, "beta": 0.1, "form": "partner_mean"}),
        ("toy", ["c.yaml"], "end", {"alpha": 2.0, "beta": 0.1, "form": "partner_mean"}),
        ("toy", ["d.yaml"], "vanilla", {}),
    ]
    assert shipped_method_settings(tmp_path / "missing") == []
