"""The ``cxrdebias`` command line. Thin: parse options, call library functions, print results."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

import cxrdebias
from cxrdebias.errors import CxrDebiasError

app = typer.Typer(
    name="cxrdebias",
    help="Train image classifiers that do not learn spurious shortcuts (biases) in their data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
reproduce_app = typer.Typer(help="Reproduce the published results of the debiasing papers.", no_args_is_help=True)
app.add_typer(reproduce_app, name="reproduce")
data_app = typer.Typer(help="Create and check datasets (synthetic CXR set, manifest validation).", no_args_is_help=True)
app.add_typer(data_app, name="data")

# options shared by several commands (one definition, one help text)
MethodOpt = Annotated[str | None, typer.Option(help="Debiasing method (see `cxrdebias methods`).")]
AlphaOpt = Annotated[float | None, typer.Option(help="EnD: weight of the disentangling term.")]
BetaOpt = Annotated[float | None, typer.Option(help="EnD: weight of the entangling term.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override any config key: --set train.lr=5e-4")]
ForceOpt = Annotated[bool, typer.Option(help="Overwrite an existing --out folder.")]
ResumeOpt = Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")]
LabellerOpt = Annotated[
    str | None, typer.Option(help="--bias auto: pseudo-bias labeller (attractor, cluster or gce_head; docs/unsupervised.md).")
]


def _bias_options(bias: str | None, labeller: str | None, dataset_values: tuple[str, ...]) -> dict:
    """``--bias``/``--labeller`` as config overrides: ``auto`` switches on the online pseudo-bias
    labeller (the dataset's bias labels, when it has them, then only feed the agreement metrics)."""
    from cxrdebias.errors import ConfigError

    if labeller is not None and bias != "auto":
        raise ConfigError("--labeller only applies with --bias auto")
    if bias is None:
        return {}
    if bias == "auto":
        return {"unsupervised.enabled": True, "unsupervised.labeller": labeller}
    if bias not in dataset_values:
        raise ConfigError(f"--bias {bias!r}: expected {', '.join(dataset_values)} or auto")
    return {"unsupervised.enabled": False}

err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        out.print(f"cxrdebias {cxrdebias.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """Train image classifiers that do not learn spurious shortcuts (biases) in their data."""


@app.command("methods")
def methods_cmd() -> None:
    """List the debiasing methods and their options."""
    from cxrdebias.debias import METHODS

    for name in sorted(METHODS):
        cls = METHODS[name]
        fields = ", ".join(
            f"{k}={f.get_default(call_default_factory=True)!r}" for k, f in cls.Options.model_fields.items()
        ) or "no options"
        bias = "needs bias labels" if cls.requires_bias else "no bias labels"
        out.print(f"[bold]{name}[/]: {cls.summary} ({bias}; {fields})")


def _build_config(
    config: Path | None,
    *,
    default_config: Path | None = None,
    method: str | None = None,
    method_options: dict | None = None,
    options: dict | None = None,
    overrides: list[str] | None = None,
):
    """Config file (or the default one) ← ``--set`` overrides ← named options.

    ``--method`` replaces the whole method section (options of another method do not carry
    over); method options given on the command line (``--alpha`` …) are then applied.
    """
    from cxrdebias.config import load_config
    from cxrdebias.errors import ConfigError

    cfg = load_config(config or default_config, overrides or [])
    if method is not None and method != cfg.method.name:
        base = cfg.model_dump(mode="json")
        base["method"] = {"name": method}
        cfg = load_config(None, None, base=base)
    method_options = {k: v for k, v in (method_options or {}).items() if v is not None}
    if method_options and cfg.method.name == "vanilla":
        raise ConfigError(f"--{'/--'.join(method_options)} only apply to methods that take them, not 'vanilla'")
    ov = [f"method.{k}={v}" for k, v in method_options.items()]
    ov += [f"{k}={v}" for k, v in (options or {}).items() if v is not None]
    return load_config(None, ov, base=cfg.model_dump(mode="json"))


REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


OutOpt = Annotated[Path | None, typer.Option("--out", help="Run folder (default: runs/<name>-<time>).")]
EpochsOpt = Annotated[int | None, typer.Option(help="Training epochs.")]
PhotoSeedOpt = Annotated[int | None, typer.Option(help="Training seed (init, shuffling); the splits use data.split_seed.")]


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


def _under_torchrun(cfg, out_dir: Path, job):
    """``job(out_dir)`` in a process group when launched by torchrun (docs/scaling.md): every rank
    uses rank 0's ``out_dir``; returns the job's result on rank 0 and ``None`` on the others."""
    from cxrdebias import distributed as dist_utils

    world = dist_utils.init_from_env(cfg.train.device)
    try:
        result = job(dist_utils.broadcast_object(out_dir))
    finally:
        dist_utils.shutdown()
    return result if world.is_main else None


def _reproduce(run, cfg, out_dir: Path | None, *, force: bool, resume: bool, keys: tuple[str, ...]) -> None:
    """Run a reproduction experiment (``run``: a ``cxrdebias.experiments.reproduce.run_*``) and print ``keys``."""
    from cxrdebias.experiments.reproduce import default_run_name

    if resume and out_dir is None:
        raise typer.BadParameter("--resume needs --out RUN_FOLDER")
    out_dir = out_dir or Path("runs") / default_run_name(cfg)
    results = _under_torchrun(cfg, out_dir, lambda out_dir: run(cfg, out_dir, force=force, resume=resume, console=err))
    if results is None:  # a rank other than 0 under torchrun
        return
    m = results["metrics"]
    out.print(" ".join(f"{k}={m[k]:.4f}" for k in keys) + f" run={out_dir}")


@reproduce_app.command("biased-mnist")
def reproduce_biased_mnist(
    rho: Annotated[float | None, typer.Option(help="Colour–digit correlation of the training set, in (0, 1].")] = None,
    method: MethodOpt = None,
    alpha: AlphaOpt = None,
    beta: BetaOpt = None,
    form: Annotated[str | None, typer.Option(help="EnD: 'paper' (default) or 'reference' form.")] = None,
    bias: Annotated[str | None, typer.Option(help="'colour' (the true labels, default) or 'auto' (online pseudo-bias labels).")] = None,
    labeller: LabellerOpt = None,
    epochs: EpochsOpt = None,
    data_root: Annotated[Path | None, typer.Option(help="MNIST folder (torchvision layout ROOT/MNIST/raw/).")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (colouring, init, shuffling).")] = None,
    out_dir: OutOpt = None,
    config: Annotated[Path | None, typer.Option(help="YAML config (see configs/biased_mnist/).")] = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    resume: ResumeOpt = False,
) -> None:
    """Biased MNIST (Bahng et al.): train at correlation ρ, report biased/unbiased test accuracy."""
    from cxrdebias.experiments.reproduce import run_biased_mnist

    cfg = _build_config(
        config,
        method=method,
        method_options={"alpha": alpha, "beta": beta, "form": form},
        options={
            "data.rho": rho, "train.epochs": epochs, "data.root": data_root, "seed": seed,
            **_bias_options(bias, labeller, ("colour",)),
        },
        overrides=set_,
    )
    _reproduce(run_biased_mnist, cfg, out_dir, force=force, resume=resume, keys=("biased_accuracy", "unbiased_accuracy"))


@reproduce_app.command("celeba")
def reproduce_celeba(
    target: Annotated[
        CelebATarget | None, typer.Option(help="Attribute to learn (bias: Male). Default: blond_hair.")
    ] = None,
    method: MethodOpt = None,
    alpha: AlphaOpt = None,
    beta: BetaOpt = None,
    epochs: EpochsOpt = None,
    data_root: Annotated[Path | None, typer.Option(help="CelebA folder (torchvision layout ROOT/celeba/).")] = None,
    seed: PhotoSeedOpt = None,
    out_dir: OutOpt = None,
    config: Annotated[Path | None, typer.Option(help="YAML config (default: configs/celeba/<target>.yaml).")] = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    resume: ResumeOpt = False,
) -> None:
    """CelebA (Nam et al. protocol): unbiased (group-averaged) and bias-conflicting accuracy."""
    from cxrdebias.experiments.reproduce import run_celeba

    cfg = _build_config(
        config,
        default_config=REPO_CONFIGS / "celeba" / f"{(target or CelebATarget.blond_hair).value}.yaml",
        method=method,
        method_options={"alpha": alpha, "beta": beta},
        options={
            "data.target": CELEBA_ATTRIBUTES[target] if target else None,
            "data.root": data_root,
            "train.epochs": epochs,
            "seed": seed,
        },
        overrides=set_,
    )
    _reproduce(run_celeba, cfg, out_dir, force=force, resume=resume, keys=("unbiased_accuracy", "bias_conflicting_accuracy"))


@reproduce_app.command("imdb-face")
def reproduce_imdb_face(
    target: Annotated[FaceTarget | None, typer.Option(help="What to learn; the other is the bias. Default: gender.")] = None,
    train_split: Annotated[
        ExtremeBiasSplit | None, typer.Option(help="Extreme-bias split to train on. Default: eb1.")
    ] = None,
    method: MethodOpt = None,
    alpha: AlphaOpt = None,
    beta: BetaOpt = None,
    epochs: EpochsOpt = None,
    data_root: Annotated[Path | None, typer.Option(help="Folder with eb1.csv, eb2.csv and test.csv (image paths relative to it).")] = None,
    seed: PhotoSeedOpt = None,
    out_dir: OutOpt = None,
    config: Annotated[Path | None, typer.Option(help="YAML config (default: configs/imdb_face/<target>_<split>.yaml).")] = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    resume: ResumeOpt = False,
) -> None:
    """IMDB Face (Kim et al. splits): accuracy on the test split and on the other extreme-bias split."""
    from cxrdebias.experiments.reproduce import run_imdb_face

    cfg = _build_config(
        config,
        default_config=REPO_CONFIGS / "imdb_face" / f"{(target or FaceTarget.gender).value}_{(train_split or ExtremeBiasSplit.eb1).value}.yaml",
        method=method,
        method_options={"alpha": alpha, "beta": beta},
        options={
            "data.target": target.value if target else None,
            "data.train_split": train_split.value if train_split else None,
            "data.root": data_root,
            "train.epochs": epochs,
            "seed": seed,
        },
        overrides=set_,
    )
    _reproduce(run_imdb_face, cfg, out_dir, force=force, resume=resume, keys=("test_accuracy", "other_eb_accuracy"))


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
) -> None:
    """Regenerate one of the EnD paper's tables: our mean ± std over seeds beside the published numbers."""
    from cxrdebias.experiments.tables import (
        DEFAULT_RESULTS,
        REPO,
        build_table,
        get_table,
        update_markdown,
    )

    spec = get_table(
        table, seeds=seeds or None, methods=methods or None, rhos=rhos or None, rho=(rhos or [None])[0], overrides=set_ or []
    )
    runtime = ["train.progress=false"] + ([f"train.num_threads={threads}"] if threads else [])
    result = build_table(spec, results_dir=results_dir or DEFAULT_RESULTS, runs_dir=runs_dir, run=run, runtime_overrides=runtime, console=err)
    out.print(result.markdown, markup=False, highlight=False)
    if md_out is not None:
        md_out.write_text(result.markdown + "\n")
    if update_docs:
        update_markdown(REPO / "docs" / "reproduction.md", spec.docs_key, result.markdown)
    if result.missing:
        err.print(f"{len(result.missing)} cells not run yet (add --run to run them): {', '.join(result.missing[:6])}{' …' if len(result.missing) > 6 else ''}")


@app.command("train")
def train_cmd(
    data: Annotated[Path | None, typer.Option(help="Manifest CSV (path, label, site, patient_id).")] = None,
    bias: Annotated[
        str | None, typer.Option(help="Bias label for the method: 'site', 'none' or 'auto' (online pseudo-bias labels).")
    ] = None,
    labeller: LabellerOpt = None,
    method: MethodOpt = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Run folder (default: runs/cxr-<method>-<time>).")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config (default: configs/cxr/default.yaml).")] = None,
    alpha: AlphaOpt = None,
    beta: BetaOpt = None,
    epochs: Annotated[int | None, typer.Option(help="Maximum training epochs.")] = None,
    image_size: Annotated[int | None, typer.Option(help="Model input size in pixels (square).")] = None,
    pretrained: Annotated[Path | None, typer.Option(help="Local DenseNet-121 weights (torchvision/timm/torchxrayvision).")] = None,
    site_source: Annotated[str | None, typer.Option(help="'column' or 'dicom:<Keyword>', e.g. dicom:InstitutionName.")] = None,
    allow_drop: Annotated[bool, typer.Option("--allow-drop", help="Drop invalid manifest rows (listed) instead of failing.")] = False,
    seed: Annotated[int | None, typer.Option(help="Training seed.")] = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    resume: ResumeOpt = False,
) -> None:
    """Train a DenseNet-121 COVID-19 classifier on a CXR manifest with the site as the bias."""
    from datetime import datetime

    from cxrdebias.experiments.cxr import train_cxr

    cfg = _build_config(
        config,
        default_config=REPO_CONFIGS / "cxr" / "default.yaml",
        method=method,
        method_options={"alpha": alpha, "beta": beta},
        options={
            "data.manifest": data,
            "data.bias": bias if bias != "auto" else None,
            **_bias_options(bias, labeller, ("site", "none")),
            "data.site_source": site_source,
            "data.allow_drop_bad_rows": True if allow_drop else None,
            "data.preprocess.image_size": image_size,
            "model.pretrained": pretrained,
            "train.epochs": epochs,
            "seed": seed,
        },
        overrides=set_,
    )
    if resume and out_dir is None:
        raise typer.BadParameter("--resume needs --out RUN_FOLDER")
    auto = "-auto" if cfg.unsupervised.enabled else ""
    out_dir = out_dir or Path("runs") / f"cxr-{cfg.method.name}{auto}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    res = _under_torchrun(cfg, out_dir, lambda out_dir: train_cxr(cfg, out_dir, force=force, resume=resume, console=err))
    if res is None:  # a rank other than 0 under torchrun
        return
    v = res["val_metrics"]
    out.print(f"val_auroc={v['auroc']:.4f} val_site_mean_auroc={v['site_mean_auroc']:.4f} threshold={res['threshold']:.4f} run={out_dir}")


