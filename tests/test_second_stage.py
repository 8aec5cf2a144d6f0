"""benchmarks/second_stage.py: the second selection stage of a Table 1 sweep (issue 25)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import second_stage as ss  # noqa: E402
from cxrdebias.experiments.tables import biased_mnist_cell_name  # noqa: E402


def _cell(folder: Path, rho: float, method: str, options: dict, seed: int, val: float, unbiased: float = 0.5, dirty: bool = False) -> str:
    name = biased_mnist_cell_name(rho, method, options, seed)
    folder.mkdir(parents=True, exist_ok=True)
    results = {
        "metrics": {"val_accuracy": val, "unbiased_accuracy": unbiased, "biased_accuracy": 0.9},
        "code_version": {"git_commit": "abc", "git_dirty": dirty},
    }
    (folder / f"{name}.json").write_text(json.dumps(results))
    return name


def test_the_pick_is_adopted_only_when_higher_on_validation_at_every_rho(tmp_path):
    pick = {"lambda_": "0.1"}
    # rho 0.997: pick − centre = +1, +3, +2 points (mean +2); rho 0.990: −1, +2, +2 (mean +1)
    for rho, centre_vals, pick_vals in ((0.997, (0.40, 0.41, 0.42), (0.41, 0.44, 0.44)), (0.990, (0.50, 0.50, 0.50), (0.49, 0.52, 0.52))):
        for seed, c, p in zip((42, 43, 44), centre_vals, pick_vals, strict=True):
            _cell(tmp_path, rho, "lnl", {}, seed, c, unbiased=0.9)  # test numbers that would say otherwise
            _cell(tmp_path, rho, "lnl", pick, seed, p, unbiased=0.1)
    record = ss.decide("lnl", pick, results=tmp_path)
    assert record["decision"] == "adopt" and not record["missing"] and not record["dirty"]
    v = record["rhos"]["0.997"]["val_accuracy"]
    assert v["pick_minus_centre"]["mean"] == pytest.approx(2.0) and v["pick_minus_centre"]["n"] == 3
    # hand-computed interval: differences 1, 3, 2 → sd 1, t(0.975, 2) = 4.3027 → 2 ± 4.3027/√3
    assert v["pick_minus_centre"]["ci"] == pytest.approx([2 - 4.3027 / 3**0.5, 2 + 4.3027 / 3**0.5], abs=1e-3)
    assert record["rhos"]["0.990"]["val_accuracy"]["pick_minus_centre"]["mean"] == pytest.approx(1.0)
    assert record["rhos"]["0.997"]["cells"]["pick"][42] == "rho0.997-lnl-l0.1-grl0.1-s42"
    text = ss.markdown(record)  # by hand: centre 41 ± 4.3027·1/√3, pick (41, 44, 44) 43 ± 4.3027·√3/√3
    assert "**Decision: adopt**" in text and "| 0.997 | 41.00 [38.52, 43.48] | 43.00 [38.70, 47.30] | +2.00 [-0.48, +4.48] |" in text

    # lower at one rho (the mean, not the interval, decides) → the centre stays
    _cell(tmp_path, 0.990, "lnl", pick, 44, 0.44)  # differences −1, +2, −6: mean −1.67
    assert ss.decide("lnl", pick, results=tmp_path)["decision"] == "keep the centre"


def test_a_missing_cell_decides_nothing_and_a_dirty_one_is_named(tmp_path):
    pick = {"grl_scale": "1"}
    for seed in (42, 43, 44):
        _cell(tmp_path, 0.997, "lnl", {}, seed, 0.4)
        _cell(tmp_path, 0.997, "lnl", pick, seed, 0.5, dirty=seed == 43)
    record = ss.decide("lnl", pick, rhos=(0.997, 0.990), results=tmp_path)
    assert record["decision"] == "incomplete" and len(record["missing"]) == 6 and "rho0.990-lnl-l0.01-grl1-s42" in record["missing"]
    assert record["dirty"] == ["rho0.997-lnl-l0.01-grl1-s43"]
    assert "Missing cells:" in ss.markdown(record) and "◇ cells from a dirty tree: rho0.997-lnl-l0.01-grl1-s43" in ss.markdown(record)


def test_bad_points_are_one_line_errors():
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        ss.parse_point(["lambda_"])
    assert ss.parse_point(["method.lambda_=0.1", "grl_scale=1"]) == {"lambda_": "0.1", "grl_scale": "1"}
    with pytest.raises(SystemExit, match="is the centre itself"):
        ss.decide("lnl", {"lambda_": "0.01"}, results=Path("/nonexistent"))
    with pytest.raises(SystemExit, match="no recorded sweep"):
        ss.sweep_pick("lnl", sweeps=Path("/nonexistent"))
    for bad in ("/tmp/x", "../x", ".x"):
        with pytest.raises(SystemExit, match="letters, digits"):
            ss.main(["--method", "end", "--pick", "form=reference", "--name", bad])


def test_the_committed_end_decision_is_the_one_its_cells_give_and_the_configs_follow_it():
    """The EnD block in docs/reproduction.md and results/second-stage/end.json are what the
    committed cells give now; the shipped configs hold the point the decision keeps."""
    from cxrdebias.experiments.config import load_config
    from cxrdebias.experiments.tables import rho_config

    record = ss.decide("end", ss.sweep_pick("end"))
    committed = json.loads((ss.DECISIONS / "end.json").read_text())
    assert json.loads(json.dumps(record)) == committed
    assert record["decision"] == "keep the centre"
    for rho in (0.997, 0.990):
        options = load_config(rho_config(rho)).method.options()
        assert (options["alpha"], options["beta"]) == (5.0, 0.5) != tuple(float(v) for v in record["pick"].values())
    docs = (REPO / "docs" / "reproduction.md").read_text()
    block = docs.split("<!-- second-stage:end:start -->\n", 1)[1].split("\n<!-- second-stage:end:end -->", 1)[0]
    assert block.startswith(ss.markdown(record))
