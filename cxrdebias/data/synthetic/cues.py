"""Local shortcut cues of the synthetic chest X-rays (issue 23): which images carry the cue and
how it is drawn (:attr:`SynthConfig.cue <cxrdebias.data.synthetic.config.SynthConfig.cue>`).

A *cue* is a small, local object correlated with the **label** (not the site), the kind of
shortcut public COVID-19 collections carry: burned-in text and tags, lead markers, ECG
electrodes, tubes and lines.

Where it enters the image
-------------------------
- ``tag``, ``text`` and ``marker`` are **burned-in annotations**: the acquisition system adds
  them to the processed display image, so they are stamped last, after the site signature (the
  same stage as the site's own marker and label, :func:`~.signature.apply_site`). They change
  exactly the pixels of their box.
- ``electrodes`` and ``tube`` are **physical devices** on or in the patient: they add to the
  attenuation map after the anatomy, so the site's contrast curve, edge enhancement and noise
  apply to them like to the anatomy. The edge enhancement (a Gaussian of σ = 4 px at 256 px)
  also changes pixels up to 3σ (12 px at 256 px) around their box.

Positions are in image coordinates (pixels of the ``n×n`` image), not in the patient's: each kind
has a nominal position (:data:`NOMINAL`, fractions of the image side, ``x`` left→right, ``y``
top→bottom); every image moves it by a uniform random offset of at most
``cue_jitter·n`` in each direction, then keeps it inside the image.

Randomness
----------
Which images carry the cue: per (site, split, label) group of images, exactly
``round(rate·n)`` of its ``n`` images in a seeded random order (stream ``[seed, 4, site, split,
label]``), so the cue is independent of the site given the label. How each cue is drawn (offset,
letter, electrode positions): stream ``[seed, 5, site, split, patient, image]``. Neither touches
the generator's other streams, so an image without the cue is byte for byte the image of the
same set without cues.

Ground truth
------------
The writer records every image's cue and box in ``cues.csv`` (:data:`CUE_COLUMNS`);
:func:`read_cues` reads it back (``cxrdebias analyze-bias`` scores its groups and map with it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from cxrdebias.data.csv_records import read_csv_records
from cxrdebias.data.synthetic.numeric import segment_distance
from cxrdebias.data.synthetic.signature import rendered_text
from cxrdebias.errors import DataError

#: kinds drawn into the attenuation (physical devices); the others are burned in
PHYSICAL = frozenset({"electrodes", "tube"})
#: default cue_size of each kind (fraction of the image side)
DEFAULT_SIZE = {"tag": 0.06, "text": 0.045, "marker": 0.08, "electrodes": 0.04, "tube": 0.012}
#: nominal centre of each kind (fractions of the image side, x then y); electrodes: one per
#: electrode (right arm, left arm, left leg leads); tube: the control points of its path
NOMINAL: dict[str, tuple[tuple[float, float], ...]] = {
    "tag": ((0.70, 0.16),),  # upper right (patient's left shoulder)
    "text": ((0.62, 0.10),),  # along the top edge
    "marker": ((0.16, 0.32),),  # left edge, upper chest (patient's right)
    "electrodes": ((0.30, 0.30), (0.70, 0.30), (0.68, 0.70)),  # upper chest ×2, lower left chest
    "tube": ((0.52, -0.10), (0.52, 0.62), (0.68, 0.80)),  # from above the top edge down the midline into the stomach
}
#: where each kind lies, in words (recorded in synth_config.json)
REGION = {
    "tag": "a bright square centred near (0.70, 0.16) of the image (x, y), upper right",
    "text": "white text 'PORTABLE' centred near (0.62, 0.10), along the top edge",
    "marker": "a boxed lead marker 'L' or 'R' centred near (0.16, 0.32), left edge of the upper chest",
    "electrodes": "three discs near (0.30, 0.30), (0.70, 0.30) and (0.68, 0.70), each offset on its own",
    "tube": "a tube from the top edge at x≈0.52 down the midline to y≈0.62, curving to (0.68, 0.80)",
}
TEXT = "PORTABLE"
#: attenuation added by a device (arbitrary units of :func:`~.anatomy.render_attenuation`)
_DEVICE_ATTENUATION = {"electrodes": 0.7, "tube": 0.5}
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
#: the columns of cues.csv: the image (as in the manifest), whether it carries the cue (0/1),
#: the cue's kind and its box in native pixels (x1, y1 exclusive; empty without the cue)
CUE_BOX = ("x0", "y0", "x1", "y1")
CUE_COLUMNS = ("path", "cue", "kind", *CUE_BOX)


def cue_size_px(kind: str, size: float | None, n: int) -> int:
    """The cue's size in pixels of an ``n``-pixel image (at least a few pixels, to stay drawable)."""
    frac = DEFAULT_SIZE[kind] if size is None else size
    smallest = {"tag": 2, "text": 5, "marker": 7, "electrodes": 3, "tube": 1}[kind]
    return max(smallest, int(round(frac * n)))


