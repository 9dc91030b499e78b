"""Mixture-of-experts FFN in MiniMind's layout (MoEGate + routed experts + shared experts), grouped.

Same module tree, parameter names and maths as MiniMind's MOEFeedForward (model/model_minimind.py):
`gate.weight` (E, H), `experts.{e}.{gate,up,down}_proj`, `shared_experts.{s}.{...}`, the same
top-k weights and the same sequence-/token-level aux loss. The computation is grouped instead of
MiniMind's per-expert boolean-mask loop (kept as the test oracle in ops/moe_reference.py):

  1. the fused op `ops.moe_route` scores, picks top-k and sorts the T*k (token, slot) pairs by
     expert (counts, offsets, inverse permutation) in one pass;
  2. tokens are gathered once in expert order, so each expert owns one contiguous slice;
  3. the experts run on their slices: on CUDA and under torch.compile, one grouped matmul per
     projection over the stacked expert weights (ops/moe_grouped_mm.py: torch._grouped_mm; no
     host sync, one graph with torch.compile(fullgraph=True)); in eager CPU mode, and wherever
     grouped_mm cannot run (dims not 16-byte aligned, fp64, fp32/fp16 on CUDA), each expert runs
     on its slice of `split(expert_counts.tolist())` -- ONE host sync per layer (free on CPU; a
     graph break under torch.compile);
  4. outputs are permuted back with the inverse permutation and summed over the k slots with
     the routing weights (MiniMind's exact formula), then the shared experts are added.

Every expert's parameters take part in every step (stacked, or run on an empty slice), so DDP
needs no find_unused_parameters when an expert receives no token: it gets a zero gradient.
Gathers are autograd Functions whose backward is another gather (no index_add, deterministic).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import compat
from .config import MiniMindConfig
from .layers import FeedForward
from .ops.moe_grouped_mm import grouped_linear
from .ops.dispatch import compute_dtype
from .ops.moe_route import MoERouting, moe_route

_HAS_GROUPED_MM = compat.grouped_mm() is not None


class MoEGate(nn.Module):
    """Router: logits = x @ weight.T with weight (E, H); routing by `ops.moe_route`; aux loss."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.n_routed_experts
        self.scoring_func = config.scoring_func
        self.alpha = config.aux_loss_alpha
        self.seq_aux = config.seq_aux
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    def forward(self, x: torch.Tensor) -> tuple[MoERouting, torch.Tensor]:
        """x: (B, T, H) -> (routing of the B*T tokens, aux_loss ())."""
        B, T, H = x.shape
        logits = F.linear(x.reshape(-1, H), self.weight)
        routing = moe_route(logits, self.top_k, self.norm_topk_prob, self.scoring_func, seq_len=T)
        return routing, self.aux_loss(routing, B, T)

    def aux_loss(self, routing: MoERouting, B: int, T: int) -> torch.Tensor:
        """MiniMind's load-balancing loss (only in training with alpha > 0; else 0)."""
        probs = routing.prob_mean
        if not (self.training and self.alpha > 0.0):
            return probs.new_zeros(())
        E, k = self.num_experts, self.top_k
        if self.seq_aux:  # per sequence: sum_e (count_e * E / (T k)) * mean score_e, averaged over B
            load = routing.seq_expert_counts.to(probs.dtype).div(T * k / E)
            return (load * routing.seq_prob_mean).sum(dim=1).mean() * self.alpha
        fraction = routing.expert_counts.to(probs.dtype) / (B * T * k)
        return (probs * fraction * E).sum() * self.alpha


class _GatherPairs(torch.autograd.Function):
    """rows (N, H) -> (N*k, H) in expert order: out[i] = rows[sorted_pairs[i] // k].

    Backward: grad_rows[t] = sum_j grad_out[pair_positions[t*k + j]] (a gather, then a sum)."""

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
    """out[i] = rows[index[i]] for a permutation `index` with inverse `inverse`."""

    @staticmethod
    def forward(ctx, rows, index, inverse):
        ctx.save_for_backward(inverse)
        return rows.index_select(0, index)

    @staticmethod
    def backward(ctx, grad_out):
        (inverse,) = ctx.saved_tensors
        return grad_out.index_select(0, inverse), None, None


