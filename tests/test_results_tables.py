"""The benchmark scripts' docs tables (unsupervised, synthetic CXR): dirty-tree results are refused
unless asked, then marked; the unsupervised table's reference means use the shipped schedule only."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import unsupervised_biased_mnist as ubm  # noqa: E402
from cxrdebias.errors import ConfigError  # noqa: E402

SHIPPED_END = {"form": "partner_mean", "alpha": 5.0, "beta": 0.5}


def _sup(folder: Path, name: str, method: str, unbiased: float, dirty: bool = False, end: dict | None = None, raw: bool = False) -> None:
    m = {"name": method, **((end or SHIPPED_END) if method == "end" else {})}
    r = {"rho": 0.997, "method": m, "metrics": {"unbiased_accuracy": unbiased, "biased_accuracy": 1.0},
         "config": {"model": {"normalize_features": not raw}},
         "code_version": {"git_commit": "abc", "git_dirty": dirty}}  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(r))


@pytest.fixture
def folders(tmp_path, monkeypatch):
    sup, res = tmp_path / "biased_mnist", tmp_path / "unsupervised"
    monkeypatch.setattr(ubm, "SUPERVISED", sup)
    monkeypatch.setattr(ubm, "RESULTS", res)
    monkeypatch.setattr(ubm, "shipped_end", lambda rho: SHIPPED_END)
    _sup(sup, "rho0.997-vanilla-s42", "vanilla", 0.10)
    _sup(sup, "rho0.997-end-partner_mean-a5-b0.5-s42", "end", 0.50)
    _sup(sup, "rho0.997-end-partner_mean-a5-b0.5-s43", "end", 0.30)
    _sup(sup, "rho0.997-end-partner_mean-a5-b0.5-20ep-s42", "end", 0.90)  # another schedule: not in the reference mean
    run = {"rho": 0.997, "seed": 42, "method": {"name": "end"}, "metrics": {"unbiased_accuracy": 0.25, "biased_accuracy": 0.97},
           "code_version": {"git_commit": "abc", "git_dirty": False}}  # fmt: skip
    res.mkdir(parents=True)
    (res / "auto-s42.json").write_text(json.dumps({"label": "auto", "results": run, "pseudo_bias_per_epoch": []}))
    return sup, res


def test_reference_means_leave_other_schedules_out(folders):
    means, files = ubm._supervised_means()
    assert means[("end", 0.997)] == pytest.approx(40.0) and means[("vanilla", 0.997)] == pytest.approx(10.0)
    assert len(files[("end", 0.997)]) == 2
    row = next(line for line in ubm.build_table().splitlines() if line.startswith("| 0.997 | auto"))
    assert "| 97.00 | 25.00 | 50% |" in row and "◇" not in row  # (25 − 10) / (40 − 10), by hand


def test_reference_means_are_the_shipped_end_and_normalised_vanilla_only(folders):
    """Bahng's raw-feature vanilla and EnD at another α/β (a sweep's or an older config's) share
    the folder and the method names; neither may enter the reference means (both did before)."""
    sup, _ = folders
    _sup(sup, "rho0.997-vanilla-raw-s42", "vanilla", 0.40, raw=True)
    _sup(sup, "rho0.997-end-partner_mean-a50-b5-s42", "end", 0.90, end={"form": "partner_mean", "alpha": 50.0, "beta": 5.0})
    _sup(sup, "rho0.997-end-paper-a5-b0.5-s42", "end", 0.80, end={**SHIPPED_END, "form": "paper"})
    means, files = ubm._supervised_means()
    assert means[("vanilla", 0.997)] == pytest.approx(10.0) and means[("end", 0.997)] == pytest.approx(40.0)
    names = sorted(n for n, _ in files[("end", 0.997)])
    assert names == ["biased_mnist/rho0.997-end-partner_mean-a5-b0.5-s42", "biased_mnist/rho0.997-end-partner_mean-a5-b0.5-s43"]


def test_dirty_results_are_refused_unless_allowed_then_marked(folders):
    sup, _ = folders
    _sup(sup, "rho0.997-end-partner_mean-a5-b0.5-s43", "end", 0.30, dirty=True)  # a reference run: the share depends on it
    with pytest.raises(ConfigError, match=r"1 result\(s\) were produced with uncommitted changes \(biased_mnist/rho0.997-end-partner_mean-a5-b0.5-s43\)"):
        ubm.build_table()
    table = ubm.build_table(allow_dirty=True)
    row = next(line for line in table.splitlines() if line.startswith("| 0.997 | auto"))
    assert "| 97.00 | 25.00 | 50% ◇ |" in row  # the run is clean; its share uses the dirty reference
    assert "end ρ 0.997: 40.00 ◇" in table and "vanilla ρ 0.997: 10.00." in table and "◇ from a dirty tree" in table
