"""The paper tables: cells, resumable runs, consistency checks and the rendered Markdown."""

from __future__ import annotations

import json
import shutil

import pytest

from cxrdebias.errors import ConfigError
from cxrdebias.experiments.tables import (
    ablation_table,
    biased_mnist_cell_name,
    biased_mnist_table,
    build_table,
    get_table,
    update_markdown,
)

#: the pinned EnD options of the tests that name Table 1's EnD cells (the shipped α/β may change)
PIN = ["method.alpha=5", "method.beta=0.5"]
TINY = [
    "train.epochs=1", "train.batch_size=64", "train.progress=false", "model.kernel_size=3",
    "data.limit_train=128", "data.limit_test=64", "train.eval_every=1",
]


@pytest.fixture
def clean_tree(monkeypatch):
    """Runs record a clean checkout (the tests also run from trees with local changes)."""
    import cxrdebias.experiments.benchmark as bm
    import cxrdebias.experiments.runner as runner

    clean = {"package": "0", "git_commit": "0123456789abcdef", "git_dirty": False}
    monkeypatch.setattr(runner, "code_version", lambda: clean)
    monkeypatch.setattr(bm, "code_version", lambda: clean)
    return bm


def _fake_result(cell, biased: float, unbiased: float) -> dict:
    return {
        "seed": cell.seed,
        "config": cell.config.model_dump(mode="json"),
        "metrics": {"biased_accuracy": biased, "unbiased_accuracy": unbiased},
    }


def _store(tmp_path, table, name, results):
    store = tmp_path / table.results_subdir
    store.mkdir(parents=True, exist_ok=True)
    (store / f"{name}.json").write_text(json.dumps(results))


def test_cells_cover_methods_rhos_and_seeds_with_stable_names():
    t = biased_mnist_table(rhos=[0.997, 0.990], methods=["vanilla", "end", "lff"], seeds=[42, 43], overrides=PIN)
    names = [c.name for c in t.cells]
    assert len(names) == len(set(names)) == 2 * 3 * 2
    # the names of the committed docs/results/biased_mnist files: EnD's carry form, α and β
    assert "rho0.997-vanilla-s42" in names and "rho0.990-end-partner_mean-a5-b0.5-s43" in names and "rho0.997-lff-q0.7-ema0.7-s42" in names
    end = next(c for c in t.cells if c.name == "rho0.997-end-partner_mean-a5-b0.5-s42")
    assert end.config.method.options()["alpha"] == 5.0
    lff = next(c for c in t.cells if c.name == "rho0.997-lff-q0.7-ema0.7-s43")
    assert lff.config.method.name == "lff" and "alpha" not in lff.config.method.options() and lff.config.seed == 43
    other = biased_mnist_table(rhos=[0.997], methods=["end"], seeds=[42], overrides=["method.alpha=50", "method.beta=5"])
    assert [c.name for c in other.cells] == ["rho0.997-end-partner_mean-a50-b5-s42"]  # never the same file as another α/β
    # a config that leaves EnD's options out is named by the package defaults (α = β = 0.1), not a KeyError
    assert biased_mnist_cell_name(0.99, "end", {}, 1) == "rho0.990-end-partner_mean-a0.1-b0.1-s1"
    assert biased_mnist_cell_name(0.99, "end", {"form": "paper", "alpha": 5}, 1, "20ep") == "rho0.990-end-paper-a5-b0.1-20ep-s1"
    # every swept method's cells carry its swept options (package defaults filled in); vanilla none
    assert biased_mnist_cell_name(0.997, "groupdro", {"name": "groupdro"}, 42) == "rho0.997-groupdro-eta0.01-adj0-s42"
    assert biased_mnist_cell_name(0.997, "blindeye", {"head_hidden": 64}, 42) == "rho0.997-blindeye-a1-h64-s42"
    assert biased_mnist_cell_name(0.997, "rebias", {"hsic_features": "bottleneck", "lambda_g": 10}, 42) == "rho0.997-rebias-bottleneck-l1-lg10-s42"
    assert biased_mnist_cell_name(0.997, "vanilla", {}, 42) == "rho0.997-vanilla-s42"
    with pytest.raises(ConfigError, match="lnl options"):
        biased_mnist_cell_name(0.997, "lnl", {"alpha": 1}, 42)


def test_end_cells_start_from_the_shipped_config():
    from cxrdebias.experiments.config import load_config
    from tests.conftest import REPO

    shipped = load_config(REPO / "configs" / "biased_mnist" / "rho0.997.yaml").method.options()
    (end,) = biased_mnist_table(rhos=[0.997], methods=["end"], seeds=[42]).cells
    assert end.config.method.options() == shipped
    assert end.name == f"rho0.997-end-{shipped['form']}-a{shipped['alpha']:g}-b{shipped['beta']:g}-s42"


