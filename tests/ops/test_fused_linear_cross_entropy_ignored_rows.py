"""Fused linear + cross-entropy when many targets are ignore_index (supervised fine-tuning scores
only the reply tokens): the op computes only the kept rows, and loss, dh, dW, db stay those of
F.linear + F.cross_entropy with 0%, 60% and 100% of the rows ignored, on both per-chunk backends
("triton": the Triton CE kernel, interpreted on CPU; "torch": the reference maths).

The truth runs F.linear in the inputs' dtype (the logits rounded there, as each chunk is) and
F.cross_entropy (plus z * logsumexp^2 for the z-loss) in float64; tolerances and the
magnitude-scaled atol of the GEMM sums are those of tests/ops/property_helpers.py.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from property_helpers import check_close
from torch.profiler import ProfilerActivity, profile

from minimind_fast import ops
from minimind_fast.constants import IGNORE_INDEX

flce_module = importlib.import_module("minimind_fast.ops.fused_linear_cross_entropy")

ROWS, HIDDEN, VOCAB = 40, 16, 37
FRACTIONS = (0.0, 0.6, 1.0)
BACKENDS = ("triton", "torch")
DTYPES = {
    "triton": (torch.float32, torch.bfloat16, torch.float16),
    "torch": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
}


def make_case(fraction, dtype=torch.float32, rows=ROWS, seed=0):
    """hidden (rows, H), weight (V, H), bias (V,), targets (rows,) with round(fraction * rows)
    ignored rows at random places."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, HIDDEN, generator=gen).to(dtype)
    weight = (torch.randn(VOCAB, HIDDEN, generator=gen) / HIDDEN**0.5).to(dtype)
    bias = torch.randn(VOCAB, generator=gen).to(dtype)
    targets = torch.randint(0, VOCAB, (rows,), generator=gen)
    targets[torch.randperm(rows, generator=gen)[: round(fraction * rows)]] = IGNORE_INDEX
    return hidden, weight, bias, targets


def upstream_for(reduction, rows=ROWS):
    return torch.rand(rows) + 0.5 if reduction == "none" else torch.tensor(0.7)


def ours(hidden, weight, bias, targets, upstream, **kwargs):
    """(loss, dh, dW, db) of ops.fused_linear_cross_entropy, backward with `upstream`."""
    h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    loss = ops.fused_linear_cross_entropy(h, w, targets, bias=b, **kwargs)
    loss.backward(upstream.to(loss.dtype))
    return loss.detach(), h.grad, w.grad, b.grad


def truth(
    hidden, weight, bias, targets, upstream, reduction="mean", label_smoothing=0.0, z_loss_scale=0.0
):
    """(loss, dh, dW, db) in float64 from logits rounded to the inputs' dtype, and the sizes of
    the terms dh, dW and db sum (|dlogits| @ |W|, |dlogits|.T @ |h|, sum |dlogits|)."""
    h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    valid = targets != IGNORE_INDEX
    logits = F.linear(h, w, b).double()
    logits.retain_grad()
    rows = F.cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing)
    rows = rows + z_loss_scale * torch.logsumexp(logits, -1).square() * valid
    loss = rows if reduction == "none" else rows.sum()
    if reduction == "mean":  # 0 for an all-ignored batch, where F's mean gives NaN
        loss = loss / valid.sum().clamp(min=1)
    loss.backward(upstream.double())
    terms = logits.grad.abs()
    magnitudes = (terms @ weight.double().abs(), terms.t() @ hidden.double().abs(), terms.sum(0))
    return (loss.detach(), h.grad, w.grad, b.grad), magnitudes


def check_against_truth(got, hidden, weight, bias, targets, upstream, dtype, **kwargs):
    expected, magnitudes = truth(hidden, weight, bias, targets, upstream, **kwargs)
    check_close(got[0], expected[0], dtype, "loss")
    for name, actual, ref, magnitude in zip(
        ("dh", "dW", "db"), got[1:], expected[1:], magnitudes, strict=True
    ):
        assert actual.dtype == dtype, name
        check_close(actual, ref, dtype, name, magnitude)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fraction", FRACTIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_matches_torch(backend, fraction, reduction, chunk_size):
    hidden, weight, bias, targets = make_case(fraction)
    upstream = upstream_for(reduction)
    options = dict(reduction=reduction, label_smoothing=0.1, z_loss_scale=1e-3)
    got = ours(
        hidden, weight, bias, targets, upstream, backend=backend, chunk_size=chunk_size, **options
    )
    check_against_truth(got, hidden, weight, bias, targets, upstream, torch.float32, **options)
    if fraction == 1.0:  # documented: loss 0 and zero gradients, never NaN
        assert all(torch.all(t == 0) for t in got)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype", sorted({d for ds in DTYPES.values() for d in ds}, key=str), ids=str
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_dtypes_with_60_percent_ignored(backend, dtype, reduction):
    if dtype not in DTYPES[backend]:
        pytest.skip(f"the {backend} backend takes no {dtype}")
    hidden, weight, bias, targets = make_case(0.6, dtype)
    upstream = upstream_for(reduction)
    got = ours(
        hidden,
        weight,
        bias,
        targets,
        upstream,
        backend=backend,
        chunk_size=8,
        reduction=reduction,
        label_smoothing=0.1,
    )
    check_against_truth(
        got,
        hidden,
        weight,
        bias,
        targets,
        upstream,
        dtype,
        reduction=reduction,
        label_smoothing=0.1,
    )


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_float64_gradcheck_with_60_percent_ignored(reduction):
    hidden, weight, bias, targets = make_case(0.6, torch.float64, rows=10)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]

    def loss_fn(h, w, b):
        return ops.fused_linear_cross_entropy(
            h,
            w,
            targets,
            reduction=reduction,
            label_smoothing=0.1,
            z_loss_scale=1e-2,
            backend="torch",
            chunk_size=3,
            bias=b,
        )

    assert torch.autograd.gradcheck(loss_fn, leaves)


