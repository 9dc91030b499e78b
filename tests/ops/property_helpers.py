"""Shared pieces of the property-based op tests (tests/ops/test_property_*.py): hypothesis
profiles, input strategies and a tolerance check that understands inf and NaN.

Profiles: "ci" (the default: a small fixed example budget, derandomized so a CI run is
reproducible, no example database) and "thorough" (many random examples), chosen with
MINIMIND_FAST_HYPOTHESIS_PROFILE=thorough. Each example builds its tensors from a drawn seed,
so a failure shrinks to a small, replayable case.

Tolerances (|actual - truth| <= atol + rtol * |truth|, atol relative to max |truth| over the
finite entries, or to the largest term of a sum where one is given: a GEMM's rounding error
scales with its terms, not its result; truth is computed by PyTorch/transformers in float64
from the same input values):
  dtype     rtol     atol (x max|truth|)   why
  float64   1e-7     1e-7                  the torch reference computes float64 in float64
  float32   1e-5     1e-5                  fp32 maths both sides; reduction order differs
  float16   2e-3     2e-3                  the output (and some intermediates) rounded to fp16
  bfloat16  2e-2     2e-2                  idem in bf16; the Triton interpreter also converts
                                           fp32 -> bf16 by truncation, up to 1 ulp off a GPU
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from helpers import HAS_CUDA, assert_close
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

PROFILE_ENV = "MINIMIND_FAST_HYPOTHESIS_PROFILE"
_COMMON = dict(
    database=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
# A generous per-example deadline: it bounds a runaway case without failing on a busy machine.
settings.register_profile(
    "ci", max_examples=12, derandomize=True, deadline=timedelta(seconds=60), **_COMMON
)
settings.register_profile("thorough", max_examples=300, deadline=timedelta(seconds=120), **_COMMON)
settings.load_profile(os.environ.get(PROFILE_ENV, "ci"))

TOLERANCES = {torch.float64: 1e-7, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
HALF_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the Triton kernels take
BACKENDS = ("triton", "torch")


# 0, or a smoothing float32 can hold: below ~1e-38 it rounds to 0 and F.cross_entropy's own
# float32 path gives 0 * inf = NaN for a masked row, as ours does (float64 truth gives inf).
LABEL_SMOOTHING = st.one_of(st.just(0.0), st.floats(1e-6, 1.0))


def dtypes_for(backend: str):
    """The dtypes an op takes on `backend`: float64 on the reference only."""
    return st.sampled_from(HALF_DTYPES if backend == "triton" else HALF_DTYPES + (torch.float64,))


# Values are drawn on the CPU from the example's seed (the same on every machine), then moved.
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator(seed)).to(DEVICE)


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.rand(*shape, generator=generator(seed)).to(DEVICE)


def randint(high: int, shape: tuple, seed: int) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=generator(seed)).to(DEVICE)


LAYOUTS = ("contiguous", "transposed", "row_slice", "column_step")


def laid_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as the 2-d x (rows, cols), stored with another stride pattern."""
    rows, cols = x.shape
    if layout == "transposed":
        return x.t().contiguous().t()
    if layout == "row_slice":  # row stride > cols, unit column stride
        padded = x.new_zeros(rows, cols + 5)
        padded[:, 2 : 2 + cols] = x
        return padded[:, 2 : 2 + cols]
    if layout == "column_step":
        wide = x.new_zeros(rows, 2 * cols)
        wide[:, ::2] = x
        return wide[:, ::2]
    return x.contiguous()


def check_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype,
    what: str,
    magnitude: torch.Tensor | None = None,
) -> None:
    """Values within the table's row for `dtype`; inf and NaN must sit at the same places.
    magnitude: the size of the terms `expected` sums (e.g. |A| @ |B| for A @ B), for atol."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    actual, expected = actual.double(), expected.double()
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), f"{what}: NaN pattern"
    infinite = torch.isinf(expected)
    assert torch.equal(actual[infinite], expected[infinite]), f"{what}: inf entries differ"
    if finite.any():
        tol = TOLERANCES[dtype]
        reference = expected if magnitude is None else magnitude.double()
        scale = max(reference[finite].abs().max().item(), 1e-6)
        assert_close(actual[finite], expected[finite], atol=tol * scale, rtol=tol, what=what)
