"""Pure-PyTorch reference ops: the CPU path and the test oracle for every fused op.

Written for clarity and numerically faithful to MiniMind's modules (model/model_minimind.py):
RMSNorm normalises in fp32 and casts back before the weight; RoPE uses rotate-half with
(T, head_dim) cos/sin tables; cross-entropy averages over non-ignored targets.
No kernel, no custom op, no dispatch lives here.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..constants import IGNORE_INDEX


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = normalise(x in fp32).to(x.dtype) * weight, returned in x.dtype.  x: (..., H), weight: (H,)."""
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (normed.float() * weight.float()).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """residual' = residual + x; returns (rms_norm(residual'), residual').  x, residual: (..., H)."""
    updated = residual + x
    return rms_norm(updated, weight, eps), updated


YARN_DEFAULTS = {"factor": 16, "original_max_position_embeddings": 2048, "beta_fast": 32.0,
                 "beta_slow": 1.0, "attention_factor": 1.0}  # MiniMind's values for absent keys


def yarn_params(rope_scaling: dict) -> dict:
    """The YaRN parameters of `rope_scaling`, MiniMind's defaults filled in."""
    return {key: rope_scaling.get(key, default) for key, default in YARN_DEFAULTS.items()}


def yarn_correction_dims(head_dim: int, theta: float, original_max: int, beta_fast: float,
                         beta_slow: float) -> tuple[int, int]:
    """(low, high): the rotary dims where YaRN's ramp from unscaled to scaled frequencies starts
    and ends, before clamping to [0, head_dim / 2 - 1]."""
    def correction_dim(beta: float) -> float:
        return (head_dim * math.log(original_max / (beta * 2 * math.pi))) / (2 * math.log(theta))

    return math.floor(correction_dim(beta_fast)), math.ceil(correction_dim(beta_slow))


def rope_tables(head_dim: int, end: int, theta: float = 1e6, rope_scaling: Optional[dict] = None,
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """MiniMind's precompute_freqs_cis: cos, sin tables of shape (end, head_dim), fp32.

    With `rope_scaling` (YaRN: factor, original_max_position_embeddings, beta_fast, beta_slow,
    attention_factor) and end > original max, frequencies are blended by a linear ramp.
    """
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    attention_factor = 1.0
    if rope_scaling is not None:
        yarn = yarn_params(rope_scaling)
        original_max, attention_factor = yarn["original_max_position_embeddings"], yarn["attention_factor"]
        if end / original_max > 1.0:
            low, high = yarn_correction_dims(head_dim, theta, original_max, yarn["beta_fast"], yarn["beta_slow"])
            low, high = max(low, 0), min(high, head_dim // 2 - 1)
            ramp = torch.clamp((torch.arange(head_dim // 2, device=device).float() - low) / max(high - low, 0.001), 0, 1)
            freqs = freqs * (1 - ramp + ramp / yarn["factor"])
    positions = torch.arange(end, device=device).float()
    angles = torch.outer(positions, freqs)
    cos = torch.cat([torch.cos(angles), torch.cos(angles)], dim=-1) * attention_factor
    sin = torch.cat([torch.sin(angles), torch.sin(angles)], dim=-1) * attention_factor
    return cos, sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q (B, T, Hq, D) and k (B, T, Hkv, D) by cos/sin (T, D); math in fp32, out in input dtype."""
    cos = cos[:, None, :].float()
    sin = sin[:, None, :].float()
    q_rot = (q.float() * cos + rotate_half(q.float()) * sin).to(q.dtype)
    k_rot = (k.float() * cos + rotate_half(k.float()) * sin).to(k.dtype)
    return q_rot, k_rot


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                  reduction: str = "mean", label_smoothing: float = 0.0, z_loss_scale: float = 0.0) -> torch.Tensor:
    """Cross-entropy over logits (N, V) in fp32 with targets (N,).

    mean averages over non-ignored targets (an all-ignored batch gives 0, not NaN); none
    returns (N,) with 0 at ignored rows. z-loss adds z_loss_scale * logsumexp(logits)^2 per row.
    """
    logits32 = logits.float()
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    lse = torch.logsumexp(logits32, dim=-1)
    target_logit = logits32.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    loss = lse - target_logit
    if label_smoothing > 0.0:
        smooth = lse - logits32.mean(dim=-1)
        loss = (1.0 - label_smoothing) * loss + label_smoothing * smooth
    if z_loss_scale > 0.0:
        loss = loss + z_loss_scale * lse.pow(2)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / valid.sum().clamp(min=1)
    raise ValueError(f"reduction={reduction!r} must be 'mean', 'sum' or 'none'")


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = IGNORE_INDEX, reduction: str = "mean",
                               label_smoothing: float = 0.0, z_loss_scale: float = 0.0) -> torch.Tensor:
    """cross_entropy(hidden (N, H) @ weight (V, H).T, targets (N,)): the unfused oracle."""
    return cross_entropy(F.linear(hidden, weight), targets, ignore_index, reduction, label_smoothing, z_loss_scale)
