"""OOD fields for the viewer's tests while the model does not produce them: a ``CXRModel.predict``
that adds ``ood_score`` / ``in_distribution`` to its predictions (the fields the OOD output gives),
and a page that serves ``apps/viewer.py`` with it (for the browser test's server)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

#: OOD scores given to flagged / other images
FLAGGED_SCORE, INSIDE_SCORE = 40.0, 2.0


def with_ood(predict: Callable, flagged: Sequence[str]) -> Callable:
    """``predict`` whose predictions carry OOD fields: images whose name contains one of
    ``flagged`` are out of distribution (score :data:`FLAGGED_SCORE`), the others not."""

    def wrapped(self, images, *args, **kwargs):
        res = predict(self, images, *args, **kwargs)
        out = np.array([any(f in name for f in flagged) for name in res.names], dtype=bool)
        res.ood_score = np.where(out, FLAGGED_SCORE, INSIDE_SCORE)
        res.in_distribution = ~out
        return res

    return wrapped


def ood_page(folder: Path, viewer: Path, flagged: Sequence[str]) -> Path:
    """A Streamlit page (written into ``folder``) that runs ``viewer`` with :func:`with_ood`
    patched into ``CXRModel.predict`` (once per server process)."""
    page = folder / "viewer_with_ood.py"
    page.write_text(
        "import runpy, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "from cxrdebias.deploy.runtime import CXRModel\n"
        "from tests.viewer_ood import with_ood\n"
        "if not getattr(CXRModel, 'ood_for_tests', False):\n"
        f"    CXRModel.predict = with_ood(CXRModel.predict, {list(flagged)!r})\n"
        "    CXRModel.ood_for_tests = True\n"
        f"runpy.run_path({str(viewer)!r}, run_name='__main__')\n"
    )
    return page
