"""The built-in protocols (one module each registers its ``data.kind``) and the catalogue.

Import this package, not :mod:`cxrdebias.experiments.registry`, to look a kind up: importing
it registers the built-in kinds. Adding a built-in dataset is one import line below.
"""

from cxrdebias.experiments.protocols import biased_mnist, cxr, photos  # noqa: F401  (registration)
from cxrdebias.experiments.registry import ProtocolSpec, get, kinds, protocol, register, unregister

__all__ = ["ProtocolSpec", "get", "kinds", "protocol", "register", "unregister"]
