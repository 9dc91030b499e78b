"""minimind_fast::moe_route (C++/CUDA) vs the pure-PyTorch reference (ops/moe_reference.py).

Indices, counts and the permutation must be identical; weights, scores and means within 1e-6;
gradients against the reference's autograd, gradcheck in fp64, opcheck, torch.compile, the
input checks, and the fallback when the extension is missing.
"""

import importlib
import importlib.machinery
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from minimind_fast.ops import use_backend
from minimind_fast.ops.moe_reference import moe_route_backward_reference, moe_route_reference
from minimind_fast.ops.moe_route import MoERouting, moe_route

# the module: the package attribute of the same name is the function
moe_route_module = importlib.import_module("minimind_fast.ops.moe_route")

OP = torch.ops.minimind_fast.moe_route.default
BACKWARD_OP = torch.ops.minimind_fast.moe_route_backward.default
needs_extension = pytest.mark.skipif(
    not moe_route_module.EXTENSION_LOADED,
    reason="the C++ op's checks and kernels need the extension",
)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
FLOAT_OUTPUTS = ("topk_weight", "scores", "prob_mean", "seq_prob_mean")


def make_logits(T, E, pattern, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(T * 1000 + E)
    x = torch.randn(T, E, generator=g) * 2
    if pattern == "ties":
        x = torch.randint(0, 3, (T, E), generator=g).float()
    elif pattern == "all_equal":
        x = torch.full((T, E), 0.25)
    elif pattern == "one_hot":
        x = torch.zeros(T, E)
        x[torch.arange(T), torch.randint(0, E, (T,), generator=g)] = 8.0
    elif pattern == "neg_inf":
        mask = torch.rand(T, E, generator=g) < 0.4
        # keep one finite logit per row
        mask[torch.arange(T), torch.randint(0, E, (T,), generator=g)] = False
        x = x.masked_fill(mask, float("-inf"))
    elif pattern == "signed_zero":
        x = torch.where(torch.rand(T, E, generator=g) < 0.5, torch.tensor(-0.0), torch.tensor(0.0))
    return x.to(dtype).to(device)


def assert_routing_equal(got: MoERouting, want: tuple, tol=1e-6):
    for name, a, b in zip(MoERouting._fields, got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, (
            f"{name}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
        )
        if name in FLOAT_OUTPUTS:
            try:
                torch.testing.assert_close(a.cpu(), b.cpu(), rtol=0, atol=tol, equal_nan=True)
            except AssertionError as error:
                raise AssertionError(f"{name}: {error}") from None
        else:
            assert torch.equal(a.cpu(), b.cpu()), f"{name} differs"


CASES = [  # T, E, k, seq_len, scoring, norm
    (1, 4, 2, 0, "softmax", True),
    (37, 4, 1, 0, "softmax", True),
    (64, 4, 2, 16, "softmax", True),
    (123, 8, 2, 41, "sigmoid", True),
    (300, 5, 5, 3, "softmax", False),
    (515, 64, 8, 5, "softmax", True),
    # E * k > 32 with k <= 4: the (key, id) chains of the CPU kernel
    (200, 33, 1, 40, "softmax", True),
    (96, 48, 2, 0, "sigmoid", False),
    (75, 16, 3, 25, "softmax", True),
    (64, 12, 6, 0, "softmax", True),  # sorting networks with a padded last group of 8
    (100, 16, 8, 20, "sigmoid", True),
    (260, 40, 20, 1, "sigmoid", False),
    (129, 256, 3, 129, "softmax", True),
]
PATTERNS = ["random", "ties", "all_equal", "one_hot", "neg_inf", "signed_zero"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-E{}-k{}-L{}-{}-{}".format(*c))
def test_forward_matches_reference(case, pattern, device):
    T, E, k, seq_len, scoring, norm = case
    x = make_logits(T, E, pattern, device=device)
    assert_routing_equal(
        moe_route(x, k, norm, scoring, seq_len), moe_route_reference(x, k, norm, scoring, seq_len)
    )


def minimind3_weights(x, k, norm, scoring):
    """MiniMind-3's / Qwen3-MoE's rule, written out: the selected scores, divided by
    (their sum + 1e-20) whenever norm_topk_prob is set, top-1 included."""
    logits = x.double() if x.dtype == torch.float64 else x.float()
    scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    idx = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k]
    weight = scores.gather(1, idx)
    return weight / (weight.sum(-1, keepdim=True) + 1e-20) if norm else weight


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["ext", "torch"])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_weights_renormalised_whenever_norm_topk_prob(k, norm, scoring, backend, device):
    x = make_logits(77, 6, "random", device=device)
    x[:5] = torch.arange(6.0, device=device) - 48.0  # sigmoid scores near 1e-19: w / (w + eps)
    got = moe_route(x, k, norm, scoring, 11, backend=backend).topk_weight
    torch.testing.assert_close(got, minimind3_weights(x, k, norm, scoring), rtol=1e-6, atol=1e-7)
    if norm and k == 1 and scoring == "softmax":  # a score >= 1/E absorbs the 1e-20: exactly 1
        assert bool((got == 1.0).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_forward_low_and_double_precision_inputs(dtype, device):
    x = make_logits(333, 16, "random", dtype=dtype, device=device)
    got = moe_route(x, 4, True, "softmax", 111)
    assert got.topk_weight.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_routing_equal(got, moe_route_reference(x, 4, True, "softmax", 111))


@pytest.mark.parametrize("device", DEVICES)
def test_large_T_and_sequences_spanning_chunks(device):
    x = make_logits(70_000, 8, "random", device=device)
    for seq_len in (0, 700, 7, 35_000):
        want = moe_route_reference(x, 2, True, "softmax", seq_len)
        assert_routing_equal(moe_route(x, 2, True, "softmax", seq_len), want)


def test_nan_rows_follow_torch_sort():
    x = make_logits(20, 6, "random")
    x[3, 2] = float("nan")
    x[7] = float("nan")
    got, want = moe_route(x, 3, True), moe_route_reference(x, 3, True)
    assert_routing_equal(got, want)
    assert got.topk_idx[7].tolist() == [0, 1, 2] and got.topk_idx[3, 0] == 2


def test_permutation_invariants():
    x = make_logits(1000, 6, "ties")
    r = moe_route(x, 3, True, "softmax", 100)
    pairs = r.sorted_pairs
    assert torch.equal(torch.sort(pairs).values, torch.arange(3000))
    assert torch.equal(r.pair_positions[pairs], torch.arange(3000))
    experts = r.topk_idx.reshape(-1)[pairs]
    assert bool((experts[1:] >= experts[:-1]).all())
    for e in range(6):  # stable: ascending pair ids inside each expert's run
        run = pairs[r.expert_offsets[e] : r.expert_offsets[e + 1]]
        assert bool((run[1:] > run[:-1]).all())
        assert bool((experts[r.expert_offsets[e] : r.expert_offsets[e + 1]] == e).all())
    assert torch.equal(r.expert_counts, r.seq_expert_counts.sum(0))
    assert int(r.expert_counts.sum()) == 3000 and int(r.expert_offsets[-1]) == 3000
    torch.testing.assert_close(r.prob_mean, r.seq_prob_mean.mean(0), rtol=0, atol=1e-6)


def _all_outputs_loss(r, weights):
    return sum((getattr(r, name) * w).sum() for name, w in zip(FLOAT_OUTPUTS, weights, strict=True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "scoring,norm,k",
    [
        ("softmax", True, 2),
        ("softmax", False, 2),
        ("sigmoid", True, 3),
        ("sigmoid", False, 1),
        ("softmax", True, 1),
    ],
)
def test_backward_matches_reference_autograd(scoring, norm, k, device):
    x = make_logits(96, 6, "random", device=device).requires_grad_()
    g = torch.Generator().manual_seed(1)
    shapes = [(96, k), (96, 6), (6,), (4, 6)]
    weights = [torch.randn(s, generator=g).to(device) for s in shapes]
    (grad,) = torch.autograd.grad(_all_outputs_loss(moe_route(x, k, norm, scoring, 24), weights), x)
    reference = MoERouting(*moe_route_reference(x, k, norm, scoring, 24))
    (want,) = torch.autograd.grad(_all_outputs_loss(reference, weights), x)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6)
    # the written-out backward of the reference (the fallback kernel) agrees too
    r = moe_route(x.detach(), k, norm, scoring, 24)
    explicit = moe_route_backward_reference(
        *weights, r.scores, r.topk_idx, norm, scoring, 24, x.dtype
    )
    torch.testing.assert_close(explicit, want, rtol=1e-5, atol=1e-6)


def test_backward_accepts_expanded_and_missing_gradients():
    x = make_logits(50, 4, "random").requires_grad_()
    r = moe_route(x, 2, True, "softmax", 10)
    r.topk_weight.sum().backward()  # stride-0 gradient for topk_weight, None for the others
    want = torch.autograd.grad(moe_route_reference(x, 2, True, "softmax", 10)[0].sum(), x)[0]
    torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-6)
    x.grad = None
    moe_route(x, 2, True, "softmax", 10).seq_prob_mean.sum().backward()
    want = torch.autograd.grad(moe_route_reference(x, 2, True, "softmax", 10)[4].sum(), x)[0]
    torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "scoring,norm,k",
    [
        ("softmax", True, 2),
        ("softmax", False, 3),
        ("sigmoid", True, 2),
        ("sigmoid", False, 1),
        ("softmax", True, 1),
        ("sigmoid", True, 1),
    ],
)
def test_gradcheck_fp64(scoring, norm, k):
    x = make_logits(8, 5, "random", dtype=torch.float64).requires_grad_()

    def fn(logits):
        r = moe_route(logits, k, norm, scoring, 4)
        return r.topk_weight, r.scores, r.prob_mean, r.seq_prob_mean

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "args",
    [
        (make_logits(40, 4, "random"), 2, True, "softmax", 10),
        (make_logits(33, 7, "ties", dtype=torch.bfloat16), 3, False, "sigmoid", 0),
        (make_logits(6, 5, "random", dtype=torch.float64), 1, True, "softmax", 2),
    ],
    ids=["fp32", "bf16", "fp64"],
)
def test_opcheck(args):
    x, *rest = args
    torch.library.opcheck(OP, (x.requires_grad_(x.dtype != torch.bfloat16), *rest))
    r = OP(x.detach(), *rest)
    real = r[0].dtype
    grads = (
        torch.randn(r[0].shape, dtype=real),
        torch.randn(r[2].shape, dtype=real),
        None,
        torch.randn(r[4].shape, dtype=real),
    )
    torch.library.opcheck(BACKWARD_OP, (*grads, r[2], r[1], rest[1], rest[2], rest[3], x.dtype))


