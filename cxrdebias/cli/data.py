"""Dataset commands: ``data synth`` (the synthetic multi-site CXR set) and ``data check`` (manifest validation)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cxrdebias.cli.app import AllowOutsideOpt, data_app, err, out
from cxrdebias.console import esc, progress


@data_app.command("synth")
def data_synth(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the DICOM files and manifest.csv.")],
    seed: Annotated[int, typer.Option(help="Seed (same seed and options give byte-identical files).")] = 0,
    bias_strength: Annotated[float, typer.Option(help="Site–label correlation in train/val: 0 none, 1 the default prevalences "
                                                 "(pass 0 with --cue for a cue that is the only shortcut).")] = 1.0,
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
    cue: Annotated[str | None, typer.Option(
        "--cue", help="A local shortcut correlated with the label, drawn into the images: tag, text, marker, electrodes or "
        "tube (default: none). Hospitals stay correlated with the label unless --bias-strength 0. Writes cues.csv.")] = None,
    cue_positive_rate: Annotated[float, typer.Option(help="Share of positive train/val images with the cue.")] = 0.95,
    cue_negative_rate: Annotated[float, typer.Option(help="Share of negative train/val images with the cue.")] = 0.05,
    cue_test_positive_rate: Annotated[float, typer.Option(help="Share of positive test images with the cue.")] = 0.5,
    cue_test_negative_rate: Annotated[float, typer.Option(help="Share of negative test images with the cue "
                                                          "(0.5 and 0.5: uncorrelated, balanced cue groups).")] = 0.5,
    cue_size: Annotated[float | None, typer.Option(help="Cue size as a fraction of the image side (tag side, text or marker "
                                                   "height, electrode diameter, tube width; default: the kind's).")] = None,
    cue_jitter: Annotated[float, typer.Option(help="Largest random offset of the cue from its place, per direction, as a "
                                              "fraction of the image side.")] = 0.05,
    preview_png: Annotated[Path | None, typer.Option("--preview", help="Also write a contact sheet PNG "
                                                     "(with a cue: rows with and without it).")] = None,
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
            cue=None if cue is None or cue.lower() == "none" else cue.lower(), cue_positive_rate=cue_positive_rate,
            cue_negative_rate=cue_negative_rate, cue_test_positive_rate=cue_test_positive_rate,
            cue_test_negative_rate=cue_test_negative_rate, cue_size=cue_size, cue_jitter=cue_jitter,
        )
    except ValidationError as exc:
        raise ConfigError("; ".join(_problem(e) for e in exc.errors())) from None
    with progress(err, f"writing the synthetic set to {esc(out_dir)} (patients)", total=0) as update:
        summary = synthesize(out_dir, cfg, force=force, progress=lambda done, total: update(completed=done, total=total))
    if preview_png:
        preview(out_dir, preview_png)
    out.print(summary.table(), markup=False, highlight=False)
    err.print(f"wrote {esc(out_dir / 'manifest.csv')} ({summary.seconds:.0f} s, {summary.images_per_second:.0f} img/s)")
    if summary.cues_file:
        err.print(f"wrote {esc(summary.cues_file)} (where the {cfg.cue} is in each image)")


def _problem(error) -> str:
    """One validation error of SynthConfig as one line, naming the option (``--cue-size``) where
    it is one of the command's and the config field otherwise."""
    loc = ".".join(map(str, error["loc"]))
    message = error["msg"].removeprefix("Value error, ")
    if loc.startswith("cue"):
        return f"--{loc.replace('_', '-')}: {message}"
    return f"{loc}: {message}" if loc else message


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
