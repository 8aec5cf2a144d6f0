"""benchmarks/reproduce_biased_mnist.py: cell names, other schedules, and the seeds table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from cxrdebias.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import reproduce_biased_mnist as rbm  # noqa: E402


def _result(rho, method, seed, biased, unbiased, *, epochs=10, lr_step=7, precision="bf16", alpha=None, beta=None):
    m = {"name": method}
    if method == "end":
        m.update(alpha=alpha if alpha is not None else 5.0, beta=beta if beta is not None else 0.5, form="paper")
    if method == "lnl":
        m.update(lambda_=0.01, grl_scale=0.1)
    return {
        "rho": rho,
        "method": m,
        "seed": seed,
        "epochs": epochs,
        "config": {"train": {"epochs": epochs, "lr_step": lr_step}},
        "train": {"precision": precision},
        "metrics": {"biased_accuracy": biased, "unbiased_accuracy": unbiased},
    }


def _store(folder: Path, name: str, result: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(result))


def test_cell_names_keep_the_shipped_schedule_names_and_mark_another_schedule():
    # the committed files carry each method's swept options, so runs at another point keep their own
    assert rbm.cell_name(0.997, "end", 42, {"form": "partner_mean", "alpha": 5.0, "beta": 0.5}) == "rho0.997-end-partner_mean-a5-b0.5-s42"
    assert rbm.cell_name(0.997, "end", 42, {"form": "partner_mean", "alpha": 50.0, "beta": 5.0}) == "rho0.997-end-partner_mean-a50-b5-s42"
    assert rbm.cell_name(0.99, "vanilla", 43) == "rho0.990-vanilla-s43"
    assert rbm.cell_name(0.997, "end", 44, {"form": "partner_mean", "alpha": 5.0, "beta": 0.5}, 20) == "rho0.997-end-partner_mean-a5-b0.5-20ep-s44"
    assert rbm.cell_name(0.99, "vanilla", 42, None, 20) == "rho0.990-vanilla-20ep-s42"
    # another method: its package defaults, with --set's values (strings, as typed) on top
    assert rbm.cell_name(0.997, "lnl", 42) == "rho0.997-lnl-l0.01-grl0.1-s42"
    assert rbm.cell_name(0.997, "lnl", 42, {"lambda_": "0.1", "grl_scale": "1"}) == "rho0.997-lnl-l0.1-grl1-s42"


def test_cell_options_start_from_the_shipped_config_for_its_method_only():
    class Args:
        form, alpha, beta, set = "reference", None, 5.0, ["method.lambda_=0.1"]

    end = rbm.cell_options(0.997, "end", Args)
    assert end == {"alpha": 5.0, "beta": 5.0, "form": "reference", "lambda_": "0.1"}  # shipped alpha 5, --beta, --form, --set
    assert rbm.cell_options(0.997, "lnl", Args) == {"lambda_": "0.1"}  # not EnD's alpha/beta
    with pytest.raises(ConfigError, match="Extra inputs"):  # EnD has no lambda_: an error before any run
        rbm.cell_name(0.997, "end", 42, end)
    assert rbm.method_sets(["method.grl_scale=1", "method.lambda_=0.1"]) == {"grl_scale": "1", "lambda_": "0.1"}
    for bad in ("train.lr=1", "method.name=lnl", "method.lambda_", "method.lambda_="):
        with pytest.raises(SystemExit, match="expected method.KEY=VALUE"):
            rbm.method_sets([bad])


def test_schedule_overrides_need_both_values_and_a_step_inside_the_run():
    assert rbm.schedule_overrides(None, None) == []
    assert rbm.schedule_overrides(20, 10) == ["train.epochs=20", "train.lr_step=10"]
    with pytest.raises(SystemExit, match="go together"):
        rbm.schedule_overrides(20, None)
    with pytest.raises(SystemExit, match="go together"):
        rbm.schedule_overrides(None, 10)
    with pytest.raises(SystemExit, match="0 < lr-step <= epochs"):
        rbm.schedule_overrides(20, 21)
    with pytest.raises(SystemExit, match="epochs >= 1"):
        rbm.schedule_overrides(0, 0)


def test_a_run_is_filed_only_under_the_schedule_it_was_trained_with(tmp_path):
    r20 = _result(0.997, "end", 42, 0.99, 0.57, epochs=20, lr_step=10)
    rbm.check_schedule(r20, 20, 10, tmp_path / "results.json")
    rbm.check_schedule(r20, None, None, tmp_path / "results.json")  # the shipped schedule: the config decides
    with pytest.raises(SystemExit, match=r"results.json: trained 20 epochs with the LR step at 10, not 20 \(7\)"):
        rbm.check_schedule(r20, 20, 7, tmp_path / "results.json")
    with pytest.raises(SystemExit, match="trained 10 epochs"):
        rbm.check_schedule(_result(0.997, "end", 42, 0.96, 0.5), 20, 10, tmp_path / "results.json")


def test_table_has_a_row_per_schedule_with_mean_std_and_the_precisions(tmp_path):
    _store(tmp_path, "rho0.997-vanilla-s42", _result(0.997, "vanilla", 42, 1.0, 0.1))
    _store(tmp_path, "rho0.997-end-paper-s42", _result(0.997, "end", 42, 0.96, 0.50))
    _store(tmp_path, "rho0.997-end-paper-s43", _result(0.997, "end", 43, 0.98, 0.60))
    _store(tmp_path, "rho0.997-end-paper-20ep-s42", _result(0.997, "end", 42, 0.99, 0.57, epochs=20, lr_step=10))
    _store(tmp_path, "rho0.997-end-paper-20ep-s43", _result(0.997, "end", 43, 0.98, 0.55, epochs=20, lr_step=10, precision="fp32"))
    _store(tmp_path, "rho0.990-end-paper-s42", _result(0.99, "end", 42, 0.95, 0.70))
    _store(tmp_path, "rho0.997-lnl-s42", _result(0.997, "lnl", 42, 1.0, 0.1))  # a Table 1 cell: not in this table
    lines = rbm.build_table(tmp_path).splitlines()
    assert "precision" in lines[0] and len(lines) == 2 + 5
    # ρ descending, vanilla first, then the shipped schedule before the longer one
    # no paper number beside vanilla on EnD's normalised bottleneck (the published one is Bahng's raw-feature vanilla)
    assert lines[2].startswith("| 0.997 | vanilla | – | 10 (7) | 42 | bf16 | 100.00 (n=1) | 10.00 (n=1) | – |")
    # mean ± sample std by hand: (96, 98) → 97 ± 1.41; (50, 60) → 55 ± 7.07
    assert lines[3] == "| 0.997 | end | form paper, alpha 5, beta 0.5 | 10 (7) | 42, 43 | bf16 | 97.00 ± 1.41 (n=2) | 55.00 ± 7.07 (n=2) | 83.7 |"
    # seeds run in bf16 and in fp32 are separate rows, never one mean
    assert lines[4] == "| 0.997 | end | form paper, alpha 5, beta 0.5 | 20 (10) | 42 | bf16 | 99.00 (n=1) | 57.00 (n=1) | 83.7 |"
    assert lines[5] == "| 0.997 | end | form paper, alpha 5, beta 0.5 | 20 (10) | 43 | fp32 | 98.00 (n=1) | 55.00 (n=1) | 83.7 |"
    assert lines[6].startswith("| 0.99 | end | form paper, alpha 5, beta 0.5 | 10 (7) | 42 | bf16 | 95.00 (n=1) | 70.00 (n=1) | 96.02 |")
    assert not any("lnl" in line for line in lines)
    assert any(line.startswith("| 0.997 | lnl | lambda 0.01, grl_scale 0.1 | 10 (7) | 42 |") for line in rbm.build_table(tmp_path, methods=("vanilla", "end", "lnl")).splitlines())


def test_the_committed_table_is_the_one_the_results_give():
    text = rbm.TABLE.read_text()
    block = text.split("<!-- table:biased_mnist:start -->\n", 1)[1].split("\n<!-- table:biased_mnist:end -->", 1)[0]
    assert block == rbm.build_table(allow_dirty=True)  # the committed results include runs from dirty trees: marked


def test_results_from_a_dirty_tree_are_refused_unless_allowed_then_marked(tmp_path):
    clean, dirty = ({"code_version": {"git_commit": "abc", "git_dirty": d}} for d in (False, True))
    _store(tmp_path, "rho0.997-vanilla-s42", _result(0.997, "vanilla", 42, 1.0, 0.1) | clean)
    _store(tmp_path, "rho0.997-end-paper-s42", _result(0.997, "end", 42, 0.96, 0.50) | clean)
    _store(tmp_path, "rho0.997-end-paper-s43", _result(0.997, "end", 43, 0.98, 0.60) | dirty)
    with pytest.raises(ConfigError, match=r"1 result\(s\) were produced with uncommitted changes \(rho0.997-end-paper-s43\)"):
        rbm.build_table(tmp_path)
    lines = rbm.build_table(tmp_path, allow_dirty=True).splitlines()
    assert lines[2].endswith("| 100.00 (n=1) | 10.00 (n=1) | – |")  # clean row: no mark
    assert lines[3].endswith("| 97.00 ± 1.41 (n=2) ◇ | 55.00 ± 7.07 (n=2) ◇ | 83.7 |")
    assert lines[-1].startswith("- ◇ from a dirty tree")


def test_bahng_vanilla_is_its_own_row_with_the_published_vanilla(tmp_path):
    raw = _result(0.997, "vanilla", 42, 1.0, 0.30)
    raw["config"]["model"] = {"normalize_features": False, "last_activation": "relu"}
    normalised = _result(0.997, "vanilla", 42, 1.0, 0.10)
    normalised["config"]["model"] = {"normalize_features": True}
    _store(tmp_path, "rho0.997-vanilla-raw-s42", raw)
    _store(tmp_path, "rho0.997-vanilla-s42", normalised)
    assert rbm.row_method(raw) == "vanilla-raw" and rbm.row_method(normalised) == "vanilla"
    lines = rbm.build_table(tmp_path).splitlines()
    raw_row = next(line for line in lines if "| vanilla-raw |" in line)
    plain_row = next(line for line in lines if "| vanilla |" in line)
    assert "| 30.00 (n=1) |" in raw_row and raw_row.endswith("| 33.4 |")  # never averaged with the other row
    assert "| 10.00 (n=1) |" in plain_row and plain_row.endswith("| – |")
    assert rbm.published_biased_mnist("end", 0.997) == 83.7 and rbm.published_biased_mnist("vanilla-raw", 0.99) == 89.1
