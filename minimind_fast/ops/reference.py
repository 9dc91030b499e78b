"""Pure-PyTorch reference ops: the CPU path and the test oracle for every fused op.

Written for clarity and numerically faithful to MiniMind's modules (model/model_minimind.py):
RMSNorm normalises in fp32 and casts back before the weight; RoPE uses rotate-half with
(T, head_dim) cos/sin tables; cross-entropy averages over non-ignored targets.

Precision: the maths runs in fp32 for fp32/bf16/fp16 inputs and in fp64 when an input is fp64
(`math_dtype`), so torch.autograd.gradcheck passes here at its default tolerances; the Triton
kernels take no fp64. Cross-entropy edge rows follow F.cross_entropy (a -inf target logit:
loss +inf; a +inf or NaN logit, or every logit -inf: NaN), except that an ignored row gives
loss 0 and gradient 0 whatever its logits hold. The chunk-level cross-entropy loss and gradient
(`cross_entropy_loss_and_grad`) is the fused linear cross-entropy's PyTorch backend.
No kernel, no custom op, no dispatch lives here.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..constants import IGNORE_INDEX

Tensor = torch.Tensor


def math_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp64 when any input is fp64, else fp32: the dtype the reference computes in."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """y = normalise(x).to(x.dtype) * weight, returned in x.dtype.  x: (..., H), weight: (H,)."""
    dtype = math_dtype(x.dtype, weight.dtype)
    x_math = x.to(dtype)
    normed = (x_math * torch.rsqrt(x_math.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (normed.to(dtype) * weight.to(dtype)).to(x.dtype)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float):
    """residual' = residual + x; returns (rms_norm(residual'), residual').
    x, residual: (..., H)."""
    updated = residual + x
    return rms_norm(updated, weight, eps), updated


YARN_DEFAULTS = {
    "factor": 16,
    "original_max_position_embeddings": 2048,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "attention_factor": 1.0,
}  # MiniMind's values for absent keys


def yarn_params(rope_scaling: dict) -> dict:
    """The YaRN parameters of `rope_scaling`, MiniMind's defaults filled in."""
    return {key: rope_scaling.get(key, default) for key, default in YARN_DEFAULTS.items()}


def yarn_correction_dims(
    head_dim: int, theta: float, original_max: int, beta_fast: float, beta_slow: float
) -> tuple[int, int]:
    """(low, high): the rotary dims where YaRN's ramp from unscaled to scaled frequencies starts
    and ends, before clamping to [0, head_dim / 2 - 1]."""

    def correction_dim(beta: float) -> float:
        return (head_dim * math.log(original_max / (beta * 2 * math.pi))) / (2 * math.log(theta))

    return math.floor(correction_dim(beta_fast)), math.ceil(correction_dim(beta_slow))


def rope_tables(
    head_dim: int, end: int, theta: float = 1e6, rope_scaling: Optional[dict] = None, device=None
) -> tuple[Tensor, Tensor]:
    """MiniMind's precompute_freqs_cis: cos, sin tables of shape (end, head_dim), fp32.

    With `rope_scaling` (YaRN: factor, original_max_position_embeddings, beta_fast, beta_slow,
    attention_factor) and end > original max, frequencies are blended by a linear ramp.
    """
    dims = torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float()
    freqs = 1.0 / (theta ** (dims / head_dim))
    attention_factor = 1.0
    if rope_scaling is not None:
        yarn = yarn_params(rope_scaling)
        original_max = yarn["original_max_position_embeddings"]
        attention_factor = yarn["attention_factor"]
        if end / original_max > 1.0:
            low, high = yarn_correction_dims(
                head_dim, theta, original_max, yarn["beta_fast"], yarn["beta_slow"]
            )
            low, high = max(low, 0), min(high, head_dim // 2 - 1)
            index = torch.arange(head_dim // 2, device=device).float()
            ramp = torch.clamp((index - low) / max(high - low, 0.001), 0, 1)
            freqs = freqs * (1 - ramp + ramp / yarn["factor"])
    positions = torch.arange(end, device=device).float()
    angles = torch.outer(positions, freqs)
    cos = torch.cat([torch.cos(angles), torch.cos(angles)], dim=-1) * attention_factor
    sin = torch.cat([torch.sin(angles), torch.sin(angles)], dim=-1) * attention_factor
    return cos, sin


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor):
    """Rotate q (B, T, Hq, D) and k (B, T, Hkv, D) by cos/sin (T, D); outputs in the inputs'
    dtypes."""
    dtype = math_dtype(q.dtype, k.dtype)
    cos = cos[:, None, :].to(dtype)
    sin = sin[:, None, :].to(dtype)
    q_math, k_math = q.to(dtype), k.to(dtype)
    q_rot = (q_math * cos + rotate_half(q_math) * sin).to(q.dtype)
    k_rot = (k_math * cos + rotate_half(k_math) * sin).to(k.dtype)
    return q_rot, k_rot


# ----------------------------------------------------------------------------- cross-entropy
def _logsumexp(x: Tensor) -> Tensor:
    """(N, V) -> (N,). Shifted by the row max, so a row with a +inf logit or only -inf logits
    comes out NaN (torch.logsumexp would give +inf / -inf there)."""
    row_max = x.amax(-1, keepdim=True).detach()  # lse does not depend on the shift
    shifted = (x - row_max).exp_()  # in place: one (N, V) temporary, not two
    return (row_max + shifted.sum(-1, keepdim=True).log()).squeeze(-1)


def _row_losses(
    x: Tensor, safe_targets: Tensor, valid: Tensor, label_smoothing: float, z_loss_scale: float
) -> tuple[Tensor, Tensor]:
    """(loss (N,), lse (N,)) of logits x (N, V) in the math dtype, ignored rows already zeroed:
    loss = (1 - eps) * (lse - x_t) + eps * (lse - mean_j x_j) + z * lse^2, 0 where ignored."""
    lse = _logsumexp(x)
    mean = x.mean(-1) if label_smoothing > 0.0 else None
    target = x.gather(1, safe_targets[:, None]).squeeze(1)
    return _losses(lse, target, mean, valid, label_smoothing, z_loss_scale), lse


def _losses(
    lse: Tensor,
    target: Tensor,
    mean: Optional[Tensor],
    valid: Tensor,
    label_smoothing: float,
    z_loss_scale: float,
) -> Tensor:
    """Per-row losses (N,) from lse, the target logit and (with label smoothing) the mean logit."""
    loss = lse - target
    if label_smoothing > 0.0:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - mean)
    if z_loss_scale > 0.0:
        loss = loss + z_loss_scale * lse.square()
    return torch.where(valid, loss, 0.0)


