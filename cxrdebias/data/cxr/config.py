"""The ``data:`` section of a chest X-ray run's config (:class:`CXRDataConfig`). No torch import."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cxrdebias.data.cxr.manifest import parse_site_source
from cxrdebias.data.cxr.splits import SplitProtocol
from cxrdebias.data.images import DEFAULT_MAX_PIXELS
from cxrdebias.data.preprocess import PreprocessSpec
from cxrdebias.errors import ConfigError


class CXRDataConfig(BaseModel):
    """Data options of a chest X-ray run (manifest CSV: :mod:`cxrdebias.data.cxr.manifest`)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["cxr"] = "cxr"
    manifest: str | None = Field(None, description="manifest CSV; image paths are relative to its folder")
    site_source: str = Field(
        "column", description="'column' (the manifest's site column) or 'dicom:<keyword>' (e.g. 'dicom:InstitutionName')"
    )
    bias: Literal["site", "none"] = Field(
        "site", description="the bias label given to debiasing methods: the site, or none (bias-label-free methods only)"
    )
    label_map: dict[str, int] | None = Field(
        None, description="maps label strings to 0/1 (default: the label column must hold 0 or 1)"
    )
    split_protocol: SplitProtocol = Field(
        "corda",
        description="corda: 30% of each site's patients as test, stratified by site and label; "
        "random: the same with test_fraction; manifest: the manifest's split column",
    )
    val_fraction: float = Field(0.2, ge=0, lt=1, description="share of the non-test patients used for validation")
    test_fraction: float | None = Field(
        None, gt=0, lt=1, description="share of patients held out as test (random protocol; default 0.2)"
    )
    seed: int = Field(0, description="seed of the patient split (independent of the training seed)")
    allow_drop_bad_rows: bool = Field(False, description="drop invalid manifest rows (listed) instead of failing")
    allow_links_outside: bool = Field(
        False,
        description="follow symbolic links that lead out of the manifest's folder (images on a mounted share); "
        "absolute paths and '..' in a path stay refused (--allow-outside)",
    )
    check_duplicates: bool = Field(True, description="refuse identical pixels under different patients/splits")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="refuse larger images")
    workers: int = Field(4, ge=1, le=64, description="threads used to read images for validation and caching")
    preprocess: PreprocessSpec = Field(default_factory=PreprocessSpec)
    cache: bool = Field(True, description="keep preprocessed images in memory (each image decoded once)")
    cache_dir: str | None = Field(
        None,
        description="pre-decoding cache folder: each image decoded + preprocessed once and stored on disk "
        "(keyed by file content, preprocessing and code versions), read by every later epoch, worker and run",
    )

    @field_validator("site_source")
    @classmethod
    def _site_source(cls, v: str) -> str:
        try:
            parse_site_source(v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return v.strip()

    @field_validator("label_map")
    @classmethod
    def _label_map(cls, v: dict[str, int] | None) -> dict[str, int] | None:
        if v is not None:
            bad = {k: x for k, x in v.items() if x not in (0, 1)}
            if bad:
                raise ValueError(f"label_map values must be 0 or 1, got {bad}")
            if not v:
                raise ValueError("label_map is empty")
        return v
