"""Cross-entropy: the registered op, its autograd and dispatch, and the helpers it shares with
the fused linear + cross-entropy (ops/fused_linear_cross_entropy.py).

Semantics are those of minimind_fast.ops.reference.cross_entropy (the oracle): mean over
non-ignored targets (an all-ignored batch gives 0 and zero gradients; the count stays a device
tensor), label smoothing as in torch.nn.CrossEntropyLoss, optional z-loss (scale * lse^2).
Precision: fp32 losses for fp32/bf16/fp16; float64 runs in float64 on "torch" (gradcheck
passes) and is refused by "triton". Edge rows: an ignored row gives loss 0 and gradient 0
whatever its logits; otherwise as F.cross_entropy (a -inf target logit: loss +inf, finite
gradient; a +inf or NaN logit, or only -inf: NaN in that row).

Dispatch (choose_backend): "torch" runs reference.cross_entropy (PyTorch ops; inductor fuses
it); "triton" runs the op minimind_fast::cross_entropy, one launch for per-row losses and
dlogits, whose backward, minimind_fast::cross_entropy_backward, scales dlogits.

Out-of-range targets (not ignore_index, outside [0, V)) raise ValueError when the check costs no
host sync (CPU tensors) or when MINIMIND_FAST_DEBUG=1; otherwise the Triton kernel makes that
row's loss and gradient NaN (and the torch path's gather raises a device-side assert).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from ..constants import IGNORE_INDEX
from . import reference
from .checks import check_floating, check_same_device, check_triton_dtypes
from .dispatch import choose_backend

DEBUG_ENV = "MINIMIND_FAST_DEBUG"
REDUCTIONS = ("mean", "sum", "none")


# ------------------------------------------- helpers (shared with fused_linear_cross_entropy)
def check_loss_args(reduction: str, label_smoothing: float, z_loss_scale: float) -> None:
    """ValueError for an unknown reduction or an out-of-range smoothing or z-loss scale."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} must be 'mean', 'sum' or 'none'")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1]")
    if z_loss_scale < 0.0:
        raise ValueError(f"z_loss_scale={z_loss_scale} must be >= 0")


def check_targets(op: str, targets: Tensor, num_classes: int, ignore_index: int) -> None:
    """ValueError for a target outside [0, V) that is not ignore_index; skipped where it would
    cost a host sync (CUDA outside debug mode)."""
    if targets.device.type != "cpu" and os.environ.get(DEBUG_ENV, "0") != "1":
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= num_classes))
    if bool(bad.any()):
        value = int(targets[bad][0])
        raise ValueError(
            f"{op}: target {value} is outside [0, {num_classes}) and is not "
            f"ignore_index={ignore_index}; fix the labels or the vocabulary size"
        )


def _valid_count(targets: Tensor, ignore_index: int) -> Tensor:
    """Number of non-ignored targets as a device tensor, at least 1 (the mean's normaliser)."""
    return (targets != ignore_index).sum().clamp(min=1)


def reduce_losses(loss_rows: Tensor, targets: Tensor, ignore_index: int, reduction: str) -> Tensor:
    """Per-row losses (N,) reduced as asked (reference.reduce_rows)."""
    return reference.reduce_rows(loss_rows, targets != ignore_index, reduction)


def grad_scale(grad_loss: Tensor, targets: Tensor, ignore_index: int, reduction: str) -> Tensor:
    """Upstream gradient of the per-row losses: 0-dim for mean/sum, (N,) for none."""
    if reduction == "mean":
        return grad_loss / _valid_count(targets, ignore_index)
    return grad_loss


