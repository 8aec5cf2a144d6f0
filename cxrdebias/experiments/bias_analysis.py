"""``cxrdebias analyze-bias RUN``: the bottleneck of a trained run, and how well pseudo-bias
labels agree with the true bias.

1. rebuild the run's data (from its saved config; CXR runs use the saved ``splits.csv``) and
   its model, load the weights of ``checkpoints/last.pt`` (or ``best.pt``);
2. compute the bottleneck features of one split (validation by default) in one pass;
3. pseudo-bias labels for those samples: the run's own labeller state (runs with
   ``--bias auto``), else an attractor labeller fitted on the features (nearest class mean);
4. write ``bottleneck.png``: a 2-D PCA projection, colour = target, marker = true bias (left,
   when known) and pseudo-bias (right), class centroids drawn as stars;
5. show *what* the groups are (:mod:`cxrdebias.experiments.bias_views`): the groups (a
   ``--bias auto`` run's pseudo groups; another run's true bias groups, or the fitted attractor's
   pseudo groups when the split has no bias labels; ``--groups`` forces one), ``groups.png``
   (example images of every group of every class, as the model sees them) and
   ``group_map.png`` (where the groups differ: the within-class ε² map of the model's early
   layer and of the input pixels, over the mean image); with a ``cues.csv`` beside a CXR run's
   manifest, the maps' mass inside the cue boxes and the groups' agreement with the cue;
6. write ``agreement.json`` / ``agreement.md``: the per-epoch agreement logged during training
   (``metrics.jsonl``, ``pseudo_bias``), the agreement on the analysed split, and (5).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrdebias.config import ModelConfig
from cxrdebias.console import make_console
from cxrdebias.data.base import make_loader
from cxrdebias.debias import build_method
from cxrdebias.debias.unsupervised import (
    AttractorLabeller,
    FeatureTap,
    PseudoBiasOptions,
    UnsupervisedBias,
    label_agreement,
)
from cxrdebias.errors import CheckpointError, ConfigError, RunExistsError
from cxrdebias.evaluation.formatting import format_value
from cxrdebias.experiments import protocols
from cxrdebias.experiments.bias_views import (
    choose_groups,
    cue_report,
    group_counts,
    group_map_report,
    write_contact_sheet,
    write_map_png,
)
from cxrdebias.experiments.config import load_config
from cxrdebias.fileio import write_json_atomic, write_text_atomic
from cxrdebias.models import build_model
from cxrdebias.training.inference import predict
from cxrdebias.training.runs import RunDir, torch_load_checked

AGREEMENT_COLUMNS = ("nmi", "ari", "matched_accuracy", "minority_matched_accuracy")
OUTPUT_FILES = ("bottleneck.png", "groups.png", "group_map.png", "agreement.json", "agreement.md")
MARKERS = "os^vD<>pPX*h"


def agreement_table(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per epoch of ``metrics.jsonl`` that logged ``pseudo_bias``."""
    rows = []
    for r in records:
        pb = r.get("pseudo_bias")
        if not pb:
            continue
        rows.append({"epoch": r["epoch"], "n": pb.get("n"), "labels_used": pb.get("labels_used"),
                     **{k: pb.get(k) for k in AGREEMENT_COLUMNS}})
    return rows


def agreement_markdown(rows: list[dict[str, Any]], split: dict[str, Any] | None = None, split_name: str = "") -> str:
    head = ["epoch", "labels used", "n", "NMI", "ARI", "acc. after matching", "minority acc. after matching"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(format_value(r.get(k), missing="–", nan="nan") for k in ("epoch", "labels_used", "n", *AGREEMENT_COLUMNS)) + " |")
    if not rows:
        lines.append("| (no pseudo-bias agreement logged: not a --bias auto run, or no true bias labels) |" + " |" * (len(head) - 1))
    if split:
        lines.append(
            f"| {split_name} (analysed) | – | " + " | ".join(format_value(split.get(k), missing="–", nan="nan") for k in ("n", *AGREEMENT_COLUMNS)) + " |"
        )
    return "\n".join(lines) + "\n"