def test_compile_fullgraph_matches_eager():
    x = make_logits(64, 4, "random").requires_grad_()

    def loss(logits):
        r = moe_route(logits, 2, True, "softmax", 16)
        loss = r.topk_weight.square().sum() + (r.seq_expert_counts * r.seq_prob_mean).sum()
        return loss, r.sorted_pairs

    eager_loss, eager_pairs = loss(x)
    (eager_grad,) = torch.autograd.grad(eager_loss, x)
    compiled_loss, compiled_pairs = torch.compile(loss, fullgraph=True, backend="aot_eager")(x)
    (compiled_grad,) = torch.autograd.grad(compiled_loss, x)
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(compiled_grad, eager_grad)
    assert torch.equal(compiled_pairs, eager_pairs)


def test_torch_backend_runs_the_reference():
    x = make_logits(30, 4, "random").requires_grad_()
    with use_backend("torch"):
        r = moe_route(x, 2, True)
    # plain autograd, not the op's node
    assert type(r.topk_weight.grad_fn).__name__ == "DivBackward0"
    assert_routing_equal(moe_route(x, 2, True, backend="ext"), tuple(r))
    with pytest.raises(ValueError, match="moe_route backend='cuda' is not a backend; use one of"):
        moe_route(x, 2, True, backend="cuda")
    with use_backend("torch", op="moe_route"):
        assert type(moe_route(x, 2, True).topk_weight.grad_fn).__name__ == "DivBackward0"


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: moe_route(torch.randn(8), 1), "must be \\(tokens, experts\\)"),
        (
            lambda: moe_route(torch.ones(8, 4, dtype=torch.int32), 1),
            "dtype torch.int32 is not supported",
        ),
        (lambda: moe_route(torch.randn(8, 4), 5), "top_k=5 must be in \\[1, 4\\]"),
        (lambda: moe_route(torch.randn(8, 0), 1), "needs at least one token and one expert"),
        (lambda: moe_route(torch.randn(8, 4), 1, scoring="relu"), "scoring='relu'"),
        (lambda: moe_route(torch.randn(8, 4), 1, seq_len=3), "seq_len=3 must divide the 8 tokens"),
        (lambda: moe_route(torch.randn(8, 4), 1, seq_len=-1), "seq_len=-1 must be >= 0 \\("),
    ],
)
def test_wrapper_rejects_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@needs_extension
@pytest.mark.parametrize(
    "args,message",
    [
        ((torch.randn(8), 1, True), "must be 2-D"),
        (
            (torch.ones(8, 4, dtype=torch.int64), 1, True),
            "must be float32, float64, bfloat16 or float16",
        ),
        ((torch.randn(8, 4), 5, True), "top_k=5 must be in \\[1, 4\\]"),
        ((torch.randn(8, 0), 1, True), "0 expert columns"),
        ((torch.randn(4, 8).t(), 1, True), "must be contiguous"),
        ((torch.randn(8, 4), 1, True, "relu"), "scoring must be 'softmax' or 'sigmoid'"),
        ((torch.randn(8, 4), 1, True, "softmax", 3), "does not divide"),
        ((torch.randn(8, 4), 1, True, "softmax", -1), "seq_len=-1 must be >= 0"),
    ],
)
def test_op_rejects_bad_input(args, message):
    with pytest.raises(RuntimeError, match=message):
        OP(*args)


