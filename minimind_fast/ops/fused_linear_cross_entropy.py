"""Fused linear + cross-entropy: cross_entropy(hidden @ W.T + b, targets) without the (N, V)
logits. The registered ops, their fake and autograd, and the chunk loop; Liger-Kernel's
fused linear cross-entropy idea, with the semantics of ops/cross_entropy.py.

Op minimind_fast::fused_linear_cross_entropy runs on both backends: chunks of rows, one
(chunk, V) block of logits at a time, its CE gradient formed in place (the Triton kernel, or
reference.cross_entropy_loss_and_grad on "torch"), then dW += dlogits.T @ h, db += sum dlogits,
dh = dlogits @ W. With mean/sum the op does all the work in forward (dW, db kept in the math
dtype) and its backward applies the reduction scale and grad_output before casting; with
reduction="none" the backward re-runs the chunk loop with the per-row scale
(minimind_fast::fused_linear_cross_entropy_backward).

Ignored rows are skipped: the loop runs only on the K rows whose target is not ignore_index,
gathered a chunk at a time, and their dh is scattered into a zero (N, H) tensor, so a batch
with 60% ignored rows (supervised fine-tuning's prompt tokens) pays the lm_head GEMMs and the
softmax for 40%. An ignored row's hidden state is never read: NaN or inf there reaches no
output (F.linear + F.cross_entropy would give a NaN dW). When every row is kept, nothing is
gathered or copied. The automatic chunk is capped so that the logits plus the gather buffer
never take more memory than with every row run. K is data-dependent, so it stays inside the
op: no output shape depends on it (torch.compile, opcheck).

On CUDA, counting K (nonzero) is a host sync. Rows are skipped there too: the one sync per call
waits only for work already queued, leaving the GPU idle for about one launch round-trip, while
the work skipped is 6 * H * V FLOPs and a softmax over V per ignored row. A pretraining batch
(one ignored row per sequence, from the shifted labels) pays that sync for a small saving.
While a CUDA graph is captured, where no sync is allowed, every row runs (same results, except
that an ignored row's NaN reaches dW as it would unfused). Cut Cross-Entropy (Wijmans et al.,
2024) compacts the same way.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..constants import IGNORE_INDEX
from . import reference
from .checks import check_floating, check_same_device, check_triton_dtypes
from .cross_entropy import check_loss_args, check_targets, flatten_rows, grad_scale, reduce_losses
from .dispatch import choose_backend, compute_dtype

FLCE = "fused_linear_cross_entropy"


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


def _rows_per_chunk(chunk_size: int, n_rows: int, skipping: bool, vocab: int, hidden: int) -> int:
    """chunk_size when given (> 0), else Liger's heuristic for the n_rows. When rows are skipped,
    capped so that the (chunk, V) logits plus the (chunk, H) buffer of gathered rows take no
    more memory than one chunk of logits with every row run. Sized on all rows, not on the kept
    ones: fewer kept rows would mean smaller, slower GEMMs (bench_cross_entropy.py)."""
    if chunk_size > 0:
        return chunk_size
    chunk = default_chunk_size(n_rows, vocab, hidden)
    return max(1, chunk * vocab // (vocab + hidden)) if skipping else chunk


def _kept_rows(targets: Tensor, ignore_index: int) -> Optional[Tensor]:
    """Indices (K,) of the rows whose target is not ignore_index, or None to run every row:
    when all are kept, or while a CUDA graph is captured (the count needs a host sync)."""
    if targets.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    kept = (targets != ignore_index).nonzero().squeeze(1)
    return None if kept.numel() == targets.numel() else kept


def _chunk_loop(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss_scale: float,
    chunk_size: int,
    backend: str,
    row_scale: Optional[Tensor],
    grads: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row losses (N,), dh (N, H) in hidden's dtype, dW (V, H) and db (V,) summed in the
    math dtype (empty where not asked), holding one (chunk, V) block of logits at a time; only
    the rows whose target is not ignore_index are computed (the others: loss 0, dh 0)."""
    grad_hidden, grad_weight, grad_bias = grads
    n_rows, n_hidden = hidden.shape
    vocab = weight.shape[0]
    check_targets(FLCE, targets, vocab, ignore_index)
    kept = _kept_rows(targets, ignore_index)
    if kept is not None:
        targets = targets[kept]
        row_scale = None if row_scale is None else row_scale[kept]
    n_run = targets.numel()
    chunk = _rows_per_chunk(chunk_size, n_rows, kept is not None, vocab, n_hidden)
    compute_grad = any(grads)
    dtype = reference.math_dtype(hidden.dtype)
    loss_rows = hidden.new_empty(n_run, dtype=dtype)
    dh_shape = (n_rows, n_hidden) if grad_hidden else (0,)
    dh = hidden.new_empty(dh_shape) if kept is None else hidden.new_zeros(dh_shape)
    dw = weight.new_zeros((vocab, n_hidden) if grad_weight else (0,), dtype=dtype)
    db = weight.new_zeros((vocab,) if grad_bias else (0,), dtype=dtype)
    # kept rows are gathered into this buffer, which then takes their dh before the scatter
    rows_buffer = None if kept is None else hidden.new_empty(min(chunk, n_run), n_hidden)
    if backend == "triton":
        from ..kernels.cross_entropy import cross_entropy_forward
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, n_run, chunk):
            end = min(start + chunk, n_run)
            if kept is None:
                h = hidden[start:end]
            else:
                h = torch.index_select(hidden, 0, kept[start:end], out=rows_buffer[: end - start])
            logits = torch.mm(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t())
            scale = None if row_scale is None else row_scale[start:end]
            if backend == "triton":
                cross_entropy_forward(
                    logits,
                    targets[start:end],
                    ignore_index,
                    label_smoothing,
                    z_loss_scale,
                    compute_grad,
                    grad_out=logits,
                    loss_out=loss_rows[start:end],
                    row_scale=scale,
                )
                dlogits = logits
            else:
                loss_rows[start:end], dlogits = reference.cross_entropy_loss_and_grad(
                    logits,
                    targets[start:end],
                    ignore_index,
                    label_smoothing,
                    z_loss_scale,
                    compute_grad,
                    scale,
                )
            if grad_weight:
                _accumulate(dw, dlogits.t(), h)
            if grad_bias:
                db.add_(dlogits.sum(0, dtype=dtype))
            if grad_hidden and kept is None:
                torch.mm(dlogits, weight, out=dh[start:end])
            elif grad_hidden:  # h is read for the last time above: its buffer takes dh
                dh.index_copy_(0, kept[start:end], torch.mm(dlogits, weight, out=h))
            del logits, dlogits
    if kept is not None:
        loss_rows = loss_rows.new_zeros(n_rows).index_copy_(0, kept, loss_rows)
    return loss_rows, dh, dw, db


