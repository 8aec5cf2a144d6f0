"""The one preprocessing: hand-checked resizing, normalisation, loud range checks, the spec."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from cxrdebias.data.images import write_dicom
from cxrdebias.data.preprocess import (
    PREPROCESS_VERSION,
    PreprocessSpec,
    equalize,
    preprocess,
    preprocess_file,
    resize_geometry,
)
from cxrdebias.errors import DataError

RAW = PreprocessSpec(image_size=4, mean=0.0, std=1.0)  # no normalisation: output = resized pixels


def test_letterbox_keeps_aspect_and_pads_with_zero():
    out = preprocess(np.ones((2, 4), np.float32), RAW)
    assert out.shape == (1, 4, 4) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0], [[0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
    tall = preprocess(np.ones((4, 2), np.float32), RAW)[0]
    np.testing.assert_array_equal(tall, [[0, 1, 1, 0]] * 4)
    # odd padding: 3 rows of 8 → 3 rows at size 8, top pad (8−3)//2 = 2, bottom pad 3
    geo = resize_geometry((3, 8), PreprocessSpec(image_size=8))
    assert geo.target_box == (0, 2, 8, 5) and geo.source_box == (0.0, 0.0, 8.0, 3.0)


def test_center_crop_keeps_the_central_square():
    x = np.zeros((4, 8), np.float32)
    x[:, 2:6] = 1.0  # the central 4×4 square is white, the sides black
    out = preprocess(x, RAW.model_copy(update={"resize": "center_crop"}))
    np.testing.assert_array_equal(out[0], np.ones((4, 4)))
    geo = resize_geometry((4, 8), RAW.model_copy(update={"resize": "center_crop"}))
    assert geo.source_box == (2.0, 0.0, 6.0, 4.0) and geo.target_box == (0, 0, 4, 4)


def test_stretch_ignores_aspect_ratio():
    x = np.zeros((2, 8), np.float32)
    x[1] = 1.0
    out = preprocess(x, RAW.model_copy(update={"resize": "stretch"}))[0]
    np.testing.assert_array_equal(out, [[0] * 4, [0] * 4, [1] * 4, [1] * 4])


def test_area_interpolation_averages_blocks():
    # 8×8 made of 2×2 blocks → 4×4 output equals the block means exactly
    rng = np.random.default_rng(1)
    x = rng.random((8, 8)).astype(np.float32)
    means = x.reshape(4, 2, 4, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(preprocess(x, RAW)[0], means, atol=1e-6)
    np.testing.assert_allclose(preprocess(x, PreprocessSpec(image_size=8, mean=0, std=1))[0], x, atol=1e-7)


def test_bilinear_on_constant_image_is_constant():
    out = preprocess(np.full((10, 10), 0.3, np.float32), PreprocessSpec(image_size=7, interpolation="bilinear", mean=0, std=1))
    np.testing.assert_allclose(out, 0.3, atol=1e-6)


def test_normalisation_and_channels():
    spec = PreprocessSpec(image_size=4, mean=0.5, std=0.25, channels=3, resize="stretch")
    x = np.full((4, 4), 0.75, np.float32)
    out = preprocess(x, spec)
    assert out.shape == spec.output_shape == (3, 4, 4) and out.dtype == np.float32
    np.testing.assert_allclose(out, 1.0)  # (0.75 − 0.5) / 0.25
    assert out.flags["C_CONTIGUOUS"] and out.flags["WRITEABLE"]
    # default spec: letterbox pad (0) becomes (0 − 0.5)/0.5 = −1
    pad = preprocess(np.ones((2, 4), np.float32), PreprocessSpec(image_size=4))
    assert pad[0, 0, 0] == -1.0 and pad[0, 1, 0] == 1.0
    assert pad.flags["C_CONTIGUOUS"] and pad.flags["WRITEABLE"]


def test_deterministic():
    rng = np.random.default_rng(0)
    x = rng.random((37, 53)).astype(np.float32)
    for spec in (PreprocessSpec(image_size=16), PreprocessSpec(image_size=16, resize="center_crop", interpolation="bilinear")):
        assert preprocess(x, spec).tobytes() == preprocess(x.copy(), spec).tobytes()
    # float64 input gives the same numbers as float32 input
    np.testing.assert_array_equal(preprocess(x.astype(np.float64), PreprocessSpec(image_size=16)),
                                  preprocess(x, PreprocessSpec(image_size=16)))


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        (np.full((4, 4), 255.0, np.float32), r"observed range \[255, 255\]"),
        (np.linspace(-1, 1, 16, dtype=np.float32).reshape(4, 4), r"observed range \[-1, 1\]"),
        (np.zeros((4, 4), np.uint8), r"floating-point.*uint8 with range \[0, 0\]"),
        (np.full((4, 4), np.nan, np.float32), "NaN"),
        (np.zeros((1, 4, 4), np.float32), r"2-D grayscale image \(H×W\), got shape \(1, 4, 4\)"),
        ([[0.0, 1.0]], "numpy array"),
    ],
)
def test_input_range_checked_loudly(pixels, message):
    with pytest.raises(ValueError, match=message):
        preprocess(pixels, PreprocessSpec(image_size=4))


def test_spec_is_frozen_serialisable_and_versioned():
    spec = PreprocessSpec(image_size=64, resize="center_crop", channels=3)
    with pytest.raises(ValidationError):
        spec.image_size = 32  # frozen
    text = spec.model_dump_json()
    assert json.loads(text)["version"] == PREPROCESS_VERSION
    assert PreprocessSpec.model_validate_json(text) == spec
    assert hash(spec) == hash(PreprocessSpec.model_validate_json(text))
    with pytest.raises(ValidationError, match="unknown|extra"):
        PreprocessSpec.model_validate({"image_size": 64, "colour": True})
    with pytest.raises(ValidationError, match="version 99 is not supported"):
        PreprocessSpec(version=99)
    with pytest.raises(ValidationError):
        PreprocessSpec(std=0)
    with pytest.raises(ValidationError):
        PreprocessSpec(resize="pad")


def test_preprocess_file_same_for_png_and_dicom(tmp_path):
    ramp = (np.arange(1024) % 256).astype(np.uint8).reshape(32, 32)
    Image.fromarray(ramp).save(tmp_path / "a.png")
    write_dicom(tmp_path / "a.dcm", ramp, window=(128, 256))  # identity window: x/255
    spec = PreprocessSpec(image_size=8)
    a, b = preprocess_file(tmp_path / "a.png", spec), preprocess_file(tmp_path / "a.dcm", spec)
    assert a.shape == (1, 8, 8)
    np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(DataError, match="file not found"):
        preprocess_file(tmp_path / "missing.png", spec)


# --- equalize: histogram equalisation by exact ranks ---------------------------------------------


def test_equalize_by_hand():
    # n = 6; values 0.2 ×2, 0.1, 0.9, 0.5 ×2: #{≤ 0.1} = 1, #{≤ 0.2} = 3, #{≤ 0.5} = 5, #{≤ 0.9} = 6
    img = np.array([[0.2, 0.1, 0.9], [0.5, 0.2, 0.5]], dtype=np.float32)
    np.testing.assert_allclose(equalize(img), [[3 / 6, 1 / 6, 1.0], [5 / 6, 3 / 6, 5 / 6]], rtol=1e-7)
    assert equalize(np.full((3, 3), 0.4, np.float32)).tolist() == [[1.0] * 3] * 3  # constant → all 1


def test_preprocess_equalizes_the_image_not_the_padding():
    img = np.linspace(0.0, 0.3, 8 * 4, dtype=np.float32).reshape(8, 4)  # letterboxed into 8×8: columns 2..5
    spec = PreprocessSpec(image_size=8, interpolation="area", equalize=True)
    out = preprocess(img, spec)[0]
    np.testing.assert_array_equal(out[:, :2], -1.0)  # padding: 0 → (0 − 0.5) / 0.5
    np.testing.assert_array_equal(out[:, 6:], -1.0)
    content = out[:, 2:6] * 0.5 + 0.5  # back to [0, 1]: the 32 distinct values become 1/32 … 32/32
    assert sorted(content.ravel().tolist()) == pytest.approx([(k + 1) / 32 for k in range(32)])


def test_equalize_removes_a_monotone_intensity_change():
    """A scanner's contrast curve (gamma, gain, offset) changes nothing at the model's size (up to
    ties the float32 rounding creates) and almost nothing after downsizing; without ``equalize`` it
    moves the input a lot."""
    rng = np.random.default_rng(0)
    curve = lambda x: (0.8 * x**2.2 + 0.1).astype(np.float32)  # noqa: E731
    same = rng.random((64, 64)).astype(np.float32)
    spec = PreprocessSpec(image_size=64, equalize=True)
    assert np.abs(preprocess(same, spec) - preprocess(curve(same), spec)).max() <= 2 * 2 / same.size
    yy, xx = np.mgrid[0:300, 0:200] / 300.0
    smooth = np.clip(0.5 + 0.3 * np.sin(6 * xx) * np.cos(4 * yy) + 0.1 * yy, 0, 1).astype(np.float32)
    spec = PreprocessSpec(image_size=64, equalize=True)
    assert np.abs(preprocess(smooth, spec) - preprocess(curve(smooth), spec)).max() < 0.01
    plain = PreprocessSpec(image_size=64)
    assert np.abs(preprocess(smooth, plain) - preprocess(curve(smooth), plain)).max() > 0.2


def test_equalize_is_left_out_of_the_spec_when_off():
    """Specs (and the data hashes and caches keyed by their JSON) of runs without it are unchanged;
    with it, the JSON says so and reads back."""
    off = PreprocessSpec(image_size=32)
    assert "equalize" not in off.model_dump(mode="json") and "equalize" not in off.model_dump_json()
    assert json.loads(off.model_dump_json()) == {"version": 1, "image_size": 32, "resize": "letterbox",
                                                  "interpolation": "area", "mean": 0.5, "std": 0.5, "channels": 1}
    on = PreprocessSpec(image_size=32, equalize=True)
    assert json.loads(on.model_dump_json())["equalize"] is True
    assert PreprocessSpec.model_validate_json(on.model_dump_json()) == on
    assert PreprocessSpec.model_validate_json(off.model_dump_json()).equalize is False