@needs_extension
def test_op_rejects_pair_index_overflow():
    huge = torch.empty(1 << 29, 8, device="meta")  # the C++ check runs before any allocation
    with pytest.raises(RuntimeError, match="exceeds 2\\^31 - 1"):
        OP.redispatch(torch._C.DispatchKeySet("CPU"), huge, 8, True)


@needs_extension
@pytest.mark.parametrize("E", [4, 64])  # the per-block and the per-token backward paths
@pytest.mark.parametrize("bad_id", [-1, 99, 1 << 32])
def test_backward_op_rejects_expert_ids_out_of_range(E, bad_id):
    r = moe_route(make_logits(40, E, "random"), 2, True, "softmax", 0)
    topk_idx = r.topk_idx.clone()
    topk_idx[17, 1] = bad_id
    with pytest.raises(RuntimeError, match=f"topk_idx holds an expert id outside \\[0, {E}\\)"):
        BACKWARD_OP(
            torch.ones(40, 2),
            None,
            None,
            None,
            r.scores,
            topk_idx,
            True,
            "softmax",
            0,
            torch.float32,
        )
    # without grad_topk_weight the ids are not read
    assert BACKWARD_OP(
        None, torch.ones(40, E), None, None, r.scores, topk_idx, True, "softmax", 0, torch.float32
    ).shape == (40, E)


