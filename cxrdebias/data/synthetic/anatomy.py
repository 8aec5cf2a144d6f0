"""Patient anatomy, per-image pose and disease: the attenuation map of one image and the detector
response (stages 1-3 of the generative model, :mod:`cxrdebias.data.synthetic`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cxrdebias.data.synthetic.numeric import (
    base_grid,
    coarse_basis,
    ramp,
    segment_distance,
    sigmoid,
    sq,
)


@dataclass
class Anatomy:
    """Per-patient anatomy (normalised coordinates)."""

    body_w: float
    lung_cx: float
    lung_cy: float
    lung_a: tuple[float, float]  # half-widths (image-left = patient right, image-right)
    lung_b: float
    dome_top: tuple[float, float]
    dome_h: float
    heart: tuple[float, float, float, float, float]  # cx, cy, ax, ay, angle
    med_w: float
    rib_space: float
    rib_start: float
    rib_curve: float
    clav_y: float
    vessel_phase: np.ndarray  # per-lung 1-D angular profile of vessel markings
    deform: tuple[np.ndarray, np.ndarray]  # coarse displacement fields (cells+2 square)
    texture: np.ndarray  # coarse lung texture (cells+2 square)
    female: bool
    finding: str | None  # non-COVID finding
    finding_pos: tuple[float, float]
    severity: float  # 0 for negatives
    ggo_seed: np.ndarray  # coarse disease field
    ggo_sides: tuple[float, float]


def _circular_smooth(x: np.ndarray) -> np.ndarray:
    """Smooth the last axis with a circular [1, 2, 1]/4 kernel (wider vessel streaks)."""
    return ((np.roll(x, 1, -1) + 2 * x + np.roll(x, -1, -1)) / 2).astype(np.float32)


def sample_anatomy(
    rng: np.random.Generator, *, female: bool, severity: float, other_rate: float
) -> Anatomy:
    """Draw the anatomy of one patient (and its non-COVID finding, if any)."""
    u = rng.uniform
    finding = None
    if rng.random() < other_rate:
        finding = ("nodule", "cardiomegaly", "perihilar_haze")[int(rng.integers(3))]
    cy = u(-0.16, -0.10)
    b = u(0.58, 0.66)
    dome_r = cy + b * u(0.74, 0.82)
    return Anatomy(
        body_w=u(0.86, 0.95),
        lung_cx=u(0.38, 0.42),
        lung_a=(u(0.31, 0.35), u(0.29, 0.33)),
        lung_cy=cy,
        lung_b=b,
        dome_top=(dome_r, dome_r + u(0.02, 0.07)),
        dome_h=u(0.07, 0.12),
        heart=(u(0.1, 0.15), u(0.28, 0.34), u(0.33, 0.39), u(0.2, 0.24), u(0.55, 0.8)),
        med_w=u(0.10, 0.13),
        rib_space=u(0.105, 0.12),
        rib_start=u(-0.88, -0.80),
        rib_curve=u(0.8, 1.0),
        clav_y=u(-0.72, -0.64),
        vessel_phase=_circular_smooth(rng.standard_normal((2, 64))),
        deform=(
            rng.standard_normal((6, 6)).astype(np.float32),
            rng.standard_normal((6, 6)).astype(np.float32),
        ),
        texture=rng.standard_normal((18, 18)).astype(np.float32),
        female=female,
        finding=finding,
        finding_pos=(float(rng.choice([-1.0, 1.0]) * u(0.3, 0.5)), u(-0.5, 0.1)),
        severity=severity,
        ggo_seed=rng.standard_normal((11, 11)).astype(np.float32),
        ggo_sides=(u(0.6, 1.0), u(0.6, 1.0)),
    )


@dataclass
class Pose:
    """Per-image acquisition of a patient."""

    angle: float
    shift: tuple[float, float]
    scale: float
    inspiration: float  # lung height factor
    dome_shift: float
    exposure: float  # μ factor
    ap: bool
    severity_factor: float  # follow-up change of the disease extent


def sample_pose(rng: np.random.Generator, *, ap: bool) -> Pose:
    """Draw the acquisition of one image (pose, inspiration, exposure) of a patient."""
    u = rng.uniform
    return Pose(
        angle=u(-0.04, 0.04),
        shift=(u(-0.03, 0.03), u(-0.03, 0.03)),
        scale=u(0.95, 1.05),
        inspiration=u(0.95, 1.04),
        dome_shift=u(-0.03, 0.03),
        exposure=u(0.92, 1.08),
        ap=ap,
        severity_factor=u(0.75, 1.25),
    )


def _f32(x: float) -> np.float32:
    return np.float32(x)


def _box(pose: Pose, n: int, u: tuple[float, float], v: tuple[float, float]) -> tuple[slice, slice]:
    """Pixel rows/columns that can hold anatomy coordinates ``u × v`` under ``pose``.

    Inverts the pose's similarity transform at the four corners and pads for the deformation
    field (|δ| < 0.1), so structures can be drawn on a sub-array only.
    """
    ca, sa, s = np.cos(pose.angle), np.sin(pose.angle), pose.scale
    uu = np.array([u[0], u[0], u[1], u[1]])
    vv = np.array([v[0], v[1], v[0], v[1]])
    x = pose.shift[0] + s * (ca * uu - sa * vv)
    y = pose.shift[1] + s * (sa * uu + ca * vv)
    pad = 0.12 * s

    def idx(lo: float, hi: float) -> slice:
        i0 = int(np.floor((lo - pad + 1) / 2 * n))
        i1 = int(np.ceil((hi + pad + 1) / 2 * n)) + 1
        return slice(min(max(i0, 0), n), min(max(i1, 0), n))

    return idx(float(y.min()), float(y.max())), idx(float(x.min()), float(x.max()))


def render_attenuation(an: Anatomy, pose: Pose, n: int) -> np.ndarray:
    """Attenuation map ``A`` (``n×n`` float32) of one image of a patient.

    Soft tissue contributes ~0.3–0.5, aerated lung removes ~0.35, mediastinum/heart/abdomen add
    ~0.4, bones 0.05–0.2 (arbitrary units; :func:`detector` maps them to grey levels). Sharp
    borders use linear ramps, wide transitions sigmoids; small structures are drawn only inside
    their bounding box (:func:`_box`).
    """
    f = _f32
    u0, v0 = base_grid(n)
    ca, sa = f(np.cos(pose.angle)), f(np.sin(pose.angle))
    x = u0 - f(pose.shift[0])
    y = v0 - f(pose.shift[1])
    inv_s = f(1.0 / pose.scale)
    b6 = coarse_basis(n, 4)
    U = (ca * x + sa * y) * inv_s + f(0.025) * (b6 @ an.deform[0] @ b6.T)
    V = (ca * y - sa * x) * inv_s + f(0.025) * (b6 @ an.deform[1] @ b6.T)
    abs_u = np.abs(U)
    ap = pose.ap

    # ---- body: torso, shoulders, neck; soft tissue thicker in the middle ----------------------
    bx = abs_u / f(an.body_w)
    bx2 = bx * bx
    by = np.abs(V - f(0.3)) / f(1.35)
    body = ramp((1 - bx2 * bx2 - by * by * by) / f(0.04))
    r, c = _box(pose, n, (-1.1, 1.1), (-1.2, -0.6))
    Ub, Vb = abs_u[r, c], V[r, c]
    sh = sq((Ub - f(0.72)) / f(0.34)) + sq((Vb + f(0.86)) / f(0.22))
    neck = ramp((f(0.24) - Ub) / f(0.02)) * ramp((f(-0.55) - Vb) / f(0.05))
    body[r, c] = np.maximum(np.maximum(body[r, c], ramp((1 - sh) / f(0.12))), neck)
    A = body * (f(0.3) + f(0.2) * np.sqrt(np.maximum(1 - bx2, 0)))
    head = sq((Ub - f(0.96)) / f(0.15)) + sq((Vb + f(0.72)) / f(0.15))  # humeral heads
    A[r, c] += f(0.2) * ramp((1 - head) / f(0.1))

    # ---- lungs (s = -1: image left = patient right) and diaphragm domes -------------------------
    lung_b = an.lung_b * pose.inspiration * (0.95 if ap else 1.0)
    lung = np.zeros_like(A)
    lung_depth = np.zeros_like(A)
    ggo_zone = np.zeros_like(A) if an.severity > 0 else None
    ves = np.zeros_like(A)
    # diaphragm: one dome per side, highest about mid-lung, flat beyond the costophrenic angle
    q = (abs_u - f(0.26)) / f(0.3)
    dome_v = f(an.dome_h) * np.minimum(q * q, f(2.0))
    dome_v += np.where(U < 0, f(an.dome_top[0]), f(an.dome_top[1]))
    dome_v += f(pose.dome_shift + (1 - pose.inspiration))
    for side, s in enumerate((-1.0, 1.0)):
        a = an.lung_a[side]
        lo, hi = an.lung_cx - 1.1 * a, an.lung_cx + 1.1 * a
        r, c = _box(pose, n, (min(s * lo, s * hi), max(s * lo, s * hi)),
                    (an.lung_cy - 1.1 * lung_b, an.lung_cy + 1.45 * lung_b))  # fmt: skip
        Ub, Vb = U[r, c], V[r, c]
        lx = (f(s) * Ub - f(an.lung_cx)) / f(a)  # + = lateral
        ly = (Vb - f(an.lung_cy)) / f(lung_b)  # -1 apex … +1 base
        taper = f(0.3) + f(0.7) * np.sqrt(np.clip((ly + 1) * f(0.8), 0, 1))
        xl2 = sq(lx / taper)
        ly2 = ly * ly
        # convex lateral border (x²), flat medial border (x⁴); round apex (y²), flat base (y⁶)
        fl = xl2 * np.maximum(xl2, lx > 0) + ly2 * np.maximum(ly2 * ly2 * f(0.165), ly < 0)
        m = ramp((1 - fl) / f(0.06)) * ramp((dome_v[r, c] - Vb) / f(0.012))
        lung[r, c] += m
        lung_depth[r, c] += m * (f(0.5) + f(0.5) * np.sqrt(np.maximum(1 - fl, 0)))
        if ggo_zone is not None:
            # COVID-19 zone: periphery (lateral/basal pleura) and lower zones
            periph = f(0.3) + f(0.7) * np.clip((np.sqrt(fl) - f(0.3)) / f(0.6), 0, 1)
            lateral = f(0.55) + f(0.45) * sigmoid(f(4) * lx)
            lower = f(0.2) + f(0.8) * sigmoid((ly - f(0.05)) / f(0.2))
            ggo_zone[r, c] += m * periph * lateral * lower * f(an.ggo_sides[side])
        # vessel markings: streaks radiating from the hilum
        du = f(s) * Ub - f(0.15)
        dv_ = Vb + f(0.04)
        r2 = du * du + dv_ * dv_
        th = (np.arctan2(dv_, du) + f(np.pi)) * f(64 / (2 * np.pi))
        i0 = th.astype(np.int32)
        w = th - i0
        prof = an.vessel_phase[side]
        streak = np.take(prof, i0, mode="wrap") * (1 - w) + np.take(prof, i0 + 1, mode="wrap") * w
        ves[r, c] += np.maximum(streak, 0) * np.exp(f(-3.0) * np.sqrt(r2)) * (1 - np.exp(f(-150) * r2))
        ves[r, c] += f(1.2) * np.exp(f(-120) * r2)  # hilum
    # heart (left-leaning, magnified on AP films): in front of the lungs, hides most of them
    hcx, hcy, hax, hay, hang = an.heart
    hscale = (1.12 if ap else 1.0) * (1.22 if an.finding == "cardiomegaly" else 1.0)
    ext = 1.2 * max(hax, hay) * hscale
    r, c = _box(pose, n, (hcx - ext, hcx + ext), (hcy - ext, hcy + ext))
    cs, sn = f(np.cos(hang)), f(np.sin(hang))
    du, dv_ = U[r, c] - f(hcx), V[r, c] - f(hcy)
    fh = sq((cs * du + sn * dv_) / f(hax * hscale)) + sq((cs * dv_ - sn * du) / f(hay * hscale))
    heart = ramp((1 - fh) / f(0.1))
    A[r, c] += f(0.3) * heart * np.sqrt(np.clip(f(1.3) - fh, 0, 1))
    keep = 1 - f(0.75) * heart
    lung[r, c] *= keep
    lung_depth[r, c] *= keep
    if ggo_zone is not None:
        ggo_zone[r, c] *= keep

    b18 = coarse_basis(n, 16)
    tex = b18 @ an.texture @ b18.T
    A -= f(0.36) * lung_depth
    A += lung * (f(0.045) * ves + f(0.015) * tex)

    # ---- mediastinum, trachea, aortic knob, spine ---------------------------------------------
    r, c = _box(pose, n, (-0.25, 0.25), (-1.2, 1.2))
    Ub, Vb, Ab = U[r, c], V[r, c], A[r, c]
    aub = np.abs(Ub)
    mw = f(an.med_w) + f(0.05) * np.clip((Vb + f(0.4)) / f(0.6), 0, 1)
    Ab += f(0.38) * ramp((mw - np.abs(Ub - f(0.01))) / f(0.015)) * body[r, c]
    Ab -= f(0.14) * ramp((f(0.032) - aub) / f(0.008)) * ramp((f(-0.3) - Vb) / f(0.03))
    knob = sq(Ub - f(0.12)) + sq(Vb + f(0.3))
    Ab += f(0.1) * ramp((f(0.0045) - knob) / f(0.0015))
    spine = ramp((f(0.075) - aub) / f(0.01))
    Ab += f(0.1) * spine * (f(0.8) + f(0.2) * np.cos(Vb * f(2 * np.pi / 0.095)))

    # ---- abdomen below the domes; gastric bubble ----------------------------------------------
    below = ramp((V - dome_v) / f(0.012))
    A += f(0.36) * below * body
    bcy = an.dome_top[1] + 0.13
    r, c = _box(pose, n, (0.2, 0.52), (bcy - 0.12, bcy + 0.12))
    bubble = sq((U[r, c] - f(0.36)) / f(0.09)) + sq((V[r, c] - f(bcy)) / f(0.05))
    A[r, c] -= f(0.12) * ramp((1 - bubble) / f(0.15)) * below[r, c]

    # ---- ribs: posterior (curving down laterally) and fainter anterior -------------------------
    tw = an.lung_cx + an.lung_a[0] + 0.06
    th_ = lung_b + 0.1
    r, c = _box(pose, n, (-tw - 0.1, tw + 0.1), (an.lung_cy - th_ - 0.1, an.lung_cy + th_ + 0.1))
    Ub, Vb = U[r, c], V[r, c]
    t = abs_u[r, c]
    thorax = ramp((1 - sq(Ub / f(tw)) - sq((Vb - f(an.lung_cy)) / f(th_))) / f(0.08)) * body[r, c]
    eta = Vb - (f(-0.12) + f(an.rib_curve) * t) * t - f(an.rib_start)
    gam = f(0.035)
    k = (np.sqrt(np.maximum(1 + (4 * gam / f(an.rib_space)) * eta, 0)) - 1) / (2 * gam)
    d = np.abs(k - np.round(k))
    rib = ramp((f(0.21) - d) / f(0.03)) + f(0.7) * np.exp(-sq((d - f(0.19)) / f(0.03)))
    rib *= ((k > -0.3) & (k < 10.5)) * ramp((t - f(0.09)) / f(0.02))
    k2 = (Vb + f(0.45) * t - f(an.rib_start + 0.15)) / f(an.rib_space * 1.25)
    d2 = np.abs(k2 - np.round(k2))
    rib2 = ramp((f(0.2) - d2) / f(0.04)) * ((k2 > -0.3) & (k2 < 6.5))
    rib2 *= ramp((t - f(0.28)) / f(0.05))
    A[r, c] += thorax * (f(0.045) * rib + f(0.022) * rib2)

    # ---- clavicles ----------------------------------------------------------------------------
    cy0 = an.clav_y - (0.07 if ap else 0.0)
    r, c = _box(pose, n, (-0.72, 0.72), (cy0 - 0.16, cy0 + 0.08))
    dist = segment_distance(abs_u[r, c], V[r, c], (0.08, cy0 + 0.03), (0.66, cy0 - 0.07))
    A[r, c] += f(0.12) * ramp((f(0.032) - dist) / f(0.008))

    # ---- breast shadows -----------------------------------------------------------------------
    if an.female:
        r, c = _box(pose, n, (-1.0, 1.0), (0.05, 0.8))
        br = sq((abs_u[r, c] - f(0.48)) / f(0.4)) + sq((V[r, c] - f(0.42)) / f(0.3))
        A[r, c] += f(0.05) * sigmoid((1 - br) / f(0.12)) * body[r, c]

    # ---- non-COVID findings (either label) ----------------------------------------------------
    if an.finding == "nodule":
        fx_, fy_ = an.finding_pos
        rr = np.sqrt(sq(U - f(fx_)) + sq(V - f(fy_)))
        A += f(0.18) * ramp((f(0.04) - rr) / f(0.008)) * lung
    elif an.finding == "perihilar_haze":
        rr = sq((abs_u - f(0.22)) / f(0.2)) + sq((V + f(0.02)) / f(0.25))
        A += f(0.1) * np.exp(-rr) * lung

    # ---- COVID-19 ground-glass opacities ------------------------------------------------------
    if ggo_zone is not None:
        e = float(np.clip(an.severity * pose.severity_factor, 0.05, 1.0))
        b11 = coarse_basis(n, 9)
        patches = b11 @ an.ggo_seed @ b11.T
        cover = sigmoid((patches - f(1.0 - 2.2 * e)) / f(0.35))
        amp = f(0.12 + 0.38 * e)
        A += amp * ggo_zone * cover * (f(0.85) + f(0.15) * tex)
    return A


def detector(A: np.ndarray, pose: Pose) -> np.ndarray:
    """Detector response in [0, 1] (1 = white): ``1 - exp(-μ·A)``, normalised."""
    mu = np.float32(1.5 * pose.exposure)
    return (1 - np.exp(-mu * np.maximum(A, 0))) / np.float32(1 - np.exp(-1.5 * 1.25))


