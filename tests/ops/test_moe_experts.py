"""The MoE expert ops (minimind_fast/ops/grouped_linear.py, moe_experts.py, moe_permute.py) vs
their references: forward and gradients in fp32 and bf16, empty groups, opcheck and
torch.compile(fullgraph=True) of the registered grouped_linear ops, the input checks.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from minimind_fast import compat
from minimind_fast.ops import gather_pairs, grouped_linear, moe_experts, permute_rows, use_backend
from minimind_fast.ops.grouped_linear import zero_empty_groups
from minimind_fast.ops.moe_reference import grouped_linear_reference, moe_experts_reference

GROUPED_LINEAR = torch.ops.minimind_fast.grouped_linear.default
GROUPED_LINEAR_BACKWARD = torch.ops.minimind_fast.grouped_linear_backward.default
# (dtype, forward atol/rtol, gradient atol/rtol): bf16 products round at 8 bits
DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-4, id="fp32"),
    pytest.param(torch.bfloat16, 2e-2, 5e-2, id="bf16"),
]
SIZES = [0, 3, 5, 0, 8, 1]  # rows per group: the first group and a middle one are empty


def ends_of(sizes):
    return torch.tensor(sizes).cumsum(0).to(torch.int32)


def make_inputs(sizes, K, M, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), K, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(len(sizes), M, K, generator=g) / K**0.5).to(dtype).requires_grad_()
    return x, weight, ends_of(sizes)


def forward_and_grads(fn, *inputs):
    out = fn(*inputs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
    grads = torch.autograd.grad(out, [t for t in inputs if t.requires_grad], grad_out)
    return out.detach(), grads


def per_group_loop(x, weight, sizes):
    """The oracle: each group's rows through its own weight, with boolean masks."""
    group = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    out = x.new_zeros(x.shape[0], weight.shape[1])
    for g in range(len(sizes)):
        mask = group == g
        out[mask] = F.linear(x[mask], weight[g])
    return out


@pytest.mark.parametrize("dtype,atol,grad_atol", DTYPES)
@pytest.mark.parametrize("backend", ["grouped_mm", "torch"])
def test_grouped_linear_matches_per_group_loop(backend, dtype, atol, grad_atol):
    x, weight, ends = make_inputs(SIZES, 32, 48, dtype)
    got, got_grads = forward_and_grads(
        lambda a, b: grouped_linear(a, b, ends, backend=backend), x, weight
    )
    want, want_grads = forward_and_grads(lambda a, b: per_group_loop(a, b, SIZES), x, weight)
    torch.testing.assert_close(got, want, atol=atol, rtol=atol)
    for name, a, b in zip(("x", "weight"), got_grads, want_grads, strict=True):
        assert_close(a, b, atol=grad_atol, rtol=grad_atol, what=name)
    for g in (0, 3):  # empty groups: a zero weight gradient, not garbage
        assert torch.count_nonzero(got_grads[1][g]) == 0


def test_grouped_linear_auto_runs_grouped_mm_where_it_can(monkeypatch):
    calls = []
    grouped_mm = compat.grouped_mm()

    def counting(*args, **kwargs):
        calls.append(args[0].dtype)
        return grouped_mm(*args, **kwargs)

    monkeypatch.setattr(compat, "grouped_mm", lambda: counting)
    x, weight, ends = make_inputs(SIZES, 32, 48, torch.float32)
    grouped_linear(x, weight, ends).sum().backward()
    assert len(calls) == 3  # forward, then grad_x and grad_weight
    x, weight, ends = make_inputs(SIZES, 30, 48, torch.float32)  # 120-byte rows: not aligned
    torch.testing.assert_close(
        grouped_linear(x, weight, ends), grouped_linear_reference(x, weight, ends)
    )
    x64, weight64, ends = make_inputs(SIZES, 32, 48, torch.float64)  # no fp64 grouped_mm
    grouped_linear(x64, weight64, ends)
    assert len(calls) == 3
    with pytest.raises(ValueError, match="'grouped_mm' cannot run torch.float64"):
        grouped_linear(x64, weight64, ends, backend="grouped_mm")


