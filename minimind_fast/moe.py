"""Mixture-of-experts FFN in MiniMind's layout (MoEGate + routed experts + shared experts).

This first version follows MiniMind's MOEFeedForward literally (per-expert boolean-mask loop);
the grouped version built on the fused routing op replaces the loop.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MiniMindConfig
from .layers import FeedForward


class MoEGate(nn.Module):
    """Router: logits = x @ weight.T with weight (E, H); softmax scores; top-k; aux loss."""

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

    def forward(self, x: torch.Tensor):
        """x: (B, T, H) -> topk_idx (B*T, k), topk_weight (B*T, k), aux_loss ()."""
        B, T, H = x.shape
        logits = F.linear(x.reshape(-1, H), self.weight)
        scores = logits.softmax(dim=-1) if self.scoring_func == "softmax" else logits.sigmoid()
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        if self.training and self.alpha > 0.0:
            idx = topk_idx.view(B, -1)
            if self.seq_aux:
                ce = torch.zeros(B, self.num_experts, device=x.device)
                ce.scatter_add_(1, idx, torch.ones(B, T * self.top_k, device=x.device))
                ce = ce.div(T * self.top_k / self.num_experts)
                aux_loss = (ce * scores.view(B, T, -1).mean(dim=1)).sum(dim=1).mean() * self.alpha
            else:
                fraction = F.one_hot(idx.reshape(-1), num_classes=self.num_experts).float().mean(0)
                aux_loss = (scores.mean(0) * fraction * self.num_experts).sum() * self.alpha
        else:
            aux_loss = scores.new_zeros(())
        return topk_idx, topk_weight, aux_loss


class MOEFeedForward(nn.Module):
    """x: (B, T, H) -> (y (B, T, H), aux_loss ())."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.config = config
        self.experts = nn.ModuleList(FeedForward(config) for _ in range(config.n_routed_experts))
        self.gate = MoEGate(config)
        self.shared_experts = nn.ModuleList(FeedForward(config) for _ in range(config.n_shared_experts))

    def forward(self, x: torch.Tensor):
        B, T, H = x.shape
        topk_idx, topk_weight, aux_loss = self.gate(x)
        flat = x.reshape(-1, H).repeat_interleave(self.gate.top_k, dim=0)
        flat_idx = topk_idx.reshape(-1)
        y = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            mask = flat_idx == e
            # Every expert runs (possibly on zero rows) so DDP sees a gradient for each parameter.
            y[mask] = expert(flat[mask]).to(y.dtype)
        y = (y.view(*topk_weight.shape, H) * topk_weight.unsqueeze(-1).to(y.dtype)).sum(dim=1).view(B, T, H)
        for expert in self.shared_experts:
            y = y + expert(x)
        return y, aux_loss
