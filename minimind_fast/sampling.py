"""Next-token sampling: repetition penalty, temperature, top-k and nucleus (top-p) filtering.

Follows the usual Hugging Face semantics (RepetitionPenaltyLogitsProcessor, TopK/TopP warpers).
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def check_sampling(
    temperature: float, top_k: Optional[int], top_p: Optional[float], repetition_penalty: float
) -> None:
    """One-line ValueError for a setting that would sample garbage or crash (NaN included)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"--temperature {temperature} must be a finite number >= 0 (0 is greedy)")
    if top_k is not None and top_k < 0:
        raise ValueError(f"--top_k {top_k} must be >= 0 (0 keeps every token)")
    if top_p is not None and not 0.0 < top_p <= 1.0:  # False for NaN too
        raise ValueError(f"--top_p {top_p} must be in (0, 1] (1 keeps every token)")
    if not (math.isfinite(repetition_penalty) and repetition_penalty > 0):
        raise ValueError(
            f"--repetition_penalty {repetition_penalty} must be a finite number > 0 "
            "(1 is no penalty, > 1 discourages repeats)"
        )


def next_token(
    logits: torch.Tensor,
    history: torch.Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    repetition_penalty: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """logits: (B, V) fp32, history: (B, T) tokens so far -> next tokens (B,).

    top_k None or 0 and top_p None or 1 keep every token."""
    check_sampling(temperature, top_k, top_p, repetition_penalty)
    if bool(torch.isnan(logits).any()):  # multinomial would fail with an opaque message
        raise ValueError(
            "the model produced NaN logits: its weights or activations overflowed; "
            "sample on another device or from another checkpoint"
        )
    logits = logits.clone()
    if repetition_penalty != 1.0:
        seen = logits.gather(1, history)
        seen = torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty)
        logits.scatter_(1, history, seen)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # keep the token that crosses top_p
        drop = cumulative - sorted_logits.softmax(dim=-1) > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
