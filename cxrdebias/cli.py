"""The ``cxrdebias`` command line. Thin: parse options, call library functions, print results."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

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

err = Console(stderr=True)
out = Console()


def _version(value: bool) -> None:
    if value:
        out.print(f"cxrdebias {cxrdebias.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        Optional[bool],
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
        fields = ", ".join(f"{k}={f.default!r}" for k, f in cls.Options.model_fields.items()) or "no options"
        bias = "needs bias labels" if cls.requires_bias else "no bias labels"
        out.print(f"[bold]{name}[/]: {cls.summary} ({bias}; {fields})")


def _biased_mnist_config(
    config: Path | None,
    rho: float | None,
    method: str | None,
    alpha: float | None,
    beta: float | None,
    form: str | None,
    epochs: int | None,
    data_root: Path | None,
    seed: int | None,
    overrides: list[str],
):
    from cxrdebias.config import load_config
    from cxrdebias.errors import ConfigError

    ov: list[str] = []
    method_options = {k: v for k, v in (("alpha", alpha), ("beta", beta), ("form", form)) if v is not None}
    cfg0 = load_config(config, overrides)
    if method is not None and method != cfg0.method.name:
        # --method replaces the whole method section: options of another method do not carry over
        base = cfg0.model_dump(mode="json")
        base["method"] = {"name": method}
        cfg0 = load_config(None, None, base=base)
    if method_options and cfg0.method.name == "vanilla":
        raise ConfigError(f"--{'/--'.join(method_options)} only apply to methods that take them, not 'vanilla'")
    for k, v in method_options.items():
        ov.append(f"method.{k}={v}")
    if rho is not None:
        ov.append(f"data.rho={rho}")
    if epochs is not None:
        ov.append(f"train.epochs={epochs}")
    if data_root is not None:
        ov.append(f"data.root={data_root}")
    if seed is not None:
        ov.append(f"seed={seed}")
    return load_config(None, ov, base=cfg0.model_dump(mode="json"))


@reproduce_app.command("biased-mnist")
def reproduce_biased_mnist(
    rho: Annotated[Optional[float], typer.Option(help="Colour–digit correlation of the training set, in (0, 1].")] = None,
    method: Annotated[Optional[str], typer.Option(help="Debiasing method (see `cxrdebias methods`).")] = None,
    alpha: Annotated[Optional[float], typer.Option(help="EnD: weight of the disentangling term.")] = None,
    beta: Annotated[Optional[float], typer.Option(help="EnD: weight of the entangling term.")] = None,
    form: Annotated[Optional[str], typer.Option(help="EnD: 'paper' (default) or 'reference' form.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs.")] = None,
    data_root: Annotated[Optional[Path], typer.Option(help="MNIST folder (torchvision layout ROOT/MNIST/raw/).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (colouring, init, shuffling).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Run folder (default: runs/<name>-<time>).")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML config (see configs/biased_mnist/).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override any config key: --set train.lr=5e-4")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing --out folder.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
) -> None:
    """Biased MNIST (Bahng et al.): train at correlation ρ, report biased/unbiased test accuracy."""
    from cxrdebias.reproduce import default_run_name, run_biased_mnist

    cfg = _biased_mnist_config(config, rho, method, alpha, beta, form, epochs, data_root, seed, set_ or [])
    if resume and out_dir is None:
        raise typer.BadParameter("--resume needs --out RUN_FOLDER")
    out_dir = out_dir or Path("runs") / default_run_name(cfg)
    results = run_biased_mnist(cfg, out_dir, force=force, resume=resume, console=err)
    m = results["metrics"]
    out.print(f"biased_accuracy={m['biased_accuracy']:.4f} unbiased_accuracy={m['unbiased_accuracy']:.4f} run={out_dir}")


@app.command("demo")
def demo(
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Folder for the demo runs.")] = None,
) -> None:
    """Main job on the default data: vanilla vs EnD on Biased MNIST (ρ=0.997, short schedule)."""
    from cxrdebias.config import load_config
    from cxrdebias.reproduce import run_biased_mnist

    root = Path(__file__).resolve().parents[1] / "configs" / "biased_mnist" / "demo.yaml"
    from datetime import datetime

    base = out_dir or Path("runs") / f"demo-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    rows = []
    for method in ("vanilla", "end"):
        cfg = _biased_mnist_config(root, None, method, None, None, None, None, None, None, [])
        r = run_biased_mnist(load_config(None, None, base=cfg.model_dump(mode="json")), base / method, console=err)
        rows.append((method, r["metrics"]["biased_accuracy"], r["metrics"]["unbiased_accuracy"]))
    out.print("\n| method | biased acc | unbiased acc |\n|---|---|---|")
    for method, b, u in rows:
        out.print(f"| {method} | {b:.4f} | {u:.4f} |")
    out.print(f"\nruns in {base}")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2 (no traceback)."""
    try:
        app(standalone_mode=False)
    except CxrDebiasError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
