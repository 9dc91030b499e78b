"""Mixed precision: the autocast context and the GradScaler (the dtype names and what a device
supports are minimind_fast/dtypes.py).

Follows PyTorch's AMP recipe (torch.amp): fp32 master weights, `torch.autocast(device_type=...)`
around the forward pass (never the deprecated `torch.cuda.amp`), and `torch.amp.GradScaler`
only for float16 (bfloat16 has fp32's exponent range and needs no loss scaling).
"""

from __future__ import annotations

import contextlib

import torch


def autocast_context(device: torch.device, dtype: torch.dtype):
    """Autocast to `dtype` on `device`; a no-op context for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler:
    """A GradScaler that is enabled only for float16 (a disabled one passes everything through)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