def test_render_mean_std_over_seeds_and_published_numbers(tmp_path):
    t = biased_mnist_table(rhos=[0.997], methods=["vanilla", "end"], seeds=[1, 2], overrides=PIN)
    cells = {c.name: c for c in t.cells}
    _store(tmp_path, t, "rho0.997-vanilla-s1", _fake_result(cells["rho0.997-vanilla-s1"], 1.0, 0.10))
    _store(tmp_path, t, "rho0.997-vanilla-s2", _fake_result(cells["rho0.997-vanilla-s2"], 0.98, 0.12))
    _store(tmp_path, t, "rho0.997-end-partner_mean-a5-b0.5-s1", _fake_result(cells["rho0.997-end-partner_mean-a5-b0.5-s1"], 0.9, 0.5))
    r = build_table(t, results_dir=tmp_path)
    assert r.missing == ["rho0.997-end-partner_mean-a5-b0.5-s2"]
    lines = r.markdown.splitlines()
    vanilla = next(line for line in lines if line.startswith("| vanilla"))
    # mean of 100/98 = 99.00, sample std = 1.41; unbiased 11.00 ± 1.41; no paper number: the
    # published vanilla is Bahng et al.'s raw-feature baseline, the vanilla-raw row
    assert vanilla == "| vanilla | 0.997 | 1, 2 | 99.00 ± 1.41 | 11.00 ± 1.41 | – |"
    end = next(line for line in lines if line.startswith("| end"))
    assert "| 1 | 90.00 | 50.00 | 83.70 |" in end
    assert "3 of 4 cells finished" in r.markdown


def test_bahng_vanilla_row_runs_its_own_config_and_carries_the_published_vanilla():
    t = biased_mnist_table(rhos=[0.997, 0.990], methods=["vanilla-raw", "vanilla"], seeds=[42])
    cells = {c.name: c for c in t.cells}
    raw, normalised = cells["rho0.997-vanilla-raw-s42"], cells["rho0.997-vanilla-s42"]
    assert raw.config.model.normalize_features is False and raw.config.model.last_activation == "relu"
    assert normalised.config.model.normalize_features is True
    assert raw.config.data.rho == 0.997 and cells["rho0.990-vanilla-raw-s42"].config.data.rho == 0.990
    assert raw.config.method.name == "vanilla" and raw.config.seed == 42
    assert t.published[raw.row] == [None, 33.4] and t.published[normalised.row] == [None, None]
    assert t.published[cells["rho0.990-vanilla-raw-s42"].row] == [None, 89.1]
    assert raw.row[0] != normalised.row[0]


def test_result_from_other_options_is_refused(tmp_path):
    t = biased_mnist_table(rhos=[0.997], methods=["end"], seeds=[42], overrides=PIN)
    cell = t.cells[0]
    bad = _fake_result(cell, 1.0, 0.5)
    bad["config"]["method"]["alpha"] = 0.1
    _store(tmp_path, t, cell.name, bad)
    with pytest.raises(ConfigError, match=r"rho0.997-end-partner_mean-a5-b0.5-s42.json: was produced with other options.*method.alpha"):
        build_table(t, results_dir=tmp_path)


def test_a_default_given_explicitly_is_the_default(tmp_path):
    """A sweep's centre run names the package defaults explicitly (method.lambda_=1); it is the
    Table 1 cell that leaves them out — before, the table refused it as "other options"."""
    t = biased_mnist_table(rhos=[0.997], methods=["rebias"], seeds=[42], overrides=PIN)
    cell = t.cells[0]
    assert cell.name == "rho0.997-rebias-raw-l1-lg1-s42" and "lambda_" not in cell.config.method.options()
    res = _fake_result(cell, 1.0, 0.1)
    res["config"]["method"].update(lambda_=1, lambda_g=1.0)
    _store(tmp_path, t, cell.name, res)
    assert build_table(t, results_dir=tmp_path).missing == []
    res["config"]["method"]["lambda_g"] = 10
    _store(tmp_path, t, cell.name, res)
    with pytest.raises(ConfigError, match="other options.*method.lambda_g"):
        build_table(t, results_dir=tmp_path)


def test_runtime_options_do_not_make_a_result_different(tmp_path):
    t = biased_mnist_table(rhos=[0.997], methods=["vanilla"], seeds=[42])
    cell = t.cells[0]
    res = _fake_result(cell, 1.0, 0.1)
    res["config"]["train"]["num_threads"] = 1
    res["config"]["data"]["root"] = "/elsewhere/mnist"
    _store(tmp_path, t, cell.name, res)
    assert build_table(t, results_dir=tmp_path).missing == []


