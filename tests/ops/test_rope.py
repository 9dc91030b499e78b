"""Rotary embedding: the Triton op against the PyTorch reference, forward and backward.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py) with small shapes; the
same tests run on CUDA (plus larger shapes) when a GPU is present.

Tolerance table: |actual - reference| <= rtol * |reference| + atol * max|reference|, per dtype.
  float32   rtol 1e-5, atol 1e-5   (both compute x*cos +/- x'*sin in fp32; FMA contraction may
                                    differ)
  float16   rtol 2e-3, atol 2e-3   (about 2 ulp of fp16)
  bfloat16  rtol 2e-2, atol 2e-2   (about 2.5 ulp of bf16; the Triton interpreter casts
                                    fp32 -> bf16 by truncation where a GPU rounds to nearest)
float64 runs on the reference only (in float64: gradcheck below); the kernel refuses it.
"""

import pytest
import torch
from helpers import HAS_CUDA, assert_close

from minimind_fast import ops
from minimind_fast.ops import reference

TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HEADS = [(4, 1), (8, 2), (4, 4)]
HEAD_DIMS = [32, 80, 128]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _cases():
    cases = [
        pytest.param("cpu", 2, 5, hq, hkv, d, id=f"cpu-B2T5-{hq}x{hkv}-D{d}")
        for hq, hkv in HEADS
        for d in HEAD_DIMS
    ]
    cases += [pytest.param("cpu", 1, 3, 2, 1, d, id=f"cpu-B1T3-2x1-D{d}") for d in (96, 256)]
    cuda_shapes = [(2, 5, hq, hkv, d) for hq, hkv in HEADS for d in HEAD_DIMS]
    cuda_shapes += [
        (4, 1031, 8, 2, 64),
        (2, 257, 16, 1, 96),
        (1, 129, 32, 8, 256),
        (3, 17, 12, 4, 80),
    ]
    cases += [
        pytest.param(
            "cuda", *shape, id="cuda-B{}T{}-{}x{}-D{}".format(*shape), marks=pytest.mark.cuda
        )
        for shape in cuda_shapes
    ]
    return cases


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Same shape and dtype, values within the tolerance table's row for `dtype`."""
    tol = TOLERANCES[dtype]
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = max(expected.float().abs().max().item(), 1e-6)
    assert_close(actual, expected, atol=tol * scale, rtol=tol)


def _run(fn, q, k, cos, sin, dq_rot=None, dk_rot=None):
    """Forward on fresh leaves; backward with the given output grads (or sum() -> stride-0
    grads)."""
    q, k = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
    q_rot, k_rot = fn(q, k, cos, sin)
    if dq_rot is None:
        (q_rot.sum() + k_rot.sum()).backward()
    else:
        torch.autograd.backward((q_rot, k_rot), (dq_rot, dk_rot))
    return q_rot, k_rot, q.grad, k.grad


def _triton(q, k, cos, sin):
    return ops.apply_rotary(q, k, cos, sin, backend="triton")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,batch,seq_len,n_q_heads,n_kv_heads,head_dim", _cases())