def _valid_and_safe(targets: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    valid = targets != ignore_index
    return valid, torch.where(valid, targets, 0)


def reduce_rows(loss: Tensor, valid: Tensor, reduction: str) -> Tensor:
    """none: (N,) as is; sum; mean over non-ignored rows (an all-ignored batch gives 0)."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / valid.sum().clamp(min=1)
    raise ValueError(f"reduction={reduction!r} must be 'mean', 'sum' or 'none'")


def cross_entropy(
    logits: Tensor,
    targets: Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss_scale: float = 0.0,
) -> Tensor:
    """Cross-entropy over logits (N, V) with targets (N,), in the math dtype.

    mean averages over non-ignored targets (an all-ignored batch gives 0, not NaN); none
    returns (N,) with 0 at ignored rows. z-loss adds z_loss_scale * logsumexp(logits)^2 per row.
    """
    valid, safe_targets = _valid_and_safe(targets, ignore_index)
    # An ignored row's logits never reach the maths (masked before the max and the exp): loss 0
    # and gradient 0 even when they hold -inf, +inf or NaN.
    x = torch.where(valid[:, None], logits.to(math_dtype(logits.dtype)), 0.0)
    loss, _ = _row_losses(x, safe_targets, valid, label_smoothing, z_loss_scale)
    return reduce_rows(loss, valid, reduction)


@torch.no_grad()
def cross_entropy_loss_and_grad(
    logits: Tensor,
    targets: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss_scale: float,
    compute_grad: bool,
    row_scale: Optional[Tensor] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """One chunk: per-row losses (N,) in the math dtype and, if compute_grad, dloss_r/dlogits
    (N, V) in the logits' dtype, each row times row_scale[r] (N,) when given (any stride):
        dloss/dx_j = p_j * (1 + 2 z lse) - (1 - eps) * [j == t] - eps / V,   p = softmax(x).
    Overwrites `logits` when it is already in the math dtype (pass a buffer you own): the
    chunk's gradient reuses its memory, so no second (N, V) buffer exists.
    """
    dtype = math_dtype(logits.dtype)
    x = logits.to(dtype)
    valid, safe_targets = _valid_and_safe(targets, ignore_index)
    x.masked_fill_(~valid[:, None], 0.0)
    if not compute_grad:
        return _row_losses(x, safe_targets, valid, label_smoothing, z_loss_scale)[0], None
    # One exp pass, in x's own memory: e = exp(x - max) gives lse (its row sums) and the
    # softmax (e / sum e) that the gradient needs.
    row_max = x.amax(-1, keepdim=True)
    target = x.gather(1, safe_targets[:, None]).squeeze(1)
    mean = x.mean(-1) if label_smoothing > 0.0 else None
    e = x.sub_(row_max).exp_()
    total = e.sum(-1)
    lse = row_max.squeeze(-1) + total.log()
    loss = _losses(lse, target, mean, valid, label_smoothing, z_loss_scale)
    row_coeff = valid.to(dtype) if row_scale is None else valid * row_scale.to(dtype)
    p_coeff = row_coeff * (1.0 + 2.0 * z_loss_scale * lse) if z_loss_scale > 0.0 else row_coeff
    grad = e.mul_((p_coeff / total)[:, None])
    if label_smoothing > 0.0:
        grad.sub_((label_smoothing / x.shape[1]) * row_coeff[:, None])
    grad.scatter_add_(1, safe_targets[:, None], (-(1.0 - label_smoothing) * row_coeff)[:, None])
    return loss, grad.to(logits.dtype)


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss_scale: float = 0.0,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """cross_entropy(hidden (N, H) @ weight (V, H).T + bias (V,), targets (N,)): the unfused
    oracle (full logits)."""
    return cross_entropy(
        F.linear(hidden, weight, bias),
        targets,
        ignore_index,
        reduction,
        label_smoothing,
        z_loss_scale,
    )
