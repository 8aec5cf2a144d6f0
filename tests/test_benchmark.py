"""``cxrdebias benchmark``: the spec, the cells and their commands, resuming, the table from
hand-built cells, and one tiny end-to-end run of the command (subprocess per cell)."""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
from pathlib import Path

import pytest
import yaml

from cxrdebias.errors import ConfigError, DataError
from cxrdebias.experiments import benchmark as bm
from cxrdebias.experiments.benchmark import (
    Cell,
    cells,
    check_clean,
    check_spec_folder,
    commands,
    load_spec,
)
from cxrdebias.experiments.benchmark_table import build_table, cell_metrics
from tests.conftest import REPO, run_cli

SPEC = {
    "config": "cxr/synthetic.yaml",
    "data": {"seeds": [0, 1], "synth": {"external_sites": 1}},
    "train_seeds": [0, 1],
    "n_boot": 20,
    "set": ["train.epochs=1"],
    "recipes": {
        "end": {"method": "end", "set": ["method.alpha=0.3"], "label": "EnD"},
        "reference": {"method": "vanilla", "data": "reference"},
        "vanilla": {"method": "vanilla"},
        "lnl": {"method": "lnl", "bias": "auto"},
        "posthoc": {"from": "end", "evaluate": ["--threshold", "0.5"]},
    },
}


