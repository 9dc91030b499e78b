"""RoPE (rotate-half, GQA): ours vs eager reference vs torch.compile(reference) (vs Liger on GPU),
forward and forward+backward, q (B, T, Hq, D) and k (B, T, Hkv, D) rotated together.

Shapes: MiniMind2's attention (8 query heads, 2 KV heads, head_dim 64); full B=8, T=2048,
small B=2, T=256. Bytes: read q, k and write both (fwd), the same again for the backward
(the rotation by -theta), tables negligible. Liger runs on its native (B, H, T, D) layout,
transposed before timing. No target; reported for the side-by-side table.
"""
import pytest
import torch

from harness import (DEVICE, DTYPE, compiled, grads_of, liger_functional, measure, ours_or_skip,
                     record_bandwidth, record_memory, size)
from minimind_fast import ops
from minimind_fast.ops import reference

B, T = size(2, 8), size(256, 2048)
HQ, HKV, D = 8, 2, 64


@pytest.mark.parametrize("impl", ["ours", "eager", "compiled", "liger"])
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_rotary(benchmark, mode, impl):
    benchmark.group = f"rotary {mode}"
    grad = mode == "fwdbwd"
    cos, sin = ops.rope_tables(D, T, 1e6)
    cos, sin = cos.to(DEVICE), sin.to(DEVICE)
    q = torch.randn(B, T, HQ, D, device=DEVICE, dtype=DTYPE)
    k = torch.randn(B, T, HKV, D, device=DEVICE, dtype=DTYPE)
    if impl == "ours":
        ours_or_skip()
        fn = ops.apply_rotary
    elif impl == "eager":
        fn = reference.apply_rotary
    elif impl == "compiled":
        fn = compiled(reference.apply_rotary)
    else:
        liger = liger_functional()
        q, k = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()  # (B, H, T, D)
        cos, sin = cos.to(DTYPE)[None], sin.to(DTYPE)[None]
        fn = liger.liger_rotary_pos_emb
    q.requires_grad_(grad)
    k.requires_grad_(grad)
    if not grad:
        def step():
            return fn(q, k, cos, sin)
    else:
        dq, dk = torch.randn_like(q), torch.randn_like(k)

        def step():
            return grads_of(fn(q, k, cos, sin), (q, k), (dq, dk))
    median = measure(benchmark, step)
    unit = (q.numel() + k.numel()) * q.element_size()
    benchmark.extra_info.update(shape_q=[B, T, HQ, D], shape_k=[B, T, HKV, D], dtype=str(DTYPE))
    record_bandwidth(benchmark, (2 if not grad else 4) * unit, median)
    record_memory(benchmark, step)
