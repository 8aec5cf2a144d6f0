"""``cxrdebias sweep``: a hyperparameter grid of one method, picked on validation only.

A :class:`SweepSpec` names a base config, a method, a grid (config key → values; every
combination is a *point*), the training seeds, an optional data seed and the validation metric.
:func:`run_sweep`

1. refuses a checkout with local changes unless ``allow_dirty`` and an output folder made with
   another spec (training seeds may be added) — the machinery of ``cxrdebias benchmark``
   (:mod:`cxrdebias.experiments.benchmark`);
2. runs every point × training seed as its own ``cxrdebias reproduce …`` / ``train`` process
   (the protocol's command), ``jobs`` at a time with one thread each, a log per run in
   ``OUT/logs/``; a finished run is skipped, an interrupted one resumes from its checkpoint;
3. :func:`collect` reads each run's **validation** metric from its ``metrics.jsonl`` (the
   per-epoch training log: it has no test numbers; ``results.json``, which has them, is only
   checked for existence) at the epoch the run reports (the last, or the best one by
   ``train.select_metric``), averages it over the training seeds and picks the best point. The
   sweep JSON and table hold no test metric, so nothing downstream can pick by one. Each run's
   validation at every evaluated epoch is kept too, with the point the sweep would pick at each
   of those epochs (:func:`pick_by_epoch`): whether a shorter schedule would choose alike.

Layout: ``OUT/spec.json``, ``OUT/runs/<point>/seed<S>/`` (run folders), ``OUT/logs/<point>-seed<S>.log``,
``OUT/sweep.json`` and ``OUT/sweep.md``.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError
from rich.console import Console

from cxrdebias.config import StrictConfig
from cxrdebias.console import esc, make_console
from cxrdebias.errors import ConfigError, DataError
from cxrdebias.experiments.benchmark import (
    Children,
    Progress,
    check_clean,
    check_cwd_package,
    cli_command,
    resume_option,
    run_jobs,
    run_logged,
)
from cxrdebias.experiments.benchmark_spec import problems, read_yaml
from cxrdebias.experiments.dirty import DIRTY_MARK, check_dirty, is_dirty, legend
from cxrdebias.fileio import write_json_atomic, write_text_atomic

_SAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


class SweepSpec(StrictConfig):
    """What a sweep runs (``OUT/spec.json``)."""

    config: str = Field(description="base training config (YAML path)")
    method: str = Field(description="the method swept (`cxrdebias methods`)")
    grid: dict[str, list[str]] = Field(min_length=1, description="config key → the values tried (YAML value syntax, as --set)")
    train_seeds: list[int] = Field(default_factory=lambda: [42], min_length=1)
    data_seed: int | None = Field(None, description="data.seed of every run (protocols whose data has a seed of its own)")
    metric: str = Field("accuracy", description="validation metric that picks the point")
    mode: Literal["max", "min"] = "max"
    set: list[str] = Field(default_factory=list, description="config overrides of every point KEY=VALUE")

    def points(self) -> list[dict[str, str]]:
        """Every combination of the grid, in grid order (the first key varies slowest)."""
        keys = list(self.grid)
        return [dict(zip(keys, values, strict=True)) for values in itertools.product(*self.grid.values())]


def point_name(index: int, point: dict[str, str]) -> str:
    """A folder name: ``p<index>-<key>=<value>…`` with only safe characters."""
    body = "-".join(f"{k.split('.')[-1]}={v}" for k, v in point.items())
    return _SAFE.sub("_", f"p{index:02d}-{body}")[:120]


def parse_grid(items: list[str], method: str) -> dict[str, list[str]]:
    """``--grid KEY=V1,V2,…`` items → ``{KEY: [V1, V2, …]}``; ``<method>.KEY`` means ``method.KEY``."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not vals:
            raise ConfigError(f"--grid {item!r}: expected KEY=VALUE1,VALUE2,… such as method.alpha=0.1,1,5")
        key = "method." + key.removeprefix(f"{method}.") if key.startswith(f"{method}.") else key
        if key in grid:
            raise ConfigError(f"--grid {key}: given twice")
        grid[key] = vals
    return grid


