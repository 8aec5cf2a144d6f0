"""The pre-decoding disk cache (cxrdebias.data.cache, data.cache_dir): identical model input,
invalidation by file content and preprocessing spec, clear errors for corrupt entries, atomic writes."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxrdebias.data import cache as cache_mod
from cxrdebias.data.base import make_loader
from cxrdebias.data.cache import DecodedCache, file_sha256
from cxrdebias.data.cxr import CXRDataConfig, CXRDataset, build_cxr
from cxrdebias.data.images import write_dicom
from cxrdebias.data.preprocess import PreprocessSpec
from cxrdebias.errors import CxrDebiasError, DataError, OutputError

SPEC = PreprocessSpec(image_size=32)


def _images(folder: Path, n: int = 6) -> list[Path]:
    """Half DICOM (16-bit, non-square), half PNG (8-bit), distinct pixels."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        if i % 2 == 0:
            p = write_dicom(folder / f"img{i}.dcm", rng.integers(0, 4096, (40 + i, 37), dtype=np.uint16), bits_stored=12)
        else:
            p = folder / f"img{i}.png"
            Image.fromarray(rng.integers(0, 256, (33, 45 + i), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def _table(paths: list[Path]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "abs_path": [str(p) for p in paths],
            "path": [p.name for p in paths],
            "label": [i % 2 for i in range(len(paths))],
            "site": ["A" if i < len(paths) // 2 else "B" for i in range(len(paths))],
            "patient_id": [f"p{i}" for i in range(len(paths))],
        }
    )


def _dataset(paths, spec=SPEC, cache_dir=None, **kw) -> CXRDataset:
    return CXRDataset(_table(paths), spec, {"A": 0, "B": 1}, cache_dir=cache_dir, **kw)


def _entries(root: Path) -> list[Path]:
    return sorted(root.rglob("*.npy"))


def test_cache_hit_gives_identical_model_input(tmp_path):
    paths = _images(tmp_path / "img")
    root = tmp_path / "cache"
    for spec in (SPEC, PreprocessSpec(image_size=24, channels=3, resize="center_crop", interpolation="bilinear")):
        plain = _dataset(paths, spec)
        filler = _dataset(paths, spec, cache_dir=root)
        assert filler.fill_disk_cache(workers=2) == len(paths)
        assert filler.fill_disk_cache(workers=2) == 0  # nothing left to decode
        cached = _dataset(paths, spec, cache_dir=root)  # a fresh dataset: every image a cache hit
        cached._decode = lambda i: pytest.fail("a cache hit must not decode")  # type: ignore[method-assign]
        for i in range(len(paths)):
            a, b = plain[i]["image"], cached[i]["image"]
            assert a.dtype == b.dtype and a.shape == b.shape == spec.output_shape
            assert a.numpy().tobytes() == b.numpy().tobytes()
        # the same shuffled batches through the training loader for the same seed
        for x, y in zip(make_loader(plain, 4, shuffle=True, seed=3), make_loader(cached, 4, shuffle=True, seed=3), strict=True):
            assert torch.equal(x["index"], y["index"]) and torch.equal(x["image"], y["image"])
    assert len(_entries(root)) == 2 * len(paths)  # one entry per (file, spec)


def test_entries_filled_lazily_without_fill(tmp_path):
    paths = _images(tmp_path / "img", 2)
    ds = _dataset(paths, cache_dir=tmp_path / "cache")
    first = ds[0]["image"]
    assert len(_entries(tmp_path / "cache")) == 1
    assert torch.equal(_dataset(paths, cache_dir=tmp_path / "cache")[0]["image"], first)


def test_modified_source_file_invalidates(tmp_path):
    paths = _images(tmp_path / "img", 2)
    root = tmp_path / "cache"
    _dataset(paths, cache_dir=root).fill_disk_cache()
    old = _dataset(paths, cache_dir=root)[0]["image"]
    # same name, same size, same modification time — only the content differs
    st = os.stat(paths[0])
    write_dicom(paths[0], np.random.default_rng(9).integers(0, 4096, (40, 37), dtype=np.uint16), bits_stored=12)
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns))
    ds = _dataset(paths, cache_dir=root)
    assert ds.fill_disk_cache() == 1  # only the changed file is decoded again
    new = ds[0]["image"]
    assert not torch.equal(new, old)
    assert torch.equal(new, _dataset(paths)[0]["image"])  # what decoding the new file gives
    assert len(_entries(root)) == 3  # the stale entry stays unused


