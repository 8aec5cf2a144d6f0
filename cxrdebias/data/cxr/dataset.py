"""Chest X-ray datasets: rows of a loaded, split manifest as torch samples, and
:func:`build_cxr`, which goes from a :class:`~cxrdebias.data.cxr.config.CXRDataConfig` to the three
splits of a run (load and validate the manifest, split by patient, build the datasets).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cxrdebias.data.base import Batch, TensorSamples
from cxrdebias.data.cache import DecodedCache, file_sha256
from cxrdebias.data.cxr.config import CXRDataConfig
from cxrdebias.data.cxr.loading import load_manifest, manifest_hash
from cxrdebias.data.cxr.manifest import CLASS_NAMES, MANIFEST
from cxrdebias.data.cxr.splits import load_splits, make_splits
from cxrdebias.data.images import DEFAULT_MAX_PIXELS, read_image
from cxrdebias.data.preprocess import PreprocessSpec, preprocess
from cxrdebias.errors import ConfigError, DataError


def site_index_map(sites: Iterable[str]) -> dict[str, int]:
    """Site name → bias index, by sorted name. Build it once from the *training* table and pass
    it (saved with the run) to every evaluation dataset."""
    names = sorted({str(s) for s in sites})
    return {name: i for i, name in enumerate(names)}


class CXRDataset(torch.utils.data.Dataset):
    """Rows of a validated manifest as samples of the :mod:`cxrdebias.data.base` contract.

    ``image`` is :func:`~cxrdebias.data.preprocess.preprocess` of the decoded image (``C×H×W``
    float32), ``target`` the label, ``bias`` the site index from ``site_to_index`` (a site not in
    the mapping is a :class:`DataError`: a model cannot be evaluated on a site it has no index
    for), ``index`` the position in this dataset (``table.iloc[index]`` is its manifest row).

    With ``cache=True`` each image is decoded once and its preprocessed array kept in memory;
    :meth:`preload` fills the cache with a few threads. A cache filled inside DataLoader worker
    processes is lost when they exit: preload first, or use ``num_workers=0``.

    With ``cache_dir`` the preprocessed images are also kept on disk
    (:class:`~cxrdebias.data.cache.DecodedCache`): an image is decoded only when its entry is
    missing, in any process, epoch or run. :meth:`fill_disk_cache` hashes the source files and
    fills missing entries with threads — call it before creating DataLoader workers.
    """

    def __init__(
        self,
        table: pd.DataFrame,
        spec: PreprocessSpec,
        site_to_index: Mapping[str, int],
        *,
        split: str | None = None,
        cache: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        name: str = "",
        cache_dir: str | os.PathLike | None = None,
    ):
        if split is not None:
            if MANIFEST.split not in table.columns:
                raise DataError(f"{name or 'dataset'}: the table has no split column; call make_splits first")
            table = table[table[MANIFEST.split] == split]
        self.table = table.reset_index(drop=True)
        self.spec = spec
        self.site_to_index = dict(site_to_index)
        self.name = name or (split or "cxr")
        self.max_pixels = max_pixels
        unknown = sorted(set(self.table[MANIFEST.site]) - set(self.site_to_index))
        if unknown:
            raise DataError(
                f"{self.name}: site(s) {', '.join(map(repr, unknown))} not in the site mapping "
                f"({', '.join(map(repr, self.site_to_index))}); a model can only be evaluated on the sites it was trained with"
            )
        self.paths = [Path(p) for p in self.table["abs_path"]]
        self.targets = torch.tensor(self.table[MANIFEST.label].to_numpy(dtype=np.int64))
        self.biases = torch.tensor(np.array([self.site_to_index[s] for s in self.table[MANIFEST.site]], dtype=np.int64))
        self._cache: dict[int, np.ndarray] | None = {} if cache else None
        self.disk_cache = DecodedCache(cache_dir, spec) if cache_dir is not None else None
        self._source_sha256: list[str | None] = [None] * len(self.paths)

    @property
    def bias_names(self) -> list[str]:
        """Site names in index order."""
        return [s for s, _ in sorted(self.site_to_index.items(), key=lambda kv: kv[1])]

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> np.ndarray:
        """The preprocessed image of sample ``i`` (from the cache when present)."""
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        if self.disk_cache is not None:
            array = self.disk_cache.load(self.paths[i], lambda: self._decode(i), self._source_sha256[i])
        else:
            array = self._decode(i)
        if self._cache is not None:
            self._cache[i] = array
        return array

    def _decode(self, i: int) -> np.ndarray:
        return preprocess(read_image(self.paths[i], site_tag=None, max_pixels=self.max_pixels).pixels, self.spec)

    def fill_disk_cache(self, workers: int = 4) -> int:
        """Hash every source file and decode those without a disk-cache entry (threads).

        Returns the number of images decoded. A no-op without ``cache_dir``.
        """
        if self.disk_cache is None:
            return 0
        cache = self.disk_cache
        todo = [i for i in range(len(self)) if self._source_sha256[i] is None]

        def fill(i: int) -> bool:
            digest = file_sha256(self.paths[i])
            self._source_sha256[i] = digest
            if cache.get(cache.key(digest)) is not None:
                return False
            cache.load(self.paths[i], lambda: self._decode(i), digest)
            return True

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            return sum(pool.map(fill, todo))

    def __getitem__(self, i: int) -> Batch:
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.name}: index {i} out of range for {len(self)} samples")
        i = i % len(self)
        return Batch(
            image=torch.from_numpy(self.load(i)),
            target=self.targets[i],
            bias=self.biases[i],
            index=torch.tensor(i, dtype=torch.long),
        )

    def preload(self, workers: int = 4) -> None:
        """Decode and preprocess every image into the cache (threads; turns the cache on)."""
        if self._cache is None:
            self._cache = {}
        todo = [i for i in range(len(self)) if i not in self._cache]
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for i, array in zip(todo, pool.map(self.load, todo), strict=True):
                self._cache[i] = array

    def to_tensor_samples(self, workers: int = 4) -> TensorSamples:
        """All samples as one in-memory :class:`~cxrdebias.data.base.TensorSamples` (for the
        trainer's :class:`~cxrdebias.data.base.TensorBatchLoader`)."""
        self.preload(workers)
        images = (
            torch.from_numpy(np.stack([self._cache[i] for i in range(len(self))]))
            if len(self)
            else torch.empty((0, *self.spec.output_shape))
        )
        return TensorSamples(
            images=images,
            targets=self.targets.clone(),
            biases=self.biases.clone(),
            name=self.name,
            bias_names=self.bias_names,
            class_names=list(CLASS_NAMES),
            info={
                "rows": self.table["row"].tolist() if "row" in self.table.columns else None,
                "paths": [str(p) for p in self.table[MANIFEST.path]],  # as written in the manifest
                "abs_paths": [str(p) for p in self.paths],
            },
        )


# -- everything from a config -------------------------------------------------------------------
@dataclass
class CXRData:
    """The three splits of a chest X-ray run, the split table and its provenance."""

    table: pd.DataFrame
    train: CXRDataset
    val: CXRDataset | None
    test: CXRDataset
    site_to_index: dict[str, int]
    dropped: list[dict[str, Any]] = field(default_factory=list)
    manifest_sha256: str = ""

    def data_hash(self) -> str:
        """Hash of the manifest rows the run uses (paths, labels, sites, patients, splits, pixels)
        and of the preprocessing."""
        h = hashlib.sha256(manifest_hash(self.table).encode())
        h.update(self.train.spec.model_dump_json().encode())
        return h.hexdigest()


def build_cxr(cfg: CXRDataConfig, *, splits_file: str | os.PathLike | None = None) -> CXRData:
    """Validate the manifest, split by patient (or re-use ``splits_file``), build the datasets.

    The site→index mapping comes from the training split (sorted names); every validation site
    must be in training. Test rows of a site absent from training (an *external* site, e.g. of
    ``data synth --external-sites``) stay in ``table`` (and the saved split table) but not in
    ``test``: ``cxrdebias evaluate`` scores them as external. Print ``format_drop_summary(data.dropped)`` when rows were dropped.
    """
    if cfg.manifest is None:
        raise ConfigError(f"data.manifest: no manifest CSV given (columns {', '.join(MANIFEST.required)})")
    df = load_manifest(
        cfg.manifest,
        site_source=cfg.site_source,
        label_map=cfg.label_map,
        allow_drop=cfg.allow_drop_bad_rows,
        check_duplicates=cfg.check_duplicates,
        max_pixels=cfg.max_pixels,
        workers=cfg.workers,
        cache_dir=cfg.cache_dir,
        allow_links_outside=cfg.allow_links_outside,
    )
    attrs = dict(df.attrs)
    if splits_file is not None:
        df = load_splits(splits_file, df)
    else:
        df = make_splits(df, cfg.split_protocol, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    site_to_index = site_index_map(df.loc[df[MANIFEST.split] == "train", MANIFEST.site])
    common = {
        "spec": cfg.preprocess,
        "site_to_index": site_to_index,
        "cache": cfg.cache,
        "max_pixels": cfg.max_pixels,
        "cache_dir": cfg.cache_dir,
    }
    has_val = bool((df[MANIFEST.split] == "val").any())
    return CXRData(
        table=df,
        train=CXRDataset(df, split="train", name="train", **common),
        val=CXRDataset(df, split="val", name="val", **common) if has_val else None,
        test=CXRDataset(df[df[MANIFEST.site].isin(list(site_to_index))], split="test", name="test", **common),
        site_to_index=site_to_index,
        dropped=attrs.get("dropped", []),
        manifest_sha256=attrs.get("manifest", {}).get("sha256", ""),
    )
