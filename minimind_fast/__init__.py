"""minimind_fast: a custom-kernel pretraining engine for MiniMind-family small LLMs.

The fused ops are a drop-in library: `from minimind_fast import RMSNorm, rms_norm, ...`.
"""
from .config import PRESETS, MiniMindConfig, get_preset
from .constants import IGNORE_INDEX
from .ops import add_rms_norm, apply_rotary, cross_entropy, fused_linear_cross_entropy, rms_norm, use_backend

__version__ = "0.1.0"

__all__ = [
    "IGNORE_INDEX", "MiniMindConfig", "PRESETS", "get_preset", "rms_norm", "add_rms_norm",
    "apply_rotary", "cross_entropy", "fused_linear_cross_entropy", "use_backend",
]
