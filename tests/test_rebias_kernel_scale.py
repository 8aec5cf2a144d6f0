"""benchmarks/rebias_kernel_scale.py: the kernel statistics it reports (issue 25)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import rebias_kernel_scale as rks  # noqa: E402


def test_kernel_stats_by_hand():
    # three points on a line at 0, 1, 3: squared distances 1, 9, 4 (each twice off the diagonal)
    z = torch.tensor([[0.0], [1.0], [3.0]])
    s = rks.kernel_stats(z, sigma=1.0)
    assert s["feature_norm_mean"] == pytest.approx(4 / 3)
    assert s["sq_distance_median"] == pytest.approx(4.0)
    assert s["rbf_offdiag_mean"] == pytest.approx((math.exp(-0.5) + math.exp(-4.5) + math.exp(-2.0)) / 3)
    # scaling the features by 10 drives the kernel to the identity: the fixed-σ HSIC can be lowered by scale alone
    assert rks.kernel_stats(10 * z, sigma=1.0)["rbf_offdiag_mean"] < 1e-20


def test_probe_reads_a_linear_label_and_refuses_too_few_samples():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(100) % 2
    features = torch.randn(100, 3, generator=g) + 4 * labels[:, None].float()
    assert rks.probe(features, labels) > 0.95
    assert math.isnan(rks.probe(features[:3], torch.tensor([0, 0, 1])))  # one sample of label 1


def test_a_folder_without_finished_runs_is_a_one_line_error(tmp_path):
    (tmp_path / "runs" / "p00" / "seed42" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "p00" / "seed42" / "checkpoints" / "last.pt").write_bytes(b"")  # unfinished: no results.json
    with pytest.raises(SystemExit, match="no finished run"):
        rks.main([str(tmp_path)])


def test_docs_need_the_json_they_are_read_from(tmp_path):
    with pytest.raises(SystemExit, match="--docs needs --out"):
        rks.main([str(tmp_path), "--docs", str(tmp_path / "x.md")])