def test_zero_empty_groups():
    """The CUDA backward's guard: the weight gradient of a group without rows is zero."""
    grad_weight = torch.randn(len(SIZES), 4, 3)
    zeroed = zero_empty_groups(grad_weight, ends_of(SIZES))
    for g, size in enumerate(SIZES):
        assert torch.equal(zeroed[g], torch.zeros(4, 3) if size == 0 else grad_weight[g])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grouped_linear_opcheck(dtype):
    x, weight, ends = make_inputs(SIZES, 32, 16, dtype)
    torch.library.opcheck(GROUPED_LINEAR, (x, weight, ends))
    grad = torch.randn(x.shape[0], 16).to(dtype)
    torch.library.opcheck(GROUPED_LINEAR_BACKWARD, (grad, x.detach(), weight.detach(), ends))


def test_grouped_linear_compiles_fullgraph():
    x, weight, ends = make_inputs(SIZES, 32, 16, torch.float32)

    def fn(a, b):
        return grouped_linear(a, b, ends).square().sum()

    eager, eager_grads = forward_and_grads(fn, x, weight)
    compiled, compiled_grads = forward_and_grads(
        torch.compile(fn, fullgraph=True, backend="aot_eager"), x, weight
    )
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "call,message",
    [
        (
            lambda: grouped_linear(torch.randn(4, 8), torch.randn(2, 8), torch.tensor([2, 4])),
            "must be \\(N, K\\) and \\(G, M, K\\)",
        ),
        (
            lambda: grouped_linear(torch.randn(4, 8), torch.randn(2, 6, 8), torch.tensor([2, 4])),
            "ends must be int32 of shape \\(2,\\)",
        ),
        (
            lambda: grouped_linear(
                torch.randn(4, 8), torch.randn(2, 6, 8), torch.tensor([4], dtype=torch.int32)
            ),
            "got torch.int32 \\(1,\\)",
        ),
        (
            lambda: grouped_linear(
                torch.randn(4, 8),
                torch.randn(2, 6, 8),
                torch.tensor([2, 4], dtype=torch.int32),
                backend="cuda",
            ),
            "grouped_linear backend='cuda' is not a backend",
        ),
    ],
)
def test_grouped_linear_rejects_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------------------- moe_experts


def make_experts(counts, hidden, inter, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    expert_in = torch.randn(sum(counts), hidden, generator=g).to(dtype).requires_grad_()

    def weights(out_features, in_features):
        return [
            (torch.randn(out_features, in_features, generator=g) / in_features**0.5)
            .to(dtype)
            .requires_grad_()
            for _ in counts
        ]

    expert_counts = torch.tensor(counts)
    offsets = F.pad(expert_counts.cumsum(0), (1, 0))
    return (
        expert_in,
        expert_counts,
        offsets,
        weights(inter, hidden),
        weights(inter, hidden),
        weights(hidden, inter),
    )


def swiglu_mask_loop(expert_in, expert_counts, gate, up, down):
    """The oracle: MiniMind's FeedForward per expert, on the rows a boolean mask selects."""
    expert_of_row = torch.repeat_interleave(torch.arange(len(gate)), expert_counts)
    out = torch.zeros_like(expert_in)
    for e in range(len(gate)):
        rows = expert_in[expert_of_row == e]
        out[expert_of_row == e] = F.linear(
            F.silu(F.linear(rows, gate[e])) * F.linear(rows, up[e]), down[e]
        )
    return out


def experts_forward_and_grads(fn, expert_in, counts, offsets, gate, up, down):
    out = fn(expert_in, counts, offsets, gate, up, down)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.dtype)
    leaves = [expert_in, *gate, *up, *down]
    return out.detach(), torch.autograd.grad(out, leaves, grad_out, allow_unused=True)


