r"""Where discovered groups differ: a spatial map of an early layer (or of the input), and how
much of it lies inside known boxes. Read by ``cxrdebias analyze-bias`` (docs/unsupervised.md,
"What the groups are").

The map is a one-way analysis of variance of every (channel, position) of a layer's output
across the groups, **within each class**: for class ``y`` with groups ``g`` of ``n_g`` samples
(``N = Σ n_g``, ``G`` groups), per channel ``c`` and position ``p``,

.. math::

    ε²_y(c, p) = \frac{SS_B − (G − 1)·SS_W / (N − G)}{SS_T}

— epsilon squared (Kelley 1935), the share of the variance explained by the group, corrected
for the share ``G − 1`` random groups would explain by chance (so it is ≈ 0 where the groups do
not differ, and can be slightly negative). It is scale-free (a channel's units do not matter)
and takes any number of groups. The map is ``M(p) = mean_y mean_c ε²_y(c, p)`` over the classes
with at least two groups; its positive part is where the groups differ. Working within each
class keeps out what the classes differ by (the disease), even when the groups go with the
class (they do, for a shortcut).

:class:`GroupMoments` accumulates count, sum and sum of squares per (class, group) batch by
batch (float64), so a split of any size fits in memory; :func:`collect_group_moments` runs a
model once over a loader and fills one for a layer and one for the input.
:func:`map_mass_in_box` scores a map against boxes, one per image (e.g. the cue boxes of
``cues.csv``), :func:`map_mass_in_region` against the union of the boxes (where the cue is in
any image: fairer to a coarse map and a jittered cue), :func:`mass_by_region` says where its
mass lies in words.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from cxrdebias.data.base import Batch
from cxrdebias.debias.unsupervised.taps import resolve_layer

#: the 3×3 regions of :func:`mass_by_region` (rows, then columns)
ROWS, COLUMNS = ("top", "middle", "bottom"), ("left", "centre", "right")


def epsilon_squared(n: torch.Tensor, sums: torch.Tensor, sumsq: torch.Tensor, *, rel_tol: float = 1e-9) -> torch.Tensor | None:
    """ε² (module doc) of every element from per-group moments: ``n`` (G), ``sums`` and ``sumsq``
    (G×…). Groups with ``n = 0`` are left out; ``None`` with fewer than 2 groups or ``N ≤ G``.
    An element constant over the samples (total sum of squares ≤ ``rel_tol`` of ``Σx²``) gets 0."""
    keep = n > 0
    n, sums, sumsq = n[keep].double(), sums[keep].double(), sumsq[keep].double()
    g, total = int(n.numel()), float(n.sum()) if n.numel() else 0.0
    if g < 2 or total <= g:
        return None
    shape = (-1,) + (1,) * (sums.dim() - 1)
    means = sums / n.view(shape)
    grand = sums.sum(0) / total
    ssb = (n.view(shape) * (means - grand) ** 2).sum(0)
    ssw = (sumsq - n.view(shape) * means**2).clamp(min=0).sum(0)
    sst = ssb + ssw
    constant = sst <= rel_tol * sumsq.sum(0).clamp(min=torch.finfo(torch.float64).tiny)
    eps = (ssb - (g - 1) * ssw / (total - g)) / torch.where(constant, torch.ones_like(sst), sst)
    return torch.where(constant, torch.zeros_like(eps), eps)


class GroupMoments:
    """Count, sum and sum of squares (float64, CPU) of per-sample ``C×H×W`` maps in every
    (class, group) cell. The cells come from the full label arrays (``targets``, ``groups``, one
    entry per dataset sample; a group ``< 0`` is unknown and the sample is left out);
    :meth:`add` takes a batch of maps with their dataset indices."""

    def __init__(self, targets: torch.Tensor, groups: torch.Tensor):
        t, g = torch.as_tensor(targets).long().cpu(), torch.as_tensor(groups).long().cpu()
        if t.shape != g.shape or t.dim() != 1:
            raise ValueError(f"targets {tuple(t.shape)} and groups {tuple(g.shape)} must be one entry per sample")
        self.cells, self.cell_of = torch.unique(torch.stack([t, g], dim=1), dim=0, return_inverse=True)
        self.cell_of = torch.where(g >= 0, self.cell_of, torch.full_like(self.cell_of, -1))
        self.n = torch.zeros(len(self.cells), dtype=torch.float64)
        self.sums: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None

    def add(self, maps: torch.Tensor, index: torch.Tensor) -> None:
        x = maps.detach().to("cpu", torch.float64)
        if x.dim() == 3:  # N×H×W: one channel
            x = x.unsqueeze(1)
        cell = self.cell_of[torch.as_tensor(index).long().cpu()]
        x, cell = x[cell >= 0], cell[cell >= 0]
        if self.sums is None:
            self.sums = torch.zeros((len(self.cells), *x.shape[1:]), dtype=torch.float64)
            self.sumsq = torch.zeros_like(self.sums)
        self.sums.index_add_(0, cell, x)
        self.sumsq.index_add_(0, cell, x * x)
        self.n.index_add_(0, cell, torch.ones(len(cell), dtype=torch.float64))

    def class_map(self, cls: int) -> torch.Tensor | None:
        """``mean_c ε²_cls(c, ·)`` (H×W), or ``None`` when the class has fewer than 2 groups."""
        if self.sums is None:
            return None
        rows = self.cells[:, 0] == cls
        eps = epsilon_squared(self.n[rows], self.sums[rows], self.sumsq[rows])
        return None if eps is None else eps.mean(dim=0)

    def difference_map(self) -> tuple[torch.Tensor | None, list[int]]:
        """The map ``M`` (module doc, H×W float64) and the classes it averages; ``(None, [])``
        when no class holds two groups."""
        maps, used = [], []
        for cls in torch.unique(self.cells[:, 0]).tolist():
            m = self.class_map(int(cls))
            if m is not None:
                maps.append(m)
                used.append(int(cls))
        return (torch.stack(maps).mean(dim=0) if maps else None), used

    def mean(self) -> torch.Tensor | None:
        """The mean map over every sample added (C×H×W)."""
        if self.sums is None:
            return None
        return self.sums.sum(0) / self.n.sum()


@torch.no_grad()
def collect_group_moments(
    model: nn.Module, loader: Iterable[Batch], targets: torch.Tensor, groups: torch.Tensor, layer: str = "early",
    *, device: torch.device | str = "cpu",
) -> tuple[str, GroupMoments, GroupMoments]:
    """One pass of ``model`` (eval mode, restored afterwards) over ``loader``: the moments of the
    output of ``layer`` (``"early"``: the model's first block) and of the input, per (class,
    group) of ``targets``/``groups`` (indexed by ``batch["index"]``). Returns the module path
    read, the layer's and the input's :class:`GroupMoments`."""
    name = resolve_layer(model, layer, option="--map-layer")
    module = dict(model.named_modules())[name]
    feats, inputs = GroupMoments(targets, groups), GroupMoments(targets, groups)
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, i, out: seen.append(out.detach()))
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            seen.clear()
            model(batch["image"].to(device))
            out = seen[0]
            if out.dim() != 4:
                raise ValueError(f"--map-layer={name!r}: its output has shape {tuple(out.shape)}, expected N×C×H×W (a convolutional layer)")
            feats.add(out, batch["index"])
            inputs.add(batch["image"], batch["index"])
    finally:
        handle.remove()
        model.train(was_training)
    return name, feats, inputs


# -- maps against boxes (numpy) ---------------------------------------------------------------------


def _overlap(lo: float, hi: float, cells: int, extent: float) -> np.ndarray:
    step = extent / cells
    edges = np.arange(cells + 1) * step
    return np.clip(np.minimum(hi, edges[1:]) - np.maximum(lo, edges[:-1]), 0.0, None) / step


def box_coverage(box: Sequence[float], grid: tuple[int, int], size: tuple[float, float]) -> np.ndarray:
    """Share of each cell of an ``h×w`` grid laid evenly over an image of ``(height, width)``
    pixels that lies inside ``box = (x0, y0, x1, y1)`` (pixel edges): ``h×w`` values in [0, 1]."""
    x0, y0, x1, y1 = (float(v) for v in box)
    (h, w), (height, width) = grid, size
    return np.outer(_overlap(y0, y1, h, float(height)), _overlap(x0, x1, w, float(width)))


def map_mass_in_box(values: np.ndarray, boxes: Sequence[Sequence[float]], size: tuple[float, float]) -> dict[str, float | int | None]:
    """How much of a map's positive mass lies inside each box, averaged over the boxes.

    ``values``: an ``h×w`` map over an image of ``size = (height, width)`` pixels (each cell a
    constant over its ``height/h × width/w`` pixels); ``boxes``: ``(x0, y0, x1, y1)`` in those
    pixels, one per image. Per box, ``Σ max(M, 0)·coverage / Σ max(M, 0)``
    (:func:`box_coverage`); returns ``mass_in_box`` (mean over boxes; ``None`` when the map has no
    positive mass or there are no boxes), ``box_area_share`` (the mean share of the map's area
    inside a box: what a uniform map would score) and ``n_boxes``.
    """
    m = np.clip(np.asarray(values, dtype=np.float64), 0.0, None)
    if not boxes:
        return {"mass_in_box": None, "box_area_share": None, "n_boxes": 0}
    covs = [box_coverage(b, m.shape, size) for b in boxes]
    total = float(m.sum())
    mass = float(np.mean([(m * c).sum() / total for c in covs])) if total > 0 else None
    return {"mass_in_box": mass, "box_area_share": float(np.mean([c.mean() for c in covs])), "n_boxes": len(covs)}


def union_coverage(boxes: Sequence[Sequence[float]], grid: tuple[int, int], size: tuple[int, int], supersample: int = 4) -> np.ndarray:
    """Share of each cell of an ``h×w`` grid over an image of ``(height, width)`` pixels that lies
    inside the *union* of ``boxes`` (where the cue is in any image): the boxes are drawn on a
    mask ``supersample`` times finer than the pixels (edges rounded to that step), then
    area-averaged onto the grid."""
    from PIL import Image

    (h, w), (height, width) = grid, size
    k = supersample
    mask = np.zeros((int(height) * k, int(width) * k), dtype=np.float32)
    for x0, y0, x1, y1 in boxes:
        mask[int(round(y0 * k)) : int(round(y1 * k)), int(round(x0 * k)) : int(round(x1 * k))] = 1.0
    cov = Image.fromarray(mask).resize((w, h), Image.Resampling.BOX)
    return np.clip(np.asarray(cov, dtype=np.float64), 0.0, 1.0)


def map_mass_in_region(values: np.ndarray, boxes: Sequence[Sequence[float]], size: tuple[int, int]) -> dict[str, float | None]:
    """The share of a map's positive mass inside the union of ``boxes`` (:func:`union_coverage`),
    ``mass_in_region`` (``None`` without positive mass or boxes), and the union's share of the
    image, ``region_area_share`` (what a uniform map scores)."""
    m = np.clip(np.asarray(values, dtype=np.float64), 0.0, None)
    if not boxes:
        return {"mass_in_region": None, "region_area_share": None}
    cov = union_coverage(boxes, m.shape, size)
    total = float(m.sum())
    return {"mass_in_region": float((m * cov).sum() / total) if total > 0 else None, "region_area_share": float(cov.mean())}


def mass_by_region(values: np.ndarray) -> dict[str, float] | None:
    """Share of a map's positive mass in each ninth of the image (``"top left"`` …
    ``"bottom right"``; the middle one is ``"middle centre"``); ``None`` without positive mass."""
    m = np.clip(np.asarray(values, dtype=np.float64), 0.0, None)
    total = float(m.sum())
    if total <= 0:
        return None
    h, w = m.shape
    out = {}
    for i, row in enumerate(ROWS):
        for j, col in enumerate(COLUMNS):
            cov = box_coverage((j * w / 3, i * h / 3, (j + 1) * w / 3, (i + 1) * h / 3), (h, w), (h, w))
            out[f"{row} {col}"] = float((m * cov).sum() / total)
    return out


__all__ = [
    "GroupMoments",
    "box_coverage",
    "collect_group_moments",
    "epsilon_squared",
    "map_mass_in_box",
    "map_mass_in_region",
    "mass_by_region",
    "union_coverage",
]
