"""RMSNorm and fused residual-add + RMSNorm: registered torch ops, autograd, backend dispatch.

`rms_norm` / `add_rms_norm` pick the backend through ops.dispatch.choose_backend: "torch" calls
the reference (ops/reference.py, MiniMind's RMSNorm numerics) directly so torch.compile can fuse
it; "triton" calls the registered ops below, whose implementations are the launchers in
minimind_fast/kernels/rmsnorm.py. Registered ops (namespace minimind_fast):

  rms_norm(x, weight, eps) -> (y, rstd)
  add_rms_norm(x, residual, weight, eps) -> (normed, updated, rstd)
  rms_norm_backward(dy, x, weight, rstd, dresidual?) -> (dx, dw)

each with a fake implementation (tracing, opcheck, torch.compile) and registered autograd whose
backward is itself a registered op, so compiled graphs see it too. Double backward is not
supported. Shapes: x, residual: (..., H); weight: (H,); rstd: x.shape[:-1] (fp32).

Precision: normalisation in fp32 for fp32/bf16/fp16 inputs; float64 runs in float64 on the
"torch" backend (so gradcheck passes) and is refused by "triton" with a one-line ValueError.
"""

from typing import Optional

import torch

from . import reference
from .checks import check_floating, check_same_device, check_triton_dtypes
from .dispatch import choose_backend


def _kernels():
    from ..kernels import rmsnorm  # lazy: triton is imported only when the Triton path runs

    return rmsnorm


@torch.library.custom_op("minimind_fast::rms_norm", mutates_args=())
def _rms_norm_op(
    x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    y, _, rstd = _kernels().rms_norm_forward(x, weight, eps)
    return y, rstd


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("minimind_fast::add_rms_norm", mutates_args=())
def _add_rms_norm_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    normed, updated, rstd = _kernels().rms_norm_forward(x, weight, eps, residual=residual)
    return normed, updated, rstd


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    dtype = torch.result_type(x, residual)
    return (
        x.new_empty(x.shape, dtype=dtype),
        x.new_empty(x.shape, dtype=dtype),
        x.new_empty(x.shape[:-1], dtype=torch.float32),
    )


@torch.library.custom_op("minimind_fast::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    dresidual: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels().rms_norm_backward(dy, x, weight, rstd, dresidual)


@_rms_norm_backward_op.register_fake
def _(dy, x, weight, rstd, dresidual):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _rms_norm_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = torch.ops.minimind_fast.rms_norm_backward(dy, x, weight, rstd, None)
    return dx, dw, None


def _add_rms_norm_setup(ctx, inputs, output):
    x, residual, weight, _ = inputs
    ctx.x_dtype, ctx.residual_dtype = x.dtype, residual.dtype
    ctx.save_for_backward(output[1], weight, output[2])


def _add_rms_norm_backward(ctx, dnormed, dupdated, _drstd):
    updated, weight, rstd = ctx.saved_tensors
    # updated = residual + x feeds the norm and the stream: both inputs get d_updated.
    dsum, dw = torch.ops.minimind_fast.rms_norm_backward(dnormed, updated, weight, rstd, dupdated)
    return dsum.to(ctx.x_dtype), dsum.to(ctx.residual_dtype), dw, None


_rms_norm_op.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)
_add_rms_norm_op.register_autograd(_add_rms_norm_backward, setup_context=_add_rms_norm_setup)


def _check(x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor] = None) -> None:
    tensors = dict(x=x, weight=weight, **({} if residual is None else {"residual": residual}))
    op = "rms_norm" if residual is None else "add_rms_norm"
    check_floating(op, **tensors)
    check_same_device(op, **tensors)
    if weight.dim() != 1 or x.dim() == 0 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"rms_norm: weight shape {tuple(weight.shape)} must be (H,) with "
            f"H = x.shape[-1] (x shape {tuple(x.shape)})"
        )
    if residual is not None and residual.shape != x.shape:
        raise ValueError(
            f"add_rms_norm: residual shape {tuple(residual.shape)} must equal x "
            f"shape {tuple(x.shape)}"
        )


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, backend: Optional[str] = None
) -> torch.Tensor:
    """y = normalise(x in fp32).to(x.dtype) * weight, in x.dtype.  x: (..., H), weight: (H,).

    fp64 inputs: computed in fp64 on the "torch" backend; the Triton kernel refuses them."""
    _check(x, weight)
    if choose_backend(x.device, backend) == "torch":
        return reference.rms_norm(x, weight, eps)
    check_triton_dtypes("rms_norm", x=x, weight=weight)
    return torch.ops.minimind_fast.rms_norm(x, weight, eps)[0]


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """updated = residual + x; returns (rms_norm(updated, weight, eps), updated).

    x, residual: (..., H), same shape (dtypes may differ: updated takes the promoted dtype, e.g. a
    bf16 branch output added to an fp32 residual stream stays fp32). Gradients reach both x and
    residual. fp64: as rms_norm.
    """
    _check(x, weight, residual)
    if choose_backend(x.device, backend) == "torch":
        return reference.add_rms_norm(x, residual, weight, eps)
    check_triton_dtypes("add_rms_norm", x=x, residual=residual, weight=weight)
    normed, updated, _ = torch.ops.minimind_fast.add_rms_norm(x, residual, weight, eps)
    return normed, updated
