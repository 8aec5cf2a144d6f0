"""A persistent pre-decoding cache: each chest X-ray decoded and preprocessed *once*, on disk.

Decoding a 2k × 2k DICOM takes tens of milliseconds of CPU per image — far slower than a GPU
trains on the 224² result (see "Data loading (issue 7)" in docs/benchmarks.md). With
``data.cache_dir`` set, the model input that :func:`~cxrdebias.data.preprocess.preprocess`
makes of an image is stored the first time it is needed, and every later epoch, run and
DataLoader worker reads that small array instead of decoding the source again.

What is stored: one ``.npy`` file per image (``float32``, ``image_size × image_size``: the first
channel of the model input; the other channels are copies of it and are re-made on reading),
so a cache hit gives *byte-identical* model input to decoding the file. Files are
content-addressed:

    key = SHA-256(cache format, SHA-256 of the source file's bytes, the PreprocessSpec,
                  cxrdebias / pydicom / Pillow versions)
    path = <cache_dir>/v<CACHE_FORMAT>/<key[:2]>/<key>.npy

so a changed source file, a different preprocessing spec or another version of the decoding
code looks up a different key — stale data is never served; old entries are just unused (delete
the folder to reclaim the space). Writes go to a temporary file in the same folder and are
renamed into place (:func:`cxrdebias.fileio.atomic_write`), so concurrent writers (DataLoader workers, two runs) and a
crash mid-write never leave a partial entry under a valid name. A file that is there but cannot
be read as the expected array (truncated, wrong shape/dtype, non-finite values) is a
:class:`~cxrdebias.errors.DataError` naming it; it is not silently rebuilt. Corruption *inside*
a well-formed array (a flipped bit in the pixel values) is not detected — that is the
filesystem's job, as for the source images.

The cache holds the deterministic part only: the random augmentation of ``train.augment``
(:mod:`cxrdebias.data.augment`) runs on the training batches, after the cache read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from cxrdebias.data.images import MIN_IMAGE_SIDE
from cxrdebias.data.preprocess import PreprocessSpec
from cxrdebias.errors import DataError
from cxrdebias.fileio import atomic_write

#: bump when the stored layout, or what read_image/preprocess produce for the same inputs, changes
CACHE_FORMAT = 1
_HASH_CHUNK = 1 << 20


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(_HASH_CHUNK):
                h.update(block)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return h.hexdigest()


class DecodedCache:
    """The cache of one :class:`PreprocessSpec` under ``root`` (see the module doc)."""

    def __init__(self, root: str | os.PathLike, spec: PreprocessSpec):
        self.root = Path(root)
        self.spec = spec
        self.dir = self.root / f"v{CACHE_FORMAT}"
        self.shape = (spec.image_size, spec.image_size)
        # everything besides the file's bytes that decides the stored numbers
        self._salt = json.dumps(
            {
                "format": CACHE_FORMAT,
                "spec": spec.model_dump(mode="json"),
                "cxrdebias": _version("cxrdebias"),
                "pydicom": _version("pydicom"),
                "pillow": _version("pillow"),
            },
            sort_keys=True,
        )
        # the exact .npy header np.save writes for such an entry: a hit is checked against it and
        # read with one read() + frombuffer (about 2.5× faster than np.load); anything else goes
        # through np.load, which says what the file holds
        buf = io.BytesIO()
        np.save(buf, np.zeros(self.shape, np.float32), allow_pickle=False)
        self._header = buf.getvalue()[: -self.shape[0] * self.shape[1] * 4]
        self._size = len(buf.getvalue())

    def key(self, source_sha256: str) -> str:
        """The entry name for a source file with this content hash."""
        return hashlib.sha256(f"{self._salt}\n{source_sha256}".encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.npy"

    # -- reading / writing ---------------------------------------------------------------------
    def get(self, key: str) -> np.ndarray | None:
        """The stored plane (``float32``, H×W), or ``None`` when there is no entry.

        Raises:
            DataError: an entry exists but is not a readable array of the expected shape/dtype.
        """
        path = self.path(key)
        try:
            with open(path, "rb") as f:
                raw = f.read(self._size + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._corrupt(path, f"unreadable ({exc.strerror or exc})") from None
        if raw.startswith(self._header):
            if len(raw) != self._size:
                raise self._corrupt(path, f"{'truncated' if len(raw) < self._size else 'too long'} ({len(raw)} bytes, expected {self._size})")
            plane = np.frombuffer(raw, np.float32, offset=len(self._header)).reshape(self.shape)
        else:
            plane = self._load_other(path)
        if not np.isfinite(plane).all():
            raise self._corrupt(path, "holds NaN or infinite values")
        return plane

    def _load_other(self, path: Path) -> np.ndarray:
        """np.load of an entry that is not byte-for-byte what :meth:`put` writes (to name the problem)."""
        try:
            plane = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise self._corrupt(path, f"unreadable ({str(exc)[:120]})") from None
        if plane.dtype != np.float32 or plane.shape != self.shape:
            raise self._corrupt(path, f"holds {plane.dtype} {plane.shape}, expected float32 {self.shape}")
        return plane

    def put(self, key: str, plane: np.ndarray) -> Path:
        """Store ``plane`` atomically (temporary file in the same folder, then ``os.replace``)."""
        plane = np.ascontiguousarray(plane, dtype=np.float32)
        if plane.shape != self.shape:
            raise ValueError(f"cache entry must have shape {self.shape}, got {plane.shape}")
        path = self.path(key)
        atomic_write(path, lambda f: np.save(f, plane, allow_pickle=False))
        return path

    def load(
        self, source: str | os.PathLike, make: Callable[[], np.ndarray], source_sha256: str | None = None
    ) -> np.ndarray:
        """The model input of ``source``: from the cache, else ``make()`` (decode + preprocess,
        ``C×H×W``) stored for next time. ``source_sha256``: the file's hash if already known.

        A file that changes while it is decoded is not stored (its hash before and after differ).
        """
        digest = source_sha256 or file_sha256(source)
        key = self.key(digest)
        plane = self.get(key)
        if plane is not None:
            return np.repeat(plane[None], self.spec.channels, axis=0)
        array = make()
        if file_sha256(source) == digest:
            self.put(key, array[0])
        return array

    @staticmethod
    def _corrupt(path: Path, why: str) -> DataError:
        return _corrupt(path, why)


class InspectionCache:
    """What manifest validation learnt from decoding an image (pixel hash, format, site), kept
    under ``<cache_dir>/v<CACHE_FORMAT>/inspect/`` so that a run with a warm cache validates
    its manifest without decoding every image again. Keyed like :class:`DecodedCache` by the
    file's SHA-256 and the code versions, plus the site tag and pixel limit the check used.
    Only successful inspections are stored: a bad file is decoded (and reported) every time.
    """

    def __init__(self, root: str | os.PathLike, *, site_tag: object, max_pixels: int):
        self.dir = Path(root) / f"v{CACHE_FORMAT}" / "inspect"
        self._salt = json.dumps(
            {
                "format": CACHE_FORMAT,
                "site_tag": str(site_tag),
                "max_pixels": int(max_pixels),
                # the checks an inspection passed (an image validated before the minimum size
                # and the blank check existed is inspected again)
                "min_side": MIN_IMAGE_SIDE,
                "blank_check": True,
                "cxrdebias": _version("cxrdebias"),
                "pydicom": _version("pydicom"),
                "pillow": _version("pillow"),
            },
            sort_keys=True,
        )

    def path(self, source_sha256: str) -> Path:
        key = hashlib.sha256(f"{self._salt}\n{source_sha256}".encode()).hexdigest()
        return self.dir / key[:2] / f"{key}.json"

    def inspect(
        self, source: str | os.PathLike, run: Callable[[], tuple[str | None, dict | None]]
    ) -> tuple[str | None, dict | None]:
        """``run()`` → ``(error, info)``, or the stored ``info`` of an unchanged file."""
        try:
            digest = file_sha256(source)
        except DataError:
            return run()  # unreadable: let the inspection say why
        path = self.path(digest)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            text = None
        except (OSError, UnicodeDecodeError) as exc:
            raise _corrupt(path, f"unreadable ({exc})") from None
        if text is not None:
            try:
                info = json.loads(text)
            except json.JSONDecodeError as exc:
                raise _corrupt(path, f"not JSON ({exc})") from None
            if not isinstance(info, dict) or not {"sha256", "format", "site"} <= set(info):
                raise _corrupt(path, "lacks sha256/format/site")
            return None, info
        error, info = run()
        if error is None and info is not None and file_sha256(source) == digest:
            data = json.dumps(info, sort_keys=True).encode()
            atomic_write(path, lambda f: f.write(data))
        return error, info


def _corrupt(path: Path, why: str) -> DataError:
    return DataError(f"{path}: corrupt pre-decoding cache entry, {why}; delete the file (or the cache folder) to rebuild it")
