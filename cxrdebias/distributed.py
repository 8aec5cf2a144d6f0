"""Data-parallel training with ``torchrun`` (DistributedDataParallel) and global-batch gathers.

``cxrdebias train …`` runs unchanged under ``torchrun --nproc_per_node N`` (and multi-node):
:func:`init_from_env` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``) and starts the process group — NCCL when every rank has a
GPU, gloo otherwise. Without those variables (or with ``WORLD_SIZE=1``) nothing changes and
every function here is an identity / no-op, so the single-process code path is the same code.

What is synchronised (docs/scaling.md):

* the main model's gradients: DDP's all-reduce (mean over ranks);
* the **batch-level regularisers** (EnD's Gram matrix, HSIC, GroupDRO's group losses, the
  pseudo-bias statistics, LfF's per-sample loss averages) see the *global* batch:
  :func:`gather` concatenates each rank's tensor in rank order, and its backward pass sums the
  incoming gradients over ranks and hands each rank the slice of its own samples. Together with
  DDP's mean this makes one step on N ranks equal to one step of one process on the
  concatenated batch (tests/test_distributed.py);
* the gradients of networks a method owns (LNL's bias head, ReBias's biased network, LfF's
  biased model, the GCE pseudo-bias head): averaged by a pre-step hook on their optimisers
  (:func:`average_gradients_before_step`).

Sizes: ``train.batch_size`` is the *global* batch; each rank takes ``batch_size / N`` samples
(contiguous slices of the same global batch), so a config gives the same optimisation under any
number of ranks.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from cxrdebias.errors import ConfigError


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and prints progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world() -> World:
    """The current world: the initialised process group's, else a single process."""
    if dist.is_available() and dist.is_initialized():
        return World(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
            backend=str(dist.get_backend()),
        )
    return World()


def launched_by_torchrun(env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return int(env.get("WORLD_SIZE", "1") or 1) > 1 and "RANK" in env


def init_from_env(device: str = "auto", timeout_s: float = 1800.0) -> World:
    """Start the process group when launched by torchrun with more than one process.

    ``device`` is ``train.device``: on CUDA each rank uses ``cuda:LOCAL_RANK`` and NCCL; on CPU
    gloo. Returns :func:`world` (a single process when not launched by torchrun).
    """
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return world()
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={device!r} under torchrun, but CUDA is not available")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s); "
                "use --nproc_per_node <= the number of GPUs"
            )
        torch.cuda.set_device(local_rank)
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return world()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_for(world_: World, device: str) -> str:
    """``train.device`` for this rank: ``cuda:LOCAL_RANK`` under a multi-GPU launch."""
    if world_.distributed and world_.backend == "nccl" and device in ("auto", "cuda"):
        return f"cuda:{world_.local_rank}"
    return device


# -- collectives ------------------------------------------------------------------------------
def _comm_dtype(t: torch.Tensor) -> torch.dtype:
    """gloo has no bf16/fp16 reductions: communicate those in fp32."""
    if world().backend == "gloo" and t.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return t.dtype


def _all_sizes(n: int, device: torch.device) -> list[int]:
    size = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


def _all_gather_cat(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenation over ranks along dim 0 (rank r holds ``sizes[r]`` rows); no autograd."""
    longest = max(sizes)
    send = x.detach().to(_comm_dtype(x)).contiguous()
    if send.shape[0] < longest:
        send = torch.cat([send, send.new_zeros((longest - send.shape[0], *send.shape[1:]))])
    parts = [torch.empty_like(send) for _ in sizes]
    dist.all_gather(parts, send)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]).to(x.dtype)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], own: slice) -> torch.Tensor:
        ctx.own = own
        return _all_gather_cat(x, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # every rank's loss depends on every rank's samples: sum the gradients w.r.t. the global
        # batch over ranks, keep this rank's rows (DDP's mean then gives the one-process gradient)
        g = grad.to(_comm_dtype(grad)).contiguous()
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g[ctx.own].to(grad.dtype), None, None


def gather_rows(*xs: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], slice]:
    """Each of ``xs`` (same number of rows) concatenated over ranks along dim 0 in rank order,
    and the slice of this rank's own rows in the result. Gradients flow back to each rank's own
    rows; detached inputs give detached outputs. One size exchange serves all of ``xs``. In a
    single process: ``xs`` themselves and ``slice(0, n)``."""
    n = xs[0].shape[0]
    w = world()
    if not w.distributed:
        return xs, slice(0, n)
    if any(x.shape[0] != n for x in xs):
        raise ValueError(f"gather_rows: the tensors have different numbers of rows {[x.shape[0] for x in xs]}")
    sizes = _all_sizes(n, xs[0].device)
    own = slice(sum(sizes[: w.rank]), sum(sizes[: w.rank + 1]))
    out = tuple(
        _GatherWithGrad.apply(x, sizes, own) if x.requires_grad and torch.is_grad_enabled() else _all_gather_cat(x, sizes)
        for x in xs
    )
    return out, own


def gather_many(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """:func:`gather_rows` without the slice."""
    return gather_rows(*xs)[0]


def gather(x: torch.Tensor) -> torch.Tensor:
    """``x`` of every rank concatenated along dim 0 in rank order (see :func:`gather_rows`)."""
    return gather_rows(x)[0][0]


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True when ``flag`` is true on at least one rank (e.g. a stop signal)."""
    if not world().distributed:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects)."""
    if not world().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    if not world().distributed:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def run_on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 only; its result — or its exception — on every rank, so that an error
    on rank 0 (an existing output folder, a bad config) stops all ranks instead of leaving the
    others waiting in the next collective."""
    if not world().distributed:
        return fn()
    result, error = None, None
    if world().is_main:
        try:
            result = fn()
        except Exception as exc:
            error = exc
    result, error = broadcast_object((result, error))
    if error is not None:
        raise error
    return result


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Average ``.grad`` of ``params`` over ranks in place (one flat all-reduce per dtype)."""
    w = world()
    if not w.distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in group]).to(_comm_dtype(group[0]))
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(w.world_size)
        offset = 0
        for g in group:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n


def average_gradients_before_step(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Make ``optimizer.step()`` average its parameters' gradients over ranks first (for the
    networks a method owns, which DDP does not wrap). A no-op in a single process."""
    if world().distributed:

        def hook(opt, args, kwargs):
            average_gradients(p for group in opt.param_groups for p in group["params"])

        optimizer.register_step_pre_hook(hook)
    return optimizer


def check_batch_size(batch_size: int, world_size: int) -> None:
    if world_size > 1 and batch_size % world_size:
        raise ConfigError(
            f"train.batch_size={batch_size} is the global batch and must be divisible by the number of "
            f"processes ({world_size}); each rank takes batch_size / {world_size} samples"
        )



def run_launched(device: str, payload: Any, job: Callable[[Any], Any]) -> Any:
    """``job(payload)`` inside a process group when launched by torchrun (docs/scaling.md),
    with every rank getting rank 0's ``payload`` (e.g. the run folder whose name has a time in
    it); plain ``job(payload)`` otherwise. Returns the job's result on rank 0, None elsewhere."""
    world_ = init_from_env(device)
    try:
        result = job(broadcast_object(payload))
    finally:
        shutdown()
    return result if world_.is_main else None
