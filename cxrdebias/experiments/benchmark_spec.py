"""The ``cxrdebias benchmark`` spec: the training config, the data, the seeds and the recipes
(:class:`BenchmarkSpec`, read by :func:`load_spec`; the default is ``configs/cxr/benchmark.yaml``).
Running it: :mod:`cxrdebias.experiments.benchmark`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from cxrdebias.config import CONFIGS_DIR, StrictConfig
from cxrdebias.errors import ConfigError

DEFAULT_SPEC = CONFIGS_DIR / "cxr" / "benchmark.yaml"


class RecipeSpec(StrictConfig):
    """One row of the benchmark: how to train (or post-process) a model."""

    label: str | None = Field(None, description="name shown in the table (default: the recipe's key)")
    method: str = Field("vanilla", description="debiasing method (`cxrdebias methods`)")
    bias: Literal["site", "auto", "none"] = Field("site", description="bias labels the method gets")
    data: Literal["biased", "reference"] = Field("biased", description="'reference': the set without the site–label correlation")
    set: list[str] = Field(default_factory=list, description="config overrides KEY=VALUE of this recipe")
    from_: str | None = Field(None, alias="from", description="post-hoc: evaluate this recipe's runs instead of training")
    evaluate: list[str] = Field(default_factory=list, description="extra `cxrdebias evaluate` options (post-hoc recipes)")


class DataSpec(StrictConfig):
    """Where the data comes from."""

    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="synthetic data seeds, or split seeds of a manifest")
    synth: dict[str, Any] = Field(default_factory=dict, description="`SynthConfig` options (synthetic data)")
    manifest: str | None = Field(None, description="a user's manifest instead of synthetic data")
    reference_manifest: str | None = Field(None, description="the reference set for a manifest (optional)")


class BenchmarkSpec(StrictConfig):
    """A benchmark: the training config, the data, the seeds and the recipes."""

    config: str = Field("cxr/synthetic.yaml", description="training config (relative to configs/ or a path)")
    data: DataSpec = Field(default_factory=DataSpec)
    train_seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    baseline: str = "vanilla"
    reference: str | None = "reference"
    default: str | None = Field(None, description="the shipped recipe (`train --bias site` defaults, `make run`)")
    n_boot: int = Field(200, ge=0, description="bootstrap resamples of each cell's report")
    set: list[str] = Field(default_factory=list, description="config overrides of every recipe")
    recipes: dict[str, RecipeSpec]

    @model_validator(mode="after")
    def _check(self) -> BenchmarkSpec:
        for name, r in self.recipes.items():
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"recipe name {name!r}: letters, digits, '_' or '-' only")
            if r.from_ is not None and (r.from_ not in self.recipes or self.recipes[r.from_].from_ is not None):
                raise ValueError(f"recipes.{name}.from: {r.from_!r} is not a trained recipe of this spec")
            if r.data == "reference" and self.data.manifest is not None and self.data.reference_manifest is None:
                raise ValueError(f"recipes.{name}: data 'reference' with a manifest needs data.reference_manifest")
        for key in ("baseline", "reference", "default"):
            name = getattr(self, key)
            if name is not None and name not in self.recipes:
                raise ValueError(f"{key}: {name!r} is not a recipe of this spec")
        return self

    def config_path(self) -> Path:
        p = Path(self.config)
        return p if p.is_absolute() or p.exists() else CONFIGS_DIR / p


def problems(exc: ValidationError, prefix: str = "") -> str:
    """One line of a validation error: ``field: what is wrong`` per problem, unknown keys as
    "unknown option" (as in training configs)."""
    parts = []
    for e in exc.errors():
        loc = prefix + ".".join(map(str, e["loc"]))
        msg = "unknown option" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def read_yaml(path: Path, what: str) -> Any:
    """The YAML tree of ``path``; one-line errors: ``PATH: cannot read WHAT (…)`` or ``PATH: not
    valid YAML (its first line)``."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what} ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None


def load_spec(path: str | Path | None = None, **changes: Any) -> BenchmarkSpec:
    """The spec at ``path`` (default :data:`DEFAULT_SPEC`) with ``changes`` (``None`` = keep):
    ``data_seeds``, ``train_seeds``, ``recipes`` (names to keep, in that order), ``manifest``, ``set``."""
    path = Path(path) if path is not None else DEFAULT_SPEC
    tree = read_yaml(path, "the benchmark spec")
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of benchmark options")
    if changes.get("data_seeds") is not None:
        tree.setdefault("data", {})["seeds"] = list(changes["data_seeds"])
    if changes.get("train_seeds") is not None:
        tree["train_seeds"] = list(changes["train_seeds"])
    if changes.get("manifest") is not None:
        tree.setdefault("data", {})["manifest"] = str(changes["manifest"])
        tree["data"].pop("synth", None)
        tree["reference"] = tree.get("reference", "reference") if tree["data"].get("reference_manifest") else None
        if tree["reference"] is None:
            tree["recipes"] = {k: v for k, v in tree.get("recipes", {}).items() if (v or {}).get("data") != "reference"}
    if changes.get("set"):
        tree["set"] = [*tree.get("set", []), *changes["set"]]
    if changes.get("recipes"):
        known = tree.get("recipes", {})
        unknown = [r for r in changes["recipes"] if r not in known]
        if unknown:
            raise ConfigError(f"--recipes: {', '.join(unknown)} not in {path} (known: {', '.join(known)})")
        # the named recipes, the baseline, the reference, the default and the sources of post-hoc
        # ones, in the spec's order
        wanted = {*changes["recipes"], *(tree.get(k, d) for k, d in (("baseline", "vanilla"), ("reference", "reference"), ("default", None)))}
        wanted |= {(known[r] or {}).get("from") for r in list(wanted) if r in known}
        keep = [r for r in known if r in wanted]
        tree["recipes"] = {k: known[k] for k in keep}
    try:
        return BenchmarkSpec.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {problems(exc)}") from None
