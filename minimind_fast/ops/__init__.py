"""Registered ops and the single dispatch point between Triton, C++ and PyTorch reference."""
from .cross_entropy import cross_entropy, fused_linear_cross_entropy
from .dispatch import BACKEND_ENV, choose_backend, use_backend
from .rmsnorm import add_rms_norm, rms_norm
from .rope import apply_rotary, rope_tables

__all__ = [
    "BACKEND_ENV", "choose_backend", "use_backend", "rms_norm", "add_rms_norm", "apply_rotary",
    "rope_tables", "cross_entropy", "fused_linear_cross_entropy",
]
from .moe_route import MoERouting, moe_route  # noqa: E402  (fused MoE routing, csrc/)
__all__ += ["moe_route", "MoERouting"]
