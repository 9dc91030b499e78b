"""Mixture-of-experts FFN in MiniMind's layout (MoEGate + routed experts + shared experts).

Same module tree, parameter names and maths as MiniMind's MOEFeedForward
(model/model_minimind.py): `gate.weight` (E, H), `experts.{e}.{gate,up,down}_proj`,
`shared_experts.{s}.{...}`, the same top-k weights and the same sequence-/token-level aux loss.
The computation is grouped instead of MiniMind's per-expert boolean-mask loop, in three ops:

  1. `ops.moe_route` scores, picks top-k and sorts the T*k (token, slot) pairs by expert
     (counts, offsets, inverse permutation) in one pass;
  2. `ops.gather_pairs` copies the tokens once into expert order, so each expert owns one
     contiguous slice, and `ops.moe_experts` runs every expert on its slice (grouped or split:
     ops/dispatch.py decides);
  3. `ops.permute_rows` puts the outputs back in (token, slot) order; they are summed over the k
     slots with the routing weights (MiniMind's exact formula), then the shared experts are added.

Every expert's parameters take part in every step, so DDP needs no find_unused_parameters when
an expert receives no token: it gets a zero gradient.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MiniMindConfig
from .layers import FeedForward
from .ops import gather_pairs, moe_experts, moe_route, permute_rows
from .ops.moe_route import MoERouting


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
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

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
        if self.seq_aux:  # per sequence: sum_e (count_e * E / (T k)) * mean score_e, mean over B
            load = routing.seq_expert_counts.to(probs.dtype).div(T * k / E)
            return (load * routing.seq_prob_mean).sum(dim=1).mean() * self.alpha
        fraction = routing.expert_counts.to(probs.dtype) / (B * T * k)
        return (probs * fraction * E).sum() * self.alpha


class MoEFeedForward(nn.Module):
    """x: (B, T, H) -> (y (B, T, H), aux_loss ())."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.config = config
        self.experts = nn.ModuleList(FeedForward(config) for _ in range(config.n_routed_experts))
        self.gate = MoEGate(config)
        self.shared_experts = nn.ModuleList(
            FeedForward(config) for _ in range(config.n_shared_experts)
        )

    def forward(self, x: torch.Tensor):
        B, T, H = x.shape
        k = self.gate.top_k
        routing, aux_loss = self.gate(x)
        expert_in = gather_pairs(x.reshape(-1, H), routing.sorted_pairs, routing.pair_positions, k)
        gate, up, down = (self._expert_weights(p) for p in ("gate_proj", "up_proj", "down_proj"))
        expert_out = moe_experts(
            expert_in, routing.expert_counts, routing.expert_offsets, gate, up, down
        )
        expert_out = F.dropout(expert_out, self.config.dropout, self.training).to(x.dtype)
        per_pair = permute_rows(expert_out, routing.pair_positions, routing.sorted_pairs)
        weights = routing.topk_weight.unsqueeze(-1).to(per_pair.dtype)
        y = (per_pair.view(-1, k, H) * weights).sum(dim=1).view(B, T, H)
        for expert in self.shared_experts:
            y = y + expert(x)
        return y, aux_loss

    def _expert_weights(self, proj: str) -> list[torch.Tensor]:
        return [getattr(expert, proj).weight for expert in self.experts]
