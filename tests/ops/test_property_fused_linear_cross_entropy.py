"""Property tests: ops.fused_linear_cross_entropy against F.linear + F.cross_entropy (PyTorch's
own), forward and backward (hidden, weight, bias), on both per-chunk backends (the Triton
kernel, interpreted on CPU, and the torch reference).

Random: rows, hidden size, V (also past the kernel's single-block limit), dtype, chunk size,
reduction, ignore_index and ignored rows, label smoothing, an optional bias (sometimes masking a
block of classes with -inf), leading batch dims and the memory layout of hidden and weight.
The truth runs F.linear in the inputs' dtype (the logits are rounded there, as the op rounds
each chunk) and F.cross_entropy on those logits in float64; dh, dW and db are sums over V or N
terms, so their atol scales with the terms. Tolerances: tests/ops/property_helpers.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, given
from hypothesis import strategies as st
from property_helpers import (
    BACKENDS,
    DEVICE,
    LABEL_SMOOTHING,
    check_close,
    dtypes_for,
    laid_out,
    rand,
    randint,
    randn,
)

from minimind_fast import ops
from minimind_fast.kernels.cross_entropy import MAX_SINGLE_BLOCK_V

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's -inf - -inf


@st.composite
def cases(draw, backend: str) -> dict:
    vocab = draw(st.one_of(st.integers(1, 80), st.just(MAX_SINGLE_BLOCK_V + 1)))
    event("looped vocabulary" if vocab > MAX_SINGLE_BLOCK_V else "one-block vocabulary")
    small = vocab <= 80
    rows = draw(st.integers(1, 24 if small else 2))
    return dict(
        vocab=vocab,
        rows=rows,
        hidden=draw(st.integers(1, 24 if small else 4)),
        dtype=draw(dtypes_for(backend)),
        chunk_size=draw(st.one_of(st.none(), st.integers(1, rows + 3))),
        reduction=draw(st.sampled_from(("mean", "sum", "none"))),
        ignore_index=draw(st.sampled_from((-100, 0))),
        ignored=draw(st.lists(st.booleans(), min_size=rows, max_size=rows)),
        label_smoothing=draw(LABEL_SMOOTHING),
        bias=draw(st.sampled_from(("none", "bias", "masked bias"))),
        batched=draw(st.booleans()),
        hidden_layout=draw(st.sampled_from(("contiguous", "transposed", "row_slice"))),
        weight_layout=draw(st.sampled_from(("contiguous", "transposed", "column_step"))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_inputs(case: dict):
    rows, hidden_size, vocab, seed = case["rows"], case["hidden"], case["vocab"], case["seed"]
    dtype = case["dtype"]
    hidden = laid_out(randn(rows, hidden_size, seed=seed).to(dtype), case["hidden_layout"])
    weight = randn(vocab, hidden_size, seed=seed + 1) / hidden_size**0.5
    weight = laid_out(weight.to(dtype), case["weight_layout"])
    bias = None
    if case["bias"] != "none":
        bias = randn(vocab, seed=seed + 2)
        if case["bias"] == "masked bias" and vocab > 1:
            bias[: vocab // 2] = -float("inf")  # a vocabulary mask over the leading classes
        bias = bias.to(dtype)
    targets = randint(vocab, (rows,), seed=seed + 3)
    targets[torch.tensor(case["ignored"], device=DEVICE)] = case["ignore_index"]
    upstream = rand(rows, seed=seed + 4) + 0.5
    return hidden, weight, bias, targets, upstream if case["reduction"] == "none" else upstream[0]


def leaves(*tensors):
    return [None if t is None else t.detach().requires_grad_() for t in tensors]


def truth(hidden, weight, bias, targets, upstream, case):
    """(loss, dh, dW, db): F.linear in the inputs' dtype, F.cross_entropy in float64; and
    the magnitudes of the terms dh, dW, db sum."""
    h, w, b = leaves(hidden, weight, bias)
    valid = targets != case["ignore_index"]
    logits = F.linear(h, w, b).double()
    logits.retain_grad()
    loss = F.cross_entropy(
        logits,
        targets,
        ignore_index=case["ignore_index"],
        reduction="none",
        label_smoothing=case["label_smoothing"],
    )
    if case["reduction"] == "sum":
        loss = loss.sum()
    elif case["reduction"] == "mean":  # F's mean; 0 for an all-ignored batch where F gives NaN
        loss = loss.sum() / valid.sum().clamp(min=1)
    loss.backward(upstream.double())
    terms = dlogits_terms(logits.detach(), targets, valid, upstream, case)
    magnitudes = (terms @ weight.double().abs(), terms.t() @ hidden.double().abs(), terms.sum(0))
    return (loss.detach(), h.grad, w.grad, None if b is None else b.grad), magnitudes


def dlogits_terms(logits, targets, valid, upstream, case):
    """The size of the terms of dlogits = g_r * (p - (1 - eps) * onehot - eps / V): they, not
    their difference (0 for V = 1), set the rounding error of the sums dh, dW and db."""
    eps, vocab = case["label_smoothing"], case["vocab"]
    row = upstream.double().abs().expand(valid.shape) * valid
    if case["reduction"] == "mean":
        row = row / valid.sum().clamp(min=1)
    onehot = F.one_hot(torch.where(valid, targets, 0), vocab)
    terms = torch.softmax(logits, dim=-1) + (1 - eps) * onehot + eps / vocab
    return torch.nan_to_num(terms) * row[:, None]


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_fused_linear_cross_entropy_matches_torch(backend, data):
    case = data.draw(cases(backend))
    hidden, weight, bias, targets, upstream = make_inputs(case)
    h, w, b = leaves(hidden, weight, bias)
    batch = (1, case["rows"]) if case["batched"] else (case["rows"],)
    loss = ops.fused_linear_cross_entropy(
        h.view(*batch, case["hidden"]),
        w,
        targets.view(batch),
        case["ignore_index"],
        case["reduction"],
        case["label_smoothing"],
        backend=backend,
        chunk_size=case["chunk_size"],
        bias=b,
    )
    loss = loss.view(-1) if case["reduction"] == "none" else loss
    loss.backward(upstream.to(loss.dtype))
    expected, magnitudes = truth(hidden, weight, bias, targets, upstream, case)
    dtype = case["dtype"]
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == loss_dtype
    check_close(loss, expected[0], dtype, "loss")  # from logits rounded to `dtype`
    grads = (h.grad, w.grad, None if b is None else b.grad)
    for name, actual, ref, magnitude in zip(
        ("dh", "dW", "db"), grads, expected[1:], magnitudes, strict=True
    ):
        if ref is not None:
            assert actual.dtype == dtype, name
            check_close(actual, ref, dtype, name, magnitude)
