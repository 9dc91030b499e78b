"""Fused linear + cross-entropy (minimind_fast::fused_linear_cross_entropy) against the unfused
reference: loss, dhidden, dweight and dbias over chunk sizes, reductions and both per-chunk
backends ("triton": the Triton CE kernel, interpreted on CPU; "torch":
reference.cross_entropy_loss_and_grad), plus the memory claim: the chunked loss step's peak
allocation is at most 1/4 of the unfused one.

Tolerance table (gradients: atol is relative to the largest reference gradient entry):
  dtype     loss rtol   grad rtol   grad atol (x max|grad|)   why
  float32   1e-5        1e-5        1e-5                      fp32 GEMMs; chunked sum order only
  bfloat16  1e-2        2e-2        2e-2                      chunk GEMMs round logits/dW partials
  float16   2e-3        4e-3        4e-3                      differently from one big GEMM
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import HAS_CUDA, assert_close
from torch.profiler import ProfilerActivity, profile

from minimind_fast import ops
from minimind_fast.losses import FusedLinearCrossEntropyLoss
from minimind_fast.ops import reference
from minimind_fast.ops.fused_linear_cross_entropy import _accumulate, default_chunk_size

DEVICE = "cuda" if HAS_CUDA else "cpu"
TOLERANCES = {  # dtype: (loss rtol, grad rtol, grad atol relative to max |grad|)
    torch.float32: (1e-5, 1e-5, 1e-5),
    torch.bfloat16: (1e-2, 2e-2, 2e-2),
    torch.float16: (2e-3, 4e-3, 4e-3),
}
BACKENDS = ["triton", "torch"]


def check_close(actual, expected, dtype, kind):
    """Same dtype and shape, values within the tolerance table's row for `dtype`."""
    loss_rtol, grad_rtol, grad_atol = TOLERANCES[dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    scale = max(expected.float().abs().max().item(), 1e-12)
    if kind == "loss":
        rtol, atol = loss_rtol, loss_rtol * max(scale, 1e-3)
    else:
        rtol, atol = grad_rtol, grad_atol * scale
    assert_close(actual, expected, atol=atol, rtol=rtol, what=kind)


def make_case(rows, hidden_size, vocab, dtype=torch.float32, ignore="some", device=DEVICE):
    hidden = torch.randn(rows, hidden_size, device=device).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device=device) / hidden_size**0.5).to(dtype)
    targets = torch.randint(0, vocab, (rows,), device=device)
    if ignore == "some":
        targets[1::4] = -100
    elif ignore == "all":
        targets[:] = -100
    return hidden, weight, targets


def run_both(hidden, weight, targets, upstream=None, **kwargs):
    """[(loss, dhidden, dweight) of ops.fused_linear_cross_entropy, same of the reference]."""
    options = {k: kwargs.pop(k) for k in ("backend", "chunk_size") if k in kwargs}
    results = []
    for fn in (
        lambda h, w: ops.fused_linear_cross_entropy(h, w, targets, **kwargs, **options),
        lambda h, w: reference.fused_linear_cross_entropy(h, w, targets, **kwargs),
    ):
        h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        loss = fn(h, w)
        loss.backward(torch.ones_like(loss) if upstream is None else upstream)
        results.append((loss.detach(), h.grad, w.grad))
    return results


