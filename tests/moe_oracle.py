"""Test oracle: MiniMind's MOEFeedForward.forward (model/model_minimind.py), literally.

The per-expert boolean-mask loop of MiniMind's training branch, run on the parameters of a
minimind_fast.moe.MoEFeedForward, so the grouped layer can be compared with it on equal weights.
The top-k weights are renormalised whenever norm_topk_prob is set, top-1 included, as MiniMind-3
does (MOEFeedForward); MiniMind2 skipped it at top-1, which is norm_topk_prob=False in our config.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NORM_EPS = 1e-20  # MiniMind's epsilon in the top-k renormalisation


def minimind_moe_forward(
    layer: torch.nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (B, T, H) -> (y (B, T, H), aux_loss ()) with `layer`'s parameters and mode."""
    gate = layer.gate
    B, T, H = x.shape
    logits = F.linear(x.reshape(-1, H), gate.weight)
    scores = logits.softmax(dim=-1) if gate.scoring_func == "softmax" else logits.sigmoid()
    topk_weight, topk_idx = torch.topk(scores, k=gate.top_k, dim=-1, sorted=False)
    if gate.norm_topk_prob:
        topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + NORM_EPS)
    if gate.training and gate.alpha > 0.0:
        idx = topk_idx.view(B, -1)
        if gate.seq_aux:
            ce = torch.zeros(B, gate.num_experts, device=x.device)
            ce.scatter_add_(1, idx, torch.ones(B, T * gate.top_k, device=x.device))
            ce = ce.div(T * gate.top_k / gate.num_experts)
            aux_loss = (ce * scores.view(B, T, -1).mean(dim=1)).sum(dim=1).mean() * gate.alpha
        else:
            fraction = F.one_hot(idx.reshape(-1), num_classes=gate.num_experts).float().mean(0)
            aux_loss = (scores.mean(0) * fraction * gate.num_experts).sum() * gate.alpha
    else:
        aux_loss = scores.new_zeros(())
    flat = x.reshape(-1, H).repeat_interleave(gate.top_k, dim=0)
    flat_idx = topk_idx.reshape(-1)
    y = torch.zeros_like(flat)
    for e, expert in enumerate(layer.experts):
        mask = flat_idx == e
        y[mask] = expert(flat[mask]).to(y.dtype)
    y = (y.view(*topk_weight.shape, H) * topk_weight.unsqueeze(-1).to(y.dtype)).sum(dim=1)
    y = y.view(B, T, H)
    for expert in layer.shared_experts:
        y = y + expert(x)
    return y, aux_loss
