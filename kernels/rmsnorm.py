"""Triton RMSNorm and fused residual-add + RMSNorm: forward and backward kernels + launchers.

Numerics follow minimind_fast.ops.reference.rms_norm (MiniMind's RMSNorm): normalise in fp32,
round to the activation dtype, multiply by the weight in fp32, store in the activation dtype.
The fused variant first forms `updated = residual + x` (rounded to the promoted dtype, as
`residual + x` is in PyTorch) and normalises that. Rows are packed several to a program at
small hidden sizes (see kernels/launch.py); the backward is persistent and reduces dw from
per-program fp32 partial rows (deterministic, no atomics). No autograd here: see
minimind_fast/ops/rmsnorm.py.

Shapes: x, residual: (..., H); weight: (H,); rstd: x.shape[:-1] in fp32.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import as_rows, num_warps_for, persistent_programs, row_tile

MAX_HIDDEN = 16384  # one row must fit in one program's registers


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    y_ptr,
    updated_ptr,
    rstd_ptr,
    n_rows,
    hidden,
    stride_x,
    stride_residual,
    stride_y,
    stride_updated,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_H)
    row_mask = rows < n_rows
    col_mask = cols < hidden
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(
            residual_ptr + rows64 * stride_residual + cols[None, :], mask=mask, other=0.0
        )
        updated = (x + residual.to(tl.float32)).to(updated_ptr.dtype.element_ty)
        tl.store(updated_ptr + rows64 * stride_updated + cols[None, :], updated, mask=mask)
        x = updated.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / hidden + eps)
    normed = (x * rstd[:, None]).to(y_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = normed * weight[None, :]
    tl.store(y_ptr + rows64 * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


# Backward, per row (x is the normalised input: `updated` for the fused op), all in fp32:
#   r     = rstd = (mean(x^2) + eps)^-1/2,   n = x * r,   y = round(n) * w
#   dn    = dy * w                      (the rounding to the activation dtype is straight-through)
#   dr/dx = -r^3 x / H   =>   dx = r * (dn - n * mean(dn * n))
#   dw    = sum over rows of dy * round(n)        (round(n) exactly as the forward used it)
#   fused add: updated = residual + x feeds both the norm and the residual stream, so
#   d_updated = dx + d_residual_out, and that is the gradient of both x and residual.
# Each program walks tiles pid, pid + P, pid + 2P, ... and keeps its dw partial in fp32
# registers; it writes one partial row and the launcher sums the P rows (fixed order).
@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,
    x_ptr,
    weight_ptr,
    rstd_ptr,
    dresidual_ptr,
    dx_ptr,
    dw_partial_ptr,
    n_rows,
    hidden,
    stride_dy,
    stride_x,
    stride_dresidual,
    stride_dx,
    tiles_per_program,
    HAS_DRESIDUAL: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_H)
    col_mask = cols < hidden
    weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_ROWS, BLOCK_H), dtype=tl.float32)
    for i in range(0, tiles_per_program):
        rows = (pid + i * n_programs) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)[:, None]
        n = x * rstd
        dw_acc += dy * n.to(x_ptr.dtype.element_ty).to(tl.float32)
        dn = dy * weight[None, :]
        dx = rstd * (dn - n * (tl.sum(dn * n, axis=1) / hidden)[:, None])
        if HAS_DRESIDUAL:
            dres = tl.load(
                dresidual_ptr + rows64 * stride_dresidual + cols[None, :], mask=mask, other=0.0
            )
            dx += dres.to(tl.float32)
        tl.store(
            dx_ptr + rows64 * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask
        )
    tl.store(
        dw_partial_ptr + pid.to(tl.int64) * hidden + cols, tl.sum(dw_acc, axis=0), mask=col_mask
    )


def _check_hidden(hidden: int) -> None:
    if hidden > MAX_HIDDEN:
        raise ValueError(
            f"rms_norm: hidden size {hidden} exceeds the Triton kernel's limit "
            f"{MAX_HIDDEN}; use backend='torch' for wider rows"
        )


def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None
):
    """Returns (y, updated, rstd): y, updated x.shape (updated None without residual), rstd fp32."""
    hidden = x.shape[-1]
    _check_hidden(hidden)
    x2d = as_rows(x, hidden)
    n_rows = x2d.shape[0]
    out_dtype = x.dtype if residual is None else torch.result_type(x, residual)
    y = torch.empty((n_rows, hidden), dtype=out_dtype, device=x.device)
    rstd = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
    r2d = updated = None
    if residual is not None:
        r2d = as_rows(residual, hidden)
        updated = torch.empty((n_rows, hidden), dtype=out_dtype, device=x.device)
    if n_rows > 0:
        block_rows, block_h = row_tile(hidden)
        weight = weight.contiguous()
        _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_rows),)](
            x2d,
            x2d if r2d is None else r2d,
            weight,
            y,
            y if updated is None else updated,
            rstd,
            n_rows,
            hidden,
            x2d.stride(0),
            x2d.stride(0) if r2d is None else r2d.stride(0),
            y.stride(0),
            y.stride(0) if updated is None else updated.stride(0),
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK_ROWS=block_rows,
            BLOCK_H=block_h,
            num_warps=num_warps_for(block_rows * block_h),
        )
    shape = x.shape
    return y.view(shape), None if updated is None else updated.view(shape), rstd.view(shape[:-1])


def rms_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    dresidual: Optional[torch.Tensor] = None,
):
    """Returns (dx in x.dtype, dw in weight.dtype). `x` is the tensor that was normalised;
    `dresidual` (the gradient of the fused op's updated residual) is added into dx."""
    hidden = x.shape[-1]
    _check_hidden(hidden)
    x2d = as_rows(x, hidden)
    dy2d = as_rows(dy, hidden)
    n_rows = x2d.shape[0]
    dx = torch.empty((n_rows, hidden), dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return dx.view(x.shape), torch.zeros_like(weight)
    block_rows, block_h = row_tile(hidden)
    n_tiles = triton.cdiv(n_rows, block_rows)
    programs = persistent_programs(x.device, n_tiles)
    dw_partial = torch.empty((programs, hidden), dtype=torch.float32, device=x.device)
    dres2d = None if dresidual is None else as_rows(dresidual, hidden)
    _rms_norm_bwd_kernel[(programs,)](
        dy2d,
        x2d,
        weight.contiguous(),
        rstd.reshape(-1).contiguous(),
        dy2d if dres2d is None else dres2d,
        dx,
        dw_partial,
        n_rows,
        hidden,
        dy2d.stride(0),
        x2d.stride(0),
        0 if dres2d is None else dres2d.stride(0),
        dx.stride(0),
        triton.cdiv(n_tiles, programs),
        HAS_DRESIDUAL=dres2d is not None,
        BLOCK_ROWS=block_rows,
        BLOCK_H=block_h,
        num_warps=num_warps_for(block_rows * block_h),
    )
    return dx.view(x.shape), dw_partial.sum(0).to(weight.dtype)
