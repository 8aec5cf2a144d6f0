"""CelebA and IMDB Face: on-disk formats, split/group construction, labels, errors, and both
protocols end to end on tiny fixture folders (16×16 JPEGs, 1 epoch)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxrdebias.cli import main
from cxrdebias.data.celeba import CelebAConfig, build_celeba, read_attributes, read_partition
from cxrdebias.data.imdb_face import (
    AGE_BIN_NAMES,
    IMDBFaceConfig,
    age_bins,
    age_groups,
    build_imdb_face,
    read_split_csv,
)
from cxrdebias.data.photos import IMAGENET_MEAN, IMAGENET_STD, group_counts, validation_split
from cxrdebias.errors import ConfigError, DataError
from cxrdebias.evaluation.metrics import group_accuracy
from cxrdebias.experiments.config import load_config
from cxrdebias.experiments.protocols.photos import build_celeba_protocol as celeba_protocol
from cxrdebias.experiments.protocols.photos import build_imdb_face_protocol as imdb_face_protocol

ATTRIBUTES = ["5_o_Clock_Shadow", "Blond_Hair", "Heavy_Makeup", "Male", "Young"]

# (partition, blond, male, count): train groups 10/5/8/12, valid groups 6/3/4/7, test 2 images
CELEBA_GROUPS = [
    (0, 1, 0, 10), (0, 1, 1, 5), (0, 0, 0, 8), (0, 0, 1, 12),
    (1, 1, 0, 6), (1, 1, 1, 3), (1, 0, 0, 4), (1, 0, 1, 7),
    (2, 1, 0, 1), (2, 0, 1, 1),
]  # fmt: skip


def heavy_makeup(n: int, male: int) -> int:
    """The fixture's Heavy_Makeup of image ``n``: "not male", except every third image."""
    return male if n % 3 == 0 else 1 - male