def read_grid_file(path: str | Path, method: str) -> dict[str, list[str]]:
    """A YAML mapping ``KEY: [values]`` (a YAML file's grid) in :func:`parse_grid`'s form."""
    path = Path(path)
    tree = read_yaml(path, "the grid")
    if not isinstance(tree, dict) or not all(isinstance(v, list) and v for v in tree.values()):
        raise ConfigError(f"{path}: expected a mapping of config keys to non-empty lists of values, e.g. method.alpha: [0.1, 1, 5]")
    items = [f"{k}={','.join(v if isinstance(v, str) else json.dumps(v) for v in vals)}" for k, vals in tree.items()]
    return parse_grid(items, method)


def _point_config(spec: SweepSpec, point: dict[str, str], seed: int) -> Any:
    """The config one run of ``point`` trains with (as its command line builds it)."""
    from cxrdebias.experiments.config import build_config

    overrides = [*spec.set, *(f"{k}={v}" for k, v in point.items())]
    if spec.data_seed is not None:
        overrides.append(f"data.seed={spec.data_seed}")
    return build_config(spec.config, method=spec.method, options={"seed": seed}, overrides=overrides)


def check_spec(spec: SweepSpec) -> str:
    """Every point's config is valid (one line naming the point otherwise); the protocol's
    command (``reproduce biased-mnist``, ``train`` …) that runs them."""
    from cxrdebias.experiments import protocols

    kinds = set()
    for i, point in enumerate(spec.points()):
        try:
            cfg = _point_config(spec, point, spec.train_seeds[0])
        except ConfigError as exc:
            raise ConfigError(f"sweep point {point_name(i, point)}: {exc}") from None
        if spec.data_seed is not None and "seed" not in type(cfg.data).model_fields:
            raise ConfigError(f"--data-seed: data.kind {cfg.data.kind!r} draws its data from the training seed (`seed`); it has no data.seed")
        if cfg.method.name != spec.method:
            raise ConfigError(f"--grid method.name: the sweep is of method {spec.method!r}")
        kinds.add(cfg.data.kind)
    if len(kinds) != 1:
        raise ConfigError(f"the grid changes data.kind ({', '.join(sorted(kinds))}); sweep one protocol at a time")
    return protocols.get(kinds.pop()).command.removeprefix("cxrdebias ")


def runs(spec: SweepSpec) -> list[tuple[str, dict[str, str], int]]:
    """Every run: (point name, point, training seed), by point then seed."""
    return [(point_name(i, p), p, s) for i, p in enumerate(spec.points()) for s in spec.train_seeds]


def check_spec_folder(spec: SweepSpec, out: Path) -> SweepSpec:
    """``OUT/spec.json``: a rerun must ask for the same runs (training seeds may be added; the
    metric and mode only read the runs, so another one re-tabulates the same runs); the spec of
    the folder (seeds merged) is written and returned."""
    path = out / "spec.json"
    now = spec.model_dump(mode="json")
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = [k for k in now if k not in ("train_seeds", "metric", "mode") and old.get(k) != now[k]]
        if changed:
            raise ConfigError(f"{out}: holds a sweep with other settings ({', '.join(changed)} differ); use another --out")
        now["train_seeds"] = sorted(set(old["train_seeds"]) | set(now["train_seeds"]))
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, now)
    return SweepSpec.model_validate(now)


def _train_command(spec: SweepSpec, command: str, point: dict[str, str], seed: int, folder: Path) -> list[str]:
    cmd = [*cli_command(), *command.split(), "--config", spec.config, "--method", spec.method, "--seed", str(seed), "--out", str(folder),
           "--set", "train.num_threads=1", "--set", "train.progress=false"]  # fmt: skip
    if spec.data_seed is not None:
        cmd += ["--set", f"data.seed={spec.data_seed}"]
    for item in [*spec.set, *(f"{k}={v}" for k, v in point.items())]:
        cmd += ["--set", item]
    return cmd


