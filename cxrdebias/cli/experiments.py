"""Commands that run experiments: ``train``, ``reproduce …``, ``evaluate``, ``compare``,
``analyze-bias``, ``demo`` and ``methods``. Each builds its config with
:func:`cxrdebias.experiments.config.build_config` and makes one library call."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

import cxrdebias
from cxrdebias.cli.app import (
    AllowOutsideOpt,
    AlphaOpt,
    BetaOpt,
    ForceOpt,
    LabellerOpt,
    MethodOpt,
    ResumeOpt,
    SetOpt,
    app,
    err,
    out,
    reproduce_app,
)
from cxrdebias.console import esc, progress


def _run(cfg, out_dir: Path | None, *, kind: str, force: bool, resume: bool) -> tuple[dict | None, Path]:
    """Run ``cfg`` (of ``data.kind`` = ``kind``) into ``out_dir`` (default ``runs/<name>``),
    under torchrun in a process group: (the results on rank 0, None on the other ranks; the run folder)."""
    from cxrdebias.distributed import run_launched
    from cxrdebias.experiments.runner import default_run_name, require_kind, run_experiment

    require_kind(cfg, kind)
    if resume and out_dir is None:
        raise typer.BadParameter("--resume needs --out RUN_FOLDER")
    out_dir = out_dir or Path("runs") / default_run_name(cfg)
    results = run_launched(
        cfg.train.device, out_dir, lambda out_dir: run_experiment(cfg, out_dir, force=force, resume=resume, console=err)
    )
    return results, out_dir


def _reproduce(cfg, kind: str, out_dir: Path | None, *, force: bool, resume: bool, keys: tuple[str, ...]) -> None:
    """Run a reproduction experiment of ``kind`` and print its ``keys`` of ``results["metrics"]``."""
    results, out_dir = _run(cfg, out_dir, kind=kind, force=force, resume=resume)
    if results is None:  # a rank other than 0 under torchrun
        return
    m = results["metrics"]
    out.print(" ".join(f"{k}={m[k]:.4f}" for k in keys) + f" run={esc(out_dir)}")


@app.command("methods")
def methods_cmd() -> None:
    """List the debiasing methods and their options: the package defaults, then the values the
    shipped configs (configs/<dataset>/*.yaml) set."""
    from cxrdebias.debias import METHODS
    from cxrdebias.experiments.config import shipped_method_settings

    for name in sorted(METHODS):
        cls = METHODS[name]
        fields = ", ".join(
            f"{k}={f.get_default(call_default_factory=True)!r}" for k, f in cls.Options.model_fields.items()
        ) or "no options"
        bias = "needs bias labels" if cls.requires_bias else "no bias labels"
        out.print(f"[bold]{name}[/]: {cls.summary} ({bias}; {fields})")
    shipped = shipped_method_settings()
    if shipped:
        out.print(
            "\nThe values above are the package defaults, the same for every dataset. The shipped configs set their own, "
            "which `train` and `reproduce` start from (--method naming another method starts from its defaults above):"
        )
    for dataset, files, name, options in shipped:
        values = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "no options"
        out.print(f"  {esc(dataset)} ({esc(', '.join(files))}): {name} {esc(values)}")


OutOpt = Annotated[Path | None, typer.Option("--out", help="Run folder (default: runs/<name>-<time>).")]
EpochsOpt = Annotated[int | None, typer.Option(help="Training epochs.")]


class CelebATarget(str, Enum):
    blond_hair = "blond_hair"
    heavy_makeup = "heavy_makeup"


#: ``--target`` of ``reproduce celeba`` → the attribute name of ``list_attr_celeba.txt``
CELEBA_ATTRIBUTES = {CelebATarget.blond_hair: "Blond_Hair", CelebATarget.heavy_makeup: "Heavy_Makeup"}


class FaceTarget(str, Enum):
    gender = "gender"
    age = "age"


class ExtremeBiasSplit(str, Enum):
    eb1 = "eb1"
    eb2 = "eb2"


def _configs_dir() -> Path:
    from cxrdebias.config import CONFIGS_DIR  # imported when a command runs: `--help` stays fast

    return CONFIGS_DIR


def _bias_options(bias: str | None, labeller: str | None, dataset_values: tuple[str, ...]) -> dict[str, Any]:
    from cxrdebias.config import bias_options

    return bias_options(bias, labeller, dataset_values)


def _option(name: str, annotation: object, default: object = None) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


def reproduce_command(
    name: str,
    kind: str,
    doc: str,
    own: list[inspect.Parameter],
    settings: Callable[[dict[str, Any]], tuple[Path | None, dict[str, Any], dict[str, Any]]],
    *,
    keys: tuple[str, ...],
    data_root_help: str,
    seed_help: str,
    config_help: str,
) -> None:
    """Register ``cxrdebias reproduce NAME`` for ``data.kind`` = ``kind``.

    Every reproduce command takes its ``own`` options, then the common ones (method, α, β,
    epochs, data root, seed, --out, --config, --set, --force, --resume). ``settings(given)``
    turns the given values into (default config file, extra method options, extra config
    options); the command prints ``keys`` of ``results["metrics"]``.
    """

    def command(**given: Any) -> None:
        from cxrdebias.experiments.config import build_config

        default_path, method_options, options = settings(given)
        cfg = build_config(
            given["config"],
            default_path=default_path,
            method=given["method"],
            method_options={"alpha": given["alpha"], "beta": given["beta"], **method_options},
            options={"train.epochs": given["epochs"], "data.root": given["data_root"], "seed": given["seed"], **options},
            overrides=given["set_"],
        )
        _reproduce(cfg, kind, given["out_dir"], force=given["force"], resume=given["resume"], keys=keys)

    common = [
        _option("method", MethodOpt),
        _option("alpha", AlphaOpt),
        _option("beta", BetaOpt),
        _option("epochs", EpochsOpt),
        _option("data_root", Annotated[Path | None, typer.Option(help=data_root_help)]),
        _option("seed", Annotated[int | None, typer.Option(help=seed_help)]),
        _option("out_dir", OutOpt),
        _option("config", Annotated[Path | None, typer.Option(help=config_help)]),
        _option("set_", SetOpt),
        _option("force", ForceOpt, False),
        _option("resume", ResumeOpt, False),
    ]
    command.__signature__ = inspect.Signature([*own, *common])  # what typer reads the options from
    command.__name__, command.__doc__ = f"reproduce_{kind}", doc
    reproduce_app.command(name)(command)


reproduce_command(
    "biased-mnist",
    "biased_mnist",
    "Biased MNIST (Bahng et al.): train at correlation ρ, report biased/unbiased test accuracy.",
    [
        _option("rho", Annotated[float | None, typer.Option(help="Colour–digit correlation of the training set, in (0, 1].")]),
        _option("form", Annotated[str | None, typer.Option(help="EnD: 'partner_mean' (default, this project's normalisation), 'paper' (eqs. 7/10 as written) or 'reference' (the authors' code).")]),
        _option("bias", Annotated[str | None, typer.Option(help="'colour' (the true labels, default) or 'auto' (online pseudo-bias labels).")]),
        _option("labeller", LabellerOpt),
    ],
    lambda g: (None, {"form": g["form"]}, {"data.rho": g["rho"], **_bias_options(g["bias"], g["labeller"], ("colour",))}),
    keys=("biased_accuracy", "unbiased_accuracy"),
    data_root_help="MNIST folder (torchvision layout ROOT/MNIST/raw/).",
    seed_help="Random seed (colouring, init, shuffling).",
    config_help="YAML config (see configs/biased_mnist/).",
)

PHOTO_SEED_HELP = "Training seed (init, shuffling); the splits use data.split_seed."

reproduce_command(
    "celeba",
    "celeba",
    "CelebA (Nam et al. protocol): unbiased (group-averaged) and bias-conflicting accuracy.",
    [_option("target", Annotated[CelebATarget | None, typer.Option(help="Attribute to learn (bias: Male). Default: blond_hair.")])],
    lambda g: (
        _configs_dir() / "celeba" / f"{(g['target'] or CelebATarget.blond_hair).value}.yaml",
        {},
        {"data.target": CELEBA_ATTRIBUTES[g["target"]] if g["target"] else None},
    ),
    keys=("unbiased_accuracy", "bias_conflicting_accuracy"),
    data_root_help="CelebA folder (torchvision layout ROOT/celeba/).",
    seed_help=PHOTO_SEED_HELP,
    config_help="YAML config (default: configs/celeba/<target>.yaml).",
)

reproduce_command(
    "imdb-face",
    "imdb_face",
    "IMDB Face (Kim et al. splits): accuracy on the test split and on the other extreme-bias split.",
    [
        _option("target", Annotated[FaceTarget | None, typer.Option(help="What to learn; the other is the bias. Default: gender.")]),
        _option("train_split", Annotated[ExtremeBiasSplit | None, typer.Option(help="Extreme-bias split to train on. Default: eb1.")]),
    ],
    lambda g: (
        _configs_dir() / "imdb_face" / f"{(g['target'] or FaceTarget.gender).value}_{(g['train_split'] or ExtremeBiasSplit.eb1).value}.yaml",
        {},
        {
            "data.target": g["target"].value if g["target"] else None,
            "data.train_split": g["train_split"].value if g["train_split"] else None,
        },
    ),
    keys=("test_accuracy", "other_eb_accuracy"),
    data_root_help="Folder with eb1.csv, eb2.csv and test.csv (image paths relative to it).",
    seed_help=PHOTO_SEED_HELP,
    config_help="YAML config (default: configs/imdb_face/<target>_<split>.yaml).",
)


@reproduce_app.command("table")
def reproduce_table(
    table: Annotated[str, typer.Argument(help="biased-mnist (Table 1), ablation (2), celeba (3) or imdb (4); or 1–4.")],
    run: Annotated[bool, typer.Option("--run/--no-run", help="Run the missing cells (default: only collect finished ones).")] = False,
    seeds: Annotated[list[int] | None, typer.Option("--seed", help="Seeds (repeat the option); default 42.")] = None,
    methods: Annotated[list[str] | None, typer.Option("--method", help="Methods (repeat); default: the table's.")] = None,
    rhos: Annotated[list[float] | None, typer.Option("--rho", help="Biased MNIST ρ values (repeat); default 0.997 and 0.990.")] = None,
    results_dir: Annotated[Path | None, typer.Option("--results", help="Where finished cells are kept (default docs/results/).")] = None,
    runs_dir: Annotated[Path, typer.Option("--runs", help="Run folders of the cells.")] = Path("runs/tables"),
    md_out: Annotated[Path | None, typer.Option("--markdown", help="Also write the table to this Markdown file.")] = None,
    update_docs: Annotated[bool, typer.Option(help="Rewrite the table's block in docs/reproduction.md.")] = False,
    threads: Annotated[int | None, typer.Option(help="torch threads per run (does not change results).")] = None,
    set_: SetOpt = None,
    allow_dirty: Annotated[bool, typer.Option("--allow-dirty", help="Tabulate cells run with uncommitted changes (marked ◇) instead of refusing.")] = False,
) -> None:
    """Regenerate one of the EnD paper's tables: our mean ± std over seeds beside the published numbers."""
    from cxrdebias.experiments.benchmark import check_clean
    from cxrdebias.experiments.tables import build_table, get_table, update_markdown

    if run:
        check_clean(allow_dirty)  # new cells from a commit only
    docs = Path(cxrdebias.__file__).resolve().parents[1] / "docs"  # the source checkout's docs/

    spec = get_table(
        table, seeds=seeds or None, methods=methods or None, rhos=rhos or None, rho=(rhos or [None])[0], overrides=set_ or []
    )
    runtime = ["train.progress=false"] + ([f"train.num_threads={threads}"] if threads else [])
    result = build_table(spec, results_dir=results_dir or docs / "results", runs_dir=runs_dir, run=run, runtime_overrides=runtime, console=err,
                         allow_dirty=allow_dirty)
    out.print(result.markdown, markup=False, highlight=False)
    if md_out is not None:
        md_out.write_text(result.markdown + "\n")
    if update_docs:
        update_markdown(docs / "reproduction.md", spec.docs_key, result.markdown)
    if result.missing:
        err.print(f"{len(result.missing)} cells not run yet (add --run to run them): {esc(', '.join(result.missing[:6]))}{' …' if len(result.missing) > 6 else ''}")


def _is_set(overrides: list[str] | None, key: str) -> bool:
    """Whether ``--set`` gives ``key``."""
    return any(item.split("=", 1)[0].strip() == key for item in overrides or [])


@app.command("train")
def train_cmd(
    data: Annotated[Path | None, typer.Option(help="Manifest CSV (path, label, site, patient_id).")] = None,
    bias: Annotated[
        str | None, typer.Option(help="Bias label for the method: 'site', 'none' or 'auto' (online pseudo-bias labels).")
    ] = None,
    labeller: LabellerOpt = None,
    method: MethodOpt = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Run folder (default: runs/cxr-<method>-seed<seed>-<time>).")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config (default: configs/cxr/default.yaml).")] = None,
    alpha: AlphaOpt = None,
    beta: BetaOpt = None,
    epochs: Annotated[int | None, typer.Option(help="Maximum training epochs.")] = None,
    image_size: Annotated[int | None, typer.Option(help="Model input size in pixels (square).")] = None,
    pretrained: Annotated[Path | None, typer.Option(help="Local DenseNet-121 weights (torchvision/timm/torchxrayvision).")] = None,
    site_source: Annotated[str | None, typer.Option(help="'column' or 'dicom:<Keyword>', e.g. dicom:InstitutionName.")] = None,
    allow_drop: Annotated[bool, typer.Option("--allow-drop", help="Drop invalid manifest rows (listed) instead of failing.")] = False,
    allow_outside: AllowOutsideOpt = False,
    seed: Annotated[int | None, typer.Option(help="Training seed.")] = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    resume: ResumeOpt = False,
) -> None:
    """Train a DenseNet-121 COVID-19 classifier on a CXR manifest with the site as the bias."""
    from cxrdebias.experiments.config import build_config

    cfg = build_config(
        config,
        default_path=_configs_dir() / "cxr" / "default.yaml",
        method=method,
        method_options={"alpha": alpha, "beta": beta},
        options={
            "data.manifest": data,
            "data.bias": bias if bias != "auto" else None,
            **_bias_options(bias, labeller, ("site", "none")),
            "data.site_source": site_source,
            "data.allow_drop_bad_rows": True if allow_drop else None,
            "data.allow_links_outside": True if allow_outside else None,
            "data.preprocess.image_size": image_size,
            "model.pretrained": pretrained,
            "train.epochs": epochs,
            # the shipped recipe balances site × label cells, which needs the true sites: with --bias none
            # or auto the natural order (as --bias auto was measured); an explicit --set train.sampling
            # wins (auto: balances the pseudo labels' cells, docs/unsupervised.md; none: refused)
            "train.sampling": "none" if bias in ("auto", "none") and not _is_set(set_, "train.sampling") else None,
            "seed": seed,
        },
        overrides=set_,
    )
    res, out_dir = _run(cfg, out_dir, kind="cxr", force=force, resume=resume)
    if res is None:  # a rank other than 0 under torchrun
        return
    v = res["val_metrics"]
    out.print(f"val_auroc={v['auroc']:.4f} val_site_mean_auroc={v['site_mean_auroc']:.4f} threshold={res['threshold']:.4f} run={esc(out_dir)}")


@app.command("evaluate")
def evaluate_cmd(
    run: Annotated[Path, typer.Argument(help="Run folder written by `cxrdebias train`.")],
    per_institution: Annotated[bool, typer.Option("--per-institution/--overall", help="Per-site report (default).")] = True,
    data: Annotated[Path | None, typer.Option(help="Evaluate this manifest instead of the run's test split.")] = None,
    split: Annotated[str, typer.Option(help="Split to evaluate (train, val or test).")] = "test",
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% intervals (patient level).")] = 1000,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Report folder (default RUN/eval; with --site-thresholds RUN/eval_site_thresholds).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing report folder.")] = False,
    allow_outside: AllowOutsideOpt = False,
    site_source: Annotated[str | None, typer.Option(help="Sites of --data: 'column' or 'dicom:<Keyword>' (default: the run's).")] = None,
    site_thresholds: Annotated[
        bool,
        typer.Option(
            "--site-thresholds",
            help="Post-hoc baseline: one threshold per training site, chosen on that site's validation images "
            "(Youden's J), instead of the model's single threshold; external sites and sites without validation "
            "images of both classes keep the global one.",
        ),
    ] = False,
) -> None:
    """Per-site TPR, TNR, balanced accuracy and AUROC with bootstrap intervals for a trained run.

    Sites of --data the model was not trained on are scored as external (marked in every table
    and the plot). With --site-thresholds each training site is recalibrated with its own
    validation threshold (the "post-hoc per-site thresholds" baseline), reported in
    RUN/eval_site_thresholds beside RUN/eval."""
    from cxrdebias.evaluation.report import to_markdown
    from cxrdebias.experiments.evaluate import EVAL_DIR, SITE_THRESHOLDS_DIR, evaluate_run

    with progress(err, f"evaluating {esc(run)}"):
        report = evaluate_run(
            run, manifest=data, split=split, out=out_dir, n_boot=n_boot, force=force, console=err, allow_links_outside=allow_outside,
            site_source=site_source, site_thresholds=site_thresholds,
        )
    if per_institution:
        out.print(report["markdown"], markup=False, highlight=False)
    else:
        out.print(to_markdown({**report, "by_group": {}, "sites": []}), markup=False, highlight=False)
    where = out_dir or run / (SITE_THRESHOLDS_DIR if site_thresholds else EVAL_DIR)
    figures = "report.png, calibration.png" if "temperature" in report.get("calibration", {}) else "report.png"
    err.print(f"report written to {esc(where)} (report.json, report.csv, report.md, {figures}, predictions.csv)")


@app.command("compare")
def compare_cmd(
    run_a: Annotated[Path, typer.Argument(help="First evaluated run (e.g. vanilla).")],
    run_b: Annotated[Path, typer.Argument(help="Second evaluated run (e.g. EnD).")],
    n_boot: Annotated[int, typer.Option(help="Paired bootstrap resamples for the intervals of B − A (0: no paired table).")] = 1000,
) -> None:
    """Per-site table of two evaluated runs side by side (EnD paper, Table 5) and their paired differences with 95% intervals."""
    from cxrdebias.experiments.evaluate import compare_runs

    out.print(compare_runs(run_a, run_b, n_boot=n_boot), markup=False, highlight=False)


@app.command("analyze-bias")
def analyze_bias_cmd(
    run: Annotated[Path, typer.Argument(help="Run folder (any method; --bias auto runs use their own labeller).")],
    split: Annotated[str, typer.Option(help="Split whose bottleneck is plotted: val, train or a test set.")] = "val",
    checkpoint: Annotated[str, typer.Option(help="Checkpoint: last or best.")] = "last",
    out_dir: Annotated[Path | None, typer.Option("--out", help="Output folder (default RUN/analysis).")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing analysis.")] = False,
    groups: Annotated[str, typer.Option(help="Groups shown: auto (a --bias auto run's pseudo groups, else the true bias groups when "
                                        "known), pseudo or true.")] = "auto",
    per_group: Annotated[int, typer.Option(help="Example images per group on the contact sheet (groups.png).")] = 8,
    map_layer: Annotated[str, typer.Option(help="Layer whose output the group map reads: early (the model's first block) or a module name.")] = "early",
) -> None:
    """Bottleneck (2-D PCA) coloured by target, marked by true and pseudo-bias; per-epoch agreement table; what the
    groups are: example images of each group (groups.png) and where they differ (group_map.png), scored against
    cues.csv when the data has one."""
    from cxrdebias.experiments.bias_analysis import analyze_run, format_report

    with progress(err, f"analysing {esc(run)}: bottleneck, pseudo labels, group sheets and maps"):
        report = analyze_run(run, split=split, checkpoint=checkpoint, out=out_dir, force=force, groups=groups, per_group=per_group, map_layer=map_layer)
    out.print(format_report(report), markup=False, highlight=False)
    err.print("wrote " + ", ".join(esc(f) for f in report["files"]))


@app.command("demo")
def demo(
    out_dir: Annotated[Path | None, typer.Option("--out", help="Folder for the data, runs and summary (default runs/demo-<time>).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a training config key for every run.")] = None,
    jobs: Annotated[int, typer.Option(help="Runs at a time (one thread each).")] = 3,
) -> None:
    """Main job: synthetic multi-site CXRs → vanilla, the no-shortcut reference and the default site-debiasing recipe →
    gap closed, site probe per layer, per-site paired differences."""
    from cxrdebias.experiments.demo import run_demo

    res = run_demo(out_dir, overrides=set_, jobs=jobs, console=err)
    print(res["text"])
    err.print(f"\nall outputs in {esc(res['out'])} (summary.md, benchmark.png, runs/*/*/*/eval/report.png); {res['elapsed_s'] / 60:.1f} min")
