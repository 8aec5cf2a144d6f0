"""Fuzzing the two parsers of user files: the CXR manifest and the image reader.

Whatever the bytes, each either returns a valid result or raises the package's own error type
(:class:`~cxrdebias.errors.CxrDebiasError`: a one-line message), never anything else.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from cxrdebias.data.cxr import load_manifest
from cxrdebias.data.images import read_image, write_dicom
from cxrdebias.errors import CxrDebiasError

# pydicom warns about the malformed elements it reads with force=True; that is the point here
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom.*")

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _png_bytes(seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png_bytes()

# -- the manifest ---------------------------------------------------------------------------------

HEADER = "path,label,site,patient_id"
_paths = st.one_of(
    st.sampled_from(["a.png", "b.png", "../a.png", "/etc/passwd", "a\x00.png", "./a.png", "..", ".", "", "sub/../a.png", "ä/ü.png", "C:\\x.png"]),
    st.text(max_size=20),
)
_fields = st.one_of(st.sampled_from(["0", "1", "", "2", "-1", "yes", " 1 ", "siteA", "P1", '"', "\x00", "é"]), st.text(max_size=12))
_rows = st.lists(st.tuples(_paths, _fields, _fields, _fields), max_size=6)


def _csv_line(fields) -> str:
    return ",".join('"' + f.replace('"', '""') + '"' if any(c in f for c in ',"\n\r') else f for f in fields)


def _check_manifest(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "a.png").write_bytes(PNG)
        (root / "b.png").write_bytes(_png_bytes(1))
        (root / "c.png").write_bytes(b"not an image")
        path = root / "manifest.csv"
        path.write_bytes(data)
        for allow_drop in (False, True):
            try:
                df = load_manifest(path, allow_drop=allow_drop, workers=1)
            except CxrDebiasError as exc:
                assert str(exc)  # a message
                continue
            assert {"path", "label", "site", "patient_id"} <= set(df.columns)
            assert set(df["label"].tolist()) <= {0, 1}


@FUZZ
@given(rows=_rows, header=st.booleans(), extra=st.lists(st.text(max_size=6), max_size=2))
@example(rows=[("a.png", "1", "s", "P1"), ("b.png", "0", "s", "P2")], header=True, extra=[])
@example(rows=[("../a.png", "1", "s", "P1"), ("/etc/passwd", "0", "t", "P2"), ("a\x00.png", "0", "t", "P3")], header=True, extra=[])
@example(rows=[("a.png", "1", "s", "P1")], header=True, extra=["path"])  # a repeated column
def test_manifest_parser_never_crashes_on_structured_rows(rows, header, extra):
    lines = ([_csv_line([*HEADER.split(","), *extra])] if header else []) + [_csv_line(r) for r in rows]
    _check_manifest("\n".join(lines).encode("utf-8"))


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(lambda t: (HEADER + "\n" + t).encode("utf-8", "surrogatepass"))))
@example(data=b"\xef\xbb\xbfpath,label,site,patient_id\na.png,1,s,P1\n")
@example(data=b"path,label,site,patient_id\n\"a.png,1,s,P1\n")  # an unterminated quote
@example(data=b"path,label,site,patient_id\n\xff\xfe,1,s,P1\n")  # not UTF-8
def test_manifest_parser_never_crashes_on_arbitrary_bytes(data):
    _check_manifest(data)


# -- the image reader -----------------------------------------------------------------------------


def _check_image(data: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"x{suffix}"
        path.write_bytes(data)
        try:
            img = read_image(path)
        except CxrDebiasError:
            return
        assert img.pixels.dtype == np.float32 and img.pixels.ndim == 2 and img.pixels.size > 0
        assert np.isfinite(img.pixels).all() and img.pixels.min() >= 0 and img.pixels.max() <= 1


@FUZZ
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".png", ".jpg", ".dcm", ""]))
@example(data=b"\x89PNG\r\n\x1a\n", suffix=".png")
@example(data=b"\xff\xd8\xff", suffix=".jpg")
@example(data=b"\x00" * 128 + b"DICM", suffix=".dcm")
def test_image_reader_never_crashes_on_arbitrary_bytes(data, suffix):
    _check_image(data, suffix)


@FUZZ
@given(cut=st.integers(0, len(PNG)), flips=st.lists(st.tuples(st.integers(0, len(PNG) - 1), st.integers(0, 255)), max_size=4))
def test_image_reader_on_mutated_and_truncated_png(cut, flips):
    data = bytearray(PNG)
    for i, v in flips:
        data[i] = v
    _check_image(bytes(data[:cut] if cut else data), ".png")


def _dicom_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        arr = np.arange(64, dtype=np.uint16).reshape(8, 8) * 50
        return write_dicom(Path(d) / "x.dcm", arr, bits_stored=12, window=(1500, 3000), institution_name="Site A").read_bytes()


DICOM = _dicom_bytes()
_TRANSFER_SYNTAX = DICOM.index(b"1.2.840.10008.1.2.1")  # the Transfer Syntax UID in the file meta


@FUZZ
@given(cut=st.integers(1, len(DICOM)), flips=st.lists(st.tuples(st.integers(0, len(DICOM) - 1), st.integers(0, 255)), max_size=3))
@example(cut=len(DICOM) - 10, flips=[])  # Pixel Data shorter than its header says
@example(cut=140, flips=[])
# found by this test: a malformed Transfer Syntax UID made the decoder-error hint itself raise
# ValueError ("UID is not a transfer syntax") instead of a DataError
@example(cut=len(DICOM), flips=[(_TRANSFER_SYNTAX, 0)])
def test_image_reader_on_truncated_and_mutated_dicom(cut, flips):
    data = bytearray(DICOM)
    for i, v in flips:
        data[i] = v
    _check_image(bytes(data[:cut]), ".dcm")
