"""minimind_fast: a custom-kernel pretraining engine for MiniMind-family small LLMs.

The fused ops are a drop-in library for other models:
    from minimind_fast import RMSNorm, rms_norm, apply_rotary, cross_entropy, CrossEntropyLoss
    from minimind_fast import fused_linear_cross_entropy, FusedLinearCrossEntropyLoss
Each runs its Triton kernel on CUDA and its PyTorch reference elsewhere (see ops/dispatch.py).

The names below are imported on first use (PEP 562), so `import minimind_fast.ops` or
`import minimind_fast.data` loads only what it needs.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_HOMES = {
    "IGNORE_INDEX": "constants",
    "MiniMindConfig": "config",
    "PRESETS": "config",
    "get_preset": "config",
    "MiniMindForCausalLM": "model",
    "count_parameters": "model",
    "RMSNorm": "nn",
    "CrossEntropyLoss": "losses",
    "FusedLinearCrossEntropyLoss": "losses",
    "patch_hf_model": "interop",
    "rms_norm": "ops",
    "add_rms_norm": "ops",
    "apply_rotary": "ops",
    "cross_entropy": "ops",
    "fused_linear_cross_entropy": "ops",
    "moe_route": "ops",
    "use_backend": "ops",
}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'minimind_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
