"""RMSNorm ops (placeholder wiring to the reference until the Triton op lands)."""
from __future__ import annotations

from typing import Optional

import torch

from . import reference


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, backend: Optional[str] = None):
    return reference.rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5,
                 backend: Optional[str] = None):
    return reference.add_rms_norm(x, residual, weight, eps)