def flatten_rows(inputs: Tensor, targets: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """inputs (..., D), targets (...) -> (rows, D), (rows,)."""
    if inputs.dim() < 1 or targets.shape != inputs.shape[:-1]:
        raise ValueError(
            f"{name}: input {tuple(inputs.shape)} must be (..., D) with targets of "
            f"shape (...), got targets {tuple(targets.shape)}"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(
            f"{name}: targets must be class indices (an integer dtype), got {targets.dtype}"
        )
    check_floating(name, input=inputs)
    check_same_device(name, input=inputs, targets=targets)
    rows = targets.numel()  # not reshape(-1, D): that is ambiguous when D = 0
    return inputs.reshape(rows, inputs.shape[-1]), targets.reshape(rows)


# ------------------------------------------------------------------------- cross-entropy op
@torch.library.custom_op("minimind_fast::cross_entropy", mutates_args=())
def _cross_entropy_op(
    logits: Tensor,
    targets: Tensor,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss_scale: float,
    compute_grad: bool,
) -> tuple[Tensor, Tensor]:
    """(loss, dlogits): loss reduced as asked; dlogits (N, V) = dloss_rows/dlogits, or empty."""
    from ..kernels.cross_entropy import cross_entropy_forward

    check_targets("cross_entropy", targets, logits.shape[1], ignore_index)
    loss_rows, dlogits = cross_entropy_forward(
        logits, targets, ignore_index, label_smoothing, z_loss_scale, compute_grad
    )
    if dlogits is None:
        dlogits = logits.new_empty(0)
    return reduce_losses(loss_rows, targets, ignore_index, reduction), dlogits


@_cross_entropy_op.register_fake
def _(logits, targets, ignore_index, reduction, label_smoothing, z_loss_scale, compute_grad):
    loss_shape = (logits.shape[0],) if reduction == "none" else ()
    grad_shape = tuple(logits.shape) if compute_grad else (0,)
    return logits.new_empty(loss_shape, dtype=torch.float32), logits.new_empty(grad_shape)


@torch.library.custom_op("minimind_fast::cross_entropy_backward", mutates_args=())
def _cross_entropy_backward_op(dlogits: Tensor, scale: Tensor) -> Tensor:
    """dlogits (N, V) * scale (0-dim, or (N,) with any stride), in dlogits' dtype."""
    from ..kernels.cross_entropy import cross_entropy_backward

    return cross_entropy_backward(dlogits, scale)


@_cross_entropy_backward_op.register_fake
def _(dlogits, scale):
    return torch.empty_like(dlogits, memory_format=torch.contiguous_format)


def _cross_entropy_setup(ctx, inputs, output):
    _, targets, ignore_index, reduction, _, _, compute_grad = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1], targets)
    ctx.ignore_index, ctx.reduction, ctx.compute_grad = ignore_index, reduction, compute_grad


def _cross_entropy_backward(ctx, grad_loss, _grad_dlogits):
    dlogits, targets = ctx.saved_tensors
    if not ctx.compute_grad:
        raise RuntimeError(
            "cross_entropy was called with compute_grad=False; no gradient was stored"
        )
    scale = grad_scale(grad_loss, targets, ctx.ignore_index, ctx.reduction)
    grad = torch.ops.minimind_fast.cross_entropy_backward(dlogits, scale)
    return (grad,) + (None,) * 6


torch.library.register_autograd(
    "minimind_fast::cross_entropy", _cross_entropy_backward, setup_context=_cross_entropy_setup
)


def cross_entropy(
    logits: Tensor,
    targets: Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss_scale: float = 0.0,
    backend: Optional[str] = None,
) -> Tensor:
    """Cross-entropy of logits (N, V) (or (..., V)) against class indices targets (N,) (or (...)).

    Returns a scalar for mean/sum, (N,) (or (...)) for none (0 at ignored rows), in fp32 (fp64
    for fp64 logits, "torch" backend only). mean averages over non-ignored targets; an
    all-ignored batch gives 0 with zero gradients.
    """
    check_loss_args(reduction, label_smoothing, z_loss_scale)
    batch_shape = targets.shape
    logits2d, targets1d = flatten_rows(logits, targets, "cross_entropy")
    if logits2d.shape[1] == 0:
        raise ValueError(
            f"cross_entropy: logits {tuple(logits.shape)} have V=0 classes; the last "
            "dimension must hold one logit per class (at least one)"
        )
    if choose_backend(logits.device, backend) == "torch":
        if not torch.compiler.is_compiling():
            check_targets("cross_entropy", targets1d, logits2d.shape[1], ignore_index)
        loss = reference.cross_entropy(
            logits2d, targets1d, ignore_index, reduction, label_smoothing, z_loss_scale
        )
    else:
        check_triton_dtypes("cross_entropy", logits=logits)
        compute_grad = torch.is_grad_enabled() and logits.requires_grad
        loss, _ = torch.ops.minimind_fast.cross_entropy(
            logits2d,
            targets1d,
            int(ignore_index),
            reduction,
            float(label_smoothing),
            float(z_loss_scale),
            compute_grad,
        )
    return loss.reshape(batch_shape) if reduction == "none" else loss
