"""Data-parallel training (torchrun/DDP) on CPU with gloo and 2 processes.

The central property (issue 7): a step on N ranks, each holding its share of the global batch,
equals a step of one process on the concatenated batch — the loss, the batch-level regularisers
(EnD's Gram matrix, HSIC, GroupDRO's groups, LfF's loss averages, the pseudo-bias statistics)
and the parameter update (tolerance 1e-6; measured ≈ 1e-15 in float64).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cxrdebias import distributed as D
from cxrdebias.config import TrainConfig
from cxrdebias.data.base import TensorBatchLoader, TensorSamples, make_loader
from cxrdebias.debias import build_method
from cxrdebias.models.base import L2Normalize, ModelOutput
from cxrdebias.training.runs import METRICS_FILE, RunDir
from cxrdebias.training.trainer import Trainer

WORLD = 2
TOL = 1e-6


# -- a tiny BatchNorm-free model (per-rank BatchNorm statistics would differ from the global ones) --
class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 3, feature_dim: int = 6, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, feature_dim, kernel_size, padding=kernel_size // 2)
        self.act = nn.Tanh()
        self.norm = L2Normalize()
        self.classifier = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim
        self.early_layer = "conv"  # what unsupervised.layer: early (the default) reads

    def forward(self, x):
        f = self.norm(self.act(self.conv(x)).mean(dim=(2, 3)))
        return ModelOutput(self.classifier(f), f)


def build_tiny(**overrides):
    torch.manual_seed(7)
    return TinyNet(kernel_size=overrides.get("kernel_size", 3)).double()


def make_samples(n: int = 24, seed: int = 0) -> TensorSamples:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 3, (n,), generator=g)
    bias = torch.where(torch.rand(n, generator=g) < 0.8, target, torch.randint(0, 3, (n,), generator=g))
    image = torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64) + bias[:, None, None, None].double()
    return TensorSamples(image, target, bias)


#: (name, options, unsupervised) — every method whose step reads more than its own samples, and LNL
CASES = [
    ("end", {"alpha": 1.0, "beta": 0.5}, None),
    ("end-reference", {"alpha": 1.0, "beta": 0.5, "form": "reference"}, None),
    ("rebias", {}, None),
    ("groupdro", {}, None),
    ("lff", {}, None),
    ("lnl", {}, None),
    ("vanilla", {}, None),
    # the defaults: the first block's features, target labels during warm-up
    ("end-auto-attractor", {"alpha": 1.0, "beta": 0.5}, {"enabled": True, "labeller": "attractor", "warmup_steps": 2, "refresh_every": 1}),
    ("end-auto-gce", {"alpha": 1.0, "beta": 0.5}, {"enabled": True, "labeller": "gce_head", "warmup_steps": 1, "refresh_every": 2, "layer": None, "warmup_labels": "none"}),
]


def train_case(case, rank: int, world_size: int, run_path: str | None, epochs: int = 2, resume: bool = False):
    name, options, unsup = case
    method = build_method(name.split("-")[0], options, unsup)
    samples = make_samples()
    cfg = TrainConfig(epochs=epochs, batch_size=8, lr=1e-2, lr_step=1, precision="fp32", progress=False, num_threads=1)
    loader = TensorBatchLoader(samples, cfg.batch_size, shuffle=True, seed=3, rank=rank, world_size=world_size)
    run = None
    if run_path:
        run = RunDir.create(run_path, resume=True) if resume else RunDir.create(run_path) if rank == 0 else RunDir(run_path)
    trainer = Trainer(
        build_tiny(),
        method,
        loader,
        cfg,
        run=run,
        seed=5,
        num_samples=len(samples),
        num_classes=3,
        num_biases=3,
        build_model=build_tiny,
    )
    result = trainer.fit(resume=resume)
    return {
        "state": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        "method": {k: v.detach().clone() for k, v in trainer.method.state_dict().items()},
        "train": [h["train"] for h in result.history],
        "pseudo": [h.get("pseudo_bias") for h in result.history],
    }


# -- process launching ---------------------------------------------------------------------------
def _worker(rank: int, world_size: int, init_file: str, out_dir: str, fn_name: str, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        result = globals()[fn_name](rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(fn_name: str, tmp_path: Path, *args, world_size: int = WORLD) -> list:
    out = tmp_path / "ranks"
    out.mkdir(exist_ok=True)
    mp.spawn(_worker, args=(world_size, str(tmp_path / "init"), str(out), fn_name, args), nprocs=world_size, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def all_cases(rank: int, world_size: int, run_root: str) -> dict:
    out = {c[0]: train_case(c, rank, world_size, str(Path(run_root) / c[0])) for c in CASES}
    # stopped after epoch 1, resumed to epoch 2 (per-rank RNG states come back from the checkpoint)
    auto = CASES[-2]
    train_case(auto, rank, world_size, str(Path(run_root) / "resumed"), epochs=1)
    dist.barrier()  # rank 0 has written the checkpoint
    out["resumed"] = train_case(auto, rank, world_size, str(Path(run_root) / "resumed"), epochs=2, resume=True)
    return out


def gather_checks(rank: int, world_size: int) -> dict:
    n = 3 if rank == 0 else 2  # unequal sizes on purpose
    x = (torch.arange(n * 2, dtype=torch.float64).reshape(n, 2) + 10 * rank).requires_grad_(True)
    (y, labels), own = D.gather_rows(x, torch.full((n,), rank))
    w = torch.arange(y.numel(), dtype=torch.float64).reshape(y.shape)
    (y * w).sum().backward()
    return {
        "gathered": y.detach(),
        "grad": x.grad.clone(),
        "slice": y.detach()[own],
        "labels": labels,
        "any": (D.any_rank(rank == 1), D.any_rank(False)),
        "bcast": D.broadcast_object({"r": rank}),
        "bf16": D.gather(torch.full((2,), rank + 0.5, dtype=torch.bfloat16)),
    }


# -- tests ----------------------------------------------------------------------------------------
def test_single_process_helpers_are_identities():
    x = torch.randn(3, 2, requires_grad=True)
    assert D.gather(x) is x
    (same,), own = D.gather_rows(x)
    assert same is x and own == slice(0, 3)
    assert D.world().world_size == 1 and D.world().is_main
    assert D.any_rank(True) and not D.any_rank(False)
    assert D.broadcast_object({"a": 1}) == {"a": 1}


def test_sharded_loader_concatenates_to_the_single_process_batches():
    samples = make_samples(24)
    one = [b["index"] for b in TensorBatchLoader(samples, 8, shuffle=True, seed=3)]
    ranks = [[b["index"] for b in TensorBatchLoader(samples, 8, shuffle=True, seed=3, rank=r, world_size=2)] for r in range(2)]
    assert all(len(r) == len(one) for r in ranks)
    for b, (a0, a1) in enumerate(zip(*ranks, strict=True)):
        assert a0.shape[0] == a1.shape[0] == 4
        assert torch.equal(torch.cat([a0, a1]), one[b])


def test_sharded_loader_pads_an_uneven_epoch_and_checks_the_batch_size():
    samples = make_samples(11)
    ranks = [[b["index"] for b in make_loader(samples, 4, shuffle=True, seed=1, rank=r, world_size=2)] for r in range(2)]
    sizes = [[b.shape[0] for b in r] for r in ranks]
    assert sizes[0] == sizes[1] == [2, 2, 2]  # 11 → padded to 12 = 4 + 4 + 4
    seen = torch.cat([torch.cat(r) for r in ranks])
    assert set(seen.tolist()) == set(range(11)) and seen.numel() == 12  # one sample repeated
    with pytest.raises(ValueError, match="divisible by world_size"):
        TensorBatchLoader(samples, 5, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank must be"):
        TensorBatchLoader(samples, 4, rank=2, world_size=2)


def test_gather_forward_backward_and_collectives(tmp_path):
    r0, r1 = run_ranks("gather_checks", tmp_path)
    expected = torch.cat([torch.arange(6.0).reshape(3, 2), torch.arange(4.0).reshape(2, 2) + 10]).double()
    for r in (r0, r1):
        assert torch.equal(r["gathered"], expected)
        assert r["labels"].tolist() == [0, 0, 0, 1, 1] and not r["labels"].requires_grad
        assert r["any"] == (True, False)
        assert r["bcast"] == {"r": 0}
        assert r["bf16"].dtype == torch.bfloat16 and r["bf16"].tolist() == [0.5, 0.5, 1.5, 1.5]
    w = torch.arange(10, dtype=torch.float64).reshape(5, 2)
    # every rank's loss uses every row: the gradient of a rank's own rows is summed over ranks
    assert torch.equal(r0["grad"], WORLD * w[:3]) and torch.equal(r1["grad"], WORLD * w[3:])
    assert torch.equal(r0["slice"], expected[:3]) and torch.equal(r1["slice"], expected[3:])


@pytest.fixture(scope="module")
def two_rank_and_single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    single = {c[0]: train_case(c, 0, 1, str(tmp / "single" / c[0])) for c in CASES}
    ranks = run_ranks("all_cases", tmp, str(tmp / "ddp"))
    return single, ranks, tmp


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_two_ranks_equal_one_process_on_the_concatenated_batch(two_rank_and_single, case):
    single, ranks, _ = two_rank_and_single
    one = single[case]
    for r in ranks:
        got = r[case]
        for k, v in one["state"].items():
            diff = (got["state"][k].double() - v.double()).abs().max().item() if v.numel() else 0.0
            assert diff <= TOL, f"{case}: model {k} differs by {diff:.2e}"
        for k, v in one["method"].items():  # the methods' own networks and statistics too
            if v.is_floating_point():
                diff = (got["method"][k].double() - v.double()).abs().max().item() if v.numel() else 0.0
                assert diff <= TOL, f"{case}: method {k} differs by {diff:.2e}"
            else:
                assert torch.equal(got["method"][k], v), f"{case}: method {k} differs"
        for e, (a, b) in enumerate(zip(got["train"], one["train"], strict=True)):
            for key in ("loss", "R_perp", "R_par", "hsic", "ce"):  # epoch means over the global batches
                if key in b:
                    assert abs(a[key] - b[key]) <= TOL, f"{case}: epoch {e + 1} {key} {a[key]} vs {b[key]}"
        if case.startswith("end-auto"):
            assert got["pseudo"][-1]["n"] == one["pseudo"][-1]["n"] == 24  # agreement over all ranks' samples
            assert got["pseudo"][-1]["nmi"] == pytest.approx(one["pseudo"][-1]["nmi"], abs=1e-9)


def test_the_two_ranks_stay_identical_and_the_training_moved(two_rank_and_single):
    single, (r0, r1), _ = two_rank_and_single
    for case in r0:
        for k in r0[case]["state"]:
            assert torch.equal(r0[case]["state"][k], r1[case]["state"][k]), f"{case}: ranks diverged in {k}"
    start = build_tiny().state_dict()
    assert (single["end"]["state"]["conv.weight"] - start["conv.weight"]).abs().max() > 1e-3


def test_resumed_two_rank_run_equals_the_uninterrupted_one(two_rank_and_single):
    _, ranks, _ = two_rank_and_single
    for r in ranks:
        for k, v in r[CASES[-2][0]]["state"].items():
            assert torch.equal(r["resumed"]["state"][k], v), f"resumed run differs in {k}"
        for k, v in r[CASES[-2][0]]["method"].items():
            assert torch.equal(r["resumed"]["method"][k], v), f"resumed run's method state differs in {k}"


def test_only_rank_0_writes_the_run(two_rank_and_single):
    _, _, tmp = two_rank_and_single
    run = tmp / "ddp" / "end"
    lines = (run / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]  # not one line per rank
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert state["world_size"] == WORLD and len(state["rng_per_rank"]) == WORLD


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_environment_starts_gloo_on_cpu(tmp_path):
    """``torchrun --nproc_per_node 2``: init_from_env reads its environment (gloo on CPU)."""
    script = tmp_path / "job.py"
    script.write_text(
        "import json, sys, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent.parent)!r})\n"
        "from cxrdebias import distributed as D\n"
        "w = D.init_from_env('cpu')\n"
        "x = D.gather(torch.tensor([float(w.rank)]))\n"
        f"open({str(tmp_path)!r} + f'/rank{{w.rank}}.json', 'w').write(json.dumps([w.rank, w.world_size, w.backend, x.tolist()]))\n"
        "D.shutdown()\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()), str(script)],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert got == [[0, 2, "gloo", [0.0, 1.0]], [1, 2, "gloo", [0.0, 1.0]]]


def test_cxrdebias_train_runs_unchanged_under_torchrun(cxr_manifest, tmp_path):
    """The CXR train command under ``torchrun --nproc_per_node 2`` (gloo, DenseNet-121 at 64 px,
    one epoch): one run folder written by rank 0, the global batch split over the ranks."""
    from tests.conftest import TINY_CXR_TRAIN

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        "-m", "cxrdebias.cli", "train", "--data", str(cxr_manifest), "--bias", "site", "--method", "end",
        "--out", str(out), *TINY_CXR_TRAIN, "--set", "train.num_threads=1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("val_auroc=") == 1  # rank 0 reports; rank 1 is silent
    results = json.loads((out / "results.json").read_text())
    assert results["train"]["world_size"] == 2
    assert len((out / METRICS_FILE).read_text().splitlines()) == 1
    assert (out / "model.pt").is_file()
    # a second launch on the same folder fails on every rank with the one-line error, no hang
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert again.returncode != 0
    assert "already exists" in again.stderr


def test_reproduce_biased_mnist_under_torchrun(fake_mnist, tmp_path):
    """`cxrdebias reproduce` shares the torchrun path: rank 0 writes one results.json."""
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        "-m", "cxrdebias.cli", "reproduce", "biased-mnist", "--data-root", str(fake_mnist), "--rho", "0.99",
        "--method", "end", "--epochs", "1", "--out", str(out), "--set", "train.batch_size=64",
        "--set", "train.progress=false", "--set", "model.kernel_size=3", "--set", "train.num_threads=1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("unbiased_accuracy=") == 1
    res = json.loads((out / "results.json").read_text())
    assert res["train"]["world_size"] == 2
    assert len((out / METRICS_FILE).read_text().splitlines()) == 1
