"""Grouped linear: G nn.Linear layers on G contiguous row groups in one call.

`grouped_linear(x (N, K), weight (G, M, K), ends (G,) int32) -> (N, M)`: rows
ends[g-1]:ends[g] of x (group 0 starts at row 0; ends[-1] == N) times weight[g].T. The MoE
experts run this way on rows sorted by expert, with no host sync.

Backends (chosen by ops/dispatch.py):
  - "grouped_mm": the op `minimind_fast::grouped_linear` over torch._grouped_mm (through
    compat.grouped_mm), with its own fake and backward because torch's meta function for
    _grouped_mm accepts bf16 only, so torch.compile could not trace fp32 otherwise;
  - "torch": ops/moe_reference.grouped_linear_reference, one F.linear per group.

Backward: grad_x[rows of g] = grad[rows of g] @ weight[g]; grad_weight[g] = grad[rows of g].T @
x[rows of g], zero for an empty group.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import compat
from .dispatch import choose_grouped_linear_backend
from .moe_reference import grouped_linear_reference


@torch.library.custom_op("minimind_fast::grouped_linear", mutates_args=())
def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return compat.grouped_mm()(x, weight.transpose(1, 2), offs=ends)


@_grouped_linear.register_fake
def _(x, weight, ends):
    return x.new_empty((x.shape[0], weight.shape[1]))


def zero_empty_groups(grad_weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """grad_weight: (G, M, K) with the groups that own no row (ends[g] == ends[g-1]) zeroed."""
    sizes = torch.diff(ends, prepend=ends.new_zeros(1))
    return grad_weight.masked_fill((sizes == 0).view(-1, 1, 1), 0)


@torch.library.custom_op("minimind_fast::grouped_linear_backward", mutates_args=())
def grouped_linear_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad: (N, M) -> (grad_x (N, K), grad_weight (G, M, K))."""
    grad = grad.contiguous()
    grouped_mm = compat.grouped_mm()
    grad_x = grouped_mm(grad, weight, offs=ends)
    grad_weight = grouped_mm(grad.t(), x, offs=ends)
    if grad_weight.is_cuda:
        # grouped_mm's weight gradient of an empty group is not zero on every GPU
        # (https://github.com/pytorch/pytorch/issues/172439)
        grad_weight = zero_empty_groups(grad_weight, ends)
    return grad_x, grad_weight


@grouped_linear_backward.register_fake
def _(grad, x, weight, ends):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    x, weight, ends = ctx.saved_tensors
    grad_x, grad_weight = grouped_linear_backward(grad, x, weight, ends)
    return grad_x, grad_weight, None


_grouped_linear.register_autograd(_backward, setup_context=_setup_context)


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor, backend: Optional[str] = None
) -> torch.Tensor:
    """x: (N, K), weight: (G, M, K), ends: (G,) int32 -> (N, M); differentiable in x and weight.

    backend: None (use_backend / MINIMIND_FAST_BACKEND / "auto"), "grouped_mm" or "torch".
    """
    if x.dim() != 2 or weight.dim() != 3 or weight.shape[2] != x.shape[1]:
        raise ValueError(
            f"grouped_linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} "
            "must be (N, K) and (G, M, K)"
        )
    if ends.shape != weight.shape[:1] or ends.dtype != torch.int32:
        raise ValueError(
            f"grouped_linear: ends must be int32 of shape ({weight.shape[0]},), one "
            f"end row per group; got {ends.dtype} {tuple(ends.shape)}"
        )
    dims = (weight.shape[2], weight.shape[1])
    if choose_grouped_linear_backend(x.device, x.dtype, dims, backend) == "torch":
        return grouped_linear_reference(x, weight, ends)
    return _grouped_linear(x, weight, ends)
