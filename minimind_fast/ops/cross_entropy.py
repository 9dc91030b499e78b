"""Cross-entropy and fused linear + cross-entropy: registered ops, autograd and dispatch.

Semantics are those of minimind_fast.ops.reference.cross_entropy (the oracle): mean over
non-ignored targets (an all-ignored batch gives 0 and zero gradients; the count stays a device
tensor), label smoothing as in torch.nn.CrossEntropyLoss, optional z-loss (scale * lse^2).
Precision: fp32 losses for fp32/bf16/fp16; float64 runs in float64 on "torch" (gradcheck
passes) and is refused by "triton". Edge rows: an ignored row gives loss 0 and gradient 0
whatever its logits; otherwise as F.cross_entropy (a -inf target logit: loss +inf, finite
gradient; a +inf or NaN logit, or only -inf: NaN in that row).

Dispatch (choose_backend):
  cross_entropy   "torch": reference.cross_entropy (PyTorch ops; inductor fuses it). "triton":
                  op minimind_fast::cross_entropy, one launch for per-row losses and dlogits;
                  its backward, minimind_fast::cross_entropy_backward, scales dlogits.
  fused_linear_cross_entropy   op minimind_fast::fused_linear_cross_entropy on both: chunks of
                  rows, one (chunk, V) block of logits at a time, its CE gradient formed in place
                  (the Triton kernel, or reference.cross_entropy_loss_and_grad), then
                  dh = dlogits @ W, dW += dlogits.T @ h, db += sum dlogits.
With mean/sum the fused op does all the work in forward (dW, db kept in fp32) and its backward
applies the reduction scale and grad_output before casting; with reduction="none" the backward
re-runs the chunk loop with the per-row scale (minimind_fast::fused_linear_cross_entropy_backward).

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
from .dispatch import choose_backend, compute_dtype

DEBUG_ENV = "MINIMIND_FAST_DEBUG"
REDUCTIONS = ("mean", "sum", "none")
FLCE = "fused_linear_cross_entropy"


# ----------------------------------------------------------------------------------- helpers
def _check_args(reduction: str, label_smoothing: float, z_loss_scale: float) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} must be 'mean', 'sum' or 'none'")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1]")
    if z_loss_scale < 0.0:
        raise ValueError(f"z_loss_scale={z_loss_scale} must be >= 0")


def _check_targets(op: str, targets: Tensor, num_classes: int, ignore_index: int) -> None:
    """ValueError for a target outside [0, V) that is not ignore_index; skipped where it would
    cost a host sync (CUDA outside debug mode)."""
    if targets.device.type != "cpu" and os.environ.get(DEBUG_ENV, "0") != "1":
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= num_classes))
    if bool(bad.any()):
        value = int(targets[bad][0])
        raise ValueError(f"{op}: target {value} is outside [0, {num_classes}) and is not "
                         f"ignore_index={ignore_index}; fix the labels or the vocabulary size")


def _valid_count(targets: Tensor, ignore_index: int) -> Tensor:
    """Number of non-ignored targets as a device tensor, at least 1 (the mean's normaliser)."""
    return (targets != ignore_index).sum().clamp(min=1)


def _reduce(loss_rows: Tensor, targets: Tensor, ignore_index: int, reduction: str) -> Tensor:
    return reference.reduce_rows(loss_rows, targets != ignore_index, reduction)


def _grad_scale(grad_loss: Tensor, targets: Tensor, ignore_index: int, reduction: str) -> Tensor:
    """Upstream gradient of the per-row losses: 0-dim for mean/sum, (N,) for none."""
    if reduction == "mean":
        return grad_loss / _valid_count(targets, ignore_index)
    return grad_loss


def _flatten(inputs: Tensor, targets: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """inputs (..., D), targets (...) -> (rows, D), (rows,)."""
    if inputs.dim() < 1 or targets.shape != inputs.shape[:-1]:
        raise ValueError(f"{name}: input {tuple(inputs.shape)} must be (..., D) with targets of "
                         f"shape (...), got targets {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"{name}: targets must be class indices (an integer dtype), "
                         f"got {targets.dtype}")
    check_floating(name, input=inputs)
    check_same_device(name, input=inputs, targets=targets)
    rows = targets.numel()  # not reshape(-1, D): that is ambiguous when D = 0
    return inputs.reshape(rows, inputs.shape[-1]), targets.reshape(rows)


# ------------------------------------------------------------------------- cross-entropy op
@torch.library.custom_op("minimind_fast::cross_entropy", mutates_args=())
def _cross_entropy_op(logits: Tensor, targets: Tensor, ignore_index: int, reduction: str,
                      label_smoothing: float, z_loss_scale: float,
                      compute_grad: bool) -> tuple[Tensor, Tensor]:
    """(loss, dlogits): loss reduced as asked; dlogits (N, V) = dloss_rows/dlogits, or empty."""
    from ..kernels.cross_entropy import cross_entropy_forward

    _check_targets("cross_entropy", targets, logits.shape[1], ignore_index)
    loss_rows, dlogits = cross_entropy_forward(logits, targets, ignore_index, label_smoothing,
                                               z_loss_scale, compute_grad)
    if dlogits is None:
        dlogits = logits.new_empty(0)
    return _reduce(loss_rows, targets, ignore_index, reduction), dlogits


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
        raise RuntimeError("cross_entropy was called with compute_grad=False; "
                           "no gradient was stored")
    scale = _grad_scale(grad_loss, targets, ctx.ignore_index, ctx.reduction)
    grad = torch.ops.minimind_fast.cross_entropy_backward(dlogits, scale)
    return (grad,) + (None,) * 6


torch.library.register_autograd("minimind_fast::cross_entropy", _cross_entropy_backward,
                                setup_context=_cross_entropy_setup)


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX,
                  reduction: str = "mean", label_smoothing: float = 0.0,
                  z_loss_scale: float = 0.0, backend: Optional[str] = None) -> Tensor:
    """Cross-entropy of logits (N, V) (or (..., V)) against class indices targets (N,) (or (...)).

    Returns a scalar for mean/sum, (N,) (or (...)) for none (0 at ignored rows), in fp32 (fp64
    for fp64 logits, "torch" backend only). mean averages over non-ignored targets; an
    all-ignored batch gives 0 with zero gradients.
    """
    _check_args(reduction, label_smoothing, z_loss_scale)
    batch_shape = targets.shape
    logits2d, targets1d = _flatten(logits, targets, "cross_entropy")
    if logits2d.shape[1] == 0:
        raise ValueError(f"cross_entropy: logits {tuple(logits.shape)} have V=0 classes; the last "
                         "dimension must hold one logit per class (at least one)")
    if choose_backend(logits.device, backend) == "torch":
        if not torch.compiler.is_compiling():
            _check_targets("cross_entropy", targets1d, logits2d.shape[1], ignore_index)
        loss = reference.cross_entropy(logits2d, targets1d, ignore_index, reduction,
                                       label_smoothing, z_loss_scale)
    else:
        check_triton_dtypes("cross_entropy", logits=logits)
        compute_grad = torch.is_grad_enabled() and logits.requires_grad
        loss, _ = torch.ops.minimind_fast.cross_entropy(
            logits2d, targets1d, int(ignore_index), reduction, float(label_smoothing),
            float(z_loss_scale), compute_grad)
    return loss.reshape(batch_shape) if reduction == "none" else loss


# --------------------------------------------------------- fused linear + cross-entropy op
def default_chunk_size(n_rows: int, vocab: int, hidden: int) -> int:
    """Liger's heuristic: rows per chunk so a chunk of logits (rows, V) is about N * H elements."""
    growth = max(1, -(-vocab // max(hidden, 1)))
    rows = -(-n_rows // growth)
    return 1 << max(rows - 1, 0).bit_length()


_HALF_GEMM_INTO_FP32 = {"cuda": ["addmm", "mm"]}  # device type -> fp32-output GEMMs still to try


def _accumulate(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc (fp32 or fp64) += a @ b. Half inputs on CUDA: a GEMM with fp32 output (aten
    mm/addmm.dtype), so each chunk's partial dW is never rounded; elsewhere (or if that overload
    is refused) the half GEMM's output is rounded once per chunk, then summed in fp32."""
    if a.dtype == acc.dtype:
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


def _chunk_loop(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                ignore_index: int, label_smoothing: float, z_loss_scale: float, chunk_size: int,
                backend: str, row_scale: Optional[Tensor], grads: tuple[bool, bool, bool],
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row losses (N,), dh (N, H) in hidden's dtype, dW (V, H) and db (V,) summed in the
    math dtype (empty where not asked), holding one (chunk, V) block of logits at a time."""
    grad_hidden, grad_weight, grad_bias = grads
    n_rows, n_hidden = hidden.shape
    vocab = weight.shape[0]
    _check_targets(FLCE, targets, vocab, ignore_index)
    chunk = chunk_size if chunk_size > 0 else default_chunk_size(n_rows, vocab, n_hidden)
    compute_grad = any(grads)
    dtype = reference.math_dtype(hidden.dtype)
    loss_rows = hidden.new_empty(n_rows, dtype=dtype)
    dh = hidden.new_empty((n_rows, n_hidden) if grad_hidden else (0,))
    dw = weight.new_zeros((vocab, n_hidden) if grad_weight else (0,), dtype=dtype)
    db = weight.new_zeros((vocab,) if grad_bias else (0,), dtype=dtype)
    if backend == "triton":
        from ..kernels.cross_entropy import cross_entropy_forward
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, n_rows, chunk):
            end = min(start + chunk, n_rows)
            h = hidden[start:end]
            logits = torch.mm(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t())
            scale = None if row_scale is None else row_scale[start:end]
            if backend == "triton":
                cross_entropy_forward(logits, targets[start:end], ignore_index, label_smoothing,
                                      z_loss_scale, compute_grad, grad_out=logits,
                                      loss_out=loss_rows[start:end], row_scale=scale)
                dlogits = logits
            else:
                loss_rows[start:end], dlogits = reference.cross_entropy_loss_and_grad(
                    logits, targets[start:end], ignore_index, label_smoothing, z_loss_scale,
                    compute_grad, scale)
            if grad_hidden:
                torch.mm(dlogits, weight, out=dh[start:end])
            if grad_weight:
                _accumulate(dw, dlogits.t(), h)
            if grad_bias:
                db.add_(dlogits.sum(0, dtype=dtype))
            del logits, dlogits
    return loss_rows, dh, dw, db


@torch.library.custom_op("minimind_fast::fused_linear_cross_entropy", mutates_args=())
def _fused_linear_cross_entropy_op(
        hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, ignore_index: int,
        reduction: str, label_smoothing: float, z_loss_scale: float, chunk_size: int,
        backend: str, grad_hidden: bool, grad_weight: bool,
        grad_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, dh, dW, db): the gradients of the per-row losses summed, unscaled (mean/sum only;
    dW, db in the math dtype so the backward scales them before any cast)."""
    grads = (grad_hidden, grad_weight, grad_bias)
    if reduction == "none":
        grads = (False, False, False)  # per-row upstream grads: the backward recomputes
    loss_rows, dh, dw, db = _chunk_loop(hidden, weight, bias, targets, ignore_index,
                                        label_smoothing, z_loss_scale, chunk_size, backend, None,
                                        grads)
    return _reduce(loss_rows, targets, ignore_index, reduction), dh, dw, db


@_fused_linear_cross_entropy_op.register_fake
def _(hidden, weight, bias, targets, ignore_index, reduction, label_smoothing, z_loss_scale,
      chunk_size, backend, grad_hidden, grad_weight, grad_bias):
    dtype = reference.math_dtype(hidden.dtype)
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else (), dtype=dtype)
    keep = reduction != "none"
    dh = hidden.new_empty(tuple(hidden.shape) if grad_hidden and keep else (0,))
    dw = weight.new_empty(tuple(weight.shape) if grad_weight and keep else (0,), dtype=dtype)
    db = weight.new_empty((weight.shape[0],) if grad_bias and keep else (0,), dtype=dtype)
    return loss, dh, dw, db


@torch.library.custom_op("minimind_fast::fused_linear_cross_entropy_backward", mutates_args=())
def _fused_linear_cross_entropy_backward_op(
        hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, grad_loss: Tensor,
        ignore_index: int, label_smoothing: float, z_loss_scale: float, chunk_size: int,
        backend: str, grad_hidden: bool, grad_weight: bool,
        grad_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dh, dW, db) in the inputs' dtypes for reduction='none': the chunk loop again, each
    row's gradient times grad_loss[row]."""
    _, dh, dw, db = _chunk_loop(hidden, weight, bias, targets, ignore_index, label_smoothing,
                                z_loss_scale, chunk_size, backend, grad_loss,
                                (grad_hidden, grad_weight, grad_bias))
    return dh, dw.to(weight.dtype), db.to(weight.dtype)


@_fused_linear_cross_entropy_backward_op.register_fake
def _(hidden, weight, bias, targets, grad_loss, ignore_index, label_smoothing, z_loss_scale,
      chunk_size, backend, grad_hidden, grad_weight, grad_bias):
    return (hidden.new_empty(tuple(hidden.shape) if grad_hidden else (0,)),
            weight.new_empty(tuple(weight.shape) if grad_weight else (0,)),
            weight.new_empty((weight.shape[0],) if grad_bias else (0,)))


def _fused_setup(ctx, inputs, output):
    (hidden, weight, bias, targets, ignore_index, reduction, smoothing, z_loss, chunk, backend,
     *grads) = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.options = (ignore_index, smoothing, z_loss, chunk, backend, *grads)
    ctx.reduction = reduction
    ctx.dtypes = (hidden.dtype, weight.dtype)
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, bias, targets)
    else:
        ctx.save_for_backward(*output[1:], targets)


def _fused_backward(ctx, grad_loss, _grad_dh, _grad_dw, _grad_db):
    ignore_index, smoothing, z_loss, chunk, backend, *grads = ctx.options
    needed = ctx.needs_input_grad[:3]
    if any(needs and not asked for needs, asked in zip(needed, grads, strict=True)):
        raise RuntimeError(f"{FLCE}: a gradient is needed that the forward was told to skip "
                           f"(grad_hidden/grad_weight/grad_bias); call ops.{FLCE} instead")
    if ctx.reduction == "none":
        hidden, weight, bias, targets = ctx.saved_tensors
        dh, dw, db = torch.ops.minimind_fast.fused_linear_cross_entropy_backward(
            hidden, weight, bias, targets, grad_loss, ignore_index, smoothing, z_loss, chunk,
            backend, *grads)
    else:
        dh, dw, db, targets = ctx.saved_tensors
        # the reduction's 1/count and grad_output are applied while dW, db are still fp32:
        # an fp16 dW summed over many rows would overflow before the mean could shrink it
        scale = _grad_scale(grad_loss, targets, ignore_index, ctx.reduction)
        hidden_dtype, weight_dtype = ctx.dtypes
        dh = (dh * scale).to(hidden_dtype)
        dw, db = (dw * scale).to(weight_dtype), (db * scale).to(weight_dtype)
    results = tuple(grad if asked else None
                    for grad, asked in zip((dh, dw, db), grads, strict=True))
    return results + (None,) * 10


torch.library.register_autograd("minimind_fast::fused_linear_cross_entropy", _fused_backward,
                                setup_context=_fused_setup)


def _check_fused_inputs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                        targets: Tensor) -> None:
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{FLCE}: hidden {tuple(hidden.shape)} must be (..., H) and "
                         f"weight {tuple(weight.shape)} must be (V, H)")
    if weight.shape[0] == 0:
        raise ValueError(f"{FLCE}: weight {tuple(weight.shape)} has V=0 rows; it needs one row "
                         "per class (at least one)")
    tensors = dict(hidden=hidden, weight=weight, **({} if bias is None else {"bias": bias}))
    check_floating(FLCE, **tensors)
    check_same_device(FLCE, **tensors, targets=targets)
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{FLCE}: bias {tuple(bias.shape)} must be (V,) = ({weight.shape[0]},), "
                         "one entry per row of weight")


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor,
                               ignore_index: int = IGNORE_INDEX, reduction: str = "mean",
                               label_smoothing: float = 0.0, z_loss_scale: float = 0.0,
                               backend: Optional[str] = None, chunk_size: Optional[int] = None,
                               bias: Optional[Tensor] = None) -> Tensor:
    """cross_entropy(hidden (N, H) @ weight (V, H).T + bias (V,), targets (N,)) without
    materialising (N, V).

    hidden may be (..., H) with targets (...); bias is optional (an lm_head with a bias).
    chunk_size: rows of logits per chunk (None: Liger's heuristic, chunk logits ~ N * H
    elements). Under autocast, hidden, weight and bias are cast to the autocast dtype first, as
    F.linear would. Returns fp32 like cross_entropy (fp64 for fp64 inputs on "torch").
    """
    _check_args(reduction, label_smoothing, z_loss_scale)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be a positive number of rows "
                         "(or None for auto)")
    _check_fused_inputs(hidden, weight, bias, targets)
    if torch.is_autocast_enabled(hidden.device.type):  # cast them all, as F.linear would
        dtype = compute_dtype(hidden)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.dtype != hidden.dtype:
            raise ValueError(f"{FLCE}: hidden is {hidden.dtype} but {name} is {tensor.dtype}; "
                             "cast one of them or run under torch.autocast")
    batch_shape = targets.shape
    hidden2d, targets1d = _flatten(hidden, targets, FLCE)
    backend = choose_backend(hidden.device, backend)
    if backend == "triton":
        check_triton_dtypes(FLCE, hidden=hidden)
    grad_enabled = torch.is_grad_enabled()
    loss = torch.ops.minimind_fast.fused_linear_cross_entropy(
        hidden2d, weight, bias, targets1d, int(ignore_index), reduction, float(label_smoothing),
        float(z_loss_scale), int(chunk_size or 0), backend,
        grad_enabled and hidden.requires_grad, grad_enabled and weight.requires_grad,
        grad_enabled and bias is not None and bias.requires_grad)[0]
    return loss.reshape(batch_shape) if reduction == "none" else loss
