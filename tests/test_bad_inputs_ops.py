"""The bad-input catalogue, part 3: the ops. Each case asserts a one-line ValueError naming the
offending value (shape, dtype, device, index) and the fix.
"""

from __future__ import annotations

import pytest
import torch
from bad_input_helpers import one_thread  # noqa: F401  (autouse: one intra-op thread)
from helpers import HAS_CUDA

from minimind_fast.config import get_preset
from minimind_fast.model import MiniMindForCausalLM


def _rope(**changes):
    from minimind_fast import ops

    cos, sin = ops.rope_tables(8, 16)
    values = dict(q=torch.randn(2, 16, 4, 8), k=torch.randn(2, 16, 2, 8), cos=cos, sin=sin)
    values.update(changes)
    return ops.apply_rotary(**values)


def _ce(logits, targets):
    from minimind_fast import ops

    return ops.cross_entropy(logits, targets)


def _flce(hidden, weight, targets, **kwargs):
    from minimind_fast import ops

    return ops.fused_linear_cross_entropy(hidden, weight, targets, **kwargs)


def _rms(x, weight, residual=None, **kwargs):
    from minimind_fast import ops

    if residual is None:
        return ops.rms_norm(x, weight, **kwargs)
    return ops.add_rms_norm(x, residual, weight, **kwargs)


def _model_loss(labels):
    config = get_preset("demo", hidden_size=32, num_hidden_layers=1, vocab_size=300)
    return MiniMindForCausalLM(config)(torch.tensor([[1, 2, 3]]), labels=labels).loss