def _run_data(cfg, method, run: RunDir, split: str):
    """(samples, num_classes, in_channels, class names) of ``split`` of the run's data (its
    protocol rebuilt from the saved config; a CXR run reads its saved splits)."""
    proto = protocols.get(cfg.data.kind).build(cfg, method, run, make_console(stderr=True))
    names = list(proto.class_names) or [f"class {c}" for c in range(proto.num_classes)]
    return proto.split(split), proto.num_classes, proto.in_channels, names


def pca_2d(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred PCA to 2-D: (mean, 2×D components)."""
    mean = features.mean(dim=0)
    _, _, v = torch.linalg.svd(features - mean, full_matrices=False)
    return mean, v[:2]


def analyze_run(
    run_path: str | Path,
    *,
    split: str = "val",
    checkpoint: str = "last",
    out: str | Path | None = None,
    force: bool = False,
    max_points: int = 3000,
    groups: str = "auto",
    per_group: int = 8,
    map_layer: str = "early",
) -> dict[str, Any]:
    """Bottleneck plot, pseudo-bias agreement and what the groups are, of a run folder (module doc)."""
    if per_group < 1:
        raise ConfigError(f"--per-group {per_group}: expected at least 1 image per group")
    run = RunDir(run_path)
    if not run.path.is_dir():
        raise CheckpointError(f"{run.path}: run folder not found")
    out_dir = Path(out) if out is not None else run.path / "analysis"
    existing = [n for n in OUTPUT_FILES if (out_dir / n).exists()]
    if existing and not force:
        raise RunExistsError(f"{out_dir}: already holds {', '.join(existing)}; pass --force to overwrite")
    cfg = load_config(None, None, base=run.read_config_located())
    ckpt_file = run.checkpoint_dir / f"{checkpoint}.pt"
    state = torch_load_checked(ckpt_file)
    method = build_method(cfg.method.name, cfg.method.options(), cfg.unsupervised)
    samples, num_classes, in_channels, class_names = _run_data(cfg, method, run, split)
    model_cfg = ModelConfig.model_validate({**cfg.model.model_dump(), "pretrained": None})  # weights from the checkpoint
    model = build_model(model_cfg, num_classes, in_channels=in_channels, feature_activation=method.feature_activation)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{ckpt_file}: does not fit the run's model ({exc})") from None
    layer = cfg.unsupervised.layer if isinstance(method, UnsupervisedBias) else None
    u = cfg.unsupervised
    tap = FeatureTap(model, layer, u.layer_pool, u.layer_grid) if layer is not None else None
    if tap is not None:  # the labeller reads an earlier layer (unsupervised.layer): keep it in the same pass
        tap.kept = []
    p = predict(model, make_loader(samples, 256), keep_features=True)
    feats = p.features.flatten(1).float()
    lab_feats = feats
    if tap is not None:
        lab_feats = torch.cat(tap.kept)
        tap.remove()

    # pseudo labels: the run's own labeller (auto runs) or a fitted attractor (any run)
    if isinstance(method, UnsupervisedBias) and "method" in state:
        labeller = method.labeller
        labeller.setup(lab_feats.shape[1], num_classes, 1, "cpu", None)
        prefix = "labeller."
        own = {k[len(prefix):]: v for k, v in state["method"].items() if k.startswith(prefix) and "soft_" not in k}
        missing = labeller.load_state_dict(own, strict=False).missing_keys
        if [k for k in missing if "soft_" not in k]:
            raise CheckpointError(f"{ckpt_file}: the labeller state lacks {missing}")
        pseudo_source = f"the run's {labeller.name} labeller ({checkpoint}.pt)"
    else:
        labeller = AttractorLabeller(PseudoBiasOptions(labeller="attractor", momentum=0.0))
        labeller.setup(feats.shape[1], num_classes)
        labeller.update(feats, p.logits, p.targets, 0)
        pseudo_source = "attractor fitted on the analysed features (nearest class mean)"
    pseudo = torch.cat([labeller.assign(f, lg, t) for f, lg, t in zip(lab_feats.split(1024), p.logits.split(1024), p.targets.split(1024), strict=True)])
    split_agreement = label_agreement(p.biases, pseudo, p.targets)

    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "bottleneck.png"
    _plot(feats, p.targets, p.biases, pseudo, num_classes, png, max_points=max_points, title=f"{run.path.name} — {split}")
    # what the groups are: example images, where they differ, and the cue's ground truth
    grouping = choose_groups(
        groups, auto_run=isinstance(method, UnsupervisedBias), pseudo=pseudo, pseudo_source=pseudo_source, biases=p.biases,
        bias_names=getattr(samples, "bias_names", None), class_names=class_names, num_labels=labeller.num_labels,
        bias_what=_bias_what(cfg),
    )
    targets = p.targets.numpy()
    counts = group_counts(targets, grouping, class_names)
    sheet = out_dir / "groups.png"
    write_contact_sheet(samples, targets, grouping, counts, sheet, per_group=per_group,
                        title=f"{run.path.name}, {split}: {grouping.source}")
    maps = group_map_report(model, samples, targets, grouping, map_layer, class_names)
    cue, boxes = cue_report(cfg, samples, targets, grouping, maps)
    files = [png, sheet]
    if maps["mean_image"] is not None:
        write_map_png(maps, out_dir / "group_map.png", boxes=boxes, title=f"{run.path.name}, {split}: where the groups differ ({grouping.source})")
        files.append(out_dir / "group_map.png")
    rows = agreement_table(run.read_metrics())
    report = {
        "run": str(run.path),
        "split": split,
        "checkpoint": checkpoint,
        "pseudo_labels_from": pseudo_source,
        "per_epoch": rows,
        "split_agreement": split_agreement,
        "plot": str(png),
        "groups": {"kind": grouping.kind, "source": grouping.source, "counts": counts, "sheet": str(sheet)},
        "map": {**maps["json"], "png": str(out_dir / "group_map.png") if len(files) > 2 else None},
        "cue": cue,
    }
    files += [out_dir / "agreement.json", out_dir / "agreement.md"]
    report["files"] = [str(f) for f in files]
    write_json_atomic(out_dir / "agreement.json", report)
    md = agreement_markdown(rows, split_agreement, split)
    views = views_markdown(report)
    write_text_atomic(
        out_dir / "agreement.md",
        f"# Pseudo-bias agreement — {run.path.name}\n\nPseudo labels on `{split}`: {pseudo_source}.\n\n{md}\n{views}",
    )
    report["markdown"] = md
    report["views"] = views
    return report


def _bias_what(cfg) -> str | None:
    """What the data's true bias label is, in a word (``site``, ``colour``, ``patch`` …)."""
    for key in ("bias", "bias_kind"):
        value = getattr(cfg.data, key, None)
        if isinstance(value, str) and value not in ("none", "auto"):
            return value
    return None


def _num(v: Any) -> str:
    return format_value(v, missing="–", nan="nan")


def _where(described: dict[str, Any]) -> str:
    """Where a map's positive mass lies, in words: its strongest ninth of the image, or "spread"
    when no ninth holds twice its area's share (a global difference: contrast, noise, colour)."""
    region = described.get("strongest_region")
    if region is None:
        return "nowhere (no positive mass)"
    share = described["mass_by_region"][region]
    if share < 2 / 9:
        return f"spread over the whole image (largest ninth: {region}, {share:.2f} of the mass)"
    return f"most in the **{region}** ninth of the image ({share:.2f} of the mass, {share * 9:.1f}× its area's share)"


def views_markdown(report: dict[str, Any]) -> str:
    """The "what the groups are" part of ``agreement.md`` and of the command's output."""
    g, m, cue = report["groups"], report["map"], report["cue"]
    lines = [f"## What the groups are\n\nGroups shown: {g['source']} (`groups.png`).\n", "| class | group | images | on the sheet |", "|---|---|---:|---|"]
    lines += [f"| {e['class']} | {e['name']} | {e['n']} | yes |" for e in g["counts"] if e.get("shown")]
    hidden: dict[str, list[int]] = {}
    for e in g["counts"]:
        if not e.get("shown"):
            hidden.setdefault(e["class"], []).append(e["n"])
    lines += [f"| {c} | {len(ns)} smaller group{'s' * (len(ns) > 1)} | {sum(ns)} | no |" for c, ns in hidden.items()]
    lm = m.get("layer_map", {})
    if m.get("reason"):
        lines.append(f"\nWhere they differ: not mapped ({m['reason']}).")
    else:
        lines.append(
            f"\nWhere they differ (`group_map.png`, within-class ε² of `{m['layer']}`, {'×'.join(map(str, lm.get('grid', [])))}): "
            f"{_where(lm)}; in the input pixels: {_where(m.get('input_map', {}))}."
        )
    if "agreement" in cue:
        a = cue["agreement"]
        minority = _num(a.get("minority_matched_accuracy")) if a.get("n_minority") else "– (none)"
        lines.append(
            f"\nCue ({cue.get('kind')}, `{Path(cue['file']).name}`: {cue['n_with_cue']} of {cue['n_known']} images carry it): "
            f"groups vs cue NMI {_num(a.get('nmi'))}, matched accuracy {_num(a.get('matched_accuracy'))}, on the images whose "
            f"cue is not their class's usual one {minority}."
        )
        if "map_mass_in_box" in cue:
            lines += [
                "\n| map | mass in each image's cue box | mass where the cue lies in any image |",
                "|---|---:|---:|",
                f"| {m['layer']} | {_num(cue['map_mass_in_box'])} | {_num(cue['map_mass_in_cue_region'])} |",
                f"| input pixels | {_num(cue['input_map_mass_in_box'])} | {_num(cue['input_map_mass_in_cue_region'])} |",
                f"| a uniform map | {_num(cue['box_area_share'])} | {_num(cue['cue_region_area_share'])} |",
            ]
        if cue.get("reason"):
            lines.append(f"\n({cue['reason']}.)")
    else:
        lines.append(f"\nCue: not scored ({cue.get('reason')}).")
    return "\n".join(lines) + "\n"


def _plot(feats, targets, biases, pseudo, num_classes, path: Path, *, max_points: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean, comps = pca_2d(feats)
    xy = ((feats - mean) @ comps.T).numpy()
    t, b, pb = targets.numpy(), biases.numpy(), pseudo.numpy()
    keep = np.arange(len(t))
    if len(keep) > max_points:
        keep = np.random.default_rng(0).choice(len(t), max_points, replace=False)
    centroids = np.stack([xy[t == c].mean(axis=0) if (t == c).any() else np.full(2, np.nan) for c in range(num_classes)])
    cmap = plt.get_cmap("tab10" if num_classes <= 10 else "tab20")
    known = (b >= 0).any()
    panels = [("true bias", b), ("pseudo-bias", pb)] if known else [("pseudo-bias", pb)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 6), squeeze=False)
    for ax, (label, marks) in zip(axes[0], panels, strict=True):
        for m in np.unique(marks[keep]):
            sel = keep[marks[keep] == m]
            ax.scatter(xy[sel, 0], xy[sel, 1], c=[cmap(int(c) % cmap.N) for c in t[sel]], marker=MARKERS[int(m) % len(MARKERS)],
                       s=14, alpha=0.6, linewidths=0, label=f"{label} {int(m)}")
        for c, (cx, cy) in enumerate(centroids):
            if np.isfinite(cx):
                ax.scatter([cx], [cy], marker="*", s=380, c=[cmap(c % cmap.N)], edgecolors="black", linewidths=1.2, zorder=5)
                ax.annotate(str(c), (cx, cy), fontsize=9, weight="bold", ha="center", va="center", zorder=6)
        ax.set_title(f"colour = target, marker = {label}; ★ = class centroid")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        if len(np.unique(marks)) <= 12:
            ax.legend(fontsize=7, markerscale=1.2, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_report(report: dict[str, Any]) -> str:
    return (
        f"pseudo labels: {report['pseudo_labels_from']}\n\n{report['markdown']}\n"
        + json.dumps({k: v for k, v in report["split_agreement"].items()}, indent=None)
        + f"\n\n{report['views']}"
    )