def _jpeg(path: Path, seed: int, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


def make_celeba(root: Path) -> Path:
    """A torchvision-layout CelebA folder: ROOT/celeba/{list_attr_celeba.txt, list_eval_partition.txt, img_align_celeba/}."""
    folder = root / "celeba"
    rows, parts = [], []
    n = 0
    for partition, blond, male, count in CELEBA_GROUPS:
        for _ in range(count):
            n += 1
            name = f"{n:06d}.jpg"
            values = {"5_o_Clock_Shadow": male, "Blond_Hair": blond, "Heavy_Makeup": heavy_makeup(n, male), "Male": male, "Young": n % 2}
            rows.append(name + " " + " ".join(f"{1 if values[a] else -1:>2}" for a in ATTRIBUTES))
            parts.append(f"{name} {partition}")
            _jpeg(folder / "img_align_celeba" / name, n)
    (folder / "list_attr_celeba.txt").write_text(f"{n}\n" + " ".join(ATTRIBUTES) + " \n" + "\n".join(rows) + "\n")
    (folder / "list_eval_partition.txt").write_text("\n".join(parts) + "\n")
    return root


# eb1: women 0–29 + men 40+; eb2: women 40+ + men 0–29; test: all ages (30–39 included)
IMDB_ROWS = {
    "eb1": [(18, "F"), (22, "female"), (25, "0"), (29, "f"), (40, "M"), (45, "1"), (61, "male"), (75, "m")],
    "eb2": [(41, "F"), (55, "0"), (70, "F"), (19, "M"), (24, "1"), (29, "M")],
    "test": [(19, "F"), (20, "M"), (30, "F"), (34, "M"), (35, "F"), (39, "M"), (40, "F"), (65, "M"), (69, "F"), (70, "M")],
}


def make_imdb(root: Path) -> Path:
    """A folder with eb1.csv, eb2.csv, test.csv (path,age,gender) and the JPEGs under imgs/."""
    for split, rows in IMDB_ROWS.items():
        lines = ["path,age,gender,name"]
        for i, (age, gender) in enumerate(rows):
            rel = f"imgs/{split}_{i}.jpg"
            _jpeg(root / rel, hash((split, i)) % 1000)
            lines.append(f"{rel},{age},{gender},person {i}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def celeba_root(tmp_path) -> Path:
    return make_celeba(tmp_path / "data")


@pytest.fixture
def imdb_root(tmp_path) -> Path:
    return make_imdb(tmp_path / "imdb")


# -- CelebA: files and splits ---------------------------------------------------------------------
def test_attribute_and_partition_files_are_parsed(celeba_root):
    attrs = read_attributes(celeba_root / "celeba" / "list_attr_celeba.txt")
    assert attrs.names == ATTRIBUTES and len(attrs.files) == 57 and attrs.files[0] == "000001.jpg"
    assert attrs.values.shape == (57, 5) and set(np.unique(attrs.values)) == {0, 1}
    assert attrs.values[:10, 1].tolist() == [1] * 10 and attrs.values[:10, 3].tolist() == [0] * 10
    partition = read_partition(celeba_root / "celeba" / "list_eval_partition.txt", attrs.files)
    assert np.bincount(partition).tolist() == [35, 20, 2]


def test_celeba_splits_have_the_published_group_structure(celeba_root):
    splits = build_celeba(CelebAConfig(root=str(celeba_root), image_size=32))
    # Blond_Hair goes with women, so bias 1 = "not Male": (t=1,b=1) are blond women
    assert splits.info["bias_inverted"] and splits.info["bias_names"] == ["Male", "not Male"]
    # validation: int(0.2 × smallest train group (5)) = 1 per group, removed from training
    assert splits.val.group_counts() == {"t=0,b=0": 1, "t=0,b=1": 1, "t=1,b=0": 1, "t=1,b=1": 1}
    assert splits.train.group_counts() == {"t=0,b=0": 11, "t=0,b=1": 7, "t=1,b=0": 4, "t=1,b=1": 9}
    assert not set(splits.val.rows.tolist()) & set(splits.train.rows.tolist())
    # unbiased test: the valid partition balanced to its smallest group (3 blond men)
    unbiased = splits.tests["unbiased"]
    assert unbiased.group_counts() == {"t=0,b=0": 3, "t=0,b=1": 3, "t=1,b=0": 3, "t=1,b=1": 3}
    assert set(unbiased.rows.tolist()) <= set(range(35, 55))  # file rows 36–55: the valid partition
    # bias-conflicting = target ≠ bias: blond men and non-blond women
    conflicting = unbiased.targets != unbiased.biases
    assert int(conflicting.sum()) == 6
    male = 1 - unbiased.biases
    assert torch.equal(unbiased.targets[conflicting], male[conflicting])
    assert set(splits.tests) == {"unbiased"} and splits.num_classes == splits.num_biases == 2


def test_celeba_splits_are_seeded(celeba_root):
    a = build_celeba(CelebAConfig(root=str(celeba_root)))
    b = build_celeba(CelebAConfig(root=str(celeba_root)))
    c = build_celeba(CelebAConfig(root=str(celeba_root), split_seed=7))
    assert torch.equal(a.tests["unbiased"].rows, b.tests["unbiased"].rows) and a.data_hash() == b.data_hash()
    assert a.data_hash() != c.data_hash()


@pytest.mark.parametrize(("mode", "inverted"), [("auto", True), ("attribute", False), ("inverted", True)])
def test_bias_label_encoding(celeba_root, mode, inverted):
    splits = build_celeba(CelebAConfig(root=str(celeba_root), bias_label=mode, val_fraction=0))
    assert splits.val is None and len(splits.train) == 35
    male = torch.tensor([m for p, _, m, c in CELEBA_GROUPS if p == 0 for _ in range(c)])
    expected = 1 - male if inverted else male
    assert torch.equal(splits.train.biases, expected)


def test_celeba_images_are_rgb_imagenet_normalised_and_flipped_only_in_training(celeba_root):
    splits = build_celeba(CelebAConfig(root=str(celeba_root), image_size=24))
    img = Image.open(splits.tests["unbiased"].paths[0]).convert("RGB").resize((24, 24), Image.BILINEAR)
    expected = (torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    sample = splits.tests["unbiased"][0]
    assert sample["image"].shape == (3, 24, 24) and sample["index"].item() == 0
    assert torch.allclose(sample["image"], expected, atol=0.05)
    assert "RandomHorizontalFlip" in repr(splits.train.transform)
    assert "RandomHorizontalFlip" not in repr(splits.tests["unbiased"].transform) + repr(splits.val.transform)


def test_heavy_makeup_target_case_insensitive(celeba_root):
    splits = build_celeba(CelebAConfig(root=str(celeba_root), target="heavy_makeup", val_fraction=0))
    assert splits.info["target"] == "Heavy_Makeup" and splits.info["bias_inverted"]
    male = [m for p, _, m, c in CELEBA_GROUPS if p == 0 for _ in range(c)]
    assert splits.train.targets.tolist() == [heavy_makeup(n, m) for n, m in enumerate(male, start=1)]
    assert splits.train.biases.tolist() == [1 - m for m in male]
    # two thirds of the images have make-up exactly when female: target = bias
    assert int((splits.train.targets == splits.train.biases).sum()) == 35 - 11


# -- CelebA: errors -------------------------------------------------------------------------------
def _attr_file(root: Path) -> Path:
    return root / "celeba" / "list_attr_celeba.txt"


def _edit_line(path: Path, number: int, new: str) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = new
    path.write_text("\n".join(lines) + "\n")


def test_missing_celeba_files_are_named(tmp_path, celeba_root):
    with pytest.raises(DataError, match="CelebA folder not found"):
        build_celeba(CelebAConfig(root=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no list_attr_celeba.txt"):
        build_celeba(CelebAConfig(root=str(tmp_path / "empty")))
    with pytest.raises(DataError, match="pass --data-root"):
        build_celeba(CelebAConfig())
    (celeba_root / "celeba" / "list_eval_partition.txt").unlink()
    with pytest.raises(DataError, match=r"list_eval_partition.txt: file not found"):
        build_celeba(CelebAConfig(root=str(celeba_root)))


def test_missing_image_is_named(celeba_root):
    (celeba_root / "celeba" / "img_align_celeba" / "000001.jpg").unlink()
    (celeba_root / "celeba" / "img_align_celeba" / "000002.jpg").unlink()
    with pytest.raises(DataError, match=r"000001.jpg: image not found \(and 1 more\)"):
        build_celeba(CelebAConfig(root=str(celeba_root), val_fraction=0))


def test_undecodable_image_is_named(celeba_root):
    splits = build_celeba(CelebAConfig(root=str(celeba_root)))
    splits.train.paths[0].write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=rf"{splits.train.paths[0].name}: cannot decode image"):
        splits.train[0]


@pytest.mark.parametrize(
    ("line", "text", "message"),
    [
        (1, "many", r"line 1: 'many'; expected the number of images"),
        (1, "58", r"line 1 says 58 images, the file lists 57"),
        (5, "000003.jpg -1  1 -1", r"line 5: 3 attribute values for 000003.jpg, expected 5"),
        (7, "000005.jpg -1  1 -1  2  1", r"line 7, attribute Male: '2'; expected 1 or -1"),
        (8, "000001.jpg -1  1 -1 -1  1", r"line 8: 000001.jpg is listed twice \(first on line 3\)"),
    ],
)
def test_malformed_attribute_file(celeba_root, line, text, message):
    path = _attr_file(celeba_root)
    _edit_line(path, line, text)
    with pytest.raises(DataError, match=message) as e:
        build_celeba(CelebAConfig(root=str(celeba_root)))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_malformed_partition_file(celeba_root):
    path = celeba_root / "celeba" / "list_eval_partition.txt"
    _edit_line(path, 4, "000004.jpg 3")
    with pytest.raises(DataError, match=r"list_eval_partition.txt: line 4: '000004.jpg 3'; expected '<file name> <0\|1\|2>'"):
        build_celeba(CelebAConfig(root=str(celeba_root)))
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3] + lines[4:]) + "\n")
    with pytest.raises(DataError, match=r"no partition for 000004.jpg \(1 image"):
        build_celeba(CelebAConfig(root=str(celeba_root)))


def test_unknown_attribute_suggests_the_close_one(celeba_root):
    with pytest.raises(DataError, match=r"data.target='Blonde_Hair': not an attribute on line 2 of .*list_attr_celeba.txt; did you mean Blond_Hair\?"):
        build_celeba(CelebAConfig(root=str(celeba_root), target="Blonde_Hair"))
    with pytest.raises(ConfigError, match="same attribute"):
        build_celeba(CelebAConfig(root=str(celeba_root), target="male"))


def test_empty_group_cannot_be_balanced(celeba_root):
    path = _attr_file(celeba_root)
    lines = path.read_text().splitlines()
    # rows 36–41 (file lines 38–43) are the valid partition's blond women: make them blond men
    for number in range(38, 44):
        parts = lines[number - 1].split()
        parts[4] = "1"  # Male
        lines[number - 1] = " ".join(parts)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"valid partition: no sample in group\(s\) t=1,b=1"):
        build_celeba(CelebAConfig(root=str(celeba_root)))


