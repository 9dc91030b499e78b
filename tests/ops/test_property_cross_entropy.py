"""Property tests: ops.cross_entropy against F.cross_entropy (PyTorch's own, in float64 on the
same input values), forward and backward, on the Triton kernel (interpreted on CPU) and on the
torch reference.

Random: rows, V from 1 to past the kernel's single-block limit (its looped online softmax),
dtype, reduction, ignore_index (also a valid class id), ignored rows, label smoothing, z-loss
(truth: F.cross_entropy + z * torch.logsumexp^2), -inf blocks at the start / middle / end of
rows (vocabulary masks) and the logits' memory layout. Documented differences from F: an
ignored row's gradient is 0 (F: NaN for an ignored row of only -inf) and an all-ignored mean
is 0 (F: NaN). Tolerances: tests/ops/property_helpers.py.
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
    LAYOUTS,
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
LOOPED_VOCABS = (MAX_SINGLE_BLOCK_V, MAX_SINGLE_BLOCK_V + 1, 40000)


@st.composite
def cases(draw, backend: str) -> dict:
    vocab = draw(st.one_of(st.integers(1, 300), st.sampled_from(LOOPED_VOCABS)))
    event("looped vocabulary" if vocab > MAX_SINGLE_BLOCK_V else "one-block vocabulary")
    rows = draw(st.integers(1, 9 if vocab <= 300 else 3))
    return dict(
        vocab=vocab,
        rows=rows,
        dtype=draw(dtypes_for(backend)),
        reduction=draw(st.sampled_from(("mean", "sum", "none"))),
        ignore_index=draw(st.sampled_from((-100, -1, vocab - 1))),
        ignored=draw(st.lists(st.booleans(), min_size=rows, max_size=rows)),
        label_smoothing=draw(LABEL_SMOOTHING),
        z_loss_scale=draw(st.sampled_from((0.0, 0.0, 1e-3))),
        masks=draw(
            st.lists(
                st.sampled_from(("none", "start", "middle", "end")), min_size=rows, max_size=rows
            )
        ),
        layout=draw(st.sampled_from(LAYOUTS)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_inputs(case: dict):
    rows, vocab, seed = case["rows"], case["vocab"], case["seed"]
    logits = randn(rows, vocab, seed=seed) * 4
    targets = randint(vocab, (rows,), seed=seed + 1)
    for row, mask in enumerate(case["masks"]):
        span = max(vocab // 4, 1)
        starts = {"none": vocab, "start": 0, "middle": (vocab - span) // 2, "end": vocab - span}
        start = starts[mask]
        logits[row, start : start + span] = -float("inf")
        if not torch.isfinite(logits[row]).any():  # keep one class possible in the row
            logits[row, -1] = 0.0
    targets[torch.tensor(case["ignored"], device=DEVICE)] = case["ignore_index"]
    logits = laid_out(logits.to(case["dtype"]), case["layout"])
    upstream = rand(rows, seed=seed + 2) + 0.5
    return logits, targets, upstream if case["reduction"] == "none" else upstream[0]


def truth(logits, targets, upstream, case):
    """(loss, dlogits) from F.cross_entropy in float64, reduced by its documented rule."""
    x = logits.detach().double().requires_grad_()
    valid = targets != case["ignore_index"]
    loss = F.cross_entropy(
        x,
        targets,
        ignore_index=case["ignore_index"],
        reduction="none",
        label_smoothing=case["label_smoothing"],
    )
    if case["z_loss_scale"]:
        lse = torch.logsumexp(torch.where(valid[:, None], x, 0.0), dim=-1)
        loss = loss + torch.where(valid, case["z_loss_scale"] * lse.square(), 0.0)
    if case["reduction"] == "sum":
        loss = loss.sum()
    elif case["reduction"] == "mean":
        loss = loss.sum() / valid.sum().clamp(min=1)
    loss.backward(upstream.double())
    grad = torch.where(valid[:, None], x.grad, 0.0)  # documented: ignored rows get 0
    return loss.detach(), grad


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_cross_entropy_matches_torch(backend, data):
    case = data.draw(cases(backend))
    logits, targets, upstream = make_inputs(case)
    x = logits.detach().requires_grad_()
    loss = ops.cross_entropy(
        x,
        targets,
        case["ignore_index"],
        case["reduction"],
        case["label_smoothing"],
        case["z_loss_scale"],
        backend=backend,
    )
    loss.backward(upstream.double())
    expected_loss, expected_grad = truth(logits, targets, upstream, case)
    loss_dtype = torch.float64 if case["dtype"] == torch.float64 else torch.float32
    assert loss.dtype == loss_dtype and x.grad.dtype == case["dtype"]
    check_close(loss, expected_loss, loss_dtype, "loss")
    check_close(x.grad, expected_grad, case["dtype"], "dlogits")