LONG, META = torch.int64, "meta"
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"  # where backend="triton" runs
OPS_CASES = {
    "rms-norm-wrong-dtype": (
        lambda: _rms(torch.ones(3, 8, dtype=LONG), torch.ones(8)),
        ["rms_norm: x must be a floating-point tensor, got torch.int64", "x.float()"],
    ),
    "rms-norm-wrong-device": (
        lambda: _rms(torch.ones(3, 8), torch.ones(8, device=META)),
        ["rms_norm: weight is on meta but x is on cpu", "weight.to(x.device)"],
    ),
    "rms-norm-wrong-shape": (
        lambda: _rms(torch.ones(3, 8), torch.ones(7)),
        ["rms_norm: weight shape (7,) must be (H,)", "(3, 8)"],
    ),
    "add-rms-norm-wrong-shape": (
        lambda: _rms(torch.ones(3, 8), torch.ones(8), residual=torch.ones(2, 8)),
        ["add_rms_norm: residual shape (2, 8) must equal x shape (3, 8)"],
    ),
    "apply-rotary-wrong-dtype": (
        lambda: _rope(q=torch.ones(2, 16, 4, 8, dtype=LONG)),
        ["apply_rotary: q must be a floating-point tensor, got torch.int64"],
    ),
    "apply-rotary-wrong-device": (
        lambda: _rope(k=torch.ones(2, 16, 2, 8, device=META)),
        ["apply_rotary: k is on meta but q is on cpu"],
    ),
    "apply-rotary-wrong-shape": (
        lambda: _rope(q=torch.randn(16, 4, 8)),
        ["apply_rotary: q (16, 4, 8)", "must be (B, T, Hq, D)"],
    ),
    "apply-rotary-tables-too-short": (
        lambda: _rope(cos=torch.ones(8, 8), sin=torch.ones(8, 8)),
        ["cos (8, 8) and sin (8, 8) must be (T, D) = (16, 8)", "position_offset"],
    ),
    "cross-entropy-label-out-of-range": (
        lambda: _ce(torch.randn(4, 10), torch.tensor([1, 2, 10, -100])),
        ["target 10 is outside [0, 10)", "ignore_index=-100", "fix the labels"],
    ),
    "cross-entropy-negative-label": (
        lambda: _ce(torch.randn(4, 10), torch.tensor([1, -5, 2, 3])),
        ["target -5 is outside [0, 10)"],
    ),
    "cross-entropy-wrong-target-dtype": (
        lambda: _ce(torch.randn(4, 10), torch.ones(4)),
        ["targets must be class indices (an integer dtype), got torch.float32"],
    ),
    "cross-entropy-wrong-logits-dtype": (
        lambda: _ce(torch.ones(4, 10, dtype=LONG), torch.ones(4, dtype=LONG)),
        ["cross_entropy: input must be a floating-point tensor, got torch.int64"],
    ),
    "cross-entropy-wrong-device": (
        lambda: _ce(torch.randn(4, 10), torch.ones(4, dtype=LONG, device=META)),
        ["cross_entropy: targets is on meta but input is on cpu"],
    ),
    "cross-entropy-wrong-shape": (
        lambda: _ce(torch.randn(4, 10), torch.tensor([1, 2, 3])),
        ["input (4, 10) must be (..., D) with targets of shape (...), got targets (3,)"],
    ),
    "fused-linear-cross-entropy-dtype-mismatch": (
        lambda: _flce(torch.randn(4, 8), torch.randn(10, 8).half(), torch.ones(4, dtype=LONG)),
        ["hidden is torch.float32 but weight is torch.float16", "torch.autocast"],
    ),
    "fused-linear-cross-entropy-label-out-of-range": (
        lambda: _flce(torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, 30, 4])),
        ["fused_linear_cross_entropy: target 30 is outside [0, 10)"],
    ),
    "fused-linear-cross-entropy-bias-shape": (
        lambda: _flce(
            torch.randn(4, 8),
            torch.randn(10, 8),
            torch.ones(4, dtype=LONG),
            bias=torch.zeros(10, 1),
        ),
        ["fused_linear_cross_entropy: bias (10, 1) must be (V,) = (10,)"],
    ),
    "fused-linear-cross-entropy-zero-classes": (
        lambda: _flce(torch.randn(4, 8), torch.randn(0, 8), torch.ones(4, dtype=LONG)),
        ["fused_linear_cross_entropy: weight (0, 8) has V=0 rows"],
    ),
    "fused-linear-cross-entropy-float64-triton": (
        lambda: _flce(
            torch.randn(4, 8, device=TRITON_DEVICE).double(),
            torch.randn(10, 8, device=TRITON_DEVICE).double(),
            torch.ones(4, dtype=LONG, device=TRITON_DEVICE),
            backend="triton",
        ),
        [
            "the Triton kernel takes float32/bfloat16/float16, but hidden is torch.float64",
            "backend='torch'",
        ],
    ),
    "cross-entropy-zero-classes": (
        lambda: _ce(torch.randn(4, 0), torch.ones(4, dtype=LONG)),
        ["cross_entropy: logits (4, 0) have V=0 classes"],
    ),
    "apply-rotary-negative-offset": (
        lambda: _rope(position_offset=-1),
        ["apply_rotary: position_offset -1 must be >= 0"],
    ),
    "rms-norm-float64-triton": (
        lambda: _rms(
            torch.ones(3, 8, device=TRITON_DEVICE).double(),
            torch.ones(8, device=TRITON_DEVICE).double(),
            backend="triton",
        ),
        [
            "rms_norm: the Triton kernel takes float32/bfloat16/float16, but x is torch.float64",
            "backend='torch'",
        ],
    ),
    "model-labels-out-of-range": (
        lambda: _model_loss(torch.tensor([[1, 2, 999]])),
        ["target 999 is outside [0, 300)"],
    ),
}


@pytest.mark.parametrize("case", list(OPS_CASES))
def test_ops(case):
    call, fragments = OPS_CASES[case]
    with pytest.raises(ValueError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_ops_moe_route_top_k_above_experts():
    try:
        from minimind_fast.ops import moe_route
    except ImportError as error:
        pytest.skip(f"moe_route is not importable yet: {error}")
    with pytest.raises(ValueError, match=r"top_k=5 must be in \[1, 4\]"):
        moe_route(torch.randn(6, 4), 5)