def test_unsupervised_options_matter_only_when_bias_auto_is_on(tmp_path):
    t = biased_mnist_table(rhos=[0.997], methods=["vanilla"], seeds=[42])
    cell = t.cells[0]
    res = _fake_result(cell, 1.0, 0.1)
    res["config"]["unsupervised"] = {"enabled": False, "warmup_steps": 100, "refresh_every": 50}  # older defaults
    _store(tmp_path, t, cell.name, res)
    assert build_table(t, results_dir=tmp_path).missing == []
    res["config"]["unsupervised"]["enabled"] = True
    _store(tmp_path, t, cell.name, res)
    with pytest.raises(ConfigError, match="other options.*unsupervised"):
        build_table(t, results_dir=tmp_path)


def test_run_missing_cells_then_skip_them(fake_mnist, tmp_path, clean_tree):
    overrides = [*TINY, *PIN, f"data.root={fake_mnist}"]
    t = biased_mnist_table(rhos=[0.99], methods=["vanilla", "end"], seeds=[0], overrides=overrides)
    results, runs = tmp_path / "results", tmp_path / "runs"
    first = build_table(t, results_dir=results, runs_dir=runs, run=True)
    assert first.missing == [] and first.done == ["rho0.990-end-partner_mean-a5-b0.5-s0", "rho0.990-vanilla-s0"]
    stored = json.loads((results / "biased_mnist" / "rho0.990-end-partner_mean-a5-b0.5-s0.json").read_text())
    assert stored["method"]["name"] == "end" and stored["epochs"] == 1
    # the second call runs nothing: remove the run folders and it still finds every cell
    shutil.rmtree(runs)
    again = build_table(t, results_dir=results, runs_dir=runs, run=True)
    assert again.done == first.done and not runs.exists()
    assert again.markdown == first.markdown


def test_ablation_cells_switch_terms_off():
    t = ablation_table(rho=0.997, seeds=[42])
    pairs = [(c.config.method.options()["alpha"], c.config.method.options()["beta"]) for c in t.cells]
    assert pairs == [(0.0, 0.0), (5.0, 0.0), (0.0, 0.5), (5.0, 0.5)]
    assert all(c.config.method.name == "end" for c in t.cells)


def test_unknown_table_and_rho_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown table 'table9'"):
        get_table("table9")
    with pytest.raises(ConfigError, match="no shipped config for rho=0.5"):
        get_table("biased-mnist", rhos=[0.5])


def test_update_markdown_replaces_only_the_block(tmp_path):
    doc = tmp_path / "r.md"
    doc.write_text("intro\n<!-- table:x:start -->\nold\n<!-- table:x:end -->\noutro\n")
    update_markdown(doc, "x", "new table")
    assert doc.read_text() == "intro\n<!-- table:x:start -->\nnew table\n<!-- table:x:end -->\noutro\n"
    with pytest.raises(ConfigError, match="missing the <!-- table:y:start -->"):
        update_markdown(doc, "y", "t")
    # the block is the first end marker after the first start marker; the body is kept as given
    doc.write_text("<!-- table:x:end -->\n<!-- table:x:start -->\nold\n<!-- table:x:end --> tail <!-- table:x:end -->\n")
    update_markdown(doc, "x", "new\n")
    assert doc.read_text() == "<!-- table:x:end -->\n<!-- table:x:start -->\nnew\n\n<!-- table:x:end --> tail <!-- table:x:end -->\n"
    doc.write_text("<!-- table:x:end -->\n<!-- table:x:start -->\n")
    with pytest.raises(ConfigError, match="missing the <!-- table:x:start -->"):
        update_markdown(doc, "x", "t")


def test_cli_runs_a_table_and_writes_markdown(fake_mnist, tmp_path, monkeypatch, capsys, clean_tree):
    from tests.test_cli import run_cli

    md = tmp_path / "t.md"
    base = ["reproduce", "table", "biased-mnist", "--rho", "0.99", "--method", "vanilla-raw",
            "--results", str(tmp_path / "res"), "--runs", str(tmp_path / "runs"), "--set", f"data.root={fake_mnist}"]
    for o in TINY:
        base += ["--set", o]
    # --run from a checkout with local changes is refused before anything runs
    monkeypatch.setattr(clean_tree, "code_version", lambda: {"package": "0", "git_commit": "abc", "git_dirty": True})
    code, _, err = run_cli([*base, "--seed", "0", "--run"], monkeypatch, capsys)
    assert code == 2 and "uncommitted changes" in err and not (tmp_path / "runs").exists()
    monkeypatch.setattr(clean_tree, "code_version", lambda: {"package": "0", "git_commit": "abc", "git_dirty": False})
    code, stdout, err = run_cli([*base, "--seed", "0", "--run", "--markdown", str(md)], monkeypatch, capsys)
    assert code == 0, err
    row = "| vanilla (raw pooled features; Bahng et al.'s baseline) | 0.990 |"
    assert f"{row} 0 |" in stdout and "| 89.10 |" in stdout  # Bahng's vanilla carries the published vanilla
    assert md.read_text().strip() == stdout.strip()
    assert (tmp_path / "res" / "biased_mnist" / "rho0.990-vanilla-raw-s0.json").is_file()
    # without --run a missing cell is reported, not run
    code, stdout, err = run_cli([*base, "--seed", "1"], monkeypatch, capsys)
    assert code == 0 and f"{row} not run |" in stdout and "1 cells not run yet" in err
    assert not (tmp_path / "runs" / "rho0.990-vanilla-raw-s1").exists()