def check_against_reference(hidden, weight, targets, dtype=torch.float32, upstream=None, **kwargs):
    ours, expected = run_both(hidden, weight, targets, upstream, **kwargs)
    check_close(ours[0], expected[0], dtype, "loss")
    check_close(ours[1], expected[1], dtype, "grad")
    check_close(ours[2], expected[2], dtype, "grad")
    return ours


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 16, 64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference(backend, chunk_size, reduction):
    hidden, weight, targets = make_case(37, 24, 61)  # 37 rows: 7 and 16 do not divide it, 64 > N
    upstream = (
        torch.rand(37, device=DEVICE) + 0.5
        if reduction == "none"
        else torch.tensor(0.7, device=DEVICE)
    )
    check_against_reference(
        hidden,
        weight,
        targets,
        upstream=upstream,
        reduction=reduction,
        backend=backend,
        chunk_size=chunk_size,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision(backend, dtype):
    hidden, weight, targets = make_case(45, 32, 70, dtype)
    check_against_reference(hidden, weight, targets, dtype, backend=backend, chunk_size=16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label_smoothing,z_loss_scale", [(0.1, 0.0), (0.0, 1e-3), (0.2, 1e-2)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_label_smoothing_and_z_loss(backend, label_smoothing, z_loss_scale, reduction):
    hidden, weight, targets = make_case(21, 16, 33)
    check_against_reference(
        hidden,
        weight,
        targets,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss_scale=z_loss_scale,
        backend=backend,
        chunk_size=8,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore", ["none", "all"])
def test_ignore_index(backend, reduction, ignore):
    hidden, weight, targets = make_case(10, 8, 19, ignore=ignore)
    loss, dhidden, dweight = check_against_reference(
        hidden, weight, targets, reduction=reduction, backend=backend, chunk_size=4
    )
    if ignore == "all":  # documented: loss 0 and zero gradients, never NaN
        assert torch.all(loss == 0) and torch.all(dhidden == 0) and torch.all(dweight == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("needs", ["hidden", "weight", "neither"])
def test_partial_requires_grad(backend, needs):
    hidden, weight, targets = make_case(13, 8, 19)
    h = hidden.clone().requires_grad_(needs == "hidden")
    w = weight.clone().requires_grad_(needs == "weight")
    loss = ops.fused_linear_cross_entropy(h, w, targets, backend=backend, chunk_size=5)
    check_close(
        loss.detach(),
        reference.fused_linear_cross_entropy(hidden, weight, targets),
        torch.float32,
        "loss",
    )
    if needs == "neither":
        assert not loss.requires_grad
        return
    leaf = h if needs == "hidden" else w
    (grad,) = torch.autograd.grad(loss, leaf)
    ref_h = hidden.clone().requires_grad_(needs == "hidden")
    ref_w = weight.clone().requires_grad_(needs == "weight")
    (ref_grad,) = torch.autograd.grad(
        reference.fused_linear_cross_entropy(ref_h, ref_w, targets),
        ref_h if needs == "hidden" else ref_w,
    )
    check_close(grad, ref_grad, torch.float32, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_batched_inputs(backend):
    batch, seq, hidden_size, vocab = 2, 9, 16, 29
    hidden = torch.randn(hidden_size, seq, batch, device=DEVICE).permute(
        2, 1, 0
    )  # (B, T, H), not contiguous
    weight = (torch.randn(2 * vocab, hidden_size, device=DEVICE) / 4)[::2]  # row stride 2H
    targets = torch.randint(0, vocab, (batch, 2 * seq), device=DEVICE)[:, ::2]
    assert not (hidden.is_contiguous() or weight.is_contiguous() or targets.is_contiguous())
    ours = ops.fused_linear_cross_entropy(
        hidden, weight, targets, reduction="none", backend=backend, chunk_size=5
    )
    assert ours.shape == (batch, seq)
    (loss, dhidden, dweight), expected = run_both(
        hidden.reshape(-1, hidden_size), weight, targets.reshape(-1), backend=backend, chunk_size=5
    )
    for actual, ref, kind in zip((loss, dhidden, dweight), expected, ("loss", "grad", "grad")):
        check_close(actual, ref, torch.float32, kind)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_upstream_gradient(backend):
    hidden, weight, targets = make_case(11, 8, 17)
    upstream = torch.tensor(1.5, device=DEVICE).expand(11)
    assert upstream.stride() == (0,)
    check_against_reference(
        hidden, weight, targets, upstream=upstream, reduction="none", backend=backend, chunk_size=4
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_retain_graph_backward_twice_is_stable(backend):
    hidden, weight, targets = make_case(9, 8, 17)
    h = hidden.clone().requires_grad_()
    loss = ops.fused_linear_cross_entropy(h, weight, targets, backend=backend, chunk_size=4)
    first = torch.autograd.grad(loss, h, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(loss, h)[0], first, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_target_raises(backend, monkeypatch):
    monkeypatch.setenv("MINIMIND_FAST_DEBUG", "1")  # CUDA checks only in debug mode; CPU always
    hidden, weight, targets = make_case(6, 8, 17, ignore="none")
    targets[3] = 17
    with pytest.raises(ValueError, match="target 17 is outside"):
        ops.fused_linear_cross_entropy(hidden, weight, targets, backend=backend)


def test_invalid_arguments():
    hidden, weight, targets = make_case(6, 8, 17)
    with pytest.raises(ValueError, match="chunk_size"):
        ops.fused_linear_cross_entropy(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match=r"must be \(V, H\)"):
        ops.fused_linear_cross_entropy(hidden, weight.t(), targets)
    with pytest.raises(ValueError, match="autocast"):
        ops.fused_linear_cross_entropy(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="reduction"):
        ops.fused_linear_cross_entropy(hidden, weight, targets, reduction="avg")


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_matches_unfused_autocast(backend):
    hidden, weight, targets = make_case(20, 16, 33)
    device_type = torch.device(DEVICE).type
    with torch.autocast(device_type, dtype=torch.bfloat16):
        ours = run_both(hidden, weight, targets, backend=backend, chunk_size=8)
    for actual, ref, kind in zip(ours[0], ours[1], ("loss", "grad", "grad")):
        assert actual.dtype == ref.dtype  # fp32 grads for fp32 leaves, as with F.linear
        check_close(actual, ref, torch.bfloat16, kind)


def test_default_chunk_size():
    assert default_chunk_size(16384, 6400, 768) == 2048  # chunk logits ~ N * H elements
    assert default_chunk_size(37, 61, 24) == 16
    assert default_chunk_size(5, 10, 64) == 8  # V <= H: one chunk
    assert default_chunk_size(1, 262144, 512) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_accumulate_fp32_half_inputs(dtype):
    """dW partials: fp32 GEMM output on CUDA (tight), one rounding per chunk elsewhere."""
    a = torch.randn(64, 48, device=DEVICE).to(dtype)
    b = torch.randn(48, 40, device=DEVICE).to(dtype)
    acc = torch.zeros(64, 40, device=DEVICE)
    _accumulate(acc, a, b)
    _accumulate(acc, a, b)
    expected = 2 * (a.float() @ b.float())
    tol = 1e-5 if HAS_CUDA else TOLERANCES[dtype][1]
    assert_close(acc, expected, atol=tol * expected.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck(backend, reduction):
    hidden, weight, targets = make_case(9, 8, 17)
    hidden.requires_grad_()
    weight.requires_grad_()
    bias = torch.randn(17, device=DEVICE, requires_grad=True)
    for b in (None, bias):
        flags = (True, True, b is not None)
        torch.library.opcheck(
            torch.ops.minimind_fast.fused_linear_cross_entropy.default,
            (hidden, weight, b, targets, -100, reduction, 0.1, 1e-3, 4, backend, *flags),
        )
        torch.library.opcheck(
            torch.ops.minimind_fast.fused_linear_cross_entropy_backward.default,
            (
                hidden.detach(),
                weight.detach(),
                None if b is None else b.detach(),
                targets,
                torch.rand(9, device=DEVICE),
                -100,
                0.1,
                1e-3,
                4,
                backend,
                *flags,
            ),
        )


@pytest.mark.parametrize(
    "backend,compiler", [("triton", "aot_eager"), ("torch", "aot_eager"), ("torch", "inductor")]
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph(backend, compiler, reduction):
    hidden, weight, targets = make_case(12, 8, 19)

    def step(h, w, t):
        return ops.fused_linear_cross_entropy(
            h.tanh(), w, t, reduction=reduction, backend=backend, chunk_size=5
        ).sum()

    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = compiled(h, w, targets)
    loss.backward()
    ref_h, ref_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref_loss = step(ref_h, ref_w, targets)
    ref_loss.backward()
    check_close(loss.detach(), ref_loss.detach(), torch.float32, "loss")
    check_close(h.grad, ref_h.grad, torch.float32, "grad")
    check_close(w.grad, ref_w.grad, torch.float32, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_with_bias_matches_torch(backend):
    hidden, weight, targets = make_case(12, 16, 27)
    bias = torch.randn(27, device=DEVICE)
    module = FusedLinearCrossEntropyLoss(reduction="sum", chunk_size=5, backend=backend)
    got = with_torch_grads(
        lambda h, w, b: module(h.view(3, 4, 16), w, targets.view(3, 4), b), hidden, weight, bias
    )
    expected_fn = torch_linear_cross_entropy("sum")
    expected = with_torch_grads(lambda h, w, b: expected_fn(h, w, b, targets), hidden, weight, bias)
    for actual, ref, kind in zip(got, expected, ("loss", "grad", "grad", "grad")):
        check_close(actual, ref, torch.float32, kind)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_torch(backend):
    hidden, weight, targets = make_case(3 * 5, 16, 27)
    h, w = hidden.view(3, 5, 16).clone().requires_grad_(), weight.clone().requires_grad_()
    loss = FusedLinearCrossEntropyLoss(label_smoothing=0.1, chunk_size=4, backend=backend)(
        h, w, targets.view(3, 5)
    )
    loss.backward()
    ref_h, ref_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(F.linear(ref_h, ref_w), targets)
    expected.backward()
    check_close(loss.detach(), expected.detach(), torch.float32, "loss")
    check_close(h.grad.view(-1, 16), ref_h.grad, torch.float32, "grad")
    check_close(w.grad, ref_w.grad, torch.float32, "grad")


# -------------------------------------------------------------- bias, half precision, fp64
def with_torch_grads(fn, *tensors, upstream=None):
    """(fn(*leaves) detached, *leaf grads) for fresh leaves of `tensors` (None passes through)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(torch.ones_like(out) if upstream is None else upstream)
    return (out.detach(), *[None if leaf is None else leaf.grad for leaf in leaves])


def torch_linear_cross_entropy(reduction="mean", **kwargs):
    """Ground truth: F.linear, then F.cross_entropy on fp32 logits."""

    def fn(hidden, weight, bias, targets):
        logits = F.linear(hidden, weight, bias).float()
        return F.cross_entropy(logits, targets, reduction=reduction, **kwargs)

    return fn


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [None, 7])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bias_matches_torch(backend, chunk_size, reduction):
    hidden, weight, targets = make_case(23, 16, 37)
    bias = torch.randn(37, device=DEVICE)
    upstream = torch.rand(23, device=DEVICE) + 0.5 if reduction == "none" else None

    def ours(h, w, b):
        return ops.fused_linear_cross_entropy(
            h,
            w,
            targets,
            reduction=reduction,
            backend=backend,
            chunk_size=chunk_size,
            label_smoothing=0.1,
            bias=b,
        )

    expected_fn = torch_linear_cross_entropy(reduction, label_smoothing=0.1)
    got = with_torch_grads(ours, hidden, weight, bias, upstream=upstream)
    expected = with_torch_grads(
        lambda h, w, b: expected_fn(h, w, b, targets), hidden, weight, bias, upstream=upstream
    )
    for actual, ref, kind in zip(got, expected, ("loss", "grad", "grad", "grad")):
        check_close(actual, ref, torch.float32, kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_bias_half_precision(backend, dtype):
    hidden, weight, targets = make_case(30, 16, 41, dtype)
    bias = torch.randn(41, device=DEVICE).to(dtype)
    got = with_torch_grads(
        lambda h, w, b: ops.fused_linear_cross_entropy(
            h, w, targets, backend=backend, chunk_size=8, bias=b
        ),
        hidden,
        weight,
        bias,
    )
    expected = with_torch_grads(
        lambda h, w, b: reference.fused_linear_cross_entropy(h, w, targets, bias=b),
        hidden,
        weight,
        bias,
    )
    for actual, ref, kind in zip(got, expected, ("loss", "grad", "grad", "grad")):
        check_close(actual, ref, dtype, kind)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees -inf - -inf
@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_masks_a_leading_vocabulary_block(backend):
    """A bias of -inf over the first 8192 of 40000 classes (a vocabulary mask): V above one
    register block, so the kernel's looped softmax starts from an all -inf block."""
    vocab = 40000
    hidden, weight, targets = make_case(3, 8, vocab, ignore="none")
    bias = torch.zeros(vocab, device=DEVICE)
    bias[:8192] = -float("inf")
    targets[:] = torch.tensor([vocab - 1, 8192, 20000])
    got = with_torch_grads(
        lambda h, w, b: ops.fused_linear_cross_entropy(h, w, targets, backend=backend, bias=b),
        hidden,
        weight,
        bias,
    )
    expected_fn = torch_linear_cross_entropy()
    expected = with_torch_grads(lambda h, w, b: expected_fn(h, w, b, targets), hidden, weight, bias)
    for actual, ref, kind in zip(got, expected, ("loss", "grad", "grad", "grad")):
        assert torch.isfinite(actual).all(), kind
        check_close(actual, ref, torch.float32, kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("upstream", [1.0, 32.0])
def test_float16_mean_weight_gradient_does_not_overflow(backend, upstream):
    """fp16, mean over many rows of a large hidden value, V = 3: the weight gradient summed
    over the rows exceeds fp16's range before the mean divides it; the op must scale first, like
    stock fp16 PyTorch (upstream 32: a GradScaler-style loss scale, still finite there).
    torch: 4096 rows of 30 (mean dW about -18); the interpreted kernel: 256 rows of 1000."""
    rows, value = (4096, 30.0) if backend == "torch" else (256, 1000.0)
    vocab = 3
    assert rows * value * 2 / 3 > torch.finfo(torch.float16).max  # the unscaled sum overflows
    hidden = torch.full((rows, 30), value, device=DEVICE, dtype=torch.float16)
    weight = (0.01 * torch.randn(vocab, 30, device=DEVICE) * 30 / value).half()
    targets = torch.zeros(rows, dtype=torch.long, device=DEVICE)
    scale = torch.tensor(upstream, device=DEVICE)
    got = with_torch_grads(
        lambda h, w: ops.fused_linear_cross_entropy(
            h, w, targets, backend=backend, chunk_size=rows // 4
        ),
        hidden,
        weight,
        upstream=scale,
    )
    stock = with_torch_grads(
        lambda h, w: F.cross_entropy(F.linear(h, w), targets), hidden, weight, upstream=scale.half()
    )
    oracle = with_torch_grads(
        lambda h, w: F.cross_entropy(F.linear(h, w), targets),
        hidden.float(),
        weight.float(),
        upstream=scale,
    )
    assert torch.isfinite(stock[2]).all() and stock[2].float().min() < -0.5 * value * upstream
    subnormal = 2.0**-24  # dh is about 1e-5 / rows here: fp16 subnormals, absolute steps
    for name, actual, ref, expected in zip(("dh", "dW"), got[1:], stock[1:], oracle[1:]):
        assert actual.dtype == torch.float16 and torch.isfinite(actual).all(), name
        atol = max(2e-3 * expected.abs().max().item(), 2 * subnormal)
        assert_close(actual, expected, atol=atol, rtol=2e-3, what=f"{name} vs fp32")
        assert_close(actual, ref, atol=atol, rtol=2e-3, what=f"{name} vs stock fp16")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_float64_torch_backend_passes_gradcheck(reduction):
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(9, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1, -100, 3, 8, 0, 5, 2])

    def loss_fn(h, w, b):
        return ops.fused_linear_cross_entropy(
            h,
            w,
            targets,
            reduction=reduction,
            backend="torch",
            label_smoothing=0.1,
            z_loss_scale=1e-2,
            chunk_size=3,
            bias=b,
        )

    assert loss_fn(hidden, weight, bias).dtype == torch.float64
    assert torch.autograd.gradcheck(loss_fn, (hidden, weight, bias))


def test_float64_triton_is_refused():
    hidden, weight, targets = make_case(4, 8, 10, torch.float64)
    with pytest.raises(
        ValueError,
        match="the Triton kernel takes float32/bfloat16/float16, but "
        "hidden is torch.float64; use backend='torch'",
    ):
        ops.fused_linear_cross_entropy(hidden, weight, targets, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_errors_name_the_fused_op(backend):
    hidden, weight, targets = make_case(4, 8, 10, ignore="none")
    targets[2] = 10
    with pytest.raises(ValueError, match=r"^fused_linear_cross_entropy: target 10 is outside"):
        ops.fused_linear_cross_entropy(hidden, weight, targets, backend=backend)
    targets[2] = 0
    with pytest.raises(ValueError, match=r"bias \(9,\) must be \(V,\) = \(10,\)"):
        ops.fused_linear_cross_entropy(
            hidden, weight, targets, backend=backend, bias=torch.zeros(9, device=DEVICE)
        )
    with pytest.raises(ValueError, match="hidden is torch.float32 but bias is torch.float16"):
        ops.fused_linear_cross_entropy(
            hidden, weight, targets, backend=backend, bias=torch.zeros(10, device=DEVICE).half()
        )
    with pytest.raises(ValueError, match=r"weight \(0, 8\) has V=0 rows"):
        ops.fused_linear_cross_entropy(hidden, weight[:0], targets, backend=backend)


# ---------------------------------------------------------------------------------- memory
def peak_cpu_bytes(step) -> int:
    """Peak of live CPU allocator bytes while `step` runs (the profiler's allocation events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    current = peak = 0
    for event in events:
        if event.device_type() == torch.autograd.DeviceType.CPU:
            current += event.nbytes()
            peak = max(peak, current)
    return peak


def loss_step_peaks(rows, hidden_size, vocab, backend="torch", device="cpu"):
    """(unfused, fused) peak bytes of forward + backward of the loss, inputs excluded."""
    hidden, weight, targets = make_case(rows, hidden_size, vocab, device=device)
    hidden.requires_grad_()
    weight.requires_grad_()
    steps = [
        lambda: reference.fused_linear_cross_entropy(hidden, weight, targets).backward(),
        lambda: ops.fused_linear_cross_entropy(hidden, weight, targets, backend=backend).backward(),
    ]
    peaks = []
    for step in steps:
        hidden.grad = weight.grad = None
        if device == "cpu":
            peaks.append(peak_cpu_bytes(step))
        else:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - base)
    return peaks


def test_peak_memory_cpu_quarter_of_unfused():
    """N=16k, V=6400, H=768 scaled by 1/4 in N, V and H (same V/H, same chunking)."""
    unfused, fused = loss_step_peaks(4096, 192, 1600)
    assert unfused > 4096 * 1600 * 4 * 2  # it did hold the fp32 logits and their gradient
    assert fused * 4 <= unfused, (
        f"fused peak {fused / 2**20:.1f} MiB vs unfused {unfused / 2**20:.1f} MiB"
    )


@pytest.mark.parametrize("fraction", [8 / 4096, 0.25, 0.6, 1.0])
def test_peak_memory_cpu_skipped_rows_hold_no_more(fraction):
    """The forward (the chunk loop: logits, dh, dW) holds no more memory when ignored rows are
    skipped (gathered a chunk at a time) than when every row runs, however few are ignored, but
    for the O(N) index of the kept rows."""
    hidden, weight, targets = make_case(4096, 192, 1600, ignore="none")
    hidden.requires_grad_()
    weight.requires_grad_()
    ignored = targets.clone()
    ignored[torch.randperm(4096)[: round(fraction * 4096)]] = -100
    every_row, skipped = (
        peak_cpu_bytes(
            lambda t=t: ops.fused_linear_cross_entropy(hidden, weight, t, backend="torch")
        )
        for t in (targets, ignored)
    )
    # The kept rows' index and targets (int64, O(N)) are the only extra: never a (chunk, V) block.
    index_bytes = 2 * 8 * 4096
    assert skipped <= every_row + index_bytes, (
        f"{skipped / 2**20:.2f} MiB vs {every_row / 2**20:.2f} MiB"
    )


@pytest.mark.slow
def test_peak_memory_cpu_n16384():
    """The full shape, N=16384, V=6400, H=768 in fp32 on CPU."""
    unfused, fused = loss_step_peaks(16384, 768, 6400)
    assert fused * 4 <= unfused, (
        f"fused peak {fused / 2**20:.1f} MiB vs unfused {unfused / 2**20:.1f} MiB"
    )


# ------------------------------------------------------------------------- CUDA-only shapes
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_large_shapes(dtype):
    hidden, weight, targets = make_case(4097, 768, 32000, dtype, device="cuda")
    check_against_reference(hidden, weight, targets, dtype, backend="triton")


@pytest.mark.cuda
def test_cuda_peak_memory_quarter_of_unfused():
    unfused, fused = loss_step_peaks(16384, 768, 6400, backend="triton", device="cuda")
    assert fused * 4 <= unfused, (
        f"fused peak {fused / 2**20:.1f} MiB vs unfused {unfused / 2**20:.1f} MiB"
    )
