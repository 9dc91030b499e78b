"""RMSNorm and fused add + RMSNorm: the Triton op against the PyTorch reference, forward and
backward.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py) with small shapes; the
same tests run on CUDA (plus larger shapes) when a GPU is present.

Tolerance table: |actual - reference| <= rtol * |reference| + atol * max|reference|, per dtype.
  float32   rtol 1e-5, atol 1e-5   (fp32 accumulation in both; reduction order differs)
  float16   rtol 2e-3, atol 2e-3   (about 2 ulp of fp16)
  bfloat16  rtol 2e-2, atol 2e-2   (about 2.5 ulp of bf16: the reference rounds d(normed) to bf16
                                    in its backward where the kernel keeps fp32, and the Triton
                                    interpreter casts fp32 -> bf16 by truncation where a GPU
                                    rounds to nearest)
float64 runs on the reference only (in float64: gradcheck below); the kernel refuses it.
"""

import pytest
import torch
from helpers import HAS_CUDA, assert_close

from minimind_fast import ops
from minimind_fast.nn import RMSNorm
from minimind_fast.ops import reference

TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CPU_SHAPES = [(rows, hidden) for rows in (1, 3, 123) for hidden in (64, 123, 512, 768)] + [
    (3, 4096),
    (2, 16384),
]
CUDA_SHAPES = (
    CPU_SHAPES
    + [(4097, hidden) for hidden in (64, 123, 512, 768, 4096)]
    + [(123, 4096), (257, 16384)]
)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
EPS = 1e-5


def _cases():
    cases = [
        pytest.param("cpu", rows, hidden, id=f"cpu-{rows}x{hidden}") for rows, hidden in CPU_SHAPES
    ]
    cases += [
        pytest.param("cuda", rows, hidden, id=f"cuda-{rows}x{hidden}", marks=pytest.mark.cuda)
        for rows, hidden in CUDA_SHAPES
    ]
    return cases


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Same shape and dtype, values within the tolerance table's row for `dtype`."""
    tol = TOLERANCES[dtype]
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = max(expected.float().abs().max().item(), 1e-6) if expected.numel() else 1.0
    assert_close(actual, expected, atol=tol * scale, rtol=tol)


