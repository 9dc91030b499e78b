"""Dtype names and what a device can compute in: the one home for `--dtype` and `--device`.

- `DTYPES`: the names the CLIs accept -> torch dtypes.
- `bf16_supported(device)`, `resolve_dtype(name, device)`: a name checked against the device.
- `default_dtype_name(device)`: training's default (PyTorch's AMP recipe: bf16 where the GPU has
  it, else fp16 with a GradScaler; fp32 on CPU, where autocast is slower than fp32 matmuls).
- `inference_dtype(device)`: the autocast dtype for sampling, the training default, so a model
  samples in the precision it was trained in.
- `resolve_device(name)`: a `--device` value checked against this torch build and machine.
"""

from __future__ import annotations

from typing import Optional

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


def resolve_dtype(name: str, device: torch.device, flag: str = "--dtype") -> torch.dtype:
    """The torch dtype for `name`; ValueError when it is unknown or `device` cannot compute in
    it."""
    if name not in DTYPES:
        raise ValueError(f"{flag} {name!r} is not supported; use one of {', '.join(DTYPES)}")
    if name == "bfloat16" and not bf16_supported(device):
        what = (
            f"{torch.cuda.get_device_name(device)} (needs compute capability >= 8.0)"
            if device.type == "cuda"
            else f"device {device}"
        )
        raise ValueError(
            f"{flag} bfloat16 is not supported by {what}; use {flag} float16 (or float32)"
        )
    return DTYPES[name]


def inference_dtype(device: torch.device) -> torch.dtype:
    """The dtype sampling autocasts to on `device` (float32: no autocast)."""
    return DTYPES[default_dtype_name(device)]


def resolve_device(name: Optional[str], flag: str = "--device") -> torch.device:
    """`name` (None: cuda when available, else cpu) as a device this process can run on."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"{flag} {name} is not a device torch knows; use {flag} cpu or cuda[:N]"
        ) from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise ValueError(
                f"{flag} {name}: this torch build has no CUDA support (a CPU-only "
                f"wheel); use {flag} cpu, or install a CUDA build of torch"
            )
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"{flag} {name}: no CUDA GPU is visible (check CUDA_VISIBLE_DEVICES "
                f"and the driver); use {flag} cpu"
            )
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"{flag} {name}: only {count} CUDA device(s) are visible "
                f"(cuda:0..cuda:{count - 1}); pick one of them"
            )
        return device
    if device.type == "mps" and torch.backends.mps.is_available():
        return device
    raise ValueError(
        f"{flag} {name}: minimind_fast runs on cpu and cuda devices; use {flag} cpu or cuda"
    )