def test_different_preprocessing_spec_invalidates(tmp_path):
    paths = _images(tmp_path / "img", 2)
    root = tmp_path / "cache"
    _dataset(paths, cache_dir=root).fill_disk_cache()
    for spec in (PreprocessSpec(image_size=32, mean=0.4), PreprocessSpec(image_size=32, resize="stretch"), PreprocessSpec(image_size=16)):
        ds = _dataset(paths, spec, cache_dir=root)
        assert ds.fill_disk_cache() == len(paths)
        assert torch.equal(ds[1]["image"], _dataset(paths, spec)[1]["image"])
    keys = {DecodedCache(root, s).key("x") for s in (SPEC, PreprocessSpec(image_size=32, channels=3), PreprocessSpec(image_size=33))}
    assert len(keys) == 3


def test_code_versions_are_part_of_the_key(tmp_path, monkeypatch):
    before = DecodedCache(tmp_path, SPEC).key("abc")
    monkeypatch.setattr(cache_mod, "_version", lambda dist: "9.9" if dist == "pydicom" else "1")
    assert DecodedCache(tmp_path, SPEC).key("abc") != before
    monkeypatch.setattr(cache_mod, "CACHE_FORMAT", cache_mod.CACHE_FORMAT + 1)
    assert DecodedCache(tmp_path, SPEC).dir.name == f"v{cache_mod.CACHE_FORMAT}"


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:100]), "unreadable"),
        (lambda p: p.write_bytes(p.read_bytes()[:-4]), "truncated"),
        (lambda p: p.write_bytes(p.read_bytes() + b"\0" * 4), "too long"),
        (lambda p: p.write_bytes(b""), "unreadable"),
        (lambda p: p.write_bytes(b"not a numpy file at all" * 10), "unreadable"),
        (lambda p: np.save(p, np.zeros((8, 8), np.float32)), "expected float32 (32, 32)"),
        (lambda p: np.save(p, np.zeros((32, 32), np.float64)), "expected float32 (32, 32)"),
        (lambda p: np.save(p, np.full((32, 32), np.nan, np.float32)), "NaN"),
        (lambda p: np.save(p, np.array([{"a": 1}], dtype=object)), "unreadable"),  # pickles are refused
    ],
)
def test_corrupt_entry_is_a_clear_error_naming_the_file(tmp_path, damage, why):
    paths = _images(tmp_path / "img", 2)
    root = tmp_path / "cache"
    _dataset(paths, cache_dir=root).fill_disk_cache()
    entry = DecodedCache(root, SPEC).path(DecodedCache(root, SPEC).key(file_sha256(paths[0])))
    assert entry.is_file()
    damage(entry)
    with pytest.raises(DataError) as info:
        _dataset(paths, cache_dir=root)[0]
    assert isinstance(info.value, CxrDebiasError)
    assert str(entry) in str(info.value) and why in str(info.value) and "delete" in str(info.value)
    with pytest.raises(DataError, match="corrupt pre-decoding cache entry"):
        _dataset(paths, cache_dir=root).fill_disk_cache()