def logits_gemm_rows(step) -> int:
    """Rows of logits the lm_head GEMMs (h @ W.T, H -> V) computed while `step` ran."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    rows = 0
    for event in prof.events():
        shapes = event.input_shapes  # mm: h, W.T; addmm: bias, h, W.T, beta, alpha
        if event.name in ("aten::mm", "aten::addmm") and [HIDDEN, VOCAB] in shapes:
            rows += shapes[shapes.index([HIDDEN, VOCAB]) - 1][0]
    return rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("fraction", FRACTIONS)
def test_ignored_rows_cost_no_lm_head_work(backend, reduction, fraction):
    """Only the kept rows reach the lm_head GEMM, in forward and (reduction none) backward."""
    hidden, weight, bias, targets = make_case(fraction)
    kept = int((targets != IGNORE_INDEX).sum())
    upstream = upstream_for(reduction)
    passes = 2 if reduction == "none" else 1  # none: the backward runs the chunk loop again
    rows = logits_gemm_rows(
        lambda: ours(
            hidden,
            weight,
            bias,
            targets,
            upstream,
            backend=backend,
            chunk_size=7,
            reduction=reduction,
        )
    )
    assert rows == passes * kept


def test_every_row_kept_copies_nothing():
    hidden, weight, bias, targets = make_case(0.0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ours(hidden, weight, bias, targets, upstream_for("mean"), backend="torch", chunk_size=7)
    names = {event.name for event in prof.events()}
    assert not names & {"aten::index_select", "aten::index_copy_", "aten::index"}, names


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_ignored_rows_hidden_is_never_read(backend, reduction):
    """NaN and inf in ignored rows of hidden reach no output: the same results, bit for bit, as
    with those rows zeroed (unfused, 0 * NaN would make dW NaN)."""
    hidden, weight, bias, targets = make_case(0.6)
    ignored = (targets == IGNORE_INDEX).nonzero().squeeze(1)
    poisoned, zeroed = hidden.clone(), hidden.clone()
    poisoned[ignored[0::2]] = float("nan")
    poisoned[ignored[1::2]] = float("inf")
    zeroed[ignored] = 0.0
    upstream = upstream_for(reduction)
    options = dict(backend=backend, chunk_size=7, reduction=reduction)
    got = ours(poisoned, weight, bias, targets, upstream, **options)
    expected = ours(zeroed, weight, bias, targets, upstream, **options)
    for name, actual, ref in zip(("loss", "dh", "dW", "db"), got, expected, strict=True):
        assert torch.isfinite(actual).all() and torch.equal(actual, ref), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_every_row_path_matches(backend, reduction, monkeypatch):
    """The path taken while a CUDA graph is captured (no compaction: ignored rows run and are
    masked) gives the same results."""
    monkeypatch.setattr(flce_module, "_kept_rows", lambda targets, ignore_index: None)
    hidden, weight, bias, targets = make_case(0.6)
    upstream = upstream_for(reduction)
    options = dict(reduction=reduction, label_smoothing=0.1, z_loss_scale=1e-3)
    rows = logits_gemm_rows(
        lambda: ours(
            hidden, weight, bias, targets, upstream, backend=backend, chunk_size=7, **options
        )
    )
    assert rows == ROWS * (2 if reduction == "none" else 1)
    got = ours(hidden, weight, bias, targets, upstream, backend=backend, chunk_size=7, **options)
    check_against_truth(got, hidden, weight, bias, targets, upstream, torch.float32, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fraction", [0.6, 1.0])
def test_opcheck(backend, fraction):
    hidden, weight, bias, targets = make_case(fraction, rows=9)
    for b in (None, bias):
        flags = (True, True, b is not None)
        for reduction in ("mean", "none"):
            torch.library.opcheck(
                torch.ops.minimind_fast.fused_linear_cross_entropy.default,
                (
                    hidden.requires_grad_(),
                    weight.requires_grad_(),
                    b,
                    targets,
                    IGNORE_INDEX,
                    reduction,
                    0.1,
                    1e-3,
                    4,
                    backend,
                    *flags,
                ),
            )
        torch.library.opcheck(
            torch.ops.minimind_fast.fused_linear_cross_entropy_backward.default,
            (
                hidden.detach(),
                weight.detach(),
                b,
                targets,
                torch.rand(9),
                IGNORE_INDEX,
                0.1,
                1e-3,
                4,
                backend,
                *flags,
            ),
        )
