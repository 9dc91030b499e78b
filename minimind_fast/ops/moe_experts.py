"""The routed experts of a MoE layer: MiniMind's SwiGLU FeedForward, each on its own rows.

`moe_experts(expert_in (N, H), expert_counts (E,), expert_offsets (E+1,), gate_proj, up_proj,
down_proj) -> (N, H)`: rows expert_offsets[e]:expert_offsets[e+1] of expert_in (sorted by
expert, as moe_route's sorted_pairs order them) go through expert e,
down(silu(gate(x)) * up(x)), with the E per-expert nn.Linear weights gate_proj[e], up_proj[e]:
(I, H) and down_proj[e]: (H, I). Every expert's weights get a gradient, zero when it has no row.

Backends (chosen by ops/dispatch.py):
  - "grouped": the weights stacked to (E, out, in) and three grouped_linear calls, with no
    host sync (one graph under torch.compile(fullgraph=True));
  - "torch": ops/moe_reference.moe_experts_reference, the split loop (each expert on its slice
    of `split(expert_counts.tolist())`).
Under autocast the experts compute in the autocast dtype, as nn.Linear would.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .dispatch import choose_moe_experts_backend, compute_dtype
from .grouped_linear import grouped_linear
from .moe_reference import moe_experts_reference


def _check(expert_in, expert_counts, gate_proj, up_proj, down_proj) -> None:
    experts = expert_counts.numel()
    if not len(gate_proj) == len(up_proj) == len(down_proj) == experts:
        raise ValueError(
            f"moe_experts: {len(gate_proj)}, {len(up_proj)} and {len(down_proj)} "
            f"gate/up/down weights for {experts} experts; pass one of each per expert"
        )
    hidden, intermediate = expert_in.shape[-1], gate_proj[0].shape[0]
    if gate_proj[0].shape != (intermediate, hidden) or down_proj[0].shape != (hidden, intermediate):
        raise ValueError(
            f"moe_experts: gate_proj {tuple(gate_proj[0].shape)} and down_proj "
            f"{tuple(down_proj[0].shape)} must be (I, H) and (H, I) for H = {hidden}"
        )


def moe_experts(
    expert_in: torch.Tensor,
    expert_counts: torch.Tensor,
    expert_offsets: torch.Tensor,
    gate_proj: Sequence[torch.Tensor],
    up_proj: Sequence[torch.Tensor],
    down_proj: Sequence[torch.Tensor],
    backend: Optional[str] = None,
) -> torch.Tensor:
    """expert_in: (N, H) sorted by expert -> (N, H), same order.

    backend: None (use_backend / MINIMIND_FAST_BACKEND / "auto"), "grouped" or "torch".
    """
    _check(expert_in, expert_counts, gate_proj, up_proj, down_proj)
    dtype = compute_dtype(expert_in)
    dims = (expert_in.shape[-1], gate_proj[0].shape[0])
    if choose_moe_experts_backend(expert_in.device, dtype, dims, backend) == "torch":
        return moe_experts_reference(expert_in, expert_counts, gate_proj, up_proj, down_proj)
    x = expert_in.to(dtype)
    ends = expert_offsets[1:].to(torch.int32)  # the end row of each expert's slice

    def stacked(weights: Sequence[torch.Tensor]) -> torch.Tensor:  # (E, out, in)
        return torch.stack(list(weights)).to(dtype)

    gate = grouped_linear(x, stacked(gate_proj), ends)
    up = grouped_linear(x, stacked(up_proj), ends)
    return grouped_linear(F.silu(gate) * up, stacked(down_proj), ends)
