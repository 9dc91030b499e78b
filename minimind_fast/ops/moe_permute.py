"""Row permutations of the MoE layer: tokens into expert order and expert outputs back.

Both are autograd Functions whose backward is another gather (index_select with the inverse
permutation), never an index_add: deterministic, and traced by torch.compile as plain aten ops.
The permutations come from moe_route (sorted_pairs and its inverse pair_positions).
"""

from __future__ import annotations

import torch


class _GatherPairs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, sorted_pairs, pair_positions, k: int):
        ctx.save_for_backward(pair_positions)
        ctx.k = k
        return rows.index_select(0, sorted_pairs // k if k > 1 else sorted_pairs)

    @staticmethod
    def backward(ctx, grad_out):
        (pair_positions,) = ctx.saved_tensors
        grad = grad_out.index_select(0, pair_positions)
        if ctx.k > 1:
            grad = grad.view(-1, ctx.k, grad.shape[-1]).sum(dim=1)
        return grad, None, None, None


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, index, inverse):
        ctx.save_for_backward(inverse)
        return rows.index_select(0, index)

    @staticmethod
    def backward(ctx, grad_out):
        (inverse,) = ctx.saved_tensors
        return grad_out.index_select(0, inverse), None, None


def gather_pairs(
    rows: torch.Tensor, sorted_pairs: torch.Tensor, pair_positions: torch.Tensor, k: int
) -> torch.Tensor:
    """rows: (N, H) -> (N*k, H) in expert order: out[i] = rows[sorted_pairs[i] // k].

    Backward: grad_rows[t] = sum_j grad_out[pair_positions[t*k + j]] (a gather, then a sum)."""
    return _GatherPairs.apply(rows, sorted_pairs, pair_positions, k)


def permute_rows(rows: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """rows: (N, H) -> out[i] = rows[index[i]] for a permutation `index` with inverse `inverse`."""
    return _PermuteRows.apply(rows, index, inverse)