# -- group helpers --------------------------------------------------------------------------------
def test_validation_split_takes_a_share_of_the_smallest_group_from_every_group():
    targets = np.array([0] * 20 + [1] * 10 + [1] * 5)
    biases = np.array([0] * 20 + [1] * 10 + [0] * 5)
    train, val = validation_split(targets, biases, 0.4, seed=0)
    assert group_counts(targets[val], biases[val]) == {"t=0,b=0": 2, "t=1,b=0": 2, "t=1,b=1": 2}
    assert len(train) == 29 and not set(train) & set(val)
    assert len(validation_split(targets, biases, 0.0, seed=0)[1]) == 0


# -- IMDB Face ------------------------------------------------------------------------------------
def test_age_bins_and_groups():
    ages = np.array([0, 19.9, 20, 24, 25, 29, 30, 34, 35, 39, 40, 44, 65, 69, 70, 120])
    assert age_bins(ages).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 10, 10, 11, 11]
    assert len(AGE_BIN_NAMES) == 12 and AGE_BIN_NAMES[:3] == ["0-19", "20-24", "25-29"] and AGE_BIN_NAMES[-1] == "70+"
    assert set(age_bins(np.arange(0, 121)).tolist()) == set(range(12))
    assert age_groups(np.array([0, 29, 30, 39, 40, 80])).tolist() == [0, 0, 1, 1, 1, 1]