@app.command("evaluate")
def evaluate_cmd(
    run: Annotated[Path, typer.Argument(help="Run folder written by `cxrdebias train`.")],
    per_institution: Annotated[bool, typer.Option("--per-institution/--overall", help="Per-site report (default).")] = True,
    data: Annotated[Path | None, typer.Option(help="Evaluate this manifest instead of the run's test split.")] = None,
    split: Annotated[str, typer.Option(help="Split to evaluate (train, val or test).")] = "test",
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% intervals (patient level).")] = 1000,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Report folder (default RUN/eval).")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing report folder.")] = False,
) -> None:
    """Per-site TPR, TNR, balanced accuracy and AUROC with bootstrap intervals for a trained run."""
    from cxrdebias.evaluation.report import to_markdown
    from cxrdebias.experiments.evaluate import evaluate_run

    report = evaluate_run(run, manifest=data, split=split, out=out_dir, n_boot=n_boot, force=force, console=err)
    if per_institution:
        out.print(report["markdown"])
    else:
        out.print(to_markdown({**report, "by_group": {}, "sites": []}))
    err.print(f"report written to {out_dir or run / 'eval'} (report.json, report.csv, report.md, report.png, predictions.csv)")


@app.command("compare")
def compare_cmd(
    run_a: Annotated[Path, typer.Argument(help="First evaluated run (e.g. vanilla).")],
    run_b: Annotated[Path, typer.Argument(help="Second evaluated run (e.g. EnD).")],
) -> None:
    """Per-site table of two evaluated runs side by side (EnD paper, Table 5)."""
    from cxrdebias.experiments.evaluate import compare_runs

    out.print(compare_runs(run_a, run_b))


