"""Triton rotary position embedding (rotate-half) for q and k in one launch, forward and backward.

Follows minimind_fast.ops.reference.apply_rotary (MiniMind's apply_rotary_pos_emb): with
x = [x_lo, x_hi] split at D/2 and cos/sin tables (T, D) in fp32,
    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = [-x_hi, x_lo],
math in fp32, output in the input dtype. Each program takes a few (b, t) rows and rotates every
q head and every k head of them (GQA, Hkv = 1 included), so q and k share one launch and one
read of the tables. Inputs are read through their strides (views, expanded gradients: no copy);
outputs are new contiguous tensors (inputs are never written). No autograd here: see
minimind_fast/ops/rope.py.

Shapes: q: (B, T, Hq, D), k: (B, T, Hkv, D), cos/sin: (T, D), D even, 2 <= D <= 512.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import TILE_ELEMENTS, next_power_of_2, num_warps_for

MAX_HEAD_DIM = 512


@triton.jit
def _rotate_heads(
    in_ptr,
    out_ptr,
    b,
    t,
    row,
    stride_b,
    stride_t,
    stride_h,
    stride_d,
    n_heads,
    half,
    cos_lo,
    cos_hi,
    sin_lo,
    sin_hi,
    BACKWARD: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (cols < half)
    src = in_ptr + b * stride_b + t * stride_t + heads * stride_h
    lo = tl.load(src + cols * stride_d, mask=mask, other=0.0).to(tl.float32)
    hi = tl.load(src + (cols + half) * stride_d, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # the transpose of the forward rotation (see the comment above _rope_bwd_kernel)
        out_lo = lo * cos_lo + hi * sin_hi
        out_hi = hi * cos_hi - lo * sin_lo
    else:
        out_lo = lo * cos_lo - hi * sin_lo
        out_hi = hi * cos_hi + lo * sin_hi
    dst = out_ptr + row * (n_heads * 2 * half) + heads * (2 * half)
    tl.store(dst + cols, out_lo.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + cols + half, out_hi.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_rows(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    q_out_ptr,
    k_out_ptr,
    n_rows,
    seq_len,
    half,
    n_q_heads,
    n_kv_heads,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_cos,
    stride_sin,
    BACKWARD: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_Q_HEADS: tl.constexpr,
    BLOCK_KV_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    for r in tl.static_range(ROWS):
        # the last program's spare rows redo row n_rows - 1 (same values, no mask needed)
        row = tl.minimum(tl.program_id(0) * ROWS + r, n_rows - 1).to(tl.int64)
        b = row // seq_len
        t = row % seq_len
        table_mask = cols < half
        cos_lo = tl.load(cos_ptr + t * stride_cos + cols, mask=table_mask, other=0.0)
        cos_hi = tl.load(cos_ptr + t * stride_cos + cols + half, mask=table_mask, other=0.0)
        sin_lo = tl.load(sin_ptr + t * stride_sin + cols, mask=table_mask, other=0.0)
        sin_hi = tl.load(sin_ptr + t * stride_sin + cols + half, mask=table_mask, other=0.0)
        _rotate_heads(
            q_ptr,
            q_out_ptr,
            b,
            t,
            row,
            stride_qb,
            stride_qt,
            stride_qh,
            stride_qd,
            n_q_heads,
            half,
            cos_lo,
            cos_hi,
            sin_lo,
            sin_hi,
            BACKWARD,
            BLOCK_Q_HEADS,
            BLOCK_HALF,
        )
        _rotate_heads(
            k_ptr,
            k_out_ptr,
            b,
            t,
            row,
            stride_kb,
            stride_kt,
            stride_kh,
            stride_kd,
            n_kv_heads,
            half,
            cos_lo,
            cos_hi,
            sin_lo,
            sin_hi,
            BACKWARD,
            BLOCK_KV_HEADS,
            BLOCK_HALF,
        )


@triton.jit
def _rope_fwd_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    q_out_ptr,
    k_out_ptr,
    n_rows,
    seq_len,
    half,
    n_q_heads,
    n_kv_heads,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_cos,
    stride_sin,
    ROWS: tl.constexpr,
    BLOCK_Q_HEADS: tl.constexpr,
    BLOCK_KV_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    _rope_rows(
        q_ptr,
        k_ptr,
        cos_ptr,
        sin_ptr,
        q_out_ptr,
        k_out_ptr,
        n_rows,
        seq_len,
        half,
        n_q_heads,
        n_kv_heads,
        stride_qb,
        stride_qt,
        stride_qh,
        stride_qd,
        stride_kb,
        stride_kt,
        stride_kh,
        stride_kd,
        stride_cos,
        stride_sin,
        False,
        ROWS,
        BLOCK_Q_HEADS,
        BLOCK_KV_HEADS,
        BLOCK_HALF,
    )


# Backward. Per (row, head) the forward is linear in x = [x_lo, x_hi]:
#   out_lo = x_lo * cos_lo - x_hi * sin_lo
#   out_hi = x_hi * cos_hi + x_lo * sin_hi
# so the gradient is its transpose applied to g = d(out):
#   dx_lo = g_lo * cos_lo + g_hi * sin_hi
#   dx_hi = g_hi * cos_hi - g_lo * sin_lo
# With MiniMind's tables (cos_lo = cos_hi, sin_lo = sin_hi) this is the rotation by -theta:
# the forward with sin negated. The tables themselves get no gradient (they are buffers).
@triton.jit
def _rope_bwd_kernel(
    dq_out_ptr,
    dk_out_ptr,
    cos_ptr,
    sin_ptr,
    dq_ptr,
    dk_ptr,
    n_rows,
    seq_len,
    half,
    n_q_heads,
    n_kv_heads,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_cos,
    stride_sin,
    ROWS: tl.constexpr,
    BLOCK_Q_HEADS: tl.constexpr,
    BLOCK_KV_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    _rope_rows(
        dq_out_ptr,
        dk_out_ptr,
        cos_ptr,
        sin_ptr,
        dq_ptr,
        dk_ptr,
        n_rows,
        seq_len,
        half,
        n_q_heads,
        n_kv_heads,
        stride_qb,
        stride_qt,
        stride_qh,
        stride_qd,
        stride_kb,
        stride_kt,
        stride_kh,
        stride_kd,
        stride_cos,
        stride_sin,
        True,
        ROWS,
        BLOCK_Q_HEADS,
        BLOCK_KV_HEADS,
        BLOCK_HALF,
    )


def _table(table: torch.Tensor) -> torch.Tensor:
    table = table.float()
    return table if table.stride(-1) == 1 else table.contiguous()


def _launch(kernel, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    batch, seq_len, n_q_heads, head_dim = q.shape
    n_kv_heads = k.shape[2]
    if head_dim % 2 or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"rotary head_dim {head_dim} must be even and at most {MAX_HEAD_DIM}")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    n_rows = batch * seq_len
    if n_rows == 0:
        return q_out, k_out
    cos, sin = _table(cos), _table(sin)
    half = head_dim // 2
    block_half = next_power_of_2(half)
    block_q, block_kv = next_power_of_2(n_q_heads), next_power_of_2(n_kv_heads)
    lanes = (block_q + block_kv) * 2 * block_half
    rows = min(max(1, TILE_ELEMENTS // lanes), 8)  # pack rows up to about one tile of q + k lanes
    kernel[(triton.cdiv(n_rows, rows),)](
        q,
        k,
        cos,
        sin,
        q_out,
        k_out,
        n_rows,
        seq_len,
        half,
        n_q_heads,
        n_kv_heads,
        *q.stride(),
        *k.stride(),
        cos.stride(0),
        sin.stride(0),
        ROWS=rows,
        BLOCK_Q_HEADS=block_q,
        BLOCK_KV_HEADS=block_kv,
        BLOCK_HALF=block_half,
        num_warps=num_warps_for(lanes, elements_per_thread=8, lo=1, hi=16),
    )
    return q_out, k_out


def rope_forward(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Returns (q_rot, k_rot), new contiguous tensors in q's and k's dtypes."""
    return _launch(_rope_fwd_kernel, q, k, cos, sin)


def rope_backward(dq_rot: torch.Tensor, dk_rot: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Returns (dq, dk) from the gradients of q_rot and k_rot (any strides, stride 0 included)."""
    return _launch(_rope_bwd_kernel, dq_rot, dk_rot, cos, sin)
