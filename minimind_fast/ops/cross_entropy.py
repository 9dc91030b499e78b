"""Cross-entropy ops (placeholder wiring to the reference until the Triton op lands)."""
from __future__ import annotations

from typing import Optional

import torch

from ..constants import IGNORE_INDEX
from . import reference


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                  reduction: str = "mean", label_smoothing: float = 0.0, z_loss_scale: float = 0.0,
                  backend: Optional[str] = None):
    return reference.cross_entropy(logits, targets, ignore_index, reduction, label_smoothing, z_loss_scale)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = IGNORE_INDEX, reduction: str = "mean",
                               label_smoothing: float = 0.0, z_loss_scale: float = 0.0,
                               backend: Optional[str] = None):
    return reference.fused_linear_cross_entropy(hidden, weight, targets, ignore_index, reduction,
                                                label_smoothing, z_loss_scale)
