"""The ``cxrdebias`` command line (entry point :func:`main`; ``python -m cxrdebias.cli``).

Importing this package registers every command on :data:`app`.
"""

from cxrdebias.cli import benchmark, data, deploy, experiments, sweep  # noqa: F401  (registers the commands)
from cxrdebias.cli.app import app, main

__all__ = ["app", "main"]
