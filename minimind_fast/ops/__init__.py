"""Registered ops; ops/dispatch.py is the one place that picks each op's implementation."""

from .cross_entropy import cross_entropy
from .dispatch import BACKEND_ENV, choose_backend, use_backend
from .fused_linear_cross_entropy import fused_linear_cross_entropy
from .grouped_linear import grouped_linear
from .moe_experts import moe_experts
from .moe_permute import gather_pairs, permute_rows
from .moe_route import MoERouting, moe_route
from .rmsnorm import add_rms_norm, rms_norm
from .rope import apply_rotary, rope_tables

__all__ = [
    "BACKEND_ENV",
    "choose_backend",
    "use_backend",
    "rms_norm",
    "add_rms_norm",
    "apply_rotary",
    "rope_tables",
    "cross_entropy",
    "fused_linear_cross_entropy",
    "moe_route",
    "MoERouting",
    "grouped_linear",
    "moe_experts",
    "gather_pairs",
    "permute_rows",
]