def test_split_csv_is_read(imdb_root):
    faces = read_split_csv(imdb_root / "eb1.csv")
    assert faces.genders.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert faces.ages.tolist() == [18, 22, 25, 29, 40, 45, 61, 75]
    assert faces.lines.tolist() == list(range(2, 10)) and faces.paths[0] == imdb_root / "imgs" / "eb1_0.jpg"


def test_gender_target_with_binary_age_bias(imdb_root):
    splits = build_imdb_face(IMDBFaceConfig(root=str(imdb_root), image_size=32))
    assert (splits.num_classes, splits.num_biases) == (2, 2) and splits.val is None
    # EB1 is exactly the target = bias part (women under 30, men 40+); EB2 the target ≠ bias part
    assert splits.train.group_counts() == {"t=0,b=0": 4, "t=1,b=1": 4}
    assert set(splits.tests) == {"test", "eb2"}
    assert splits.tests["eb2"].group_counts() == {"t=0,b=1": 3, "t=1,b=0": 3}
    assert splits.tests["test"].targets.tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    assert splits.tests["test"].biases.tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 1, 1]


def test_age_target_has_12_bins_and_gender_bias(imdb_root):
    splits = build_imdb_face(IMDBFaceConfig(root=str(imdb_root), target="age", train_split="eb2"))
    assert (splits.num_classes, splits.num_biases) == (12, 2) and set(splits.tests) == {"test", "eb1"}
    assert splits.train.targets.tolist() == [5, 8, 11, 0, 1, 2] and splits.train.biases.tolist() == [0, 0, 0, 1, 1, 1]
    assert splits.tests["test"].targets.tolist() == [0, 1, 3, 3, 4, 4, 5, 10, 10, 11]
    assert splits.train.class_names == AGE_BIN_NAMES and splits.train.bias_names == ["female", "male"]


