"""Chest X-ray data from a manifest CSV: its schema, validation, patient-level splits, datasets.

- :mod:`.manifest`: the manifest contract — :data:`~.manifest.MANIFEST` (the one schema: column
  names, required and optional columns, split values), the parsing of one row, the problems
  (torch- and pandas-free: the prediction runtime imports it);
- :mod:`.loading`: :func:`~.loading.load_manifest` (every row and image checked before training);
- :mod:`.splits`: patient-level splits and the split table a run saves;
- :mod:`.config`: :class:`~.config.CXRDataConfig`, the ``data:`` section of a run;
- :mod:`.dataset`: the torch datasets and :func:`~.dataset.build_cxr`.

The names below are importable from this package (``from cxrdebias.data.cxr import
load_manifest``); they are loaded on first use, so that importing a torch-free submodule
(``cxrdebias.data.cxr.manifest``) does not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "cxrdebias.data.cxr.manifest": (
        "CLASS_NAMES",
        "MANIFEST",
        "MAX_LISTED_PROBLEMS",
        "SPLITS",
        "ManifestProblem",
        "ManifestSchema",
        "format_drop_summary",
        "format_problems",
        "parse_label",
        "parse_site_source",
        "read_manifest_images",
    ),
    "cxrdebias.data.cxr.loading": ("load_manifest", "manifest_hash"),
    "cxrdebias.data.cxr.splits": (
        "CORDA_TEST_FRACTION",
        "RANDOM_TEST_FRACTION",
        "SplitProtocol",
        "load_splits",
        "make_splits",
        "save_splits",
        "split_summary",
    ),
    "cxrdebias.data.cxr.config": ("CXRDataConfig",),
    "cxrdebias.data.cxr.dataset": ("CXRData", "CXRDataset", "build_cxr", "site_index_map"),
    # the collate of CXRDataset batches (the one of every dataset)
    "cxrdebias.data.base": ("collate",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
