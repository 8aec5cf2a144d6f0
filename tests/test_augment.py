"""train.augment (cxrdebias.data.augment): each transform by hand or by its defining property,
reproducible draws, and a resumed augmented training run equal to the uninterrupted one."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from cxrdebias.config import AugmentConfig, TrainConfig
from cxrdebias.data.augment import _gaussian_kernel, augment_batch, augment_generator, gaussian_blur


def _images(n=8, c=1, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g) * 3 - 1  # not in [0, 1]: the transforms use each image's own range


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_off_by_default_returns_the_batch_itself_and_leaves_the_config_json_unchanged():
    x = _images()
    assert not AugmentConfig().enabled
    assert augment_batch(x, AugmentConfig(), _gen()) is x
    assert "augment" not in TrainConfig().model_dump()  # runs without it: same resolved config as before
    on = TrainConfig(augment=AugmentConfig(gamma=0.5))
    assert on.model_dump()["augment"]["gamma"] == 0.5
    assert TrainConfig.model_validate(on.model_dump()) == on


def test_a_certain_flip_is_the_mirror_image():
    x = _images(c=3, h=9, w=12)
    y = augment_batch(x, AugmentConfig(hflip=1.0), _gen())
    torch.testing.assert_close(y, x.flip(-1), atol=1e-5, rtol=0)


def test_crop_is_a_zoom_inside_the_image_at_a_random_place():
    # channel 0 a horizontal ramp, channel 1 a vertical one (value = the pixel centre's coordinate
    # in [-1, 1]); a crop of side u centred at (tx, ty) shows u·X + tx and u·Y + ty, exactly linear
    # away from the outermost pixels (bilinear between pixel centres)
    w = 32
    coord = (torch.arange(w, dtype=torch.float32) + 0.5) / w * 2 - 1
    x = torch.stack([coord.view(1, w).expand(w, w), coord.view(w, 1).expand(w, w)]).expand(16, 2, w, w).contiguous()
    y = augment_batch(x, AugmentConfig(crop=0.4), _gen(3))
    inner = coord[1:-1]
    design = torch.stack([inner, torch.ones_like(inner)], dim=1)
    sides = []
    for img in y[:, :, 1:-1, 1:-1]:
        (ux, tx), res_x = _fit(design, img[0].mean(0)), img[0] - img[0].mean(0, keepdim=True)
        (uy, ty), res_y = _fit(design, img[1].mean(1)), img[1] - img[1].mean(1, keepdim=True)
        assert res_x.abs().max() < 1e-5 and res_y.abs().max() < 1e-5  # a zoom, no rotation or shear
        assert abs(ux - uy) < 1e-4 and 0.6 - 1e-4 <= ux <= 1 + 1e-4  # square, side in [1 - crop, 1]
        assert abs(tx) <= 1 - ux + 1e-4 and abs(ty) <= 1 - uy + 1e-4  # inside the image
        pred_x = ux * inner + tx
        torch.testing.assert_close(img[0].mean(0), pred_x, atol=1e-4, rtol=0)
        sides.append(ux)
    assert torch.tensor(sides).std() > 0.05  # a side per image
    constant = torch.full((4, 1, 8, 8), 0.3)
    torch.testing.assert_close(augment_batch(constant, AugmentConfig(crop=0.5, hflip=0.5), _gen()), constant)


def _fit(design: torch.Tensor, values: torch.Tensor) -> tuple[float, float]:
    sol = torch.linalg.lstsq(design.double(), values.double().view(-1, 1)).solution.flatten()
    return float(sol[0]), float(sol[1])


def test_gamma_keeps_each_image_range_and_pixel_order():
    x = _images()
    y = augment_batch(x, AugmentConfig(gamma=1.0), _gen())
    for a, b in zip(x, y, strict=True):
        torch.testing.assert_close(b.min(), a.min())
        torch.testing.assert_close(b.max(), a.max())
        b_in_a_order = b.flatten()[a.flatten().argsort()]
        assert (b_in_a_order[1:] >= b_in_a_order[:-1] - 1e-6).all()  # monotone: the pixel order is kept
    assert not torch.allclose(x, y)


def test_gamma_by_hand_on_a_three_value_image():
    # values 0, 0.25, 1 of a [0, 1] range: gamma γ maps 0.25 to 0.25 ** γ, with log γ uniform in ±log 2
    x = torch.tensor([0.0, 0.25, 1.0, 1.0]).view(1, 1, 2, 2).repeat(64, 1, 1, 1)
    y = augment_batch(x, AugmentConfig(gamma=1.0), _gen())
    mid = y[:, 0, 0, 1]
    gammas = torch.log(mid) / math.log(0.25)
    assert (gammas >= 0.5 - 1e-5).all() and (gammas <= 2 + 1e-5).all()
    assert gammas.min() < 0.7 and gammas.max() > 1.4  # the whole range is drawn from
    torch.testing.assert_close(y[:, 0, 0, 0], torch.zeros(64))
    torch.testing.assert_close(y[:, 0, 1, :], torch.ones(64, 2))


def test_contrast_scales_about_the_mean_and_brightness_shifts_by_a_constant():
    # an image with values 0.4..0.6 inside a 0..1 range (the corners fix the range): contrast c maps
    # v to m + c (v - m) with m the image mean; brightness b adds b (no clipping at these values)
    g = torch.Generator().manual_seed(1)
    x = 0.4 + 0.2 * torch.rand(32, 1, 8, 8, generator=g)
    x[:, :, 0, 0], x[:, :, -1, -1] = 0.0, 1.0
    y = augment_batch(x, AugmentConfig(contrast=0.3), _gen())
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    inner = (slice(None), 0, slice(1, 7), slice(1, 7))
    dy, dx = (y - m)[inner].flatten(1), (x - m)[inner].flatten(1)
    c_img = (dy * dx).sum(1) / (dx * dx).sum(1)  # least-squares factor per image
    torch.testing.assert_close(dy, c_img.view(-1, 1) * dx, atol=1e-5, rtol=0)
    assert (c_img >= 0.7 - 1e-5).all() and (c_img <= 1.3 + 1e-5).all()
    wide = x * 3 - 1  # range [-1, 2]: the offset is in units of the image's range (3)
    y = augment_batch(wide, AugmentConfig(brightness=0.05), _gen())
    d = (y - wide)[inner]
    torch.testing.assert_close(d, d[:, :1, :1].expand_as(d), atol=1e-5, rtol=0)
    assert d.abs().max() <= 0.15 + 1e-5 and d.abs().max() > 0.1


def test_gaussian_blur_by_hand_and_sharpness_keeps_a_flat_image():
    k = _gaussian_kernel(1.0)
    assert k.numel() == 7 and math.isclose(float(k.sum()), 1.0)
    torch.testing.assert_close(k[3] / k[4], torch.tensor(math.exp(0.5), dtype=torch.float64))
    impulse = torch.zeros(1, 1, 15, 15)
    impulse[0, 0, 7, 7] = 1.0
    torch.testing.assert_close(gaussian_blur(impulse)[0, 0, 4:11, 4:11], torch.outer(k, k).float())
    flat = torch.full((3, 2, 8, 8), 0.7)
    flat[:, :, 0, 0] = 0.0  # a range to map against
    y = augment_batch(flat, AugmentConfig(sharpness=2.0), _gen())
    torch.testing.assert_close(y[:, :, 4:, 4:], flat[:, :, 4:, 4:])
    # an edge from 0.4 to 0.6 (corners fix the range to [0, 1]): y = x + a (x - G * x) with one a
    # per image, uniform in [max(-1, -s), s]
    edge = torch.full((32, 1, 24, 24), 0.4)
    edge[:, :, :, 12:] = 0.6
    edge[:, :, 0, 0], edge[:, :, -1, -1] = 0.0, 1.0
    y = augment_batch(edge, AugmentConfig(sharpness=2.0), _gen())
    detail = (edge - gaussian_blur(edge))[:, 0, 8:16, 4:20].flatten(1)
    change = (y - edge)[:, 0, 8:16, 4:20].flatten(1)
    a = (change * detail).sum(1) / (detail * detail).sum(1)
    torch.testing.assert_close(change, a.view(-1, 1) * detail, atol=1e-5, rtol=0)
    assert (a >= -1 - 1e-5).all() and (a <= 2 + 1e-5).all() and a.min() < -0.5 and a.max() > 1.0
    tiny = augment_batch(torch.rand(2, 1, 3, 3), AugmentConfig(sharpness=1.0), _gen())  # smaller than the kernel
    assert tiny.shape == (2, 1, 3, 3) and torch.isfinite(tiny).all()


def test_noise_has_the_drawn_spread():
    x = torch.zeros(16, 1, 64, 64)
    x[:, :, 0, 0] = 1.0
    x[:, :, 1:, :] = 0.5
    y = augment_batch(x, AugmentConfig(noise=0.1), _gen())
    sd = y[:, 0, 8:, :].flatten(1).std(dim=1)
    assert (sd <= 0.1 * 1.1).all() and sd.max() > 0.06 and sd.min() < 0.04
    grey3 = x.expand(16, 3, 64, 64).contiguous()  # channels are copies of one grey image: one noise field
    y3 = augment_batch(grey3, AugmentConfig(noise=0.1), _gen())
    assert torch.equal(y3[:, 0], y3[:, 1]) and torch.equal(y3[:, 0], y3[:, 2])


def test_draws_are_reproducible_and_differ_by_epoch_seed_and_rank():
    x = _images()
    cfg = AugmentConfig(gamma=0.5, contrast=0.3, brightness=0.1, noise=0.05, sharpness=1.0, crop=0.2, hflip=0.5)
    a = augment_batch(x, cfg, augment_generator(0, 1))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, augment_batch(x, cfg, augment_generator(0, 1)))
    for other in (augment_generator(0, 2), augment_generator(1, 1), augment_generator(0, 1, rank=1)):
        assert not torch.equal(a, augment_batch(x, cfg, other))


def test_bad_batches_and_options_are_refused():
    with pytest.raises(ValueError, match="N, C, H, W"):
        augment_batch(torch.zeros(3, 8, 8), AugmentConfig(gamma=0.1), _gen())
    with pytest.raises(ValueError, match="N, C, H, W"):
        augment_batch(torch.zeros(2, 1, 8, 8, dtype=torch.long), AugmentConfig(gamma=0.1), _gen())
    for bad in ({"gamma": -0.1}, {"contrast": 1.0}, {"crop": 0.6}, {"hflip": 1.5}, {"noise": float("nan")}, {"blur": 1}):
        with pytest.raises(ValidationError):
            AugmentConfig(**bad)


def test_augmented_training_resumes_exactly_and_differs_from_unaugmented(tmp_path):
    from cxrdebias.data.base import TensorBatchLoader, TensorSamples
    from cxrdebias.debias.vanilla import Vanilla
    from cxrdebias.experiments.config import load_config
    from cxrdebias.models.simple_conv import SimpleConvNet
    from cxrdebias.training.device import seed_everything
    from cxrdebias.training.runs import RunDir
    from cxrdebias.training.trainer import Trainer

    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 2, (32,), generator=g)
    x = torch.randn(32, 3, 12, 12, generator=g) * 0.5
    x[:, 0] += t.view(-1, 1, 1).float()
    data = TensorSamples(x, t, t.clone(), name="toy")
    aug = ["train.augment.gamma=0.5", "train.augment.noise=0.05", "train.augment.crop=0.2", "train.augment.hflip=0.5"]

    def trainer(run, epochs, extra):
        cfg = load_config(None, [f"train.epochs={epochs}", "train.batch_size=16", "train.progress=false", "train.precision=fp32", *extra])
        seed_everything(0)
        return Trainer(
            SimpleConvNet(2, kernel_size=3), Vanilla(), TensorBatchLoader(data, 16, shuffle=True, seed=1), cfg.train,
            run=run, seed=0, fingerprint={"e": 3}, num_classes=2,
        )

    ref = trainer(RunDir.create(tmp_path / "ref"), 3, aug)
    ref.fit()
    plain = trainer(RunDir.create(tmp_path / "plain"), 3, [])
    plain.fit()
    run = RunDir.create(tmp_path / "interrupted")
    trainer(run, 2, aug).fit()
    resumed = trainer(run, 3, aug)
    resumed.fit(resume=True)
    for a, b in zip(ref.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, c) for a, c in zip(ref.model.parameters(), plain.model.parameters(), strict=True))
