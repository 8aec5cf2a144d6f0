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
    map_mass_in_region,
    mass_by_region,
    union_coverage,
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
    # samples of unknown group (< 0) are left out: the same map as without them
    unknown = torch.cat([groups, torch.tensor([-1, -1])])
    x2 = torch.cat([x, 100 * torch.ones(2, 1, 2, 2)])
    m2 = _moments(x2, torch.cat([targets, torch.tensor([1, 1])]), unknown)
    assert torch.allclose(m2.difference_map()[0], diff) and m2.n.sum() == 20


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


def test_mass_in_the_union_of_the_boxes_by_hand():
    # two overlapping boxes over an 8×8 image, a 4×4 map: union = pixels x 2–5, y 2–3 plus x 2–3, y 4–5
    boxes = [(2, 2, 6, 4), (2, 2, 4, 6)]
    cov = union_coverage(boxes, (4, 4), (8, 8))
    expected = np.zeros((4, 4))
    expected[1, 1] = expected[1, 2] = expected[2, 1] = 1.0
    assert np.array_equal(cov, expected)
    assert union_coverage([(1, 1, 2, 2)], (4, 4), (8, 8))[0, 0] == 0.25  # a pixel is a quarter of a cell
    m = np.zeros((4, 4))
    m[1, 2], m[3, 3] = 3.0, 1.0
    assert map_mass_in_region(m, boxes, (8, 8)) == {"mass_in_region": 0.75, "region_area_share": 3 / 16}
    assert map_mass_in_region(m, [], (8, 8))["mass_in_region"] is None


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


def test_grouped_by_the_tag_the_maps_point_at_the_tag(tmp_path, torch_one_thread):
    """The chain from ``cues.csv`` to the scores on a real synthetic set: group the validation
    images by the tag itself (a fixed place, no jitter) — the input map's mass sits in the tag's
    boxes, far above a uniform map's, and the early layer of a (random) DenseNet points there too."""
    import os
    from types import SimpleNamespace

    from cxrdebias.config import ModelConfig
    from cxrdebias.data.cxr.config import CXRDataConfig
    from cxrdebias.data.cxr.dataset import build_cxr
    from cxrdebias.data.synthetic import SynthConfig, synthesize
    from cxrdebias.experiments.bias_views import (
        Grouping,
        cue_report,
        group_map_report,
        sample_paths,
    )
    from cxrdebias.models import build_model

    synthesize(tmp_path, SynthConfig(seed=1, image_size=64, n_train_patients_per_site=2, n_val_patients_per_site=30,
                                     n_test_patients_per_site=2, bias_strength=0.0, cue="tag", cue_jitter=0.0))  # fmt: skip
    data_cfg = CXRDataConfig.model_validate({"manifest": str(tmp_path / "manifest.csv"), "split_protocol": "manifest",
                                             "preprocess": {"image_size": 32}, "workers": 1})  # fmt: skip
    streaming = build_cxr(data_cfg).val
    val = streaming.to_tensor_samples(workers=1)
    # in memory or streamed (data.cache false), the samples name their images as the manifest does
    assert sample_paths(val) == sample_paths(streaming) and sample_paths(val)[0][0].startswith("images/")
    truth = read_cues(tmp_path / "cues.csv")
    tag = np.array([truth[os.path.normpath(p)].cue for p in val.info["paths"]])
    grouping = Grouping(tag, {0: "no tag", 1: "tag"}, "true", "the tag")
    torch.manual_seed(0)
    model = build_model(ModelConfig.model_validate({"arch": "densenet121", "hidden_dim": 8, "pretrained": None}), 2, in_channels=1)
    targets = val.targets.numpy()
    maps = group_map_report(model, val, targets, grouping, "early", ["negative", "positive"])
    cue, boxes = cue_report(SimpleNamespace(data=data_cfg), val, targets, grouping, maps)
    assert cue["n_with_cue"] == len(boxes) == int(tag.sum()) > 10 and cue["agreement"]["nmi"] == pytest.approx(1.0)
    # the tag: 0.06 × 64 = 4 native px, 2 × 2 px of the 32 px input, always at the same place
    assert cue["box_area_share"] == pytest.approx(4 / 32**2) == cue["cue_region_area_share"]
    assert cue["input_map_mass_in_box"] > 0.5
    # DenseNet's first block: stride 4, so the 2 px tag is at most a cell of its 8×8 map and its
    # receptive field spreads it over the neighbours; still many times a uniform map's share
    assert cue["map_mass_in_box"] > 5 * cue["box_area_share"]
    assert maps["json"]["layer_map"]["strongest_region"] == maps["json"]["input_map"]["strongest_region"] == "top right"


# -- end to end: analyze-bias on a tiny synthetic run with a burned-in tag ------------------------
def _cli(*args) -> None:
    import sys

    from cxrdebias.cli import main

    mp = pytest.MonkeyPatch()
    mp.setattr(sys, "argv", ["cxrdebias", *map(str, args)])
    try:
        main()
    except SystemExit as e:
        assert not e.code, f"cxrdebias {' '.join(map(str, args))} exited {e.code}"
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def tag_run(tmp_path_factory):
    """``data synth --cue tag --bias-strength 0`` (64 px, a few patients), then a 1-epoch
    ``--bias auto`` EnD run at 32 px: (run folder, data folder)."""
    from tests.conftest import single_torch_thread

    root = tmp_path_factory.mktemp("tag")
    data = root / "data"
    _cli("data", "synth", "--out", data, "--image-size", 64, "--train-patients", 10, "--val-patients", 8, "--test-patients", 4,
         "--bias-strength", 0, "--cue", "tag", "--cue-size", 0.15)  # fmt: skip
    with single_torch_thread():
        _cli("train", "--data", data / "manifest.csv", "--method", "end", "--bias", "auto", "--epochs", 1, "--image-size", 32,
             "--out", root / "run", "--set", "model.hidden_dim=8", "--set", "train.progress=false", "--set", "train.batch_size=16",
             "--set", "data.workers=1")  # fmt: skip
    return root / "run", data