def test_write_is_atomic_temp_file_then_rename(tmp_path, monkeypatch):
    cache = DecodedCache(tmp_path, SPEC)
    plane = np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32)
    replaced = []
    real_replace = os.replace

    def spy(src, dst):
        assert Path(src).parent == Path(dst).parent and not Path(dst).exists()  # same folder, so rename is atomic
        replaced.append((Path(src).name, Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(cache_mod.os, "replace", spy)
    path = cache.put("ab" * 32, plane)
    assert replaced and replaced[0][1] == path.name and replaced[0][0].endswith(".tmp")
    assert np.array_equal(cache.get("ab" * 32), plane)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left

    # a failure mid-write leaves neither an entry nor a temporary file
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(cache_mod.np, "save", boom)
    with pytest.raises(OutputError, match=r"\.npy: cannot write \(disk full\)"):  # one line naming the file
        cache.put("cd" * 32, plane)
    assert cache.get("cd" * 32) is None
    assert not any(p.name.endswith(".tmp") for p in tmp_path.rglob("*"))


def test_concurrent_writers_of_one_entry(tmp_path):
    cache = DecodedCache(tmp_path, SPEC)
    plane = np.arange(32 * 32, dtype=np.float32).reshape(32, 32)
    errors = []
    seen = []

    def writer():
        try:
            for _ in range(20):
                cache.put("ef" * 32, plane)
                got = cache.get("ef" * 32)  # a reader never sees a partial file
                seen.append(got is not None and np.array_equal(got, plane))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(seen) and len(seen) == 80
    assert [p.name for p in cache.path("ef" * 32).parent.iterdir()] == [f"{'ef' * 32}.npy"]


def test_file_changing_while_decoded_is_not_stored(tmp_path):
    paths = _images(tmp_path / "img", 2)
    cache = DecodedCache(tmp_path / "cache", SPEC)
    digest = file_sha256(paths[1])

    def make():
        out = _dataset(paths)._decode(1)
        paths[1].write_bytes(paths[1].read_bytes() + b"\0")  # someone rewrites it meanwhile
        return out

    cache.load(paths[1], make, digest)
    assert cache.get(cache.key(digest)) is None and _entries(tmp_path / "cache") == []


def test_dataloader_workers_read_the_cache(tmp_path):
    paths = _images(tmp_path / "img", 4)
    root = tmp_path / "cache"
    ds = _dataset(paths, cache_dir=root)
    ds.fill_disk_cache()
    ds._decode = None  # workers get a pickled copy: they must not decode either
    batches = list(make_loader(ds, 2, num_workers=2))
    plain = list(make_loader(_dataset(paths), 2))
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(batches, plain, strict=True))


def test_build_cxr_passes_cache_dir_and_pipeline_fills_it(tmp_path):
    from cxrdebias.experiments.config import ExperimentConfig
    from cxrdebias.experiments.protocols.cxr import materialise

    folder = tmp_path / "set"
    paths = _images(folder, 12)
    lines = ["path,label,site,patient_id"] + [f"{p.name},{i % 2},{'A' if i < 6 else 'B'},p{i}" for i, p in enumerate(paths)]
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    cfg = ExperimentConfig.model_validate(
        {"data": {"kind": "cxr", "manifest": str(folder / "manifest.csv"), "split_protocol": "random", "cache_dir": str(tmp_path / "c"),
                  "preprocess": {"image_size": 32}, "workers": 2}}
    )
    data = build_cxr(cfg.data)
    assert data.train.disk_cache is not None and data.train.disk_cache.root == tmp_path / "c"
    samples = materialise(data.train, cfg.data, hide_bias=False)
    assert len(_entries(tmp_path / "c")) == len(data.train)
    plain = build_cxr(CXRDataConfig.model_validate({**cfg.data.model_dump(), "cache_dir": None}))
    assert torch.equal(samples.images, plain.train.to_tensor_samples().images)
    streaming = materialise(data.val, cfg.data.model_copy(update={"cache": False}), hide_bias=False)
    assert isinstance(streaming, CXRDataset) and len(_entries(tmp_path / "c")) == len(data.train) + len(data.val)


def _manifest(folder: Path, n: int = 12) -> Path:
    paths = _images(folder, n)
    lines = ["path,label,site,patient_id"] + [f"{p.name},{i % 2},{'A' if i < n // 2 else 'B'},p{i}" for i, p in enumerate(paths)]
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return folder / "manifest.csv"


def test_manifest_validation_reuses_inspections(tmp_path, monkeypatch):
    from cxrdebias.data.cxr import loading as cxr

    manifest = _manifest(tmp_path / "set")
    root = tmp_path / "cache"
    plain = cxr.load_manifest(manifest)
    first = cxr.load_manifest(manifest, cache_dir=root)
    assert len(list(root.rglob("*.json"))) == len(plain)
    real_read = cxr.read_image
    monkeypatch.setattr(cxr, "read_image", lambda *a, **k: pytest.fail("validated images must not be decoded again"))
    second = cxr.load_manifest(manifest, cache_dir=root)
    for df in (first, second):
        pd.testing.assert_frame_equal(df.drop(columns="abs_path"), plain.drop(columns="abs_path"))
    # a changed file is decoded (and validated) again; a changed pixel limit re-validates all
    calls = []
    monkeypatch.setattr(cxr, "read_image", lambda *a, **k: calls.append(a[0]) or real_read(*a, **k))
    Image.fromarray((np.arange(32 * 32) % 7).astype(np.uint8).reshape(32, 32)).save(tmp_path / "set" / "img1.png")
    df = cxr.load_manifest(manifest, cache_dir=root)
    assert [Path(c).name for c in calls] == ["img1.png"] and df["image_sha256"][1] != plain["image_sha256"][1]
    calls.clear()
    cxr.load_manifest(manifest, cache_dir=root, max_pixels=10**6)
    assert len(calls) == len(plain)
    # a bad image is never cached: reported on every run
    (tmp_path / "set" / "img3.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    for _ in range(2):
        with pytest.raises(DataError, match="row 5 path"):
            cxr.load_manifest(manifest, cache_dir=root)


def test_corrupt_inspection_entry_is_a_clear_error(tmp_path):
    from cxrdebias.data.cxr import loading as cxr

    manifest = _manifest(tmp_path / "set")
    root = tmp_path / "cache"
    cxr.load_manifest(manifest, cache_dir=root)
    entry = sorted(root.rglob("*.json"))[0]
    for text in ("{not json", '{"sha256": "x"}'):
        entry.write_text(text)
        with pytest.raises(DataError, match="corrupt pre-decoding cache entry") as info:
            cxr.load_manifest(manifest, cache_dir=root)
        assert str(entry) in str(info.value)