@pytest.mark.skipif(
    os.environ.get(moe_route_module.REQUIRE_EXT_ENV) == "0",
    reason=f"{moe_route_module.REQUIRE_EXT_ENV}=0 allows the pure-PyTorch fallback",
)
def test_extension_is_built():
    assert moe_route_module.EXTENSION_LOADED, (
        "minimind_fast._C did not load: moe_route runs its slow fallback. Rebuild with "
        "`pip install --no-build-isolation -e .`, or set MINIMIND_FAST_REQUIRE_EXT=0 to allow it"
    )


_BLOCK_EXTENSION = textwrap.dedent("""
    import importlib, sys, warnings
    sys.modules["minimind_fast._C"] = None  # makes `from .. import _C` raise ImportError
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = importlib.import_module("minimind_fast.ops.moe_route")
        import minimind_fast.moe  # a second import must not warn again
    import torch
    from minimind_fast.config import MiniMindConfig
    from minimind_fast.ops.moe_reference import moe_route_reference
    assert m.FALLBACK_KEYS == ["CompositeImplicitAutograd"], m.FALLBACK_KEYS
    x = torch.randn(40, 4, requires_grad=True)
    r = m.moe_route(x, 2, True, "softmax", 10)
    ref = moe_route_reference(x, 2, True, "softmax", 10)
    assert all(torch.equal(a, b) if not a.is_floating_point() else torch.allclose(a, b, atol=1e-6)
               for a, b in zip(r, ref))
    # differentiable through the reference's own autograd: no custom backward node
    assert type(r.topk_weight.grad_fn).__name__ == "DivBackward0", type(r.topk_weight.grad_fn)
    loss = (r.topk_weight.square().sum() + r.seq_prob_mean.sum()) * 3
    (grad,) = torch.autograd.grad(loss, x)
    ref_loss = (ref[0].square().sum() + ref[4].sum()) * 3
    (want,) = torch.autograd.grad(ref_loss, x)
    torch.testing.assert_close(grad, want)
    compiled = torch.compile(lambda t: m.moe_route(t, 2, True, "softmax", 10).topk_weight.sum(),
                             fullgraph=True, backend="aot_eager")
    (compiled_grad,) = torch.autograd.grad(compiled(x), x)
    eager = m.moe_route(x, 2, True, "softmax", 10).topk_weight.sum()
    torch.testing.assert_close(compiled_grad, torch.autograd.grad(eager, x)[0])
    config = MiniMindConfig(vocab_size=97, hidden_size=64, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, use_moe=True)
    layer = minimind_fast.moe.MoEFeedForward(config).train()
    y, aux = layer(torch.randn(2, 8, 64))
    (y.square().mean() + aux).backward()
    assert layer.gate.weight.grad is not None and bool(layer.gate.weight.grad.abs().sum() > 0)
    print(len([w for w in caught if "moe_route falls back" in str(w.message)]), m.EXTENSION_LOADED)
""")


