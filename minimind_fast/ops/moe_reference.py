"""Pure-PyTorch references of the MoE ops: each op's "torch" backend and its test oracle.

Written for clarity, not speed.

- `moe_route_reference` / `moe_route_backward_reference`: MiniMind's MoEGate
  (model/model_minimind.py): softmax (or sigmoid) scores, top-k, renormalisation
  `w / (sum(w) + 1e-20)` whenever `norm_topk_prob`, top-1 included (MiniMind-3's and Qwen3-MoE's
  rule; MiniMind2 skipped it at top-1, which is norm_topk_prob=False here), and the statistics
  its aux losses use (it argsorts where the op counts). Expert order: by logit, descending, stable
  (ties -> lower expert id, NaN first, as torch.sort). Softmax and sigmoid are monotone, so this is
  the top-k of the scores; ranking the logits keeps the choice exact on every device whatever
  exp() rounds to.
- `grouped_linear_reference`: one F.linear per contiguous row group.
- `moe_experts_reference`: each SwiGLU expert on its slice of the rows (the split loop).

The two loops read the group sizes on the host (`.tolist()`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

NORM_EPS = 1e-20  # MiniMind's epsilon in the top-k renormalisation


def _acc_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    return logits.softmax(dim=-1) if scoring == "softmax" else logits.sigmoid()


def moe_route_reference(
    router_logits: torch.Tensor,
    top_k: int,
    norm_topk_prob: bool,
    scoring: str = "softmax",
    seq_len: int = 0,
) -> tuple[torch.Tensor, ...]:
    """router_logits: (T, E) -> the ten outputs of `minimind_fast::moe_route`, in its order:

    topk_weight (T, k), topk_idx (T, k) int64, scores (T, E), prob_mean (E,), seq_prob_mean (B, E),
    expert_counts (E,) int64, seq_expert_counts (B, E) int64, sorted_pairs (T*k,) int64,
    expert_offsets (E+1,) int64, pair_positions (T*k,) int64; B = T / seq_len (seq_len 0: T).
    Real outputs are fp32 (fp64 for fp64 logits). Differentiable through topk_weight, scores,
    prob_mean and seq_prob_mean.
    """
    T, E = router_logits.shape
    L = seq_len or T
    B = T // L
    logits = router_logits.to(_acc_dtype(router_logits))
    scores = _scores(logits, scoring)
    ranked = torch.sort(logits.detach(), dim=-1, descending=True, stable=True).indices
    topk_idx = ranked[:, :top_k].contiguous()
    topk_weight = scores.gather(1, topk_idx)
    if norm_topk_prob:
        topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + NORM_EPS)
    prob_mean = scores.mean(dim=0)
    seq_prob_mean = scores.view(B, L, E).mean(dim=1)
    seq_counts = torch.zeros(B, E, dtype=torch.int64, device=logits.device)
    per_seq_idx = topk_idx.view(B, L * top_k)
    seq_counts.scatter_add_(1, per_seq_idx, torch.ones_like(per_seq_idx))
    expert_counts = seq_counts.sum(dim=0)
    flat_idx = topk_idx.reshape(-1)
    sorted_pairs = torch.sort(flat_idx, stable=True).indices
    expert_offsets = F.pad(expert_counts.cumsum(0), (1, 0))
    pair_positions = torch.empty_like(sorted_pairs)
    pair_positions[sorted_pairs] = torch.arange(T * top_k, device=logits.device)
    return (
        topk_weight,
        topk_idx,
        scores,
        prob_mean,
        seq_prob_mean,
        expert_counts,
        seq_counts,
        sorted_pairs,
        expert_offsets,
        pair_positions,
    )


def moe_route_backward_reference(
    grad_topk_weight: Optional[torch.Tensor],
    grad_scores: Optional[torch.Tensor],
    grad_prob_mean: Optional[torch.Tensor],
    grad_seq_prob_mean: Optional[torch.Tensor],
    scores: torch.Tensor,
    topk_idx: torch.Tensor,
    norm_topk_prob: bool,
    scoring: str,
    seq_len: int,
    logits_dtype: torch.dtype,
) -> torch.Tensor:
    """The gradient of router_logits (T, E) from the forward's scores, written out (see the maths
    in csrc/moe_route_backward_cpu.cpp). Any incoming gradient may be None."""
    T, E = scores.shape
    L = seq_len or T
    grad = torch.zeros_like(scores) if grad_scores is None else grad_scores.clone()
    if grad_prob_mean is not None:
        grad = grad + grad_prob_mean / T
    if grad_seq_prob_mean is not None:
        grad = grad + (grad_seq_prob_mean / L).repeat_interleave(L, dim=0)
    if grad_topk_weight is not None:
        selected = scores.gather(1, topk_idx)
        if norm_topk_prob:
            denom = selected.sum(dim=-1, keepdim=True) + NORM_EPS
            dot = (grad_topk_weight * selected).sum(dim=-1, keepdim=True) / denom
            grad_selected = (grad_topk_weight - dot) / denom
        else:
            grad_selected = grad_topk_weight
        grad = grad.scatter_add(1, topk_idx, grad_selected)
    if scoring == "softmax":
        grad = scores * (grad - (grad * scores).sum(dim=-1, keepdim=True))
    else:
        grad = grad * scores * (1 - scores)
    return grad.to(logits_dtype)


def grouped_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor
) -> torch.Tensor:
    """x: (N, K), weight: (G, M, K), ends: (G,) with ends[-1] == N -> (N, M): rows
    ends[g-1]:ends[g] (from 0 for g = 0) through F.linear with weight[g]."""
    bounds = [0, *ends.tolist()]
    return torch.cat(
        [
            F.linear(x[start:end], weight[g])
            for g, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
        ]
    )


def moe_experts_reference(
    expert_in: torch.Tensor,
    expert_counts: torch.Tensor,
    gate_proj: Sequence[torch.Tensor],
    up_proj: Sequence[torch.Tensor],
    down_proj: Sequence[torch.Tensor],
) -> torch.Tensor:
    """expert_in: (N, H) sorted by expert, expert_counts: (E,) -> (N, H): expert e's SwiGLU
    down(silu(gate(x)) * up(x)) on its expert_counts[e] rows, with weights gate_proj[e] and
    up_proj[e] (I, H), down_proj[e] (H, I)."""
    parts = expert_in.split(expert_counts.tolist())
    return torch.cat(
        [
            F.linear(F.silu(F.linear(part, gate)) * F.linear(part, up), down)
            for part, gate, up, down in zip(parts, gate_proj, up_proj, down_proj, strict=True)
        ]
    )
