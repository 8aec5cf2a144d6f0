"""Options of ``--bias auto``: the ``unsupervised`` section of a run config.

Kept free of torch so that :mod:`cxrdebias.config` can validate a config without building
anything; the meaning of each option is in the package docstring of
:mod:`cxrdebias.debias.unsupervised` and in docs/unsupervised.md.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

LABELLERS: tuple[str, ...] = ("attractor", "cluster", "gce_head", "errors")
SOURCES: tuple[str, ...] = ("live", "frozen", "ema")


class PseudoBiasOptions(BaseModel):
    """The ``unsupervised`` section of a run config (``--bias auto`` sets ``enabled``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(False, description="replace the dataset's bias labels by online pseudo-bias labels")
    labeller: Literal["attractor", "cluster", "gce_head", "errors"] = "attractor"
    warmup_steps: int = Field(10, ge=0, description="optimiser steps before the labeller's pseudo labels are used")
    warmup_labels: Literal["none", "target"] = Field(
        "target",
        description="during warm-up: 'none' = plain CE; 'target' = the method already runs, with pseudo-bias = target "
        "(every sample assumed bias-aligned, the shortcut prior)",
    )
    refresh_every: int = Field(10, ge=1, description="steps between snapshots (centroids, clusters, head weights)")
    source: Literal["live", "frozen", "ema"] = Field(
        "live", description="live statistics; frozen at the end of warm-up; or per-sample EMA of assignments"
    )
    reweight: float = Field(1.0, ge=1, description="CE weight of likely bias-conflicting samples (1 = off)")
    momentum: float = Field(0.9, ge=0, lt=1, description="attractor: EMA weight of the past centroid")
    ema: float = Field(0.7, ge=0, lt=1, description="source=ema: EMA weight of a sample's past soft assignment")
    temperature: float = Field(0.1, gt=0, description="soft assignment softmax(cos/τ) (attractor, cluster)")
    k: int | Literal["auto"] = Field(2, description="cluster: clusters per class, or 'auto' (silhouette)")
    k_max: int = Field(4, ge=2, description="cluster, k=auto: largest k tried")
    min_silhouette: float = Field(0.1, description="cluster, k=auto: below this best silhouette a class keeps 1 cluster")
    bank_size: int = Field(4096, ge=2, description="cluster: memory bank of recent features")
    kmeans_iters: int = Field(20, ge=1)
    easy_threshold: float = Field(
        0.5, gt=0, le=1, description="errors: a sample is bias-aligned when the EMA of its correct predictions is at least this"
    )
    q: float = Field(0.7, gt=0, le=1, description="gce_head: GCE exponent")
    min_aligned: float = Field(
        0.7,
        ge=0,
        le=1,
        description="shortcut gate: the method gets the pseudo labels only while the running share of samples the "
        "labeller calls bias-aligned is at least this (0 = always); below it there is no class-correlated bias to "
        "remove and the step is plain CE",
    )
    gate_momentum: float = Field(0.9, ge=0, lt=1, description="EMA weight of the past aligned share (per step)")
    layer_pool: Literal["mean", "max"] = Field("mean", description="how the tapped layer is pooled over space")
    layer_grid: int = Field(
        1, ge=1, le=8, description="pool the tapped layer over a g×g grid of regions (features = channels·g²): keeps where a cue is"
    )
    layer: str | None = Field(
        "early",
        description="features the labeller reads: null = the bottleneck; 'early' = the model's first block; "
        "a module name of the model (e.g. extractor.2) = that module's output, averaged over space (docs/unsupervised.md)",
    )

    @model_validator(mode="before")
    @classmethod
    def _retired_options(cls, data: Any) -> Any:
        """``max_conflict_accuracy`` existed for a few commits (a gate condition measured and
        dropped, docs/unsupervised.md); configs saved then carry it at 1.0, which meant "off" —
        today's behaviour — and still load. Any other value asked for a gate that no longer exists."""
        if isinstance(data, dict) and "max_conflict_accuracy" in data:
            if data["max_conflict_accuracy"] != 1.0:
                raise ValueError(
                    f"max_conflict_accuracy={data['max_conflict_accuracy']!r}: this gate condition was removed "
                    "(measured, it did not separate shortcut from shortcut-free runs; docs/unsupervised.md)"
                )
            data = {k: v for k, v in data.items() if k != "max_conflict_accuracy"}
        return data

    @field_validator("k")
    @classmethod
    def _k_positive(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 1:
            raise ValueError("k must be >= 1 or 'auto'")
        return v


__all__ = ["LABELLERS", "SOURCES", "PseudoBiasOptions"]