def test_apply_rotary_matches_reference(
    device, batch, seq_len, n_q_heads, n_kv_heads, head_dim, dtype
):
    cos, sin = ops.rope_tables(head_dim, seq_len + 7, device=device)
    cos, sin = cos[7:], sin[7:]  # positions 7.. (a sliced view, as a KV-cache caller passes)
    q = torch.randn(batch, seq_len, n_q_heads, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch, seq_len, n_kv_heads, head_dim, device=device, dtype=dtype)
    grads = (torch.randn_like(q), torch.randn_like(k))
    actual = _run(_triton, q, k, cos, sin, *grads)
    expected = _run(reference.apply_rotary, q, k, cos, sin, *grads)
    for a, e in zip(actual, expected):
        assert_matches(a, e, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_general_tables_backward_is_the_exact_transpose(device):
    """Tables whose two halves differ (not MiniMind's, but allowed by the (T, D) contract)."""
    cos, sin = torch.randn(4, 48, device=device), torch.randn(4, 48, device=device)
    q, k = torch.randn(2, 4, 3, 48, device=device), torch.randn(2, 4, 1, 48, device=device)
    grads = (torch.randn_like(q), torch.randn_like(k))
    for a, e in zip(
        _run(_triton, q, k, cos, sin, *grads), _run(reference.apply_rotary, q, k, cos, sin, *grads)
    ):
        assert_matches(a, e, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs_expanded_grads_and_no_mutation(device):
    batch, seq_len, n_q_heads, n_kv_heads, head_dim = 2, 6, 4, 2, 32
    cos, sin = ops.rope_tables(head_dim, seq_len, device=device)
    # q and k as views into one fused qkv projection output (strided rows), and a transposed q.
    qkv = torch.randn(batch, seq_len, (n_q_heads + 2 * n_kv_heads) * head_dim, device=device)
    q_view = qkv[..., : n_q_heads * head_dim].view(batch, seq_len, n_q_heads, head_dim)
    k_view = qkv[..., n_q_heads * head_dim : (n_q_heads + n_kv_heads) * head_dim].view(
        batch, seq_len, n_kv_heads, head_dim
    )
    q_transposed = torch.randn(batch, n_q_heads, seq_len, head_dim, device=device).transpose(1, 2)
    for q, k in ((q_view, k_view), (q_transposed, k_view)):
        assert not q.is_contiguous()
        before = (q.clone(), k.clone())
        actual = _run(_triton, q, k, cos, sin)  # .sum() backward: stride-0 upstream gradients
        assert torch.equal(q, before[0]) and torch.equal(k, before[1])
        for a, e in zip(actual, _run(reference.apply_rotary, q, k, cos, sin)):
            assert_matches(a, e, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_position_offset_for_decoding(device):
    head_dim = 64
    cos, sin = ops.rope_tables(head_dim, 32, device=device)
    for offset, seq_len in ((0, 5), (9, 1), (27, 5)):
        q = torch.randn(2, seq_len, 4, head_dim, device=device)
        k = torch.randn(2, seq_len, 1, head_dim, device=device)
        q_rot, k_rot = ops.apply_rotary(q, k, cos, sin, backend="triton", position_offset=offset)
        q_ref, k_ref = reference.apply_rotary(
            q, k, cos[offset : offset + seq_len], sin[offset : offset + seq_len]
        )
        assert_matches(q_rot, q_ref, torch.float32)
        assert_matches(k_rot, k_ref, torch.float32)
    with pytest.raises(ValueError, match="position_offset 30 \\+ T 5 exceeds the 32 rows"):
        ops.apply_rotary(q, k, cos, sin, backend="triton", position_offset=30)
    with pytest.raises(ValueError, match="position_offset -1 must be >= 0"):
        ops.apply_rotary(q, k, cos, sin, backend="triton", position_offset=-1)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    cos, sin = ops.rope_tables(80, 3, device=device)
    q = torch.randn(2, 3, 4, 80, device=device, requires_grad=True)
    k = torch.randn(2, 3, 1, 80, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.minimind_fast.apply_rotary, (q, k, cos, sin))
    torch.library.opcheck(
        torch.ops.minimind_fast.apply_rotary_backward,
        (torch.randn_like(q), torch.randn_like(k), cos, sin),
    )


def _attention_inputs(q, k, cos, sin):
    q_rot, k_rot = ops.apply_rotary(q, k, cos, sin)
    return (q_rot * q_rot.sum(2, keepdim=True)).sum() + k_rot.pow(2).sum()


@pytest.mark.parametrize(
    "backend,compile_backend,device",
    [
        (
            "triton",
            "aot_eager",
            "cpu",
        ),  # traced through the fake impls, runs the interpreted kernels
        ("torch", "aot_eager", "cpu"),
        pytest.param("triton", "inductor", "cuda", marks=pytest.mark.cuda),
        pytest.param("torch", "inductor", "cuda", marks=pytest.mark.cuda),
    ],
)
def test_compile_fullgraph(backend, compile_backend, device):
    torch._dynamo.reset()
    cos, sin = ops.rope_tables(32, 5, device=device)
    q, k = torch.randn(2, 5, 4, 32, device=device), torch.randn(2, 5, 2, 32, device=device)
    results = []
    for fn, name in (
        (torch.compile(_attention_inputs, fullgraph=True, backend=compile_backend), backend),
        (_attention_inputs, "torch"),
    ):
        ql, kl = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
        with ops.use_backend(name):
            loss = fn(ql, kl, cos, sin)
        loss.backward()
        results.append((loss, ql.grad, kl.grad))
    for actual, expected in zip(*results):
        assert_matches(actual, expected, torch.float32)


def test_torch_backend_is_the_reference_and_bad_input_raises():
    cos, sin = ops.rope_tables(32, 4)
    q, k = torch.randn(1, 4, 2, 32), torch.randn(1, 4, 1, 32)
    for a, e in zip(
        ops.apply_rotary(q, k, cos, sin, backend="torch"), reference.apply_rotary(q, k, cos, sin)
    ):
        assert torch.equal(a, e)
    with pytest.raises(ValueError, match=r"must be \(T, D\)"):
        ops.apply_rotary(q, k, cos[:3], sin[:3], backend="triton")
    with pytest.raises(ValueError, match="same B, T and D"):
        ops.apply_rotary(q, k[:, :3], cos, sin, backend="triton")
    with pytest.raises(ValueError, match="even"):
        ops.apply_rotary(q[..., :31], k[..., :31], cos[:, :31], sin[:, :31], backend="triton")


def test_float64_reference_passes_gradcheck_and_triton_refuses():
    cos, sin = ops.rope_tables(8, 3)
    q = torch.randn(2, 3, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 1, 8, dtype=torch.float64, requires_grad=True)

    def fn(a, b):
        return ops.apply_rotary(a, b, cos, sin, backend="torch")

    assert all(out.dtype == torch.float64 for out in fn(q, k))
    assert torch.autograd.gradcheck(fn, (q, k))
    device = "cuda" if HAS_CUDA else "cpu"  # where the Triton backend runs
    q, k, cos, sin = (t.detach().to(device) for t in (q, k, cos, sin))
    with pytest.raises(
        ValueError,
        match="^apply_rotary: the Triton kernel takes float32/bfloat16/"
        "float16, but q is torch.float64; use backend='torch'",
    ):
        ops.apply_rotary(q, k, cos, sin, backend="triton")
