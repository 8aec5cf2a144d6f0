"""``python -m cxrdebias.cli`` (what torchrun launches)."""

from cxrdebias.cli import main

main()