def assign_cues(
    seed: int, images: Sequence[tuple[int, str, int]], rates: dict[tuple[str, int], float]
) -> np.ndarray:
    """Which images carry the cue: one ``bool`` per image given as ``(site, split, label)``.

    ``rates[(split, label)]`` is the share of each (site, split, label) group's images that carry
    it: exactly ``round(rate·n)`` of the group's ``n`` images, chosen in a random order seeded by
    ``[seed, 4, site, split, label]``.
    """
    groups: dict[tuple[int, str, int], list[int]] = {}
    for i, key in enumerate(images):
        groups.setdefault(key, []).append(i)
    flags = np.zeros(len(images), dtype=bool)
    for (site, split, label), members in groups.items():
        n_cue = int(round(rates[(split, label)] * len(members)))
        order = np.random.default_rng([seed, 4, site, _SPLIT_CODE[split], label]).permutation(len(members))
        flags[np.asarray(members)[order[:n_cue]]] = True
    return flags


def draw_rng(seed: int, site: int, split: str, patient: int, image: int) -> np.random.Generator:
    """The random stream that draws one image's cue."""
    return np.random.default_rng([seed, 5, site, _SPLIT_CODE[split], patient, image])


@lru_cache(maxsize=16)
def _glyphs(text: str, height: int) -> np.ndarray:
    """Tight binary mask of ``text`` (PIL's bitmap font), resized to ``height`` rows (nearest)."""
    m = rendered_text(text)[0] > 0
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    m = m[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    width = max(1, int(round(m.shape[1] * height / m.shape[0])))
    resized = Image.fromarray(m.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)
    out = (np.asarray(resized) > 127).astype(np.float32)
    out.flags.writeable = False
    return out


def _boxed_letter(letter: str, height: int) -> np.ndarray:
    """A lead marker: ``letter`` inside a square-ish outline, ``height`` rows in all."""
    line = max(1, height // 12)
    pad = line + max(1, height // 10)
    glyph = _glyphs(letter, max(3, height - 2 * pad))
    h, w = glyph.shape
    box = np.zeros((h + 2 * pad, w + 2 * pad), dtype=np.float32)
    box[:line, :] = box[-line:, :] = 1
    box[:, :line] = box[:, -line:] = 1
    box[pad : pad + h, pad : pad + w] = glyph
    return box


@dataclass
class Cue:
    """One drawn cue: its mask (``n×n`` coverage in [0, 1]) and its box ``(x0, y0, x1, y1)`` in
    pixels, ``x1``/``y1`` exclusive (columns ``x0…x1−1``, rows ``y0…y1−1``)."""

    kind: str
    mask: np.ndarray = field(repr=False)
    box: tuple[int, int, int, int]

    @property
    def physical(self) -> bool:
        return self.kind in PHYSICAL

    def add_to_attenuation(self, A: np.ndarray) -> None:
        """A device: more attenuation where it lies (in place)."""
        x0, y0, x1, y1 = self.box
        A[y0:y1, x0:x1] += np.float32(_DEVICE_ATTENUATION[self.kind]) * self.mask[y0:y1, x0:x1]

    def stamp(self, d: np.ndarray) -> None:
        """A burned-in annotation: white where the mask is (in place, on the display image)."""
        x0, y0, x1, y1 = self.box
        region = d[y0:y1, x0:x1]
        region += self.mask[y0:y1, x0:x1] * (np.float32(1.0) - region)


def _offset(rng: np.random.Generator, jitter_px: int) -> tuple[int, int]:
    dx, dy = rng.integers(-jitter_px, jitter_px + 1, size=2)
    return int(dx), int(dy)


def _place(mask: np.ndarray, n: int, centre: tuple[float, float], offset: tuple[int, int]) -> np.ndarray:
    """An ``n×n`` image holding the small ``mask`` centred at ``centre·n + offset``, kept inside."""
    h, w = min(mask.shape[0], n), min(mask.shape[1], n)
    x0 = int(round(centre[0] * n - w / 2)) + offset[0]
    y0 = int(round(centre[1] * n - h / 2)) + offset[1]
    x0, y0 = min(max(x0, 0), n - w), min(max(y0, 0), n - h)
    out = np.zeros((n, n), dtype=np.float32)
    out[y0 : y0 + h, x0 : x0 + w] = mask[:h, :w]
    return out


def _window(n: int, x_lo: float, x_hi: float, y_lo: float, y_hi: float) -> tuple[slice, slice, np.ndarray, np.ndarray]:
    """Rows and columns of the image that the pixel-coordinate rectangle touches (one pixel of
    margin), and the pixel centres' coordinates there."""
    r = slice(min(max(int(np.floor(y_lo)) - 1, 0), n), min(max(int(np.ceil(y_hi)) + 1, 0), n))
    c = slice(min(max(int(np.floor(x_lo)) - 1, 0), n), min(max(int(np.ceil(x_hi)) + 1, 0), n))
    yy, xx = np.mgrid[r, c].astype(np.float32) + np.float32(0.5)
    return r, c, xx, yy


def _disc(n: int, cx: float, cy: float, radius: float) -> np.ndarray:
    """Anti-aliased disc (coverage in [0, 1]) centred at pixel coordinates ``(cx, cy)``."""
    out = np.zeros((n, n), dtype=np.float32)
    reach = radius + 1
    r, c, xx, yy = _window(n, cx - reach, cx + reach, cy - reach, cy + reach)
    dist = np.sqrt((xx - np.float32(cx)) ** 2 + (yy - np.float32(cy)) ** 2)
    out[r, c] = np.clip(np.float32(radius + 0.5) - dist, 0, 1)
    return out


def _tube(n: int, points: list[tuple[float, float]], width: float) -> np.ndarray:
    """Anti-aliased band of ``width`` pixels along the quadratic Bézier curve through ``points``
    (pixel coordinates)."""
    p0, p1, p2 = (np.array(p, dtype=np.float64) for p in points)
    t = np.linspace(0, 1, 33)[:, None]
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    reach = width / 2 + 1
    out = np.zeros((n, n), dtype=np.float32)
    (x_lo, y_lo), (x_hi, y_hi) = curve.min(0) - reach, curve.max(0) + reach
    r, c, xx, yy = _window(n, x_lo, x_hi, y_lo, y_hi)
    dist = np.full(xx.shape, np.inf, dtype=np.float32)
    for a, b in zip(curve[:-1], curve[1:], strict=True):
        dist = np.minimum(dist, segment_distance(xx, yy, tuple(a), tuple(b)).astype(np.float32))
    out[r, c] = np.clip(np.float32(width / 2 + 0.5) - dist, 0, 1)
    return out


def draw_cue(kind: str, n: int, size: float | None, jitter: float, rng: np.random.Generator) -> Cue:
    """The cue of one ``n×n`` image: its kind's shape at its nominal place plus a random offset."""
    s = cue_size_px(kind, size, n)
    jitter_px = int(round(jitter * n))
    nominal = NOMINAL[kind]
    if kind == "tag":
        mask = _place(np.ones((s, s), dtype=np.float32), n, nominal[0], _offset(rng, jitter_px))
    elif kind == "text":
        mask = _place(_glyphs(TEXT, s), n, nominal[0], _offset(rng, jitter_px))
    elif kind == "marker":
        letter = "LR"[int(rng.integers(2))]
        mask = _place(_boxed_letter(letter, s), n, nominal[0], _offset(rng, jitter_px))
    elif kind == "electrodes":
        mask = np.zeros((n, n), dtype=np.float32)
        for cx, cy in nominal:
            dx, dy = _offset(rng, jitter_px)
            mask = np.maximum(mask, _disc(n, cx * n + dx, cy * n + dy, s / 2))
    elif kind == "tube":
        dx, dy = _offset(rng, jitter_px)
        mask = _tube(n, [(x * n + dx, y * n + dy) for x, y in nominal], s)
    else:  # the config validates the kind
        raise ValueError(f"unknown cue kind {kind!r}")
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return Cue(kind, mask, (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1))


@dataclass(frozen=True)
class CueTruth:
    """One row of ``cues.csv``: whether the image carries the cue, its kind and its box
    ``(x0, y0, x1, y1)`` in native pixels (``x1``/``y1`` exclusive; ``None`` without the cue)."""

    cue: int
    kind: str
    box: tuple[int, int, int, int] | None


def read_cues(path: str | os.PathLike) -> dict[str, CueTruth]:
    """The ground truth of a set with a cue: ``cues.csv`` as ``{normalised manifest path: CueTruth}``.

    Raises:
        DataError: unreadable file, a missing column, or a row whose ``cue`` is not 0/1, whose box
            is not four integers with ``x0 < x1`` and ``y0 < y1`` (when ``cue`` is 1) or whose path
            is repeated — one line naming the file, the line and the field.
    """
    path = Path(path)
    header, records = read_csv_records(path, columns=CUE_COLUMNS, what="cues file")
    col = {name: header.index(name) for name in CUE_COLUMNS}
    out: dict[str, CueTruth] = {}
    for line, fields in records:
        if len(fields) != len(header):
            raise DataError(f"{path}: line {line}: {len(fields)} fields, expected {len(header)}")
        get = {name: fields[i].strip() for name, i in col.items()}
        if get["cue"] not in ("0", "1"):
            raise DataError(f"{path}: line {line}: cue={get['cue']!r}, expected 0 or 1")
        box = None
        if get["cue"] == "1":
            try:
                x0, y0, x1, y1 = (int(get[k]) for k in CUE_BOX)
            except ValueError:
                raise DataError(f"{path}: line {line}: the box {','.join(get[k] for k in CUE_BOX)!r} is not four integers x0,y0,x1,y1") from None
            if not (0 <= x0 < x1 and 0 <= y0 < y1):
                raise DataError(f"{path}: line {line}: the box ({x0}, {y0}, {x1}, {y1}) needs 0 <= x0 < x1 and 0 <= y0 < y1")
            box = (x0, y0, x1, y1)
        key = os.path.normpath(get["path"])
        if key in out:
            raise DataError(f"{path}: line {line}: path {get['path']!r} is listed twice")
        out[key] = CueTruth(int(get["cue"]), get["kind"], box)
    return out
