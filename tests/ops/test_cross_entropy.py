"""Cross-entropy op (minimind_fast::cross_entropy) and CrossEntropyLoss against the reference.

The Triton kernel is forced with backend="triton": on CPU it runs under TRITON_INTERPRET=1 (set by
tests/conftest.py) on small shapes; with a GPU the same tests run on CUDA, plus bigger shapes.

Tolerance table (gradients: atol is relative to the largest reference gradient entry):
  dtype     loss rtol   grad rtol   grad atol (x max|grad|)  why
  float32   1e-5        1e-5        1e-5                     fp32 maths both sides; sum order only
  bfloat16  1e-5        1.6e-2      1e-2                     loss in fp32 from the same inputs; grad
  float16   1e-5        2e-3        1e-3                     rounded twice (kernel, upstream scale)
Edge rows (masked -inf blocks, +inf, ignored non-finite rows) and float64 are checked against
F.cross_entropy and gradcheck below; tests/ops/test_property_cross_entropy.py fuzzes the rest.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import HAS_CUDA, assert_close

from minimind_fast import ops
from minimind_fast.losses import CrossEntropyLoss
from minimind_fast.ops import reference

DEVICE = "cuda" if HAS_CUDA else "cpu"
INF = float("inf")
# numpy (the Triton interpreter) warns about the inf - inf it is asked to compute
NON_FINITE = pytest.mark.filterwarnings("ignore::RuntimeWarning")
TOLERANCES = {  # dtype: (loss rtol, grad rtol, grad atol relative to max |grad|)
    torch.float32: (1e-5, 1e-5, 1e-5),
    torch.bfloat16: (1e-5, 1.6e-2, 1e-2),
    torch.float16: (1e-5, 2e-3, 1e-3),
}
DTYPES = list(TOLERANCES)


def assert_loss_close(actual, expected, dtype):
    rtol = TOLERANCES[dtype][0]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert_close(
        actual, expected, atol=rtol * max(expected.abs().max().item(), 1e-3), rtol=rtol, what="loss"
    )


def assert_grad_close(actual, expected, dtype):
    _, rtol, atol = TOLERANCES[dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    scale = max(expected.float().abs().max().item(), 1e-12)
    assert_close(actual, expected, atol=atol * scale, rtol=rtol, what="grad")


def make_case(rows, vocab, dtype, ignore="some", device=DEVICE, ignore_index=-100):
    logits = (torch.randn(rows, vocab, device=device) * 3).to(dtype)
    targets = torch.randint(0, vocab, (rows,), device=device)
    if ignore == "some":
        targets[::3] = ignore_index
    elif ignore == "all":
        targets[:] = ignore_index
    return logits, targets


def run_both(logits, targets, upstream=None, backend="triton", **kwargs):
    """(loss, grad) of ops.cross_entropy on `backend` and of the reference, same upstream grad."""
    results = []
    for fn in (
        lambda x: ops.cross_entropy(x, targets, backend=backend, **kwargs),
        lambda x: reference.cross_entropy(x, targets, **kwargs),
    ):
        x = logits.detach().clone().requires_grad_()
        loss = fn(x)
        loss.backward(torch.ones_like(loss) if upstream is None else upstream)
        results.append((loss.detach(), x.grad))
    return results


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [17, 6400])
@pytest.mark.parametrize("rows", [1, 3, 123])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference(rows, vocab, dtype, reduction):
    logits, targets = make_case(rows, vocab, dtype)
    upstream = (
        torch.rand(rows, device=DEVICE) + 0.5
        if reduction == "none"
        else torch.tensor(1.7, device=DEVICE)
    )
    (loss, grad), (ref_loss, ref_grad) = run_both(logits, targets, upstream, reduction=reduction)
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    assert_loss_close(loss, ref_loss, dtype)
    assert_grad_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("label_smoothing,z_loss_scale", [(0.1, 0.0), (0.0, 1e-3), (0.2, 1e-2)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_label_smoothing_and_z_loss(label_smoothing, z_loss_scale, reduction, dtype):
    logits, targets = make_case(37, 100, dtype)
    (loss, grad), (ref_loss, ref_grad) = run_both(
        logits,
        targets,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss_scale=z_loss_scale,
    )
    assert_loss_close(loss, ref_loss, dtype)
    assert_grad_close(grad, ref_grad, dtype)
    if reduction == "mean":  # the extra terms really change the result
        plain = ops.cross_entropy(logits, targets, backend="triton")
        assert not torch.allclose(loss, plain)


@pytest.mark.parametrize("vocab", [40000])
def test_long_rows_loop_over_vocab(vocab):
    """V above one register block: the kernel's looped online softmax (and smoothing, z-loss)."""
    logits, targets = make_case(3, vocab, torch.float32)
    (loss, grad), (ref_loss, ref_grad) = run_both(
        logits, targets, label_smoothing=0.1, z_loss_scale=1e-3
    )
    assert_loss_close(loss, ref_loss, torch.float32)
    assert_grad_close(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_v", [64, 256])
def test_kernel_looped_path_matches_single_block(block_v, dtype):
    from minimind_fast.kernels.cross_entropy import cross_entropy_forward

    logits, targets = make_case(5, 1000, dtype)
    args = (logits, targets, -100, 0.1, 1e-3, True)
    loss_single, grad_single = cross_entropy_forward(*args)
    loss_loop, grad_loop = cross_entropy_forward(*args, block_v=block_v)
    torch.testing.assert_close(loss_loop, loss_single, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_loop.float(), grad_single.float(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------- edge rows and float64
def torch_cross_entropy(logits, targets, **kwargs):
    """(loss, grad) of F.cross_entropy in fp32, reduction none, summed backward."""
    x = logits.detach().float().clone().requires_grad_()
    loss = F.cross_entropy(x, targets, reduction="none", **kwargs)
    loss.sum().backward()
    return loss.detach(), x.grad


def ours_cross_entropy(logits, targets, backend, **kwargs):
    x = logits.detach().clone().requires_grad_()
    loss = ops.cross_entropy(x, targets, reduction="none", backend=backend, **kwargs)
    loss.sum().backward()
    return loss.detach(), x.grad


@NON_FINITE
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_masked_leading_block_above_single_block_vocab(backend):
    """V above one register block with the first 8192 logits -inf (a constrained-decoding mask):
    the looped online softmax starts from a block whose max is -inf."""
    vocab = 40000
    logits, targets = make_case(2, vocab, torch.float32, ignore="none")
    logits[0, :8192] = -INF
    targets[0] = vocab - 1
    loss, grad = ours_cross_entropy(logits, targets, backend)
    expected_loss, expected_grad = torch_cross_entropy(logits, targets)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert_loss_close(loss, expected_loss, torch.float32)
    assert_grad_close(grad, expected_grad, torch.float32)


@NON_FINITE
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("masked", ["start", "middle", "end", "start+end"])
def test_kernel_looped_path_masked_blocks(masked, label_smoothing):
    """Whole -inf blocks of the looped kernel (block 64, V 1000) at the start, middle or end."""
    from minimind_fast.kernels.cross_entropy import cross_entropy_forward

    logits, targets = make_case(4, 1000, torch.float32, ignore="none")
    spans = {
        "start": [(0, 256)],
        "middle": [(320, 640)],
        "end": [(896, 1000)],
        "start+end": [(0, 128), (960, 1000)],
    }[masked]
    for lo, hi in spans:
        logits[:, lo:hi] = -INF
    targets[:] = torch.tensor([300, 700, 800, 310])
    loss, grad = cross_entropy_forward(
        logits, targets, -100, label_smoothing, 0.0, True, block_v=64
    )
    expected_loss, expected_grad = torch_cross_entropy(
        logits, targets, label_smoothing=label_smoothing
    )
    # smoothing spreads eps/V over -inf classes too: loss +inf there, as in F.cross_entropy
    assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5, what="loss")
    assert_close(grad, expected_grad, atol=1e-6, rtol=1e-5, what="grad")


@NON_FINITE
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("vocab", [50, 40000])
def test_ignored_rows_with_non_finite_logits_give_zero(backend, vocab):
    """An ignored row never poisons a batch: loss 0 and gradient 0 whatever its logits hold
    (F.cross_entropy gives a NaN gradient for an ignored all -inf row)."""
    logits, targets = make_case(5, vocab, torch.float32, ignore="none")
    logits[0] = -INF
    logits[1, 3] = INF
    logits[2, 7] = float("nan")
    targets[:3] = -100
    for reduction in ("mean", "sum", "none"):
        x = logits.clone().requires_grad_()
        loss = ops.cross_entropy(x, targets, reduction=reduction, backend=backend)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all(), reduction
        assert torch.all(x.grad[:3] == 0), reduction
    loss, grad = ours_cross_entropy(logits, targets, backend)
    expected_loss, expected_grad = torch_cross_entropy(logits[3:], targets[3:])
    assert torch.all(loss[:3] == 0)
    assert_loss_close(loss[3:], expected_loss, torch.float32)
    assert_grad_close(grad[3:], expected_grad, torch.float32)


@NON_FINITE
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("vocab", [50, 40000])
def test_non_finite_logits_follow_torch(backend, vocab):
    """Non-ignored rows, as F.cross_entropy: a +inf logit, a NaN logit or a row of only -inf
    gives NaN loss and gradient in that row alone; a -inf target logit gives loss +inf with a
    finite gradient (softmax minus one-hot)."""
    logits, targets = make_case(5, vocab, torch.float32, ignore="none")
    logits[0, 3] = INF
    logits[1, 9] = float("nan")
    logits[2] = -INF
    logits[3, targets[3]] = -INF
    loss, grad = ours_cross_entropy(logits, targets, backend)
    expected_loss, expected_grad = torch_cross_entropy(logits, targets)
    assert torch.isnan(loss[:3]).all() and torch.isnan(grad[:3]).all(dim=1).all()
    assert torch.isnan(expected_loss[:3]).all() and torch.isnan(expected_grad[:3]).all()
    assert loss[3] == INF and expected_loss[3] == INF
    assert_grad_close(grad[3:], expected_grad[3:], torch.float32)
    assert_loss_close(loss[4:], expected_loss[4:], torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float64_torch_backend_passes_gradcheck(reduction):
    logits = torch.randn(6, 11, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1, -100, 3, 10, 0, 5])

    def loss_fn(x):
        return ops.cross_entropy(
            x, targets, reduction=reduction, label_smoothing=0.1, z_loss_scale=1e-2, backend="torch"
        )

    assert loss_fn(logits).dtype == torch.float64
    assert torch.autograd.gradcheck(loss_fn, (logits,))


def test_float64_triton_is_refused():
    logits, targets = make_case(4, 10, torch.float32)
    with pytest.raises(
        ValueError,
        match="the Triton kernel takes float32/bfloat16/float16, but "
        "logits is torch.float64; use backend='torch'",
    ):
        ops.cross_entropy(logits.double(), targets, backend="triton")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_zero_classes_is_a_clear_error(backend):
    with pytest.raises(ValueError, match=r"logits \(4, 0\) have V=0 classes"):
        ops.cross_entropy(torch.randn(4, 0), torch.zeros(4, dtype=torch.long), backend=backend)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore", ["none", "some", "all"])
def test_ignore_index(ignore, reduction):
    logits, targets = make_case(11, 50, torch.float32, ignore=ignore)
    (loss, grad), (ref_loss, ref_grad) = run_both(
        logits, targets, reduction=reduction, label_smoothing=0.1
    )
    assert_loss_close(loss, ref_loss, torch.float32)
    assert_grad_close(grad, ref_grad, torch.float32)
    ignored = targets == -100
    assert torch.all(grad[ignored] == 0)
    if ignore == "all":  # documented: loss 0 and zero gradients, never NaN
        assert torch.all(loss == 0) and torch.all(grad == 0)
    else:
        assert torch.all(grad[~ignored].abs().sum(-1) > 0)


def test_custom_ignore_index():
    logits, targets = make_case(9, 20, torch.float32, ignore="some", ignore_index=3)
    (loss, grad), (ref_loss, ref_grad) = run_both(logits, targets, ignore_index=3)
    assert_loss_close(loss, ref_loss, torch.float32)
    assert_grad_close(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("layout", ["row_slice", "column_step", "transposed"])
def test_non_contiguous_inputs(layout):
    rows, vocab = 13, 40
    if layout == "row_slice":  # row stride > V, unit column stride: no copy
        logits = torch.randn(rows, vocab + 24, device=DEVICE)[:, :vocab]
    elif layout == "column_step":
        logits = torch.randn(rows, 2 * vocab, device=DEVICE)[:, ::2]
    else:
        logits = torch.randn(vocab, rows, device=DEVICE).t()
    targets = torch.randint(0, vocab, (2 * rows,), device=DEVICE)[::2]
    assert not logits.is_contiguous() and not targets.is_contiguous()
    (loss, grad), (ref_loss, ref_grad) = run_both(logits, targets)
    assert_loss_close(loss, ref_loss, torch.float32)
    assert_grad_close(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_expanded_upstream_gradients(dtype):
    """A .sum() backward hands reduction='none' a stride-0 gradient; so does an expanded scalar."""
    logits, targets = make_case(17, 30, dtype)
    x = logits.clone().requires_grad_()
    ops.cross_entropy(x, targets, reduction="none", backend="triton").sum().backward()
    ref_x = logits.clone().requires_grad_()
    reference.cross_entropy(ref_x, targets, reduction="none").sum().backward()
    assert_grad_close(x.grad, ref_x.grad, dtype)
    upstream = torch.tensor(2.5, device=DEVICE).expand(17)
    assert upstream.stride() == (0,)
    (_, grad), (_, ref_grad) = run_both(logits, targets, upstream, reduction="none")
    assert_grad_close(grad, ref_grad, dtype)


def test_batched_leading_dims():
    logits, targets = make_case(12, 25, torch.float32)
    loss = ops.cross_entropy(
        logits.view(3, 4, 25), targets.view(3, 4), reduction="none", backend="triton"
    )
    assert loss.shape == (3, 4)
    assert_loss_close(
        loss.view(-1), reference.cross_entropy(logits, targets, reduction="none"), torch.float32
    )


def test_retain_graph_backward_twice_is_stable():
    logits, targets = make_case(8, 30, torch.float32)
    x = logits.clone().requires_grad_()
    loss = ops.cross_entropy(x, targets, backend="triton")
    first = torch.autograd.grad(loss, x, retain_graph=True)[0]
    second = torch.autograd.grad(loss, x)[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_no_grad_forward_only():
    logits, targets = make_case(8, 30, torch.float32)
    with torch.no_grad():
        loss = ops.cross_entropy(logits.clone().requires_grad_(), targets, backend="triton")
    assert not loss.requires_grad
    assert_loss_close(loss, reference.cross_entropy(logits, targets), torch.float32)
    out, dlogits = torch.ops.minimind_fast.cross_entropy(
        logits, targets, -100, "mean", 0.0, 0.0, False
    )
    assert dlogits.numel() == 0
    assert_loss_close(out, reference.cross_entropy(logits, targets), torch.float32)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("bad_target", [30, -1, 10**6])
def test_out_of_range_target_raises(backend, bad_target, monkeypatch):
    monkeypatch.setenv("MINIMIND_FAST_DEBUG", "1")  # CUDA checks only in debug mode; CPU always
    logits, targets = make_case(6, 30, torch.float32, ignore="none")
    targets[4] = bad_target
    with pytest.raises(ValueError, match=f"target {bad_target} is outside"):
        ops.cross_entropy(logits, targets, backend=backend)


@pytest.mark.skipif(HAS_CUDA, reason="CPU behaviour: the check costs no host sync there")
def test_out_of_range_target_raises_on_cpu_without_debug(monkeypatch):
    monkeypatch.delenv("MINIMIND_FAST_DEBUG", raising=False)
    logits, targets = make_case(6, 30, torch.float32, ignore="none")
    targets[0] = 30
    with pytest.raises(ValueError, match="ignore_index=-100"):
        ops.cross_entropy(logits, targets, backend="triton")


def test_kernel_poisons_out_of_range_rows():
    """What CUDA does outside debug mode (no host sync): that row's loss and gradient are NaN."""
    from minimind_fast.kernels.cross_entropy import cross_entropy_forward

    logits, targets = make_case(5, 30, torch.float32, ignore="none")
    targets[2] = 31
    loss, grad = cross_entropy_forward(logits, targets, -100, 0.0, 0.0, True)
    assert torch.isnan(loss[2]) and torch.isnan(grad[2]).all()
    keep = torch.tensor([0, 1, 3, 4], device=DEVICE)
    assert torch.isfinite(loss[keep]).all() and torch.isfinite(grad[keep]).all()
    torch.testing.assert_close(
        loss[keep], reference.cross_entropy(logits[keep], targets[keep], reduction="none")
    )


def test_invalid_arguments():
    logits, targets = make_case(4, 10, torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        ops.cross_entropy(logits, targets, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        ops.cross_entropy(logits, targets, label_smoothing=1.5)
    with pytest.raises(ValueError, match="z_loss_scale"):
        ops.cross_entropy(logits, targets, z_loss_scale=-1.0)
    with pytest.raises(ValueError, match="targets of shape"):
        ops.cross_entropy(logits, targets[:3])
    with pytest.raises(ValueError, match="integer"):
        ops.cross_entropy(logits, targets.float())


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("compute_grad", [True, False])
def test_opcheck(reduction, compute_grad):
    logits, targets = make_case(7, 19, torch.float32)
    logits.requires_grad_(compute_grad)
    torch.library.opcheck(
        torch.ops.minimind_fast.cross_entropy.default,
        (logits, targets, -100, reduction, 0.1, 1e-3, compute_grad),
    )


@pytest.mark.parametrize("scale_shape", ["scalar", "rows", "expanded"])
def test_opcheck_backward(scale_shape):
    dlogits = torch.randn(7, 19, device=DEVICE)
    scale = {
        "scalar": torch.tensor(0.3, device=DEVICE),
        "rows": torch.randn(7, device=DEVICE),
        "expanded": torch.tensor(0.3, device=DEVICE).expand(7),
    }[scale_shape]
    torch.library.opcheck(torch.ops.minimind_fast.cross_entropy_backward.default, (dlogits, scale))
    out = torch.ops.minimind_fast.cross_entropy_backward(dlogits, scale)
    torch.testing.assert_close(out, dlogits * (scale if scale.dim() == 0 else scale[:, None]))


@pytest.mark.parametrize(
    "backend,compiler", [("triton", "aot_eager"), ("torch", "aot_eager"), ("triton", "inductor")]
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph(backend, compiler, reduction):
    logits, targets = make_case(9, 23, torch.float32)

    def step(x, t):
        return (
            ops.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1, backend=backend).sum()
            * 2.0
        )

    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    x = logits.clone().requires_grad_()
    loss = compiled(x, targets)
    loss.backward()
    ref_x = logits.clone().requires_grad_()
    ref_loss = step(ref_x, targets)
    ref_loss.backward()
    assert_loss_close(loss, ref_loss, torch.float32)
    assert_grad_close(x.grad, ref_x.grad, torch.float32)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("layout", ["2d", "3d", "unbatched"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_module_matches_torch_cross_entropy_loss(backend, layout, reduction):
    kwargs = dict(ignore_index=-100, reduction=reduction, label_smoothing=0.05)
    if layout == "2d":
        logits, targets = (
            torch.randn(10, 21, device=DEVICE),
            torch.randint(0, 21, (10,), device=DEVICE),
        )
        targets[1] = -100
    elif layout == "3d":  # torch layout (N, C, d)
        logits, targets = (
            torch.randn(2, 21, 5, device=DEVICE),
            torch.randint(0, 21, (2, 5), device=DEVICE),
        )
        targets[0, 1] = -100
    else:
        logits, targets = torch.randn(21, device=DEVICE), torch.tensor(4, device=DEVICE)
    ours_x, torch_x = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = CrossEntropyLoss(**kwargs, backend=backend)(ours_x, targets)
    expected = torch.nn.CrossEntropyLoss(**kwargs)(torch_x, targets)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    ours.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(ours_x.grad, torch_x.grad, rtol=1e-5, atol=1e-7)


def test_module_rejects_probability_targets():
    with pytest.raises(ValueError, match="class-probability"):
        CrossEntropyLoss()(torch.randn(3, 5), torch.softmax(torch.randn(3, 5), -1))


def test_module_z_loss_and_repr():
    logits, targets = make_case(6, 11, torch.float32)
    module = CrossEntropyLoss(z_loss_scale=1e-2, backend="triton")
    assert "z_loss_scale=0.01" in repr(module)
    assert_loss_close(
        module(logits, targets),
        reference.cross_entropy(logits, targets, z_loss_scale=1e-2),
        torch.float32,
    )
    assert_loss_close(
        CrossEntropyLoss()(logits, targets), F.cross_entropy(logits, targets), torch.float32
    )


# ------------------------------------------------------------------------- CUDA-only shapes
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [6400, 32000])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_large_shapes(vocab, dtype, reduction):
    logits, targets = make_case(4097, vocab, dtype, device="cuda")
    upstream = torch.rand(4097, device="cuda") if reduction == "none" else None
    (loss, grad), (ref_loss, ref_grad) = run_both(
        logits, targets, upstream, reduction=reduction, label_smoothing=0.1, z_loss_scale=1e-4
    )
    assert_loss_close(loss, ref_loss, dtype)
    assert_grad_close(grad, ref_grad, dtype)


@pytest.mark.cuda
def test_cuda_max_vocab_and_no_fp32_buffer():
    """V = 262144 (looped kernel); the stored gradient is in the logits' dtype, not fp32."""
    logits, targets = make_case(64, 262144, torch.bfloat16, device="cuda")
    (loss, grad), (ref_loss, ref_grad) = run_both(logits, targets)
    assert_loss_close(loss, ref_loss, torch.bfloat16)
    assert_grad_close(grad, ref_grad, torch.bfloat16)
    _, dlogits = torch.ops.minimind_fast.cross_entropy(
        logits, targets, -100, "mean", 0.0, 0.0, True
    )
    assert dlogits.dtype == torch.bfloat16


@pytest.mark.cuda
def test_cuda_out_of_range_is_nan_without_debug(monkeypatch):
    monkeypatch.delenv("MINIMIND_FAST_DEBUG", raising=False)
    logits, targets = make_case(6, 30, torch.float32, device="cuda", ignore="none")
    targets[0] = 30
    assert torch.isnan(ops.cross_entropy(logits, targets, backend="triton"))
