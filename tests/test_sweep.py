"""``cxrdebias sweep``: the grid, the validation value of a run, the pick, resuming, dirty trees."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import cxrdebias.experiments.benchmark as bm
from cxrdebias.errors import ConfigError
from cxrdebias.experiments.benchmark import resume_option
from cxrdebias.experiments.sweep import (
    SweepSpec,
    collect,
    parse_grid,
    point_name,
    read_grid_file,
    to_markdown,
    validation_value,
)
from cxrdebias.training.provenance import code_version
from tests.conftest import REPO, run_cli, write_idx

CLEAN = {"package": "0", "git_commit": "0123456789abcdef", "git_dirty": False}
DIRTY = {**CLEAN, "git_dirty": True}
CFG = str(REPO / "configs" / "biased_mnist" / "rho0.997.yaml")  # EnD, alpha 5, beta 0.5


def test_grid_from_options_and_file(tmp_path):
    assert parse_grid(["end.alpha=0.1,1,5", "method.beta=0.5"], "end") == {"method.alpha": ["0.1", "1", "5"], "method.beta": ["0.5"]}
    for bad in ("alpha", "method.alpha=", "=1,2"):
        with pytest.raises(ConfigError, match="KEY=VALUE1,VALUE2"):
            parse_grid([bad], "end")
    with pytest.raises(ConfigError, match="given twice"):
        parse_grid(["end.alpha=1", "method.alpha=2"], "end")
    f = tmp_path / "grid.yaml"
    f.write_text("end.alpha: [0.1, 5]\ntrain.precision: [fp32]\nmodel.normalize_features: [true, false]\n")
    assert read_grid_file(f, "end") == {"method.alpha": ["0.1", "5"], "train.precision": ["fp32"], "model.normalize_features": ["true", "false"]}
    f.write_text("end.alpha: 0.1\n")
    with pytest.raises(ConfigError, match="non-empty lists"):
        read_grid_file(f, "end")


def test_points_in_grid_order_with_safe_names():
    spec = SweepSpec(config=CFG, method="end", grid={"method.alpha": ["0.1", "5"], "method.beta": ["0.5", "1"]})
    assert spec.points() == [
        {"method.alpha": "0.1", "method.beta": "0.5"}, {"method.alpha": "0.1", "method.beta": "1"},
        {"method.alpha": "5", "method.beta": "0.5"}, {"method.alpha": "5", "method.beta": "1"},
    ]  # fmt: skip
    assert point_name(3, spec.points()[3]) == "p03-alpha=5-beta=1"
    assert point_name(0, {"data.root": "../a b/c"}) == "p00-root=.._a_b_c"


def _metrics(run: Path, vals: list[dict | None]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    lines = [{"epoch": e, "train": {"loss": 1.0}, **({"val": v} if v is not None else {})} for e, v in enumerate(vals, 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_run_seconds_sum_the_training_and_validation_time_of_every_epoch(tmp_path):
    from cxrdebias.experiments.sweep import run_seconds

    _metrics(tmp_path, [None, {"accuracy": 0.1}])
    assert run_seconds(tmp_path) is None  # no epoch recorded a time
    lines = [{"epoch": 1, "train": {"time_s": 80.5}}, {"epoch": 2, "train": {"time_s": 79.5}, "val": {"accuracy": 0.1}, "eval_time_s": 7.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert run_seconds(tmp_path) == 167.0


def test_validation_value_is_the_reported_epochs(tmp_path):
    _metrics(tmp_path, [{"accuracy": 0.2, "loss": 3.0}, None, {"accuracy": 0.6, "loss": 1.0}, {"accuracy": 0.5, "loss": 2.0}])
    assert validation_value(tmp_path, "accuracy", None, "max") == {"value": 0.5, "epoch": 4}  # last epoch
    assert validation_value(tmp_path, "accuracy", "accuracy", "max") == {"value": 0.6, "epoch": 3}  # the selected epoch
    assert validation_value(tmp_path, "accuracy", "loss", "min") == {"value": 0.6, "epoch": 3}
    assert validation_value(tmp_path, "loss", "loss", "max") == {"value": 3.0, "epoch": 1}
    with pytest.raises(ConfigError, match="not a validation metric.*accuracy, loss"):
        validation_value(tmp_path, "auroc", None, "max")


def _fake_run(out: Path, name: str, seed: int, val: float, test: float, version=CLEAN) -> None:
    """A finished run whose validation and test rank the points in opposite orders."""
    run = out / "runs" / name / f"seed{seed}"
    _metrics(run, [{"accuracy": val}])
    (run / "run.json").write_text(json.dumps({"code_version": version}))
    (run / "config.yaml").write_text("train: {select_metric: null}\n")
    (run / "results.json").write_text(json.dumps({"metrics": {"unbiased_accuracy": test, "val_accuracy": val}}))


def test_collect_picks_by_validation_mean_never_by_test(tmp_path):
    spec = SweepSpec(config=CFG, method="end", grid={"method.alpha": ["0.1", "1", "5"]}, train_seeds=[1, 2])
    names = [point_name(i, p) for i, p in enumerate(spec.points())]
    _fake_run(tmp_path, names[0], 1, 0.40, 0.987654)
    _fake_run(tmp_path, names[0], 2, 0.50, 0.987654)  # mean 0.45, the best test
    _fake_run(tmp_path, names[1], 1, 0.60, 0.10)
    _fake_run(tmp_path, names[1], 2, 0.40, 0.10)  # mean 0.50: the best validation
    _fake_run(tmp_path, names[2], 1, 0.90, 0.50)  # best single value, but seed 2 missing: not picked
    record = collect(spec, tmp_path, CLEAN)
    assert record["best"] == names[1] and record["best_point"] == {"method.alpha": "1"}
    assert [p["mean"] for p in record["points"]] == pytest.approx([0.45, 0.50, 0.90])
    assert [p["complete"] for p in record["points"]] == [True, True, False]
    text = json.dumps(record)
    assert "0.987654" not in text and "unbiased" not in text and "0.1," not in text  # no test number anywhere
    assert record["dirty"] is False
    md = to_markdown(record)
    assert f"| **{names[1]}** | **1** | **0.6000** | **0.4000** | **0.5000** |" in md
    assert f"| {names[2]} | 5 | 0.9000 | – | 0.9000 |" in md
    lower = collect(spec.model_copy(update={"mode": "min"}), tmp_path, CLEAN)
    assert lower["best"] == names[0]


def test_a_tie_goes_to_the_starting_point_when_it_is_among_the_tied_ones(tmp_path):
    """Every point of the ReBias sweep ended at the same validation value (colour-only); the
    first in grid order (the smallest λ, λ_g) was picked, an arbitrary move off the published
    values. A tie now keeps the starting config's values when the grid holds them."""
    spec = SweepSpec(config=CFG, method="end", grid={"method.alpha": ["0.5", "5", "50"]}, train_seeds=[1])
    names = [point_name(i, p) for i, p in enumerate(spec.points())]
    for name in names:
        _fake_run(tmp_path, name, 1, 0.0986, 0.5)
    record = collect(spec, tmp_path, CLEAN)
    assert record["start"] == {"values": {"method.alpha": 5.0}, "point": names[1]}
    assert record["best"] == names[1] and record["ties"] == names
    assert "**3 of 3 points tie** at the best value; the tie goes to the starting point" in to_markdown(record)
    # the starting point not tied: the first of the tied ones in grid order
    _fake_run(tmp_path, names[1], 1, 0.05, 0.5)
    record = collect(spec, tmp_path, CLEAN)
    assert record["best"] == names[0] and record["ties"] == [names[0], names[2]]
    assert "the starting point is not among them, so the tie goes to the first in grid order" in to_markdown(record)
    # a clear best: no tie line
    _fake_run(tmp_path, names[2], 1, 0.2, 0.5)
    record = collect(spec, tmp_path, CLEAN)
    assert record["best"] == names[2] and record["ties"] == [] and "tie" not in to_markdown(record)