@torch.library.custom_op("minimind_fast::fused_linear_cross_entropy", mutates_args=())
def _fused_linear_cross_entropy_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss_scale: float,
    chunk_size: int,
    backend: str,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, dh, dW, db): the gradients of the per-row losses summed, unscaled (mean/sum only;
    dW, db in the math dtype so the backward scales them before any cast)."""
    grads = (grad_hidden, grad_weight, grad_bias)
    if reduction == "none":
        grads = (False, False, False)  # per-row upstream grads: the backward recomputes
    loss_rows, dh, dw, db = _chunk_loop(
        hidden,
        weight,
        bias,
        targets,
        ignore_index,
        label_smoothing,
        z_loss_scale,
        chunk_size,
        backend,
        None,
        grads,
    )
    return reduce_losses(loss_rows, targets, ignore_index, reduction), dh, dw, db


@_fused_linear_cross_entropy_op.register_fake
def _(
    hidden,
    weight,
    bias,
    targets,
    ignore_index,
    reduction,
    label_smoothing,
    z_loss_scale,
    chunk_size,
    backend,
    grad_hidden,
    grad_weight,
    grad_bias,
):
    dtype = reference.math_dtype(hidden.dtype)
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else (), dtype=dtype)
    keep = reduction != "none"
    dh = hidden.new_empty(tuple(hidden.shape) if grad_hidden and keep else (0,))
    dw = weight.new_empty(tuple(weight.shape) if grad_weight and keep else (0,), dtype=dtype)
    db = weight.new_empty((weight.shape[0],) if grad_bias and keep else (0,), dtype=dtype)
    return loss, dh, dw, db


@torch.library.custom_op("minimind_fast::fused_linear_cross_entropy_backward", mutates_args=())
def _fused_linear_cross_entropy_backward_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    grad_loss: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss_scale: float,
    chunk_size: int,
    backend: str,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dh, dW, db) in the inputs' dtypes for reduction='none': the chunk loop again, each
    row's gradient times grad_loss[row]."""
    _, dh, dw, db = _chunk_loop(
        hidden,
        weight,
        bias,
        targets,
        ignore_index,
        label_smoothing,
        z_loss_scale,
        chunk_size,
        backend,
        grad_loss,
        (grad_hidden, grad_weight, grad_bias),
    )
    return dh, dw.to(weight.dtype), db.to(weight.dtype)


