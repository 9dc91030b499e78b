"""Input checks shared by the op wrappers (rms_norm, apply_rotary, cross_entropy, fused linear
cross-entropy): floating-point dtypes, one device and the Triton kernels' dtypes, as one-line
ValueErrors naming the argument, the value and the fix, before a kernel or the reference sees
the tensors (which would otherwise compute garbage in integer arithmetic, or fail with
PyTorch's generic device message)."""

from __future__ import annotations

import torch

# What every Triton kernel computes: float64 stays on the PyTorch reference, which keeps it.
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_floating(op: str, **tensors: torch.Tensor) -> None:
    """ValueError unless every tensor has a floating-point dtype."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise ValueError(
                f"{op}: {name} must be a floating-point tensor, got {tensor.dtype}; "
                f"cast it first (e.g. {name}.float())"
            )


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    """ValueError unless all tensors live on one device."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, tensor in items[1:]:
        if tensor.device != first.device:
            raise ValueError(
                f"{op}: {name} is on {tensor.device} but {first_name} is on "
                f"{first.device}; move them to one device "
                f"(e.g. {name}.to({first_name}.device))"
            )


def check_triton_dtypes(op: str, **tensors: torch.Tensor) -> None:
    """ValueError unless every tensor is float32, bfloat16 or float16 (what the kernels take)."""
    for name, tensor in tensors.items():
        if tensor.dtype not in TRITON_DTYPES:
            raise ValueError(
                f"{op}: the Triton kernel takes float32/bfloat16/float16, but "
                f"{name} is {tensor.dtype}; use backend='torch' (float64 stays "
                "float64 there)"
            )
