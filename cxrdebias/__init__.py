"""cxrdebias: stop deep image classifiers from learning spurious shortcuts.

Layers (data flows one way): ``data`` → ``models`` → ``debias`` (methods) → ``train`` →
``metrics``/``evaluate`` → ``export`` → ``runtime``/viewer. Every layer is usable on its own.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cxrdebias")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
