"""Random acquisition-style augmentation of a training batch (``train.augment``).

A hospital's images differ from another's in how they were acquired and processed — contrast
curve, gamma, brightness, edge enhancement, noise, collimation borders, film orientation — and a
classifier can read the hospital from any of them. Drawing those properties at random for every
training image, independently of the label, makes them useless as a shortcut; this is the
standard "style randomisation" remedy of domain generalisation, and it needs no site labels.

:func:`augment_batch` transforms a whole ``(N, C, H, W)`` batch on its own device in a few
vectorised operations (the per-sample array transforms of MONAI/torchvision would loop over the
batch in Python). Per image, with parameters drawn from a :class:`torch.Generator` (so a run is
reproducible and a resumed run draws the same numbers as an uninterrupted one):

1. geometry: a crop of side ``u ∈ [1 − crop, 1]`` at a random place inside the image, resized
   back to ``H × W`` (bilinear), then a left-right flip with probability ``hflip``;
2. intensity, on the image's own ``[min, max]`` range mapped to ``[0, 1]`` (so it does not depend
   on the normalisation): ``x ← x^γ`` (``log γ`` uniform in ``±log(1 + gamma)``), contrast
   ``x ← m + c (x − m)`` about the image mean ``m`` (``c ∈ [1 − contrast, 1 + contrast]``),
   ``x ← x + b`` (``b ∈ ±brightness``), unsharp masking ``x ← x + a (x − G_σ=1 * x)``
   (``a`` uniform in ``[max(−1, −sharpness), sharpness]``; below 0 it blurs, ``a = −1`` is the
   blurred image), Gaussian noise of standard deviation ``∈ [0, noise]`` (one noise field shared by
   the channels, which are copies of one grey image); clipped to ``[0, 1]`` and mapped back to the
   image's range.

Training only: evaluation, export and prediction never augment.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from cxrdebias.config import AugmentConfig

#: σ (pixels) of the Gaussian of the unsharp-mask / blur step
SHARPEN_SIGMA = 1.0


def augment_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """The generator of one epoch's augmentation draws: a function of (seed, epoch, rank) only,
    so resuming after epoch k draws what the uninterrupted run drew in epoch k + 1."""
    state = np.random.SeedSequence([seed % 2**63, epoch, rank, 0x617567]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigma: float = SHARPEN_SIGMA) -> torch.Tensor:
    """Separable Gaussian blur of every channel of an ``(N, C, H, W)`` tensor (reflect padding)."""
    k = _gaussian_kernel(sigma).to(device=x.device, dtype=x.dtype)
    c, r = x.shape[1], (k.numel() - 1) // 2
    # reflect needs more pixels than the kernel's radius; a smaller image repeats its edge instead
    mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
    out = F.pad(x, (r, r, 0, 0), mode=mode)
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.pad(out, (0, 0, r, r), mode=mode)
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _geometry(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    side = _uniform(n, 1.0 - cfg.crop, 1.0, gen)
    # the crop's centre, in [-1, 1] coordinates, keeps the crop inside the image
    tx = (2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1) * (1 - side)
    ty = (2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1) * (1 - side)
    flip = torch.rand(n, generator=gen, dtype=torch.float64) < cfg.hflip
    sx = torch.where(flip, -side, side)
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 2] = sx, tx
    theta[:, 1, 1], theta[:, 1, 2] = side, ty
    grid = F.affine_grid(theta.to(device=x.device, dtype=x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _intensity(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    shape = (n, 1, 1, 1)
    flat = x.reshape(n, -1)
    lo = flat.amin(dim=1).view(shape)
    span = (flat.amax(dim=1).view(shape) - lo).clamp_min(1e-6)
    y = (x - lo) / span

    def draw(lo_: float, hi_: float) -> torch.Tensor:
        return _uniform(n, lo_, hi_, gen).to(device=x.device, dtype=x.dtype).view(shape)

    if cfg.gamma > 0:
        g = math.log1p(cfg.gamma)
        y = y.clamp(0, 1) ** torch.exp(draw(-g, g))
    if cfg.contrast > 0:
        m = y.mean(dim=(1, 2, 3), keepdim=True)
        y = m + draw(1 - cfg.contrast, 1 + cfg.contrast) * (y - m)
    if cfg.brightness > 0:
        y = y + draw(-cfg.brightness, cfg.brightness)
    if cfg.sharpness > 0:
        y = y + draw(max(-1.0, -cfg.sharpness), cfg.sharpness) * (y - gaussian_blur(y))
    if cfg.noise > 0:
        std = draw(0.0, cfg.noise)
        y = y + std * _noise((n, 1, *x.shape[2:]), x, gen)  # one field for all channels (they are copies of one grey image)
    return y.clamp(0, 1) * span + lo


def _noise(shape: tuple[int, ...], like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Standard normal noise on ``like``'s device: from ``gen`` itself on the CPU, else from a
    generator on the device seeded by ``gen`` (no full-size host → device copy; still a function
    of ``gen``'s state, so resuming stays exact)."""
    if like.device.type == "cpu":
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype=like.dtype)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    device_gen = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(shape, generator=device_gen, device=like.device, dtype=like.dtype)


def augment_batch(images: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """``images`` (``(N, C, H, W)``, float) randomly transformed as the module doc says; the same
    shape, dtype and device. Returns ``images`` itself when ``cfg`` turns everything off."""
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"augment_batch: expected a float (N, C, H, W) batch, got {tuple(images.shape)} {images.dtype}")
    if not cfg.enabled or images.shape[0] == 0:
        return images
    x = images
    if cfg.crop > 0 or cfg.hflip > 0:
        x = _geometry(x, cfg, gen)
    if any(v > 0 for v in (cfg.gamma, cfg.contrast, cfg.brightness, cfg.sharpness, cfg.noise)):
        x = _intensity(x, cfg, gen)
    return x