def write_spec(tmp_path: Path, tree: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
    return path


def after(argv: list[str], flag: str) -> list[str]:
    """Every value that follows ``flag`` in ``argv``."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


# -- the spec ----------------------------------------------------------------------------------


def test_default_spec_is_valid():
    spec = load_spec()
    assert spec.baseline == "vanilla" and spec.reference == "reference"
    assert spec.recipes["reference"].data == "reference" and spec.recipes["vanilla"].data == "biased"
    assert all(d >= 200 for d in spec.data.seeds), "the default spec reports on report seeds (200+), never tuning seeds"
    assert {"vanilla", "reference", "end", "groupdro", "lnl", "auto"} <= set(spec.recipes)


@pytest.mark.parametrize("name", list(load_spec().recipes))
def test_default_spec_recipes_resolve(name):
    from cxrdebias.debias import method_names
    from cxrdebias.experiments.config import load_config

    spec = load_spec()
    r = spec.recipes[name]
    if r.from_ is not None:
        assert spec.recipes[r.from_].from_ is None
        return
    assert r.method in method_names()
    try:
        cfg = load_config(spec.config_path(), [*spec.set, *r.set, f"method.name={r.method}"])
    except ConfigError as exc:  # train.sampling comes with another branch (samp)
        if "train.sampling: unknown option" not in str(exc):
            raise
        pytest.skip(f"needs train.sampling: {exc}")
    assert cfg.method.name == r.method


def test_unknown_keys_are_named(tmp_path):
    tree = {**SPEC, "train_seed": [0], "recipes": {**SPEC["recipes"], "vanilla": {"method": "vanilla", "sett": ["a=1"]}}}
    with pytest.raises(ConfigError) as exc:
        load_spec(write_spec(tmp_path, tree))
    msg = str(exc.value)
    assert "recipes.vanilla.sett: unknown option" in msg and "train_seed: unknown option" in msg
    assert msg.startswith(str(tmp_path / "spec.yaml") + ": ") and msg.count(str(tmp_path)) == 1


@pytest.mark.parametrize("source", ["nothing", "posthoc"])
def test_from_must_name_a_trained_recipe(tmp_path, source):
    recipes = {**SPEC["recipes"], "again": {"from": source}}
    with pytest.raises(ConfigError, match=rf"spec.yaml: recipes.again.from: '{source}' is not a trained recipe of this spec$"):
        load_spec(write_spec(tmp_path, {**SPEC, "recipes": recipes}))


def test_baseline_and_reference_must_be_recipes(tmp_path):
    with pytest.raises(ConfigError, match="baseline: 'plain' is not a recipe"):
        load_spec(write_spec(tmp_path, {**SPEC, "baseline": "plain"}))


def test_recipes_option_keeps_baseline_reference_and_sources(tmp_path):
    spec = load_spec(write_spec(tmp_path, SPEC), recipes=["posthoc", "posthoc"])
    assert set(spec.recipes) == {"vanilla", "reference", "end", "posthoc"}
    assert set(load_spec(write_spec(tmp_path, SPEC), recipes=["lnl"]).recipes) == {"vanilla", "reference", "lnl"}
    with pytest.raises(ConfigError, match=r"--recipes: nope not in .*known: end, reference, vanilla, lnl, posthoc"):
        load_spec(write_spec(tmp_path, SPEC), recipes=["lnl", "nope"])


def test_seed_and_set_options(tmp_path):
    spec = load_spec(write_spec(tmp_path, SPEC), data_seeds=[100, 101], train_seeds=[3], set=["model.hidden_dim=8"])
    assert spec.data.seeds == [100, 101] and spec.train_seeds == [3]
    assert spec.set == ["train.epochs=1", "model.hidden_dim=8"]


def test_data_option_replaces_synthetic_data_and_drops_the_reference(tmp_path):
    spec = load_spec(manifest=tmp_path / "hospitals.csv")
    assert spec.data.manifest == str(tmp_path / "hospitals.csv") and spec.data.synth == {}
    assert spec.reference is None
    assert "reference" not in spec.recipes and all(r.data == "biased" for r in spec.recipes.values())
    assert "vanilla" in spec.recipes and spec.data.seeds == load_spec().data.seeds  # data seeds become split seeds


def test_data_option_keeps_the_reference_with_a_reference_manifest(tmp_path):
    # regression: without an explicit `reference:` key the default ('reference') was dropped
    tree = {k: v for k, v in SPEC.items() if k != "reference"}
    tree["data"] = {"seeds": [0], "reference_manifest": "ref.csv"}
    spec = load_spec(write_spec(tmp_path, tree), manifest="hospitals.csv")
    assert spec.reference == "reference" and "reference" in spec.recipes
    assert bm.data_paths(spec, tmp_path, 0) == {"biased": Path("hospitals.csv"), "reference": Path("ref.csv")}


def test_reference_recipe_with_a_manifest_needs_a_reference_manifest(tmp_path):
    tree = {**SPEC, "data": {"seeds": [0], "manifest": "hospitals.csv"}}
    with pytest.raises(ConfigError, match="recipes.reference: data 'reference' with a manifest needs data.reference_manifest"):
        load_spec(write_spec(tmp_path, tree))


# -- cells and commands --------------------------------------------------------------------------


def test_cells_run_baseline_and_reference_first_per_seed_pair(tmp_path):
    spec = load_spec(write_spec(tmp_path, SPEC))
    got = [(c.data_seed, c.train_seed, c.recipe) for c in cells(spec)]
    per_pair = ["vanilla", "reference", "end", "lnl", "posthoc"]
    assert got == [(d, t, r) for d in (0, 1) for t in (0, 1) for r in per_pair]
    assert Cell("end", 1, 0).folder(tmp_path) == tmp_path / "runs" / "seed1" / "end" / "train0"
    assert Cell("end", 1, 0).name == "seed1-end-train0"


def test_train_commands(tmp_path):
    spec = load_spec(write_spec(tmp_path, SPEC))
    out = tmp_path / "out"
    train, evaluate = commands(spec, out, Cell("end", 1, 0))
    folder = out / "runs" / "seed1" / "end" / "train0"
    assert train[:4] == [sys.executable, "-m", "cxrdebias.cli", "train"]
    assert after(train, "--seed") == ["0"] and after(train, "--bias") == ["site"] and after(train, "--method") == ["end"]
    assert after(train, "--data") == [str(out / "data" / "seed1" / "biased" / "manifest.csv")]
    assert after(train, "--out") == [str(folder)]
    assert after(train, "--config") == [str(REPO / "configs" / "cxr" / "synthetic.yaml")]
    # one thread, no progress bar; then the spec's overrides, then the recipe's (last wins)
    assert after(train, "--set") == ["train.num_threads=1", "train.progress=false", "train.epochs=1", "method.alpha=0.3"]
    assert evaluate[3:] == ["evaluate", "--per-institution", "--force", "--n-boot", "20", str(folder)]

    ref_train = commands(spec, out, Cell("reference", 0, 1))[0]
    assert after(ref_train, "--data") == [str(out / "data" / "seed0" / "reference" / "manifest.csv")]
    assert after(ref_train, "--seed") == ["1"]
    assert after(commands(spec, out, Cell("lnl", 0, 0))[0], "--bias") == ["auto"]


def test_manifest_commands_set_the_split_seed(tmp_path):
    spec = load_spec(write_spec(tmp_path, SPEC), manifest="hospitals.csv", data_seeds=[7])
    train = commands(spec, tmp_path, Cell("vanilla", 7, 0))[0]
    assert after(train, "--data") == ["hospitals.csv"] and "data.seed=7" in after(train, "--set")


def test_posthoc_commands_only_evaluate_the_source_run(tmp_path):
    spec = load_spec(write_spec(tmp_path, SPEC))
    out = tmp_path / "out"
    (cmd,) = commands(spec, out, Cell("posthoc", 1, 0))
    assert cmd[3] == "evaluate" and "train" not in cmd
    assert cmd[3:] == [
        "evaluate", "--per-institution", "--force", "--n-boot", "20", "--threshold", "0.5",
        str(out / "runs" / "seed1" / "end" / "train0"), "--out", str(out / "runs" / "seed1" / "posthoc" / "train0" / "eval"),
    ]  # fmt: skip


# -- the output folder, cleanliness --------------------------------------------------------------


def test_check_spec_folder_refuses_changed_recipes_and_accepts_additions(tmp_path):
    out = tmp_path / "out"
    check_spec_folder(load_spec(write_spec(tmp_path, SPEC)), out)
    assert json.loads((out / "spec.json").read_text())["recipes"]["posthoc"]["from"] == "end"
    check_spec_folder(load_spec(write_spec(tmp_path, SPEC)), out)  # the same spec again

    changed = {**SPEC, "recipes": {**SPEC["recipes"], "end": {"method": "end", "set": ["method.alpha=1.0"]}}}
    with pytest.raises(ConfigError, match=r"out: was made with another spec \(recipes.end differ\)"):
        check_spec_folder(load_spec(write_spec(tmp_path, changed)), out)
    with pytest.raises(ConfigError, match=r"data.synth differ"):
        check_spec_folder(load_spec(write_spec(tmp_path, {**SPEC, "data": {"seeds": [0], "synth": {}}})), out)
    with pytest.raises(ConfigError, match=r"\(set differ\)"):
        check_spec_folder(load_spec(write_spec(tmp_path, SPEC), set=["train.lr=0.1"]), out)

    more = {**SPEC, "data": {**SPEC["data"], "seeds": [2]}, "train_seeds": [5],
            "recipes": {**SPEC["recipes"], "groupdro": {"method": "groupdro"}}}  # fmt: skip
    check_spec_folder(load_spec(write_spec(tmp_path, more)), out)
    saved = json.loads((out / "spec.json").read_text())
    assert saved["data"]["seeds"] == [0, 1, 2] and saved["train_seeds"] == [0, 1, 5]
    assert set(saved["recipes"]) == {"end", "reference", "vanilla", "lnl", "posthoc", "groupdro"}


def test_check_spec_folder_accepts_a_new_label(tmp_path):
    # regression: a label only names the row; changing it refused the whole folder
    out = tmp_path / "out"
    check_spec_folder(load_spec(write_spec(tmp_path, SPEC)), out)
    relabelled = {**SPEC, "recipes": {**SPEC["recipes"], "end": {**SPEC["recipes"]["end"], "label": "EnD (site, α 0.3)"}}}
    check_spec_folder(load_spec(write_spec(tmp_path, relabelled)), out)


def test_check_clean_refuses_a_dirty_checkout(monkeypatch, tmp_path):
    monkeypatch.setattr(bm, "code_version", lambda: {"package": "0", "git_commit": "abc", "git_dirty": True})
    with pytest.raises(ConfigError, match="uncommitted changes.*--allow-dirty"):
        check_clean(False)
    assert check_clean(True)["git_dirty"] is True
    with pytest.raises(ConfigError, match="uncommitted changes"):
        bm.run_benchmark(load_spec(write_spec(tmp_path, SPEC)), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before writing anything
    monkeypatch.setattr(bm, "code_version", lambda: {"package": "0", "git_commit": "abc", "git_dirty": False})
    assert check_clean(False)["git_dirty"] is False
    with pytest.raises(ConfigError, match="--jobs: expected 1 or more, got 0"):
        bm.run_benchmark(load_spec(write_spec(tmp_path, SPEC)), tmp_path / "out", jobs=0)


def _decoy(folder: Path) -> Path:
    """A folder holding another ``cxrdebias`` package, which exits with code 7 when imported."""
    (folder / "cxrdebias").mkdir(parents=True)
    (folder / "cxrdebias" / "__init__.py").write_text("raise SystemExit(7)\n", encoding="utf-8")
    return folder


def test_cells_run_the_package_of_this_process_not_one_in_the_current_folder(tmp_path, monkeypatch):
    # regression: `python -m cxrdebias.cli` put the current folder first on sys.path, so a cell
    # could run another checkout than the one check_clean() checked
    import cxrdebias

    monkeypatch.chdir(_decoy(tmp_path / "elsewhere"))
    expected = str(Path(cxrdebias.__file__).resolve())
    probe = [sys.executable, "-c", f"import cxrdebias, sys; sys.exit(0 if cxrdebias.__file__ == {expected!r} else 5)"]
    monkeypatch.setattr(bm, "commands", lambda spec, out, cell: [probe])
    spec = load_spec(write_spec(tmp_path, SPEC))
    cell, rc, _ = bm._run_cell(spec, tmp_path / "out", Cell("vanilla", 0, 0))
    assert rc == 0, (tmp_path / "out" / "logs" / "seed0-vanilla-train0.log").read_text()


def test_without_safe_path_a_foreign_package_in_the_current_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(bm, "_SAFE_PATH", False)  # Python 3.10
    monkeypatch.chdir(_decoy(tmp_path / "elsewhere"))
    with pytest.raises(ConfigError, match="another cxrdebias than the one running"):
        bm.check_cwd_package()
    monkeypatch.chdir(REPO)  # the running package itself: fine
    bm.check_cwd_package()
    monkeypatch.setattr(bm, "_SAFE_PATH", True)
    monkeypatch.chdir(tmp_path / "elsewhere")
    bm.check_cwd_package()


# -- one cell's numbers ------------------------------------------------------------------------


def _report(sites: dict[str, dict], external: list[str], probe=0.9, layers=None) -> dict:
    return {
        "sites": sorted(sites),
        "external_sites": external,
        "by_group": {s: {**v, "external": s in external} for s, v in sites.items()},
        "site_probe": {"mean_auroc": probe, "layers": {k: {"module": k, "dim": 4, "mean_auroc": v} for k, v in (layers or {}).items()}},
    }


def _results(val: dict, select="worst_site_balanced_accuracy", mode="max", dirty=False) -> dict:
    return {
        "val_metrics": val,
        "config": {"train": {"select_metric": select, "select_mode": mode}},
        "train": {"time_s": 12.5},
        "code_version": {"package": "0.1.0", "git_commit": "0123456789abcdef", "git_dirty": dirty},
    }


def test_cell_metrics_by_hand():
    sites = {
        "hospital_a": {"balanced_accuracy": 0.70, "auroc": 0.80, "tpr": 0.90, "tnr": 0.50},
        "hospital_b": {"balanced_accuracy": 0.60, "auroc": 0.70, "tpr": 0.40, "tnr": 0.80},
        "hospital_c": {"balanced_accuracy": 0.65, "auroc": 0.90, "tpr": 0.60, "tnr": 0.70},
        # external sites: far worse, so that counting them among the training sites would show
        "external_1": {"balanced_accuracy": 0.20, "auroc": 0.30, "tpr": 0.00, "tnr": 1.00},
        "external_2": {"balanced_accuracy": 0.40, "auroc": 0.50, "tpr": 0.10, "tnr": 0.95},
    }
    report = _report(sites, ["external_1", "external_2"], probe=0.75, layers={"block1": 0.99, "bottleneck": 0.75})
    results = _results({"worst_site_balanced_accuracy": 0.61, "site_mean_auroc": 0.83, "loss": 0.4}, select="site_mean_auroc")
    m = cell_metrics(report, results)
    assert m["worst_site_ba"] == pytest.approx(0.60)
    assert m["mean_site_auroc"] == pytest.approx((0.80 + 0.70 + 0.90) / 3)
    assert m["tpr_gap"] == pytest.approx(0.90 - 0.40) and m["tnr_gap"] == pytest.approx(0.80 - 0.50)
    assert m["external_ba"] == pytest.approx(0.30) and m["external_auroc"] == pytest.approx(0.40)
    assert m["probe"] == 0.75 and m["probe_layers"] == {"block1": 0.99, "bottleneck": 0.75}
    assert m["val_select"] == 0.83 and m["select_metric"] == "site_mean_auroc" and m["select_mode"] == "max"
    assert m["train_time_s"] == 12.5 and m["code_version"]["git_commit"] == "0123456789abcdef"


def test_cell_metrics_reads_nulls_as_nan():
    # regression: report.json writes NaN as null (a site with one class has no AUROC, a probe with
    # no defined class has no mean); float(None) crashed the table
    sites = {
        "hospital_a": {"balanced_accuracy": 0.70, "auroc": None, "tpr": 0.90, "tnr": 0.50},
        "hospital_b": {"balanced_accuracy": 0.60, "auroc": 0.70, "tpr": None, "tnr": 0.80},
    }
    report = _report(sites, [], probe=None, layers={"block1": None})
    m = cell_metrics(report, _results({"worst_site_balanced_accuracy": None}) | {"train": {}})
    assert m["mean_site_auroc"] == pytest.approx(0.70) and m["worst_site_ba"] == pytest.approx(0.60)
    assert math.isnan(m["tpr_gap"]) and m["tnr_gap"] == pytest.approx(0.30)  # one TPR left: no gap
    assert math.isnan(m["probe"]) and math.isnan(m["probe_layers"]["block1"])
    assert math.isnan(m["val_select"]) and math.isnan(m["train_time_s"])
    assert math.isnan(m["external_ba"]) and math.isnan(m["external_auroc"])
    absent = cell_metrics({**report, "site_probe": {"absent": "no validation split"}}, _results({}, select=None))
    assert math.isnan(absent["probe"]) and absent["probe_layers"] == {} and math.isnan(absent["val_select"])


# -- the table from hand-built cells -------------------------------------------------------------

#: worst-site BA of cells (0,0), (0,1), (1,0), (1,1): vanilla 0.60 on average, the reference 0.80,
#: EnD 0.70 → EnD closes half the gap; LNL is vanilla + 0.02
WORST = {
    "vanilla": [0.60, 0.62, 0.58, 0.60],
    "reference": [0.80, 0.81, 0.79, 0.80],
    "end": [0.70, 0.72, 0.68, 0.70],
    "lnl": [0.62, 0.64, 0.60, 0.62],
    "posthoc": [0.66, 0.67, 0.65, 0.66],
}


def _fill(out: Path, spec, *, val: dict[str, float] | None = None, mode="max", dirty=(), skip=()) -> None:
    """Write report.json/results.json of every cell of ``spec`` from :data:`WORST` (site B's BA
    is 0.1 above A's; within-site AUROCs are BA + 0.1 and + 0.2; the external site is at 0.5)."""
    for i, cell in enumerate(cells(spec)):
        k = (cell.data_seed, cell.train_seed)
        if cell.name in skip:
            continue
        x = WORST[cell.recipe][[(0, 0), (0, 1), (1, 0), (1, 1)].index(k)]
        sites = {
            "hospital_a": {"balanced_accuracy": x, "auroc": x + 0.1, "tpr": 0.9, "tnr": 0.5},
            "hospital_b": {"balanced_accuracy": x + 0.1, "auroc": x + 0.2, "tpr": 0.6, "tnr": 0.8},
            "external_1": {"balanced_accuracy": 0.5, "auroc": 0.5, "tpr": 0.0, "tnr": 1.0},
        }
        folder = cell.folder(out)
        (folder / "eval").mkdir(parents=True, exist_ok=True)
        if spec.recipes[cell.recipe].from_ is None:  # trained, then evaluated
            v = (val or {}).get(cell.recipe, x + 0.01 * (i % 2))
            results = _results({"worst_site_balanced_accuracy": v, "loss": v}, select="loss" if mode == "min" else
                               "worst_site_balanced_accuracy", mode=mode, dirty=cell.name in dirty)  # fmt: skip
            (folder / "results.json").write_text(json.dumps(results), encoding="utf-8")
        report = _report(sites, ["external_1"], probe=1.0 - x / 2, layers={"block1": 1.0, "bottleneck": 1.0 - x / 2})
        (folder / "eval" / "report.json").write_text(json.dumps(report), encoding="utf-8")


def _strict(path: Path):
    def refuse(token):
        raise ValueError(f"{path}: not strict JSON ({token})")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def test_build_table_from_hand_built_cells(tmp_path):
    spec = load_spec(write_spec(tmp_path, SPEC))
    out = tmp_path / "out"
    _fill(out, spec)
    table = build_table(spec, out, title="hand-built")
    s = table["summary"]["recipes"]
    assert {n: e["n_cells"] for n, e in s.items()} == dict.fromkeys(spec.recipes, 4)
    assert s["vanilla"]["metrics"]["worst_site_ba"]["mean"] == pytest.approx(0.60)
    end_gap = s["end"]["gap_closed"]
    assert end_gap["worst_site_ba"]["value"] == pytest.approx(0.5) and end_gap["mean_site_auroc"]["value"] == pytest.approx(0.5)
    assert s["lnl"]["gap_closed"]["worst_site_ba"]["value"] == pytest.approx(0.1)
    assert "gap_closed" not in s["vanilla"] and "gap_closed" not in s["reference"] and "vs_baseline" not in s["vanilla"]
    d = s["end"]["vs_baseline"]["worst_site_ba"]
    assert d["mean"] == pytest.approx(0.10) and d["significant"] is True and d["n"] == 4
    assert s["end"]["vs_baseline"]["external_ba"]["mean"] == 0.0
    assert s["end"]["metrics"]["external_ba"]["mean"] == 0.5
    assert s["end"]["metrics"]["tpr_gap"]["mean"] == pytest.approx(0.3)
    assert table["summary"]["layers"] == ["block1", "bottleneck"]
    assert s["end"]["probe_layers"]["bottleneck"]["mean"] == pytest.approx(1 - 0.70 / 2)
    # the post-hoc row reads its source's results.json: the same validation values as EnD's
    assert s["posthoc"]["metrics"]["val_select"]["mean"] == s["end"]["metrics"]["val_select"]["mean"]
    # the best recipe by validation: among trained non-baseline/reference recipes, the highest
    assert table["summary"]["best_by_validation"] == "end"

    md = (out / "benchmark.md").read_text(encoding="utf-8")
    assert md.startswith("# hand-built\n") and "20 of 20 cells finished" in md
    row = next(line for line in md.splitlines() if line.startswith("| EnD |"))
    assert "| 4 | 0.700 [" in row and "| +0.100 [" in row and " * |" in row and "| 50% [" in row
    assert "| vanilla (baseline, 0%) | 4 |" in md and "| reference (reference, 100%) | 4 |" in md
    assert "| recipe | block1 | bottleneck |" in md
    assert (out / "benchmark.png").stat().st_size > 1000
    saved = _strict(out / "benchmark.json")
    assert len(saved["cells"]) == 20 and saved["recipes"]["end"]["gap_closed"]["worst_site_ba"]["value"] == pytest.approx(0.5)


def test_benchmark_json_is_strict_json(tmp_path):
    # regression: NaN (the interval of a recipe with one cell, a missing probe) was written as the
    # bare token NaN, which strict JSON readers refuse; report.json writes null
    spec = load_spec(write_spec(tmp_path, SPEC), data_seeds=[0], train_seeds=[0])
    _fill(tmp_path / "out", spec)
    build_table(spec, tmp_path / "out")
    saved = _strict(tmp_path / "out" / "benchmark.json")
    assert saved["recipes"]["end"]["metrics"]["worst_site_ba"]["ci"] == [None, None]
    assert saved["recipes"]["end"]["metrics"]["worst_site_ba"]["n"] == 1


def test_build_table_counts_unfinished_cells(tmp_path):
    spec = load_spec(write_spec(tmp_path, SPEC))
    _fill(tmp_path / "out", spec, skip={"seed1-lnl-train1"})
    table = build_table(spec, tmp_path / "out")
    assert table["summary"]["recipes"]["lnl"]["n_cells"] == 3 and "19 of 20 cells finished" in table["markdown"]
    assert table["summary"]["recipes"]["lnl"]["vs_baseline"]["worst_site_ba"]["n"] == 3
    with pytest.raises(Exception, match="no finished cell"):
        build_table(spec, tmp_path / "empty")


def test_best_by_validation_follows_the_selection_direction(tmp_path):
    # regression: the best recipe was always the highest mean, also when the runs selected their
    # epoch on a metric to minimise (train.select_mode: min, e.g. the loss)
    spec = load_spec(write_spec(tmp_path, SPEC))
    val = {"end": 0.30, "lnl": 0.50}
    _fill(tmp_path / "max", spec, val=val)
    assert build_table(spec, tmp_path / "max")["summary"]["best_by_validation"] == "lnl"
    _fill(tmp_path / "min", spec, val=val, mode="min")
    table = build_table(spec, tmp_path / "min")
    assert table["summary"]["best_by_validation"] == "end" and table["summary"]["select_metrics"] == ["loss"]
    # recipes that selected on different metrics are not compared
    from cxrdebias.experiments.benchmark_table import _best

    rows = [{"recipe": "end", "select_metric": "loss", "select_mode": "min"}, {"recipe": "lnl", "select_metric": "auroc", "select_mode": "max"}]
    assert _best({"end": 0.3, "lnl": 0.9}, rows) is None
    assert _best({}, []) is None


def test_build_table_refuses_dirty_cells_unless_allowed(tmp_path):
    spec = load_spec(write_spec(tmp_path, SPEC))
    _fill(tmp_path / "out", spec, dirty={"seed1-end-train0"})
    # the post-hoc cell evaluated that run: it counts too
    with pytest.raises(ConfigError, match=r"2 result\(s\) were produced with uncommitted changes \(.*seed1-end-train0.*--allow-dirty"):
        build_table(spec, tmp_path / "out")
    assert not (tmp_path / "out" / "benchmark.json").exists()
    table = build_table(spec, tmp_path / "out", allow_dirty=True)
    assert table["summary"]["dirty"] is True and "0123456789 (dirty)" in table["markdown"]
    # the dirty recipes' rows are marked, the clean ones not, and the legend says what the mark means
    rows = [line for line in table["markdown"].splitlines() if line.startswith("| ")]
    assert table["summary"]["dirty_recipes"] == ["end", "posthoc"]
    assert any(line.startswith("| EnD ◇ |") for line in rows) and any(line.startswith("| posthoc ◇ |") for line in rows)
    assert not any("◇" in line for line in rows if line.startswith(("| vanilla", "| lnl", "| reference")))
    assert "◇ from a dirty tree" in table["markdown"]


# -- merging an earlier table's cells ------------------------------------------------------------


def _split_fill(tmp_path: Path, spec):
    """The cells of ``spec`` split over two folders as two machines would: EnD and LNL on one,
    the rest on the other; the first one's table as the earlier benchmark.json."""
    _fill(tmp_path / "a", spec, skip={c.name for c in cells(spec) if c.recipe in ("end", "posthoc")})
    build_table(spec, tmp_path / "a")
    _fill(tmp_path / "b", spec, skip={c.name for c in cells(spec) if c.recipe not in ("end", "vanilla")})
    return tmp_path / "a" / "benchmark.json", tmp_path / "b"


def test_merge_adds_an_earlier_tables_cells_and_gives_the_same_table(tmp_path):
    spec = load_spec(write_spec(tmp_path, SPEC))
    _fill(tmp_path / "whole", spec)
    whole = build_table(spec, tmp_path / "whole")
    earlier, folder = _split_fill(tmp_path, spec)
    merged = build_table(spec, folder, merge=[earlier])
    # the vanilla cells are in both and agree: counted once; the post-hoc row needs its source run
    assert merged["summary"]["merged"] == [{"file": str(earlier), "cells": 8}]  # reference and LNL
    s, w = merged["summary"]["recipes"], whole["summary"]["recipes"]
    assert {n: e["n_cells"] for n, e in s.items()} == {n: (0 if n == "posthoc" else 4) for n in spec.recipes}
    for name in ("vanilla", "reference", "end", "lnl"):
        assert s[name]["metrics"]["worst_site_ba"] == w[name]["metrics"]["worst_site_ba"]
    assert s["end"]["gap_closed"]["worst_site_ba"]["value"] == pytest.approx(0.5)
    assert s["end"]["vs_baseline"]["worst_site_ba"]["n"] == 4
    assert f"8 cell(s) merged from `{earlier}`" in merged["markdown"]
    assert len(_strict(folder / "benchmark.json")["cells"]) == 16


def test_merge_refuses_a_cell_that_does_not_reproduce(tmp_path):
    spec = load_spec(write_spec(tmp_path, SPEC))
    earlier, folder = _split_fill(tmp_path, spec)
    doc = json.loads(earlier.read_text(encoding="utf-8"))
    cell = next(c for c in doc["cells"] if c["recipe"] == "vanilla" and c["data_seed"] == 1 and c["train_seed"] == 0)
    cell["worst_site_ba"] += 0.01
    earlier.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(DataError, match=r"cells\[\d+\]: cell seed1-vanilla-train0 is in both, with worst_site_ba 0\.59\d* there and 0\.58"):
        build_table(spec, folder, merge=[earlier])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["spec"].update(config="cxr/other.yaml"), r"spec\.config is 'cxr/other\.yaml'"),
        (lambda d: d["spec"]["data"].update(synth={"n_sites": 3}), r"spec\.data\.synth differs"),
        (lambda d: d["spec"]["recipes"]["end"].update(set=["method.alpha=9"]), r"recipe 'end' differs from this spec's in set"),
        (lambda d: d["cells"][0].update(recipe="jtt"), r"cells\[0\]: recipe 'jtt' is not in this spec"),
        (lambda d: d["cells"][0].update(data_seed=7), r"cells\[0\]: data seed 7, training seed 0 are not among this spec's"),
        (lambda d: d["cells"][0].pop("probe"), r"cells\[0\]: expected recipe, data_seed, train_seed and .*KeyError"),
        (lambda d: d.pop("cells"), r"not a benchmark\.json"),
    ],
)
def test_merge_refuses_what_would_mix_different_experiments(tmp_path, edit, message):
    spec = load_spec(write_spec(tmp_path, SPEC))
    earlier, folder = _split_fill(tmp_path, spec)
    doc = json.loads(earlier.read_text(encoding="utf-8"))
    edit(doc)
    earlier.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises((ConfigError, DataError), match=message):
        build_table(spec, folder, merge=[earlier])