def test_collect_keeps_each_epochs_validation_and_the_pick_at_each_epoch(tmp_path):
    """Point 0 leads at epoch 2 (mean 0.35 vs 0.30), point 1 at epoch 4 (0.55 vs 0.40): runs cut
    at epoch 2 would pick point 0, the full runs point 1. Point 2 misses a seed: never picked."""
    spec = SweepSpec(config=CFG, method="end", grid={"method.alpha": ["1", "10", "100"]}, train_seeds=[1, 2])
    names = [point_name(i, p) for i, p in enumerate(spec.points())]
    curves = {(0, 1): [0.3, 0.4], (0, 2): [0.4, 0.4], (1, 1): [0.2, 0.5], (1, 2): [0.4, 0.6], (2, 1): [0.9, 0.9]}
    for (i, seed), (v2, v4) in curves.items():
        _fake_run(tmp_path, names[i], seed, 0.0, 0.0)
        _metrics(tmp_path / "runs" / names[i] / f"seed{seed}", [None, {"accuracy": v2}, None, {"accuracy": v4}])
    record = collect(spec, tmp_path, CLEAN)
    assert record["points"][1]["seeds"]["2"]["history"] == {"2": 0.4, "4": 0.6}
    assert record["best"] == names[1]
    assert record["pick_by_epoch"] == [{"epoch": 2, "best": names[0]}, {"epoch": 4, "best": names[1]}]
    assert f"epoch 2: {names[0]}; epoch 4: {names[1]}." in to_markdown(record)
    later = collect(spec, tmp_path, {**CLEAN, "git_commit": "fedcba9876543210"})  # re-collected by a later commit
    assert f"- code: runs from {CLEAN['git_commit'][:10]}; this table written by fedcba9876\n" in to_markdown(later)
    assert collect(spec.model_copy(update={"mode": "min"}), tmp_path, CLEAN)["pick_by_epoch"][0] == {"epoch": 2, "best": names[1]}


