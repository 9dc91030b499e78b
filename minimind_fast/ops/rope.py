"""RoPE ops (placeholder wiring to the reference until the Triton op lands)."""
from __future__ import annotations

from typing import Optional

import torch

from . import reference
from .reference import rope_tables  # noqa: F401  (re-exported)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 backend: Optional[str] = None):
    return reference.apply_rotary(q, k, cos, sin)