def test_age_bias_as_12_bins_and_validation(imdb_root):
    splits = build_imdb_face(IMDBFaceConfig(root=str(imdb_root), age_bias="bins12", val_fraction=0.5))
    assert splits.num_biases == 12 and splits.tests["eb2"].biases.tolist() == [5, 8, 11, 0, 1, 2]
    # the smallest (gender, age bin) group of EB1 holds one face: int(0.5 × 1) = 0 → no validation
    assert splits.val is None
    splits = build_imdb_face(IMDBFaceConfig(root=str(imdb_root), val_fraction=0.5))
    assert splits.val.group_counts() == {"t=0,b=0": 2, "t=1,b=1": 2} and len(splits.train) == 4


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("imgs/eb1_0.jpg,abc,F,x", r"eb1.csv: line 3, column age: 'abc'; expected the age in years, a number from 0 to 120"),
        ("imgs/eb1_0.jpg,-4,F,x", r"line 3, column age: '-4'"),
        ("imgs/eb1_0.jpg,30,X,x", r"line 3, column gender: 'X'; expected 0/F/female or 1/M/male"),
        ("imgs/nope.jpg,30,F,x", r"line 3, column path: file not found: imgs/nope.jpg"),
        ("../outside.jpg,30,F,x", r"line 3, column path: '../outside.jpg' leaves the CSV's folder"),
        ("imgs/eb1_0.jpg,30", r"line 3: 2 fields, the header has 4"),
    ],
)
def test_bad_csv_rows_are_named(imdb_root, row, message):
    path = imdb_root / "eb1.csv"
    _edit_line(path, 3, row)
    with pytest.raises(DataError, match=message) as e:
        build_imdb_face(IMDBFaceConfig(root=str(imdb_root)))
    assert str(path) in str(e.value)


def test_csv_problems_are_counted_and_columns_checked(imdb_root):
    path = imdb_root / "test.csv"
    _edit_line(path, 2, "imgs/test_0.jpg,old,?,x")
    with pytest.raises(DataError, match=r"line 2, column age: 'old'.* \(and 1 more problems\)"):
        read_split_csv(path)
    path.write_text("path,gender\nimgs/test_0.jpg,F\n")
    with pytest.raises(DataError, match=r"test.csv: missing column\(s\) age; the header has path, gender \(required: path, age, gender\)"):
        read_split_csv(path)
    path.write_text("path,age,gender\n")
    with pytest.raises(DataError, match="test.csv: no rows"):
        read_split_csv(path)


def test_missing_imdb_files_are_named(tmp_path, imdb_root):
    with pytest.raises(DataError, match="IMDB Face folder not found"):
        build_imdb_face(IMDBFaceConfig(root=str(tmp_path / "nowhere")))
    (imdb_root / "eb2.csv").unlink()
    with pytest.raises(DataError, match=r"eb2.csv: split list not found"):
        build_imdb_face(IMDBFaceConfig(root=str(imdb_root)))


# -- metrics of the protocols on hand-made predictions ----------------------------------------------
def _cfg(kind: str, root: Path, **data) -> object:
    return load_config(None, [f"data.kind={kind}", f"data.root={root}", "model.arch=resnet18"] + [f"data.{k}={v}" for k, v in data.items()])


def test_celeba_metrics_are_group_averaged(celeba_root):
    proto = celeba_protocol(_cfg("celeba", celeba_root))
    targets = torch.tensor([0] * 6 + [1] * 6)
    biases = torch.tensor([0, 0, 0, 1, 1, 1] * 2)
    # group accuracies: (0,0) 3/3, (0,1) 2/3, (1,0) 1/3, (1,1) 0/3
    predicted = torch.tensor([0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0])
    tests = {"unbiased": group_accuracy(targets, predicted, biases)}
    m = proto.summarise(tests, {"train": {"accuracy": 0.9}, "val": {"group_mean_accuracy": 0.6}})
    assert m["unbiased_accuracy"] == pytest.approx(0.5)
    assert m["bias_conflicting_accuracy"] == pytest.approx(3 / 6)  # (0,1) and (1,0): 2 + 1 of 6
    assert m["worst_group_accuracy"] == 0.0 and m["val_group_mean_accuracy"] == 0.6
    assert proto.val_metrics == ("accuracy", "group_mean_accuracy", "conflicting_accuracy")


def test_imdb_metrics_are_test_and_other_split_accuracy(imdb_root):
    proto = imdb_face_protocol(_cfg("imdb_face", imdb_root, train_split="eb2"))
    tests = {
        "test": group_accuracy(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 0]), torch.tensor([0, 0, 1, 1])),
        "eb1": group_accuracy(torch.tensor([0, 1]), torch.tensor([1, 1]), torch.tensor([0, 1])),
    }
    m = proto.summarise(tests, {"train": {"accuracy": 1.0}})
    assert m["test_accuracy"] == 0.75 and m["other_eb_accuracy"] == 0.5 and m["val_accuracy"] is None
    assert proto.params == {"target": "gender", "train_split": "eb2", "other_split": "eb1"}