@_fused_linear_cross_entropy_backward_op.register_fake
def _(
    hidden,
    weight,
    bias,
    targets,
    grad_loss,
    ignore_index,
    label_smoothing,
    z_loss_scale,
    chunk_size,
    backend,
    grad_hidden,
    grad_weight,
    grad_bias,
):
    return (
        hidden.new_empty(tuple(hidden.shape) if grad_hidden else (0,)),
        weight.new_empty(tuple(weight.shape) if grad_weight else (0,)),
        weight.new_empty((weight.shape[0],) if grad_bias else (0,)),
    )


def _fused_setup(ctx, inputs, output):
    (
        hidden,
        weight,
        bias,
        targets,
        ignore_index,
        reduction,
        smoothing,
        z_loss,
        chunk,
        backend,
        *grads,
    ) = inputs
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
        raise RuntimeError(
            f"{FLCE}: a gradient is needed that the forward was told to skip "
            f"(grad_hidden/grad_weight/grad_bias); call ops.{FLCE} instead"
        )
    if ctx.reduction == "none":
        hidden, weight, bias, targets = ctx.saved_tensors
        dh, dw, db = torch.ops.minimind_fast.fused_linear_cross_entropy_backward(
            hidden,
            weight,
            bias,
            targets,
            grad_loss,
            ignore_index,
            smoothing,
            z_loss,
            chunk,
            backend,
            *grads,
        )
    else:
        dh, dw, db, targets = ctx.saved_tensors
        # the reduction's 1/count and grad_output are applied while dW, db are still fp32:
        # an fp16 dW summed over many rows would overflow before the mean could shrink it
        scale = grad_scale(grad_loss, targets, ignore_index, ctx.reduction)
        hidden_dtype, weight_dtype = ctx.dtypes
        dh = (dh * scale).to(hidden_dtype)
        dw, db = (dw * scale).to(weight_dtype), (db * scale).to(weight_dtype)
    results = tuple(
        grad if asked else None for grad, asked in zip((dh, dw, db), grads, strict=True)
    )
    return results + (None,) * 10


torch.library.register_autograd(
    "minimind_fast::fused_linear_cross_entropy", _fused_backward, setup_context=_fused_setup
)


def _check_fused_inputs(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor
) -> None:
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{FLCE}: hidden {tuple(hidden.shape)} must be (..., H) and "
            f"weight {tuple(weight.shape)} must be (V, H)"
        )
    if weight.shape[0] == 0:
        raise ValueError(
            f"{FLCE}: weight {tuple(weight.shape)} has V=0 rows; it needs one row "
            "per class (at least one)"
        )
    tensors = dict(hidden=hidden, weight=weight, **({} if bias is None else {"bias": bias}))
    check_floating(FLCE, **tensors)
    check_same_device(FLCE, **tensors, targets=targets)
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"{FLCE}: bias {tuple(bias.shape)} must be (V,) = ({weight.shape[0]},), "
            "one entry per row of weight"
        )


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss_scale: float = 0.0,
    backend: Optional[str] = None,
    chunk_size: Optional[int] = None,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """cross_entropy(hidden (N, H) @ weight (V, H).T + bias (V,), targets (N,)) without
    materialising (N, V).

    hidden may be (..., H) with targets (...); bias is optional (an lm_head with a bias).
    chunk_size: rows of logits per chunk (None: Liger's heuristic, chunk logits ~ K * H
    elements for K non-ignored rows). Under autocast, hidden, weight and bias are cast to the
    autocast dtype first, as F.linear would. Returns fp32 like cross_entropy (fp64 for fp64
    inputs on "torch").
    """
    check_loss_args(reduction, label_smoothing, z_loss_scale)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(
            f"chunk_size={chunk_size} must be a positive number of rows (or None for auto)"
        )
    _check_fused_inputs(hidden, weight, bias, targets)
    if torch.is_autocast_enabled(hidden.device.type):  # cast them all, as F.linear would
        dtype = compute_dtype(hidden)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.dtype != hidden.dtype:
            raise ValueError(
                f"{FLCE}: hidden is {hidden.dtype} but {name} is {tensor.dtype}; "
                "cast one of them or run under torch.autocast"
            )
    batch_shape = targets.shape
    hidden2d, targets1d = flatten_rows(hidden, targets, FLCE)
    backend = choose_backend(hidden.device, backend)
    if backend == "triton":
        check_triton_dtypes(FLCE, hidden=hidden)
    grad_enabled = torch.is_grad_enabled()
    loss = torch.ops.minimind_fast.fused_linear_cross_entropy(
        hidden2d,
        weight,
        bias,
        targets1d,
        int(ignore_index),
        reduction,
        float(label_smoothing),
        float(z_loss_scale),
        int(chunk_size or 0),
        backend,
        grad_enabled and hidden.requires_grad,
        grad_enabled and weight.requires_grad,
        grad_enabled and bias is not None and bias.requires_grad,
    )[0]
    return loss.reshape(batch_shape) if reduction == "none" else loss