class MOEFeedForward(nn.Module):
    """x: (B, T, H) -> (y (B, T, H), aux_loss ()).

    `grouped_mm`: None (auto) groups on CUDA and under torch.compile, and runs the split loop in
    eager CPU mode (faster there, and a CPU "sync" is free); True forces grouping wherever
    torch._grouped_mm can run; False forces the split loop (tests, debugging).
    """

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.config = config
        self.experts = nn.ModuleList(FeedForward(config) for _ in range(config.n_routed_experts))
        self.gate = MoEGate(config)
        self.shared_experts = nn.ModuleList(FeedForward(config) for _ in range(config.n_shared_experts))
        self.grouped_mm: Optional[bool] = None

    def forward(self, x: torch.Tensor):
        B, T, H = x.shape
        k = self.gate.top_k
        routing, aux_loss = self.gate(x)
        expert_in = _GatherPairs.apply(x.reshape(-1, H), routing.sorted_pairs, routing.pair_positions, k)
        expert_out = self._run_experts(expert_in, routing).to(x.dtype)
        per_pair = _PermuteRows.apply(expert_out, routing.pair_positions, routing.sorted_pairs).view(-1, k, H)
        y = (per_pair * routing.topk_weight.unsqueeze(-1).to(per_pair.dtype)).sum(dim=1).view(B, T, H)
        for expert in self.shared_experts:
            y = y + expert(x)
        return y, aux_loss

    def _can_group(self, x: torch.Tensor, dtype: torch.dtype) -> bool:
        if self.grouped_mm is False or not _HAS_GROUPED_MM or x.device.type not in ("cpu", "cuda"):
            return False
        if self.grouped_mm is None and x.device.type == "cpu" and not torch.compiler.is_compiling():
            return False  # eager CPU: the split loop is ~7% faster and its .tolist() costs no GPU sync
        # CUDA's grouped kernel is bf16-only; other dtypes there take torch's own per-group loop.
        allowed = (torch.bfloat16,) if x.device.type == "cuda" else (torch.float32, torch.bfloat16, torch.float16)
        itemsize = dtype.itemsize
        aligned = all(size * itemsize % 16 == 0 for size in (self.config.hidden_size, self.config.intermediate_size))
        return dtype in allowed and aligned

    def _run_experts(self, expert_in: torch.Tensor, routing: MoERouting) -> torch.Tensor:
        """expert_in: (N*k, H) sorted by expert -> expert outputs (N*k, H), same order."""
        dtype = compute_dtype(expert_in)
        if self._can_group(expert_in, dtype):
            return self._grouped_experts(expert_in.to(dtype), routing, dtype)
        counts = routing.expert_counts.tolist()  # the one host sync of this path
        parts = expert_in.split(counts)
        return torch.cat([expert(part) for expert, part in zip(self.experts, parts)])

    def _grouped_experts(self, expert_in: torch.Tensor, routing: MoERouting, dtype: torch.dtype) -> torch.Tensor:
        ends = routing.expert_offsets[1:].to(torch.int32)  # end row of each expert's slice

        def stacked(name: str) -> torch.Tensor:  # (E, out_features, in_features)
            weight = torch.stack([getattr(expert, name).weight for expert in self.experts]).to(dtype)
            if expert_in.is_cuda:
                # Zero the gradient of experts without tokens explicitly: grouped_mm's weight
                # gradient for empty groups is not zero on every GPU (pytorch/pytorch#172439).
                weight = weight * (routing.expert_counts > 0).to(dtype).view(-1, 1, 1)
            return weight

        gate = grouped_linear(expert_in, stacked("gate_proj"), ends)
        up = grouped_linear(expert_in, stacked("up_proj"), ends)
        out = grouped_linear(F.silu(gate) * up, stacked("down_proj"), ends)
        return F.dropout(out, self.config.dropout, self.training)
