"""The EnD authors' Biased-MNIST script on this project's MNIST-15k digits, beside ours (issue 25).

Their code is not in this repository and is not copied into it: get it yourself, outside the
checkout, then point ``--code`` at it::

    git clone https://github.com/EIDOSlab/entangling-disentangling-bias /tmp/end-official
    python benchmarks/official_end.py --code /tmp/end-official --rho 0.997 --seed 42 \\
        --alpha 5 --beta 0.5 --out docs/results/official_end/rho0.997-a5-b0.5-s42.json

It needs ``EnD_rebias_mnist_sweep.py``, ``EnD.py``, ``configs.py`` and ``models.py`` (at the top
or under ``src/``) from their checkout. It runs their ``main(config)`` — their model
(``models.simple_convnet``: Tanh last activation, L2-normalised pooled features), their loss
(``EnD.abs_regu``), their optimiser, training and evaluation loops — with only these changes,
each made from outside their files:

* **data**: their ``colour_mnist`` module (ReBias's loader, which downloads full MNIST) is replaced
  by one that serves :func:`cxrdebias.data.biased_mnist.build_biased_mnist`'s splits for
  ``--seed``: the same digits, colours and validation split as ``cxrdebias reproduce biased-mnist
  --seed S`` (train shuffled, batch 256, as ``(image, digit, colour)``);
* **schedule**: their ``StepLR(step_size=20)`` steps at ``--lr-step`` (the shipped 10-epoch
  schedule steps at 7); ``--epochs`` is their own option;
* **seed**: their ``main`` seeds ``random``, NumPy and torch with 42; those calls get ``--seed``;
* **evaluation**: the two test sets are scored after the last epoch only (their script scores
  them every epoch; scoring in eval mode without gradients does not change training);
* ``wandb``, ``albumentations``, ``pandas`` and ``matplotlib``, imported by their script but not
  used with ``--local``, are empty stand-ins when not installed; the device is the CPU.

The JSON holds the per-epoch training and validation numbers, the last epoch's biased (ρ = 1)
and unbiased (ρ = 0.1) test accuracy — the same definitions as Table 1's — the options, and the
commits of both codebases. Runs in fp32 (their code has no mixed precision).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import random
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks._common import REPO
from cxrdebias.data.biased_mnist import BiasedMNIST, build_biased_mnist
from cxrdebias.errors import ConfigError
from cxrdebias.experiments.config import load_config
from cxrdebias.experiments.tables import rho_config
from cxrdebias.fileio import write_json_atomic
from cxrdebias.training.provenance import code_version

THEIR_FILES = ("EnD_rebias_mnist_sweep.py", "EnD.py", "configs.py", "models.py")
#: modules their script imports but does not use with --local
UNUSED_IMPORTS = ("wandb", "albumentations", "albumentations.pytorch", "pandas", "matplotlib")
_TEST_SPLITS = ("test_biased", "test_unbiased")


def find_code(code: Path) -> list[Path]:
    """The folders to put on ``sys.path`` (their checkout, and ``src/`` where ``models.py`` lives);
    one line naming what is missing otherwise."""
    folders = [code, code / "src"]
    missing = [f for f in THEIR_FILES if not any((d / f).is_file() for d in folders)]
    if missing:
        raise ConfigError(f"--code {code}: not a checkout of the EnD authors' code ({', '.join(missing)} not found at its top or under src/)")
    return [d for d in folders if d.is_dir()]


def colour_mnist_module(data: BiasedMNIST, seed: int) -> types.ModuleType:
    """A stand-in for their ``colour_mnist``: ``get_biased_mnist_dataloader(root, batch_size, rho,
    train)`` → (train, validation) loaders when ``train``, else the test loader of that ρ (1.0:
    biased, 0.1: unbiased). Each loader carries ``split`` (the split's name)."""
    module = types.ModuleType("colour_mnist")

    def loader(split: str, batch_size: int, shuffle: bool) -> DataLoader:
        s = getattr(data, split)
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        out = DataLoader(TensorDataset(s.images, s.targets, s.biases), batch_size=batch_size, shuffle=shuffle, generator=generator)
        out.split = split  # type: ignore[attr-defined]
        return out

    def get_biased_mnist_dataloader(root: Any, batch_size: int, rho: float, train: bool = True, **_: Any):
        if train:
            return loader("train", batch_size, True), loader("val", batch_size, False)
        if rho == 1.0:
            return loader("test_biased", batch_size, False)
        if math.isclose(rho, 0.1):
            return loader("test_unbiased", batch_size, False)
        raise ConfigError(f"their script asked for a test set at rho {rho}; this stand-in serves 1.0 (biased) and 0.1 (unbiased)")

    module.get_biased_mnist_dataloader = get_biased_mnist_dataloader  # type: ignore[attr-defined]
    return module


@contextlib.contextmanager
def patched(target: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, old)


def step_lr_at(step: int) -> type:
    """``StepLR`` with ``step_size`` forced to ``step`` (their script hard-codes 20) that also
    takes their ``verbose`` argument, which newer torch releases dropped."""
    base = torch.optim.lr_scheduler.StepLR

    class StepLRAt(base):  # type: ignore[misc, valid-type]
        def __init__(self, optimizer, step_size=None, gamma=0.1, last_epoch=-1, verbose=None):
            super().__init__(optimizer, step_size=step, gamma=gamma, last_epoch=last_epoch)

    return StepLRAt


def reseeded(fn: Any, seed: int) -> Any:
    """``fn`` with their hard-coded seed 42 replaced by ``seed``."""
    return lambda s, *a, **k: fn(seed if s == 42 else s, *a, **k)


def run(
    code: Path, *, rho: float, seed: int, alpha: float, beta: float, epochs: int, lr_step: int, data_root: Path, threads: int | None = None, their_commit: str | None = None
) -> dict[str, Any]:
    """Their ``main(config)`` on our splits (module doc); the results record."""
    cfg = load_config(rho_config(rho), [f"data.root={data_root}"])
    data = build_biased_mnist(cfg.data, seed)
    if threads:
        torch.set_num_threads(threads)
    for name in UNUSED_IMPORTS:
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)
    sys.modules["colour_mnist"] = colour_mnist_module(data, seed)
    sys.path[:0] = [str(p) for p in find_code(code)]
    argv = ["EnD_rebias_mnist_sweep.py", "--local", "--device", "cpu", "--rho", str(rho), "--alpha", str(alpha), "--beta", str(beta),
            "--epochs", str(epochs), "--lr", str(cfg.train.lr), "--weight_decay", str(cfg.train.weight_decay), "--batch_size", str(cfg.train.batch_size)]  # fmt: skip
    with patched(sys, "argv", argv):
        script = importlib.import_module("EnD_rebias_mnist_sweep")
    script.device = torch.device("cpu")

    history: list[dict[str, Any]] = []
    tests: dict[str, float] = {}
    their_train, their_test = script.train, script.test

    def train(*args: Any, **kwargs: Any):
        t0 = time.perf_counter()
        acc, loss, bce, reg = their_train(*args, **kwargs)
        history.append({"epoch": len(history) + 1, "train": {"accuracy": acc, "loss": loss, "ce": bce, "end_terms": reg, "time_s": time.perf_counter() - t0}})
        return acc, loss, bce, reg

    def test(model: Any, loader: Any, *args: Any, **kwargs: Any):
        split = getattr(loader, "split", "?")
        if split in _TEST_SPLITS and len(history) < epochs:
            return float("nan"), float("nan")  # scored after the last epoch only
        acc, loss = their_test(model, loader, *args, **kwargs)
        if split == "val":
            history[-1]["val"] = {"accuracy": acc}
        else:
            tests[split] = acc
        return acc, loss

    t0 = time.perf_counter()
    with (
        patched(script, "train", train),
        patched(script, "test", test),
        patched(torch.optim.lr_scheduler, "StepLR", step_lr_at(lr_step)),
        patched(torch, "manual_seed", reseeded(torch.manual_seed, seed)),
        patched(np.random, "seed", reseeded(np.random.seed, seed)),
        patched(random, "seed", reseeded(random.seed, seed)),
    ):
        script.main(script.config)
    return {
        "what": "the EnD authors' Biased-MNIST script (EnD_rebias_mnist_sweep.py) on this project's MNIST-15k splits",
        "rho": rho,
        "seed": seed,
        "method": {"name": "end", "form": "authors' code", "alpha": alpha, "beta": beta},
        "epochs": epochs,
        "lr_step": lr_step,
        "precision": "fp32",
        "metrics": {"biased_accuracy": tests.get("test_biased"), "unbiased_accuracy": tests.get("test_unbiased")},
        "history": history,
        "data_hash": data.data_hash(),
        "seconds": time.perf_counter() - t0,
        "their_code": {"path": str(code), "git_commit": _git_commit(code) or their_commit},
        "code_version": code_version(),
    }


def _git_commit(folder: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--code", type=Path, required=True, help="a checkout of github.com/EIDOSlab/entangling-disentangling-bias")
    ap.add_argument("--rho", type=float, default=0.997)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--alpha", type=float, required=True)
    ap.add_argument("--beta", type=float, required=True)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr-step", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--their-commit", help="the commit of their code, recorded when --code is not a git checkout")
    ap.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data" / "mnist15k")
    ap.add_argument("--out", type=Path, required=True, help="results JSON (refused if it exists)")
    args = ap.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out}: exists; choose another --out (results are never overwritten)")
    try:
        result = run(args.code, rho=args.rho, seed=args.seed, alpha=args.alpha, beta=args.beta, epochs=args.epochs,
                     lr_step=args.lr_step, data_root=args.data_root, threads=args.threads, their_commit=args.their_commit)  # fmt: skip
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, result)
    m = result["metrics"]
    print(f"{args.out}: biased {100 * m['biased_accuracy']:.2f}%, unbiased {100 * m['unbiased_accuracy']:.2f}% ({result['seconds'] / 60:.1f} min)")
    print(json.dumps(result["history"][-1]))


if __name__ == "__main__":
    main()
