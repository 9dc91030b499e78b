"""Helpers shared by the test modules (not a test file itself)."""

from __future__ import annotations

import torch

HAS_CUDA = torch.cuda.is_available()


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str = ""
) -> None:
    """torch.testing.assert_close in fp32 (so half-precision results compare against an fp32 or
    fp64 oracle), with `what` in the failure message."""
    torch.testing.assert_close(
        actual.float(),
        expected.float(),
        atol=atol,
        rtol=rtol,
        msg=lambda detail: f"{what}: {detail}" if what else detail,
    )