def _val_cues(run, data) -> tuple[int, int]:
    """(the run's val images cues.csv lists, of them with the tag), from the run's splits.csv."""
    import pandas as pd

    m = pd.read_csv(run / "splits.csv").merge(pd.read_csv(data / "cues.csv"), on="path")
    val = m[m["split"] == "val"]
    return len(val), int(val["cue"].sum())


def test_analyze_bias_shows_the_groups_and_where_they_differ(tag_run, monkeypatch, capsys, torch_one_thread):
    import json

    from PIL import Image

    from tests.conftest import run_cli

    run, data = tag_run
    code, stdout, err = run_cli(["analyze-bias", run], monkeypatch, capsys)
    assert code == 0, err
    out = run / "analysis"
    for name in ("groups.png", "group_map.png", "bottleneck.png", "agreement.json", "agreement.md"):
        assert str(out / name) in err  # listed in the command's output
    assert Image.open(out / "groups.png").size[0] >= 8 * 32 and Image.open(out / "group_map.png").format == "PNG"
    report = json.loads((out / "agreement.json").read_text())
    # a --bias auto run shows its own labeller's pseudo groups; every val image is in one group of its class
    groups = report["groups"]
    assert groups["kind"] == "pseudo" and "the run's attractor labeller" in groups["source"]
    assert sum(e["n"] for e in groups["counts"]) == report["split_agreement"]["n"]
    assert {e["class"] for e in groups["counts"]} <= {"negative", "positive"} and all(e["name"].startswith("p") for e in groups["counts"])
    # the map: DenseNet's first block (stride 4: 8×8 at 32 px) and the input pixels (32×32)
    m = report["map"]
    assert m["statistic"] == "epsilon_squared" and m["layer"] == "features.pool0"
    if "reason" not in m:  # the labeller may put a whole class in one group after one epoch
        assert m["layer_map"]["grid"] == [8, 8] and m["input_map"]["grid"] == [32, 32]
        assert sum(m["layer_map"]["mass_by_region"].values()) == pytest.approx(1.0, abs=1e-3)
    # scored against cues.csv
    cue = report["cue"]
    n_known, n_tag = _val_cues(run, data)
    assert cue["kind"] == "tag" and (cue["n_known"], cue["n_with_cue"]) == (n_known, n_tag) and n_tag > 0
    assert cue["agreement"]["n"] == n_known and 0 <= cue["agreement"]["nmi"] <= 1 and 0 <= cue["agreement"]["matched_accuracy"] <= 1
    for key in ("map_mass_in_box", "input_map_mass_in_box", "map_mass_in_cue_region", "input_map_mass_in_cue_region"):
        assert key in cue and (cue[key] is None or 0 <= cue[key] <= 1)
    assert cue["box_area_share"] <= cue["cue_region_area_share"] < 1
    # a tag of 0.15 × 64 = 10 native px is 5 × 5 px of the 32 px input (up to jitter at the border)
    assert cue["box_area_share"] == pytest.approx(25 / 32**2, rel=0.25)
    md = (out / "agreement.md").read_text()
    assert "## What the groups are" in md and "| mass in each image's cue box |" in md and "groups vs cue NMI" in md
    assert "## What the groups are" in stdout

    # the true groups of the same run (the hospital): said so
    code, stdout, err = run_cli(["analyze-bias", run, "--groups", "true", "--force"], monkeypatch, capsys)
    assert code == 0, err
    report = json.loads((out / "agreement.json").read_text())
    assert report["groups"]["kind"] == "true" and report["groups"]["source"] == "true bias labels (site: hospital_a, hospital_b)"
    assert {e["name"] for e in report["groups"]["counts"]} == {"hospital_a", "hospital_b"}
    assert "true bias labels" in stdout


def test_analyze_bias_without_cues_csv_says_why(tag_run, tmp_path, monkeypatch, capsys, torch_one_thread):
    import json
    import shutil

    from tests.conftest import run_cli

    run, data = tag_run
    cues = data / "cues.csv"
    saved = tmp_path / "cues.csv"
    shutil.move(cues, saved)
    try:
        code, stdout, err = run_cli(["analyze-bias", run, "--out", tmp_path / "an", "--per-group", 2], monkeypatch, capsys)
    finally:
        shutil.move(saved, cues)
    assert code == 0, err
    report = json.loads((tmp_path / "an" / "agreement.json").read_text())
    assert set(report["cue"]) == {"reason"} and "no cues.csv beside the manifest" in report["cue"]["reason"]
    assert (tmp_path / "an" / "groups.png").is_file() and (tmp_path / "an" / "group_map.png").is_file()
    assert "Cue: not scored (no cues.csv" in stdout
    # bad options: one line each
    for args, words in ((["--groups", "site"], "--groups 'site': expected one of auto, pseudo, true"),
                        (["--per-group", 0], "--per-group 0"), (["--map-layer", "nope"], "--map-layer='nope'")):
        code, _, err = run_cli(["analyze-bias", run, "--out", tmp_path / "bad", "--force", *args], monkeypatch, capsys)
        assert code == 2 and words in err and "Traceback" not in err
