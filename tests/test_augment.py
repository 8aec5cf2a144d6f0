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


def test_crop_zooms_into_the_image():
    # a horizontal ramp: a crop of side u at centre t shows values u * X + t (X the output's
    # normalised column coordinate), so the crop's slope is u times the original's
    w = 32
    col = (torch.arange(w, dtype=torch.float32) + 0.5) / w * 2 - 1  # pixel centres in [-1, 1]
    x = col.view(1, 1, 1, w).expand(16, 1, w, w).contiguous()
    y = augment_batch(x, AugmentConfig(crop=0.4), _gen(3))
    slope = (y[:, 0, :, 1:] - y[:, 0, :, :-1]).mean(dim=(1, 2)) / (2 / w)
    assert ((slope >= 0.6 - 1e-4) & (slope <= 1 + 1e-4)).all()
    assert slope.std() > 0.05  # a side per image
    # inside the image: every sampled value is one of the original's range (no border padding reached)
    assert y.min() >= col.min() - 1e-5 and y.max() <= col.max() + 1e-5
    constant = torch.full((4, 1, 8, 8), 0.3)
    torch.testing.assert_close(augment_batch(constant, AugmentConfig(crop=0.5, hflip=0.5), _gen()), constant)


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
    y = augment_batch(x, AugmentConfig(brightness=0.05), _gen())
    d = (y - x)[inner]
    torch.testing.assert_close(d, d[:, :1, :1].expand_as(d), atol=1e-5, rtol=0)
    assert d.abs().max() <= 0.05 + 1e-6


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


def test_noise_has_the_drawn_spread():
    x = torch.zeros(16, 1, 64, 64)
    x[:, :, 0, 0] = 1.0
    x[:, :, 1:, :] = 0.5
    y = augment_batch(x, AugmentConfig(noise=0.1), _gen())
    sd = y[:, 0, 8:, :].flatten(1).std(dim=1)
    assert (sd <= 0.1 * 1.1).all() and sd.max() > 0.06 and sd.min() < 0.04


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
