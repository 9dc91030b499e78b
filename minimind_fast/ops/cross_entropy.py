"""Cross-entropy and fused linear + cross-entropy: registered ops, autograd and dispatch.

Semantics are those of minimind_fast.ops.reference.cross_entropy (the oracle): fp32 maths,
mean over non-ignored targets, label smoothing as in torch.nn.CrossEntropyLoss, optional
z-loss (scale * lse^2), loss returned in fp32. An all-ignored batch gives loss 0 and zero
gradients (mean divides by max(count, 1), never by 0). The count is a device tensor: no .item().

Dispatch (choose_backend, one place):
  cross_entropy              "torch"  -> the plain reference (PyTorch ops; inductor fuses it)
                             "triton" -> op minimind_fast::cross_entropy: one Triton launch gives
                                         per-row losses and dlogits (logits' dtype); the backward,
                                         minimind_fast::cross_entropy_bwd, only scales dlogits.
  fused_linear_cross_entropy both     -> op minimind_fast::fused_linear_cross_entropy: Liger-style
                                         chunking over N so one (chunk, V) block of logits exists
                                         at a time; per chunk the CE grad is formed in place
                                         (Triton kernel, or PyTorch ops on "torch"), then
                                         dh = dlogits @ W and dW += dlogits.T @ h (fp32). The
                                         unfused oracle stays reference.fused_linear_cross_entropy.
With mean/sum the fused op does all the work in forward and its backward scales the saved dh,
dW by grad_output; with reduction="none" (per-row upstream grads) the forward computes losses
only and the backward re-runs the chunk loop with the per-row scale (op ..._bwd).

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
from .checks import check_floating, check_same_device
from .dispatch import choose_backend, compute_dtype

DEBUG_ENV = "MINIMIND_FAST_DEBUG"
REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------------- helpers
def _check_args(reduction: str, label_smoothing: float, z_loss_scale: float) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} must be 'mean', 'sum' or 'none'")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1]")
    if z_loss_scale < 0.0:
        raise ValueError(f"z_loss_scale={z_loss_scale} must be >= 0")


def _check_targets(targets: Tensor, num_classes: int, ignore_index: int) -> None:
    """ValueError for a target outside [0, V) that is not ignore_index; skipped where it would sync."""
    if targets.device.type != "cpu" and os.environ.get(DEBUG_ENV, "0") != "1":
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= num_classes))
    if bool(bad.any()):
        value = int(targets[bad][0])
        raise ValueError(f"cross_entropy: target {value} is outside [0, {num_classes}) and is not "
                         f"ignore_index={ignore_index}; fix the labels or the vocabulary size")


def _valid_count(targets: Tensor, ignore_index: int) -> Tensor:
    """Number of non-ignored targets as a device tensor, at least 1 (the mean's normaliser)."""
    return (targets != ignore_index).sum().clamp(min=1)


def _reduce(loss_rows: Tensor, targets: Tensor, ignore_index: int, reduction: str) -> Tensor:
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows.sum() / _valid_count(targets, ignore_index)


def _grad_scale(grad_loss: Tensor, targets: Tensor, ignore_index: int, reduction: str) -> Tensor:
    """Upstream gradient of the per-row losses: 0-dim for mean/sum, (N,) for none."""
    if reduction == "mean":
        return grad_loss / _valid_count(targets, ignore_index)
    return grad_loss


def _flatten(inputs: Tensor, targets: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """inputs (..., D), targets (...) -> (rows, D), (rows,)."""
    if inputs.dim() < 1 or targets.shape != inputs.shape[:-1]:
        raise ValueError(f"{name}: input {tuple(inputs.shape)} must be (..., D) with targets of shape (...), "
                         f"got targets {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"{name}: targets must be class indices (an integer dtype), got {targets.dtype}")
    check_floating(name, input=inputs)
    check_same_device(name, input=inputs, targets=targets)
    return inputs.reshape(-1, inputs.shape[-1]), targets.reshape(-1)


# ------------------------------------------------------------------------- cross-entropy op
@torch.library.custom_op("minimind_fast::cross_entropy", mutates_args=())
def _cross_entropy_op(logits: Tensor, targets: Tensor, ignore_index: int, reduction: str,
                      label_smoothing: float, z_loss_scale: float, compute_grad: bool) -> tuple[Tensor, Tensor]:
    """(loss, dlogits): loss reduced as asked; dlogits (N, V) = dloss_rows/dlogits, or empty."""
    from ..kernels.cross_entropy import cross_entropy_fwd

    _check_targets(targets, logits.shape[1], ignore_index)
    loss_rows, dlogits = cross_entropy_fwd(logits, targets, ignore_index, label_smoothing, z_loss_scale,
                                           compute_grad)
    if dlogits is None:
        dlogits = logits.new_empty(0)
    return _reduce(loss_rows, targets, ignore_index, reduction), dlogits


@_cross_entropy_op.register_fake
def _(logits, targets, ignore_index, reduction, label_smoothing, z_loss_scale, compute_grad):
    loss_shape = (logits.shape[0],) if reduction == "none" else ()
    grad_shape = tuple(logits.shape) if compute_grad else (0,)
    return logits.new_empty(loss_shape, dtype=torch.float32), logits.new_empty(grad_shape)


@torch.library.custom_op("minimind_fast::cross_entropy_bwd", mutates_args=())
def _cross_entropy_bwd_op(dlogits: Tensor, scale: Tensor) -> Tensor:
    """dlogits (N, V) * scale (0-dim, or (N,) with any stride), in dlogits' dtype."""
    from ..kernels.cross_entropy import cross_entropy_bwd

    return cross_entropy_bwd(dlogits, scale)


@_cross_entropy_bwd_op.register_fake
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
        raise RuntimeError("cross_entropy was called with compute_grad=False; no gradient was stored")
    scale = _grad_scale(grad_loss, targets, ctx.ignore_index, ctx.reduction)
    return torch.ops.minimind_fast.cross_entropy_bwd(dlogits, scale), None, None, None, None, None, None


torch.library.register_autograd("minimind_fast::cross_entropy", _cross_entropy_backward,
                                setup_context=_cross_entropy_setup)


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX,
                  reduction: str = "mean", label_smoothing: float = 0.0, z_loss_scale: float = 0.0,
                  backend: Optional[str] = None) -> Tensor:
    """Cross-entropy of logits (N, V) (or (..., V)) against class indices targets (N,) (or (...)).

    Returns an fp32 scalar for mean/sum, fp32 (N,) (or (...)) for none (0 at ignored rows).
    mean averages over non-ignored targets; an all-ignored batch gives 0 with zero gradients.
    """
    _check_args(reduction, label_smoothing, z_loss_scale)
    batch_shape = targets.shape
    logits2d, targets1d = _flatten(logits, targets, "cross_entropy")
    if choose_backend(logits.device, backend) == "torch":
        if not torch.compiler.is_compiling():
            _check_targets(targets1d, logits2d.shape[1], ignore_index)
        loss = reference.cross_entropy(logits2d, targets1d, ignore_index, reduction, label_smoothing, z_loss_scale)
    else:
        compute_grad = torch.is_grad_enabled() and logits.requires_grad
        loss, _ = torch.ops.minimind_fast.cross_entropy(logits2d, targets1d, int(ignore_index), reduction,
                                                        float(label_smoothing), float(z_loss_scale), compute_grad)
    return loss.reshape(batch_shape) if reduction == "none" else loss


# --------------------------------------------------------- fused linear + cross-entropy op
def default_chunk_size(n_rows: int, vocab: int, hidden: int) -> int:
    """Liger's heuristic: rows per chunk so a chunk of logits (rows, V) is about N * H elements."""
    growth = max(1, -(-vocab // max(hidden, 1)))
    rows = -(-n_rows // growth)
    return 1 << max(rows - 1, 0).bit_length()


_HALF_GEMM_INTO_FP32 = {"cuda": ["addmm", "mm"]}  # device type -> fp32-output GEMMs still to try


def _accumulate_fp32(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc (fp32) += a @ b. Half inputs on CUDA: a GEMM with fp32 output (aten mm/addmm.dtype),
    so each chunk's partial dW is never rounded; elsewhere (or if that overload is refused) the
    half GEMM's output is rounded once per chunk, then summed in fp32."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    candidates = _HALF_GEMM_INTO_FP32.get(a.device.type, [])
    while candidates:
        try:
            if candidates[0] == "addmm":
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            else:
                acc.add_(torch.mm(a, b, out_dtype=torch.float32))
            return
        except (RuntimeError, TypeError):  # this torch/GPU refuses it: never try it again
            candidates.pop(0)
    acc.add_(torch.mm(a, b))


def _torch_loss_and_grad(logits: Tensor, targets: Tensor, ignore_index: int, label_smoothing: float,
                         z_loss_scale: float, compute_grad: bool, row_scale: Optional[Tensor],
                         ) -> tuple[Tensor, Optional[Tensor]]:
    """PyTorch twin of the Triton kernel for one chunk; may overwrite `logits` (fp32) in place."""
    x = logits.float()
    n_cols = x.shape[1]
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    lse = torch.logsumexp(x, dim=-1)
    loss = lse - x.gather(1, safe_targets[:, None]).squeeze(1)
    if label_smoothing > 0.0:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - x.mean(dim=-1))
    if z_loss_scale > 0.0:
        loss = loss + z_loss_scale * lse.square()
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if not compute_grad:
        return loss, None
    row_coeff = valid.float() if row_scale is None else valid.float() * row_scale.float()
    p_coeff = row_coeff * (1.0 + 2.0 * z_loss_scale * lse) if z_loss_scale > 0.0 else row_coeff
    grad = x.sub_(lse[:, None]).exp_().mul_(p_coeff[:, None])
    if label_smoothing > 0.0:
        grad.sub_((label_smoothing / n_cols) * row_coeff[:, None])
    grad.scatter_add_(1, safe_targets[:, None], (-(1.0 - label_smoothing) * row_coeff)[:, None])
    return loss, grad.to(logits.dtype)


def _chunk_loop(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, label_smoothing: float,
                z_loss_scale: float, chunk_size: int, backend: str, row_scale: Optional[Tensor],
                grad_hidden: bool, grad_weight: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row losses (N,) fp32, dh (N, H) in hidden's dtype and dW (V, H) in weight's dtype
    (empty where not asked), holding one (chunk, V) block of logits at a time."""
    n_rows, n_hidden = hidden.shape
    vocab = weight.shape[0]
    _check_targets(targets, vocab, ignore_index)
    chunk = chunk_size if chunk_size > 0 else default_chunk_size(n_rows, vocab, n_hidden)
    compute_grad = grad_hidden or grad_weight
    loss_rows = hidden.new_empty(n_rows, dtype=torch.float32)
    dh = hidden.new_empty((n_rows, n_hidden) if grad_hidden else (0,))
    dw32 = weight.new_zeros((vocab, n_hidden), dtype=torch.float32) if grad_weight else None
    if backend == "triton":
        from ..kernels.cross_entropy import cross_entropy_fwd
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, n_rows, chunk):
            end = min(start + chunk, n_rows)
            h = hidden[start:end]
            logits = torch.mm(h, weight.t())
            scale = None if row_scale is None else row_scale[start:end]
            if backend == "triton":
                cross_entropy_fwd(logits, targets[start:end], ignore_index, label_smoothing, z_loss_scale,
                                  compute_grad, grad_out=logits, loss_out=loss_rows[start:end], row_scale=scale)
                dlogits = logits
            else:
                loss_rows[start:end], dlogits = _torch_loss_and_grad(
                    logits, targets[start:end], ignore_index, label_smoothing, z_loss_scale, compute_grad, scale)
            if grad_hidden:
                torch.mm(dlogits, weight, out=dh[start:end])
            if grad_weight:
                _accumulate_fp32(dw32, dlogits.t(), h)
            del logits, dlogits
    dw = dw32.to(weight.dtype) if grad_weight else weight.new_empty(0)
    return loss_rows, dh, dw


@torch.library.custom_op("minimind_fast::fused_linear_cross_entropy", mutates_args=())
def _fused_linear_cross_entropy_op(
        hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, reduction: str,
        label_smoothing: float, z_loss_scale: float, chunk_size: int, backend: str,
        grad_hidden: bool, grad_weight: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, dh, dW) with dh, dW the gradients of the per-row losses summed (mean/sum only)."""
    if reduction == "none":
        grad_hidden = grad_weight = False  # per-row upstream grads: the backward recomputes
    loss_rows, dh, dw = _chunk_loop(hidden, weight, targets, ignore_index, label_smoothing, z_loss_scale,
                                    chunk_size, backend, None, grad_hidden, grad_weight)
    return _reduce(loss_rows, targets, ignore_index, reduction), dh, dw


@_fused_linear_cross_entropy_op.register_fake
def _(hidden, weight, targets, ignore_index, reduction, label_smoothing, z_loss_scale, chunk_size, backend,
      grad_hidden, grad_weight):
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else (), dtype=torch.float32)
    keep = reduction != "none"
    dh = hidden.new_empty(tuple(hidden.shape) if grad_hidden and keep else (0,))
    dw = weight.new_empty(tuple(weight.shape) if grad_weight and keep else (0,))
    return loss, dh, dw


@torch.library.custom_op("minimind_fast::fused_linear_cross_entropy_bwd", mutates_args=())
def _fused_linear_cross_entropy_bwd_op(
        hidden: Tensor, weight: Tensor, targets: Tensor, grad_loss: Tensor, ignore_index: int,
        label_smoothing: float, z_loss_scale: float, chunk_size: int, backend: str,
        grad_hidden: bool, grad_weight: bool) -> tuple[Tensor, Tensor]:
    """(dh, dW) for reduction='none': the chunk loop again, each row's gradient times grad_loss[row]."""
    _, dh, dw = _chunk_loop(hidden, weight, targets, ignore_index, label_smoothing, z_loss_scale,
                            chunk_size, backend, grad_loss, grad_hidden, grad_weight)
    return dh, dw


@_fused_linear_cross_entropy_bwd_op.register_fake
def _(hidden, weight, targets, grad_loss, ignore_index, label_smoothing, z_loss_scale, chunk_size, backend,
      grad_hidden, grad_weight):
    return (hidden.new_empty(tuple(hidden.shape) if grad_hidden else (0,)),
            weight.new_empty(tuple(weight.shape) if grad_weight else (0,)))


def _fused_setup(ctx, inputs, output):
    hidden, weight, targets, ignore_index, reduction, smoothing, z_loss, chunk, backend, g_h, g_w = inputs
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.options = (ignore_index, smoothing, z_loss, chunk, backend, g_h, g_w)
    ctx.reduction = reduction
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, targets)
    else:
        ctx.save_for_backward(output[1], output[2], targets)


def _fused_backward(ctx, grad_loss, _grad_dh, _grad_dw):
    ignore_index, smoothing, z_loss, chunk, backend, grad_hidden, grad_weight = ctx.options
    if (ctx.needs_input_grad[0] and not grad_hidden) or (ctx.needs_input_grad[1] and not grad_weight):
        raise RuntimeError("fused_linear_cross_entropy: a gradient is needed that the forward was told "
                           "to skip (grad_hidden/grad_weight); call it through ops.fused_linear_cross_entropy")
    if ctx.reduction == "none":
        hidden, weight, targets = ctx.saved_tensors
        dh, dw = torch.ops.minimind_fast.fused_linear_cross_entropy_bwd(
            hidden, weight, targets, grad_loss, ignore_index, smoothing, z_loss, chunk, backend,
            grad_hidden, grad_weight)
    else:
        dh, dw, targets = ctx.saved_tensors
        scale = _grad_scale(grad_loss, targets, ignore_index, ctx.reduction)
        dh, dw = dh * scale, dw * scale
    return (dh if grad_hidden else None, dw if grad_weight else None) + (None,) * 9


torch.library.register_autograd("minimind_fast::fused_linear_cross_entropy", _fused_backward,
                                setup_context=_fused_setup)


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX,
                               reduction: str = "mean", label_smoothing: float = 0.0, z_loss_scale: float = 0.0,
                               backend: Optional[str] = None, chunk_size: Optional[int] = None) -> Tensor:
    """cross_entropy(hidden (N, H) @ weight (V, H).T, targets (N,)) without materialising (N, V).

    hidden may be (..., H) with targets (...). chunk_size: rows of logits per chunk (None: Liger's
    heuristic, chunk logits ~ N * H elements). Under autocast, hidden and weight are cast to the
    autocast dtype first, as F.linear would. Returns fp32 like cross_entropy.
    """
    _check_args(reduction, label_smoothing, z_loss_scale)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be a positive number of rows (or None for auto)")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy: hidden {tuple(hidden.shape)} must be (..., H) and "
                         f"weight {tuple(weight.shape)} must be (V, H)")
    check_floating("fused_linear_cross_entropy", hidden=hidden, weight=weight)
    check_same_device("fused_linear_cross_entropy", hidden=hidden, weight=weight, targets=targets)
    if torch.is_autocast_enabled(hidden.device.type):  # cast both, as F.linear would
        dtype = compute_dtype(hidden)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    if hidden.dtype != weight.dtype:
        raise ValueError(f"fused_linear_cross_entropy: hidden is {hidden.dtype} but weight is {weight.dtype}; "
                         "cast one of them or run under torch.autocast")
    batch_shape = targets.shape
    hidden2d, targets1d = _flatten(hidden, targets, "fused_linear_cross_entropy")
    grad_enabled = torch.is_grad_enabled()
    loss, _, _ = torch.ops.minimind_fast.fused_linear_cross_entropy(
        hidden2d, weight, targets1d, int(ignore_index), reduction, float(label_smoothing), float(z_loss_scale),
        int(chunk_size or 0), choose_backend(hidden.device, backend),
        grad_enabled and hidden.requires_grad, grad_enabled and weight.requires_grad)
    return loss.reshape(batch_shape) if reduction == "none" else loss