def _leaf(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone().requires_grad_(True)


def _run(fn, inputs, grads):
    """Forward fn on fresh leaves, backward with `grads`; returns (outputs, input grads)."""
    leaves = [_leaf(t) for t in inputs]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    torch.autograd.backward(outputs, grads)
    return outputs, [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,rows,hidden", _cases())
def test_rms_norm_matches_reference(device, rows, hidden, dtype):
    x = torch.randn(rows, hidden, device=device, dtype=dtype) * 3
    weight = (1 + 0.5 * torch.randn(hidden, device=device)).to(dtype)
    dy = torch.randn(rows, hidden, device=device, dtype=dtype)
    (y,), (dx, dw) = _run(
        lambda a, w: ops.rms_norm(a, w, EPS, backend="triton"), (x, weight), (dy,)
    )
    (y_ref,), (dx_ref, dw_ref) = _run(
        lambda a, w: reference.rms_norm(a, w, EPS), (x, weight), (dy,)
    )
    assert_matches(y, y_ref, dtype)
    assert_matches(dx, dx_ref, dtype)
    assert_matches(dw, dw_ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_leading_dims_and_fp32_weight_with_bf16_input(device):
    """(B, T, H) input in bf16 with an fp32 weight (the AMP case): y stays bf16, dw stays fp32."""
    x = torch.randn(2, 5, 96, device=device, dtype=torch.bfloat16)
    weight = 1 + 0.5 * torch.randn(96, device=device)
    dy = torch.randn_like(x)
    (y,), (dx, dw) = _run(
        lambda a, w: ops.rms_norm(a, w, EPS, backend="triton"), (x, weight), (dy,)
    )
    (y_ref,), (dx_ref, dw_ref) = _run(
        lambda a, w: reference.rms_norm(a, w, EPS), (x, weight), (dy,)
    )
    assert y.dtype == torch.bfloat16 and dw.dtype == torch.float32
    assert_matches(y, y_ref, torch.bfloat16)
    assert_matches(dx, dx_ref, torch.bfloat16)
    assert_matches(dw, dw_ref, torch.bfloat16)


def _non_contiguous_inputs(device):
    base = torch.randn(7, 4, 80, device=device)
    yield "transposed", base.transpose(0, 1)  # (4, 7, 80), strided rows
    yield "hidden-sliced", torch.randn(6, 5, 101, device=device)[..., 3:83]  # row stride 101
    yield "row-expanded", torch.randn(1, 80, device=device).expand(9, 80)  # stride-0 rows
    yield "row-strided", torch.randn(12, 80, device=device)[::3]  # every third row


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_non_contiguous_inputs_and_expanded_grad(device):
    weight_base = torch.randn(160, device=device)
    for name, x in _non_contiguous_inputs(device):
        weight = weight_base[::2]  # non-contiguous weight too
        results = []
        for fn in (
            lambda a, w: ops.rms_norm(a, w, EPS, backend="triton"),
            lambda a, w: reference.rms_norm(a, w, EPS),
        ):
            xl, wl = x.detach().requires_grad_(True), weight.detach().requires_grad_(True)
            y = fn(xl, wl)
            (y * 2).sum().backward()  # the upstream gradient is a stride-0 expanded tensor
            results.append((y, xl.grad, wl.grad))
        for actual, expected in zip(*results):
            assert_matches(actual, expected, torch.float32), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "device,rows,hidden", [c for c in _cases() if c.values[2] in (64, 123, 768, 4096)]
)
def test_add_rms_norm_matches_reference(device, rows, hidden, dtype):
    x = torch.randn(rows, hidden, device=device, dtype=dtype)
    residual = torch.randn(rows, hidden, device=device, dtype=dtype) * 2
    weight = (1 + 0.5 * torch.randn(hidden, device=device)).to(dtype)
    grads = (
        torch.randn(rows, hidden, device=device, dtype=dtype),
        torch.randn(rows, hidden, device=device, dtype=dtype),
    )
    fused = _run(
        lambda a, r, w: ops.add_rms_norm(a, r, w, EPS, backend="triton"),
        (x, residual, weight),
        grads,
    )
    expected = _run(
        lambda a, r, w: reference.add_rms_norm(a, r, w, EPS), (x, residual, weight), grads
    )
    for actual, ref in zip([*fused[0], *fused[1]], [*expected[0], *expected[1]]):
        assert_matches(actual, ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_add_rms_norm_mixed_dtypes_and_unused_residual_output(device):
    """bf16 branch output + fp32 residual stream (AMP): updated is fp32, each grad in its input's
    dtype. Only `normed` feeds the loss here, so the updated-residual gradient is absent (zero)."""
    x = torch.randn(3, 7, 123, device=device, dtype=torch.bfloat16)
    residual = torch.randn(3, 7, 123, device=device)
    weight = 1 + 0.5 * torch.randn(123, device=device)
    results = []
    for fn in (
        lambda a, r, w: ops.add_rms_norm(a, r, w, EPS, backend="triton"),
        lambda a, r, w: reference.add_rms_norm(a, r, w, EPS),
    ):
        leaves = [_leaf(t) for t in (x, residual, weight)]
        normed, updated = fn(*leaves)
        assert normed.dtype == updated.dtype == torch.float32
        normed.pow(2).sum().backward()
        results.append((normed, updated, *[leaf.grad for leaf in leaves]))
    assert results[0][2].dtype == torch.bfloat16 and results[0][3].dtype == torch.float32
    for actual, expected in zip(*results):
        assert_matches(actual, expected, torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_backward_is_deterministic(device):
    x = torch.randn(123 if device == "cpu" else 16411, 768, device=device, dtype=torch.bfloat16)
    weight = torch.randn(768, device=device)
    dy = torch.randn_like(x)
    rstd = torch.ops.minimind_fast.rms_norm(x, weight, EPS)[1]
    first = torch.ops.minimind_fast.rms_norm_backward(dy, x, weight, rstd, None)
    second = torch.ops.minimind_fast.rms_norm_backward(dy, x, weight, rstd, None)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(2, 5, 123, device=device, requires_grad=True)
    residual = torch.randn(2, 5, 123, device=device, requires_grad=True)
    weight = torch.randn(123, device=device, requires_grad=True)
    dy = torch.randn(2, 5, 123, device=device)
    rstd = torch.rand(2, 5, device=device) + 0.5
    torch.library.opcheck(torch.ops.minimind_fast.rms_norm, (x, weight, EPS))
    torch.library.opcheck(torch.ops.minimind_fast.add_rms_norm, (x, residual, weight, EPS))
    torch.library.opcheck(
        torch.ops.minimind_fast.rms_norm_backward, (dy, x.detach(), weight.detach(), rstd, None)
    )
    torch.library.opcheck(
        torch.ops.minimind_fast.rms_norm_backward, (dy, x.detach(), weight.detach(), rstd, dy)
    )


def _block(x, residual, weight):
    normed, updated = ops.add_rms_norm(x, residual, weight)
    return (ops.rms_norm(normed, weight) * updated).sum()


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
    inputs = (
        torch.randn(2, 3, 64, device=device),
        torch.randn(2, 3, 64, device=device),
        torch.randn(64, device=device),
    )
    with ops.use_backend(backend):
        compiled = torch.compile(_block, fullgraph=True, backend=compile_backend)
        loss, grads = _run(compiled, inputs, None)
    with ops.use_backend("torch"):
        loss_ref, grads_ref = _run(_block, inputs, None)
    assert_matches(loss[0], loss_ref[0], torch.float32)
    for actual, expected in zip(grads, grads_ref):
        assert_matches(actual, expected, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_module_matches_reference(device):
    norm = RMSNorm(123).to(device)
    assert list(norm.state_dict()) == ["weight"] and torch.equal(
        norm.weight, torch.ones(123, device=device)
    )
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 3, 123, device=device)
    residual = torch.randn(2, 3, 123, device=device)
    with ops.use_backend("triton"):
        y = norm(x)
        normed, updated = norm.add_forward(x, residual)
    assert_matches(y, reference.rms_norm(x, norm.weight, 1e-5), torch.float32)
    normed_ref, updated_ref = reference.add_rms_norm(x, residual, norm.weight, 1e-5)
    assert_matches(normed, normed_ref, torch.float32)
    assert_matches(updated, updated_ref, torch.float32)


def test_torch_backend_is_the_reference_and_bad_input_raises():
    x, weight = torch.randn(3, 64), torch.randn(64)
    assert torch.equal(
        ops.rms_norm(x, weight, backend="torch"), reference.rms_norm(x, weight, 1e-5)
    )
    with pytest.raises(ValueError, match="weight shape"):
        ops.rms_norm(x, torch.randn(63), backend="triton")
    with pytest.raises(ValueError, match="residual shape"):
        ops.add_rms_norm(x, torch.randn(3, 1), weight, backend="triton")
    with pytest.raises(ValueError, match="exceeds"):
        ops.rms_norm(torch.randn(1, 16385), torch.randn(16385), backend="triton")
    with pytest.raises(ValueError, match="float32/bfloat16/float16"):
        ops.rms_norm(x.double(), weight.double(), backend="triton")


@pytest.mark.parametrize("fused", [False, True])
def test_float64_reference_passes_gradcheck_and_triton_refuses(fused):
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, dtype=torch.float64, requires_grad=True)
    if fused:

        def fn(a, r, w):
            return ops.add_rms_norm(a, r, w, EPS, backend="torch")

        inputs = (x, residual, weight)
    else:

        def fn(a, w):
            return ops.rms_norm(a, w, EPS, backend="torch")

        inputs = (x, weight)
    assert all(out.dtype == torch.float64 for out in (fn(*inputs) if fused else (fn(*inputs),)))
    assert torch.autograd.gradcheck(fn, inputs)
    name = "add_rms_norm" if fused else "rms_norm"
    device = "cuda" if HAS_CUDA else "cpu"  # where the Triton backend runs
    x, residual, weight = (t.detach().to(device) for t in (x, residual, weight))
    with pytest.raises(
        ValueError,
        match=f"^{name}: the Triton kernel takes float32/bfloat16/"
        "float16, but x is torch.float64; use backend='torch'",
    ):
        if fused:
            ops.add_rms_norm(x, residual, weight, EPS, backend="triton")
        else:
            ops.rms_norm(x, weight, EPS, backend="triton")
