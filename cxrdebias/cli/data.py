"""Dataset commands: ``data synth`` (the synthetic multi-site CXR set) and ``data check`` (manifest validation)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cxrdebias.cli.app import AllowOutsideOpt, data_app, err, out
from cxrdebias.console import esc


@data_app.command("synth")
def data_synth(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the DICOM files and manifest.csv.")],
    seed: Annotated[int, typer.Option(help="Seed (same seed and options give byte-identical files).")] = 0,
    bias_strength: Annotated[float, typer.Option(help="Site–label correlation in train/val: 0 none, 1 the default prevalences.")] = 1.0,
    image_size: Annotated[int, typer.Option(help="Native image size in pixels.")] = 256,
    sites: Annotated[int, typer.Option("--sites", help="Number of training sites (hospital_a, hospital_b, …).")] = 2,
    prevalence: Annotated[
        list[float] | None,
        typer.Option("--prevalence", help="Positive share of one training site's train/val patients at bias strength 1; "
                     "repeat once per site, in site order (default: 0.875 … 0.125)."),
    ] = None,
    external_sites: Annotated[int, typer.Option("--external-sites", help="Extra sites written only as test data "
                                                "(external_1 …), each with its own acquisition style, balanced labels.")] = 0,
    train_patients: Annotated[int, typer.Option(help="Training patients per site.")] = 250,
    val_patients: Annotated[int, typer.Option(help="Validation patients per site.")] = 100,
    test_patients: Annotated[int, typer.Option(help="Test patients per site (even: the test set is balanced).")] = 100,
    preview_png: Annotated[Path | None, typer.Option("--preview", help="Also write a contact sheet PNG.")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing synthetic set in --out.")] = False,
) -> None:
    """Write the synthetic multi-site chest X-ray set (DICOM + manifest), fully offline."""
    from pydantic import ValidationError

    from cxrdebias.data.synthetic import SynthConfig, preview, synthesize
    from cxrdebias.data.synthetic.config import default_prevalence, site_names
    from cxrdebias.errors import ConfigError

    try:
        names = site_names(sites)
    except ValueError as exc:
        raise ConfigError(f"--sites: {exc}") from None
    if prevalence and len(prevalence) != sites:
        raise ConfigError(f"--prevalence: given {len(prevalence)} time(s); expected one value per site ({sites}), in site order")
    try:
        cfg = SynthConfig(
            seed=seed, bias_strength=bias_strength, image_size=image_size, n_train_patients_per_site=train_patients,
            n_val_patients_per_site=val_patients, n_test_patients_per_site=test_patients, sites=names,
            site_prevalence=list(prevalence) if prevalence else default_prevalence(sites), external_sites=external_sites,
        )
    except ValidationError as exc:
        raise ConfigError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
    summary = synthesize(out_dir, cfg, force=force)
    if preview_png:
        preview(out_dir, preview_png)
    out.print(summary.table(), markup=False, highlight=False)
    err.print(f"wrote {esc(out_dir / 'manifest.csv')} ({summary.seconds:.0f} s, {summary.images_per_second:.0f} img/s)")


@data_app.command("check")
def data_check(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV (path, label, site, patient_id).")],
    site_source: Annotated[str, typer.Option(help="'column' or 'dicom:<Keyword>'.")] = "column",
    allow_drop: Annotated[bool, typer.Option("--allow-drop", help="Report bad rows as dropped instead of failing.")] = False,
    allow_outside: AllowOutsideOpt = False,
) -> None:
    """Validate a manifest (files, images, labels, sites, duplicates) without training."""
    from cxrdebias.data.cxr import format_drop_summary, load_manifest
    from cxrdebias.data.cxr.splits import site_table_markdown

    df = load_manifest(manifest, site_source=site_source, allow_drop=allow_drop, allow_links_outside=allow_outside)
    dropped = df.attrs.get("dropped", [])
    if dropped:
        err.print(format_drop_summary(dropped, len(df) + len(dropped)), markup=False, highlight=False)
    out.print(f"{esc(manifest)}: {len(df)} valid rows, {df['patient_id'].nunique()} patients\n")
    print(site_table_markdown(df))