def run_sweep(
    spec: SweepSpec,
    out: str | Path,
    *,
    jobs: int = 2,
    allow_dirty: bool = False,
    heartbeat_s: float = 60.0,
    console: Console | None = None,
) -> tuple[dict[str, Any], list[tuple[Any, int]]]:
    """Run the unfinished runs of ``spec`` into ``out`` and write ``sweep.json``/``sweep.md``
    from every finished run (module doc); (the sweep record, the failed runs with their exit status)."""
    console = console or make_console(stderr=True)
    out = Path(out)
    if jobs < 1:
        raise ConfigError(f"--jobs: expected 1 or more, got {jobs}")
    version = check_clean(allow_dirty)
    check_cwd_package()
    command = check_spec(spec)
    spec = check_spec_folder(spec, out)
    todo = [r for r in runs(spec) if not (_folder(out, r) / "results.json").exists()]
    total = len(runs(spec))
    console.print(f"sweep → {esc(out)}: {len(spec.points())} points × {len(spec.train_seeds)} seeds, {total - len(todo)} done, "
                  f"{len(todo)} to run, {jobs} at a time")  # fmt: skip
    children = Children()

    def run_one(r: tuple[str, dict[str, str], int]) -> tuple[Any, int, float]:
        t0 = time.perf_counter()
        cmds = resume_option(_train_command(spec, command, r[1], r[2], _folder(out, r)), _folder(out, r))
        return r, run_logged(cmds, _log(out, r), children), time.perf_counter() - t0

    failed = run_jobs(
        todo, run_one, jobs=jobs, children=children, progress=Progress(len(todo), console),
        name=_name, log=lambda r: _log(out, r), heartbeat_s=heartbeat_s,
    )  # fmt: skip
    record = collect(spec, out, version, allow_dirty=allow_dirty)
    write_json_atomic(out / "sweep.json", record)
    write_text_atomic(out / "sweep.md", to_markdown(record))
    return record, failed


def _name(r: tuple[str, dict[str, str], int]) -> str:
    return f"{r[0]}-seed{r[2]}"


def _folder(out: Path, r: tuple[str, dict[str, str], int]) -> Path:
    return out / "runs" / r[0] / f"seed{r[2]}"


def _log(out: Path, r: tuple[str, dict[str, str], int]) -> Path:
    return out / "logs" / f"{_name(r)}.log"


def _epoch_records(run: Path) -> list[dict[str, Any]]:
    """The per-epoch records of ``RUN/metrics.jsonl`` (:class:`DataError` if unreadable)."""
    path = run / "metrics.jsonl"
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the per-epoch metrics ({exc})") from None


def validation_value(run: Path, metric: str, select_metric: str | None, select_mode: str) -> dict[str, Any]:
    """``{"value", "epoch"}``: ``metric`` on validation at the epoch the run reports (the last
    evaluated epoch, or the first best one by ``select_metric``), from ``RUN/metrics.jsonl``."""
    evaluated = [r for r in _epoch_records(run) if isinstance(r.get("val"), dict)]
    if not evaluated:
        raise DataError(f"{run / 'metrics.jsonl'}: no validation metrics (does the config have a validation set and train.eval_every?)")
    chosen = evaluated[-1]
    if select_metric:
        sign = -1.0 if select_mode == "min" else 1.0
        scored = [r for r in evaluated if _finite(r["val"].get(select_metric))]
        chosen = max(scored, key=lambda r: sign * float(r["val"][select_metric])) if scored else chosen  # max: the first best
    if metric not in chosen["val"]:
        raise ConfigError(f"--metric {metric!r}: not a validation metric of {run} ({', '.join(sorted(chosen['val']))})")
    value = chosen["val"][metric]
    return {"value": float(value) if _finite(value) else None, "epoch": chosen["epoch"]}


def run_seconds(run: Path) -> float | None:
    """The run's training + validation time, summed over the epochs of ``RUN/metrics.jsonl``
    (``train.time_s`` + ``eval_time_s``; the test evaluation is not in it). None when no epoch
    records a time (older runs)."""
    times = [float((r.get("train") or {}).get("time_s", 0.0)) + float(r.get("eval_time_s", 0.0)) for r in _epoch_records(run)]
    return sum(times) if any(times) else None


def validation_history(run: Path, metric: str) -> dict[str, float | None]:
    """``{epoch: metric}`` on validation at every evaluated epoch of ``RUN/metrics.jsonl`` (keys
    are strings, as in the JSON); an epoch without that metric is left out."""
    return {
        str(r["epoch"]): (float(r["val"][metric]) if _finite(r["val"][metric]) else None)
        for r in _epoch_records(run)
        if isinstance(r.get("val"), dict) and metric in r["val"]
    }


