"""Grouped matmul of MoE experts: rows sorted by expert, times each expert's nn.Linear weight.

`grouped_linear(x (N, K), weight (G, M, K), ends (G,) int32) -> (N, M)`: rows
[ends[g-1], ends[g]) of x (rows of group 0 start at 0) times weight[g].T, i.e. G nn.Linear
layers on G contiguous slices in one call, with no host sync. Backend: torch._grouped_mm (one
CUTLASS kernel for bf16 on sm90+, an internal per-group loop elsewhere) behind registered ops
with their own fake implementations and backward, because torch's meta function for
_grouped_mm accepts bf16 only, so fp32 could not be traced by torch.compile otherwise.

Backward: grad_x = rows of grad times weight[g]; grad_weight[g] = grad_g.T @ x_g (zero for an
empty group). Dims must be 16-byte aligned (K and M times the element size); the MoE layer
checks that before choosing this path.
"""
from __future__ import annotations

import torch

from .. import compat


@torch.library.custom_op("minimind_fast::grouped_linear", mutates_args=())
def grouped_linear(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return compat.grouped_mm()(x, weight.transpose(1, 2), offs=ends)


@grouped_linear.register_fake
def _(x, weight, ends):
    return x.new_empty((x.shape[0], weight.shape[1]))


@torch.library.custom_op("minimind_fast::grouped_linear_backward", mutates_args=())
def grouped_linear_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                            ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grad = grad.contiguous()
    grouped_mm = compat.grouped_mm()
    grad_x = grouped_mm(grad, weight, offs=ends)
    grad_weight = grouped_mm(grad.t(), x, offs=ends)
    return grad_x, grad_weight


@grouped_linear_backward.register_fake
def _(grad, x, weight, ends):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, weight, ends = inputs
    ctx.save_for_backward(x, weight, ends)


def _backward(ctx, grad):
    x, weight, ends = ctx.saved_tensors
    grad_x, grad_weight = grouped_linear_backward(grad, x, weight, ends)
    return grad_x, grad_weight, None


grouped_linear.register_autograd(_backward, setup_context=_setup_context)