@app.command("analyze-bias")
def analyze_bias_cmd(
    run: Annotated[Path, typer.Argument(help="Run folder (any method; --bias auto runs use their own labeller).")],
    split: Annotated[str, typer.Option(help="Split whose bottleneck is plotted: val, train or a test set.")] = "val",
    checkpoint: Annotated[str, typer.Option(help="Checkpoint: last or best.")] = "last",
    out_dir: Annotated[Path | None, typer.Option("--out", help="Output folder (default RUN/analysis).")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing analysis.")] = False,
) -> None:
    """Bottleneck (2-D PCA) coloured by target, marked by true and pseudo-bias; per-epoch agreement table."""
    from cxrdebias.experiments.bias_analysis import analyze_run, format_report

    report = analyze_run(run, split=split, checkpoint=checkpoint, out=out_dir, force=force)
    out.print(format_report(report), markup=False, highlight=False)
    err.print(f"wrote {report['plot']} and agreement.json / agreement.md beside it")


@app.command("export")
def export_cmd(
    run: Annotated[Path, typer.Argument(help="Run folder written by `cxrdebias train`.")],
    out_file: Annotated[Path, typer.Option("--out", help="ONNX file to write (MODEL_CARD.md and metadata.json go beside it).")],
    check_images: Annotated[
        list[Path] | None,
        typer.Option("--check-images", help="Verify on these folders/manifests/images instead of the run's validation split (repeat)."),
    ] = None,
    cam_images: Annotated[int, typer.Option(help="Images of the Grad-CAM check against MONAI.")] = 16,
    model_version: Annotated[str | None, typer.Option(help="Model version stored in the metadata (default: the run folder's name).")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing model, MODEL_CARD.md and metadata.json.")] = False,
) -> None:
    """ONNX model with probabilities + in-graph Grad-CAM, verified against torch and MONAI before writing."""
    from cxrdebias.deploy.export import export_run

    res = export_run(run, out_file, check_images=check_images, n_cam_images=cam_images, model_version=model_version, force=force)
    c = res.parity
    err.print(
        f"verified on {c.images}: probabilities max |Δ| {c.probability_max_abs_diff:.2e} ({c.n_probability_images} images), "
        f"Grad-CAM vs MONAI correlation min {c.cam_min_correlation:.5f} ({c.n_cam_images} images), batch sizes {c.batch_sizes}"
    )
    if c.n_cam_constant == c.n_cam_images:
        err.print("[yellow]warning:[/] every checked Grad-CAM map was constant: the CAM check says little for this model")
    out.print(f"wrote {res.model} ({res.size_bytes / 1e6:.1f} MB), {res.model_card.name}, {res.monai_metadata.name}")


@app.command("predict")
def predict_cmd(
    inputs: Annotated[list[Path], typer.Argument(help="Images (DICOM, PNG, JPEG), folders (recursive) or manifest CSVs.", show_default=False)],
    model: Annotated[Path, typer.Option("--model", help="ONNX model written by `cxrdebias export`.")],
    out_csv: Annotated[Path, typer.Option("--out", help="Predictions CSV to write.")],
    cams: Annotated[Path | None, typer.Option("--cams", help="Also write Grad-CAM overlay PNGs into this folder.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per onnxruntime call.")] = 16,
    device: Annotated[str, typer.Option(help="auto (CUDA when onnxruntime-gpu sees a GPU), cpu or cuda.")] = "auto",
    force: Annotated[bool, typer.Option(help="Overwrite the CSV / write into a non-empty --cams folder.")] = False,
) -> None:
    """Predict with an exported model (onnxruntime only; the preprocessing comes from the model)."""
    from cxrdebias.deploy.runtime import load_model, predict_to_csv

    m = load_model(model, device=device)
    err.print(f"{model}: {m.metadata.model_version}, threshold {m.metadata.threshold:.4f}, provider {m.provider}")
    s = predict_to_csv(m, inputs, out_csv, cam_dir=cams, batch_size=batch_size, force=force)
    out.print(
        f"{s.images} images, {s.positive} {m.metadata.positive_label} at threshold {m.metadata.threshold:.4f} → {s.csv}"
        + (f", CAM overlays in {s.cam_dir}" if s.cam_dir else "")
        + f" (provider {s.provider})"
    )


def viewer_script() -> Path:
    """``apps/viewer.py`` of this checkout (the package is installed editable from it)."""
    script = Path(cxrdebias.__file__).resolve().parents[1] / "apps" / "viewer.py"
    if not script.is_file():
        from cxrdebias.errors import ConfigError

        raise ConfigError(f"{script}: viewer page not found; install cxrdebias editable from a checkout (pip install -e .)")
    return script


def viewer_command(model: Path, data: list[Path], port: int) -> list[str]:
    """The ``streamlit run`` command line of ``cxrdebias view`` (local, headless)."""
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(viewer_script()),
        "--server.address", "127.0.0.1", "--server.headless", "true", "--server.port", str(port),
        "--browser.gatherUsageStats", "false", "--", "--model", str(model.resolve()),
    ]
    for d in data:
        cmd += ["--data", str(d.resolve())]
    return cmd


@app.command("view")
def view_cmd(
    model: Annotated[Path, typer.Option("--model", help="ONNX model written by `cxrdebias export`.")],
    data: Annotated[list[Path] | None, typer.Option("--data", help="Folder, manifest CSV or image to browse (repeat).")] = None,
    port: Annotated[int, typer.Option(help="Local port of the page (http://127.0.0.1:PORT).")] = 8501,
) -> None:
    """Open the viewer (Streamlit, onnxruntime only): study table, image + Grad-CAM, model panel."""
    import subprocess

    from cxrdebias.errors import DataError

    if not model.is_file():
        from cxrdebias.errors import CheckpointError

        raise CheckpointError(f"{model}: model file not found")
    for d in data or []:
        if not d.exists():
            raise DataError(f"{d}: file or folder not found")
    cmd = viewer_command(model, list(data or []), port)
    err.print(f"viewer on http://127.0.0.1:{port} (Ctrl+C stops it); NOT FOR CLINICAL USE")
    sys.exit(subprocess.call(cmd))


@data_app.command("synth")
def data_synth(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the DICOM files and manifest.csv.")],
    seed: Annotated[int, typer.Option(help="Seed (same seed and options give byte-identical files).")] = 0,
    bias_strength: Annotated[float, typer.Option(help="Site–label correlation in train/val: 0 none, 1 the default prevalences.")] = 1.0,
    image_size: Annotated[int, typer.Option(help="Native image size in pixels.")] = 256,
    train_patients: Annotated[int, typer.Option(help="Training patients per site.")] = 250,
    val_patients: Annotated[int, typer.Option(help="Validation patients per site.")] = 100,
    test_patients: Annotated[int, typer.Option(help="Test patients per site (even: the test set is balanced).")] = 100,
    preview_png: Annotated[Path | None, typer.Option("--preview", help="Also write a contact sheet PNG.")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing synthetic set in --out.")] = False,
) -> None:
    """Write the synthetic multi-site chest X-ray set (DICOM + manifest), fully offline."""
    from pydantic import ValidationError

    from cxrdebias.data.synthetic import SynthConfig, preview, synthesize
    from cxrdebias.errors import ConfigError

    try:
        cfg = SynthConfig(
            seed=seed, bias_strength=bias_strength, image_size=image_size, n_train_patients_per_site=train_patients,
            n_val_patients_per_site=val_patients, n_test_patients_per_site=test_patients,
        )
    except ValidationError as exc:
        raise ConfigError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
    summary = synthesize(out_dir, cfg, force=force)
    if preview_png:
        preview(out_dir, preview_png)
    out.print(summary.table())
    err.print(f"wrote {out_dir / 'manifest.csv'} ({summary.seconds:.0f} s, {summary.images_per_second:.0f} img/s)")


@data_app.command("check")
def data_check(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV (path, label, site, patient_id).")],
    site_source: Annotated[str, typer.Option(help="'column' or 'dicom:<Keyword>'.")] = "column",
    allow_drop: Annotated[bool, typer.Option("--allow-drop", help="Report bad rows as dropped instead of failing.")] = False,
) -> None:
    """Validate a manifest (files, images, labels, sites, duplicates) without training."""
    from cxrdebias.data.cxr import format_drop_summary, load_manifest

    df = load_manifest(manifest, site_source=site_source, allow_drop=allow_drop)
    dropped = df.attrs.get("dropped", [])
    if dropped:
        err.print(format_drop_summary(dropped, len(df) + len(dropped)))
    out.print(f"{manifest}: {len(df)} valid rows, {df['patient_id'].nunique()} patients\n")
    print("| site | patients | images | negative | positive |\n|---|---:|---:|---:|---:|")
    for site, g in df.groupby("site"):
        n_pos = int((g["label"] == 1).sum())
        print(f"| {site} | {g['patient_id'].nunique()} | {len(g)} | {len(g) - n_pos} | {n_pos} |")


@app.command("demo")
def demo(
    out_dir: Annotated[Path | None, typer.Option("--out", help="Folder for the data, runs and summary (default runs/demo-<time>).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a training config key for both runs.")] = None,
) -> None:
    """Main job: synthetic multi-site CXRs → vanilla and EnD (site bias) → per-site comparison."""
    from cxrdebias.experiments.demo import run_demo

    res = run_demo(out_dir, overrides=set_, console=err)
    print(res["table"])
    err.print(f"\nall outputs in {res['out']} (summary.md, */eval/report.png); {res['elapsed_s'] / 60:.1f} min")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2 (no traceback)."""
    try:
        app(standalone_mode=False)
    except CxrDebiasError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # usage errors (typer ≥ 0.16 raises its own bundled click's classes)
        import click

        if isinstance(exc, (click.ClickException, *_typer_click_exceptions())):
            exc.show()
            sys.exit(exc.exit_code)
        raise


def _typer_click_exceptions() -> tuple[type[Exception], ...]:
    """The ClickException class of the click that typer uses (bundled in typer ≥ 0.16)."""
    try:
        from typer._click.exceptions import ClickException
    except ImportError:  # older typer: plain click, already caught
        return ()
    return (ClickException,)


if __name__ == "__main__":
    main()