def test_merge_accepts_a_recipe_that_was_only_relabelled(tmp_path):
    spec = load_spec(write_spec(tmp_path, SPEC))
    earlier, folder = _split_fill(tmp_path, spec)
    doc = json.loads(earlier.read_text(encoding="utf-8"))
    doc["spec"]["recipes"]["lnl"]["label"] = "LNL (old name)"
    earlier.write_text(json.dumps(doc), encoding="utf-8")
    assert build_table(spec, folder, merge=[earlier])["summary"]["recipes"]["lnl"]["n_cells"] == 4


def test_merge_a_missing_file_is_a_one_line_error(tmp_path):
    spec = load_spec(write_spec(tmp_path, SPEC))
    _, folder = _split_fill(tmp_path, spec)
    with pytest.raises(DataError, match=r"--merge .*nope\.json: cannot read"):
        build_table(spec, folder, merge=[tmp_path / "nope.json"])


@pytest.mark.parametrize("synth", [{}, {"external_sites": 1}, {"cue": "tag", "bias_strength": 0.0}])
def test_prepare_data_reuses_the_sets_it_wrote(tmp_path, synth):
    """A rerun finds the synthetic sets its options wrote (synth_config.json records only the
    options in use: no external_sites without external sites, no cue options without a cue)."""
    from rich.console import Console

    tiny = {"image_size": 32, "n_train_patients_per_site": 2, "n_val_patients_per_site": 0, "n_test_patients_per_site": 2}
    spec = load_spec(write_spec(tmp_path, {**SPEC, "data": {"seeds": [0], "synth": {**tiny, **synth}}}))
    console = Console(file=io.StringIO())
    bm.prepare_data(spec, tmp_path / "out", console)
    manifest = tmp_path / "out" / "data" / "seed0" / "biased" / "manifest.csv"
    written = manifest.stat().st_mtime_ns
    bm.prepare_data(spec, tmp_path / "out", console)  # nothing to write, nothing refused
    assert manifest.stat().st_mtime_ns == written
    assert console.file.getvalue().count("writing the") == 2  # biased + reference, once


