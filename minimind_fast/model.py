"""MiniMindForCausalLM: the MiniMind2 / MiniMind-3 decoder (dense or MoE) on minimind_fast ops.

Follows MiniMind's model/model_minimind.py: same module tree and parameter names, so a
state dict loads with strict=True in either direction. Differences are internal: blocks use
the fused residual-add + RMSNorm, and the training loss goes through the fused
lm_head + cross-entropy, so full (B, T, V) logits are never built unless asked for.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .config import MiniMindConfig
from .constants import IGNORE_INDEX
from .layers import Attention, FeedForward, KVCache, document_causal_mask
from .moe import MoEFeedForward
from .nn import RMSNorm
from .sampling import next_token


class CausalLMOutput(NamedTuple):
    loss: Optional[torch.Tensor]  # mean next-token cross-entropy over non-ignored labels
    aux_loss: torch.Tensor  # MoE load-balancing loss summed over layers (0 for dense)
    logits: Optional[torch.Tensor]  # (B, T, V), only when labels is None or return_logits
    past_key_values: Optional[list[KVCache]]


class MiniMindBlock(nn.Module):
    def __init__(self, layer_id: int, config: MiniMindConfig):
        super().__init__()
        self.layer_id = layer_id
        self.self_attn = Attention(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoEFeedForward(config) if config.use_moe else FeedForward(config)

    def forward(self, residual: torch.Tensor, pending: Optional[torch.Tensor], cos, sin,
                past_kv: Optional[KVCache] = None, use_cache: bool = False,
                attn_mask: Optional[torch.Tensor] = None):
        """residual: (B, T, H) stream so far; pending: the previous block's MLP output not yet
        added to it (None for the first block). Returns (residual, mlp_out, aux_loss, present)."""
        if pending is None:
            normed = self.input_layernorm(residual)
        else:
            normed, residual = self.input_layernorm.add_forward(pending, residual)
        attn_out, present = self.self_attn(normed, cos, sin, past_kv, use_cache, attn_mask)
        normed, residual = self.post_attention_layernorm.add_forward(attn_out, residual)
        if isinstance(self.mlp, MoEFeedForward):
            mlp_out, aux_loss = self.mlp(normed)
        else:
            mlp_out, aux_loss = self.mlp(normed), None
        return residual, mlp_out, aux_loss, present


class MiniMindModel(nn.Module):
    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(MiniMindBlock(i, config) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        cos, sin = ops.rope_tables(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                   config.rope_scaling)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)

    def forward(self, input_ids: torch.Tensor, past_key_values: Optional[list[KVCache]] = None,
                use_cache: bool = False, segment_ids: Optional[torch.Tensor] = None):
        """input_ids: (B, T) -> hidden (B, T, H), aux_loss (), presents."""
        B, T = input_ids.shape
        start = past_key_values[0][0].shape[2] if past_key_values else 0
        cos = self.freqs_cos[start:start + T]
        sin = self.freqs_sin[start:start + T]
        residual = self.dropout(self.embed_tokens(input_ids))
        pending = None
        aux_loss = residual.new_zeros((), dtype=torch.float32)
        presents = [] if use_cache else None
        # built once for all layers; None keeps SDPA's is_causal fast path
        attn_mask = None if segment_ids is None else document_causal_mask(segment_ids)
        for i, layer in enumerate(self.layers):
            past = past_key_values[i] if past_key_values else None
            residual, pending, layer_aux, present = layer(residual, pending, cos, sin, past,
                                                          use_cache, attn_mask)
            if layer_aux is not None:
                aux_loss = aux_loss + layer_aux
            if use_cache:
                presents.append(present)
        hidden, _ = self.norm.add_forward(pending, residual)
        return hidden, aux_loss, presents


class MiniMindForCausalLM(nn.Module):
    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.config = config
        self.model = MiniMindModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                past_key_values: Optional[list[KVCache]] = None, use_cache: bool = False,
                return_logits: bool = False,
                segment_ids: Optional[torch.Tensor] = None) -> CausalLMOutput:
        """input_ids, labels: (B, T). Position t predicts labels[:, t + 1] (shifted inside);
        labels equal to IGNORE_INDEX (-100) are skipped. Logits are built only when labels is
        None or return_logits is set; otherwise the fused lm_head + cross-entropy is used.
        segment_ids: (B, T) for packed rows (document d of a row holds segment id d): a token
        attends only to earlier tokens of its own segment (`document_causal_mask`)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        if segment_ids is not None and (segment_ids.shape != input_ids.shape or past_key_values):
            raise ValueError(f"segment_ids of shape {tuple(segment_ids.shape)} must match "
                             f"input_ids {tuple(input_ids.shape)} and come without "
                             "past_key_values (packed training rows only)")
        T = input_ids.shape[1] + (past_key_values[0][0].shape[2] if past_key_values else 0)
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}; shorten the input or raise the limit")
        hidden, aux_loss, presents = self.model(input_ids, past_key_values, use_cache, segment_ids)
        logits = loss = None
        if labels is None or return_logits:
            logits = self.lm_head(hidden)
        if labels is not None:
            # Shift the targets, not the activations: position t predicts labels[t + 1] and the
            # last position gets IGNORE_INDEX, so hidden/logits are used without a sliced copy.
            targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
            if logits is not None:
                loss = ops.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, IGNORE_INDEX)
            else:
                loss = ops.fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]),
                                                      self.lm_head.weight, targets, IGNORE_INDEX)
        return CausalLMOutput(loss, aux_loss, logits, presents)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 64, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, repetition_penalty: float = 1.0,
                 eos_token_id: Optional[int] = None, use_cache: bool = True,
                 generator: Optional[torch.Generator] = None,
                 streamer: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
        """Sample continuations of input_ids (B, T) (rows of equal length, no padding).

        temperature 0 is greedy. Rows that emit EOS keep emitting the pad token; generation stops
        when every row has finished. streamer, when given, receives each step's tokens (B,) as
        they are chosen (for printing a reply while it is written). Returns (B, T + new).
        """
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        tokens = input_ids
        finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        past = None
        for _ in range(max_new_tokens):
            if tokens.shape[1] >= self.config.max_position_embeddings:
                break
            step_input = tokens[:, -1:] if (use_cache and past is not None) else tokens
            out = self(step_input, past_key_values=past, use_cache=use_cache)
            past = out.past_key_values if use_cache else None
            token = next_token(out.logits[:, -1, :].float(), tokens, temperature, top_k, top_p,
                               repetition_penalty, generator)
            token = torch.where(finished, torch.full_like(token, self.config.pad_token_id), token)
            tokens = torch.cat([tokens, token[:, None]], dim=1)
            if streamer is not None:
                streamer(token)
            finished |= token == eos
            if bool(finished.all()):
                break
        return tokens


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Unique parameters: total, and active per token (MoE counts top-k of the routed experts)."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    inactive = 0
    for module in model.modules():
        if isinstance(module, MoEFeedForward):
            per_expert = sum(p.numel() for p in module.experts[0].parameters())
            inactive += per_expert * (len(module.experts) - module.gate.top_k)
    embedding = model.model.embed_tokens.weight.numel() if hasattr(model, "model") else 0
    return {"total": total, "active": total - inactive, "embedding": embedding}
