"""Options of the synthetic chest X-ray generator (:class:`SynthConfig`) and what it reports
(:class:`SynthSummary`); the names of the files it writes."""

from __future__ import annotations

from typing import Any, Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

#: bump whenever a change alters the generated pixels or the split (recorded in synth_config.json)
GENERATOR_VERSION = "1.0.0"
MANIFEST_NAME = "manifest.csv"
CONFIG_NAME = "synth_config.json"
IMAGES_DIR = "images"
#: ground truth of the local cues (written only when :attr:`SynthConfig.cue` is set)
CUES_NAME = "cues.csv"
#: the local shortcut cues :attr:`SynthConfig.cue` can draw (:mod:`.cues`)
CueKind = Literal["tag", "text", "marker", "electrodes", "tube"]
CUE_KINDS: tuple[str, ...] = get_args(CueKind)
#: the options of the cue; recorded in synth_config.json only when a cue is drawn
CUE_FIELDS = (
    "cue", "cue_positive_rate", "cue_negative_rate", "cue_test_positive_rate", "cue_test_negative_rate",
    "cue_size", "cue_jitter",
)  # fmt: skip
#: the (min, max) options of :class:`SynthConfig` and the limits they must lie within
_RANGE_LIMITS = {"images_per_patient": (1, 20), "severity_range": (0, 1)}


def site_names(n: int) -> list[str]:
    """Names of ``n`` training sites: ``hospital_a``, ``hospital_b``, … (2 ≤ n ≤ 26)."""
    if not 2 <= n <= 26:
        raise ValueError(f"the number of sites must be between 2 and 26, got {n}")
    return [f"hospital_{chr(ord('a') + k)}" for k in range(n)]


def default_prevalence(n: int) -> list[float]:
    """Default per-site positive shares of ``n`` training sites: evenly spaced from 0.875 down
    to 0.125 (two sites: the CORDA-like 0.875 / 0.125)."""
    return [float(p) for p in np.linspace(0.875, 0.125, n)]


