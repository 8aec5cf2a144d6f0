"""Biased MNIST: IDX reading, colouring protocol, splits, errors."""

import numpy as np
import pytest
import torch

from cxrdebias.data.biased_mnist import (
    COLOURS,
    BiasedMNISTConfig,
    assign_colours,
    build_biased_mnist,
    colourise,
    load_mnist,
    read_idx,
)
from cxrdebias.errors import DataError
from tests.conftest import make_fake_mnist, write_idx


def test_colourise_white_digit_on_class_colour():
    digits = torch.zeros(2, 28, 28, dtype=torch.uint8)
    digits[:, 10:12, 10:12] = 37  # any non-zero pixel becomes white
    img = colourise(digits, torch.tensor([3, 9]))
    assert img.shape == (2, 3, 28, 28) and img.dtype == torch.uint8
    assert img[0, :, 10, 10].tolist() == [255, 255, 255]
    assert img[0, :, 0, 0].tolist() == list(COLOURS[3])
    assert img[1, :, 27, 27].tolist() == list(COLOURS[9])


@pytest.mark.parametrize("rho", [1.0, 0.997, 0.99, 0.5, 0.1])
def test_colour_assignment_follows_rho(rho):
    labels = torch.arange(10).repeat_interleave(1000)
    colours = assign_colours(labels, rho, seed=0)
    for c in range(10):
        col = colours[labels == c]
        assert (col == c).sum().item() == int(rho * 1000)
        others = torch.bincount(col[col != c], minlength=10)
        others = others[torch.arange(10) != c]
        # the rest are spread evenly over the nine other colours
        assert others.max() - others.min() <= 1
        assert others.sum().item() == 1000 - int(rho * 1000)


def test_colour_assignment_is_seeded():
    labels = torch.arange(10).repeat(50)
    assert torch.equal(assign_colours(labels, 0.9, 1), assign_colours(labels, 0.9, 1))
    assert not torch.equal(assign_colours(labels, 0.9, 1), assign_colours(labels, 0.9, 2))


@pytest.mark.parametrize("rho", [0.0, -0.1, 1.01])
def test_rho_out_of_range_is_an_error(rho, fake_mnist):
    with pytest.raises(DataError, match=r"\(0, 1\]"):
        build_biased_mnist(BiasedMNISTConfig(root=str(fake_mnist), rho=rho), seed=0)


def test_splits_and_normalisation(fake_mnist):
    d = build_biased_mnist(BiasedMNISTConfig(root=str(fake_mnist), rho=0.99, val_fraction=0.3), seed=0)
    assert len(d.train) == 200 and len(d.val) == 60
    assert len(d.test_biased) == len(d.test_unbiased) == 100
    assert torch.equal(d.test_biased.biases, d.test_biased.targets)  # rho = 1
    assert (d.test_unbiased.biases == d.test_unbiased.targets).float().mean() <= 0.2
    assert d.train.images.min() == -1.0 and d.train.images.max() == 1.0
    # the two test sets colour the same held-out digits
    assert torch.equal(d.test_biased.targets, d.test_unbiased.targets)
    assert len(d.data_hash()) == 64 and len(d.source_sha256) == 64


def test_gzip_and_plain_layouts_read_the_same(tmp_path):
    a = make_fake_mnist(tmp_path / "a", gz=False)
    b = make_fake_mnist(tmp_path / "b", gz=True)
    xa, ya, _ = load_mnist(a, "train")
    xb, yb, _ = load_mnist(b, "train")
    assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_reads_raw_folder_directly(tmp_path):
    root = make_fake_mnist(tmp_path / "m")
    x, y, files = load_mnist(root / "MNIST" / "raw", "t10k")
    assert x.shape == (100, 28, 28) and y.shape == (100,)


def test_missing_files_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path / "empty", "train")
    with pytest.raises(DataError, match="not found"):
        load_mnist(tmp_path / "nowhere", "train")


def test_truncated_idx_named(tmp_path):
    path = write_idx(tmp_path / "x-images-idx3-ubyte", np.zeros((5, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated") as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_corrupt_gzip_named(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(DataError, match="cannot read"):
        read_idx(path)


def test_wrong_magic_and_label_count(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_idx(raw / "train-images-idx3-ubyte", np.zeros((4, 28, 28), np.uint8))
    write_idx(raw / "train-labels-idx1-ubyte", np.zeros((3,), np.uint8))
    with pytest.raises(DataError, match="3 labels for 4 images"):
        load_mnist(tmp_path, "train")
    write_idx(raw / "train-labels-idx1-ubyte", np.zeros((4, 2), np.uint8))  # labels written as 2-D
    with pytest.raises(DataError, match="magic number"):
        load_mnist(tmp_path, "train")


def test_label_out_of_range(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_idx(raw / "train-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8))
    write_idx(raw / "train-labels-idx1-ubyte", np.array([1, 12, 3], np.uint8))
    with pytest.raises(DataError, match="label 12 at row 1"):
        load_mnist(tmp_path, "train")


def test_real_mnist15k_protocol(mnist15k):
    d = build_biased_mnist(BiasedMNISTConfig(root=str(mnist15k), rho=0.997, val_fraction=0.3), seed=42)
    assert len(d.train) == 12000 and len(d.test_unbiased) == 3000 and len(d.val) == 3600
    aligned = (d.train.biases == d.train.targets).float().mean().item()
    assert aligned == pytest.approx(0.997, abs=0.001)
    # every digit class is present in every split
    for split in (d.train, d.val, d.test_unbiased):
        assert torch.bincount(split.targets, minlength=10).min() > 0


def test_real_train5k_prefix():
    from tests.conftest import SHARED_DATA

    root = SHARED_DATA / "mnist" / "raw"
    if not root.is_dir():
        pytest.skip(f"real MNIST files not found at {root}")
    x, y, files = load_mnist(root, "train5k")
    assert x.shape == (5000, 28, 28)
    assert torch.bincount(y).tolist() == [500] * 10
