"""Writing the synthetic set: the study design (who is in which site and split, with which label),
rendering every patient's images, and the files of :func:`synthesize` and :func:`preview`."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cxrdebias.data.cxr.manifest import MANIFEST
from cxrdebias.data.synthetic.anatomy import (
    detector,
    render_attenuation,
    sample_anatomy,
    sample_pose,
)
from cxrdebias.data.synthetic.config import (
    CONFIG_NAME,
    CUES_NAME,
    GENERATOR_VERSION,
    IMAGES_DIR,
    MANIFEST_NAME,
    CueCount,
    SplitSiteCount,
    SynthConfig,
    SynthSummary,
)
from cxrdebias.data.synthetic.cues import (
    CUE_BOX,
    CUE_COLUMNS,
    PHYSICAL,
    REGION,
    assign_cues,
    cue_size_px,
    draw_cue,
    draw_rng,
)
from cxrdebias.data.synthetic.dicom import encode, write_image
from cxrdebias.data.synthetic.signature import apply_site
from cxrdebias.data.synthetic.styles import SiteStyle, site_style
from cxrdebias.errors import DataError, RunExistsError
from cxrdebias.fileio import write_bytes_atomic


@dataclass
class _Patient:
    site: int
    split: str
    index: int  # within (site, split)
    label: int
    n_images: int
    sex: str
    age: int
    patient_id: str = ""


_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}


def _plan(cfg: SynthConfig) -> list[_Patient]:
    """Patients with site, split, label, image count and demographics (deterministic)."""
    rng = np.random.default_rng([cfg.seed, 0])
    lo, hi = cfg.images_per_patient
    prev = cfg.pool_prevalence()
    patients: list[_Patient] = []
    for s in range(len(cfg.sites)):
        for split, n in (("train", cfg.n_train_patients_per_site), ("val", cfg.n_val_patients_per_site)):
            n_pos = int(round(prev[s] * n))
            labels = np.zeros(n, dtype=int)
            labels[:n_pos] = 1
            labels = rng.permutation(labels)
            counts = rng.integers(lo, hi + 1, size=n)
            for i in range(n):
                patients.append(_Patient(s, split, i, int(labels[i]), int(counts[i]), "", 0))
        patients += _balanced_test(cfg, s, rng)
    _identify(patients, rng, first=1)
    # external (test-only) sites: their own random stream, ids after the training sites' ids,
    # so that adding them leaves every training-site patient and image unchanged
    ext_rng = np.random.default_rng([cfg.seed, 3])
    external = [p for k in range(cfg.external_sites) for p in _balanced_test(cfg, len(cfg.sites) + k, ext_rng)]
    _identify(external, ext_rng, first=len(patients) + 1)
    return patients + external


def _balanced_test(cfg: SynthConfig, site: int, rng: np.random.Generator) -> list[_Patient]:
    """Test patients of one site: pairs (one positive, one negative) share the image count →
    exactly 50/50 images."""
    lo, hi = cfg.images_per_patient
    half = cfg.n_test_patients_per_site // 2
    counts = rng.integers(lo, hi + 1, size=half)
    labels = np.concatenate([np.ones(half, dtype=int), np.zeros(half, dtype=int)])
    order = rng.permutation(2 * half)
    return [_Patient(site, "test", i, int(labels[j]), int(counts[j % half]), "", 0) for i, j in enumerate(order)]


def _identify(patients: list[_Patient], rng: np.random.Generator, first: int) -> None:
    """Patient ids ``SYN<first>`` … in a random order, sex and age."""
    ids = rng.permutation(len(patients))
    for p, pid in zip(patients, ids, strict=True):
        p.patient_id = f"SYN{pid + first:05d}"
        p.sex = "F" if rng.random() < 0.45 else "M"
        p.age = int(np.clip(np.rint(rng.normal(58, 16)), 18, 95))


def _cue_flags(cfg: SynthConfig, patients: list[_Patient]) -> list[list[bool]]:
    """Whether each image of each patient carries the cue (all False without a cue)."""
    if cfg.cue is None:
        return [[False] * p.n_images for p in patients]
    pos, neg = cfg.cue_positive_rate, cfg.cue_negative_rate
    rates = {("train", 1): pos, ("val", 1): pos, ("train", 0): neg, ("val", 0): neg,
             ("test", 1): cfg.cue_test_positive_rate, ("test", 0): cfg.cue_test_negative_rate}  # fmt: skip
    images = [(p.site, p.split, p.label) for p in patients for _ in range(p.n_images)]
    flat = iter(assign_cues(cfg.seed, images, rates).tolist())
    return [[next(flat) for _ in range(p.n_images)] for p in patients]


Box = tuple[int, int, int, int]


def _render_patient(
    cfg: SynthConfig, p: _Patient, style: SiteStyle, cues: list[bool] | None = None
) -> list[tuple[np.ndarray, str, Box | None]]:
    """Display images (``n×n`` float32 in [0, 1]), view and cue box (None: no cue) of every
    image of one patient; ``cues[k]``: whether image ``k`` carries :attr:`SynthConfig.cue`."""
    key = [cfg.seed, 1, p.site, _SPLIT_CODE[p.split], p.index]
    prng = np.random.default_rng(key)
    lo, hi = cfg.severity_range
    severity = float(prng.uniform(lo, hi)) if p.label == 1 else 0.0
    anatomy = sample_anatomy(prng, female=p.sex == "F", severity=severity, other_rate=cfg.other_findings_rate)
    out = []
    for k in range(p.n_images):
        irng = np.random.default_rng([*key, 2 + k])
        view = "AP" if irng.random() < style.ap_fraction else "PA"
        pose = sample_pose(irng, ap=view == "AP")
        A = render_attenuation(anatomy, pose, cfg.image_size)
        cue = None
        if cues and cues[k] and cfg.cue is not None:
            cue = draw_cue(cfg.cue, cfg.image_size, cfg.cue_size, cfg.cue_jitter, draw_rng(cfg.seed, p.site, p.split, p.index, k))
            if cue.physical:
                cue.add_to_attenuation(A)  # a device: seen through the site's processing
        d = apply_site(detector(A, pose), style, cfg.site_style_strength, cfg.all_sites()[p.site], view, irng)
        if cue is not None and not cue.physical:
            cue.stamp(d)  # burned in after the site's processing, like its own marker and label
        out.append((d, view, None if cue is None else cue.box))
    return out


@contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """Run the small matrix products on one BLAS thread.

    The products are tiny; a multi-threaded BLAS only adds synchronisation, and on a machine
    whose cores are busy (e.g. a training run) it slows generation down by an order of
    magnitude. ``threadpoolctl`` ships with scikit-learn; without it this is a no-op.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _prepare_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise RunExistsError(
                f"{out_dir} is not empty; choose another folder or pass force=True (--force) to "
                "replace a previous synthetic data set there"
            )
        if (out_dir / IMAGES_DIR).exists() and not (out_dir / CONFIG_NAME).exists():
            raise DataError(
                f"{out_dir} has an '{IMAGES_DIR}' folder but no {CONFIG_NAME}: it does not look "
                "like a synthetic data set, refusing to delete it even with force=True"
            )
        for name in (MANIFEST_NAME, CONFIG_NAME, CUES_NAME):
            (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(out_dir / IMAGES_DIR, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def _generate(
    cfg: SynthConfig,
    out: Path,
    patients: list[_Patient],
    styles: list[SiteStyle],
    rows: list[dict],
    cue_rows: list[dict],
    pixel_hash,
    progress: Callable[[int, int], None] | None,
) -> None:
    """Render, encode and write every image; append manifest rows (and, with a cue, cues.csv
    rows); hash the pixel data."""
    flags = _cue_flags(cfg, patients)
    for i, p in enumerate(patients):
        style = styles[p.site]
        site = cfg.all_sites()[p.site]
        for k, (d, view, box) in enumerate(_render_patient(cfg, p, style, flags[i])):
            stored = encode(d, style)
            pixel_hash.update(stored.tobytes())
            rel = f"{IMAGES_DIR}/{site}/{p.patient_id}_{k}.dcm"
            day = 1 + (p.index * 7 + k * 3) % 28
            write_image(
                out / rel, stored, style, site=site, patient_id=p.patient_id, sex=p.sex,
                age=p.age, view=view, image_number=k + 1, study_date=f"2020{3 + k:02d}{day:02d}",
            )  # fmt: skip
            values = (rel, p.label, site, p.patient_id, view, p.sex, p.age, p.split)
            rows.append(dict(zip(MANIFEST.columns, values, strict=True)))  # path, label, …, split
            if cfg.cue is not None:
                corners = dict(zip(CUE_BOX, box or ("",) * 4, strict=True))
                cue_rows.append({"path": rel, "cue": int(box is not None), "kind": cfg.cue, **corners})
        if progress is not None:
            progress(i + 1, len(patients))


def synthesize(
    out_dir: str | Path,
    cfg: SynthConfig | None = None,
    *,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> SynthSummary:
    """Generate the synthetic multi-site chest X-ray set in ``out_dir``.

    Writes the DICOM images, ``manifest.csv`` (last, atomically: its presence means the set is
    complete), ``synth_config.json`` and, with a cue, ``cues.csv``. Refuses a non-empty ``out_dir`` unless ``force`` (which
    replaces a previous synthetic set there). ``progress(done, total)`` is called per patient.
    """
    cfg = cfg or SynthConfig()
    out = Path(out_dir)
    _prepare_out_dir(out, force)
    t0 = time.perf_counter()
    patients = _plan(cfg)
    styles = [site_style(i).faded(cfg.site_style_strength) for i in range(len(cfg.all_sites()))]
    for name in cfg.all_sites():
        (out / IMAGES_DIR / name).mkdir(parents=True, exist_ok=True)

    rows: list[dict] = []
    cue_rows: list[dict] = []
    pixel_hash = hashlib.sha256()
    with _single_threaded_blas():
        _generate(cfg, out, patients, styles, rows, cue_rows, pixel_hash, progress)

    manifest_bytes = _csv_bytes(rows, MANIFEST.columns)
    manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()

    counts = []
    for split in MANIFEST.splits:
        for s, name in enumerate(cfg.all_sites()):
            if split != "test" and name not in cfg.sites:
                continue  # an external site has test patients only
            sel = [r for r in rows if r[MANIFEST.split] == split and r[MANIFEST.site] == name]
            n_pat = sum(1 for p in patients if p.split == split and p.site == s)
            pos = sum(r[MANIFEST.label] for r in sel)
            counts.append(
                SplitSiteCount(split=split, site=name, patients=n_pat, images=len(sel),
                               positive_images=pos, prevalence=pos / len(sel) if sel else 0.0)
            )  # fmt: skip
    from cxrdebias import __version__

    record = {
        # the generator's name as synth_config.json has always recorded it (its module was
        # cxrdebias.data.synthetic_cxr): part of the written data format, kept unchanged
        "generator": "cxrdebias.data.synthetic_cxr",
        "generator_version": GENERATOR_VERSION,
        "package_version": __version__,
        "seed": cfg.seed,
        # external_sites and the cue options are recorded only when used: the default set's
        # file stays as it was
        "config": cfg.record(),
        "pool_prevalence": cfg.pool_prevalence(),
        "site_styles": {name: asdict(st) for name, st in zip(cfg.all_sites(), styles, strict=True)},
        **({"external_sites": cfg.external_site_names()} if cfg.external_sites else {}),
        "n_patients": len(patients),
        "n_images": len(rows),
        "counts": [c.model_dump() for c in counts],
        "manifest_sha256": manifest_sha,
        "pixel_sha256": pixel_hash.hexdigest(),
    }
    cue_counts: list[CueCount] = []
    if cfg.cue is not None:
        cues_bytes = _csv_bytes(cue_rows, CUE_COLUMNS)
        cue_counts = _cue_counts(rows, cue_rows)
        record["cues"] = _cue_record(cfg, cue_counts, hashlib.sha256(cues_bytes).hexdigest())
        write_bytes_atomic(out / CUES_NAME, cues_bytes)
    write_bytes_atomic(out / CONFIG_NAME, (json.dumps(record, indent=2) + "\n").encode())
    write_bytes_atomic(out / MANIFEST_NAME, manifest_bytes)
    seconds = time.perf_counter() - t0
    return SynthSummary(
        out_dir=str(out),
        manifest=str(out / MANIFEST_NAME),
        config_file=str(out / CONFIG_NAME),
        n_patients=len(patients),
        n_images=len(rows),
        counts=counts,
        seconds=round(seconds, 3),
        images_per_second=round(len(rows) / max(seconds, 1e-9), 1),
        manifest_sha256=manifest_sha,
        pixel_sha256=pixel_hash.hexdigest(),
        cues_file=str(out / CUES_NAME) if cfg.cue is not None else None,
        cue_counts=cue_counts,
    )


def _csv_bytes(rows: list[dict], columns) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def _cue_counts(rows: list[dict], cue_rows: list[dict]) -> list[CueCount]:
    """Images and images with the cue per (split, label)."""
    counts = []
    for split in MANIFEST.splits:
        for label in (1, 0):
            sel = [c for r, c in zip(rows, cue_rows, strict=True) if r[MANIFEST.split] == split and r[MANIFEST.label] == label]
            if sel:
                counts.append(CueCount(split=split, label=label, images=len(sel), with_cue=sum(c["cue"] for c in sel)))
    return counts


def _cue_record(cfg: SynthConfig, counts: list[CueCount], sha256: str) -> dict:
    """The "cues" entry of synth_config.json: what was drawn, where, and how often."""
    assert cfg.cue is not None
    return {
        "kind": cfg.cue,
        "file": CUES_NAME,
        "placement": "physical device: added to the attenuation after the anatomy, before the site signature"
        if cfg.cue in PHYSICAL
        else "burned in: stamped on the display image after the site signature",
        "size_px": cue_size_px(cfg.cue, cfg.cue_size, cfg.image_size),
        "jitter_px": int(round(cfg.cue_jitter * cfg.image_size)),
        "region": REGION[cfg.cue],
        "counts": [c.model_dump() for c in counts],
        "cues_sha256": sha256,
    }


def preview(
    out_dir: str | Path,
    path_png: str | Path,
    *,
    per_group: int = 4,
    tile: int = 128,
    split: str | None = "test",
) -> Path:
    """Write a contact sheet: one row per (site, label), ``per_group`` images of each; in a set
    with a cue (``cues.csv``), one row per (site, label, cue present or not).

    Images come from ``split`` (all splits when ``None`` or when the split has too few), the
    first ones in manifest order, one per patient. Returns the PNG path.
    """
    from cxrdebias.data.images import read_image

    root = Path(out_dir)
    manifest = root / MANIFEST_NAME
    if not manifest.is_file():
        raise DataError(f"{manifest} not found: run synthesize() first")
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    cue_of: dict[str, str] = {}
    kind = ""
    if (root / CUES_NAME).is_file():
        with open(root / CUES_NAME, newline="") as f:
            cue_rows = list(csv.DictReader(f))
        cue_of = {r["path"]: r["cue"] for r in cue_rows}
        kind = cue_rows[0]["kind"] if cue_rows else ""
    m = MANIFEST
    sites = list(dict.fromkeys(r[m.site] for r in rows))
    groups: list[tuple[str, list[dict]]] = []
    for site in sites:
        for label in ("0", "1"):
            for cue in ("1", "0") if cue_of else ("",):
                chosen: list[dict] = []
                seen: set[str] = set()
                pools = [r for r in rows if split is None or r[m.split] == split] + rows
                for r in pools:
                    if (r[m.site] == site and r[m.label] == label and r[m.patient_id] not in seen
                            and cue_of.get(r[m.path], "") == cue):  # fmt: skip
                        chosen.append(r)
                        seen.add(r[m.patient_id])
                    if len(chosen) == per_group:
                        break
                title = f"{site} {'COVID+' if label == '1' else 'negative'}"
                groups.append((title + {"": "", "1": f", with {kind}", "0": f", no {kind}"}[cue], chosen))
    font = ImageFont.load_default_imagefont()
    label_w, gap = 16, 4
    sheet = Image.new("L", (label_w + per_group * (tile + gap) + gap, len(groups) * (tile + 16 + gap)), 40)
    draw = ImageDraw.Draw(sheet)
    for g, (title, chosen) in enumerate(groups):
        y = g * (tile + 16 + gap)
        draw.text((label_w + gap, y + 2), title, font=font, fill=230)
        for c, r in enumerate(chosen):
            d = read_image(root / r[m.path]).pixels
            im = Image.fromarray(np.rint(d * 255).astype(np.uint8)).resize((tile, tile), Image.BILINEAR)
            sheet.paste(im, (label_w + gap + c * (tile + gap), y + 14))
    path_png = Path(path_png)
    path_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path_png)
    return path_png
