"""The one place that decides which implementation an op runs.

Order of precedence: an explicit `backend=` argument, then `use_backend(...)`, then the
MINIMIND_FAST_BACKEND environment variable, then "auto" (Triton on CUDA when triton imports,
the PyTorch reference elsewhere). "triton" off-GPU is only allowed under TRITON_INTERPRET=1,
which is how the tests run the real kernels on CPU. Model code never branches on device.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterator, Optional

import torch

BACKEND_ENV = "MINIMIND_FAST_BACKEND"
BACKENDS = ("auto", "triton", "torch")
_override: Optional[str] = None


def _check(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not a backend; use one of {', '.join(BACKENDS)}")
    return name


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # decided once, without importing it


def triton_available() -> bool:
    return _TRITON_INSTALLED


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def choose_backend(device: torch.device, backend: Optional[str] = None) -> str:
    """Resolve to "triton" or "torch" for tensors on `device`."""
    if backend is not None:
        choice = _check(backend, "backend")
    elif _override is not None:
        choice = _override
    else:
        choice = _check(os.environ.get(BACKEND_ENV, "auto"), BACKEND_ENV)
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if choice == "triton":
        if not triton_available():
            raise ValueError("backend='triton' but triton is not installed; pip install 'triton>=3.6,<3.10'")
        if device.type != "cuda" and not triton_interpreted():
            raise ValueError(f"backend='triton' on device {device.type!r} needs TRITON_INTERPRET=1 "
                             "(set before triton is imported) or a CUDA tensor")
    return choice


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend for the ops called inside the block (tests, benchmarks)."""
    global _override
    previous, _override = _override, _check(name, "backend")
    try:
        yield
    finally:
        _override = previous


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an op computes `x` in: the autocast dtype while autocast is on for x's device
    (as F.linear would cast), else x's own dtype."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
