"""The ``cxrdebias`` command line: the Typer apps, shared options, consoles and the entry point.

Commands live in :mod:`cxrdebias.cli.experiments` (train, reproduce, evaluate, compare,
analyze-bias, demo, methods), :mod:`cxrdebias.cli.deploy` (export, predict, view) and
:mod:`cxrdebias.cli.data` (data synth, data check). Each is thin: parse options → one library
call → print (escaped) results. A user error (:class:`~cxrdebias.errors.CxrDebiasError`) is
one ``error:`` line and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

import cxrdebias
from cxrdebias.console import esc, make_console
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
AllowOutsideOpt = Annotated[
    bool,
    typer.Option(
        "--allow-outside",
        help="Follow symbolic links that lead out of the manifest's folder (images on a mounted share); "
        "absolute paths and '..' stay refused.",
    ),
]
LabellerOpt = Annotated[
    str | None, typer.Option(help="--bias auto: pseudo-bias labeller (attractor, cluster, gce_head or errors; docs/unsupervised.md).")
]


# emoji codes off; user text in a line with markup goes through ``esc`` (cxrdebias.console)
err = make_console(stderr=True)
out = make_console()


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


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2 (no traceback)."""
    try:
        app(standalone_mode=False)
    except CxrDebiasError as exc:
        err.print(f"[bold red]error:[/] {esc(exc)}", highlight=False)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt as exc:  # SIGTERM during a benchmark/sweep arrives as one (signum = SIGTERM)
        signum = getattr(exc, "signum", 2)
        err.print("terminated" if signum == 15 else "interrupted")
        sys.exit(128 + signum)
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