def _run_without_extension(require: str):
    env = dict(os.environ, **{moe_route_module.REQUIRE_EXT_ENV: require})
    return subprocess.run(
        [sys.executable, "-c", _BLOCK_EXTENSION],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )


def test_fallback_warns_once_matches_reference_and_is_differentiable():
    result = _run_without_extension("0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["1", "False"]


def test_require_ext_turns_fallback_into_error():
    result = _run_without_extension("1")
    assert result.returncode != 0
    message = "MINIMIND_FAST_REQUIRE_EXT=1 but the extension minimind_fast._C is unusable"
    assert message in result.stderr


def test_import_problem_says_whether_the_extension_was_built(tmp_path):
    error = ImportError("cannot import name '_C' (most likely due to a circular import)")
    assert moe_route_module._import_problem(error, tmp_path) == (
        f"it is not built: {tmp_path} holds no _C extension file"
    )
    (tmp_path / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(b"")
    assert moe_route_module._import_problem(ImportError("undefined symbol: foo"), tmp_path) == (
        "it failed to import: undefined symbol: foo"
    )


# MINIMIND_FAST_CPU_ISA caps; above the CPU's best it runs its best
CPU_ISAS = ["avx512", "avx2", "baseline"]
CPU_DTYPES = pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)


# Every top-k path of the CPU forward: compile-time (E, k) blocks, the bubble (branch-free, and
# with skips for k in 9..16), (key, id) chains, sorting networks (a padded group, two groups, 8),
# the per-token partial sort; E below, at and above the block width.
ISA_CASES = [
    (4, 1),
    (4, 2),
    (8, 1),
    (8, 2),
    (10, 3),
    (12, 6),
    (12, 10),
    (16, 4),
    (16, 8),
    (64, 1),
    (64, 8),
    (40, 20),
]


@needs_extension
@CPU_DTYPES
@pytest.mark.parametrize("E,k", ISA_CASES, ids=[f"E{e}k{k}" for e, k in ISA_CASES])
def test_cpu_instruction_sets_agree(E, k, dtype, monkeypatch):
    """AVX-512 and AVX2 (8 token lanes) and the SSE2/NEON baseline (4 lanes) each match the
    reference, for both scorings and tied logits, with a partial last block (203 = 25 * 8 + 3)."""
    for scoring, pattern in (("softmax", "random"), ("sigmoid", "ties"), ("softmax", "neg_inf")):
        x = make_logits(203, E, pattern, dtype=dtype)
        want = moe_route_reference(x, k, True, scoring, 29)
        for isa in CPU_ISAS:
            monkeypatch.setenv("MINIMIND_FAST_CPU_ISA", isa)
            got = moe_route(x, k, True, scoring, 29)
            try:
                assert_routing_equal(got, want)
            except AssertionError as error:
                raise AssertionError(f"{isa} {scoring} {pattern}: {error}") from None


@needs_extension
@CPU_DTYPES
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("E", [4, 8, 33, 64])  # compile-time blocks, run-time blocks, chains
def test_top1_renormalised_on_every_cpu_path(E, isa, dtype, monkeypatch):
    """Top-1 with norm_topk_prob (MiniMind-3's MoE): a softmax weight is exactly 1 and its
    gradient 0; a sigmoid weight is w / (w + 1e-20); on every instruction set."""
    monkeypatch.setenv("MINIMIND_FAST_CPU_ISA", isa)
    x = make_logits(203, E, "random", dtype=dtype)
    g = torch.Generator().manual_seed(E)
    grad_weight = torch.randn(203, 1, generator=g)
    for scoring in ("softmax", "sigmoid"):
        r = moe_route(x, 1, True, scoring, 29)
        want = minimind3_weights(x, 1, True, scoring)
        torch.testing.assert_close(r.topk_weight, want, rtol=1e-6, atol=1e-7)
        got = BACKWARD_OP(
            grad_weight, None, None, None, r.scores, r.topk_idx, True, scoring, 29, torch.float32
        )
        if scoring == "softmax":
            assert bool((r.topk_weight == 1.0).all())
            assert float(got.abs().max()) < 1e-6
        want = moe_route_backward_reference(
            grad_weight, None, None, None, r.scores, r.topk_idx, True, scoring, 29, torch.float32
        )
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_cpu_isa_cap_rejects_unknown_names(monkeypatch):
    monkeypatch.setenv("MINIMIND_FAST_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="MINIMIND_FAST_CPU_ISA=sse9 is not an instruction set"):
        moe_route(make_logits(8, 4, "random"), 2)


@needs_extension
@pytest.mark.parametrize("isa", CPU_ISAS)
@CPU_DTYPES
@pytest.mark.parametrize(
    "E,k",
    [
        (4, 1),
        (4, 2),
        (8, 1),
        (8, 2),
        (6, 3),
        (10, 3),
        (15, 12),
        (16, 4),
        (37, 5),
        (64, 8),
        (256, 3),
    ],
)
def test_backward_kernel_paths_match_reference(E, k, dtype, isa, monkeypatch):
    """Every CPU backward path (compile-time (E, k) blocks, run-time blocks, the per-token path
    for E >= 16 with and without a vector tail) against the written-out reference backward, for
    each scoring, normalisation and subset of incoming gradients, with a partial last block."""
    monkeypatch.setenv("MINIMIND_FAST_CPU_ISA", isa)
    T, seq_len = 203, 29
    x = make_logits(T, E, "random", dtype=dtype)
    g = torch.Generator().manual_seed(E * 100 + k)
    grads = [torch.randn(shape, generator=g) for shape in [(T, k), (T, E), (E,), (T // seq_len, E)]]
    subsets = [(0, 1, 2, 3), (0,), (1, 3), (2,)]
    for scoring in ("softmax", "sigmoid"):
        for norm in (True, False):
            r = moe_route(x, k, norm, scoring, seq_len)
            for subset in subsets:
                given = [grad if i in subset else None for i, grad in enumerate(grads)]
                got = BACKWARD_OP(*given, r.scores, r.topk_idx, norm, scoring, seq_len, dtype)
                want = moe_route_backward_reference(
                    *given, r.scores, r.topk_idx, norm, scoring, seq_len, dtype
                )
                tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else {}
                try:
                    torch.testing.assert_close(got, want, **tol)
                except AssertionError as error:
                    raise AssertionError(f"{scoring} norm={norm} {subset}: {error}") from None
