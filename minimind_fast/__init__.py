"""minimind_fast: a custom-kernel pretraining engine for MiniMind-family small LLMs.

The fused ops are a drop-in library for other models:
    from minimind_fast import RMSNorm, rms_norm, apply_rotary, cross_entropy, CrossEntropyLoss
    from minimind_fast import fused_linear_cross_entropy, FusedLinearCrossEntropyLoss
Each runs its Triton kernel on CUDA and its PyTorch reference elsewhere (see ops/dispatch.py).
"""
from .config import PRESETS, MiniMindConfig, get_preset
from .constants import IGNORE_INDEX
from .interop import patch_hf_model
from .losses import CrossEntropyLoss, FusedLinearCrossEntropyLoss
from .model import MiniMindForCausalLM, count_parameters
from .nn import RMSNorm
from .ops import (add_rms_norm, apply_rotary, cross_entropy, fused_linear_cross_entropy, moe_route, rms_norm,
                  use_backend)

__version__ = "0.1.0"

__all__ = [
    "IGNORE_INDEX", "MiniMindConfig", "PRESETS", "get_preset", "MiniMindForCausalLM", "count_parameters",
    "RMSNorm", "rms_norm", "add_rms_norm", "apply_rotary", "cross_entropy", "fused_linear_cross_entropy",
    "CrossEntropyLoss", "FusedLinearCrossEntropyLoss", "use_backend", "patch_hf_model",
    "moe_route",
]
