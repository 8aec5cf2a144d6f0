"""The counts docs/reproduction.md states about the MNIST-15k training set, computed with the
repo's own Biased-MNIST code (``python benchmarks/doc_claims.py`` prints them with the rest)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.doc_claims import conflicting_counts  # noqa: E402


def test_bias_conflicting_training_digits_of_mnist15k(mnist15k):
    counts = conflicting_counts(rhos=(0.997, 0.990), seeds=(42, 44), root=mnist15k)
    # per class n_c − int(ρ·n_c), summed over the ten classes of the 12,000 training digits
    for seed in (42, 44):
        assert counts[(0.997, seed)] == {"train": 12000, "conflicting": 40, "groups": 50}
        assert counts[(0.990, seed)] == {"train": 12000, "conflicting": 125, "groups": 100}
    protocol = (REPO / "docs" / "reproduction.md").read_text(encoding="utf-8")
    assert "| bias-conflicting training digits at ρ = 0.997 | ≈ 180 | **40** (125 at ρ = 0.990) |" in protocol