# -- end to end ----------------------------------------------------------------------------------

TINY = {
    "config": "cxr/synthetic.yaml",
    "data": {"seeds": [0], "synth": {"external_sites": 1, "n_train_patients_per_site": 16, "n_val_patients_per_site": 8,
                                     "n_test_patients_per_site": 8, "image_size": 64}},
    "train_seeds": [0],
    "n_boot": 20,
    "set": ["train.epochs=1", "data.preprocess.image_size=32", "model.hidden_dim=8"],
    "recipes": {"vanilla": {"method": "vanilla"}, "reference": {"method": "vanilla", "data": "reference", "label": "no correlation"}},
}  # fmt: skip


def _test_rows(manifest: Path) -> list[dict]:
    with manifest.open(encoding="utf-8") as f:
        return [r for r in csv.DictReader(f) if r["split"] == "test"]


@pytest.mark.slow
def test_benchmark_command_end_to_end_and_resume(tmp_path, monkeypatch, capsys):
    """Two recipes × one data seed × one training seed through `cxrdebias benchmark` (≈ 40 s on
    an idle 2-core CPU: two 1-epoch runs at 32 px in parallel, then two quick re-invocations)."""
    t0 = time.perf_counter()
    out = tmp_path / "bench"
    args = ["benchmark", "--out", out, "--spec", write_spec(tmp_path, TINY), "--jobs", "2", "--allow-dirty"]
    code, stdout, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    assert "2 cells, 0 done, 2 to run, 2 at a time" in err and "failed" not in err
    for name in ("benchmark.json", "benchmark.md", "benchmark.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "benchmark.json").read_text(encoding="utf-8"))
    assert {n: (e["label"], e["n_cells"]) for n, e in saved["recipes"].items()} == {"vanilla": ("vanilla", 1), "reference": ("no correlation", 1)}
    assert [(c["recipe"], c["data_seed"], c["train_seed"]) for c in saved["cells"]] == [("vanilla", 0, 0), ("reference", 0, 0)]
    assert saved["layers"][-1] == "bottleneck" and all(c["select_metric"] for c in saved["cells"])
    # run with --allow-dirty: from a checkout with local changes the rows are marked ◇ with the legend
    mark = " ◇" if saved["dirty"] else ""
    assert "2 of 2 cells finished" in stdout and f"| no correlation{mark} (reference, 100%) | 1 |" in stdout
    assert ("◇ from a dirty tree" in stdout) == saved["dirty"]
    # the reference set: same generator and seed without the correlation; the same test images
    data = out / "data" / "seed0"
    biased, reference = _test_rows(data / "biased" / "manifest.csv"), _test_rows(data / "reference" / "manifest.csv")
    assert biased == reference and {r["site"] for r in biased} == {"hospital_a", "hospital_b", "external_1"}
    assert all((data / "biased" / r["path"]).read_bytes() == (data / "reference" / r["path"]).read_bytes() for r in biased)

    # resume: nothing to run
    runs = {r: Cell(r, 0, 0).folder(out) for r in ("vanilla", "reference")}
    stamps = {r: (f / "results.json").stat().st_mtime_ns for r, f in runs.items()}
    vanilla_report = (runs["vanilla"] / "eval" / "report.json").stat().st_mtime_ns
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 0 and "2 cells, 2 done, 0 to run" in err, err

    # a lost report: only that cell is evaluated again, nothing is retrained
    (runs["reference"] / "eval" / "report.json").unlink()
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 0 and "2 cells, 1 done, 1 to run" in err and "seed0-reference-train0 done" in err, err
    assert (runs["reference"] / "eval" / "report.json").exists()
    assert {r: (f / "results.json").stat().st_mtime_ns for r, f in runs.items()} == stamps
    assert (runs["vanilla"] / "eval" / "report.json").stat().st_mtime_ns == vanilla_report
    logged = [line.split()[2] for line in (out / "logs" / "seed0-reference-train0.log").read_text().splitlines() if line.startswith("$ ")]
    assert logged == ["train", "evaluate", "evaluate"]
    print(f"end-to-end benchmark test: {time.perf_counter() - t0:.0f} s")


def test_a_posthoc_cell_is_evaluated_again_when_its_source_was_retrained(tmp_path):
    # regression: a post-hoc cell counted as done whenever its report existed, so after its source
    # run was trained again (folder deleted, rerun) it kept the evaluation of the old model
    import os

    spec = load_spec(write_spec(tmp_path, SPEC))
    out = tmp_path / "out"
    _fill(out, spec)
    posthoc, end = Cell("posthoc", 0, 0), Cell("end", 0, 0)
    assert bm.cell_done(spec, out, posthoc) and bm.cell_done(spec, out, end)
    later = (posthoc.folder(out) / "eval" / "report.json").stat().st_mtime_ns + 10**9
    os.utime(end.folder(out) / "results.json", ns=(later, later))  # end retrained after the evaluations
    assert not bm.cell_done(spec, out, posthoc) and not bm.cell_done(spec, out, end)
    assert bm.cell_done(spec, out, Cell("posthoc", 1, 1))
    (Cell("vanilla", 1, 1).folder(out) / "results.json").unlink()  # not trained (yet)
    assert not bm.cell_done(spec, out, Cell("vanilla", 1, 1))
    (Cell("end", 1, 1).folder(out) / "results.json").unlink()  # the source is missing: not done
    assert not bm.cell_done(spec, out, Cell("posthoc", 1, 1))


def _summary_for_checks(default_gap, lo, tpr=(0.1, 0.3), tnr=(0.1, 0.3), probe=(0.9, 0.99), ext=(0.7, 0.6)):
    """A hand-built summary: default recipe 'd', baseline 'v' (only what target_checks reads)."""
    def m(mean, ci=(float("nan"), float("nan"))):
        return {"n": 3, "mean": mean, "sd": 0.01, "ci": list(ci)}

    def recipe(tpr_gap, tnr_gap, probe_mean, ext_v):
        return {"label": "x", "metrics": {"tpr_gap": m(tpr_gap), "tnr_gap": m(tnr_gap), "probe": m(probe_mean),
                                          "external_ba": m(ext_v), "external_auroc": m(ext_v)},
                "probe_layers": {"block1": m(probe_mean)}}

    d = recipe(tpr[0], tnr[0], probe[0], ext[0])
    d["gap_closed"] = {k: {"value": default_gap, "ci": [default_gap - 0.1, default_gap + 0.1], "gap": {}} for k in ("worst_site_ba", "mean_site_auroc")}
    d["vs_baseline"] = {"worst_site_ba": {"mean": 0.05, "ci": [lo, lo + 0.1], "significant": lo > 0}}
    return {"recipes": {"d": d, "v": recipe(tpr[1], tnr[1], probe[1], ext[1])}, "layers": ["block1"]}


def test_target_checks_pass_and_fail_by_hand():
    from cxrdebias.experiments.benchmark import BenchmarkSpec
    from cxrdebias.experiments.benchmark_table import target_checks

    spec = BenchmarkSpec.model_validate({"baseline": "v", "reference": None, "default": "d",
                                         "recipes": {"v": {"method": "vanilla"}, "d": {"method": "end"}}})
    good = target_checks(spec, _summary_for_checks(0.7, 0.01))
    # gap closed ×2, paired CI, TPR gap, TNR gap, probe per layer, external BA, external AUROC
    assert [c["passed"] for c in good] == [True] * 8
    bad = target_checks(spec, _summary_for_checks(0.5, -0.01, tpr=(0.2, 0.3), probe=(0.995, 0.99), ext=(0.5, 0.6)))
    assert [c["passed"] for c in bad] == [False, True, False, False, True, False, False, False]
    assert "block1 0.995 vs 0.990" in bad[5]["value"]
    nan = target_checks(spec, _summary_for_checks(float("nan"), float("nan")))
    assert nan[0]["passed"] is None and nan[2]["passed"] is None
    assert target_checks(spec.model_copy(update={"default": None}), _summary_for_checks(0.7, 0.01)) == []


def test_publish_writes_the_marked_block_the_json_and_the_plot(tmp_path):
    import json

    import pytest

    from cxrdebias.errors import ConfigError
    from cxrdebias.experiments.benchmark_table import publish

    docs = tmp_path / "cxr.md"
    docs.write_text("intro\n<!-- benchmark:demo:start -->\nold\n<!-- benchmark:demo:end -->\nafter\n")
    png = tmp_path / "b.png"
    png.write_bytes(b"\x89PNG fake")
    table = {"markdown": "# title\n\n## section\n\n| a |\n", "json": {"x": None}}
    md, js = publish(table, docs, "demo", plot=png)
    text = docs.read_text()
    assert text.startswith("intro\n<!-- benchmark:demo:start -->\n### title\n\n#### section\n")
    assert "old" not in text and text.endswith("<!-- benchmark:demo:end -->\nafter\n")
    assert "results/benchmark/demo.json" in text
    assert json.loads(js.read_text()) == {"x": None} and js == tmp_path / "results" / "benchmark" / "demo.json"
    assert js.with_suffix(".png").read_bytes() == png.read_bytes()
    with pytest.raises(ConfigError, match="benchmark:other:start"):
        publish(table, docs, "other")
    for bad in ("../escape", "a/b", "", ".hidden"):  # the name becomes a file name under results/
        with pytest.raises(ConfigError, match="letters, digits"):
            publish(table, docs, bad)
    assert not (tmp_path / "escape.json").exists()


def test_the_table_states_the_training_precision_and_a_mix_of_them(tmp_path):
    spec = load_spec(write_spec(tmp_path, SPEC))
    _fill(tmp_path / "out", spec)
    for cell in cells(spec):  # hand-built cells: no precision recorded
        results = cell.folder(tmp_path / "out") / "results.json"
        if results.exists():
            doc = json.loads(results.read_text())
            doc["train"] = {**doc.get("train", {}), "precision": "bf16" if cell.recipe == "end" else "fp32"}
            results.write_text(json.dumps(doc))
    table = build_table(spec, tmp_path / "out")
    assert table["summary"]["precisions"]["end"] == ["bf16"] and table["summary"]["precisions"]["vanilla"] == ["fp32"]
    assert "- training precision: **mixed** — EnD: bf16; reference: fp32; vanilla: fp32; lnl: fp32; posthoc: bf16" in table["markdown"]
    _fill(tmp_path / "same", spec)
    assert "- training precision: not recorded" in build_table(spec, tmp_path / "same")["markdown"]


def test_an_interrupt_reaches_the_running_cells_and_starts_no_more(tmp_path):
    """Ctrl-C during a benchmark: every running cell process gets SIGINT (it checkpoints and
    stops) and no further process is started (the old pool started the next cells)."""
    import subprocess
    import sys
    import threading
    import time

    from cxrdebias.experiments.benchmark import INTERRUPTED, Children

    children = Children()
    codes = []
    log = (tmp_path / "log").open("w")
    # the child says when its interpreter runs: a SIGINT that lands between fork and exec is
    # taken by the parent's handler copy and lost with the exec (under load that window is long)
    # (and restores Python's SIGINT handler: a shell's background job, e.g. `./.ci/run &`, starts
    # with SIGINT ignored, and Python then keeps it ignored)
    sleeper = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, signal.default_int_handler); "
               "print('ready', flush=True); time.sleep(30)"]  # fmt: skip
    worker = threading.Thread(target=lambda: codes.append(children.run(sleeper, log, {})))
    worker.start()
    deadline = time.perf_counter() + 60
    while "ready" not in (tmp_path / "log").read_text() and time.perf_counter() < deadline:
        time.sleep(0.01)
    assert children.running
    t0 = time.perf_counter()
    children.stop()
    worker.join(10)
    assert not worker.is_alive() and time.perf_counter() - t0 < 10
    assert codes and codes[0] != 0  # the child was interrupted (KeyboardInterrupt: exit 1 or -SIGINT)
    started = []
    real_popen = subprocess.Popen
    subprocess.Popen = lambda *a, **k: started.append(a) or real_popen(*a, **k)
    try:
        assert children.run(sleeper, log, {}) == INTERRUPTED
    finally:
        subprocess.Popen = real_popen
    assert started == []