def test_ablation_reads_the_full_end_cell_from_table_1_only_when_it_is_the_same_run(tmp_path):
    t1 = biased_mnist_table(rhos=[0.997], methods=["end"], seeds=[42], overrides=PIN)
    ab = ablation_table(rho=0.997, seeds=[42], overrides=PIN)
    (end_cell,) = t1.cells
    both = next(c for c in ab.cells if c.name == "rho0.997-end-partner_mean-a5-b0.5-s42")
    assert both.same_as == ("biased_mnist/rho0.997-end-partner_mean-a5-b0.5-s42",)  # Table 1 names it alike
    assert all(not c.same_as for c in ab.cells if c is not both)
    _store(tmp_path, t1, end_cell.name, _fake_result(end_cell, 0.96, 0.5))
    r = build_table(ab, results_dir=tmp_path)
    assert r.done == ["rho0.997-end-partner_mean-a5-b0.5-s42"]
    assert "| 5 | 0.5 | 42 | 96.00 | 50.00 |" in r.markdown
    # a Table 1 file run with other options does not stand in for the cell (and is no error)
    other = _fake_result(end_cell, 0.96, 0.5)
    other["config"]["method"]["alpha"] = 1.0
    _store(tmp_path, t1, end_cell.name, other)
    r = build_table(ab, results_dir=tmp_path)
    assert r.done == [] and "rho0.997-end-partner_mean-a5-b0.5-s42" in r.missing


def test_every_table_has_its_own_block_in_the_reproduction_docs():
    from cxrdebias.experiments.tables import TABLE_NAMES
    from tests.conftest import REPO

    keys = [get_table(name).docs_key for name in TABLE_NAMES]
    assert keys == ["table1", "table2", "table3", "table4"]
    text = (REPO / "docs" / "reproduction.md").read_text()
    for key in keys:  # --update-docs rewrites exactly this block, never another table's
        assert text.count(f"<!-- table:{key}:start -->") == 1 and text.count(f"<!-- table:{key}:end -->") == 1


def test_cells_from_a_dirty_tree_are_refused_unless_allowed_then_marked(tmp_path):
    t = biased_mnist_table(rhos=[0.997], methods=["vanilla", "end"], seeds=[1, 2], overrides=PIN)
    cells = {c.name: c for c in t.cells}
    for name, dirty in (("rho0.997-vanilla-s1", False), ("rho0.997-end-partner_mean-a5-b0.5-s1", False), ("rho0.997-end-partner_mean-a5-b0.5-s2", True)):
        res = _fake_result(cells[name], 0.9, 0.5) | {"code_version": {"git_commit": "abc", "git_dirty": dirty}}
        _store(tmp_path, t, name, res)
    with pytest.raises(ConfigError, match=r"1 result\(s\) were produced with uncommitted changes \(rho0.997-end-partner_mean-a5-b0.5-s2\).*--allow-dirty"):
        build_table(t, results_dir=tmp_path)
    md = build_table(t, results_dir=tmp_path, allow_dirty=True).markdown
    end = next(line for line in md.splitlines() if line.startswith("| end"))
    vanilla = next(line for line in md.splitlines() if line.startswith("| vanilla"))
    assert end.count("◇") == 2 and "◇" not in vanilla  # both metric columns of the row with the dirty seed
    assert "◇ from a dirty tree" in md
    # a table with only clean cells has no mark and no legend
    (tmp_path / t.results_subdir / "rho0.997-end-partner_mean-a5-b0.5-s2.json").unlink()
    assert "◇" not in build_table(t, results_dir=tmp_path).markdown


def test_a_rho_without_the_bahng_config_leaves_that_row_out_unless_asked_for():
    t = biased_mnist_table(rhos=[0.995], seeds=[42])  # no vanilla-raw-rho0.995.yaml ships
    names = [c.name for c in t.cells]
    assert "rho0.995-vanilla-s42" in names and not any("vanilla-raw" in n for n in names)
    with pytest.raises(ConfigError, match="vanilla-raw-rho0.995.yaml"):
        biased_mnist_table(rhos=[0.995], methods=["vanilla-raw"], seeds=[42])
