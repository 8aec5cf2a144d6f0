"""What ``cxrdebias analyze-bias`` found, shown without knowing the bias (issue 23):

- :func:`choose_groups`: the groups shown — the run's pseudo-bias groups (``--bias auto`` runs,
  or a fitted attractor when the split has no true bias labels) or the true bias groups;
- :func:`write_contact_sheet` (``groups.png``): example images of every group of every class,
  as the model sees them (the run's preprocessing), one grey window for the whole sheet;
- :func:`group_map_report` and :func:`write_map_png` (``group_map.png``): where the groups differ —
  the within-class ε² of an early layer's output (:mod:`cxrdebias.debias.unsupervised.group_maps`)
  over the mean image, and the same statistic of the input pixels;
- :func:`cue_report`: with a ``cues.csv`` beside the run's manifest (``data synth --cue``), how
  much of each map lies inside the cue boxes and how well the groups agree with the cue.

docs/unsupervised.md ("What the groups are") says how to read them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrdebias.data.base import make_loader
from cxrdebias.data.images import read_image
from cxrdebias.data.preprocess import resize_geometry
from cxrdebias.data.synthetic.config import CUES_NAME
from cxrdebias.data.synthetic.cues import read_cues
from cxrdebias.debias.unsupervised import (
    collect_group_moments,
    label_agreement,
    map_mass_in_box,
    map_mass_in_region,
    mass_by_region,
)
from cxrdebias.errors import ConfigError, DataError

#: values of ``analyze-bias --groups``
GROUP_MODES = ("auto", "pseudo", "true")
#: most rows of the contact sheet (groups per class shrink to fit)
MAX_SHEET_ROWS = 24


@dataclass
class Grouping:
    """The groups shown: one label per analysed sample (``< 0``: unknown), their names, and what
    they are (``kind``: ``"pseudo"`` or ``"true"``; ``source``: in words)."""

    labels: np.ndarray
    names: dict[int, str]
    kind: str
    source: str


def choose_groups(
    mode: str, *, auto_run: bool, pseudo: torch.Tensor, pseudo_source: str, biases: torch.Tensor,
    bias_names: list[str] | None, class_names: list[str], num_labels: int, bias_what: str | None = None,
) -> Grouping:
    """``mode`` ``auto``: a ``--bias auto`` run's own pseudo groups; another run's true bias groups
    when the split has them, else the fitted attractor's pseudo groups. ``pseudo`` / ``true``
    force one (``true`` on a split without bias labels: :class:`ConfigError`). ``bias_what``
    names the true bias in the description (e.g. ``site``)."""
    if mode not in GROUP_MODES:
        raise ConfigError(f"--groups {mode!r}: expected one of {', '.join(GROUP_MODES)}")
    known = bool((biases >= 0).any())
    if mode == "true" and not known:
        raise ConfigError("--groups true: the analysed split has no true bias labels (data.bias none, or --bias auto hid them); use --groups pseudo")
    if mode == "true" or (mode == "auto" and not auto_run and known):
        labels = biases.numpy().astype(np.int64)
        names = {int(k): (bias_names[k] if bias_names and 0 <= k < len(bias_names) else f"bias {k}") for k in np.unique(labels[labels >= 0])}
        inside = ", ".join(bias_names) if bias_names else ""
        if bias_what:
            inside = f"{bias_what}: {inside}" if inside else bias_what
        return Grouping(labels, names, "true", "true bias labels" + (f" ({inside})" if inside else ""))
    labels = pseudo.numpy().astype(np.int64)
    c = len(class_names)
    stride = max(1, num_labels // c)

    def name(k: int) -> str:
        if stride == 1:  # labels in class space: the class the sample is attracted to
            return f"p{k} (like {class_names[k]})" if 0 <= k < c else f"p{k}"
        return f"p{k} ({class_names[k // stride] if k // stride < c else k // stride}, cluster {k % stride})"

    return Grouping(labels, {int(k): name(int(k)) for k in np.unique(labels)}, "pseudo", f"pseudo-bias labels: {pseudo_source}")


def group_counts(targets: np.ndarray, grouping: Grouping, class_names: list[str]) -> list[dict[str, Any]]:
    """One entry per (class, group) with samples, largest group of each class first."""
    out = []
    for c in np.unique(targets):
        g = grouping.labels[(targets == c) & (grouping.labels >= 0)]
        values, counts = np.unique(g, return_counts=True)
        for k, n in sorted(zip(values.tolist(), counts.tolist(), strict=True), key=lambda kv: (-kv[1], kv[0])):
            out.append({"class": class_names[int(c)] if int(c) < len(class_names) else str(int(c)), "class_index": int(c),
                        "group": int(k), "name": grouping.names.get(int(k), str(k)), "n": int(n)})
    return out


# -- the contact sheet ------------------------------------------------------------------------------


def _display(images: list[np.ndarray]) -> tuple[float, float]:
    values = np.concatenate([im.ravel() for im in images]) if images else np.zeros(1)
    lo, hi = np.percentile(values, [0.5, 99.5])
    return float(lo), float(hi) if hi > lo else float(lo) + 1.0


def _to_pil(image: np.ndarray, window: tuple[float, float], tile: int):
    from PIL import Image

    lo, hi = window
    x = np.clip((image - lo) / (hi - lo), 0, 1)
    arr = np.rint(x * 255).astype(np.uint8)
    im = Image.fromarray(arr[0]) if arr.shape[0] == 1 else Image.fromarray(np.moveaxis(arr[:3], 0, -1))
    resample = Image.Resampling.NEAREST if tile >= im.width else Image.Resampling.BILINEAR
    return im.convert("RGB").resize((tile, tile), resample)


def write_contact_sheet(
    samples, targets: np.ndarray, grouping: Grouping, counts: list[dict[str, Any]], path: Path, *, per_group: int = 8, title: str = "",
) -> list[dict[str, Any]]:
    """``groups.png``: per class, a row of up to ``per_group`` random images (seed 0) of each of
    its largest groups (at most :data:`MAX_SHEET_ROWS` rows in all), labelled with class, group
    and count. Images are the model inputs with one grey window (0.5–99.5th percentile of every
    shown pixel), so brightness differences between groups stay visible. Marks the ``counts``
    entries shown (``shown``) and returns them."""
    from PIL import Image, ImageDraw, ImageFont

    n_classes = len({e["class_index"] for e in counts}) or 1
    per_class = max(1, MAX_SHEET_ROWS // n_classes)
    rng = np.random.default_rng(0)
    rows: list[tuple[dict[str, Any], list[np.ndarray]]] = []
    taken: dict[int, int] = {}
    for e in counts:
        e["shown"] = taken.get(e["class_index"], 0) < per_class
        if not e["shown"]:
            continue
        taken[e["class_index"]] = taken.get(e["class_index"], 0) + 1
        members = np.flatnonzero((targets == e["class_index"]) & (grouping.labels == e["group"]))
        pick = rng.permutation(members)[:per_group]
        rows.append((e, [samples[int(i)]["image"].numpy() for i in pick]))
    window = _display([im for _, ims in rows for im in ims])
    size = rows[0][1][0].shape[-1] if rows else 32
    tile = size * max(1, 128 // size) if size <= 128 else 128
    gap, head = 4, 14
    font = ImageFont.load_default_imagefont()
    width = max(gap + per_group * (tile + gap), 480)
    sheet = Image.new("RGB", (width, head + len(rows) * (head + tile + gap) + gap), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    draw.text((gap, 2), title or f"groups: {grouping.source}", font=font, fill=(255, 230, 120))
    for r, (e, images) in enumerate(rows):
        y = head + r * (head + tile + gap)
        cls = e["class"] if e["class"].startswith("class") else f"class {e['class']}"
        draw.text((gap, y + 2), f"{cls} | {e['name']} | {e['n']} images", font=font, fill=(230, 230, 230))
        for c, im in enumerate(images):
            sheet.paste(_to_pil(im, window, tile), (gap + c * (tile + gap), y + head))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return counts


# -- the map ----------------------------------------------------------------------------------------


def _describe(values: np.ndarray | None) -> dict[str, Any]:
    if values is None:
        return {}
    regions = mass_by_region(values)
    h, w = values.shape
    peak = int(np.argmax(values))
    out: dict[str, Any] = {"grid": [h, w], "max": float(values.max()),
                           "peak_xy": [round((peak % w + 0.5) / w, 4), round((peak // w + 0.5) / h, 4)]}
    if regions:
        out["mass_by_region"] = {k: round(v, 4) for k, v in regions.items()}
        out["strongest_region"] = max(regions, key=regions.get)
    return out


def group_map_report(model, samples, targets: np.ndarray, grouping: Grouping, layer: str, class_names: list[str]) -> dict[str, Any]:
    """The maps of where the groups differ (one pass of ``model`` over ``samples``): ``layer`` (the
    layer's ε² map, ``values``), ``input`` (the input pixels' ε² map), ``mean_image`` and the
    JSON fields; ``values`` is ``None`` (with a ``reason``) when no class holds two groups."""
    name, feats, inputs = collect_group_moments(
        model, make_loader(samples, 64), torch.as_tensor(targets), torch.as_tensor(grouping.labels), layer
    )
    layer_map, used = feats.difference_map()
    input_map, _ = inputs.difference_map()
    mean = inputs.mean()
    out: dict[str, Any] = {
        "statistic": "epsilon_squared",
        "layer": name,
        "classes": [class_names[c] if c < len(class_names) else str(c) for c in used],
        "layer_map": {**_describe(None if layer_map is None else layer_map.numpy())},
        "input_map": {**_describe(None if input_map is None else input_map.numpy())},
    }
    if layer_map is None:
        out["reason"] = "no class holds two groups with enough images: nothing to compare"
    arrays = {
        "layer": None if layer_map is None else layer_map.numpy(),
        "input": None if input_map is None else input_map.numpy(),
        "mean_image": None if mean is None else mean.numpy(),
    }
    return {"json": out, **arrays}


def write_map_png(maps: dict[str, Any], path: Path, *, boxes: list[tuple[float, float, float, float]], title: str) -> None:
    """``group_map.png``: the mean model input, then each map (upsampled for display, positive
    part, ``inferno``) over it, the cue boxes (when known) outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    mean = maps["mean_image"]
    s = mean.shape[-1]
    img = mean[0] if mean.shape[0] == 1 else np.moveaxis(mean[:3], 0, -1)
    img = (img - img.min()) / (np.ptp(img) or 1.0)
    gray = img if img.ndim == 2 else img.mean(axis=-1)  # under a heat map: colour would mix with it
    info = maps["json"]
    panels = [("mean input (as the model sees it)", None)]
    grid = "×".join(map(str, info["layer_map"].get("grid", [])))
    panels.append((f"ε² of {info['layer']}" + (f" ({grid})" if grid else "") + " between groups", maps["layer"]))
    panels.append(("ε² of the input pixels between groups", maps["input"]))
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.4))
    for ax, (label, values) in zip(axes, panels, strict=True):
        base = img if label == panels[0][0] else gray
        ax.imshow(base, cmap="gray" if base.ndim == 2 else None, extent=(0, s, s, 0))
        if values is not None:
            pos = np.clip(values, 0, None)
            shown = ax.imshow(pos, cmap="inferno", alpha=0.6, extent=(0, s, s, 0), interpolation="bilinear", vmin=0, vmax=max(float(pos.max()), 1e-12))
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="ε² (share of variance explained by the group)")
        elif label != panels[0][0]:
            ax.text(s / 2, s / 2, "no class holds two groups", ha="center", va="center", color="white")
        for x0, y0, x1, y1 in boxes[:40]:
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="cyan", linewidth=0.8, alpha=0.5))
        ax.set_title(label, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- the cue ground truth ---------------------------------------------------------------------------


def sample_paths(samples) -> tuple[list[str], list[str]] | None:
    """The analysed images' paths as the manifest writes them and as files (CXR samples, in
    memory or streamed), or ``None`` for samples without image files."""
    info = getattr(samples, "info", None) or {}
    if info.get("paths") and info.get("abs_paths"):
        return list(info["paths"]), list(info["abs_paths"])
    table = getattr(samples, "table", None)
    if table is not None and "path" in table.columns:  # a streaming CXR dataset
        return [str(p) for p in table["path"]], [str(p) for p in samples.paths]
    return None


def cue_report(cfg, samples, targets: np.ndarray, grouping: Grouping, maps: dict[str, Any]) -> tuple[dict[str, Any], list]:
    """The ``cue`` entry of the analysis JSON and the cue boxes in model-input pixels.

    With a ``cues.csv`` beside the run's manifest: ``file``, ``kind``, ``n_known`` / ``n_with_cue``
    (analysed images it lists / carrying the cue), ``agreement`` (:func:`label_agreement` of the
    groups with the cue, 0/1; ``minority_*`` = the images whose cue is not their class's usual
    one), ``map_mass_in_box`` and ``input_map_mass_in_box`` (:func:`map_mass_in_box`, averaged over
    the cue images; each map's grid laid evenly over the model input) and ``box_area_share`` (what
    a uniform map scores); ``map_mass_in_cue_region`` / ``input_map_mass_in_cue_region`` the same
    for the union of the cue boxes (where the cue lies in any image), ``cue_region_area_share``
    its share of the image. Without one: ``{"reason": …}`` and none of those fields."""
    manifest = getattr(cfg.data, "manifest", None)
    if getattr(cfg.data, "kind", "") != "cxr" or not manifest:
        return {"reason": f"the run's data (data.kind {getattr(cfg.data, 'kind', '?')}) has no manifest folder to hold a {CUES_NAME}"}, []
    file = Path(manifest).parent / CUES_NAME
    if not file.is_file():
        return {"reason": f"no {CUES_NAME} beside the manifest in {file.parent} (cxrdebias data synth --cue writes one)"}, []
    truth = read_cues(file)
    paths = sample_paths(samples)
    if paths is None:
        return {"reason": "the analysed samples carry no image paths to look up in " + CUES_NAME}, []
    rel, absolute = paths
    found = [truth.get(os.path.normpath(p)) for p in rel]
    cue = np.array([-1 if t is None else t.cue for t in found], dtype=np.int64)
    out: dict[str, Any] = {"file": str(file), "kind": next((t.kind for t in found if t is not None), None),
                           "n_known": int((cue >= 0).sum()), "n_with_cue": int((cue == 1).sum())}
    if out["n_known"] == 0:
        return {"reason": f"{file} lists none of the analysed images"}, []
    out["agreement"] = label_agreement(cue, grouping.labels, targets)
    spec = cfg.data.preprocess
    boxes = []
    for t, path in zip(found, absolute, strict=True):
        if t is not None and t.box is not None:
            try:
                shape = read_image(path, site_tag=None).pixels.shape
            except DataError:
                continue
            boxes.append(resize_geometry(shape, spec).map_box(t.box))
    if not boxes:
        out["reason"] = "no analysed image carries the cue: the maps are not scored"
        return out, boxes
    size = (spec.image_size, spec.image_size)
    for prefix, values in (("map", maps["layer"]), ("input_map", maps["input"])):
        in_box = map_mass_in_box(values, boxes, size) if values is not None else {}
        in_region = map_mass_in_region(values, boxes, size) if values is not None else {}
        out[f"{prefix}_mass_in_box"] = in_box.get("mass_in_box")
        out[f"{prefix}_mass_in_cue_region"] = in_region.get("mass_in_region")
    out["box_area_share"] = map_mass_in_box(np.ones((1, 1)), boxes, size)["box_area_share"]
    out["cue_region_area_share"] = map_mass_in_region(np.ones((1, 1)), boxes, size)["region_area_share"]
    return out, boxes


__all__ = [
    "GROUP_MODES",
    "Grouping",
    "choose_groups",
    "cue_report",
    "group_counts",
    "group_map_report",
    "sample_paths",
    "write_contact_sheet",
    "write_map_png",
]
