"""Property tests: ops.apply_rotary against transformers' apply_rotary_pos_emb (float64), forward
and backward, on the Triton kernel (interpreted on CPU) and on the torch reference.

Random: batch, sequence length, query and key/value heads (GQA), even head_dim, dtype, tables
(MiniMind's rope_tables with a random theta, YaRN-scaled ones, or arbitrary cos/sin whose two
halves differ), position_offset into longer tables (KV-cache decoding) and the memory layout of
q and k (contiguous, views into one fused qkv projection, transposed from (B, H, T, D)).
Tolerances: tests/ops/property_helpers.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from property_helpers import BACKENDS, DEVICE, check_close, dtypes_for, randn

from minimind_fast import ops

transformers = pytest.importorskip(
    "transformers", reason="needs transformers (apply_rotary_pos_emb)"
)


@st.composite
def cases(draw, backend: str) -> dict:
    return dict(
        dtype=draw(dtypes_for(backend)),
        batch=draw(st.integers(1, 2)),
        seq_len=draw(st.integers(1, 6)),
        q_heads=draw(st.integers(1, 8)),
        kv_heads=draw(st.integers(1, 4)),
        head_dim=2 * draw(st.integers(1, 64)),
        tables=draw(st.sampled_from(("minimind", "yarn", "random"))),
        theta=draw(st.sampled_from((1e4, 1e6))),
        offset=draw(st.one_of(st.none(), st.integers(0, 6))),
        layout=draw(st.sampled_from(("contiguous", "fused_qkv", "transposed"))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_tables(case: dict):
    """(cos, sin) for apply_rotary's call: (T, D), or longer full tables with an offset."""
    rows = case["seq_len"] + (case["offset"] or 0)
    head_dim = case["head_dim"]
    if case["tables"] == "random":
        return (
            randn(rows, head_dim, seed=case["seed"] + 7),
            randn(rows, head_dim, seed=case["seed"] + 8),
        )
    scaling = None
    if case["tables"] == "yarn":
        scaling = {"factor": 4, "original_max_position_embeddings": 2}
    return ops.rope_tables(head_dim, rows, case["theta"], rope_scaling=scaling, device=DEVICE)


def make_qk(case: dict):
    batch, seq_len, head_dim = case["batch"], case["seq_len"], case["head_dim"]
    hq, hkv, dtype = case["q_heads"], case["kv_heads"], case["dtype"]
    seed = case["seed"]
    if case["layout"] == "fused_qkv":  # q and k as strided views into one projection output
        qkv = randn(batch, seq_len, (hq + 2 * hkv) * head_dim, seed=seed).to(dtype)
        q = qkv[..., : hq * head_dim].view(batch, seq_len, hq, head_dim)
        k = qkv[..., hq * head_dim : (hq + hkv) * head_dim].view(batch, seq_len, hkv, head_dim)
        return q, k
    q = randn(batch, hq, seq_len, head_dim, seed=seed).to(dtype)
    k = randn(batch, hkv, seq_len, head_dim, seed=seed + 1).to(dtype)
    if case["layout"] == "transposed":  # (B, H, T, D) storage seen as (B, T, H, D)
        return q.transpose(1, 2), k.transpose(1, 2)
    return q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_apply_rotary_matches_transformers(backend, data):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    case = data.draw(cases(backend))
    cos, sin = make_tables(case)
    q, k = make_qk(case)
    offset = case["offset"]
    q_leaf, k_leaf = q.detach().requires_grad_(), k.detach().requires_grad_()
    q_rot, k_rot = ops.apply_rotary(
        q_leaf, k_leaf, cos, sin, backend=backend, position_offset=offset
    )
    upstream = [
        randn(*t.shape, seed=case["seed"] + i).to(t.dtype) for i, t in ((3, q_rot), (4, k_rot))
    ]
    torch.autograd.backward((q_rot, k_rot), upstream)

    start = offset or 0
    positions = slice(start, start + case["seq_len"])
    hf_cos, hf_sin = cos[positions][None].double(), sin[positions][None].double()  # (1, T, D)
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    expected = apply_rotary_pos_emb(q64, k64, hf_cos, hf_sin, unsqueeze_dim=2)  # (B, T, H, D)
    torch.autograd.backward(expected, [g.double() for g in upstream])
    dtype = case["dtype"]
    for name, actual, ref in (
        ("q_rot", q_rot, expected[0]),
        ("k_rot", k_rot, expected[1]),
        ("dq", q_leaf.grad, q64.grad),
        ("dk", k_leaf.grad, k64.grad),
    ):
        assert actual.dtype == dtype, name
        check_close(actual, ref, dtype, name)
