"""The whole experiment config: YAML files in ``configs/`` plus command-line overrides.

A config is validated as a whole before anything runs; a wrong key or value is a
:class:`ConfigError` naming the field (``train.epochs: Input should be greater than 0``).
The *resolved* config (every default filled in) is saved in each run folder.

The ``data:`` section is validated by the data config of its ``kind``, looked up in the
protocol registry (:mod:`cxrdebias.experiments.registry`), so a dataset registered from outside
the package is configured like a built-in one. A ``data:`` section without ``kind`` is Biased
MNIST (the configs of the first release).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, SerializeAsAny, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from cxrdebias.config import (
    CONFIGS_DIR,
    MethodConfig,
    ModelConfig,
    StrictConfig,
    TrainConfig,
    merge_tree,
    parse_override,
    set_in,
)
from cxrdebias.debias.unsupervised.options import PseudoBiasOptions
from cxrdebias.errors import ConfigError
from cxrdebias.experiments import protocols

#: the kind of a ``data:`` section that does not name one
DEFAULT_DATA_KIND = "biased_mnist"


def _default_data() -> BaseModel:
    return protocols.get(DEFAULT_DATA_KIND).config()


class ExperimentConfig(StrictConfig):
    name: str = "experiment"
    seed: int = 42
    data: SerializeAsAny[BaseModel] = Field(
        default_factory=_default_data,
        description="the dataset: `kind` picks its registered data config (cxrdebias.experiments.registry)",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    unsupervised: PseudoBiasOptions = Field(
        default_factory=PseudoBiasOptions,
        description="online pseudo-bias labels instead of the dataset's (--bias auto; docs/unsupervised.md)",
    )

    @field_validator("data", mode="wrap")
    @classmethod
    def _data_of_its_kind(cls, value: Any, handler: Any) -> Any:
        if isinstance(value, BaseModel):  # a data config object: keep it if it is of its kind's class
            spec = protocols.get(getattr(value, "kind", ""))
            if isinstance(value, spec.config):
                return value
            value = value.model_dump(mode="json")
        if not isinstance(value, dict):
            raise PydanticCustomError("data_section", "expected a mapping with a `kind`, got {got}", {"got": type(value).__name__})
        kind = value.get("kind", DEFAULT_DATA_KIND)
        try:
            spec = protocols.get(kind)
        except ConfigError:
            known = ", ".join(protocols.kinds())
            raise PydanticCustomError("data_kind", "unknown dataset kind '{kind}' (known: {known})", {"kind": kind, "known": known}) from None
        return spec.config.model_validate({**value, "kind": kind})


def _format_validation_error(exc: ValidationError, source: str) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown option"
        parts.append(f"{loc}: {msg}" + (f" (got {e['input']!r})" if e["type"] != "extra_forbidden" and not isinstance(e.get("input"), dict) else ""))
    return f"{source}: " + "; ".join(parts)


def _config_tree(path: str | Path | None, overrides: list[str] | None, base: dict[str, Any] | None) -> tuple[dict[str, Any], str]:
    """The unvalidated tree of ``base`` ← YAML file ← overrides, and the name errors are reported under."""
    tree: dict[str, Any] = copy.deepcopy(base) if base else {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
        merge_tree(tree, loaded)
    for item in overrides or []:
        keys, value = parse_override(item)
        set_in(tree, keys, value)
    return tree, source


def _validate(tree: dict[str, Any], source: str) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> ExperimentConfig:
    """Defaults ← ``base`` ← YAML file at ``path`` ← ``overrides`` (``KEY=VALUE`` strings)."""
    return _validate(*_config_tree(path, overrides, base))


def build_config(
    path: str | Path | None,
    *,
    default_path: str | Path | None = None,
    method: str | None = None,
    method_options: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
) -> ExperimentConfig:
    """What a command line asks for: config file (or ``default_path``) ← ``--set`` overrides ←
    named options. The file with its overrides is validated first, then the whole.

    ``method`` (``--method``) replaces the whole method section when it names another method
    (options of the file's method do not carry over, those given with ``--set method.KEY=...``
    do, and are validated by the new method); ``method_options`` (``--alpha`` …) are
    then set in it, and ``options`` (dotted key → value; None = not given) last.
    """
    tree, source = _config_tree(path or default_path, overrides, None)
    _validate(tree, source)  # the file and --set on their own: a bad value there is an error even if an option replaces it
    method_section = tree.get("method") if isinstance(tree.get("method"), dict) else {}
    if method is not None and method != method_section.get("name", "vanilla"):
        # options of the file's method do not carry over, but those the user set with --set do:
        # the new method validates them (an option it does not take is an error, never ignored)
        explicit = {keys[1] for keys, _ in map(parse_override, overrides or []) if keys[0] == "method" and len(keys) > 1}
        tree["method"] = {**{k: method_section[k] for k in sorted(explicit - {"name"}) if k in method_section}, "name": method}
    given = {k: v for k, v in (method_options or {}).items() if v is not None}
    if given and (tree.get("method") or {}).get("name", "vanilla") == "vanilla":
        raise ConfigError(f"--{'/--'.join(given)} only apply to methods that take them, not 'vanilla'")
    for key, value in given.items():
        set_in(tree, ["method", key], value)
    for key, value in (options or {}).items():
        if value is not None:
            set_in(tree, key.split("."), str(value) if isinstance(value, Path) else value)
    return _validate(tree, source)


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def check_resumable(saved: dict[str, Any], requested: ExperimentConfig, where: str) -> None:
    """Refuse to resume a run with other options than it was started with.

    The saved config is re-validated first, so options added to cxrdebias since the run
    started (with their defaults) do not count as a difference.
    """
    from cxrdebias.errors import CheckpointError

    try:
        normalised = load_config(None, None, base=saved).model_dump(mode="json")
    except ConfigError as exc:
        raise CheckpointError(f"{where}: the saved config is no longer valid ({exc})") from None
    current = requested.model_dump(mode="json")
    if normalised != current:
        diff = sorted(_diff_keys(normalised, current))
        raise CheckpointError(f"{where}: saved config differs from the requested one ({', '.join(diff[:5])}); resume with the same options")


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in set(a) | set(b):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def shipped_method_settings(configs_dir: str | Path = CONFIGS_DIR) -> list[tuple[str, list[str], str, dict[str, Any]]]:
    """The method settings of the shipped configs (``configs/<dataset>/*.yaml``, what ``train`` and
    ``reproduce`` start from): one ``(dataset, config files, method, options)`` per dataset and
    distinct setting, the options resolved with the method's defaults. Empty when the configs are
    not there (an installed package without its source checkout)."""
    from cxrdebias.debias import METHODS

    found: dict[tuple[str, str, str], list[str]] = {}
    for path in sorted(Path(configs_dir).glob("*/*.yaml")):
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if "recipes" in tree:
            continue  # a benchmark spec (`cxrdebias benchmark`), not a training config
        section = tree.get("method") or {}
        name = section.get("name", "vanilla")
        options = METHODS[name].Options(**{k: v for k, v in section.items() if k != "name"}).model_dump(mode="json")
        key = (path.parent.name, name, yaml.safe_dump(options, sort_keys=True))
        found.setdefault(key, []).append(path.name)
    return [(dataset, files, name, yaml.safe_load(options)) for (dataset, name, options), files in found.items()]
