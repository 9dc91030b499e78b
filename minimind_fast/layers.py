"""Transformer building blocks of the MiniMind decoder: GQA attention and the SwiGLU FFN.

Parameter names and shapes follow MiniMind's model/model_minimind.py so state dicts are
interchangeable. Every fused op is reached through `minimind_fast.ops`, which picks the
Triton kernel or the PyTorch reference; nothing here branches on device. Packed rows of several
documents attend within their own document through `document_causal_mask`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .config import MiniMindConfig
from .nn import RMSNorm

KVCache = tuple[torch.Tensor, torch.Tensor]


def document_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """segment_ids: (B, T) -> (B, 1, T, T) bool, True where query t may attend to key s:
    s <= t and both in the same segment (an SDPA `attn_mask`; every row keeps its diagonal)."""
    T = segment_ids.shape[-1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    return (same & causal).unsqueeze(1)


class Attention(nn.Module):
    """Grouped-query attention with RoPE (and optional q/k RMSNorm), through SDPA.

    x: (B, T, H) -> (B, T, H). q/k/v are laid out (B, T, heads, D) for RoPE, then (B, heads, T, D).
    attn_mask: None (plain causal attention: SDPA's is_causal fast path) or a (B, 1, T, T) bool
    mask from `document_causal_mask`; not combined with a KV cache.
    """

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                past_kv: Optional[KVCache] = None, use_cache: bool = False,
                attn_mask: Optional[torch.Tensor] = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = ops.apply_rotary(q, k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)
            v = torch.cat([past_kv[1], v], dim=2)
        present = (k, v) if use_cache else None
        # GQA inside SDPA (query head h reads KV head h // groups): no repeated K/V copies
        gqa = dict(dropout_p=self.dropout if self.training else 0.0,
                   enable_gqa=self.num_heads != self.num_kv_heads)
        S = k.shape[2]
        if attn_mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **gqa)
        elif S == T:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, **gqa)
        else:  # decoding with a cache: query i sits at absolute position S - T + i
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.resid_dropout(self.o_proj(out)), present


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)).  x: (..., H) -> (..., H)."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))