@pytest.mark.parametrize("dtype,atol,grad_atol", DTYPES)
@pytest.mark.parametrize("backend", ["grouped", "torch"])
def test_moe_experts_match_mask_loop(backend, dtype, atol, grad_atol):
    inputs = make_experts([5, 0, 9, 2], 32, 48, dtype)

    def ours(expert_in, counts, offsets, gate, up, down):
        return moe_experts(expert_in, counts, offsets, gate, up, down, backend=backend)

    def oracle(expert_in, counts, offsets, gate, up, down):
        return swiglu_mask_loop(expert_in, counts, gate, up, down)

    got, got_grads = experts_forward_and_grads(ours, *inputs)
    want, want_grads = experts_forward_and_grads(oracle, *inputs)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, atol=atol, rtol=atol)
    for i, (a, b) in enumerate(zip(got_grads, want_grads, strict=True)):
        assert a is not None, f"gradient {i} is missing"  # every expert takes part
        b = torch.zeros_like(a) if b is None else b
        assert_close(a, b, atol=grad_atol, rtol=grad_atol, what=f"gradient {i}")


def test_moe_experts_grouped_under_compile_split_in_eager(monkeypatch):
    """Auto on CPU: the split loop eagerly; one graph (grouped) under torch.compile."""
    inputs = make_experts([3, 4, 0, 5], 32, 16, torch.float32)
    calls = []
    module = importlib.import_module("minimind_fast.ops.moe_experts")  # not the function
    monkeypatch.setattr(
        module,
        "moe_experts_reference",
        lambda *args: calls.append(1) or moe_experts_reference(*args),
    )
    eager = moe_experts(*inputs)
    assert calls == [1]
    compiled = torch.compile(moe_experts, fullgraph=True, backend="aot_eager")(*inputs)
    assert calls == [1]
    torch.testing.assert_close(compiled, eager)


def test_moe_experts_autocast_computes_in_bf16():
    inputs = make_experts([3, 4, 5], 32, 16, torch.float32)
    for backend in ("grouped", "torch"):
        with torch.autocast("cpu", dtype=torch.bfloat16), use_backend(backend, op="moe_experts"):
            out = moe_experts(*inputs)
        assert out.dtype == torch.bfloat16, backend
        torch.testing.assert_close(
            out.float(), swiglu_mask_loop(inputs[0], inputs[1], *inputs[3:]), atol=3e-2, rtol=3e-2
        )


def test_moe_experts_rejects_mismatched_weights():
    expert_in, counts, offsets, gate, up, down = make_experts([2, 2], 32, 16, torch.float32)
    with pytest.raises(ValueError, match="1, 2 and 2 gate/up/down weights for 2 experts"):
        moe_experts(expert_in, counts, offsets, gate[:1], up, down)
    with pytest.raises(ValueError, match="must be \\(I, H\\) and \\(H, I\\) for H = 32"):
        moe_experts(expert_in, counts, offsets, gate, up, up)


# ------------------------------------------------------------------------------- permutations


def test_gather_pairs_and_permute_rows_gradients():
    k, rows = 2, torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    sorted_pairs = torch.tensor([3, 0, 8, 5, 1, 9, 2, 4, 7, 6])
    pair_positions = torch.argsort(sorted_pairs)
    out = gather_pairs(rows, sorted_pairs, pair_positions, k)
    assert torch.equal(out, rows[sorted_pairs // k])
    assert torch.autograd.gradcheck(
        lambda r: gather_pairs(r, sorted_pairs, pair_positions, k), (rows,)
    )
    pairs = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    assert torch.equal(permute_rows(pairs, pair_positions, sorted_pairs), pairs[pair_positions])
    assert torch.autograd.gradcheck(
        lambda p: permute_rows(p, pair_positions, sorted_pairs), (pairs,)
    )
