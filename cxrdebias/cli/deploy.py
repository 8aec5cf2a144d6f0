"""Deployment commands: ``export`` (ONNX + model card), ``predict`` (onnxruntime) and ``view`` (Streamlit)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

import cxrdebias
from cxrdebias.cli.app import AllowOutsideOpt, app, err, out
from cxrdebias.console import esc, progress


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
    ood_method: Annotated[str, typer.Option(help="Out-of-distribution score: mahalanobis or energy.")] = "mahalanobis",
    ood_layer: Annotated[
        str, typer.Option(help="Features of the Mahalanobis score: a probe layer (block1..block4 for DenseNet-121) or bottleneck.")
    ] = "block3",
) -> None:
    """ONNX model with calibrated probabilities, in-graph Grad-CAM and an out-of-distribution score, verified
    against torch and MONAI before writing."""
    from cxrdebias.deploy.export import export_run

    with progress(err, f"exporting {esc(run)}: OOD statistics, ONNX graph, checks against torch and MONAI"):
        res = export_run(run, out_file, check_images=check_images, n_cam_images=cam_images, model_version=model_version, force=force,
                         ood_method=ood_method, ood_layer=ood_layer)
    c = res.parity
    err.print(
        f"verified on {esc(c.images)}: probabilities max |Δ| {c.probability_max_abs_diff:.2e} ({c.n_probability_images} images), "
        f"Grad-CAM vs MONAI correlation min {c.cam_min_correlation:.5f} ({c.n_cam_images} images), batch sizes {c.batch_sizes}"
    )
    meta = res.metadata
    if meta.get("ood_threshold") is None:
        err.print(f"[yellow]no OOD guard and no temperature:[/] {esc(meta['export']['guard'].get('absent'))}")
    else:
        err.print(
            f"temperature T = {meta['temperature']:.4f}; ood_score ({esc(meta['ood_method'])}, "
            f"{esc(meta['export']['guard'].get('layer') or 'logits')}) threshold {meta['ood_threshold']:.4g}, "
            f"max relative |Δ| vs reference {c.ood_max_rel_diff:.2e} ({c.n_ood_images} images)"
        )
        if warning := meta["export"]["guard"].get("temperature", {}).get("warning"):
            err.print(f"[yellow]warning:[/] {esc(warning)}")
    if c.n_cam_constant == c.n_cam_images:
        err.print("[yellow]warning:[/] every checked Grad-CAM map was constant: the CAM check says little for this model")
    out.print(f"wrote {esc(res.model)} ({res.size_bytes / 1e6:.1f} MB), {esc(res.model_card.name)}, {esc(res.monai_metadata.name)}")


@app.command("predict")
def predict_cmd(
    inputs: Annotated[list[Path], typer.Argument(help="Images (DICOM, PNG, JPEG), folders (recursive) or manifest CSVs.", show_default=False)],
    model: Annotated[Path, typer.Option("--model", help="ONNX model written by `cxrdebias export`.")],
    out_csv: Annotated[Path, typer.Option("--out", help="Predictions CSV to write.")],
    cams: Annotated[Path | None, typer.Option("--cams", help="Also write Grad-CAM overlay PNGs into this folder.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per onnxruntime call.")] = 16,
    device: Annotated[str, typer.Option(help="auto (CUDA when onnxruntime-gpu sees a GPU), cpu or cuda.")] = "auto",
    force: Annotated[bool, typer.Option(help="Overwrite the CSV / write into a non-empty --cams folder.")] = False,
    allow_outside: AllowOutsideOpt = False,
) -> None:
    """Predict with an exported model (onnxruntime only; the preprocessing comes from the model)."""
    from cxrdebias.deploy.predict import predict_to_csv
    from cxrdebias.deploy.runtime import load_model

    m = load_model(model, device=device)
    err.print(f"{esc(model)}: {esc(m.metadata.model_version)}, threshold {m.metadata.threshold:.4f}, provider {esc(m.provider)}")
    s = predict_to_csv(m, inputs, out_csv, cam_dir=cams, batch_size=batch_size, force=force, allow_links_outside=allow_outside)
    out.print(
        f"{s.images} images, {s.positive} {esc(m.metadata.positive_label)} at threshold {m.metadata.threshold:.4f} → {esc(s.csv)}"
        + (f", CAM overlays in {esc(s.cam_dir)}" if s.cam_dir else "")
        + f" (provider {esc(s.provider)})"
    )
    if s.flagged is None:
        out.print("no out-of-distribution score: the model was exported before the OOD guard (ood_score, in_distribution empty)")
    else:
        out.print(
            f"{s.flagged} of {s.images} images flagged out of distribution (ood_score > {m.metadata.ood_threshold:.4g}, "
            f"{esc(m.metadata.ood_method or '')}): do not trust their predictions"
        )
    if s.site_report is not None and s.site_files is not None:
        from cxrdebias.evaluation.report import to_markdown

        out.print(esc(to_markdown(s.site_report, run_name="per-site metrics (labelled input)")))
        out.print(f"per-site metrics → {esc(s.site_files[0])}, {esc(s.site_files[1])}")


def viewer_script() -> Path:
    """``apps/viewer.py`` of this checkout (the package is installed editable from it)."""
    script = Path(cxrdebias.__file__).resolve().parents[1] / "apps" / "viewer.py"
    if not script.is_file():
        from cxrdebias.errors import ConfigError

        raise ConfigError(f"{script}: viewer page not found; install cxrdebias editable from a checkout (pip install -e .)")
    return script


#: the only Host names the viewer's WebSocket accepts (DNS rebinding: a page of another site
#: whose name resolves to 127.0.0.1 sends its own name as Host and is refused)
VIEWER_HOSTS = ("127.0.0.1", "localhost")


def viewer_command(model: Path, data: list[Path], port: int, *, allow_outside: bool = False) -> list[str]:
    """The ``streamlit run`` command line of ``cxrdebias view``: local (127.0.0.1 only),
    headless, XSRF protection and CORS (same origin only) on, Host header checked against
    :data:`VIEWER_HOSTS` (docs/robustness.md), the toolbar without developer options (no
    *Deploy* button); ``allow_outside``: a manifest's symbolic links
    may lead out of its folder."""
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(viewer_script()),
        "--server.address", "127.0.0.1", "--server.headless", "true", "--server.port", str(port),
        "--server.enableXsrfProtection", "true", "--server.enableCORS", "true",
        "--client.toolbarMode", "viewer",  # no Deploy / Rerun / Clear cache for the page's readers
    ]
    for host in VIEWER_HOSTS:
        cmd += ["--server.allowedHosts", host]
    cmd += ["--browser.gatherUsageStats", "false", "--", "--model", str(model.resolve())]
    for d in data:
        cmd += ["--data", str(d.resolve())]
    return cmd + (["--allow-outside"] if allow_outside else [])


@app.command("view")
def view_cmd(
    model: Annotated[Path, typer.Option("--model", help="ONNX model written by `cxrdebias export`.")],
    data: Annotated[list[Path] | None, typer.Option("--data", help="Folder, manifest CSV or image to browse (repeat).")] = None,
    port: Annotated[int, typer.Option(help="Local port of the page (http://127.0.0.1:PORT).")] = 8501,
    allow_outside: AllowOutsideOpt = False,
) -> None:
    """Open the viewer (Streamlit, onnxruntime only): study table, image + Grad-CAM, model panel."""
    import os

    from cxrdebias.errors import ConfigError, DataError

    if not model.is_file():
        from cxrdebias.errors import CheckpointError

        raise CheckpointError(f"{model}: model file not found")
    for d in data or []:
        if not d.exists():
            raise DataError(f"{d}: file or folder not found")
    cmd = viewer_command(model, list(data or []), port, allow_outside=allow_outside)
    err.print(f"viewer on http://127.0.0.1:{port} (Ctrl+C stops it); NOT FOR CLINICAL USE")
    sys.stdout.flush()
    sys.stderr.flush()
    try:  # Streamlit replaces this process: a signal to it (Ctrl+C, kill, a service manager) stops the server
        os.execvp(cmd[0], cmd)
    except OSError as exc:
        raise ConfigError(f"{cmd[0]}: cannot start Streamlit ({exc.strerror or exc})") from None
