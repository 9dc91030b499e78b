"""The one place that decides which implementation an op runs.

Every op has a pure-PyTorch reference, the backend "torch" (the path wherever nothing faster
runs, and the test oracle), and one faster backend. What "auto" picks, per op:

  op                                    backends             auto
  rms_norm, add_rms_norm, apply_rotary, triton, torch        triton on CUDA when triton is
  cross_entropy, fused_linear_ce                             installed, else torch
  moe_route                             ext, torch           ext on every device: the C++/CUDA
                                                             op beats the reference on CPU too
  grouped_linear                        grouped_mm, torch    grouped_mm where it runs these
                                                             inputs (see grouped_mm_runs), else
                                                             torch (a loop of F.linear)
  moe_experts                           grouped, torch       grouped on CUDA and under
                                                             torch.compile where grouped_mm
                                                             runs; else torch (the split loop)

moe_experts' split loop reads the expert sizes on the host: free on CPU, where it also runs
faster than the grouped call (bench/bench_moe.py, test_moe_layer: ours vs ours_grouped); on CUDA
that read is a device sync and under torch.compile a graph break, which the grouped path avoids.

Order of precedence: an explicit `backend=` argument, then `use_backend(name, op=op)`, then
`use_backend(name)`, then the MINIMIND_FAST_BACKEND environment variable, then "auto". The
global settings are "auto", "torch" (every op's reference) and "triton"; an op without a
Triton kernel treats "triton" as "auto". "triton" off-GPU is only allowed under
TRITON_INTERPRET=1, which is how the tests run the real kernels on CPU. Model code never
branches on device: it calls the ops, and the ops ask here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterator, Optional

import torch

from .. import compat

BACKEND_ENV = "MINIMIND_FAST_BACKEND"
BACKENDS = ("auto", "triton", "torch")  # the global settings (use_backend(name), the env var)
OP_BACKENDS = {  # ops whose backends differ from the Triton ops' (triton, torch)
    "moe_route": ("ext", "torch"),
    "grouped_linear": ("grouped_mm", "torch"),
    "moe_experts": ("grouped", "torch"),
}
_overrides: dict[Optional[str], str] = {}  # op name (None: every op) -> forced backend

# decided once, without importing it
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _check(name: str, allowed: tuple[str, ...], source: str) -> str:
    if name not in allowed:
        raise ValueError(f"{source}={name!r} is not a backend; use one of {', '.join(allowed)}")
    return name


def _requested(op: Optional[str], backend: Optional[str]) -> str:
    """The backend asked for (explicitly, by use_backend or by the environment), or "auto"."""
    allowed = BACKENDS if op is None else ("auto", *OP_BACKENDS[op])
    if backend is not None:
        return _check(backend, allowed, f"{op} backend" if op else "backend")
    if op in _overrides:
        return _overrides[op]
    choice = _overrides.get(None) or _check(
        os.environ.get(BACKEND_ENV, "auto"), BACKENDS, BACKEND_ENV
    )
    return choice if choice in allowed else "auto"  # "triton" for an op without a Triton kernel


def triton_available() -> bool:
    return _TRITON_INSTALLED


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def choose_backend(device: torch.device, backend: Optional[str] = None) -> str:
    """A Triton op's backend for tensors on `device`: "triton" or "torch"."""
    choice = _requested(None, backend)
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if choice == "triton":
        if not triton_available():
            raise ValueError(
                "backend='triton' but triton is not installed; pip install 'triton>=3.6,<3.10'"
            )
        if device.type != "cuda" and not triton_interpreted():
            raise ValueError(
                f"backend='triton' on device {device.type!r} needs TRITON_INTERPRET=1 "
                "(set before triton is imported) or a CUDA tensor"
            )
    return choice


def choose_moe_route_backend(backend: Optional[str] = None) -> str:
    """moe_route's backend: "ext" (the registered op) or "torch" (the reference)."""
    return "torch" if _requested("moe_route", backend) == "torch" else "ext"


def grouped_mm_runs(device: torch.device, dtype: torch.dtype, *dims: int) -> bool:
    """Whether torch._grouped_mm runs a grouped GEMM over `dtype` rows of these widths here:
    CPU (fp32, bf16, fp16) or CUDA (bf16: its other dtypes take a slower per-group loop), and
    every row 16-byte aligned."""
    if compat.grouped_mm() is None or device.type not in ("cpu", "cuda"):
        return False
    if device.type == "cuda":
        allowed = (torch.bfloat16,)
    else:
        allowed = (torch.float32, torch.bfloat16, torch.float16)
    return dtype in allowed and all(dim * dtype.itemsize % 16 == 0 for dim in dims)


def choose_grouped_linear_backend(
    device: torch.device, dtype: torch.dtype, dims: tuple[int, int], backend: Optional[str] = None
) -> str:
    """grouped_linear's backend for `dtype` rows of widths dims = (in, out) on `device`."""
    choice = _requested("grouped_linear", backend)
    runs = grouped_mm_runs(device, dtype, *dims)
    if choice == "auto":
        return "grouped_mm" if runs else "torch"
    if choice == "grouped_mm" and not runs:
        raise ValueError(
            f"grouped_linear backend 'grouped_mm' cannot run {dtype} rows of widths "
            f"{dims} on {device.type} (see grouped_mm_runs); use backend='torch'"
        )
    return choice


def choose_moe_experts_backend(
    device: torch.device, dtype: torch.dtype, dims: tuple[int, int], backend: Optional[str] = None
) -> str:
    """moe_experts' backend ("grouped" or "torch") for `dtype` rows of widths
    dims = (hidden, intermediate)."""
    choice = _requested("moe_experts", backend)
    if choice != "auto":
        return choice
    wanted = device.type == "cuda" or torch.compiler.is_compiling()
    return "grouped" if wanted and grouped_mm_runs(device, dtype, *dims) else "torch"


@contextlib.contextmanager
def use_backend(name: str, op: Optional[str] = None) -> Iterator[None]:
    """Force a backend inside the block (tests, benchmarks): for every op, or for `op` only
    (one of OP_BACKENDS, with its own backend names)."""
    if op is None:
        _check(name, BACKENDS, "backend")
    elif op not in OP_BACKENDS:
        raise ValueError(
            f"op={op!r} has no backend of its own to force; use one of "
            f"{', '.join(OP_BACKENDS)}, or op=None for every op"
        )
    else:
        _check(name, ("auto", *OP_BACKENDS[op]), f"{op} backend")
    had, previous = op in _overrides, _overrides.get(op)
    _overrides[op] = name
    try:
        yield
    finally:
        if had:
            _overrides[op] = previous
        else:
            del _overrides[op]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an op computes `x` in: the autocast dtype while autocast is on for x's device
    (as F.linear would cast), else x's own dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype
