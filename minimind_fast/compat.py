"""Every private PyTorch API this package touches, in one place.

Private names can change in any torch release. Each one is wrapped here with a fallback that
keeps the package working (maybe slower), and tests/test_compat.py checks each against the
installed torch, so an upgrade that breaks one fails in one test with the name of the API.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn


def grouped_mm() -> Optional[Callable[..., torch.Tensor]]:
    """torch._grouped_mm (one grouped GEMM over contiguous row groups), or None."""
    return getattr(torch, "_grouped_mm", None)


def has_kernel_for(op_name: str, dispatch_key: str) -> bool:
    """Whether the op `namespace::name` has a kernel registered for `dispatch_key`."""
    probe = getattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", None)
    if probe is None:  # the op itself is still callable; only this question is unanswerable
        return False
    return bool(probe(op_name, dispatch_key))


def ddp_ignore(module: nn.Module, names: list[str]) -> bool:
    """Tell DistributedDataParallel (before wrapping `module`) to neither broadcast nor sync
    these parameters/buffers. False when this torch has no such hook (DDP then broadcasts
    them once at construction, which is correct, only redundant for derived buffers)."""
    hook = getattr(
        nn.parallel.DistributedDataParallel, "_set_params_and_buffers_to_ignore_for_model", None
    )
    if hook is None:
        return False
    hook(module, names)
    return True


def optimizer_takes_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` reads `grad_scale` / `found_inf` attributes and skips the update
    on the device when found_inf is nonzero (the fused AdamW/Adam kernels: no host sync)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def abort_process_group() -> bool:
    """Abort every communicator of the default process group without waiting for peers.
    False when this torch cannot (the caller then destroys the group normally)."""
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if abort is None:
        return False
    abort()
    return True
