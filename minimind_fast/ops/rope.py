"""Rotary position embedding: registered torch ops, autograd, backend dispatch.

`apply_rotary` picks the backend through ops.dispatch.choose_backend: "torch" calls the
reference (ops/reference.py, MiniMind's rotate-half apply_rotary_pos_emb) directly so
torch.compile can fuse it; "triton" calls the registered ops below, implemented by the
launchers in minimind_fast/kernels/rope.py. Registered ops (namespace minimind_fast):

  apply_rotary(q, k, cos, sin) -> (q_rot, k_rot)
  apply_rotary_backward(dq_rot, dk_rot, cos, sin) -> (dq, dk)      (rotation by -theta)

with fake implementations and registered autograd. Outputs are new tensors; the inputs are
never written. cos/sin are treated as constants (no gradient). Shapes: q (B, T, Hq, D),
k (B, T, Hkv, D), cos/sin (T, D) fp32 (rope_tables(...) sliced to the positions).

Precision: the rotation runs in fp32 for fp32/bf16/fp16 inputs; float64 runs in float64 on the
"torch" backend (so gradcheck passes) and is refused by "triton" with a one-line ValueError.
"""

from typing import Optional

import torch

from . import reference
from .checks import check_floating, check_same_device, check_triton_dtypes
from .dispatch import choose_backend
from .reference import rope_tables  # noqa: F401  (re-exported)


def _kernels():
    from ..kernels import rope  # lazy: triton is imported only when the Triton path runs

    return rope


@torch.library.custom_op("minimind_fast::apply_rotary", mutates_args=())
def _apply_rotary_op(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels().rope_forward(q, k, cos, sin)


@_apply_rotary_op.register_fake
def _(q, k, cos, sin):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("minimind_fast::apply_rotary_backward", mutates_args=())
def _apply_rotary_backward_op(
    dq_rot: torch.Tensor, dk_rot: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels().rope_backward(dq_rot, dk_rot, cos, sin)


@_apply_rotary_backward_op.register_fake
def _(dq_rot, dk_rot, cos, sin):
    return dq_rot.new_empty(dq_rot.shape), dk_rot.new_empty(dk_rot.shape)


def _setup(ctx, inputs, output):
    _, _, cos, sin = inputs
    ctx.save_for_backward(cos, sin)


def _backward(ctx, dq_rot, dk_rot):
    cos, sin = ctx.saved_tensors
    dq, dk = torch.ops.minimind_fast.apply_rotary_backward(dq_rot, dk_rot, cos, sin)
    return dq, dk, None, None


_apply_rotary_op.register_autograd(_backward, setup_context=_setup)


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    check_floating("apply_rotary", q=q, k=k, cos=cos, sin=sin)
    check_same_device("apply_rotary", q=q, k=k, cos=cos, sin=sin)
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"apply_rotary: q {tuple(q.shape)} and k {tuple(k.shape)} must be "
            "(B, T, Hq, D) and (B, T, Hkv, D) with the same B, T and D"
        )
    expected = (q.shape[1], q.shape[3])
    if cos.shape != expected or sin.shape != expected:
        raise ValueError(
            f"apply_rotary: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must "
            f"be (T, D) = {expected}; slice the tables to the positions "
            "(cos[offset:offset + T]) or pass position_offset"
        )
    if q.shape[3] % 2:
        raise ValueError(f"apply_rotary: head_dim {q.shape[3]} must be even (rotate-half)")


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    backend: Optional[str] = None,
    *,
    position_offset: Optional[int] = None,
):
    """Rotate q (B, T, Hq, D) and k (B, T, Hkv, D) by cos/sin; outputs in q's/k's dtypes.

    cos/sin are (T, D), already sliced to the positions; or, with `position_offset` (KV-cache
    decoding), the full tables from which rows position_offset .. position_offset + T are used.
    Math in fp32 (fp64 for fp64 inputs on the "torch" backend; the Triton kernel refuses them).
    """
    if position_offset is not None:
        seq_len = q.shape[1] if q.dim() == 4 else 0
        if position_offset < 0:
            raise ValueError(
                f"apply_rotary: position_offset {position_offset} must be >= 0 (the "
                "table row of the first position); pass the tokens already cached"
            )
        if position_offset + seq_len > cos.shape[0]:
            raise ValueError(
                f"apply_rotary: position_offset {position_offset} + T {seq_len} "
                f"exceeds the {cos.shape[0]} rows of the rotary tables; build them "
                "with a larger end"
            )
        cos = cos[position_offset : position_offset + seq_len]
        sin = sin[position_offset : position_offset + seq_len]
    _check(q, k, cos, sin)
    if choose_backend(q.device, backend) == "torch":
        return reference.apply_rotary(q, k, cos, sin)
    check_triton_dtypes("apply_rotary", q=q, k=k)
    return torch.ops.minimind_fast.apply_rotary(q, k, cos, sin)