def starting_point(spec: SweepSpec) -> dict[str, Any]:
    """The value of each grid key in the config the sweep starts from (no grid value applied; a
    method option the config leaves out at the package default)."""
    from cxrdebias.debias import method_options

    cfg = _point_config(spec, {}, spec.train_seeds[0])
    tree = cfg.model_dump(mode="json")
    tree["method"] = {**method_options(cfg.method.name, cfg.method.options()).model_dump(mode="json"), **tree["method"]}
    out = {}
    for key in spec.grid:
        node: Any = tree
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[key] = node
    return out


def _same_value(a: Any, b: Any) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def start_name(points: list[dict[str, Any]], start: dict[str, Any]) -> str | None:
    """The grid point whose values are the starting config's, if the grid holds it."""
    return next((p["name"] for p in points if all(_same_value(v, start.get(k)) for k, v in p["point"].items())), None)


def _pick(means: dict[str, float], sign: float, start: str | None) -> tuple[str, list[str]]:
    """The best name by ``sign`` × mean and every name tied with it (in grid order). A tie goes to
    the starting point when it is among the tied ones (no evidence to move off the starting
    values), else to the first in grid order."""
    top = max(sign * v for v in means.values())
    tied = [n for n, v in means.items() if math.isclose(sign * v, top, rel_tol=0.0, abs_tol=1e-12)]
    return (start if start in tied else tied[0]), tied


def pick_by_epoch(points: list[dict[str, Any]], seeds: list[int], mode: str, start: str | None = None) -> list[dict[str, Any]]:
    """The point the sweep would pick from the validation at each epoch every run evaluated
    (``[{"epoch", "best"}]``): whether a run cut short there — a shorter schedule, when the LR
    schedule does not depend on the number of epochs — ranks the points as the full one does.
    Only complete points with a value at that epoch for every seed compete; ties are broken as
    for ``best`` (:func:`_pick`)."""
    histories = [p["seeds"][str(s)].get("history") or {} for p in points if p["complete"] for s in seeds]
    if not histories:
        return []
    epochs = sorted(set.intersection(*(set(h) for h in histories)), key=int)
    sign = -1.0 if mode == "min" else 1.0
    picks = []
    for epoch in epochs:
        means = {}
        for p in points:
            values = [(p["seeds"].get(str(s), {}).get("history") or {}).get(epoch) for s in seeds]
            if p["complete"] and all(v is not None for v in values):
                means[p["name"]] = sum(values) / len(values)
        if means:
            picks.append({"epoch": int(epoch), "best": _pick(means, sign, start)[0]})
    return picks


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def collect(spec: SweepSpec, out: Path, version: dict[str, Any], *, allow_dirty: bool = False) -> dict[str, Any]:
    """The sweep record: every point with its per-seed validation values and their mean, and the
    best point by the mean (``mode``; on a tie the starting point — the config's own values — when
    it is among the tied ones, else the first in grid order; ``ties`` lists them). Points missing a seed are
    listed but not picked. No test metric is read. Runs recorded with uncommitted changes are
    refused unless ``allow_dirty`` (then their points are marked, :mod:`cxrdebias.experiments.dirty`)."""
    points = []
    for i, point in enumerate(spec.points()):
        name, seeds = point_name(i, point), {}
        for seed in spec.train_seeds:
            run = _folder(out, (name, point, seed))
            if not (run / "results.json").exists():
                continue
            info = _read_run_info(run)
            cfg = info.get("config", {}).get("train", {})
            v = validation_value(run, spec.metric, cfg.get("select_metric"), cfg.get("select_mode", "max"))
            seeds[str(seed)] = {**v, "history": validation_history(run, spec.metric), "seconds": run_seconds(run), "code_version": info.get("code_version", {})}
        values = [s["value"] for s in seeds.values() if s["value"] is not None]
        complete = len(values) == len(spec.train_seeds)
        points.append({"name": name, "point": point, "seeds": seeds, "complete": complete,
                       "mean": sum(values) / len(values) if values else None,
                       "dirty": any(is_dirty(s) for s in seeds.values())})  # fmt: skip
    check_dirty({f"{p['name']}-seed{k}": s for p in points for k, s in p["seeds"].items()}, allow_dirty=allow_dirty, where=str(out))
    sign = -1.0 if spec.mode == "min" else 1.0
    start_point = start_name(points, start := starting_point(spec))
    means = {p["name"]: p["mean"] for p in points if p["complete"]}
    best, ties = _pick(means, sign, start_point) if means else (None, [])
    dirty = bool(version.get("git_dirty")) or any(p["dirty"] for p in points)
    return {
        "spec": spec.model_dump(mode="json"),
        "selection": f"validation {spec.metric} ({spec.mode}), mean over training seeds {', '.join(map(str, spec.train_seeds))}; test metrics not read",
        "points": points,
        "best": best,
        "best_point": next((p["point"] for p in points if p["name"] == best), None),
        "ties": ties if len(ties) > 1 else [],
        "start": {"values": start, "point": start_point},
        "pick_by_epoch": pick_by_epoch(points, spec.train_seeds, spec.mode, start_point),
        "code_version": version,
        "dirty": dirty,
    }


