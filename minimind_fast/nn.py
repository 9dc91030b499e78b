"""Drop-in nn.Modules over the fused ops (MiniMind's RMSNorm: same constructor, parameter and
numerics).

    norm = RMSNorm(hidden_size, eps=1e-5)          # parameter `weight` (H,), initialised to ones
    y = norm(x)                                    # ops.rms_norm(x, norm.weight, norm.eps)

Fused residual add + norm, a pre-norm block's `residual = residual + branch; h = norm(residual)`:

    h, residual = norm.add_forward(branch_out, residual)
    # same as ops.add_rms_norm(branch_out, residual, norm.weight, norm.eps): one kernel reads both
    # inputs once and writes `residual + branch_out` and its normalised form; gradients reach both.

The backend (Triton on CUDA, the PyTorch reference elsewhere) is chosen by ops.dispatch; pass
nothing to follow it, or use ops.use_backend(...) / MINIMIND_FAST_BACKEND to force one.
Precision as ops.rms_norm: fp32 maths for fp32/bf16/fp16 inputs, float64 kept on the reference.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops


class RMSNorm(nn.Module):
    """y = normalise(x in fp32).to(x.dtype) * weight.  x: (..., hidden_size)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (self(residual + x), residual + x) in one fused pass."""
        return ops.add_rms_norm(x, residual, self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
