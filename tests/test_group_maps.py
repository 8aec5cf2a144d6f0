"""What ``cxrdebias analyze-bias`` shows of the groups it found (issue 23): the ε² map of where the
groups differ, its mass inside known boxes, the cue ground truth it is scored with."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import f_oneway

from cxrdebias.data.preprocess import PreprocessSpec, resize_geometry
from cxrdebias.data.synthetic.cues import read_cues
from cxrdebias.debias.unsupervised import (
    GroupMoments,
    box_coverage,
    collect_group_moments,
    epsilon_squared,
    map_mass_in_box,
    mass_by_region,
)
from cxrdebias.errors import DataError


def _moments(x: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor, batch: int = 7) -> GroupMoments:
    m = GroupMoments(targets, groups)
    for start in range(0, len(x), batch):  # batch by batch, as a loader feeds it
        idx = torch.arange(start, min(start + batch, len(x)))
        m.add(x[idx], idx)
    return m


# -- the statistic ------------------------------------------------------------------------------
def test_epsilon_squared_equals_the_one_way_anova_of_scipy():
    rng = np.random.default_rng(0)
    sizes = (5, 9, 14)
    samples = [rng.normal(loc=mu, scale=1.0, size=(k, 3, 2)) for mu, k in zip((0.0, 0.5, 2.0), sizes, strict=True)]
    n = torch.tensor(sizes, dtype=torch.float64)
    sums = torch.tensor(np.stack([s.sum(0) for s in samples]))
    sumsq = torch.tensor(np.stack([(s**2).sum(0) for s in samples]))
    eps = epsilon_squared(n, sums, sumsq).numpy()
    f = f_oneway(*samples, axis=0).statistic  # 3×2 F statistics
    g, total = len(sizes), sum(sizes)
    assert eps == pytest.approx((g - 1) * (f - 1) / ((g - 1) * f + total - g), rel=1e-9)


def test_epsilon_squared_edge_cases():
    one = epsilon_squared(torch.tensor([4.0]), torch.ones(1, 2), torch.ones(1, 2))
    assert one is None  # a single group: nothing to compare
    assert epsilon_squared(torch.tensor([1.0, 1.0]), torch.ones(2, 2), torch.ones(2, 2)) is None  # N = G
    # a constant element: 0, not NaN; a perfect split with no spread inside the groups: 1
    n = torch.tensor([3.0, 3.0])
    sums = torch.tensor([[2.0 * 3, 0.0], [2.0 * 3, 3.0]])
    sumsq = torch.tensor([[4.0 * 3, 0.0], [4.0 * 3, 3.0]])
    assert epsilon_squared(n, sums, sumsq).tolist() == [0.0, 1.0]
    # an empty group is left out
    assert epsilon_squared(torch.tensor([3.0, 0.0]), torch.ones(2, 1), torch.ones(2, 1)) is None


def test_the_map_finds_the_box_where_two_groups_differ_within_each_class():
    """Hand-built features: noise everywhere, the classes differ everywhere (by 5 — the disease),
    group 1 has +3 on two of four channels in rows 2–4, columns 5–7 of an 8×8 grid — the cue. The
    groups go with the class (90%), as a shortcut does. Within-class ε² puts the mass in the box."""
    g = torch.Generator().manual_seed(0)
    n = 400
    targets = torch.arange(n) % 2
    groups = torch.where(torch.rand(n, generator=g) < 0.9, targets, 1 - targets)
    x = torch.randn(n, 4, 8, 8, generator=g) + 5.0 * targets.view(-1, 1, 1, 1)
    x[:, :2, 2:5, 5:8] += 3.0 * groups.view(-1, 1, 1, 1)
    m = _moments(x, targets, groups)
    diff, used = m.difference_map()
    assert used == [0, 1] and diff.shape == (8, 8)
    box = (5, 2, 8, 5)  # x0, y0, x1, y1 in grid units: columns 5–7, rows 2–4
    scored = map_mass_in_box(diff.numpy(), [box], (8, 8))
    assert scored["mass_in_box"] > 0.95 and scored["box_area_share"] == pytest.approx(9 / 64)
    assert int(diff.argmax()) // 8 in (2, 3, 4) and int(diff.argmax()) % 8 in (5, 6, 7)
    regions = mass_by_region(diff.numpy())
    # the box (rows 2–4, columns 5–7) touches four ninths (edges at 2⅔ and 5⅓); most of it is middle right
    assert max(regions, key=regions.get) == "middle right" and sum(regions.values()) == pytest.approx(1.0)
    assert sum(regions[k] for k in ("top centre", "top right", "middle centre", "middle right")) > 0.95
    # pooled over the classes instead, the class difference (everywhere) would swamp the box
    pooled = _moments(x, torch.zeros(n, dtype=torch.long), groups).difference_map()[0]
    assert map_mass_in_box(pooled.numpy(), [box], (8, 8))["mass_in_box"] < 0.5
    # the mean map is the plain mean of every sample
    assert torch.allclose(m.mean(), x.double().mean(0))


def test_a_class_with_one_group_is_left_out_of_the_map():
    x = torch.randn(20, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([0] * 10 + [1] * 10)
    groups = torch.tensor([0] * 10 + [0] * 5 + [1] * 5)
    diff, used = _moments(x, targets, groups).difference_map()
    assert used == [1] and diff.shape == (2, 2)
    assert _moments(x, targets, torch.zeros(20, dtype=torch.long)).difference_map() == (None, [])


# -- map mass in a box ---------------------------------------------------------------------------
def test_box_coverage_and_map_mass_in_box_by_hand():
    # a 4×4 map over an 8×8 image: every cell is 2×2 pixels
    assert box_coverage((2, 2, 4, 4), (4, 4), (8, 8))[1, 1] == 1.0  # exactly cell (1, 1)
    quarter = box_coverage((1, 1, 3, 3), (4, 4), (8, 8))
    assert quarter[:2, :2].tolist() == [[0.25, 0.25], [0.25, 0.25]] and quarter.sum() == 1.0
    m = np.zeros((4, 4))
    m[1, 1], m[3, 3], m[0, 3] = 1.0, 1.0, -5.0  # negative values are not mass
    assert map_mass_in_box(m, [(2, 2, 4, 4)], (8, 8)) == {"mass_in_box": 0.5, "box_area_share": 1 / 16, "n_boxes": 1}
    # averaged over the boxes (one per image): 0.5 and 0.25·1/2
    two = map_mass_in_box(m, [(2, 2, 4, 4), (1, 1, 3, 3)], (8, 8))
    assert two["mass_in_box"] == pytest.approx((0.5 + 0.125) / 2) and two["n_boxes"] == 2
    assert map_mass_in_box(m, [], (8, 8))["mass_in_box"] is None
    assert map_mass_in_box(-np.ones((4, 4)), [(0, 0, 2, 2)], (8, 8))["mass_in_box"] is None  # no positive mass
    assert mass_by_region(np.zeros((3, 3))) is None


def test_a_cue_box_follows_the_preprocessing_into_the_model_input():
    # letterbox a 100 (high) × 200 (wide) image into 50 px: scale 0.25, 25 px of picture, 12 px of padding on top
    geo = resize_geometry((100, 200), PreprocessSpec(image_size=50, resize="letterbox"))
    assert geo.map_box((20, 40, 60, 80)) == (5.0, 22.0, 15.0, 32.0)
    # centre crop: the source's outer 50 columns on each side are cut off; a box there is clipped
    crop = resize_geometry((100, 200), PreprocessSpec(image_size=50, resize="center_crop"))
    assert crop.map_box((0, 0, 60, 100)) == (0.0, 0.0, 5.0, 50.0)


# -- the ground truth file -----------------------------------------------------------------------
def test_read_cues_reads_the_boxes_and_refuses_a_bad_row(tmp_path):
    f = tmp_path / "cues.csv"
    f.write_text("path,cue,kind,x0,y0,x1,y1\nimages/a/./x.dcm,1,tag,3,4,9,10\nimages/b.dcm,0,tag,,,,\n")
    cues = read_cues(f)
    assert cues["images/a/x.dcm"].box == (3, 4, 9, 10) and cues["images/b.dcm"].cue == 0 and cues["images/b.dcm"].box is None
    for body, words in (
        ("images/x.dcm,2,tag,,,,", "cue='2', expected 0 or 1"),
        ("images/x.dcm,1,tag,3,4,,", "is not four integers"),
        ("images/x.dcm,1,tag,9,4,3,10", "needs 0 <= x0 < x1"),
        ("images/x.dcm,0,tag,,,,\nimages/x.dcm,0,tag,,,,", "listed twice"),
    ):
        f.write_text("path,cue,kind,x0,y0,x1,y1\n" + body + "\n")
        with pytest.raises(DataError, match=words) as info:
            read_cues(f)
        assert "cues.csv: line " in str(info.value) and "\n" not in str(info.value)
    f.write_text("path,cue\nx,1\n")
    with pytest.raises(DataError, match="missing column"):
        read_cues(f)


# -- the pass over a model ------------------------------------------------------------------------
def test_collect_group_moments_reads_the_layer_and_the_input_in_one_pass():
    from torch import nn

    class Net(nn.Module):
        early_layer = "stem"

        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 3, 3, padding=1)
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            return self.head(self.stem(x).mean(dim=(2, 3)))

    net = Net().train()
    x = torch.randn(10, 1, 6, 6)
    targets, groups = torch.arange(10) % 2, torch.arange(10) // 5
    loader = [{"image": x[:6], "index": torch.arange(6)}, {"image": x[6:], "index": torch.arange(6, 10)}]
    name, feats, inputs = collect_group_moments(net, loader, targets, groups)
    assert name == "stem" and net.training  # the mode is restored
    assert feats.sums.shape == (4, 3, 6, 6) and inputs.sums.shape == (4, 1, 6, 6)
    assert torch.allclose(inputs.mean(), x.double().mean(0))
    with torch.no_grad():
        assert torch.allclose(feats.mean(), net.stem(x).double().mean(0), atol=1e-6)
    from cxrdebias.errors import ConfigError

    with pytest.raises(ConfigError, match="--map-layer='nope'"):
        collect_group_moments(net, loader, targets, groups, "nope")
    with pytest.raises(ValueError, match="expected N×C×H×W"):
        collect_group_moments(net, loader, targets, groups, "head")