def test_collect_refuses_a_run_from_a_dirty_tree_unless_allowed_then_marks_it(tmp_path):
    spec = SweepSpec(config=CFG, method="end", grid={"method.alpha": ["1", "2"]}, train_seeds=[0])
    names = [point_name(i, p) for i, p in enumerate(spec.points())]
    _fake_run(tmp_path, names[0], 0, 0.5, 0.5, version=DIRTY)
    _fake_run(tmp_path, names[1], 0, 0.4, 0.5)
    with pytest.raises(ConfigError, match=rf"1 result\(s\) were produced with uncommitted changes \({names[0]}-seed0\).*--allow-dirty"):
        collect(spec, tmp_path, CLEAN)
    record = collect(spec, tmp_path, CLEAN, allow_dirty=True)
    md = to_markdown(record)
    assert record["dirty"] is True and [p["dirty"] for p in record["points"]] == [True, False]
    assert "(dirty: uncommitted changes)" in md and f"| **{names[0]} ◇** |" in md and f"| {names[1]} |" in md
    assert "◇ from a dirty tree" in md


def test_resume_option(tmp_path):
    train = ["python", "-m", "train"]
    assert resume_option(train, tmp_path / "new") == [train]
    (tmp_path / "started").mkdir()
    assert resume_option(train, tmp_path / "started") == [[*train, "--force"]]
    (tmp_path / "started" / "checkpoints").mkdir()
    (tmp_path / "started" / "checkpoints" / "last.pt").write_bytes(b"x")
    assert resume_option(train, tmp_path / "started") == [[*train, "--resume"]]
    (tmp_path / "started" / "results.json").write_text("{}")
    assert resume_option(train, tmp_path / "started") == []