def test_the_reference_set_also_removes_a_label_correlated_cue(tmp_path):
    """With a cue in data.synth, the reference set is shortcut-free: no site–label correlation and
    the cue at its (uncorrelated) test rates in train/val too; its test images equal the biased set's."""
    from cxrdebias.experiments.benchmark import reference_options

    assert reference_options({"external_sites": 1}) == {}
    opts = {"cue": "tag", "cue_positive_rate": 0.95, "cue_negative_rate": 0.05, "image_size": 48}
    assert reference_options(opts) == {"cue_positive_rate": 0.5, "cue_negative_rate": 0.5}


def test_recipes_filter_keeps_the_default_and_the_spec_order():
    """--recipes naming neither the default nor the baseline keeps both (a spec whose default was
    filtered out was refused: 'default … is not a recipe'), in the spec's order."""
    spec = load_spec(None, recipes=["auto", "end"])
    assert list(spec.recipes) == [r for r in load_spec().recipes if r in {"vanilla", "reference", spec.default, "end", "auto"}]
    assert list(spec.recipes)[0] == "vanilla" and spec.default in spec.recipes


_PARENT = """
import sys
from pathlib import Path

from cxrdebias.console import make_console
from cxrdebias.experiments.benchmark import Children, Progress, run_jobs

out = Path(sys.argv[1])
children = Children()
child = [sys.executable, "-c", "import os, pathlib, signal, sys, time; signal.signal(signal.SIGINT, signal.default_int_handler); "
         "pathlib.Path(sys.argv[1]).write_text(str(os.getpid())); time.sleep(60)", str(out / "child.pid")]


def run_one(job):
    with (out / "log").open("w") as log:
        return job, children.run(child, log, {}), 0.0


try:
    run_jobs([1], run_one, jobs=1, children=children, progress=Progress(1, make_console(stderr=True)), name=str, log=lambda j: out / "log")
except KeyboardInterrupt as exc:
    sys.exit(128 + getattr(exc, "signum", 2))
"""


