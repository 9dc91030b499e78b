"""Drop-in loss modules over the fused cross-entropy ops.

`CrossEntropyLoss` replaces torch.nn.CrossEntropyLoss for class-index targets (same input
layouts: (C,), (N, C), (N, C, d1, ..., dk); same ignore_index / reduction / label_smoothing
semantics) and adds an optional z-loss. `FusedLinearCrossEntropyLoss` takes the hidden states and
the lm_head weight (and bias, if any) instead of logits (Liger-Kernel's
LigerFusedLinearCrossEntropyLoss idea), so the (N, V) logits are never materialised. Both return
the loss in fp32 whatever the input dtype (torch.nn.CrossEntropyLoss returns the input dtype;
fp64 inputs stay fp64 on the "torch" backend); both dispatch through minimind_fast.ops.
Not supported: per-class `weight` and class-probability (float) targets.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .constants import IGNORE_INDEX
from .ops.cross_entropy import cross_entropy
from .ops.fused_linear_cross_entropy import fused_linear_cross_entropy


class CrossEntropyLoss(nn.Module):
    """loss = CrossEntropyLoss(...)(input, target); input (N, C) or (N, C, d...) logits,
    target (N,) or (N, d...)."""

    def __init__(
        self,
        ignore_index: int = IGNORE_INDEX,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss_scale: float = 0.0,
        backend: Optional[str] = None,
    ):
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss_scale = z_loss_scale
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        if target.dtype.is_floating_point:
            raise ValueError(
                "CrossEntropyLoss: class-probability (float) targets are not "
                "supported; pass class indices or use torch.nn.CrossEntropyLoss"
            )
        if input.dim() >= 3:  # torch layout (N, C, d1, ..., dk): classes on dim 1
            input = input.movedim(1, -1)
        return cross_entropy(
            input,
            target,
            self.ignore_index,
            self.reduction,
            self.label_smoothing,
            self.z_loss_scale,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, z_loss_scale={self.z_loss_scale}"
        )


class FusedLinearCrossEntropyLoss(nn.Module):
    """loss = FusedLinearCrossEntropyLoss(...)(hidden (..., H), weight (V, H), target (...),
    bias (V,) or None).

    Equals CrossEntropyLoss()(F.linear(hidden, weight, bias), target) without holding the
    logits: at most one chunk of `chunk_size` rows (None: automatic) of logits exists at a time.
    """

    def __init__(
        self,
        ignore_index: int = IGNORE_INDEX,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss_scale: float = 0.0,
        chunk_size: Optional[int] = None,
        backend: Optional[str] = None,
    ):
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss_scale = z_loss_scale
        self.chunk_size = chunk_size
        self.backend = backend

    def forward(
        self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None
    ) -> Tensor:
        return fused_linear_cross_entropy(
            hidden,
            weight,
            target,
            self.ignore_index,
            self.reduction,
            self.label_smoothing,
            self.z_loss_scale,
            backend=self.backend,
            chunk_size=self.chunk_size,
            bias=bias,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, z_loss_scale={self.z_loss_scale}, "
            f"chunk_size={self.chunk_size}"
        )


__all__ = ["CrossEntropyLoss", "FusedLinearCrossEntropyLoss"]