def _squares(root: Path) -> Path:
    """MNIST-layout digits a small CNN separates in one epoch: class c is a centred white square
    of side 2c + 4 (its area survives global pooling)."""
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    for prefix, n in (("train", 300), ("t10k", 100)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        images = np.zeros((n, 28, 28), np.uint8)
        for i, c in enumerate(labels):
            side = 2 * int(c) + 4
            o = (28 - side) // 2
            images[i, o : o + side, o : o + side] = 255
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def test_sweep_end_to_end_picks_the_learning_point_resumes_and_refuses_dirty(tmp_path, monkeypatch, capsys):
    """Two points, one epoch: lr 1e-9 leaves the network at its initialisation (validation at
    chance, 0.1 on the balanced ρ = 0.1 validation set), lr 3e-3 learns the square sizes (no
    colour shortcut at ρ = 0.1). The sweep must pick the second."""
    root = _squares(tmp_path / "mnist")
    base = tmp_path / "base.yaml"
    base.write_text(
        f"name: tiny\nseed: 0\ndata: {{kind: biased_mnist, root: {root}, rho: 0.1, val_fraction: 0.3}}\n"
        "model: {arch: simple_conv, kernel_size: 3}\nmethod: {name: vanilla}\n"
        "train: {epochs: 1, batch_size: 10, lr: 0.001, eval_every: 1, precision: fp32}\n"
    )
    out = tmp_path / "sweep"
    args = ["sweep", "--config", base, "--method", "vanilla", "--grid", "train.lr=1e-9,0.003", "--seeds", "0", "--out", out, "--jobs", "2"]
    monkeypatch.setattr(bm, "code_version", lambda: DIRTY)
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 2 and "uncommitted changes" in err and "--allow-dirty" in err and not (out / "runs").exists()

    # --allow-dirty runs anyway and records the dirty tree
    code, stdout, err = run_cli([*args, "--allow-dirty"], monkeypatch, capsys)
    assert code == 0, err
    record = json.loads((out / "sweep.json").read_text())
    assert record["code_version"] == DIRTY and record["dirty"] is True and "(dirty: uncommitted changes)" in stdout
    vals = {p["name"]: p["seeds"]["0"]["value"] for p in record["points"]}
    assert vals["p00-lr=1e-9"] == pytest.approx(0.1)
    assert vals["p01-lr=0.003"] > 0.15
    assert record["best"] == "p01-lr=0.003" and record["best_point"] == {"train.lr": "0.003"}
    for p in record["points"]:  # the value is the run's own last validation line
        last = json.loads((out / "runs" / p["name"] / "seed0" / "metrics.jsonl").read_text().splitlines()[-1])
        assert p["seeds"]["0"]["value"] == last["val"]["accuracy"]
    # the runs are subprocesses: they record this checkout's real state; from a tree with local
    # changes (development) their results are dirty and a clean sweep needs --allow-dirty to show them
    real_dirty = bool(code_version()["git_dirty"])
    mark = " ◇" if real_dirty else ""
    assert all(p["dirty"] is real_dirty for p in record["points"])
    assert "unbiased" not in (out / "sweep.json").read_text() and f"**p01-lr=0.003{mark}**" in stdout
    args += ["--allow-dirty"] if real_dirty else []
    monkeypatch.setattr(bm, "code_version", lambda: CLEAN)

    finished = {p: (out / "runs" / p / "seed0" / "results.json").stat().st_mtime_ns for p in vals}
    docs = tmp_path / "docs" / "r.md"
    docs.parent.mkdir()
    docs.write_text("<!-- sweep:tiny:start -->\n<!-- sweep:tiny:end -->\n")
    code, _, err = run_cli([*args, "--docs", docs, "--name", "tiny"], monkeypatch, capsys)
    assert code == 0 and "2 done, 0 to run" in err
    record = json.loads((tmp_path / "docs" / "results" / "sweep" / "tiny.json").read_text())
    assert record["best"] == "p01-lr=0.003" and record["code_version"] == CLEAN and record["dirty"] is real_dirty
    assert "| train.lr |" in docs.read_text()
    assert {p: (out / "runs" / p / "seed0" / "results.json").stat().st_mtime_ns for p in vals} == finished

    code, _, err = run_cli([*args[:6], "train.lr=1e-9,0.01", *args[7:]], monkeypatch, capsys)
    assert code == 2 and "other settings (grid differ)" in err
    # another validation metric re-reads the same runs (nothing trains), and a wrong one is named
    code, stdout, err = run_cli([*args, "--metric", "conflicting_accuracy"], monkeypatch, capsys)
    assert code == 0 and "2 done, 0 to run" in err and "val conflicting_accuracy s0" in stdout
    code, _, err = run_cli([*args, "--metric", "auroc"], monkeypatch, capsys)
    assert code == 2 and "--metric 'auroc': not a validation metric" in err and "conflicting_accuracy" in err


def test_publish_writes_the_sweep_block_and_json_beside_the_docs(tmp_path):
    from cxrdebias.experiments.benchmark_table import publish

    spec = SweepSpec(config=CFG, method="end", grid={"method.alpha": ["0.1", "1"]}, train_seeds=[0])
    names = [point_name(i, p) for i, p in enumerate(spec.points())]
    _fake_run(tmp_path / "sw", names[0], 0, 0.3, 0.9)
    _fake_run(tmp_path / "sw", names[1], 0, 0.6, 0.1)
    record = collect(spec, tmp_path / "sw", CLEAN)
    docs = tmp_path / "docs" / "reproduction.md"
    docs.parent.mkdir()
    docs.write_text("# R\n\n<!-- sweep:end-0.997:start -->\nold\n<!-- sweep:end-0.997:end -->\nafter\n")
    md, js = publish({"markdown": to_markdown(record), "json": record}, docs, "end-0.997", kind="sweep")
    assert js == tmp_path / "docs" / "results" / "sweep" / "end-0.997.json"
    assert json.loads(js.read_text())["best"] == names[1]
    text = docs.read_text()
    assert "old" not in text and "### Sweep: end" in text and f"| **{names[1]}** |" in text and text.endswith("after\n")
    assert "Numbers: `results/sweep/end-0.997.json`." in text
    with pytest.raises(ConfigError, match="sweep:other:start"):
        publish({"markdown": "x", "json": {}}, docs, "other", kind="sweep")


@pytest.mark.parametrize("grid_file", sorted((REPO / "configs" / "sweeps" / "biased_mnist").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_sweep_grids_are_valid_and_centred_on_the_starting_values(grid_file):
    """Each Table 1 method's grid (file name = method): every point a valid config, 3 x 3 points,
    the middle value of each key the method's starting value (the recorded sweep's for EnD, the
    package default otherwise — the published values where the papers give them; issue 25)."""
    from cxrdebias.debias import METHODS
    from cxrdebias.experiments.sweep import check_spec, read_grid_file

    method = grid_file.stem
    config = REPO / "configs" / "biased_mnist" / "rho0.997.yaml"
    grid = read_grid_file(grid_file, method)
    spec = SweepSpec(config=str(config), method=method, grid=grid)
    check_spec(spec)
    assert len(spec.points()) == 9 and all(len(v) == 3 for v in grid.values())
    start = METHODS[method].Options().model_dump()  # the package defaults
    if method == "end":
        start = {"alpha": 5.0, "beta": 0.5}  # the recorded sweep's centre: the configs' values then
    # the keys a sweep varies are in Table 1's cell names, so each point's runs keep their own files
    from cxrdebias.experiments.tables import CELL_OPTIONS

    assert {k.removeprefix("method.") for k in grid} <= {k for k, _ in CELL_OPTIONS[method]}
    for key, values in grid.items():
        default = float(start[key.removeprefix("method.")])
        # centred; a default of 0 (the option off: GroupDRO's adjustment, a linear bias head) is the first value
        assert float(values[0 if default == 0 else 1]) == default, key