def test_sigterm_stops_the_running_cells_instead_of_orphaning_them(tmp_path):
    """`kill` (SIGTERM) of a benchmark/sweep process: its cell processes get SIGINT (they
    checkpoint and stop) before it exits with 143. Before, the parent died at once and the cells
    trained on as orphans — a rerun then trained beside them into the same run folders."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(tmp_path)], cwd=REPO)
    pid_file, child = tmp_path / "child.pid", None
    try:
        deadline = time.perf_counter() + 60
        while not (pid_file.exists() and pid_file.read_text()) and time.perf_counter() < deadline:
            time.sleep(0.05)
        child = int(pid_file.read_text())
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(30) == 143
        with pytest.raises(ProcessLookupError):  # stopped and reaped by the parent before it exited
            os.kill(child, 0)
    finally:
        parent.kill()
        if child is not None:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_the_heartbeat_lists_the_running_jobs_not_the_queued_ones(tmp_path):
    """A queued job whose log holds an earlier attempt's lines (a resumed sweep) was listed as
    running ("p07 starting" / "epoch 3 done") while only one job at a time ran."""
    import threading

    from cxrdebias.console import make_console
    from cxrdebias.experiments.benchmark import Children, Progress, run_jobs

    for job in ("a", "b"):
        (tmp_path / f"{job}.log").write_text("epoch 3\n")  # both have logs from an earlier attempt
    release = threading.Event()

    def run_one(job):
        if job == "a":
            release.wait(10)
        return job, 0, 0.0

    console = make_console(stderr=False, record=True, width=200)
    timer = threading.Timer(0.5, release.set)
    timer.start()
    try:
        run_jobs(["a", "b"], run_one, jobs=1, children=Children(), progress=Progress(2, console), name=str,
                 log=lambda j: tmp_path / f"{j}.log", heartbeat_s=0.1)  # fmt: skip
    finally:
        timer.cancel()
    beats = [line for line in console.export_text().splitlines() if line.startswith("running:")]
    assert beats and all(line == "running: a epoch 3 done" for line in beats)
