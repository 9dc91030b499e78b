"""Triton cross-entropy: per-row loss and dlogits in one forward launch, a row-scale backward.

Follows Liger-Kernel's cross-entropy (online softmax over V, gradient written during the forward
pass so the backward never walks V again) with the semantics of
minimind_fast.ops.reference.cross_entropy: fp32 maths whatever the logits dtype, label
smoothing as in torch.nn.CrossEntropyLoss, optional z-loss (scale * lse^2), ignored rows give
loss 0 and gradient 0 whatever their logits. Reductions (mean over non-ignored rows, sum) are
applied by the ops layer on the (N,) per-row losses; the kernels only see an optional per-row
gradient scale. No autograd here: see minimind_fast/ops/cross_entropy.py and
ops/fused_linear_cross_entropy.py.

Shapes: logits: (N, V) with unit stride along V (any row stride); targets: (N,) integer;
loss: (N,) fp32; dlogits: (N, V) in the logits dtype (may be the logits buffer itself).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import next_power_of_2, num_warps_for

MAX_SINGLE_BLOCK_V = 32768  # a row up to this many classes stays in registers: one read of V
LOOP_BLOCK_V = 8192  # block width when a row is longer and the kernel loops over V
MAX_V = 262144


# Forward, per row r with target t, V classes, smoothing eps, z-loss scale z, all in fp32:
#   one online pass over V:   m = max_j x_j,   d = sum_j exp(x_j - m),   lse = m + log d
#                             (m, d rescaled block by block: d <- d * exp(m_old - m_new) + ...)
#   p_j   = exp(x_j - lse)
#   loss  = (1 - eps) * (lse - x_t) + eps * (lse - mean_j x_j) + z * lse^2
#         = lse - (1 - eps) * x_t - (eps / V) * sum_j x_j + z * lse^2
#   dloss/dx_j = p_j * (1 + 2 z lse) - (1 - eps) * [j == t] - eps / V
# The gradient is stored (times the optional per-row scale s_r) into dlogits in the logits'
# dtype during the same launch; the backward then only multiplies by the upstream gradient.
# Edge rows, as F.cross_entropy: x_t = -inf gives loss +inf with a finite gradient; a +inf or
# NaN logit, or every logit -inf, gives NaN loss and gradient. Ignored rows (t == ignore_index)
# never read their logits: loss 0 and gradient 0. A target outside [0, V) that is not
# ignore_index poisons its row (loss and gradient NaN) instead of reading out of bounds; the
# ops layer raises a ValueError for it on CPU, and on CUDA when MINIMIND_FAST_DEBUG=1.
@triton.jit
def _cross_entropy_fwd_kernel(
    logits_ptr,
    grad_ptr,
    targets_ptr,
    row_scale_ptr,
    loss_ptr,
    n_cols,
    stride_logits,
    stride_grad,
    stride_targets,
    stride_row_scale,
    ignore_index,
    label_smoothing,
    z_loss_scale,
    COMPUTE_GRAD: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_logits
    grad_row = grad_ptr + row * stride_grad
    cols = tl.arange(0, BLOCK_V)
    target = tl.load(targets_ptr + row * stride_targets).to(tl.int64)

    if target == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            zeros = tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty)
            for start in range(0, n_cols, BLOCK_V):
                offsets = start + cols
                tl.store(grad_row + offsets, zeros, mask=offsets < n_cols)
        return

    in_range = (target >= 0) & (target < n_cols)
    poison = tl.where(in_range, 0.0, float("nan"))
    target_logit = tl.load(logits_row + target, mask=in_range, other=0.0).to(tl.float32)

    sum_logits = 0.0
    if SINGLE_BLOCK:
        mask = cols < n_cols
        x = tl.load(logits_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=0)
        d = tl.sum(tl.exp(x - m), axis=0)
        if HAS_SMOOTHING:
            sum_logits = tl.sum(tl.where(mask, x, 0.0), axis=0)
    else:
        m = float("-inf")
        d = 0.0
        for start in range(0, n_cols, BLOCK_V):
            offsets = start + cols
            mask = offsets < n_cols
            block = tl.load(logits_row + offsets, mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(block, axis=0))
            # While every logit so far is -inf, shift by 0 rather than by m_new = -inf: that
            # keeps d = 0 instead of forming exp(-inf - -inf) = NaN.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            d = d * tl.exp(m - shift) + tl.sum(tl.exp(block - shift), axis=0)
            m = m_new
            if HAS_SMOOTHING:
                sum_logits += tl.sum(tl.where(mask, block, 0.0), axis=0)
    lse = m + tl.log(d)

    loss = lse - target_logit
    if HAS_SMOOTHING:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - sum_logits / n_cols)
    if HAS_Z_LOSS:
        loss += z_loss_scale * lse * lse
    tl.store(loss_ptr + row, loss + poison)

    if COMPUTE_GRAD:
        scale = 1.0
        if HAS_ROW_SCALE:
            scale = tl.load(row_scale_ptr + row * stride_row_scale).to(tl.float32)
        p_coeff = scale
        if HAS_Z_LOSS:
            p_coeff = scale * (1.0 + 2.0 * z_loss_scale * lse)
        target_coeff = scale * (1.0 - label_smoothing)
        uniform = scale * label_smoothing / n_cols + poison
        if SINGLE_BLOCK:
            grad = tl.exp(x - lse) * p_coeff - uniform
            grad = tl.where(cols == target, grad - target_coeff, grad)
            tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)
        else:
            for start in range(0, n_cols, BLOCK_V):
                offsets = start + cols
                mask = offsets < n_cols
                block = tl.load(logits_row + offsets, mask=mask, other=0.0).to(tl.float32)
                grad = tl.exp(block - lse) * p_coeff - uniform
                grad = tl.where(offsets == target, grad - target_coeff, grad)
                tl.store(grad_row + offsets, grad.to(grad_ptr.dtype.element_ty), mask=mask)


# Backward: dlogits already holds dloss_r/dx_rj from the forward, so the chain rule is a scale:
#   grad_logits[r, j] = dlogits[r, j] * g_r,   g_r = grad_output[r * stride]  (stride 0 for a
#   scalar grad_output of a mean/sum reduction, or an expanded (N,) one), product in fp32.
@triton.jit
def _cross_entropy_bwd_kernel(
    dlogits_ptr,
    scale_ptr,
    out_ptr,
    n_cols,
    stride_dlogits,
    stride_scale,
    stride_out,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offsets < n_cols
    scale = tl.load(scale_ptr + row * stride_scale).to(tl.float32)
    dlogits = tl.load(dlogits_ptr + row * stride_dlogits + offsets, mask=mask, other=0.0)
    grad = dlogits.to(tl.float32) * scale
    tl.store(out_ptr + row * stride_out + offsets, grad.to(out_ptr.dtype.element_ty), mask=mask)


def _unit_col_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _blocks(n_cols: int, block_v: Optional[int]) -> tuple[int, bool]:
    if block_v is None:
        block_v = min(next_power_of_2(n_cols), MAX_SINGLE_BLOCK_V)
        if block_v < n_cols:
            block_v = LOOP_BLOCK_V
    return block_v, n_cols <= block_v


def cross_entropy_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss_scale: float,
    compute_grad: bool,
    *,
    grad_out: Optional[torch.Tensor] = None,
    loss_out: Optional[torch.Tensor] = None,
    row_scale: Optional[torch.Tensor] = None,
    block_v: Optional[int] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-row losses (N,) fp32 and, if compute_grad, dlogits (N, V) in the logits' dtype.

    grad_out: where to write dlogits (unit column stride; may be `logits` itself to overwrite
    it in place, as the fused linear cross-entropy does); loss_out: an (N,) fp32 buffer;
    row_scale: optional (N,) multiplier of each row's gradient (any stride, 0 included);
    block_v: force the block width (tests use it to exercise the looped path).
    """
    n_rows, n_cols = logits.shape
    if not 0 < n_cols <= MAX_V:
        raise ValueError(
            f"cross_entropy: V={n_cols} classes is outside the kernel's [1, {MAX_V}]; "
            "use backend='torch' for wider rows"
        )
    logits = _unit_col_stride(logits)
    if loss_out is None:
        loss_out = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
    grad = None
    if compute_grad:
        grad = grad_out
        if grad is None:
            grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if n_rows == 0:
        return loss_out, grad
    block, single = _blocks(n_cols, block_v)
    scale = row_scale if row_scale is not None else loss_out  # dummy pointer when unused
    _cross_entropy_fwd_kernel[(n_rows,)](
        logits,
        grad if grad is not None else logits,
        targets,
        scale,
        loss_out,
        n_cols,
        logits.stride(0),
        grad.stride(0) if grad is not None else 0,
        targets.stride(0),
        scale.stride(0) if scale.dim() else 0,
        int(ignore_index),
        float(label_smoothing),
        float(z_loss_scale),
        COMPUTE_GRAD=compute_grad,
        HAS_ROW_SCALE=row_scale is not None,
        HAS_SMOOTHING=label_smoothing > 0.0,
        HAS_Z_LOSS=z_loss_scale > 0.0,
        SINGLE_BLOCK=single,
        BLOCK_V=block,
        num_warps=num_warps_for(block, hi=32),
    )
    return loss_out, grad


def cross_entropy_backward(
    dlogits: torch.Tensor, scale: torch.Tensor, block_v: Optional[int] = None
) -> torch.Tensor:
    """dlogits (N, V) * scale (0-dim, or (N,) with any stride), in dlogits' dtype."""
    n_rows, n_cols = dlogits.shape
    dlogits = _unit_col_stride(dlogits)
    out = torch.empty_like(dlogits, memory_format=torch.contiguous_format)
    if n_rows == 0 or n_cols == 0:
        return out
    block = block_v or min(next_power_of_2(n_cols), LOOP_BLOCK_V)
    _cross_entropy_bwd_kernel[(n_rows, triton.cdiv(n_cols, block))](
        dlogits,
        scale,
        out,
        n_cols,
        dlogits.stride(0),
        scale.stride(0) if scale.dim() else 0,
        out.stride(0),
        BLOCK_V=block,
        num_warps=num_warps_for(block, elements_per_thread=8, hi=16),
    )
    return out
