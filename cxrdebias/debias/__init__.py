"""The debiasing library: one module per method, no dataset-specific code.

>>> from cxrdebias.debias import build_method
>>> method = build_method("end", {"alpha": 0.1, "beta": 0.1})
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from cxrdebias.debias.base import Method, MethodOptions, TrainContext
from cxrdebias.debias.blindeye import BlindEye
from cxrdebias.debias.end import EnD, end_regularizer
from cxrdebias.debias.groupdro import GroupDRO
from cxrdebias.debias.lff import LfF
from cxrdebias.debias.lnl import LNL
from cxrdebias.debias.rebias import ReBias
from cxrdebias.debias.unsupervised import PseudoBiasOptions, UnsupervisedBias
from cxrdebias.debias.vanilla import Vanilla
from cxrdebias.errors import ConfigError

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (Vanilla, EnD, LNL, BlindEye, ReBias, GroupDRO, LfF)}


def method_names() -> list[str]:
    return sorted(METHODS)


def register_method(cls: type[Method]) -> type[Method]:
    """Add a method (a :class:`Method` subclass with a unique ``name`` and an ``Options`` model)
    to the registry, so that configs and ``--method`` can name it. Usable as a class decorator;
    code outside the package registers its methods the same way (docs/architecture.md)."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"{cls!r} is not a Method subclass")
    name = getattr(cls, "name", None)
    if not name or not isinstance(name, str):
        raise ValueError(f"{cls.__name__}: a method needs a class attribute `name`")
    old = METHODS.get(name)
    if old is not None and old is not cls:
        raise ValueError(f"method name {name!r} is already registered (by {old.__module__}.{old.__name__})")
    METHODS[name] = cls
    return cls


def unregister_method(name: str) -> None:
    """Remove a method from the registry (tests that register a toy method clean up with this)."""
    METHODS.pop(name, None)


def method_options(name: str, options: dict[str, Any] | None = None) -> MethodOptions:
    """A registered method's validated options, the package defaults filled in for what
    ``options`` leaves out (:class:`ConfigError` naming the method and the bad field if not)."""
    cls = METHODS.get(name)
    if cls is None:
        raise ConfigError(f"unknown method {name!r}; expected one of: {', '.join(method_names())}")
    try:
        return cls.Options(**(options or {}))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'options'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"method {name!r}: {problems}") from None


def build_method(
    name: str, options: dict[str, Any] | None = None, unsupervised: PseudoBiasOptions | dict[str, Any] | None = None
) -> Method:
    """Instantiate a registered method with validated options (:class:`ConfigError` if bad).

    ``unsupervised`` (the config's ``unsupervised`` section): when ``enabled``, the method is
    wrapped in :class:`~cxrdebias.debias.unsupervised.UnsupervisedBias` and fed online
    pseudo-bias labels instead of the dataset's (``--bias auto``).
    """
    opts = method_options(name, options)
    method = METHODS[name](opts)
    if isinstance(unsupervised, dict):
        try:
            unsupervised = PseudoBiasOptions(**unsupervised)
        except ValidationError as exc:
            raise ConfigError(f"unsupervised: {exc.errors()[0]['msg']}") from None
    if unsupervised is not None and unsupervised.enabled:
        return UnsupervisedBias(method, unsupervised)
    return method


__all__ = [
    "METHODS",
    "BlindEye",
    "EnD",
    "GroupDRO",
    "LNL",
    "LfF",
    "Method",
    "MethodOptions",
    "PseudoBiasOptions",
    "ReBias",
    "TrainContext",
    "UnsupervisedBias",
    "Vanilla",
    "build_method",
    "end_regularizer",
    "method_names",
    "method_options",
    "register_method",
    "unregister_method",
]
