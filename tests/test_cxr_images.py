"""Image reading: DICOM LUT pipeline with hand-checked values, PNG/JPEG, refusals, fuzzing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataset import Dataset

from cxrdebias.data.images import LoadedImage, read_dicom_tag, window_level, write_dicom
from cxrdebias.data.images import read_image as read_any_image
from cxrdebias.errors import ConfigError, DataError


def read_image(path, **kwargs):
    """:func:`read_any_image` of the small test patterns here (no minimum size)."""
    return read_any_image(path, **{"min_side": 1, **kwargs})

RAMP8 = np.arange(256, dtype=np.uint8).reshape(16, 16)  # pixel value == flat index


def flat(img: LoadedImage) -> np.ndarray:
    return img.pixels.ravel()


# -- DICOM: the modality LUT → VOI LUT → MONOCHROME1 pipeline --------------------------------------
def test_dicom_8bit_window_linear(tmp_path):
    # PS3.3 C.11.2.1.2 LINEAR: c' = c - 0.5 = 127.5, w' = w - 1 = 100;
    # x <= 77.5 → 0, x > 177.5 → 1, else (x - 127.5)/100 + 0.5
    path = write_dicom(tmp_path / "w.dcm", RAMP8, window=(128, 101), institution_name="Site A", patient_id="P7")
    img = read_image(path)
    assert img.pixels.dtype == np.float32 and img.pixels.shape == (16, 16)
    np.testing.assert_allclose(flat(img)[[0, 77, 78, 100, 128, 177, 178, 255]],
                               [0, 0, 0.005, 0.225, 0.505, 0.995, 1, 1], atol=1e-6)
    assert img.meta["window"] == {"type": "window", "center": 128.0, "width": 101.0, "function": "LINEAR"}
    assert img.meta["format"] == "DICOM" and img.meta["bits"] == 8 and img.meta["inverted"] is False
    assert img.site == "Site A" and img.meta["patient_id"] == "P7"
    assert img.meta["shape"] == [16, 16] and img.meta["value_range"] == [0, 255]


def test_dicom_monochrome1_is_inverted(tmp_path):
    # no window → min-max of the data (0…255), then MONOCHROME1 (high = dark) is inverted
    img = read_image(write_dicom(tmp_path / "m1.dcm", RAMP8, photometric="MONOCHROME1"))
    np.testing.assert_allclose(flat(img)[[0, 51, 255]], [1.0, 0.8, 0.0], atol=1e-6)
    assert img.meta["inverted"] is True and img.meta["photometric"] == "MONOCHROME1"
    assert img.meta["window"]["type"] == "min-max"
    same = read_image(write_dicom(tmp_path / "m2.dcm", RAMP8, photometric="MONOCHROME2"))
    np.testing.assert_allclose(img.pixels, 1.0 - same.pixels, atol=1e-6)


def test_dicom_16bit_rescale_then_window(tmp_path):
    # 12 bits stored; value = 2·stored − 1000; window (1000, 2001) on the rescaled values.
    stored = (np.arange(256, dtype=np.uint16) * 16).reshape(16, 16)
    img = read_image(write_dicom(tmp_path / "r.dcm", stored, bits_stored=12, rescale=(2, -1000), window=(1000, 2001)))
    # index 40: stored 640 → 280 → (280 − 999.5)/2000 + 0.5 = 0.14025
    # index 10: stored 160 → −680 (≤ −0.5) → 0;  index 100: stored 1600 → 2200 (> 1999.5) → 1
    np.testing.assert_allclose(flat(img)[[10, 40, 100]], [0.0, 0.14025, 1.0], atol=1e-6)
    assert img.meta["rescale"] == [2.0, -1000.0] and img.meta["bits"] == 12


def test_dicom_negative_slope_without_window_uses_minmax_of_rescaled(tmp_path):
    # slope −1 flips the values before min-max: stored 0 → 0 (max) → 1.0, stored 255 → −255 → 0.0
    img = read_image(write_dicom(tmp_path / "n.dcm", RAMP8, rescale=(-1, 0)))
    np.testing.assert_allclose(flat(img)[[0, 51, 255]], [1.0, 0.8, 0.0], atol=1e-6)
    assert img.meta["window"] == {"type": "min-max", "low": -255.0, "high": 0.0}


def test_dicom_16bit_full_range_and_8bit_window_equals_png(tmp_path):
    stored = np.array([[0, 65535], [32768, 16384]], dtype=np.uint16)
    img = read_image(write_dicom(tmp_path / "f.dcm", stored))
    np.testing.assert_allclose(img.pixels, stored / 65535.0, atol=1e-6)
    assert img.meta["bits"] == 16
    # window (128, 256) is the identity x/255 for 8-bit data: same pixels as the PNG
    dcm = read_image(write_dicom(tmp_path / "id.dcm", RAMP8, window=(128, 256)))
    Image.fromarray(RAMP8).save(tmp_path / "id.png")
    np.testing.assert_allclose(dcm.pixels, read_image(tmp_path / "id.png").pixels, atol=1e-6)


def test_dicom_voi_lut_sequence(tmp_path):
    path = write_dicom(tmp_path / "lut.dcm", RAMP8, window=(10, 2))  # the LUT must win over the window
    ds = pydicom.dcmread(path)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]
    item.LUTData = [255 - i for i in range(256)]  # an inverting LUT
    item["LUTData"].VR = "US"
    ds.VOILUTSequence = [item]
    ds.save_as(path)
    img = read_image(path)
    np.testing.assert_allclose(flat(img)[[0, 51, 255]], [1.0, 0.8, 0.0], atol=1e-6)
    assert img.meta["window"]["type"] == "voi_lut"


def _rewrite(path: Path, edit) -> Path:
    ds = pydicom.dcmread(path)
    edit(ds)
    ds.save_as(path)
    return path


def test_dicom_multiframe_refused(tmp_path):
    path = write_dicom(tmp_path / "mf.dcm", RAMP8)
    _rewrite(path, lambda ds: ds.set_pixel_data(np.zeros((2, 4, 4), np.uint8), "MONOCHROME2", 8))
    with pytest.raises(DataError, match=r"mf\.dcm: multi-frame DICOM \(2 frames\)"):
        read_image(path)


def test_dicom_rgb_refused(tmp_path):
    path = write_dicom(tmp_path / "rgb.dcm", RAMP8)
    _rewrite(path, lambda ds: ds.set_pixel_data(np.zeros((4, 4, 3), np.uint8), "RGB", 8))
    with pytest.raises(DataError, match=r"rgb\.dcm: colour DICOM \(PhotometricInterpretation RGB, SamplesPerPixel 3\)"):
        read_image(path)


def test_dicom_without_pixel_data_refused(tmp_path):
    path = write_dicom(tmp_path / "np.dcm", RAMP8)
    _rewrite(path, lambda ds: delattr(ds, "PixelData"))
    with pytest.raises(DataError, match=r"np\.dcm: DICOM has no Pixel Data"):
        read_image(path)


def test_dicom_truncated_pixel_data_refused(tmp_path):
    path = write_dicom(tmp_path / "t.dcm", RAMP8)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DataError, match=r"t\.dcm: cannot decode DICOM Pixel Data"):
        read_image(path)


def test_dicom_32bit_refused(tmp_path):
    path = write_dicom(tmp_path / "b32.dcm", RAMP8)

    def to32(ds):
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
        ds.PixelData = np.zeros((16, 16), np.uint32).tobytes()

    _rewrite(path, to32)
    with pytest.raises(DataError, match=r"BitsAllocated 32 / BitsStored 32; expected 8–16 bit"):
        read_image(path)


def test_max_pixels_checked_before_decoding(tmp_path):
    with pytest.raises(DataError, match=r"big\.dcm: 16×16 = 256 pixels exceeds the limit of 100"):
        read_image(write_dicom(tmp_path / "big.dcm", RAMP8), max_pixels=100)
    Image.fromarray(RAMP8).save(tmp_path / "big.png")
    with pytest.raises(DataError, match=r"big\.png: 16×16 = 256 pixels exceeds the limit of 100"):
        read_image(tmp_path / "big.png", max_pixels=100)


def test_read_dicom_tag(tmp_path):
    path = write_dicom(tmp_path / "t.dcm", RAMP8, institution_name="  Hospital X ", patient_id="P1",
                       extra={"ViewPosition": "PA"})
    assert read_dicom_tag(path, "InstitutionName") == "Hospital X"
    assert read_dicom_tag(path, (0x0010, 0x0020)) == "P1"
    assert read_dicom_tag(path, 0x00185101) == "PA"
    assert read_dicom_tag(path, "StationName") is None
    with pytest.raises(ConfigError, match="not a DICOM keyword"):
        read_dicom_tag(path, "Institution")
    Image.fromarray(RAMP8).save(tmp_path / "x.png")
    with pytest.raises(DataError, match=r"x\.png: not a DICOM file"):
        read_dicom_tag(tmp_path / "x.png", "InstitutionName")
    # the site is read from any tag the caller names
    assert read_image(path, site_tag="ViewPosition").site == "PA"
    assert read_image(path, site_tag=None).site is None


def test_write_dicom_is_deterministic_and_valid(tmp_path):
    a = write_dicom(tmp_path / "a.dcm", RAMP8, institution_name="S", patient_id="P")
    b = write_dicom(tmp_path / "sub" / "b.dcm", RAMP8, institution_name="S", patient_id="P")
    assert a.read_bytes() == b.read_bytes()
    ds = pydicom.dcmread(a)  # a conformant file: preamble, DICM, file meta
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.Modality == "CR" and ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    assert write_dicom(tmp_path / "c.dcm", RAMP8, patient_id="Q").read_bytes() != a.read_bytes()
    with pytest.raises(ValueError, match="does not fit bits_stored=4"):
        write_dicom(tmp_path / "d.dcm", RAMP8, bits_stored=4)
    with pytest.raises(ValueError, match="2-D uint8 or uint16"):
        write_dicom(tmp_path / "e.dcm", RAMP8.astype(np.float32))


# -- PNG / JPEG --------------------------------------------------------------------------------------
def test_png_8_and_16_bit(tmp_path):
    Image.fromarray(RAMP8).save(tmp_path / "8.png")
    img = read_image(tmp_path / "8.png")
    np.testing.assert_allclose(flat(img)[[0, 51, 255]], [0.0, 0.2, 1.0], atol=1e-7)
    assert img.meta["format"] == "PNG" and img.meta["bits"] == 8 and img.site is None
    a16 = np.array([[0, 1000], [65535, 4095]], dtype=np.uint16)
    Image.fromarray(a16).save(tmp_path / "16.png")
    img = read_image(tmp_path / "16.png")
    np.testing.assert_allclose(img.pixels, a16 / 65535.0, atol=1e-7)
    assert img.meta["bits"] == 16 and img.meta["value_range"] == [0, 65535]


def test_png_rgb_to_luminance_and_alpha_dropped(tmp_path):
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[0, 0, :3] = (255, 0, 0)
    rgba[0, 1, :3] = (0, 255, 0)
    rgba[0, 2, :3] = (0, 0, 255)
    rgba[1, :, :3] = 200
    rgba[..., 3] = 7  # nearly transparent: alpha is ignored, not composited
    Image.fromarray(rgba, "RGBA").save(tmp_path / "c.png")
    img = read_image(tmp_path / "c.png")
    np.testing.assert_allclose(img.pixels, [[0.299, 0.587, 0.114], [200 / 255] * 3], atol=1e-6)
    assert img.meta["mode"] == "RGBA"


def test_jpeg_grayscale(tmp_path):
    gray = np.full((16, 8), 200, np.uint8)
    gray[8:] = 100  # constant 8×8 JPEG blocks decode exactly
    Image.fromarray(gray).save(tmp_path / "g.jpg", quality=95)
    img = read_image(tmp_path / "g.jpg")
    assert img.meta["format"] == "JPEG" and img.pixels.shape == (16, 8)
    np.testing.assert_allclose(img.pixels, gray / 255, atol=1 / 255)


def test_format_detected_from_content_not_name(tmp_path):
    write_dicom(tmp_path / "really_dicom.png", RAMP8, institution_name="S")
    img = read_image(tmp_path / "really_dicom.png")
    assert img.meta["format"] == "DICOM" and img.site == "S"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.png", b"", r"empty\.png: empty file \(0 bytes\)"),
        ("text.png", b"patient,label\n1,0\n", r"text\.png: not a PNG, JPEG or DICOM file"),
        ("text.jpg", b"hello", r"text\.jpg: not a PNG, JPEG or DICOM file"),
        ("text.dcm", b"hello world, not dicom" * 8, r"text\.dcm: not a (DICOM image|readable DICOM file)"),
        ("fake.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, r"fake\.png: corrupt or truncated image"),
    ],
)
def test_bad_files_refused(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_image(tmp_path / name)


def test_truncated_png_and_jpeg_refused(tmp_path):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    for name in ("t.png", "t.jpg"):
        Image.fromarray(noise).save(tmp_path / name)
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(DataError, match=rf"t\.{name[-3:]}: corrupt or truncated image"):
            read_image(tmp_path / name)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DataError, match=r"nope\.png: file not found"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(DataError, match="is a folder"):
        read_image(tmp_path)


def test_window_level():
    x = np.array([0.0, 0.25, 0.5, 0.75, 1.0], np.float32)
    np.testing.assert_allclose(window_level(x, 0.5, 1.0), x)
    np.testing.assert_allclose(window_level(x, 0.5, 0.5), [0.0, 0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(window_level(x, 0.25, 0.5), [0.0, 0.5, 1.0, 1.0, 1.0])
    assert window_level(x, 0.5, 0.5).dtype == np.float32
    with pytest.raises(ValueError, match="positive"):
        window_level(x, 0.5, 0.0)


def test_image_modules_do_not_import_torch():
    code = (
        "import sys, cxrdebias.data.images, cxrdebias.data.preprocess; "
        "bad = [m for m in ('torch', 'monai') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- a real CR radiograph ------------------------------------------------------------------------------
def test_real_cr_radiograph_rg1_uncr():
    try:
        from pydicom.data import get_testdata_file

        path = get_testdata_file("RG1_UNCR.dcm")
    except Exception as exc:  # pydicom-data missing or no network cache
        pytest.skip(f"RG1_UNCR.dcm unavailable ({exc}); `pip install pydicom-data` to run this test")
    if path is None:
        pytest.skip("RG1_UNCR.dcm not found by pydicom.data; `pip install pydicom-data` to run this test")
    img = read_image(path)
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    assert img.pixels.shape == (1955, 1841) and img.pixels.dtype == np.float32
    assert img.meta["inverted"] is True and img.meta["bits"] == 15
    assert img.meta["window"]["center"] == 15000.0 and img.meta["window"]["width"] == 30000.0
    assert img.site == "Philips Medical Systems Hamburg" and img.meta["patient_id"] == "9RG1"
    # hand formula: LINEAR window (c' = 14999.5, w' = 29999) on the stored values, then inverted
    stored = ds.pixel_array.astype(np.float64)
    expected = 1.0 - np.clip((stored - 14999.5) / 29999 + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(img.pixels, expected, atol=1e-5)


# -- fuzzing: only DataError may escape the reader ------------------------------------------------------
_PREFIXES = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"\x00" * 128 + b"DICM", b"\x00" * 128 + b"DICM\x02\x00\x01\x00"]


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the garbage it is fed
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prefix=st.sampled_from(_PREFIXES),
    body=st.binary(max_size=400),
    suffix=st.sampled_from([".png", ".dcm", ".jpg", ""]),
)
def test_fuzz_reader_raises_only_data_error(tmp_path, prefix, body, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(prefix + body)
    try:
        img = read_image(path, max_pixels=1_000_000)
    except DataError:
        return
    assert img.pixels.ndim == 2 and img.pixels.dtype == np.float32
    assert np.isfinite(img.pixels).all() and img.pixels.min() >= 0 and img.pixels.max() <= 1