class SynthConfig(BaseModel):
    """Options of the synthetic multi-site chest X-ray generator (all have working defaults).

    The defaults give ~1,600 images (800 patients) in two sites, generated in a few seconds.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, ge=0, description="master seed; same seed + config → byte-identical files")
    image_size: int = Field(
        256, ge=32, le=2048, description="native width = height of the DICOM images, in pixels"
    )
    sites: list[str] = Field(
        default_factory=lambda: ["hospital_a", "hospital_b"],
        description="site (hospital) names, written to InstitutionName and the manifest; ≥ 2, "
        "letters/digits/'_'/'-' only",
    )
    site_prevalence: list[float] = Field(
        default_factory=lambda: [0.875, 0.125],
        description="share of COVID-positive patients per site in the train/val pool at "
        "bias_strength=1, one value in [0, 1] per site",
    )
    external_sites: int = Field(
        0,
        ge=0,
        le=26,
        description="sites written only as test data (named external_1 … external_K), each with "
        "its own acquisition style and balanced labels, n_test_patients_per_site patients each: "
        "hospitals a model never trained on (evaluate marks them external)",
    )
    bias_strength: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="site–label correlation of the train/val pool: prevalence of site s is "
        "mean + bias_strength·(site_prevalence[s] − mean); 0 = same prevalence everywhere",
    )
    n_train_patients_per_site: int = Field(250, ge=1, description="training patients per site")
    n_val_patients_per_site: int = Field(
        100, ge=0, description="validation patients per site (biased pool, like train)"
    )
    n_test_patients_per_site: int = Field(
        100, ge=0, description="test patients per site; even: half positive, half negative"
    )
    images_per_patient: tuple[int, int] = Field(
        (1, 3), description="inclusive (min, max) images per patient (follow-ups)"
    )
    severity_range: tuple[float, float] = Field(
        (0.05, 0.5),
        description="range of the disease extent of positive patients, within [0, 1] "
        "(0 = invisible, 1 = extensive bilateral opacities); drawn uniformly. The default "
        "(subtle to moderate) keeps the disease harder to learn than the site, so that a vanilla "
        "model takes the site shortcut (docs/cxr.md); (0.15, 1.0) gave a disease so easy that "
        "the shortcut barely showed",
    )
    other_findings_rate: float = Field(
        0.15,
        ge=0.0,
        le=1.0,
        description="share of patients (either label) with a non-COVID finding "
        "(nodule, cardiomegaly, perihilar haze)",
    )
    site_style_strength: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="how different the sites look (contrast, noise, frame, markers, AP share); "
        "0 = identical appearance (the DICOM encodings still differ)",
    )

    cue: CueKind | None = Field(
        None,
        description="a local shortcut drawn into the images, correlated with the label (not the site): "
        "tag (a small bright square), text (burned-in 'PORTABLE'), marker (a boxed lead marker 'L'/'R'), "
        "electrodes (three ECG electrodes on the chest) or tube (a nasogastric tube down the chest); "
        "None = no cue (the default set). Combine with bias_strength=0 for hospitals uncorrelated with the label",
    )
    cue_positive_rate: float = Field(
        0.95, ge=0.0, le=1.0, description="share of the positive train/val images of each site that carry the cue"
    )
    cue_negative_rate: float = Field(
        0.05, ge=0.0, le=1.0, description="share of the negative train/val images of each site that carry the cue"
    )
    cue_test_positive_rate: float = Field(
        0.5, ge=0.0, le=1.0, description="share of the positive test images of each site that carry the cue"
    )
    cue_test_negative_rate: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="share of the negative test images of each site that carry the cue (0.5 and 0.5: the cue "
        "is independent of the label in test, and the four label × cue groups are balanced)",
    )
    cue_size: float | None = Field(
        None,
        gt=0.0,
        le=0.5,
        description="size of the cue as a fraction of the image side: the tag's side, the text's and the "
        "marker box's height, an electrode's diameter, the tube's width; None = the kind's default "
        "(docs/cxr.md)",
    )
    cue_jitter: float = Field(
        0.05,
        ge=0.0,
        le=0.25,
        description="largest random offset of the cue from its kind's nominal position, in each direction, "
        "as a fraction of the image side (0 = always the same place)",
    )

    @field_validator("sites")
    @classmethod
    def _check_sites(cls, v: list[str]) -> list[str]:
        if len(v) < 2:
            raise ValueError(f"need at least 2 sites, got {len(v)}")
        if len(set(v)) != len(v):
            raise ValueError(f"site names must be unique, got {v}")
        for s in v:
            if not s or len(s) > 64 or not all(c.isalnum() or c in "_-" for c in s):
                raise ValueError(
                    f"site name {s!r} must be 1-64 characters of letters, digits, '_' or '-'"
                )
        return v

    @field_validator("site_prevalence")
    @classmethod
    def _check_prevalence(cls, v: list[float]) -> list[float]:
        for p in v:
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"every site_prevalence must be in [0, 1], got {p}")
        return v

    @field_validator(*_RANGE_LIMITS)
    @classmethod
    def _check_range(cls, v: tuple[float, float], info: ValidationInfo) -> tuple[float, float]:
        low, high = _RANGE_LIMITS[info.field_name]
        lo, hi = v
        if not low <= lo <= hi <= high:
            raise ValueError(f"{info.field_name} must satisfy {low} <= min <= max <= {high}, got {v}")
        return v

    @field_validator("n_test_patients_per_site")
    @classmethod
    def _check_test_even(cls, v: int) -> int:
        if v % 2:
            raise ValueError(
                f"n_test_patients_per_site must be even (half positive, half negative), got {v}"
            )
        return v

    @model_validator(mode="after")
    def _check_lengths(self) -> SynthConfig:
        if len(self.site_prevalence) != len(self.sites):
            raise ValueError(
                f"site_prevalence has {len(self.site_prevalence)} values but there are "
                f"{len(self.sites)} sites"
            )
        return self

    @model_validator(mode="after")
    def _check_external_names(self) -> SynthConfig:
        clash = sorted(set(self.sites) & set(self.external_site_names()))
        if clash:
            raise ValueError(f"site name(s) {clash} are reserved for the external sites")
        return self

    @model_validator(mode="after")
    def _check_cue_options(self) -> SynthConfig:
        if self.cue is None:
            unused = [f for f in CUE_FIELDS[1:] if getattr(self, f) != type(self).model_fields[f].default]
            if unused:
                raise ValueError(f"{', '.join(unused)} given but no cue is drawn: choose a cue kind (cue / --cue)")
        return self

    def record(self) -> dict[str, Any]:
        """The options as synth_config.json records them: external_sites only when used and the
        cue options only when a cue is drawn, so that a default set's file stays as it was."""
        unused = set() if self.external_sites else {"external_sites"}
        if self.cue is None:
            unused |= set(CUE_FIELDS)
        return self.model_dump(mode="json", exclude=unused or None)

    def external_site_names(self) -> list[str]:
        """Names of the :attr:`external_sites` (test-only sites): ``external_1`` … ``external_K``."""
        return [f"external_{k + 1}" for k in range(self.external_sites)]

    def all_sites(self) -> list[str]:
        """The training sites, then the external (test-only) sites; a site's index in this list
        is its style number (:func:`~cxrdebias.data.synthetic.styles.site_style`)."""
        return [*self.sites, *self.external_site_names()]

    def pool_prevalence(self) -> list[float]:
        """Positive share of each site's train/val patients after applying ``bias_strength``."""
        mean = float(np.mean(self.site_prevalence))
        return [mean + self.bias_strength * (p - mean) for p in self.site_prevalence]


class SplitSiteCount(BaseModel):
    """Counts of one (split, site) cell of the generated set."""

    split: str
    site: str
    patients: int
    images: int
    positive_images: int
    prevalence: float


class CueCount(BaseModel):
    """How many images of one (split, label) carry the cue."""

    split: str
    label: int
    images: int
    with_cue: int


class SynthSummary(BaseModel):
    """What :func:`synthesize` wrote."""

    out_dir: str
    manifest: str
    config_file: str
    n_patients: int
    n_images: int
    counts: list[SplitSiteCount]
    seconds: float
    images_per_second: float
    manifest_sha256: str
    pixel_sha256: str
    cues_file: str | None = None
    cue_counts: list[CueCount] = Field(default_factory=list)

    def table(self) -> str:
        """The counts as a small Markdown table."""
        lines = [
            "| split | site | patients | images | positive | prevalence |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for c in self.counts:
            lines.append(
                f"| {c.split} | {c.site} | {c.patients} | {c.images} | {c.positive_images} "
                f"| {c.prevalence:.3f} |"
            )
        if self.cue_counts:
            lines += ["", "| split | label | images | with the cue | share |", "|---|---:|---:|---:|---:|"]
            for q in self.cue_counts:
                share = q.with_cue / q.images if q.images else 0.0
                lines.append(f"| {q.split} | {q.label} | {q.images} | {q.with_cue} | {share:.3f} |")
        return "\n".join(lines)


