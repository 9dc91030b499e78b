"""Property tests: ops.rms_norm and ops.add_rms_norm against transformers' LlamaRMSNorm and
F.rms_norm (float64), forward and backward, on the Triton kernel (interpreted on CPU) and on the
torch reference.

Random: leading shape, hidden size, scale of x, eps, dtype (weight in x's dtype or float32, the
AMP case; a residual stream in float32 under a half branch for the fused add), and the memory
layout of x (strided rows, column steps, transposed, stride-0 expanded rows). Forward truth:
LlamaRMSNorm (normalise in fp32, round to x's dtype, times the weight), cast to the op's
output dtype; gradient truth: autograd of F.rms_norm on the same values in float64.
Tolerances: tests/ops/property_helpers.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from property_helpers import BACKENDS, LAYOUTS, check_close, dtypes_for, laid_out, randn

from minimind_fast import ops

transformers = pytest.importorskip("transformers", reason="needs transformers (LlamaRMSNorm)")


@st.composite
def cases(draw, backend: str) -> dict:
    dtype = draw(dtypes_for(backend))
    hidden = draw(st.one_of(st.integers(1, 300), st.sampled_from((4096, 16384))))
    return dict(
        dtype=dtype,
        hidden=hidden,
        lead=draw(st.sampled_from(((1,), (3,), (2, 5), (9,)) if hidden <= 300 else ((1,), (2,)))),
        weight_fp32=dtype != torch.float64 and draw(st.booleans()),
        residual_fp32=dtype != torch.float64 and draw(st.booleans()),
        scale=draw(st.sampled_from((1e-3, 1.0, 30.0))),
        eps=draw(st.sampled_from((1e-6, 1e-5, 1e-2))),
        layout=draw(st.sampled_from(LAYOUTS + ("expanded",))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_x(case: dict, offset: int, dtype: torch.dtype) -> torch.Tensor:
    rows = 1
    for size in case["lead"]:
        rows *= size
    values = randn(rows, case["hidden"], seed=case["seed"] + offset)
    values = (values * case["scale"]).to(dtype)
    if case["layout"] == "expanded":  # one row repeated by a stride-0 view
        return values[:1].expand(rows, case["hidden"]).view(*case["lead"], case["hidden"])
    return laid_out(values, case["layout"]).view(*case["lead"], case["hidden"])


def make_weight(case: dict) -> torch.Tensor:
    dtype = torch.float32 if case["weight_fp32"] else case["dtype"]
    return (1 + 0.5 * randn(case["hidden"], seed=case["seed"] + 9)).to(dtype)


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(x.shape[-1], eps=eps).to(weight.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
        return norm(x)


def check_forward(
    y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    dtype: torch.dtype,
    name: str,
) -> None:
    """y against LlamaRMSNorm (which normalises in fp32, float64 inputs too) and against
    F.rms_norm in float64."""
    hf_dtype = torch.float32 if dtype == torch.float64 else dtype
    check_close(y, hf_rms_norm(x, weight, eps).to(y.dtype), hf_dtype, f"{name} vs LlamaRMSNorm")
    exact = F.rms_norm(x.double(), (x.shape[-1],), weight.double(), eps)
    check_close(y, exact, dtype, f"{name} vs F.rms_norm")


def grads_in_float64(fn, inputs, upstreams):
    """Gradients of fn's outputs (a tensor or a tuple) for `upstreams`, in float64."""
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    torch.autograd.backward(outputs, [g.double() for g in upstreams])
    return [leaf.grad for leaf in leaves]


def term_sizes(x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor, eps: float):
    """The sizes of the terms dx = r * (dn - n * mean(dn * n)) and dw = sum_rows dy * n add up
    (n = x * r, dn = dy * w), in float64: their rounding error scales with these."""
    x, weight, dy = x.double(), weight.double(), dy.double()
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    n = x * rstd
    dn = (dy * weight).abs()
    dx = rstd * (dn + n.abs() * (dn * n.abs()).mean(-1, keepdim=True))
    return dx, (dy * n).abs().reshape(-1, x.shape[-1]).sum(0)


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_rms_norm_matches_transformers_and_torch(backend, data):
    case = data.draw(cases(backend))
    x, weight = make_x(case, 0, case["dtype"]), make_weight(case)
    eps = case["eps"]
    x_leaf, w_leaf = x.detach().requires_grad_(), weight.detach().requires_grad_()
    y = ops.rms_norm(x_leaf, w_leaf, eps, backend=backend)
    upstream = randn(*y.shape, seed=case["seed"] + 5).to(y.dtype)
    y.backward(upstream)
    assert y.dtype == x.dtype and x_leaf.grad.dtype == x.dtype
    assert w_leaf.grad.dtype == weight.dtype
    check_forward(y, x, weight, eps, x.dtype, "y")
    expected_dx, expected_dw = grads_in_float64(
        lambda a, w: F.rms_norm(a, (case["hidden"],), w, eps), (x, weight), [upstream]
    )
    dx_size, dw_size = term_sizes(x, weight, upstream, eps)
    check_close(x_leaf.grad, expected_dx, x.dtype, "dx", dx_size)
    check_close(w_leaf.grad, expected_dw, x.dtype, "dweight", dw_size)  # x-dtype products


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_add_rms_norm_matches_transformers_and_torch(backend, data):
    case = data.draw(cases(backend))
    x, weight = make_x(case, 0, case["dtype"]), make_weight(case)
    residual = make_x(case, 1, torch.float32 if case["residual_fp32"] else case["dtype"])
    eps = case["eps"]
    leaves = [t.detach().requires_grad_() for t in (x, residual, weight)]
    normed, updated = ops.add_rms_norm(*leaves, eps, backend=backend)
    out_dtype = torch.result_type(x, residual)
    grads = [randn(*normed.shape, seed=case["seed"] + i).to(out_dtype) for i in (5, 6)]
    torch.autograd.backward((normed, updated), grads)
    expected_updated = residual + x  # PyTorch's own add, rounded to the promoted dtype
    assert normed.dtype == updated.dtype == out_dtype
    check_close(updated, expected_updated, out_dtype, "updated")
    check_forward(normed, expected_updated, weight, eps, out_dtype, "normed")

    def fused(a, r, w):
        total = r + a
        return F.rms_norm(total, (case["hidden"],), w, eps), total

    expected = grads_in_float64(fused, (x, residual, weight), grads)
    dx_size, dw_size = term_sizes(expected_updated, weight, grads[0], eps)
    sizes = (dx_size + grads[1].double().abs(),) * 2 + (dw_size,)
    for name, leaf, ref, size in zip(
        ("dx", "dresidual", "dweight"), leaves, expected, sizes, strict=True
    ):
        assert leaf.grad.dtype == leaf.dtype, name
        check_close(leaf.grad, ref, case["dtype"], name, size)
