"""torch.distributed plumbing for `torchrun`: init/teardown, rank helpers, seeding, collectives.

Follows torchrun's environment contract (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT) and
nanoGPT's DDP setup: one process per device, nccl on CUDA, gloo on CPU, rank 0 logs and writes.
Failure handling: torchrun's agent stops the surviving ranks as soon as one exits with an error,
so a failing rank must exit promptly: `teardown(failed=True)` aborts communicators (never waits
on peers), and every collective has a timeout as the last line of defence. With
`torchrun --max-restarts=N` the restarted workers get a process-group store of their own attempt
(see `_restart_safe_store`) and continue from the last checkpoint with --from_resume 1.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from .. import compat


@dataclass
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    control_group: Any = (
        None  # a gloo group for small host-side agreements (None: the default group)
    )

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"environment variable {name}={value!r} must be an integer; launch with torchrun"
        ) from None


def resolve_device(name: Optional[str], local_rank: int = 0) -> torch.device:
    """--device: None/'auto' -> cuda:<local_rank> when CUDA is available, else cpu."""
    if name in (None, "auto"):
        return (
            torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        )
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r} is not supported; use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} but CUDA is not available here; use --device cpu")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible "
                f"(local rank {local_rank}); use --device cuda"
            )
        device = torch.device("cuda", index)
    return device


def init_distributed(device_name: Optional[str] = None, timeout_s: float = 1800.0) -> DistContext:
    """Read torchrun's environment, pick the device, and init the process group when
    WORLD_SIZE > 1."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    context = DistContext(rank, local_rank, world_size, device)
    if context.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        store = _restart_safe_store(world_size, timeout)
        dist.init_process_group(
            backend,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
            **({} if store is None else dict(store=store, rank=rank, world_size=world_size)),
        )
        if backend != "gloo":  # host-side agreements never wait on the accelerator's stream
            context.control_group = dist.new_group(backend="gloo", timeout=timeout)
    return context


def _restart_safe_store(world_size: int, timeout: datetime.timedelta) -> Optional[dist.Store]:
    """torchrun's store for this restart attempt, or None (init_process_group's default).

    torchrun shares its rendezvous TCPStore with the workers (TORCHELASTIC_USE_AGENT_STORE=True)
    and, on one node, keeps that store across `--max-restarts` attempts: the process group's keys
    of the previous attempt are still there, so a restarted rank reads the addresses of its dead
    peers and init fails ("Gloo connectFullMesh failed ... Connection refused"; pytorch issue
    #135712). On one node every worker of an attempt has the same TORCHELASTIC_RESTART_COUNT, so
    a per-attempt prefix isolates the attempts. Across nodes the agents count restarts separately,
    so there torch's default is kept (set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun).
    """
    if (
        os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        or _env_int("GROUP_WORLD_SIZE", 1) != 1
    ):
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        _env_int("MASTER_PORT", 0),
        world_size,
        is_master=False,
        timeout=timeout,
    )
    return dist.PrefixStore(
        f"minimind_fast/attempt_{_env_int('TORCHELASTIC_RESTART_COUNT', 0)}", store
    )


def teardown(context: DistContext, failed: bool = False) -> None:
    """Destroy the process group; after a failure abort it instead (does not wait for peers)."""
    if not (context.distributed and dist.is_initialized()):
        return
    with contextlib.suppress(Exception):
        if failed and context.device.type == "cuda" and compat.abort_process_group():
            return
        if not failed:
            # Every rank reaches teardown before any destroys its group: a rank that tears
            # down while rank 0 still saves leaves gloo pairs half-open, and the process
            # can abort at exit ("terminate called without an active exception").
            barrier(context)
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def barrier(context: DistContext) -> None:
    if context.distributed:
        if context.device.type == "cuda":
            dist.barrier(device_ids=[context.device.index])
        else:
            dist.barrier()


@contextlib.contextmanager
def main_rank_first(context: DistContext) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. builds a cache), the others after it finished."""
    if not context.is_main:
        barrier(context)
    yield
    if context.is_main:
        barrier(context)


def all_reduce(values: torch.Tensor, context: DistContext, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce ('sum' or 'max') of a tensor on the training device; no-op on one
    rank."""
    if context.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return values


def gather_objects(value: Any, context: DistContext) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank (pickled; small objects only)."""
    if not context.distributed:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: Any, context: DistContext) -> Any:
    """Rank 0's `value` on every rank."""
    if not context.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _reduce_int(value: int, context: DistContext, op) -> int:
    if not context.distributed:
        return value
    box = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(box, op=op, group=context.control_group)
    return int(box.item())


def max_over_ranks(value: int, context: DistContext) -> int:
    """The largest of every rank's `value`, over the CPU control group (no device sync)."""
    return _reduce_int(value, context, dist.ReduceOp.MAX)


def sum_over_ranks(value: int, context: DistContext) -> int:
    """The sum of every rank's `value`, over the CPU control group (no device sync)."""
    return _reduce_int(value, context, dist.ReduceOp.SUM)