# -- end to end through the command line ------------------------------------------------------------
def run_cli(args, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["cxrdebias", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


TINY = ["--epochs", "1", "--set", "data.image_size=32", "--set", "train.batch_size=8", "--set", "train.num_workers=0",
        "--set", "train.progress=false", "--set", "train.precision=fp32", "--set", "train.device=cpu"]  # fmt: skip


def test_reproduce_celeba_end_to_end(celeba_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = ["reproduce", "celeba", "--target", "blond_hair", "--data-root", str(celeba_root), "--out", str(out), *TINY]
    code, stdout, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["experiment"] == "celeba" and res["target"] == "Blond_Hair" and res["bias"] == "Male"
    assert res["method"]["name"] == "end" and res["config"]["model"]["arch"] == "resnet18"
    unbiased = res["tests"]["unbiased"]
    assert {g: v["n"] for g, v in unbiased["by_group"].items()} == {"t=0,b=0": 3, "t=0,b=1": 3, "t=1,b=0": 3, "t=1,b=1": 3}
    accs = {g: v["accuracy"] for g, v in unbiased["by_group"].items()}
    assert res["metrics"]["unbiased_accuracy"] == pytest.approx(np.mean(list(accs.values())))
    assert res["metrics"]["bias_conflicting_accuracy"] == pytest.approx((accs["t=0,b=1"] + accs["t=1,b=0"]) / 2)
    assert res["selection"].startswith("best validation group_mean_accuracy (epoch 1")
    assert res["data"]["splits"]["train"]["n"] == 31 and res["data"]["splits"]["val"]["n"] == 4
    assert len(res["data"]["dataset_sha256"]) == 64 and res["data"]["bias_inverted"] is True
    assert "unbiased_accuracy=" in stdout and "bias_conflicting_accuracy=" in stdout


@pytest.mark.parametrize(("target", "split", "classes"), [("gender", "eb1", 2), ("age", "eb2", 12)])
def test_reproduce_imdb_face_end_to_end(imdb_root, tmp_path, monkeypatch, capsys, target, split, classes):
    out = tmp_path / "run"
    args = ["reproduce", "imdb-face", "--target", target, "--train-split", split, "--data-root", str(imdb_root),
            "--out", str(out), "--method", "vanilla", *TINY]  # fmt: skip
    code, stdout, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    other = "eb2" if split == "eb1" else "eb1"
    assert res["experiment"] == "imdb_face" and res["other_split"] == other and res["config"]["data"]["target"] == target
    assert sum(g["n"] for g in res["tests"]["test"]["by_group"].values()) == 10
    assert res["metrics"]["other_eb_accuracy"] == res["tests"][other]["accuracy"]
    assert res["metrics"]["test_accuracy"] == res["tests"]["test"]["accuracy"]
    assert res["selection"].startswith("last epoch") and len(res["data"]["class_names"]) == classes
    assert "test_accuracy=" in stdout and "other_eb_accuracy=" in stdout


def test_cli_errors_are_one_line(celeba_root, imdb_root, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(["reproduce", "celeba", "--data-root", str(tmp_path / "none"), "--out", str(tmp_path / "r")], monkeypatch, capsys)
    assert code == 2 and "CelebA folder not found" in err and "Traceback" not in err
    code, _, err = run_cli(["reproduce", "celeba", "--data-root", str(celeba_root), "--set", "data.target=Blonde_Hair", "--out", str(tmp_path / "r")], monkeypatch, capsys)
    assert code == 2 and "did you mean Blond_Hair" in err.replace("\n", "")
    code, _, err = run_cli(["reproduce", "imdb-face", "--data-root", str(imdb_root), "--set", "train.select_metric=accuracy", "--out", str(tmp_path / "r")], monkeypatch, capsys)
    assert code == 2 and "needs a validation set" in err.replace("\n", "")
    assert not (tmp_path / "r").exists()