def _read_run_info(run: Path) -> dict[str, Any]:
    """``RUN/run.json`` (the resolved config and code version; no test metrics) and, for the
    config, ``RUN/config.yaml``."""
    info: dict[str, Any] = {}
    try:
        info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    if "config" not in info:
        try:
            info["config"] = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            info["config"] = {}
    return info


def to_markdown(record: dict[str, Any]) -> str:
    """The sweep table: one row per point, the validation metric per seed and its mean, the pick in bold."""
    spec = record["spec"]
    keys = list(spec["grid"])
    seeds = [str(s) for s in spec["train_seeds"]]
    v = record["code_version"]
    commit = f"{(v.get('git_commit') or 'no git')[:10]}{' (dirty: uncommitted changes)' if record['dirty'] else ''}"
    data = f"data seed {spec['data_seed']}" if spec["data_seed"] is not None else "data drawn from the training seed"
    lines = [
        f"# Sweep: {spec['method']} on `{spec['config']}`",
        "",
        f"- {data}; training seeds {', '.join(seeds)}; overrides: {', '.join(spec['set']) or 'none'}",
        f"- picked by {record['selection']}",
        f"- code: {_code_line(record, commit)}",
        "",
        "| point | " + " | ".join(keys) + " | " + " | ".join(f"val {spec['metric']} s{s}" for s in seeds) + " | mean |",
        "|---|" + "---|" * len(keys) + "---:|" * (len(seeds) + 1),
    ]
    for p in record["points"]:
        vals = [_fmt(p["seeds"].get(s, {}).get("value")) for s in seeds]
        row = [f"{p['name']} {DIRTY_MARK}" if p["dirty"] else p["name"], *(p["point"][k] for k in keys), *vals, _fmt(p["mean"])]
        if p["name"] == record["best"]:
            row = [f"**{c}**" for c in row]
        lines.append("| " + " | ".join(row) + " |")
    pick = f"**{record['best']}** ({', '.join(f'{k}={v}' for k, v in record['best_point'].items())})" if record["best"] else "none yet (no point has every seed)"
    lines += ["", f"Best by validation: {pick}. Values: the validation metric at the epoch each run reports; `–`: not run yet."]
    ties = record.get("ties") or []
    if ties:
        start = (record.get("start") or {}).get("point")
        rule = (f"the tie goes to the starting point ({start}, the config's own values): nothing measured moves off it"
                if start in ties else "the starting point is not among them, so the tie goes to the first in grid order")  # fmt: skip
        lines += ["", f"**{len(ties)} of {len(record['points'])} points tie** at the best value; {rule}."]
    earlier = record.get("pick_by_epoch") or []
    if len(earlier) > 1:
        lines += ["", "Picked from the validation at each evaluated epoch (would runs cut short there pick the same point?): "
                  + "; ".join(f"epoch {e['epoch']}: {e['best']}" for e in earlier) + "."]  # fmt: skip
    lines += legend({p["name"] for p in record["points"] if p["dirty"]})
    return "\n".join(lines) + "\n"


def _code_line(record: dict[str, Any], commit: str) -> str:
    """The commit of the record, and the runs' own commits where they differ (a record re-collected
    by a later commit from runs made earlier)."""
    runs = sorted({(s.get("code_version") or {}).get("git_commit") or "no git" for p in record["points"] for s in p["seeds"].values()})
    runs = [r[:10] for r in runs]
    if not runs or runs == [commit.split(" ")[0]]:
        return commit
    return f"runs from {', '.join(runs)}; this table written by {commit}"


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.4f}"


def make_spec(**fields: Any) -> SweepSpec:
    """A :class:`SweepSpec` from the command line's values; one line per problem otherwise."""
    try:
        return SweepSpec.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(f"sweep: {problems(exc)}") from None
