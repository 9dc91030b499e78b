"""Mixed precision: the dtype choice, the autocast context and the GradScaler.

Follows PyTorch's AMP recipe (torch.amp): fp32 master weights, `torch.autocast(device_type=...)`
around the forward pass (never the deprecated `torch.cuda.amp`), and `torch.amp.GradScaler`
only for float16 (bfloat16 has fp32's exponent range and needs no loss scaling).
"""
from __future__ import annotations

import contextlib

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bf16_supported(device: torch.device) -> bool:
    """Whether `device` computes in bfloat16 natively: CUDA compute capability >= 8.0; CPUs
    (torch's CPU autocast supports bfloat16 everywhere, natively or emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return True


def default_dtype_name(device: torch.device) -> str:
    """float32 on CPU; bfloat16 on a GPU that supports it, else float16."""
    if device.type == "cuda":
        return "bfloat16" if bf16_supported(device) else "float16"
    return "float32"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype for --dtype `name`; ValueError when `device` cannot compute in it."""
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    if name == "bfloat16" and not bf16_supported(device):
        what = (f"{torch.cuda.get_device_name(device)} (needs compute capability >= 8.0)"
                if device.type == "cuda" else f"device {device}")
        raise ValueError(f"--dtype bfloat16 is not supported by {what}; use --dtype float16 (or float32)")
    return DTYPES[name]


def autocast_context(device: torch.device, dtype: torch.dtype):
    """Autocast to `dtype` on `device`; a no-op context for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler:
    """A GradScaler that is enabled only for float16 (a disabled one passes everything through)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
